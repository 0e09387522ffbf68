"""Every method pickles, with the callbacks it adds (``ExactResume``, ``NonFiniteGuard``, BAM's
``ContrastiveCrop``): ``torch.save(module)``, ``copy``/``pickle`` and ``Trainer(strategy="ddp_spawn")`` (which
pickles the module, the data and the callbacks into each process) work for CrIBo, BAM and VICRegL."""
from __future__ import annotations

import io
import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule
from ssl_modules import BAM, CrIBo, VICRegL
from ssl_modules.run.guard import NonFiniteGuard
from ssl_modules.run.resume import ExactResume
from ssl_modules.testing import random_views

METHODS = ["cribo", "bam", "vicregl"]


def tiny(method: str, **overrides) -> tuple[pl.LightningModule, MultiCropViews]:
    """A tiny module of ``method`` and the views it trains on (2 global 32 px crops, 2 local 16 px)."""
    common = dict(backbone_kwargs=dict(TINY_VIT), lr_scaling="none", warmup_epochs=0, **overrides)
    crops = dict(global_size=32, local_size=16, jitter_p=0.0, grayscale_p=0.0)
    if method == "cribo":
        module = CrIBo("vit_tiny_patch16_224", out_dim=64, object_out_dim=64, head_hidden_dim=64,
                       head_bottleneck_dim=32, num_clusters=4, queue_size=16, cross_image_start_epoch=0, **common)
        return module, MultiCropViews(n_global=2, n_local=0, **crops)
    if method == "bam":
        module = BAM("vit_tiny_patch16_224", projector_widths="64-64-32", top_k=8, **common)
    else:
        module = VICRegL("vit_tiny_patch16_224", num_matches=(4, 2), expander_widths="64-64-64",
                         projector_widths="32-32-32", **common)
    return module, MultiCropViews(n_global=2, n_local=2, **crops)


def one_step(module: pl.LightningModule, views: MultiCropViews) -> pl.Trainer:
    sizes = [views.global_size] * views.n_global + [views.local_size] * views.n_local
    batch = random_views(4, sizes, seed=1)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=1))
    trainer.fit(module, DataLoader(range(1), batch_size=None, collate_fn=lambda _: batch))
    return trainer


def assert_same_state(a: pl.LightningModule, b: pl.LightningModule) -> None:
    assert type(a) is type(b)
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_a_new_module_pickles(method):
    module, _ = tiny(method)
    assert_same_state(pickle.loads(pickle.dumps(module)), module)


@pytest.mark.parametrize("method", METHODS)
def test_a_trained_module_pickles_and_torch_saves(method):
    module, views = tiny(method)
    one_step(module, views)
    assert_same_state(pickle.loads(pickle.dumps(module)), module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert_same_state(torch.load(buffer, weights_only=False), module)


@pytest.mark.parametrize("method", METHODS)
def test_the_callbacks_a_module_adds_pickle_after_training(method):
    module, views = tiny(method)
    added = tuple(type(c) for c in module.configure_callbacks())
    assert {ExactResume, NonFiniteGuard} <= set(added)
    trainer = one_step(module, views)
    attached = [c for c in trainer.callbacks if isinstance(c, added)]
    assert len(attached) == len(added)
    restored = pickle.loads(pickle.dumps(attached))
    assert [type(c) for c in restored] == [type(c) for c in attached]


def test_bams_contrastive_crop_callback_pickles():
    module, _ = tiny("bam", contrastive_crop=True, ccrop_interval=1, ccrop_warmup_epochs=0)
    callbacks = module.configure_callbacks()
    assert "ContrastiveCrop" in {type(c).__name__ for c in callbacks}
    assert [type(c) for c in pickle.loads(pickle.dumps(callbacks))] == [type(c) for c in callbacks]


def test_an_unpickled_cribo_still_reads_the_flat_bank_layout():
    module, _ = tiny("cribo")
    copy = pickle.loads(pickle.dumps(module))
    slots, rows = copy.memory_bank.num_slots, copy.memory_bank.capacity
    bank, counts = torch.randn(2, rows, copy.backbone.num_features), torch.randint(0, 5, (slots,))
    state = {k: v for k, v in copy.state_dict().items() if not k.startswith("memory_bank.")}
    copy.load_state_dict({**state, "bank": bank, "bank_counts": counts})
    torch.testing.assert_close(copy.memory_bank.logical()["bank"], bank)
    assert torch.equal(copy.memory_bank.logical()["counts"], counts)


# ------------------------------------------------------------------------------------------------ ddp_spawn
def spawn_data(root, views: MultiCropViews) -> SyntheticScenesDataModule:
    # 2 processes x batch 4 x 2 batches = one 16-image epoch: 3 steps cross the end of epoch 0.
    scene = SceneConfig(image_size=48, num_train=16, num_val=8)
    return SyntheticScenesDataModule(root=str(root), scene=scene, eval_size=32, batch_size=4, num_workers=0,
                                     views=views, generation_workers=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ddp_spawn_on_two_cpu_processes_with_the_progress_bar(method, tmp_path):
    extra = dict(contrastive_crop=True, ccrop_interval=1, ccrop_warmup_epochs=0) if method == "bam" else {}
    module, views = tiny(method, **extra)
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = pl.Trainer(**quiet_trainer_kwargs(devices=2, strategy="ddp_spawn", max_steps=3,
                                                enable_progress_bar=True, limit_val_batches=0,
                                                log_every_n_steps=1))
    trainer.fit(module, datamodule=spawn_data(tmp_path / "data", views))
    assert trainer.state.finished
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # ddp_spawn copies rank 0's trained weights back into the module of this process
    assert any(not torch.equal(a, p) for a, p in zip(before, module.backbone.parameters()))
