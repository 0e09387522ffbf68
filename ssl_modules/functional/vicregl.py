"""VICRegL functional core: the VICReg criterion on pooled embeddings (global) and on matched feature-map
cells (local), with location- and feature-based matching (``docs/vicregl.md``).

Every function takes the global batch. For DDP, ``vicregl_global_loss``, ``vicregl_local_loss`` and
``vicregl_loss`` accept an optional ``gather`` callable, applied to every batch-major tensor right before
the VICReg terms are computed on it (the stacked embeddings, the matched rows). Pass an autograd all-gather
whose backward sums over processes: matching then stays per process (it is per image) and every process
computes the single-process loss of the global batch.

The local criterion of many view pairs is evaluated group-wise: the pairs whose views have the same numbers
of cells are matched in one batched call, and their matched rows are concatenated along the slot axis
before a single VICReg evaluation. Slot-wise statistics averaged over slots make this exactly the mean over
the pairs of the per-pair criterion.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import full_precision

__all__ = [
    "vicreg_loss",
    "vicregl_global_loss",
    "feature_cell_locations",
    "match_by_location",
    "match_by_features",
    "vicregl_local_loss",
    "vicregl_loss",
]

Gather = Callable[[Tensor], Tensor]
_TERMS = ("invariance", "variance", "covariance")


def _identity(x: Tensor) -> Tensor:
    return x


# =========================================================================================== VICReg
def _check_embedding_batch(z: Tensor, name: str) -> None:
    if z.dim() not in (2, 3):
        raise ValueError(f"{name} must be (B, D) or (B, K, D), got shape {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(
            f"{name} has a batch of {z.shape[0]}: the variance term is undefined for fewer than 2 images; the "
            "global batch (per-process batch x number of processes) must be >= 2"
        )


def _centred_slots(z: Tensor) -> Tensor:
    """``(B, D)`` or ``(B, K, D)`` -> ``(B, K, D)`` centred over the batch, every slot on its own."""
    z = z.unsqueeze(1) if z.dim() == 2 else z
    return z - z.mean(dim=0, keepdim=True)


def _regularisers(centred: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Variance hinge and covariance penalty of centred ``(B, K, D)`` embeddings, averaged over the slots.

    Returns ``mean_{k,d} relu(1 - sqrt(var + eps))`` and ``mean_k offdiag2(C_k) / D`` with unbiased ``var``
    and ``C_k = X_k^T X_k / (n - 1)``. ``||X^T X||_F = ||X X^T||_F``, so the Frobenius norm comes from the
    smaller of the ``D x D`` and ``B x B`` products (8192-wide expanders, batches of a few hundred).
    """
    n, _, dim = centred.shape
    per_slot = centred.transpose(0, 1)  # (K, B, D)
    variance = per_slot.pow(2).sum(dim=1) / (n - 1)  # (K, D): the diagonal of every C_k
    hinge = F.relu(1.0 - torch.sqrt(variance + eps)).mean()
    if n < dim:
        product = per_slot @ per_slot.transpose(1, 2)
    else:
        product = per_slot.transpose(1, 2) @ per_slot
    squared_sum = product.pow(2).sum(dim=(1, 2)) / (n - 1) ** 2
    off_diagonal = squared_sum - variance.pow(2).sum(dim=1)
    return hinge, (off_diagonal / dim).mean()


def _vicreg_terms(
    z_a: Tensor, z_b: Tensor, inv_coeff: float, var_coeff: float, cov_coeff: float, eps: float
) -> dict[str, Tensor]:
    """The three weighted VICReg terms of two paired batches (no input checks)."""
    hinge_a, cov_a = _regularisers(_centred_slots(z_a), eps)
    hinge_b, cov_b = _regularisers(_centred_slots(z_b), eps)
    return {
        "invariance": inv_coeff * F.mse_loss(z_a, z_b),
        "variance": var_coeff * (hinge_a + hinge_b) / 2,
        "covariance": cov_coeff * (cov_a + cov_b) / 2,
    }


def _with_total(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"loss": terms["invariance"] + terms["variance"] + terms["covariance"], **terms}


def _check_vicreg_inputs(z_a: Tensor, z_b: Tensor) -> None:
    _check_embedding_batch(z_a, "z_a")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")


@full_precision
def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    inv_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, Tensor]:
    """The VICReg criterion between paired embeddings (official ``_vicreg_loss``).

    Args:
        z_a, z_b: same shape, ``(B, D)`` or ``(B, K, D)`` (slot ``k`` of image ``b`` in ``z_a`` paired with
            the same slot in ``z_b``); ``B >= 2``.
        inv_coeff, var_coeff, cov_coeff: weights of the three terms.
        eps: added to the unbiased variance inside the square root.

    Returns:
        ``loss``, ``invariance``, ``variance``, ``covariance`` (0-dim, each already weighted;
        ``loss`` is their sum). Variance and covariance are batch statistics of every slot on its own,
        averaged over the slots; the two branches are averaged.
    """
    _check_vicreg_inputs(z_a, z_b)
    return _with_total(_vicreg_terms(z_a, z_b, inv_coeff, var_coeff, cov_coeff, eps))


# ====================================================================================== global loss
def _check_view_list(tensors: Sequence[Tensor] | None, name: str, ndim: int) -> None:
    if tensors is None or len(tensors) < 2:
        count = 0 if tensors is None else len(tensors)
        raise ValueError(f"{name} needs at least 2 views (the two large views first), got {count}")
    for v, t in enumerate(tensors):
        if t.dim() != ndim:
            raise ValueError(f"{name}[{v}] must have {ndim} dimensions, got shape {tuple(t.shape)}")
    batches = [t.shape[0] for t in tensors]
    if len(set(batches)) != 1:
        raise ValueError(f"all views of {name} must have the same batch size (images in the same order), got {batches}")


def _anchor_pairs(num_views: int) -> list[tuple[int, int]]:
    """The ``2 (V - 1)`` ordered pairs ``(i, j)``: ``i`` a large view (0 or 1), ``j`` any other view."""
    return [(i, j) for i in (0, 1) for j in range(num_views) if j != i]


def _check_global_inputs(embeddings: Sequence[Tensor]) -> None:
    _check_view_list(embeddings, "embeddings", ndim=2)
    shapes = {tuple(e.shape) for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"all embeddings must have the same shape (B, D), got {sorted(shapes)}")


@full_precision
def vicregl_global_loss(
    embeddings: Sequence[Tensor],
    inv_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    *,
    gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The global criterion on the expander outputs of all views (official ``global_loss``).

    Args:
        embeddings: V >= 2 tensors ``(B, D)``, the two large views first.
        inv_coeff, var_coeff, cov_coeff, eps: as in :func:`vicreg_loss`.
        gather: optional batch-axis all-gather applied to the stacked ``(B, V, D)`` embeddings.

    Returns:
        ``loss``, ``invariance``, ``variance``, ``covariance``. Invariance is the mean over the ``2 (V - 1)``
        ordered (large view, other view) pairs; variance and covariance are computed for every view on its
        own and averaged over the views. With two views this is ``vicreg_loss(embeddings[0], embeddings[1])``.
    """
    _check_global_inputs(embeddings)
    views = (gather or _identity)(torch.stack(list(embeddings), dim=1))  # (B, V, D): views act as slots
    _check_embedding_batch(views, "embeddings (gathered over processes)")  # the global batch counts
    pairs = _anchor_pairs(views.shape[1])
    invariance = torch.stack([F.mse_loss(views[:, i], views[:, j]) for i, j in pairs]).mean()
    hinge, covariance = _regularisers(_centred_slots(views), eps)
    return _with_total(
        {"invariance": inv_coeff * invariance, "variance": var_coeff * hinge, "covariance": cov_coeff * covariance}
    )


# =================================================================================== cell locations
def _grid_shape(grid_size: int | Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    except (TypeError, IndexError):
        raise ValueError(f"grid_size must be an int h or a pair (h, w), got {grid_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid_size must be positive, got {(h, w)}")
    return h, w


def _check_location_inputs(boxes: Tensor, grid_size: int | Sequence[int], flipped: Tensor | None) -> tuple[int, int]:
    """Validate and return the grid ``(h, w)``."""
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be (..., 4) = (y0, x0, y1, x1), got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating tensor, got {boxes.dtype}; convert with boxes.float()")
    if flipped is not None and flipped.shape != boxes.shape[:-1]:
        raise ValueError(
            f"flipped must have shape boxes.shape[:-1] = {tuple(boxes.shape[:-1])}, got {tuple(flipped.shape)}"
        )
    return _grid_shape(grid_size)


@full_precision
def feature_cell_locations(
    boxes: Tensor, grid_size: int | tuple[int, int], flipped: Tensor | None = None
) -> Tensor:
    """Seed-image position of every cell of a view's feature map (official ``_location_to_NxN_grid``).

    Args:
        boxes: ``(..., 4)`` floating crop boxes ``(y0, x0, y1, x1)`` in the seed image, in the units wanted
            for the result (pixels for matching).
        grid_size: ``h`` (square) or ``(h, w)``: rows and columns of the feature map.
        flipped: bool tensor of shape ``boxes.shape[:-1]`` (horizontally flipped crops mirror the columns),
            or None for no flip.

    Returns:
        ``(..., h * w, 2)`` ``(y, x)`` cell centres, row-major (cell ``(r, c)`` at ``r * w + c``), the dtype of
        ``boxes``: the centre of tile ``(r, c')`` of the box cut into ``h x w`` equal tiles, ``c' = w - 1 - c``
        for a flipped crop.
    """
    h, w = _check_location_inputs(boxes, grid_size, flipped)
    y0, x0, y1, x1 = (coord[..., None] for coord in boxes.unbind(-1))
    rows = torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5
    cols = torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5
    y = y0 + rows * ((y1 - y0) / h)  # (..., h)
    x = x0 + cols * ((x1 - x0) / w)  # (..., w)
    if flipped is not None:
        x = torch.where(flipped.to(torch.bool)[..., None], x.flip(-1), x)
    y, x = torch.broadcast_tensors(y[..., :, None], x[..., None, :])  # (..., h, w)
    return torch.stack([y, x], dim=-1).flatten(-3, -2)


# ========================================================================================= matching
def _resolve_num_matches(num_matches: int | None, num_queries: int, which: str = "") -> int:
    """``num_matches`` checked against the number of query cells; None means all of them."""
    if num_matches is None:
        return num_queries
    try:
        keep = operator.index(num_matches)  # ints (also numpy ints), not floats or bools
    except TypeError:
        keep = None
    if keep is None or isinstance(num_matches, bool) or not 1 <= keep <= num_queries:
        raise ValueError(
            f"num_matches must be an int in [1, {num_queries}] or None for all cells ({num_queries} = number of "
            f"cells of the query view's feature map), got {num_matches!r}{which}; lower it, or use larger crops "
            "or a backbone with a smaller stride"
        )
    return keep


def _check_match_inputs(query: Tensor, candidate: Tensor, names: tuple[str, str]) -> None:
    if query.dim() != 3 or candidate.dim() != 3:
        raise ValueError(
            f"{names[0]} and {names[1]} must be (B, N, C) and (B, M, C), got {tuple(query.shape)} and "
            f"{tuple(candidate.shape)}"
        )
    if query.shape[0] != candidate.shape[0] or query.shape[2] != candidate.shape[2]:
        raise ValueError(
            f"{names[0]} {tuple(query.shape)} and {names[1]} {tuple(candidate.shape)} must have the same batch "
            "size (the same images in the same order) and the same last dimension"
        )


def _select_matches(distances: Tensor, keep: int) -> dict[str, Tensor]:
    """Nearest candidate of every query, then the ``keep`` closest queries, listed in ascending cell order.

    ``distances`` is ``(B, N, M)``; any increasing function of the distance gives the same result. Ties:
    the lowest candidate index wins a nearest-neighbour tie (argmin returns the first minimum) and the
    lower query index wins a top-``keep`` tie (stable sort).
    """
    batch, num_queries, _ = distances.shape
    nearest_distance, nearest = distances.min(dim=2)
    if keep == num_queries:
        query_index = torch.arange(num_queries, device=distances.device).repeat(batch, 1)
    else:
        ranked = torch.sort(nearest_distance, dim=1, stable=True).indices
        query_index = ranked[:, :keep].sort(dim=1).values
    return {"query_index": query_index, "candidate_index": nearest.gather(1, query_index)}


@torch.no_grad()
@full_precision
def match_by_location(
    query_locations: Tensor, candidate_locations: Tensor, num_matches: int | None = None
) -> dict[str, Tensor]:
    """Match every query cell to the candidate cell nearest in the seed image and keep the closest pairs.

    Args:
        query_locations: ``(B, N, 2)`` cell locations of the query view (:func:`feature_cell_locations`).
        candidate_locations: ``(B, M, 2)`` cell locations of another view of the same images.
        num_matches: pairs kept per image, an int in ``[1, N]``, or None for all ``N`` query cells.

    Returns:
        ``query_index`` and ``candidate_index``, ``(B, K)`` long: the kept query cells in ascending order
        and the nearest candidate of each. Euclidean distances (from exact coordinate differences).
    """
    _check_match_inputs(query_locations, candidate_locations, ("query_locations", "candidate_locations"))
    keep = _resolve_num_matches(num_matches, query_locations.shape[1])
    difference = query_locations[:, :, None, :] - candidate_locations[:, None, :, :]
    return _select_matches(difference.pow(2).sum(dim=-1), keep)


@torch.no_grad()
@full_precision
def match_by_features(query: Tensor, candidate: Tensor, num_matches: int | None = None) -> dict[str, Tensor]:
    """Match every query cell to the candidate cell nearest in embedding space and keep the closest pairs.

    Args:
        query: ``(B, N, E)`` local embeddings of the query view.
        candidate: ``(B, M, E)`` local embeddings of another view of the same images.
        num_matches: pairs kept per image, an int in ``[1, N]``, or None for all ``N`` query cells.

    Returns:
        ``query_index`` and ``candidate_index`` as in :func:`match_by_location`, from l2 distances between
        embedding rows. Indices only: no gradient flows through the choice.
    """
    _check_match_inputs(query, candidate, ("query", "candidate"))
    keep = _resolve_num_matches(num_matches, query.shape[1])
    return _select_matches(torch.cdist(query.detach(), candidate.detach()), keep)


# ======================================================================================= local loss
class _ViewStack(NamedTuple):
    """The views with the same number of cells, stacked: ``tensor (B, U, N, C)``; ``slot[view]`` = its u."""

    tensor: Tensor
    slot: dict[int, int]


def _stack_by_cells(tensors: Sequence[Tensor]) -> dict[int, _ViewStack]:
    """Stack ``(B, N_v, C)`` views into one ``_ViewStack`` per distinct cell count ``N``."""
    members: dict[int, list[int]] = {}
    for v, t in enumerate(tensors):
        members.setdefault(t.shape[1], []).append(v)
    return {
        n: _ViewStack(torch.stack([tensors[v] for v in views], dim=1), {v: u for u, v in enumerate(views)})
        for n, views in members.items()
    }


def _views_as_batch(stack: _ViewStack, slots: Tensor) -> Tensor:
    """The views ``slots`` of ``stack`` folded into the batch: ``(B * P, N, C)``, image-major."""
    return stack.tensor.index_select(1, slots).flatten(0, 1)


def _matched_rows(stack: _ViewStack, slots: Tensor, index: Tensor) -> Tensor:
    """Rows ``index (B * P, K)`` of the views ``slots (P,)``, concatenated per image: ``(B, P * K, C)``."""
    batch, _, cells, channels = stack.tensor.shape
    flat_index = index.reshape(batch, len(slots), -1) + (slots * cells)[None, :, None]
    flat_index = flat_index.flatten(1)[..., None].expand(-1, -1, channels)
    return stack.tensor.flatten(1, 2).gather(1, flat_index)


def _cells_of(stacks: dict[int, _ViewStack], view: int) -> int:
    return next(n for n, stack in stacks.items() if view in stack.slot)


def _direction_terms(
    maps: dict[int, _ViewStack],
    keys: dict[int, _ViewStack],
    links: list[tuple[int, int]],
    num_matches: int | None,
    match: Callable[[Tensor, Tensor, int | None], dict[str, Tensor]],
    coeffs: dict[str, float],
    gather: Gather,
) -> dict[str, Tensor]:
    """VICReg terms of one matching kind, averaged over the (query view, candidate view) ``links``.

    Links whose views have the same cell counts are matched in one batched call (matching is per image, so
    the views fold into the batch) and their rows share one VICReg evaluation; the groups are weighted by
    their number of links.
    """
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for q, c in links:
        groups.setdefault((_cells_of(maps, q), _cells_of(maps, c)), []).append((q, c))
    total: dict[str, Tensor] = {}
    for (n_q, n_c), group in groups.items():
        device = maps[n_q].tensor.device
        q_slots = torch.tensor([maps[n_q].slot[q] for q, _ in group], device=device)
        c_slots = torch.tensor([maps[n_c].slot[c] for _, c in group], device=device)
        matched = match(_views_as_batch(keys[n_q], q_slots), _views_as_batch(keys[n_c], c_slots), num_matches)
        rows_q = _matched_rows(maps[n_q], q_slots, matched["query_index"])
        rows_c = _matched_rows(maps[n_c], c_slots, matched["candidate_index"])
        terms = _vicreg_terms(gather(rows_q), gather(rows_c), **coeffs)
        weight = len(group) / len(links)
        for k in _TERMS:
            total[k] = total[k] + weight * terms[k] if k in total else weight * terms[k]
    return total


def _local_terms(
    maps: Sequence[Tensor],
    locations: Sequence[Tensor],
    pairs: list[tuple[int, int]],
    num_matches: tuple[int | None, int | None],
    filter_feature_matches: bool,
    coeffs: dict[str, float],
    gather: Gather | None,
) -> dict[str, Tensor]:
    """The local criterion averaged over the ordered view ``pairs`` ``(a, b)``: every key of the contract."""
    gather = gather or _identity
    map_stacks = _stack_by_cells(maps)
    feature_keys = {n: s._replace(tensor=s.tensor.detach()) for n, s in map_stacks.items()}
    location_keys = _stack_by_cells(locations)
    forward = list(pairs)
    backward = [(b, a) for a, b in pairs]
    feature_gammas = num_matches if filter_feature_matches else (None, None)

    def symmetric(keys, gammas, match) -> dict[str, Tensor]:
        there = _direction_terms(map_stacks, keys, forward, gammas[0], match, coeffs, gather)
        back = _direction_terms(map_stacks, keys, backward, gammas[1], match, coeffs, gather)
        return {k: (there[k] + back[k]) / 2 for k in _TERMS}

    location = symmetric(location_keys, num_matches, match_by_location)
    feature = symmetric(feature_keys, feature_gammas, match_by_features)
    out = {k: location[k] + feature[k] for k in _TERMS}
    out["location_loss"] = location["invariance"] + location["variance"] + location["covariance"]
    out["feature_loss"] = feature["invariance"] + feature["variance"] + feature["covariance"]
    out["loss"] = out["location_loss"] + out["feature_loss"]
    return out


def _check_local_inputs(
    maps: Sequence[Tensor],
    locations: Sequence[Tensor],
    pairs: list[tuple[int, int]],
    num_matches: tuple[int | None, int | None],
    check_batch: bool = True,
) -> None:
    """Shape checks (no values read) before any work: views, locations, numbers of matches.

    ``check_batch=False`` where a gather follows: the batch of 2 the variance needs is the global batch."""
    _check_view_list(maps, "maps", ndim=3)
    if len(locations) != len(maps):
        raise ValueError(f"got {len(maps)} maps but {len(locations)} locations: one of each per view")
    widths = [m.shape[2] for m in maps]
    if len(set(widths)) != 1:
        raise ValueError(f"all maps must have the same embedding width, got {widths}")
    for v, (m, loc) in enumerate(zip(maps, locations)):
        if loc.shape != (*m.shape[:2], 2):
            raise ValueError(
                f"the locations of view {v} must be (B, N, 2) = {(*m.shape[:2], 2)} like its map, "
                f"got {tuple(loc.shape)}"
            )
    if check_batch:
        _check_embedding_batch(maps[0], "maps")
    if not isinstance(num_matches, Sequence) or isinstance(num_matches, str) or len(num_matches) != 2:
        raise ValueError(f"num_matches must be a pair (gamma_1, gamma_2) of ints or None, got {num_matches!r}")
    for a, b in pairs:
        _resolve_num_matches(num_matches[0], maps[a].shape[1], f" for num_matches[0] (view {a} querying view {b})")
        _resolve_num_matches(num_matches[1], maps[b].shape[1], f" for num_matches[1] (view {b} querying view {a})")


@full_precision
def vicregl_local_loss(
    maps_a: Tensor,
    maps_b: Tensor,
    locations_a: Tensor,
    locations_b: Tensor,
    num_matches: tuple[int | None, int | None] = (20, 4),
    filter_feature_matches: bool = False,
    inv_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    *,
    gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The local criterion between two views of the same images (official ``_local_loss``).

    Args:
        maps_a, maps_b: ``(B, N_a, E)`` and ``(B, N_b, E)`` local embeddings per feature-map cell, row-major.
        locations_a, locations_b: ``(B, N_a, 2)`` and ``(B, N_b, 2)`` cell locations in the seed image.
        num_matches: ``(gamma_a, gamma_b)`` pairs kept when ``a`` queries ``b`` and when ``b`` queries ``a``;
            each an int or None (all cells).
        filter_feature_matches: False keeps every query cell in the feature-based matching (official
            default); True filters it with ``num_matches`` like the location-based one.
        inv_coeff, var_coeff, cov_coeff, eps: as in :func:`vicreg_loss`.
        gather: optional batch-axis all-gather applied to the matched rows.

    Returns:
        ``loss``, ``invariance``, ``variance``, ``covariance``, ``location_loss``, ``feature_loss``: for each
        matching kind the two directions are averaged, and the two kinds are summed.
    """
    maps, locations, pairs = [maps_a, maps_b], [locations_a, locations_b], [(0, 1)]
    _check_local_inputs(maps, locations, pairs, num_matches, check_batch=gather is None)
    coeffs = dict(inv_coeff=inv_coeff, var_coeff=var_coeff, cov_coeff=cov_coeff, eps=eps)
    return _local_terms(maps, locations, pairs, tuple(num_matches), filter_feature_matches, coeffs, gather)


# ======================================================================================= full loss
def _check_vicregl_inputs(
    embeddings: Sequence[Tensor] | None, maps: Sequence[Tensor] | None, locations: Sequence[Tensor] | None,
    alpha: float, num_matches: tuple[int | None, int | None], gather: Gather | None,
) -> list[tuple[int, int]]:
    """The checks of :func:`vicregl_loss`; returns the local criterion's view pairs (none when ``alpha == 1``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and embeddings is None:
        raise ValueError(f"embeddings are required when alpha > 0 (alpha={alpha}); pass them or set alpha=0")
    if alpha < 1 and (maps is None or locations is None):
        raise ValueError(f"maps and locations are required when alpha < 1 (alpha={alpha}); pass them or set alpha=1")
    if alpha == 1:
        return []
    pairs = _anchor_pairs(len(maps))
    _check_local_inputs(maps, locations, pairs, num_matches, check_batch=gather is None)
    if alpha > 0 and (len(embeddings) != len(maps) or embeddings[0].shape[0] != maps[0].shape[0]):
        raise ValueError(
            f"embeddings and maps must come from the same views and images: got {len(embeddings)} and "
            f"{len(maps)} views, batch sizes {embeddings[0].shape[0]} and {maps[0].shape[0]}"
        )
    return pairs


@full_precision
def vicregl_loss(
    embeddings: Sequence[Tensor] | None,
    maps: Sequence[Tensor] | None,
    locations: Sequence[Tensor] | None,
    alpha: float = 0.75,
    num_matches: tuple[int | None, int | None] = (20, 4),
    filter_feature_matches: bool = False,
    inv_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    *,
    gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The whole VICRegL criterion with multi-crop (official ``forward``): ``alpha global + (1 - alpha) local``.

    Args:
        embeddings: V tensors ``(B, D)`` (global expander outputs, two large views first); may be None when
            ``alpha == 0``.
        maps: V tensors ``(B, N_v, E)`` (local projector outputs); locations: V tensors ``(B, N_v, 2)``;
            both may be None when ``alpha == 1``.
        alpha: weight of the global criterion, in ``[0, 1]``.
        num_matches, filter_feature_matches, inv_coeff, var_coeff, cov_coeff, eps: as in
            :func:`vicregl_local_loss`.
        gather: optional batch-axis all-gather (see the module docstring).

    Returns:
        ``loss``; with ``alpha > 0`` ``global_loss``, ``global_invariance``, ``global_variance``,
        ``global_covariance``; with ``alpha < 1`` ``local_loss``, ``local_invariance``, ``local_variance``,
        ``local_covariance``, ``location_loss``, ``feature_loss`` (the local criterion averaged over the
        ``2 (V - 1)`` ordered pairs (large view ``i``, other view ``j``); small views are never paired).
    """
    local_pairs = _check_vicregl_inputs(embeddings, maps, locations, alpha, num_matches, gather)
    coeffs = dict(inv_coeff=inv_coeff, var_coeff=var_coeff, cov_coeff=cov_coeff, eps=eps)
    out: dict[str, Tensor] = {}
    parts: list[Tensor] = []
    if alpha > 0:
        global_ = vicregl_global_loss(embeddings, **coeffs, gather=gather)
        out.update({f"global_{k}": global_[k] for k in _TERMS}, global_loss=global_["loss"])
        parts.append(alpha * global_["loss"])
    if alpha < 1:
        local = _local_terms(maps, locations, local_pairs, tuple(num_matches), filter_feature_matches, coeffs, gather)
        out.update({f"local_{k}": local[k] for k in _TERMS}, local_loss=local["loss"])
        out.update(location_loss=local["location_loss"], feature_loss=local["feature_loss"])
        parts.append((1 - alpha) * local["loss"])
    out["loss"] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return out
