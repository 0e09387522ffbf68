"""Hand-computed checks of the metrics (confusion matrix, mIoU variants, Hungarian matching; torchmetrics
against the float64 reductions, also summed over two processes) and of other protocol parts (sliding
windows, head schedules)."""
from __future__ import annotations

import itertools

import pytest
import torch

from ssl_modules.evaluation import hungarian_assignment, hungarian_miou
from ssl_modules.evaluation.metrics import (
    confusion_counts,
    confusion_matrix,
    mean_iou,
    miou_all_classes,
    miou_present_classes,
    segmentation_floors,
    update_all,
)
from ssl_modules.evaluation.training import HEAD_OPTIMIZERS, HeadRecipe, head_optimizer, lr_factor, recipe_optimizer
from ssl_modules.evaluation.voc_linear import sliding_window_logits


def test_hungarian_assignment_finds_the_optimum_of_every_permutation():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.rand(5, 5, generator=generator)
        match = hungarian_assignment(cost)
        best = min(sum(float(cost[r, p[r]]) for r in range(5)) for p in itertools.permutations(range(5)))
        assert sorted(match) == list(range(5))
        assert sum(float(cost[r, match[r]]) for r in range(5)) == pytest.approx(best)


def test_hungarian_miou_matches_swapped_classes_and_counts_absent_classes_as_zero():
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([1, 1, 0, 0, 0, 2])  # classes 0 and 1 swapped
    confusion = confusion_matrix(targets, predictions, 4)  # class 3 is absent everywhere
    value, match = hungarian_miou(confusion)
    assert match[:3] == [1, 0, 2]
    assert value == pytest.approx(3 / 4)  # three perfect classes, the absent one counts 0
    assert miou_all_classes(confusion) == pytest.approx(1 / 4)
    assert miou_present_classes(confusion) == pytest.approx(1 / 3)


def test_confusion_matrix_ignores_255():
    confusion = confusion_matrix(torch.tensor([0, 255, 1]), torch.tensor([0, 1, 0]), 2)
    assert confusion.tolist() == [[1, 0], [1, 0]]


def test_sliding_windows_cover_the_image_and_average_overlaps():
    image = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7)
    calls = []

    def predict(window):
        calls.append(window.shape)
        return window[:, :2] * 2  # pointwise: averaging overlaps gives the pointwise value back
    logits = sliding_window_logits(predict, image, crop=4, stride=3, num_classes=2)
    assert torch.allclose(logits, image[:2] * 2)
    assert len(calls) == 2 * 2  # tops 0 and 1 (flush with the border); lefts 0 and 3 (3 + 4 = 7 already flush)


def test_head_schedules_are_the_recipes_formulas():
    cosine = HeadRecipe("sgd", 0.1, 0.0, "cosine")
    assert lr_factor(cosine, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cosine, 50, 100) == pytest.approx(0.05)
    poly = HeadRecipe("adam", 0.01, 0.01, "poly", power=0.9, min_lr=0.001)
    assert lr_factor(poly, 40, 80) == pytest.approx(0.009 * 0.5**0.9 + 0.001)
    warm = HeadRecipe("adamw", 1e-4, 0.05, "poly", power=1.0, warmup_steps=10, warmup_ratio=0.0)
    assert lr_factor(warm, 5, 100) == pytest.approx(0.5e-4)


def _random_labels(seed: int, count: int = 500, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes + 1, (count,), generator=generator)
    targets[targets == classes] = 255
    return targets, torch.randint(0, classes, (count,), generator=generator)


def test_confusion_counts_equal_the_bincount_of_label_pairs_and_read_the_probes_miou():
    targets, predictions = _random_labels(0)
    counts, miou = confusion_counts(5, torch.device("cpu")), mean_iou(5, torch.device("cpu"))
    update_all({"counts": counts, "miou": miou}, predictions, targets.to(torch.uint8))
    confusion = counts.compute()
    keep = targets != 255
    expected = torch.bincount(targets[keep] * 5 + predictions[keep], minlength=25).reshape(5, 5)
    assert torch.equal(confusion, expected) and torch.equal(confusion_matrix(targets, predictions, 5), expected)
    assert float(miou.compute()) == pytest.approx(miou_present_classes(confusion), abs=1e-6)
    floors = segmentation_floors(confusion)
    assert floors["all_background_miou"] == pytest.approx(float((targets[keep] == 0).float().mean()) / 5)


def _counts_in_process(rank: int, world: int) -> list[torch.Tensor]:
    targets, predictions = _random_labels(rank)
    counts = confusion_counts(5, torch.device("cpu"))
    update_all({"counts": counts}, predictions, targets)
    return [counts.compute()]


@pytest.mark.slow
def test_confusion_counts_are_summed_over_processes():
    from support.distributed_utils import run_distributed

    expected = sum(confusion_matrix(*_random_labels(rank), 5) for rank in range(2))
    for (confusion,) in run_distributed(_counts_in_process, 2, ()):
        assert torch.equal(confusion, expected)


def test_head_optimizers_follow_the_recipe():
    head = torch.nn.Linear(3, 2)
    for name in HEAD_OPTIMIZERS:
        optimizer = recipe_optimizer(head, HeadRecipe(name, 0.1, 0.01, "cosine"))
        assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert head_optimizer(head, "sgd", 0.1, 0.0, momentum=0.5).param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="optimizer"):
        head_optimizer(head, "lamb", 0.1, 0.0)
