"""The VOC probe's head."""
from __future__ import annotations

import torch

from callbacks.segmentation import LinearSegmentationHead


def test_segmentation_head_is_batchnorm_then_1x1_convolution():
    head = LinearSegmentationHead(6, 4, torch.Generator().manual_seed(0)).eval()
    features = torch.randn(2, 6, 3, 5)
    normalised = head.norm(features)
    expected = torch.einsum("bchw,kc->bkhw", normalised, head.classifier.weight[:, :, 0, 0])
    assert torch.allclose(head(features), expected + head.classifier.bias[None, :, None, None], atol=1e-6)
