"""A checkpoint saved mid-run holds the probes' state, and resuming from it ends in the same probe state as the
uninterrupted run."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support.probe_testkit import ColourData, ColourFeatures, trainer_kwargs

from callbacks import OnlineLinearProbe, VOCSegmentationProbe


def probes() -> list[pl.Callback]:
    return [OnlineLinearProbe(batch_size=16, lr=0.5, every_n_epochs=2, num_workers=0),
            VOCSegmentationProbe(steps=10, batch_size=8, lr=0.05, max_train_images=16, max_val_images=8,
                                 num_logged_images=0, num_workers=0)]


def states(callbacks: list[pl.Callback]) -> dict:
    return {cb.state_key: cb.state_dict() for cb in callbacks}


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu())
    else:
        assert a == b


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
@pytest.mark.parametrize("labelled", [True, False], ids=["train_on_batches", "train_on_own_loader"])
def test_resumed_run_ends_in_the_same_probe_state(tmp_path, labelled):
    full = probes()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[*full, saver], **trainer_kwargs(max_epochs=3, enable_checkpointing=True))
    trainer.fit(ColourFeatures(), datamodule=ColourData(labelled=labelled))

    resumed = probes()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[*resumed, saver], **trainer_kwargs(max_epochs=3, enable_checkpointing=True))
    trainer.fit(ColourFeatures(), datamodule=ColourData(labelled=labelled), ckpt_path=tmp_path / "epoch=0.ckpt")

    linear = resumed[0]
    assert linear.steps == 12 and linear.source == ("batches" if labelled else "loader")
    if not labelled:
        assert linear.state_dict()["stream_position"] == (2, 4)  # 12 draws of the 4 global batches of a pass
    assert_same(states(resumed), states(full))


def test_checkpoint_holds_the_probe_state_and_loading_it_round_trips(tmp_path):
    callbacks = probes()
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=2))
    trainer.fit(ColourFeatures(), datamodule=ColourData(labelled=False))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["callbacks"]
    assert set(saved) >= {"OnlineLinearProbe[linear]", "VOCSegmentationProbe[voc]"}

    fresh = probes()
    for callback in fresh:
        callback.load_state_dict(saved[callback.state_key])
    assert_same(states(fresh), states(callbacks))  # a head waiting to be built is saved as loaded
