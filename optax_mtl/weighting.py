"""Gram weightings: pure, jittable, vmappable functions ``gram -> (K,) weights``.

The middle stage of every Gram-based method (see :func:`optax_mtl.gram` and
:func:`optax_mtl.combine`). Each function here is the exact weighting of the
transform of the same family in :mod:`optax_mtl`; any of them (or your own)
becomes a transform with :func:`optax_mtl.weighted_aggregation`.
"""

from optax_mtl._src.aligned import aligned
from optax_mtl._src.mgda import mgda
from optax_mtl._src.nash import nash

__all__ = ["aligned", "mgda", "nash"]
