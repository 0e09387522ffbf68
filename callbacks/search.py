"""Exact top-k inner-product search, shared with ``evaluate``: see ``ssl_modules.evaluation.search``."""
from ssl_modules.evaluation.search import SMALL_BANK, FlatIndex, SearchBackend, choose_backend, nearest_neighbours

__all__ = ["SearchBackend", "choose_backend", "FlatIndex", "nearest_neighbours", "SMALL_BANK"]
