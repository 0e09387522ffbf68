"""CrIBo's object memory bank as a ring buffer written in place (docs/performance.md).

The functional reference (:func:`~ssl_modules.functional.memory_bank_enqueue_padded` and
:func:`~ssl_modules.functional.cycle_consistent_neighbours`) builds a new bank every step and normalises
every bank row for every search; at the released ViT-S/16 size (2 x 800,000 x 384) that is 2.5 GB of
temporaries and two passes over the bank per step. :class:`ObjectMemoryBank` gives the same banks and
neighbours with:

- rows stored as their l2-normalised search keys plus one norm per row, so a search reads each row once
  and the raw object (what the teacher head projects) is ``key * norm`` for the retrieved rows only;
- a ring: the batch's rows are written once into a block just below the write head, which then moves
  down by the number of valid objects. Reading from the head upwards gives the reference's newest-first
  layout (``logical()``), so an official bank loads with the head at 0;
- the search in chunks of rows, each masked to the valid part in place: no temporary of bank size.

Every update is a function of tensors identical on all processes (the gathered batch), so the banks stay
identical under DDP; all state is in buffers and goes into checkpoints. In a multi-process ``fit``, CrIBo
shards it instead (:class:`~ssl_modules.methods.sharded_bank.ShardedObjectMemoryBank`, the same results
with 1/world of the rows per process).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.functional.precision import full_precision
from ssl_modules.functional.cribo import cycle_mask

__all__ = ["ObjectMemoryBank", "upgrade_flat_bank_keys"]

_EPS = 1e-12  # F.normalize's eps: key = row / max(||row||, eps)


class ObjectMemoryBank(nn.Module):
    """Image-organised FIFO of teacher objects for both views, searched by cosine similarity.

    Args:
        num_slots: S, images held (official ``queue_size``).
        objects_per_slot: K, objects per image at most (the clustering's K); ``K * S`` rows per view.
        dim: D, object width.
        normalized: search by cosine similarity (official ``normalized_matching``); False searches the raw
            rows with normalised queries.
        seed: seed of the official initial state (uniform random rows, every slot full).
    """

    def __init__(self, num_slots: int, objects_per_slot: int, dim: int, normalized: bool = True, seed: int = 0) -> None:
        super().__init__()
        if num_slots < 1 or objects_per_slot < 1 or dim < 1:
            raise ValueError(f"num_slots, objects_per_slot and dim must be >= 1, got {num_slots}, "
                             f"{objects_per_slot}, {dim}")
        self.normalized = normalized
        self.objects_per_slot = objects_per_slot
        rows = torch.rand(2, objects_per_slot * num_slots, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("keys", torch.empty_like(rows))
        self.register_buffer("norms", torch.empty(rows.shape[:2]))
        self.register_buffer("counts", torch.full((num_slots,), objects_per_slot, dtype=torch.long))
        self.register_buffer("row_head", torch.zeros((), dtype=torch.long))
        self.register_buffer("slot_head", torch.zeros((), dtype=torch.long))
        self._write_rows(torch.arange(rows.shape[1]), rows)

    @property
    def capacity(self) -> int:
        """Rows per view, ``K * S``."""
        return self.keys.shape[1]

    @property
    def num_slots(self) -> int:
        return self.counts.shape[0]

    def num_valid(self) -> Tensor:
        """0-dim long tensor: the rows of the newest S images (the reference's ``counts.sum()``)."""
        return self.counts.sum()

    # ----------------------------------------------------------------------------------------- writes
    def _write_rows(self, positions: Tensor, rows: Tensor) -> None:
        """Store raw ``rows (2, R, D)`` at physical ``positions (R,)`` as keys and norms."""
        rows = rows.to(self.keys.dtype)
        if self.normalized:
            norms = rows.norm(dim=-1).clamp_min(_EPS)
            keys = rows / norms[..., None]
        else:
            norms, keys = torch.ones(rows.shape[:2], dtype=rows.dtype, device=rows.device), rows
        self.keys.index_copy_(1, positions, keys)
        self.norms.index_copy_(1, positions, norms)

    @torch.no_grad()
    def enqueue_(self, objects: Tensor, valid: Tensor) -> None:
        """Push a gathered batch in place, with exactly the effect of ``memory_bank_enqueue_padded``.

        Args:
            objects: ``(2, B, K, D)`` teacher objects per (image, cluster), gathered in rank order.
            valid: ``(B, K)`` bool, the clusters present in both views.

        The ``B * K`` rows, valid ones last (image-major, stable), go to the block just below the write head,
        which then moves down by the number of valid rows: the padding lands where rows are stale (the B
        overwritten slots freed at least ``B * K - n_valid`` rows). No host sync, no bank-size temporary.
        """
        _, batch, clusters, dim = objects.shape
        if clusters != self.objects_per_slot or dim != self.keys.shape[2] or valid.shape != (batch, clusters):
            raise ValueError(f"objects must be (2, B, {self.objects_per_slot}, {self.keys.shape[2]}) with valid "
                             f"(B, {self.objects_per_slot}), got {tuple(objects.shape)} and {tuple(valid.shape)}")
        if batch > self.num_slots:
            raise ValueError(f"a batch of {batch} images exceeds the bank's {self.num_slots} image slots: "
                             "raise queue_size to several global batches")
        block = batch * clusters
        flat_valid = valid.reshape(-1)
        order = torch.argsort(flat_valid.to(torch.int32), stable=True)  # padding first, then valid rows
        rows = objects.reshape(2, block, dim).index_select(1, order)
        self._write_rows((self.row_head - block + torch.arange(block, device=rows.device)) % self.capacity, rows)
        slots = (self.slot_head - batch + torch.arange(batch, device=rows.device)) % self.num_slots
        self.counts.index_copy_(0, slots, valid.sum(dim=1).to(self.counts.dtype))
        self.row_head.copy_((self.row_head - flat_valid.sum()) % self.capacity)
        self.slot_head.copy_((self.slot_head - batch) % self.num_slots)

    # ---------------------------------------------------------------------------------------- search
    def _valid_rows(self, start: int, stop: int) -> Tensor:
        """``(stop - start,)`` bool: which physical rows of the chunk belong to the newest S images."""
        rows = torch.arange(start, stop, device=self.keys.device)
        return (rows - self.row_head) % self.capacity < self.num_valid()

    def _nearest(self, queries: Tensor, chunk_size: int) -> Tensor:
        """``(2, M)`` physical index of the best valid row per view (running max over chunks)."""
        best = queries.new_full(queries.shape[:2], -math.inf)
        best_index = torch.zeros(queries.shape[:2], dtype=torch.long, device=queries.device)
        for start in range(0, self.capacity, chunk_size):
            stop = min(start + chunk_size, self.capacity)
            sims = queries @ self.keys[:, start:stop].to(queries.dtype).transpose(1, 2)  # (2, M, chunk)
            sims.masked_fill_(~self._valid_rows(start, stop), -math.inf)
            value, index = sims.max(dim=-1)
            better = value > best
            best = torch.where(better, value, best)
            best_index = torch.where(better, index + start, best_index)
        return best_index

    def rows(self, view: int, indices: Tensor) -> Tensor:
        """Raw objects of ``view`` at physical ``indices``: ``key * norm``."""
        return self.keys[view].index_select(0, indices) * self.norms[view].index_select(0, indices)[:, None]

    @torch.no_grad()
    @full_precision
    def search(self, queries: Tensor, *, query_valid: Tensor | None = None, query_groups: Tensor | None = None,
               chunk_size: int = 65536) -> dict[str, Tensor]:
        """Nearest neighbours and cycle mask, as ``cycle_consistent_neighbours`` on the valid rows.

        Returns ``{"indices": (2, M) physical rows, "neighbours": (2, M, D) raw objects, "mask": (2, M)}``;
        neighbours and mask equal the reference's (the reference's indices are logical, newest first).
        Runs in at least float32 with autocast off, as the reference (``full_precision``): under
        ``16-mixed``/``bf16-mixed`` the similarities would otherwise be half-precision matmuls, and near-tied
        bank rows would swap places.
        """
        if queries.dim() != 3 or queries.shape[0] != 2 or queries.shape[2] != self.keys.shape[2]:
            raise ValueError(f"queries must be (2, M, {self.keys.shape[2]}), got {tuple(queries.shape)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (bank rows per search chunk), got {chunk_size}")
        dtype = torch.promote_types(torch.promote_types(queries.dtype, self.keys.dtype), torch.float32)
        q = F.normalize(queries.to(dtype), dim=-1)
        indices = self._nearest(q, chunk_size)
        neighbours = torch.stack([self.rows(v, indices[v]) for v in range(2)])
        jumped = torch.stack([self.keys[1 - v].index_select(0, indices[v]) for v in range(2)]).to(dtype)
        mask = cycle_mask(jumped, q, query_valid, query_groups) & (self.num_valid() > 0)
        return {"indices": indices, "neighbours": neighbours, "mask": mask}

    # ------------------------------------------------------------------------------ reference layout
    def logical(self) -> dict[str, Tensor]:
        """The reference layout (newest first): ``{"bank": (2, C, D) raw rows, "counts": (S,)}``. Allocates
        a bank-size copy: for tests, exports and official checkpoints, never in a step."""
        head, slot = int(self.row_head), int(self.slot_head)
        raw = self.keys * self.norms[..., None]
        return {"bank": raw.roll(-head, dims=1), "counts": self.counts.roll(-slot)}

    @torch.no_grad()
    def load_logical_(self, bank: Tensor, counts: Tensor) -> None:
        """Replace the content by a reference-layout bank (e.g. an official checkpoint's
        ``centroids_queue`` and ``cpv_queue``); the heads go back to 0."""
        if bank.shape != self.keys.shape or counts.shape != self.counts.shape:
            raise ValueError(f"bank must be {tuple(self.keys.shape)} and counts {tuple(self.counts.shape)} "
                             f"(K * S rows, S slots), got {tuple(bank.shape)} and {tuple(counts.shape)}")
        self._write_rows(torch.arange(self.capacity, device=self.keys.device), bank.to(self.keys.device))
        self.counts.copy_(counts)
        self.row_head.zero_()
        self.slot_head.zero_()


def upgrade_flat_bank_keys(state_dict: dict[str, Tensor], prefix: str, bank_prefix: str, normalized: bool) -> None:
    """Rewrite a state dict's reference-layout ``bank`` / ``bank_counts`` (checkpoints of earlier versions
    of this library) into the buffers of the :class:`ObjectMemoryBank` at ``bank_prefix``, in place."""
    bank, counts = state_dict.pop(prefix + "bank", None), state_dict.pop(prefix + "bank_counts", None)
    if bank is None or counts is None:
        return
    ring = ObjectMemoryBank(counts.shape[0], bank.shape[1] // counts.shape[0], bank.shape[2], normalized).to(bank.dtype)
    ring.load_logical_(bank, counts)
    for name, buffer in ring.named_buffers():
        state_dict[f"{prefix}{bank_prefix}.{name}"] = buffer
