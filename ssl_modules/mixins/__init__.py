"""Mechanics shared by the methods: the EMA teacher (state, a mixin); multi-crop encoding and local matching
(stateless, plain functions)."""
from .local_matching import all_cell_locations, cell_locations, match_cells
from .multicrop import encode_views, resolution_groups
from .teacher import EMAUpdate, TeacherEMA

__all__ = ["TeacherEMA", "EMAUpdate", "encode_views", "resolution_groups", "cell_locations", "all_cell_locations",
           "match_cells"]
