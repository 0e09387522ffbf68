"""VICRegL functional core: the VICReg criterion at the global and the local level, with location- and
feature-based matching of feature-map cells (contract: ``shared/parity/vicregl/README.md``).

All functions take the global batch. For DDP, ``vicregl_global_loss``, ``vicregl_local_loss`` and
``vicregl_loss`` accept an optional ``gather`` callable applied to every batch-major tensor right before its
statistics (embeddings, matched rows): pass an autograd all-gather whose backward sums over processes and
each process computes the single-process loss of the global batch while matching stays per process.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


def _identity(x: Tensor) -> Tensor:
    return x


# ------------------------------------------------------------------------------------ VICReg terms
def _check_batch(z: Tensor, name: str) -> None:
    if z.dim() not in (2, 3):
        raise ValueError(f"{name} must be (B, D) or (B, K, D), got shape {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(
            f"{name} has a batch of {z.shape[0]}: the variance term needs at least 2 images in the global "
            "batch; raise the batch size (or the number of processes)"
        )


def _slots(z: Tensor) -> Tensor:
    """``(B, D)`` -> ``(B, 1, D)``; ``(B, K, D)`` unchanged."""
    return z.unsqueeze(1) if z.dim() == 2 else z


def _variance_hinge(centred: Tensor, eps: float) -> Tensor:
    """``mean_{k,d} relu(1 - sqrt(var_b + eps))`` of centred ``(B, K, D)`` embeddings (unbiased var)."""
    var = centred.pow(2).sum(0) / (centred.shape[0] - 1)
    return F.relu(1.0 - torch.sqrt(var + eps)).mean()


def _covariance_offdiag(centred: Tensor) -> Tensor:
    """``mean_k offdiag2(C_k) / D`` of centred ``(B, K, D)`` embeddings, ``C_k`` their covariance.

    ``||C||_F^2 = ||X^T X||_F^2 / (n-1)^2 = ||X X^T||_F^2 / (n-1)^2``: the ``B x B`` Gram matrix is the
    cheaper of the two whenever the batch is narrower than the embedding (8192-wide expanders).
    """
    n, _, dim = centred.shape
    per_slot = centred.transpose(0, 1)  # (K, B, D)
    if n < dim:
        gram = per_slot @ per_slot.transpose(1, 2)
    else:
        gram = per_slot.transpose(1, 2) @ per_slot
    frobenius = gram.pow(2).sum(dim=(1, 2)) / (n - 1) ** 2
    diagonal = (per_slot.pow(2).sum(1) / (n - 1)).pow(2).sum(1)
    return ((frobenius - diagonal) / dim).mean()


def _centred(z: Tensor) -> Tensor:
    return z - z.mean(dim=0, keepdim=True)


def vicreg_loss(
    z_a: Tensor, z_b: Tensor, inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, Tensor]:
    """The VICReg criterion between paired embeddings ``(B, D)`` or per-slot pairs ``(B, K, D)``.

    Variance and covariance are computed over the batch separately for every slot and averaged over the
    slots; the two branches are averaged. Returns ``loss``, ``invariance``, ``variance``, ``covariance``
    (each already multiplied by its coefficient).
    """
    _check_batch(z_a, "z_a")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    a, b = _centred(_slots(z_a)), _centred(_slots(z_b))
    invariance = inv_coeff * F.mse_loss(z_a, z_b)
    variance = var_coeff * (_variance_hinge(a, eps) + _variance_hinge(b, eps)) / 2
    covariance = cov_coeff * (_covariance_offdiag(a) + _covariance_offdiag(b)) / 2
    return {
        "loss": invariance + variance + covariance,
        "invariance": invariance,
        "variance": variance,
        "covariance": covariance,
    }


def _check_views(tensors: Sequence[Tensor], name: str) -> None:
    if len(tensors) < 2:
        raise ValueError(f"{name} needs at least 2 views (the two large views first), got {len(tensors)}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"all views of {name} must have the same batch size, got {[t.shape[0] for t in tensors]}")


def _anchor_pairs(num_views: int) -> list[tuple[int, int]]:
    """The ``2 (V - 1)`` ordered pairs ``(i, j)``: ``i`` a large view (0 or 1), ``j`` any other view."""
    return [(i, j) for i in (0, 1) for j in range(num_views) if j != i]


def vicregl_global_loss(
    embeddings: Sequence[Tensor], inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0,
    eps: float = 1e-4, *, gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The global criterion over the expander outputs of V views (two large views first).

    Invariance is averaged over the ``2 (V - 1)`` (large, other) ordered pairs; variance and covariance are
    computed for every view on its own and averaged over the views.
    """
    _check_views(embeddings, "embeddings")
    gather = gather or _identity
    views = [gather(e) for e in embeddings]
    _check_batch(views[0], "embeddings")
    pairs = _anchor_pairs(len(views))
    invariance = inv_coeff * torch.stack([F.mse_loss(views[i], views[j]) for i, j in pairs]).mean()
    centred = [_centred(_slots(v)) for v in views]
    variance = var_coeff * torch.stack([_variance_hinge(c, eps) for c in centred]).mean()
    covariance = cov_coeff * torch.stack([_covariance_offdiag(c) for c in centred]).mean()
    return {
        "loss": invariance + variance + covariance,
        "invariance": invariance,
        "variance": variance,
        "covariance": covariance,
    }


# --------------------------------------------------------------------------------- cell locations
def feature_cell_locations(
    boxes: Tensor, grid_size: int | tuple[int, int], flipped: Tensor | None = None
) -> Tensor:
    """Seed-image ``(y, x)`` of every cell of a crop's ``h x w`` feature map, row-major: ``(..., h*w, 2)``.

    Cell ``(r, c)`` sits at the centre of tile ``(r, c')`` of the box cut into ``h x w`` equal tiles, with
    ``c' = w - 1 - c`` for a horizontally flipped crop. ``boxes`` are ``(..., 4)`` ``(y0, x0, y1, x1)`` in
    the units wanted (pixels for matching); ``flipped`` is bool of shape ``boxes.shape[:-1]`` or None.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end with 4 coordinates (y0, x0, y1, x1), got shape {tuple(boxes.shape)}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if h < 1 or w < 1:
        raise ValueError(f"grid_size must be positive, got {(h, w)}")
    y0, x0, y1, x1 = boxes.unbind(-1)
    rows = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h
    cols = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w
    cols = cols.expand(*boxes.shape[:-1], w)
    if flipped is not None:
        if flipped.shape != boxes.shape[:-1]:
            raise ValueError(f"flipped must have shape {tuple(boxes.shape[:-1])}, got {tuple(flipped.shape)}")
        cols = torch.where(flipped[..., None], cols.flip(-1), cols)
    y = y0[..., None] + rows * (y1 - y0)[..., None]  # (..., h)
    x = x0[..., None] + cols * (x1 - x0)[..., None]  # (..., w)
    y = y[..., :, None].expand(*y.shape, w)
    x = x[..., None, :].expand(*x.shape[:-1], h, w)
    return torch.stack([y, x], dim=-1).flatten(-3, -2)


# -------------------------------------------------------------------------------------- matching
def _check_num_matches(num_matches: int | None, num_queries: int) -> int:
    if num_matches is None:
        return num_queries
    if isinstance(num_matches, bool) or not isinstance(num_matches, int) or not 1 <= num_matches <= num_queries:
        raise ValueError(
            f"num_matches must be an int in [1, {num_queries}] (the query view has {num_queries} feature "
            f"cells) or None for all of them, got {num_matches!r}: lower num_matches or use larger crops"
        )
    return num_matches


def _top_matches(distances: Tensor, num_matches: int | None) -> dict[str, Tensor]:
    """Nearest candidate of every query, keep the ``num_matches`` closest queries in raster order.

    Ties: the lowest candidate index wins a nearest-neighbour tie (argmin returns the first), and the
    lower query index wins a top-gamma tie (stable sort).
    """
    batch, num_queries, _ = distances.shape
    keep = _check_num_matches(num_matches, num_queries)
    nearest_distance, nearest = distances.min(dim=2)
    if keep == num_queries:
        query_index = torch.arange(num_queries, device=distances.device).expand(batch, num_queries)
    else:
        order = torch.sort(nearest_distance, dim=1, stable=True).indices[:, :keep]
        query_index = torch.sort(order, dim=1).values
    return {"query_index": query_index, "candidate_index": nearest.gather(1, query_index)}


def _check_pairable(query: Tensor, candidate: Tensor, name: str) -> None:
    if query.dim() != 3 or candidate.dim() != 3 or query.shape[0] != candidate.shape[0] or query.shape[2] != candidate.shape[2]:
        raise ValueError(
            f"{name}: query and candidate must be (B, N, C) and (B, M, C) with the same B and C, got "
            f"{tuple(query.shape)} and {tuple(candidate.shape)}"
        )


@torch.no_grad()
def match_by_location(
    query_locations: Tensor, candidate_locations: Tensor, num_matches: int | None = None
) -> dict[str, Tensor]:
    """Match every query cell to the candidate cell nearest in the seed image; keep the closest pairs.

    Distances are exact Euclidean distances between locations ``(B, N, 2)`` and ``(B, M, 2)``. Returns
    ``query_index`` and ``candidate_index``, both ``(B, K)`` long, queries in ascending cell order.
    """
    _check_pairable(query_locations, candidate_locations, "match_by_location")
    diff = query_locations[:, :, None, :] - candidate_locations[:, None, :, :]
    return _top_matches(diff.pow(2).sum(-1), num_matches)


@torch.no_grad()
def match_by_features(query: Tensor, candidate: Tensor, num_matches: int | None = None) -> dict[str, Tensor]:
    """Match every query cell to the candidate cell nearest in embedding space (l2); keep the closest pairs.

    ``query (B, N, E)``, ``candidate (B, M, E)``; no gradient flows through the choice.
    """
    _check_pairable(query, candidate, "match_by_features")
    return _top_matches(torch.cdist(query.detach(), candidate.detach()), num_matches)


def _rows(maps: Tensor, index: Tensor) -> Tensor:
    """``maps[b, index[b, k]]`` -> ``(B, K, E)``, differentiable w.r.t. ``maps``."""
    return maps.gather(1, index[..., None].expand(-1, -1, maps.shape[-1]))


# ------------------------------------------------------------------------------------ local loss
_TERMS = ("invariance", "variance", "covariance")


def _matched_vicreg(
    maps_q: Tensor, maps_c: Tensor, match: dict[str, Tensor], coeffs: dict, gather: Gather
) -> dict[str, Tensor]:
    return vicreg_loss(gather(_rows(maps_q, match["query_index"])), gather(_rows(maps_c, match["candidate_index"])), **coeffs)


def _symmetric_terms(forward: dict[str, Tensor], backward: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (forward[k] + backward[k]) / 2 for k in _TERMS}


def vicregl_local_loss(
    maps_a: Tensor, maps_b: Tensor, locations_a: Tensor, locations_b: Tensor,
    num_matches: tuple[int | None, int | None] = (20, 4), filter_feature_matches: bool = False,
    inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
    *, gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The local criterion between two views of the same images (location + feature matching).

    For each matching kind and each direction, the matched rows go through :func:`vicreg_loss`; the two
    directions are averaged and the two kinds summed. Returns ``loss``, ``invariance``, ``variance``,
    ``covariance``, ``location_loss``, ``feature_loss``.
    """
    _check_pairable(maps_a, maps_b, "vicregl_local_loss maps")
    if locations_a.shape[:2] != maps_a.shape[:2] or locations_b.shape[:2] != maps_b.shape[:2]:
        raise ValueError("locations must be (B, N, 2) with the same B and N as their maps")
    gather = gather or _identity
    coeffs = dict(inv_coeff=inv_coeff, var_coeff=var_coeff, cov_coeff=cov_coeff, eps=eps)
    gamma_a, gamma_b = num_matches
    feature_gammas = (gamma_a, gamma_b) if filter_feature_matches else (None, None)

    location = _symmetric_terms(
        _matched_vicreg(maps_a, maps_b, match_by_location(locations_a, locations_b, gamma_a), coeffs, gather),
        _matched_vicreg(maps_b, maps_a, match_by_location(locations_b, locations_a, gamma_b), coeffs, gather),
    )
    feature = _symmetric_terms(
        _matched_vicreg(maps_a, maps_b, match_by_features(maps_a, maps_b, feature_gammas[0]), coeffs, gather),
        _matched_vicreg(maps_b, maps_a, match_by_features(maps_b, maps_a, feature_gammas[1]), coeffs, gather),
    )
    out = {k: location[k] + feature[k] for k in _TERMS}
    out["location_loss"] = sum(location[k] for k in _TERMS)
    out["feature_loss"] = sum(feature[k] for k in _TERMS)
    out["loss"] = out["location_loss"] + out["feature_loss"]
    return out


# ------------------------------------------------------------------------------------ full loss
def vicregl_loss(
    embeddings: Sequence[Tensor] | None, maps: Sequence[Tensor] | None, locations: Sequence[Tensor] | None,
    alpha: float = 0.75, num_matches: tuple[int | None, int | None] = (20, 4),
    filter_feature_matches: bool = False, inv_coeff: float = 25.0, var_coeff: float = 25.0,
    cov_coeff: float = 1.0, eps: float = 1e-4, *, gather: Gather | None = None,
) -> dict[str, Tensor]:
    """The whole VICRegL criterion with multi-crop: ``alpha * global + (1 - alpha) * local``.

    The local part averages :func:`vicregl_local_loss` over the ``2 (V - 1)`` ordered pairs (large view
    ``i``, other view ``j``); small views are never paired with each other.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    coeffs = dict(inv_coeff=inv_coeff, var_coeff=var_coeff, cov_coeff=cov_coeff, eps=eps)
    out: dict[str, Tensor] = {}
    loss = 0.0
    if alpha > 0:
        if embeddings is None:
            raise ValueError("embeddings are needed when alpha > 0")
        global_ = vicregl_global_loss(embeddings, **coeffs, gather=gather)
        out.update({f"global_{k}": global_[k] for k in _TERMS}, global_loss=global_["loss"])
        loss = loss + alpha * global_["loss"]
    if alpha < 1:
        if maps is None or locations is None:
            raise ValueError("maps and locations are needed when alpha < 1")
        _check_views(maps, "maps")
        if len(locations) != len(maps):
            raise ValueError(f"got {len(maps)} maps but {len(locations)} locations")
        pairs = [
            vicregl_local_loss(maps[i], maps[j], locations[i], locations[j], num_matches, filter_feature_matches,
                               **coeffs, gather=gather)
            for i, j in _anchor_pairs(len(maps))
        ]
        local = {k: torch.stack([p[k] for p in pairs]).mean() for k in pairs[0]}
        out.update({f"local_{k}": local[k] for k in _TERMS}, local_loss=local["loss"],
                   location_loss=local["location_loss"], feature_loss=local["feature_loss"])
        loss = loss + (1 - alpha) * local["loss"]
    out["loss"] = loss
    return out
