"""Issue 15's matrix through the CLI: stopped anywhere and resumed, every method is the same run.

Tiny configs (256 images, 8 steps per epoch, 4 epochs). Scenarios: (a) resume from the step checkpoint of
step 20 (mid-epoch, as after a kill), (b) a graceful stop at step 20 (``trainer.should_stop``, what
``max_time`` does) and resume from the checkpoint written on the way out, (c) the same at step 16 (the end
of epoch 1). Every resumed run must give the uninterrupted run's loss at every step (rtol 1e-5), its final
global step and its state tensors (bank, centers, teacher, ContrastiveCrop boxes), with 0 and 2 workers;
the uninterrupted runs with 0 and 2 workers are equal.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.resume_testkit import TOTAL_STEPS, assert_same_run, cli_subprocess, run

pytestmark = pytest.mark.slow

METHODS = {
    "vicregl": [],
    "cribo": [],
    # ContrastiveCrop on, the boxes recomputed at the end of every epoch
    "bam": ["--model.init_args.contrastive_crop=true", "--model.init_args.ccrop_interval=1",
            "--model.init_args.ccrop_warmup_epochs=0"],
}


def _newest_checkpoint(folder: Path) -> Path:
    return max(folder.rglob("*.ckpt"), key=lambda path: path.stat().st_mtime_ns)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stopped_and_resumed_runs_equal_the_uninterrupted_run(method, tmp_path):
    extra = METHODS[method]
    references = {}
    for workers in (0, 2):
        reference = references[workers] = run(method, tmp_path / f"ref{workers}", workers, extra=extra)
        assert reference["global_step"] == TOTAL_STEPS
        # (a) kill after the step checkpoint of step 20: resume from it
        resumed = run(method, tmp_path / f"a{workers}", workers, extra=extra,
                      ckpt_path=str(tmp_path / f"ref{workers}" / "checkpoints" / "step=20.ckpt"))
        assert_same_run(reference, resumed["losses"], resumed)
        # (b) graceful stop mid-epoch, (c) graceful stop at an epoch end
        for scenario, stop in (("b", 20), ("c", 16)):
            first = run(method, tmp_path / scenario / str(workers), workers, stop_at=stop, extra=extra)
            assert first["global_step"] == stop
            resumed = run(method, tmp_path / f"{scenario}r" / str(workers), workers, extra=extra,
                          ckpt_path=str(_newest_checkpoint(tmp_path / scenario / str(workers))))
            assert_same_run(reference, {**first["losses"], **resumed["losses"]}, resumed)
    assert_same_run(references[0], references[2]["losses"], references[2])


def test_a_graceful_mid_epoch_stop_is_not_superseded_by_the_epoch_end_checkpoint(tmp_path):
    """Every checkpoint written on the way out holds the mid-epoch state: the epoch is not counted done."""
    run("vicregl", tmp_path, 0, stop_at=20, checkpoint_every_steps=None)
    written = {path.name for path in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "epoch=2-step=20.ckpt", "last-stop.ckpt"} <= written
    for name in written - {"epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"}:
        checkpoint = torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 20
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
        assert progress["processed"] == 2, name  # epochs 0 and 1 done, epoch 2 not
        assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4


def test_ddp_two_processes_resume_exactly(tmp_path):
    """2 gloo processes, 4 steps per epoch (16 in all): resume from the step-10 checkpoint (mid-epoch)."""
    assert cli_subprocess("vicregl", tmp_path / "ref", tmp_path / "ref.pt") == 0
    assert cli_subprocess("vicregl", tmp_path / "resumed", tmp_path / "resumed.pt",
                          [f"--ckpt_path={tmp_path / 'ref' / 'checkpoints' / 'step=10.ckpt'}"]) == 0
    reference, resumed = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "resumed.pt")
    assert reference["global_step"] == resumed["global_step"] == 16
    for step, loss in resumed["losses"].items():
        torch.testing.assert_close(loss, reference["losses"][step], rtol=1e-5, atol=0)
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(resumed["state"][name], tensor, rtol=1e-5, atol=1e-6)
