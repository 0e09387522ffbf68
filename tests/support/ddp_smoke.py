"""A few real ``Trainer(strategy="ddp")`` steps on 2 CPU processes (gloo), run as a script, never inside pytest
(a DDP rank re-runs ``sys.argv``). Usage: ``python tests/methods/ddp_smoke.py {bam,cribo} DATA_ROOT OUT_DIR``.

Each rank writes ``OUT_DIR/rank<r>.pt`` with what the test compares: the logged loss, the global step and a
checksum of the student backbone's parameters (DDP keeps them identical on every rank).
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule
from ssl_modules import BAM, CrIBo

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
STEPS = 3


def build(method: str) -> tuple[pl.LightningModule, MultiCropViews]:
    if method == "bam":  # ContrastiveCrop on, its first box update at the end of epoch 0
        module = BAM("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, projector_widths="64-64-32", top_k=8,
                     lr_scaling="none", warmup_epochs=0, contrastive_crop=True, ccrop_interval=1,
                     ccrop_warmup_epochs=0)
        views = MultiCropViews(n_global=2, n_local=2, global_size=32, local_size=16, jitter_p=0.0, grayscale_p=0.0)
    elif method == "cribo":
        module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, out_dim=64, object_out_dim=64,
                       head_hidden_dim=64, head_bottleneck_dim=32, num_clusters=4, queue_size=32,
                       cross_image_start_epoch=0, lr_scaling="none", warmup_epochs=0)
        views = MultiCropViews(n_global=2, n_local=0, global_size=32, jitter_p=0.0, grayscale_p=0.0)
    else:
        raise SystemExit(f"unknown method {method!r}; use bam or cribo")
    return module, views


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.backbone.parameters())
        torch.save({"losses": self.losses, "global_step": trainer.global_step, "world_size": trainer.world_size,
                    "checksum": checksum}, self.out / f"rank{trainer.global_rank}.pt")


def main(method: str, root: str, out: str) -> None:
    pl.seed_everything(0)
    module, views = build(method)
    # 2 processes x batch 8 x 2 batches = one 32-image epoch: BAM's box update runs at its end.
    scene = SceneConfig(image_size=48, num_train=32, num_val=8)
    data = SyntheticScenesDataModule(root=root, scene=scene, eval_size=32, batch_size=8, num_workers=0, views=views)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record(Path(out))])
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main(*sys.argv[1:4])
