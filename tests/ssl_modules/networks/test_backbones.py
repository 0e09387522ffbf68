import pytest
import timm
import torch
from torch import nn

from support.common import TINY_VIT
from ssl_modules.networks.backbones import Backbone, Features, disable_stochastic_layers, is_vit_name


def test_vit_features_are_cls_and_patch_tokens():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT).eval()
    images = torch.randn(2, 3, 32, 32)
    feats = backbone(images)
    tokens = backbone.model.forward_features(images)
    assert isinstance(feats, Features)
    assert feats.grid == (4, 4)
    torch.testing.assert_close(feats.global_, tokens[:, 0])
    torch.testing.assert_close(feats.dense, tokens[:, 1:])


def test_vit_takes_crops_of_other_sizes():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    feats = backbone(torch.randn(3, 3, 16, 24))
    assert feats.dense.shape == (3, 2 * 3, 64) and feats.grid == (2, 3)


def test_vit_rejects_crops_that_do_not_fit_the_patch_size():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    with pytest.raises(ValueError, match="multiples of 8"):
        backbone(torch.randn(1, 3, 30, 32))


def test_crops_smaller_than_the_stride_are_rejected():
    backbone = Backbone("resnet18")
    with pytest.raises(ValueError, match="smaller than the stride 32"):
        backbone(torch.randn(1, 3, 16, 16))


def test_resnet_features_are_pooled_map_and_cells():
    backbone = Backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 96)
    feats = backbone(images)
    maps = backbone.model.forward_features(images)
    assert feats.grid == (2, 3) and backbone.has_batchnorm
    torch.testing.assert_close(feats.dense, maps.flatten(2).transpose(1, 2))
    torch.testing.assert_close(feats.global_, maps.mean(dim=(2, 3)))


def test_convnext_cell_norm_mean_normalises_cells_before_pooling():
    backbone = Backbone("convnext_atto", global_pool="cell_norm_mean").eval()
    images = torch.randn(2, 3, 64, 64)
    feats = backbone(images)
    cells = backbone.model.forward_features(images).flatten(2).transpose(1, 2)
    norm = backbone.model.head.norm
    expected = nn.functional.layer_norm(cells, (cells.shape[-1],), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(feats.dense, expected)
    torch.testing.assert_close(feats.global_, expected.mean(1))
    timm_pooled = Backbone("convnext_atto").eval()
    timm_pooled.load_state_dict(backbone.state_dict())
    assert not torch.allclose(timm_pooled(images).global_, feats.global_, atol=1e-3)


def test_layer_scale_can_be_removed():
    backbone = Backbone("convnext_atto", layer_scale=False)
    assert not any(name.endswith("gamma") for name in backbone.state_dict())
    assert backbone(torch.randn(1, 3, 32, 32)).global_.shape == (1, 320)
    with pytest.raises(ValueError, match="no layer-scale"):
        Backbone("resnet18", layer_scale=False)


def test_is_vit_name():
    assert is_vit_name("vit_small_patch16_224") and not is_vit_name("resnet50")


def test_disable_stochastic_layers():
    backbone = Backbone("vit_tiny_patch16_224", drop_path_rate=0.5, **TINY_VIT).train()
    disable_stochastic_layers(backbone)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone(x).global_, backbone(x).global_)


def test_timm_state_dict_loads_into_timm_strictly():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **backbone.model_kwargs)
    model.load_state_dict(backbone.timm_state_dict(), strict=True)


def test_dense_mean_pool_is_the_mean_of_the_dense_features():
    images = torch.randn(2, 3, 32, 32)
    for name, kwargs in (("vit_tiny_patch16_224", TINY_VIT), ("convnext_atto", {})):
        backbone = Backbone(name, global_pool="dense_mean", **kwargs).eval()
        features = backbone(images)
        torch.testing.assert_close(features.global_, features.dense.mean(dim=1))


# --------------------------------------------------------------------------- timm families (forward_intermediates)
_TINY_TOKENS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
FAMILIES = [  # (timm name, tiny kwargs, image size, expected grid, expected prefix tokens)
    ("vit_tiny_patch16_224", _TINY_TOKENS, 32, (4, 4), 1),
    ("deit_tiny_distilled_patch16_224", _TINY_TOKENS, 32, (4, 4), 2),
    ("beit_base_patch16_224", _TINY_TOKENS, 32, (4, 4), 1),
    ("eva02_tiny_patch14_224", _TINY_TOKENS, 32, (4, 4), 1),
    ("swin_tiny_patch4_window7_224",
     dict(img_size=32, patch_size=4, window_size=2, depths=(1, 1), num_heads=(2, 4), embed_dim=32), 32, (4, 4), 0),
    ("resnet18", {}, 64, (2, 2), 0),
    ("convnext_atto", {}, 64, (2, 2), 0),
    ("regnetx_002", {}, 64, (2, 2), 0),
    ("efficientnet_b0", {}, 64, (2, 2), 0),
]


@pytest.mark.parametrize("name,kwargs,size,grid,prefix", FAMILIES, ids=[f[0].split("_")[0] for f in FAMILIES])
def test_every_timm_family_gives_row_major_dense_maps_and_timms_pooled_vector(name, kwargs, size, grid, prefix):
    torch.manual_seed(0)
    backbone = Backbone(name, **kwargs).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = backbone(images)
        reference = timm.create_model(name, num_classes=0, **backbone.model_kwargs).eval()
        reference.load_state_dict(backbone.model.state_dict())
        pooled = reference(images)
        trunk = reference.forward_features(images)
    assert feats.grid == grid and backbone.num_prefix_tokens == prefix
    assert feats.dense.shape == (2, grid[0] * grid[1], backbone.num_features)
    torch.testing.assert_close(feats.global_, pooled)
    if trunk.ndim == 3:  # token models: the patch tokens after the prefix, in timm's order
        assert backbone.is_vit
        torch.testing.assert_close(feats.dense, trunk[:, prefix:])
    elif getattr(reference, "output_fmt", "NCHW") == "NHWC":  # Swin
        torch.testing.assert_close(feats.dense, trunk.flatten(1, 2))
    else:  # CNNs: the cells of the final map, row-major
        assert not backbone.is_vit
        torch.testing.assert_close(feats.dense, trunk.flatten(2).transpose(1, 2))


def test_beit_base_gives_patch_tokens_and_grid():
    backbone = Backbone("beit_base_patch16_224").eval()
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 224, 224))
    assert feats.dense.shape == (2, 196, 768) and feats.grid == (14, 14) and feats.global_.shape == (2, 768)


def test_vit_dense_map_follows_crop_size_with_several_prefix_tokens():
    backbone = Backbone("vit_tiny_patch16_224", reg_tokens=4, **TINY_VIT).eval()
    feats = backbone(torch.randn(1, 3, 16, 40))
    assert backbone.num_prefix_tokens == 5 and feats.grid == (2, 5) and feats.dense.shape == (1, 10, 64)


def test_unknown_backbone_name_lists_the_closest_timm_names():
    with pytest.raises(ValueError,
                       match=r"unknown backbone 'vit_smal_patch16_224'.*did you mean vit_small_patch16_224"):
        Backbone("vit_smal_patch16_224")
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5'.*resnet50"):
        is_vit_name("resnet5")


def test_pretrained_tags_are_known_names():
    assert is_vit_name("vit_small_patch16_224.dino")


def test_mocov3_needs_a_vision_transformer():
    with pytest.raises(ValueError, match="mocov3_vit=True needs a timm VisionTransformer"):
        Backbone("resnet18", mocov3_vit=True)
