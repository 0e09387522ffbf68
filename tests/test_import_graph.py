"""The dependency direction of docs/architecture.md: functional <- backbones/heads/mixins <- base <- methods <- cli."""
import subprocess
import sys

import pytest


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_functional_core_does_not_import_lightning():
    loaded = _loaded_after_import("ssl_modules.functional")
    assert not any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in loaded)


@pytest.mark.parametrize("module", ["datamodules"])
def test_datamodules_do_not_import_the_methods(module):
    loaded = _loaded_after_import(module)
    assert not any(name.split(".")[0] in ("ssl_modules", "callbacks") for name in loaded)
