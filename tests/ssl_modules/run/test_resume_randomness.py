"""A sample's views are a pure function of (seed, epoch, index), whatever loads them."""
from __future__ import annotations

import torch
from support.resume_images import write_images
from torch.utils.data import DataLoader

from datamodules import MultiCropViews, ResumableSampler
from datamodules.datasets import MultiCropImages
from datamodules.views import (
    color_jitter_params,
    item_generator,
    random_resized_crop_params,
)


def _views() -> MultiCropViews:
    return MultiCropViews.preset("bam", global_size=16, local_size=8)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_item_generator_is_a_pure_function_of_its_three_numbers():
    draw = lambda *key: torch.rand(4, generator=item_generator(*key))
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 2, 4))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 3))
    assert not torch.equal(draw(1, 2, 3), draw(2, 2, 3))


def test_views_from_one_generator_state_are_identical_and_ignore_the_global_rng():
    views, image = _views(), _image()
    first = views(image, generator=item_generator(0, 1, 5))
    torch.manual_seed(123)  # the global RNG plays no part
    second = views(image, generator=item_generator(0, 1, 5))
    assert all(torch.equal(a, b) for a, b in zip(first.crops, second.crops))
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.flipped, second.flipped)


def test_guided_views_from_one_generator_state_are_identical():
    views, image = _views(), _image()
    guide = [0.2, 0.1, 0.7, 0.8]
    first = views(image, guide=guide, generator=item_generator(0, 0, 1))
    second = views(image, guide=guide, generator=item_generator(0, 0, 1))
    assert torch.equal(first.boxes, second.boxes)


def test_random_resized_crop_params_keep_torchvisions_algorithm():
    """Same box as torchvision's RandomResizedCrop for the same global RNG state."""
    import torchvision.transforms.v2 as T

    image = _image()
    reference = T.RandomResizedCrop(16, scale=(0.25, 1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference.make_params([image])
        torch.manual_seed(seed)
        got = random_resized_crop_params(40, 48, (0.25, 1.0), (3 / 4, 4 / 3))
        assert got == (expected["top"], expected["left"], expected["height"], expected["width"])


def test_color_jitter_params_keep_torchvisions_ranges_and_disable_zero_strengths():
    params = color_jitter_params((0.4, 0.0, 0.2, 0.1), torch.Generator().manual_seed(0))
    assert sorted(params["fn_idx"].tolist()) == [0, 1, 2, 3]
    assert 0.6 <= params["brightness_factor"] <= 1.4 and params["contrast_factor"] is None
    assert 0.8 <= params["saturation_factor"] <= 1.2 and -0.1 <= params["hue_factor"] <= 0.1


def _dataset(tmp_path) -> MultiCropImages:
    return MultiCropImages(write_images(tmp_path, 12), transform=_views(), seed=7)


def _batches(dataset, num_workers: int, epoch: int) -> list[torch.Tensor]:
    sampler = ResumableSampler(dataset, seed=7)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, sampler=sampler, batch_size=4, num_workers=num_workers,
                        collate_fn=lambda items: torch.stack([item[0].crops[0] for item in items]))
    return list(loader)


def test_views_are_the_same_for_any_number_of_workers(tmp_path):
    dataset = _dataset(tmp_path)
    serial, parallel = _batches(dataset, 0, epoch=1), _batches(dataset, 2, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_views_change_with_the_epoch(tmp_path):
    dataset = _dataset(tmp_path)
    assert not torch.equal(dataset[(0, 3)][0].crops[0], dataset[(1, 3)][0].crops[0])
    assert torch.equal(dataset[(1, 3)][0].crops[0], dataset[(1, 3)][0].crops[0])
