"""ContrastiveCrop adapted to ViTs, as BAM uses it (``docs/bam.md``, "ContrastiveCrop").

Every training image has a box, initially the whole image. At the end of the scheduled epochs the teacher's
backbone (the student's when there is no teacher) looks at every training image squashed to the model's
input size: the attention of the CLS query to the patch keys in the last block, summed over heads and
min-max normalised, is upsampled to the image side and thresholded, and the box spans the rows and columns
where it exceeds the threshold. The DataModule then draws the training crops around the boxes
(``datamodules.views.contrastive_crop_params``), through the crop-guide protocol of ``datamodules/base.py``.

Schedule, with 0-based epochs (Lightning's ``current_epoch``, and the official loop's ``epoch``):

- the boxes are recomputed at the end of every epoch ``e`` with ``e >= warmup_epochs``,
  ``e % interval == 0`` and ``e`` not the last epoch (``max_epochs - 1``);
- the crops are RandomResizedCrop up to and including epoch ``max(interval, warmup_epochs)``, and
  box-guided from the epoch after it on, with the latest boxes (the whole image if none was computed yet).

Published (warm-up 40, interval 40): boxes at the end of epochs 40, 80, ..., guided crops from epoch 41.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .backbones import Backbone

__all__ = [
    "ContrastiveCrop",
    "check_attention_backbone",
    "last_block_cls_attention",
    "boxes_from_attention",
    "is_box_update_epoch",
    "uses_guided_crops",
    "model_input_size",
]


# ---------------------------------------------------------------------------------------------- the schedule
def is_box_update_epoch(epoch: int, interval: int, warmup_epochs: float, max_epochs: int | None = None) -> bool:
    """Whether the boxes are recomputed at the end of (0-based) ``epoch``."""
    last = max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1
    return epoch >= warmup_epochs and epoch % interval == 0 and not last


def uses_guided_crops(epoch: int, interval: int, warmup_epochs: float) -> bool:
    """Whether the crops of (0-based) ``epoch`` are drawn around the boxes (else RandomResizedCrop)."""
    return epoch >= max(interval, warmup_epochs) + 1


def _last_update_before(epoch: int, interval: int, warmup_epochs: float) -> int | None:
    """The latest epoch before ``epoch`` at whose end the schedule updates the boxes, or None."""
    if epoch < 1:
        return None
    candidate = (epoch - 1) // interval * interval
    return candidate if candidate >= warmup_epochs else None


# ------------------------------------------------------------------------------------- attention and boxes
def check_attention_backbone(backbone: Backbone) -> None:
    """A ``ValueError`` unless ``backbone`` is a ViT whose last block's attention this module can read: a CLS
    token and a timm ``Attention`` with a fused ``qkv`` projection (``vit_*``, ``deit_*``)."""
    if not backbone.is_vit:
        raise ValueError(
            f"ContrastiveCrop reads the CLS attention of the last transformer block, and {backbone.name} is not a "
            "ViT (the official code asserts one too): use a ViT backbone or set contrastive_crop=False")
    model = backbone.model
    blocks = getattr(model, "blocks", None)
    attention = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    if attention is None or not isinstance(getattr(attention, "qkv", None), nn.Linear) or not all(
        hasattr(attention, name) for name in ("num_heads", "head_dim", "scale", "q_norm", "k_norm")
    ):
        raise ValueError(
            f"ContrastiveCrop needs the last block of {backbone.name} to be a timm Attention with a fused qkv "
            "projection (blocks[-1].attn.qkv), as timm's VisionTransformer has; this model's attention differs: "
            "use a vit_* / deit_* backbone or set contrastive_crop=False")
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"ContrastiveCrop reads the CLS token's attention, and {backbone.name} is built without a "
                         "class token: build it with class_token=True or set contrastive_crop=False")


def model_input_size(backbone: Backbone) -> tuple[int, int]:
    """The ``(height, width)`` the ViT was built for (``img_size``): the box update's input size."""
    size = getattr(backbone.model.patch_embed, "img_size", None)
    if size is None:
        return 224, 224
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def last_block_cls_attention(backbone: Backbone, images: Tensor) -> Tensor:
    """The CLS query's attention to the patch keys in the last block, summed over heads: ``(B, h, w)`` float32.

    The attention is ``softmax(q k^T / sqrt(d))`` over all keys (prefix tokens included) of the block's
    LayerNorm-ed input; ``q`` and ``k`` are recomputed from the input of ``blocks[-1].attn`` (caught by a
    forward pre-hook) with that module's own ``qkv`` projection and q/k norms, so the fused attention kernel
    the forward uses makes no difference. Call under ``torch.no_grad()`` and in eval mode.
    """
    attention = backbone.model.blocks[-1].attn
    captured: list[Tensor] = []
    handle = attention.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        backbone(images)
    finally:
        handle.remove()
    tokens = captured[-1]
    batch, length, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, length, 3, attention.num_heads, attention.head_dim)
    query = attention.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, heads, 1, d): the CLS query only
    keys = attention.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, heads, T, d)
    logits = (query.float() * attention.scale) @ keys.float().transpose(-2, -1)
    to_patches = logits.softmax(dim=-1)[:, :, 0, backbone.num_prefix_tokens :]  # (B, heads, h * w)
    height, width = backbone.grid_size(*images.shape[-2:])
    return to_patches.sum(dim=1).reshape(batch, height, width)


def _span(above: Tensor) -> tuple[Tensor, Tensor]:
    """First and last True position of every row of ``above`` ``(B, L)`` over ``L``; ``(0, 1)`` for an all-False row."""
    length = above.shape[1]
    position = torch.arange(length, device=above.device)
    first = torch.where(above, position, length).amin(dim=1)
    last = torch.where(above, position, -1).amax(dim=1)
    empty = ~above.any(dim=1)
    first = torch.where(empty, torch.zeros_like(first), first)
    last = torch.where(empty, torch.full_like(last, length), last)
    return first.float() / length, last.float() / length


def boxes_from_attention(attention: Tensor, image_size: tuple[int, int], threshold: float = 0.1) -> Tensor:
    """Boxes ``(B, 4)`` normalised ``(y0, x0, y1, x1)`` from attention maps ``(B, h, w)`` (official rule).

    Per map: subtract its minimum, divide by its (new) maximum + 1e-5, upsample bilinearly to
    ``image_size`` ``(H, W)``; the box runs from the first to the last pixel row (column) whose maximum
    exceeds ``threshold``, as indices divided by ``H`` (``W``) — so ``y1 = last row / H``, and a map above the
    threshold everywhere gives ``(0, 0, (H - 1) / H, (W - 1) / W)``. A constant map (nothing above the
    threshold) gives the whole image ``(0, 0, 1, 1)``, where the official code would fail.
    """
    batch = attention.shape[0]
    flat = attention.float().reshape(batch, -1)
    flat = flat - flat.amin(dim=1, keepdim=True)
    flat = flat / (flat.amax(dim=1, keepdim=True) + 1e-5)
    maps = F.interpolate(flat.reshape(batch, 1, *attention.shape[-2:]), size=tuple(image_size), mode="bilinear",
                         align_corners=False)[:, 0]
    y0, y1 = _span(maps.amax(dim=2) > threshold)
    x0, x1 = _span(maps.amax(dim=1) > threshold)
    return torch.stack([y0, x0, y1, x1], dim=1)


# ------------------------------------------------------------------------------------------------- the mixin
class ContrastiveCrop:
    """Mixin for an :class:`~ssl_modules.SSLModule` that guides its training crops with ContrastiveCrop boxes.

    Call :meth:`init_contrastive_crop` in ``__init__`` (a method whose ContrastiveCrop is optional simply
    does not call it: ``uses_contrastive_crop`` is then False and every hook passes through). Then, with
    ``trainer.datamodule`` implementing the crop-guide protocol (every ``datamodules.PretrainDataModule``):

    - ``on_fit_start`` (or the checkpoint restore, for strategies that restore after it): the boxes (whole
      images, or those of the checkpoint) and the guide state of the checkpointed epoch are pushed to the
      DataModule, before the first epoch's loader workers start;
    - ``on_train_epoch_end``: the boxes are recomputed when the schedule says so (module docstring), and the
      next epoch's guide state is pushed (RandomResizedCrop, or the boxes);
    - ``on_train_epoch_start``: catches up with an update or a push a resumed run missed (a checkpoint
      written before this module's epoch-end hook ran);
    - checkpoints hold the boxes (``checkpoint["contrastive_crop"]``).

    Under DDP every process computes the boxes of its share of the images (``i % world_size == rank``) and
    all-gathers them into dataset order; every process's DataModule gets the whole table.
    """

    crop_boxes: Tensor | None

    def init_contrastive_crop(self, alpha: float = 0.6, box_threshold: float = 0.1, interval: int = 40,
                              warmup_epochs: float = 40.0) -> None:
        if not alpha > 0:
            raise ValueError(f"ccrop_alpha={alpha}: the Beta(alpha, alpha) position draw needs alpha > 0 (BAM: 0.6)")
        if not 0.0 <= box_threshold < 1.0:
            raise ValueError(f"ccrop_box_threshold={box_threshold} must lie in [0, 1): it thresholds attention maps "
                             "normalised to [0, 1] (BAM: 0.1)")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"ccrop_interval={interval} must be a whole number of epochs >= 1 (BAM: 40)")
        if warmup_epochs < 0:
            raise ValueError(f"ccrop_warmup_epochs={warmup_epochs} must be >= 0 (BAM: 40)")
        check_attention_backbone(self.backbone)
        self._ccrop = dict(alpha=float(alpha), threshold=float(box_threshold), interval=int(interval),
                           warmup=float(warmup_epochs))
        self.crop_boxes = None  # (N, 4) on the CPU once the DataModule is known
        self._crop_boxes_epoch: int | None = None  # the epoch at whose end crop_boxes were computed
        self._crop_guides_epoch: int | None = None  # the epoch the DataModule's guide state was set for
        self._ccrop_resume_epoch: int | None = None

    @property
    def uses_contrastive_crop(self) -> bool:
        return getattr(self, "_ccrop", None) is not None

    # ---------------------------------------------------------------------------------------- the boxes
    def _crop_guide_datamodule(self) -> Any:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and all(callable(getattr(datamodule, name, None))
                                          for name in ("crop_guide_dataset", "set_crop_guides")):
            return datamodule
        found = (f"the trainer's datamodule {type(datamodule).__name__}, which lacks them" if datamodule is not None
                 else "no datamodule (the trainer was given dataloaders)")
        raise TypeError(
            "contrastive_crop=True needs a DataModule with crop guides (`crop_guide_dataset(size)` and "
            f"`set_crop_guides(boxes, alpha)`; every datamodules.PretrainDataModule has them), but found {found}. "
            "Fit with such a DataModule (e.g. datamodules.ImageNetDataModule), or set contrastive_crop=False.")

    @torch.no_grad()
    def compute_crop_boxes(self, dataset: Dataset | None = None, batch_size: int | None = None,
                           num_workers: int | None = None) -> Tensor:
        """The ContrastiveCrop box ``(y0, x0, y1, x1)`` of every image of ``dataset``: ``(N, 4)`` on the CPU.

        ``dataset`` yields ``(normalised image, anything)`` at the model's input size; default: the
        trainer's ``datamodule.crop_guide_dataset(model_input_size(...))``. The backbone is the teacher's
        where there is one (``embedding_backbone``), run in eval mode under the trainer's precision.
        """
        backbone = self.embedding_backbone
        datamodule = None
        if dataset is None:
            datamodule = self._crop_guide_datamodule()
            dataset = datamodule.crop_guide_dataset(model_input_size(backbone))
        batch_size = batch_size or getattr(datamodule, "eval_batch_size", None) or 64
        num_workers = num_workers if num_workers is not None else getattr(datamodule, "num_workers", 0)
        rank, world = distributed.rank(), distributed.world_size()
        mine = list(range(rank, len(dataset), world))
        batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        # a generator of its own: a loader without one would draw its seed from the training's random stream
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers if batches else 0,
                            generator=torch.Generator().manual_seed(0))
        precision = self.trainer.precision_plugin.forward_context() if self._trainer is not None else None
        pieces = []
        with self.evaluating(), precision or contextlib.nullcontext():
            for images, _ in loader:
                attention = last_block_cls_attention(backbone, images.to(self.device, non_blocking=True))
                pieces.append(boxes_from_attention(attention, tuple(images.shape[-2:]), self._ccrop["threshold"]))
        local = torch.cat(pieces) if pieces else torch.zeros(0, 4, device=self.device)
        index = torch.tensor(mine, dtype=torch.long, device=self.device)
        _, boxes = distributed.gather_in_index_order(index, local)
        return boxes.cpu()

    def update_crop_boxes(self, epoch: int) -> Tensor:
        """Recompute ``crop_boxes`` (recorded as computed at the end of ``epoch``); returns them."""
        self.crop_boxes = self.compute_crop_boxes()
        self._crop_boxes_epoch = epoch
        return self.crop_boxes

    def _push_crop_guides(self, epoch: int) -> None:
        """Set the DataModule's guides for the crops of ``epoch``: the boxes, or None (RandomResizedCrop)."""
        settings = self._ccrop
        guided = uses_guided_crops(epoch, settings["interval"], settings["warmup"])
        self._crop_guide_datamodule().set_crop_guides(self.crop_boxes if guided else None, settings["alpha"])
        self._crop_guides_epoch = epoch

    # ---------------------------------------------------------------------------------------- the hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.uses_contrastive_crop:
            return
        self._ccrop_fitting = True
        self._start_crop_guides()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self._ccrop_fitting = False

    def _start_crop_guides(self) -> None:
        """Whole-image boxes unless restored ones exist, and the guide state of the (resumed) epoch pushed."""
        datamodule = self._crop_guide_datamodule()
        count = len(datamodule.crop_guide_dataset(model_input_size(self.embedding_backbone)))
        if self.crop_boxes is None:
            self.crop_boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(count, 1)
        elif self.crop_boxes.shape[0] != count:
            raise ValueError(f"the checkpoint holds ContrastiveCrop boxes for {self.crop_boxes.shape[0]} images but "
                             f"the training set has {count}: resume with the data set the run was trained on")
        resumed, self._ccrop_resume_epoch = self._ccrop_resume_epoch, None
        self._push_crop_guides(resumed if resumed is not None else self.current_epoch)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if not self.uses_contrastive_crop:
            return
        epoch, settings = self.current_epoch, self._ccrop
        due = _last_update_before(epoch, settings["interval"], settings["warmup"])
        if due is not None and (self._crop_boxes_epoch is None or self._crop_boxes_epoch < due):
            rank_zero_warn(f"ContrastiveCrop: the box update of epoch {due} is missing (the checkpoint was written "
                           "before it, or that epoch was the last of the earlier run); computing the boxes now")
            self.update_crop_boxes(due)
        if self._crop_guides_epoch != epoch:
            self._push_crop_guides(epoch)  # the loader may have prepared its first batches with the old state

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.uses_contrastive_crop:
            return
        epoch, settings = self.current_epoch, self._ccrop
        if is_box_update_epoch(epoch, settings["interval"], settings["warmup"], self.trainer.max_epochs):
            boxes = self.update_crop_boxes(epoch)
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()
            self.log("train/crop_box_area", area.item(), on_step=False, on_epoch=True,
                     sync_dist=distributed.world_size() > 1)  # the same on every process
        self._push_crop_guides(epoch + 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.uses_contrastive_crop:
            checkpoint["contrastive_crop"] = {
                "boxes": None if self.crop_boxes is None else self.crop_boxes.clone(),
                "boxes_epoch": self._crop_boxes_epoch,
                "guides_epoch": self._crop_guides_epoch,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("contrastive_crop")
        if not self.uses_contrastive_crop or state is None:
            return
        self.crop_boxes = None if state["boxes"] is None else state["boxes"].cpu().float()
        self._crop_boxes_epoch = state["boxes_epoch"]
        self._crop_guides_epoch = state["guides_epoch"]
        self._ccrop_resume_epoch = state["guides_epoch"]
        if getattr(self, "_ccrop_fitting", False):  # a strategy that restores after on_fit_start (FSDP, DeepSpeed)
            self._start_crop_guides()
