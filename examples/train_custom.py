"""Train your own variant of a method from Python: subclass it, build the data and the probes, run DDP.

The variant here is VICRegL whose local criterion is switched on gradually: its weight ramps linearly from 0
to ``1 - alpha`` over the first ``local_warmup_steps`` optimizer steps (the global criterion keeps its weight
``alpha`` throughout). Everything else — backbone, heads, optimizer, schedules, distributed gathering,
checkpoints, ``embed`` for the probes, backbone export — is inherited from :class:`ssl_modules.VICRegL`.

On CPU with the built-in synthetic scenes (generated once into ``$SSL_MODULES_DATA`` or ``--data-root``), two
processes talking over gloo, a LayerNorm ConvNeXt (torch's SyncBatchNorm refuses CPU modules, so CPU DDP
runs stay BatchNorm-free)::

    python examples/train_custom.py --devices 2 --accelerator cpu --max-steps 50

On GPUs: ``--accelerator gpu --devices 8 --backbone convnext_small --global-size 224 --local-size 96
--num-local 6 --num-matches 20 4 --num-workers 8 --precision 16-mixed`` (the per-process batch is
``--batch-size``; the heads stay narrow here, see ``examples/configs/vicregl`` for the released widths).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, VOCSegmentationProbe  # noqa: E402
from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule  # noqa: E402
from ssl_modules import VICRegL  # noqa: E402


class MyVICRegL(VICRegL):
    """VICRegL with a warm-up of the local criterion.

    ``loss = alpha * global + ramp * (1 - alpha) * local`` with ``ramp = min(1, step / local_warmup_steps)``:
    early in training the local projector's matches are mostly noise, so the global criterion shapes the
    features first. With ``local_warmup_steps=0`` this is exactly VICRegL.

    Args:
        local_warmup_steps: optimizer steps over which the local weight ramps from 0 to ``1 - alpha``.
        **kwargs: every :class:`~ssl_modules.VICRegL` argument (``backbone``, ``alpha``, ``lr``, ...).
    """

    def __init__(self, local_warmup_steps: int = 1000, **kwargs: Any) -> None:
        if local_warmup_steps < 0:
            raise ValueError(f"local_warmup_steps={local_warmup_steps} must be >= 0")
        super().__init__(**kwargs)  # saves every argument, ours included, as hparams (in the checkpoint too)

    def local_ramp(self) -> float:
        """The fraction of the local weight in use at the current step."""
        steps = self.hparams.local_warmup_steps
        step = self.trainer.global_step if self._trainer is not None else steps
        return 1.0 if steps == 0 else min(1.0, step / steps)

    def criterion(self, embeddings: list[Tensor] | None, maps: list[Tensor] | None,
                  locations: list[Tensor] | None) -> dict[str, Tensor]:
        out = super().criterion(embeddings, maps, locations)  # every term, on the global batch, in float32
        alpha = self.hparams.alpha
        if "local_loss" in out:
            ramp = self.local_ramp()
            global_part = alpha * out["global_loss"] if "global_loss" in out else 0.0  # no global term at alpha 0
            out["loss"] = global_part + ramp * (1 - alpha) * out["local_loss"]
            out["local_ramp"] = torch.tensor(ramp)
        return out  # training_step logs every entry as train/<name> and returns out["loss"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs or CPU processes) of the DDP run")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto, ...")
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--backbone", default="convnext_atto", help="timm model name (a BatchNorm-free one on CPU)")
    parser.add_argument("--alpha", type=float, default=0.75, help="weight of the global criterion")
    parser.add_argument("--local-warmup-steps", type=int, default=20, help="steps of the local weight ramp")
    parser.add_argument("--batch-size", type=int, default=16, help="images per process and step")
    parser.add_argument("--global-size", type=int, default=96, help="side of the 2 large crops (px)")
    parser.add_argument("--local-size", type=int, default=64, help="side of the small crops (px)")
    parser.add_argument("--num-local", type=int, default=2, help="small crops per image")
    parser.add_argument("--num-matches", type=int, nargs=2, default=(4, 2), help="VICRegL's (gamma1, gamma2)")
    parser.add_argument("--data-root", default=None,
                        help="cache of the synthetic scenes (default $SSL_MODULES_DATA/synthetic)")
    parser.add_argument("--num-train", type=int, default=512, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=64, help="synthetic validation images")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes per process")
    parser.add_argument("--precision", default="32-true", help="Trainer precision (16-mixed / bf16-mixed on GPUs)")
    parser.add_argument("--output", default="runs/train_custom", help="logs, checkpoint and exported backbone")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)

    model = MyVICRegL(
        backbone=args.backbone, alpha=args.alpha, local_warmup_steps=args.local_warmup_steps,
        num_matches=tuple(args.num_matches), expander_widths="512-512-512", projector_widths="128-128-128",
        lr=1e-3, lr_scaling="none", warmup_epochs=0.5,
    )
    views = MultiCropViews.preset("vicregl_convnext", global_size=args.global_size, local_size=args.local_size,
                                  n_local=args.num_local)
    data = SyntheticScenesDataModule(
        root=args.data_root,
        scene=SceneConfig(image_size=max(96, args.global_size), num_train=args.num_train, num_val=args.num_val),
        views=views, eval_size=args.global_size, batch_size=args.batch_size, num_workers=args.num_workers,
    )
    probes = [  # every_n_epochs=0: evaluated once, after the last epoch
        OnlineLinearProbe(train_on="batches", lr=0.05, every_n_epochs=0, num_workers=args.num_workers),
        KNNProbe(k=10, train_fraction=1.0, every_n_epochs=0, batch_size=64, num_workers=args.num_workers),
        VOCSegmentationProbe(every_n_epochs=0, steps=50, max_train_images=256, num_workers=args.num_workers),
        DenseRetrievalProbe(every_n_epochs=0, max_train_images=256, num_workers=args.num_workers),
    ]
    trainer = pl.Trainer(
        strategy="ddp" if args.devices > 1 else "auto", devices=args.devices, accelerator=args.accelerator,
        max_steps=args.max_steps, precision=args.precision, callbacks=list(probes),  # the Trainer extends the list
        default_root_dir=args.output, log_every_n_steps=1, limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)

    log_dir = Path(trainer.log_dir or args.output)  # every process: under DDP log_dir is a collective call
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        for probe in probes:
            metrics.update({probe.metric_name(k): v for k, v in probe.last_metrics.items()})
        print(f"finished {trainer.global_step} steps on {trainer.world_size} process(es)")
        for name in sorted(metrics):
            print(f"  {name}: {metrics[name]:.4f}")
        backbone = model.export_backbone(log_dir / "backbone.pt")
        print(f"backbone: {backbone}")


if __name__ == "__main__":
    main()
