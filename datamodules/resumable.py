"""A training sampler and loader that resume mid-epoch, and whose order and views do not depend on workers.

``ResumableSampler`` orders the data set by a permutation seeded with ``(seed, epoch)`` (one process or
``num_replicas`` DDP processes: each takes its strided share, as ``DistributedSampler`` does) and yields
``(epoch, index)`` keys, so that the data set draws the item's views from ``item_generator(seed, epoch,
index)`` (``datamodules.views``): the epoch travels with every key, to worker processes too, persistent ones
included. It is a ``DistributedSampler``, so Lightning keeps it instead of putting its own in place.

``ResumableDataLoader`` gives Lightning the ``state_dict`` / ``load_state_dict`` it looks for (Lightning
saves it in the checkpoint's loop state and restores it before the epoch's iterator starts): the epoch and
how many batches of it training has consumed; the resumed epoch skips those and continues with the next
batch. See ``docs/resume.md``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """``(epoch, index)`` keys in an order that is a pure function of ``(seed, epoch)``, resumable mid-epoch.

    Args:
        dataset: the data set (only its length is read).
        seed: the run's seed.
        shuffle: permute the indices every epoch (else data-set order).
        num_replicas: number of processes sharing the epoch (1 outside DDP).
        rank: this process's rank.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed))
        self._resume: tuple[int, int] | None = None  # (epoch, samples of it to skip)

    def indices(self, epoch: int) -> list[int]:
        """This process's data-set indices of ``epoch``, in order (padded to equal shares, as DistributedSampler)."""
        count = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(count))
        padding = self.total_size - count
        order += (order * (padding // count + 1))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]

    def skip_in_epoch(self, epoch: int, samples: int) -> None:
        """Let the next iteration over ``epoch`` start after its first ``samples`` samples (a resume)."""
        self._resume = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        skip = 0
        if self._resume is not None:
            resume_epoch, samples = self._resume
            self._resume = None
            skip = samples if resume_epoch == epoch else 0
        return iter([(epoch, index) for index in self.indices(epoch)[skip:]])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` with the ``state_dict`` / ``load_state_dict`` Lightning
    saves in and restores from checkpoints.

    ``batches_done`` says how many batches of the current epoch training has consumed; the DataModule sets
    it to read the trainer's progress (the loader itself cannot tell: Lightning fetches batches ahead).
    Without it the loader counts the batches its iterator has handed out.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int,
                 batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_done = batches_done
        self._handed_out = 0
        self._skipped = 0  # batches skipped at the start of the current iteration (resume)

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        resume = sampler._resume
        self._skipped = resume[1] // self.batch_size if resume is not None and resume[0] == sampler.epoch else 0
        self._handed_out = self._skipped
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        done = self.batches_done() if self.batches_done is not None else self._handed_out
        sampler = self.sampler
        return {"epoch": sampler.epoch, "batches_done": int(done), "batch_size": self.batch_size,
                "seed": sampler.seed, "num_replicas": sampler.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if state.get("num_replicas", sampler.num_replicas) != sampler.num_replicas or state.get(
                "batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"the checkpoint's loader ran {state['num_replicas']} process(es) with batch size "
                f"{state['batch_size']}; this run has {sampler.num_replicas} with {self.batch_size}: resume with the "
                "same number of processes and batch size, or resume from an epoch-end checkpoint")
        if "seed" in state:  # the run's seed travels with the run (workers start after this, so they see it)
            sampler.seed = int(state["seed"])
            if hasattr(self.dataset, "seed"):
                self.dataset.seed = int(state["seed"])
        sampler.skip_in_epoch(state["epoch"], state["batches_done"] * self.batch_size)
