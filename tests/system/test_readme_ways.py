"""The README's ways of use as a user runs them, under 2 DDP processes with the probes and the progress bar
on (the third way, ``examples/train_custom.py``, is ``tests/examples/test_train_custom.py``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.real_run_testkit import CONFIGS, REPO, optional_callbacks, run_subprocess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", ["readme", "user-metric"])
def test_the_readme_script_with_probes_under_ddp_and_the_progress_bar_finishes(tmp_path, variant):
    """The second way: CrIBo, ``OnlineLinearProbe`` and ``KNNProbe`` under ``Trainer(strategy="ddp")`` with the
    Trainer's defaults (progress bar, logger). It hung at the first epoch end: the bar reduced the probes'
    ``sync_dist`` metrics on rank 0 while rank 1 was in the non-finite guard's all-reduce. ``user-metric``: a
    subclass logging its own ``sync_dist`` epoch value, which the bar reads on rank 0 only the same way."""
    script = Path(__file__).parents[1] / "support" / "readme_script.py"
    environment = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "run"), variant],
                            env=environment, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 1: 100%" in result.stdout + result.stderr  # the progress bar was on
    outcome = torch.load(tmp_path / "run" / "result.pt", weights_only=False)
    assert outcome["global_step"] == 8 and outcome["failures"] == []
    assert all(set(metrics) == {"top1", "top5"} for metrics in outcome["metrics"])


def test_the_cli_with_every_probe_pictures_bf16_and_ddp_finishes_and_reports(tmp_path):
    """The first way: a YAML config, 2 DDP processes, every probe and the pictures, bf16-mixed autocast, the
    progress bar and TensorBoard on."""
    args = ["fit", "--config", str(CONFIGS / "cribo" / "synthetic_tiny.yaml"), "--trainer.devices=2",
            "--trainer.strategy=ddp", "--trainer.precision=bf16-mixed", "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}", "--data.init_args.scene.num_train=128",
            "--data.init_args.scene.num_val=32", "--data.init_args.num_workers=0", *optional_callbacks()]
    result = run_subprocess(args, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    for metric in ("probe/linear_top1", "probe/knn_top1", "probe/voc_miou", "probe/retrieval_miou"):
        assert metric in output, f"{metric} missing from the summary"
    assert "failed" not in result.stdout.lower()
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
