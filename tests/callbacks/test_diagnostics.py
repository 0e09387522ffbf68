"""Pictures reach TensorBoard: the method's diagnostics every N steps, and the VOC probe's predicted masks."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from support.probe_testkit import ColourData, ColourFeatures, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import VisualDiagnostics, VOCSegmentationProbe


def logged_images(logger: TensorBoardLogger) -> dict[str, list[int]]:
    """TensorBoard image tag -> the steps it was written at."""
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: [event.step for event in events.Images(tag)] for tag in events.Tags()["images"]}


def test_visual_diagnostics_logs_the_module_pictures_every_n_steps(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    voc = VOCSegmentationProbe(steps=5, batch_size=8, max_val_images=8, num_logged_images=2, num_workers=0)
    trainer = pl.Trainer(callbacks=[VisualDiagnostics(every_n_steps=3), voc],
                         **trainer_kwargs(logger=logger, max_epochs=2, log_every_n_steps=1))
    trainer.fit(ColourFeatures(), datamodule=ColourData())  # 4 steps per epoch
    images = logged_images(logger)
    assert images["diagnostics/colours"] == [0, 3, 6]
    assert images["probe/voc_examples"] == [4, 8]  # one picture per evaluation


def test_visual_diagnostics_warns_without_tensorboard_and_logs_nothing():
    trainer = pl.Trainer(callbacks=[VisualDiagnostics(every_n_steps=1)], **trainer_kwargs())
    with pytest.warns(UserWarning, match="TensorBoardLogger"):
        trainer.fit(ColourFeatures(), datamodule=ColourData())


def test_a_bad_picture_is_reported_once_and_training_goes_on(tmp_path, caplog):
    class BadPictures(ColourFeatures):
        calls = 0

        def visual_diagnostics(self, batch):
            BadPictures.calls += 1
            return {"flat": batch.crops[0][0, 0]}

    diagnostics = VisualDiagnostics(every_n_steps=1)
    trainer = pl.Trainer(callbacks=[diagnostics],
                         **trainer_kwargs(logger=TensorBoardLogger(tmp_path), log_every_n_steps=1, max_epochs=1))
    with caplog.at_level(logging.ERROR, logger="callbacks.diagnostics"):
        trainer.fit(BadPictures(), datamodule=ColourData())
    assert trainer.global_step == 4 and BadPictures.calls == 1  # trained to the end, tried once
    assert len(diagnostics.failures) == 1 and "(3, H, W)" in diagnostics.failures[0]
    assert "'flat'" in diagnostics.failures[0] and "step 0" in diagnostics.failures[0]
    assert [r.getMessage() for r in caplog.records if r.name == "callbacks.diagnostics"] == diagnostics.failures


def test_an_exception_while_drawing_costs_nothing_but_the_pictures(tmp_path):
    class Broken(ColourFeatures):
        def visual_diagnostics(self, batch):
            raise RuntimeError("no pictures today")

    diagnostics = VisualDiagnostics(every_n_steps=1)
    trainer = pl.Trainer(callbacks=[diagnostics], **trainer_kwargs(logger=TensorBoardLogger(tmp_path)))
    trainer.fit(Broken(), datamodule=ColourData())
    assert diagnostics.failures and "RuntimeError: no pictures today" in diagnostics.failures[0]
    assert diagnostics.failures == diagnostics.failures[:1]


def test_a_working_run_has_no_failures(tmp_path):
    diagnostics = VisualDiagnostics(every_n_steps=2)
    trainer = pl.Trainer(callbacks=[diagnostics], **trainer_kwargs(logger=TensorBoardLogger(tmp_path)))
    trainer.fit(ColourFeatures(), datamodule=ColourData())
    assert diagnostics.failures == []
