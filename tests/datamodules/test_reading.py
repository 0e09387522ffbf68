"""Reading images of every kind, and surviving unreadable files."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from support.dm_testdata import random_rgb, tiny_views, write_image
from PIL import Image

from datamodules import CorruptImageWarning, ImageFolderDataModule, read_image, read_mask
from datamodules.datasets import ImageFiles
from datamodules.reading import MaskFormatError, list_images


@pytest.mark.parametrize("suffix, mode", [
    (".png", "L"), (".jpg", "L"), (".png", "RGBA"), (".png", "LA"), (".png", "P"), (".jpg", "CMYK"),
    (".bmp", "RGB"), (".tif", "RGB"), (".webp", "RGB"), (".gif", "P"), (".jpg", "RGB"),
])
def test_every_colour_mode_becomes_rgb_uint8(tmp_path, suffix, mode):
    array = random_rgb(30, 40)
    path = write_image(tmp_path / f"image{suffix}", array, mode)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    with Image.open(path) as reference:
        expected = torch.from_numpy(np.asarray(reference.convert("RGB")).copy()).permute(2, 0, 1).int()
    tolerance = 3 if mode == "CMYK" else 0  # colour conversion rounding differs between libjpeg and PIL
    assert (image.int() - expected).abs().max() <= tolerance
    if mode in ("L", "LA"):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, suffix):
    levels = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint16) * 257  # 8-bit levels stretched to 16
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(levels).save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert (image[0].int() - torch.from_numpy(levels // 257).int()).abs().max() <= 1


def test_palette_masks_give_indices_and_colour_masks_are_refused(tmp_path):
    indices = np.zeros((20, 30), np.uint8)
    indices[5:10, 5:20] = 3
    indices[0, :] = 255
    mask = Image.fromarray(indices)
    mask.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 3 % 256, i * 5 % 256)])
    mask.save(tmp_path / "mask.png")
    assert torch.equal(read_mask(tmp_path / "mask.png"), torch.from_numpy(indices))
    write_image(tmp_path / "rgb.png", random_rgb(20, 30))
    with pytest.raises(MaskFormatError, match="palette"):
        read_mask(tmp_path / "rgb.png")


def bad_files(folder):
    """A truncated JPEG, a text file named .jpg, an empty PNG; returns their paths."""
    good = write_image(folder / "good_source.jpg", random_rgb(40, 50)).read_bytes()
    (folder / "good_source.jpg").unlink()
    truncated, garbage, empty = folder / "b_truncated.jpg", folder / "c_garbage.jpg", folder / "d_empty.png"
    truncated.write_bytes(good[: len(good) // 3])
    garbage.write_bytes(b"this is not an image" * 10)
    empty.write_bytes(b"")
    return [truncated, garbage, empty]


def test_unreadable_files_are_skipped_named_and_counted(tmp_path):
    write_image(tmp_path / "a_good.jpg", random_rgb())
    bad = bad_files(tmp_path)
    write_image(tmp_path / "e_good.png", random_rgb(seed=1))
    dataset = ImageFiles(list_images(tmp_path))
    with pytest.warns(CorruptImageWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    named = "\n".join(str(w.message) for w in caught)
    assert all(str(path) in named for path in bad)
    assert all(image.shape == (3, 40, 50) for image, _ in items)
    assert dataset.skipped == 1 + 2 + 3  # each bad file is tried again by the items before it hit the next good one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file: no second warning
        dataset[1]


def test_unreadable_files_never_stop_an_epoch_with_workers(tmp_path):
    for i in range(5):
        write_image(tmp_path / f"good_{i}.jpg", random_rgb(seed=i))
    bad_files(tmp_path)
    module = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=2, views=tiny_views(), shuffle=False)
    module.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(module.train_dataloader())
    assert len(batches) == 2 and all(b.crops[0].shape == (4, 3, 32, 32) for b in batches)
    assert module.skipped_images == 6  # counted across the two worker processes (see the test above)


def test_a_transform_error_is_not_taken_for_a_bad_file(tmp_path):
    write_image(tmp_path / "good.jpg", random_rgb())

    def broken(image):
        raise RuntimeError("bug in a transform")
    with pytest.raises(RuntimeError, match="bug in a transform"):
        ImageFiles([tmp_path / "good.jpg"], transform=broken)[0]


def test_a_data_set_of_only_bad_files_fails_clearly(tmp_path):
    bad = bad_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="could not be read"):
            ImageFiles(bad)[0]
