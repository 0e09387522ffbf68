"""The run a user starts: a method's tiny config through the CLI with every optional callback it supports
(the four probes, ``VisualDiagnostics``; ContrastiveCrop is part of BAM's training), the progress bar and
TensorBoard on, compared step by step with the same run without the optional callbacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


from support.resume_testkit import CONFIGS, REPO, LossRecorder, _main_with_callbacks, state_tensors  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 8, 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

#: the four probes (small settings) and the pictures, as a user names them in a config
PROBES = [
    ("callbacks.OnlineLinearProbe", {"batch_size": 32, "validate_steps": 5, "num_workers": 0}),
    ("callbacks.KNNProbe", {"k": 5, "train_fraction": 1.0, "num_workers": 0}),
    ("callbacks.VOCSegmentationProbe", {"steps": 3, "batch_size": 16, "max_train_images": 32,
                                        "max_val_images": 16, "num_workers": 0}),
    ("callbacks.DenseRetrievalProbe", {"k": 5, "max_train_images": 32, "max_val_images": 16, "num_workers": 0}),
]
PICTURES = ("callbacks.VisualDiagnostics", {"every_n_steps": 3})


def callback_entry(class_path: str, init_args: dict[str, Any]) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def optional_callbacks(every_n_epochs: int = 1) -> list[str]:
    """The CLI arguments that turn every optional part on (probes every ``every_n_epochs`` epochs)."""
    probes = [callback_entry(path, {**args, "every_n_epochs": every_n_epochs}) for path, args in PROBES]
    return [*probes, callback_entry(*PICTURES)]


def fit_args(method: str, root: Path, optional: bool, extra: list[str] = ()) -> list[str]:
    """``fit`` of the method's synthetic_tiny config: 256 images, 8 steps per epoch, 2 epochs; with
    ``optional`` every probe and the pictures, the progress bar and TensorBoard on (else all off)."""
    # Lightning's defaults (a TensorBoardLogger in default_root_dir, the progress bar) with the optional parts
    shown = [] if optional else ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    return [
        "fit", "--config", str(CONFIGS / method / "synthetic_tiny.yaml"),
        f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={EPOCHS}", "--trainer.enable_model_summary=false",
        "--data.init_args.scene.num_train=256", "--data.init_args.scene.num_val=32", "--data.init_args.num_workers=0",
        *shown, *(optional_callbacks() if optional else []), *extra,
    ]


class OptionalPartsReport(pl.Callback):
    """What the optional parts did: each probe's last metrics and failures, the pictures' failures."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, Any]] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.parts = {getattr(cb, "state_key", type(cb).__name__): {
            "metrics": dict(getattr(cb, "last_metrics", {})), "failures": list(cb.failures)}
            for cb in trainer.callbacks if hasattr(cb, "failures")}


def run_in_process(method: str, root: Path, optional: bool, ckpt_path: str | None = None,
                   extra: list[str] = (), checkpoint_every_steps: int = 4) -> dict[str, Any]:
    """One in-process CLI fit with step checkpoints; returns its per-step losses, final step, state tensors
    and what the optional parts did."""
    from ssl_modules.cli.lightning import run_cli

    recorder, report = LossRecorder(), OptionalPartsReport()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=checkpoint_every_steps,
                                              save_top_k=-1, filename="{step}")
    args = fit_args(method, root, optional, [*extra, *([f"--ckpt_path={ckpt_path}"] if ckpt_path else [])])
    cli = _main_with_callbacks(run_cli, args, [recorder, checkpoint, report])
    return {"losses": recorder.losses, "global_step": cli.trainer.global_step,
            "state": state_tensors(cli.trainer.lightning_module), "parts": report.parts}


def run_subprocess(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ssl_modules <args>`` in a fresh interpreter (what a user types), test helpers importable."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parents[1])]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ssl_modules", *args], check=False, env=environment,
                          capture_output=True, text=True, timeout=timeout)
