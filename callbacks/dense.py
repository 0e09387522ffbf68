"""The dense evaluation loop of the segmentation-style probes (VOC linear head, retrieval): embed the
validation images, ``predict`` pixel labels from the feature maps, mIoU and its all-background floor."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ssl_modules.run import distributed

from .data import batch_chunks, fixed_subset, shard_batches, sharded_loader
from .embedding import dense_maps, embed_images
from .metrics import compute_all, mean_iou, update_all
from .progress import probe_progress

__all__ = ["DensePredictor", "dense_evaluation"]

# feature maps (B, C, h, w), mask size (H, W) -> predicted labels (B, H, W)
DensePredictor = Callable[[Tensor, tuple[int, int]], Tensor]


@torch.no_grad()
def dense_evaluation(probe: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, predict: DensePredictor,
                     first_batch: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> dict[str, float]:
    """``{"miou": ..., "miou_floor": ...}`` of ``predict`` on the probe's validation subset.

    Each process labels its shard of whole batches; the IoU counts are summed, so every process gets the
    one-process value. ``miou_floor`` is the same metric for a prediction of background (0) everywhere.
    ``first_batch(images, masks, predictions)`` sees this process's first batch (e.g. to log examples).
    """
    data = probe.probe_data
    val_set = data.segmentation_dataset("val", probe.image_size)
    subset = fixed_subset(len(val_set), 1.0, probe.max_val_images, probe.seed + 1)
    if not subset:
        raise ValueError(f"{type(probe).__name__}: the segmentation validation set is empty")
    metrics = {"miou": mean_iou(data.num_seg_classes, pl_module.device),
               "miou_floor": mean_iou(data.num_seg_classes, pl_module.device)}
    batches = shard_batches(batch_chunks(subset, probe.batch_size), distributed.rank(), distributed.world_size())
    loader = sharded_loader(val_set, batches, probe.num_workers)
    for position, (images, masks) in enumerate(probe_progress(trainer, loader, len(batches),
                                                              f"{probe.name}: evaluation")):
        maps = dense_maps(embed_images(trainer, pl_module, images))
        masks = masks.to(pl_module.device).long()
        predictions = predict(maps, tuple(masks.shape[-2:]))
        update_all({"miou": metrics["miou"]}, predictions, masks)
        update_all({"miou_floor": metrics["miou_floor"]}, torch.zeros_like(masks), masks)
        if position == 0 and first_batch is not None:
            first_batch(images, masks, predictions)
    return compute_all(metrics)
