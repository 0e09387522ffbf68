"""Collectives that keep autograd right, and no-ops when the run is not distributed.

Everything a method must compute on the global batch (VICReg's variance and covariance, BAM's similarity
columns, CrIBo's memory bank) goes through these helpers. Torch only: no Lightning import.

Inside an optional part (``optional_parts.agreed_failure``: the probes), every collective first asks the
processes whether one of them has failed, so that a failure on one process never leaves the others waiting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ssl_modules.run.optional_parts import before_collective

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_gather_variable",
    "gather_in_index_order",
    "all_reduce",
    "broadcast_",
    "sum_",
    "all_to_all_blocks",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGatherSumBackward(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the incoming gradients over processes.

    Every process's loss depends on every process's rows, so the gradient of a process's own rows is the
    sum over processes of what each loss sends them. Keeping only the local slice of the local gradient
    would make the global statistics' gradients ``world_size`` times too small.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rows = tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order, differentiably.

    All processes must pass the same shape. Returns ``tensor`` itself when not distributed.
    """
    if not is_distributed():
        return tensor
    before_collective()
    return _AllGatherSumBackward.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order, as a constant."""
    if not is_distributed():
        return tensor.detach()
    before_collective()
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.detach().contiguous())
    return torch.cat(pieces, dim=0)


@torch.no_grad()
def all_gather_variable(tensor: Tensor, dim: int = 0) -> Tensor:
    """Concatenate tensors whose size along ``dim`` differs between processes (rank order, no gradient).

    The sizes are gathered first, then every piece is padded to the largest one, gathered and stripped.
    """
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().movedim(dim, 0).contiguous()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = all_gather_no_grad(size).tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_no_grad(padded).split(max(sizes))
    return torch.cat([piece[:n] for piece, n in zip(gathered, sizes)]).movedim(0, dim)


@torch.no_grad()
def gather_in_index_order(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Every process's rows of ``index`` and ``tensors``, concatenated and stably sorted by ``index``.

    Each process passes the dataset indices of its rows and the rows themselves (any number of rows,
    zero included); every process gets all rows in dataset-index order, the order of a single-process run.
    Rows sharing an index keep their order (all rows of one index must come from one process).
    """
    every_index = all_gather_variable(index)
    order = torch.sort(every_index, stable=True).indices
    gathered = [all_gather_variable(t)[order] for t in tensors]
    return (every_index[order], *gathered)


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """Element-wise reduction over processes (``op`` in ``sum``, ``max``, ``min``) into a new tensor.

    No gradient flows through it. Returns a detached copy when not distributed.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    out = tensor.detach().clone()
    if is_distributed():
        before_collective()
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return out


@torch.no_grad()
def broadcast_(tensors: list[Tensor], source: int = 0) -> None:
    """Overwrite every process's ``tensors`` in place with ``source``'s (no-op when not distributed)."""
    if not is_distributed():
        return
    for tensor in tensors:
        before_collective()
        dist.broadcast(tensor, src=source)


@torch.no_grad()
def sum_(tensors: list[Tensor]) -> None:
    """Replace every process's ``tensors`` in place by their sum over processes (no-op when not distributed)."""
    if not is_distributed():
        return
    for tensor in tensors:
        before_collective()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@torch.no_grad()
def all_to_all_blocks(tensor: Tensor) -> Tensor:
    """Exchange equal blocks: ``tensor`` is ``(world, ...)`` with block ``s`` meant for process ``s``; the
    result's block ``s`` is what process ``s`` sent to this one (no gradient; ``tensor`` itself when not
    distributed). Every process passes the same shape."""
    if not is_distributed():
        return tensor.detach()
    if tensor.shape[0] != dist.get_world_size():
        raise ValueError(f"all_to_all_blocks needs one block per process along dim 0 ({dist.get_world_size()}), "
                         f"got {tuple(tensor.shape)}")
    before_collective()
    tensor = tensor.detach().contiguous()
    out = torch.empty_like(tensor)  # contiguous too (empty_like keeps the strides of its argument)
    dist.all_to_all_single(out, tensor)
    return out
