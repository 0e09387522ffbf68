"""Each method's diagnostics picture answers its question at a readable size, with what it shows written on it.

Rendered on tiny models and random views (the callback that logs them is tested in tests/callbacks)."""
from __future__ import annotations

import pytest
import torch
from support.common import TINY_VIT

from ssl_modules import BAM, CrIBo, VICRegL
from ssl_modules.functional import bam_positive_mask
from ssl_modules.testing import random_views
from ssl_modules.drawing import PANEL, attention_picture, cluster_palette, crop_and_clusters, denormalize

MIN_CAPTION = 2 * 16 + 4  # at least two caption lines of 12 px text (long lines wrap)


def caption_height(picture: torch.Tensor, body_height: int) -> int:
    """The height of the caption band above a picture body of known height."""
    height = picture.shape[1] - body_height
    assert height >= MIN_CAPTION and (height - 4) % 16 == 0, f"caption band of {height} px"
    return height


def has_text(region: torch.Tensor) -> bool:
    """Dark pixels on the white background: something is written there."""
    return bool((region.max(dim=0).values < 0.3).any())


def as_colour(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 255


def tiny_cribo() -> CrIBo:
    return CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=64, object_out_dim=64,
                 head_hidden_dim=64, head_bottleneck_dim=32, num_clusters=4, queue_size=16)


# --------------------------------------------------------------------------------------------------- CrIBo

def test_crop_and_clusters_puts_the_crop_beside_its_clusters_with_the_same_boundaries():
    crop = torch.rand(3, 32, 32)
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:, 2:] = 1
    labels[3, :] = 2
    picture = crop_and_clusters(crop, labels, num_labels=3)
    assert picture.shape == (3, PANEL, 2 * PANEL)
    left, right = picture[..., :PANEL], picture[..., PANEL:]
    white = (left == 1).all(dim=0)
    assert torch.equal(white, (right == 1).all(dim=0))  # one set of boundaries on both halves
    assert white.any() and white.float().mean() < 0.1
    upscaled = crop.repeat_interleave(3, 1).repeat_interleave(3, 2)
    assert torch.equal(left[:, ~white], upscaled[:, ~white])  # the left half is the crop itself
    palette = cluster_palette(3)
    # The right half holds the palette colour of each cell's label, sharp (no blending with the crop).
    for (row, col), label in (((10, 10), 0), ((10, 80), 1), ((90, 40), 2)):
        assert torch.equal(right[:, row, col], palette[label])


def test_cluster_palette_colours_are_bright_and_far_apart():
    palette = cluster_palette(8)
    distances = torch.cdist(palette, palette) + torch.eye(8) * 10
    assert distances.min() > 0.25 and palette.max(dim=1).values.min() >= 0.75


def test_cribo_picture_shows_every_image_as_crop_and_clusters_for_both_views():
    module = tiny_cribo()
    views = random_views(6, [32, 32])
    pictures = module.visual_diagnostics(views, max_images=4)
    picture = pictures["cribo/object_clusters"]
    width = 2 * (2 * PANEL + 4)
    CAPTION = caption_height(picture, 18 + 4 * (PANEL + 4))
    assert picture.shape[::2] == (3, width)
    assert 0 <= picture.min() and picture.max() <= 1
    assert has_text(picture[:, :CAPTION]) and has_text(picture[:, CAPTION:CAPTION + 18])  # caption, titles
    crops = denormalize(views.crops[0][:4])
    top = CAPTION + 18
    for i in range(4):
        panel = picture[:, top + i * (PANEL + 4): top + i * (PANEL + 4) + PANEL, :PANEL]
        upscaled = crops[i].repeat_interleave(3, 1).repeat_interleave(3, 2)
        inside = ~(panel == 1).all(dim=0)
        assert torch.allclose(panel[:, inside], upscaled[:, inside], atol=1 / 255)  # image i's crop, in order
        clusters = picture[:, top + i * (PANEL + 4): top + i * (PANEL + 4) + PANEL, PANEL:2 * PANEL]
        colours = clusters.reshape(3, -1).T.unique(dim=0)
        allowed = torch.cat([cluster_palette(4), torch.ones(1, 3)])
        assert (torch.cdist(colours, allowed).min(dim=1).values < 1e-6).all()  # only cluster colours and white


# ------------------------------------------------------------------------------------------------- VICRegL

def tiny_vicregl() -> VICRegL:
    return VICRegL("convnext_atto", num_matches=(3, 2), expander_widths="64-64-64", projector_widths="32-32-32",
                   backbone_kwargs=dict(drop_path_rate=0.0))


def test_vicregl_draws_the_learned_feature_matches_beside_the_geometric_ones():
    module = tiny_vicregl()
    views = random_views(2, [64, 64, 32])
    matches = module.diagnostic_matches(views)
    assert matches["grids"] == [(2, 2), (2, 2)]
    assert len(matches["location"][0]) == len(matches["feature"][0]) == 3  # num_matches[0] of 4 cells each
    picture = module.visual_diagnostics(views)["vicregl/matches"]
    size, gap, title = 2 * PANEL, 24, 18
    CAPTION = caption_height(picture, 2 * (size + title))
    assert picture.shape[::2] == (3, 2 * size + gap)
    assert has_text(picture[:, :CAPTION])
    green, red, yellow = as_colour((0, 200, 0)), as_colour((230, 0, 0)), as_colour((255, 220, 0))

    def centre(row: int, cell: int) -> torch.Tensor:
        r, c = divmod(int(cell), 2)
        y = CAPTION + row * (size + title) + title + int((r + 0.5) * size / 2)
        return picture[:, y, int((c + 0.5) * size / 2)]

    for cell in matches["location"][0]:  # top row: geometric matches, one colour
        assert torch.allclose(centre(0, cell), yellow, atol=1e-6)
    for cell in matches["feature"][0]:  # bottom row: learned matches, green = agrees
        assert any(torch.allclose(centre(1, cell), c, atol=1e-6) for c in (green, red))
    # The cells are outlined (grey grid lines between the cells of each crop).
    assert torch.allclose(picture[:, CAPTION + title + size // 2 + 5, size // 2 - 1], torch.full((3,), 90 / 255))


# ----------------------------------------------------------------------------------------------------- BAM

def test_attention_picture_labels_its_axes_outlines_the_crop_blocks_and_marks_the_positives():
    batch, crops, targets = 4, 3, 2
    matrix = torch.rand(crops * batch, targets * batch)
    positives = bam_positive_mask(batch, crops, targets)
    picture = attention_picture(matrix, positives, batch, "title")
    cell, left, top = 16, 64, 34
    CAPTION = caption_height(picture, top + crops * batch * cell + 4)
    body = picture[:, CAPTION:]
    assert body.shape[::2] == (3, left + targets * batch * cell + 4)
    assert has_text(picture[:, :CAPTION])
    for v in range(crops):  # every row block is labelled at its start
        assert has_text(body[:, top + v * batch * cell: top + v * batch * cell + 24, :left])
    for t in range(targets):  # every column block is labelled above it
        assert has_text(body[:, top - 14: top, left + t * batch * cell: left + (t + 1) * batch * cell])
    # White lines between the blocks, inside the matrix.
    assert torch.equal(body[:, top + batch * cell, left + 3], torch.ones(3))
    # Positives: grey with a black dot; other entries coloured by value.
    r, c = positives.nonzero()[0].tolist()
    y, x = top + r * cell + cell // 2, left + c * cell + cell // 2
    assert torch.allclose(body[:, y, x], torch.zeros(3)) and torch.allclose(body[:, y - 5, x - 5],
                                                                          torch.full((3,), 0.55), atol=1 / 255)


def test_bam_pictures_are_the_attention_and_the_targets_of_the_first_images():
    module = BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="64-64-32", top_k=8)
    pictures = module.visual_diagnostics(random_views(6, [32, 32, 16]), max_images=4)
    assert set(pictures) == {"bam/attention", "bam/targets"}
    attention, targets = pictures["bam/attention"], pictures["bam/targets"]
    cell = 16  # 12 rows (3 crops x 4 images), 8 columns
    caption_height(attention, 34 + 12 * cell + 4)
    caption_height(targets, 34 + 8 * cell + 4)  # the 2 global crops' rows
    assert attention.shape[-1] == targets.shape[-1] == 64 + 8 * cell + 4


@pytest.mark.parametrize("masking", [False])
def test_bam_without_positive_masking_marks_no_positive(masking):
    module = BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths="64-64-32", top_k=8,
                 positive_masking=masking)
    picture = module.visual_diagnostics(random_views(4, [32, 32]))["bam/attention"]
    body = picture[:, caption_height(picture, 34 + 4 * 16 + 4) + 34: -4, 64: -4]
    grey = (body - 0.55).abs().max(dim=0).values < 1 / 255
    assert not grey.any()
