"""Every reference vector computed with the official implementations must pass.

The vectors live in ``parity_vectors/<method>/`` beside this file (one ``.pt`` file per case: the dotted name,
its inputs and the expected outputs with tolerances), so the test needs nothing outside the repository.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "parity_vectors"


def _vector_files() -> list[Path]:
    return sorted(VECTORS.rglob("*.pt"))


def _function(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _leaves(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return []


def _copy(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _as_dict(result) -> dict:
    if torch.is_tensor(result):
        return {"out": result}
    if hasattr(result, "_asdict"):
        return dict(result._asdict())
    return dict(result)


def _assert_close(name: str, got, want: torch.Tensor, rtol: float, atol: float) -> None:
    got = torch.as_tensor(got).detach().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.is_floating_point():
        assert torch.equal(got.to(want.dtype), want), f"{name}: integer/bool entries differ"
        return
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", _vector_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_reference_vector(path: Path) -> None:
    case = torch.load(path, map_location="cpu", weights_only=False)
    rtol, atol = case.get("rtol", 1e-5), case.get("atol", 1e-6)
    grads = case.get("grads") or {}
    kwargs = {key: _copy(value) for key, value in case["kwargs"].items()}
    for key in grads:
        for leaf in _leaves(kwargs[key]):
            leaf.requires_grad_(True)
    originals = {key: _copy(value) for key, value in kwargs.items()}
    torch.manual_seed(0)
    result = _as_dict(_function(case["fn"])(**kwargs))
    for key, want in case["expected"].items():
        assert key in result, f"{key} missing from the result of {case['fn']}"
        _assert_close(key, result[key], want, rtol, atol)
    for key, value in originals.items():  # pure functions: inputs unchanged
        for before, after in zip(_leaves(value), _leaves(kwargs[key])):
            assert torch.equal(before, after.detach()), f"{case['fn']} changed its input {key!r} in place"
    if grads:
        loss = result.get("loss", result.get("out"))
        inputs, wants = [], []
        for key, want in grads.items():
            inputs += _leaves(kwargs[key])
            wants += [(f"grad[{key}][{i}]", w) for i, w in enumerate(_leaves(want))]
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
        for g, (name, want) in zip(got, wants):
            _assert_close(name, torch.zeros_like(want) if g is None else g, want, rtol, atol)


def test_vectors_are_present() -> None:
    files = _vector_files()
    assert len(files) >= 40
    assert {path.parent.name for path in files} == {"bam", "cribo", "vicregl"}
