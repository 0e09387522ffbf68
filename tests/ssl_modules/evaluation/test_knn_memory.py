"""The k-NN protocol's memory: the feature bank is one float32 matrix of its own, allocated once, with one
normalised copy for the search (as DINO's ``eval_knn.py``), and a query chunk's similarity matrix is bounded.
``benchmarks/knn_memory.py`` measures the peak beside DINO's script; these tests catch the obvious regressions
(a kept batch of tokens, a list of batches concatenated, a reordered copy) without timing or absolute memory."""
from __future__ import annotations

import pytest
import torch
from support.evaldata import imagenet_tree, tiny_vit
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_modules.evaluation import knn
from ssl_modules.evaluation.datasets import imagenet_split
from ssl_modules.evaluation.features import Extractor, global_vector
from ssl_modules.evaluation.knn import KNNSettings, knn_classify, query_chunk, run_knn
from ssl_modules.evaluation.transforms import normalise, resize_centre_crop

TRAIN_IMAGES, WIDTH = 15, 64  # imagenet_tree's train split (3 classes x 5) and tiny_vit's width


class BankAllocations(TorchDispatchMode):
    """Counts the distinct storages of at least ``rows x columns`` float32 entries that ops return with the shape
    ``(rows, columns)`` (views of one matrix count once; every storage is kept alive, so none is reused)."""

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        self.shape, self.storages = (rows, columns), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                storage = tensor.untyped_storage()
                if storage.nbytes() >= self.shape[0] * self.shape[1] * 4:
                    self.storages.setdefault(storage.data_ptr(), tensor)
        return out

    @property
    def count(self) -> int:
        return len(self.storages)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(imagenet_tree(tmp_path_factory.mktemp("knn_memory")))


def train_set(root: str):
    return imagenet_split(root, "train", lambda image, index: normalise(resize_centre_crop(image, 32)))


def test_a_vit_global_vector_owns_its_storage_instead_of_the_batch_tokens():
    with torch.no_grad():
        features = tiny_vit()(torch.randn(4, 3, 32, 32))
    assert features.global_.untyped_storage().nbytes() > 4 * WIDTH * 4  # the CLS token is a view of all tokens
    vector = global_vector(features)
    assert vector.dtype == torch.float32
    assert vector.untyped_storage().nbytes() == 4 * WIDTH * 4
    assert torch.equal(vector, features.global_)


def test_the_extracted_bank_is_one_float32_matrix_allocated_once(root):
    extractor = Extractor(tiny_vit(), batch_size=4, show_progress=False)
    with BankAllocations(TRAIN_IMAGES, WIDTH) as tracer:
        bank, labels = extractor.extract(train_set(root), global_vector)
    assert tracer.count == 1
    assert bank.dtype == torch.float32 and bank.shape == (TRAIN_IMAGES, WIDTH)
    assert bank.untyped_storage().nbytes() == TRAIN_IMAGES * WIDTH * 4
    assert labels.tolist() == sorted(labels.tolist())  # dataset order (the classes' folders in order)


def test_the_knn_protocol_holds_the_bank_and_one_normalised_copy(root):
    extractor = Extractor(tiny_vit(), batch_size=4, show_progress=False)
    with BankAllocations(TRAIN_IMAGES, WIDTH) as tracer:
        run_knn(extractor, root, KNNSettings(ks=(1, 3), image_size=32))
    assert tracer.count == 2


def test_a_query_chunk_holds_at_most_the_similarity_budget():
    assert query_chunk(10, 1024) == 1024
    assert query_chunk(knn.SIMILARITY_ELEMENTS // 100, 1024) == 100
    assert query_chunk(knn.SIMILARITY_ELEMENTS * 4, 1024) == 1
    with pytest.raises(ValueError, match="chunk=0"):
        query_chunk(10, 0)


def test_smaller_query_chunks_give_the_same_counts(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=generator), torch.randn(20, 8, generator=generator)
    bank_labels, labels = torch.randint(4, (50,), generator=generator), torch.randint(4, (20,), generator=generator)
    whole = knn_classify(bank, bank_labels, queries, labels, 4, (1, 5, 20), 0.07)
    monkeypatch.setattr(knn, "SIMILARITY_ELEMENTS", 50 * 3)  # 3 queries per chunk
    assert knn.query_chunk(50, 1024) == 3
    assert knn_classify(bank, bank_labels, queries, labels, 4, (1, 5, 20), 0.07) == whole
