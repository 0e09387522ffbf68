"""CrIBo's object memory bank sharded over the processes: each keeps the objects of its own images.

The replicated :class:`~ssl_modules.methods.memory_bank.ObjectMemoryBank` holds the whole bank (``2 x K S x D``)
on every process and all-gathers every batch's objects into it. :class:`ShardedObjectMemoryBank` gives the
same bank, neighbours and cycle masks while each process stores only the images it saw itself:

- **Logical bank** (the reference's, ``memory_bank_enqueue_padded``): newest step first; within a step the
  gathered batch in rank order; the valid rows of an image in cluster order. The rows of the newest
  ``S = num_slots`` images are the valid ones. Every image gets a *serial* ``n``: the logical slot of image
  ``n`` is ``p = T - 1 - n`` (``T`` images enqueued so far), so an image is valid while ``n >= T - S``.
- **Shards**: process ``r`` stores the ``B`` images it contributes per step in a ring of local slots of ``K``
  rows each (l2-normalised keys and one norm per row, as the replicated bank). The ring is written downward,
  so that reading it upward from its head lists the process's images in logical order. The official initial
  state (uniform random rows, ``K`` per slot) and any bank loaded from the logical layout are dealt out by
  logical slot: process ``r`` gets the slots ``p = r, r + W, r + 2W, ...``. The per-image counts of all ``S``
  images (a few kB) are kept by every process: they give each row its logical index.
- **Enqueue** needs no gather of objects: every process writes its own images and all-gathers only the
  ``B`` counts. The ring holds ``ceil(S / G) * B`` slots (``G = W B``, the global batch), sized at the first
  enqueue from the initial ``ceil(S / W)``; a later step that would overwrite a valid slot grows it (decided on
  the host from the serials, no device sync).
- **Search**: the l2-normalised queries of all processes are all-gathered; each process searches its shard
  for all of them (in chunks, as the replicated bank); the best of the processes wins per query
  (highest similarity, then smallest logical index: the reference's first index of ``max`` in newest-first
  order); each winner sends the query's owner the neighbour row and the other view's key (one
  all-to-all), and the owner runs the cycle test on its own batch as the replicated bank does.
- **Checkpoints**: ``state_dict()`` is a collective (call it on every process, as Lightning does): the
  shards are gathered in chunks into the replicated bank's keys in the logical layout (heads at 0), so a
  checkpoint of a sharded run is one of a replicated run. Loading deals the logical slots out again over the
  processes of the loading run, at any world size: resuming gives the same results as the uninterrupted run
  (which process holds a row never changes a result).

Objects of one image are never split over processes, so the cycle test and the losses stay per process.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.functional.cribo import cycle_mask
from ssl_modules.functional.precision import full_precision
from ssl_modules.methods.memory_bank import ObjectMemoryBank
from ssl_modules.run import distributed

__all__ = ["ShardedObjectMemoryBank"]

_EPS = 1e-12  # as ObjectMemoryBank: key = row / max(||row||, eps)
_NO_ROW = torch.iinfo(torch.long).max  # logical index of "no valid row on this process"
_STATE_KEYS = ("keys", "norms", "counts", "row_head", "slot_head")  # the replicated bank's buffers
RowSource = Callable[[Tensor], tuple[Tensor, Tensor]]  # logical rows -> (keys (2, R, D), norms (2, R))


class ShardedObjectMemoryBank(nn.Module):
    """The object memory bank of :class:`~ssl_modules.methods.memory_bank.ObjectMemoryBank` sharded over the
    processes of a run (see the module docstring). Build it with :meth:`from_replicated` inside an
    initialised process group; ``search`` and ``enqueue_local_`` are collectives, as are ``state_dict``
    and :meth:`logical`.

    Args:
        num_slots: S, images held (official ``queue_size``).
        objects_per_slot: K, objects per image at most.
        dim: D, object width.
        normalized: search by cosine similarity (as the replicated bank).
        world_size, rank: the process group's (defaults: the current one).
        dtype, device: of the stored rows.
    """

    _TENSORS = ("keys", "norms", "slot_counts", "slot_serials", "counts_ring")

    def __init__(self, num_slots: int, objects_per_slot: int, dim: int, normalized: bool = True, *,
                 world_size: int | None = None, rank: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_slots < 1 or objects_per_slot < 1 or dim < 1:
            raise ValueError(f"num_slots, objects_per_slot and dim must be >= 1, got {num_slots}, "
                             f"{objects_per_slot}, {dim}")
        self.num_slots, self.objects_per_slot, self.dim, self.normalized = num_slots, objects_per_slot, dim, normalized
        self.world = distributed.world_size() if world_size is None else world_size
        self.rank = distributed.rank() if rank is None else rank
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world}")
        # Plain tensors, not buffers: DDP broadcasts rank 0's buffers at every forward, which would overwrite
        # the other shards. ``_apply`` moves them with the module; ``state_dict`` gathers them.
        self._allocate(math.ceil(num_slots / self.world), dtype, torch.device(device or "cpu"))
        self.counts_ring = torch.zeros(num_slots, dtype=torch.long, device=self.keys.device)
        self._total = num_slots  # T: images enqueued so far (the initial bank counts as S)
        self._batch: int | None = None  # B of the first enqueue: the ring is sized for it

    # ------------------------------------------------------------------------------------------ storage
    def _allocate(self, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        rows = slots * self.objects_per_slot
        self.keys = torch.zeros(2, rows, self.dim, dtype=dtype, device=device)
        self.norms = torch.zeros(2, rows, dtype=dtype, device=device)
        self.slot_counts = torch.zeros(slots, dtype=torch.long, device=device)
        self.slot_serials = torch.full((slots,), -1, dtype=torch.long, device=device)
        self._serials = np.full(slots, -1, dtype=np.int64)  # host mirror of slot_serials (no device sync)
        self._head = 0  # local slot of the newest image; reading upward from it is the logical order

    @property
    def local_slots(self) -> int:
        """Image slots of this process's ring."""
        return self.slot_counts.shape[0]

    @property
    def local_rows(self) -> int:
        """Rows per view stored by this process (``local_slots * K``)."""
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """Rows per view of the whole (logical) bank, ``K * S``, as ``ObjectMemoryBank.capacity``."""
        return self.objects_per_slot * self.num_slots

    @property
    def counts(self) -> Tensor:
        """``(S,)`` objects per image slot, newest first (no communication): the ``counts`` of the state dict,
        whose heads are 0. Named as the replicated bank's buffers, as are ``row_head`` and ``slot_head``, so
        that tools resolving state-dict keys to attributes (``torch.distributed.checkpoint``) find them."""
        serials = self._total - 1 - torch.arange(self.num_slots, device=self.counts_ring.device)
        return self.counts_ring.index_select(0, serials % self.num_slots)

    @property
    def row_head(self) -> Tensor:
        """0: the state dict holds the rows in the logical layout."""
        return torch.zeros((), dtype=torch.long)

    @property
    def slot_head(self) -> Tensor:
        """0: the state dict holds the counts in the logical layout."""
        return torch.zeros((), dtype=torch.long)

    def num_valid(self) -> Tensor:
        """0-dim long tensor: the rows of the newest S images over all processes (no communication)."""
        return self.counts_ring.sum()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ShardedObjectMemoryBank:
        for name in self._TENSORS:
            setattr(self, name, fn(getattr(self, name)))
        return super()._apply(fn, recurse)

    def _follow(self, device: torch.device) -> None:
        """Move the shard to the queries' device (a strategy that moves only parameters and buffers)."""
        if self.keys.device != device:
            self._apply(lambda t: t.to(device))

    # ------------------------------------------------------------------------------------ dealing out
    def _my_slots(self) -> Tensor:
        """The logical slots this process gets when a logical bank is dealt out: ``rank, rank + W, ...``."""
        return torch.arange(self.rank, self.num_slots, self.world)

    def _deal_out(self, logical_counts: Tensor, source: RowSource) -> None:
        """Keep this process's logical slots of a logical bank (heads at 0, ``T = S``). ``source`` returns
        the keys and norms of given logical rows; only this process's rows are read."""
        K, device = self.objects_per_slot, self.keys.device
        counts = logical_counts.to("cpu", torch.long)
        offsets = counts.cumsum(0) - counts
        mine = self._my_slots()
        slots = max(self.local_slots, math.ceil(self.num_slots / self.world))
        self._allocate(slots, self.keys.dtype, device)
        k = torch.arange(K)
        present = k < counts[mine][:, None]  # (n, K)
        local = (torch.arange(len(mine))[:, None] * K + k)[present]
        keys, norms = source((offsets[mine][:, None] + k)[present])
        self.keys[:, local.to(device)] = keys.to(device, self.keys.dtype)
        self.norms[:, local.to(device)] = norms.to(device, self.norms.dtype)
        self.slot_counts[: len(mine)] = counts[mine].to(device)
        serials = self.num_slots - 1 - mine  # T = S: logical slot p holds serial S - 1 - p
        self.slot_serials[: len(mine)] = serials.to(device)
        self._serials[: len(mine)] = serials.numpy()
        self.counts_ring = counts.flip(0).to(device)  # counts_ring[n % S] = count of serial n
        self._total = self.num_slots

    @classmethod
    def from_replicated(cls, bank: ObjectMemoryBank, world_size: int | None = None,
                        rank: int | None = None) -> ShardedObjectMemoryBank:
        """This process's shard of a replicated bank (same content, same device and dtype); the replicated
        bank is only read (the shard copies its keys and norms, so the rows stay bit for bit)."""
        sharded = cls(bank.num_slots, bank.objects_per_slot, bank.keys.shape[2], bank.normalized,
                      world_size=world_size, rank=rank, dtype=bank.keys.dtype, device=bank.keys.device)
        sharded._load_ring(bank.keys, bank.norms, bank.counts, bank.row_head, bank.slot_head)
        return sharded

    def _load_ring(self, keys: Tensor, norms: Tensor, counts: Tensor, row_head: Tensor, slot_head: Tensor) -> None:
        """Take this process's part of a replicated bank's buffers (a ring with its two heads)."""
        if keys.shape != (2, self.capacity, self.dim) or counts.shape != (self.num_slots,):
            raise ValueError(f"the replicated bank must hold keys {(2, self.capacity, self.dim)} and counts "
                             f"({self.num_slots},), got {tuple(keys.shape)} and {tuple(counts.shape)}: the "
                             "checkpoint's queue_size, num_clusters or width differ from this module's")
        head = int(row_head)

        def source(rows: Tensor) -> tuple[Tensor, Tensor]:
            physical = ((rows + head) % self.capacity).to(keys.device)
            return keys.index_select(1, physical), norms.index_select(1, physical)

        self._deal_out(counts.roll(-int(slot_head)), source)

    @torch.no_grad()
    def load_logical_(self, bank: Tensor, counts: Tensor) -> None:
        """Replace the content by a reference-layout bank (raw rows, newest first), as
        ``ObjectMemoryBank.load_logical_``: every process passes the whole bank and keeps its part."""
        if bank.shape != (2, self.capacity, self.dim) or counts.shape != (self.num_slots,):
            raise ValueError(f"bank must be {(2, self.capacity, self.dim)} and counts ({self.num_slots},) "
                             f"(K * S rows, S slots), got {tuple(bank.shape)} and {tuple(counts.shape)}")

        def source(rows: Tensor) -> tuple[Tensor, Tensor]:
            return self._keys_and_norms(bank.index_select(1, rows.to(bank.device)))

        self._deal_out(counts, source)

    def _keys_and_norms(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Search keys and norms of raw ``rows (2, R, D)``, as ``ObjectMemoryBank._write_rows``."""
        rows = rows.to(self.keys.dtype)
        if not self.normalized:
            return rows, torch.ones(rows.shape[:2], dtype=rows.dtype, device=rows.device)
        norms = rows.norm(dim=-1).clamp_min(_EPS)
        return rows / norms[..., None], norms

    # ----------------------------------------------------------------------------------------- enqueue
    def _grow(self, slots: int, keep: np.ndarray) -> None:
        """Rebuild the ring with ``slots`` slots holding the ``keep`` slots in logical order (head at 0)."""
        old = (self._head + np.arange(self.local_slots)) % self.local_slots
        kept = torch.from_numpy(old[keep[old]]).to(self.keys.device)
        K, n = self.objects_per_slot, len(kept)
        rows = (kept[:, None] * K + torch.arange(K, device=kept.device)).reshape(-1)
        keys, norms = self.keys.index_select(1, rows), self.norms.index_select(1, rows)
        slot_counts, serials = self.slot_counts.index_select(0, kept), self.slot_serials.index_select(0, kept)
        host = self._serials[old[keep[old]]]
        self._allocate(slots, keys.dtype, keys.device)
        self.keys[:, : n * K], self.norms[:, : n * K] = keys, norms
        self.slot_counts[:n], self.slot_serials[:n], self._serials[:n] = slot_counts, serials, host

    @torch.no_grad()
    def enqueue_local_(self, objects: Tensor, valid: Tensor) -> None:
        """Push this process's batch; with the other processes' batches (rank order) the effect on the logical
        bank is ``ObjectMemoryBank.enqueue_`` of the gathered batch. A collective (gathers the counts).

        Args:
            objects: ``(2, B, K, D)`` this process's teacher objects per (image, cluster).
            valid: ``(B, K)`` bool, the clusters present in both views.
        """
        _, batch, clusters, dim = objects.shape
        if clusters != self.objects_per_slot or dim != self.dim or valid.shape != (batch, clusters):
            raise ValueError(f"objects must be (2, B, {self.objects_per_slot}, {self.dim}) with valid "
                             f"(B, {self.objects_per_slot}), got {tuple(objects.shape)} and {tuple(valid.shape)}")
        global_batch = batch * self.world
        if global_batch > self.num_slots:
            raise ValueError(f"a global batch of {global_batch} images exceeds the bank's {self.num_slots} image "
                             "slots: raise queue_size to several global batches")
        self._follow(objects.device)
        counts = valid.sum(dim=1)
        every_count = distributed.all_gather_no_grad(counts)  # (G,) rank order: every process, same B
        total = self._total + global_batch
        newest = total - 1 - self.rank * batch  # serial of this process's first image of the step
        self._make_room(batch, global_batch, total)
        K, device = self.objects_per_slot, self.keys.device
        slots = (self._head - batch + torch.arange(batch, device=device)) % self.local_slots
        order = torch.argsort((~valid).to(torch.int32), dim=1, stable=True)  # valid rows first, in cluster order
        rows = objects.gather(2, order[None, :, :, None].expand_as(objects)).reshape(2, batch * K, dim)
        keys, norms = self._keys_and_norms(rows)
        positions = (slots[:, None] * K + torch.arange(K, device=device)).reshape(-1)
        self.keys.index_copy_(1, positions, keys)
        self.norms.index_copy_(1, positions, norms)
        self.slot_counts.index_copy_(0, slots, counts.to(self.slot_counts))
        self.slot_serials.index_copy_(0, slots, newest - torch.arange(batch, device=device))
        self._serials[(self._head - batch + np.arange(batch)) % self.local_slots] = newest - np.arange(batch)
        step_serials = total - 1 - torch.arange(global_batch, device=device)
        self.counts_ring.index_copy_(0, step_serials % self.num_slots, every_count.to(self.counts_ring))
        self._total, self._head = total, (self._head - batch) % self.local_slots

    def _make_room(self, batch: int, global_batch: int, total: int) -> None:
        """Grow the ring (host decision) when the ``batch`` slots below the head still hold images valid after
        this step: at the first enqueue, from ``ceil(S / W)`` to ``ceil(S / G) * B`` slots."""
        alive = self._serials >= total - self.num_slots
        steady = math.ceil(self.num_slots / global_batch) * batch  # enough for every later step of this batch
        first = self._batch is None
        self._batch = batch
        below = (self._head - batch + np.arange(batch)) % self.local_slots
        if batch <= self.local_slots and not alive[below].any() and not (first and steady > self.local_slots):
            return
        self._grow(max(int(alive.sum()) + batch, steady, self.local_slots if not first else 0), alive)

    # ------------------------------------------------------------------------------------------ search
    def _row_valid(self) -> Tensor:
        """``(local_rows,)`` bool: rows of images among the newest S whose cluster index is below the count."""
        K = self.objects_per_slot
        alive = self.slot_serials >= self._total - self.num_slots
        present = torch.arange(K, device=alive.device) < self.slot_counts[:, None]
        return (alive[:, None] & present).reshape(-1)

    def _logical_offsets(self) -> Tensor:
        """``(S,)`` first logical row of every logical slot (exclusive cumulative counts, newest first)."""
        counts = self.counts
        return counts.cumsum(0) - counts

    def logical_rows(self, local: Tensor) -> Tensor:
        """Logical (newest-first) index of local rows (meaningful for valid rows)."""
        K = self.objects_per_slot
        slot = self.slot_serials.index_select(0, (local // K).reshape(-1)).reshape(local.shape)
        p = (self._total - 1 - slot).clamp(0, self.num_slots - 1)
        return self._logical_offsets().index_select(0, p.reshape(-1)).reshape(local.shape) + local % K

    def _nearest(self, queries: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
        """Best valid local row per query ``(2, N)``: value (-inf where none) and local row. The ring is read
        upward from the head (two segments), so the first maximum is the smallest logical index."""
        best = queries.new_full(queries.shape[:2], -math.inf)
        best_index = torch.zeros(queries.shape[:2], dtype=torch.long, device=queries.device)
        valid = self._row_valid()
        head = self._head * self.objects_per_slot
        for first, last in ((head, self.local_rows), (0, head)):
            for start in range(first, last, chunk_size):
                stop = min(start + chunk_size, last)
                sims = queries @ self.keys[:, start:stop].to(queries.dtype).transpose(1, 2)
                sims.masked_fill_(~valid[start:stop], -math.inf)
                value, index = sims.max(dim=-1)
                better = value > best
                best = torch.where(better, value, best)
                best_index = torch.where(better, index + start, best_index)
        return best, best_index

    def rows(self, view: int, indices: Tensor) -> Tensor:
        """Raw objects of ``view`` at local ``indices``: ``key * norm``."""
        return self.keys[view].index_select(0, indices) * self.norms[view].index_select(0, indices)[:, None]

    @torch.no_grad()
    @full_precision
    def search(self, queries: Tensor, *, query_valid: Tensor | None = None, query_groups: Tensor | None = None,
               chunk_size: int = 65536) -> dict[str, Tensor]:
        """Nearest neighbours of this process's queries over all shards, and the cycle mask: a collective.

        Returns ``{"indices": (2, M) logical rows (newest first), "neighbours": (2, M, D) raw objects,
        "mask": (2, M)}``, equal to ``ObjectMemoryBank.search`` on the whole bank (its physical indices map to
        these logical ones). ``chunk_size`` is the rows scored at once for one process's queries: the shard is
        scored in chunks of ``chunk_size / W`` rows for the ``W`` processes' queries, so the similarity block
        is as large as the replicated bank's. Every process passes the same ``M``.
        """
        if queries.dim() != 3 or queries.shape[0] != 2 or queries.shape[2] != self.dim:
            raise ValueError(f"queries must be (2, M, {self.dim}), got {tuple(queries.shape)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (bank rows per search chunk), got {chunk_size}")
        self._follow(queries.device)
        count, rank = queries.shape[1], self.rank
        dtype = torch.promote_types(torch.promote_types(queries.dtype, self.keys.dtype), torch.float32)
        q = F.normalize(queries.to(dtype), dim=-1)
        every = distributed.all_gather_no_grad(q.transpose(0, 1).contiguous()).transpose(0, 1)  # (2, W M, D)
        value, local = self._nearest(every, max(1, chunk_size // self.world))
        logical = torch.where(value > -math.inf, self.logical_rows(local), _NO_ROW)
        winner, index = self._winners(value, logical)
        # Every process sends each owner its rows for the owner's queries; the owner keeps the winner's.
        payload = torch.cat([torch.stack([self.rows(v, local[v]) for v in range(2)]),
                             torch.stack([self.keys[1 - v].index_select(0, local[v]) for v in range(2)])], dim=-1)
        received = distributed.all_to_all_blocks(payload.reshape(2, self.world, count, -1).transpose(0, 1))
        mine = slice(rank * count, (rank + 1) * count)
        pick = winner[:, mine][None, :, :, None].expand(1, 2, count, received.shape[-1])
        chosen = received.gather(0, pick)[0]
        neighbours, jumped = chosen[..., : self.dim], chosen[..., self.dim:].to(dtype)
        mask = cycle_mask(jumped, q, query_valid, query_groups) & (self.num_valid() > 0)
        return {"indices": index[:, mine], "neighbours": neighbours, "mask": mask}

    def _winners(self, value: Tensor, logical: Tensor) -> tuple[Tensor, Tensor]:
        """Per query: the process holding the best row (highest similarity, then smallest logical index) and
        that row's logical index (0 when no process has a valid row, as the reference)."""
        values = distributed.all_gather_no_grad(value[None])  # (W, 2, N)
        logicals = distributed.all_gather_no_grad(logical[None])
        candidates = torch.where(values == values.max(dim=0).values, logicals, _NO_ROW)
        index = candidates.min(dim=0).values
        winner = (candidates == index).to(torch.int8).argmax(dim=0)
        return winner, torch.where(index == _NO_ROW, 0, index)

    # --------------------------------------------------------------------------- the logical layout
    @torch.no_grad()
    def gathered(self, chunk_rows: int = 1 << 20) -> dict[str, Tensor]:
        """The replicated bank's buffers in the logical layout (heads at 0), on the CPU: a collective; the
        shards are combined ``chunk_rows`` rows at a time (max-reduce over ``-inf`` fill, exact). Rows past
        the valid part are 0 (the replicated bank keeps stale rows there; they are never read)."""
        device = self.keys.device
        local = torch.arange(self.local_rows, device=device)
        logical = torch.where(self._row_valid(), self.logical_rows(local), -1)
        keys = torch.zeros(2, self.capacity, self.dim, dtype=self.keys.dtype)
        norms = torch.zeros(2, self.capacity, dtype=self.norms.dtype)
        for start in range(0, self.capacity, chunk_rows):
            stop = min(start + chunk_rows, self.capacity)
            here = ((logical >= start) & (logical < stop)).nonzero().reshape(-1)
            block_keys = self.keys.new_full((2, stop - start, self.dim), -math.inf)
            block_norms = self.norms.new_full((2, stop - start), -math.inf)
            block_keys[:, logical[here] - start] = self.keys[:, here]
            block_norms[:, logical[here] - start] = self.norms[:, here]
            block_keys = distributed.all_reduce(block_keys, "max")
            block_norms = distributed.all_reduce(block_norms, "max")
            filled = block_norms > -math.inf
            keys[:, start:stop] = torch.where(filled[..., None], block_keys, 0).cpu()
            norms[:, start:stop] = torch.where(filled, block_norms, 0).cpu()
        return {"keys": keys, "norms": norms, "counts": self.counts.cpu(), "row_head": self.row_head,
                "slot_head": self.slot_head}

    def logical(self) -> dict[str, Tensor]:
        """The reference layout (newest first), as ``ObjectMemoryBank.logical``: ``{"bank": (2, C, D) raw
        rows, "counts": (S,)}`` on the CPU. A collective that allocates the whole bank on every process: for
        tests, exports and official checkpoints, never in a step."""
        state = self.gathered()
        return {"bank": state["keys"] * state["norms"][..., None], "counts": state["counts"]}

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.gathered().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        found = {name: state_dict.get(prefix + name) for name in _STATE_KEYS}
        missing = [prefix + name for name, value in found.items() if value is None]
        if missing:
            missing_keys.extend(missing)
        else:
            try:
                self._load_ring(*found.values())
            except ValueError as error:
                error_msgs.append(str(error))
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix)
                                   and key[len(prefix):].split(".", 1)[0] not in (*_STATE_KEYS, *self._modules))

    def extra_repr(self) -> str:
        return (f"num_slots={self.num_slots}, objects_per_slot={self.objects_per_slot}, dim={self.dim}, "
                f"rank={self.rank} of {self.world}, local_slots={self.local_slots}")
