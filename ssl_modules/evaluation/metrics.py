"""Metrics of the protocols: confusion matrices, mIoU (over all classes or over present ones), mIoU after
Hungarian matching (open-hummingbird-eval), top-k accuracy; each summed over processes before it is read."""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_modules.run import distributed

__all__ = ["confusion_matrix", "sum_over_processes", "iou_per_class", "miou_all_classes", "miou_present_classes",
           "hungarian_assignment", "hungarian_miou", "all_background_miou"]

IGNORE = 255


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction; 255 ignored."""
    targets, predictions = targets.reshape(-1).long(), predictions.reshape(-1).long()
    keep = targets != IGNORE
    pairs = targets[keep] * num_classes + predictions[keep]
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def sum_over_processes(counts: Tensor) -> Tensor:
    """Integer counts summed over every process (exact: the one-process value)."""
    return distributed.all_reduce(counts.clone(), "sum") if distributed.is_distributed() else counts


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


def all_background_miou(confusion: Tensor, background: int = 0) -> float:
    """The mIoU (over all classes) of predicting ``background`` everywhere: the trivial floor."""
    counts = confusion.sum(1).double()
    total = counts.sum()
    return float((counts[background] / total.clamp(min=1)) / confusion.shape[0]) if total > 0 else 0.0
