"""Exported backbones load into ``timm.create_model(name, num_classes=0, **kwargs)`` strictly (a ``.pt``) and
into ``timm.create_model("local-dir:<folder>", pretrained=True)`` by name (a folder), from the Python API
(``SSLModule.export_backbone``) and from the command line (``python -m ssl_modules fit`` under DDP, then
``python -m ssl_modules export <ckpt> <out>``), for every method's backbone options (``tests/foundation``
covers a plain ViT; here: VICRegL's layer-scale-free ConvNeXt, BAM's MoCo v3 ViT, CrIBo's teacher ViT, a
BatchNorm ResNet)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from support.common import TINY_VIT
from support.example_testkit import run_python, synthetic_root  # noqa: F401

from ssl_modules.methods.bam import BAM
from ssl_modules.methods.cribo import CrIBo
from ssl_modules.methods.vicregl import VICRegL

MODULES = {
    "vicregl_convnext": lambda: VICRegL("convnext_atto", num_matches=(2, 1), expander_widths="32-32-32",
                                        projector_widths="16-16-16"),
    "vicregl_resnet": lambda: VICRegL("resnet18", optimizer="lars", expander_widths="32-32-32",
                                      projector_widths="16-16-16"),
    "bam_mocov3_vit": lambda: BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="32-32-16",
                                  top_k=4),
    "cribo_vit": lambda: CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=32, object_out_dim=32,
                               head_hidden_dim=32, head_bottleneck_dim=16, num_clusters=2, queue_size=4),
}


def load_exported(path: Path) -> torch.nn.Module:
    """The timm model the export's json names, with the exported weights loaded strictly."""
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model_kwargs"]["num_classes"] == 0
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
    return model.eval()


def load_exported_folder(folder: Path) -> torch.nn.Module:
    """The model timm builds from the export folder by itself (its config and weights), offline."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("layout", ["backbone.pt", "folder"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_export_backbone_loads_into_timm_strictly_and_computes_the_same_features(name, layout, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = MODULES[name]()
    source = module.embedding_backbone
    with torch.no_grad():  # make the exported (teacher) backbone differ from the student where there is one
        for param in source.parameters():
            param.add_(0.01 * torch.randn_like(param))
    path = module.export_backbone(tmp_path / layout)
    model = load_exported(path) if layout == "backbone.pt" else load_exported_folder(path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), source.eval().model.forward_features(images))
    if getattr(module, "has_teacher", False):
        student = dict(module.backbone.model.named_parameters())
        assert any(not torch.equal(p, student[n]) for n, p in model.named_parameters() if n in student)


CLI_CONFIG = """\
seed_everything: 0
trainer: {accelerator: cpu, devices: 2, strategy: ddp, max_steps: 2, limit_val_batches: 0,
          enable_progress_bar: false, enable_model_summary: false}
model:
  class_path: VICRegL
  init_args: {backbone: convnext_atto, num_matches: [2, 1], expander_widths: 32-32-32, projector_widths: 16-16-16}
data:
  class_path: SyntheticScenesDataModule
  init_args: {scene: {image_size: 64, num_train: 32, num_val: 8}, views: vicregl_resnet, crop_sizes: [64, 32],
              batch_size: 8, num_workers: 0, eval_size: 64}
"""


@pytest.mark.slow
def test_cli_fit_under_ddp_then_cli_export_load_into_timm(synthetic_root, tmp_path):  # noqa: F811
    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG)
    fit = run_python(["-m", "ssl_modules", "fit", "--config", str(config), "--trainer.default_root_dir",
                      str(tmp_path / "run"), "--data.init_args.root", str(synthetic_root)])
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    checkpoint = re.search(r"checkpoint:\s+(\S+\.ckpt)", fit.stdout)
    written = re.search(r"backbone:\s+(\S+backbone\.pt)", fit.stdout)
    assert checkpoint and written, fit.stdout[-3000:]
    out = tmp_path / "exported" / "convnext.pt"
    export = run_python(["-m", "ssl_modules", "export", checkpoint.group(1), str(out)])
    assert export.returncode == 0, export.stderr[-3000:]
    assert f"backbone written to {out}" in export.stdout
    folder = tmp_path / "exported" / "convnext"
    assert run_python(["-m", "ssl_modules", "export", checkpoint.group(1), str(folder)]).returncode == 0
    after_fit = Path(written.group(1))
    assert f"timm folder: {after_fit.with_suffix('')}" in fit.stdout
    exports = [load_exported(out), load_exported_folder(folder), load_exported_folder(after_fit.with_suffix(""))]
    for other in exports:
        for (name, a), b in zip(other.state_dict().items(), load_exported(after_fit).state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
