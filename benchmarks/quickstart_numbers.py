"""The numbers of the quickstart backbone, at full float precision, to check that a refactor changes none.

Run it on the tree before a change and on the tree after it, with the same checkpoint, and compare::

    # once: a short quickstart run (fixed seed, built-in synthetic scenes), its checkpoint in /tmp/qs/
    PYTHONPATH=/tmp/before python benchmarks/quickstart_numbers.py --train /tmp/qs
    # the numbers of each tree (PYTHONPATH names the tree; the script prints ssl_modules.__file__)
    PYTHONPATH=/tmp/before python benchmarks/quickstart_numbers.py --ckpt /tmp/qs/quickstart.ckpt \\
        --json /tmp/qs/before.json
    PYTHONPATH=/work/main python benchmarks/quickstart_numbers.py --ckpt /tmp/qs/quickstart.ckpt \\
        --json /tmp/qs/after.json
    python benchmarks/quickstart_numbers.py --compare /tmp/qs/before.json /tmp/qs/after.json

What it measures (only through the public API: ``ssl_modules``, ``callbacks``, ``datamodules`` and
``ssl_modules.evaluation.evaluate``):

- ``probes``: every online probe of ``examples/configs/quickstart.yaml`` through ``Trainer.validate`` on the
  checkpoint (the linear head trained during the run is restored from it);
- ``evaluate``: the protocols ``knn``, ``linear``, ``voc-linear`` and ``hummingbird`` (default presets) on
  the same synthetic scenes, with settings shrunk to the model's 48-px images and a budget of about a minute.

The run is on the CPU with a fixed number of torch threads (``--threads``, default 1), since float sums can
depend on it. ``--compare`` exits 1 when a number differs or is missing on one side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CHECKPOINT_NAME = "quickstart.ckpt"
PROBE_CLASSES = ("OnlineLinearProbe", "KNNProbe", "VOCSegmentationProbe", "DenseRetrievalProbe")
PROTOCOLS = ("knn", "linear", "voc-linear", "hummingbird")
# evaluate's protocols shrunk to the quickstart's 48-px scenes and a CPU minute (the presets are the defaults)
EVALUATE_OVERRIDES: dict[str, dict[str, Any]] = {
    "knn": {"image_size": 48, "ks": (10, 20)},
    "linear": {"image_size": 48, "epochs": 3, "batch_size": 256, "base_lr": 0.05},
    "voc-linear": {"crop_size": 48, "stride": 48, "iterations": 300, "batch_size": 16},
    "hummingbird": {"input_size": 48, "memory_size": 100_000, "augmentation_epochs": 1},
}


# ------------------------------------------------------------------------------------------- the config
def repository_root() -> Path:
    """The root of the tree whose ``ssl_modules`` is imported (the one ``PYTHONPATH`` names)."""
    import ssl_modules

    return Path(ssl_modules.__file__).resolve().parents[1]


def default_config() -> Path:
    """The quickstart config of the imported tree."""
    return repository_root() / "examples" / "configs" / "quickstart.yaml"


def config_arguments(config: Path, data_root: Path, run_dir: Path, extra: list[str]) -> list[str]:
    """LightningCLI arguments: the config, its data in ``data_root``, no loader workers, no progress bar."""
    return ["--config", str(config), "--data.init_args.root", str(data_root),
            "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", *extra]


def build_run(arguments: list[str]) -> Any:
    """Lightning's own ``LightningCLI`` (no subcommand, nothing run): the model, data and trainer of the
    config, seeded by its ``seed_everything``."""
    from lightning.pytorch.cli import LightningCLI

    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns about arguments beside ``args``
    try:
        return LightningCLI(args=arguments, run=False, save_config_callback=None,
                            parser_kwargs={"default_env": False})
    finally:
        sys.argv = saved


# --------------------------------------------------------------------------------------------- training
def train(config: Path, out: Path, epochs: int, extra: list[str]) -> Path:
    """A short quickstart run (``epochs`` epochs, the config's seed) into ``out``; returns its checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    arguments = config_arguments(config, out / "data", out / "run",
                                 ["--trainer.max_epochs", str(epochs), "--trainer.enable_checkpointing", "false",
                                  *extra])
    run = build_run(arguments)
    started = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    checkpoint = out / CHECKPOINT_NAME
    run.trainer.save_checkpoint(checkpoint)
    (out / "train_arguments.json").write_text(json.dumps(arguments, indent=2))
    print(f"trained {run.trainer.global_step} steps in {time.perf_counter() - started:.1f} s -> {checkpoint}")
    return checkpoint


# ----------------------------------------------------------------------------------------------- probes
def probe_values(run: Any, checkpoint: Path) -> dict[str, float]:
    """Every probe's metrics of ``Trainer.validate`` on ``checkpoint`` (``probe/<name>_<metric>`` -> value)."""
    probes = [c for c in run.trainer.callbacks if type(c).__name__ in PROBE_CLASSES]
    missing = set(PROBE_CLASSES) - {type(p).__name__ for p in probes}
    if missing:
        raise SystemExit(f"the config lacks the probe(s) {sorted(missing)}")
    run.trainer.validate(run.model, datamodule=run.datamodule, ckpt_path=str(checkpoint), verbose=False)
    values: dict[str, float] = {}
    for probe in probes:
        if probe.failures:
            raise SystemExit(f"{type(probe).__name__} failed: {probe.failures}")
        values.update({probe.metric_name(metric): float(value) for metric, value in probe.last_metrics.items()})
    return values


# --------------------------------------------------------------------------------------------- evaluate
def evaluate_values(checkpoint: Path, data: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """``evaluate``'s metrics of every protocol (``<protocol>/<metric>`` -> value) and, per protocol, the
    settings used and the trivial floors."""
    from ssl_modules.evaluation import evaluate

    report = evaluate(str(checkpoint), PROTOCOLS, imagenet=str(data.imagenet_root), voc=str(data.voc_root),
                      voc_classes=int(data.num_seg_classes), overrides=EVALUATE_OVERRIDES, device="cpu",
                      batch_size=64, show_progress=False, trust_checkpoint=True)
    values: dict[str, float] = {}
    settings: dict[str, Any] = {}
    for result in report.results:
        values.update({f"{result.protocol}/{metric}": float(v) for metric, v in result.metrics.items()})
        settings[result.protocol] = {"preset": result.preset, **result.settings, "floors": result.floors}
    return values, settings


# ----------------------------------------------------------------------------- the README's evaluate table
# the README's command: the presets at the model's 32 px, the linear head on un-augmented features
README_PROTOCOLS = ("knn", "linear", "hummingbird")
README_OVERRIDES: dict[str, dict[str, Any]] = {"linear": {"augment": False}}
QUICKSTART_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 96, "num_heads": 3}


def readme_evaluation(backbone: Path, data_root: Path) -> dict[str, Any]:
    """``evaluate`` as the README runs it on the trained backbone and on the two baselines (a randomly
    initialised ViT of the quickstart's shape, drawn after ``torch.manual_seed(0)``; raw pixels in 8-px cells at
    32 px): per model, the metrics, the seconds and the protocol cards."""
    from ssl_modules import Backbone
    from ssl_modules.evaluation import evaluate
    from ssl_modules.methods.baselines import RawPixels

    torch.manual_seed(0)
    random_vit = Backbone("vit_tiny_patch16_224", **QUICKSTART_VIT)

    data = next(data_root.glob("scenes-48px-6c-4000+500-*"))
    common = dict(imagenet=str(data / "imagenet"), voc=str(data / "voc"), voc_classes=7,
                  overrides=README_OVERRIDES, show_progress=False, num_workers=2)
    models = {"trained": (str(backbone), {}), "random init": (random_vit, {}),
              "raw pixels": (RawPixels(patch_size=8), {"image_size": 32})}
    numbers: dict[str, Any] = {}
    for name, (model, extra) in models.items():
        started = time.perf_counter()
        report = evaluate(model, README_PROTOCOLS, **common, **extra)
        numbers[name] = {"seconds": time.perf_counter() - started,
                         "metrics": {f"{r.protocol}/{m}": v for r in report.results for m, v in r.metrics.items()},
                         "floors": {r.protocol: r.floors for r in report.results},
                         "cards": {r.protocol: r.card for r in report.results}}
        print(f"{name:<12} {numbers[name]['seconds']:6.1f} s  " + "  ".join(
            f"{k} {v:.3f}" for k, v in numbers[name]["metrics"].items() if k.endswith(("k20", "top1", "/miou"))))
    return numbers


# -------------------------------------------------------------------------------------------- measuring
def measure(checkpoint: Path, config: Path, data_root: Path) -> dict[str, Any]:
    """Every number of the checkpoint, with what produced it."""
    import ssl_modules

    with tempfile.TemporaryDirectory(prefix="quickstart_numbers_") as run_dir:
        run = build_run(config_arguments(config, data_root, Path(run_dir), []))
        started = time.perf_counter()
        probes = probe_values(run, checkpoint)
        probe_seconds = time.perf_counter() - started
        evaluated, settings = evaluate_values(checkpoint, run.datamodule)
    return {"ssl_modules": ssl_modules.__file__, "checkpoint": str(checkpoint), "config": str(config),
            "data_root": str(data_root), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "probe_seconds": probe_seconds, "evaluate_seconds": time.perf_counter() - started - probe_seconds,
            "probes": probes, "evaluate": evaluated, "evaluate_settings": settings}


def print_numbers(numbers: dict[str, Any]) -> None:
    """Each value with ``repr`` (the shortest text that reads back as the same float)."""
    for section in ("probes", "evaluate"):
        for name, value in numbers[section].items():
            print(f"{section:<9} {name:<36} {value!r}")


# -------------------------------------------------------------------------------------------- comparing
def flat_numbers(numbers: dict[str, Any]) -> dict[str, float]:
    """``section/name`` -> value for the probe and protocol numbers of a JSON written by this script."""
    return {f"{section}/{name}": value for section in ("probes", "evaluate")
            for name, value in numbers[section].items()}


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per number that is not bit-identical (or is on one side only); empty when all agree."""
    a, b = flat_numbers(before), flat_numbers(after)
    lines = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            lines.append(f"{name:<46} only in {'the first' if name in a else 'the second'}")
        elif not (a[name] == b[name] or (math.isnan(a[name]) and math.isnan(b[name]))):
            lines.append(f"{name:<46} {a[name]!r} -> {b[name]!r} ({b[name] - a[name]:+.3e})")
    return lines


def compare(first: Path, second: Path) -> int:
    """Print the differences between two JSON files of this script; 0 when every number is identical."""
    before, after = (json.loads(path.read_text()) for path in (first, second))
    lines = differences(before, after)
    count = len(flat_numbers(before))
    print("\n".join(lines) if lines else f"all {count} numbers identical")
    return 1 if lines else 0


# ------------------------------------------------------------------------------------------ command line
def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", type=Path, help="checkpoint of a quickstart run to measure")
    what.add_argument("--train", type=Path, metavar="DIR", help=f"train a short run into DIR ({CHECKPOINT_NAME}, "
                                                                 "data/), then measure it")
    what.add_argument("--compare", type=Path, nargs=2, metavar=("A.json", "B.json"), help="print the differences")
    what.add_argument("--readme-evaluate", type=Path, metavar="BACKBONE",
                      help="the README's evaluate numbers: this exported backbone of a quickstart run and the two "
                           "baselines, on the quickstart's cached scenes (--data-root: default ~/.cache/ssl_modules/"
                           "synthetic)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--config", type=Path, default=None, help="default: the imported tree's quickstart.yaml")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="synthetic-data cache (default: data/ beside the checkpoint)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of --train (62 steps each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numbers can depend on it)")
    parser.add_argument("--no-measure", action="store_true", help="with --train: only train")
    parser.add_argument("cli_args", nargs="*", help="more LightningCLI arguments for --train (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    if args.compare:
        return compare(*args.compare)
    if args.readme_evaluate:
        cache = Path(os.environ.get("SSL_MODULES_DATA", "~/.cache/ssl_modules")).expanduser()
        root = args.data_root or cache / "synthetic"
        numbers = readme_evaluation(args.readme_evaluate, root)
        if args.json is not None:
            args.json.write_text(json.dumps(numbers, indent=2, default=str) + "\n")
        return 0
    import ssl_modules

    torch.set_num_threads(args.threads)
    config = args.config or default_config()
    print(f"ssl_modules: {ssl_modules.__file__}\nconfig: {config}\ntorch threads: {torch.get_num_threads()}")
    checkpoint = train(config, args.train, args.epochs, args.cli_args) if args.train else args.ckpt
    if args.no_measure:
        return 0
    numbers = measure(checkpoint, config, args.data_root or checkpoint.parent / "data")
    print_numbers(numbers)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
