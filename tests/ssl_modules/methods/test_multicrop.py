import pytest
import torch

from support.common import TINY_VIT
from ssl_modules.networks.backbones import Backbone
from ssl_modules.methods.multicrop import encode_views, resolution_groups


def test_resolution_groups_are_consecutive_equal_shapes():
    crops = [torch.zeros(2, 3, 32, 32)] * 2 + [torch.zeros(2, 3, 16, 16)] * 3
    assert resolution_groups(crops) == [[0, 1], [2, 3, 4]]


def test_grouped_encoding_equals_one_call_per_view_for_vits():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    calls = []

    def counting(images):
        calls.append(images.shape[0])
        return backbone(images)

    grouped = encode_views(counting, crops)
    assert calls == [4, 2]
    per_view = encode_views(counting, crops, per_view=True)
    assert calls[2:] == [2, 2, 2]
    for a, b in zip(grouped, per_view):
        torch.testing.assert_close(a.global_, b.global_, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.dense, b.dense, atol=1e-5, rtol=1e-5)
        assert a.grid == b.grid
    assert [f.grid for f in grouped] == [(4, 4), (4, 4), (2, 2)]


def test_views_with_different_batch_sizes_are_rejected():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    with pytest.raises(ValueError, match="same batch size"):
        encode_views(backbone, [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])
