import itertools

import pytest
import torch

import ssl_modules.functional as F


def _loop_vicreg(x, y, inv=25.0, var=25.0, cov=1.0, eps=1e-4):
    """Plain per-slot reference of the VICReg criterion (float64 loops)."""
    x, y = (t.unsqueeze(1) if t.dim() == 2 else t for t in (x, y))
    n, k, d = x.shape
    invariance = ((x - y) ** 2).mean()
    variances, covariances = [], []
    for z in (x, y):
        v_terms, c_terms = [], []
        for slot in range(k):
            zc = z[:, slot] - z[:, slot].mean(0)
            std = torch.sqrt(zc.pow(2).sum(0) / (n - 1) + eps)
            v_terms.append(torch.relu(1 - std).mean())
            c = zc.T @ zc / (n - 1)
            c_terms.append((c.pow(2).sum() - c.diagonal().pow(2).sum()) / d)
        variances.append(torch.stack(v_terms).mean())
        covariances.append(torch.stack(c_terms).mean())
    return inv * invariance + var * sum(variances) / 2 + cov * sum(covariances) / 2


def _loop_matches(query, candidate, keep):
    """Loop reference of top-gamma nearest-neighbour matching with the documented tie rule."""
    q_idx, c_idx = [], []
    for b in range(query.shape[0]):
        dist = [[float(((query[b, n] - candidate[b, m]) ** 2).sum()) for m in range(candidate.shape[1])] for n in range(query.shape[1])]
        nearest = [min(range(len(row)), key=lambda m: (row[m], m)) for row in dist]
        best = sorted(range(len(dist)), key=lambda n: (dist[n][nearest[n]], n))[:keep]
        kept = sorted(best)
        q_idx.append(kept)
        c_idx.append([nearest[n] for n in kept])
    return torch.tensor(q_idx), torch.tensor(c_idx)


def test_vicreg_loss_per_slot_matches_a_loop_reference():
    torch.manual_seed(0)
    x, y = torch.randn(7, 3, 10, dtype=torch.float64), torch.randn(7, 3, 10, dtype=torch.float64)
    out = F.vicreg_loss(x, y)
    torch.testing.assert_close(out["loss"], _loop_vicreg(x, y))
    torch.testing.assert_close(out["loss"], out["invariance"] + out["variance"] + out["covariance"])


def test_covariance_term_is_the_same_for_wide_and_narrow_embeddings():
    torch.manual_seed(0)
    wide = torch.randn(5, 40, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)  # B < D: Gram path
    narrow = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)  # B > D
    for x, y in (wide, narrow):
        torch.testing.assert_close(F.vicreg_loss(x, y)["loss"], _loop_vicreg(x, y))


def test_global_loss_with_two_views_is_vicreg():
    torch.manual_seed(0)
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    g, v = F.vicregl_global_loss([a, b]), F.vicreg_loss(a, b)
    for key in ("loss", "invariance", "variance", "covariance"):
        torch.testing.assert_close(g[key], v[key])


def test_cell_locations_of_an_unflipped_and_a_flipped_crop():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [10.0, 20.0, 50.0, 80.0]])
    flipped = torch.tensor([False, True])
    loc = F.feature_cell_locations(boxes, (2, 3), flipped)
    # tiles of 20 x 20 px: centres y in {20, 40}, x in {30, 50, 70}
    expected = torch.tensor([[20, 30], [20, 50], [20, 70], [40, 30], [40, 50], [40, 70]], dtype=torch.float32)
    torch.testing.assert_close(loc[0], expected)
    torch.testing.assert_close(loc[1], expected.reshape(2, 3, 2).flip(1).reshape(6, 2))


def test_matching_equals_a_loop_reference_with_ties():
    torch.manual_seed(0)
    # integer locations on a coarse lattice: many exact ties
    q = torch.randint(0, 4, (3, 9, 2)).double()
    c = torch.randint(0, 4, (3, 4, 2)).double()
    out = F.match_by_location(q, c, 5)
    q_ref, c_ref = _loop_matches(q, c, 5)
    assert torch.equal(out["query_index"], q_ref) and torch.equal(out["candidate_index"], c_ref)
    assert (out["query_index"].diff(dim=1) > 0).all()  # raster order


def test_all_matches_keep_every_query_cell_in_order():
    q, c = torch.randn(2, 6, 4), torch.randn(2, 5, 4)
    out = F.match_by_features(q, c, None)
    assert torch.equal(out["query_index"], torch.arange(6).expand(2, 6))


def test_gradients_reach_both_members_of_matched_pairs():
    torch.manual_seed(0)
    maps_a = torch.randn(4, 9, 5, requires_grad=True)
    maps_b = torch.randn(4, 4, 5, requires_grad=True)
    loc_a = F.feature_cell_locations(torch.tensor([0.0, 0.0, 30.0, 30.0]).expand(4, 4), 3)
    loc_b = F.feature_cell_locations(torch.tensor([5.0, 5.0, 25.0, 25.0]).expand(4, 4), 2)
    F.vicregl_local_loss(maps_a, maps_b, loc_a, loc_b, (3, 2))["loss"].backward()
    assert maps_a.grad.abs().sum() > 0 and maps_b.grad.abs().sum() > 0


def test_local_loss_in_float32_agrees_with_float64():
    torch.manual_seed(0)
    maps = [torch.randn(6, 9, 8, dtype=torch.float64), torch.randn(6, 4, 8, dtype=torch.float64)]
    boxes = torch.tensor([[0.0, 0.0, 90.0, 120.0], [20.0, 30.0, 60.0, 80.0]])
    locs = [F.feature_cell_locations(boxes[i].expand(6, 4), g) for i, g in ((0, 3), (1, 2))]
    ref = F.vicregl_local_loss(*maps, *locs, (5, 2))
    single = F.vicregl_local_loss(*(m.float() for m in maps), *(l.float() for l in locs), (5, 2))
    torch.testing.assert_close(single["loss"].double(), ref["loss"], rtol=1e-5, atol=1e-6)


def test_alpha_one_and_zero_need_only_their_inputs():
    torch.manual_seed(0)
    emb = [torch.randn(4, 6) for _ in range(2)]
    maps = [torch.randn(4, 4, 3) for _ in range(2)]
    locs = [F.feature_cell_locations(torch.rand(4, 4).sort(-1).values * 10, 2) for _ in range(2)]
    assert "local_loss" not in F.vicregl_loss(emb, None, None, alpha=1.0)
    assert "global_loss" not in F.vicregl_loss(None, maps, locs, alpha=0.0, num_matches=(2, 2))


@pytest.mark.parametrize("gamma", [0, 10, 2.5])
def test_impossible_numbers_of_matches_are_rejected(gamma):
    with pytest.raises(ValueError, match="num_matches must be an int in \\[1, 9\\]"):
        F.match_by_location(torch.randn(2, 9, 2), torch.randn(2, 4, 2), gamma)


def test_a_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2 images"):
        F.vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_views_must_share_the_batch_and_be_at_least_two():
    with pytest.raises(ValueError, match="at least 2 views"):
        F.vicregl_global_loss([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="same batch size"):
        F.vicregl_global_loss([torch.randn(4, 3), torch.randn(5, 3)])


def test_gather_hook_sees_every_batch_major_tensor():
    seen = []

    def gather(t):
        seen.append(tuple(t.shape))
        return t

    emb = [torch.randn(4, 6) for _ in range(3)]
    maps = [torch.randn(4, 4, 3), torch.randn(4, 4, 3), torch.randn(4, 4, 3)]
    locs = [F.feature_cell_locations(torch.tensor([0.0, 0, 8, 8]).expand(4, 4), 2) for _ in range(3)]
    out = F.vicregl_loss(emb, maps, locs, num_matches=(2, 2), gather=gather)
    plain = F.vicregl_loss(emb, maps, locs, num_matches=(2, 2))
    torch.testing.assert_close(out["loss"], plain["loss"])
    assert seen.count((4, 6)) == 3 and (4, 2, 3) in seen and (4, 4, 3) in seen
