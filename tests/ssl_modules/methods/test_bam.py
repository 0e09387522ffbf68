
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from support.distributed_utils import run_distributed
from ssl_modules.run import distributed
from ssl_modules.methods.bam import BAM
from ssl_modules.functional import bam_loss
from ssl_modules.testing import random_views


def tiny_bam(**overrides):
    kwargs = dict(backbone_kwargs=dict(TINY_VIT), projector_widths="64-64-32", top_k=8)
    kwargs.update(overrides)
    return BAM("vit_tiny_patch16_224", **kwargs)


def split(views, rank, world_size):
    batch = views.batch_size // world_size
    part = slice(rank * batch, (rank + 1) * batch)
    return views._replace(crops=[c[part] for c in views.crops], boxes=views.boxes[part], flipped=views.flipped[part],
                          image_size=views.image_size[part], label=views.label[part], index=views.index[part])


def test_published_vit_recipe_defaults():
    module = tiny_bam()
    assert module.has_teacher and module.hparams.top_k == 8 and module.hparams.clip_grad == 0.3
    assert not module.backbone.model.pos_embed.requires_grad  # MoCo v3 fixed sin-cos table
    assert not module.backbone.model.patch_embed.proj.weight.requires_grad
    names = {n for n, _ in module.trainable_named_parameters()}
    assert "backbone.model.pos_embed" not in names and not any(n.startswith("teacher.") for n in names)


def test_loss_equals_the_functional_core_on_the_projected_crops():
    module = tiny_bam(teacher=False, top_k=0)
    views = random_views(4, [32, 32, 16])
    loss = module.training_step(views, 0)["loss"]
    student = module.project(module.backbone, module.projector, views.crops)
    torch.testing.assert_close(loss, bam_loss(student)["loss"])


def test_projector_sees_all_crops_in_one_call():
    module = tiny_bam(projector_norm="batch")
    calls = []
    for projector in (module.projector, module.teacher["projector"]):
        projector.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    module.training_step(random_views(4, [32, 32, 16, 16]), 0)
    assert calls == [16, 16]  # student, then teacher: all 4 crops of 4 images at once


def test_trains_through_a_trainer_and_moves_the_teacher():
    module = tiny_bam(warmup_epochs=0.0, lr=1e-2)
    views = random_views(8, [32, 32, 16, 16])
    loader = DataLoader(range(3), batch_size=None, collate_fn=lambda _: views)
    before = module.teacher["projector"][0].weight.detach().clone()
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=1)).fit(module, loader)
    assert not torch.equal(before, module.teacher["projector"][0].weight)


def test_sinkhorn_temperature_at_or_above_softmax_temperature_warns():
    with pytest.warns(UserWarning, match="collapse regime"):
        tiny_bam(sinkhorn_temperature=0.1)


def test_top_k_larger_than_the_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k .* exceeds the 8 target columns"):
        tiny_bam(top_k=9).training_step(random_views(4, [32, 32]), 0)


def test_a_global_batch_of_one_image_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 images"):
        tiny_bam(top_k=0).training_step(random_views(1, [32, 32]), 0)


def test_diagnostics_draw_attention_and_targets():
    images = tiny_bam().visual_diagnostics(random_views(4, [32, 32, 16]))
    assert set(images) == {"bam/attention", "bam/targets"}
    assert all(img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1 for img in images.values())


def _bam_rank(rank, world_size, full_views, teacher, seed):
    torch.manual_seed(seed)
    module = tiny_bam(teacher=teacher, top_k=4).double()
    views = split(full_views._replace(crops=[c.double() for c in full_views.crops]), rank, world_size)
    if teacher:  # move the teacher away from the student so that both paths matter
        with torch.no_grad():
            for p in module.teacher.parameters():
                p.add_(0.01 * torch.randn_like(p))
    loss = module.training_step(views, 0)["loss"]
    loss.backward()
    mean_loss = distributed.all_reduce(loss.detach(), "sum") / world_size
    grads = {n: distributed.all_reduce(p.grad, "sum") / world_size
             for n, p in module.named_parameters() if p.grad is not None}
    return mean_loss, grads


@pytest.mark.parametrize("teacher", [False, True])
def test_two_processes_equal_one_process_with_the_doubled_batch(teacher):
    views = random_views(6, [32, 32, 16], seed=5)
    results = run_distributed(_bam_rank, world_size=2, args=(views, teacher, 11))
    single_loss, single_grads = _bam_rank(0, 1, views, teacher, 11)
    for loss, grads in results:
        torch.testing.assert_close(loss, single_loss, rtol=1e-10, atol=1e-12)
        assert grads.keys() == single_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, single_grads[name], rtol=1e-8, atol=1e-12, msg=name)


def _heads(backbone):
    return {block.attn.num_heads for block in backbone.model.blocks}


def test_mocov3_vit_small_has_twelve_heads_as_the_published_model(tmp_path):
    import json
    module = BAM("vit_small_patch16_224", backbone_kwargs=dict(depth=2, img_size=32), projector_widths="32-32")
    assert _heads(module.backbone) == {12} and _heads(module.teacher["backbone"]) == {12}
    assert module.backbone.model.blocks[0].attn.head_dim == 32
    meta = json.loads(module.export_backbone(tmp_path / "backbone.pt").with_suffix(".json").read_text())
    assert meta["model_kwargs"]["num_heads"] == 12  # timm rebuilds the same architecture from the export


def test_an_explicit_num_heads_and_non_mocov3_vit_small_keep_their_heads():
    explicit = BAM("vit_small_patch16_224", backbone_kwargs=dict(depth=1, img_size=32, num_heads=6),
                   projector_widths="32-32")
    plain = BAM("vit_small_patch16_224", mocov3_vit=False, backbone_kwargs=dict(depth=1, img_size=32),
                projector_widths="32-32")
    assert _heads(explicit.backbone) == {6} and _heads(plain.backbone) == {6}


def test_the_generic_backbone_keeps_timms_six_heads_for_vit_small():
    from ssl_modules.networks.backbones import Backbone
    assert _heads(Backbone("vit_small_patch16_224", depth=1, img_size=32)) == {6}
