"""Gram weightings: pure, jittable, vmappable functions ``gram -> (K,) weights``.

The middle stage of every Gram-based method (see :func:`optax_mtl.gram` and
:func:`optax_mtl.combine`). Each function here is the exact weighting of the
transform of the same family in :mod:`optax_mtl`; any of them (or your own)
becomes a transform with :func:`optax_mtl.weighted_aggregation`.
"""

from optax_mtl._src.aligned import aligned
from optax_mtl._src.cagrad import cagrad
from optax_mtl._src.gradvac import gradvac
from optax_mtl._src.imtl_g import imtl_g
from optax_mtl._src.mgda import mgda
from optax_mtl._src.nash import nash
from optax_mtl._src.pcgrad import pcgrad
from optax_mtl._src.upgrad import dualproj
from optax_mtl._src.upgrad import upgrad

__all__ = ["aligned", "cagrad", "dualproj", "gradvac", "imtl_g", "mgda", "nash", "pcgrad", "upgrad"]
