"""Probe data is checked when fit starts; a probe failing later never stops training nor costs the
checkpoint; floors, progress bars and inherited loader workers."""
from __future__ import annotations


import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image


from support.evaldata import VOC_PALETTE, voc_tree  # noqa: E402
from support.probe_testkit import ColourData, ColourFeatures, trainer_kwargs  # noqa: E402

from callbacks import KNNProbe, OnlineLinearProbe, VOCSegmentationProbe  # noqa: E402
from callbacks.data import ProbeDataError  # noqa: E402
from datamodules import VOCSegmentationDataModule  # noqa: E402

FAST = dict(num_workers=0)


class CountTrainingSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def test_a_wrong_size_voc_mask_stops_fit_before_the_first_training_step(tmp_path):
    root = voc_tree(tmp_path)
    mask_path = root / "VOCdevkit/VOC2012/SegmentationClass/val_002.png"
    bad = Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="P")
    bad.putpalette(VOC_PALETTE)
    bad.save(mask_path)
    probe = VOCSegmentationProbe(steps=2, batch_size=2, data=VOCSegmentationDataModule(str(root), num_workers=0,
                                                                                        eval_size=32), **FAST)
    counter = CountTrainingSteps()
    with pytest.raises(ProbeDataError, match="val_002.png"):
        pl.Trainer(callbacks=[probe, counter], **trainer_kwargs()).fit(ColourFeatures(), datamodule=ColourData())
    assert counter.steps == 0


class FailingKNN(KNNProbe):
    def evaluate(self, trainer, pl_module):
        raise RuntimeError("disk vanished")


def test_a_probe_failure_is_recorded_and_costs_neither_training_nor_the_checkpoint(tmp_path):
    probe = FailingKNN(k=3, batch_size=16, **FAST)
    counter = CountTrainingSteps()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(callbacks=[probe, counter, checkpoint],
                         **trainer_kwargs(max_epochs=2, enable_checkpointing=True))
    trainer.fit(ColourFeatures(), datamodule=ColourData())
    assert trainer.current_epoch == 2 and counter.steps == 2 * 4
    assert len(probe.failures) == 1  # reported once: the probe disabled itself after the first failure
    assert "FailingKNN[knn]" in probe.failures[0] and "disk vanished" in probe.failures[0]
    assert (tmp_path / "last.ckpt").is_file()


def test_probes_report_the_trivial_floor_of_their_metrics():
    knn = KNNProbe(k=3, batch_size=16, train_fraction=1.0, **FAST)
    voc = VOCSegmentationProbe(steps=5, batch_size=8, **FAST)
    pl.Trainer(callbacks=[knn, voc], **trainer_kwargs()).fit(ColourFeatures(), datamodule=ColourData())
    assert knn.last_floors == {"top1": pytest.approx(1 / 4), "top5": 1.0}
    assert knn.failures == [] and voc.failures == []
    assert set(voc.last_floors) == {"miou"} and 0.0 < voc.last_floors["miou"] < 1.0


def test_probe_progress_follows_enable_progress_bar(capsys):
    for enabled in (True, False):
        probe = KNNProbe(k=3, batch_size=16, **FAST)
        trainer = pl.Trainer(callbacks=[probe], **trainer_kwargs(enable_progress_bar=enabled))
        trainer.fit(ColourFeatures(), datamodule=ColourData())
        output = capsys.readouterr()
        assert ("knn: bank features" in output.out + output.err) is enabled


def test_probes_inherit_the_datamodules_loader_workers(tmp_path):
    data = VOCSegmentationDataModule(str(voc_tree(tmp_path)), num_workers=0, eval_size=32)
    probe = VOCSegmentationProbe(steps=1, batch_size=2, data=data)
    linear = OnlineLinearProbe(batch_size=4)
    assert probe.num_workers is None and linear.num_workers is None
    training_data = ColourData()
    training_data.num_workers = 0
    pl.Trainer(callbacks=[probe, linear], **trainer_kwargs(max_steps=1)).fit(ColourFeatures(), datamodule=training_data)
    assert probe.num_workers == 0 and linear.num_workers == 0


def test_an_unreadable_evaluation_image_fails_the_probe_naming_it(tmp_path):
    """Never another image in its place (it would be counted twice): the probe fails, training goes on."""
    from datamodules import ImageNetDataModule, MultiCropViews
    from support.evaldata import imagenet_tree

    root = imagenet_tree(tmp_path)
    bad = sorted((root / "val").rglob("*.JPEG"))[4]
    bad.write_bytes(bad.read_bytes()[:40])
    views = MultiCropViews.preset("bam", global_size=16, local_size=16, n_local=0)
    data = ImageNetDataModule(str(root), batch_size=4, num_workers=0, views=views, eval_size=16)
    probe = KNNProbe(k=3, batch_size=4, train_fraction=1.0, data=data, **FAST)
    trainer = pl.Trainer(callbacks=[probe], **trainer_kwargs(max_epochs=1))
    trainer.fit(ColourFeatures(), datamodule=ColourData())
    assert trainer.current_epoch == 1 and len(probe.failures) == 1
    assert bad.name in probe.failures[0] and "UnreadableImageError" not in probe.last_metrics
