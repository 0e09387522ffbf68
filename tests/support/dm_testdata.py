"""Shared data of the datamodules tests: one tiny synthetic data set (all three layouts), generated once; a
smooth test image and a reference crop cut by slicing."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as nnf

import numpy as np
from PIL import Image

from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule

NUM_CLASSES = 4
NUM_TRAIN = 40
NUM_VAL = 16


def tiny_views(**overrides) -> MultiCropViews:
    """Two 32 px global and two 16 px local crops: BAM's recipe at test sizes."""
    return MultiCropViews.preset("bam", **{"global_size": 32, "local_size": 16, "n_local": 2, **overrides})


def synthetic_module(root: Path, **overrides) -> SyntheticScenesDataModule:
    """A SyntheticScenesDataModule of 48 px images, 4 classes, 40 + 16 images, 2 loader workers."""
    scene = SceneConfig(image_size=48, num_classes=NUM_CLASSES, num_train=NUM_TRAIN, num_val=NUM_VAL)
    kwargs = dict(root=str(root), scene=scene, generation_workers=1, batch_size=8, num_workers=2, views=tiny_views(),
                  eval_size=32)
    kwargs.update(overrides)
    return SyntheticScenesDataModule(**kwargs)


@functools.cache
def shared_root() -> Path:
    """Cache folder of the shared data set, generated once per test process (read-only for tests)."""
    root = Path(tempfile.mkdtemp(prefix="ssl_modules_dm_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    synthetic_module(root).prepare_data()
    return root


def shared_scenes(**overrides) -> SyntheticScenesDataModule:
    """A DataModule over the shared data set (fresh object, generated files shared)."""
    return synthetic_module(shared_root(), **overrides)


def copy_voc(scenes: SyntheticScenesDataModule, target: Path) -> Path:
    """A writable copy of the VOC2012 folder at ``target/VOCdevkit/VOC2012``."""
    voc = target / "VOCdevkit" / "VOC2012"
    shutil.copytree(scenes.voc_root / "VOC2012", voc)
    return voc


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **options) -> Path:
    """Save ``array`` as an image file (format from the suffix), converted to ``mode`` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, **options)
    return path


def random_rgb(height: int = 40, width: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth, left-right asymmetric image (so flips and crop offsets are visible after resizing)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 100 * np.sin(x / width * rng.uniform(2, 5) + y / height * rng.uniform(1, 3) + rng.uniform(0, 6))
                for _ in range(3)]
    channels[0] = 255 * x / width  # a ramp: a flipped crop cannot pass for an unflipped one
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,), local_blur_p=(0.0,),
                 global_solarize_p=(0.0,), local_solarize_p=(0.0,))


def image_tensor(height: int = 60, width: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(smooth_rgb(height, width, seed)).permute(2, 0, 1).contiguous()


def reference_crop(image: torch.Tensor, box: torch.Tensor, size: int, flipped: bool) -> torch.Tensor:
    """Cut the box out by slicing, resize with torch's own bicubic (antialiased), flip if flagged."""
    height, width = image.shape[-2:]
    top, left, bottom, right = (round(v) for v in (box * torch.tensor([height, width, height, width])).tolist())
    region = image[:, top:bottom, left:right].float()[None]
    resized = nnf.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    resized = resized.round().clamp(0, 255)
    return resized.flip(-1) if flipped else resized
