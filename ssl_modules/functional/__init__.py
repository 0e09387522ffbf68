"""Pure tensor math of every method: losses, Sinkhorn, clustering, matching.

Nothing here imports Lightning or holds state: inputs are already gathered across processes, no input is
changed in place, and results follow the inputs' dtype and device. What each function computes, and where
it follows the official code rather than the paper, is in ``docs/<method>.md``; ``tests/parity_vectors``
holds reference vectors computed with the official implementations.
"""
from .bam import *  # noqa: F401,F403
from .bam import __all__ as _bam_all
from .cribo import *  # noqa: F401,F403
from .cribo import __all__ as _cribo_all
from .vicregl import *  # noqa: F401,F403
from .vicregl import __all__ as _vicregl_all

__all__ = [*_bam_all, *_cribo_all, *_vicregl_all]
