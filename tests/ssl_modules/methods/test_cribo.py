import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from support.distributed_utils import run_distributed
from ssl_modules.run import distributed
from ssl_modules.methods.cribo import CrIBo
from ssl_modules.testing import random_views

TINY = dict(backbone_kwargs=dict(TINY_VIT), out_dim=128, object_out_dim=128, head_hidden_dim=64,
            head_bottleneck_dim=32, num_clusters=4, queue_size=64)


class IndexSeededCrIBo(CrIBo):
    """Initial centroids drawn from each image's dataset index, so that any split of a batch draws the same."""

    def initial_centroids(self, views, tokens):
        scores = torch.stack([torch.rand(tokens, generator=torch.Generator().manual_seed(int(i))) for i in views.index])
        return scores.argsort(dim=1)[:, : self.hparams.num_clusters]


def tiny_cribo(cls=CrIBo, **overrides):
    return cls("vit_tiny_patch16_224", **{**TINY, **overrides})


def loader(views, steps):
    return DataLoader(range(steps), batch_size=None, collate_fn=lambda _: views)


def test_heads_share_the_trunk_and_teacher_has_no_drop_path():
    module = tiny_cribo()
    assert {n.split(".")[0] for n, _ in module.head.named_parameters()} == {"mlp", "last_layer", "last_layer_c"}
    assert module.backbone.model.blocks[1].drop_path1.drop_prob > 0
    assert module.teacher["backbone"].model.blocks[1].drop_path1.drop_prob == 0


def test_teacher_temperature_warms_up_per_epoch():
    module = tiny_cribo(warmup_teacher_temp_epochs=4)
    module.trainer = pl.Trainer(max_epochs=10, logger=False)
    assert module.temperatures() == (0.04, 0.04)


def test_bank_is_filled_from_the_front_and_saved_in_the_checkpoint(tmp_path):
    module = tiny_cribo(warmup_epochs=0.0)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=1))
    trainer.fit(module, loader(random_views(8, [32, 32]), 2))
    counts = module.memory_bank.logical()["counts"]
    assert counts[:16].le(4).all() and counts[16:].eq(4).all()
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    for name, buffer in module.memory_bank.named_buffers():
        assert torch.equal(state[f"memory_bank.{name}"], buffer), name


class LossRecorder(Callback):
    def __init__(self):
        self.cross, self.last_layer = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.cross.append(trainer.callback_metrics["train/cross_image_loss"].item())
        self.last_layer.append(module.head.last_layer_c.weight_v.detach().clone())


def test_first_epoch_has_no_cross_image_loss_and_frozen_prototypes():
    torch.manual_seed(0)
    module = tiny_cribo(warmup_epochs=0.0, lr=1e-3)
    views = random_views(8, [32, 32, 16], seed=1)
    rec = LossRecorder()
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=2, log_every_n_steps=1), callbacks=[rec]).fit(module, loader(views, 3))
    assert rec.cross[:3] == [0.0, 0.0, 0.0]
    assert all(torch.equal(rec.last_layer[0], w) for w in rec.last_layer[:3])
    assert not torch.equal(rec.last_layer[2], rec.last_layer[5])


def _seeded_eval_cribo() -> CrIBo:
    """A tiny CrIBo of fixed weights, without drop path (eval mode), clustering from seeded centroids."""
    torch.manual_seed(0)
    return tiny_cribo(IndexSeededCrIBo).eval()


def test_one_image_per_process_works():
    views = random_views(1, [32, 32])
    twice = views._replace(crops=[torch.cat([c, c]) for c in views.crops],
                           **{name: torch.cat([getattr(views, name)] * 2) for name in views._fields if name != "crops"})
    alone = _seeded_eval_cribo().training_step(views, 0)["loss"]
    # Every term is a mean over images (or over their objects), so a batch holding the image twice has its loss.
    torch.testing.assert_close(alone, _seeded_eval_cribo().training_step(twice, 0)["loss"], rtol=1e-5, atol=1e-6)
    assert alone.item() > 0  # cross-entropies of softmaxes over 128 prototypes: not a degenerate zero


@pytest.mark.parametrize(
    "overrides, sizes, message",
    [
        (dict(num_clusters=40), [32, 32], "exceeds the 32 patch tokens"),
        (dict(queue_size=4), [32, 32], "queue_size .* fewer images than one global batch"),
        (dict(), [36, 36], "multiples of 8"),
        (dict(local_group_size=3), [32, 32], "must divide"),
    ],
)
def test_bad_input_is_a_clear_error(overrides, sizes, message):
    with pytest.raises(ValueError, match=message):
        tiny_cribo(**overrides).training_step(random_views(8, sizes), 0)


def _cribo_rank(rank, world_size, full_views, group):
    torch.manual_seed(0)
    module = tiny_cribo(IndexSeededCrIBo, local_group_size=group, cross_image_start_epoch=0,
                        backbone_kwargs=dict(TINY_VIT, drop_path_rate=0.0)).double()
    views = full_views._replace(crops=[c.double() for c in full_views.crops])
    batch = views.batch_size // world_size
    part = slice(rank * batch, (rank + 1) * batch)
    views = views._replace(crops=[c[part] for c in views.crops], boxes=views.boxes[part], flipped=views.flipped[part],
                           image_size=views.image_size[part], label=views.label[part], index=views.index[part])
    with torch.no_grad():  # move the teacher away from the student
        for p in module.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    logged = {}
    module.log_terms = lambda terms, **kwargs: logged.update(terms)
    module.training_step(views, 0)  # fills the bank with this batch's objects: the next step closes cycles
    loss = module.training_step(views, 1)["loss"]
    loss.backward()
    assert logged["cross_image_loss"] > 0 and logged["cycle_consistent_ratio"] > 0.5
    mean_loss = distributed.all_reduce(loss.detach(), "sum") / world_size
    grads = {n: distributed.all_reduce(p.grad, "sum") / world_size
             for n, p in module.named_parameters() if p.grad is not None}
    bank = module.memory_bank.logical()
    return mean_loss, grads, bank["bank"], bank["counts"], module.center.clone(), module.object_center.clone()


def test_two_processes_equal_one_process_with_local_groups():
    views = random_views(6, [32, 32], seed=4)
    results = run_distributed(_cribo_rank, world_size=2, args=(views, None))
    single = _cribo_rank(0, 1, views, 3)
    for loss, grads, bank, counts, center, object_center in results:
        torch.testing.assert_close(loss, single[0], rtol=1e-10, atol=1e-12)
        assert grads.keys() == single[1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, single[1][name], rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(bank, single[2])
        assert torch.equal(counts, single[3])
        torch.testing.assert_close(center, single[4])
        torch.testing.assert_close(object_center, single[5])


def test_vit_small_keeps_six_heads_as_the_official_dino_vit():
    module = CrIBo("vit_small_patch16_224", **{**TINY, "backbone_kwargs": dict(depth=1, img_size=32)})
    assert {block.attn.num_heads for block in module.backbone.model.blocks} == {6}


def test_cls_token_is_trunc_normal_002_as_the_official_vit():
    torch.manual_seed(0)
    module = tiny_cribo(backbone_kwargs=dict(TINY_VIT, embed_dim=384, num_heads=6))
    cls_token = module.backbone.model.cls_token
    assert 0.015 < cls_token.std().item() < 0.025  # timm: std 1e-6
    torch.testing.assert_close(module.teacher["backbone"].model.cls_token, cls_token)


def test_generic_backbone_keeps_timms_tiny_cls_token():
    from ssl_modules.networks.backbones import Backbone
    torch.manual_seed(0)
    assert Backbone("vit_tiny_patch16_224", **TINY_VIT).model.cls_token.abs().max().item() < 1e-4
    trunc = Backbone("vit_tiny_patch16_224", cls_token_init="trunc_normal", **TINY_VIT).model.cls_token
    assert trunc.std().item() > 5e-3
    with pytest.raises(ValueError, match="no CLS token"):
        Backbone("resnet18", cls_token_init="trunc_normal")
