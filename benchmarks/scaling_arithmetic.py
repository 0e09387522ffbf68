"""Memory per GPU and bytes communicated per step for every paper config at 8, 64 and 256 GPUs: DDP vs FSDP2,
and CrIBo's memory bank replicated vs sharded (at its paper size and grown to keep the paper's history).

    python benchmarks/scaling_arithmetic.py          # prints the markdown that docs/performance.md holds
    python benchmarks/scaling_arithmetic.py --write  # and puts it there, between the scaling-table markers

Nothing is typed in by hand: each config's model is built from its YAML on the meta device (no memory, no
data) and one training step runs there at the config's per-GPU batch on the config's crops, which gives

- the parameters of the student (trainable and frozen), the EMA teacher and the buffers (CrIBo's bank);
- the activations: every tensor autograd saves for the backward of that step (each storage counted once,
  parameters excluded). Under ``16-mixed`` the meta device has no autocast, so the step runs under a
  stand-in: inside the networks (backbone, heads; where autocast acts, the loss code turns it off) the ops
  that autocast runs in float16 (linear, convolution, matmuls, attention) get float16 inputs and the
  normalisations and softmax float32 ones, as autocast's op lists say;
- how many times each network is called per step (FSDP2 gathers a sharded module's parameters at every
  forward call and again for its backward);
- the method's own collectives (``ssl_modules.run.distributed``): their sizes are recorded from the calls
  the step makes (on one process they pass their tensors through).

The formulas that turn these into the table are in ``docs/performance.md`` (Scaling past one node) and in
the functions below. Communication is per GPU and per step with ring algorithms on ``N`` GPUs: an
all-reduce of ``S`` bytes sends ``2 (N-1)/N S``, an all-gather or reduce-scatter whose full result is ``S``
bytes sends ``(N-1)/N S``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.views import MultiCropViews  # noqa: E402
from ssl_modules.run import distributed  # noqa: E402
from ssl_modules.testing import random_views  # noqa: E402

#: (row label, config under examples/configs/)
RUNS = [
    ("CrIBo ViT-S/16 ImageNet", "cribo/imagenet_vit_small_16.yaml"),
    ("CrIBo ViT-S/16 COCO", "cribo/coco_vit_small_16.yaml"),
    ("CrIBo ViT-B/16 ImageNet", "cribo/imagenet_vit_base_16.yaml"),
    ("BAM ViT-S/16", "bam/vit_small_16.yaml"),
    ("BAM ViT-B/16", "bam/vit_base_16.yaml"),
    ("VICRegL ConvNeXt-S", "vicregl/convnext_small_alpha0.75.yaml"),
    ("VICRegL ConvNeXt-B", "vicregl/convnext_base_alpha0.75.yaml"),
    ("VICRegL ResNet-50", "vicregl/resnet50_alpha0.75.yaml"),
]
GPUS = (8, 64, 256)
#: float32 state tensors an optimizer keeps per trainable parameter
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lars": 1, "sgd": 1}
GB = 1e9
FLOAT32 = 4

# ------------------------------------------------------------------------------------------- autocast stand-in
_HALF_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention, torch.matmul, torch.mm,
             torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum}
_FLOAT_OPS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
              F.normalize}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused GPU kernels (flash, memory-efficient) keep it for the backward: queries, keys,
    values, output and one float32 log-sum-exp per query row, never the N x N matrix (the meta device would
    run the math kernel, which saves it). Meta tensors only: the output has the right shape, no values."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return output

    @staticmethod
    def backward(ctx, grad):  # never run: the step is measured, not trained
        raise NotImplementedError


class PrecisionStandIn(TorchFunctionMode):
    """Fused attention always; under ``half`` and while ``active`` (inside a network), what ``16-mixed``
    autocast does to dtypes, for meta tensors (which autocast ignores)."""

    def __init__(self, half: bool) -> None:
        super().__init__()
        self.half, self.active = half, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.half and self.active:
            target = torch.float16 if func in _HALF_OPS else torch.float32 if func in _FLOAT_OPS else None
            if target is not None:
                args, kwargs = _cast(args, target), {k: _cast(v, target) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------- one meta step
@dataclass
class Footprint:
    """What one training step of a config needs, measured on the meta device at its per-GPU batch."""

    label: str
    batch: int
    paper_gpus: int
    precision: str
    optimizer: str
    student: int = 0  # parameters of the trained networks, frozen ones included
    trainable: int = 0
    teacher: int = 0  # parameters and buffers of the EMA teacher
    buffers: int = 0  # bytes of the other buffers, bank excluded
    bank: int = 0  # bytes of CrIBo's memory bank
    bank_rows: int = 0  # rows per view
    bank_images: int = 0
    objects: int = 0  # K, objects per image
    object_width: int = 0  # D of a bank row
    activations: int = 0  # bytes saved for the backward
    gathered_calls: dict[str, int] = field(default_factory=dict)  # forward calls per step of each network
    gathered: dict[str, int] = field(default_factory=dict)  # parameters of each network
    collectives: list[tuple[str, int]] = field(default_factory=list)  # (kind, local bytes) of the method's


def _views_of(config: dict) -> MultiCropViews:
    views = config["data"]["init_args"].get("views", "cribo")
    if isinstance(views, str):
        return MultiCropViews.preset(views)
    return MultiCropViews(**views.get("init_args", {}))


def _model_of(config: dict) -> nn.Module:
    module, _, name = config["model"]["class_path"].rpartition(".")
    with torch.device("meta"):
        return getattr(importlib.import_module(module), name)(**config["model"]["init_args"])


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@contextlib.contextmanager
def _recording_collectives(record: list[tuple[str, int]]) -> Iterator[None]:
    """Record the size of every collective the step asks ``ssl_modules.run.distributed`` for."""
    originals = {}

    def recorder(kind: str, original):
        def call(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor):
                record.append((kind, tensor.numel() * tensor.element_size()))
            return original(tensor, *args, **kwargs)
        return call

    for kind in ("all_gather_with_grad", "all_gather_no_grad", "all_gather_variable", "all_reduce"):
        originals[kind] = getattr(distributed, kind)
        setattr(distributed, kind, recorder(kind, originals[kind]))
    try:
        yield
    finally:
        for kind, original in originals.items():
            setattr(distributed, kind, original)


def _networks(model: nn.Module) -> dict[str, nn.Module]:
    """The modules FSDP2 would shard: the student's top-level networks and the teacher's."""
    parts = {}
    for name, child in model.named_children():
        if name == "teacher":
            parts.update({f"teacher.{n}": c for n, c in child.named_children()})
        elif any(True for _ in child.parameters()):
            parts[name] = child
    return parts


def measure(label: str, config_path: Path) -> Footprint:
    """One training step of the config on the meta device at its per-GPU batch."""
    config = yaml.safe_load(config_path.read_text())
    trainer, data, init = config["trainer"], config["data"]["init_args"], config["model"]["init_args"]
    model = _model_of(config).train()
    views = _views_of(config)
    sizes = [views.global_size] * views.n_global + [views.local_size] * views.n_local
    footprint = Footprint(label, data["batch_size"], trainer.get("devices", 1) * trainer.get("num_nodes", 1),
                          str(trainer.get("precision", "32-true")), init.get("optimizer", "adamw"))
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            footprint.teacher += parameter.numel()
        else:
            footprint.student += parameter.numel()
            footprint.trainable += parameter.numel() if parameter.requires_grad else 0
    for name, buffer in model.named_buffers():
        size = buffer.numel() * buffer.element_size()
        if name.startswith("memory_bank."):
            footprint.bank += size
        elif name.startswith("teacher."):
            footprint.teacher += buffer.numel()
        else:
            footprint.buffers += size
    if hasattr(model, "memory_bank"):
        _, footprint.bank_rows, footprint.object_width = model.memory_bank.keys.shape  # (views, rows, D)
        footprint.bank_images = int(init["queue_size"])
        footprint.objects = int(init["num_clusters"])

    half = footprint.precision.startswith("16") or footprint.precision.startswith("bf16")
    standin = PrecisionStandIn(half)
    calls: dict[str, int] = {}

    def enter(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            standin.active += 1
        return hook

    def leave(module, args, output):
        standin.active -= 1

    handles = []
    for name, network in _networks(model).items():
        handles += [network.register_forward_pre_hook(enter(name)), network.register_forward_hook(leave)]
    parameters = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    batch = random_views(footprint.batch, sizes, device="meta")
    try:
        with _recording_collectives(footprint.collectives), standin, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.training_step(batch, 0)
    finally:
        for handle in handles:
            handle.remove()
    footprint.activations = sum(saved.values())
    networks = _networks(model)
    footprint.gathered_calls = {name: calls.get(name, 0) for name in networks}
    footprint.gathered = {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}
    return footprint


# ------------------------------------------------------------------------------------------------- formulas
def ring(world: int) -> float:
    """The share of a collective's full size that each GPU sends on a ring: (N-1)/N."""
    return (world - 1) / world


def method_bytes(footprint: Footprint, world: int) -> float:
    """Bytes per GPU and step of the method's own collectives at ``world`` GPUs (the same under DDP and FSDP2).

    ``all_gather_with_grad`` gathers ``world`` pieces forwards and all-reduces the full gathered gradient
    backwards; ``all_gather_*`` gather ``world`` pieces; ``all_reduce`` reduces its tensor. CrIBo's include
    the object gather of its (replicated, at one process) bank."""
    total = 0.0
    for kind, local in footprint.collectives:
        if kind == "all_gather_with_grad":
            total += ring(world) * world * local + 2 * ring(world) * world * local
        elif kind in ("all_gather_no_grad", "all_gather_variable"):
            total += ring(world) * world * local
        else:
            total += 2 * ring(world) * local
    return total


def model_state(footprint: Footprint, world: int, strategy: str) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, optimizer state and teacher (float32; FSDP2: 1/world of each)."""
    shard = world if strategy == "FSDP2" else 1
    states = OPTIMIZER_STATES[footprint.optimizer]
    return {"weights": FLOAT32 * footprint.student / shard + footprint.buffers,
            "grads": FLOAT32 * footprint.trainable / shard,
            "optimizer": states * FLOAT32 * footprint.trainable / shard,
            "teacher": FLOAT32 * footprint.teacher / shard}


def parameter_bytes(footprint: Footprint, world: int, strategy: str) -> float:
    """Bytes per GPU and step for the parameters: DDP all-reduces the gradients; FSDP2 all-gathers every
    network's parameters at each forward call (and the trained ones again for the backward) and
    reduce-scatters the gradients."""
    if strategy == "DDP":
        return 2 * ring(world) * FLOAT32 * footprint.trainable
    gathered = 0.0
    for name, calls in footprint.gathered_calls.items():
        passes = 1 if name.startswith("teacher.") else 2
        gathered += passes * calls * footprint.gathered[name]
    return ring(world) * FLOAT32 * (gathered + footprint.trainable)


def bank_bytes(footprint: Footprint, world: int, sharded: bool, grown: bool) -> float:
    """The bank's bytes per GPU: replicated whole, sharded 1/world; grown by world / paper GPUs."""
    scale = world / footprint.paper_gpus if grown else 1.0
    return footprint.bank * scale / (world if sharded else 1)


def bank_traffic(footprint: Footprint, world: int, sharded: bool) -> float:
    """Bytes per GPU and step of the bank: replicated, every process's objects are all-gathered to update
    every copy; sharded, the queries (2 x global batch x K rows of D floats) are all-gathered, the winning
    rows reduce-scattered back, and the best (score, index) of every query all-gathered."""
    rows = 2 * footprint.batch * world * footprint.objects
    if not sharded:
        return ring(world) * rows * footprint.object_width * FLOAT32
    return ring(world) * rows * (2 * footprint.object_width * FLOAT32 + 2 * FLOAT32)


def search_flops(footprint: Footprint, world: int, grown: bool) -> float:
    """Multiply-adds x 2 of the exhaustive search per GPU and step: each GPU scores its share of the
    2 x global batch x K queries against every row (replicated) or all queries against its rows
    (sharded): the same work."""
    rows = footprint.bank_rows * (world / footprint.paper_gpus if grown else 1.0)
    return 2 * (2 * footprint.batch * footprint.objects) * rows * footprint.object_width


# ------------------------------------------------------------------------------------------------ the tables
def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def memory_table(footprints: list[Footprint]) -> list[str]:
    lines = ["| run (batch per GPU, precision) | GPUs | strategy | weights | grads | optimizer | teacher | "
             "activations | bank (replicated) | total | params comm | method comm | total comm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for footprint in footprints:
        label = f"{footprint.label} ({footprint.batch}, {footprint.precision})"
        for world in GPUS:
            for strategy in ("DDP", "FSDP2"):
                state = model_state(footprint, world, strategy)
                bank = bank_bytes(footprint, world, sharded=False, grown=False)
                total = sum(state.values()) + footprint.activations + bank
                params = parameter_bytes(footprint, world, strategy)
                method = method_bytes(footprint, world)
                cells = [label, str(world), strategy, *(_gb(state[k]) for k in ("weights", "grads", "optimizer",
                                                                                 "teacher")),
                         _gb(footprint.activations), _gb(bank), _gb(total), _gb(params), _gb(method),
                         _gb(params + method)]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def bank_table(footprints: list[Footprint]) -> list[str]:
    lines = ["| run | GPUs | history (steps) of the paper bank | paper bank: replicated / sharded | "
             "bank grown to the paper's history: replicated / sharded | bank comm: replicated / sharded | "
             "search GFLOP per GPU: paper / grown |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for footprint in footprints:
        if not footprint.objects:
            continue
        for world in GPUS:
            history = footprint.bank_images / (footprint.batch * world)
            cells = [footprint.label, str(world), f"{history:.1f}",
                     " / ".join(_gb(bank_bytes(footprint, world, sharded, False)) for sharded in (False, True)),
                     " / ".join(_gb(bank_bytes(footprint, world, sharded, True)) for sharded in (False, True)),
                     " / ".join(_gb(bank_traffic(footprint, world, sharded)) for sharded in (False, True)),
                     " / ".join(f"{search_flops(footprint, world, grown) / 1e9:.0f}" for grown in (False, True))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def parameters_table(footprints: list[Footprint]) -> list[str]:
    lines = ["| run | config | student params (M), trainable | teacher (M) | optimizer | network calls per step "
             "(FSDP2 gathers) | method collectives per step (local MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for footprint, (_, path) in zip(footprints, RUNS):
        calls = ", ".join(f"{name} x{count}" for name, count in footprint.gathered_calls.items())
        kinds: dict[str, float] = {}
        for kind, local in footprint.collectives:
            kinds[kind] = kinds.get(kind, 0) + local / 1e6
        collectives = ", ".join(f"{kind} {size:.1f}" for kind, size in sorted(kinds.items())) or "none"
        lines.append(f"| {footprint.label} | `{path}` | {footprint.student / 1e6:.1f}, "
                     f"{footprint.trainable / 1e6:.1f} | {footprint.teacher / 1e6:.1f} | {footprint.optimizer} | "
                     f"{calls} | {collectives} |")
    return lines


def render(footprints: list[Footprint]) -> str:
    """The markdown that docs/performance.md holds between its scaling-table markers."""
    blocks = [
        "Measured per config (meta-device step at the per-GPU batch):", "", *parameters_table(footprints), "",
        "Memory per GPU (GB) and bytes sent per GPU per step (GB), CrIBo's bank replicated at its paper size:", "",
        *memory_table(footprints), "",
        "CrIBo's memory bank per GPU (GB), its traffic per GPU and step (GB) and its search:", "",
        *bank_table(footprints),
    ]
    return "\n".join(blocks) + "\n"


def footprints() -> list[Footprint]:
    return [measure(label, REPO / "examples" / "configs" / path) for label, path in RUNS]


DOC = REPO / "docs" / "performance.md"
START, END = "<!-- scaling-table:start -->\n", "<!-- scaling-table:end -->"


def documented_block(text: str) -> str:
    """What ``docs/performance.md`` holds between its scaling-table markers."""
    if START not in text or END not in text:
        raise ValueError(f"{DOC.name} has no `{START.strip()}` ... `{END}` markers: add them where the tables go")
    return text.split(START, 1)[1].split(END, 1)[0]


def write(block: str, path: Path = DOC) -> None:
    """Replace what ``path`` holds between the markers by ``block``."""
    text = path.read_text()
    old = documented_block(text)
    path.write_text(text.replace(START + old + END, START + block + END, 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write the tables into {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    block = render(footprints())
    sys.stdout.write(block)
    if args.write:
        write(block)


if __name__ == "__main__":
    main()
