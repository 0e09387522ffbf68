"""The end-of-fit summary: its resume line is the run's own command (every override kept, the run's newest
checkpoint), and its figures are this run's (a resumed run that trained nothing says so)."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from types import SimpleNamespace

import pytest
from support.cli_testkit import tiny_config

from ssl_modules.cli import main
from ssl_modules.cli._summary import resume_command, steps_line


def fit(args: list[str]) -> str:
    """``main(args)`` in this process; its stdout (the exit code must be 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    assert code == 0, out.getvalue()
    return out.getvalue()


def resume_line(summary: str) -> list[str]:
    """The arguments of the summary's resume command (after ``python -m ssl_modules``)."""
    line = next(line for line in summary.splitlines() if line.strip().startswith("resume:"))
    command = line.split("resume:", 1)[1].split("  (", 1)[0].strip()
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "ssl_modules"], command
    return words[3:]


@pytest.fixture(scope="module")
def overridden_run(tmp_path_factory):
    """A tiny run of 4 steps whose logs go where a command-line override says, not where its config says."""
    tmp_path = tmp_path_factory.mktemp("summary")
    config = tiny_config(tmp_path, "vicregl", steps=4, warmup_epochs=0)
    elsewhere = tmp_path / "elsewhere"
    summary = fit(["fit", "--config", str(config), "--trainer.default_root_dir", str(elsewhere),
                   "--trainer.logger", "true"])
    return tmp_path, elsewhere, summary


def test_the_resume_line_is_the_runs_saved_config_and_newest_checkpoint(overridden_run):
    tmp_path, elsewhere, summary = overridden_run
    saved = elsewhere / "lightning_logs" / "version_0" / "config.yaml"
    newest = tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    assert resume_line(summary) == ["fit", "--config", str(saved), "--ckpt_path", str(newest)], summary
    assert f"default_root_dir: {elsewhere}" in saved.read_text()
    assert f"checkpoint:  {newest}" in summary


def test_the_resume_line_run_verbatim_resumes_this_run_and_says_it_trained_nothing(overridden_run):
    tmp_path, elsewhere, summary = overridden_run
    again = fit(resume_line(summary))
    assert (elsewhere / "lightning_logs" / "version_1" / "backbone.pt").is_file()
    assert not (tmp_path / "run").exists()  # the config's own default_root_dir: another run's place
    assert "steps:       none trained in this run: it resumed at step 4 (the end of its schedule)" in again, again
    assert "images/s" not in again
    assert resume_line(again)[-1] == str(tmp_path / "ckpts" / "epoch=0-step=4.ckpt")


def test_a_resumed_run_reports_the_steps_it_trained(overridden_run):
    tmp_path, _, summary = overridden_run
    longer = fit([*resume_line(summary), "--trainer.max_steps", "6"])
    assert re.search(r"steps: +2 in [\d.]+ s \(resumed at step 4, now at step 6\), [\d.]+ images/s", longer), longer
    assert resume_line(longer)[-1] == str(tmp_path / "ckpts" / "epoch=0-step=6.ckpt")


def test_without_a_saved_config_the_resume_line_repeats_the_command_line(tmp_path):
    argv = ["fit", "--config", "my config.yaml", "--ckpt_path", "last", "--trainer.max_epochs", "3",
            "--ckpt_path=other.ckpt"]
    command = resume_command(tmp_path, "runs/a/epoch=1-step=8.ckpt", argv)
    assert shlex.split(command)[3:] == ["fit", "--config", "my config.yaml", "--trainer.max_epochs", "3",
                                        "--ckpt_path", "runs/a/epoch=1-step=8.ckpt"]


def test_a_run_without_checkpoints_says_it_cannot_be_resumed(tmp_path):
    assert resume_command(tmp_path, None, ["fit"]).startswith("not possible: this run saved no checkpoint")


def _trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, world_size=1, accumulate_grad_batches=1)


def _progress(trained: int, loop_seconds: float = 2.0) -> SimpleNamespace:
    return SimpleNamespace(trained_steps=lambda trainer: trained, loop_seconds=loop_seconds)


def test_the_steps_line_counts_this_runs_steps_only():
    data = SimpleNamespace(batch_size=8)
    assert steps_line(_trainer(1984), data, _progress(0, None), 0.6, finished=True) == \
        "  steps:       none trained in this run: it resumed at step 1984 (the end of its schedule)"
    assert steps_line(_trainer(10), data, _progress(4), 3.0, finished=True) == \
        "  steps:       4 in 3.0 s (resumed at step 6, now at step 10), 16.0 images/s"
    assert steps_line(_trainer(4), data, _progress(4), 3.0, finished=True) == "  steps:       4 in 3.0 s, 16.0 images/s"
