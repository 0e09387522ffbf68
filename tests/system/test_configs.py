"""The YAML configs of ``examples/configs``: every one parses with the CLI, the paper ones build their parts,
the CPU ones train through ``python -m ssl_modules fit``.

Building a paper model with real tensors is too heavy for a test (measured on 2 CPU cores: CrIBo ViT-S/16
COCO allocates a 2 x 1.6M x 384 memory bank, 4.9 GB, in ~35 s; ViT-B/16 with two 65536-prototype heads
~7 GB; timm's ConvNeXt-S/B initialisation alone takes ~7 s; ~150 s and 8 GB for the set). So the paper
configs are built at full size on PyTorch's meta device: the constructors run exactly as on a GPU (every
argument checked, every layer, head and buffer created with its real shape) but no memory is allocated and
no initialisation is computed (under a second per config). Before that, the CLI's parser validates the whole
config against every class signature (unknown or mistyped arguments fail).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.example_testkit import (CONFIGS, all_configs, config_id, override_configs, paper_configs,  # noqa: F401
                                     posttrain_configs, quick_probes_config, resolve, synthetic_root, tiny_configs)
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ssl_modules.methods.base import SSLModule
from ssl_modules.cli import main
from ssl_modules.cli.lightning import SSLCLI, run_cli
from ssl_modules.methods.cribo import CrIBo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

CPU_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
               "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.sync_batchnorm", "false",
               "--trainer.logger", "false"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def normalise(value):
    """Config values compared across YAML, jsonargparse and hparams: tuples as lists, ints as floats."""
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value)


def print_config(path: Path, capsys, monkeypatch, *overrides: str) -> dict:
    """``python -m ssl_modules fit --config <path> --print_config``, in process; the printed config, parsed."""
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(path), *overrides, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ every config

def test_the_paper_configs_are_there():
    names = {config_id(p) for p in paper_configs()}
    expected = {f"vicregl/{b}_alpha{a}.yaml"
                for b in ("resnet50", "convnext_small", "convnext_base") for a in ("0.9", "0.75")}
    expected |= {"bam/vit_small_16.yaml", "bam/vit_base_16.yaml", "bam/resnet50.yaml",
                 "cribo/coco_vit_small_16.yaml", "cribo/imagenet_vit_small_16.yaml", "cribo/imagenet_vit_base_16.yaml"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


def assert_reaches(given, printed, where: str) -> None:
    """Every value a config file gives is in the parsed config as written (nothing dropped or reinterpreted);
    the parser may add defaults. Classes are compared as classes (short and full class paths are the same)."""
    if isinstance(given, dict) and "class_path" in given:
        assert isinstance(printed, dict) and resolve(printed["class_path"]) is resolve(given["class_path"]), where
        assert_reaches(given.get("init_args") or {}, printed.get("init_args") or {}, f"{where}.init_args")
    elif isinstance(given, dict):
        for key, value in given.items():
            assert key in printed, f"{where}.{key} missing from the parsed config"
            assert_reaches(value, printed[key], f"{where}.{key}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert isinstance(printed, list) and len(printed) == len(given), where
        for i, (a, b) in enumerate(zip(given, printed)):
            assert_reaches(a, b, f"{where}[{i}]")
    else:
        assert normalise(printed) == normalise(given), f"{where}: {printed!r} != {given!r}"


@pytest.mark.parametrize("path", all_configs(), ids=config_id)
def test_every_config_parses_with_the_cli(path, capsys, monkeypatch):
    given = load(path)
    printed = print_config(path, capsys, monkeypatch)
    assert issubclass(resolve(printed["model"]["class_path"]), SSLModule)
    assert issubclass(resolve(printed["data"]["class_path"]), LightningDataModule)
    assert_reaches(given, printed, "config")


@pytest.mark.parametrize("paper", ["cribo/imagenet_vit_small_16.yaml", "bam/vit_small_16.yaml",
                                   "vicregl/resnet50_alpha0.9.yaml"])
@pytest.mark.parametrize("override", override_configs(), ids=config_id)
def test_an_override_switches_a_paper_config_and_keeps_the_rest(override, paper, capsys, monkeypatch):
    plain = print_config(CONFIGS / paper, capsys, monkeypatch)
    switched = print_config(CONFIGS / paper, capsys, monkeypatch, "--config", str(override))
    assert_reaches(load(override), switched, "override")  # the override's values all arrive
    assert switched["model"] == plain["model"] and switched["data"] == plain["data"]
    strategy = switched["trainer"]["strategy"]
    assert isinstance(resolve(strategy["class_path"])(**strategy.get("init_args", {})), ModelParallelStrategy)


# ------------------------------------------------------------------------------------------ paper configs

@pytest.mark.parametrize("path", paper_configs(), ids=config_id)
def test_paper_config_needs_only_the_data_root(path):
    config, text = load(path), path.read_text()
    root = config["data"]["init_args"]["root"]
    assert root.startswith("/path/to/"), "the data root must be an obvious placeholder"
    assert yaml.safe_dump(config).count("/path/to/") == 1, "the data root must be the only value a user has to set"
    # The per-process batch, the processes and the global batch the comment states agree.
    trainer, data = config["trainer"], config["data"]["init_args"]
    match = re.search(r"Global batch (\d+) = (\d+) images x (\d+) GPUs x (\d+) node", text)
    assert match, "state the global batch as 'Global batch N = B images x G GPUs x M node(s)'"
    total, per_gpu, gpus, nodes = map(int, match.groups())
    assert (per_gpu, gpus, nodes) == (data["batch_size"], trainer["devices"], trainer["num_nodes"])
    assert total == per_gpu * gpus * nodes
    assert trainer["strategy"] == "ddp" and trainer["accelerator"] == "gpu"


# The official runs' precision: fp16 autocast + GradScaler (BAM --use_fp16 true, CrIBo "use_fp16": true,
# VICRegL --fp16), except CrIBo's released ViT-B run, which trains in float32 ("use_fp16": false).
OFFICIAL_PRECISION = {"cribo/imagenet_vit_base_16.yaml": "32-true"}


@pytest.mark.parametrize("path", paper_configs(), ids=config_id)
def test_paper_config_trains_in_the_official_precision(path):
    precision = load(path)["trainer"]["precision"]
    expected = OFFICIAL_PRECISION.get(config_id(path), "16-mixed")
    assert precision == expected, f"{config_id(path)}: the official run trains in {expected}, not {precision}"
    if expected == "16-mixed":  # the comment above the setting names the official flag
        comment = path.read_text().split("precision: 16-mixed")[0].rsplit("\n\n", 1)[-1]
        assert re.search(r"use_fp16|--fp16", comment), "cite the official fp16 flag next to the precision"


def _has_batchnorm(module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("path", paper_configs(), ids=config_id)
def test_paper_config_builds_its_model_data_and_callbacks(path, monkeypatch):
    config = load(path)
    model_args = config["model"].get("init_args") or {}
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    with torch.device("meta"):  # full size, no memory: see the module docstring
        cli = SSLCLI(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     auto_configure_optimizers=False, args=["--config", str(path), *CPU_TRAINER])
    model = cli.model
    assert type(model) is resolve(config["model"]["class_path"])
    for key, value in model_args.items():
        assert normalise(model.hparams[key]) == normalise(value), key
    assert model.backbone.name == model_args["backbone"]
    assert all(p.is_meta for p in model.parameters())
    if isinstance(model, CrIBo):  # the memory bank at its released size
        hp = model.hparams
        assert tuple(model.memory_bank.keys.shape) == (2, hp.num_clusters * hp.queue_size, model.backbone.num_features)
        assert model.head.last_layer_c.weight_v.shape == (hp.object_out_dim, hp.head_bottleneck_dim)
        assert model.head.last_layer_c.weight_g.requires_grad == (not hp.norm_last_layer)
    # BatchNorm anywhere in the model <-> the config synchronises it across GPUs.
    assert bool(config["trainer"]["sync_batchnorm"]) == _has_batchnorm(model), "trainer.sync_batchnorm"
    data = cli.datamodule
    assert type(data) is resolve(config["data"]["class_path"])
    assert data.batch_size == config["data"]["init_args"]["batch_size"]
    assert data.views.global_size == 224 and data.views.n_global == 2
    wanted = [resolve(c["class_path"]) for c in config["trainer"].get("callbacks") or []]
    built = [type(c) for c in cli.trainer.callbacks if isinstance(c, Callback)]
    assert all(cls in built for cls in wanted)
    assert cli.trainer.max_epochs == config["trainer"]["max_epochs"]


def test_there_is_a_posttraining_config_per_method():
    methods = {resolve(load(p)["model"]["class_path"]).__name__ for p in posttrain_configs()}
    assert methods == {"CrIBo", "BAM", "VICRegL"}


@pytest.mark.parametrize("path", posttrain_configs(), ids=config_id)
def test_posttraining_config_builds_from_timm_weights_of_its_own_architecture(path, monkeypatch):
    """Built on the meta device without reading the weights (there is no network here); the weights it names
    are timm's pretrained tag of the very architecture it builds, and every crop is a whole number of patches."""
    config = load(path)
    model_args = config["model"]["init_args"]
    spec = model_args["backbone_weights"]
    assert spec.startswith("timm:") and spec[len("timm:"):].split(".")[0] == model_args["backbone"]
    assert "STARTING POINT, not a" in path.read_text()  # the comments do not pass it off as a reproduced result
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    with torch.device("meta"):
        cli = SSLCLI(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     auto_configure_optimizers=False,
                     args=["--config", str(path), *CPU_TRAINER, "--model.init_args.backbone_weights", "null"])
    model, views = cli.model, cli.datamodule.views
    assert model.hparams.layer_decay == model_args["layer_decay"]
    assert model.backbone.stride == 14 and model.backbone.num_prefix_tokens == 5  # CLS + 4 registers
    sizes = [views.global_size] + ([views.local_size] if views.n_local else [])
    assert all(size % 14 == 0 for size in sizes), sizes


# -------------------------------------------------------------------------------------------- CPU configs

FALLBACK_TINY = """\
# Used only while examples/configs has no synthetic_tiny.yaml / quickstart.yaml.
trainer: {accelerator: cpu, devices: 1, max_epochs: 1}
model:
  class_path: ssl_modules.VICRegL
  init_args: {backbone: convnext_atto, num_matches: [2, 1], expander_widths: 64-64-64, projector_widths: 32-32-32}
data:
  class_path: datamodules.SyntheticScenesDataModule
  init_args: {scene: {image_size: 64}, views: vicregl_convnext, crop_sizes: [64, 64], batch_size: 8, num_workers: 0}
"""


def tiny_or_fallback() -> list[Path | None]:
    return tiny_configs() or [None]  # None: a config written by the test (see FALLBACK_TINY)


@pytest.mark.parametrize("path", tiny_or_fallback(), ids=lambda p: "fallback" if p is None else config_id(p))
def test_cpu_config_trains_two_steps_through_the_cli(path, synthetic_root, tmp_path, capsys, monkeypatch):
    if path is None:
        path = tmp_path / "fallback_tiny.yaml"
        path.write_text(FALLBACK_TINY)
    path = quick_probes_config(tmp_path, path)  # the test checks that the probes run, not how well they train
    config = load(path)
    overrides = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu",
                 "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.enable_progress_bar", "false"]
    if resolve(config["data"]["class_path"]).__name__ == "SyntheticScenesDataModule":
        batch = int((config["data"].get("init_args") or {}).get("batch_size", 64))
        overrides += ["--data.init_args.root", str(synthetic_root), "--data.init_args.scene.num_train",
                      str(2 * batch), "--data.init_args.scene.num_val", "16", "--data.init_args.num_workers", "0"]
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    cli = run_cli(["fit", "--config", str(path), *overrides])
    assert cli.trainer.global_step == 2
    out = capsys.readouterr().out
    assert "Run finished." in out
    exported = re.search(r"backbone:\s+(\S+backbone\.pt)", out)
    assert exported and Path(exported.group(1)).is_file() and Path(exported.group(1)).is_relative_to(tmp_path)
