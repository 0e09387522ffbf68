"""The README's quickstart: its baselines run through ``python -m ssl_modules validate`` with the same probes, and
the pretrained backbone beats both baselines on every probe (the README table's claim)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from support.example_testkit import CONFIGS, quick_probes_config, synthetic_root  # noqa: F401  (fixture)
from ssl_modules.cli import main
from ssl_modules.cli._summary import probe_report

QUICKSTART = CONFIGS / "quickstart.yaml"
SMALL_DATA = ["--data.init_args.scene.num_train", "96", "--data.init_args.scene.num_val", "32",
              "--data.init_args.num_workers", "0"]
RAW_PIXELS = ["--model", "ssl_modules.methods.baselines.RawPixels", "--model.patch_size", "8"]
README_PROBES = ("probe/linear_top1", "probe/knn_top1", "probe/voc_miou", "probe/retrieval_miou")

# The claim on a short budget: the quickstart's data and seed, 4 of its 32 epochs (248 steps, ~2 minutes with
# both baselines on 2 cores). Measured leads over the better baseline at seed 0: linear +0.018, k-NN +0.078,
# segmentation +0.004, retrieval +0.036 (the full 32 epochs: +0.050 / +0.080 / +0.019 / +0.038). The run is
# deterministic, so the margin below guards a regression, not noise; a shorter run (240 steps on 1,000 scenes)
# loses k-NN to raw pixels, and seed 1 at 4 epochs loses linear (0.172 vs 0.180): the README says so.
CLAIM_DATA = ["--data.init_args.num_workers", "2"]  # the same batches as with 0 workers, ~12% faster on 2 cores
CLAIM_FIT = ["--trainer.max_epochs", "4"]
CLAIM_MARGIN = 0.002  # the smallest lead over the better baseline that counts


def printed_probes(out: str) -> dict[str, float]:
    """``probe/<name>_<metric> -> value`` from the probe lines the CLI prints after ``fit`` and ``validate``."""
    return {name: float(value) for name, value in re.findall(r"(probe/\w+)\s+([0-9.]+)", out)}


def run_cli(arguments: list[str], capsys, monkeypatch) -> dict[str, float]:
    """``python -m ssl_modules <arguments>`` in this process (progress bar off); the probe values it printed."""
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    capsys.readouterr()
    code = main([*arguments, "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return printed_probes(out)


def _validate(extra: list[str], root: Path, tmp_path: Path, capsys, monkeypatch) -> dict[str, float]:
    return run_cli(["validate", "--config", str(quick_probes_config(tmp_path)), "--data.init_args.root", str(root),
                    *SMALL_DATA, "--trainer.default_root_dir", str(tmp_path), *extra], capsys, monkeypatch)


@pytest.mark.parametrize("extra", [[], RAW_PIXELS], ids=["random_init", "raw_pixels"])
def test_the_baselines_of_the_readme_table_run_every_probe(extra, synthetic_root, tmp_path, capsys,  # noqa: F811
                                                            monkeypatch):
    metrics = _validate(extra, synthetic_root, tmp_path, capsys, monkeypatch)
    assert {*README_PROBES, "probe/linear_top5", "probe/knn_top5"} <= set(metrics)
    for name in ("linear", "knn"):  # accuracies over the 32 validation images, printed with 4 decimals
        top1, top5 = metrics[f"probe/{name}_top1"], metrics[f"probe/{name}_top5"]
        assert top1 <= top5
        assert all(abs(value * 32 - round(value * 32)) < 32 * 5e-5 for value in (top1, top5)), (top1, top5)


def claim_run(command: str, extra: list[str], root: Path, folder: Path, capsys, monkeypatch) -> dict[str, float]:
    """One column of the README table on the claim's budget: the probes of ``fit`` or ``validate``."""
    return run_cli([command, "--config", str(QUICKSTART), "--data.init_args.root", str(root), *CLAIM_DATA,
                    "--trainer.default_root_dir", str(folder), *extra], capsys, monkeypatch)


@pytest.mark.slow
def test_the_pretrained_backbone_beats_both_baselines_on_every_probe(synthetic_root, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    pretrained = claim_run("fit", CLAIM_FIT, synthetic_root, tmp_path / "fit", capsys, monkeypatch)
    baselines = {"random init": claim_run("validate", [], synthetic_root, tmp_path / "random", capsys, monkeypatch),
                 "raw pixels": claim_run("validate", RAW_PIXELS, synthetic_root, tmp_path / "pixels", capsys,
                                         monkeypatch)}
    table = "\n".join(f"{probe:<22} {pretrained.get(probe)} vs " +
                      ", ".join(f"{name} {values.get(probe)}" for name, values in baselines.items())
                      for probe in README_PROBES)
    print(table)  # shown by pytest -rP
    for probe in README_PROBES:
        better = max(values[probe] for values in baselines.values())
        assert pretrained[probe] >= better + CLAIM_MARGIN, f"{probe} does not beat both baselines:\n{table}"


def test_probe_report_lists_every_probe_metric():
    class FakeProbe:
        last_metrics = {"top1": 0.5, "top5": 0.75}

        def metric_name(self, metric):
            return f"probe/knn_{metric}"

    lines = probe_report([FakeProbe(), object()])
    assert [line.split() for line in lines] == [["probe/knn_top1", "0.5000"], ["probe/knn_top5", "0.7500"]]
