"""Every user error reaches the terminal as one message of the library's, with the documented exit code:
2 for a bad command line, 1 for a run that fails (bad data, unwritable folder), warnings for what only costs
speed; a run failing before its first step leaves no empty folder behind (docs/failures.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.cli_testkit import InjectNaN, tiny_config

from ssl_modules.cli import _argument_errors, _run_checks, lightning, main
from ssl_modules.cli._errors import failure_message


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``main(args)`` in this process: its exit code, stdout and stderr."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_message(err: str, most_lines: int = 3) -> None:
    assert "Traceback" not in err and "Namespace(" not in err and "Given value" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= most_lines, err


# ---------------------------------------------------------------------------------- no Linux-only calls
@pytest.mark.parametrize("command", ["evaluate", "export", "fit"])
def test_every_command_parses_without_linux_only_calls(command, monkeypatch, capsys):
    """macOS and Windows have no ``os.sched_getaffinity``: building and printing the parsers must not need it."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    try:
        code, out, _ = run([command, "--help"], capsys)
    except SystemExit as stop:  # fit: LightningCLI's help ends with SystemExit(0), as its --print_config
        code, out = stop.code or 0, capsys.readouterr().out
    assert code == 0
    assert "usage:" in out and ("--trainer.max_epochs" in out if command == "fit" else command in out)


def test_usable_cpus_falls_back_to_the_cpu_count(monkeypatch):
    from ssl_modules.cli.evaluate import build_parser, usable_cpus

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert usable_cpus() == 3
    assert build_parser().parse_args(["model"]).num_workers == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus() == 1


# ------------------------------------------------------------------------------ bad command lines: 2
@pytest.mark.parametrize(("arguments", "expected"), [
    (["--model.init_args.num_matches", "[-1, 2]"],
     ["VICRegL (--model) refused its arguments: num_matches must be two positive ints",
      "given: --model.init_args.num_matches '[-1, 2]'"]),
    (["--trainer.callbacks+=KNNProbe", "--trainer.callbacks.init_args.k", "0"],
     ["KNNProbe (--trainer.callbacks) refused its arguments: k=0 must be >= 1"]),
    (["--trainer.devices", "0"], ["Trainer (--trainer) refused its arguments", "given: --trainer.devices 0"]),
])
def test_a_constructor_refusing_a_value_gives_its_own_message_and_exit_2(arguments, expected, tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), *arguments], capsys)
    assert code == 2, err
    for needle in expected:
        assert needle in err, err
    assert_one_message(err)
    assert not (tmp_path / "run").exists()


PAPER_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "configs" / "vicregl" / "resnet50_alpha0.75.yaml"


def test_a_gpu_config_on_a_machine_without_gpu_says_how_to_run_it_on_the_cpu(tmp_path, capsys, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))  # whatever this machine has
    code, _, err = run(["fit", "--config", str(PAPER_CONFIG), "--data.init_args.root", str(tmp_path)], capsys)
    assert code == 2, err
    assert "Trainer (--trainer) refused its arguments" in err and "this machine has no GPU" in err, err
    assert " ".join(_argument_errors.CPU_OVERRIDES) in err
    assert_one_message(err, most_lines=4)


def test_the_suggested_cpu_overrides_build_the_paper_config_on_the_cpu(monkeypatch):
    import torch
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from ssl_modules.methods.base import SSLModule

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr("sys.argv", ["ssl_modules"])
    with torch.device("meta"):  # the ResNet-50 at full size, without its memory
        cli = lightning.SSLCLI(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                               run=False, auto_configure_optimizers=False,
                               args=["--config", str(PAPER_CONFIG), *_argument_errors.CPU_OVERRIDES,
                                     "--trainer.logger", "false"])
    assert isinstance(cli.trainer.accelerator, CPUAccelerator) and cli.trainer.world_size == 1
    assert cli.trainer.precision == "32-true"


@pytest.mark.parametrize(("arguments", "suggestion"), [
    (["--model", "VicRegL"], "did you mean 'VICRegL'?"),
    (["--model", "ssl_modules.VicRegL"], "did you mean 'VICRegL'?"),
    (["--trainer.callbacks+=KnnProbe"], "did you mean 'KNNProbe'?"),
    (["--data", "SyntheticScenesDataModul"], "did you mean 'SyntheticScenesDataModule'?"),
])
def test_a_misspelt_class_path_gets_did_you_mean(arguments, suggestion, tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), *arguments], capsys)
    assert code == 2
    assert suggestion in err, err
    assert_one_message(err, most_lines=1)


def test_a_misspelt_class_path_in_the_config_gets_did_you_mean(tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl")
    config.write_text(config.read_text().replace("class_path: ssl_modules.VICRegL", "class_path: VicRegl"))
    code, _, err = run(["fit", "--config", str(config)], capsys)
    assert code == 2
    assert "no class 'VicRegl' for --model: did you mean 'VICRegL'?" in err, err


def test_an_unknown_class_with_no_close_name_lists_the_librarys(tmp_path, capsys):
    code, _, err = run(["fit", "--config", str(tiny_config(tmp_path, "vicregl")), "--model", "Zebra"], capsys)
    assert code == 2
    assert "no class 'Zebra'" in err and "VICRegL" in err and "CrIBo" in err and "import path" in err, err


@pytest.mark.parametrize("limit", ["max_epochs", "max_steps"])
def test_a_run_of_zero_epochs_or_steps_is_refused_before_anything_is_written(limit, tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl")
    other = {"max_epochs": ["--trainer.max_steps", "-1"], "max_steps": ["--trainer.max_epochs", "1"]}[limit]
    code, _, err = run(["fit", "--config", str(config), *other, f"--trainer.{limit}", "0"], capsys)
    assert code == 2
    assert f"--trainer.{limit} 0 trains nothing" in err and "random initial backbone" in err, err
    assert_one_message(err, most_lines=1)
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("backbone.pt"))


def test_export_to_a_path_that_is_no_pt_file_nor_folder_names_both_before_reading(tmp_path, capsys):
    checkpoint = tmp_path / "any.ckpt"
    checkpoint.write_bytes(b"checked after the output")
    code, _, err = run(["export", str(checkpoint), str(tmp_path / "backbone.ckpt")], capsys)
    assert code == 2
    assert "name a .pt file" in err and str(tmp_path / "backbone.pt") in err and "a folder" in err, err
    assert_one_message(err, most_lines=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["any.ckpt"]


@pytest.mark.parametrize(("arguments", "needle"), [
    (["--backbone", "vit_small_patch16_224"], "give them with --official"),  # only an official one needs it
    (["--oficial", "auto"], "unknown option --oficial; did you mean --official?"),
    (["--official", "mocov3"], "--official takes one of auto, cribo, bam, vicregl"),
    (["--backbone_kwargs", "[1, 2]"], "--backbone_kwargs"),
])
def test_export_exits_2_for_a_bad_command_line_in_one_line(arguments, needle, tmp_path, capsys):
    code, _, err = run(["export", str(tmp_path / "any.ckpt"), str(tmp_path / "out.pt"), *arguments], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and needle in err, err
    assert_one_message(err, most_lines=1)


@pytest.mark.parametrize("arguments", [
    ["--imagenet", "{tmp}", "--knn.kk", "3"],  # an unknown setting
    ["--imagenet", "{tmp}", "--linear.preset", "nope"],  # an unknown preset
    ["--imagenet", "{tmp}", "--batch_size", "many"],  # a value of the wrong type
    ["--imagenet", "{tmp}", "--linear.epochs", "1.5"],  # a setting of the wrong type
    ["--protocols", "linear"],  # no data root for the protocol
    ["--protocols", "knn", "segmentation"],  # no such protocol
    ["--imagenet", "{tmp}", "--config", "{tmp}/missing.yaml"],  # no such config file
    ["--imagenet", "{tmp}", "--set", "knn"],  # the deprecated --set, not KEY=VALUE
    ["--imagenet", "{tmp}", "--set", "knn.kk=3"],  # the deprecated --set, an unknown setting
])
def test_evaluate_exits_2_for_a_bad_command_line_in_one_line(arguments, tmp_path, capsys):
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    code, _, err = run(["evaluate", "vit_tiny_patch16_224", *arguments], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]  # the deprecation note
    assert lines[0].startswith("error: ") and "usage:" not in err, err
    assert_one_message("\n".join(lines), most_lines=1)


def test_evaluate_exits_2_without_a_model(capsys):
    code, _, err = run(["evaluate", "--protocols", "knn"], capsys)
    assert code == 2 and "required: model" in err, err


# ------------------------------------------------------------------------------ failed runs: 1
def test_evaluate_exits_1_for_a_bad_data_layout_as_fit_does(tmp_path, capsys):
    code, _, err = run(["evaluate", "vit_tiny_patch16_224", "--timm_kwargs.img_size", "32", "--imagenet",
                        str(tmp_path), "--show_progress", "false", "--num_workers", "0", "--output",
                        str(tmp_path / "out")], capsys)
    assert code == 1, err
    assert str(tmp_path) in err
    assert_one_message(err, most_lines=1)


def test_evaluate_exits_1_for_a_value_error_raised_while_evaluating(tmp_path, capsys):
    """A setting the protocol refuses once it runs is a failed run (1), not a bad command line (2)."""
    tiny = "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}"
    code, _, err = run(["evaluate", "vit_tiny_patch16_224", "--timm_kwargs", tiny, "--imagenet", str(tmp_path),
                        "--protocols", "linear", "--linear.epochs", "0", "--output", str(tmp_path / "out")], capsys)
    assert code == 1, err
    assert err.startswith("error: ") and "epochs" in err, err
    assert_one_message(err, most_lines=1)


def test_fit_exits_1_for_a_bad_data_layout_in_one_message(tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), "--data", "ImageFolderDataModule", "--data.root",
                        str(tmp_path / "missing")], capsys)
    assert code == 1
    assert f"{tmp_path / 'missing'} is not a folder" in err.splitlines()[-1], err
    assert "Traceback" not in err


def test_an_unwritable_run_folder_is_named_before_the_run(tmp_path, capsys, monkeypatch):
    """Checked with ``os.access`` (tests may run as root, for whom every folder is writable)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(locked / "run")], capsys)
    assert code == 1
    assert f"--trainer.default_root_dir {locked / 'run'} would be created in {locked}" in err, err
    assert "not writable" in err and "Choose a folder you can write to" in err
    assert_one_message(err, most_lines=1)
    assert not (locked / "run").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_fails_with_one_message(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(["fit", "--config", str(tiny_config(tmp_path, "vicregl")), "--trainer.default_root_dir",
                            str(locked)], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 1 and "not writable" in err
    assert_one_message(err, most_lines=1)


def test_a_file_that_cannot_be_written_during_the_run_is_one_message():
    message = failure_message(PermissionError(13, "Permission denied", "/runs/x/epoch=0-step=2.ckpt"))
    assert message.startswith("error: cannot write /runs/x/epoch=0-step=2.ckpt: Permission denied")
    assert "\n" not in message
    assert failure_message(RuntimeError("a bug somewhere")) is None  # a bug keeps its traceback


def test_more_cpu_processes_than_cores_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_run_checks, "usable_cpus", lambda: 1)
    monkeypatch.setattr(lightning._cli_class(), "_run_subcommand", lambda self, subcommand: None)  # build, do not run
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                       capsys)
    assert code == 0
    assert "warning: --trainer.devices 2 starts 2 training processes on the CPU" in err, err
    assert "may use 1 core" in err


# ------------------------------------------------------------------------- no empty run folder left
def test_a_run_failing_before_its_first_step_removes_the_folder_it_created(tmp_path, capsys):
    root = tmp_path / "runs" / "new"
    config = tiny_config(tmp_path, "vicregl")
    code, _, err = run(["fit", "--config", str(config), "--trainer.logger", "true", "--trainer.default_root_dir",
                        str(root), "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "missing")],
                       capsys)
    assert code == 1, err
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))


def test_folders_that_existed_or_hold_checkpoints_are_kept(tmp_path, capsys):
    logs = tmp_path / "runs" / "lightning_logs"
    (logs / "version_0" / "checkpoints").mkdir(parents=True)
    (logs / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
    config = tiny_config(tmp_path, "vicregl")
    code, _, _ = run(["fit", "--config", str(config), "--trainer.logger", "true", "--trainer.default_root_dir",
                      str(tmp_path / "runs"), "--data", "ImageFolderDataModule", "--data.root",
                      str(tmp_path / "missing")], capsys)
    assert code == 1
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert (logs / "version_0" / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's"


def test_a_run_failing_after_its_first_step_keeps_its_folder(tmp_path, capsys):
    config = tiny_config(tmp_path, "vicregl", steps=4, checkpoint_every=None,
                         callbacks=[{"class_path": "support.cli_testkit.InjectNaN", "init_args": {"step": 1}}])
    assert InjectNaN  # the callback above, by its class path
    code, _, err = run(["fit", "--config", str(config), "--trainer.logger", "true", "--trainer.log_every_n_steps",
                        "1"], capsys)
    assert code == 1 and "non-finite loss" in err, err
    assert list((tmp_path / "run" / "lightning_logs").glob("version_0/events.out.tfevents.*"))


def test_the_failed_run_folder_rule_itself(tmp_path):
    """Removed: created by the run, no checkpoint (empty parents the run created go too). Kept: otherwise."""
    anchor = tmp_path / "runs"
    anchor.mkdir()
    created = _run_checks.FailedRunFolder(anchor / "a" / "version_0", existed=False, anchor=anchor)
    (anchor / "a" / "version_0").mkdir(parents=True)
    (anchor / "a" / "version_0" / "events.out.tfevents.1").write_bytes(b"")
    assert created.remove() and not (anchor / "a").exists() and anchor.exists()
    with_checkpoint = _run_checks.FailedRunFolder(anchor / "b", existed=False, anchor=anchor)
    (anchor / "b" / "checkpoints").mkdir(parents=True)
    (anchor / "b" / "checkpoints" / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert not with_checkpoint.remove() and (anchor / "b").exists()
    (anchor / "c").mkdir()
    kept = _run_checks.FailedRunFolder(anchor / "c", existed=True, anchor=anchor)
    assert not kept.remove() and (anchor / "c").exists()
