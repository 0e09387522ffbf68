"""LightningDataModules and the multi-crop view pipeline."""
from .views import Views

__all__ = ["Views"]
