"""Each probe through a real Trainer: it runs, logs its metric, beats chance on colour features that carry the
class, and stays at chance on a constant extractor."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from support.probe_testkit import ColourData, ColourFeatures, PlainData, trainer_kwargs

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, VOCSegmentationProbe
from callbacks.data import ProbeDataError
from support.common import TINY_VIT
from ssl_modules.methods.base import SSLModule

FAST = dict(num_workers=0)


def probes() -> dict[str, pl.Callback]:
    return {
        "linear": OnlineLinearProbe(batch_size=16, lr=0.5, **FAST),
        "knn": KNNProbe(k=5, batch_size=16, train_fraction=1.0, **FAST),
        "voc": VOCSegmentationProbe(steps=60, batch_size=8, lr=0.05, **FAST),
        "retrieval": DenseRetrievalProbe(k=10, batch_size=8, **FAST),
    }


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], data: pl.LightningDataModule | None = None,
        **overrides) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(module, datamodule=data or ColourData())
    return trainer


@pytest.fixture(scope="module")
def signal_run():
    torch.manual_seed(0)
    callbacks = probes()
    trainer = fit(ColourFeatures(), list(callbacks.values()), max_epochs=2)
    return trainer, callbacks


@pytest.fixture(scope="module")
def constant_run():
    torch.manual_seed(0)
    callbacks = probes()
    trainer = fit(ColourFeatures(constant=True), list(callbacks.values()), max_epochs=1)
    return trainer, callbacks


@pytest.mark.parametrize("probe, metric", [("linear", "top1"), ("knn", "top1"), ("voc", "miou"), ("retrieval", "miou")])
def test_every_probe_logs_the_value_it_computed(signal_run, probe, metric):
    trainer, callbacks = signal_run
    assert float(trainer.callback_metrics[f"probe/{probe}_{metric}"]) == pytest.approx(
        callbacks[probe].last_metrics[metric], abs=1e-7)


def test_linear_probe_beats_chance_on_colour_features_and_not_on_constant_ones(signal_run, constant_run):
    assert signal_run[1]["linear"].last_metrics["top1"] > 0.9  # chance: 0.25
    assert constant_run[1]["linear"].last_metrics["top1"] <= 0.3
    assert signal_run[1]["linear"].steps == 8  # 4 batches x 2 epochs, one update each


def test_knn_probe_beats_chance_on_colour_features_and_not_on_constant_ones(signal_run, constant_run):
    assert signal_run[1]["knn"].last_metrics["top1"] > 0.9
    assert constant_run[1]["knn"].last_metrics["top1"] <= 0.3
    assert signal_run[1]["knn"].last_metrics["top5"] == 1.0  # 4 classes: top-5 is top-4


def test_voc_probe_beats_chance_on_colour_features_and_not_on_constant_ones(signal_run, constant_run):
    assert signal_run[1]["voc"].last_metrics["miou"] > 0.6
    assert constant_run[1]["voc"].last_metrics["miou"] < 0.3  # everything background: IoU_0 / 4


def test_retrieval_probe_beats_chance_on_colour_features_and_not_on_constant_ones(signal_run, constant_run):
    assert signal_run[1]["retrieval"].last_metrics["miou"] > 0.6
    assert constant_run[1]["retrieval"].last_metrics["miou"] < 0.3


def test_probes_run_every_n_epochs_and_after_the_last_epoch():
    calls = []

    class CountingKNN(KNNProbe):
        def evaluate(self, trainer, pl_module):
            calls.append(trainer.current_epoch)
            return {"top1": 0.0}

    fit(ColourFeatures(), [CountingKNN(every_n_epochs=2, **FAST)], max_epochs=3)
    assert calls == [1, 2]  # after epochs 2 and 3 (the last)


def test_probes_evaluate_on_trainer_validate():
    module, data = ColourFeatures(), ColourData()
    callbacks = probes()
    trainer = pl.Trainer(callbacks=list(callbacks.values()), **trainer_kwargs(limit_val_batches=1))
    trainer.validate(module, datamodule=data)
    assert callbacks["knn"].last_metrics["top1"] > 0.9
    assert callbacks["voc"].last_metrics["miou"] > 0.6
    assert callbacks["retrieval"].last_metrics["miou"] > 0.6
    # a never-trained linear head is first trained on its own loader (validate_steps)
    assert callbacks["linear"].steps == 300 and callbacks["linear"].last_metrics["top1"] > 0.9
    assert "probe/knn_top1" in trainer.callback_metrics


def test_linear_probe_trains_from_its_own_loader_when_batches_are_unlabelled():
    probe = OnlineLinearProbe(batch_size=16, lr=0.5, **FAST)
    fit(ColourFeatures(), [probe], ColourData(labelled=False), max_epochs=2)
    assert probe.source == "loader"
    assert probe.steps == 8 and probe.last_metrics["top1"] > 0.9


def test_probe_data_comes_from_its_data_argument_when_the_trainer_has_none():
    knn = KNNProbe(k=5, batch_size=16, train_fraction=1.0, data=ColourData(), **FAST)
    voc = VOCSegmentationProbe(steps=30, batch_size=8, lr=0.05, data=ColourData(), **FAST)
    fit(ColourFeatures(), [knn, voc], PlainData())
    assert knn.last_metrics["top1"] > 0.9 and voc.last_metrics["miou"] > 0.5


@pytest.mark.parametrize("probe,fix", [
    (KNNProbe(**FAST), "datamodules.ImageNetDataModule"),
    (VOCSegmentationProbe(**FAST), "datamodules.VOCSegmentationDataModule"),
])
def test_missing_probe_data_is_a_clear_error_naming_the_fix(probe, fix):
    with pytest.raises(ProbeDataError, match=f"PlainData.*class_path: {fix}"):
        fit(ColourFeatures(), [probe], PlainData())


def test_segmentation_data_without_classification_is_rejected_by_the_classification_probes():
    with pytest.raises(ProbeDataError, match="OnlineLinearProbe needs classification data"):
        fit(ColourFeatures(), [OnlineLinearProbe(**FAST)], ColourData(classification=False))


def test_a_module_without_embed_is_a_clear_error():
    class NoEmbed(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer.weight.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="embed"):
        fit(NoEmbed(), [KNNProbe(**FAST)])


@pytest.mark.parametrize("bad", [dict(k=0), dict(temperature=0.0), dict(train_fraction=0.0), dict(backend="gpu"),
                                 dict(every_n_epochs=-1)])
def test_bad_knn_arguments_are_rejected(bad):
    with pytest.raises(ValueError):
        KNNProbe(**bad)


def test_two_probes_of_one_class_need_and_get_distinct_state_keys():
    assert KNNProbe(name="knn").state_key != KNNProbe(name="knn_small").state_key
    assert OnlineLinearProbe().state_key == "OnlineLinearProbe[linear]"


class TinySSL(SSLModule):
    """A real SSLModule (tiny ViT, no teacher) with a stand-in loss."""

    def training_step(self, batch, batch_idx):
        return self.backbone(batch.crops[0]).global_.pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None


def test_probes_read_a_real_ssl_module_through_embed_and_leave_it_training():
    module = TinySSL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), warmup_epochs=0.0)
    modes = []

    class RecordMode(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            modes.append(pl_module.backbone.training)

    callbacks = [*probes().values(), RecordMode()]
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=1))
    trainer.fit(module, datamodule=ColourData())
    assert modes == [True]  # the probes (which run first) gave the backbone back in training mode
    logged = {name: float(trainer.callback_metrics[f"probe/{name}"])
              for name in ("linear_top1", "knn_top1", "voc_miou", "retrieval_miou")}
    computed = {f"{name}_{metric}": probe.last_metrics[metric]
                for name, probe, metric in zip(("linear", "knn", "voc", "retrieval"), callbacks, ("top1", "top1",
                                                                                            "miou", "miou"))}
    assert logged == pytest.approx(computed, abs=1e-7)


def test_probes_leave_the_global_random_generator_alone():
    """The method's training must not depend on whether probes are attached."""

    def rng_states(callbacks):
        states = []

        class Record(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                states.append(torch.get_rng_state())

        torch.manual_seed(0)
        fit(ColourFeatures(), [*callbacks, Record()], max_epochs=2)
        return states

    with_probes = rng_states(list(probes().values()))
    without = rng_states([])
    assert all(torch.equal(a, b) for a, b in zip(with_probes, without, strict=True))
