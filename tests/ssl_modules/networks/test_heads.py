import pytest
import torch
from torch import nn

from ssl_modules.networks.heads import MLP, DINOHead, LocalProjector, NormalizedLinear, parse_widths


def test_parse_widths_accepts_the_official_spelling():
    assert parse_widths("8192-8192-8192") == [8192, 8192, 8192]
    with pytest.raises(ValueError):
        parse_widths("0-4")


def test_vicregl_expander_layout():
    mlp = MLP(16, "32-32-8", norm="batch", activation="relu", last_bias=False)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp[-1].bias is None and mlp(torch.randn(4, 16)).shape == (4, 8)


def test_bam_projector_with_nonaffine_output_norm():
    mlp = MLP(8, [16, 16, 4], norm="batch", activation="gelu", last_norm="batch_nonaffine", init="trunc_normal")
    assert isinstance(mlp[-1], nn.BatchNorm1d) and not mlp[-1].affine
    assert torch.count_nonzero(mlp[0].bias) == 0


def test_local_projector_statistics_span_all_cells():
    torch.manual_seed(0)
    proj = LocalProjector(6, "12-5", norm="batch")
    maps = torch.randn(3, 7, 6)
    out = proj(maps)
    flat = proj(maps.reshape(21, 6)).reshape(3, 7, 5)
    assert out.shape == (3, 7, 5)
    torch.testing.assert_close(out, flat)


def test_normalized_linear_is_weight_normalised_and_frozen_by_default():
    layer = NormalizedLinear(4, 3)
    assert not layer.weight_g.requires_grad
    x = torch.randn(2, 4)
    weight = layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ weight.T)
    assert NormalizedLinear(4, 3, norm_last_layer=False).weight_g.requires_grad


def test_dino_head_shapes_and_bottleneck_is_unit_norm():
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head.bottleneck(x).norm(dim=-1), torch.ones(5))
    assert head(x).shape == (5, 32)
