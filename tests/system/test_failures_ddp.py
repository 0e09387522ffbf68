"""Under 2 DDP processes (``ddp_spawn``, gloo, progress bar and TensorBoard on): a probe that fails on ONE
rank is disabled on every rank together, the run goes on and the message names the rank; a picture that
fails is reported with its rank, and the other probes keep working."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger


from support.probe_testkit import ColourData, ColourFeatures  # noqa: E402

from callbacks import KNNProbe, OnlineLinearProbe, VisualDiagnostics  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 3, 2  # 64 images, 2 processes x 16 per batch


class KNNFailingOnRank1(KNNProbe):
    """What an out-of-memory on one GPU does: ``evaluate`` raises on rank 1 only (rank 0 goes on into the
    probe's gathers)."""

    def evaluate(self, trainer, pl_module):
        if trainer.global_rank == 1:
            raise RuntimeError("CUDA out of memory (simulated on rank 1)")
        return super().evaluate(trainer, pl_module)


class LinearFailingOnRank1(OnlineLinearProbe):
    """The online probe trains in every step: rank 1 fails at its third update."""

    def train_on_batch(self, trainer, pl_module, outputs, batch):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            raise RuntimeError("head update broke (simulated on rank 1)")
        return super().train_on_batch(trainer, pl_module, outputs, batch)


class PicturesFailingAtStep2(ColourFeatures):
    def visual_diagnostics(self, batch):
        if self.global_step == 2:
            raise ValueError("drawing broke (simulated)")
        return super().visual_diagnostics(batch)


class Report(pl.Callback):
    """Each rank writes the failures of every optional part, the steps it trained and the probes' metrics."""

    def __init__(self, folder: str) -> None:
        self.folder, self.steps = folder, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        parts = {type(cb).__name__ + getattr(cb, "name", ""): {"failures": list(cb.failures),
                                                               "metrics": dict(getattr(cb, "last_metrics", {}))}
                 for cb in trainer.callbacks if hasattr(cb, "failures")}
        torch.save({"parts": parts, "steps": self.steps, "epoch": trainer.current_epoch},
                   Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_one_rank_failures_disable_the_part_on_every_rank_and_the_run_goes_on(tmp_path):
    callbacks = [KNNFailingOnRank1(name="knn", k=3, batch_size=16, num_workers=0),
                 KNNProbe(name="knn_healthy", k=3, batch_size=16, num_workers=0),
                 LinearFailingOnRank1(batch_size=16, num_workers=0),
                 VisualDiagnostics(every_n_steps=1), Report(str(tmp_path))]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=EPOCHS,
                         use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, logger=TensorBoardLogger(tmp_path), callbacks=callbacks)
    trainer.fit(PicturesFailingAtStep2(return_embedding=True), datamodule=ColourData())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in ranks:
        assert result["steps"] == EPOCHS * STEPS_PER_EPOCH and result["epoch"] == EPOCHS  # the run went on
        knn, linear = result["parts"]["KNNFailingOnRank1knn"], result["parts"]["LinearFailingOnRank1linear"]
        assert len(knn["failures"]) == 1 and "on rank 1: RuntimeError: CUDA out of memory" in knn["failures"][0]
        assert len(linear["failures"]) == 1 and "on rank 1: RuntimeError: head update broke" in linear["failures"][0]
        assert "during head training" in linear["failures"][0]
        healthy = result["parts"]["KNNProbeknn_healthy"]  # evaluated after every epoch, the failures notwithstanding
        assert healthy["failures"] == [] and healthy["metrics"]["top1"] == ranks[0]["parts"]["KNNProbeknn_healthy"][
            "metrics"]["top1"]
    pictures = [result["parts"]["VisualDiagnostics"]["failures"] for result in ranks]
    assert len(pictures[0]) == 1 and "on rank 0 at step 2" in pictures[0][0] and "drawing broke" in pictures[0][0]
    assert pictures[1] == []  # pictures are drawn by rank 0 only
