"""The in-place ring-buffer bank against the functional reference, and its memory behaviour."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_modules.functional import cycle_consistent_neighbours, memory_bank_enqueue_padded
from ssl_modules.methods.memory_bank import ObjectMemoryBank

SLOTS, K, D = 6, 3, 8


def _batch(step: int, images: int):
    generator = torch.Generator().manual_seed(100 + step)
    objects = torch.randn(2, images, K, D, generator=generator, dtype=torch.float64)
    valid = torch.rand(images, K, generator=generator) < 0.6
    valid[0] = True  # a full image and (below) an image without any object
    if images > 1:
        valid[1] = False
    return objects, valid


def _reference_state(ring: ObjectMemoryBank):
    logical = ring.logical()
    return logical["bank"].clone(), logical["counts"].clone()


@pytest.mark.parametrize("normalized", [True, False])
def test_ring_bank_equals_the_functional_reference_over_wrap_around(normalized):
    ring = ObjectMemoryBank(SLOTS, K, D, normalized=normalized, seed=3).double()
    bank, counts = _reference_state(ring)
    for step in range(9):  # 9 batches of 4 images through 6 slots: the heads wrap several times
        queries, valid = _batch(step, 4)
        flat_valid = valid.reshape(-1)
        query_groups = torch.arange(4).repeat_interleave(K) // 2
        bank_valid = torch.arange(bank.shape[1]) < counts.sum()
        expected = cycle_consistent_neighbours(queries.reshape(2, -1, D), bank, normalized, query_valid=flat_valid,
                                               bank_valid=bank_valid, query_groups=query_groups, chunk_size=5)
        got = ring.search(queries.reshape(2, -1, D), query_valid=flat_valid, query_groups=query_groups, chunk_size=5)
        assert torch.equal(got["mask"], expected["mask"]), step
        logical_index = (got["indices"] - ring.row_head) % ring.capacity
        assert torch.equal(logical_index, expected["indices"]), step
        torch.testing.assert_close(got["neighbours"], expected["neighbours"], rtol=1e-14, atol=0)

        updated = memory_bank_enqueue_padded(bank, counts, queries, valid)
        bank, counts = updated["bank"], updated["counts"]
        ring.enqueue_(queries, valid)
        ring_bank, ring_counts = _reference_state(ring)
        assert torch.equal(ring_counts, counts), step
        rows = int(counts.sum())
        torch.testing.assert_close(ring_bank[:, :rows], bank[:, :rows], rtol=1e-14, atol=0)


def test_a_bank_without_valid_rows_accepts_no_match():
    ring = ObjectMemoryBank(2, K, D)
    ring.counts.zero_()
    queries, valid = _batch(0, 2)
    assert not ring.search(queries.reshape(2, -1, D).float(), query_valid=valid.reshape(-1))["mask"].any()


def test_official_layout_loads_and_comes_back():
    ring = ObjectMemoryBank(SLOTS, K, D).double()
    bank = torch.randn(2, SLOTS * K, D, dtype=torch.float64)
    counts = torch.randint(0, K + 1, (SLOTS,))
    ring.load_logical_(bank, counts)
    torch.testing.assert_close(ring.logical()["bank"], bank, rtol=1e-14, atol=0)
    assert torch.equal(ring.logical()["counts"], counts)


def test_state_is_in_buffers_and_restores_exactly():
    ring = ObjectMemoryBank(SLOTS, K, D)
    for step in range(3):
        objects, valid = _batch(step, 4)
        ring.enqueue_(objects.float(), valid)
    copy = ObjectMemoryBank(SLOTS, K, D)
    copy.load_state_dict(ring.state_dict())
    queries, valid = _batch(7, 4)
    a = ring.search(queries.reshape(2, -1, D).float(), query_valid=valid.reshape(-1))
    b = copy.search(queries.reshape(2, -1, D).float(), query_valid=valid.reshape(-1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_larger_than_the_bank_is_a_clear_error():
    objects, valid = _batch(0, SLOTS + 1)
    with pytest.raises(ValueError, match="exceeds the bank's 6 image slots"):
        ObjectMemoryBank(SLOTS, K, D).enqueue_(objects.float(), valid)


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor an op creates (outputs sharing storage with ``known`` are views/in place)."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_search_and_enqueue_allocate_nothing_of_bank_size():
    ring = ObjectMemoryBank(4096, K, 64)
    queries, valid = torch.randn(2, 8, K, 64), torch.rand(8, K) < 0.5
    one_view = ring.keys[0].untyped_storage().nbytes() // 2
    with LargestNewTensor(list(ring.buffers())) as mode:
        ring.search(queries.reshape(2, -1, 64), query_valid=valid.reshape(-1), chunk_size=1024)
        ring.enqueue_(queries, valid)
    assert mode.largest < one_view / 8, (mode.largest, one_view)


def test_cribo_loads_a_state_dict_with_the_flat_bank_of_earlier_versions():
    from support.common import TINY_VIT
    from ssl_modules.methods.cribo import CrIBo

    kwargs = dict(backbone_kwargs=dict(TINY_VIT), out_dim=16, object_out_dim=16, head_hidden_dim=16,
                  head_bottleneck_dim=8, num_clusters=K, queue_size=SLOTS)
    module = CrIBo("vit_tiny_patch16_224", **kwargs)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("memory_bank.")}
    bank = torch.randn(2, SLOTS * K, module.backbone.num_features)
    counts = torch.randint(0, K + 1, (SLOTS,))
    module.load_state_dict({**state, "bank": bank, "bank_counts": counts})
    torch.testing.assert_close(module.memory_bank.logical()["bank"], bank)
    assert torch.equal(module.memory_bank.logical()["counts"], counts)
