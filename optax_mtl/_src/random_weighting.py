"""Random loss weighting (RLW): random task weights at every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import randomness
from optax_mtl._src import shared as shared_lib


def random_weighting(
    num_tasks: int,
    key: int | jax.Array = 0,
    *,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting (Lin et al., 2022): :math:`w = \mathrm{softmax}(z)`, :math:`z \sim N(0, I)`.

  A fresh draw at every step (AvivNavon/nash-mtl ``RLW``; weights sum to 1).
  The key is given to the factory and carried in the state, so the same key
  gives the same sequence of weights; no Gram matrix is computed.

  Args:
    num_tasks: number of tasks ``K``.
    key: an int seed or a single PRNG key (``jax.random.key`` of any
      implementation, or ``jax.random.PRNGKey`` data); an int also works as
      an injected hyperparameter of :func:`optax.inject_hyperparams`.
    update_weights_every: draw new weights every this many steps.
    shared: mask of the shared parameters (every leaf gets the same weights).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state``
    holds the key data.

  References:
    Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  k = contract.check_num_tasks(num_tasks)
  initial_key, key_impl = randomness.key_data(key)

  def update(gram, key_data, task_losses):
    del gram, task_losses
    key_data, sub = randomness.next_key(key_data, key_impl)
    # float32 draws whatever jax_enable_x64 says: the same key gives the same
    # weights in a float64 run (a float64 draw consumes other random bits).
    return jax.nn.softmax(jax.random.normal(sub, (k,), jnp.float32)), key_data

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=lambda num_tasks, dtype: initial_key, update=update, needs_gram=False),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jax.numpy.full((k,), 1.0 / k),
      nonfinite=nonfinite,
  )
