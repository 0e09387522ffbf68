"""What the CLI tests share: tiny configs of the methods, a NaN injector, running ``main`` and the script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"


class InjectNaN(Callback):
    """Fills the crops with NaN from optimizer step ``step`` on: every loss term downstream becomes NaN."""

    def __init__(self, step: int = 5, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            for crop in batch.crops:
                crop.fill_(float("nan"))


def tiny_config(tmp_path: Path, method: str, *, steps: int = 8, callbacks: list | None = None,
                checkpoint_every: int | None = 2, **model_args) -> Path:
    """``examples/configs/<method>/synthetic_tiny.yaml`` shrunk to a few steps on 64 images, into tmp_path."""
    config = yaml.safe_load((CONFIGS / method / "synthetic_tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, max_epochs=None, log_every_n_steps=2, default_root_dir=str(tmp_path / "run"),
                   enable_progress_bar=False, enable_model_summary=False, logger=False)
    trainer["callbacks"] = list(callbacks or [])
    if checkpoint_every:
        trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                     "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_top_k": -1,
                                                   "every_n_train_steps": checkpoint_every}})
    data = config["data"]["init_args"]
    data["scene"] = {**data.get("scene", {}), "num_train": 64, "num_val": 16}
    data.update(batch_size=8, num_workers=0, root=str(tmp_path.parent / "scenes"))
    model = config["model"]["init_args"]
    if "queue_size" in model:
        model["queue_size"] = 64
    model.update(model_args)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], timeout: float = 600, extra_path: Path | None = None,
            cwd: Path = REPO, as_module: bool = False) -> subprocess.CompletedProcess:
    """``sys.exit(main(args))`` in a fresh interpreter with this checkout first on the path
    (``as_module``: ``python -m ssl_modules``, which a DDP launcher can re-run)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    paths = [str(REPO), str(Path(__file__).parents[1]), str(extra_path) if extra_path else None]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    code = "import sys; from ssl_modules.cli import main; sys.exit(main(sys.argv[1:]))"
    command = ["-m", "ssl_modules"] if as_module else ["-c", code]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def checkpoints_by_step(folder: Path) -> list[Path]:
    def step(path: Path) -> int:
        return int(path.stem.split("step=")[1].split("-")[0])
    return sorted(folder.glob("*.ckpt"), key=step)


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class FailedPart(Callback):
    """An optional part that failed during the run (interface: a ``failures`` list of messages)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.failures = ["FailedPart: ValueError: mask of image 3 is 20x20, image is 32x32"]


class ScoredProbe(Callback):
    """A probe's results as the summary reads them: ``last_metrics``, ``metric_name``, ``last_floors``."""

    last_metrics = {"top1": 0.625}
    last_floors = {"top1": 0.1}

    def metric_name(self, metric: str) -> str:
        return f"probe/scored_{metric}"
