"""The trust rule of the one checkpoint reader (issue 26, point 7; ``ssl_modules.checkpoints.reading``).

Every checkpoint read of the library is weights-only: the official checkpoints' known types are allowed, a file
that would run code when unpickled is refused with an error naming the file, the refused global and the flag;
``trust_checkpoint=True`` / ``--trust-checkpoint`` reads it anyway with a warning naming the file. The files
built here carry an object whose unpickling calls :func:`_run_code`, which only leaves a marker file: a marker
that exists after a refused read would mean the code ran.
"""
from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from support.common import TINY_VIT

from ssl_modules.checkpoints.reading import (
    CheckpointFileError,
    CheckpointTrustWarning,
    UntrustedCheckpointError,
    load_module,
    read_checkpoint,
)

CRIBO = dict(backbone_kwargs=dict(depth=1, img_size=32, patch_size=8), out_dim=32, object_out_dim=32,
             head_hidden_dim=32, head_bottleneck_dim=16, num_clusters=4, queue_size=16)


def _run_code(marker: str) -> str:
    """What a malicious file would call while being unpickled; here it only leaves a marker."""
    Path(marker).write_text("ran")
    return marker


class CodeOnLoad:
    """Unpickling this calls ``_run_code(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _run_code, (self.marker,)


def _official_cribo(path: Path, args: argparse.Namespace) -> Path:
    """A CrIBo official training checkpoint (a ViT-S with one block at 32 px) with ``args`` as its ``args``."""
    from ssl_modules.methods.cribo import CrIBo
    from ssl_modules.methods.official import official_state

    state = official_state(CrIBo("vit_small_patch16_224", **CRIBO))
    state["args"] = args
    torch.save(state, path)
    return path


def _backbone_file(path: Path, extra: object) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bare backbone state dict in timm's names (a released backbone file) with one more entry."""
    from ssl_modules.networks.backbones import Backbone

    weights = Backbone("vit_tiny_patch16_224", **TINY_VIT).timm_state_dict()
    torch.save({**weights, "note": extra}, path)
    return path, weights


# ------------------------------------------------------------------------------------------- allowed types
def test_an_official_checkpoint_with_its_training_arguments_needs_no_trust(tmp_path):
    """The official code saves its ``argparse.Namespace`` (with paths in it): read weights-only, no warning."""
    from ssl_modules.methods.official import load_official

    args = argparse.Namespace(arch="vit_small", patch_size=8, output_dir=Path("/runs/cribo"), lr=5e-4,
                              pos_alpha=(1.0, 2.0))
    path = _official_cribo(tmp_path / "checkpoint.pth", args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointTrustWarning)
        checkpoint = read_checkpoint(path, lightning=False)
        module = load_official(path)
    assert checkpoint["args"] == args
    assert module.backbone.name == "vit_small_patch16_224"


def test_a_lightning_checkpoint_with_the_librarys_callbacks_needs_no_trust(tmp_path):
    """A real checkpoint of a CLI run with the probes on holds no type beyond the weights-only set: the reader,
    ``load_module`` and Lightning's own weights-only read take it as it is."""
    from support.resume_testkit import tiny_args

    from ssl_modules.cli.lightning import run_cli

    probes = ["--trainer.callbacks+=callbacks.KNNProbe", "--trainer.callbacks+=callbacks.OnlineLinearProbe"]
    run_cli(tiny_args("vicregl", tmp_path, 0, ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                               "--data.init_args.scene.num_train=64", *probes]))
    [path] = (tmp_path / "checkpoints").glob("*.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointTrustWarning)
        assert set(read_checkpoint(path)["callbacks"]) >= {"OnlineLinearProbe[linear]"}
        assert type(load_module(path)).__name__ == "VICRegL"


# -------------------------------------------------------------------------------------------- refused files
def test_a_backbone_file_that_would_run_code_is_refused_naming_file_global_and_flag(tmp_path):
    """The former ``backbones.read_checkpoint`` retried any failed weights-only read with full unpickling,
    silently: the file's code ran and the weights loaded."""
    from ssl_modules.methods.official import load_backbone_weights

    marker = tmp_path / "marker"
    path, _ = _backbone_file(tmp_path / "released.pth", CodeOnLoad(marker))
    with pytest.raises(UntrustedCheckpointError) as caught:
        load_backbone_weights(path, "vit_tiny_patch16_224", **TINY_VIT)
    message = str(caught.value)
    assert str(path) in message and f"{__name__}._run_code" in message
    assert "trust_checkpoint=True" in message and "--trust-checkpoint" in message
    assert caught.value.refused == [f"{__name__}._run_code"]
    assert not marker.exists()


def test_a_trusted_read_loads_it_with_a_warning_naming_the_file(tmp_path):
    from ssl_modules.networks.backbones import Backbone

    marker = tmp_path / "marker"
    path, weights = _backbone_file(tmp_path / "released.pth", CodeOnLoad(marker))
    with pytest.warns(CheckpointTrustWarning, match=r"released\.pth.*trust_checkpoint=True.*any code"):
        backbone = Backbone("vit_tiny_patch16_224", weights=path, trust_checkpoint=True, **TINY_VIT)
    assert marker.exists()  # what trusting means: the file's code ran
    assert torch.equal(backbone.model.pos_embed, weights["pos_embed"])


def test_the_lightning_checkpoint_reader_refuses_it_too(tmp_path):
    """The former ``checkpoint_io.read_checkpoint`` (export, ``SSLModule.load_any``) read with full unpickling."""
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": CodeOnLoad(marker)}, tmp_path / "run.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=rf"run\.ckpt holds {re.escape(__name__)}\._run_code"):
        read_checkpoint(tmp_path / "run.ckpt")
    assert not marker.exists()
    with pytest.warns(CheckpointTrustWarning, match=r"run\.ckpt"):
        assert read_checkpoint(tmp_path / "run.ckpt", trust_checkpoint=True)["extra"] == str(marker)


def test_resume_refuses_it_before_anything_runs(tmp_path):
    """``fit --ckpt_path``'s pre-read was ``torch.load(weights_only=False)``: the file's code ran."""
    from ssl_modules.run.resume import prepare_resume

    marker = tmp_path / "marker"
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": CodeOnLoad(marker)}, path)
    with pytest.raises(CheckpointFileError, match=rf"--ckpt_path .*run\.ckpt holds {re.escape(__name__)}\._run_code.*"
                                                  r"weights-only"):
        prepare_resume({"ckpt_path": str(path)})
    assert not marker.exists()


def test_a_damaged_file_is_still_a_damaged_file(tmp_path):
    """A read that fails for another reason than a refused type says so, not that the file needs trust."""
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFileError, match=r"weights\.pth could not be read") as caught:
        read_checkpoint(path, lightning=False)
    assert not isinstance(caught.value, UntrustedCheckpointError)


# ---------------------------------------------------------------------------------------- command lines
def test_export_refuses_it_and_reads_it_with_trust_checkpoint(tmp_path, capsys):
    from ssl_modules.cli import main

    marker = tmp_path / "marker"
    path = _official_cribo(tmp_path / "checkpoint.pth", argparse.Namespace(arch="vit_small", hook=CodeOnLoad(marker)))
    command = ["export", str(path), str(tmp_path / "backbone.pt"), "--official", "auto"]
    assert main(command) == 1
    error = capsys.readouterr().err
    assert "checkpoint.pth" in error and "_run_code" in error and "--trust-checkpoint" in error
    assert not marker.exists()
    with pytest.warns(CheckpointTrustWarning, match=r"checkpoint\.pth"):
        assert main([*command, "--trust-checkpoint"]) == 0
    assert marker.exists() and (tmp_path / "backbone.pt").is_file()


def test_evaluate_takes_trust_checkpoint_to_the_model_loader(tmp_path):
    from ssl_modules.cli.evaluate import parse
    from ssl_modules.evaluation.sources import load_backbone

    assert parse(["model.pth"])["trust_checkpoint"] is False
    assert parse(["model.pth", "--trust-checkpoint"])["trust_checkpoint"] is True
    marker = tmp_path / "marker"
    path = _official_cribo(tmp_path / "checkpoint.pth", argparse.Namespace(arch="vit_small", hook=CodeOnLoad(marker)))
    with pytest.raises(UntrustedCheckpointError, match=r"checkpoint\.pth"):
        load_backbone(path, official="auto")
    assert not marker.exists()
    with pytest.warns(CheckpointTrustWarning):
        backbone = load_backbone(path, official="auto", trust_checkpoint=True)
    assert backbone.name == "vit_small_patch16_224" and not backbone.training


def test_an_exported_backbone_is_read_by_the_same_reader(tmp_path):
    """``evaluate`` of an exported ``backbone.pt`` reads it under the same rule (it was a bare ``torch.load``)."""
    from ssl_modules.evaluation.sources import load_backbone

    marker = tmp_path / "marker"
    path, _ = _backbone_file(tmp_path / "backbone.pt", CodeOnLoad(marker))
    path.with_suffix(".json").write_text(json.dumps({"name": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT}))
    with pytest.raises(UntrustedCheckpointError, match=r"backbone\.pt"):
        load_backbone(path)
    assert not marker.exists()
