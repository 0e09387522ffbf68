"""The scaling tables of docs/performance.md are the output of benchmarks/scaling_arithmetic.py, and the script
reads what it prints from the configs (a meta-device step) and applies the documented formulas."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling_arithmetic.py"


def _script():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("scaling_arithmetic")


@pytest.fixture(scope="module")
def cribo_small():
    script = _script()
    return script.measure("CrIBo ViT-S/16 ImageNet", script.REPO / "examples/configs/cribo/imagenet_vit_small_16.yaml")


def test_cribo_bank_is_read_from_the_config_at_its_released_size(cribo_small):
    script = _script()
    assert (cribo_small.bank_rows, cribo_small.object_width, cribo_small.paper_gpus) == (800_000, 384, 8)
    keys_and_norms = 2 * 800_000 * 384 * 4 + 2 * 800_000 * 4
    assert keys_and_norms <= cribo_small.bank <= keys_and_norms + 25_000 * 8 + 16  # + counts and heads
    assert cribo_small.bank_images / (cribo_small.batch * 8) == pytest.approx(24.4, abs=0.05)  # steps of history
    assert script.bank_bytes(cribo_small, 64, sharded=True, grown=False) == cribo_small.bank / 64
    assert script.bank_bytes(cribo_small, 64, sharded=False, grown=True) == 8 * cribo_small.bank
    assert script.bank_bytes(cribo_small, 64, sharded=True, grown=True) == cribo_small.bank / 8


def test_cribo_parameters_teacher_and_collectives_come_from_the_meta_step(cribo_small):
    assert cribo_small.teacher == cribo_small.student == cribo_small.trainable  # ViT-S + both heads, EMA copy
    assert cribo_small.gathered_calls["backbone"] >= 1 and cribo_small.activations > 0
    objects = 2 * 128 * 32 * 384 * 4  # both views' teacher objects of the local batch, gathered for the bank
    assert ("all_gather_no_grad", objects) in cribo_small.collectives


def test_formulas_ddp_all_reduces_gradients_and_fsdp2_shards_the_state(cribo_small):
    script = _script()
    trainable = cribo_small.trainable
    assert script.parameter_bytes(cribo_small, 8, "DDP") == pytest.approx(2 * 7 / 8 * 4 * trainable)
    ddp, fsdp = script.model_state(cribo_small, 64, "DDP"), script.model_state(cribo_small, 64, "FSDP2")
    assert ddp["optimizer"] == 2 * 4 * trainable  # AdamW: two float32 moments
    for part in ("grads", "optimizer", "teacher"):
        assert fsdp[part] == pytest.approx(ddp[part] / 64)
    assert script.parameter_bytes(cribo_small, 8, "FSDP2") > script.parameter_bytes(cribo_small, 8, "DDP")


def test_half_precision_stand_in_casts_like_autocast_and_attention_saves_no_square_matrix():
    script = _script()
    x = torch.empty(2, 5, 8, device="meta", requires_grad=True)
    weight = torch.empty(8, 8, device="meta")
    saved = []
    mode = script.PrecisionStandIn(half=True)
    mode.active = 1
    with mode, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        assert F.linear(x, weight).dtype == torch.float16
        assert F.layer_norm(x.half(), (8,)).dtype == torch.float32
        q = x.view(2, 1, 5, 8)
        F.scaled_dot_product_attention(q, q, q)
    assert not any(t.shape[-2:] == (5, 5) for t in saved)


@pytest.mark.slow
def test_the_tables_in_the_docs_are_the_scripts_output():
    script = _script()
    expected = script.render(script.footprints())
    documented = script.documented_block(script.DOC.read_text())
    assert documented == expected, "run `python benchmarks/scaling_arithmetic.py --write` and commit the docs"
