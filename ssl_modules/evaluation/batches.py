"""Which images each process reads, for the offline protocols and the online probes alike.

Evaluation sets are split between processes by whole batches: the indices are cut into batches in order
and process ``r`` of ``W`` reads batches ``r, r + W, r + 2W, ...``. Every batch then holds the same images as in
a single-process run, so the features are the same bits, and gathering them in dataset-index order
reproduces the single-process order exactly.

Training a head draws seeded global batches (a permutation per pass, the last incomplete batch dropped);
each process reads its contiguous slice of every global batch. ``LabelledStream`` is the endless, resumable
version of these global batches.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_modules.run import distributed

__all__ = ["fixed_subset", "batch_chunks", "shard_batches", "sharded_loader", "global_batches", "local_slice",
           "LabelledStream"]


def fixed_subset(size: int, fraction: float = 1.0, max_items: int | None = None, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded random subset of ``range(size)``: ``fraction`` of it, at most ``max_items``.

    The same arguments give the same subset in every process and every run.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    count = max(1, round(size * fraction)) if size else 0
    if max_items is not None:
        count = min(count, max_items)
    if count >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def batch_chunks(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut in order into batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    return [list(indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]


def shard_batches(chunks: Sequence[list[int]], rank: int | None = None,
                  world_size: int | None = None) -> list[list[int]]:
    """The batches process ``rank`` (default: this process) handles: ``chunks[rank::world_size]``."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    return list(chunks[rank::world_size])


def sharded_loader(dataset: Dataset, batches: Sequence[list[int]], num_workers: int = 0, seed: int = 0,
                   pin_memory: bool | None = None) -> DataLoader:
    """A loader yielding exactly ``batches`` (lists of dataset indices), in order.

    It has its own seeded generator: a DataLoader without one draws its workers' base seed from the global
    random generator, which would make the method's training depend on whether probes are attached.
    ``pin_memory`` defaults to whether CUDA is available.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(dataset, batch_sampler=list(batches), num_workers=num_workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(seed))


def global_batches(size: int, batch_size: int, seed: int, pass_number: int,
                   drop_last: bool = True) -> list[list[int]]:
    """Seeded shuffled global batches of ``range(size)`` for one pass: the permutation seeded by
    ``(seed, pass_number)`` cut into batches, the last incomplete one dropped (unless it is the only one)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + pass_number)).tolist()
    batches = batch_chunks(order, batch_size)
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def local_slice(batch: list[int], rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Process ``rank``'s (default: this process's) contiguous part of a global batch (parts differ in size by
    at most one)."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    bounds = [round(len(batch) * r / world_size) for r in range(world_size + 1)]
    return batch[bounds[rank] : bounds[rank + 1]]


class LabelledStream:
    """Global batches of ``batch_size`` items of ``dataset``, each process loading its own slice of each.

    Pass ``p`` is ``global_batches(len(dataset), batch_size, seed, p)``, so the sequence of global batches
    depends only on ``seed`` and on how many were drawn; ``position`` (pass, batch) is all a checkpoint needs
    to continue it exactly.

    Args:
        dataset: ``(image, label)`` items.
        batch_size: items per global batch (over all processes).
        seed: seed of the permutations.
        num_workers: loader workers per process.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("the labelled data set of the stream is empty")
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.position: tuple[int, int] = (0, 0)
        self._iterator: Iterator[Any] | None = None
        self._slices: list[list[int]] = []

    def global_batches(self, pass_number: int) -> list[list[int]]:
        """The global batches of pass ``pass_number`` (dataset indices)."""
        return global_batches(len(self.dataset), self.batch_size, self.seed, pass_number)

    def _open_pass(self) -> None:
        pass_number, offset = self.position
        rank, world = distributed.rank(), distributed.world_size()
        self._slices = [local_slice(b, rank, world) for b in self.global_batches(pass_number)[offset:]]
        if any(not part for part in self._slices):
            raise ValueError(f"batch_size={self.batch_size} leaves a process without images; "
                             f"use a batch_size of at least the number of processes ({world})")
        self._iterator = iter(sharded_loader(self.dataset, self._slices, self.num_workers))

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """This process's ``(images, labels, dataset indices)`` of the next global batch."""
        if self._iterator is None:
            self._open_pass()
        try:
            images, labels = next(self._iterator)
        except StopIteration:
            self.position = (self.position[0] + 1, 0)
            self._open_pass()
            images, labels = next(self._iterator)
        index = torch.tensor(self._slices.pop(0), dtype=torch.long)
        self.position = (self.position[0], self.position[1] + 1)
        return images, torch.as_tensor(labels), index

    def seek(self, position: tuple[int, int]) -> None:
        """Continue from ``position`` (pass, batch) on the next draw."""
        self.position = (int(position[0]), int(position[1]))
        self.close()

    def close(self) -> None:
        """Drop the open loader (and its worker processes)."""
        self._iterator, self._slices = None, []
