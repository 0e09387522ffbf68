"""BAM functional core: positive masks, the balanced (Sinkhorn) attention target, top-k targets and the
attention-matching loss (contract: ``shared/parity/bam/README.md``).

Layout: a multi-view input is a list of V tensors ``(N, D)``, global crops first; stacked matrices are
crop-major (row ``v * N + n`` is crop ``v`` of image ``n``); columns are the first T crops of every image.

For DDP, ``bam_loss`` takes ``gather``/``all_reduce`` callables and the process's ``rank`` and
``world_size``: each process then keeps only its own rows (the official scheme) while the columns, the
Sinkhorn column sums and its shift span every process.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bam_positive_mask",
    "balanced_attention",
    "bam_top_k_targets",
    "attention_matching_loss",
    "bam_loss",
]

AllReduce = Callable[[Tensor, str], Tensor]
Gather = Callable[[Tensor], Tensor]


def bam_positive_mask(
    batch_size: int, num_crops: int, num_target_crops: int, *, rank: int = 0, world_size: int = 1, device=None
) -> Tensor:
    """Which entries compare two crops of the same image: ``(V * B, T * W * B)`` bool.

    Rows are this process's crops (row ``v * B + i``); columns are the gathered target crops, crop-major
    then process-major (column ``t * W * B + q * B + j``). ``mask[v*B+i, t*W*B+q*B+j] = (q == rank and j == i)``.
    """
    if batch_size < 1 or num_crops < 1 or num_target_crops < 1:
        raise ValueError("batch_size, num_crops and num_target_crops must be >= 1")
    if num_target_crops > num_crops:
        raise ValueError(f"num_target_crops ({num_target_crops}) cannot exceed num_crops ({num_crops})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    row_image = torch.arange(num_crops * batch_size, device=device) % batch_size
    column = torch.arange(num_target_crops * world_size * batch_size, device=device) % (world_size * batch_size)
    column_image = torch.where(column // batch_size == rank, column % batch_size, -1)
    return row_image[:, None] == column_image[None, :]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32: the Sinkhorn logits ``S / 0.05`` need more than half precision carries."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _column_logsumexp(logits: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """``logsumexp`` over the rows of every column, over the rows of all processes when distributed."""
    if all_reduce is None:
        return torch.logsumexp(logits, dim=0, keepdim=True)
    peak = all_reduce(logits.amax(dim=0, keepdim=True), "max")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = all_reduce(torch.exp(logits - peak).sum(dim=0, keepdim=True), "sum")
    return peak + torch.log(total)


@torch.no_grad()
def balanced_attention(
    similarity: Tensor, temperature: float = 0.05, num_iters: int = 3, positive_mask: Tensor | None = None,
    *, all_reduce: AllReduce | None = None,
) -> Tensor:
    """The balanced target: Sinkhorn scaling of ``exp(similarity / temperature)`` without masked entries.

    Starts with a column normalisation, alternates ``num_iters`` times (columns, then rows) and returns the
    row-normalised result (rows sum to 1, masked entries exactly 0, no autograd graph). Computed in the log
    domain, which is exact and cannot underflow at small temperatures; half-precision inputs are computed
    and returned in float32. With ``all_reduce(tensor, op)`` each process passes only its rows and the
    column sums run over all processes.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (R, C), got shape {tuple(similarity.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    logits = similarity.detach().to(_compute_dtype(similarity)) / temperature
    if positive_mask is not None:
        if positive_mask.shape != similarity.shape:
            raise ValueError(f"positive_mask must have shape {tuple(similarity.shape)}, got {tuple(positive_mask.shape)}")
        logits = logits.masked_fill(positive_mask, float("-inf"))
    for _ in range(num_iters):
        logits = logits - _column_logsumexp(logits, all_reduce)
        logits = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def bam_top_k_targets(targets: Tensor, num_global_crops: int, k: int) -> Tensor:
    """Keep, per image, the ``k`` target columns of largest mean mass over its global crops; renormalise."""
    rows, columns = targets.shape
    if num_global_crops < 1 or rows % num_global_crops:
        raise ValueError(f"targets rows ({rows}) must be a multiple of num_global_crops ({num_global_crops})")
    if not 1 <= k <= columns:
        raise ValueError(f"top_k must lie in [1, {columns}] (the number of target columns), got {k}")
    per_crop = targets.reshape(num_global_crops, rows // num_global_crops, columns)
    keep = torch.zeros_like(per_crop[0], dtype=torch.bool)
    keep.scatter_(1, per_crop.mean(0).topk(k, dim=1).indices, True)
    kept = torch.where(keep, per_crop, torch.zeros_like(per_crop))
    return (kept / kept.sum(dim=-1, keepdim=True)).reshape(rows, columns)


def _split_counts(rows: int, targets_rows: int, num_global_crops: int) -> tuple[int, int]:
    if num_global_crops < 1 or targets_rows % num_global_crops:
        raise ValueError(f"targets rows ({targets_rows}) must be a multiple of num_global_crops ({num_global_crops})")
    images = targets_rows // num_global_crops
    if images == 0 or rows % images:
        raise ValueError(f"similarity rows ({rows}) must be a multiple of the number of images ({images})")
    crops = rows // images
    if crops < 2 or num_global_crops > crops:
        raise ValueError(f"need 2 <= V and num_global_crops <= V, got V={crops}, G={num_global_crops}")
    return images, crops


def attention_matching_loss(
    similarity: Tensor, targets: Tensor, num_global_crops: int, temperature: float = 0.1,
    positive_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Swapped cross-entropy between the balanced targets of every global crop and the attention of every
    other crop of the same image. Returns ``loss`` and ``attention`` (the masked row softmax)."""
    images, crops = _split_counts(similarity.shape[0], targets.shape[0], num_global_crops)
    if targets.shape[1] != similarity.shape[1]:
        raise ValueError(f"targets have {targets.shape[1]} columns, similarity {similarity.shape[1]}")
    logits = similarity / temperature
    if positive_mask is not None:
        logits = logits.masked_fill(positive_mask, torch.finfo(logits.dtype).min)
    log_attention = torch.log_softmax(logits, dim=1)
    if positive_mask is not None:  # masked entries take no part in the sum (and send no gradient)
        log_attention = torch.where(positive_mask, torch.zeros_like(log_attention), log_attention)
    columns = similarity.shape[1]
    source = log_attention.reshape(crops, images, columns)
    target = targets.detach().to(log_attention.dtype).reshape(num_global_crops, images, columns)
    cross = -torch.einsum("tic,sic->ts", target, source) / images  # (G, V): l(t, s)
    off_self = ~torch.eye(num_global_crops, crops, dtype=torch.bool, device=cross.device)
    loss = (cross * off_self).sum(dim=1).div(crops - 1).mean()
    return {"loss": loss, "attention": torch.softmax(logits.detach(), dim=1)}


def _gathered_columns(local_columns: Tensor, num_target_crops: int, gather: Gather, world_size: int) -> Tensor:
    """Gather ``(T * B, D)`` crop-major target rows of every process into crop-major, process-major order."""
    gathered = gather(local_columns)  # (W * T * B, D): process-major
    batch = local_columns.shape[0] // num_target_crops
    return gathered.reshape(world_size, num_target_crops, batch, -1).transpose(0, 1).reshape(-1, local_columns.shape[1])


def bam_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor] | None = None, *, num_global_crops: int = 2,
    num_target_crops: int | None = None, softmax_temperature: float = 0.1, sinkhorn_temperature: float = 0.05,
    num_sinkhorn_iters: int = 3, positive_masking: bool = True, top_k: int = 0,
    gather: Gather | None = None, all_reduce: AllReduce | None = None, rank: int = 0, world_size: int = 1,
) -> dict[str, Tensor]:
    """The BAM objective. Returns ``loss``, ``attention`` (rows x columns) and ``targets`` (global rows).

    ``student``: V projector outputs ``(N, D)``, global crops first; ``teacher``: None or the EMA teacher's
    outputs for the same V crops (constants). Without a teacher the columns are the student's own target
    crops and carry gradient. With ``gather``/``all_reduce``/``rank``/``world_size`` the inputs are this
    process's images only; the columns are gathered (``gather`` must sum gradients over processes in its
    backward) and the Sinkhorn spans all processes; the loss is this process's share (average it over
    processes, as DDP does with the gradients, to get the single-process loss of the global batch).
    """
    crops = len(student)
    if crops < 2:
        raise ValueError(f"bam_loss needs at least 2 crops, got {crops}")
    if teacher is not None and len(teacher) != crops:
        raise ValueError(f"teacher must give the same {crops} crops as the student, got {len(teacher)}")
    targets_per_image = num_target_crops or num_global_crops
    if not 1 <= num_global_crops <= crops or not 1 <= targets_per_image <= crops:
        raise ValueError(f"need 1 <= num_global_crops, num_target_crops <= {crops} crops")
    batch = student[0].shape[0]
    if any(s.shape[0] != batch for s in student):
        raise ValueError(f"all crops must have the same number of images, got {[s.shape[0] for s in student]}")
    if positive_masking and batch * world_size < 2:
        raise ValueError(
            "positive masking leaves nothing to attend to with a single image in the global batch: "
            "use at least 2 images per global batch"
        )
    dtype = _compute_dtype(student[0])
    rows = F.normalize(torch.cat(list(student)).to(dtype), dim=-1)
    if teacher is None:
        target_rows = rows
    else:
        target_rows = F.normalize(torch.cat(list(teacher)).detach().to(dtype), dim=-1)
    local_columns = target_rows[: targets_per_image * batch]
    if gather is not None:
        columns = _gathered_columns(local_columns, targets_per_image, gather, world_size)
    else:
        columns = local_columns
    if top_k > 0 and top_k > columns.shape[0]:
        raise ValueError(f"top_k ({top_k}) exceeds the {columns.shape[0]} target columns: lower top_k or raise the batch")
    similarity = rows @ columns.T
    target_similarity = similarity.detach() if teacher is None else target_rows @ columns.T
    mask = None
    if positive_masking:
        mask = bam_positive_mask(batch, crops, targets_per_image, rank=rank, world_size=world_size,
                                 device=similarity.device)
    targets = balanced_attention(target_similarity, sinkhorn_temperature, num_sinkhorn_iters, mask,
                                 all_reduce=all_reduce)[: num_global_crops * batch]
    if top_k > 0:
        targets = bam_top_k_targets(targets, num_global_crops, top_k)
    out = attention_matching_loss(similarity, targets, num_global_crops, softmax_temperature, mask)
    return {"loss": out["loss"], "attention": out["attention"], "targets": targets}
