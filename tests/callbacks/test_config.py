"""The probes are built from a YAML config with no reference to the module (LightningCLI / jsonargparse)."""
from __future__ import annotations

import sys

import pytest
import yaml
from lightning.pytorch import Callback, LightningDataModule
from support.probe_testkit import ColourData

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, VisualDiagnostics, VOCSegmentationProbe
from support.common import TINY_VIT
from ssl_modules.methods.base import SSLModule
from ssl_modules.cli.lightning import SSLCLI

CALLBACKS = [
    {"class_path": "callbacks.OnlineLinearProbe",
     "init_args": {"train_on": "loader", "lr": 0.05, "optimizer": "adamw"}},
    {"class_path": "callbacks.KNNProbe",
     "init_args": {"k": 10, "train_fraction": 0.5,
                   "data": {"class_path": "support.probe_testkit.ColourData", "init_args": {"num_train": 32}}}},
    {"class_path": "callbacks.VOCSegmentationProbe", "init_args": {"steps": 7, "every_n_epochs": 2}},
    {"class_path": "callbacks.DenseRetrievalProbe", "init_args": {"k": 5, "patches_per_image": 3}},
    {"class_path": "callbacks.VisualDiagnostics", "init_args": {"every_n_steps": 10}},
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:No seed found")  # jsonargparse 4.49+ vs Lightning
def test_lightning_cli_builds_every_probe_from_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    config = {
        "model": {"class_path": "ssl_modules.methods.base.SSLModule",
                  "init_args": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": dict(TINY_VIT)}},
        "data": {"class_path": "support.probe_testkit.ColourData"},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "callbacks": CALLBACKS},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = SSLCLI(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=["--config", str(path)], run=False, auto_configure_optimizers=False)
    by_type = {type(cb): cb for cb in cli.trainer.callbacks if isinstance(cb, Callback)}
    linear, knn = by_type[OnlineLinearProbe], by_type[KNNProbe]
    assert (linear.train_on, linear.lr, linear.optimizer_name) == ("loader", 0.05, "adamw")
    assert knn.k == 10 and knn.train_fraction == 0.5
    assert isinstance(knn.data, ColourData) and knn.data.num_train == 32
    assert by_type[VOCSegmentationProbe].steps == 7 and by_type[VOCSegmentationProbe].every_n_epochs == 2
    assert by_type[DenseRetrievalProbe].patches_per_image == 3 and by_type[DenseRetrievalProbe].data is None
    assert by_type[VisualDiagnostics].every_n_steps == 10
