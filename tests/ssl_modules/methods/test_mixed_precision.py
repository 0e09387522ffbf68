"""Mixed precision (``16-mixed``, ``bf16-mixed``): what must stay float32 does, and every method trains.

- CrIBo's bank search and BAM's ContrastiveCrop attention run in float32 under any autocast, as the functional
  core does (``ssl_modules/functional/precision.py``): half-precision similarities reorder near-tied rows.
- One training step of each method under fp16 autocast with a GradScaler (the official recipe: BAM
  ``--use_fp16 true``, CrIBo ``use_fp16``, VICRegL ``--fp16``) and under bf16 autocast gives a finite loss.
  Lightning turns ``Trainer(accelerator="cpu", precision="16-mixed")`` into ``bf16-mixed`` (with a warning),
  so the fp16 runs pass the ``MixedPrecision("16-mixed", "cpu")`` plugin with a CPU GradScaler explicitly.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from ssl_modules import BAM, CrIBo, VICRegL
from ssl_modules.networks.backbones import Backbone
from ssl_modules.methods.contrastive_crop.boxes import last_block_cls_attention
from ssl_modules.methods.memory_bank import ObjectMemoryBank
from ssl_modules.testing import random_views

HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


# ------------------------------------------------------------------------------------- CrIBo's bank search
def near_tied(rows: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """``(2, rows, dim)`` vectors around one direction: cosine similarities differ by ~``spread**2``, which
    float32 resolves and a bf16 matmul (8 bits of mantissa) does not."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(dim, generator=gen) + 1.0
    return base + spread * torch.randn(2, rows, dim, generator=gen)


def near_tied_bank(slots: int = 64, per_slot: int = 4, dim: int = 32) -> ObjectMemoryBank:
    bank = ObjectMemoryBank(slots, per_slot, dim)
    bank.load_logical_(near_tied(slots * per_slot, dim, 0.02, seed=1), torch.full((slots,), per_slot))
    return bank


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_search_under_autocast_finds_the_float32_neighbours(dtype):
    bank, queries = near_tied_bank(), near_tied(48, 32, 0.02, seed=2)
    expected = bank.search(queries)
    with torch.autocast("cpu", dtype=dtype):
        found = bank.search(queries)
    assert torch.equal(found["indices"], expected["indices"])
    assert torch.equal(found["mask"], expected["mask"])
    assert found["neighbours"].dtype == torch.float32
    torch.testing.assert_close(found["neighbours"], expected["neighbours"], rtol=0, atol=0)


def test_the_near_tied_bank_does_tell_bf16_from_float32():
    """The bank above is a real test: a bf16 search of it picks other rows for some queries."""
    bank, queries = near_tied_bank(), near_tied(48, 32, 0.02, seed=2)
    keys = bank.keys.transpose(1, 2)
    normalized = torch.nn.functional.normalize(queries, dim=-1)
    in_float32 = (normalized @ keys).argmax(-1)
    in_bf16 = (normalized.bfloat16() @ keys.bfloat16()).float().argmax(-1)
    assert (in_float32 != in_bf16).float().mean() > 0.1


# ------------------------------------------------------------------------------ BAM's ContrastiveCrop boxes
def test_contrastive_crop_attention_is_float32_under_autocast():
    backbone = Backbone("vit_tiny_patch16_224", **TINY_VIT).eval()
    images = torch.randn(4, 3, 32, 32)
    qkv_outputs = []
    handle = backbone.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: qkv_outputs.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention = last_block_cls_attention(backbone, images)
    handle.remove()
    assert attention.dtype == torch.float32
    # What the function must compute from the (bf16) q and k of the network: the softmax in float64.
    attn = backbone.model.blocks[-1].attn
    qkv = qkv_outputs[-1].double().reshape(4, -1, 3, attn.num_heads, attn.head_dim)
    query, keys = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    expected = ((query * attn.scale) @ keys.transpose(-2, -1)).softmax(-1)[:, :, 0, backbone.num_prefix_tokens:]
    torch.testing.assert_close(attention.double(), expected.sum(1).reshape(attention.shape), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ one step of every method
def tiny(method: str) -> tuple[pl.LightningModule, list[int]]:
    common = dict(backbone_kwargs=dict(TINY_VIT), lr_scaling="none", warmup_epochs=0)
    if method == "cribo":
        return CrIBo("vit_tiny_patch16_224", out_dim=64, object_out_dim=64, head_hidden_dim=64,
                     head_bottleneck_dim=32, num_clusters=4, queue_size=16, cross_image_start_epoch=0,
                     **common), [32, 32]
    if method == "bam":
        return BAM("vit_tiny_patch16_224", projector_widths="64-64-32", top_k=8, **common), [32, 32, 16]
    return VICRegL("vit_tiny_patch16_224", num_matches=(4, 2), expander_widths="64-64-64",
                   projector_widths="32-32-32", **common), [32, 32, 16]


def precision_arguments(precision: str) -> dict:
    if precision == "16-mixed":  # a small initial scale: the tiny models' first steps do not all overflow
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


class StepRecord(pl.Callback):
    """The loss of every step, and the dtype the backbone's blocks computed in."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.block_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.backbone.model.blocks[0].mlp.fc1.register_forward_hook(
            lambda m, i, out: self.block_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("precision", list(HALF))
@pytest.mark.parametrize("method", ["cribo", "bam", "vicregl"])
def test_every_method_trains_under_mixed_precision_on_cpu(method, precision):
    module, sizes = tiny(method)
    views = random_views(8, sizes, seed=3)
    record = StepRecord()
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=2, **precision_arguments(precision)), callbacks=[record])
    assert trainer.precision_plugin.precision == precision
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer.fit(module, DataLoader(range(2), batch_size=None, collate_fn=lambda _: views))
    assert record.block_dtypes == {HALF[precision]}  # the networks did run in half precision
    assert len(record.losses) == 2 and all(torch.isfinite(torch.tensor(record.losses)))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(b).all() for b in module.buffers() if b.is_floating_point())
    # The optimizer did step: no gradient was non-finite in every step (a GradScaler skips those steps).
    assert any(not torch.equal(a, p) for a, p in zip(before, module.backbone.parameters()))
