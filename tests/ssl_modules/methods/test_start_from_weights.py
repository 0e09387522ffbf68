"""Starting a run from foundation weights: DINOv2 (registers, patch 14) and DINOv3 (RoPE, registers) ViTs in
every method, the teacher equal to the student at step 0, layer-wise decay, frozen blocks, and a resume that
cannot be confused with an initialisation."""
from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from ssl_modules import BAM, CrIBo, SSLModule, VICRegL
from ssl_modules.networks.backbones import Backbone
from ssl_modules.testing import random_views

ARCHS = {  # name, timm kwargs, global crop, local crop
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=64, num_heads=2), 56, 28),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=32, depth=2, embed_dim=64, num_heads=2), 64, 32),
}
METHODS = {
    "cribo": (CrIBo, dict(out_dim=64, object_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32,
                          num_clusters=4, queue_size=16), 2),
    "bam": (BAM, dict(projector_widths="64-64-32", top_k=8, mocov3_vit=False), 3),
    "vicregl": (VICRegL, dict(expander_widths="64-64-64", projector_widths="32-32-32", num_matches=(2, 1)), 3),
}


def write_random_weights(path, name, kwargs, seed=0):
    """A timm model of the architecture with random weights (not timm's init: every value drawn) saved to ``path``."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=0, **kwargs)
    state = {k: torch.randn_like(v) * 0.02 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def assert_backbone_equals(backbone: Backbone, state):
    own = backbone.model.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def fit_steps(module, views, steps=2, **trainer):
    loader = DataLoader(range(steps), batch_size=None, collate_fn=lambda _: views)
    pl.Trainer(max_steps=steps, **quiet_trainer_kwargs(**trainer)).fit(module, loader)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_from_a_saved_foundation_vit_with_teacher_and_student_equal_to_the_file(tmp_path, arch, method):
    name, kwargs, global_size, local_size = ARCHS[arch]
    cls, options, num_views = METHODS[method]
    path = tmp_path / ("weights.safetensors" if arch == "dinov2" else "weights.pt")
    state = write_random_weights(path, name, kwargs)
    module = cls(name, backbone_kwargs=dict(kwargs), backbone_weights=str(path), **options)
    assert_backbone_equals(module.backbone, state)
    if getattr(module, "has_teacher", False):
        assert_backbone_equals(module.teacher["backbone"], state)
    assert module.backbone_source["kind"] == "file" and module.backbone_source["location"] == str(path.resolve())
    sizes = [global_size, global_size, local_size][:num_views]
    views = random_views(4, sizes)
    features = module.embed(views.crops[0].float())
    grid = global_size // module.backbone.stride
    assert features.dense.shape[1] == grid * grid  # registers and CLS never count as patches
    before = {k: v.clone() for k, v in module.backbone.model.state_dict().items()}
    fit_steps(module, views)
    after = module.backbone.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student trained


def test_official_dinov2_names_and_a_larger_position_grid_are_converted_and_resampled(tmp_path):
    name, kwargs, _, _ = ARCHS["dinov2"]
    source = timm.create_model(name, num_classes=0, **{**kwargs, "img_size": 70})  # a 5x5 grid, as 518 px is 37x37
    state = dict(source.state_dict())
    official = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if "swiglu" in k else k: v
                for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = state["reg_token"]
    official["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), state["pos_embed"]], dim=1)  # DINOv2 keeps a CLS slot
    official["cls_token"] = state["cls_token"]
    official["mask_token"] = torch.zeros(1, 64)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, tmp_path / "teacher_checkpoint.pth")
    module = CrIBo(name, backbone_kwargs=dict(kwargs), backbone_weights=str(tmp_path / "teacher_checkpoint.pth"),
                   **METHODS["cribo"][1])
    loaded = module.backbone.model.state_dict()
    torch.testing.assert_close(loaded["reg_token"], state["reg_token"])
    torch.testing.assert_close(loaded["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    assert loaded["pos_embed"].shape == (1, 4, 64)  # resampled from 5x5 to the model's 2x2 grid
    assert_backbone_equals(module.teacher["backbone"], loaded)


def test_an_export_folder_and_a_library_checkpoint_are_starting_points(tmp_path):
    first = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), **METHODS["cribo"][1])
    fit_steps(first, random_views(4, [32, 32]), enable_checkpointing=True, default_root_dir=tmp_path)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    folder = first.export_backbone(tmp_path / "export")
    teacher = first.teacher["backbone"].model.state_dict()
    for source in (folder, checkpoint):
        module = BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), backbone_weights=str(source),
                     **METHODS["bam"][1])
        assert_backbone_equals(module.backbone, teacher)  # the teacher's backbone, where the run has one


def test_timm_name_source_reads_a_local_timm_folder(tmp_path):
    first = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), **METHODS["cribo"][1])
    folder = first.export_backbone(tmp_path / "export")
    module = VICRegL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT),
                     backbone_weights=f"timm:local-dir:{folder}", **METHODS["vicregl"][1])
    assert module.backbone_source["kind"] == "timm"
    assert_backbone_equals(module.backbone, first.teacher["backbone"].model.state_dict())


def test_missing_weights_name_the_source_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file or folder.*--ckpt_path"):
        CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), backbone_weights=str(tmp_path / "nope.pt"),
              **METHODS["cribo"][1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        CrIBo("vit_small_patch14_reg4_dinov2", backbone_kwargs=dict(ARCHS["dinov2"][1]),
              backbone_weights="timm:vit_small_patch14_reg4_dinov2.lvd142m", **METHODS["cribo"][1])


def test_weights_of_another_architecture_are_refused_with_the_architecture_named(tmp_path):
    write_random_weights(tmp_path / "w.safetensors", *ARCHS["dinov3"][:2])
    with pytest.raises(ValueError, match="do not fit backbone vit_small_patch14_reg4_dinov2"):
        CrIBo(ARCHS["dinov2"][0], backbone_kwargs=dict(ARCHS["dinov2"][1]),
              backbone_weights=str(tmp_path / "w.safetensors"), **METHODS["cribo"][1])


# ------------------------------------------------------------------------------------ resume vs start
def checkpointed_run(root, **options):
    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), **METHODS["cribo"][1], **options)
    fit_steps(module, random_views(4, [32, 32]), enable_checkpointing=True, default_root_dir=root)
    return next(root.rglob("*.ckpt"))


def resume(checkpoint, steps=3, **options):
    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), **METHODS["cribo"][1], **options)
    loader = DataLoader(range(steps), batch_size=None, collate_fn=lambda _: random_views(4, [32, 32]))
    trainer = pl.Trainer(max_steps=steps, **quiet_trainer_kwargs())
    trainer.fit(module, loader, ckpt_path=str(checkpoint))
    return trainer


def test_the_same_file_as_ckpt_path_and_backbone_weights_is_refused(tmp_path):
    checkpoint = checkpointed_run(tmp_path)
    with pytest.raises(ValueError, match="both --ckpt_path and backbone_weights"):
        resume(checkpoint, backbone_weights=str(checkpoint))


def test_resuming_a_run_with_other_starting_weights_is_refused_and_the_same_weights_resume(tmp_path):
    weights = tmp_path / "start.safetensors"
    write_random_weights(weights, "vit_tiny_patch16_224", TINY_VIT)
    from_weights = checkpointed_run(tmp_path / "a", backbone_weights=str(weights))
    from_scratch = checkpointed_run(tmp_path / "b")
    with pytest.raises(ValueError, match="started from random initialisation.*backbone_weights"):
        resume(from_scratch, backbone_weights=str(weights))
    other = tmp_path / "other.safetensors"
    write_random_weights(other, "vit_tiny_patch16_224", TINY_VIT, seed=1)
    with pytest.raises(ValueError, match="started from backbone_weights .*start.safetensors"):
        resume(from_weights, backbone_weights=str(other))
    assert resume(from_weights, backbone_weights=str(weights)).global_step == 3
    assert resume(from_weights).global_step == 3  # without backbone_weights: the checkpoint holds the weights


def test_a_checkpoint_of_a_run_from_weights_loads_without_the_weights_file(tmp_path):
    weights = tmp_path / "start.safetensors"
    write_random_weights(weights, "vit_tiny_patch16_224", TINY_VIT)
    checkpoint = checkpointed_run(tmp_path / "run", backbone_weights=str(weights))
    record = torch.load(checkpoint, weights_only=False)["ssl_module_backbone_source"]
    weights.unlink()
    module = SSLModule.load_any(checkpoint)
    assert module.backbone_source == record and module.hparams.backbone_weights == str(weights)


# ------------------------------------------------------------------------- layer decay and freezing
def test_layer_decay_scales_each_block_and_leaves_the_heads_at_the_scheduled_rate():
    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), layer_decay=0.5, **METHODS["cribo"][1])
    optimizer = module.configure_optimizers()
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert scale_of[id(named["backbone.model.patch_embed.proj.weight"])] == 0.5 ** 3  # stem: 3 layers below the top
    assert scale_of[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == 0.5 ** 2
    assert scale_of[id(named["backbone.model.blocks.1.attn.qkv.weight"])] == 0.5
    assert scale_of[id(named["head.mlp.0.weight"])] == 1.0
    values = {"lr": 1e-3, "last_layer_lr": 2e-3, "weight_decay": 0.1}
    SSLModule.apply_schedules(SimpleNamespace(trainer=SimpleNamespace(optimizers=[optimizer])), values)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(values[group["lr_schedule"]] * group["lr_scale"])


def test_freezing_the_first_blocks_keeps_them_out_of_the_optimizer_and_unchanged(tmp_path):
    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), freeze_blocks=1, **METHODS["cribo"][1])
    frozen = {n for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert "model.patch_embed.proj.weight" in frozen and "model.blocks.0.mlp.fc1.weight" in frozen
    assert not any(n.startswith("model.blocks.1.") for n in frozen)
    optimized = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert not any(id(p) in optimized for n, p in module.backbone.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    fit_steps(module, random_views(4, [32, 32]))
    after = dict(module.backbone.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["model.blocks.1.mlp.fc1.weight"], after["model.blocks.1.mlp.fc1.weight"])
    teacher = dict(module.teacher["backbone"].named_parameters())
    assert all(torch.equal(teacher[n], after[n]) for n in frozen)


def test_impossible_decay_and_freezing_are_refused():
    with pytest.raises(ValueError, match="layer_decay=1.5 must be in \\(0, 1\\]"):
        CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), layer_decay=1.5, **METHODS["cribo"][1])
    with pytest.raises(ValueError, match="freeze_blocks=3: .* has 2 blocks"):
        CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), freeze_blocks=3, **METHODS["cribo"][1])
