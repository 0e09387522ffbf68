"""The weighted k-NN vote (DINO's, shared with KNNProbe) against hand-computed values."""
from __future__ import annotations

import math

import torch

from ssl_modules.evaluation import knn_classify
from ssl_modules.evaluation.knn import weighted_knn_scores


def test_weighted_knn_vote_sums_exp_similarity_over_temperature_per_class():
    similarities = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[2, 0, 2]])
    scores = weighted_knn_scores(similarities, labels, num_classes=3, temperature=0.5)
    expected = torch.tensor([[torch.tensor(1.0).exp(), 0.0, torch.tensor(1.8).exp() + torch.tensor(0.2).exp()]])
    assert torch.allclose(scores, expected)


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
