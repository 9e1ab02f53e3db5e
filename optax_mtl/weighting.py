"""Gram weightings: pure, jittable, vmappable functions ``gram -> (K,) weights``.

The middle stage of every Gram-based method (see :func:`optax_mtl.gram` and
:func:`optax_mtl.combine`). Each function here is the exact weighting of the
transform of the same family in :mod:`optax_mtl`.
"""

from optax_mtl._src.aggregation import Weighting
from optax_mtl._src.aggregation import stateless
from optax_mtl._src.nash import nash

__all__ = ["Weighting", "nash", "stateless"]
