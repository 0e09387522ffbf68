"""Drive ``ssl_modules.cli.main`` in-process on tiny configs and compare runs step by step (issue 15 matrix)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
STEPS_PER_EPOCH, EPOCHS = 8, 4
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


class LossRecorder(pl.Callback):
    """``{global step: train loss}`` of every optimizer step; with ``path``, rank 0 writes them (and the
    final state tensors, ``<path>.pt``) there at the end of fit (for subprocess runs)."""

    def __init__(self, path: str | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = float(loss)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.path is not None and trainer.is_global_zero:
            torch.save({"losses": self.losses, "global_step": trainer.global_step,
                        "state": state_tensors(pl_module)}, self.path)


class StopAt(pl.Callback):
    """A graceful stop (``trainer.should_stop``, what ``max_time`` does) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def tiny_args(method: str, root: Path, num_workers: int, extra: list[str] = ()) -> list[str]:
    """``fit`` arguments: the method's synthetic_tiny config at 256 images, 8 steps/epoch, 4 epochs."""
    return [
        "fit", "--config", str(CONFIGS / method / "synthetic_tiny.yaml"),
        f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={EPOCHS}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.scene.num_train=256", "--data.init_args.scene.num_val=32",
        f"--data.init_args.num_workers={num_workers}",
        *extra,
    ]


def run(method: str, root: Path, num_workers: int = 0, stop_at: int | None = None, ckpt_path: str | None = None,
        extra: list[str] = (), checkpoint_every_steps: int | None = 4) -> dict[str, Any]:
    """One in-process CLI fit; returns its per-step losses, final global step and state tensors.

    Checkpoints ``step=N.ckpt`` every ``checkpoint_every_steps`` steps, or (None) Lightning's epoch-end
    checkpoints with ``last.ckpt``."""
    from ssl_modules.cli.lightning import run_cli as main  # the LightningCLI object, not the exit code

    recorder = LossRecorder()
    if checkpoint_every_steps is None:
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    else:
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints",
                                                  every_n_train_steps=checkpoint_every_steps,
                                                  save_top_k=-1, filename="{step}")
    callbacks: list[pl.Callback] = [recorder, checkpoint]
    if stop_at is not None:
        callbacks.insert(0, StopAt(stop_at))
    args = tiny_args(method, root, num_workers, extra)
    if ckpt_path is not None:
        args.append(f"--ckpt_path={ckpt_path}")
    cli = _main_with_callbacks(main, args, callbacks)
    model = cli.trainer.lightning_module
    return {"losses": recorder.losses, "global_step": cli.trainer.global_step, "state": state_tensors(model)}


def _main_with_callbacks(main, args: list[str], callbacks: list[pl.Callback]):
    """``main(args)`` with ``callbacks`` added to the Trainer (objects, not config entries)."""
    from lightning.pytorch import Trainer

    original = Trainer.__init__

    @functools.wraps(original)  # the CLI reads the Trainer's arguments from this signature
    def init(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + callbacks
        original(self, *a, **kw)

    Trainer.__init__ = init
    try:
        return main(args)
    finally:
        Trainer.__init__ = original


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (bank, centers, teacher, ...) and ContrastiveCrop's boxes."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    from callbacks import ContrastiveCrop

    trainer = model._trainer
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, ContrastiveCrop) and callback.crop_boxes is not None:
            state["crop_boxes"] = callback.crop_boxes.clone()
    return state


def assert_same_run(reference: dict[str, Any], resumed_losses: dict[int, float], final: dict[str, Any]) -> None:
    """The resumed run's losses equal the reference's at every step it ran, and it ends in the same state."""
    assert final["global_step"] == reference["global_step"] == TOTAL_STEPS
    for step, loss in resumed_losses.items():
        torch.testing.assert_close(loss, reference["losses"][step], rtol=1e-5, atol=0,
                                   msg=functools.partial("step {}: {}".format, step))
    assert reference["state"].keys() == final["state"].keys()
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(final["state"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=functools.partial("{}: {}".format, name))


class SignalAt(pl.Callback):
    """Process ``rank`` sends itself ``signum`` (SIGTERM by default) at the end of global step ``step``, as a
    scheduler's pre-emption would, in the middle of the training loop."""

    def __init__(self, step: int, signum: int = 15, rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            import os

            os.kill(os.getpid(), self.signum)


def cli_subprocess(method: str, root: Path, out: Path, extra: list[str] = (), devices: int = 2,
                   signal_at: tuple[int, int, int] | None = None, env: dict[str, str] | None = None,
                   checkpoint_every_steps: int = 2) -> int:
    """``python -m ssl_modules fit`` of ``method`` in a subprocess (``devices`` gloo DDP processes, 0 workers),
    rank 0 writing its losses and final tensors to ``out``; ``signal_at`` = (step, signal, rank) sends that
    process the signal at that step. Returns the exit code."""
    import os
    import subprocess
    import sys

    def entry(class_path: str, init_args: dict[str, Any]) -> str:
        import json

        return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})

    callbacks = [entry("support.resume_testkit.LossRecorder", {"path": str(out)}),
                 entry("lightning.pytorch.callbacks.ModelCheckpoint",
                       {"dirpath": str(root / "checkpoints"), "every_n_train_steps": checkpoint_every_steps,
                        "save_top_k": -1, "filename": "{step}"})]
    if signal_at is not None:
        step, signum, rank = signal_at
        callbacks.append(entry("support.resume_testkit.SignalAt", {"step": step, "signum": signum, "rank": rank}))
    distributed = ["--trainer.devices=2", "--trainer.strategy=ddp"] if devices == 2 else ["--trainer.devices=1"]
    args = tiny_args(method, root, 0, [*distributed, "--trainer.accelerator=cpu", *callbacks, *extra])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parents[1])]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "ssl_modules", *args], check=False, cwd=root.parent,
                            env=environment, capture_output=True, text=True, timeout=600)
    if result.returncode not in (0, 128 + (signal_at or (0, 0))[1]):
        raise AssertionError(f"exit code {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.returncode
