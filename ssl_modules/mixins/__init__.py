"""Mechanics shared by the methods: EMA teacher, multi-crop encoding, local matching."""
from .local_matching import LocalMatching
from .multicrop import MultiCrop, resolution_groups
from .teacher import TeacherEMA

__all__ = ["TeacherEMA", "MultiCrop", "LocalMatching", "resolution_groups"]
