"""The image sizes of the protocols, scaled to the model's input size when the model is smaller than the papers'.

The papers' presets evaluate at ImageNet resolution: 224 px crops for ``knn`` and ``linear`` (DINO), 512 px for
``voc-linear`` (mmseg's crops, 480 px stride) and ``hummingbird`` (open-hummingbird-eval). A model trained on
small images (the quickstart's 32-px ViT) is evaluated at its own size instead: every size of the preset is
multiplied by ``image_size / 224`` and rounded to a multiple of the model's stride (a ViT takes only whole
patches), and Hummingbird's memory size (a number of patches) by the square of that ratio. A model whose
input size is 224 px or more keeps the presets exactly; ``image_size`` (``--image_size``) chooses the size
whatever the model's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["PAPER_SIZE", "SizeRule", "model_input_size", "size_rule", "scaled_settings"]

PAPER_SIZE = 224
# protocol -> the settings that are image sizes (each scaled by the same ratio)
_SIZE_FIELDS: dict[str, tuple[str, ...]] = {"knn": ("image_size",), "linear": ("image_size",),
                                            "voc-linear": ("crop_size", "stride"), "hummingbird": ("input_size",)}


@dataclass(frozen=True)
class SizeRule:
    """How the presets' sizes were chosen: ``ratio`` multiplies every size (1.0: the papers' sizes)."""

    image_size: int
    ratio: float
    stride: int
    reason: str

    def scale(self, size: int) -> int:
        """``size`` times the ratio, rounded to a multiple of the stride (at least one stride)."""
        if self.ratio == 1.0:
            return size
        return max(self.stride, round(size * self.ratio / self.stride) * self.stride)


def model_input_size(backbone: Any) -> int | None:
    """The input size the backbone was built for (a ViT's ``img_size``, else timm's ``pretrained_cfg``);
    ``None`` when the model says nothing."""
    model = getattr(backbone, "model", None)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is None:
        return None
    return int(size[-1]) if isinstance(size, (tuple, list)) else int(size)


def size_rule(backbone: Any, image_size: int | None = None) -> SizeRule:
    """The sizes to evaluate at: ``image_size`` when given, else the model's input size when it is below the
    papers' 224 px, else the papers' sizes."""
    stride = int(getattr(backbone, "stride", 1) or 1)
    if image_size is not None:
        if image_size < stride:
            raise ValueError(f"image_size={image_size} is smaller than the model's stride {stride}: pass "
                             f"--image_size of at least {stride} (a multiple of {stride} for a ViT)")
        reason = "--image_size" if image_size != PAPER_SIZE else "the papers' sizes (--image_size 224)"
        return SizeRule(image_size, image_size / PAPER_SIZE, stride, reason)
    own = model_input_size(backbone)
    if own is None or own >= PAPER_SIZE:
        return SizeRule(PAPER_SIZE, 1.0, stride, "the papers' sizes (the model's input size is "
                        f"{own if own is not None else 'unknown'} px; --image_size to change)")
    return SizeRule(own, own / PAPER_SIZE, stride, f"the model's input size {own} px (papers: {PAPER_SIZE}; "
                    "--image_size to change)")


def scaled_settings(protocol: str, settings: Any, rule: SizeRule, given: dict[str, Any] | None = None) -> Any:
    """``settings`` with its image sizes scaled by ``rule``; a setting in ``given`` (set by the user) is kept."""
    given = given or {}
    changes = {name: rule.scale(getattr(settings, name)) for name in _SIZE_FIELDS[protocol] if name not in given}
    if protocol == "hummingbird" and rule.ratio != 1.0 and settings.memory_size is not None \
            and "memory_size" not in given:
        # the memory holds patches: scaled with the image area, so each image keeps about the same share
        changes["memory_size"] = max(1, round(settings.memory_size * rule.ratio ** 2))
    if protocol == "voc-linear" and "stride" in changes:
        crop = changes.get("crop_size", settings.crop_size)
        changes["stride"] = max(1, min(crop, changes["stride"]))
    return dataclasses.replace(settings, **changes) if changes else settings
