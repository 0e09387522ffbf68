"""Reading images of every kind, and surviving unreadable files."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from support.dm_testdata import random_rgb, smooth_rgb, tiny_views, write_image
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


# ------------------------------------------------------------------ PIL decoding: no torchvision.io, same pixels

def _png_16_bit(path, array: np.ndarray):
    """A 16-bit PNG of ``array`` ``(H, W, C)`` uint16 (C = 1, 2, 3 or 4), written by hand (PIL writes 16-bit
    grayscale only)."""
    height, width, channels = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _files_of_every_kind(folder) -> list:
    """JPEGs (subsamplings, progressive, gray, CMYK, odd sizes) and PNGs (every colour type, 16-bit), GIF, WebP."""
    smooth, noisy = smooth_rgb(61, 83), random_rgb(37, 29, seed=3)
    files = [write_image(folder / f"q{q}_s{s}_p{p}.jpg", smooth, quality=q, subsampling=s, progressive=p)
             for q in (75, 95) for s in (0, 1, 2) for p in (False, True)]
    files += [write_image(folder / f"noisy_{mode}.jpg", noisy, mode, quality=90) for mode in ("RGB", "L", "CMYK")]
    files += [write_image(folder / f"{mode}.png", noisy, mode) for mode in ("RGB", "RGBA", "L", "LA", "P", "1")]
    files.append(write_image(folder / "transparent.png", noisy, "P", transparency=2))
    deep = np.random.default_rng(4).integers(0, 65536, (21, 17, 4), dtype=np.uint16)
    files += [_png_16_bit(folder / f"deep{c}.png", deep[..., :c]) for c in (1, 2, 3, 4)]
    files += [write_image(folder / "image.gif", noisy, "P"), write_image(folder / "image.webp", smooth)]
    return files


def test_no_torchvision_deprecation_warning_reading_jpeg_and_png(tmp_path, monkeypatch):
    def deprecated() -> None:  # what torchvision.io's decoders call first; no filter can silence this one
        raise AssertionError("torchvision.io's deprecated image decoding was used")
    if hasattr(pytest.importorskip("torchvision.io.image"), "_warn_deprecated"):
        monkeypatch.setattr("torchvision.io.image._warn_deprecated", deprecated)
    files = [write_image(tmp_path / "image.jpg", smooth_rgb()), write_image(tmp_path / "image.png", random_rgb()),
             write_image(tmp_path / "gray.jpg", smooth_rgb(), "L"), _png_16_bit(tmp_path / "deep.png",
                                                                                 np.ones((4, 5, 3), np.uint16))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DeprecationWarning of torchvision.io (or any other) fails here
        for path in files:
            assert read_image(path).shape[0] == 3


def test_pixels_and_layout_equal_torchvisions_decoding(tmp_path):
    """The reference is what the DataModules decoded with before: torchvision.io (libjpeg-turbo, libpng)."""
    io = pytest.importorskip("torchvision.io")
    for path in _files_of_every_kind(tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                expected = io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
            except RuntimeError as error:  # pragma: no cover - torchvision without its image extension
                pytest.skip(f"torchvision cannot decode images here: {error}")
        if expected.dtype == torch.uint16:
            expected = (expected.int() >> 8).to(torch.uint8)  # to_dtype(uint8, scale=True)
        image = read_image(path)
        assert image.dtype == torch.uint8 and image.shape == expected.shape, path.name
        assert torch.equal(image, expected), f"{path.name}: max difference {(image.int() - expected.int()).abs().max()}"
        assert image.stride() == (1, 3 * image.shape[2], 3), path.name  # (3, H, W) over (H, W, 3) memory, as before


def test_pixels_equal_pils_conversion_where_torchvision_did_the_same(tmp_path):
    """A reference that outlives torchvision.io: PIL's RGB conversion (CMYK and 16-bit PNGs excepted, whose
    torchvision conversions differ from PIL's and are kept)."""
    for path in _files_of_every_kind(tmp_path):
        with Image.open(path) as image:
            if image.mode in ("CMYK", "I", "I;16") or image.format == "PNG" and "deep" in path.name:
                continue
            expected = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(read_image(path), expected), path.name


def test_cmyk_jpegs_and_16_bit_pngs_convert_as_torchvision_did(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [10, 200, 90, 40], [255, 255, 255, 255]]], np.uint8)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=100)
    with Image.open(path) as image:
        stored = 255 - np.asarray(image).astype(np.int64)  # Adobe CMYK is stored inverted
    expected = stored[..., :3] * stored[..., 3:] // 255
    assert torch.equal(read_image(path).permute(1, 2, 0), torch.from_numpy(expected).to(torch.uint8))
    deep = np.array([[[0, 255, 256], [511, 65280, 65535]]], np.uint16).reshape(1, 2, 3)
    image = read_image(_png_16_bit(tmp_path / "deep.png", deep))
    assert image.permute(1, 2, 0).tolist() == [[[0, 0, 1], [1, 255, 255]]]  # the high byte, not rounded
