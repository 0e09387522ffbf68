"""ContrastiveCrop: boxes from attention, the schedule, the callback BAM adds, checkpoints, DDP."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from support.common import TINY_VIT, quiet_trainer_kwargs
from support.distributed_utils import run_distributed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from callbacks import ContrastiveCrop
from datamodules import ImageFolderDataModule, MultiCropViews
from ssl_modules.methods.bam import BAM
from ssl_modules.methods.contrastive_crop.boxes import (
    boxes_from_attention,
    check_attention_backbone,
    is_box_update_epoch,
    last_block_cls_attention,
    uses_guided_crops,
)
from ssl_modules.testing import random_views

NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,), local_blur_p=(0.0,),
                 global_solarize_p=(0.0,), local_solarize_p=(0.0,))


def tiny_bam(**overrides) -> BAM:
    kwargs = dict(backbone_kwargs=dict(TINY_VIT), projector_widths="64-64-32", top_k=8, contrastive_crop=True,
                  warmup_epochs=0.0, lr=1e-3)
    kwargs.update(overrides)
    return BAM("vit_tiny_patch16_224", **kwargs)


# ------------------------------------------------------------------------------------- boxes from attention
def test_box_of_one_hot_cell_is_where_the_upsampled_map_exceeds_the_threshold():
    attention = torch.zeros(1, 4, 4)
    attention[0, 1, 2] = 3.0
    # 4 -> 32 bilinear (half-pixel centres): pixel i sits at s = (i + 0.5) / 8 - 0.5 in cell units and the hot
    # cell r weighs 1 - |s - r| there. The 2-D map is the product of the row and column weights; no pixel
    # centre hits the cell centre, so the best column weight is 15/16 and a row exceeds 0.1 where its weight
    # exceeds 0.1 * 16/15: |s - r| < 0.893, i.e. rows 5..18 for r = 1 and (the same for columns) 13..26 for c = 2.
    expected = torch.tensor([[5 / 32, 13 / 32, 18 / 32, 26 / 32]])
    torch.testing.assert_close(boxes_from_attention(attention, (32, 32), threshold=0.1), expected)
    # min-max normalisation: an affine change of the map changes nothing
    torch.testing.assert_close(boxes_from_attention(5 * attention + 2, (32, 32), threshold=0.1), expected)


def test_box_spans_from_the_first_to_the_last_hot_row_and_column():
    attention = torch.zeros(2, 4, 4)
    attention[0, 0, 0] = attention[0, 3, 3] = 1.0  # two corners: the box spans both
    attention[1, 2, 1] = 1.0
    boxes = boxes_from_attention(attention, (32, 64), threshold=0.5)
    # corner cells reach 1 (the interpolation is clamped at the border): rows 0..7 and 24..31 exceed 0.5;
    # y1 is the last row over the side (31 / 32), as in the official code
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 31 / 32, 63 / 64]))
    # cell (2, 1): the best column weight is 31/32 (16 px per cell), so rows need a weight > 0.5 * 32/31:
    # |(i + 0.5) / 8 - 2.5| < 0.484, rows 16..23; the best row weight is 15/16, so columns need
    # |(j + 0.5) / 16 - 1.5| < 0.467, columns 17..30
    torch.testing.assert_close(boxes[1], torch.tensor([16 / 32, 17 / 64, 23 / 32, 30 / 64]))


def test_constant_attention_gives_the_whole_image():
    torch.testing.assert_close(boxes_from_attention(torch.full((1, 3, 3), 0.7), (24, 24)),
                               torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_cls_attention_equals_timm_attention_probabilities():
    module = tiny_bam()
    backbone = module.backbone.eval()
    images = torch.randn(3, 3, 32, 32)
    attention_module = backbone.model.blocks[-1].attn
    with torch.no_grad():
        ours = last_block_cls_attention(backbone, images)  # timm's fused kernel runs in the forward
        attention_module.fused_attn = False  # timm's explicit softmax, caught after it is computed
        probabilities = []
        handle = attention_module.attn_drop.register_forward_hook(lambda m, i, out: probabilities.append(out))
        backbone(images)
        handle.remove()
    expected = probabilities[0][:, :, 0, 1:].sum(dim=1).reshape(3, 4, 4)  # CLS row, patch keys, summed heads
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the schedule
def test_published_schedule():
    updates = [e for e in range(400) if is_box_update_epoch(e, 40, 40.0, 400)]
    assert updates == list(range(40, 400, 40))  # 40, 80, ..., 360
    assert [e for e in range(400) if uses_guided_crops(e, 40, 40.0)][0] == 41
    assert not is_box_update_epoch(80, 40, 40.0, max_epochs=81)  # never at the last epoch
    assert [e for e in range(200) if is_box_update_epoch(e, 40, 50.0, 200)] == [80, 120, 160]
    assert [e for e in range(200) if uses_guided_crops(e, 40, 50.0)][0] == 51
    assert [e for e in range(10) if is_box_update_epoch(e, 3, 0.0, 10)] == [0, 3, 6]


# --------------------------------------------------------------------------------------- errors up front
def test_a_cnn_backbone_is_refused_at_construction():
    with pytest.raises(ValueError, match="not a ViT"):
        BAM("resnet18", mocov3_vit=False, projector_widths="32-32", contrastive_crop=True)
    BAM("resnet18", mocov3_vit=False, projector_widths="32-32")  # off by default


def test_a_vit_without_class_token_is_refused():
    backbone = tiny_bam(contrastive_crop=False).backbone
    backbone.model.cls_token = None  # as timm builds it with class_token=False
    with pytest.raises(ValueError, match="class token"):
        check_attention_backbone(backbone)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ccrop_alpha=0.0), "alpha > 0"),
    (dict(ccrop_box_threshold=1.0), r"\[0, 1\)"),
    (dict(ccrop_interval=0), ">= 1"),
    (dict(ccrop_warmup_epochs=-1), ">= 0"),
])
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_bam(**kwargs)


def test_a_datamodule_without_crop_guides_is_a_clear_error():
    views = random_views(8, [32, 32])
    loader = DataLoader(range(2), batch_size=None, collate_fn=lambda _: views)
    with pytest.raises(TypeError, match="DataModule with crop guides"):
        pl.Trainer(**quiet_trainer_kwargs(max_epochs=1)).fit(tiny_bam(), loader)


# ------------------------------------------------------------------------------------ training end to end
def write_images(folder, count: int = 16, side: int = 40) -> None:
    """Noise images with one bright square each (so the attention has something to find)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        image = torch.randint(0, 80, (side, side, 3), generator=generator, dtype=torch.uint8)
        y, x = torch.randint(0, side - 12, (2,), generator=generator).tolist()
        image[y : y + 12, x : x + 12] = 230
        Image.fromarray(image.numpy()).save(folder / f"{i:03d}.png")


def datamodule(root, num_workers: int = 0) -> ImageFolderDataModule:
    views = MultiCropViews(n_global=2, n_local=2, global_size=32, local_size=16, global_scale=(0.25, 1.0),
                           local_scale=(0.05, 0.25), **NO_COLOUR)
    return ImageFolderDataModule(str(root), views=views, batch_size=8, num_workers=num_workers)


class Recorder(Callback):
    """The DataModule's guides at every epoch start and the geometry of every training batch."""

    def __init__(self) -> None:
        self.guides, self.batches = {}, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.guides[trainer.current_epoch] = trainer.datamodule.crop_guides

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).append((batch.boxes.clone(), batch.index.clone()))


def spy_updates(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Record (epoch, boxes) of every box update of every ``ContrastiveCrop`` callback."""
    calls = []
    original = ContrastiveCrop.update_crop_boxes

    def update(self, pl_module, epoch):
        calls.append((epoch, original(self, pl_module, epoch).clone()))
        return calls[-1][1]

    monkeypatch.setattr(ContrastiveCrop, "update_crop_boxes", update)
    return calls


def crop_callback(trainer: pl.Trainer) -> ContrastiveCrop:
    found = [callback for callback in trainer.callbacks if isinstance(callback, ContrastiveCrop)]
    assert len(found) == 1
    return found[0]


def test_fit_updates_the_boxes_on_schedule_and_the_workers_crop_around_them(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    data = datamodule(tmp_path / "images", num_workers=1)  # one persistent worker process
    module = tiny_bam(ccrop_interval=1, ccrop_warmup_epochs=1, ccrop_box_threshold=0.9)
    updates, recorder = spy_updates(monkeypatch), Recorder()
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=4, limit_train_batches=1, callbacks=[recorder]))
    trainer.fit(module, data)

    # updates at the end of epochs 1 and 2 (not 0: warm-up; not 3: the last); guided from epoch 2
    assert [epoch for epoch, _ in updates] == [1, 2]
    assert recorder.guides[0] is None and recorder.guides[1] is None
    torch.testing.assert_close(recorder.guides[2], updates[0][1])
    torch.testing.assert_close(recorder.guides[3], updates[1][1])
    boxes = updates[1][1]
    assert boxes.shape == (16, 4) and (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert boxes[:, 2].sub(boxes[:, 0]).mean() < 0.9  # a high threshold keeps the boxes smaller than the image
    torch.testing.assert_close(crop_callback(trainer).crop_boxes, boxes)

    for epoch, guides in ((2, updates[0][1]), (3, updates[1][1])):
        for crop_boxes, index in recorder.batches[epoch]:
            guide = guides[index][:, None, :]  # (B, 1, 4) against (B, V, 4)
            pixel, guide_pixel = crop_boxes * 40, guide * 40
            for axis in (0, 1):
                low, high = pixel[..., axis], pixel[..., axis + 2]
                centre = (low + high) / 2
                pressed = (low <= 1e-4) | (high >= 40 - 1e-4)
                inside = (centre >= guide_pixel[..., axis] - 1) & (centre <= guide_pixel[..., axis + 2] + 1)
                assert (inside | pressed).all()


class LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after ``on_fit_start``, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("late_restore", [False, True])
def test_boxes_survive_a_checkpoint_and_reach_the_resumed_datamodule(tmp_path, late_restore, monkeypatch):
    write_images(tmp_path / "images")
    settings = dict(ccrop_interval=1, ccrop_warmup_epochs=0, ccrop_box_threshold=0.6)  # boxes unlike the image
    first = tiny_bam(**settings)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=2, limit_train_batches=1))
    trainer.fit(first, datamodule(tmp_path / "images"))  # an update after epoch 0 (1 is the last)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    first_crop = crop_callback(trainer)
    assert first_crop.boxes_epoch == 0 and len(set(map(tuple, first_crop.crop_boxes.tolist()))) > 1
    saved = torch.load(path, weights_only=False)["callbacks"][first_crop.state_key]
    torch.testing.assert_close(saved["boxes"], first_crop.crop_boxes)
    assert (saved["boxes_epoch"], saved["guides_epoch"]) == (0, 2)

    # resumed for one more epoch: the restored boxes reach the new DataModule before epoch 2 (guided) starts;
    # with 3 epochs, epoch 1 is no longer the last and its update is due: it is computed then (as the
    # official resume does after an update epoch)
    resumed, data, recorder = tiny_bam(**settings), datamodule(tmp_path / "images"), Recorder()
    updates = spy_updates(monkeypatch)
    strategy = LateRestore(torch.device("cpu")) if late_restore else "auto"
    second = pl.Trainer(**quiet_trainer_kwargs(max_epochs=3, limit_train_batches=1, callbacks=[recorder],
                                               strategy=strategy))
    with pytest.warns(UserWarning, match="box update of epoch 1 is missing"):
        second.fit(resumed, data, ckpt_path=path)
    torch.testing.assert_close(recorder.guides[2], first_crop.crop_boxes)  # the recorder runs before the catch-up
    assert [epoch for epoch, _ in updates] == [1]
    torch.testing.assert_close(data.crop_guides, updates[0][1])
    assert crop_callback(second).boxes_epoch == 1


# ------------------------------------------------------------------------------------------------ DDP
class RandomImages(Dataset):
    def __len__(self) -> int:
        return 7  # uneven shards over 2 processes

    def __getitem__(self, index: int):
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(index)), -1


def _boxes_rank(rank: int, world_size: int, state: dict) -> torch.Tensor:
    module = tiny_bam(ccrop_box_threshold=0.6)
    module.load_state_dict(state)
    return ContrastiveCrop(box_threshold=0.6).compute_crop_boxes(module, RandomImages(), batch_size=2, num_workers=0)


def test_each_process_boxes_its_shard_and_all_get_the_dataset_order():
    module = tiny_bam(ccrop_box_threshold=0.6)
    with torch.no_grad():  # a teacher unlike the student: the boxes must come from the teacher
        for parameter in module.teacher.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    images = torch.stack([RandomImages()[i][0] for i in range(7)])
    with torch.no_grad():
        expected = boxes_from_attention(last_block_cls_attention(module.teacher["backbone"], images), (32, 32), 0.6)
        from_student = boxes_from_attention(last_block_cls_attention(module.backbone, images), (32, 32), 0.6)
    assert not torch.equal(expected, from_student) and len(set(map(tuple, expected.tolist()))) > 1
    module.train()
    boxes = ContrastiveCrop(box_threshold=0.6).compute_crop_boxes(module, RandomImages(), batch_size=3)
    torch.testing.assert_close(boxes, expected)
    assert module.training and module.backbone.training  # the modes are restored
    for boxes in run_distributed(_boxes_rank, world_size=2, args=(module.state_dict(),)):
        torch.testing.assert_close(boxes, expected)


# ------------------------------------------------------------------------------------------ the callback
def test_bam_adds_no_second_callback_when_the_trainer_has_one():
    mine = ContrastiveCrop(alpha=0.5, interval=3)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=1, callbacks=[mine]))
    module = tiny_bam()
    module.trainer = trainer
    assert not any(isinstance(callback, ContrastiveCrop) for callback in module.configure_callbacks())
    module.trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=1))
    added = [callback for callback in module.configure_callbacks() if isinstance(callback, ContrastiveCrop)]
    assert len(added) == 1 and (added[0].alpha, added[0].interval, added[0].box_threshold) == (0.6, 40, 0.1)


def test_bam_without_contrastive_crop_adds_no_callback():
    module = tiny_bam(contrastive_crop=False)
    assert not any(isinstance(callback, ContrastiveCrop) for callback in module.configure_callbacks())


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha=0.0"), (dict(box_threshold=1.0), "box_threshold=1.0"),
    (dict(interval=0), "interval=0"), (dict(warmup_epochs=-1), "warmup_epochs=-1"),
])
def test_the_callback_refuses_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveCrop(**kwargs)


def test_the_callback_state_round_trips():
    source = ContrastiveCrop()
    source.crop_boxes, source.boxes_epoch, source.guides_epoch = torch.rand(5, 4), 40, 41
    target = ContrastiveCrop()
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.crop_boxes, source.crop_boxes)
    assert (target.boxes_epoch, target.guides_epoch) == (40, 41)


def test_the_callback_refuses_a_cnn_at_fit_setup():
    module = BAM("resnet18", projector_widths="64-64-32", top_k=8, warmup_epochs=0.0, lr=1e-3)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=1))
    with pytest.raises(ValueError, match="not a ViT"):
        ContrastiveCrop().setup(trainer, module, "fit")
