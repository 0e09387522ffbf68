"""Every online probe can be switched to its paper protocol: a callback running ``evaluate``'s protocol
gives the offline numbers of the trained backbone."""
from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch


from support.common import TINY_VIT  # noqa: E402
from support.evaldata import imagenet_tree  # noqa: E402
from support.probe_testkit import trainer_kwargs  # noqa: E402

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, PaperProtocolProbe, VOCSegmentationProbe  # noqa: E402
from datamodules import ImageNetDataModule, MultiCropViews  # noqa: E402
from ssl_modules.methods.base import SSLModule  # noqa: E402
from ssl_modules.evaluation import evaluate  # noqa: E402


class TinySSL(SSLModule):
    def training_step(self, batch, batch_idx):
        return self.backbone(batch.crops[0]).global_.pow(2).mean()


@pytest.mark.parametrize("probe, protocol", [(KNNProbe, "knn"), (OnlineLinearProbe, "linear"),
                                             (VOCSegmentationProbe, "voc-linear"),
                                             (DenseRetrievalProbe, "hummingbird")])
def test_each_probe_names_its_paper_protocol(probe, protocol):
    paper = probe.paper_protocol(root="/data")
    assert isinstance(paper, PaperProtocolProbe) and paper.protocol == protocol


def test_paper_protocol_probe_gives_the_offline_numbers_of_the_trained_backbone(tmp_path):
    root = imagenet_tree(tmp_path, classes=2, train_per_class=6, val_per_class=3)
    views = MultiCropViews.preset("bam", global_size=32, local_size=16, n_local=0)
    data = ImageNetDataModule(str(root), batch_size=4, num_workers=0, views=views, eval_size=32)
    probe = KNNProbe.paper_protocol(overrides={"image_size": 32}, batch_size=4)
    torch.manual_seed(0)
    module = TinySSL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), warmup_epochs=0.0)
    trainer = pl.Trainer(callbacks=[probe], **trainer_kwargs(max_epochs=1))
    trainer.fit(module, datamodule=data)
    offline = evaluate(module, ["knn"], imagenet=str(root), overrides={"knn": {"image_size": 32}},
                       show_progress=False).results[0]
    assert probe.last_metrics == pytest.approx(offline.metrics)
    assert probe.last_floors["top1@k20"] == pytest.approx(0.5)
    assert float(trainer.callback_metrics["probe/knn_top1@k20"]) == pytest.approx(offline.metrics["top1@k20"])
    assert all(p.requires_grad for p in module.backbone.parameters())  # the backbone trains on afterwards


class NoRoot(pl.LightningDataModule):
    def train_dataloader(self):
        return []


def test_paper_protocol_probe_without_a_data_root_is_a_clear_error():
    trainer = pl.Trainer(**trainer_kwargs())
    trainer.datamodule = NoRoot()
    with pytest.raises(ValueError, match="needs the data root"):
        PaperProtocolProbe("knn").setup(trainer, None, "fit")
