"""Fakes for the probe tests: colour-coded images and scenes, and a hand-made feature extractor.

Class ``c`` is drawn in colour ``COLOURS[c]`` (the vertices of a tetrahedron in normalised RGB space, so
mean colours are linearly separable and pairwise cosine -1/3). ``ColourFeatures`` embeds an image as its
mean colour (global) and the mean colour of each 4x4 patch (dense): features that carry the signal, computed
per image (so the bits do not depend on the batch). ``ColourFeatures(constant=True)`` returns ones: no signal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from datamodules import Views
from ssl_modules.networks.backbones import Features

NUM_CLASSES = 4
IMAGE_SIZE = 16
PATCH = 4
COLOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + (0 if split == "train" else 50_000) + index)


class ColourImages(Dataset):
    """``(image (3, S, S), label)``: the class colour plus pixel noise; labels cycle through the classes."""

    def __init__(self, size: int, split: str = "train", noise: float = 1.0, seed: int = 0) -> None:
        self.size, self.split, self.noise, self.seed = size, split, noise, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index % NUM_CLASSES
        noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(self.seed, self.split, index))
        return COLOURS[label][:, None, None] + self.noise * noise, label


class ColourScenes(Dataset):
    """``(image (3, S, S), mask (S, S))``: a background of class 0 with one rectangle of class 1..3, pixel
    noise, and a 2-pixel band of 255 (ignored) along the top edge."""

    def __init__(self, size: int, split: str = "train", noise: float = 0.5, seed: int = 0,
                 image_size: int = IMAGE_SIZE) -> None:
        self.size, self.split, self.noise, self.seed, self.image_size = size, split, noise, seed, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        side = self.image_size
        generator = _generator(self.seed, self.split, index)
        mask = torch.zeros(side, side, dtype=torch.long)
        y0, x0 = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        height, width = torch.randint(side // 4, side // 2 + 1, (2,), generator=generator).tolist()
        mask[y0 : y0 + height, x0 : x0 + width] = 1 + index % (NUM_CLASSES - 1)
        image = COLOURS[mask].permute(2, 0, 1) + self.noise * torch.randn(3, side, side, generator=generator)
        mask[:2] = 255
        return image, mask


def collate_views(items: list[tuple[Tensor, int, int]], labelled: bool = True) -> Views:
    """A one-crop ``Views`` batch of ``(image, label, index)`` items."""
    images = torch.stack([item[0] for item in items])
    batch = images.shape[0]
    labels = torch.tensor([item[1] if labelled else -1 for item in items])
    return Views(crops=[images], boxes=torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).repeat(batch, 1, 1),
                 flipped=torch.zeros(batch, 1, dtype=torch.bool),
                 image_size=torch.full((batch, 2), float(IMAGE_SIZE)),
                 label=labels, index=torch.tensor([item[2] for item in items]))


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


def _collate_labelled(items):
    return collate_views(items, labelled=True)


def _collate_unlabelled(items):
    return collate_views(items, labelled=False)


class ColourData(pl.LightningDataModule):
    """Both sides of the probe-data protocol over colour images/scenes; ``Views`` training batches.

    Args:
        batch_size: training images per process and batch.
        labelled: whether the training batches carry labels (else -1, like COCO).
        num_train, num_val: images per split (classification and segmentation alike).
        classification, segmentation: which sides of the protocol to implement.
    """

    def __init__(self, batch_size: int = 16, labelled: bool = True, num_train: int = 64, num_val: int = 64,
                 classification: bool = True, segmentation: bool = True, noise: float = 1.0) -> None:
        super().__init__()
        self.batch_size, self.labelled, self.num_train, self.num_val = batch_size, labelled, num_train, num_val
        self.noise = noise
        if classification:
            self.num_classes = NUM_CLASSES
            self.eval_dataset = self._eval_dataset
        if segmentation:
            self.num_seg_classes = NUM_CLASSES
            self.segmentation_dataset = self._segmentation_dataset

    def _eval_dataset(self, split: str) -> Dataset:
        return ColourImages(self.num_train if split == "train" else self.num_val, split, self.noise)

    def _segmentation_dataset(self, split: str, size: int | None = None) -> Dataset:
        return ColourScenes(self.num_train if split == "train" else self.num_val, split,
                            image_size=size or IMAGE_SIZE)

    def train_dataloader(self) -> DataLoader:
        """In order; under DDP (with ``use_distributed_sampler=False``) process r takes images r, r + W, ...,
        so that the processes' batches of step t together hold the single-process batch t."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = _Indexed(ColourImages(self.num_train, "train", self.noise))
        return DataLoader(dataset, batch_size=self.batch_size, sampler=list(range(rank, self.num_train, world)),
                          drop_last=True, collate_fn=_collate_labelled if self.labelled else _collate_unlabelled)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ColourImages(8, "val"), batch_size=8)


class PlainData(pl.LightningDataModule):
    """A DataModule with training batches and nothing of the probe-data protocol."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Indexed(ColourImages(32, "train")), batch_size=8, collate_fn=_collate_unlabelled)


class ColourFeatures(pl.LightningModule):
    """Hand-made features: mean colour (global) and mean colour of each ``PATCH`` x ``PATCH`` patch (dense).

    ``constant=True`` gives ones instead (no signal); ``return_embedding=True`` makes the training step
    return ``{"loss", "embedding"}`` as the library's methods do. A dummy parameter gives the Trainer something
    to train.
    """

    def __init__(self, constant: bool = False, return_embedding: bool = False) -> None:
        super().__init__()
        self.constant, self.return_embedding = constant, return_embedding
        self.dummy = nn.Parameter(torch.ones(1))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Features:
        cells = F.avg_pool2d(images.float(), PATCH)
        if self.constant:
            cells = torch.ones_like(cells)
        grid = (cells.shape[-2], cells.shape[-1])
        dense = cells.flatten(2).transpose(1, 2)
        return Features(global_=cells.mean(dim=(2, 3)), dense=dense.contiguous(), grid=grid)

    @torch.no_grad()
    def visual_diagnostics(self, batch: Any) -> dict[str, Tensor]:
        return {"colours": batch.crops[0][0].sigmoid()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | dict[str, Tensor]:
        loss = (self.dummy ** 2).sum()
        if self.return_embedding:  # the methods' fast path: the step's own embedding of crops[0]
            return {"loss": loss, "embedding": self.embed(batch.crops[0]).global_}
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SaveProbeResults(Callback):
    """Writes every probe's ``last_metrics`` and ``state_dict()`` and the trainer's logged metrics to
    ``folder/rank<r>.pt`` when fitting or validating ends (for DDP tests: spawned processes send nothing back)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)

    def _save(self, trainer: pl.Trainer) -> None:
        probes = {cb.state_key: {"metrics": dict(cb.last_metrics), "state": cb.state_dict()}
                  for cb in trainer.callbacks if hasattr(cb, "last_metrics")}
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save({"probes": probes, "logged": logged}, Path(self.folder) / f"rank{trainer.global_rank}.pt")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._save(trainer)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """A quiet CPU Trainer for the probe tests."""
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1, limit_val_batches=0)
    kwargs.update(overrides)
    return kwargs
