"""Stop signals: SIGTERM (one process or any DDP rank) and SLURM's requeue signal stop the run at a batch
boundary with a checkpoint, exit 128 + N, and the resumed run is the uninterrupted one."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.resume_testkit import assert_same_run, cli_subprocess, run

from ssl_modules.run.preemption import StopSignals, signal_name

DDP_STEPS = 16  # 2 processes: 4 steps per epoch, 4 epochs


def _trainer(world_size: int = 1) -> SimpleNamespace:
    from lightning.fabric.plugins.environments import LightningEnvironment

    connector = SimpleNamespace(cluster_environment=LightningEnvironment())
    return SimpleNamespace(world_size=world_size, _accelerator_connector=connector)


# ------------------------------------------------------------------------------------------------ unit
def test_a_signal_is_only_recorded_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals()
    signals.install(_trainer())
    try:
        assert signals.agreed(_trainer()) is None
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if the handler were not ours
        assert signals.agreed(_trainer()) == signal.SIGTERM
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal_name(15) == "SIGTERM"


def _vote(rank: int, world_size: int) -> list[int | None]:
    signals = StopSignals()
    signals._group = None  # the default (gloo) group
    trainer = _trainer(world_size)
    decisions = []
    for batch in range(4):
        if rank == 1 and batch == 1:
            signals.received = int(signal.SIGTERM)  # what the handler does, on one process only
        decisions.append(signals.agreed(trainer))
    signals.uninstall()
    return decisions


def test_every_process_agrees_one_batch_after_any_process_received_the_signal():
    from support.distributed_utils import run_distributed

    assert run_distributed(_vote) == [[None, None, 15, 15]] * 2


# ------------------------------------------------------------------------------------ one process, CLI
@pytest.mark.slow
def test_sigterm_stops_at_the_batch_with_a_checkpoint_exits_143_and_resumes_exactly(tmp_path):
    reference = run("vicregl", tmp_path / "ref", 0)
    code = cli_subprocess("vicregl", tmp_path / "stopped", tmp_path / "stopped.pt", devices=1,
                          signal_at=(20, int(signal.SIGTERM), 0), checkpoint_every_steps=100)
    assert code == 128 + signal.SIGTERM
    stop = tmp_path / "stopped" / "checkpoints" / "last-stop.ckpt"
    assert torch.load(stop, map_location="cpu", weights_only=True)["global_step"] == 20
    first = torch.load(tmp_path / "stopped.pt")
    assert first["global_step"] == 20
    resumed = run("vicregl", tmp_path / "stopped", 0, ckpt_path="last")
    assert_same_run(reference, {**first["losses"], **resumed["losses"]}, resumed)


# ------------------------------------------------------------------------------------------- DDP, CLI
@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp_reference")
    assert cli_subprocess("vicregl", root / "run", root / "run.pt") == 0
    return torch.load(root / "run.pt")


def _stop_and_resume(tmp_path: Path, signal_step: int, rank: int) -> tuple[dict, dict, dict]:
    code = cli_subprocess("vicregl", tmp_path / "run", tmp_path / "first.pt",
                          signal_at=(signal_step, int(signal.SIGTERM), rank))
    assert code == 128 + signal.SIGTERM
    stop = torch.load(tmp_path / "run" / "checkpoints" / "last-stop.ckpt", map_location="cpu", weights_only=True)
    assert cli_subprocess("vicregl", tmp_path / "run", tmp_path / "second.pt", ["--ckpt_path=last"]) == 0
    return stop, torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt")


def _assert_same_ddp_run(reference: dict, first: dict, second: dict) -> None:
    assert second["global_step"] == reference["global_step"] == DDP_STEPS
    for step, loss in {**first["losses"], **second["losses"]}.items():
        torch.testing.assert_close(loss, reference["losses"][step], rtol=1e-5, atol=0)
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(second["state"][name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_sigterm_on_one_rank_stops_every_rank_at_the_next_batch_and_resumes_exactly(ddp_reference, tmp_path):
    stop, first, second = _stop_and_resume(tmp_path, signal_step=5, rank=1)
    assert stop["global_step"] == first["global_step"] == 6  # mid-epoch 1, one batch after the signal
    assert min(second["losses"]) == 7
    _assert_same_ddp_run(ddp_reference, first, second)


@pytest.mark.slow
def test_ddp_sigterm_before_an_epochs_last_batch_checkpoints_the_epoch_end(ddp_reference, tmp_path):
    stop, first, second = _stop_and_resume(tmp_path, signal_step=7, rank=0)
    assert stop["global_step"] == first["global_step"] == 8  # the last batch of epoch 1
    assert stop["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 2
    assert min(second["losses"]) == 9
    _assert_same_ddp_run(ddp_reference, first, second)

