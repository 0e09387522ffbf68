"""Subsets, whole-batch shards, seeded global batches and the resumable labelled stream."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from ssl_modules.evaluation.batches import (
    LabelledStream,
    batch_chunks,
    fixed_subset,
    global_batches,
    local_slice,
    shard_batches,
)


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
    parts = [local_slice(batch, rank, 2) for rank in range(2)]
    assert parts[0] + parts[1] == batch and abs(len(parts[0]) - len(parts[1])) <= 1


def test_global_batches_are_seeded_permutations_without_the_incomplete_last_batch():
    batches = global_batches(10, 4, seed=1, pass_number=0)
    assert [len(b) for b in batches] == [4, 4] and batches == global_batches(10, 4, seed=1, pass_number=0)
    assert batches != global_batches(10, 4, seed=1, pass_number=1)
    assert global_batches(3, 4, seed=0, pass_number=0, drop_last=True)[0] != []  # the only batch is kept
    assert LabelledStream(_labelled(10), batch_size=4, seed=1).global_batches(0) == batches
