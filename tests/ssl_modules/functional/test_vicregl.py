"""Unit tests of the VICRegL functional core (the reference vectors run in test_parity_vectors.py).

The loop references below follow the formulas of docs/vicregl.md and the official code literally, one image and
one slot at a time, in float64.
"""
from __future__ import annotations

import pytest
import torch

import ssl_modules.functional as F

TERMS = ("invariance", "variance", "covariance")
COEFFS = dict(inv_coeff=20.0, var_coeff=30.0, cov_coeff=0.5, eps=1e-4)


# ---------------------------------------------------------------------------------- loop references
def ref_vicreg(x, y, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    x, y = (t.unsqueeze(1) if t.dim() == 2 else t for t in (x, y))
    n, slots, dim = x.shape
    hinges, covs = [], []
    for z in (x, y):
        for k in range(slots):
            zc = z[:, k] - z[:, k].mean(0)
            std = torch.sqrt(zc.pow(2).sum(0) / (n - 1) + eps)
            hinges.append(torch.relu(1 - std).mean())
            c = zc.T @ zc / (n - 1)
            covs.append(sum(c[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j) / dim)
    return {
        "invariance": inv_coeff * ((x - y) ** 2).mean(),
        "variance": var_coeff * torch.stack(hinges).mean(),  # mean over both branches and all slots
        "covariance": cov_coeff * torch.stack(covs).mean(),
    }


def ref_match_one(query, candidate, keep):
    """One image: nearest candidate per query (lowest index on ties), keep closest (lowest index on ties)."""
    dist = [[float(torch.dist(q, c)) for c in candidate] for q in query]
    nearest = [min(range(len(row)), key=lambda m: (row[m], m)) for row in dist]
    keep = len(query) if keep is None else keep
    kept = sorted(sorted(range(len(query)), key=lambda n: (dist[n][nearest[n]], n))[:keep])
    return kept, [nearest[n] for n in kept]


def ref_match(query, candidate, keep):
    pairs = [ref_match_one(q, c, keep) for q, c in zip(query, candidate)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def ref_local(maps_a, maps_b, loc_a, loc_b, num_matches, filter_feature_matches, coeffs):
    def direction(m_q, m_c, k_q, k_c, keep):
        xs, ys = [], []
        for b in range(m_q.shape[0]):
            qi, ci = ref_match_one(k_q[b], k_c[b], keep)
            xs.append(m_q[b, qi])
            ys.append(m_c[b, ci])
        return ref_vicreg(torch.stack(xs), torch.stack(ys), **coeffs)

    def symmetric(k_a, k_b, gammas):
        there = direction(maps_a, maps_b, k_a, k_b, gammas[0])
        back = direction(maps_b, maps_a, k_b, k_a, gammas[1])
        return {t: (there[t] + back[t]) / 2 for t in TERMS}

    location = symmetric(loc_a, loc_b, num_matches)
    feature = symmetric(maps_a, maps_b, num_matches if filter_feature_matches else (None, None))
    out = {t: location[t] + feature[t] for t in TERMS}
    out["location_loss"] = sum(location.values())
    out["feature_loss"] = sum(feature.values())
    out["loss"] = out["location_loss"] + out["feature_loss"]
    return out


def ref_global(embeddings, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    v = len(embeddings)
    pairs = [(i, j) for i in (0, 1) for j in range(v) if j != i]
    per_view = [ref_vicreg(e, e, 0.0, var_coeff, cov_coeff, eps) for e in embeddings]  # both branches equal
    return {
        "invariance": inv_coeff * sum(((embeddings[i] - embeddings[j]) ** 2).mean() for i, j in pairs) / len(pairs),
        "variance": sum(p["variance"] for p in per_view) / v,
        "covariance": sum(p["covariance"] for p in per_view) / v,
    }


# ------------------------------------------------------------------------------------------ inputs
def crop_views(grids, batch=5, dim=6, seed=0, dtype=torch.float64, flips=False, jitter=False):
    """Local embeddings and pixel cell locations of random crops of 60 x 80 seed images.

    Integer boxes (as the official sampler draws them) give exact distance ties; ``jitter`` avoids them.
    """
    g = torch.Generator().manual_seed(seed)
    maps, locations = [], []
    for grid in grids:
        top_left = torch.randint(0, 30, (batch, 2), generator=g)
        size = torch.randint(10, 31, (batch, 2), generator=g)
        boxes = torch.cat([top_left, top_left + size], dim=1).to(dtype)
        if jitter:
            boxes = boxes + torch.rand(batch, 4, generator=g, dtype=dtype)
        flipped = torch.rand(batch, generator=g) < 0.5 if flips else None
        locations.append(F.feature_cell_locations(boxes, grid, flipped))
        cells = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
        maps.append(torch.randn(batch, cells, dim, generator=g, dtype=dtype))
    return maps, locations


def assert_terms_close(got, want, keys, **tol):
    for key in keys:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


# ------------------------------------------------------------------------------------------ VICReg
def test_vicreg_loss_per_slot_equals_the_loop_reference():
    x, y = torch.randn(7, 3, 5, dtype=torch.float64), torch.randn(7, 3, 5, dtype=torch.float64)
    out = F.vicreg_loss(x, y, **COEFFS)
    assert_terms_close(out, ref_vicreg(x, y, **COEFFS), TERMS)
    torch.testing.assert_close(out["loss"], out["invariance"] + out["variance"] + out["covariance"])


@pytest.mark.parametrize("batch, dim", [(4, 9), (12, 3)], ids=["batch<dim", "batch>dim"])
def test_vicreg_covariance_is_exact_for_narrow_and_wide_embeddings(batch, dim):
    x, y = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    assert_terms_close(F.vicreg_loss(x, y), ref_vicreg(x, y), TERMS)


def test_vicreg_pair_is_the_one_slot_case():
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert_terms_close(F.vicreg_loss(x, y), F.vicreg_loss(x[:, None], y[:, None]), ("loss", *TERMS))


# ------------------------------------------------------------------------------------------ global
def test_global_loss_with_two_views_is_vicreg_loss():
    a, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    assert_terms_close(F.vicregl_global_loss([a, b], **COEFFS), F.vicreg_loss(a, b, **COEFFS), ("loss", *TERMS))


def test_global_loss_with_small_views_equals_the_loop_reference():
    views = [torch.randn(6, 5, dtype=torch.float64) * s for s in (0.5, 1.0, 2.0, 0.8)]
    assert_terms_close(F.vicregl_global_loss(views, **COEFFS), ref_global(views, **COEFFS), TERMS)


# ----------------------------------------------------------------------------------- cell locations
def test_cell_locations_of_an_unflipped_crop_by_hand():
    box = torch.tensor([10.0, 20.0, 50.0, 80.0])  # 40 x 60 px: tiles of 20 x 20 for a 2 x 3 grid
    expected = torch.tensor([[20.0, 30.0], [20.0, 50.0], [20.0, 70.0], [40.0, 30.0], [40.0, 50.0], [40.0, 70.0]])
    torch.testing.assert_close(F.feature_cell_locations(box, (2, 3)), expected)


def test_cell_locations_of_a_flipped_crop_mirror_the_columns():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0]] * 2)
    got = F.feature_cell_locations(boxes, (2, 3), torch.tensor([False, True]))
    expected = torch.tensor([[20.0, 70.0], [20.0, 50.0], [20.0, 30.0], [40.0, 70.0], [40.0, 50.0], [40.0, 30.0]])
    torch.testing.assert_close(got[1], expected)
    torch.testing.assert_close(got[0], F.feature_cell_locations(boxes[0], (2, 3)))


def test_cell_locations_keep_leading_dims_dtype_and_square_grid_shorthand():
    boxes = torch.tensor([[0.0, 0.0, 6.0, 9.0], [3.0, 3.0, 9.0, 6.0]], dtype=torch.float64).expand(4, 2, 4)
    flipped = torch.tensor([[True, False]] * 4)
    got = F.feature_cell_locations(boxes, 3, flipped)
    assert got.shape == (4, 2, 9, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got[:, 1], F.feature_cell_locations(boxes[:, 1], (3, 3)))
    assert torch.equal(F.feature_cell_locations(boxes, 3, torch.zeros(4, 2, dtype=torch.bool)),
                       F.feature_cell_locations(boxes, 3))


# ----------------------------------------------------------------------------------------- matching
def test_location_matching_equals_the_loop_reference_with_exact_ties():
    g = torch.Generator().manual_seed(1)
    # a coarse lattice gives many exact ties; 64 queries, as torch's unstable sort reorders ties from 64 on
    query = torch.randint(0, 4, (2, 64, 2), generator=g).double()
    candidate = torch.randint(0, 4, (2, 4, 2), generator=g).double()
    out = F.match_by_location(query, candidate, 20)
    q_ref, c_ref = ref_match(query, candidate, 20)
    assert torch.equal(out["query_index"], q_ref) and torch.equal(out["candidate_index"], c_ref)


def test_kept_query_cells_are_in_ascending_order():
    out = F.match_by_features(torch.randn(4, 16, 3), torch.randn(4, 9, 3), 7)
    assert out["query_index"].dtype == torch.long and out["query_index"].shape == (4, 7)
    assert (out["query_index"].diff(dim=1) > 0).all()


def test_nearest_neighbour_tie_goes_to_the_lowest_candidate():
    query = torch.tensor([[[0.0, 0.0]]])
    candidate = torch.tensor([[[5.0, 5.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])
    assert F.match_by_location(query, candidate)["candidate_index"].tolist() == [[1]]


def test_top_gamma_tie_goes_to_the_lowest_query():
    query = torch.tensor([[[0.0, 3.0], [0.0, 1.0], [0.0, -1.0], [0.0, 2.0]]])  # distances 3, 1, 1, 2
    candidate = torch.tensor([[[0.0, 0.0]]])
    assert F.match_by_location(query, candidate, 1)["query_index"].tolist() == [[1]]
    assert F.match_by_location(query, candidate, 3)["query_index"].tolist() == [[1, 2, 3]]


def test_feature_matching_equals_the_loop_reference():
    query, candidate = torch.randn(3, 8, 5, dtype=torch.float64), torch.randn(3, 6, 5, dtype=torch.float64)
    for keep in (None, 3):
        out = F.match_by_features(query, candidate, keep)
        q_ref, c_ref = ref_match(query, candidate, keep)
        assert torch.equal(out["query_index"], q_ref) and torch.equal(out["candidate_index"], c_ref)


# --------------------------------------------------------------------------------------- local loss
@pytest.mark.parametrize(
    "grids, num_matches, filter_feature_matches",
    [((3, 3), (4, 2), False), ((3, 2), (5, 3), True), ((2, (2, 3)), (None, None), False)],
    ids=["same-grid", "large-small-filtered", "all-cells"],
)
def test_local_loss_equals_the_loop_reference(grids, num_matches, filter_feature_matches):
    maps, locations = crop_views(grids, flips=True)
    got = F.vicregl_local_loss(*maps, *locations, num_matches, filter_feature_matches, **COEFFS)
    want = ref_local(*maps, *locations, num_matches, filter_feature_matches, COEFFS)
    assert_terms_close(got, want, ("loss", *TERMS, "location_loss", "feature_loss"))


def test_multicrop_loss_equals_the_loop_reference():
    maps, locations = crop_views([3, 3, 2, 2, 2], batch=4)
    embeddings = [torch.randn(4, 5, dtype=torch.float64) for _ in range(5)]
    got = F.vicregl_loss(embeddings, maps, locations, alpha=0.6, num_matches=(5, 3), **COEFFS)
    pairs = [(i, j) for i in (0, 1) for j in range(5) if j != i]
    per_pair = [ref_local(maps[i], maps[j], locations[i], locations[j], (5, 3), False, COEFFS) for i, j in pairs]
    local = {k: sum(p[k] for p in per_pair) / len(pairs) for k in per_pair[0]}
    global_ = ref_global(embeddings, **COEFFS)
    want = {f"local_{k}": local[k] for k in TERMS} | {f"global_{k}": global_[k] for k in TERMS}
    want |= {"location_loss": local["location_loss"], "feature_loss": local["feature_loss"]}
    want["loss"] = 0.6 * sum(global_.values()) + 0.4 * local["loss"]
    assert_terms_close(got, want, want.keys())


def test_multicrop_local_part_is_the_mean_of_pair_losses():
    maps, locations = crop_views([3, 3, 2, (1, 2), 2], batch=4)
    got = F.vicregl_loss(None, maps, locations, alpha=0.0, num_matches=(2, 1), filter_feature_matches=True)
    pairs = [(i, j) for i in (0, 1) for j in range(5) if j != i]
    per_pair = [F.vicregl_local_loss(maps[i], maps[j], locations[i], locations[j], (2, 1), True) for i, j in pairs]
    for key in ("invariance", "variance", "covariance"):
        torch.testing.assert_close(got[f"local_{key}"], torch.stack([p[key] for p in per_pair]).mean())
    torch.testing.assert_close(got["loss"], torch.stack([p["loss"] for p in per_pair]).mean())


def test_gradients_reach_both_members_of_every_matched_pair_and_nothing_else():
    maps, locations = crop_views([3, 2], batch=4)
    maps = [m.requires_grad_() for m in maps]
    F.vicregl_local_loss(*maps, *locations, (1, 1), filter_feature_matches=True)["loss"].backward()
    used = [torch.zeros(m.shape[:2], dtype=torch.bool) for m in maps]
    for match, keys in ((F.match_by_location, locations), (F.match_by_features, [m.detach() for m in maps])):
        for q, c in ((0, 1), (1, 0)):
            out = match(keys[q], keys[c], 1)
            used[q].scatter_(1, out["query_index"], True)
            used[c].scatter_(1, out["candidate_index"], True)
    for m, rows in zip(maps, used):
        assert torch.equal(m.grad.abs().sum(-1) > 0, rows)


def test_float32_agrees_with_float64():
    maps, locations = crop_views([3, 3, 2], batch=6, dim=8, jitter=True)  # no near-ties to flip
    embeddings = [torch.randn(6, 7, dtype=torch.float64) for _ in range(3)]
    ref = F.vicregl_loss(embeddings, maps, locations, num_matches=(4, 2))
    single = F.vicregl_loss(*([t.float() for t in ts] for ts in (embeddings, maps, locations)), num_matches=(4, 2))
    assert single["loss"].dtype == torch.float32
    for key in ref:
        torch.testing.assert_close(single[key].double(), ref[key], rtol=1e-5, atol=1e-6)


def test_inputs_are_not_modified():
    maps, locations = crop_views([3, 2, 2], batch=4)
    embeddings = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    inputs = [t.requires_grad_() for t in (*embeddings, *maps)] + locations
    before = [t.detach().clone() for t in inputs]
    F.vicregl_loss(embeddings, maps, locations, num_matches=(3, 2))["loss"].backward()
    assert all(torch.equal(t.detach(), b) for t, b in zip(inputs, before))


def test_alpha_one_and_zero_need_only_their_own_inputs():
    maps, locations = crop_views([2, 2], batch=4)
    embeddings = [torch.randn(4, 5) for _ in range(2)]
    only_global = F.vicregl_loss(embeddings, None, None, alpha=1.0)
    only_local = F.vicregl_loss(None, maps, locations, alpha=0.0, num_matches=(2, 2))
    assert "local_loss" not in only_global and "global_loss" not in only_local
    torch.testing.assert_close(only_global["loss"], F.vicregl_global_loss(embeddings)["loss"])
    torch.testing.assert_close(only_local["loss"], F.vicregl_local_loss(*maps, *locations, (2, 2))["loss"])


def test_gather_hook_gives_each_process_the_global_batch_loss():
    """Two simulated processes: the gathered loss of process 0 equals the loss of the whole batch."""
    maps, locations = crop_views([3, 3, 2], batch=6)
    embeddings = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    halves = [[[t[s] for t in ts] for ts in (embeddings, maps, locations)] for s in (slice(0, 3), slice(3, 6))]
    theirs = []
    F.vicregl_loss(*halves[1], num_matches=(4, 2), gather=lambda t: theirs.append(t) or t)
    mine = F.vicregl_loss(*halves[0], num_matches=(4, 2), gather=lambda t: torch.cat([t, theirs.pop(0)]))
    whole = F.vicregl_loss(embeddings, maps, locations, num_matches=(4, 2))
    assert not theirs
    assert_terms_close(mine, whole, whole.keys())


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("gamma", [0, 10, 2.5, True])
def test_impossible_numbers_of_matches_are_rejected(gamma):
    with pytest.raises(ValueError, match=r"num_matches must be an int in \[1, 9\] or None for all cells \(9 = "):
        F.match_by_location(torch.randn(2, 9, 2), torch.randn(2, 4, 2), gamma)


def test_local_loss_names_the_gamma_that_does_not_fit_the_grid():
    maps, locations = crop_views([3, 2])
    with pytest.raises(ValueError, match=r"in \[1, 4\].*got 5 for num_matches\[1\] \(view 1 querying view 0\)"):
        F.vicregl_local_loss(*maps, *locations, (5, 5))
    with pytest.raises(ValueError, match="must be a pair"):
        F.vicregl_local_loss(*maps, *locations, 4)


def test_a_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="global batch .* must be >= 2"):
        F.vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))
    maps, locations = crop_views([2, 2], batch=1)
    with pytest.raises(ValueError, match="global batch .* must be >= 2"):
        F.vicregl_loss([torch.randn(1, 3)] * 2, maps, locations, num_matches=(2, 2))


def test_fewer_than_two_views_are_rejected():
    with pytest.raises(ValueError, match="at least 2 views"):
        F.vicregl_global_loss([torch.randn(4, 3)])
    maps, locations = crop_views([2])
    with pytest.raises(ValueError, match="at least 2 views"):
        F.vicregl_loss(None, maps, locations, alpha=0.0)


def test_views_with_different_batch_sizes_are_rejected():
    with pytest.raises(ValueError, match="same batch size"):
        F.vicregl_global_loss([torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="same batch size"):
        F.match_by_features(torch.randn(4, 9, 3), torch.randn(5, 9, 3))
    maps, locations = crop_views([2, 2])
    with pytest.raises(ValueError, match="same batch size"):
        F.vicregl_local_loss(maps[0], maps[1][:3], locations[0], locations[1][:3], (2, 2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.vicreg_loss(torch.randn(4, 3), torch.randn(4, 5)),
        lambda: F.vicreg_loss(torch.randn(4), torch.randn(4)),
        lambda: F.feature_cell_locations(torch.rand(2, 3), 3),
        lambda: F.feature_cell_locations(torch.rand(2, 4), 3, torch.zeros(3, dtype=torch.bool)),
        lambda: F.feature_cell_locations(torch.rand(2, 4), 0),
        lambda: F.match_by_location(torch.randn(2, 9), torch.randn(2, 4, 2)),
        lambda: F.vicregl_local_loss(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 9, 2),
                                     torch.randn(3, 4, 2), (2, 2)),
        lambda: F.vicregl_loss([torch.randn(4, 3)] * 2, None, None, alpha=1.5),
        lambda: F.vicregl_loss(None, None, None, alpha=0.5),
    ],
    ids=["z-shapes", "z-1d", "boxes", "flipped", "grid", "locations-2d", "locations-vs-maps", "alpha", "missing"],
)
def test_wrong_shapes_and_arguments_are_rejected(call):
    with pytest.raises(ValueError):
        call()
