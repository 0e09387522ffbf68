"""Drawing helpers (``ssl_modules.drawing``): shapes, ranges and the pixels they promise."""
from __future__ import annotations

import torch

from ssl_modules.drawing import (IMAGENET_MEAN, IMAGENET_STD, colorize_labels, denormalize, label_palette,
                                   segmentation_comparison, tile)


def test_denormalize_inverts_the_imagenet_normalisation_and_clamps():
    picture = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(denormalize((picture - mean) / std), picture, atol=1e-6)
    assert denormalize(torch.full((3, 2, 2), 100.0)).max() == 1.0


def test_palette_is_fixed_and_starts_like_pascal_voc():
    palette = label_palette(4)
    assert torch.equal(palette, label_palette(4))
    assert torch.allclose(palette * 255, torch.tensor([[0.0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]))


def test_colorize_paints_each_label_with_its_colour_and_ignored_pixels_white():
    labels = torch.tensor([[0, 1], [2, 255]])
    picture = colorize_labels(labels, num_labels=3)
    palette = label_palette(3)
    assert picture.shape == (3, 2, 2)
    assert torch.equal(picture[:, 0, 1], palette[1]) and torch.equal(picture[:, 1, 0], palette[2])
    assert torch.equal(picture[:, 1, 1], torch.ones(3))


def test_tile_and_segmentation_comparison_shapes():
    assert tile([torch.rand(3, 4, 4)] * 5, nrow=2, padding=1).shape == (3, 1 + 3 * 5, 1 + 2 * 5)
    mask = torch.tensor([[0, 1], [1, 255]])
    row = segmentation_comparison(torch.zeros(3, 6, 6), mask, torch.ones(2, 2, dtype=torch.long), num_labels=2)
    assert row.shape == (3, 6 + 4, 3 * 6 + 8) and row.min() >= 0 and row.max() <= 1
