"""The command line: exit codes, short errors for bad input, a quiet run that ends with a summary."""
from __future__ import annotations

import os
import re
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from support.cli_testkit import REPO, run_cli, tiny_config

from ssl_modules.cli import main
from ssl_modules.cli._argument_errors import did_you_mean


def fit_once(tmp_path: Path, method: str = "vicregl", **kwargs):
    result = run_cli(["fit", "--config", str(tiny_config(tmp_path, method, steps=4, **kwargs))])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One successful tiny VICRegL fit through the CLI (its output and folder); no warm-up, which 4 steps
    could not complete (that warning is one the user must see)."""
    tmp_path = tmp_path_factory.mktemp("fit")
    return fit_once(tmp_path, warmup_epochs=0), tmp_path


def test_the_console_script_targets_a_function_returning_the_exit_code():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ssl-modules"] == "ssl_modules.cli:main"
    assert main(["--help"]) == 0


@pytest.mark.slow
def test_a_successful_fit_exits_0_and_prints_the_summary(finished_run):
    result, tmp_path = finished_run
    out = result.stdout
    for needle in ("Run finished.", "checkpoint:", "backbone:", "steps:       4 in", "images/s", "final:",
                   "config.yaml --ckpt_path ", "evaluate"):
        assert needle in out, out
    assert (tmp_path / "run").exists() and list((tmp_path / "run").rglob("backbone.pt"))


@pytest.mark.slow
def test_an_ordinary_run_prints_no_avoidable_warning(finished_run):
    result, _ = finished_run
    for noise in ("LeafSpec", "args parameter is intended", "logging interval", "Tip:", "on_after_batch_transfer",
                  "Warning"):
        assert noise not in result.stderr, result.stderr


def test_help_lists_export_and_evaluate_without_importing_lightning():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert re.search(r"^\s+export\s", result.stdout, re.M) and re.search(r"^\s+evaluate\s", result.stdout, re.M)
    code = ("import sys; from ssl_modules.cli import main; main(['--help']); "
            "assert 'lightning' not in sys.modules and 'torch' not in sys.modules")
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_an_unknown_command_suggests_the_closest():
    result = run_cli(["exprot", "a.ckpt", "b.pt"])
    assert result.returncode == 2 and "did you mean 'export'" in result.stderr


def test_a_typo_in_a_model_argument_gives_a_short_did_you_mean(tmp_path):
    config = tiny_config(tmp_path, "vicregl")
    result = run_cli(["fit", "--config", str(config), "--model.init_args.num_matchs", "3"])
    assert result.returncode == 2
    assert "did you mean 'num_matches'" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("complaint", ["Option 'warmup_epoch' is not accepted",
                                       'Validation failed: No action for key "warmup_epoch" to check its value.'])
def test_did_you_mean_follows_kwargs_into_the_base_class(complaint):
    """Both wordings: jsonargparse's current one and that of older releases (4.27, the floor)."""
    message = f"Problem with given class_path 'ssl_modules.CrIBo':\n  {complaint}"
    assert "did you mean 'warmup_epochs'" in did_you_mean(message)


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    noise = tmp_path / "random.ckpt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unpicklable = tmp_path / "unpicklable.ckpt"  # a whole archive whose pickle is damaged
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(unpicklable, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"\x80\x02garbage" if name.endswith("data.pkl") else source.read(name))
    return {"missing": tmp_path / "missing.ckpt", "empty": empty, "random": noise, "truncated": cut,
            "unpicklable": unpicklable}


def _in_process(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``python -m ssl_modules <args>`` in this process (one subprocess per case would cost an interpreter start
    each): the exit code and what went to stderr."""
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit", "validate", "export"])
def test_bad_checkpoints_name_the_file_and_fail_before_any_run_folder(command, finished_run, tmp_path, capsys,
                                                                       monkeypatch):
    good = next((finished_run[1] / "ckpts").glob("*.ckpt"))
    config = tiny_config(tmp_path, "vicregl", steps=4)
    for index, (kind, path) in enumerate(_bad_checkpoints(tmp_path, good).items()):
        if command == "export":
            args = ["export", str(path), str(tmp_path / "out.pt")]
        else:
            args = [command, "--config", str(config), "--ckpt_path", str(path)]
        if index == 0:  # the first case as the user runs it, in a process of its own
            result = run_cli(args)
            code, stderr = result.returncode, result.stderr
        else:
            code, stderr = _in_process(args, capsys, monkeypatch)
        assert code == 1, (kind, stderr[-2000:])
        assert str(path) in stderr and "expected a .ckpt" in stderr, (kind, stderr)
        assert "Traceback" not in stderr, (kind, stderr)
        assert not (tmp_path / "run").exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_validate_without_probes_prints_a_hint(finished_run, tmp_path):
    good = next((finished_run[1] / "ckpts").glob("*.ckpt"))
    result = run_cli(["validate", "--config", str(tiny_config(tmp_path, "vicregl")), "--ckpt_path", str(good)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validate ran no probe" in result.stdout and "callbacks.KNNProbe" in result.stdout


USER_METHOD = '''
from ssl_modules.methods.vicregl import VICRegL


class MyVICRegL(VICRegL):
    """A user's subclass, importable only where its script is."""
'''


@pytest.mark.slow
def test_export_of_a_user_subclass_needs_no_import_of_its_module(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_method.py").write_text(USER_METHOD)
    config = tiny_config(tmp_path, "vicregl", steps=2)
    text = config.read_text().replace("ssl_modules.VICRegL", "my_method.MyVICRegL")
    config.write_text(text)
    assert run_cli(["fit", "--config", str(config)], extra_path=user).returncode == 0
    ckpt = next((tmp_path / "ckpts").glob("*.ckpt"))
    result = run_cli(["export", str(ckpt), str(tmp_path / "exported.pt")])
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    import timm
    meta = json.loads((tmp_path / "exported.json").read_text())
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "exported.pt"), strict=True)


@pytest.mark.slow
def test_a_failed_optional_part_is_summarised_and_exits_1_after_checkpoint_and_export(tmp_path):
    parts = [{"class_path": "support.cli_testkit.FailedPart"}, {"class_path": "support.cli_testkit.ScoredProbe"}]
    result = run_cli(["fit", "--config", str(tiny_config(tmp_path, "vicregl", steps=4, callbacks=parts))])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAILED: FailedPart: ValueError: mask of image 3" in result.stdout
    assert re.search(r"probe/scored_top1\s+0.6250\s+\(trivial floor 0.1000\)", result.stdout), result.stdout
    assert list((tmp_path / "ckpts").glob("*step=4*.ckpt")) and list((tmp_path / "run").rglob("backbone.pt"))


def test_python_m_ssl_modules_passes_the_exit_code_to_the_shell():
    assert run_cli(["--help"], as_module=True).returncode == 0
    assert run_cli([], as_module=True).returncode == 2
    assert run_cli(["export", str(REPO / "missing.ckpt"), "out.pt"], as_module=True).returncode == 1


def test_evaluate_dispatches_to_the_evaluation_cli_with_its_arguments(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("ssl_modules.cli.evaluate")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "ssl_modules.cli.evaluate", fake)
    assert main(["evaluate", "--checkpoint", "a.ckpt"]) == 3
    assert seen == [["--checkpoint", "a.ckpt"]]
