"""``python -m ssl_modules embed <model> --images <folder> --output features.safetensors``: the features of a folder
of images, for a user's own downstream code.

Every image under the folder (sub-folders included, hidden entries skipped, by extension) is read, its shorter
side resized to ``round(size * 256 / 224)`` and its centre ``size x size`` cut (DINO's evaluation crop,
``datamodules.transforms.resize_centre_crop``; ``size`` defaults to the model's input size), normalised with the
ImageNet mean and std, and embedded by the model's frozen backbone (the teacher where the method has one: what
``SSLModule.embed`` gives). The safetensors file holds

- ``global``: ``(N, D)`` float32, the pooled feature (a ViT's CLS token after the final norm);
- ``patch``: ``(N, h, w, D)`` float32, the dense tokens on their grid, without the CLS token and registers;

and, in its metadata (strings), ``names`` (a JSON list of the image paths relative to the folder, sorted, in the
order of the rows), ``image_size``, ``resize_size``, ``model`` (the source as given), ``teacher``, ``precision``,
``mean`` and ``std``. :func:`read_embeddings` reads it back.

The model is anything ``evaluate`` reads (``ssl_modules.evaluation.sources``): a ``.ckpt`` of this library, an
export (a ``.pt`` with its ``.json``, or a folder), an official checkpoint with ``--official``, or a timm name.
Exit codes: 0 written, 1 a failed run (a missing or empty folder, an unreadable image (``UnreadableImageError``
naming it), an unreadable model), 2 a bad command line (unknown option, an output that is not ``.safetensors``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ssl_modules.cli._errors import CommandLineError, RunError, exit_code
from ssl_modules.cli._parsing import add_flag, command_parser, parameter_help, parse_command_line
from ssl_modules.cli._run_checks import usable_cpus

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser
    from torch import Tensor

__all__ = ["EmbedInputError", "image_names", "embed_folder", "read_embeddings", "build_parser", "main"]

SUFFIX = ".safetensors"
_EXAMPLES = (
    "examples:\n"
    "  a checkpoint's teacher:     embed runs/.../last.ckpt --images photos/ --output photos.safetensors\n"
    "  an export, at 224 px, GPU:  embed runs/.../backbone.pt --images photos/ --output f.safetensors"
    " --image_size 224 --device cuda --precision bf16\n"
    "  read them back:             from ssl_modules.cli.embed import read_embeddings\n"
    "                              tensors, names, info = read_embeddings('photos.safetensors')\n"
)


class EmbedInputError(ValueError):
    """The folder of images to embed is missing or holds no image; the message says what was expected."""


def image_names(folder: str | Path) -> list[str]:
    """The image files under ``folder`` as sorted POSIX paths relative to it (the order of the written rows).

    Raises ``EmbedInputError`` when ``folder`` is no folder or holds no image file.
    """
    from datamodules.reading import IMAGE_EXTENSIONS, list_images

    root = Path(folder).expanduser()
    if not root.is_dir():
        what = "a file" if root.exists() else "missing"
        raise EmbedInputError(f"--images {root} is {what}: pass a folder of image files (sub-folders are read too)")
    names = sorted(path.relative_to(root).as_posix() for path in list_images(root))
    if not names:
        raise EmbedInputError(f"--images {root} holds no image file (extensions: "
                              f"{', '.join(sorted(IMAGE_EXTENSIONS))}); pass the folder that holds the images")
    return names


def embed_folder(model: str | Path, images: str | Path, output: str | Path, image_size: int | None = None,
                 batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                 precision: Literal["32", "bf16", "16"] = "32", patch: bool = True,
                 official: Literal["auto", "cribo", "bam", "vicregl"] | None = None, teacher: bool = True,
                 timm_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
                 show_progress: bool = True) -> Path:
    """Write the global and patch features of every image under ``images`` to ``output``; returns ``output``.

    Args:
        model: a .ckpt of this library, an exported backbone (a .pt with its .json, or a folder), an official
            checkpoint (with --official) or a timm model name.
        images: the folder of images (sub-folders included).
        output: the .safetensors file to write.
        image_size: side of the centre crop the model sees (default: the model's input size, 224 when the model
            does not tell it); the shorter side is first resized to round(image_size * 256 / 224).
        batch_size: images per batch.
        num_workers: loader workers.
        device: cuda, cuda:1, cpu (default: the CUDA device when there is one, else the CPU).
        precision: 32 (float32), bf16 or 16 (autocast); the features are written as float32.
        patch: write the patch features too (N x h x w x D floats: the larger part of the file).
        official: the model is an official checkpoint of this method (auto: told from its layout).
        teacher: embed with the teacher backbone where the method has one (as SSLModule.embed).
        timm_kwargs: timm.create_model arguments for a timm name.
        trust_checkpoint: read a model file with full unpickling (it can run code from the file: only for files
            you trust).
        show_progress: a progress bar.
    """
    import torch
    from safetensors.torch import save_file

    output = _checked_output(output)
    names = image_names(images)
    backbone, source = _backbone(model, official, teacher, trust_checkpoint, timm_kwargs)
    size = image_size if image_size is not None else _input_size(backbone)
    if size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"image_size={size} and batch_size={batch_size} must be >= 1, num_workers={num_workers} "
                         ">= 0")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = _embed(backbone, Path(images).expanduser(), names, size, batch_size, num_workers, device, precision,
                     patch, show_progress)
    metadata = {"names": json.dumps(names), "image_size": str(size), "resize_size": str(round(size * 256 / 224)),
                "model": source, "teacher": str(teacher).lower(), "precision": precision,
                "mean": json.dumps(list(_mean_std()[0])), "std": json.dumps(list(_mean_std()[1]))}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata=metadata)
    return output


def read_embeddings(path: str | Path) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """``(tensors, names, metadata)`` of a file ``embed`` wrote: ``tensors["global"]`` ``(N, D)``,
    ``tensors["patch"]`` ``(N, h, w, D)`` (when written), the relative image names of the rows, and the
    metadata strings (``image_size``, ``model``, ...)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), json.loads(metadata["names"]), metadata


def _checked_output(output: str | Path) -> Path:
    path = Path(output).expanduser()
    if path.suffix != SUFFIX:
        raise CommandLineError(f"error: --output {path} must be a {SUFFIX} file (e.g. features{SUFFIX})")
    if path.is_dir():
        raise CommandLineError(f"error: --output {path} is a folder; name the {SUFFIX} file to write")
    return path


def _backbone(model: str | Path, official: str | None, teacher: bool, trust: bool,
              timm_kwargs: dict[str, Any] | None) -> tuple[Any, str]:
    from ssl_modules.evaluation.sources import describe_source, load_backbone

    backbone = load_backbone(model, official=official, teacher=teacher, trust_checkpoint=trust, **(timm_kwargs or {}))
    return backbone, describe_source(model)


def _input_size(backbone: Any) -> int:
    """The model's input size (a ViT's ``img_size``, else timm's ``pretrained_cfg``), 224 when it says nothing."""
    from ssl_modules.evaluation.sizes import PAPER_SIZE, model_input_size

    size = model_input_size(backbone)
    return size if size is not None else PAPER_SIZE


def _mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    from ssl_modules.evaluation.transforms import IMAGENET_MEAN, IMAGENET_STD

    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def _embed(backbone: Any, root: Path, names: list[str], size: int, batch_size: int, num_workers: int, device: str,
           precision: str, patch: bool, show_progress: bool) -> dict[str, Tensor]:
    """``{"global": (N, D), "patch": (N, h, w, D)}`` float32 on the CPU, rows in the order of ``names``."""
    import torch

    from datamodules.datasets import ImageFiles, UnreadableImageError
    from ssl_modules.evaluation.batches import batch_chunks
    from ssl_modules.evaluation.features import Extractor
    from ssl_modules.evaluation.transforms import normalise, resize_centre_crop

    def transform(image: Tensor) -> Tensor:
        return normalise(resize_centre_crop(image, size))

    dataset = ImageFiles([root / name for name in names], transform=transform, unreadable="error")
    extractor = Extractor(backbone, device, precision, batch_size, num_workers, show_progress)
    batches = batch_chunks(range(len(names)), batch_size)
    written: dict[str, Tensor] = {}
    start = 0
    was_training = backbone.training
    try:
        for images, _ in extractor.progress(extractor.loader(dataset, batches), len(batches), "embed"):
            features = extractor.embed(images)
            rows = {"global": features.global_}
            if patch:
                height, width = features.grid
                rows["patch"] = features.dense.unflatten(1, (height, width))
            for key, value in rows.items():
                if key not in written:  # one matrix per output, filled batch by batch
                    written[key] = torch.empty((len(names), *value.shape[1:]), dtype=torch.float32)
                written[key][start:start + len(value)] = value
            start += len(images)
    except UnreadableImageError as error:
        raise UnreadableImageError(_own_message(error)) from None
    finally:
        backbone.train(was_training)
    return written


def _own_message(error: BaseException) -> str:
    """The message an error had where it was raised: a loader worker's error comes back as "Caught ... in
    DataLoader worker process 0. Original Traceback ...", whose last line is the original one."""
    text = str(error)
    if not text.startswith("Caught "):
        return text
    last = text.strip().splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors of a safetensors file, without reading them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def build_parser() -> ArgumentParser:
    """The argument parser of ``embed``: the parameters of :func:`embed_folder`."""
    parser = command_parser("embed", "Write the global and patch features of a folder of images (safetensors).",
                            _EXAMPLES)
    doc = parameter_help(embed_folder)
    parser.add_argument("model", type=str, help=doc.get("model", ""))
    parser.add_argument("--images", type=str, required=True, help=doc.get("images", ""))
    parser.add_argument("--output", type=str, required=True, help=doc.get("output", ""))
    parser.add_function_arguments(embed_folder, as_group=False,
                                  skip={"model", "images", "output", "patch", "teacher", "trust_checkpoint",
                                        "show_progress", "precision", "device", "official"})
    parser.set_defaults(num_workers=min(4, usable_cpus()))
    parser.add_argument("--precision", type=Literal["32", "bf16", "16"], default="32", help=doc.get("precision", ""))
    parser.add_argument("--device", type=str | None, default=None, help=doc.get("device", ""))
    parser.add_argument("--official", type=Literal["auto", "cribo", "bam", "vicregl"] | None, default=None,
                        help=doc.get("official", ""))
    for flag, default in (("patch", True), ("teacher", True), ("show_progress", True), ("trust_checkpoint", False)):
        add_flag(parser, flag, doc.get(flag, ""), default=default)
    return parser


def _embed_command(argv: list[str]) -> int:
    values, _ = parse_command_line(build_parser(), argv, "embed")
    kwargs = values.as_dict()
    kwargs.pop("config", None)
    kwargs["timm_kwargs"] = dict(kwargs.get("timm_kwargs") or {})
    _checked_output(kwargs["output"])  # before anything is read
    try:
        path = embed_folder(**kwargs)
    except ValueError as error:  # EmbedInputError, UnreadableImageError, ModelSourceError, the checks above
        if isinstance(error, CommandLineError):
            raise
        raise RunError(str(error)) from error
    shapes = ", ".join(f"{key} {shape}" for key, shape in _shapes(path).items())
    print(f"features written to {path}: {shapes} (the image names and settings are in its metadata)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``embed``; returns the exit status (0 written, 1 failed, 2 a bad command line). ``--help`` and
    ``--print_config`` end with ``SystemExit(0)``."""
    return exit_code(lambda: _embed_command(sys.argv[1:] if argv is None else list(argv)))
