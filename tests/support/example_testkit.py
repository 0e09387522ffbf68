"""What the example tests share: where the examples are, the synthetic-data cache, class-path resolution."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
NOT_PAPER = {"synthetic_tiny.yaml", "quickstart.yaml"}  # CPU configs: they must run, not reproduce a paper


OVERRIDES = {"fsdp2.yaml"}  # partial configs added after a method's config (--config <method> --config <override>)


def all_configs() -> list[Path]:
    """Every YAML under ``examples/configs`` (found anew each run, so added files are covered) but the overrides."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.name not in OVERRIDES)


def override_configs() -> list[Path]:
    """The partial configs that switch any config to another setting (FSDP2)."""
    return sorted(CONFIGS / name for name in OVERRIDES)


def paper_configs() -> list[Path]:
    """The configs of a paper's recipe (from scratch, the official settings)."""
    return [p for p in all_configs() if p.name not in NOT_PAPER and p.parent.name != "posttrain"]


def posttrain_configs() -> list[Path]:
    """The configs that start from foundation weights (``examples/configs/posttrain``)."""
    return sorted((CONFIGS / "posttrain").glob("*.yaml"))


def tiny_configs() -> list[Path]:
    """The configs meant to train on a CPU: every ``synthetic_tiny.yaml`` and ``quickstart.yaml``."""
    return [p for p in all_configs() if p.name in NOT_PAPER]


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def resolve(class_path: str) -> type:
    """A class from a config's ``class_path``: a dotted path, or a short name of the library's packages."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    for package in ("ssl_modules", "datamodules", "callbacks"):
        found = getattr(importlib.import_module(package), class_path, None)
        if found is not None:
            return found
    raise LookupError(f"class_path {class_path!r} names no class of ssl_modules, datamodules or callbacks")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """One cache folder for the synthetic scenes of the whole session (the data of given parameters is generated
    once, into a sub-folder named after them, and reused by every test that asks for the same parameters)."""
    root = tmp_path_factory.getbasetemp() / "synthetic-scenes"
    root.mkdir(exist_ok=True)
    return root


def run_python(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <args>`` in the repository root, offline, with the output captured (for scripts and DDP runs:
    a DDP rank re-runs ``sys.argv``, so distributed runs must not start from inside pytest)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def quick_probes_config(tmp_path: Path, path: Path = CONFIGS / "quickstart.yaml") -> Path:
    """A copy of a config (the quickstart by default) whose probes train briefly: tests check that they run,
    not how well."""
    config = yaml.safe_load(path.read_text())
    for callback in config["trainer"].get("callbacks") or []:
        args = callback.setdefault("init_args", {})
        if "steps" in args:
            args["steps"] = 20
        if "validate_steps" in args:
            args["validate_steps"] = 20
    quick = tmp_path / f"quick_{path.name}"
    quick.write_text(yaml.safe_dump(config))
    return quick
