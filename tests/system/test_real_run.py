"""The real run, per method: the tiny config with every optional callback on (four probes, pictures,
progress bar, TensorBoard; ContrastiveCrop in BAM's training) equals the run without them step for step,
and stays exact when it is killed after a step checkpoint or stopped by SIGTERM and resumed."""
from __future__ import annotations

import functools
import signal

import pytest
import torch
from support.real_run_testkit import TOTAL_STEPS, callback_entry, fit_args, run_in_process, run_subprocess

METHODS = ["cribo", "bam", "vicregl"]
pytestmark = pytest.mark.slow


def assert_same_steps(reference: dict, losses: dict[int, float], final: dict | None = None) -> None:
    """``losses`` equal the reference's at every step they cover; ``final`` (if given) ends in its state."""
    assert losses, "no step was recorded"
    for step, loss in losses.items():
        torch.testing.assert_close(loss, reference["losses"][step], rtol=1e-5, atol=0,
                                   msg=functools.partial("step {}: {}".format, step))
    if final is not None:
        assert final["global_step"] == reference["global_step"] == TOTAL_STEPS
        for name, tensor in reference["state"].items():
            torch.testing.assert_close(final["state"][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=functools.partial("{}: {}".format, name))


@pytest.fixture(scope="module", params=METHODS)
def runs(request, tmp_path_factory) -> dict:
    """Per method: the run without optional parts and the run with all of them (same checkpoints)."""
    method, root = request.param, tmp_path_factory.mktemp(request.param)
    bare = run_in_process(method, root / "bare", optional=False)
    full = run_in_process(method, root / "full", optional=True)
    return {"method": method, "root": root, "bare": bare, "full": full}


def test_every_optional_part_on_gives_the_same_run_step_for_step(runs):
    assert len(runs["bare"]["losses"]) == TOTAL_STEPS
    assert_same_steps(runs["bare"], runs["full"]["losses"], runs["full"])
    probes = {key: part for key, part in runs["full"]["parts"].items() if "Probe" in key}
    assert len(probes) == 4
    for key, part in runs["full"]["parts"].items():
        assert part["failures"] == [], key
    for key, part in probes.items():
        assert part["metrics"], f"{key} never evaluated"
    assert list((runs["root"] / "full" / "lightning_logs").glob("version_*/events.out.tfevents.*"))


def test_killed_after_a_step_checkpoint_and_resumed_with_everything_on_is_the_same_run(runs):
    checkpoint = runs["root"] / "full" / "checkpoints" / "step=12.ckpt"  # mid-epoch 1
    resumed = run_in_process(runs["method"], runs["root"] / "resumed", optional=True, ckpt_path=str(checkpoint))
    assert min(resumed["losses"]) == 13
    assert_same_steps(runs["bare"], resumed["losses"], resumed)


def test_sigterm_with_everything_on_stops_without_optional_work_exits_143_and_resumes_exactly(runs):
    method, root = runs["method"], runs["root"] / "stopped"
    signal_at = callback_entry("support.resume_testkit.SignalAt",
                               {"step": 10, "signum": int(signal.SIGTERM), "rank": 0})
    recorder = callback_entry("support.resume_testkit.LossRecorder", {"path": str(root / "losses.pt")})
    # probes due only after the last epoch: a stop must not start them in the grace period
    late_probes = [arg.replace('"every_n_epochs": 1', '"every_n_epochs": 100')
                   for arg in fit_args(method, root, optional=True)]
    result = run_subprocess([*late_probes, signal_at, recorder])
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "knn: bank features" not in result.stderr + result.stdout  # no probe evaluation after the stop
    first = torch.load(root / "losses.pt", weights_only=False)
    assert first["global_step"] == 10
    resumed = run_in_process(method, root, optional=True, ckpt_path="last")
    assert_same_steps(runs["bare"], {**first["losses"], **resumed["losses"]}, resumed)
