"""PyTorch Lightning modules for self-supervised learning of dense and object-level visual features."""
from .backbones import Backbone, Features
from .base import SSLModule

__all__ = ["SSLModule", "Backbone", "Features"]
