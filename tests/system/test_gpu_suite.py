"""The GPU benchmark suite's CPU smoke mode: every case runs, the table and the JSON come out."""
import importlib
import json
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def _suite():
    if str(SUITE.parent) not in sys.path:
        sys.path.insert(0, str(SUITE.parent))
    return importlib.import_module("gpu_suite")


@pytest.mark.slow
def test_smoke_mode_times_every_method_and_writes_json(tmp_path, capsys):
    report = _suite().main(["--smoke", "--world", "2", "--json", str(tmp_path / "suite.json")])
    written = json.loads((tmp_path / "suite.json").read_text())
    assert [c["case"] for c in written["cases"]] == ["cribo_vit_s16", "bam_vit_s16", "vicregl_r50",
                                                     "vicregl_convnext_s"]
    for case in report["cases"]:
        assert case["finite_loss"] and case["step_ms"] > 0 and case["ratio"] > 0, case
    assert set(written["pipeline_views_per_s_per_core"]) == {"cribo", "bam", "vicregl_resnet", "vicregl_convnext"}
    assert "ratio" in capsys.readouterr().out
    rows = {row["row"]: row for row in written["distributed"]}
    assert set(rows) == {"cribo ddp replicated bank", "cribo ddp sharded bank", "cribo fsdp2 sharded bank",
                         "bam ddp", "bam fsdp2", "vicregl ddp", "vicregl fsdp2"}
    assert all(row["finite_loss"] and row["world"] == 2 for row in rows.values())
    replicated, sharded = rows["cribo ddp replicated bank"], rows["cribo ddp sharded bank"]
    assert sharded["bank_rows_per_process"] * 2 == replicated["bank_rows_per_process"]
    for method in ("bam", "vicregl"):  # FSDP2 holds about half of the parameters on each of 2 processes
        assert rows[f"{method} fsdp2"]["parameters_per_process"] < 0.6 * rows[f"{method} ddp"]["parameters_per_process"]


def test_unknown_case_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        _suite().main(["--smoke", "--cases", "nope", "--json", str(tmp_path / "x.json")])
