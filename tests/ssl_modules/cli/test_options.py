"""One argument style: ``evaluate`` and ``export`` take typed options built from the functions they call
(``ssl_modules.evaluation.evaluate``, ``ssl_modules.cli.export.export``), each protocol's
settings as nested options over its preset, a ``--config`` YAML as ``fit`` does, and help in ``fit``'s style."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from support.common import TINY_VIT

from ssl_modules.cli import main
from ssl_modules.cli.evaluate import parse
from ssl_modules.methods.base import SSLModule


def test_settings_given_replace_the_presets_and_only_those():
    kwargs = parse(["last.ckpt", "--protocols", "linear", "voc-linear", "--imagenet", "/in", "--voc", "/voc",
                    "--linear.preset", "bam", "--linear.epochs", "10", "--knn.ks", "[10, 20]",
                    "--hummingbird.memory_size", "null", "--voc-linear.preset", "vicregl",
                    "--voc-linear.recipe.lr", "0.5"])
    assert kwargs["protocols"] == ["linear", "voc-linear"]
    assert kwargs["presets"] == {"linear": "bam", "voc-linear": "vicregl"}
    overrides = kwargs["overrides"]
    assert overrides["linear"] == {"epochs": 10} and overrides["knn"] == {"ks": (10, 20)}
    assert overrides["hummingbird"] == {"memory_size": None}  # null given, not left to the preset
    recipe = overrides["voc-linear"]["recipe"]  # given in part: the preset's other values kept
    assert (recipe.optimizer, recipe.lr, recipe.warmup_steps) == ("adamw", 0.5, 1500)


def test_the_top_level_options_and_their_defaults():
    kwargs = parse(["vit_tiny_patch16_224"])
    assert kwargs["protocols"] == ["knn"] and kwargs["presets"] == {} and kwargs["overrides"] == {}
    assert (kwargs["teacher"], kwargs["show_progress"], kwargs["trust_checkpoint"]) == (True, True, False)
    assert (kwargs["output"], kwargs["precision"], kwargs["timm_kwargs"]) == ("evaluation", "32", {})
    kwargs = parse(["m", "--teacher", "false", "--show_progress=false", "--trust_checkpoint", "--batch_size", "8",
                    "--timm_kwargs.img_size", "32", "--timm_kwargs.depth", "2", "--precision", "bf16"])
    assert (kwargs["teacher"], kwargs["show_progress"], kwargs["trust_checkpoint"]) == (False, False, True)
    assert kwargs["batch_size"] == 8 and kwargs["timm_kwargs"] == {"img_size": 32, "depth": 2}


def test_options_may_be_written_with_dashes():
    assert parse(["m", "--batch-size", "8", "--trust-checkpoint", "--num-workers", "1", "--voc_linear.iterations",
                  "3"]) == parse(["m", "--batch_size", "8", "--trust_checkpoint", "--num_workers", "1",
                                  "--voc-linear.iterations", "3"])


def test_a_config_file_gives_the_same_options_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("protocols: [linear, hummingbird]\nimagenet: /in\nvoc: /voc\nbatch_size: 16\n"
                      "linear:\n  preset: bam\n  epochs: 10\nhummingbird:\n  k: 5\n")
    kwargs = parse(["m", "--config", str(config), "--linear.epochs", "2"])
    assert kwargs["protocols"] == ["linear", "hummingbird"] and kwargs["batch_size"] == 16
    assert kwargs["presets"] == {"linear": "bam"}
    assert kwargs["overrides"] == {"linear": {"epochs": 2}, "hummingbird": {"k": 5}}


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_help_lists_typed_options_as_fit_does(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: python -m ssl_modules {command}" in out and "--config CONFIG" in out
    assert "--trust_checkpoint [{true,false}]" in out and "(type: bool, default: False)" in out
    if command == "evaluate":
        for needle in ("--linear.epochs EPOCHS", "(type: int, default: 100)", "--knn.ks", "--voc-linear.recipe.lr",
                       "--hummingbird.preset", "open-hb-exact", "--batch_size BATCH_SIZE"):
            assert needle in out, needle


def test_print_config_writes_a_config_that_reads_back(tmp_path, capsys):
    assert main(["evaluate", "m", "--linear.preset", "bam", "--linear.epochs", "3", "--print_config"]) == 0
    config = tmp_path / "printed.yaml"
    config.write_text(capsys.readouterr().out)
    kwargs = parse(["--config", str(config)])
    assert kwargs["model"] == "m" and kwargs["presets"] == {"linear": "bam"}
    assert kwargs["overrides"]["linear"]["epochs"] == 3


# --------------------------------------------------------------------------------------------- export
def _recorded_checkpoint(module: SSLModule, path) -> None:
    """A checkpoint whose module class cannot be imported: export takes what it records (no Lightning load)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    checkpoint["ssl_module_class"] = "a_users_script.MyMethod"
    torch.save(checkpoint, path)


@pytest.mark.parametrize("output", ["folder", "folder/", "backbone.pt"])
def test_export_writes_the_layout_its_output_names(output, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT)).eval()
    _recorded_checkpoint(module, tmp_path / "run.ckpt")
    target = tmp_path / output
    assert main(["export", str(tmp_path / "run.ckpt"), str(target)]) == 0
    out = capsys.readouterr().out
    assert f"backbone written to {target.with_name(target.name)}" in out
    if output == "backbone.pt":
        meta = json.loads(target.with_suffix(".json").read_text())
        model = timm.create_model(meta["name"], **meta["model_kwargs"])
        model.load_state_dict(torch.load(target, weights_only=True), strict=True)
    else:
        assert "local-dir:" in out
        model = timm.create_model(f"local-dir:{target}", pretrained=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), module.embedding_backbone(images).global_)


def test_export_takes_its_options_from_a_config_file(tmp_path, capsys):
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    _recorded_checkpoint(module, tmp_path / "run.ckpt")
    config = tmp_path / "export.yaml"
    config.write_text(f"checkpoint: {tmp_path / 'run.ckpt'}\noutput: {tmp_path / 'exported'}\n")
    assert main(["export", "--config", str(config)]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
