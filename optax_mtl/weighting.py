"""Gram weightings: pure, jittable, vmappable functions ``gram -> (K,) weights``.

The middle stage of every Gram-based method (see :func:`optax_mtl.gram` and
:func:`optax_mtl.combine`). Each function here is the exact weighting of the
transform of the same family in :mod:`optax_mtl`. The deterministic ones (or
your own) become a transform with :func:`optax_mtl.weighted_aggregation`;
``pcgrad`` and ``gradvac`` draw task orders from a key, and ``gradvac``
returns ``(weights, targets)`` with its cosine targets: their transforms
carry the key and the targets in their state.

A Gram with a NaN or inf entry gives NaN weights (every function here), so
that an update combined from them is caught by ``optax.apply_if_finite``.
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
