"""Exact top-k search against full products: faiss and torch, the blocked torch search, the backend choice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_modules.evaluation import search
from ssl_modules.evaluation.search import FlatIndex, choose_backend, nearest_neighbours


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


def test_blocked_torch_search_equals_one_full_product(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=generator), torch.randn(50, 8, generator=generator)
    expected = (queries @ bank.T).topk(7, dim=1)
    monkeypatch.setattr(search, "TORCH_CHUNK_ELEMENTS", 16 * 40)  # 16 queries x 40 bank rows per block
    monkeypatch.setattr(search, "QUERY_BLOCK", 16)
    values, indices = FlatIndex(bank, "torch").search(queries, 7)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(values, expected.values)
