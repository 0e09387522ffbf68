"""The one export writer: the ``.pt`` + ``.json`` layout and the folder timm loads by name
(``timm.create_model("local-dir:<folder>", pretrained=True)``, offline), one finiteness check for every export
(module, checkpoint), and the readers of both layouts (``evaluate``'s model sources, ``load_backbone_weights``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from support.common import TINY_VIT

from ssl_modules.checkpoints.export import (
    ExportLayoutError,
    NonFiniteWeightsError,
    export_from_checkpoint,
    export_layout,
    read_export,
)
from ssl_modules.evaluation.sources import ModelSourceError, load_backbone, load_exported_backbone
from ssl_modules.methods.base import SSLModule
from ssl_modules.methods.official import load_backbone_weights


@pytest.fixture(scope="module")
def trained() -> SSLModule:
    """A tiny ViT module whose weights differ from any fresh initialisation."""
    torch.manual_seed(0)
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    with torch.no_grad():
        for param in module.backbone.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return module.eval()


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)


@pytest.mark.parametrize(("output", "layout"), [("backbone.pt", "file"), ("weights.pth", "file"), ("exports", "folder"),
                                                ("exports/", "folder"), ("v1.2/", "folder")])
def test_the_output_path_names_the_layout(output, layout):
    assert export_layout(output) == layout


def test_an_output_with_another_suffix_is_refused_naming_both_layouts(tmp_path):
    with pytest.raises(ExportLayoutError, match=r"name a \.pt file .*backbone\.pt.* or a folder .*backbone/"):
        export_layout(tmp_path / "backbone.safetensors")


def test_timm_builds_the_exported_folder_by_name_with_the_same_outputs(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = trained.export_backbone(tmp_path / "vit")
    assert folder == tmp_path / "vit" and sorted(p.name for p in folder.iterdir()) == ["config.json",
                                                                                      "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformer" and model.num_classes == 0
    assert (model.patch_embed.patch_size, len(model.blocks), model.embed_dim) == ((8, 8), 2, 64)
    assert model.blocks[0].attn.num_heads == 2 and model.patch_embed.img_size == (32, 32)
    images = torch.randn(2, 3, 32, 32)
    source = trained.embedding_backbone
    assert torch.equal(features(model, images), features(source.model, images))
    with torch.no_grad():
        assert torch.equal(model(images), source(images).global_)  # the pooled CLS token, as embed() gives it
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 2
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and config["pretrained_cfg"]["input_size"] == [3,
                                                                                                                 32, 32]


def test_a_pt_path_keeps_the_state_dict_and_json_layout(trained, tmp_path):
    path = trained.export_backbone(tmp_path / "backbone.pt")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"name": "vit_tiny_patch16_224", "model_kwargs": {**TINY_VIT, "dynamic_img_size": True,
                                                                    "num_classes": 0}}
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(features(model.eval(), images), features(trained.embedding_backbone.model, images))


@pytest.mark.parametrize("output", ["backbone.pt", "folder"])
def test_one_finiteness_check_refuses_every_export_before_writing(output, tmp_path):
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    with torch.no_grad():
        module.backbone.model.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"1 tensors: blocks\.1\.mlp\.fc1\.weight\): export to .* refused"):
        module.export_backbone(tmp_path / output)
    checkpoint = _checkpoint_of(module)
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.1\.mlp\.fc1\.weight\): export to .* refused"):
        export_from_checkpoint(checkpoint, tmp_path / output)
    assert not list(tmp_path.iterdir())


def _checkpoint_of(module: SSLModule) -> dict:
    """What a Lightning checkpoint of ``module`` holds for an export (the entries ``on_save_checkpoint`` adds)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_an_export_from_a_checkpoint_equals_the_modules_own(trained, tmp_path):
    from_module = trained.export_backbone(tmp_path / "module")
    from_checkpoint = export_from_checkpoint(_checkpoint_of(trained), tmp_path / "checkpoint")
    assert (from_module / "config.json").read_text() == (from_checkpoint / "config.json").read_text()
    _, _, a = read_export(from_module)
    _, _, b = read_export(from_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("output", ["backbone.pt", "folder"])
def test_evaluate_and_load_backbone_weights_read_both_layouts(output, trained, tmp_path):
    path = trained.export_backbone(tmp_path / output)
    images = torch.randn(2, 3, 32, 32)
    expected = trained.embedding_backbone(images).global_
    sources = [load_backbone(path), load_backbone_weights(path), load_backbone_weights(path, "vit_tiny_patch16_224"),
               load_exported_backbone(path)]
    if output == "folder":
        sources.append(load_backbone(f"local-dir:{path}"))
    with torch.no_grad():
        for backbone in sources:
            assert torch.equal(backbone.eval()(images).global_, expected)


def test_a_folder_without_an_export_says_what_one_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="config.json and model.safetensors"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(ModelSourceError, match="no export folder"):
        load_backbone(f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(ModelSourceError, match=r"model\.safetensors not found"):
        load_backbone(Path(tmp_path / "half"))
