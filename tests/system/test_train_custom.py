"""``examples/train_custom.py``: a subclassed method trained by a user script, in DDP on 2 CPU processes (gloo).

The script runs in a subprocess: a ``strategy="ddp"`` rank re-runs ``sys.argv``, which must be the script,
not pytest.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from support.example_testkit import REPO, run_python, synthetic_root  # noqa: F401

SCRIPT = REPO / "examples" / "train_custom.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_custom", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_subclass_keeps_its_argument_and_is_vicregl_without_warmup():
    script = load_script()
    tiny = dict(backbone="convnext_atto", expander_widths="32-32-32", projector_widths="16-16-16")
    with torch.device("meta"):  # construction only: no weights needed
        module = script.MyVICRegL(local_warmup_steps=7, **tiny)
    assert module.hparams.local_warmup_steps == 7 and module.hparams.alpha == 0.75  # saved, so checkpoints reload
    assert module.local_ramp() == 1.0  # outside a Trainer: the full local weight
    with pytest.raises(ValueError, match="local_warmup_steps"):
        script.MyVICRegL(local_warmup_steps=-1, **tiny)


def printed_metrics(stdout: str) -> dict[str, float]:
    pattern = r"^\s+(\S+): (-?[\d.]+(?:e-?\d+)?|nan|inf)$"
    return {name: float(value) for name, value in re.findall(pattern, stdout, re.M)}


@pytest.mark.slow
def test_train_custom_runs_ddp_on_two_cpu_processes_with_every_probe_and_the_progress_bar(synthetic_root, tmp_path):  # noqa: F811
    steps, warmup = 3, 10
    result = run_python([str(SCRIPT), "--devices", "2", "--accelerator", "cpu", "--max-steps", str(steps),
                         "--local-warmup-steps", str(warmup), "--backbone", "convnext_atto", "--num-train", "64",
                         "--num-val", "16", "--data-root", str(synthetic_root), "--output", str(tmp_path / "run")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"finished {steps} steps on 2 process(es)" in result.stdout
    metrics = printed_metrics(result.stdout)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    # every probe evaluated after the last step, progress bar on; the accuracies over all 16 validation images
    # (gathered from both processes), whose multiples of 1/16 print exactly with 4 decimals
    assert {"probe/voc_miou", "probe/retrieval_miou"} <= set(metrics)
    for name in ("knn", "linear"):
        top1, top5 = metrics[f"probe/{name}_top1"], metrics[f"probe/{name}_top5"]
        assert top1 <= top5 and all((value * 16).is_integer() for value in (top1, top5)), (name, top1, top5)
    # The subclass's loss is what trained: the last step (global step 2) used 2/10 of the local weight.
    ramp = (steps - 1) / warmup
    assert metrics["train/local_ramp"] == pytest.approx(ramp)
    expected = 0.75 * metrics["train/global_loss"] + ramp * 0.25 * metrics["train/local_loss"]
    assert metrics["train/loss"] == pytest.approx(expected, abs=2e-3)
    exported = re.search(r"^backbone: (\S+)$", result.stdout, re.M)
    assert exported and Path(exported.group(1)).is_file()
