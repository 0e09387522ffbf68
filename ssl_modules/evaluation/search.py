"""Exact top-k inner-product search: faiss-cpu (``IndexFlatIP``) for large CPU banks, chunked torch otherwise."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SearchBackend", "choose_backend", "FlatIndex", "nearest_neighbours"]

SearchBackend = Literal["auto", "faiss", "torch"]

# Banks up to this size are searched with torch on the CPU too: there building a faiss index costs more than
# it saves. Above it faiss wins (benchmarks/knn_probe.py, 2 threads: 1.2x at 1k entries, 1.5x at 50k).
SMALL_BANK = 512
# Similarity entries one torch chunk may hold (128 MiB of float32).
TORCH_CHUNK_ELEMENTS = 1 << 25
# Queries searched together by the torch backend (the bank is then cut into blocks to fit the chunk).
QUERY_BLOCK = 1024


def choose_backend(bank: Tensor, backend: SearchBackend = "auto") -> Literal["faiss", "torch"]:
    """``backend`` itself unless ``"auto"``: torch for banks on an accelerator (faiss-cpu would copy them to
    the host) and for small banks, faiss for large banks on the CPU."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend={backend!r}; use 'auto', 'faiss' or 'torch'")
    if backend != "auto":
        return backend
    return "torch" if bank.device.type != "cpu" or bank.shape[0] <= SMALL_BANK else "faiss"


@contextlib.contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class FlatIndex:
    """An exact inner-product index over a bank ``(M, D)``, built once and searched many times.

    Args:
        bank: the vectors to search (l2-normalise them first for cosine similarity).
        backend: ``"faiss"`` (``faiss.IndexFlatIP`` on the host, as many threads as torch uses), ``"torch"``
            (chunked matrix products and ``topk`` on the bank's device) or ``"auto"`` (``choose_backend``).
    """

    def __init__(self, bank: Tensor, backend: SearchBackend = "auto") -> None:
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise ValueError(f"the bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
        self.backend = choose_backend(bank, backend)
        self.size, self.dim = bank.shape
        self._bank = bank.detach().float()
        self._faiss = None
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(self._bank.cpu().contiguous().numpy())
            self._bank = None

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(similarities (Q, k), indices (Q, k))`` of the ``k`` most similar bank rows (``k`` capped at the
        bank size), most similar first, on the queries' device."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {tuple(queries.shape)}")
        k = min(k, self.size)
        if queries.shape[0] == 0:
            return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
        if self._faiss is not None:
            with _faiss_threads(torch.get_num_threads()):
                similarities, indices = self._faiss.search(queries.detach().float().cpu().contiguous().numpy(), k)
            return torch.from_numpy(similarities).to(queries.device), torch.from_numpy(indices).to(queries.device)
        return self._torch_search(queries, k)

    def _torch_search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Blocks of queries against blocks of the bank (each similarity block at most
        ``TORCH_CHUNK_ELEMENTS`` entries), the running top-k merged block by block: memory stays bounded
        and the matrix products stay large for banks of millions of rows (Hummingbird's memory)."""
        bank = self._bank.to(queries.device)
        query_rows = min(max(1, queries.shape[0]), QUERY_BLOCK)
        bank_rows = max(k, TORCH_CHUNK_ELEMENTS // query_rows)
        similarities, indices = [], []
        for chunk in queries.detach().float().split(query_rows):
            best_values = best_indices = None
            for start in range(0, self.size, bank_rows):
                block = chunk @ bank[start:start + bank_rows].T
                top = block.topk(min(k, block.shape[1]), dim=1)
                values, found = top.values, top.indices + start
                if best_values is not None:
                    values, found = torch.cat([best_values, values], 1), torch.cat([best_indices, found], 1)
                    merged = values.topk(k, dim=1)
                    values, found = merged.values, found.gather(1, merged.indices)
                best_values, best_indices = values, found
            similarities.append(best_values)
            indices.append(best_indices)
        return torch.cat(similarities), torch.cat(indices)


def nearest_neighbours(queries: Tensor, bank: Tensor, k: int, backend: SearchBackend = "auto") -> tuple[Tensor, Tensor]:
    """The ``k`` largest inner products of every query ``(Q, D)`` with the bank ``(M, D)``: one-off
    ``FlatIndex(bank, backend).search(queries, k)``."""
    return FlatIndex(bank, backend).search(queries, k)
