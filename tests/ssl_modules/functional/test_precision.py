"""ssl_modules.functional owns precision: every public function runs in at least float32, autocast off."""
import pytest
import torch

import ssl_modules.functional as functional
from ssl_modules.functional import cribo_object_loss, joint_space_clustering, vicreg_loss
from ssl_modules.functional.precision import at_least_float32

DATA_MOVES = {"memory_bank_enqueue", "memory_bank_enqueue_padded"}  # rows moved, no arithmetic


@pytest.mark.parametrize("name", sorted(set(functional.__all__) - DATA_MOVES))
def test_every_public_function_is_wrapped_by_the_precision_helper(name):
    assert hasattr(getattr(functional, name), "__wrapped__"), f"{name} is not decorated with @full_precision"


def test_half_tensors_are_upcast_inside_lists_and_tuples_and_the_rest_is_kept():
    half, double, index = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), torch.arange(2)
    out = at_least_float32(([half, double], (index, 3)))
    assert [t.dtype for t in out[0]] == [torch.float32, torch.float64]
    assert out[1][0] is index and out[1][1] == 3


def _logits(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 16, generator=generator) for _ in range(2)]


def test_a_loss_under_autocast_equals_the_float32_loss_exactly():
    student, teacher, center = _logits(0), _logits(1), torch.zeros(16)
    z = [torch.randn(8, 32, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    expected = cribo_object_loss(student, teacher, center, 0.04), vicreg_loss(*z)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cribo_object_loss(student, teacher, center, 0.04), vicreg_loss(*z)["loss"]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_gradients_reach_half_precision_inputs_in_their_dtype():
    student = [s.bfloat16().requires_grad_() for s in _logits(0)]
    loss = cribo_object_loss(student, _logits(1), torch.zeros(16), 0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and student[0].grad.dtype == torch.bfloat16


def test_clustering_of_bfloat16_tokens_equals_clustering_of_their_float32_values():
    generator = torch.Generator().manual_seed(0)
    dense = [torch.randn(2, 9, 8, generator=generator).bfloat16() for _ in range(2)]
    positions = [torch.rand(2, 9, 2, generator=generator) * 100 for _ in range(2)]
    init = torch.rand(2, 18, generator=generator).argsort(1)[:, :4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = joint_space_clustering(dense, positions, init)["labels"]
    full = joint_space_clustering([d.float() for d in dense], positions, init)["labels"]
    assert torch.equal(half, full)
