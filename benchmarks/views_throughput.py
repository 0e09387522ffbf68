"""Multi-crop views per second per loader worker: ``MultiCropViews`` against a PIL + torchvision-v1 pipeline.

    python benchmarks/views_throughput.py                 # every paper preset, 224/96 px crops
    python benchmarks/views_throughput.py --presets bam --seconds 5 --loader

Both pipelines run the same recipe (each preset's crops, scales, flips, jitter, grayscale, blur and
solarisation probabilities) on the same generated JPEGs (about 400 x 500 px), in this process with one
thread, as in a DataLoader worker (PyTorch gives each worker one thread). The baseline is the papers' own
kind of pipeline: PIL decoding, torchvision v1 transforms on PIL images, PIL's Gaussian blur, ToTensor and
Normalize per crop. Ours decodes with torchvision.io into uint8 tensors and works on tensors; it is timed
twice: up to uint8 crops (normalisation later, on the device: what the DataModules do) and with the
normalisation to float in the worker (the baseline's end point). Ratios > 1: ours is faster.

``--loader`` also measures a real DataLoader (2 workers) with the crops normalised on the device vs in the
workers, and the bytes each batch carries from the workers to the training process and the device.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T1
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.reading import read_image  # noqa: E402
from datamodules.synthetic import render_scene  # noqa: E402
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8  # noqa: E402
from datamodules.views import PRESETS, CropSpec, MultiCropViews  # noqa: E402


def make_jpegs(folder: Path, count: int, height: int = 400, width: int = 500) -> list[Path]:
    """Synthetic scenes cut to ``height x width`` and saved as JPEG (quality 90)."""
    paths = []
    for index in range(count):
        scene = render_scene(np.random.default_rng(index), max(height, width), 10, index % 10)
        path = folder / f"{index:03d}.jpg"
        Image.fromarray(scene.image[:height, :width]).save(path, quality=90)
        paths.append(path)
    return paths


# -- the baseline: PIL images through torchvision v1 transforms, as in the papers' code -------------------------

class PILGaussianBlur:
    """PIL's Gaussian blur with probability ``p`` and a radius uniform in ``sigma`` (DINO's)."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def v1_view(views: MultiCropViews, spec: CropSpec) -> Callable[[Image.Image], torch.Tensor]:
    """One view of ``views``' recipe as a torchvision-v1 ``Compose`` on PIL images."""
    scale = views.global_scale if spec.group == "global" else views.local_scale
    return T1.Compose([
        T1.RandomResizedCrop(spec.size, scale=scale, ratio=views.ratio, interpolation=T1.InterpolationMode.BICUBIC),
        T1.RandomHorizontalFlip(views.flip_p),
        T1.RandomApply([T1.ColorJitter(*views.jitter)], p=views.jitter_p),
        T1.RandomGrayscale(views.grayscale_p),
        PILGaussianBlur(spec.blur_p, views.blur_sigma),
        T1.RandomSolarize(views.solarize_threshold, p=spec.solarize_p),
        T1.ToTensor(),
        T1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def baseline_pipeline(views: MultiCropViews) -> Callable[[Path], list[torch.Tensor]]:
    transforms = [v1_view(views, spec) for spec in views.specs]

    def run(path: Path) -> list[torch.Tensor]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return [transform(rgb) for transform in transforms]
    return run


def ours_pipeline(views: MultiCropViews, normalize: bool) -> Callable[[Path], list[torch.Tensor]]:
    def run(path: Path) -> list[torch.Tensor]:
        crops = views(read_image(path)).crops
        return [normalize_uint8(crop) for crop in crops] if normalize else crops
    return run


# -- timing --------------------------------------------------------------------------------------------------

def images_per_second(pipeline: Callable[[Path], object], paths: list[Path], seconds: float) -> float:
    """Images per second over whole passes through ``paths``, at least ``seconds`` long."""
    pipeline(paths[0])  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        for path in paths:
            pipeline(path)
        done += len(paths)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def compare_preset(name: str, paths: list[Path], seconds: float, rounds: int) -> dict[str, float]:
    """Views per second of the three pipelines, median of ``rounds`` interleaved runs."""
    views = MultiCropViews.preset(name)
    pipelines = {"v1 PIL": baseline_pipeline(views), "ours uint8": ours_pipeline(views, normalize=False),
                 "ours float": ours_pipeline(views, normalize=True)}
    rates: dict[str, list[float]] = {key: [] for key in pipelines}
    for _ in range(rounds):  # interleaved, so a busy machine slows all of them alike
        for key, pipeline in pipelines.items():
            torch.manual_seed(0)
            random.seed(0)
            rates[key].append(images_per_second(pipeline, paths, seconds) * views.num_views)
    return {key: statistics.median(values) for key, values in rates.items()}


def loader_comparison(paths: list[Path], preset: str, batch_size: int, batches: int) -> None:
    """A real DataLoader (2 workers): uint8 crops normalised after the loader vs floats from the workers."""
    import functools

    from torch.utils.data import DataLoader

    from datamodules.datasets import MultiCropImages
    from datamodules.views import collate_views

    views = MultiCropViews.preset(preset)
    dataset = MultiCropImages(paths * (batch_size * batches // len(paths) + 1), None, views)
    for where in ("device", "worker"):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=2, drop_last=True,
                            collate_fn=functools.partial(collate_views, normalize=where == "worker"))
        iterator = iter(loader)
        batch = next(iterator)  # workers started
        start, main_seconds, count = time.perf_counter(), 0.0, 0
        for batch in iterator:
            tick = time.perf_counter()
            batch = batch.normalized()  # no-op for worker-normalised floats; the CPU cost of the device path
            main_seconds += time.perf_counter() - tick
            count += 1
            if count == batches:
                break
        elapsed = time.perf_counter() - start
        megabytes = sum(c.numel() * c.element_size() for c in next(iter(loader)).crops) / 2**20
        print(f"  normalise on {where:6s}: {count / elapsed * batch_size:7.1f} images/s through 2 workers, "
              f"{megabytes:6.1f} MiB of crops per batch of {batch_size} from the workers, "
              f"{1e3 * main_seconds / count:6.2f} ms/batch normalising in the main process (CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=16, help="distinct JPEGs cycled through")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements, median reported")
    parser.add_argument("--loader", action="store_true", help="also compare where to normalise, in a DataLoader")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(Path(folder), args.images)
        print(f"{len(paths)} JPEGs of 400 x 500 px; one thread; views per second (median of {args.rounds})")
        print(f"{'preset':18s} {'views':>5s} {'v1 PIL':>9s} {'ours uint8':>11s} {'ours float':>11s} "
              f"{'ratio uint8':>12s} {'ratio float':>12s}")
        for name in args.presets:
            rates = compare_preset(name, paths, args.seconds, args.rounds)
            views = MultiCropViews.preset(name).num_views
            base = rates["v1 PIL"]
            print(f"{name:18s} {views:5d} {base:9.1f} {rates['ours uint8']:11.1f} {rates['ours float']:11.1f} "
                  f"{rates['ours uint8'] / base:11.2f}x {rates['ours float'] / base:11.2f}x")
        if args.loader:
            print("DataLoader, preset bam (224/96 px):")
            loader_comparison(paths, "bam", batch_size=32, batches=12)


if __name__ == "__main__":
    main()
