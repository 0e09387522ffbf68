"""ContrastiveCrop as a Lightning callback: BAM's crops drawn around per-image boxes from the CLS attention.

The schedule and the box rule are those of ``ssl_modules.methods.contrastive_crop.boxes`` (its module docstring): boxes
recomputed at the end of every epoch ``e >= warmup_epochs`` with ``e % interval == 0`` (never the last), crops
box-guided from epoch ``max(interval, warmup_epochs) + 1`` on. The DataModule is reached only through the two
methods every ``datamodules.PretrainDataModule`` has: ``crop_guide_dataset(size)`` and
``set_crop_guides(boxes, alpha)``. The callback's ``state_dict`` (boxes, the epoch of their update, the epoch
the guides were set for) lives in the Lightning checkpoint, so a resumed run draws the same crops.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_modules.run import distributed
from ssl_modules.run.optional_parts import isolated_rng, stopped_early
from ssl_modules.methods.contrastive_crop.boxes import (
    boxes_from_attention,
    check_attention_backbone,
    check_settings,
    is_box_update_epoch,
    last_block_cls_attention,
    last_update_before,
    model_input_size,
    uses_guided_crops,
)

__all__ = ["ContrastiveCrop"]

warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('train/crop_box_area'",
                        category=PossibleUserWarning)

_GUIDE_METHODS = ("crop_guide_dataset", "set_crop_guides")


class ContrastiveCrop(pl.Callback):
    """Guide the training crops of a ViT method with ContrastiveCrop boxes (BAM, ``docs`` of ``bam``).

    Args:
        alpha: the crop's position within its box is drawn from ``Beta(alpha, alpha)`` (0.6).
        box_threshold: attention threshold of the boxes, on maps min-max normalised to [0, 1] (0.1).
        interval: recompute the boxes at the end of every ``interval``-th (0-based) epoch (40).
        warmup_epochs: no box update before this epoch (40, BAM's LR warm-up).

    The module must have ``embedding_backbone`` (a timm ViT with a CLS token), ``evaluating()`` and ``device``
    (every ``SSLModule``). Under DDP every process boxes its share of the images (``i % world_size == rank``)
    and all-gathers them into dataset order, so every process's DataModule gets the whole table.
    """

    def __init__(self, alpha: float = 0.6, box_threshold: float = 0.1, interval: int = 40,
                 warmup_epochs: float = 40.0) -> None:
        check_settings(alpha, box_threshold, interval, warmup_epochs)
        self.alpha, self.box_threshold = float(alpha), float(box_threshold)
        self.interval, self.warmup_epochs = int(interval), float(warmup_epochs)
        self.crop_boxes: Tensor | None = None  # (N, 4) on the CPU once the DataModule is known
        self.boxes_epoch: int | None = None  # the epoch at whose end crop_boxes were computed
        self.guides_epoch: int | None = None  # the epoch the DataModule's guide state was set for
        self._resume_epoch: int | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._fitting = False

    # -------------------------------------------------------------------------------------- the datamodule
    @staticmethod
    def crop_guide_datamodule(trainer: pl.Trainer) -> Any:
        """The trainer's datamodule, or a ``TypeError`` saying what it lacks."""
        datamodule = trainer.datamodule
        if datamodule is not None and all(callable(getattr(datamodule, name, None)) for name in _GUIDE_METHODS):
            return datamodule
        found = (f"the trainer's datamodule {type(datamodule).__name__}, which lacks them" if datamodule is not None
                 else "no datamodule (the trainer was given dataloaders)")
        raise TypeError(
            "ContrastiveCrop needs a DataModule with crop guides (`crop_guide_dataset(size)` and "
            f"`set_crop_guides(boxes, alpha)`; every datamodules.PretrainDataModule has them), but found {found}. "
            "Fit with such a DataModule (e.g. datamodules.ImageNetDataModule), or drop the ContrastiveCrop "
            "callback (BAM: contrastive_crop=False).")

    # ------------------------------------------------------------------------------------------- the boxes
    @torch.no_grad()
    def compute_crop_boxes(self, pl_module: pl.LightningModule, dataset: Dataset | None = None,
                           batch_size: int | None = None, num_workers: int | None = None) -> Tensor:
        """The box ``(y0, x0, y1, x1)`` of every image of ``dataset``: ``(N, 4)`` on the CPU.

        ``dataset`` yields ``(normalised image, anything)`` at the model's input size; default: the trainer's
        ``datamodule.crop_guide_dataset(model_input_size(...))``. The backbone is ``embedding_backbone`` (the
        teacher's where there is one), run in eval mode under the trainer's precision.
        """
        backbone = pl_module.embedding_backbone
        trainer = pl_module._trainer
        datamodule = None
        if dataset is None:
            datamodule = self.crop_guide_datamodule(pl_module.trainer)
            dataset = datamodule.crop_guide_dataset(model_input_size(backbone))
        batch_size = batch_size or getattr(datamodule, "eval_batch_size", None) or 64
        num_workers = num_workers if num_workers is not None else getattr(datamodule, "num_workers", 0)
        rank, world = distributed.rank(), distributed.world_size()
        mine = list(range(rank, len(dataset), world))
        batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        # a generator of its own: a loader without one would draw its seed from the training's random stream
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers if batches else 0,
                            generator=torch.Generator().manual_seed(0))
        precision = trainer.precision_plugin.forward_context() if trainer is not None else None
        pieces = []
        with pl_module.evaluating(), precision or contextlib.nullcontext():
            for images, _ in loader:
                attention = last_block_cls_attention(backbone, images.to(pl_module.device, non_blocking=True))
                pieces.append(boxes_from_attention(attention, tuple(images.shape[-2:]), self.box_threshold))
        local = torch.cat(pieces) if pieces else torch.zeros(0, 4, device=pl_module.device)
        index = torch.tensor(mine, dtype=torch.long, device=pl_module.device)
        _, boxes = distributed.gather_in_index_order(index, local)
        return boxes.cpu()

    def update_crop_boxes(self, pl_module: pl.LightningModule, epoch: int) -> Tensor:
        """Recompute ``crop_boxes`` (recorded as computed at the end of ``epoch``); returns them. The global
        random generators are left as they were, so the training step draws what it would have drawn."""
        with isolated_rng():
            self.crop_boxes = self.compute_crop_boxes(pl_module)
        self.boxes_epoch = epoch
        return self.crop_boxes

    def _push_crop_guides(self, trainer: pl.Trainer, epoch: int) -> None:
        """Set the DataModule's guides for the crops of ``epoch``: the boxes, or None (RandomResizedCrop)."""
        guided = uses_guided_crops(epoch, self.interval, self.warmup_epochs)
        self.crop_guide_datamodule(trainer).set_crop_guides(self.crop_boxes if guided else None, self.alpha)
        self.guides_epoch = epoch

    def _start_crop_guides(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Whole-image boxes unless restored ones exist, and the guide state of the (resumed) epoch pushed."""
        datamodule = self.crop_guide_datamodule(trainer)
        count = len(datamodule.crop_guide_dataset(model_input_size(pl_module.embedding_backbone)))
        if self.crop_boxes is None:
            self.crop_boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(count, 1)
        elif self.crop_boxes.shape[0] != count:
            raise ValueError(f"the checkpoint holds ContrastiveCrop boxes for {self.crop_boxes.shape[0]} images but "
                             f"the training set has {count}: resume with the data set the run was trained on")
        resumed, self._resume_epoch = self._resume_epoch, None
        self._push_crop_guides(trainer, resumed if resumed is not None else trainer.current_epoch)

    # ------------------------------------------------------------------------------------------- the hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_attention_backbone(pl_module.embedding_backbone)
            self._trainer, self._module = trainer, pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = True
        self._start_crop_guides(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = last_update_before(epoch, self.interval, self.warmup_epochs)
        if due is not None and (self.boxes_epoch is None or self.boxes_epoch < due):
            rank_zero_warn(f"ContrastiveCrop: the box update of epoch {due} is missing (the checkpoint was written "
                           "before it, or that epoch was the last of the earlier run); computing the boxes now")
            self.update_crop_boxes(pl_module, due)
        if self.guides_epoch != epoch:
            self._push_crop_guides(trainer, epoch)  # the loader may have prepared its first batches with the old state

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if stopped_early(trainer):
            # a signal or max_time stop: no pass over the data set in the grace period; the resumed run
            # computes the same boxes at its start (on_train_epoch_start), from the same weights
            return
        if is_box_update_epoch(epoch, self.interval, self.warmup_epochs, trainer.max_epochs):
            boxes = self.update_crop_boxes(pl_module, epoch)
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()
            # equal on every process: no sync_dist, whose reduction the progress bar would run on rank 0 alone
            pl_module.log("train/crop_box_area", area.item(), on_step=False, on_epoch=True, sync_dist=False)
        self._push_crop_guides(trainer, epoch + 1)

    # ------------------------------------------------------------------------------------------- the state
    def state_dict(self) -> dict[str, Any]:
        return {"boxes": None if self.crop_boxes is None else self.crop_boxes.clone(),
                "boxes_epoch": self.boxes_epoch, "guides_epoch": self.guides_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        boxes = state_dict["boxes"]
        self.crop_boxes = None if boxes is None else boxes.cpu().float()
        self.boxes_epoch = state_dict["boxes_epoch"]
        self.guides_epoch = self._resume_epoch = state_dict["guides_epoch"]
        if self._fitting and self._trainer is not None:  # a strategy that restores after on_fit_start (FSDP, ...)
            self._start_crop_guides(self._trainer, self._module)
