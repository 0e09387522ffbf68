import pytest
import torch
from torch import nn

from ssl_modules.optimization.optimizers import LARS, build_optimizer, parameter_groups


def test_parameter_groups_keep_biases_and_norms_out_of_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].bias.requires_grad_(False)
    groups = parameter_groups(model.named_parameters(), 0.05)
    decayed, not_decayed = groups
    assert decayed["params"] == [model[0].weight] and decayed["weight_decay"] == 0.05
    assert not_decayed["params"] == [model[1].weight, model[1].bias] and not_decayed["weight_decay"] == 0.0
    assert not_decayed["lars_exclude"] and not decayed["lars_exclude"]


def test_lars_matches_the_official_rule():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, eta=0.01)
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # step 1: mu = u; step 2: mu = 0.9 mu + u(p1)
    def update(p):
        u = gw + 0.1 * p
        return u * 0.01 * p.norm() / u.norm()
    mu1 = update(w0)
    w1 = w0 - 0.5 * mu1
    mu2 = 0.9 * mu1 + update(w1)
    torch.testing.assert_close(w.detach(), w1 - 0.5 * mu2)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb))


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("adam", [{"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1)
