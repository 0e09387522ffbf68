"""CrIBo functional core: joint-space clustering, object representations, cycle-consistent retrieval from a
memory bank, the FIFO bank update and the three losses (contract: ``shared/parity/cribo/README.md``).

Everything here is shape-static and free of host synchronisation, so the training step can run under
XLA as well as CUDA: objects stay padded per image ``(B, K)`` with a validity mask where the contract's
compact form ``objects[:, valid]`` would give data-dependent shapes. The optional keyword arguments
(``groups``, ``query_valid``, ``bank_valid``, ``valid``) select that padded/grouped form; without them
every function is exactly the contract's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "joint_space_clustering",
    "object_representations",
    "cycle_consistent_neighbours",
    "memory_bank_enqueue",
    "memory_bank_enqueue_padded",
    "cribo_global_loss",
    "cribo_object_loss",
    "cribo_cross_image_loss",
    "cribo_loss",
]


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ------------------------------------------------------------------------------------ clustering
def _pairwise_distances(positions: Tensor) -> Tensor:
    """Exact Euclidean distances ``(B, T, T)``: equal positions give exactly 0 (no matrix-product path)."""
    return (positions[:, :, None, :] - positions[:, None, :, :]).pow(2).sum(-1).sqrt()


def _positional_cost(distances: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Distance of every token to the nearest other member of every cluster, normalised per image.

    ``labels (B, T)`` holds each token's cluster, ``num_clusters`` for tokens in no cluster. The minimum
    over members is one ``scatter_reduce`` over the ``(B, T, T)`` distances (memory ``B * T^2``, not
    ``B * T^2 * K``). Members at distance exactly 0 are ignored; no member left -> 0; zeros are then
    replaced by the image's mean and the matrix is divided by its maximum.
    """
    batch, tokens, _ = distances.shape
    beyond = torch.full_like(distances[:, :, :1], float("inf")).expand(batch, tokens, num_clusters + 1)
    candidates = torch.where(distances > 0, distances, torch.full_like(distances, float("inf")))
    index = labels[:, None, :].expand(batch, tokens, tokens)
    nearest = beyond.scatter_reduce(2, index, candidates, reduce="amin", include_self=True)[..., :num_clusters]
    cost = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
    mean = cost.mean(dim=(1, 2), keepdim=True)
    cost = torch.where(cost == 0, mean, cost)
    peak = cost.amax(dim=(1, 2), keepdim=True)
    return cost / torch.where(peak > 0, peak, torch.ones_like(peak))


def _minmax_per_group(cost: Tensor, groups: int) -> Tensor:
    """Min-max normalise the cost over each group of ``B / groups`` consecutive images."""
    grouped = cost.reshape(groups, -1)
    low, high = grouped.amin(dim=1, keepdim=True), grouped.amax(dim=1, keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return ((grouped - low) / span).reshape(cost.shape)


def _sinkhorn_plan(cost: Tensor, column_marginal: Tensor, iterations: int, sharpness: float) -> Tensor:
    """Entropic transport of ``T`` tokens (uniform ``1/T``) to ``K`` clusters (marginal ``c``), per image."""
    cost = cost if cost.dtype == torch.float64 else cost.float()
    plan = torch.exp(-sharpness * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    row_marginal = 1.0 / cost.shape[1]
    for _ in range(iterations):
        plan = plan * (row_marginal / plan.sum(dim=2, keepdim=True))
        plan = plan * (column_marginal[:, None, :].to(plan.dtype) / plan.sum(dim=1, keepdim=True))
    return torch.nan_to_num(plan, nan=1e-8)


def _centroids(tokens: Tensor, assignment: Tensor) -> Tensor:
    """l2-normalised sum of each cluster's members ``(B, K, D)``; an empty cluster gives a zero vector."""
    return F.normalize(assignment.transpose(1, 2) @ tokens, dim=-1)


@torch.no_grad()
def joint_space_clustering(
    dense: Sequence[Tensor], positions: Sequence[Tensor], init_indices: Tensor, pos_weight: float = 1.0,
    num_iterations: int = 5, sinkhorn_iterations: int = 5, sinkhorn_lambda: float = 20.0,
    update_marginals: bool = True, *, groups: int = 1,
) -> dict[str, Tensor]:
    """Cluster the patch tokens of both views of each image jointly into K objects (K = init_indices.shape[1]).

    Args:
        dense: two ``(B, N, D)`` token tensors (view 1, view 2), the teacher's last-layer patch tokens.
        positions: two ``(B, N, 2)`` patch centres in seed-image pixels.
        init_indices: ``(B, K)`` distinct joint-token indices in ``[0, 2N)``: the initial centroids.
        groups: the batch-wide min-max normalisation of the cost runs over each of ``groups`` equal groups
            of consecutive images (the official code normalises over each process's batch; ``groups``
            reproduces W processes of B images inside one batch of W * B).

    Returns ``{"labels": (2, B, N) long}``.
    """
    if len(dense) != 2 or len(positions) != 2:
        raise ValueError("dense and positions must hold exactly two views")
    batch, patches, _ = dense[0].shape
    tokens = 2 * patches
    if dense[1].shape != dense[0].shape or positions[0].shape != (batch, patches, 2) or positions[1].shape != (batch, patches, 2):
        raise ValueError(f"dense must be two (B, N, D) and positions two (B, N, 2) tensors; got "
                         f"{[tuple(d.shape) for d in dense]} and {[tuple(p.shape) for p in positions]}")
    if init_indices.dim() != 2 or init_indices.shape[0] != batch:
        raise ValueError(f"init_indices must be (B={batch}, K), got {tuple(init_indices.shape)}")
    num_clusters = init_indices.shape[1]
    if not 1 <= num_clusters <= tokens:
        raise ValueError(f"K={num_clusters} clusters need 1 <= K <= {tokens} joint tokens (2 x {patches} patches): "
                         "lower the number of clusters or use larger crops")
    if groups < 1 or batch % groups:
        raise ValueError(f"groups ({groups}) must divide the batch ({batch})")

    z = F.normalize(_at_least_float32(torch.cat(list(dense), dim=1)), dim=-1)
    distances = _pairwise_distances(_at_least_float32(torch.cat(list(positions), dim=1)).to(z.dtype))
    assignment = torch.zeros(batch, tokens, num_clusters, dtype=z.dtype, device=z.device)
    assignment.scatter_(1, init_indices[:, None, :], 1.0)
    centroids = z.gather(1, init_indices[..., None].expand(-1, -1, z.shape[-1]))
    marginal = torch.full((batch, num_clusters), 1.0 / num_clusters, dtype=z.dtype, device=z.device)

    for _ in range(num_iterations):
        member = assignment.amax(dim=2) > 0
        labels = torch.where(member, assignment.argmax(dim=2), torch.full_like(member, num_clusters, dtype=torch.long))
        cost = -(z @ centroids.transpose(1, 2)) + pos_weight * _positional_cost(distances, labels, num_clusters)
        plan = _sinkhorn_plan(_minmax_per_group(cost, groups), marginal, sinkhorn_iterations, sinkhorn_lambda)
        assignment = F.one_hot(plan.argmax(dim=2), num_clusters).to(z.dtype)
        if update_marginals:
            sizes = assignment.sum(dim=1) + 0.01
            marginal = sizes / sizes.sum(dim=1, keepdim=True)
        centroids = _centroids(z, assignment)

    labels = assignment.argmax(dim=2)
    return {"labels": torch.stack([labels[:, :patches], labels[:, patches:]])}


# -------------------------------------------------------------------------------------- objects
def object_representations(dense: Sequence[Tensor], labels: Tensor, num_clusters: int) -> dict[str, Tensor]:
    """Mean token of every (view, image, cluster): ``objects (2, B, K, D)`` and ``valid (B, K)``.

    A cluster is valid when it has at least one token in each view; a cluster absent from a view gives a
    zero vector there. Differentiable w.r.t. ``dense`` (a fixed pooling), no gradient through ``labels``.
    """
    if len(dense) != 2 or labels.shape != (2, *dense[0].shape[:2]):
        raise ValueError(f"need two (B, N, D) views and labels (2, B, N); got labels {tuple(labels.shape)}")
    stacked = torch.stack(list(dense))  # (2, B, N, D)
    members = F.one_hot(labels, num_clusters).to(stacked.dtype)  # (2, B, N, K)
    counts = members.sum(dim=2)  # (2, B, K)
    sums = members.transpose(2, 3) @ stacked
    objects = sums / counts.clamp(min=1)[..., None]
    return {"objects": objects, "valid": (counts[0] > 0) & (counts[1] > 0)}


# ------------------------------------------------------------------------------------- retrieval
def _best_rows(queries: Tensor, keys: Tensor, key_valid: Tensor | None, chunk_size: int) -> Tensor:
    """Index of the key of highest dot product for every query, searched in chunks of keys.

    Ties go to the lowest index (``max`` returns the first maximum; a later chunk must be strictly better).
    """
    best_score = torch.full(queries.shape[:1], float("-inf"), dtype=queries.dtype, device=queries.device)
    best_index = torch.zeros(queries.shape[:1], dtype=torch.long, device=queries.device)
    for start in range(0, keys.shape[0], chunk_size):
        scores = queries @ keys[start : start + chunk_size].T
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[start : start + chunk_size], float("-inf"))
        score, index = scores.max(dim=1)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_index = torch.where(better, index + start, best_index)
    return best_index


@torch.no_grad()
def cycle_consistent_neighbours(
    queries: Tensor, bank: Tensor, normalize_bank: bool = True, *, query_valid: Tensor | None = None,
    bank_valid: Tensor | None = None, query_groups: Tensor | None = None, chunk_size: int = 65536,
) -> dict[str, Tensor]:
    """Nearest bank object of every batch object (per view) and the cycle-consistency test.

    Args:
        queries: ``(2, M, D)`` raw teacher objects, row ``m`` of both views the same object.
        bank: ``(2, Q, D)`` raw bank rows (the valid part, or all rows with ``bank_valid``).
        normalize_bank: l2-normalise the bank rows before the search (queries always are).
        query_valid: ``(M,)`` bool, padded rows that are no object: never found, mask False.
        bank_valid: ``(Q,)`` bool, bank rows that may be retrieved.
        query_groups: ``(M,)`` long group of every query; the back search stays in the query's group
            (the official code searches back among its own process's objects).
        chunk_size: bank rows scored at once, so that a bank of millions of rows never needs an ``M x Q``
            matrix.

    Returns ``indices (2, M)``, ``neighbours (2, M, D)`` (raw bank rows) and ``mask (2, M)``.
    """
    if queries.dim() != 3 or bank.dim() != 3 or queries.shape[0] != 2 or bank.shape[0] != 2 or queries.shape[2] != bank.shape[2]:
        raise ValueError(f"queries must be (2, M, D) and bank (2, Q, D), got {tuple(queries.shape)} and {tuple(bank.shape)}")
    q = F.normalize(_at_least_float32(queries), dim=-1)
    keys = F.normalize(_at_least_float32(bank), dim=-1) if normalize_bank else _at_least_float32(bank)
    keys = keys.to(q.dtype)
    indices = torch.stack([_best_rows(q[v], keys[v], bank_valid, chunk_size) for v in (0, 1)])
    neighbours = torch.stack([bank[v, indices[v]] for v in (0, 1)])
    masks = []
    for view, other in ((0, 1), (1, 0)):
        jumped = keys[other, indices[view]]  # the retrieved object's other view
        scores = jumped @ q[other].T  # (M, M): back search among the batch's objects
        if query_valid is not None:
            scores = scores.masked_fill(~query_valid[None, :], float("-inf"))
        if query_groups is not None:
            scores = scores.masked_fill(query_groups[:, None] != query_groups[None, :], float("-inf"))
        landed = scores.argmax(dim=1)
        hit = landed == torch.arange(q.shape[1], device=q.device)
        masks.append(hit if query_valid is None else hit & query_valid)
    return {"indices": indices, "neighbours": neighbours, "mask": torch.stack(masks)}


# ---------------------------------------------------------------------------------- memory bank
def _check_bank(bank: Tensor, counts: Tensor, objects: Tensor) -> None:
    if bank.dim() != 3 or bank.shape[0] != 2 or counts.dim() != 1:
        raise ValueError(f"bank must be (2, C, D) and counts (S,), got {tuple(bank.shape)} and {tuple(counts.shape)}")
    if objects.shape[0] != 2 or objects.shape[-1] != bank.shape[2]:
        raise ValueError(f"objects must be (2, ..., D={bank.shape[2]}), got {tuple(objects.shape)}")


@torch.no_grad()
def _enqueue(bank: Tensor, counts: Tensor, new_rows: Tensor, new_counts: Tensor) -> dict[str, Tensor]:
    """FIFO by images, without host synchronisation: the new images' rows go to the front.

    ``new_rows (2, R, D)`` holds the new objects compacted at the front (image-major) and ``new_counts
    (B,)`` their number per image. Rows past the valid part keep their (stale) content. One gather of the
    bank shifts the kept rows back by the number of new rows; only the first ``R`` rows are then patched.
    """
    slots = counts.shape[0]
    kept_images = min(new_counts.shape[0], slots)
    head = new_counts[:kept_images].to(counts.dtype)
    n_new, n_keep = head.sum(), counts[: slots - kept_images].sum()
    row = torch.arange(bank.shape[1], device=bank.device)
    source = torch.where(row < n_new + n_keep, row - n_new, row).clamp(min=0)
    updated = bank.index_select(1, source)
    front = min(new_rows.shape[1], bank.shape[1])
    if front:
        is_new = (row[:front] < n_new)[None, :, None]
        updated[:, :front] = torch.where(is_new, new_rows[:, :front].to(bank.dtype), updated[:, :front])
    return {"bank": updated, "counts": torch.cat([head, counts[: slots - kept_images]])}


def memory_bank_enqueue(bank: Tensor, counts: Tensor, objects: Tensor, objects_per_image: Tensor) -> dict[str, Tensor]:
    """The official FIFO update of the memory bank, organised by image slots (newest first).

    ``objects (2, M, D)`` are the batch's valid teacher objects gathered in rank order, image-major, and
    ``objects_per_image (B,)`` their count per image. Returns new ``bank (2, C, D)`` and ``counts (S,)``.
    """
    _check_bank(bank, counts, objects)
    return _enqueue(bank, counts, objects, objects_per_image)


@torch.no_grad()
def memory_bank_enqueue_padded(bank: Tensor, counts: Tensor, objects: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """:func:`memory_bank_enqueue` for padded objects ``(2, B, K, D)`` with a validity mask ``(B, K)``.

    The valid objects are compacted in image-major, cluster order by a stable sort of the mask, so the
    result equals the contract's update on ``objects[:, valid]`` with ``valid.sum(1)`` per image.
    """
    _check_bank(bank, counts, objects)
    if objects.dim() != 4 or valid.shape != objects.shape[1:3]:
        raise ValueError(f"objects must be (2, B, K, D) and valid (B, K), got {tuple(objects.shape)}, {tuple(valid.shape)}")
    flat_valid = valid.reshape(-1)
    order = torch.sort((~flat_valid).to(torch.int8), stable=True).indices
    compact = objects.reshape(2, -1, objects.shape[-1])[:, order]
    return _enqueue(bank, counts, compact, valid.sum(dim=1))


# ------------------------------------------------------------------------------------------ losses
def _targets(teacher: Tensor, center: Tensor, temperature: float) -> Tensor:
    return torch.softmax((teacher.detach() - center.detach()) / temperature, dim=-1)


def _cross_entropy(targets: Tensor, student: Tensor, temperature: float) -> Tensor:
    """``H(q, s)`` per row: ``-sum_l q_l log_softmax(s / tau)_l``."""
    return -(targets * torch.log_softmax(student / temperature, dim=-1)).sum(dim=-1)


def cribo_global_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, teacher_temp: float,
    student_temp: float = 0.1,
) -> Tensor:
    """DINO-style cross-view loss on the CLS head: teacher view ``t`` supervises every student view ``v != t``.

    ``student``: V >= 2 tensors ``(B, L)`` (global views first); ``teacher``: the 2 global views.
    """
    if len(student) < 2 or len(teacher) != 2:
        raise ValueError(f"need >= 2 student views and 2 teacher views, got {len(student)} and {len(teacher)}")
    targets = _targets(torch.stack(list(teacher)), center, teacher_temp)  # (2, B, L)
    log_probs = torch.log_softmax(torch.stack(list(student)) / student_temp, dim=-1)  # (V, B, L)
    cross = -torch.einsum("tbl,vbl->tv", targets, log_probs) / log_probs.shape[1]
    pairs = ~torch.eye(2, len(student), dtype=torch.bool, device=cross.device)
    return (cross * pairs).sum() / pairs.sum()


def _masked_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of ``values`` over the rows where ``weights`` is True; a graph-connected 0 when there is none."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def cribo_object_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, teacher_temp: float,
    student_temp: float = 0.1, *, valid: Tensor | None = None,
) -> Tensor:
    """Cross-view object loss: teacher object ``k`` of one view supervises student object ``k`` of the other.

    ``student``, ``teacher``: two ``(M, L)`` tensors (view 1, view 2). ``valid (M,)`` marks real rows of a
    padded batch (the mean runs over them; no valid row gives a graph-connected 0).
    """
    q0, q1 = _targets(teacher[0], center, teacher_temp), _targets(teacher[1], center, teacher_temp)
    forward = _masked_mean(_cross_entropy(q0, student[1], student_temp), valid)
    backward = _masked_mean(_cross_entropy(q1, student[0], student_temp), valid)
    return (forward + backward) / 2


def cribo_cross_image_loss(
    student: Sequence[Tensor], neighbours: Sequence[Tensor], mask: Tensor, center: Tensor, teacher_temp: float,
    student_temp: float = 0.1,
) -> Tensor:
    """Cross-image object loss: the neighbour of view-1 object ``k`` supervises student view-2 object ``k``
    (and vice versa) where the cycle is consistent; both sums are divided by the number ``Z`` of accepted
    view-1 objects (official), and the loss is a graph-connected 0 when ``Z = 0``."""
    p0, p1 = _targets(neighbours[0], center, teacher_temp), _targets(neighbours[1], center, teacher_temp)
    m0, m1 = mask[0].to(student[0].dtype), mask[1].to(student[0].dtype)
    total = (_cross_entropy(p0, student[1], student_temp) * m0).sum() + (_cross_entropy(p1, student[0], student_temp) * m1).sum()
    accepted = m0.sum()
    return torch.where(accepted > 0, total / accepted.clamp(min=1) / 2, total * 0)


def cribo_loss(
    student_global: Sequence[Tensor], teacher_global: Sequence[Tensor], student_objects: Sequence[Tensor],
    teacher_objects: Sequence[Tensor], neighbour_objects: Sequence[Tensor], cycle_mask: Tensor, center: Tensor,
    object_center: Tensor, teacher_temp: float, object_teacher_temp: float, student_temp: float = 0.1,
    object_student_temp: float = 0.1, cross_image: bool = True, *, valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """The CrIBo objective: global + cross-view object + cross-image object losses, unweighted.

    ``cross_image=False`` (the first epoch in the official schedule) drops the cross-image term. ``valid``
    marks real rows of padded object tensors.
    """
    global_loss = cribo_global_loss(student_global, teacher_global, center, teacher_temp, student_temp)
    object_loss = cribo_object_loss(student_objects, teacher_objects, object_center, object_teacher_temp,
                                    object_student_temp, valid=valid)
    if cross_image:
        mask = cycle_mask if valid is None else cycle_mask & valid[None]
        cross_image_loss = cribo_cross_image_loss(student_objects, neighbour_objects, mask, object_center,
                                                  object_teacher_temp, object_student_temp)
    else:
        cross_image_loss = torch.zeros((), dtype=global_loss.dtype, device=global_loss.device)
    return {
        "loss": global_loss + object_loss + cross_image_loss,
        "global_loss": global_loss,
        "object_loss": object_loss,
        "cross_image_loss": cross_image_loss,
    }
