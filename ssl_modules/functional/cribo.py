"""CrIBo functional core: joint-space clustering, object pooling, memory bank, cycle-consistent retrieval
and the three losses (``docs/cribo.md``; Lebailly et al., ICLR 2024; official code github.com/tileb1/CrIBo).

All functions are pure (inputs are never changed in place), follow the inputs' dtype and device, and
never synchronise with the host: no ``.item()``, no boolean indexing, no data-dependent shapes (the one
value check, of ``init_indices``, runs on CPU tensors only), so ``torch.compile(fullgraph=True)`` traces
them. The contract's functions take compacted objects (``objects[:, valid]``); for a shape-static
training step every object function also accepts the padded ``(2, B, K, D)`` / ``(B * K,)`` layout with
a validity mask (``query_valid``, ``bank_valid``, ``valid``, ``memory_bank_enqueue_padded``), which gives
the same result on the valid rows.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bool_mask
from .precision import full_precision

__all__ = [
    "joint_space_clustering",
    "object_representations",
    "cycle_consistent_neighbours",
    "cycle_mask",
    "memory_bank_enqueue",
    "memory_bank_enqueue_padded",
    "cribo_global_loss",
    "cribo_object_loss",
    "cribo_cross_image_loss",
    "cribo_loss",
]

# Similarity entries (M x rows, both views) one search chunk may hold when no chunk size is given:
# 2**25 entries = 128 MiB in float32, whatever the bank size (800k rows x M ~ 2k would be 12.8 GB).
_SEARCH_CHUNK_ELEMENTS = 1 << 25


# ------------------------------------------------------------------------------------------ helpers
def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the inputs, at least float32 (fp16/bf16 inputs are upcast)."""
    dtype = torch.float32
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _two_views(tensors: Sequence[Tensor], name: str, layout: str, ndim: int) -> tuple[Tensor, Tensor]:
    """Check ``tensors`` is ``[view1, view2]``, both of the same ``ndim``-D shape."""
    if isinstance(tensors, Tensor) or len(tensors) != 2:
        got = f"a tensor of shape {_shape(tensors)}" if isinstance(tensors, Tensor) else f"{len(tensors)} items"
        raise ValueError(f"{name} must be a list of the two views [view1, view2], each {layout}; got {got}")
    first, second = tensors
    if first.dim() != ndim or first.shape != second.shape:
        raise ValueError(
            f"{name} must hold two tensors of the same shape {layout}; got {_shape(first)} and {_shape(second)}"
        )
    return first, second


def _check_center(center: Tensor, width: int, name: str) -> None:
    if center.shape not in ((width,), (1, width)):
        raise ValueError(f"{name} must have shape ({width},) or (1, {width}) (the head width), got {_shape(center)}")


def _values_checkable(t: Tensor) -> bool:
    """Value checks only where they cost no host synchronisation and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------- clustering
def _check_clustering_inputs(
    dense: Sequence[Tensor], positions: Sequence[Tensor], init_indices: Tensor, num_iterations: int,
    sinkhorn_iterations: int, groups: int,
) -> None:
    d1, _ = _two_views(dense, "dense", "(B, N, D) teacher patch tokens", 3)
    p1, _ = _two_views(positions, "positions", "(B, N, 2) patch centres", 3)
    batch, tokens, _ = d1.shape
    if _shape(p1) != (batch, tokens, 2):
        raise ValueError(
            f"positions must be two (B, N, 2) = ({batch}, {tokens}, 2) tensors of patch centres matching dense, "
            f"got {_shape(p1)}"
        )
    if init_indices.dim() != 2 or init_indices.shape[0] != batch or not _is_integer(init_indices):
        raise ValueError(
            f"init_indices must be an integer tensor (B, K) = ({batch}, K) of initial centroid indices, "
            f"got {init_indices.dtype} {_shape(init_indices)}"
        )
    clusters, joint = init_indices.shape[1], 2 * tokens
    if not 1 <= clusters <= joint:
        raise ValueError(
            f"init_indices asks for K={clusters} clusters, but the two views hold only 2N={joint} joint tokens "
            f"(N={tokens} patches per view, the h x w patch grid): use 1 <= K <= {joint} clusters (n_tokens), "
            "or larger crops / a smaller patch size for a finer grid"
        )
    if _values_checkable(init_indices) and init_indices.numel():
        low, high = int(init_indices.min()), int(init_indices.max())
        if low < 0 or high >= joint:
            raise ValueError(
                f"init_indices must index the joint token axis [0, 2N) = [0, {joint}) (view-2 token n is N + n), "
                f"got values in [{low}, {high}]: draw them with torch.rand(B, 2N).argsort(1)[:, :K]"
            )
    if num_iterations < 1 or sinkhorn_iterations < 0:
        raise ValueError(
            f"num_iterations must be >= 1 and sinkhorn_iterations >= 0, got {num_iterations} and {sinkhorn_iterations}"
        )
    if groups < 1 or batch % groups:
        raise ValueError(f"groups ({groups}) must be a positive divisor of the batch ({batch})")


def _member_distances(positions: Tensor) -> Tensor:
    """``(B, T, 2) -> (B, T, T)`` Euclidean distances from exact coordinate differences, with +inf where
    the distance is exactly 0 (such members are ignored by the positional cost).

    The direct (non-matmul) path of ``cdist`` gives exactly 0 for equal positions.
    """
    dist = torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.masked_fill(dist == 0, math.inf)


def _positional_cost(member_dist: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Normalised positional cost ``G`` ``(B, T, K)`` of docs/cribo.md §1.

    ``member_dist``: ``(B, T, T)`` from ``_member_distances``; ``labels``: ``(B, T)`` cluster of every token,
    ``K`` for "no cluster" (the tokens that are not an initial centroid in the first round).
    ``G[b, i, k] = min_{j: labels[b, j] = k} member_dist[b, i, j]`` is one ``scatter_reduce("amin")`` of the
    distance matrix into a ``(B, T, K + 1)`` output (the extra column collects non-members), so the memory is
    ``O(B T^2)`` (the distances and the broadcast index) plus ``O(B T K)``, never the naive ``B x T x T x K``,
    and the work is ``O(B T^2)`` per round.
    """
    batch, tokens, _ = member_dist.shape
    index = labels[:, None, :].expand(batch, tokens, tokens)
    nearest = member_dist.new_full((batch, tokens, num_clusters + 1), math.inf)
    nearest = nearest.scatter_reduce(2, index, member_dist, reduce="amin", include_self=True)[..., :num_clusters]
    nearest = nearest.masked_fill(nearest == math.inf, 0.0)  # no member at a non-zero distance
    mean = nearest.mean(dim=(1, 2), keepdim=True)
    nearest = torch.where(nearest == 0, mean, nearest)
    # guarded: an image whose positions all coincide has G = 0 (the official code gives NaN there)
    return nearest / nearest.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(nearest.dtype).tiny)


def _min_max_normalise(cost: Tensor, groups: int = 1) -> Tensor:
    """Min-max normalisation over each of ``groups`` equal groups of consecutive images (official semantics:
    over the whole batch of a process, which couples its images)."""
    grouped = cost.reshape(groups, -1)
    low, high = grouped.amin(dim=1, keepdim=True), grouped.amax(dim=1, keepdim=True)
    return ((grouped - low) / (high - low).clamp_min(torch.finfo(cost.dtype).tiny)).reshape(cost.shape)


def _sinkhorn(cost: Tensor, col_marginals: Tensor, sinkhorn_lambda: float, iterations: int) -> Tensor:
    """Entropic transport plan ``(B, T, K)``: rows to ``1/T``, columns to ``col_marginals`` ``(B, 1, K)``."""
    tokens = cost.shape[1]
    plan = torch.exp(-sinkhorn_lambda * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    for _ in range(iterations):
        plan = plan * ((1.0 / tokens) / plan.sum(dim=2, keepdim=True))
        plan = plan * (col_marginals / plan.sum(dim=1, keepdim=True))
    return torch.nan_to_num(plan, nan=1e-8)


def _one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot`` without its range check (a host sync on accelerators); out-of-range labels -> 0 rows."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[..., None] == classes).to(dtype)


def _initial_labels(init_indices: Tensor, tokens: int, num_clusters: int) -> Tensor:
    """``(B, T)`` labels of the initial membership: ``k`` at ``init_indices[:, k]``, ``K`` (none) elsewhere."""
    batch = init_indices.shape[0]
    labels = init_indices.new_full((batch, tokens), num_clusters)
    clusters = torch.arange(num_clusters, device=init_indices.device, dtype=labels.dtype).expand(batch, -1)
    return labels.scatter(1, init_indices, clusters)


@full_precision
def joint_space_clustering(
    dense: Sequence[Tensor], positions: Sequence[Tensor], init_indices: Tensor, pos_weight: float = 1.0,
    num_iterations: int = 5, sinkhorn_iterations: int = 5, sinkhorn_lambda: float = 20.0,
    update_marginals: bool = True, *, groups: int = 1,
) -> dict[str, Tensor]:
    """Cluster the patch tokens of both views of every image jointly into K objects (docs/cribo.md §1).

    Args:
        dense: ``[view1, view2]``, each ``(B, N, D)``: the teacher's last-layer patch tokens.
        positions: ``[view1, view2]``, each ``(B, N, 2)``: patch centres in seed-image pixels.
        init_indices: ``(B, K)`` long, distinct initial centroids on the joint token axis ``[0, 2N)``.
        pos_weight: weight ``lambda_pos`` of the positional cost.
        num_iterations: clustering rounds. sinkhorn_iterations / sinkhorn_lambda: the transport.
        update_marginals: re-estimate the cluster marginals from the cluster sizes after every round.
        groups: the cost's min-max normalisation runs over each of ``groups`` equal groups of consecutive
            images instead of the whole batch (the official code normalises over each process's batch, so
            one batch of W * B images in W groups reproduces W processes of B images).

    Returns:
        ``{"labels": (2, B, N) long}``: the cluster of every token of each view.

    Batched over images (B = 1 works), no gradient, no autocast, computed in at least float32 (float64
    inputs stay float64). Memory: ``O(B T^2)`` for the distance matrix (T = 2N), ``O(B T K)`` for the
    cost and plan, ``O(B T D)`` for the tokens; time ``O(num_iterations * B T (T + K D))``.
    """
    _check_clustering_inputs(dense, positions, init_indices, num_iterations, sinkhorn_iterations, groups)
    batch, tokens, _ = dense[0].shape
    num_clusters = init_indices.shape[1]
    dtype = _work_dtype(dense[0].dtype, positions[0].dtype)
    init_indices = init_indices.long()
    with torch.no_grad():
        z = F.normalize(torch.cat([dense[0], dense[1]], dim=1).to(dtype), dim=-1)  # (B, T, D)
        member_dist = _member_distances(torch.cat([positions[0], positions[1]], dim=1).to(dtype))
        labels = _initial_labels(init_indices, 2 * tokens, num_clusters)
        centroids = z.gather(1, init_indices[..., None].expand(-1, -1, z.shape[-1]))  # (B, K, D)
        col_marginals = z.new_full((batch, 1, num_clusters), 1.0 / num_clusters)
        for _ in range(num_iterations):
            cost = -(z @ centroids.transpose(1, 2))
            if pos_weight != 0:
                cost = cost + pos_weight * _positional_cost(member_dist, labels, num_clusters)
            plan = _sinkhorn(_min_max_normalise(cost, groups), col_marginals, sinkhorn_lambda, sinkhorn_iterations)
            labels = plan.argmax(dim=-1)  # hard assignment (B, T)
            members = _one_hot(labels, num_clusters, dtype)  # (B, T, K)
            if update_marginals:
                sizes = members.sum(dim=1, keepdim=True) + 1e-2
                col_marginals = sizes / sizes.sum(dim=-1, keepdim=True)
            centroids = F.normalize(members.transpose(1, 2) @ z, dim=-1)  # empty cluster -> zero vector
    return {"labels": labels.view(batch, 2, tokens).transpose(0, 1).contiguous()}


# ------------------------------------------------------------------------------------------- objects
def _check_pooling_inputs(dense: Sequence[Tensor], labels: Tensor, num_clusters: int) -> None:
    first, _ = _two_views(dense, "dense", "(B, N, D) patch tokens", 3)
    batch, tokens, _ = first.shape
    if _shape(labels) != (2, batch, tokens) or not _is_integer(labels):
        raise ValueError(
            f"labels must be an integer tensor (2, B, N) = (2, {batch}, {tokens}) from joint_space_clustering, "
            f"got {labels.dtype} {_shape(labels)}"
        )
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int (K, init_indices.shape[1]), got {num_clusters!r}")


@full_precision
def object_representations(dense: Sequence[Tensor], labels: Tensor, num_clusters: int) -> dict[str, Tensor]:
    """Mean token of every (view, image, cluster) and the clusters present in both views (docs/cribo.md §2).

    Args:
        dense: ``[view1, view2]``, each ``(B, N, D)`` (teacher or student last-layer patch tokens).
        labels: ``(2, B, N)`` long cluster labels from ``joint_space_clustering``.
        num_clusters: K.

    Returns:
        ``{"objects": (2, B, K, D), "valid": (B, K) bool}``; a cluster empty in a view gives a zero object,
        ``valid`` needs a token in both views. Differentiable w.r.t. ``dense``; the padded layout (with
        ``valid.flatten()`` as the row mask) is what the shape-static variants of the other functions take.
    """
    _check_pooling_inputs(dense, labels, num_clusters)
    members = _one_hot(labels.detach(), num_clusters, dense[0].dtype)  # (2, B, N, K)
    sizes = members.sum(dim=2, keepdim=True)  # (2, B, 1, K)
    weights = members / sizes.clamp_min(1)  # l1-normalised columns of the hard assignment
    objects = torch.stack([weights[v].transpose(1, 2) @ dense[v] for v in range(2)])
    valid = (sizes[:, :, 0] > 0).all(dim=0)
    return {"objects": objects, "valid": valid}


# ------------------------------------------------------------------------------------------ retrieval
def _check_retrieval_inputs(
    queries: Tensor, bank: Tensor, query_valid: Tensor | None, bank_valid: Tensor | None, chunk_size: int | None,
) -> None:
    if queries.dim() != 3 or queries.shape[0] != 2:
        raise ValueError(f"queries must be (2, M, D): the two views' teacher objects, got {_shape(queries)}")
    if bank.dim() != 3 or bank.shape[0] != 2 or bank.shape[2] != queries.shape[2]:
        raise ValueError(
            f"bank must be (2, Q, D) with the queries' D={queries.shape[2]} (the valid rows of the memory bank), "
            f"got {_shape(bank)}"
        )
    if bank.shape[1] == 0:
        raise ValueError("bank has no rows: pass at least one (valid) bank row, e.g. bank[:, :counts.sum()]")
    check_bool_mask(query_valid, (queries.shape[1],), "query_valid", "which query rows are real objects")
    check_bool_mask(bank_valid, (bank.shape[1],), "bank_valid", "which bank rows may be retrieved")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (bank rows per search chunk) or None, got {chunk_size!r}")


def _keys(rows: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    rows = rows.to(dtype)
    return F.normalize(rows, dim=-1) if normalize else rows


def _nearest_bank_rows(
    queries: Tensor, bank: Tensor, normalize_bank: bool, bank_valid: Tensor | None, chunk_size: int,
) -> Tensor:
    """``(2, M)`` index of the highest-similarity bank row per view, searched ``chunk_size`` rows at a time
    with a running max / argmax (a strictly greater value wins, so ties keep the first row as ``argmax``).
    Only one ``2 x M x chunk_size`` similarity block and one normalised chunk exist at a time.
    """
    _, num_queries, _ = queries.shape
    best = queries.new_full((2, num_queries), -math.inf)
    best_index = torch.zeros((2, num_queries), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[1], chunk_size):
        keys = _keys(bank[:, start : start + chunk_size], queries.dtype, normalize_bank)
        sims = queries @ keys.transpose(1, 2)  # (2, M, chunk)
        if bank_valid is not None:
            sims = sims.masked_fill(~bank_valid[start : start + chunk_size], -math.inf)
        value, index = sims.max(dim=-1)
        better = value > best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def _default_chunk_size(num_queries: int, num_rows: int) -> int:
    return max(1, min(num_rows, _SEARCH_CHUNK_ELEMENTS // max(2 * num_queries, 1)))


@full_precision
def cycle_consistent_neighbours(
    queries: Tensor, bank: Tensor, normalize_bank: bool = True, *, query_valid: Tensor | None = None,
    bank_valid: Tensor | None = None, query_groups: Tensor | None = None, chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Nearest bank neighbour of every teacher object and the cycle-consistency mask (docs/cribo.md §3).

    Args:
        queries: ``(2, M, D)`` raw teacher objects (view 1, view 2; row m = the same object).
        bank: ``(2, Q, D)`` raw bank rows (row j of both views = one stored object).
        normalize_bank: l2-normalise the bank rows before the search (queries always are).
        query_valid: optional ``(M,)`` bool, the shape-static layout: rows that are real objects. Invalid
            rows are never found by the back search and get ``mask`` False; the valid rows get exactly the
            result of the contract on the compacted queries.
        bank_valid: optional ``(Q,)`` bool: rows that may be retrieved (e.g. ``arange(C) < counts.sum()`` on
            the full bank storage). With no valid row at all, every ``mask`` is False.
        query_groups: optional ``(M,)`` long: the back search of the cycle test stays within the query's
            group (the official code searches back among its own process's objects only).
        chunk_size: bank rows searched at a time (running max / argmax), so no ``M x Q`` matrix exists.
            ``None`` picks chunks of about ``2**25`` similarities (one chunk for small banks).

    Returns:
        ``{"indices": (2, M) long, "neighbours": (2, M, D) raw bank rows, "mask": (2, M) bool}``, no gradient.
    """
    _check_retrieval_inputs(queries, bank, query_valid, bank_valid, chunk_size)
    num_queries, num_rows = queries.shape[1], bank.shape[1]
    if chunk_size is None:
        chunk_size = _default_chunk_size(num_queries, num_rows)
    dtype = _work_dtype(queries.dtype, bank.dtype)
    with torch.no_grad():
        q = F.normalize(queries.to(dtype), dim=-1)
        indices = _nearest_bank_rows(q, bank, normalize_bank, bank_valid, chunk_size)
        neighbours = torch.stack([bank[v].index_select(0, indices[v]) for v in range(2)])
        # jump to the other view of the retrieved object, then search back among the batch's objects
        jumped = torch.stack([bank[1 - v].index_select(0, indices[v]) for v in range(2)])
        mask = cycle_mask(_keys(jumped, dtype, normalize_bank), q, query_valid, query_groups)
        if bank_valid is not None:
            mask = mask & bank_valid.any()
    return {"indices": indices, "neighbours": neighbours, "mask": mask}


def _check_cycle_inputs(jumped_keys: Tensor, queries: Tensor, query_valid: Tensor | None,
                        query_groups: Tensor | None) -> None:
    if queries.dim() != 3 or queries.shape[0] != 2 or jumped_keys.shape != queries.shape:
        raise ValueError(
            f"jumped_keys and queries must both be (2, M, D) (one row per query of each view), got "
            f"{_shape(jumped_keys)} and {_shape(queries)}"
        )
    check_bool_mask(query_valid, (queries.shape[1],), "query_valid", "which query rows are real objects")
    if query_groups is not None and _shape(query_groups) != (queries.shape[1],):
        raise ValueError(
            f"query_groups must be (M,) = ({queries.shape[1]},), the group (image) of each query row, "
            f"got {_shape(query_groups)}"
        )


@full_precision
def cycle_mask(jumped_keys: Tensor, queries: Tensor, query_valid: Tensor | None = None,
               query_groups: Tensor | None = None) -> Tensor:
    """The cycle test of README §3 from the retrieved objects' other-view keys.

    ``jumped_keys[v, m]``: the search key (normalised or raw, as the bank is searched) of the other view of
    the bank object retrieved for query ``(v, m)``; ``queries``: the l2-normalised queries ``(2, M, D)``.
    ``mask[v, m]`` is True iff the back search of ``jumped_keys[v, m]`` among the valid queries of view
    ``1 - v`` in the same group lands on row ``m``. Shared by the functional reference and the in-place
    :class:`~ssl_modules.methods.memory_bank.ObjectMemoryBank`.
    """
    _check_cycle_inputs(jumped_keys, queries, query_valid, query_groups)
    num_queries = queries.shape[1]
    back = jumped_keys @ queries.flip(0).transpose(1, 2)  # (2, M, M)
    if query_valid is not None:
        back = back.masked_fill(~query_valid, -math.inf)
    if query_groups is not None:
        back = back.masked_fill(query_groups[:, None] != query_groups[None, :], -math.inf)
    own_row = torch.arange(num_queries, device=queries.device)
    mask = back.argmax(dim=-1) == own_row if num_queries else own_row.new_zeros((2, 0), dtype=torch.bool)
    if query_valid is not None:
        mask = mask & query_valid
    return mask


# -------------------------------------------------------------------------------------- memory bank
def _check_bank(bank: Tensor, counts: Tensor, dim: int) -> None:
    if bank.dim() != 3 or bank.shape[0] != 2 or bank.shape[2] != dim:
        raise ValueError(f"bank must be (2, C, D) with the objects' D={dim}, got {_shape(bank)}")
    if counts.dim() != 1 or counts.shape[0] == 0 or not _is_integer(counts):
        raise ValueError(f"counts must be a non-empty integer tensor (S,) of objects per image slot, got "
                         f"{counts.dtype} {_shape(counts)}")


def _check_enqueue_inputs(bank: Tensor, counts: Tensor, objects: Tensor, objects_per_image: Tensor) -> None:
    if objects.dim() != 3 or objects.shape[0] != 2:
        raise ValueError(f"objects must be (2, M, D): the batch's valid teacher objects, got {_shape(objects)}")
    _check_bank(bank, counts, objects.shape[2])
    if objects_per_image.dim() != 1 or not _is_integer(objects_per_image):
        raise ValueError(
            f"objects_per_image must be an integer tensor (B,) (valid objects per image, summing to M), got "
            f"{objects_per_image.dtype} {_shape(objects_per_image)}"
        )


def _check_padded_enqueue_inputs(bank: Tensor, counts: Tensor, objects: Tensor, valid: Tensor) -> None:
    if objects.dim() != 4 or objects.shape[0] != 2:
        raise ValueError(f"objects must be (2, B, K, D): teacher objects padded per image, got {_shape(objects)}")
    _, batch, clusters, dim = objects.shape
    check_bool_mask(valid, (batch, clusters), "valid", "clusters present in both views")
    _check_bank(bank, counts, dim)
    if bank.shape[1] < clusters * counts.shape[0]:
        raise ValueError(
            f"the bank holds C={bank.shape[1]} rows but S={counts.shape[0]} image slots of up to K={clusters} "
            f"objects need K * S = {clusters * counts.shape[0]}: allocate (2, K * S, D) rows"
        )


def memory_bank_enqueue(bank: Tensor, counts: Tensor, objects: Tensor, objects_per_image: Tensor) -> dict[str, Tensor]:
    """FIFO update of the image-organised object memory bank (docs/cribo.md §4).

    Args:
        bank: ``(2, C, D)`` raw teacher objects, newest first; rows ``[0, counts.sum())`` are valid.
        counts: ``(S,)`` integer, objects per image slot, newest image first.
        objects: ``(2, M, D)`` the batch's valid teacher objects, image-major (gathered in rank order).
        objects_per_image: ``(B,)`` integer, their count per image (sums to M).

    Returns:
        ``{"bank": (2, C, D), "counts": (S,)}``, new tensors: the first ``min(B, S)`` images' objects in
        front, then the newest old images that still fit in the S slots; rows after the valid part keep
        their previous (stale) content. No gradient, no host sync (row moves by one gather with a
        data-dependent index); ``O(C D)`` memory for the new bank.
    """
    _check_enqueue_inputs(bank, counts, objects, objects_per_image)
    slots, capacity = counts.shape[0], bank.shape[1]
    new_images = min(objects_per_image.shape[0], slots)
    with torch.no_grad():
        kept_counts = counts[: slots - new_images]
        new_counts = torch.cat([objects_per_image[:new_images].to(counts.dtype), kept_counts])
        num_new = objects_per_image[:new_images].sum()
        num_kept = kept_counts.sum()
        rows = torch.arange(capacity, device=bank.device)
        # rows [num_new, num_new + num_kept) take the old rows [0, num_kept); the others keep their own
        shifted = (rows >= num_new) & (rows < num_new + num_kept)
        new_bank = bank.index_select(1, torch.where(shifted, rows - num_new, rows))
        head = min(objects.shape[1], capacity)
        is_new = (rows[:head] < num_new)[:, None]
        new_bank[:, :head] = torch.where(is_new, objects[:, :head].to(bank.dtype), new_bank[:, :head])
    return {"bank": new_bank, "counts": new_counts}


def memory_bank_enqueue_padded(bank: Tensor, counts: Tensor, objects: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """``memory_bank_enqueue`` for objects padded per image, without host sync (shape-static).

    Args:
        bank, counts: as in ``memory_bank_enqueue``; the bank must hold ``C >= K * S`` rows.
        objects: ``(2, B, K, D)`` teacher objects of every (image, cluster), e.g. from
            ``object_representations`` (gathered over processes in rank order).
        valid: ``(B, K)`` bool, the clusters present in both views.

    Returns exactly ``memory_bank_enqueue(bank, counts, objects[:, valid], valid.sum(1))``: the valid rows
    are compacted to the front, image-major, by a stable argsort of the mask.
    """
    _check_padded_enqueue_inputs(bank, counts, objects, valid)
    _, batch, clusters, dim = objects.shape
    flat_valid = valid.reshape(-1)
    order = torch.argsort((~flat_valid).to(torch.int32), stable=True)  # valid rows first, order kept
    compact = objects.reshape(2, batch * clusters, dim).index_select(1, order)
    return memory_bank_enqueue(bank, counts, compact, valid.sum(dim=1))


# --------------------------------------------------------------------------------------------- losses
def _teacher_targets(logits: Tensor, center: Tensor, temp: float, dtype: torch.dtype) -> Tensor:
    """``softmax((t - center) / temp)``, a constant (no gradient reaches the teacher side)."""
    with torch.no_grad():
        return F.softmax((logits.detach().to(dtype) - center.detach().to(dtype)) / temp, dim=-1)


def _cross_entropy(target: Tensor, student_logits: Tensor, temp: float, dtype: torch.dtype) -> Tensor:
    """Per-row ``H(target, student / temp)``."""
    return -(target * F.log_softmax(student_logits.to(dtype) / temp, dim=-1)).sum(dim=-1)


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the valid rows; a graph-connected 0 when there is none (instead of NaN)."""
    if valid is None:
        return values.sum() / max(values.shape[0], 1)
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp_min(1)


def _check_object_pair(tensors: Sequence[Tensor], name: str, like: tuple[int, ...] | None = None) -> tuple[int, int]:
    first, _ = _two_views(tensors, name, "(M, L) object-head logits", 2)
    if like is not None and _shape(first) != like:
        raise ValueError(f"{name} must be shaped like the student objects {like} (row m = object m), "
                         f"got {_shape(first)}")
    return first.shape[0], first.shape[1]


def _check_global_loss_inputs(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor) -> None:
    t1, _ = _two_views(teacher, "teacher", "(B, L) global-head logits", 2)
    if isinstance(student, Tensor) or len(student) < 2 or any(s.shape != t1.shape for s in student):
        raise ValueError(
            f"student must be a list of V >= 2 tensors shaped like the teacher views {_shape(t1)} (two global "
            f"views first, then local views), got {[_shape(s) for s in student]}"
        )
    _check_center(center, t1.shape[1], "center")


def _check_object_loss_inputs(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor,
                              valid: Tensor | None, mask: Tensor | None = None, teacher_name: str = "teacher") -> None:
    rows, width = _check_object_pair(student, "student")
    _check_object_pair(teacher, teacher_name, (rows, width))
    _check_center(center, width, "center")
    if mask is not None:
        check_bool_mask(mask, (2, rows), "mask", "the cycle-consistency mask")
    check_bool_mask(valid, (rows,), "valid", "which object rows are real")


def _check_cross_image_loss_inputs(student: Sequence[Tensor], neighbours: Sequence[Tensor], mask: Tensor | None,
                                   center: Tensor, valid: Tensor | None) -> None:
    if mask is None:
        raise ValueError("mask must be the (2, M) bool cycle-consistency mask, got None")
    _check_object_loss_inputs(student, neighbours, center, valid, mask, teacher_name="neighbours")


@full_precision
def cribo_global_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, teacher_temp: float,
    student_temp: float = 0.1,
) -> Tensor:
    """DINO-style cross-view loss on the CLS-head logits (docs/cribo.md §5).

    Args:
        student: V >= 2 tensors ``(B, L)``, the two global views first, then local views.
        teacher: the two global views ``(B, L)``. center: ``(L,)`` or ``(1, L)``.

    Returns the mean over the ``2 (V - 1)`` pairs (teacher view t, student view v != t) of the batch mean of
    ``H(softmax((teacher[t] - center) / teacher_temp), student[v] / student_temp)``, in the inputs' dtype
    (computed in at least float32).
    """
    _check_global_loss_inputs(student, teacher, center)
    dtype = _work_dtype(student[0].dtype)
    targets = [_teacher_targets(t, center, teacher_temp, dtype) for t in teacher]
    terms = [
        _cross_entropy(q, student[v], student_temp, dtype).mean()
        for t, q in enumerate(targets)
        for v in range(len(student))
        if v != t
    ]
    return (sum(terms) / len(terms)).to(student[0].dtype)


@full_precision
def cribo_object_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, teacher_temp: float,
    student_temp: float = 0.1, *, valid: Tensor | None = None,
) -> Tensor:
    """Cross-view object loss: teacher object of one view supervises the student object of the other.

    Args:
        student, teacher: ``[view1, view2]``, each ``(M, L)`` object-head logits (row m = same object).
        center: ``(L,)`` or ``(1, L)``.
        valid: optional ``(M,)`` bool for padded rows (shape-static layout): the means run over the valid
            rows only, giving exactly the loss of the compacted rows.

    Returns ``(mean_m H(q_1, s_2) + mean_m H(q_2, s_1)) / 2``. With no (valid) object, M = 0, the loss is a
    0 still attached to the student's graph (the official code would produce NaN and stop).
    """
    _check_object_loss_inputs(student, teacher, center, valid)
    dtype = _work_dtype(student[0].dtype)
    q1, q2 = (_teacher_targets(t, center, teacher_temp, dtype) for t in teacher)
    loss_1to2 = _masked_mean(_cross_entropy(q1, student[1], student_temp, dtype), valid)
    loss_2to1 = _masked_mean(_cross_entropy(q2, student[0], student_temp, dtype), valid)
    return ((loss_1to2 + loss_2to1) / 2).to(student[0].dtype)


@full_precision
def cribo_cross_image_loss(
    student: Sequence[Tensor], neighbours: Sequence[Tensor], mask: Tensor, center: Tensor, teacher_temp: float,
    student_temp: float = 0.1, *, valid: Tensor | None = None,
) -> Tensor:
    """Cross-image object loss with the cycle-consistent bank neighbours (docs/cribo.md §5).

    Args:
        student: ``[view1, view2]`` student object-head logits ``(M, L)``.
        neighbours: teacher object-head logits of the neighbours of the view-1 objects (from bank view 1)
            and of the view-2 objects (from bank view 2), each ``(M, L)``.
        mask: ``(2, M)`` bool cycle-consistency mask. center: ``(L,)`` or ``(1, L)``.
        valid: optional ``(M,)`` bool for padded rows; it is and-ed into ``mask`` (padded rows from
            ``cycle_consistent_neighbours(..., query_valid=...)`` already have a False mask).

    Returns ``(sum_{mask[0]} H(p_1, s_2) + sum_{mask[1]} H(p_2, s_1)) / Z1 / 2`` with ``Z1 = mask[0].sum()``
    (official: the view-1 count normalises both terms); when ``Z1 = 0`` it is 0, still attached to the
    student's graph (zero gradient), whatever ``mask[1]`` holds. No branch on tensor values.
    """
    _check_cross_image_loss_inputs(student, neighbours, mask, center, valid)
    if valid is not None:
        mask = mask & valid
    dtype = _work_dtype(student[0].dtype)
    p1, p2 = (_teacher_targets(n, center, teacher_temp, dtype) for n in neighbours)
    sum_1to2 = torch.where(mask[0], _cross_entropy(p1, student[1], student_temp, dtype), 0.0).sum()
    sum_2to1 = torch.where(mask[1], _cross_entropy(p2, student[0], student_temp, dtype), 0.0).sum()
    accepted = mask[0].sum()
    normaliser = accepted.clamp_min(1)
    loss = (sum_1to2 / normaliser + sum_2to1 / normaliser) / 2
    return torch.where(accepted > 0, loss, torch.zeros_like(loss)).to(student[0].dtype)


@full_precision
def cribo_loss(
    student_global: Sequence[Tensor], teacher_global: Sequence[Tensor], student_objects: Sequence[Tensor],
    teacher_objects: Sequence[Tensor], neighbour_objects: Sequence[Tensor], cycle_mask: Tensor, center: Tensor,
    object_center: Tensor, teacher_temp: float, object_teacher_temp: float, student_temp: float = 0.1,
    object_student_temp: float = 0.1, cross_image: bool = True, *, object_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """The CrIBo objective: global + object + cross-image losses, unweighted (docs/cribo.md §5).

    ``cross_image=False`` (the official first epoch) makes the cross-image term a constant 0.
    ``object_valid``: optional ``(M,)`` bool for padded object rows, passed to both object losses.

    Returns ``{"loss", "global_loss", "object_loss", "cross_image_loss"}`` (0-dim tensors).
    """
    global_loss = cribo_global_loss(student_global, teacher_global, center, teacher_temp, student_temp)
    object_loss = cribo_object_loss(
        student_objects, teacher_objects, object_center, object_teacher_temp, object_student_temp, valid=object_valid
    )
    if cross_image:
        cross_image_loss = cribo_cross_image_loss(
            student_objects, neighbour_objects, cycle_mask, object_center, object_teacher_temp,
            object_student_temp, valid=object_valid,
        )
    else:
        cross_image_loss = object_loss.new_zeros(())
    return {
        "loss": global_loss + object_loss + cross_image_loss,
        "global_loss": global_loss,
        "object_loss": object_loss,
        "cross_image_loss": cross_image_loss,
    }
