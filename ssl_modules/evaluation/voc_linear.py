"""``voc-linear``: linear semantic segmentation of Pascal VOC on a frozen backbone, CrIBo's or VICRegL's recipe.

Presets:

- ``cribo`` (CrIBo, Lebailly et al. 2024, linear segmentation of Pascal VOC; its mmseg Segmenter FCN config): a bare
  1x1 convolution (N(0, 0.01), no BN) on the last layer's patch tokens; Adam lr 0.01, weight decay 0.01,
  poly 0.9 down to lr/10 over 80k iterations of batch 32 on ``train_aug``; pixels normalised with
  mean = std = 127.5 as its config.
- ``vicregl`` (VICRegL, Bardes et al. 2022, frozen linear segmentation of Pascal VOC; its ``linear_*_voc12aug`` config):
  BatchNorm + 1x1 convolution (N(0, 0.01)); AdamW lr 1e-4, weight decay 0.05, 1,500 linear warm-up
  iterations, poly 1.0, 40k iterations of batch 16; ImageNet normalisation.

Both train on random rescales (0.5-2.0 of ``crop_size`` on the short side), random ``crop_size`` crops
(padded with 255 in the mask) and flips; the logits are upsampled bilinearly to the crop and trained with
cross-entropy ignoring 255. Inference resizes the short side to ``crop_size`` (aspect kept), slides
``crop_size`` windows with stride ``stride`` averaging the logits, upsamples them to the original mask and
scores mIoU over the present classes (mmseg) and over all classes. Not reproduced: mmseg's photometric
distortion and ``cat_max_ratio`` crop retries; VICRegL's multi-stage ConvNeXt features (last stage only here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from ssl_modules.evaluation.batches import global_batches, local_slice
from ssl_modules.evaluation.datasets import SegmentationFiles
from ssl_modules.evaluation.features import Extractor, dense_map
from ssl_modules.evaluation.layouts import segmentation_split
from ssl_modules.evaluation.metrics import (
    confusion_counts,
    miou_all_classes,
    miou_present_classes,
    segmentation_floors,
    update_all,
)
from ssl_modules.evaluation.retrieval import upsample_logits
from ssl_modules.evaluation.training import (
    HeadRecipe,
    broadcast_module_,
    lr_factor,
    normal_init_,
    recipe_optimizer,
    set_lr_,
    train_step,
)
from ssl_modules.evaluation.transforms import IMAGENET_MEAN, IMAGENET_STD, keep_ratio_resize, sample_generator
from ssl_modules.run import distributed

__all__ = ["VOCLinearSettings", "VOC_LINEAR_PRESETS", "SegmentationHead", "sliding_window_logits", "run_voc_linear"]


@dataclass(frozen=True)
class VOCLinearSettings:
    """One linear-segmentation recipe (see the module docstring for the presets)."""

    batchnorm: bool = False
    recipe: HeadRecipe = HeadRecipe("adam", 0.01, 0.01, "poly", power=0.9, min_lr=0.001)
    iterations: int = 80_000
    batch_size: int = 32
    crop_size: int = 512
    stride: int = 480
    pixel_norm: str = "127.5"
    num_classes: int = 21
    seed: int = 0
    paper: str = ""

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or not 0 < self.stride <= self.crop_size:
            raise ValueError(f"voc-linear: iterations={self.iterations} and batch_size={self.batch_size} must be "
                             f">= 1 and 0 < stride={self.stride} <= crop_size={self.crop_size}")
        if self.pixel_norm not in ("127.5", "imagenet"):
            raise ValueError(f"voc-linear: pixel_norm={self.pixel_norm!r}; use '127.5' or 'imagenet'")


VOC_LINEAR_PRESETS: dict[str, VOCLinearSettings] = {
    "cribo": VOCLinearSettings(paper="CrIBo (Lebailly et al. 2024) linear-segmentation table (Pascal VOC column); "
                                     "its mmseg FCN config"),
    "vicregl": VOCLinearSettings(
        batchnorm=True, recipe=HeadRecipe("adamw", 1e-4, 0.05, "poly", power=1.0, warmup_steps=1500),
        iterations=40_000, batch_size=16, pixel_norm="imagenet",
        paper="VICRegL (Bardes et al. 2022) main table, Pascal VOC linear segmentation (frozen); "
              "its linear_*_voc12aug config"),
}


class SegmentationHead(nn.Module):
    """``[BatchNorm2d] + Conv2d(1x1)`` with N(0, 0.01) weights, on maps ``(B, C, h, w)``."""

    def __init__(self, channels: int, num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.classifier = normal_init_(nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps: Tensor) -> Tensor:
        return self.classifier(self.norm(maps))


def _normalise(image: Tensor, pixel_norm: str) -> Tensor:
    image = image.float()
    if pixel_norm == "127.5":
        return (image - 127.5) / 127.5
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (image - mean) / std


class _TrainTransform:
    def __init__(self, settings: VOCLinearSettings, epoch: int) -> None:
        self.settings, self.epoch = settings, epoch

    def __call__(self, image: Tensor, mask: Tensor, index: int) -> tuple[Tensor, Tensor]:
        s, generator = self.settings, sample_generator(self.settings.seed, self.epoch, index)
        ratio = 0.5 + 1.5 * float(torch.rand((), generator=generator))
        short = max(1, int(round(s.crop_size * ratio)))
        image = keep_ratio_resize(image, short)
        mask = TF.resize(mask[None], list(image.shape[-2:]), interpolation=TF.InterpolationMode.NEAREST)[0]
        pad_h, pad_w = max(0, s.crop_size - image.shape[-2]), max(0, s.crop_size - image.shape[-1])
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=255)
        top = int(torch.randint(0, image.shape[-2] - s.crop_size + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[-1] - s.crop_size + 1, (1,), generator=generator))
        image = image[:, top:top + s.crop_size, left:left + s.crop_size]
        mask = mask[top:top + s.crop_size, left:left + s.crop_size]
        if float(torch.rand((), generator=generator)) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return _normalise(image, s.pixel_norm), mask


def _raw(settings: VOCLinearSettings):
    return lambda image, mask, index: (image, mask)


def sliding_window_logits(predict, image: Tensor, crop: int, stride: int, num_classes: int) -> Tensor:
    """Logits ``(K, H, W)`` of an image ``(3, H, W)`` (both sides >= ``crop``): windows of ``crop`` every
    ``stride`` pixels (the last one flush with the border), logits averaged where windows overlap."""
    height, width = image.shape[-2:]
    tops = list(range(0, max(height - crop, 0) + 1, stride))
    lefts = list(range(0, max(width - crop, 0) + 1, stride))
    if tops[-1] + crop < height:
        tops.append(height - crop)
    if lefts[-1] + crop < width:
        lefts.append(width - crop)
    total = image.new_zeros(num_classes, height, width)
    count = image.new_zeros(1, height, width)
    for top in tops:
        for left in lefts:
            window = image[:, top:top + crop, left:left + crop]
            total[:, top:top + crop, left:left + crop] += predict(window[None])[0]
            count[:, top:top + crop, left:left + crop] += 1
    return total / count


def run_voc_linear(extractor: Extractor, root: str, settings: VOCLinearSettings, dataset: str = "voc"
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, floors)``: train the head on VOC ``train_aug`` (or ``train``), score ``val``; ``dataset``
    picks another layout of ``layouts.SEGMENTATION_DATASETS`` (the same recipe on ADE20K, Cityscapes, ...)."""
    train = segmentation_split(dataset, root, "train", _TrainTransform(settings, 0), "voc-linear", settings.num_classes)
    device = extractor.device
    with torch.no_grad():
        channels = dense_map(extractor.embed(train[0][0][None])).shape[1]
    torch.manual_seed(settings.seed)
    head = SegmentationHead(channels, settings.num_classes, settings.batchnorm).to(device)
    broadcast_module_(head)
    optimizer = recipe_optimizer(head, settings.recipe)
    batch_size = min(settings.batch_size, len(train))
    if batch_size < distributed.world_size():
        raise ValueError(f"a global batch of {batch_size} leaves some of the {distributed.world_size()} processes "
                         "without images; use a batch_size of at least the number of processes")
    bar = extractor.progress(range(settings.iterations), settings.iterations, "voc-linear: head training")
    steps, epoch = iter(bar), 0
    step = next(steps, None)
    while step is not None:  # one loader per pass over the training set; augmentation seeded by (pass, image)
        batches = global_batches(len(train), batch_size, settings.seed, epoch)
        loader = extractor.loader(train.with_transform(_TrainTransform(settings, epoch)),
                                  [local_slice(batch) for batch in batches])
        for batch, (images, masks) in zip(batches, loader):
            set_lr_(optimizer, lr_factor(settings.recipe, step, settings.iterations))
            maps = dense_map(extractor.embed(images)).float()
            masks = masks.to(device)
            head.train()
            train_step(head, optimizer, lambda maps=maps, masks=masks: _pixel_loss(head, maps, masks),
                       _labelled(masks, len(batch)))
            step = next(steps, None)
            if step is None:
                break
        epoch += 1
    head.eval()
    val = segmentation_split(dataset, root, "val", _raw(settings), "voc-linear", settings.num_classes)
    return _score(extractor, head, val, settings)


def _labelled(masks: Tensor, global_batch: int) -> int:
    """mmseg averages the loss over the labelled pixels of the batch; with crops of a fixed size the
    normaliser is the global batch's pixel count (pixels of 255 are rare), kept shape-static here."""
    return global_batch * masks.shape[-2] * masks.shape[-1]


def _pixel_loss(head: nn.Module, maps: Tensor, masks: Tensor) -> Tensor:
    logits = upsample_logits(head(maps), masks.shape[-2:])
    return F.cross_entropy(logits, masks.long(), ignore_index=255, reduction="sum")


@torch.no_grad()
def _score(extractor: Extractor, head: nn.Module, val: SegmentationFiles, settings: VOCLinearSettings
           ) -> tuple[dict[str, float], dict[str, float]]:
    counts = confusion_counts(settings.num_classes, extractor.device)

    def predict(windows: Tensor) -> Tensor:
        return upsample_logits(head(dense_map(extractor.embed(windows)).float()), windows.shape[-2:])

    mine = list(range(len(val)))[distributed.rank():: distributed.world_size()]
    for index in extractor.progress(mine, len(mine), "voc-linear: validation"):
        image, mask = val.read(index)
        resized = _normalise(keep_ratio_resize(image, settings.crop_size), settings.pixel_norm).to(extractor.device)
        logits = sliding_window_logits(predict, resized, settings.crop_size, settings.stride, settings.num_classes)
        logits = upsample_logits(logits[None], mask.shape)[0]
        update_all({"confusion": counts}, logits.argmax(0), mask.to(extractor.device))
    confusion = counts.compute()
    metrics = {"miou": miou_present_classes(confusion), "miou_all_classes": miou_all_classes(confusion)}
    floors = segmentation_floors(confusion)
    in_targets = confusion.sum(1) > 0
    present = int(in_targets.sum()) + (0 if bool(in_targets[0]) else 1)  # predicting 0 adds background
    floors["all_background_miou_present"] = floors["all_background_miou"] * settings.num_classes / present
    return metrics, floors
