"""The probes' parts against hand-computed values: search, votes, patch labels, subsets, shards, the stream."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from callbacks.data import batch_chunks, fixed_subset, shard_batches
from callbacks.knn import weighted_knn_scores
from callbacks.retrieval import patch_label_distributions, retrieval_label_scores, sample_patches
from callbacks.search import FlatIndex, choose_backend, nearest_neighbours
from callbacks.segmentation import LinearSegmentationHead
from callbacks.stream import LabelledStream


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_returns_the_k_largest_inner_products_in_order(backend):
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    queries = F.normalize(torch.randn(40, 16, generator=generator), dim=1)
    similarities, indices = nearest_neighbours(queries, bank, k=7, backend=backend)
    expected = (queries @ bank.T).topk(7, dim=1)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(similarities, expected.values, atol=1e-6)


def test_faiss_and_torch_agree_and_k_is_capped_at_the_bank_size():
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(5, 8, generator=generator), torch.randn(3, 8, generator=generator)
    faiss_out = FlatIndex(bank, "faiss").search(queries, 20)
    torch_out = FlatIndex(bank, "torch").search(queries, 20)
    assert faiss_out[1].shape == (3, 5) and torch.equal(faiss_out[1], torch_out[1])
    empty = FlatIndex(bank, "faiss").search(queries[:0], 4)
    assert empty[0].shape == (0, 4) and empty[1].dtype == torch.long


def test_auto_backend_is_torch_for_small_banks_and_faiss_for_large_cpu_banks():
    assert choose_backend(torch.zeros(100, 4)) == "torch"
    assert choose_backend(torch.zeros(10_000, 4)) == "faiss"
    assert choose_backend(torch.zeros(10_000, 4), "torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        choose_backend(torch.zeros(1, 4), "scann")


def test_search_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        FlatIndex(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        FlatIndex(torch.zeros(3, 4)).search(torch.zeros(2, 5), 1)


# ----------------------------------------------------------------------------------------------- votes
def test_weighted_knn_vote_sums_exp_similarity_over_temperature_per_class():
    similarities = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[2, 0, 2]])
    scores = weighted_knn_scores(similarities, labels, num_classes=3, temperature=0.5)
    expected = torch.tensor([[torch.tensor(1.0).exp(), 0.0, torch.tensor(1.8).exp() + torch.tensor(0.2).exp()]])
    assert torch.allclose(scores, expected)


def test_retrieval_scores_are_the_softmax_weighted_average_of_neighbour_labels():
    similarities = torch.tensor([[0.2, 0.0]])
    labels = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    weights = torch.softmax(torch.tensor([0.2, 0.0]) / 0.1, dim=0)
    expected = weights[0] * labels[0, 0] + weights[1] * labels[0, 1]
    assert torch.allclose(retrieval_label_scores(similarities, labels, 0.1)[0], expected)


def test_patch_labels_are_class_fractions_of_the_labelled_pixels():
    mask = torch.tensor([[[0, 0, 1, 255],
                          [0, 1, 1, 255],
                          [2, 2, 255, 255],
                          [2, 2, 255, 255]]])
    labels = patch_label_distributions(mask, (2, 2), num_classes=3)
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


def test_segmentation_head_is_batchnorm_then_1x1_convolution():
    head = LinearSegmentationHead(6, 4, torch.Generator().manual_seed(0)).eval()
    features = torch.randn(2, 6, 3, 5)
    normalised = head.norm(features)
    expected = torch.einsum("bchw,kc->bkhw", normalised, head.classifier.weight[:, :, 0, 0])
    assert torch.allclose(head(features), expected + head.classifier.bias[None, :, None, None], atol=1e-6)


# ------------------------------------------------------------------------------------- subsets, shards
def test_fixed_subset_is_seeded_sorted_and_capped():
    subset = fixed_subset(100, fraction=0.1, seed=3)
    assert subset == fixed_subset(100, fraction=0.1, seed=3) and subset == sorted(subset) and len(subset) == 10
    assert subset != fixed_subset(100, fraction=0.1, seed=4)
    assert fixed_subset(100, max_items=7, seed=0) == fixed_subset(100, max_items=7, seed=0)
    assert len(fixed_subset(100, max_items=7)) == 7 and fixed_subset(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fraction"):
        fixed_subset(10, fraction=1.5)


def test_shards_are_whole_batches_dealt_round_robin():
    chunks = batch_chunks(list(range(10)), 3)
    assert chunks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert shard_batches(chunks, 0, 2) == [[0, 1, 2], [6, 7, 8]]
    assert shard_batches(chunks, 1, 2) == [[3, 4, 5], [9]]
    assert shard_batches(chunks, 2, 5) == [[6, 7, 8]] and shard_batches(chunks, 4, 5) == []


# ---------------------------------------------------------------------------------------------- stream
def _labelled(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].expand(n, 4), torch.arange(n) % 3)


def test_stream_draws_seeded_full_global_batches_and_starts_a_new_pass():
    stream = LabelledStream(_labelled(10), batch_size=4, seed=1)
    drawn = [stream.next()[2].tolist() for _ in range(3)]
    assert all(len(batch) == 4 for batch in drawn)  # the incomplete third batch of a pass is dropped
    assert set(drawn[0]).isdisjoint(drawn[1]) and stream.position == (1, 1)
    again = LabelledStream(_labelled(10), batch_size=4, seed=1)
    assert [again.next()[2].tolist() for _ in range(3)] == drawn


def test_stream_resumes_from_its_position():
    stream = LabelledStream(_labelled(10), batch_size=4, seed=2)
    for _ in range(3):
        stream.next()
    expected = [stream.next()[2].tolist() for _ in range(3)]
    resumed = LabelledStream(_labelled(10), batch_size=4, seed=2)
    resumed.seek((1, 1))
    assert [resumed.next()[2].tolist() for _ in range(3)] == expected


def test_stream_slices_of_all_processes_make_up_the_global_batch():
    batch = [7, 3, 9, 1, 4]
    parts = [LabelledStream.local_slice(batch, rank, 2) for rank in range(2)]
    assert parts[0] + parts[1] == batch and abs(len(parts[0]) - len(parts[1])) <= 1
