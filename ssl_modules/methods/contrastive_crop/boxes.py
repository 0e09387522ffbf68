"""ContrastiveCrop adapted to ViTs, as BAM uses it (``docs/bam.md``, "ContrastiveCrop").

Every training image has a box, initially the whole image. At the end of the scheduled epochs the teacher's
backbone (the student's when there is no teacher) looks at every training image squashed to the model's
input size: the attention of the CLS query to the patch keys in the last block, summed over heads and
min-max normalised, is upsampled to the image side and thresholded, and the box spans the rows and columns
where it exceeds the threshold. The DataModule then draws the training crops around the boxes
(``datamodules.views.contrastive_crop_params``), through the two crop-guide methods of
``datamodules.PretrainDataModule``. The Lightning callback
``callbacks.ContrastiveCrop`` runs the schedule; this module holds its pure functions.

Schedule, with 0-based epochs (Lightning's ``current_epoch``, and the official loop's ``epoch``):

- the boxes are recomputed at the end of every epoch ``e`` with ``e >= warmup_epochs``,
  ``e % interval == 0`` and ``e`` not the last epoch (``max_epochs - 1``);
- the crops are RandomResizedCrop up to and including epoch ``max(interval, warmup_epochs)``, and
  box-guided from the epoch after it on, with the latest boxes (the whole image if none was computed yet).

Published (warm-up 40, interval 40): boxes at the end of epochs 40, 80, ..., guided crops from epoch 41.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.networks.backbones import Backbone
from ssl_modules.functional.precision import full_precision

__all__ = [
    "boxes_from_attention",
    "check_attention_backbone",
    "check_settings",
    "is_box_update_epoch",
    "last_block_cls_attention",
    "last_update_before",
    "model_input_size",
    "uses_guided_crops",
]


# ---------------------------------------------------------------------------------------------- the schedule
def is_box_update_epoch(epoch: int, interval: int, warmup_epochs: float, max_epochs: int | None = None) -> bool:
    """Whether the boxes are recomputed at the end of (0-based) ``epoch``."""
    last = max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1
    return epoch >= warmup_epochs and epoch % interval == 0 and not last


def uses_guided_crops(epoch: int, interval: int, warmup_epochs: float) -> bool:
    """Whether the crops of (0-based) ``epoch`` are drawn around the boxes (else RandomResizedCrop)."""
    return epoch >= max(interval, warmup_epochs) + 1


def last_update_before(epoch: int, interval: int, warmup_epochs: float) -> int | None:
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
    weights = _cls_attention(query, keys, attention.scale)  # (B, heads, 1, T)
    to_patches = weights[:, :, 0, backbone.num_prefix_tokens :]  # (B, heads, h * w)
    height, width = backbone.grid_size(*images.shape[-2:])
    return to_patches.sum(dim=1).reshape(batch, height, width)


@full_precision
def _cls_attention(query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale)`` over the keys, in at least float32 with autocast off (the box update runs under
    the trainer's precision, whose autocast would turn the product back into a half-precision matmul)."""
    return ((query * scale) @ keys.transpose(-2, -1)).softmax(dim=-1)


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


# ----------------------------------------------------------------------------------------------- settings
def check_settings(alpha: float, box_threshold: float, interval: int, warmup_epochs: float,
                   prefix: str = "") -> None:
    """A ``ValueError`` naming the bad ContrastiveCrop setting (``prefix`` + its name: ``ccrop_`` for BAM's)."""
    if not alpha > 0:
        raise ValueError(f"{prefix}alpha={alpha}: the Beta(alpha, alpha) position draw needs alpha > 0 (BAM: 0.6)")
    if not 0.0 <= box_threshold < 1.0:
        raise ValueError(f"{prefix}box_threshold={box_threshold} must lie in [0, 1): it thresholds attention maps "
                         "normalised to [0, 1] (BAM: 0.1)")
    if int(interval) != interval or interval < 1:
        raise ValueError(f"{prefix}interval={interval} must be a whole number of epochs >= 1 (BAM: 40)")
    if warmup_epochs < 0:
        raise ValueError(f"{prefix}warmup_epochs={warmup_epochs} must be >= 0 (BAM: 40)")
