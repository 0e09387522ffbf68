"""BAM functional core: positive masks, the balanced (Sinkhorn) attention target, top-k targets and the
attention-matching loss (``docs/bam.md``; Shalam and Korman, ECCV 2024).

Layout: a multi-view input is a list of V tensors ``(N, D)``, global crops first. Stacked matrices are
crop-major (row ``v * N + n`` is crop ``v`` of image ``n``); the columns are the first T crops of every
image, crop-major too (column ``t * N + m``).

Distributed use: the functions take gathered columns, and ``balanced_attention`` takes an ``all_reduce``
callable so that each process can keep only its own rows (the official scheme, W times less memory). On
top of the contract, ``bam_loss`` accepts ``gather``/``all_reduce``/``rank``/``world_size`` and then runs
that scheme itself: its loss is this process's share, whose mean over processes is the loss of the
global batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bool_mask
from .precision import full_precision

__all__ = [
    "bam_positive_mask",
    "balanced_attention",
    "bam_top_k_targets",
    "attention_matching_loss",
    "bam_loss",
]

AllReduce = Callable[[Tensor, str], Tensor]
"""``all_reduce(tensor, op) -> Tensor``: element-wise reduction over processes, ``op`` in {"sum", "max"}."""
Gather = Callable[[Tensor], Tensor]
"""``gather(tensor) -> Tensor``: every process's tensor concatenated along dim 0 in rank order; its
backward must sum the incoming gradients over processes."""


# ---------------------------------------------------------------------------------------------- checks
def _check_positive_mask_args(batch_size: int, num_crops: int, num_target_crops: int, rank: int,
                              world_size: int) -> None:
    if batch_size < 1 or num_crops < 1 or num_target_crops < 1:
        raise ValueError(
            f"batch_size ({batch_size}), num_crops ({num_crops}) and num_target_crops ({num_target_crops}) "
            "must all be >= 1"
        )
    if num_target_crops > num_crops:
        raise ValueError(
            f"num_target_crops ({num_target_crops}) exceeds num_crops ({num_crops}): the target crops are the "
            "first crops of every image"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must lie in [0, world_size={world_size})")


def _check_similarity(similarity: Tensor, positive_mask: Tensor | None) -> None:
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be a (rows, columns) matrix, got shape {tuple(similarity.shape)}")
    check_bool_mask(positive_mask, tuple(similarity.shape), "positive_mask",
                    "the similarity's shape; build it with bam_positive_mask")


def _check_balanced_attention_args(similarity: Tensor, temperature: float, num_iters: int,
                                   positive_mask: Tensor | None) -> None:
    _check_similarity(similarity, positive_mask)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")


def _check_top_k_args(targets: Tensor, num_global_crops: int, k: int) -> None:
    if targets.dim() != 2:
        raise ValueError(f"targets must be a (rows, columns) matrix, got shape {tuple(targets.shape)}")
    rows, columns = targets.shape
    if num_global_crops < 1 or rows % num_global_crops:
        raise ValueError(
            f"targets has {rows} rows, not a multiple of num_global_crops ({num_global_crops}): pass the rows "
            "of the G global crops, crop-major"
        )
    if not 1 <= k <= columns:
        raise ValueError(f"top_k ({k}) must lie in [1, {columns}] (the number of target columns): lower top_k")


def _check_matching_args(similarity: Tensor, targets: Tensor, num_global_crops: int,
                         positive_mask: Tensor | None) -> tuple[int, int]:
    """The number of images n and of crops V, from the row counts of the similarity and the targets."""
    if similarity.dim() != 2 or targets.dim() != 2 or similarity.shape[1] != targets.shape[1]:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and targets {tuple(targets.shape)} must be matrices with the "
            "same columns (the target crops)"
        )
    _check_similarity(similarity, positive_mask)
    similarity_rows, target_rows = similarity.shape[0], targets.shape[0]
    if num_global_crops < 1 or target_rows % num_global_crops or target_rows == 0:
        raise ValueError(
            f"targets has {target_rows} rows, which is not a positive multiple of num_global_crops "
            f"({num_global_crops}): pass the rows of the G global crops, crop-major"
        )
    images = target_rows // num_global_crops
    if similarity_rows % images:
        raise ValueError(
            f"similarity has {similarity_rows} rows, not a multiple of the {images} images of the targets: "
            "pass all V crops of the same images, crop-major"
        )
    crops = similarity_rows // images
    if crops < 2:
        raise ValueError(f"similarity holds {crops} crop per image; BAM matches crops, so it needs V >= 2")
    if num_global_crops > crops:
        raise ValueError(f"num_global_crops ({num_global_crops}) exceeds the number of crops V ({crops})")
    return images, crops


def _check_bam_loss_args(
    student: Sequence[Tensor], teacher: Sequence[Tensor] | None, num_global_crops: int, target_crops: int,
    positive_masking: bool, top_k: int, gather: Gather | None, all_reduce: AllReduce | None, world_size: int,
) -> None:
    crops = len(student)
    if crops < 2:
        raise ValueError(f"bam_loss needs at least 2 crops per image (V >= 2), got {crops}")
    if teacher is not None and len(teacher) != crops:
        raise ValueError(f"teacher must give the same {crops} crops as the student, got {len(teacher)}")
    if not 1 <= num_global_crops <= crops:
        raise ValueError(f"num_global_crops ({num_global_crops}) must lie in [1, V={crops}]")
    if not 1 <= target_crops <= crops:
        raise ValueError(f"num_target_crops ({target_crops}) must lie in [1, V={crops}]")
    every_crop = [*student, *(teacher or [])]
    shape = student[0].shape
    if len(shape) != 2 or any(s.shape != shape for s in every_crop):
        raise ValueError(
            "every student (and teacher) crop must be an (N, D) tensor of the same shape, got "
            f"{[tuple(s.shape) for s in every_crop]}"
        )
    images = shape[0] * world_size
    if positive_masking and images < 2:
        raise ValueError(
            "positive masking removes every column of a single-image batch: use at least 2 images per "
            "global batch (or positive_masking=False)"
        )
    if world_size > 1 and (gather is None or all_reduce is None):
        raise ValueError(f"world_size={world_size} needs both gather and all_reduce (they make the batch global)")
    if top_k > target_crops * images:
        raise ValueError(
            f"top_k ({top_k}) exceeds the {target_crops * images} target columns (T * images of the global "
            "batch): lower top_k or use a larger batch"
        )


# --------------------------------------------------------------------------------------------- helpers
def _column_logsumexp(log_kernel: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """``logsumexp`` of every column over its rows; with ``all_reduce``, over the rows of all processes.

    A column may be entirely masked on one process: its local maximum is ``-inf``, but the global one is
    finite, so ``exp(-inf - peak)`` adds 0 to the sum, as it should.
    """
    if all_reduce is None:
        return torch.logsumexp(log_kernel, dim=0, keepdim=True)
    peak = all_reduce(log_kernel.amax(dim=0, keepdim=True), "max")
    total = all_reduce(torch.exp(log_kernel - peak).sum(dim=0, keepdim=True), "sum")
    return peak + torch.log(total)


def _column_sum(kernel: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """Sum of every column over its rows; with ``all_reduce``, over the rows of all processes."""
    total = kernel.sum(dim=0, keepdim=True)
    return total if all_reduce is None else all_reduce(total, "sum")


def _gather_target_columns(local_columns: Tensor, num_target_crops: int, gather: Gather, world_size: int) -> Tensor:
    """``(T * B, D)`` crop-major target rows of this process -> ``(T * W * B, D)`` crop-major, process-major."""
    local_rows, dim = local_columns.shape
    gathered = gather(local_columns)
    if gathered.shape != (world_size * local_rows, dim):
        raise ValueError(
            f"gather returned shape {tuple(gathered.shape)}, expected {(world_size * local_rows, dim)}: it must "
            f"concatenate the tensors of all world_size={world_size} processes along dim 0 in rank order"
        )
    batch = local_rows // num_target_crops
    per_process = gathered.reshape(world_size, num_target_crops, batch, dim)
    return per_process.transpose(0, 1).reshape(num_target_crops * world_size * batch, dim)


# ---------------------------------------------------------------------------------------------- public
@full_precision
def bam_positive_mask(
    batch_size: int,
    num_crops: int,
    num_target_crops: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """The positives of BAM: which entries compare two crops of the same image.

    Returns a bool tensor ``(num_crops * batch_size, num_target_crops * world_size * batch_size)``. Rows are
    the local crops of process ``rank`` (row ``v * B + i``); columns are the gathered target crops,
    crop-major then process-major (column ``t * W * B + q * B + j``). An entry is True iff ``q == rank``
    and ``j == i``: each row holds its image's T target crops.
    """
    _check_positive_mask_args(batch_size, num_crops, num_target_crops, rank, world_size)
    row_image = rank * batch_size + torch.arange(num_crops * batch_size, device=device) % batch_size
    images = world_size * batch_size
    column_image = torch.arange(num_target_crops * images, device=device) % images
    return row_image[:, None] == column_image[None, :]


@torch.no_grad()
@full_precision
def balanced_attention(
    similarity: Tensor,
    temperature: float = 0.05,
    num_iters: int = 3,
    positive_mask: Tensor | None = None,
    *,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """The balanced target of BAM: Sinkhorn scaling of ``exp(similarity / temperature)``, masked entries removed.

    Alternates ``num_iters`` times a column normalisation (first) and a row normalisation, then normalises
    the rows: rows sum to 1, columns are approximately balanced, masked entries are exactly 0. With
    ``num_iters=0`` this is the masked row softmax. The first column and row steps run in the log domain,
    where the kernel could underflow (small temperatures, outlier images); after them no row or column can
    vanish and the remaining steps are plain divisions (exact at any temperature, as fast as a multiplicative
    Sinkhorn). Computed in at least float32 (half inputs give float32); returns a constant (no graph).

    Args:
        similarity: ``(R, C)`` cosine similarities, rows = all crops, columns = the target crops.
        temperature: the entropic regularisation (official ``--reg``).
        num_iters: Sinkhorn iterations (column then row normalisation).
        positive_mask: ``(R, C)`` bool, True entries are removed; every row and column must keep one entry.
        all_reduce: ``all_reduce(tensor, op)`` over processes (``op`` in "sum", "max"). When given,
            ``similarity`` and ``positive_mask`` hold only this process's rows (all columns), and the result is
            this process's rows of the single-process result. Collectives: a "max" and a "sum" for the
            first column step, a "sum" for each later one; no host synchronisation.
    """
    _check_balanced_attention_args(similarity, temperature, num_iters, positive_mask)
    log_kernel = similarity.detach() / temperature  # a fresh tensor (at least float32: @full_precision)
    if positive_mask is not None:
        log_kernel = log_kernel.masked_fill(positive_mask, float("-inf"))
    if num_iters > 0:  # the first column step, the only place where exp(similarity / temperature) can underflow
        log_kernel.sub_(_column_logsumexp(log_kernel, all_reduce))
    kernel = torch.softmax(log_kernel, dim=1)  # the first row step (without iterations: the whole result)
    # Now every entry is <= 1 and every column keeps one >= 1 / (rows * columns) (its log-domain maximum was
    # >= -log(rows), the row sums were <= columns), and the plain steps below keep both bounds: no underflow.
    for _ in range(num_iters - 1):
        kernel.div_(_column_sum(kernel, all_reduce))
        kernel.div_(kernel.sum(dim=1, keepdim=True))
    return kernel


@torch.no_grad()
@full_precision
def bam_top_k_targets(targets: Tensor, num_global_crops: int, k: int) -> Tensor:
    """Keep, per image, the ``k`` target columns of largest mass averaged over its global crops.

    ``targets``: ``(G * n, C)`` target rows of the G global crops, crop-major. The same ``k`` columns are
    kept in every global crop's row of an image, the others set to 0, and every row is renormalised to 1.
    """
    _check_top_k_args(targets, num_global_crops, k)
    rows, columns = targets.shape
    per_crop = targets.reshape(num_global_crops, rows // num_global_crops, columns)
    best = per_crop.mean(dim=0).topk(k, dim=1).indices
    keep = torch.zeros(per_crop.shape[1:], dtype=torch.bool, device=targets.device).scatter(1, best, True)
    kept = torch.where(keep, per_crop, torch.zeros_like(per_crop))
    return (kept / kept.sum(dim=-1, keepdim=True)).reshape(rows, columns)


@full_precision
def attention_matching_loss(
    similarity: Tensor,
    targets: Tensor,
    num_global_crops: int,
    temperature: float = 0.1,
    positive_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Swapped cross-entropy between the balanced targets and the source self-attention.

    For every global crop ``t`` and every other crop ``s`` of the same image, ``l(t, s)`` is the mean over
    images of ``-sum_j targets[t, i, j] * log attention[s, i, j]`` over the unmasked columns; the loss is the
    mean over ``s != t``, then over ``t``. Gradients reach ``similarity`` only (``targets`` are constants);
    masked entries give neither loss nor gradient.

    Args:
        similarity: ``(V * n, C)`` source cosine similarities, all crops, crop-major.
        targets: ``(G * n, C)`` target rows of the G global crops (from ``balanced_attention``).
        num_global_crops: G.
        temperature: the softmax temperature of the source attention.
        positive_mask: ``(V * n, C)`` bool (``bam_positive_mask``) or None.

    Returns:
        ``{"loss": scalar, "attention": (V * n, C)}``, the attention being the masked row softmax (no graph).
    """
    images, crops = _check_matching_args(similarity, targets, num_global_crops, positive_mask)
    dtype = similarity.dtype  # at least float32 (@full_precision): half cannot carry similarity / 0.05
    logits = similarity / temperature
    if positive_mask is not None:  # the finite minimum after the division: exp gives 0, no -inf around
        logits = logits.masked_fill(positive_mask, torch.finfo(dtype).min)
    log_attention = torch.log_softmax(logits, dim=1)
    attention = log_attention.detach().exp()  # exactly 0 where masked: exp(finfo.min - logsumexp) underflows
    if positive_mask is not None:  # masked entries take no part in the cross-entropy sum
        log_attention = torch.where(positive_mask, torch.zeros_like(log_attention), log_attention)
    columns = similarity.shape[1]
    per_crop = log_attention.reshape(crops, images, columns)
    other_crops = per_crop.sum(dim=0) - per_crop[:num_global_crops]  # (G, n, C): sum over s != t
    target = targets.detach().to(dtype).reshape(num_global_crops, images, columns)
    loss = -(target * other_crops).sum() / (num_global_crops * (crops - 1) * images)
    return {"loss": loss, "attention": attention}


@full_precision
def bam_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor] | None = None,
    *,
    num_global_crops: int = 2,
    num_target_crops: int | None = None,
    softmax_temperature: float = 0.1,
    sinkhorn_temperature: float = 0.05,
    num_sinkhorn_iters: int = 3,
    positive_masking: bool = True,
    top_k: int = 0,
    gather: Gather | None = None,
    all_reduce: AllReduce | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """The BAM objective on a batch of V crops per image, computed in at least float32.

    Rows are the l2-normalised student outputs of all crops; columns are the first T crops of the student
    (no teacher: not detached, the student gets gradient through rows and columns) or of the teacher
    (constants). The targets are the balanced attention of the target side (teacher rows of all crops, or
    the detached source similarity) over all rows, keeping the G global crops' rows, optionally top-k.

    Args:
        student: V projector outputs ``(N, D)``, global crops first.
        teacher: None, or the EMA teacher's outputs for the same V crops.
        num_global_crops: G, the crops whose rows are targets.
        num_target_crops: T, the crops used as columns (None: G).
        softmax_temperature: temperature of the source attention.
        sinkhorn_temperature: temperature (entropic regularisation) of the balanced targets.
        num_sinkhorn_iters: Sinkhorn iterations.
        positive_masking: remove the entries comparing two crops of the same image.
        top_k: keep only the k best target columns per image (<= 0: off).
        gather, all_reduce, rank, world_size: distributed mode (all four together; not in the contract).
            ``student``/``teacher`` then hold this process's B images; the columns are gathered with
            ``gather`` (summed backward), the Sinkhorn column sums reduced with ``all_reduce``, and the
            loss is this process's share: its mean over processes is the loss of the global batch, and
            averaging the gradients over processes (DDP) gives its gradient.

    Returns:
        ``{"loss": scalar, "attention": (V * N, T * N), "targets": (G * N, T * N)}`` (under DDP: local
        rows of the gathered columns).
    """
    target_crops = num_global_crops if num_target_crops is None else num_target_crops
    _check_bam_loss_args(student, teacher, num_global_crops, target_crops, positive_masking, top_k, gather,
                         all_reduce, world_size)
    crops, batch = len(student), student[0].shape[0]

    dtype = student[0].dtype
    rows = F.normalize(torch.cat(list(student)).to(dtype), dim=-1)
    if teacher is None:
        target_rows = rows
    else:
        target_rows = F.normalize(torch.cat(list(teacher)).detach().to(dtype), dim=-1)
    columns = target_rows[: target_crops * batch]
    if gather is not None:
        columns = _gather_target_columns(columns, target_crops, gather, world_size)
    similarity = rows @ columns.T
    target_similarity = similarity.detach() if teacher is None else target_rows @ columns.T
    mask = None
    if positive_masking:
        mask = bam_positive_mask(batch, crops, target_crops, rank=rank, world_size=world_size, device=rows.device)
    targets = balanced_attention(
        target_similarity, sinkhorn_temperature, num_sinkhorn_iters, mask, all_reduce=all_reduce
    )[: num_global_crops * batch]
    if top_k > 0:
        targets = bam_top_k_targets(targets, num_global_crops, top_k)
    out = attention_matching_loss(similarity, targets, num_global_crops, softmax_temperature, mask)
    return {"loss": out["loss"], "attention": out["attention"], "targets": targets}
