import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from support.common import quiet_trainer_kwargs
from support.distributed_utils import run_distributed
from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone
from ssl_modules.methods.local_matching import cell_locations
from ssl_modules.testing import random_views
from ssl_modules.methods.vicregl import VICRegL

TINY = dict(num_matches=(3, 2), expander_widths="64-64-64", projector_widths="32-32-32")


def tiny_convnext(**overrides):
    kwargs = dict(TINY, backbone_kwargs=dict(drop_path_rate=0.0))
    kwargs.update(overrides)
    return VICRegL("convnext_atto", **kwargs)


def test_convnext_follows_the_official_backbone():
    module = tiny_convnext()
    assert module.backbone.global_pool == "cell_norm_mean"
    assert not any(k.endswith("gamma") for k in module.state_dict())
    assert isinstance(module.expander[1], torch.nn.LayerNorm) and module.concat_views


def test_resnet_uses_batchnorm_heads_and_one_call_per_view():
    module = VICRegL("resnet18", **TINY)
    assert isinstance(module.expander[1], torch.nn.BatchNorm1d) and not module.concat_views
    calls = []
    module.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    module.training_step(random_views(4, [64, 64]), 0)
    assert calls == [4, 4]


def test_alpha_one_builds_no_local_projector_and_is_vicreg():
    module = tiny_convnext(alpha=1.0)
    assert module.projector is None
    views = random_views(4, [64, 64])
    loss = module.training_step(views, 0)["loss"]
    feats = [module(c) for c in views.crops]
    from ssl_modules.functional import vicreg_loss
    expected = vicreg_loss(module.expander(feats[0].global_), module.expander(feats[1].global_))["loss"]
    torch.testing.assert_close(loss, expected)


def test_trains_through_a_trainer_with_multicrop():
    module = tiny_convnext(warmup_epochs=0.0, lr=1e-2)
    views = random_views(8, [64, 64, 64, 64])
    loader = DataLoader(range(3), batch_size=None, collate_fn=lambda _: views)
    before = module.backbone.model.stem[0].weight.detach().clone()
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=1)).fit(module, loader)
    assert not torch.equal(before, module.backbone.model.stem[0].weight)


def test_flip_aware_locations_follow_the_flags():
    views = random_views(2, [64, 64])
    views = views._replace(flipped=torch.tensor([[True, False], [False, False]]))
    aware = cell_locations(views, 0, (2, 2), flip_aware=True)
    plain = cell_locations(views, 0, (2, 2), flip_aware=False)
    torch.testing.assert_close(aware[0], plain[0].reshape(2, 2, 2).flip(1).reshape(4, 2))
    torch.testing.assert_close(aware[1], plain[1])


def test_more_matches_than_cells_is_a_clear_error():
    module = tiny_convnext(num_matches=(5, 2))
    with pytest.raises(ValueError, match="num_matches must be an int in \\[1, 4\\]"):
        module.training_step(random_views(4, [64, 64]), 0)


def test_a_one_by_one_feature_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="1x1 feature map.*at least 64 px"):
        tiny_convnext().training_step(random_views(4, [32, 32]), 0)


def test_a_global_batch_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 images in the global batch"):
        tiny_convnext().training_step(random_views(1, [64, 64]), 0)


def test_official_resnet_state_dict_loads():
    official = torchvision.models.resnet18().state_dict()  # the official VICRegL ResNet uses this layout
    backbone = Backbone("resnet18")
    backbone.load_official_weights({f"module.backbone.{k}": v for k, v in official.items()},
                                   prefixes=("module.", "backbone."))
    torch.testing.assert_close(backbone.model.layer4[1].conv2.weight, official["layer4.1.conv2.weight"])


def _official_convnext_keys(timm_state: dict) -> dict:
    """The official ConvNeXt names (facebookresearch/ConvNeXt, VICRegL's convnext.py) of a timm state dict."""
    import re
    out = {}
    for key, value in timm_state.items():
        if key.startswith("head.fc"):
            continue
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm", "norm")
        if "pwconv" in key and value.ndim == 4:
            value = value.flatten(1)
        out[key] = value
    return out


def test_official_convnext_state_dict_without_layer_scale_loads():
    source = Backbone("convnext_atto", layer_scale=False, global_pool="cell_norm_mean")
    official = _official_convnext_keys(source.model.state_dict())
    assert "downsample_layers.1.1.weight" in official and "stages.2.3.pwconv1.weight" in official
    target = tiny_convnext().backbone
    target.load_official_weights(official)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(target.eval()(images).global_, source.eval()(images).global_)


def _vicregl_rank(rank, world_size, full_views, seed):
    torch.manual_seed(seed)
    module = tiny_convnext().double()
    full_views = full_views._replace(crops=[c.double() for c in full_views.crops])
    batch = full_views.batch_size // world_size
    part = slice(rank * batch, (rank + 1) * batch)
    views = full_views._replace(crops=[c[part] for c in full_views.crops], boxes=full_views.boxes[part],
                                flipped=full_views.flipped[part], image_size=full_views.image_size[part],
                                label=full_views.label[part], index=full_views.index[part])
    loss = module.training_step(views, 0)["loss"]
    loss.backward()
    grads = {n: distributed.all_reduce(p.grad, "sum") / world_size
             for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_two_processes_equal_one_process_with_the_doubled_batch():
    views = random_views(8, [64, 64, 64], image_size=(300, 500), seed=3)
    results = run_distributed(_vicregl_rank, world_size=2, args=(views, 7))
    single_loss, single_grads = _vicregl_rank(0, 1, views, 7)
    for loss, grads in results:
        torch.testing.assert_close(loss, single_loss, rtol=1e-10, atol=1e-12)
        assert grads.keys() == single_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, single_grads[name], rtol=1e-8, atol=1e-12, msg=name)
