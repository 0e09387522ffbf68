import pytest
import torch

from ssl_modules.methods.baselines import RawPixels


def test_raw_pixels_embed_the_pixels_on_the_patch_grid():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    features = RawPixels(patch_size=8, pooled_size=2).embed(images)
    assert features.grid == (2, 2) and features.dense.shape == (2, 4, 3 * 8 * 8)
    # cell (0, 1) of image 0 holds exactly the pixels of rows 0..7, columns 8..15
    torch.testing.assert_close(features.dense[0, 1].reshape(3, 8, 8), images[0, :, :8, 8:])
    torch.testing.assert_close(features.global_[0].reshape(3, 2, 2)[:, 1, 0], images[0, :, 8:, :8].mean(dim=(1, 2)))


def test_raw_pixels_reject_images_that_do_not_split_into_patches():
    with pytest.raises(ValueError, match="multiples of 8"):
        RawPixels(patch_size=8).embed(torch.zeros(1, 3, 12, 16))


def test_raw_pixels_cannot_be_trained_or_exported(tmp_path):
    module = RawPixels()
    with pytest.raises(RuntimeError, match="validate"):
        module.training_step(None, 0)
    with pytest.raises(RuntimeError, match="no weights"):
        module.export_backbone(tmp_path / "b.pt")
