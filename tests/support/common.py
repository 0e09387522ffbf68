"""Tiny model settings and a quiet CPU Trainer shared by the tests."""
from __future__ import annotations

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def quiet_trainer_kwargs(**overrides):
    """Trainer arguments for fast, silent CPU tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
