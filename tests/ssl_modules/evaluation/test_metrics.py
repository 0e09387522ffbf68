"""Hand-computed checks of the protocols' building blocks: k-NN vote, Hungarian mIoU, Hummingbird patch
labels, rare-class sampling scores and retrieval, sliding windows, head schedules."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ssl_modules.evaluation import hungarian_assignment, hungarian_miou, knn_classify
from ssl_modules.evaluation.hummingbird import patch_labels, rare_class_patch_scores, retrieve_labels
from ssl_modules.evaluation.metrics import confusion_matrix, miou_all_classes, miou_present_classes
from ssl_modules.evaluation.search import FlatIndex
from ssl_modules.evaluation.training import HeadRecipe, lr_factor
from ssl_modules.evaluation.voc_linear import sliding_window_logits


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature():
    # Query [1, 0]: neighbours label 0 at sim 0.99, two of label 1 at sim 0.1 each.
    bank = torch.tensor([[0.99, math.sqrt(1 - 0.99**2)], [0.1, math.sqrt(0.99)], [0.1, -math.sqrt(0.99)]])
    labels = torch.tensor([0, 1, 1])
    query, target = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # T 0.07: exp(0.99/0.07) >> 2 exp(0.1/0.07): class 0 wins. T 100: weights ~1 each: class 1 (two votes).
    assert knn_classify(bank, labels, query, target, 2, (3,), 0.07) == {3: (1, 1)}
    assert knn_classify(bank, labels, query, target, 2, (3,), 100.0) == {3: (0, 1)}
    # k 1: only the most similar neighbour votes.
    assert knn_classify(bank, labels, query, torch.tensor([1]), 2, (1,), 100.0) == {1: (0, 0)}


def test_knn_features_are_l2_normalised_before_the_search():
    bank = torch.tensor([[10.0, 0.0], [0.0, 0.5]])
    queries = torch.tensor([[0.1, 0.2]])  # closer in angle to [0, 1] although [10, 0] has the larger dot product
    assert knn_classify(bank, torch.tensor([0, 1]), queries, torch.tensor([1]), 2, (1,), 0.07) == {1: (1, 1)}


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


def test_patch_labels_map_255_to_background_as_open_hummingbird_eval():
    mask = torch.tensor([[[1, 255, 2, 2], [1, 1, 2, 2], [0, 0, 255, 255], [0, 0, 255, 255]]])
    labels = patch_labels(mask, (2, 2), 3, background_for_ignore=True)
    assert labels[0].tolist() == [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    left_out = patch_labels(mask, (2, 2), 3, background_for_ignore=False)
    assert left_out[0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert left_out[0, 3].tolist() == [0.0, 0.0, 0.0]


def test_rare_class_scores_sum_the_frequency_of_each_patch_class():
    # Patches: {0}, {0}, {0, 1}, {2}: frequency 0 -> 3, 1 -> 1, 2 -> 1.
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    assert rare_class_patch_scores(labels).tolist() == [3.0, 3.0, 4.0, 1.0]


def test_retrieval_weights_neighbour_labels_by_softmax_of_similarity_over_temperature():
    memory = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    memory_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[2.0, 0.0]])  # sims 1.0 and 0.6 after normalisation
    scores = retrieve_labels(query, FlatIndex(memory, "torch"), memory_labels, k=2, temperature=0.2)
    w = torch.softmax(torch.tensor([1.0, 0.6]) / 0.2, 0)
    assert scores[0].tolist() == pytest.approx(w.tolist())


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


def test_blocked_torch_search_equals_one_full_product(monkeypatch):
    from ssl_modules.evaluation import search

    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=generator), torch.randn(50, 8, generator=generator)
    expected = (queries @ bank.T).topk(7, dim=1)
    monkeypatch.setattr(search, "TORCH_CHUNK_ELEMENTS", 16 * 40)  # 16 queries x 40 bank rows per block
    monkeypatch.setattr(search, "QUERY_BLOCK", 16)
    values, indices = FlatIndex(bank, "torch").search(queries, 7)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(values, expected.values)
