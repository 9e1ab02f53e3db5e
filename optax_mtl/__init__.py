"""optax_mtl: multi-task gradient aggregation as optax gradient transformations.

Every method takes *per-task gradients* (a pytree shaped like the params whose
leaves carry a leading task axis ``K``) and returns one update, so it chains in
front of any optax optimizer::

  tx = optax.chain(optax_mtl.linear_scalarization(num_tasks=3), optax.adam(1e-3))
"""

from optax_mtl import weighting
from optax_mtl._src.aggregation import AggregationState
from optax_mtl._src.aggregation import Weighting
from optax_mtl._src.aggregation import weighted_aggregation
from optax_mtl._src.aligned import AlignedInfo
from optax_mtl._src.aligned import aligned_mtl
from optax_mtl._src.cagrad import cagrad_transform as cagrad
from optax_mtl._src.contract import check_task_gradients
from optax_mtl._src.contract import check_updates
from optax_mtl._src.dwa import DWAState
from optax_mtl._src.dwa import dwa
from optax_mtl._src.graddrop import graddrop
from optax_mtl._src.gradnorm import GradNormState
from optax_mtl._src.gradnorm import gradnorm
from optax_mtl._src.gradvac import GradVacState
from optax_mtl._src.gradvac import gradvac_transform as gradvac
from optax_mtl._src.gram import combine
from optax_mtl._src.gram import gram
from optax_mtl._src.guard import apply_updates
from optax_mtl._src.guard import checked
from optax_mtl._src.imtl_g import imtl_g_transform as imtl_g
from optax_mtl._src.linear_scalarization import linear_scalarization
from optax_mtl._src.mgda import MGDAInfo
from optax_mtl._src.mgda import mgda_transform as mgda
from optax_mtl._src.nash import NashInfo
from optax_mtl._src.nash import NashState
from optax_mtl._src.nash import nash_mtl
from optax_mtl._src.pcgrad import pcgrad_transform as pcgrad
from optax_mtl._src.random_weighting import random_weighting
from optax_mtl._src.scale_invariant import scale_invariant
from optax_mtl._src.task_gradients import TaskGradients
from optax_mtl._src.task_gradients import feature_task_gradients
from optax_mtl._src.task_gradients import task_gradients
from optax_mtl._src.task_gradients import value_and_jacobian
from optax_mtl._src.uncertainty_weighting import UncertaintyState
from optax_mtl._src.uncertainty_weighting import uncertainty_weighting
from optax_mtl._src.upgrad import dualproj_transform as dualproj
from optax_mtl._src.upgrad import upgrad_transform as upgrad

__version__ = "0.1.0"

__all__ = [
    "AggregationState",
    "AlignedInfo",
    "DWAState",
    "GradNormState",
    "GradVacState",
    "MGDAInfo",
    "NashInfo",
    "NashState",
    "TaskGradients",
    "UncertaintyState",
    "Weighting",
    "aligned_mtl",
    "apply_updates",
    "cagrad",
    "check_task_gradients",
    "check_updates",
    "checked",
    "combine",
    "dualproj",
    "dwa",
    "feature_task_gradients",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gram",
    "imtl_g",
    "linear_scalarization",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "random_weighting",
    "scale_invariant",
    "task_gradients",
    "uncertainty_weighting",
    "upgrad",
    "value_and_jacobian",
    "weighted_aggregation",
    "weighting",
]
