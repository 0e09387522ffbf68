"""Drawing helpers (``ssl_modules.visualize``): shapes, ranges and the pixels they promise."""
from __future__ import annotations

import torch

from ssl_modules.visualize import (IMAGENET_MEAN, IMAGENET_STD, colorize_labels, denormalize, draw_matches, heatmap,
                                   label_palette, overlay_labels, segmentation_comparison, tile)


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


def test_overlay_blends_nearest_upsampled_labels_over_the_image():
    image = torch.zeros(3, 4, 4)
    labels = torch.tensor([[1, 0], [0, 0]])
    picture = overlay_labels(image, labels, alpha=0.5, num_labels=2)
    assert picture.shape == (3, 4, 4)
    assert torch.allclose(picture[:, :2, :2], 0.5 * label_palette(2)[1][:, None, None].expand(3, 2, 2))
    assert torch.equal(picture[:, 2:, 2:], torch.zeros(3, 2, 2))


def test_heatmap_maps_min_and_max_to_distinct_colours_in_range():
    picture = heatmap(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), size=8)
    assert picture.shape == (3, 8, 8) and picture.min() >= 0 and picture.max() <= 1
    assert not torch.equal(picture[:, 0, 0], picture[:, -1, -1])


def test_draw_matches_puts_the_crops_side_by_side_with_a_line_between_matched_cells():
    crop_a, crop_b = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    picture = draw_matches(crop_a, crop_b, (2, 2), (2, 2), torch.tensor([0]), torch.tensor([3]), normalized=False)
    assert picture.shape == (3, 8, 16)
    assert picture[:, 2, 2].sum() > 0 and picture[:, 6, 14].sum() > 0  # the two cell centres
    assert picture[:, 4, 8].sum() > 0  # the line crosses the seam


def test_tile_and_segmentation_comparison_shapes():
    assert tile([torch.rand(3, 4, 4)] * 5, nrow=2, padding=1).shape == (3, 1 + 3 * 5, 1 + 2 * 5)
    mask = torch.tensor([[0, 1], [1, 255]])
    row = segmentation_comparison(torch.zeros(3, 6, 6), mask, torch.ones(2, 2, dtype=torch.long), num_labels=2)
    assert row.shape == (3, 6 + 4, 3 * 6 + 8) and row.min() >= 0 and row.max() <= 1
