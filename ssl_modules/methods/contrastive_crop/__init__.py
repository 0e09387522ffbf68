"""ContrastiveCrop for BAM: boxes from the teacher's CLS attention (``boxes``) and the Callback that refreshes
them and hands them to the data (``callback``); see ``docs/contrastive_crop.md``."""
from ssl_modules.methods.contrastive_crop.callback import ContrastiveCrop

__all__ = ["ContrastiveCrop"]
