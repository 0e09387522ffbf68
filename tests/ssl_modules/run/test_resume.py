"""ssl_modules.run.resume: RNG states, the last checkpoint, the class check, hyper-parameter differences."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from ssl_modules.run.resume import (
    ExactResume,
    check_checkpoint_class,
    hparam_differences,
    resolve_last_checkpoint,
    rng_state,
    set_rng_state,
)


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first


def test_rng_state_loads_with_weights_only():
    buffer = io.BytesIO()
    torch.save({"rng_states": [rng_state()]}, buffer)
    first = _draws()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng_states"][0])
    assert _draws() == first


def test_every_ssl_module_adds_exact_resume():
    from support.common import TINY_VIT

    from ssl_modules.methods.vicregl import VICRegL

    model = VICRegL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), expander_widths="32-32",
                    projector_widths="16-16")
    assert any(isinstance(callback, ExactResume) for callback in model.configure_callbacks())


def test_resolve_last_checkpoint_picks_the_newest(tmp_path):
    import os

    old = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=8.ckpt"
    new = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last-stop.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    assert resolve_last_checkpoint(tmp_path) == new
    assert resolve_last_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_of_another_class_is_refused_naming_both():
    from ssl_modules.methods.cribo import CrIBo

    with pytest.raises(ValueError, match="ssl_modules.methods.vicregl.VICRegL.*ssl_modules.CrIBo"):
        check_checkpoint_class({"ssl_module_class": "ssl_modules.methods.vicregl.VICRegL"}, CrIBo, "x.ckpt")
    check_checkpoint_class({"ssl_module_class": "ssl_modules.methods.cribo.CrIBo"}, CrIBo, "x.ckpt")
    check_checkpoint_class({"ssl_module_class": "ssl_modules.CrIBo"}, CrIBo, "x.ckpt")
    check_checkpoint_class({"ssl_module_class": "ssl_modules.cribo.CrIBo"}, CrIBo, "x.ckpt")  # an earlier layout


def test_hparam_differences_lists_changed_values_only():
    saved = {"lr": 0.002, "scale": (0.25, 1.0), "depth": 2}
    given = {"lr": 0.001, "scale": [0.25, 1.0], "new": 3}
    assert hparam_differences(saved, given) == {"lr": (0.002, 0.001)}
