"""``LabelledStream``: an endless, seeded, resumable stream of labelled batches split between processes."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssl_modules.run import distributed

from .data import batch_chunks, sharded_loader

__all__ = ["LabelledStream"]


class LabelledStream:
    """Global batches of ``batch_size`` items of ``dataset``, each process loading its own slice of each.

    Pass ``p`` visits the items in the order of a permutation seeded by ``(seed, p)`` and drops the last
    incomplete batch, so the sequence of global batches depends only on ``seed`` and on how many were drawn;
    ``position`` (pass, batch) is all a checkpoint needs to continue it exactly.

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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_number)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        batches = batch_chunks(order, self.batch_size)
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    @staticmethod
    def local_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
        """This process's contiguous part of a global batch (parts differ in size by at most one)."""
        bounds = torch.linspace(0, len(batch), world_size + 1).round().long().tolist()
        return batch[bounds[rank] : bounds[rank + 1]]

    def _open_pass(self) -> None:
        pass_number, offset = self.position
        rank, world = distributed.rank(), distributed.world_size()
        self._slices = [self.local_slice(b, rank, world) for b in self.global_batches(pass_number)[offset:]]
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
