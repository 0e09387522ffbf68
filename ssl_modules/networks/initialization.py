"""Where a backbone's starting weights come from, on purpose (``docs/posttraining.md``).

A method's ``backbone_weights`` names the weights a *new* run starts from, which is not the same thing as
``--ckpt_path`` (which resumes a run: optimizer, step, teacher, bank). The sources:

- ``"timm"``: timm's default pretrained weights of the backbone's own name; ``"timm:<name.tag>"`` (or
  ``"timm:hf-hub:<repo>"``, ``"timm:local-dir:<folder>"``): any timm pretrained name of the same architecture.
  timm downloads them where there is a network and reads the local Hugging Face cache otherwise
  (``HF_HUB_OFFLINE=1``).
- a local file or folder: a ``.safetensors`` state dict, a timm / Hugging Face folder (``config.json`` with
  ``model.safetensors`` or ``pytorch_model.bin``, as ``export`` writes it), an export's ``backbone.pt``, an
  official release or training checkpoint (CrIBo, BAM, VICRegL, DINOv2 layouts) or a checkpoint of this
  library (the teacher's backbone where there is one).

Weights whose position embedding was trained at another size (DINOv2: 518 px) are resampled by timm's own
converter of the model family, which also maps the official DINOv2 names to timm's.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import timm
from torch import Tensor

__all__ = ["WeightSource", "resolve_weight_source", "read_initial_weights", "initialise_backbone",
           "check_resume_matches_start"]

TIMM_PREFIX = "timm:"
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class WeightSource:
    """Where a run's starting weights came from; recorded in its checkpoints and exports.

    Attributes:
        spec: what the user wrote (``backbone_weights``).
        kind: ``"timm"`` (a timm pretrained name) or ``"file"``.
        location: the timm pretrained name, or the absolute path of the file read.
        sha256: the file's digest (``None`` for timm names: timm's cache names the revision).
    """

    spec: str
    kind: Literal["timm", "file"]
    location: str
    sha256: str | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def resolve_weight_source(spec: str, backbone_name: str) -> WeightSource:
    """What ``spec`` points at, checked before anything is read (a missing file is a clear error)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backbone_weights must be 'timm', 'timm:<pretrained name>' or a path, got {spec!r}")
    if spec == "timm":
        return WeightSource(spec, "timm", backbone_name)
    if spec.startswith(TIMM_PREFIX):
        return WeightSource(spec, "timm", spec[len(TIMM_PREFIX):])
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"backbone_weights {spec!r}: no such file or folder. Give a local file (a .safetensors, an export, "
            f"an official or library checkpoint), a timm folder, or 'timm' / 'timm:<pretrained name>' for timm's "
            f"weights (e.g. 'timm:{backbone_name}'). To resume an interrupted run use --ckpt_path instead (with "
            "backbone_weights null if the file is gone: the checkpoint holds the weights); to load a checkpoint of "
            "such a run use SSLModule.load_any, which does not read the starting weights again")
    path = path.resolve()
    file = _weights_in_folder(path) if path.is_dir() else path
    return WeightSource(spec, "file", str(file), _sha256(file))


def _weights_in_folder(folder: Path) -> Path:
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"backbone_weights {str(folder)!r}: the folder holds none of {', '.join(_FOLDER_WEIGHTS)} "
                     "(a timm / Hugging Face model folder, as `python -m ssl_modules export <ckpt> <folder>` writes)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_initial_weights(source: WeightSource, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The state dict ``source`` holds (timm's names, or an official layout the backbone converts)."""
    if source.kind == "timm":
        return _timm_pretrained_state(source.location)
    path = Path(source.location)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from ssl_modules.checkpoints.reading import read_checkpoint
    from ssl_modules.networks.backbones import backbone_state_dict

    state = read_checkpoint(path, trust_checkpoint=trust_checkpoint, lightning=False,
                            label=f"backbone_weights {path}")
    return backbone_state_dict(state)


def _timm_pretrained_state(name: str) -> dict[str, Tensor]:
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as error:  # timm: unknown pretrained tag, or no weights for the name
        raise ValueError(f"backbone_weights 'timm:{name}': {error}") from None
    except Exception as error:  # huggingface_hub / network: not downloadable and not in the local cache
        raise ValueError(
            f"backbone_weights 'timm:{name}': timm could not get the weights ({type(error).__name__}: {error}). "
            f"Without a network they must already be in the local Hugging Face cache: on a machine with one run "
            f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy "
            "~/.cache/huggingface, or pass a local file as backbone_weights") from None
    return model.state_dict()


def initialise_backbone(backbone: Any, spec: str, trust_checkpoint: bool = False) -> WeightSource:
    """Load the weights ``spec`` names into ``backbone`` (a :class:`~ssl_modules.networks.backbones.Backbone`),
    strictly; return their :class:`WeightSource`. Every error names the source."""
    source = resolve_weight_source(spec, backbone.name)
    state = read_initial_weights(source, trust_checkpoint)
    try:
        backbone.load_official_weights(state)
    except ValueError as error:
        raise ValueError(f"backbone_weights {spec!r} ({source.location}) do not fit backbone {backbone.name} "
                         f"with {backbone.model_kwargs}: {error}. The architecture (depth, width, patch size, "
                         "registers) must be the one the weights were trained with") from None
    return source


def _same_weights(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Same starting weights: both random, the same timm name, or files with the same content (moved or not)."""
    if a is None or b is None:
        return a is b
    if a["kind"] != b["kind"]:
        return False
    return a["location"] == b["location"] if a["kind"] == "timm" else a.get("sha256") == b.get("sha256")


def _describe(record: dict[str, Any] | None) -> str:
    return "random initialisation" if record is None else f"backbone_weights {record['spec']!r} ({record['location']})"


def check_resume_matches_start(ckpt_path: str, recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse a resume whose run started from other weights than the module's ``backbone_weights`` say, and
    ``backbone_weights`` naming the very checkpoint ``--ckpt_path`` resumes: the two mean different things
    (a new run from weights; the same run continued), and mixing them silently trains something else. A module
    without ``backbone_weights`` resumes any run (the checkpoint holds the weights)."""
    if current is not None and current["kind"] == "file" and Path(current["location"]) == Path(ckpt_path).resolve():
        raise ValueError(
            f"{ckpt_path} is both --ckpt_path and backbone_weights. --ckpt_path resumes that run (optimizer, step, "
            "teacher, schedules); backbone_weights starts a NEW run from its backbone weights (heads, optimizer "
            "and schedules from scratch). Keep one: drop backbone_weights to resume, or drop --ckpt_path to start "
            "a new run from these weights")
    if current is not None and not _same_weights(recorded, current):  # no backbone_weights: a plain resume
        raise ValueError(
            f"--ckpt_path {ckpt_path} resumes a run that started from {_describe(recorded)}, but this module's "
            f"backbone_weights give {_describe(current)}: a resume continues its own run. Set backbone_weights "
            f"to the run's ({recorded['spec'] if recorded else 'null'!r}) to resume it, or drop --ckpt_path and "
            "keep backbone_weights to start a new run from those weights")
