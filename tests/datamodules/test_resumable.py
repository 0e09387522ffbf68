"""ResumableSampler / ResumableDataLoader: order seeded by (seed, epoch), DDP shares, mid-epoch resume."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules import ResumableDataLoader, ResumableSampler


class Indices(Dataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        epoch, index = key
        return torch.tensor([epoch, index])


def _keys(sampler: ResumableSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(Indices(20), seed=3), ResumableSampler(Indices(20), seed=3)
    torch.manual_seed(0)
    first = _keys(a, 2)
    torch.manual_seed(1)  # the global RNG plays no part
    assert first == _keys(b, 2)
    assert [index for _, index in first] != [index for _, index in _keys(a, 3)]
    assert all(epoch == 2 for epoch, _ in first) and sorted(i for _, i in first) == list(range(20))


def test_ddp_shares_partition_the_epoch_and_the_sampler_is_a_distributed_sampler():
    shares = [ResumableSampler(Indices(20), seed=0, num_replicas=2, rank=rank) for rank in range(2)]
    assert all(isinstance(share, DistributedSampler) for share in shares)  # Lightning keeps it
    keys = [_keys(share, 1) for share in shares]
    assert sorted(index for share in keys for _, index in share) == list(range(20))


def test_skip_applies_to_its_epoch_only_once():
    sampler = ResumableSampler(Indices(20), seed=0)
    full = _keys(sampler, 1)
    sampler.skip_in_epoch(1, 8)
    assert _keys(sampler, 1) == full[8:]
    assert _keys(sampler, 1) == full  # used up
    sampler.skip_in_epoch(1, 8)
    assert len(_keys(sampler, 2)) == 20  # another epoch: nothing skipped


def test_loader_state_resumes_at_the_next_batch():
    loader = ResumableDataLoader(Indices(24), ResumableSampler(Indices(24), seed=5), batch_size=4)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 3
    rest = list(iterator)

    resumed = ResumableDataLoader(Indices(24), ResumableSampler(Indices(24), seed=0), batch_size=4)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert resumed.sampler.seed == 5  # the run's seed travels with the checkpoint
    got = list(resumed)
    assert len(consumed) + len(got) == len(loader)
    assert all(torch.equal(a, b) for a, b in zip(got, rest))


def test_loader_reports_the_trainers_progress_when_given():
    loader = ResumableDataLoader(Indices(24), ResumableSampler(Indices(24)), batch_size=4, batches_done=lambda: 5)
    assert loader.state_dict()["batches_done"] == 5


def test_loader_refuses_a_state_of_another_batch_size():
    loader = ResumableDataLoader(Indices(24), ResumableSampler(Indices(24)), batch_size=4)
    state = {**loader.state_dict(), "batch_size": 8}
    with pytest.raises(ValueError, match="batch size"):
        loader.load_state_dict(state)
