"""Where every feature cell of every crop sits in the seed image, from the batch's crop geometry.

Locations are the centres of the ``h x w`` equal tiles of each crop's box, in pixels of the seed image
(``Views.boxes * Views.image_size``): pixel units keep y and x on one scale for non-square images. A flipped
crop mirrors its columns when ``flip_aware`` is true.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ssl_modules import functional as F
from ssl_modules.contracts import Views


__all__ = ["cell_locations", "all_cell_locations", "match_cells"]


def cell_locations(views: Views, view: int, grid: Sequence[int], flip_aware: bool = True) -> Tensor:
    """``(B, h * w, 2)`` seed-image ``(y, x)`` pixel locations of the cells of view ``view``, row-major."""
    boxes = views.pixel_boxes()[:, view]
    flipped = views.flipped[:, view] if flip_aware else None
    return F.feature_cell_locations(boxes, tuple(grid), flipped)


def all_cell_locations(views: Views, grids: Sequence[Sequence[int]], flip_aware: bool = True) -> list[Tensor]:
    """Locations of every view's cells; ``grids[v]`` is view ``v``'s feature grid."""
    if len(grids) != views.num_views:
        raise ValueError(f"got {len(grids)} grids for {views.num_views} views")
    return [cell_locations(views, v, grid, flip_aware) for v, grid in enumerate(grids)]


def match_cells(query_locations: Tensor, candidate_locations: Tensor, num_matches: int | None = None) -> dict:
    """Nearest candidate cell of every query cell, keeping the ``num_matches`` closest pairs."""
    return F.match_by_location(query_locations, candidate_locations, num_matches)
