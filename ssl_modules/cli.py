"""Command line: ``python -m ssl_modules fit --config <yaml>`` (LightningCLI) and ``... export``.

Any ``SSLModule`` subclass, any LightningDataModule and any callback — the library's or the user's — can be
named in a YAML config by class path (short names work for the library's own classes). After ``fit`` the
backbone is exported next to the logs and the paths of logs, checkpoint and backbone are printed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

import callbacks  # noqa: E402,F401  (registers the probes for short class names)
import datamodules  # noqa: E402,F401
from ssl_modules.base import SSLModule  # noqa: E402

__all__ = ["SSLCLI", "main", "export_checkpoint", "probe_report"]


def _import_methods() -> None:
    """Import every method so that ``class_path: VICRegL`` resolves without the module path."""
    for name in ("vicregl", "bam", "cribo"):
        try:
            importlib.import_module(f"ssl_modules.{name}")
        except ImportError:
            pass


class SSLCLI(LightningCLI):
    """LightningCLI in subclass mode for models and data, exporting the backbone after ``fit``."""

    def after_fit(self) -> None:
        # On every process: under DDP ``trainer.log_dir`` is a collective call (a broadcast from rank 0).
        trainer = self.trainer
        self._export_and_report(Path(trainer.log_dir or trainer.default_root_dir))

    def after_validate(self) -> None:
        self._report_probes()

    @rank_zero_only
    def _export_and_report(self, run_dir: Path) -> None:
        trainer, model = self.trainer, self.model
        backbone = model.export_backbone(run_dir / "backbone.pt")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        self._report_probes()
        print("\n".join([
            "",
            "Run finished.",
            f"  logs:       {run_dir}  (tensorboard --logdir {run_dir.parent})",
            f"  checkpoint: {ckpt or 'none (checkpointing is off)'}",
            f"  backbone:   {backbone}  (timm weights; see {backbone.with_suffix('.json').name})",
        ]))

    @rank_zero_only
    def _report_probes(self) -> None:
        """Print the probes' last results (identical on every process)."""
        lines = probe_report(self.trainer.callbacks)
        if lines:
            print("\n".join(["", "Probe results (last evaluation):", *lines]))


def probe_report(callbacks: list) -> list[str]:  # noqa: F811  (the parameter shadows the package on purpose)
    """One line per probe metric, ``probe/<name>_<metric>  value``, from the probes' ``last_metrics``."""
    lines = []
    for callback in callbacks:
        metrics = getattr(callback, "last_metrics", None)
        if not isinstance(metrics, dict) or not hasattr(callback, "metric_name"):
            continue
        for metric, value in metrics.items():
            lines.append(f"  {callback.metric_name(metric):<28} {float(value):.4f}")
    return lines


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Load a Lightning checkpoint of any ``SSLModule`` and write its backbone for timm."""
    module = SSLModule.load_any(checkpoint)
    return module.export_backbone(output)


def _export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssl_modules export",
                                     description="Write the (teacher) backbone of a checkpoint as timm weights.")
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of an SSLModule")
    parser.add_argument("output", help="where to write the state dict (.pt); a .json with the timm name goes beside it")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.output)
    print(f"backbone written to {path} (timm name and kwargs in {path.with_suffix('.json')})")


def main(args: list[str] | None = None) -> SSLCLI | None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        _export_main(argv[1:])
        return None
    _import_methods()
    torch.set_float32_matmul_precision("high")
    return SSLCLI(
        SSLModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
        auto_configure_optimizers=False,
    )
