"""Official checkpoints in and out: each method's layout written from a module, read back exactly."""
import pytest
import torch

from support.common import TINY_VIT
from ssl_modules.networks.backbones import Backbone
from ssl_modules.methods.bam import BAM
from ssl_modules.methods.cribo import CrIBo
from ssl_modules.methods.official import (
    detect_method, load_backbone_weights, load_official, official_state, save_official,
)
from ssl_modules.methods.vicregl import VICRegL

CRIBO = dict(backbone_kwargs=dict(TINY_VIT), out_dim=128, object_out_dim=96, head_hidden_dim=64,
             head_bottleneck_dim=32, num_clusters=4, queue_size=64)


def _perturbed(module):
    """Make the teacher, the centers and the bank differ from the student and from a fresh module, so a
    load that puts a tensor in the wrong place or keeps the fresh one fails."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and (name.startswith("teacher.") or name in ("center", "object_center")):
                tensor.add_(torch.randn_like(tensor))
        bank = getattr(module, "memory_bank", None)
        if bank is not None:
            reference = bank.logical()
            bank.load_logical_(reference["bank"] + torch.rand_like(reference["bank"]),
                               torch.randint(0, 4, reference["counts"].shape))
    return module


def _assert_same_state(loaded, source, keys=None):
    """Every tensor equal; CrIBo's bank in its official layout, to float rounding (the ring buffer keeps
    unit keys and norms, rebuilt from the official raw rows)."""
    ours, theirs = loaded.state_dict(), source.state_dict()
    for key in keys or theirs:
        if not key.startswith("memory_bank."):
            assert torch.equal(ours[key], theirs[key]), key
    if keys is None and hasattr(source, "memory_bank"):
        mine, reference = loaded.memory_bank.logical(), source.memory_bank.logical()
        assert torch.equal(mine["counts"], reference["counts"])
        torch.testing.assert_close(mine["bank"], reference["bank"], rtol=1e-6, atol=1e-7)


def test_cribo_checkpoint_round_trip_in_the_official_layout(tmp_path):
    source = _perturbed(CrIBo("vit_tiny_patch16_224", **CRIBO))
    path = save_official(source, tmp_path / "checkpoint.pth")
    checkpoint = torch.load(path, weights_only=True)
    assert {"student", "teacher", "dino_loss", "centroids_queue_cpu", "cpv_queue_cpu",
            "cls_queue_cpu"} <= set(checkpoint)
    assert "module.backbone.blocks.1.attn.qkv.weight" in checkpoint["student"]
    assert {"head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight",
            "head.last_layer_c.weight_g"} <= set(checkpoint["teacher"])
    assert checkpoint["cpv_queue_cpu"].dtype == torch.int32 and checkpoint["centroids_queue_cpu"].shape == (2, 256, 64)
    loaded = load_official(path, backbone="vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    assert isinstance(loaded, CrIBo) and loaded.hparams.object_out_dim == 96 and loaded.hparams.queue_size == 64
    _assert_same_state(loaded, source)


def test_cribo_checkpoint_without_centers_and_bank_keeps_the_modules_own(tmp_path):
    source = _perturbed(CrIBo("vit_tiny_patch16_224", **CRIBO))
    checkpoint = official_state(source)
    for entry in ("dino_loss", "centroids_queue_cpu", "cpv_queue_cpu", "cls_queue_cpu"):
        del checkpoint[entry]
    torch.save(checkpoint, tmp_path / "networks.pth")
    target = CrIBo("vit_tiny_patch16_224", **CRIBO)
    fresh_bank = target.memory_bank.logical()["bank"]
    load_official(tmp_path / "networks.pth", module=target)
    assert torch.equal(target.memory_bank.logical()["bank"], fresh_bank)
    _assert_same_state(target, source,
                       [k for k in source.state_dict() if k.startswith(("backbone.", "teacher.", "head."))])


def test_bam_checkpoint_round_trip_in_the_official_layout(tmp_path):
    source = _perturbed(BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="48-48-32"))
    path = save_official(source, tmp_path / "bam.pth")
    model = torch.load(path, weights_only=True)["model"]
    assert {"student.module.backbone.pos_embed", "student.module.proj_head.projector.4.weight",
            "teacher.backbone.cls_token", "teacher.proj_head.projector.2.bias"} <= set(model)
    assert detect_method(torch.load(path, weights_only=True)) == "bam"
    loaded = load_official(path, backbone="vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    assert isinstance(loaded, BAM) and loaded.hparams.projector_widths == "48-48-32"
    _assert_same_state(loaded, source)


def test_vicregl_convnext_checkpoint_uses_the_official_convnext_names(tmp_path):
    source = VICRegL("convnext_atto", expander_widths="64-64", projector_widths="32-32")
    path = save_official(source, tmp_path / "model.pth", classifier_classes=10)
    model = torch.load(path, weights_only=True)["model"]
    assert {"module.backbone.downsample_layers.0.0.weight", "module.backbone.downsample_layers.1.1.weight",
            "module.backbone.stages.2.0.pwconv1.weight", "module.backbone.norm.weight",
            "module.projector.1.weight", "module.maps_projector.3.weight", "module.classifier.weight"} <= set(model)
    assert not any("gamma" in key for key in model)  # the official ConvNeXt has no layer scale
    loaded = load_official(path, backbone="convnext_atto")
    assert isinstance(loaded, VICRegL) and loaded.hparams.expander_widths == "64-64"
    _assert_same_state(loaded, source)


def test_vicregl_resnet_with_batchnorm_heads_round_trip(tmp_path):
    source = VICRegL("resnet18", expander_widths="64-64", projector_widths="32-32", optimizer="lars", weight_decay=1e-6)
    with torch.no_grad():
        source.expander[1].running_mean.normal_()
    path = save_official(source, tmp_path / "model.pth")
    assert "module.projector.1.running_var" in torch.load(path, weights_only=True)["model"]
    loaded = load_official(path, backbone="resnet18", optimizer="lars", weight_decay=1e-6)
    _assert_same_state(loaded, source)


def test_a_missing_or_extra_key_is_a_clear_error(tmp_path):
    source = CrIBo("vit_tiny_patch16_224", **CRIBO)
    checkpoint = official_state(source)
    del checkpoint["student"]["module.head.mlp.2.bias"]
    torch.save(checkpoint, tmp_path / "missing.pth")
    with pytest.raises(ValueError,
                       match=r"missing\.pth.*missing student\['module\.head\.mlp\.2\.bias'\]; unexpected nothing"):
        load_official(tmp_path / "missing.pth", module=CrIBo("vit_tiny_patch16_224", **CRIBO))
    checkpoint = official_state(source)
    checkpoint["teacher"]["head.extra_layer.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"missing nothing; unexpected teacher\['head\.extra_layer\.weight'\]"):
        load_official(tmp_path / "extra.pth", module=CrIBo("vit_tiny_patch16_224", **CRIBO))


def test_other_shapes_are_a_clear_error(tmp_path):
    save_official(CrIBo("vit_tiny_patch16_224", **CRIBO), tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"other shapes.*last_layer_c.weight_v.*\(96, 32\) vs \(128, 32\)"):
        load_official(tmp_path / "checkpoint.pth",
                      module=CrIBo("vit_tiny_patch16_224", **{**CRIBO, "object_out_dim": 128}))


def test_the_vit_backbone_is_read_from_the_checkpoint_shapes(tmp_path):
    kwargs = {**CRIBO, "backbone_kwargs": dict(depth=1, img_size=32, patch_size=8)}
    source = CrIBo("vit_small_patch16_224", **kwargs)
    save_official(source, tmp_path / "checkpoint.pth")
    loaded = load_official(tmp_path / "checkpoint.pth")
    assert loaded.backbone.name == "vit_small_patch16_224" and len(loaded.backbone.model.blocks) == 1
    _assert_same_state(loaded, source)


def test_backbone_files_load_directly(tmp_path):
    cribo = _perturbed(CrIBo("vit_tiny_patch16_224", **CRIBO))
    save_official(cribo, tmp_path / "checkpoint.pth")
    teacher = load_backbone_weights(tmp_path / "checkpoint.pth", "vit_tiny_patch16_224", **TINY_VIT)
    for key, value in cribo.teacher["backbone"].model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value), key
    vicregl = VICRegL("convnext_atto", expander_widths="64-64", projector_widths="32-32")
    save_official(vicregl, tmp_path / "model.pth")
    released = {k.removeprefix("module.backbone."): v for k, v in torch.load(tmp_path / "model.pth")["model"].items()
                if k.startswith("module.backbone.")}
    torch.save(released, tmp_path / "convnext_atto_alpha0.75.pth")  # the released files: the bare backbone
    backbone = Backbone("convnext_atto", layer_scale=False, global_pool="cell_norm_mean",
                        weights=tmp_path / "convnext_atto_alpha0.75.pth").eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone(images).global_, vicregl.backbone.eval()(images).global_, rtol=0, atol=0)
    exported = vicregl.export_backbone(tmp_path / "backbone.pt")  # the library's own export too
    assert torch.equal(Backbone("convnext_atto", layer_scale=False, weights=exported).model.stem[0].weight,
                       vicregl.backbone.model.stem[0].weight)


def test_a_backbone_file_that_does_not_fit_names_the_file(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth: official weights do not fit vit_tiny_patch16_224"):
        load_backbone_weights(tmp_path / "wrong.pth", "vit_tiny_patch16_224", **TINY_VIT)


def test_an_unknown_layout_asks_for_the_method(tmp_path):
    torch.save({"something": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an official CrIBo, BAM or VICRegL checkpoint.*pass method="):
        load_official(tmp_path / "other.pth")


def test_an_official_checkpoint_exports_to_timm(tmp_path):
    import json
    import timm
    from ssl_modules.methods.official import export_official
    source = _perturbed(BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="32-32"))
    save_official(source, tmp_path / "bam.pth")
    out = export_official(tmp_path / "bam.pth", tmp_path / "backbone.pt", backbone="vit_tiny_patch16_224",
                          backbone_kwargs=dict(TINY_VIT))
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.equal(model.cls_token, source.teacher["backbone"].model.cls_token)


@pytest.mark.parametrize("name", ["convnext_atto", "resnet18"])
def test_the_vicregl_cnn_is_read_from_the_checkpoint_shapes(tmp_path, name):
    source = VICRegL(name, expander_widths="64-64", projector_widths="32-32")
    save_official(source, tmp_path / "model.pth")
    loaded = load_official(tmp_path / "model.pth")
    assert loaded.backbone.name == name
    _assert_same_state(loaded, source)


def test_the_export_command_writes_an_official_checkpoints_teacher_backbone_for_timm(tmp_path):
    import json

    import timm

    from ssl_modules.cli import main

    source = _perturbed(CrIBo("vit_tiny_patch16_224", **CRIBO))
    path = save_official(source, tmp_path / "checkpoint.pth")
    assert main(["export", str(path), str(tmp_path / "plain.pt")]) == 1  # not a Lightning checkpoint: a hint
    assert main(["export", str(path), str(tmp_path / "backbone.pt"), "--official", "auto",
                 "--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(TINY_VIT)]) == 0
    meta = json.loads((tmp_path / "backbone.json").read_text())
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True))
    teacher = source.teacher["backbone"].model.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())


def test_a_plain_export_of_an_official_checkpoint_says_to_use_official(tmp_path, capsys):
    from ssl_modules.cli import main

    path = save_official(CrIBo("vit_tiny_patch16_224", **CRIBO), tmp_path / "checkpoint.pth")
    assert main(["export", str(path), str(tmp_path / "out.pt")]) == 1
    assert "--official auto" in capsys.readouterr().err
