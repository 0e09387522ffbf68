"""The k-NN probe's search and vote with faiss-cpu against a plain torch implementation, in one run.

    python benchmarks/knn_probe.py                      # 10k queries x 50k bank x 384 dims (the issue's size)
    python benchmarks/knn_probe.py --sweep              # also smaller banks (where ``backend="auto"`` switches)
    python benchmarks/knn_probe.py --threads 16

Both paths do exactly what ``KNNProbe`` does after embedding: exact top-k cosine search (features are
l2-normalised), weighted vote ``exp(sim / T)`` and top-1/top-5 accuracy. "faiss" is ``IndexFlatIP``
(building the index included); "torch" is chunked ``queries @ bank.T`` + ``topk`` (the probe's torch backend,
what a plain torch k-NN does). The data are random class-clustered vectors, so both must agree on accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_modules.evaluation.knn import weighted_knn_scores  # noqa: E402
from ssl_modules.evaluation.search import FlatIndex  # noqa: E402


def clustered_features(centres: torch.Tensor, count: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around the centre of their class (so k-NN has something to find)."""
    classes, dim = centres.shape
    labels = torch.randint(classes, (count,), generator=generator)
    features = centres[labels] + 2.0 * torch.randn(count, dim, generator=generator)
    return F.normalize(features, dim=1), labels


def knn_accuracy(backend: str, queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor,
                 bank_labels: torch.Tensor, k: int, classes: int) -> tuple[float, float, float]:
    """(seconds, top-1, top-5) of the probe's k-NN on ``backend``."""
    start = time.perf_counter()
    similarities, neighbours = FlatIndex(bank, backend).search(queries, k)
    scores = weighted_knn_scores(similarities, bank_labels[neighbours], classes, 0.07)
    top5 = scores.topk(5, dim=1).indices
    seconds = time.perf_counter() - start
    top1 = (top5[:, 0] == query_labels).float().mean().item()
    top5_accuracy = (top5 == query_labels[:, None]).any(dim=1).float().mean().item()
    return seconds, top1, top5_accuracy


def compare(queries: int, bank: int, dim: int, classes: int, k: int, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=generator)
    bank_x, bank_y = clustered_features(centres, bank, generator)
    query_x, query_y = clustered_features(centres, queries, generator)
    results = {}
    for backend in ("faiss", "torch"):
        knn_accuracy(backend, query_x[:256], query_y[:256], bank_x, bank_y, k, classes)  # warm-up
        runs = [knn_accuracy(backend, query_x, query_y, bank_x, bank_y, k, classes) for _ in range(repeats)]
        results[backend] = (min(r[0] for r in runs), runs[0][1], runs[0][2])
    faiss_s, torch_s = results["faiss"][0], results["torch"][0]
    print(f"{queries:>6} queries x {bank:>6} bank x {dim} dims, k={k}: "
          f"faiss {faiss_s:7.3f} s | torch {torch_s:7.3f} s | torch / faiss = {torch_s / faiss_s:5.2f} | "
          f"top-1 {results['faiss'][1]:.4f} / {results['torch'][1]:.4f}, "
          f"top-5 {results['faiss'][2]:.4f} / {results['torch'][2]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    parser.add_argument("--sweep", action="store_true", help="also smaller searches (where backend='auto' switches)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sizes = [(256, 256), (1_000, 1_000), (10_000, 1_000), (10_000, 4_000)] if args.sweep else []
    for queries, bank in sizes + [(args.queries, args.bank)]:
        compare(queries, bank, args.dim, args.classes, args.k, args.repeats)


if __name__ == "__main__":
    main()
