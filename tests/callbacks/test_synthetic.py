"""The probes on the library's own data: ``SyntheticScenesDataModule`` as the trainer's datamodule, and
``VOCSegmentationDataModule`` over the synthetic VOC folder as a probe's ``data``."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
from support.probe_testkit import ColourFeatures, trainer_kwargs

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, VOCSegmentationProbe

datamodules = pytest.importorskip("datamodules")

LOADER = dict(batch_size=8, num_workers=0, eval_size=32)
SCENE = datamodules.SceneConfig(image_size=48, num_classes=4, num_train=40, num_val=16)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    views = datamodules.MultiCropViews.preset("bam", global_size=32, local_size=16, n_local=2)
    return datamodules.SyntheticScenesDataModule(
        root=str(tmp_path_factory.mktemp("scenes")), scene=SCENE, generation_workers=1, views=views, **LOADER)


def probes() -> list[pl.Callback]:
    return [OnlineLinearProbe(batch_size=8, num_workers=0), KNNProbe(k=5, batch_size=8, num_workers=0),
            *segmentation_probes()]


def segmentation_probes(data: pl.LightningDataModule | None = None) -> list[pl.Callback]:
    return [VOCSegmentationProbe(steps=5, batch_size=8, num_workers=0, data=data),
            DenseRetrievalProbe(k=5, batch_size=8, num_workers=0, data=data)]


def test_every_probe_runs_on_the_synthetic_scenes(scenes):
    callbacks = probes()
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=1))
    trainer.fit(ColourFeatures(), datamodule=scenes)
    linear, knn, voc, retrieval = callbacks
    assert linear.source == "batches" and linear.steps == 5  # 40 labelled images in batches of 8
    for probe, prefix in zip(callbacks, ("linear", "knn", "voc", "retrieval")):
        assert probe.last_metrics, prefix
        for metric, value in probe.last_metrics.items():  # what was logged is what the probe computed
            assert float(trainer.callback_metrics[f"probe/{prefix}_{metric}"]) == pytest.approx(value, abs=1e-7)
    assert linear.last_metrics["top5"] == 1.0  # 4 classes: the true one is always among the top 5
    assert voc.head.classifier.out_channels == 5  # background + 4 shapes


def test_segmentation_probes_read_a_voc_folder_given_as_their_data(scenes):
    scenes.prepare_data()
    voc_data = datamodules.VOCSegmentationDataModule(root=str(scenes.voc_root), num_seg_classes=5, **LOADER)
    callbacks = segmentation_probes(voc_data)
    coco = datamodules.SyntheticScenesDataModule(root=str(scenes.cache_root), layout="coco", scene=SCENE,
                                                 views=scenes.views, **LOADER)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=1))
    trainer.fit(ColourFeatures(), datamodule=coco)
    assert set(callbacks[0].last_metrics) == {"miou"} and set(callbacks[1].last_metrics) == {"miou"}
