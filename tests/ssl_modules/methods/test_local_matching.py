import torch

from datamodules import Views
from ssl_modules.methods.local_matching import cell_locations, match_cells


def _views(flipped: bool) -> Views:
    # a 200 x 400 px seed image; the crop covers rows 20..120 and columns 100..300
    boxes = torch.tensor([[[0.1, 0.25, 0.6, 0.75]]])
    return Views([torch.zeros(1, 3, 64, 64)], boxes, torch.tensor([[flipped]]), torch.tensor([[200.0, 400.0]]),
                 torch.tensor([-1]), torch.tensor([0]))


def test_cell_locations_of_an_unflipped_crop_in_seed_pixels():
    loc = cell_locations(_views(False), 0, (2, 2))
    # 2 x 2 tiles of 50 x 100 px: centres at y 45 / 95, x 150 / 250
    expected = torch.tensor([[45.0, 150.0], [45.0, 250.0], [95.0, 150.0], [95.0, 250.0]])
    torch.testing.assert_close(loc[0], expected)


def test_cell_locations_of_a_flipped_crop_mirror_the_columns():
    loc = cell_locations(_views(True), 0, (2, 2))
    expected = torch.tensor([[45.0, 250.0], [45.0, 150.0], [95.0, 250.0], [95.0, 150.0]])
    torch.testing.assert_close(loc[0], expected)
    ignoring = cell_locations(_views(True), 0, (2, 2), flip_aware=False)
    torch.testing.assert_close(ignoring[0], expected[[1, 0, 3, 2]])


def test_location_matching_pairs_the_same_place():
    views = _views(False)
    loc = cell_locations(views, 0, (2, 2))
    match = match_cells(loc, loc.flip(1), 2)
    assert torch.equal(match["candidate_index"][0], 3 - match["query_index"][0])
