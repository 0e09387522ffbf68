"""The README's quickstart: its baselines run through ``python -m ssl_modules validate``, with the same probes."""
from __future__ import annotations

import re
import sys

import pytest

from support.example_testkit import CONFIGS, quick_probes_config, synthetic_root  # noqa: F401  (fixture)
from ssl_modules.cli.app import main, probe_report

QUICKSTART = CONFIGS / "quickstart.yaml"
SMALL_DATA = ["--data.init_args.scene.num_train", "96", "--data.init_args.scene.num_val", "32",
              "--data.init_args.num_workers", "0"]


def _validate(extra, root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    main(["validate", "--config", str(quick_probes_config(tmp_path)), "--data.init_args.root", str(root), *SMALL_DATA,
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", *extra])
    out = capsys.readouterr().out
    return dict((name, float(value)) for name, value in re.findall(r"(probe/\w+)\s+([0-9.]+)", out))


RAW_PIXELS = ["--model", "ssl_modules.methods.baselines.RawPixels", "--model.patch_size", "8"]


@pytest.mark.parametrize("extra", [[], RAW_PIXELS],
                         ids=["random_init", "raw_pixels"])
def test_the_baselines_of_the_readme_table_run_every_probe(extra, synthetic_root, tmp_path, capsys,  # noqa: F811
                                                            monkeypatch):
    metrics = _validate(extra, synthetic_root, tmp_path, capsys, monkeypatch)
    assert {"probe/linear_top1", "probe/knn_top1", "probe/voc_miou", "probe/retrieval_miou"} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_probe_report_lists_every_probe_metric():
    class FakeProbe:
        last_metrics = {"top1": 0.5, "top5": 0.75}

        def metric_name(self, metric):
            return f"probe/knn_{metric}"

    lines = probe_report([FakeProbe(), object()])
    assert [line.split() for line in lines] == [["probe/knn_top1", "0.5000"], ["probe/knn_top5", "0.7500"]]
