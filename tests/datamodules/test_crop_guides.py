"""ContrastiveCrop on the data side: the guided crop, its true boxes, the shared guide table and its workers."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F
from support.dm_testdata import smooth_rgb
from PIL import Image
from support.dm_testdata import NO_COLOUR, image_tensor, reference_crop
from torch.utils.data import DataLoader

from datamodules import ImageFolderDataModule, MultiCropImages, MultiCropViews, ResizeTransform, collate_views
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.views import contrastive_crop_params

NAN_BOX = [math.nan] * 4


def centre_within(top: float, size: float, side: float, low: float, high: float) -> bool:
    """The crop's centre lies in [low, high] * side to a pixel, or the crop is pressed against the border."""
    centre = top + size / 2
    pressed = top <= 1e-6 or top + size >= side - 1e-6
    return pressed or side * low - 1 <= centre <= side * high + 1


def test_guided_crop_keeps_its_centre_in_the_box_and_spans_the_box():
    torch.manual_seed(0)
    height, width, guide = 100, 120, (0.3, 0.5, 0.6, 0.7)
    tops, lefts = [], []
    for _ in range(300):
        top, left, h, w = contrastive_crop_params(height, width, (0.05, 0.25), (3 / 4, 4 / 3), guide, alpha=0.6)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        assert 0.04 * height * width <= h * w <= 0.26 * height * width
        assert height * 0.3 - 1 <= top + h / 2 <= height * 0.6 + 1  # small crops: never pressed to the border
        assert width * 0.5 - 1 <= left + w / 2 <= width * 0.7 + 1
        tops.append((top + h // 2 - int(height * 0.3)) / (int(height * 0.6) - int(height * 0.3)))
        lefts.append((left + w // 2 - int(width * 0.5)) / (int(width * 0.7) - int(width * 0.5)))
    for u in (torch.tensor(tops), torch.tensor(lefts)):
        # Beta(0.6, 0.6) is U-shaped: more draws near the box sides than in its middle third
        assert u.min() < 0.05 and u.max() > 0.95
        assert ((u < 1 / 3) | (u > 2 / 3)).float().mean() > 0.5


def test_degenerate_box_fixes_the_position_and_large_crops_are_clamped():
    torch.manual_seed(1)
    for _ in range(20):
        top, left, h, w = contrastive_crop_params(80, 80, (0.05, 0.1), (1.0, 1.0), (0.5, 0.25, 0.5, 0.25))
        assert top == 40 - h // 2 and left == 20 - w // 2
        top, left, h, w = contrastive_crop_params(80, 80, (0.8, 1.0), (1.0, 1.0), (0.0, 0.9, 0.1, 1.0))
        assert top == 0 and left == 80 - w  # pushed in from the borders


def test_impossible_sizes_fall_back_to_a_centre_crop():
    top, left, h, w = contrastive_crop_params(10, 100, (0.9, 1.0), (1.0, 1.0), (0.0, 0.0, 0.1, 0.1))
    assert (top, left, h, w) == (0, 45, 10, 10)  # a square crop of 90% of a 10 x 100 image cannot fit


def test_guided_views_report_their_true_boxes_and_follow_the_guide():
    image = image_tensor(60, 80)
    views = MultiCropViews(n_global=2, n_local=4, global_size=32, local_size=16, global_scale=(0.3, 0.5),
                           local_scale=(0.02, 0.06), **NO_COLOUR)
    guide = torch.tensor([0.55, 0.2, 0.8, 0.45])
    torch.manual_seed(0)
    global_areas = []
    for _ in range(10):
        sample = views(image, guide=guide, alpha=0.6)
        for v, (crop, box, flipped, size) in enumerate(zip(sample.crops, sample.boxes, sample.flipped, views.sizes)):
            pixel_box = box * torch.tensor([60.0, 80.0, 60.0, 80.0])
            assert torch.allclose(pixel_box, pixel_box.round(), atol=1e-4)
            error = (crop.float() - reference_crop(image, box, size, bool(flipped))).abs()
            assert error.max() <= 2 and error.mean() < 0.5  # the recorded box is where the pixels came from
            top, left, bottom, right = pixel_box.tolist()
            assert centre_within(top, bottom - top, 60, 0.55, 0.8)
            assert centre_within(left, right - left, 80, 0.2, 0.45)
            if v < 2:
                global_areas.append(((box[2] - box[0]) * (box[3] - box[1])).item())
    # guided global crops use the scale range (global_scale[0], 1), as the official ContrastiveCrop
    assert min(global_areas) > 0.28 and max(global_areas) > 0.6


def test_no_guide_or_a_nan_guide_is_random_resized_crop():
    views = MultiCropViews.preset("bam", global_size=32, local_size=16, n_local=2)
    image = image_tensor()
    torch.manual_seed(5)
    plain = views(image)
    torch.manual_seed(5)
    nan_guided = views(image, guide=NAN_BOX)
    assert torch.equal(plain.boxes, nan_guided.boxes)
    assert all(torch.equal(a, b) for a, b in zip(plain.crops, nan_guided.crops))
    with pytest.raises(ValueError, match="alpha > 0"):
        views(image, guide=[0.1, 0.1, 0.5, 0.5], alpha=0.0)
    with pytest.raises(ValueError, match="one box"):
        views(image, guide=[0.1, 0.1, 0.5])


def write_images(folder, count: int, height: int = 40, width: int = 48) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(smooth_rgb(height, width, seed=i)).save(path)
        paths.append(path)
    return paths


def small_crop_views() -> MultiCropViews:
    """One global and three small local crops (small enough never to touch the border from a central box)."""
    return MultiCropViews(n_global=1, n_local=3, global_size=16, local_size=8, global_scale=(0.25, 1.0),
                          local_scale=(0.02, 0.04), **NO_COLOUR)


def local_centres_inside(batch, guide: list[float]) -> torch.Tensor:
    """Per local crop: whether its centre lies in ``guide`` (to a pixel)."""
    pixel = batch.pixel_boxes()[:, 1:]
    height, width = batch.image_size[0].tolist()
    cy, cx = (pixel[..., 0] + pixel[..., 2]) / 2, (pixel[..., 1] + pixel[..., 3]) / 2
    return ((cy >= height * guide[0] - 1) & (cy <= height * guide[2] + 1)
            & (cx >= width * guide[1] - 1) & (cx <= width * guide[3] + 1))


def test_persistent_workers_see_guide_updates(tmp_path):
    dataset = MultiCropImages(write_images(tmp_path, 8), transform=small_crop_views())
    dataset.set_crop_guides(None)  # before the workers start: they share the table from now on
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate_views,
                        generator=torch.Generator().manual_seed(0))
    guide = [0.55, 0.15, 0.75, 0.4]

    def epoch_inside() -> torch.Tensor:
        return torch.cat([local_centres_inside(batch, guide) for batch in loader])  # noqa: F821  (deleted after use)

    assert not epoch_inside().all()  # RandomResizedCrop: crops anywhere
    dataset.set_crop_guides(torch.tensor([guide]).repeat(8, 1), alpha=0.6)
    assert epoch_inside().all()  # the same worker processes now crop around the boxes
    dataset.set_crop_guides(None)
    assert not epoch_inside().all()
    del loader


def test_guides_set_after_the_workers_started_are_a_clear_error(tmp_path):
    dataset = MultiCropImages(write_images(tmp_path, 4), transform=small_crop_views())
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate_views)
    batches = iter(loader)  # the worker process starts here, without a guide table
    dataset.set_crop_guides(torch.tensor([[0.2, 0.2, 0.8, 0.8]]).repeat(4, 1))
    with pytest.raises(RuntimeError, match="before the training loader's workers start"):
        next(batches)
    # stop the worker now: an iterator left to the garbage collector waits 5 s for it
    getattr(batches, "_shutdown_workers", lambda: None)()


def test_datamodule_crop_guide_protocol(tmp_path):
    write_images(tmp_path / "images", 6, height=30, width=60)
    module = ImageFolderDataModule(str(tmp_path / "images"), views=small_crop_views(), batch_size=2, num_workers=0)
    module.setup("fit")
    assert module.crop_guides is None
    guide_images = module.crop_guide_dataset(16)
    assert len(guide_images) == 6
    image, label = guide_images[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == -1
    first = module.train_dataset().files[0]
    expected = F.normalize(F.resize(F.pil_to_tensor(Image.open(first)), [16, 16], antialias=True).float() / 255,
                           IMAGENET_MEAN, IMAGENET_STD)
    assert (image - expected).abs().max() < 0.05  # the whole image squashed to a square, nothing cut away

    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6]]).repeat(6, 1)
    boxes[3] = math.nan  # image 3 keeps RandomResizedCrop
    module.set_crop_guides(boxes, alpha=0.6)
    assert torch.equal(module.crop_guides.isnan(), boxes.isnan())
    torch.testing.assert_close(module.crop_guides[~boxes.isnan()], boxes[~boxes.isnan()])
    batch = next(iter(module.train_dataloader()))
    assert batch.boxes.shape == (2, 4, 4)
    module.set_crop_guides(None)
    assert module.crop_guides is None


@pytest.mark.parametrize("boxes, message", [
    (torch.zeros(6, 3), r"\(num_images, 4\)"),
    (torch.zeros(5, 4), "5 crop guides for 6 training images"),
    (torch.tensor([[0.0, 0.0, 1.2, 1.0]]).repeat(6, 1), r"normalised to \[0, 1\]"),
    (torch.tensor([[0.6, 0.0, 0.5, 1.0]]).repeat(6, 1), "y0 <= y1"),
    (torch.tensor([[0.1, math.nan, 0.5, 1.0]]).repeat(6, 1), "partly NaN"),
])
def test_bad_guides_say_what_is_wrong(tmp_path, boxes, message):
    write_images(tmp_path / "images", 6)
    module = ImageFolderDataModule(str(tmp_path / "images"), views=small_crop_views(), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=message):
        module.set_crop_guides(boxes)
    with pytest.raises(ValueError, match="alpha > 0"):
        module.set_crop_guides(None, alpha=-1.0)


def test_guides_need_the_multi_crop_transform(tmp_path):
    dataset = MultiCropImages(write_images(tmp_path, 2), transform=lambda image: image)
    with pytest.raises(TypeError, match="MultiCropViews"):
        dataset.set_crop_guides(None)


def test_resize_transform_squashes_without_cropping():
    image = torch.from_numpy(smooth_rgb(30, 90)).permute(2, 0, 1).contiguous()
    out = ResizeTransform((12, 20))(image)
    assert out.shape == (3, 12, 20) and out.dtype == torch.float32
    ramp = out[0].mean(dim=0)  # the red channel is a left-right ramp over the whole width
    assert ramp[0] < -1.5 and ramp[-1] > 1.5
    assert ResizeTransform(16)(image).shape == (3, 16, 16)
