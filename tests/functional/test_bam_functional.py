import pytest
import torch

import ssl_modules.functional as F
from distributed_utils import run_distributed
from ssl_modules import distributed


def _multiplicative_sinkhorn(sim, temperature, iters, mask):
    """Float64 reference: the alternating normalisation of the README, with one global shift."""
    k = torch.exp(sim.double() / temperature - 1 / temperature)
    if mask is not None:
        k = k.masked_fill(mask, 0)
    for _ in range(iters):
        k = k / k.sum(0, keepdim=True)
        k = k / k.sum(1, keepdim=True)
    return k / k.sum(1, keepdim=True)


def _views(n=5, crops=4, dim=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=gen, dtype=dtype) for _ in range(crops)]


def test_zero_iterations_is_the_masked_softmax():
    sim = torch.randn(8, 4, dtype=torch.float64).tanh()
    mask = F.bam_positive_mask(2, 4, 2)
    out = F.balanced_attention(sim, 0.05, 0, mask)
    expected = torch.softmax((sim / 0.05).masked_fill(mask, float("-inf")), dim=1)
    torch.testing.assert_close(out, expected)


def test_log_domain_equals_the_multiplicative_reference_and_rows_are_stochastic():
    sim = torch.randn(24, 12, dtype=torch.float64).tanh()
    mask = F.bam_positive_mask(6, 4, 2)
    out = F.balanced_attention(sim, 0.05, 3, mask)
    torch.testing.assert_close(out, _multiplicative_sinkhorn(sim, 0.05, 3, mask))
    torch.testing.assert_close(out.sum(1), torch.ones(24, dtype=torch.float64))
    assert (out[mask] == 0).all() and not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_finite_float32_targets_even_with_an_outlier(dtype):
    sim = torch.rand(16, 8) * 0.2 + 0.7
    sim[3] = -0.9  # an outlier row far below the rest: a naive fp16 kernel underflows at temperature 0.02
    out = F.balanced_attention(sim.to(dtype), 0.02, 3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(16), atol=1e-5, rtol=0)


def test_top_k_keeps_the_same_columns_for_all_global_crops():
    targets = torch.softmax(torch.randn(6, 7, dtype=torch.float64), 1)
    out = F.bam_top_k_targets(targets, 2, 3)
    assert torch.equal(out[:3] > 0, out[3:] > 0) and ((out[:3] > 0).sum(1) == 3).all()
    torch.testing.assert_close(out.sum(1), torch.ones(6, dtype=torch.float64))


def test_matching_loss_sends_no_gradient_to_targets_or_masked_entries():
    sim = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.softmax(torch.randn(6, 6, dtype=torch.float64), 1).requires_grad_(True)
    mask = F.bam_positive_mask(3, 4, 2)
    loss = F.attention_matching_loss(sim, targets, 2, 0.1, mask)["loss"]
    g_sim, g_t = torch.autograd.grad(loss, [sim, targets], allow_unused=True)
    assert g_t is None or (g_t == 0).all()
    assert (g_sim[mask] == 0).all() and g_sim.abs().sum() > 0


def test_columns_carry_gradient_without_teacher_and_teacher_gets_none():
    student = [v.requires_grad_(True) for v in _views()]
    loss = F.bam_loss(student, top_k=0)["loss"]
    grads = torch.autograd.grad(loss, student)
    assert all(g.abs().sum() > 0 for g in grads)
    teacher = [v.requires_grad_(True) for v in _views(seed=1)]
    loss = F.bam_loss(student, teacher)["loss"]
    assert all(g is None for g in torch.autograd.grad(loss, teacher, allow_unused=True))


def test_bam_loss_does_not_depend_on_the_scale_of_the_outputs():
    views = _views()
    torch.testing.assert_close(F.bam_loss(views)["loss"], F.bam_loss([3.0 * v for v in views])["loss"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(student=_views(n=1, crops=2)), "at least 2 images"),
        (dict(student=_views(n=3, crops=2), top_k=7), "top_k"),
        (dict(student=_views(n=3, crops=1)), "at least 2 crops"),
        (dict(student=_views(n=3, crops=2), num_global_crops=3), "num_global_crops"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        F.bam_loss(**kwargs)


def test_positive_mask_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        F.bam_positive_mask(2, 2, 2, rank=2, world_size=2)


def _own_rows_recipe(rank, world_size, views, teacher, top_k):
    """Recipe B of the README: own rows, gathered columns, Sinkhorn column sums over processes."""
    batch = views[0].shape[0] // world_size
    mine = [v[rank * batch : (rank + 1) * batch].clone().requires_grad_(True) for v in views]
    mine_t = None if teacher is None else [t[rank * batch : (rank + 1) * batch] for t in teacher]
    out = F.bam_loss(mine, mine_t, top_k=top_k, gather=distributed.all_gather_with_grad,
                     all_reduce=distributed.all_reduce, rank=rank, world_size=world_size)
    loss = out["loss"]
    loss.backward()
    mean_loss = distributed.all_reduce(loss.detach(), "sum") / world_size
    return mean_loss, [v.grad / world_size for v in mine], out["targets"]


@pytest.mark.parametrize("with_teacher, top_k", [(False, 0), (True, 4)])
def test_two_processes_with_their_own_rows_equal_one_process_with_the_whole_batch(with_teacher, top_k):
    views = _views(n=6, crops=4, seed=2)
    teacher = _views(n=6, crops=4, seed=3) if with_teacher else None
    results = run_distributed(_own_rows_recipe, world_size=2, args=(views, teacher, top_k))
    whole = [v.clone().requires_grad_(True) for v in views]
    ref = F.bam_loss(whole, teacher, top_k=top_k)
    grads = torch.autograd.grad(ref["loss"], whole)
    for rank, (loss, local_grads, targets) in enumerate(results):
        torch.testing.assert_close(loss, ref["loss"].detach())
        rows = slice(3 * rank, 3 * rank + 3)
        for g_local, g_ref in zip(local_grads, grads):
            torch.testing.assert_close(g_local, g_ref[rows])
        expected_targets = torch.cat([ref["targets"][:6][rows], ref["targets"][6:][rows]])
        torch.testing.assert_close(targets, expected_targets)
