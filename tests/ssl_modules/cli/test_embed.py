"""``python -m ssl_modules embed``: the written global and patch features are ``SSLModule.embed``'s on the same
preprocessed images, in the order of the sorted relative names; bad folders and images give one message and the
documented exit code (1 a failed run, 2 a bad command line)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.common import TINY_VIT

from ssl_modules.cli import main
from ssl_modules.cli.embed import EmbedInputError, embed_folder, image_names, read_embeddings
from ssl_modules.evaluation.transforms import normalise, resize_centre_crop
from datamodules.reading import read_image

NAMES = ["b/2.png", "a.png", "b/10.jpg", "c/d/e.png"]  # sorted: a.png, b/10.jpg, b/2.png, c/d/e.png
TIMM = ["vit_tiny_patch16_224", "--timm_kwargs", json.dumps(TINY_VIT)]
QUIET = ["--num_workers", "0", "--show_progress", "false"]


def image_folder(root: Path, names: list[str] = NAMES, seed: int = 0) -> Path:
    """Random RGB images of varied sizes at ``names`` (sub-folders made as needed)."""
    rng = np.random.default_rng(seed)
    for number, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (36 + 3 * number, 40 + 5 * number, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return root


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["embed", *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cribo_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny CrIBo checkpoint whose teacher differs from its student, and the module."""
    import lightning.pytorch as pl

    from ssl_modules.methods.cribo import CrIBo

    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=32, object_out_dim=32,
                   head_hidden_dim=32, head_bottleneck_dim=16, queue_size=8)
    with torch.no_grad():
        for parameter in module.teacher["backbone"].parameters():
            parameter.add_(0.5)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("embed_model") / "cribo.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_written_features_equal_ssl_module_embed_on_the_same_images(tmp_path, cribo_checkpoint, capsys):
    checkpoint, module = cribo_checkpoint
    folder, output = image_folder(tmp_path / "images"), tmp_path / "out" / "features.safetensors"
    code, err = run([str(checkpoint), "--images", str(folder), "--output", str(output), "--batch_size", "3", *QUIET],
                    capsys)
    assert code == 0, err
    tensors, names, metadata = read_embeddings(output)
    assert names == sorted(NAMES)
    images = torch.stack([normalise(resize_centre_crop(read_image(folder / name), 32)) for name in names])
    expected = module.embed(images)
    assert tensors["global"].shape == (4, 64) and tensors["patch"].shape == (4, 4, 4, 64)
    torch.testing.assert_close(tensors["global"], expected.global_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tensors["patch"], expected.dense.unflatten(1, expected.grid), rtol=1e-5, atol=1e-5)
    assert metadata["image_size"] == "32" and metadata["model"] == str(checkpoint)


def test_the_image_size_defaults_to_the_model_input_size_and_can_be_set(tmp_path):
    folder = image_folder(tmp_path / "images", NAMES[:1])
    embed_folder(TIMM[0], folder, tmp_path / "a.safetensors", timm_kwargs=TINY_VIT, show_progress=False)
    embed_folder(TIMM[0], folder, tmp_path / "b.safetensors", image_size=48, timm_kwargs=TINY_VIT,
                 show_progress=False)
    default, larger = read_embeddings(tmp_path / "a.safetensors"), read_embeddings(tmp_path / "b.safetensors")
    assert default[2]["image_size"] == "32" and default[0]["patch"].shape[1:3] == (4, 4)
    assert larger[2]["image_size"] == "48" and larger[0]["patch"].shape[1:3] == (6, 6)


def test_patch_false_writes_the_global_features_only(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", NAMES[:2])
    code, err = run([*TIMM, "--images", str(folder), "--output", str(tmp_path / "f.safetensors"), "--patch", "false",
                     *QUIET], capsys)
    assert code == 0, err
    assert set(read_embeddings(tmp_path / "f.safetensors")[0]) == {"global"}


def test_names_are_sorted_relative_paths_without_hidden_or_other_files(tmp_path):
    folder = image_folder(tmp_path / "images")
    (folder / "notes.txt").write_text("not an image")
    image_folder(folder, [".hidden/x.png", ".y.png"])
    assert image_names(folder) == sorted(NAMES)


@pytest.mark.parametrize(("make", "message"), [
    (None, "is missing: pass a folder of image files"),
    (Path.mkdir, "holds no image file"),
    (lambda path: path.write_text("x"), "is a file: pass a folder"),
])
def test_a_missing_empty_or_file_folder_exits_1_naming_it(tmp_path, capsys, make, message):
    folder = tmp_path / "photos"
    if make is not None:
        make(folder)
    code, err = run([*TIMM, "--images", str(folder), "--output", str(tmp_path / "f.safetensors"), *QUIET], capsys)
    assert code == 1
    assert message in err and str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "f.safetensors").exists()
    with pytest.raises(EmbedInputError):
        image_names(folder)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_exits_1_naming_the_file(tmp_path, capsys, workers):
    folder = image_folder(tmp_path / "images", NAMES[:2])
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, err = run([*TIMM, "--images", str(folder), "--output", str(tmp_path / "f.safetensors"), "--num_workers",
                     workers, "--show_progress", "false"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(folder / "b" / "broken.png") in lines[0] and "cannot be read" in lines[0], err


def test_an_output_that_is_not_safetensors_is_a_bad_command_line(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", NAMES[:1])
    code, err = run([*TIMM, "--images", str(folder), "--output", str(tmp_path / "features.pt"), *QUIET], capsys)
    assert code == 2 and "must be a .safetensors file" in err


def test_images_and_output_are_required_options(capsys):
    code, err = run([TIMM[0]], capsys)
    assert code == 2 and "required: images, output" in err and "Traceback" not in err


def test_help_lists_the_options_without_linux_only_calls(monkeypatch, capsys):
    import os

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    code = main(["embed", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "--images" in out and "--image_size" in out and "read_embeddings" in out
