"""Unit tests of the BAM functional core beyond the reference vectors (test_parity_vectors.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as nnf

import ssl_modules.functional as F
from support.distributed_utils import run_distributed


# --------------------------------------------------------------------------------------------- helpers
def _views(n=5, crops=4, dim=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=gen, dtype=dtype) for _ in range(crops)]


def _cosines(rows, columns, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = nnf.normalize(torch.randn(rows, 6, generator=gen, dtype=dtype), dim=1)
    b = nnf.normalize(torch.randn(columns, 6, generator=gen, dtype=dtype), dim=1)
    return a @ b.T


def _multiplicative_sinkhorn(similarity, temperature, num_iters, mask=None, dtype=torch.float64):
    """The README's algorithm written plainly: one global shift, column then row divisions."""
    kernel = torch.exp(similarity.to(dtype) / temperature - 1 / temperature)
    if mask is not None:
        kernel = kernel.masked_fill(mask, 0)
    for _ in range(num_iters):
        kernel = kernel / kernel.sum(0, keepdim=True)
        kernel = kernel / kernel.sum(1, keepdim=True)
    return kernel / kernel.sum(1, keepdim=True)


def _own_rows(full: torch.Tensor, rank: int, world_size: int, num_crops: int) -> torch.Tensor:
    """Rows of process ``rank`` of a crop-major ``(V * N, ...)`` tensor: crop v of its B images, crop-major."""
    per_crop = full.reshape(num_crops, full.shape[0] // num_crops, *full.shape[1:])
    batch = per_crop.shape[1] // world_size
    return per_crop[:, rank * batch : (rank + 1) * batch].reshape(num_crops * batch, *full.shape[1:])


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out


class _GatherSumBackward(torch.autograd.Function):
    """All-gather along dim 0 in rank order; the backward sums the gradients over processes."""

    @staticmethod
    def forward(ctx, tensor):
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def _gather(tensor):
    return _GatherSumBackward.apply(tensor)


# ------------------------------------------------------------------------------------- positive mask
def test_positive_mask_marks_the_target_crops_of_the_same_image():
    batch, crops, targets, rank, world = 2, 3, 2, 1, 3
    mask = F.bam_positive_mask(batch, crops, targets, rank=rank, world_size=world)
    expected = torch.zeros(crops * batch, targets * world * batch, dtype=torch.bool)
    for v in range(crops):
        for i in range(batch):
            for t in range(targets):
                expected[v * batch + i, t * world * batch + rank * batch + i] = True
    assert torch.equal(mask, expected)


def test_positive_mask_of_a_rank_is_its_rows_of_the_whole_batch_mask():
    whole = F.bam_positive_mask(6, 3, 2)
    for rank in range(3):
        local = F.bam_positive_mask(2, 3, 2, rank=rank, world_size=3)
        assert torch.equal(local, _own_rows(whole, rank, 3, 3))


# -------------------------------------------------------------------------------- balanced attention
def test_zero_iterations_is_the_masked_softmax_at_the_sinkhorn_temperature():
    sim = _cosines(8, 4)
    mask = F.bam_positive_mask(2, 4, 2)
    out = F.balanced_attention(sim, 0.05, 0, mask)
    torch.testing.assert_close(out, torch.softmax((sim / 0.05).masked_fill(mask, float("-inf")), dim=1))


def test_targets_are_row_stochastic_constants_with_exact_zeros_where_masked():
    sim = _cosines(12, 6).requires_grad_(True)
    mask = F.bam_positive_mask(3, 4, 2)
    out = F.balanced_attention(sim, 0.05, 3, mask)
    torch.testing.assert_close(out.sum(1), torch.ones(12, dtype=torch.float64))
    assert (out[mask] == 0).all() and (out[~mask] > 0).all()
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize(
    "rows, columns, temperature, num_iters, masked",
    [(24, 12, 0.05, 3, True), (6, 9, 0.1, 5, False), (15, 10, 0.03, 1, True), (20, 4, 0.2, 7, False)],
)
def test_log_domain_matches_a_multiplicative_float64_reference(rows, columns, temperature, num_iters, masked):
    sim = _cosines(rows, columns, seed=rows)
    mask = None
    if masked:  # rows = V crops of B images, columns = T crops of the same B images
        batch = columns // 2
        mask = F.bam_positive_mask(batch, rows // batch, 2)
    out = F.balanced_attention(sim, temperature, num_iters, mask)
    torch.testing.assert_close(out, _multiplicative_sinkhorn(sim, temperature, num_iters, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_targets_without_underflow(dtype):
    gen = torch.Generator().manual_seed(0)
    sim = (torch.rand(16, 8, generator=gen) * 0.2 + 0.7).to(dtype)
    sim[3] = -0.9  # an outlier image: its whole row lies far below the rest
    if dtype == torch.float16:  # the case is real: a Sinkhorn run in fp16 loses the row to underflow
        assert not torch.isfinite(_multiplicative_sinkhorn(sim, 0.02, 3, dtype=torch.float16)).all()
    out = F.balanced_attention(sim, 0.02, 3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, _multiplicative_sinkhorn(sim, 0.02, 3).float(), rtol=1e-4, atol=1e-6)


def test_small_temperatures_do_not_underflow_in_float32():
    sim = _cosines(24, 12, seed=4, dtype=torch.float32)
    sim[:, 0] *= 0.2  # a column far below the best similarity of the matrix
    mask = F.bam_positive_mask(6, 4, 2)
    # the case is real: at temperature 0.005 a float32 kernel with one global shift loses that column
    assert not torch.isfinite(_multiplicative_sinkhorn(sim, 0.005, 3, mask, dtype=torch.float32)).all()
    out = F.balanced_attention(sim, 0.005, 3, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, _multiplicative_sinkhorn(sim, 0.005, 3, mask).float(), rtol=1e-4, atol=1e-6)


def _sinkhorn_on_own_rows(rank, world_size, cases):
    results = []
    for sim, crops, batch, targets, temperature, num_iters in cases:
        mask = None if targets is None else F.bam_positive_mask(batch, crops, targets, rank=rank,
                                                                world_size=world_size)
        local = _own_rows(sim, rank, world_size, crops)
        results.append(F.balanced_attention(local, temperature, num_iters, mask, all_reduce=_all_reduce))
    return results


def test_all_reduce_gives_each_process_its_rows_of_the_single_process_result():
    cases = [  # (similarity, V, B per process, T or None for no mask, temperature, iterations)
        (_cosines(3 * 2, 2 * 2, seed=1), 3, 1, 2, 0.05, 3),  # B=1: a process sees fully masked columns
        (_cosines(2 * 6, 2 * 6, seed=2), 2, 3, None, 0.01, 4),
        (_cosines(4 * 4, 2 * 4, seed=3), 4, 2, 2, 0.1, 0),
    ]
    results = run_distributed(_sinkhorn_on_own_rows, world_size=2, args=(cases,))
    for i, (sim, crops, batch, targets, temperature, num_iters) in enumerate(cases):
        mask = None if targets is None else F.bam_positive_mask(2 * batch, crops, targets)
        whole = F.balanced_attention(sim, temperature, num_iters, mask)
        for rank, local in enumerate(results):
            torch.testing.assert_close(local[i], _own_rows(whole, rank, 2, crops))


# -------------------------------------------------------------------------------------------- top-k
def test_top_k_keeps_the_same_k_best_columns_for_every_global_crop_of_an_image():
    targets = torch.softmax(torch.randn(3 * 4, 7, dtype=torch.float64), dim=1)  # G=3, 4 images
    out = F.bam_top_k_targets(targets, 3, 2)
    per_crop = targets.reshape(3, 4, 7)
    for i in range(4):
        keep = per_crop[:, i].mean(0).topk(2).indices
        for g in range(3):
            expected = torch.zeros(7, dtype=torch.float64)
            expected[keep] = per_crop[g, i, keep] / per_crop[g, i, keep].sum()
            torch.testing.assert_close(out[g * 4 + i], expected)


# ------------------------------------------------------------------------------------ matching loss
def test_matching_loss_is_the_mean_over_target_and_other_crops_of_the_cross_entropy():
    images, crops, globals_ = 3, 4, 2
    sim = _cosines(crops * images, 2 * images)
    targets = torch.softmax(torch.randn(globals_ * images, 2 * images, dtype=torch.float64), dim=1)
    log_attention = torch.log_softmax(sim / 0.1, dim=1).reshape(crops, images, -1)
    pairs = [
        -(targets.reshape(globals_, images, -1)[t] * log_attention[s]).sum(1).mean()
        for t in range(globals_) for s in range(crops) if s != t
    ]
    out = F.attention_matching_loss(sim, targets, globals_, 0.1)
    torch.testing.assert_close(out["loss"], torch.stack(pairs).mean())
    torch.testing.assert_close(out["attention"], torch.softmax(sim / 0.1, dim=1))


def test_matching_loss_sends_no_gradient_to_targets_nor_to_masked_entries():
    sim = _cosines(12, 6).requires_grad_(True)
    targets = torch.softmax(torch.randn(6, 6, dtype=torch.float64), dim=1).requires_grad_(True)
    mask = F.bam_positive_mask(3, 4, 2)
    out = F.attention_matching_loss(sim, targets, 2, 0.1, mask)
    grad_sim, grad_targets = torch.autograd.grad(out["loss"], [sim, targets], allow_unused=True)
    assert grad_targets is None or (grad_targets == 0).all()
    assert (grad_sim[mask] == 0).all() and (grad_sim[~mask] != 0).all()
    assert torch.isfinite(out["loss"]) and (out["attention"][mask] == 0).all()


# ----------------------------------------------------------------------------------------- bam_loss
def _composed_loss(student, detach_columns):
    """bam_loss without teacher, built from the public functions (columns optionally detached)."""
    z = nnf.normalize(torch.cat(student), dim=-1)
    columns = z[: 2 * student[0].shape[0]]
    sim = z @ (columns.detach() if detach_columns else columns).T
    mask = F.bam_positive_mask(student[0].shape[0], len(student), 2)
    targets = F.balanced_attention(sim, 0.05, 3, mask)[: columns.shape[0]]
    return F.attention_matching_loss(sim, targets, 2, 0.1, mask)["loss"]


def test_without_teacher_the_student_gets_gradient_through_the_columns():
    student = [v.requires_grad_(True) for v in _views()]
    grads = torch.autograd.grad(F.bam_loss(student)["loss"], student)
    composed = torch.autograd.grad(_composed_loss(student, detach_columns=False), student)
    rows_only = torch.autograd.grad(_composed_loss(student, detach_columns=True), student)
    for g, c in zip(grads, composed):
        torch.testing.assert_close(g, c)
    # the global crops are columns too: detaching the columns changes their gradient, not the local crops'
    assert all((g - r).norm() > 0.05 * g.norm() for g, r in zip(grads[:2], rows_only[:2]))
    for g, r in zip(grads[2:], rows_only[2:]):
        torch.testing.assert_close(g, r)


def test_teacher_outputs_get_no_gradient():
    student = [v.requires_grad_(True) for v in _views()]
    teacher = [v.requires_grad_(True) for v in _views(seed=1)]
    loss = F.bam_loss(student, teacher, top_k=4)["loss"]
    grads = torch.autograd.grad(loss, [*student, *teacher], allow_unused=True)
    assert all(g.abs().sum() > 0 for g in grads[:4])
    assert all(g is None or (g == 0).all() for g in grads[4:])


def test_bam_loss_does_not_depend_on_the_scale_of_the_outputs():
    student, teacher = _views(), _views(seed=1)
    out = F.bam_loss(student, teacher)
    scaled = F.bam_loss([3.0 * v for v in student], [0.25 * v for v in teacher])
    for key in ("loss", "attention", "targets"):
        torch.testing.assert_close(out[key], scaled[key])


def test_half_precision_outputs_are_computed_in_float32():
    student = _views(dtype=torch.float32)
    half = [v.to(torch.bfloat16) for v in student]
    out = F.bam_loss(half)
    assert out["loss"].dtype == torch.float32 and out["targets"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], F.bam_loss([v.float() for v in half])["loss"])


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "fn, kwargs, message",
    [
        (F.attention_matching_loss, dict(similarity=torch.zeros(7, 4), targets=torch.zeros(4, 4),
                                         num_global_crops=2), "not a multiple of the 2 images"),
        (F.attention_matching_loss, dict(similarity=torch.zeros(2, 4), targets=torch.zeros(2, 4),
                                         num_global_crops=1), "V >= 2"),
        (F.attention_matching_loss, dict(similarity=torch.zeros(4, 4), targets=torch.zeros(6, 4),
                                         num_global_crops=3), "num_global_crops"),
        (F.bam_loss, dict(student=_views(crops=1)), "at least 2 crops"),
        (F.bam_loss, dict(student=_views(crops=2), num_global_crops=3), "num_global_crops"),
        (F.bam_loss, dict(student=_views(crops=2), num_target_crops=3), "num_target_crops"),
        (F.bam_positive_mask, dict(batch_size=2, num_crops=2, num_target_crops=3), "num_target_crops"),
        (F.bam_top_k_targets, dict(targets=torch.zeros(4, 6), num_global_crops=2, k=7), "top_k"),
        (F.bam_loss, dict(student=_views(n=3, crops=2), top_k=7), "top_k .* exceeds the 6 target columns"),
        (F.bam_positive_mask, dict(batch_size=2, num_crops=2, num_target_crops=2, rank=2, world_size=2), "rank"),
        (F.bam_positive_mask, dict(batch_size=2, num_crops=2, num_target_crops=2, rank=-1, world_size=2), "rank"),
        (F.bam_loss, dict(student=_views(n=1, crops=2)), "at least 2 images"),
        (F.balanced_attention, dict(similarity=torch.zeros(4, 4), positive_mask=torch.zeros(4, 3, dtype=torch.bool)),
         "positive_mask"),
        (F.bam_loss, dict(student=_views(n=2, crops=2), rank=0, world_size=2), "gather"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


def test_single_image_batches_are_fine_without_positive_masking():
    views = _views(n=1, crops=2)
    out = F.bam_loss(views, positive_masking=False, softmax_temperature=0.1, sinkhorn_temperature=0.05)
    # By hand: the 2 x 2 cosine matrix of the image's two crops; each crop's balanced targets teach the other crop.
    rows = nnf.normalize(torch.cat(views), dim=1)
    similarity = rows @ rows.T
    targets = _multiplicative_sinkhorn(similarity, 0.05, 3)
    log_attention = torch.log_softmax(similarity / 0.1, dim=1)
    expected = -(targets[0] @ log_attention[1] + targets[1] @ log_attention[0]) / 2
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["targets"], targets.to(out["targets"].dtype))


def test_no_function_changes_its_inputs():
    student, teacher = _views(), _views(seed=1)
    sim, targets = _cosines(20, 10), torch.softmax(torch.randn(10, 10, dtype=torch.float64), dim=1)
    mask = F.bam_positive_mask(5, 4, 2)
    before = [t.clone() for t in [*student, *teacher, sim, targets, mask]]
    F.bam_loss(student, teacher, top_k=3)
    F.balanced_attention(sim, 0.05, 3, mask)
    F.bam_top_k_targets(targets, 2, 4)
    F.attention_matching_loss(sim, targets, 2, 0.1, mask)
    assert all(torch.equal(b, a) for b, a in zip(before, [*student, *teacher, sim, targets, mask]))


# --------------------------------------------------------------------------- DDP recipe B (own rows)
def _recipe_b(rank, world_size, views, teacher, top_k, num_target_crops):
    """README "Under DDP", recipe B written out with the public functions, next to bam_loss's own DDP mode."""
    crops, globals_ = len(views), 2
    targets_per_image = num_target_crops or globals_
    batch = views[0].shape[0] // world_size
    own = slice(rank * batch, (rank + 1) * batch)
    mine = [v[own].clone().requires_grad_(True) for v in views]
    mine_teacher = None if teacher is None else [t[own] for t in teacher]

    z = nnf.normalize(torch.cat(mine), dim=-1)
    side = z if teacher is None else nnf.normalize(torch.cat(mine_teacher), dim=-1)
    # column t * W * B + q * B + j: each target crop gathered over processes, crop after crop
    columns = torch.cat([_gather(side[t * batch : (t + 1) * batch]) for t in range(targets_per_image)])
    sim = z @ columns.T
    target_sim = sim.detach() if teacher is None else side @ columns.T
    mask = F.bam_positive_mask(batch, crops, targets_per_image, rank=rank, world_size=world_size)
    targets = F.balanced_attention(target_sim, 0.05, 3, mask, all_reduce=_all_reduce)[: globals_ * batch]
    if top_k:
        targets = F.bam_top_k_targets(targets, globals_, top_k)
    loss = F.attention_matching_loss(sim, targets, globals_, 0.1, mask)["loss"]
    loss.backward()
    recipe = (_all_reduce(loss.detach(), "sum") / world_size, [v.grad / world_size for v in mine])

    again = [v[own].clone().requires_grad_(True) for v in views]
    loss = F.bam_loss(again, mine_teacher, num_target_crops=num_target_crops, top_k=top_k, gather=_gather,
                      all_reduce=_all_reduce, rank=rank, world_size=world_size)["loss"]
    loss.backward()
    builtin = (_all_reduce(loss.detach(), "sum") / world_size, [v.grad / world_size for v in again])
    return recipe, builtin


def _recipe_b_cases(rank, world_size, cases):
    return [_recipe_b(rank, world_size, *case) for case in cases]


def test_own_rows_on_two_processes_equal_bam_loss_on_the_whole_batch():
    views = _views(n=6, crops=4, seed=2)
    cases = [  # (views, teacher, top_k, num_target_crops): one spawn for both, processes are slow to start
        (views, None, 0, None),
        (views, _views(n=6, crops=4, seed=3), 4, 1),
    ]
    results = run_distributed(_recipe_b_cases, world_size=2, args=(cases,))
    for i, (_, teacher, top_k, num_target_crops) in enumerate(cases):
        whole = [v.clone().requires_grad_(True) for v in views]
        loss = F.bam_loss(whole, teacher, num_target_crops=num_target_crops, top_k=top_k)["loss"]
        grads = torch.autograd.grad(loss, whole)
        for rank, per_rank in enumerate(results):
            for local_loss, local_grads in per_rank[i]:  # recipe B, then bam_loss's DDP mode
                torch.testing.assert_close(local_loss, loss.detach())
                for g_local, g_whole in zip(local_grads, grads):
                    torch.testing.assert_close(g_local, g_whole[3 * rank : 3 * rank + 3])
