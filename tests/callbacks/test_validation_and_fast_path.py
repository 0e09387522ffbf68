"""Fit loads no validation batch nobody reads; trainer.validate still runs the probes; the online linear
probe trains on the embedding the training step returns, with no backbone forward of its own."""
from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch


from support.common import TINY_VIT  # noqa: E402
from support.evaldata import imagenet_tree  # noqa: E402
from support.probe_testkit import trainer_kwargs  # noqa: E402

from callbacks import KNNProbe, OnlineLinearProbe  # noqa: E402
from datamodules import ImageNetDataModule, MultiCropViews  # noqa: E402
from ssl_modules.methods.base import SSLModule  # noqa: E402


class EmbeddingSSL(SSLModule):
    """A tiny SSLModule whose step returns ``{"loss", "embedding"}`` (interface of the methods)."""

    def training_step(self, batch, batch_idx):
        features = self.backbone(batch.crops[0])
        return {"loss": features.global_.pow(2).mean(), "embedding": features.global_.detach()}


class CountValidationBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches += 1


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> str:
    return str(imagenet_tree(tmp_path_factory.mktemp("imagenet"), classes=2, train_per_class=8, val_per_class=4))


def _data(root: str) -> ImageNetDataModule:
    views = MultiCropViews.preset("bam", global_size=32, local_size=16, n_local=0)
    return ImageNetDataModule(root, batch_size=4, num_workers=0, views=views, eval_size=32)


def _module() -> EmbeddingSSL:
    torch.manual_seed(0)
    return EmbeddingSSL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), warmup_epochs=0.0)


def test_fit_runs_no_validation_batch_without_a_consumer(imagenet):
    counter = CountValidationBatches()
    trainer = pl.Trainer(callbacks=[counter], **trainer_kwargs(limit_val_batches=None, num_sanity_val_steps=2,
                                                               max_steps=2))
    trainer.fit(_module(), datamodule=_data(imagenet))
    assert counter.batches == 0


def test_validate_runs_the_probes_on_a_one_batch_loader(imagenet):
    counter = CountValidationBatches()
    probe = KNNProbe(k=3, batch_size=4, train_fraction=1.0, num_workers=0)
    trainer = pl.Trainer(callbacks=[counter, probe], **trainer_kwargs(limit_val_batches=None))
    trainer.validate(_module(), datamodule=_data(imagenet))
    assert counter.batches == 1
    assert set(probe.last_metrics) == {"top1", "top5"}


def _forwards_per_fit(imagenet: str, callbacks: list) -> int:
    module = _module()
    calls = []
    module.backbone.register_forward_hook(lambda *args: calls.append(1))
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_steps=3))
    trainer.fit(module, datamodule=_data(imagenet))
    return len(calls)


def test_linear_probe_adds_no_backbone_forward_when_the_step_returns_its_embedding(imagenet):
    probe = OnlineLinearProbe(train_on="batches", batch_size=4, validate_steps=0, every_n_epochs=0,
                              max_val_images=1, num_workers=0)
    without = _forwards_per_fit(imagenet, [])
    with_probe = _forwards_per_fit(imagenet, [probe])
    assert probe.steps == 3
    evaluation_forwards = 1  # the end-of-fit evaluation of one validation image
    assert with_probe - evaluation_forwards == without == 3
