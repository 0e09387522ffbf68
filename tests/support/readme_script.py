"""The README's second way of use, as a user copies it into a script, on tiny settings: CrIBo with the online
linear and k-NN probes under ``Trainer(strategy="ddp")``, progress bar and logger left at their defaults.

Run as a script (a ``ddp`` rank re-runs ``sys.argv``): ``python tests/run/readme_script.py DATA_ROOT OUT_DIR
[user-metric]``; ``user-metric`` trains a subclass that also logs its own ``sync_dist`` epoch value, as users'
subclasses do. Rank 0 writes ``OUT_DIR/result.pt`` with the global step and the probes' last metrics.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from callbacks import KNNProbe, OnlineLinearProbe
from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule
from ssl_modules import CrIBo

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


class CrIBoWithEpochValue(CrIBo):
    """A user's subclass that logs an epoch mean reduced over processes (``sync_dist=True``)."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("user/epoch_loss", output["loss"].detach(), on_step=False, on_epoch=True, sync_dist=True)
        return output


def main(root: str, out: str, variant: str = "readme") -> None:
    method = CrIBoWithEpochValue if variant == "user-metric" else CrIBo
    model = method("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, out_dim=64, object_out_dim=64,
                  head_hidden_dim=64, head_bottleneck_dim=32, num_clusters=4, queue_size=64, lr_scaling="none",
                  warmup_epochs=0, cross_image_start_epoch=1)
    views = MultiCropViews(n_global=2, n_local=0, global_size=32, jitter_p=0.0, grayscale_p=0.0)
    data = SyntheticScenesDataModule(root=root, scene=SceneConfig(image_size=48, num_train=64, num_val=16),
                                     eval_size=32, batch_size=8, num_workers=0, views=views)
    probes = [OnlineLinearProbe(), KNNProbe(every_n_epochs=1)]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=list(probes),
                         default_root_dir=out)
    trainer.fit(model, data)
    if trainer.is_global_zero:
        torch.save({"global_step": trainer.global_step, "metrics": [dict(p.last_metrics) for p in probes],
                    "failures": [f for p in probes for f in p.failures]}, Path(out) / "result.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
