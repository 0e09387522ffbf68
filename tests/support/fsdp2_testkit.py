"""Runs of a method's tiny config on 2 CPU processes (gloo) under DDP or FSDP2 (``ModelParallelStrategy``), in a
subprocess of ``python -m ssl_modules fit`` (Lightning re-runs the script for rank 1), recording what the FSDP2
tests compare: the loss of every step, the final full state (sharded tensors gathered); the CLI writes the
backbone export ``backbone.pt``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from support.resume_testkit import CONFIGS, REPO

FSDP2 = json.dumps({"class_path": "ssl_modules.run.sharding.FSDP2Strategy"})
STEPS_PER_EPOCH = 4  # 64 images, 2 processes x 8 per step
#: CrIBo trains 2 epochs: its prototype layers, frozen in the first, get their first update at step 5
EPOCHS = {"cribo": 2, "bam": 1, "vicregl": 1}

#: per method: for CrIBo the cross-image loss from step 1 with a bank of 24 images (16 per step: it wraps around
#: at step 2), sharded over the 2 processes (the default of a multi-process run); gradient clipping of both kinds
METHOD_ARGS = {
    "cribo": ["--model.init_args.queue_size=24", "--model.init_args.cross_image_start_epoch=0",
              "--model.init_args.clip_grad=0.3", "--model.init_args.clip_grad_mode=per_parameter"],
    "bam": ["--model.init_args.clip_grad=0.5"],
    "vicregl": ["--model.init_args.clip_grad=0.5"],
}


class FullStateRecorder(pl.Callback):
    """``{global step: loss}`` of every step; at the end of fit every process gathers the full state (DTensors
    to whole tensors, a collective) and rank 0 writes ``path``."""

    def __init__(self, path: str) -> None:
        self.path, self.losses = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = float(loss)

    def on_fit_end(self, trainer, pl_module) -> None:
        from ssl_modules.run.sharding import full_state_dict

        state = full_state_dict(pl_module)
        sharded = sorted(name for name, p in pl_module.named_parameters() if type(p).__name__ == "DTensor")
        parts = {getattr(cb, "state_key", type(cb).__name__): {"metrics": dict(getattr(cb, "last_metrics", {})),
                                                               "failures": list(cb.failures)}
                 for cb in trainer.callbacks if hasattr(cb, "failures")}  # the probes and the pictures
        if trainer.is_global_zero:
            torch.save({"losses": self.losses, "global_step": trainer.global_step, "state": state, "parts": parts,
                        "sharded": sharded, "parameters": [n for n, _ in pl_module.named_parameters()]}, self.path)


class StopAfter(pl.Callback):
    """A graceful stop after global step ``step`` (a run cut short, resumed from its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _entry(class_path: str, init_args: dict[str, Any]) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def fit(method: str, root: Path, strategy: str, *, stop_after: int | None = None,
        ckpt_path: Path | None = None, optional: bool = False, checkpoints: bool = True,
        extra: list[str] = ()) -> dict[str, Any]:
    """One 2-process fit of ``method``'s tiny config under ``strategy`` (``"ddp"`` or :data:`FSDP2`), with
    ``checkpoints`` one every 2 steps in ``root/checkpoints``; returns what :class:`FullStateRecorder` wrote. With
    ``optional``: the four probes (every epoch) and ``VisualDiagnostics``, with TensorBoard on."""
    from support.real_run_testkit import optional_callbacks

    root.mkdir(parents=True, exist_ok=True)
    out = root / "record.pt"
    callbacks = [_entry("support.fsdp2_testkit.FullStateRecorder", {"path": str(out)})]
    if checkpoints:
        callbacks.append(_entry("lightning.pytorch.callbacks.ModelCheckpoint",
                                {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 2, "save_top_k": -1,
                                 "filename": "{step}"}))
    else:
        callbacks.append("--trainer.enable_checkpointing=false")
    if stop_after is not None:
        callbacks.append(_entry("support.fsdp2_testkit.StopAfter", {"step": stop_after}))
    args = [
        "fit", "--config", str(CONFIGS / method / "synthetic_tiny.yaml"),
        f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={EPOCHS[method]}", "--trainer.accelerator=cpu",
        "--trainer.devices=2", f"--trainer.strategy={strategy}", *([] if optional else ["--trainer.logger=false"]),
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.scene.num_train=64", "--data.init_args.scene.num_val=16", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8", *METHOD_ARGS[method], *callbacks,
        *(optional_callbacks() if optional else []), *extra,
        *([f"--ckpt_path={ckpt_path}"] if ckpt_path is not None else []),
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK"):
        environment.pop(name, None)  # a launch of its own, not a rank of the pytest run
    result = subprocess.run([sys.executable, "-m", "ssl_modules", *args], env=environment, cwd=root.parent,
                            capture_output=True, text=True, timeout=600, check=False)
    (root / "output.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise AssertionError(f"exit code {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}")
    return torch.load(out, weights_only=False)
