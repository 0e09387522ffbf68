"""Real ``Trainer(strategy="ddp")`` runs on 2 CPU processes (gloo) for BAM with ContrastiveCrop and for CrIBo:
the paths a user's multi-GPU run takes (process group, DDP wrapper, gathers, BAM's box update across ranks,
CrIBo's memory bank) work end to end. The maths of 2 processes against 1 is tested per method elsewhere."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
SCRIPT = Path(__file__).parents[2] / "support" / "ddp_smoke.py"


def run_ddp(method: str, tmp_path: Path) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), method, str(tmp_path / "data"), str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bam", "cribo"])
def test_ddp_on_two_cpu_processes_trains_and_keeps_the_ranks_in_step(method, tmp_path):
    ranks = run_ddp(method, tmp_path)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == 3
        assert len(rank["losses"]) == 3 and all(math.isfinite(v) for v in rank["losses"])
    # DDP averages the gradients, so both ranks hold the same weights after every step.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
