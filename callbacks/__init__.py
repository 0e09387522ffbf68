"""Online probes that run during pretraining, and visual diagnostics for TensorBoard.

Every probe is an independent ``Callback`` built from typed arguments (so a LightningCLI YAML can name it),
reads the backbone only through ``pl_module.embed(images) -> Features``, takes its data from its ``data``
argument or the trainer's datamodule (the probe-data protocol of ``callbacks.data``), works under DDP with
every process logging the same value, and keeps its state in the Lightning checkpoint.
"""
from ssl_modules.methods.contrastive_crop import ContrastiveCrop
from .diagnostics import VisualDiagnostics
from .knn import KNNProbe
from .linear import OnlineLinearProbe
from .paper import PaperProtocolProbe
from .retrieval import DenseRetrievalProbe
from .segmentation import VOCSegmentationProbe

__all__ = ["OnlineLinearProbe", "KNNProbe", "VOCSegmentationProbe", "DenseRetrievalProbe", "VisualDiagnostics",
           "PaperProtocolProbe", "ContrastiveCrop"]
