"""What a fresh clone and CI rely on: one test command, typed packages, the slow marker, working floors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = ("ssl_modules", "datamodules", "callbacks")


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"what `\.ci/run` runs\):\s*```bash\n(.+?)\n```", text, re.S)
    assert match, "README.md must show the test command in a bash block after 'what `.ci/run` runs):'"
    return match.group(1).strip()


def test_readme_and_ci_run_the_same_command_with_ruff_and_the_slow_tests():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    command = _readme_test_command()
    assert command == ci_lines[-1]
    assert "ruff check" in command and "--runslow" in command


def test_every_package_ships_py_typed():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package in PACKAGES:
        assert (REPO / package / "py.typed").is_file(), package
        assert "py.typed" in data[package], package


def test_the_slow_marker_is_registered_and_ruff_is_in_the_test_extras():
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
    assert any(dep.startswith("ruff") for dep in PYPROJECT["project"]["optional-dependencies"]["test"])
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120


def test_the_version_floors_cover_the_apis_the_code_uses():
    floors = dict(re.match(r"([\w\[\].-]+?)(?:\[.*\])?>=([\d.]+)", dep).groups()
                  for dep in PYPROJECT["project"]["dependencies"])
    as_tuple = lambda version: tuple(int(p) for p in version.split("."))  # noqa: E731
    assert as_tuple(floors["torch"]) >= (2, 6)  # torch.accelerator
    assert as_tuple(floors["torchvision"]) >= (0, 21)  # public v2 Transform.make_params / transform


def _version(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (3 - len(parts))


def _floors() -> dict[str, str]:
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {name.lower(): floor for name, floor in
            (re.match(r"([\w.-]+)(?:\[.*\])?>=([\d.]+)", dep).groups() for dep in requirements)}


def test_the_minimum_versions_install_pins_exactly_the_floors_of_pyproject():
    """``.ci/min-versions`` installs ``.ci/min-versions.txt``: one ``==`` pin per requirement, at its floor."""
    lines = [line.split("#")[0].strip() for line in (REPO / ".ci" / "min-versions.txt").read_text().splitlines()]
    pins = {name.lower(): version for name, version in
            (re.match(r"([\w.-]+)(?:\[.*\])?==([\d.]+)$", line).groups() for line in lines if line)}
    floors = _floors()
    assert pins.keys() == floors.keys()
    for name, floor in floors.items():
        assert _version(pins[name]) == _version(floor), name


@pytest.mark.slow  # two fresh collections of the whole suite
def test_plain_pytest_collects_what_python_m_pytest_collects():
    """``tests/callbacks`` and ``tests/datamodules`` must not shadow the packages under the ``pytest`` script."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = Path(sys.executable).with_name("pytest")
    collected = []
    for command in ([str(script)], [sys.executable, "-m", "pytest"]):
        result = subprocess.run([*command, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=repo,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout[-2000:]
        assert "error" not in result.stdout.strip().splitlines()[-1], result.stdout[-2000:]
        collected.append([line for line in result.stdout.splitlines() if "::" in line])
    assert len(collected[0]) > 900 and collected[0] == collected[1]
