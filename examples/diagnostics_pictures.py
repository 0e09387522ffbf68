"""Train each method's CPU config (``examples/configs/<method>/synthetic_tiny.yaml``) for a few steps and save
its diagnostics pictures as PNG files: what ``VisualDiagnostics`` logs to TensorBoard, for the docs.

    python examples/diagnostics_pictures.py --steps 96 --output docs/images

(about a minute per method on 2 CPU cores; OMP_NUM_THREADS=1 in front on a shared machine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torchvision.utils import save_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_modules.methods.base import SSLModule  # noqa: E402
from ssl_modules.cli.lightning import SSLCLI  # noqa: E402

METHODS = ("cribo", "bam", "vicregl")


def trained(method: str, steps: int, data_root: str) -> tuple[SSLModule, LightningDataModule]:
    """The method of the tiny config after ``steps`` optimizer steps (no logger, no checkpoint)."""
    config = REPO / "examples" / "configs" / method / "synthetic_tiny.yaml"
    cli = SSLCLI(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 auto_configure_optimizers=False, save_config_callback=None,
                 args=["--config", str(config), "--trainer.max_steps", str(steps), "--trainer.logger", "false",
                       "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                       "--trainer.enable_model_summary", "false",
                       "--data.init_args.root", data_root, "--data.init_args.num_workers", "0"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, cli.datamodule


def save_pictures(method: str, steps: int, data_root: str, output: Path) -> list[Path]:
    model, data = trained(method, steps, data_root)
    batch = next(iter(data.train_dataloader())).normalized()
    with torch.no_grad():
        pictures = model.visual_diagnostics(batch)
    paths = []
    for name, picture in pictures.items():
        path = output / f"{name.replace('/', '_')}.png"
        save_image(picture, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--data-root", default=str(REPO / "runs" / "synthetic-scenes"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for path in save_pictures(method, args.steps, args.data_root, args.output):
            print(path)


if __name__ == "__main__":
    main()
