"""MultiCropViews: geometry against pixels, presets, colour operations, validation, collation."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F
from support.dm_testdata import NO_COLOUR, image_tensor, reference_crop, smooth_rgb

from datamodules import MultiCropViews, Views, ViewSample, collate_views
from datamodules import colour
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, SegmentationEvalTransform

def test_boxes_and_flips_match_the_pixels():
    image = image_tensor()
    views = MultiCropViews(n_global=2, n_local=4, global_size=32, local_size=16, **NO_COLOUR)
    torch.manual_seed(0)
    seen_flips = set()
    for _ in range(8):
        sample = views(image)
        assert sample.image_size.tolist() == [60.0, 80.0]
        for crop, box, flipped, size in zip(sample.crops, sample.boxes, sample.flipped, views.sizes):
            pixel_box = box * torch.tensor([60.0, 80.0, 60.0, 80.0])
            assert torch.allclose(pixel_box, pixel_box.round(), atol=1e-4)  # integer pixel boxes
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            expected = reference_crop(image, box, size, bool(flipped))
            wrong_flip = reference_crop(image, box, size, not bool(flipped))
            error = (crop.float() - expected).abs()
            assert error.max() <= 2 and error.mean() < 0.5
            assert (crop.float() - wrong_flip).abs().mean() > 5 * max(error.mean().item(), 0.1)
            seen_flips.add(bool(flipped))
    assert seen_flips == {True, False}


def test_crop_areas_follow_each_group_scale_range():
    views = MultiCropViews(n_global=2, n_local=6, global_size=16, local_size=8, global_scale=(0.4, 1.0),
                           local_scale=(0.05, 0.2), **NO_COLOUR)
    torch.manual_seed(1)
    image = image_tensor(100, 100)
    for _ in range(10):
        boxes = views(image).boxes
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert ((areas[:2] > 0.38) & (areas[:2] <= 1.0)).all()
        assert ((areas[2:] > 0.04) & (areas[2:] < 0.22)).all()  # rounding of integer boxes


def test_image_smaller_than_the_crop_is_upsampled():
    views = MultiCropViews(global_size=32, **NO_COLOUR)
    sample = views(image_tensor(10, 12))
    assert [tuple(c.shape) for c in sample.crops] == [(3, 32, 32), (3, 32, 32)]
    assert sample.image_size.tolist() == [10.0, 12.0]


PAPER_RECIPES = {
    # name: (sizes, scales per view, jitter, blur per view, solarise per view)
    "cribo": ([224, 224], [(0.25, 1.0)] * 2, (0.4, 0.4, 0.2, 0.1), [1.0, 0.1], [0.0, 0.2]),
    "bam": ([224] * 2 + [96] * 6, [(0.25, 1.0)] * 2 + [(0.05, 0.25)] * 6, (0.4, 0.4, 0.4, 0.1),
            [1.0, 0.1] + [0.5] * 6, [0.0, 0.2] + [0.0] * 6),
    "vicregl_resnet": ([224, 224], [(0.08, 1.0)] * 2, (0.4, 0.4, 0.2, 0.1), [1.0, 0.1], [0.0, 0.2]),
    "vicregl_convnext": ([224] * 2 + [96] * 6, [(0.4, 1.0)] * 2 + [(0.08, 0.4)] * 6, (0.4, 0.4, 0.2, 0.1),
                         [1.0, 0.1] * 4, [0.0, 0.2] * 4),
}


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_presets_match_the_papers(name):
    sizes, scales, jitter, blur, solarize = PAPER_RECIPES[name]
    views = MultiCropViews.preset(name)
    assert views.sizes == sizes
    assert [spec.scale for spec in views.specs] == scales
    assert [spec.blur_p for spec in views.specs] == blur
    assert [spec.solarize_p for spec in views.specs] == solarize
    assert views.jitter == jitter and views.jitter_p == 0.8 and views.grayscale_p == 0.2
    assert views.interpolation == "bicubic" and views.flip_p == 0.5 and views.ratio == (3 / 4, 4 / 3)
    assert views.blur_sigma == (0.1, 2.0) and views.solarize_threshold == 128


def test_preset_overrides_keep_the_alternation():
    views = MultiCropViews.preset("vicregl_convnext", n_local=3, global_size=32, local_size=16)
    assert views.sizes == [32, 32, 16, 16, 16]
    assert [spec.blur_p for spec in views.specs] == [1.0, 0.1, 1.0, 0.1, 1.0]
    with pytest.raises(ValueError, match="unknown views preset"):
        MultiCropViews.preset("dino")


def test_per_view_probabilities_reach_each_view(monkeypatch):
    blurred, solarised = [], []
    monkeypatch.setattr(colour, "gaussian_blur", lambda x, sigma: blurred.append(x.shape[-1]) or x)
    monkeypatch.setattr(colour, "solarize", lambda x, t: solarised.append(x.shape[-1]) or x)
    views = MultiCropViews(n_global=2, n_local=2, global_size=24, local_size=12, jitter_p=0.0, grayscale_p=0.0,
                           global_blur_p=(1.0, 0.0), local_blur_p=(0.0, 1.0), global_solarize_p=(0.0, 1.0),
                           local_solarize_p=(0.0,))
    for _ in range(5):
        views(image_tensor())
    assert blurred == [24, 12] * 5  # global view 0 and local view 1
    assert solarised == [24] * 5  # global view 1


def test_full_colour_pipeline_keeps_uint8_and_grayscale_is_gray():
    views = MultiCropViews(global_size=24, jitter_p=1.0, grayscale_p=1.0, global_blur_p=(1.0,),
                           global_solarize_p=(1.0,))
    for crop in views(image_tensor()).crops:
        assert crop.dtype == torch.uint8 and crop.shape == (3, 24, 24)
        assert torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])


def test_same_seed_same_views():
    views = MultiCropViews.preset("bam", global_size=32, local_size=16)
    image = image_tensor()
    torch.manual_seed(3)
    first = views(image)
    torch.manual_seed(3)
    second = views(image)
    assert all(torch.equal(a, b) for a, b in zip(first.crops, second.crops))
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.flipped, second.flipped)


@pytest.mark.parametrize("factor", [-0.5, -0.23, 0.05, 0.31, 0.5])
def test_fast_hue_equals_torchvision(factor):
    image = torch.rand(3, 20, 30)
    image[:, 0, :5] = 0.5  # gray pixels (zero chroma)
    assert torch.allclose(colour.adjust_hue(image, factor), F.adjust_hue(image, factor), atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_separable_blur_equals_torchvision(sigma):
    image = torch.rand(3, 20, 30)
    kernel = 2 * math.ceil(3 * sigma) + 1
    assert torch.allclose(colour.gaussian_blur(image, sigma), F.gaussian_blur(image, [kernel] * 2, [sigma] * 2),
                          atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_scale=(0.0, 1.0)), r"in \(0, 1\]"),
    (dict(local_scale=(0.2, 1.5)), r"in \(0, 1\]"),
    (dict(global_scale=(0.8, 0.3)), "swap them"),
    (dict(global_scale=(0.5,)), "pair"),
    (dict(n_global=0), "n_global >= 1"),
    (dict(n_local=-1), "use 0"),
    (dict(global_size=0), "at least 1 pixel"),
    (dict(local_size=-3), "at least 1 pixel"),
    (dict(ratio=(1.5, 0.5)), "0 < min <= max"),
    (dict(flip_p=1.5), "not a probability"),
    (dict(global_blur_p=()), "at least one probability"),
    (dict(local_solarize_p=(0.1, 2.0)), r"local_solarize_p\[1\]"),
    (dict(jitter=(0.4, 0.4, 0.2, 0.7)), "hue <= 0.5"),
    (dict(blur_sigma=(0.0, 2.0)), "0 < min"),
    (dict(interpolation="lanczos"), "bicubic"),
])
def test_impossible_hyper_parameters_say_how_to_fix_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropViews(**kwargs)


def test_non_uint8_input_is_refused():
    with pytest.raises(TypeError, match="uint8 RGB"):
        MultiCropViews(global_size=8)(torch.rand(3, 20, 20))


def test_collate_builds_the_views_batch_and_normalises_like_torchvision():
    views = MultiCropViews.preset("bam", global_size=32, local_size=16, n_local=3)
    batch = [(views(image_tensor(seed=i)), label, index) for i, (label, index) in enumerate([(2, 5), (-1, 9)])]
    out = collate_views(batch)
    assert isinstance(out, Views) and out.num_views == 5 and out.batch_size == 2
    assert [tuple(c.shape) for c in out.crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert out.crops[0].dtype == torch.uint8
    assert out.boxes.shape == (2, 5, 4) and out.boxes.dtype == torch.float32
    assert out.flipped.shape == (2, 5) and out.flipped.dtype == torch.bool
    assert out.image_size.tolist() == [[60.0, 80.0]] * 2
    assert out.label.tolist() == [2, -1] and out.index.tolist() == [5, 9] and out.index.dtype == torch.long
    assert torch.allclose(out.pixel_boxes()[..., 2], out.boxes[..., 2] * 60)
    normalised = out.normalized()
    expected = F.normalize(out.crops[0].float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert normalised.crops[0].dtype == torch.float32
    assert torch.allclose(normalised.crops[0], expected, atol=1e-5)
    in_worker = collate_views(batch, normalize=True)
    assert torch.allclose(in_worker.crops[3], normalised.crops[3], atol=1e-5)
    assert in_worker.normalized().crops[0] is in_worker.crops[0]  # floats are left alone


def test_eval_transforms():
    image = torch.from_numpy(smooth_rgb(60, 90)).permute(2, 0, 1).contiguous()
    out = EvalTransform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and EvalTransform(32).resize_size == 37
    mask = torch.zeros(60, 90, dtype=torch.uint8)
    mask[:, 45:] = 7
    mask[:, 44:46] = 255
    image_out, mask_out = SegmentationEvalTransform(30)(image, mask)
    assert image_out.shape == (3, 30, 30) and mask_out.shape == (30, 30) and mask_out.dtype == torch.long
    assert set(mask_out.unique().tolist()) <= {0, 7, 255}  # nearest: no blended labels
    assert (mask_out[:, :12] == 0).all() and (mask_out[:, 18:] == 7).all()  # centre crop of the 45 px mark
    assert isinstance(ViewSample([], torch.zeros(0, 4), torch.zeros(0), torch.zeros(2)), tuple)


# ------------------------------------------------------------------------------------------ Views.select

def _numbered_views(batch: int = 4, views: int = 3) -> Views:
    """A batch whose every field tells which image (and crop) it belongs to."""
    crops = [torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 4, 4) + 10 * v
             for v in range(views)]
    boxes = torch.arange(batch * views * 4, dtype=torch.float32).view(batch, views, 4)
    flipped = (torch.arange(batch * views) % 2 == 0).view(batch, views)
    return Views(crops, boxes, flipped, torch.arange(batch * 2, dtype=torch.float32).view(batch, 2),
                 torch.arange(batch), torch.arange(batch) + 100)


def test_select_cuts_every_field_to_the_chosen_images_and_crops():
    views = _numbered_views()
    sub = views.select([3, 1], views=[0, 2])
    assert sub.batch_size == 2 and sub.num_views == 2
    assert [c[:, 0, 0, 0].tolist() for c in sub.crops] == [[3.0, 1.0], [23.0, 21.0]]
    torch.testing.assert_close(sub.boxes, views.boxes[[3, 1]][:, [0, 2]])
    assert torch.equal(sub.flipped, views.flipped[[3, 1]][:, [0, 2]])
    assert sub.label.tolist() == [3, 1] and sub.index.tolist() == [103, 101]
    assert sub.image_size.tolist() == [[6.0, 7.0], [2.0, 3.0]]


def test_select_of_one_image_keeps_the_batch_dimension_and_slices_work():
    views = _numbered_views()
    one = views.select(-1)
    assert one.batch_size == 1 and one.index.tolist() == [103] and one.crops[0].shape == (1, 3, 4, 4)
    head = views.select(slice(0, 2), views=slice(0, 2))
    assert head.index.tolist() == [100, 101] and head.boxes.shape == (2, 2, 4)


def test_select_out_of_range_is_a_clear_error():
    views = _numbered_views()
    with pytest.raises(IndexError, match="4 images"):
        views.select(4)
    with pytest.raises(IndexError, match="3 crops"):
        views.select(0, views=[3])
