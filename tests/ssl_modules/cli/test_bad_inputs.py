"""Bad inputs get errors that name the problem and the fix, before any work is lost."""
from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from support.common import TINY_VIT, quiet_trainer_kwargs
from PIL import Image

from datamodules import (COCODataModule, ImageNetDataModule, LayoutError, MultiCropViews, SceneConfig,
                         SyntheticScenesDataModule)
from ssl_modules.methods.bam import BAM
from ssl_modules.methods.base import SSLModule
from ssl_modules.methods.vicregl import VICRegL


def scenes(tmp_path, **overrides) -> SyntheticScenesDataModule:
    views = MultiCropViews(n_global=2, n_local=0, global_size=32, jitter_p=0.0, grayscale_p=0.0,
                           global_blur_p=[0.0], global_solarize_p=[0.0])
    kwargs = dict(root=str(tmp_path / "scenes"), scene=SceneConfig(image_size=48, num_train=16, num_val=8),
                  eval_size=32, batch_size=4, num_workers=0, views=views)
    return SyntheticScenesDataModule(**{**kwargs, **overrides})


def tiny_vicregl(**kwargs) -> VICRegL:
    return VICRegL("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), expander_widths="32-32-32",
                   projector_widths="16-16-16", num_matches=(2, 1), warmup_epochs=0, **kwargs)


def test_a_broken_coco_json_names_the_file(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]})[:20])
    with pytest.raises(LayoutError, match="instances_train2017.json is not valid JSON") as error:
        COCODataModule(str(tmp_path), image_filter="listed").setup()
    assert str(path) in str(error.value)


def test_an_imagenet_root_without_val_trains_when_no_probe_needs_it(tmp_path):
    for wnid in ("n01", "n02"):
        for i in range(4):
            folder = tmp_path / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(colour).save(folder / f"{i}.JPEG")
    data = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, eval_size=32,
                              views=MultiCropViews(n_global=2, n_local=0, global_size=32))
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=1))
    trainer.fit(tiny_vicregl(), datamodule=data)
    assert trainer.global_step == 1


def test_uint8_crops_are_normalised_by_the_module_with_its_mean_and_std():
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), mean=(0.5, 0.5, 0.5),
                       std=(0.25, 0.25, 0.25))
    crops = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    out = module.normalize_crop(crops)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], (torch.tensor([0.0, 128.0, 255.0]) / 255 - 0.5) / 0.25)
    floats = torch.randn(1, 3, 2, 2)
    assert module.normalize_crop(floats) is floats


def test_integer_crops_other_than_uint8_are_refused_with_the_fix():
    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    with pytest.raises(TypeError, match=r"torch.int16.*uint8"):
        module.normalize_crop(torch.zeros(1, 3, 2, 2, dtype=torch.int16))


def test_the_datamodules_loader_passed_to_fit_directly_trains(tmp_path):
    data = scenes(tmp_path)
    data.setup("fit")
    assert data.train_dataloader().__iter__().__next__().crops[0].dtype == torch.uint8
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=2))
    trainer.fit(tiny_vicregl(), train_dataloaders=data.train_dataloader())
    assert trainer.global_step == 2


def test_bam_top_k_above_the_target_columns_fails_before_the_first_forward(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(BAM, "project", lambda *args: calls.append(1))
    module = BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="32-32-16", top_k=9,
                 teacher=False)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=1))
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds the 8 target columns.*at most 8"):
        trainer.fit(module, datamodule=scenes(tmp_path))
    assert calls == []


def _vicregl_loss_of_images(images: torch.Tensor, first_index: int) -> float:
    from datamodules import Views

    torch.manual_seed(0)
    module = tiny_vicregl()
    count = images.shape[0]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.8, 0.8]]).expand(count, 2, 4)
    views = Views([images, images.flip(-1)], boxes.clone(), torch.tensor([[False, True]] * count),
                  torch.tensor([[32.0, 32.0]] * count), torch.full((count,), -1),
                  torch.arange(first_index, first_index + count))
    module.log_terms = lambda *a, **k: None
    return float(module.training_step(views, 0)["loss"])


def _two_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _vicregl_loss_with_one_image_per_process(rank: int, world_size: int) -> float:
    from ssl_modules.run import distributed

    assert distributed.world_size() == 2
    return _vicregl_loss_of_images(_two_images()[rank:rank + 1], rank)


@pytest.mark.slow
def test_vicregl_accepts_one_image_per_process_when_the_global_batch_is_two():
    from support.distributed_utils import run_distributed

    losses = run_distributed(_vicregl_loss_with_one_image_per_process, world_size=2)
    one_process = _vicregl_loss_of_images(_two_images(), 0)
    assert np.mean(losses) == pytest.approx(one_process, rel=1e-5)  # the two images in one process
