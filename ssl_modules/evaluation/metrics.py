"""The metrics of the protocols and the probes, counted with torchmetrics and summed over processes when
``compute`` is called on every process (integer counts, so the result equals a single-process run).

Counting: ``top_k_accuracies`` (micro top-k accuracy), ``mean_iou`` (torchmetrics' mean IoU over the classes
present in targets or predictions, the probes' value) and ``confusion_counts`` (the confusion matrix, from
which the protocols read their float64 mIoU variants: over all classes, over present classes as mmseg,
after Hungarian matching as open-hummingbird-eval, and the trivial floors). Pixels labelled 255 are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_confusion_matrix

__all__ = ["IGNORE_INDEX", "top_k_accuracies", "mean_iou", "confusion_counts", "update_all", "compute_all",
           "confusion_matrix", "iou_per_class", "miou_all_classes", "miou_present_classes", "hungarian_assignment",
           "hungarian_miou", "segmentation_floors"]

IGNORE_INDEX = 255


def top_k_accuracies(num_classes: int, device: torch.device, top_k: tuple[int, ...] = (1, 5)) -> dict[str, Metric]:
    """``{"top1": ..., "top5": ...}`` micro accuracies (k capped at the number of classes)."""
    return {f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro").to(device)
            for k in top_k}


def mean_iou(num_classes: int, device: torch.device) -> Metric:
    """Mean IoU over the classes present in the targets or the predictions, pixels labelled 255 ignored."""
    return MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX).to(device)


def confusion_counts(num_classes: int, device: torch.device) -> Metric:
    """The ``(num_classes, num_classes)`` int64 confusion matrix (rows ground truth, columns prediction),
    pixels labelled 255 ignored; ``compute`` gives the sum over processes."""
    return MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX).to(device)


def update_all(metrics: Mapping[str, Metric], predictions: Tensor, targets: Tensor) -> None:
    """Update every metric with the same predictions (scores or labels) and targets (skips empty batches)."""
    if targets.numel() == 0:
        return
    targets = targets.long()  # uint8 masks would overflow in the confusion matrix's index arithmetic
    for metric in metrics.values():
        metric.update(predictions, targets)


def compute_all(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """``compute`` every metric (all processes must call this together) as Python floats."""
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """The confusion matrix of one set of labels (this process only), as ``confusion_counts`` counts it."""
    return multiclass_confusion_matrix(predictions.reshape(-1).long(), targets.reshape(-1).long(), num_classes,
                                       ignore_index=IGNORE_INDEX)


def iou_per_class(confusion: Tensor) -> Tensor:
    """``TP / (TP + FP + FN)`` per class (0 where the class is neither in targets nor predictions)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return tp / union.clamp(min=1e-8)


def miou_all_classes(confusion: Tensor) -> float:
    """Mean IoU over all classes, absent ones counting 0 (open-hummingbird-eval, Leopart)."""
    return float(iou_per_class(confusion).mean())


def miou_present_classes(confusion: Tensor) -> float:
    """Mean IoU over the classes present in targets or predictions (mmseg's ``IoUMetric``, torchmetrics)."""
    confusion = confusion.double()
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    return float(iou_per_class(confusion)[present].mean()) if bool(present.any()) else 0.0


def hungarian_assignment(cost: Tensor) -> list[int]:
    """The column assigned to each row of a square ``cost`` matrix minimising the total cost (Kuhn-Munkres
    with potentials, O(n^3)); ``result[row] = column``."""
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"the cost matrix must be square, got {tuple(cost.shape)}")
    c = cost.double().tolist()
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[column] = row, 1-based, 0 = free
    for row in range(1, n + 1):
        match[0], column = row, 0
        low, used = [inf] * (n + 1), [False] * (n + 1)
        while match[column]:
            used[column] = True
            current, delta, nxt = match[column], inf, 0
            for j in range(1, n + 1):
                if used[j]:
                    continue
                reduced = c[current - 1][j - 1] - u[current] - v[j]
                if reduced < low[j]:
                    low[j], way[j] = reduced, column
                if low[j] < delta:
                    delta, nxt = low[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    low[j] -= delta
            column = nxt
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    result = [0] * n
    for column in range(1, n + 1):
        result[match[column] - 1] = column - 1
    return result


def hungarian_miou(confusion: Tensor) -> tuple[float, list[int]]:
    """open-hummingbird-eval's metric: predicted classes matched one-to-one to ground-truth classes maximising
    the summed IoU (cost ``1 - IoU``), then the mean IoU over all classes. Returns the value and the match
    (``match[ground-truth class] = predicted class``)."""
    confusion = confusion.double()
    tp = confusion
    union = confusion.sum(1, keepdim=True) + confusion.sum(0, keepdim=True) - tp
    iou = tp / union.clamp(min=1e-8)
    match = hungarian_assignment(1.0 - iou)
    remapped = confusion[:, match]  # column g now holds the predictions matched to class g
    return miou_all_classes(remapped), match


def segmentation_floors(confusion: Tensor) -> dict[str, float]:
    """mIoU (over all classes) of predicting background everywhere, and of predicting the most frequent
    class everywhere (the best a one-class answer gets after Hungarian matching)."""
    counts = confusion.sum(1).double()
    fractions = counts / counts.sum().clamp(min=1)
    classes = confusion.shape[0]
    return {"all_background_miou": float(fractions[0] / classes), "one_class_miou": float(fractions.max() / classes)}
