"""CrIBo functional core beyond the reference vectors: loop references, edge cases, shape-static variants."""

import pytest
import torch

from ssl_modules.functional import cribo as C

F64 = torch.float64


# ------------------------------------------------------------------------------------- references
def _loop_positional_cost(positions, labels, k):
    """docs/cribo.md §1 (official code), literally, with float64 loops (labels == k means "member of no cluster")."""
    b_size, t_size, _ = positions.shape
    out = torch.zeros(b_size, t_size, k, dtype=F64)
    for b in range(b_size):
        for i in range(t_size):
            for c in range(k):
                dists = [
                    float(torch.linalg.vector_norm(positions[b, i] - positions[b, j]))
                    for j in range(t_size)
                    if labels[b, j] == c
                ]
                dists = [d for d in dists if d > 0]
                out[b, i, c] = min(dists) if dists else 0.0
        mean = out[b].mean()
        out[b][out[b] == 0] = mean
        out[b] /= out[b].max()
    return out


def _loop_clustering(dense, positions, init, pos_weight=1.0, iters=5, sk_iters=5, lam=20.0, update=True):
    """Plain float64 reference of ``joint_space_clustering`` (per-image loops, dense one-hot membership)."""
    z = torch.nn.functional.normalize(torch.cat(dense, 1).to(F64), dim=-1)
    p = torch.cat(positions, 1).to(F64)
    b_size, t_size, _ = z.shape
    k = init.shape[1]
    labels = torch.full((b_size, t_size), k)
    for b in range(b_size):
        for c in range(k):
            labels[b, init[b, c]] = c
    cent = torch.stack([z[b, init[b]] for b in range(b_size)])
    col = torch.full((b_size, 1, k), 1.0 / k, dtype=F64)
    for _ in range(iters):
        cost = -torch.einsum("btd,bkd->btk", z, cent) + pos_weight * _loop_positional_cost(p, labels, k)
        cost = (cost - cost.min()) / (cost.max() - cost.min())
        plan = torch.exp(-lam * cost)
        plan = plan / plan.sum((1, 2), keepdim=True)
        for _ in range(sk_iters):
            plan = plan * (1.0 / t_size) / plan.sum(2, keepdim=True)
            plan = plan * col / plan.sum(1, keepdim=True)
        labels = plan.argmax(-1)
        one_hot = torch.nn.functional.one_hot(labels, k).to(F64)
        if update:
            col = one_hot.sum(1, keepdim=True) + 0.01
            col = col / col.sum(-1, keepdim=True)
        cent = torch.nn.functional.normalize(one_hot.transpose(1, 2) @ z, dim=-1)
    return labels.view(b_size, 2, -1).transpose(0, 1)


def _clustering_case(b=3, n=9, d=6, k=5, seed=0, same_crop=False):
    g = torch.Generator().manual_seed(seed)
    dense = [torch.randn(b, n, d, generator=g, dtype=F64) for _ in range(2)]
    pos1 = torch.rand(b, n, 2, generator=g, dtype=F64) * 200
    pos2 = pos1.clone() if same_crop else torch.rand(b, n, 2, generator=g, dtype=F64) * 200
    init = torch.rand(b, 2 * n, generator=g).argsort(1)[:, :k]
    return dense, [pos1, pos2], init


def _padded_objects(m_per_image, k, d, seed=0):
    """(2, B, K, D) objects with a (B, K) validity mask holding ``m_per_image[b]`` valid clusters per image."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.randn(2, len(m_per_image), k, d, generator=g, dtype=F64)
    valid = torch.zeros(len(m_per_image), k, dtype=torch.bool)
    for b, m in enumerate(m_per_image):
        valid[b, torch.randperm(k, generator=g)[:m]] = True
    return objects, valid


def _logits(rows, width=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g, dtype=F64).requires_grad_(grad) for _ in range(2)]


# ------------------------------------------------------------------------------------- clustering
def test_positional_cost_matches_a_float64_loop_reference():
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 6, (2, 14, 2), generator=g).to(F64) * 16  # coarse grid: many coincide
    labels = torch.randint(0, 5, (2, 14), generator=g)  # value 4 = no cluster; cluster 3 may be empty
    labels[0, :3] = 4
    got = C._positional_cost(C._member_distances(positions), labels, 4)
    torch.testing.assert_close(got, _loop_positional_cost(positions, labels, 4), rtol=1e-12, atol=0)


def test_equal_positions_give_exactly_zero_distance():
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(1, 40, 2, generator=g, dtype=torch.float32) * 1000 + 3000  # > 25 points
    positions = torch.cat([positions, positions], 1)  # every token has a partner at the same place
    ignored = torch.isinf(C._member_distances(positions))[0]
    same = (positions[0, :, None] == positions[0, None, :]).all(-1)
    assert torch.equal(ignored, same)


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(b=1),  # the official code crashes on one image
        dict(same_crop=True),  # partners at distance 0 are ignored
        dict(k=18),  # K = 2N
        dict(k=8, n=5, d=3, seed=3),  # N < K < 2N: clusters empty in a view
        dict(update=False, pos_weight=2.0, iters=3, sk_iters=3, lam=10.0),
    ],
    ids=["default", "batch_of_one", "identical_crops", "k_equals_2n", "k_greater_than_n", "fixed_marginals"],
)
def test_clustering_matches_a_loop_reference(case):
    options = {key: case.pop(key) for key in ("update", "pos_weight", "iters", "sk_iters", "lam") if key in case}
    dense, positions, init = _clustering_case(**case)
    got = C.joint_space_clustering(
        dense, positions, init, pos_weight=options.get("pos_weight", 1.0), num_iterations=options.get("iters", 5),
        sinkhorn_iterations=options.get("sk_iters", 5), sinkhorn_lambda=options.get("lam", 20.0),
        update_marginals=options.get("update", True),
    )["labels"]
    assert got.dtype == torch.long and got.shape == (2, dense[0].shape[0], dense[0].shape[1])
    assert torch.equal(got, _loop_clustering(dense, positions, init, **options))


def test_clustering_of_half_inputs_runs_in_float32():
    dense, positions, init = _clustering_case(b=2, n=16, d=8, k=4)
    dense = [t.half() for t in dense]
    positions = [t.half() for t in positions]
    half = C.joint_space_clustering(dense, positions, init)["labels"]
    single = C.joint_space_clustering([t.float() for t in dense], [t.float() for t in positions], init)["labels"]
    assert torch.equal(half, single)


def test_clustering_rejects_more_clusters_than_joint_tokens():
    dense, positions, init = _clustering_case(n=4, k=8)
    with pytest.raises(ValueError, match="K=9 clusters.*2N=8.*patch grid"):
        C.joint_space_clustering(dense, positions, torch.arange(9).expand(3, 9))


def test_clustering_rejects_out_of_range_init_indices():
    dense, positions, init = _clustering_case(n=4, k=3)
    with pytest.raises(ValueError, match=r"init_indices must index the joint token axis \[0, 2N\) = \[0, 8\)"):
        C.joint_space_clustering(dense, positions, init + 8)


def test_clustering_rejects_positions_that_do_not_match_the_tokens():
    dense, positions, init = _clustering_case(n=4, k=3)
    with pytest.raises(ValueError, match="positions must be two"):
        C.joint_space_clustering(dense, [p[:, :3] for p in positions], init)


# ---------------------------------------------------------------------------------------- objects
def test_empty_clusters_give_zero_objects_and_are_invalid():
    dense = [torch.randn(1, 4, 3, dtype=F64) for _ in range(2)]
    labels = torch.tensor([[[0, 0, 1, 1]], [[1, 2, 2, 2]]])  # 0 only in view 1, 2 only in view 2, 3 nowhere
    out = C.object_representations(dense, labels, 4)
    assert torch.equal(out["valid"], torch.tensor([[False, True, False, False]]))
    assert torch.equal(out["objects"][1, 0, 0], torch.zeros(3, dtype=F64))
    assert torch.equal(out["objects"][:, 0, 3], torch.zeros(2, 3, dtype=F64))
    torch.testing.assert_close(out["objects"][0, 0, 1], dense[0][0, 2:].mean(0))


def test_objects_pass_gradient_to_member_tokens_as_a_mean():
    dense = [torch.randn(1, 4, 3, dtype=F64, requires_grad=True) for _ in range(2)]
    labels = torch.tensor([[[0, 0, 0, 1]], [[1, 1, 0, 0]]])
    C.object_representations(dense, labels, 2)["objects"].sum().backward()
    torch.testing.assert_close(dense[0].grad[0, :, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=F64))
    torch.testing.assert_close(dense[1].grad[0, :, 0], torch.full((4,), 0.5, dtype=F64))


# -------------------------------------------------------------------------------------- retrieval
def _retrieval_case(m=9, q=23, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, m, d, generator=g, dtype=F64)
    bank = torch.cat([queries + 0.8 * torch.randn(2, m, d, generator=g, dtype=F64),
                      torch.randn(2, q - m, d, generator=g, dtype=F64) * 2], 1)
    return queries, bank[:, torch.randperm(q, generator=g)]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 100])
@pytest.mark.parametrize("normalize_bank", [True, False])
def test_chunked_retrieval_equals_unchunked(chunk_size, normalize_bank):
    queries, bank = _retrieval_case()
    whole = C.cycle_consistent_neighbours(queries, bank, normalize_bank)
    chunked = C.cycle_consistent_neighbours(queries, bank, normalize_bank, chunk_size=chunk_size)
    assert whole["mask"].any() and not whole["mask"].all()
    for key in ("indices", "neighbours", "mask"):
        assert torch.equal(whole[key], chunked[key])


def test_large_banks_are_searched_in_chunks_by_default(monkeypatch):
    assert C._default_chunk_size(2000, 800_000) < 800_000  # 2 x M x chunk stays near 2**25 entries
    queries, bank = _retrieval_case()
    whole = C.cycle_consistent_neighbours(queries, bank)
    monkeypatch.setattr(C, "_SEARCH_CHUNK_ELEMENTS", 2 * 9 * 5)  # -> chunks of 5 rows
    calls = []
    search = C._nearest_bank_rows
    monkeypatch.setattr(C, "_nearest_bank_rows", lambda *a: calls.append(a[-1]) or search(*a))
    chunked = C.cycle_consistent_neighbours(queries, bank)
    assert calls == [5]
    assert torch.equal(whole["indices"], chunked["indices"]) and torch.equal(whole["mask"], chunked["mask"])


def test_padded_retrieval_equals_the_compacted_contract_path():
    queries, bank = _retrieval_case(m=7, q=15)
    query_valid = torch.tensor([True, False, True, True, False, True, True, False, True, True])
    padded_queries = torch.randn(2, 10, 6, dtype=F64) * 5  # junk in the invalid rows
    padded_queries[:, query_valid] = queries[:, :7]
    storage = torch.cat([bank, torch.randn(2, 6, 6, dtype=F64) * 5], 1)  # stale rows after the valid part
    bank_valid = torch.arange(21) < 15
    padded = C.cycle_consistent_neighbours(
        padded_queries, storage, query_valid=query_valid, bank_valid=bank_valid, chunk_size=4
    )
    compact = C.cycle_consistent_neighbours(queries[:, :7], bank)
    assert torch.equal(padded["indices"][:, query_valid], compact["indices"])
    assert torch.equal(padded["neighbours"][:, query_valid], compact["neighbours"])
    assert torch.equal(padded["mask"][:, query_valid], compact["mask"])
    assert not padded["mask"][:, ~query_valid].any()


def test_invalid_query_rows_are_never_found_by_the_back_search():
    queries, _ = _retrieval_case(m=3, q=3)
    bank = queries.clone()
    decoy = queries[:, :1].clone()  # an invalid row that matches object 0's partner exactly
    noisy = queries + 0.05 * torch.randn(queries.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    padded = torch.cat([decoy, noisy], 1)
    unmasked = C.cycle_consistent_neighbours(padded, bank)["mask"]
    masked = C.cycle_consistent_neighbours(padded, bank, query_valid=torch.tensor([False, True, True, True]))["mask"]
    assert not unmasked[:, 1].any()  # the decoy steals object 0's cycle
    assert torch.equal(masked, torch.tensor([[False, True, True, True]] * 2))


def test_retrieval_without_a_valid_bank_row_accepts_nothing():
    queries, bank = _retrieval_case()
    out = C.cycle_consistent_neighbours(queries, bank, bank_valid=torch.zeros(23, dtype=torch.bool))
    assert not out["mask"].any()


# ------------------------------------------------------------------------------------ memory bank
def test_enqueue_with_more_images_than_slots_keeps_the_first_slots():
    bank = torch.randn(2, 12, 3, dtype=F64)
    counts = torch.tensor([3, 3, 3, 3])
    objects = torch.randn(2, 11, 3, dtype=F64)
    per_image = torch.tensor([2, 3, 1, 3, 2])  # B=5 >= S=4: the last image (2 objects) is dropped
    out = C.memory_bank_enqueue(bank, counts, objects, per_image)
    assert torch.equal(out["counts"], torch.tensor([2, 3, 1, 3]))
    assert torch.equal(out["bank"][:, :9], objects[:, :9])
    assert torch.equal(out["bank"][:, 9:], bank[:, 9:])  # stale rows untouched


@pytest.mark.parametrize("per_image", [[2, 0, 4], [4, 4, 4, 4, 4, 4, 4, 4], [0, 0, 0]], ids=["mixed", "b_gt_s", "none"])
def test_padded_enqueue_equals_the_compacted_contract_path(per_image):
    objects, valid = _padded_objects(per_image, k=4, d=3)
    bank = torch.randn(2, 24, 3, dtype=F64)
    counts = torch.tensor([4, 1, 3, 0, 2, 4])
    padded = C.memory_bank_enqueue_padded(bank, counts, objects, valid)
    compact = C.memory_bank_enqueue(bank, counts, objects[:, valid], valid.sum(1))
    assert torch.equal(padded["bank"], compact["bank"]) and torch.equal(padded["counts"], compact["counts"])


def test_padded_enqueue_rejects_a_bank_smaller_than_k_times_s():
    objects, valid = _padded_objects([1, 2], k=4, d=3)
    with pytest.raises(ValueError, match=r"C=20 rows.*K \* S = 24"):
        C.memory_bank_enqueue_padded(torch.zeros(2, 20, 3), torch.zeros(6, dtype=torch.long), objects, valid)


# ----------------------------------------------------------------------------------------- losses
def test_object_loss_over_padded_rows_equals_the_compacted_loss():
    valid = torch.tensor([True, False, True, True, False, True])
    student, teacher = _logits(6, seed=1, grad=True), _logits(6, seed=2)
    center = torch.randn(8, dtype=F64)
    padded = C.cribo_object_loss(student, teacher, center, 0.05, valid=valid)
    compact = C.cribo_object_loss([s[valid] for s in student], [t[valid] for t in teacher], center, 0.05)
    torch.testing.assert_close(padded, compact, rtol=1e-12, atol=0)
    grad = torch.autograd.grad(padded, student)
    assert all(torch.equal(g[~valid], torch.zeros_like(g[~valid])) for g in grad)


def test_cross_image_loss_over_padded_rows_equals_the_compacted_loss():
    valid = torch.tensor([True, False, True, True, False, True])
    mask = torch.tensor([[True, True, False, True, True, True], [False, True, True, True, False, True]])
    student, neighbours = _logits(6, seed=1), _logits(6, seed=2)
    center = torch.randn(1, 8, dtype=F64)
    padded = C.cribo_cross_image_loss(student, neighbours, mask, center, 0.05, valid=valid)
    compact = C.cribo_cross_image_loss([s[valid] for s in student], [n[valid] for n in neighbours],
                                       mask[:, valid], center, 0.05)
    torch.testing.assert_close(padded, compact, rtol=1e-12, atol=0)


def test_cross_image_loss_without_an_accepted_view1_object_is_a_connected_zero():
    student, neighbours = _logits(5, seed=1, grad=True), _logits(5, seed=2)
    mask = torch.tensor([[False] * 5, [True, False, True, False, False]])  # Z1 = 0, some view-2 matches
    loss = C.cribo_cross_image_loss(student, neighbours, mask, torch.zeros(8, dtype=F64), 0.05)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, student))


@pytest.mark.parametrize("rows", [0, 4], ids=["no_rows", "all_rows_invalid"])
def test_object_loss_without_valid_objects_is_a_connected_zero(rows):
    student, teacher = _logits(rows, seed=1, grad=True), _logits(rows, seed=2)
    valid = torch.zeros(rows, dtype=torch.bool) if rows else None
    loss = C.cribo_object_loss(student, teacher, torch.zeros(8, dtype=F64), 0.05, valid=valid)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, student))


def _total_loss_inputs(grad_teacher):
    teacher_side = dict(
        teacher_global=_logits(4, 16, seed=2, grad=grad_teacher),
        teacher_objects=_logits(5, seed=4, grad=grad_teacher),
        neighbour_objects=_logits(5, seed=5, grad=grad_teacher),
        center=torch.randn(16, dtype=F64).requires_grad_(grad_teacher),
        object_center=torch.randn(1, 8, dtype=F64).requires_grad_(grad_teacher),
    )
    return dict(
        student_global=[*_logits(4, 16, seed=1, grad=True), torch.randn(4, 16, dtype=F64, requires_grad=True)],
        student_objects=_logits(5, seed=3, grad=True),
        cycle_mask=torch.tensor([[True, False, True, True, False], [False, True, True, False, False]]),
        teacher_temp=0.04, object_teacher_temp=0.05, **teacher_side,
    ), list(teacher_side)


def test_teacher_side_arguments_get_zero_gradients():
    kwargs, teacher_names = _total_loss_inputs(grad_teacher=True)
    loss = C.cribo_loss(**kwargs)["loss"]
    leaves = [t for name in teacher_names for t in (kwargs[name] if isinstance(kwargs[name], list) else [kwargs[name]])]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_first_epoch_loss_has_no_cross_image_term():
    kwargs, _ = _total_loss_inputs(grad_teacher=False)
    with_term = C.cribo_loss(**kwargs)
    without = C.cribo_loss(**kwargs, cross_image=False)
    assert without["cross_image_loss"].item() == 0.0 and with_term["cross_image_loss"].item() > 0
    torch.testing.assert_close(without["loss"], with_term["global_loss"] + with_term["object_loss"])


def test_losses_of_half_inputs_are_computed_and_returned_in_float32():
    student, teacher = _logits(6, seed=1), _logits(6, seed=2)
    center = torch.zeros(8, dtype=F64)
    reference = C.cribo_object_loss(student, teacher, center, 0.05)
    half = C.cribo_object_loss([s.bfloat16() for s in student], [t.bfloat16() for t in teacher], center.float(), 0.05)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), reference, rtol=2e-2, atol=0)


# ------------------------------------------------------------------------------------------ purity
def _purity_cases():
    dense, positions, init = _clustering_case()
    labels = C.joint_space_clustering(dense, positions, init)["labels"]
    queries, bank = _retrieval_case()
    objects, valid = _padded_objects([2, 0, 4], k=4, d=6)
    storage, counts = torch.randn(2, 24, 6, dtype=F64), torch.full((6,), 4)
    student, teacher = _logits(5, seed=1), _logits(5, seed=2)
    mask = torch.tensor([[True, False, True, True, False]] * 2)
    center = torch.zeros(8, dtype=F64)
    losses = dict(center=center, teacher_temp=0.04)
    return {
        "clustering": (C.joint_space_clustering, dict(dense=dense, positions=positions, init_indices=init)),
        "objects": (C.object_representations, dict(dense=dense, labels=labels, num_clusters=5)),
        "retrieval": (
            C.cycle_consistent_neighbours,
            dict(queries=queries, bank=bank, chunk_size=5, bank_valid=torch.arange(23) < 20),
        ),
        "enqueue": (
            C.memory_bank_enqueue,
            dict(bank=storage, counts=counts, objects=objects[:, valid], objects_per_image=valid.sum(1)),
        ),
        "enqueue_padded": (
            C.memory_bank_enqueue_padded, dict(bank=storage, counts=counts, objects=objects, valid=valid)
        ),
        "global_loss": (C.cribo_global_loss, dict(student=student, teacher=teacher, **losses)),
        "object_loss": (C.cribo_object_loss, dict(student=student, teacher=teacher, valid=mask[0], **losses)),
        "cross_image_loss": (
            C.cribo_cross_image_loss, dict(student=student, neighbours=teacher, mask=mask, valid=mask[1], **losses)
        ),
    }


def _tensors(value):
    return [t for t in (value if isinstance(value, list) else [value]) if torch.is_tensor(t)]


@pytest.mark.parametrize("name", list(_purity_cases()))
def test_functions_do_not_modify_their_inputs(name):
    fn, kwargs = _purity_cases()[name]
    before = {key: [t.clone() for t in _tensors(value)] for key, value in kwargs.items()}
    fn(**kwargs)
    for key, copies in before.items():
        assert all(torch.equal(a, b) for a, b in zip(copies, _tensors(kwargs[key]))), f"{name} changed {key}"


# --- grouped semantics (one batch of W * B images reproducing W processes of B images) -----------------
def _grouping_inputs(batch=4, side=3, dim=6, clusters=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(batch, side * side, dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    offsets = torch.rand(batch, 1, 2, generator=gen, dtype=torch.float64) * 20
    positions = [grid.double() * 10 + offsets, grid.double() * 10 + offsets + 5]
    init = torch.stack([torch.randperm(2 * side * side, generator=gen)[:clusters] for _ in range(batch)])
    return dense, positions, init


def test_grouped_normalisation_equals_clustering_each_group_alone():
    dense, positions, init = _grouping_inputs()
    grouped = C.joint_space_clustering(dense, positions, init, groups=2)["labels"]
    for g in range(2):
        part = slice(2 * g, 2 * g + 2)
        alone = C.joint_space_clustering([d[part] for d in dense], [p[part] for p in positions], init[part])
        assert torch.equal(grouped[:, part], alone["labels"])


def test_back_search_stays_inside_the_query_group():
    eye = torch.eye(6)
    view1 = torch.stack([eye[0], eye[1], eye[2], eye[3]])
    view2 = torch.stack([eye[4] + 0.5 * eye[5], -eye[5], eye[4], eye[5]])
    queries = torch.stack([view1, view2])
    # object 0 retrieves a stored object whose second view equals object 2's second view
    bank = torch.stack([view1[:1], view2[2:3]])
    ungrouped = C.cycle_consistent_neighbours(queries, bank)
    grouped = C.cycle_consistent_neighbours(queries, bank, query_groups=torch.tensor([0, 0, 1, 1]))
    assert not ungrouped["mask"][0, 0]  # lands on object 2
    assert grouped["mask"][0, 0]  # object 2 is another process's: the search lands on object 0 itself


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(jumped_keys=torch.zeros(2, 5, 3), queries=torch.zeros(2, 4, 3)), r"\(2, M, D\)"),
        (dict(jumped_keys=torch.zeros(3, 4, 3), queries=torch.zeros(3, 4, 3)), r"\(2, M, D\)"),
        (dict(jumped_keys=torch.zeros(2, 4, 3), queries=torch.zeros(2, 4, 3),
              query_valid=torch.ones(2, 4, dtype=torch.bool)), r"query_valid must be a bool tensor of shape \(4,\)"),
        (dict(jumped_keys=torch.zeros(2, 4, 3), queries=torch.zeros(2, 4, 3), query_groups=torch.zeros(3)),
         r"query_groups must be \(M,\) = \(4,\)"),
    ],
)
def test_cycle_mask_rejects_inconsistent_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        C.cycle_mask(**kwargs)


def test_cross_image_loss_needs_the_cycle_mask():
    with pytest.raises(ValueError, match=r"mask must be the \(2, M\) bool cycle-consistency mask, got None"):
        C.cribo_cross_image_loss(_logits(4, seed=1), _logits(4, seed=2), None, torch.zeros(8), 0.05)
