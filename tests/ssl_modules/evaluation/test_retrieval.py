"""Dense retrieval (shared by hummingbird and DenseRetrievalProbe) against hand-computed values: patch labels,
the softmax-weighted vote, patch sampling, open-HB's rare-class scores."""
from __future__ import annotations

import pytest
import torch

from ssl_modules.evaluation.retrieval import (
    patch_labels,
    rare_class_patch_scores,
    retrieval_scores,
    retrieve_labels,
    sample_patches,
)
from ssl_modules.evaluation.search import FlatIndex


def test_retrieval_scores_are_the_softmax_weighted_average_of_neighbour_labels():
    similarities = torch.tensor([[0.2, 0.0]])
    labels = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    weights = torch.softmax(torch.tensor([0.2, 0.0]) / 0.1, dim=0)
    expected = weights[0] * labels[0, 0] + weights[1] * labels[0, 1]
    assert torch.allclose(retrieval_scores(similarities, labels, 0.1)[0], expected)


def test_patch_labels_are_class_fractions_of_the_labelled_pixels():
    mask = torch.tensor([[[0, 0, 1, 255],
                          [0, 1, 1, 255],
                          [2, 2, 255, 255],
                          [2, 2, 255, 255]]])
    labels = patch_labels(mask, (2, 2), num_classes=3)
    assert labels.shape == (1, 4, 3)
    assert torch.allclose(labels[0, 0], torch.tensor([0.75, 0.25, 0.0]))  # top-left: three 0s, one 1
    assert torch.allclose(labels[0, 1], torch.tensor([0.0, 1.0, 0.0]))  # top-right: two 1s, 255s left out
    assert torch.allclose(labels[0, 2], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(labels[0, 3], torch.zeros(3))  # all ignored


def test_patch_sampling_keeps_labelled_patches_and_is_seeded():
    labelled = torch.tensor([True, False, True, True, True, False])
    assert sample_patches(labelled, None, 0).tolist() == [0, 2, 3, 4]
    chosen = sample_patches(labelled, 2, seed=5)
    assert chosen.tolist() == sample_patches(labelled, 2, seed=5).tolist()
    assert len(chosen) == 2 and set(chosen.tolist()) <= {0, 2, 3, 4} and chosen.tolist() == sorted(chosen.tolist())


def test_patch_labels_map_255_to_background_as_open_hummingbird_eval():
    mask = torch.tensor([[[1, 255, 2, 2], [1, 1, 2, 2], [0, 0, 255, 255], [0, 0, 255, 255]]])
    labels = patch_labels(mask, (2, 2), 3, background_for_ignore=True, open_hb=True)
    assert labels[0].tolist() == [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    left_out = patch_labels(mask, (2, 2), 3, background_for_ignore=False, open_hb=True)
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


def test_open_hb_patches_must_split_the_mask_exactly():
    with pytest.raises(ValueError, match="equal patches"):
        patch_labels(torch.zeros(1, 5, 4, dtype=torch.long), (2, 2), 3, open_hb=True)
    assert patch_labels(torch.zeros(1, 5, 4, dtype=torch.long), (2, 2), 3).shape == (1, 4, 3)
