"""``docs/evaluation.md``'s quickstart ``evaluate`` command runs as written: its ``--voc_classes`` is the
quickstart's, its options parse, and the shell block runs on a tiny tree in the quickstart's cache layout."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from support.evaldata import imagenet_tree, tiny_vit, voc_tree

from ssl_modules.cli.evaluate import check_command_line, parse

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs" / "evaluation.md"


def quickstart_block() -> str:
    """The bash block of the docs that evaluates the quickstart's run."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S)
    matching = [block for block in blocks if "synthetic" in block and "evaluate" in block]
    assert len(matching) == 1, "docs/evaluation.md should have one quickstart evaluate block"
    return matching[0]


def command_arguments(block: str) -> list[str]:
    """The arguments after ``python -m ssl_modules evaluate`` of the block's command."""
    command = block.replace("\\\n", " ").splitlines()[-1]
    words = shlex.split(command)
    return words[words.index("evaluate") + 1:]


def test_the_docs_quickstart_command_names_the_quickstarts_mask_classes():
    config = yaml.safe_load((ROOT / "examples" / "configs" / "quickstart.yaml").read_text())
    classes = config["data"]["init_args"]["scene"]["num_classes"] + 1  # the shapes and the background
    arguments = command_arguments(quickstart_block())
    assert arguments[arguments.index("--voc_classes") + 1] == str(classes)


def test_the_docs_quickstart_command_parses():
    kwargs = parse([word.replace("$DATA", "/data") for word in command_arguments(quickstart_block())])
    check_command_line(kwargs)
    assert kwargs["protocols"] == ["knn", "linear", "hummingbird"]
    assert kwargs["overrides"]["linear"] == {"augment": False}


@pytest.mark.slow
def test_the_docs_quickstart_block_runs_as_written(tmp_path):
    """The block, unchanged, in a folder holding a tiny run export and a tiny cache of 7-class scenes."""
    data = tmp_path / ".cache" / "ssl_modules" / "synthetic" / "scenes-48px-6c-4000+500-0123456789"
    imagenet_tree(data / "imagenet", classes=3, train_per_class=3, val_per_class=2)
    voc_tree(data / "voc", train=4, val=2, num_classes=7)
    run = tmp_path / "runs" / "quickstart" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    backbone = tiny_vit()
    torch.save(backbone.timm_state_dict(), run / "backbone.pt")
    (run / "backbone.json").write_text(json.dumps({"name": backbone.name,
                                                   "model_kwargs": {**backbone.model_kwargs, "num_classes": 0}}))
    environment = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euc", quickstart_block()], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["results"]
    assert [r["protocol"] for r in results] == ["knn", "linear", "hummingbird"]
    assert results[2]["settings"]["num_classes"] == 7 and results[2]["settings"]["input_size"] == 72
