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
from optax_mtl._src.contract import check_task_gradients
from optax_mtl._src.contract import check_updates
from optax_mtl._src.gram import combine
from optax_mtl._src.gram import gram
from optax_mtl._src.guard import apply_updates
from optax_mtl._src.guard import checked
from optax_mtl._src.linear_scalarization import linear_scalarization
from optax_mtl._src.mgda import MGDAInfo
from optax_mtl._src.mgda import mgda_transform as mgda
from optax_mtl._src.nash import NashInfo
from optax_mtl._src.nash import NashState
from optax_mtl._src.nash import nash_mtl
from optax_mtl._src.task_gradients import TaskGradients
from optax_mtl._src.task_gradients import feature_task_gradients
from optax_mtl._src.task_gradients import task_gradients
from optax_mtl._src.task_gradients import value_and_jacobian

__version__ = "0.1.0"

__all__ = [
    "AggregationState",
    "AlignedInfo",
    "MGDAInfo",
    "NashInfo",
    "NashState",
    "TaskGradients",
    "Weighting",
    "aligned_mtl",
    "apply_updates",
    "check_task_gradients",
    "check_updates",
    "checked",
    "combine",
    "feature_task_gradients",
    "gram",
    "linear_scalarization",
    "mgda",
    "nash_mtl",
    "task_gradients",
    "value_and_jacobian",
    "weighted_aggregation",
    "weighting",
]
