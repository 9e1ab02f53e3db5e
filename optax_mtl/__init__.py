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
from optax_mtl._src.contract import check_task_gradients
from optax_mtl._src.gram import combine
from optax_mtl._src.gram import gram
from optax_mtl._src.linear_scalarization import linear_scalarization

__version__ = "0.1.0"

__all__ = [
    "AggregationState",
    "Weighting",
    "check_task_gradients",
    "combine",
    "gram",
    "linear_scalarization",
    "weighted_aggregation",
    "weighting",
]
