"""A minimal method on the shared parts, for testing the foundation through a real Trainer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from support.common import TINY_VIT
from ssl_modules.methods.base import SSLModule
from ssl_modules.networks.heads import MLP
from ssl_modules.methods.multicrop import encode_views
from ssl_modules.methods.teacher import TeacherEMA


class ToyDistill(TeacherEMA, SSLModule):
    """Student view 0 regresses the teacher's view 1 (enough to move every parameter)."""

    def __init__(self, head_dim: int = 16, ema_momentum: float = 0.9, ema_update: str = "after_step", **kwargs) -> None:
        kwargs.setdefault("backbone", "vit_tiny_patch16_224")
        kwargs.setdefault("backbone_kwargs", dict(TINY_VIT))
        kwargs.setdefault("warmup_epochs", 1.0)
        super().__init__(**kwargs)
        self.head = MLP(self.backbone.num_features, [32, head_dim], activation="gelu")
        self.init_teacher(["backbone", "head"], ema_momentum, update=ema_update)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        crops = [images, images.flip(-1)]
        student = encode_views(self.backbone, crops)
        with torch.no_grad():
            teacher = encode_views(self.teacher["backbone"], crops)
        loss = F.mse_loss(self.head(student[0].global_), self.teacher["head"](teacher[1].global_))
        self.log_terms({"loss": loss})
        return loss


def toy_loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, shuffle=False)
