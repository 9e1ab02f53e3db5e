r"""Nash-MTL: the Nash bargaining solution over the update direction.

Navon et al., `Multi-Task Learning as a Bargaining Game
<https://arxiv.org/abs/2202.01017>`_, ICML 2022.

The bargaining solution :math:`\arg\max_{\|d\| \le \epsilon} \sum_i \log(g_i^\top d)`
is :math:`d = J^\top a` with :math:`a > 0` solving :math:`M a = 1/a` (Claim 3.1).
That system is the stationarity condition of the strictly convex problem

.. math::
  \min_{a > 0} f(a) = \tfrac12 a^\top M a - \sum_i \log a_i ,

so it is solved exactly here by a damped Newton method, on the cosine matrix
:math:`C = D^{-1} M D^{-1}` (:math:`b = D a`, :math:`C b = 1/b`) so that the
solve does not depend on the scale of the gradients. The option
``regularization`` solves the same system for :math:`M + \rho\,\mathrm{tr}(M) I`,
which bounds the weights when a task's gradient vanishes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import gram as gram_lib
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib

Solver = Literal["newton", "ccp", "jaxopt"]

# In cosine scale an iterate beyond this bound means that no positive solution
# exists (zero is in the convex hull of the normalised gradients): f is then
# unbounded below and damped Newton runs away geometrically (about x1.4 per
# step). Solutions that large cannot be resolved in float32 anyway.
_MAX_SCALE = 1e3
_NEWTON_TOL = 1e-6
# Quadratic-convergence region of damped Newton on a self-concordant function.
_FULL_STEP = 0.25


def _check_solver(solver):
  if solver not in ("newton", "ccp", "jaxopt"):
    raise ValueError(f"solver must be 'newton', 'ccp' or 'jaxopt', got {solver!r}.")


def _check_regularization(regularization):
  if isinstance(regularization, (int, float)) and not regularization >= 0:
    raise ValueError(f"regularization must be >= 0, got {regularization!r}.")


def _is_zero(regularization):
  return isinstance(regularization, (int, float)) and regularization == 0


def _regularize(gram, scaling, regularization):
  r""":math:`M + \rho\,\mathrm{tr}(M) I` and its cosine scaling (zero-gradient tasks stay zero).

  The ridge goes on the nonzero tasks only, so a task whose gradient is
  exactly zero keeps weight 0 (and its plain head gradient in the transform).
  """
  active = scaling.nonzero
  ridge = regularization * jnp.sum(jnp.where(active, scaling.norms**2, 0.0))
  norms = jnp.where(active, jnp.sqrt(scaling.norms**2 + ridge), 0.0)
  shrink = jnp.where(active, scaling.norms / jnp.where(active, norms, 1.0), 0.0)
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  cosines = jnp.where(eye > 0, 1.0, scaling.cosines * shrink[:, None] * shrink[None, :])
  gram = gram + ridge.astype(gram.dtype) * jnp.diag(active.astype(gram.dtype))
  return gram, numerics.CosineScaling(cosines, norms, active)


class NashInfo(NamedTuple):
  """Diagnostics of one Nash-MTL weight solve.

  Attributes:
    residual: :math:`\\max_i |a_i (M a)_i - 1|` over the tasks with a nonzero
      gradient, in the working precision (0 when not solvable); with
      ``regularization`` :math:`\\rho`, that of :math:`M + \\rho\\,\\mathrm{tr}(M) I`.
    iterations: Newton iterations (CCP: subproblems solved; jaxopt: L-BFGS-B
      iterations).
    solvable: false when no positive solution exists (zero in the convex hull
      of the nonzero gradients: a Pareto-stationary point, or a solution
      beyond what float32 resolves); the weights are then zero. Non-finite
      Grams are handled by the transform's non-finite policy.
    min_cosine: smallest pairwise cosine between nonzero task gradients
      (of the gradients themselves, without the ridge).
    max_cosine: largest pairwise cosine.
  """

  residual: jax.Array
  iterations: jax.Array
  solvable: jax.Array
  min_cosine: jax.Array
  max_cosine: jax.Array


def _objective(cosines, b):
  return 0.5 * b @ (cosines @ b) - jnp.sum(jnp.log(b))


def _residual(cosines, b, active):
  return jnp.max(jnp.where(active, jnp.abs(b * (cosines @ b) - 1.0), 0.0))


def _starting_point(cosines, warm_start):
  """The best point on the rays through ones and through the warm start.

  Along a ray ``s v`` the objective is minimised at ``s = sqrt(K / v^T C v)``.
  """
  k = cosines.shape[0]

  def on_ray(v):
    curvature = v @ (cosines @ v)
    scale = jnp.sqrt(k / jnp.maximum(curvature, k / _MAX_SCALE**2))
    return scale * v

  start = on_ray(jnp.ones((k,), cosines.dtype))
  if warm_start is None:
    return start
  warm_ok = jnp.all(jnp.isfinite(warm_start)) & jnp.all(warm_start > 0) & jnp.all(warm_start < _MAX_SCALE)
  warm = on_ray(jnp.where(warm_ok, warm_start, 1.0))
  return jnp.where(warm_ok & (_objective(cosines, warm) < _objective(cosines, start)), warm, start)


def _newton(cosines, b0, active, max_iter):
  """Damped Newton on ``f(b) = b^T C b / 2 - sum log b``; returns the best iterate.

  The step ``1 / (1 + lambda)`` (``lambda`` the Newton decrement) keeps ``b``
  positive and decreases ``f`` (self-concordance); below ``lambda = 1/4`` full
  steps converge quadratically. Stops at the residual tolerance, on float32
  stagnation (three steps in the quadratic region without improvement), on
  divergence or after ``max_iter`` steps.
  """

  def cond(carry):
    _, it, best_res, _, stall, diverged = carry
    return (it < max_iter) & (best_res > _NEWTON_TOL) & ~diverged & (stall < 3)

  def body(carry):
    b, it, best_res, best_b, stall, _ = carry
    grad = cosines @ b - 1.0 / b
    hess = cosines + jnp.diag(1.0 / b**2)
    step = -numerics.spd_solve(hess, grad)
    decrement = jnp.sqrt(jnp.maximum(-(grad @ step), 0.0))
    b = b + jnp.where(decrement < _FULL_STEP, 1.0, 1.0 / (1.0 + decrement)) * step
    res = _residual(cosines, b, active)
    better = res < best_res
    stall = jnp.where(better | (decrement >= _FULL_STEP), 0, stall + 1)
    diverged = ~jnp.all(jnp.isfinite(b)) | (jnp.max(b) > _MAX_SCALE)
    return (b, it + 1, jnp.minimum(res, best_res), jnp.where(better, b, best_b), stall, diverged)

  res0 = _residual(cosines, b0, active)
  init = (b0, jnp.zeros([], jnp.int32), res0, b0, jnp.zeros([], jnp.int32), jnp.zeros([], bool))
  _, iterations, _, best, _, diverged = lax.while_loop(cond, body, init)
  return best, iterations, ~diverged


def _barrier_subproblem(cosines, q, b0, stages=8, growth=10.0, inner=30):
  r"""Log-barrier Newton for :math:`\min_b q^\top b` s.t. :math:`\log b_i + \log (C b)_i \ge 0`.

  The CCP subproblems of the paper (Eqs. 4 and 5) in cosine scale. ``b0`` is
  scaled up until strictly feasible. Each of the ``stages`` centring steps
  multiplies the barrier weight by ``growth``.
  """
  k = cosines.shape[0]

  def constraints(b):
    cb = cosines @ b
    return cb, jnp.log(b) + jnp.log(cb)

  def barrier_value(b, t):
    cb = cosines @ b
    inside = jnp.all(b > 0) & jnp.all(cb > 0)
    h = jnp.log(jnp.where(inside, b, 1.0)) + jnp.log(jnp.where(inside, cb, 1.0))
    inside = inside & jnp.all(h > 0)
    return jnp.where(inside, t * (q @ b) - jnp.sum(jnp.log(jnp.where(inside, h, 1.0))), jnp.inf)

  def newton_step(b, t):
    cb, h = constraints(b)
    jac = jnp.diag(1.0 / b) + cosines / cb[:, None]
    grad = t * q - jac.T @ (1.0 / h)
    hess = (jac.T @ (jac / h[:, None] ** 2) + jnp.diag(1.0 / (h * b**2))
            + (cosines * (1.0 / (h * cb**2))[None, :]) @ cosines)
    step = -numerics.spd_solve(hess, grad)
    decrement = -(grad @ step)
    start = barrier_value(b, t)

    def too_long(carry):
      length, _ = carry
      return (barrier_value(b + length * step, t) > start - 0.25 * length * decrement) & (length > 1e-10)

    length, _ = lax.while_loop(too_long, lambda c: (0.5 * c[0], c[1]), (jnp.ones([], b.dtype), 0))
    ok = jnp.isfinite(decrement) & (length > 1e-10) & jnp.all(jnp.isfinite(step))
    return jnp.where(ok, b + length * step, b), jnp.where(ok, decrement, 0.0)

  def centre(carry, _):
    b, t = carry
    b = numerics.newton_loop(lambda b: newton_step(b, t), b, max_iter=inner, tol=1e-7)
    return (b, t * growth), None

  _, h0 = constraints(b0)
  b0 = b0 * jnp.maximum(1.001, 1.001 * jnp.max(jnp.exp(-0.5 * h0)))
  t0 = k / jnp.maximum(jnp.abs(q @ b0), jnp.finfo(b0.dtype).tiny)
  (b, _), _ = lax.scan(centre, (b0, t0), None, length=stages)
  return b


def _ccp(gram, scaling, b_feasible, active, optim_niter):
  r"""The paper's concave-convex procedure, with the official objective.

  Eq. 4 first (:math:`\min \sum_i \beta_i`, :math:`\beta = M a`, s.t.
  :math:`a_i \beta_i \ge 1`), then Eq. 5 steps linearising
  :math:`\varphi(a) = \sum_i \log a_i + \log \beta_i` at the previous iterate,
  with AvivNavon/nash-mtl's scaling: Gram divided by its Frobenius norm
  :math:`\nu` in the objective, :math:`\nabla\varphi / \nu` added, the
  constraint kept in the raw scale. Each subproblem is solved by log-barrier
  Newton in cosine scale (:math:`a = b / n`).
  """
  norms = jnp.where(active, scaling.norms, 1.0)
  k = gram.shape[0]
  frobenius = jnp.maximum(jnp.linalg.norm(gram), jnp.finfo(gram.dtype).tiny)
  gram_n = jnp.where(active[:, None] & active[None, :], gram / frobenius, jnp.eye(k, dtype=gram.dtype))
  to_cosine_scale = lambda c: c / norms  # c^T a = (c / n)^T b
  ones = jnp.ones((k,), gram.dtype)
  b = _barrier_subproblem(scaling.cosines, to_cosine_scale(gram_n @ ones), b_feasible)

  def cond(carry):
    _, it, change = carry
    return (it < optim_niter) & (change > 1e-6)

  def body(carry):
    b, it, _ = carry
    a = b / norms
    linearised = 1.0 / a + gram_n @ (1.0 / (gram_n @ a))
    c = gram_n @ ones + linearised / frobenius
    new = _barrier_subproblem(scaling.cosines, to_cosine_scale(c), b)
    change = jnp.max(jnp.abs(new - b) / b)
    return new, it + 1, change

  b, iterations, _ = lax.while_loop(cond, body, (b, jnp.ones([], jnp.int32), jnp.asarray(jnp.inf, b.dtype)))
  return b, iterations


def _jaxopt(cosines, b0, max_iter):
  """jaxopt.LBFGSB on the convex problem (a cross-check; jaxopt is archived)."""
  import warnings

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt  # pylint: disable=g-import-not-at-top

  solver = jaxopt.LBFGSB(fun=lambda b: _objective(cosines, b), maxiter=max_iter, tol=1e-7)
  lower = jnp.full_like(b0, 1.0 / _MAX_SCALE)
  upper = jnp.full_like(b0, _MAX_SCALE)
  result = solver.run(jnp.clip(b0, lower, upper), bounds=(lower, upper))
  return result.params, result.state.iter_num.astype(jnp.int32)


@numerics.full_precision
def nash_solve(
    gram: jax.Array,
    *,
    solver: Solver = "newton",
    warm_start: jax.Array | None = None,
    max_iter: int = 100,
    optim_niter: int = 20,
    regularization: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array, NashInfo]:
  """The Nash-MTL weights with their cosine-scale solution and diagnostics.

  See :func:`nash` for the method and the degenerate cases.

  Returns:
    ``(weights, scaled, info)``: the weights ``a``, the cosine-scale solution
    ``b = a * n`` (a warm start for the next solve) and :class:`NashInfo`.
  """
  _check_solver(solver)
  _check_regularization(regularization)
  scaling = numerics.cosine_scaling(gram)
  raw_cosines = scaling.cosines
  if not _is_zero(regularization):
    gram, scaling = _regularize(gram, scaling, jnp.asarray(regularization, gram.dtype))
  active = scaling.nonzero
  cosines = scaling.cosines
  b0 = _starting_point(cosines, warm_start)
  b, iterations, solvable = _newton(cosines, b0, active, max_iter)
  if solver == "ccp":
    b_ccp, iterations = _ccp(gram, scaling, 1.01 * b, active, optim_niter)
    b = jnp.where(solvable, b_ccp, b)
  elif solver == "jaxopt":
    # Newton's verdict on solvability stands: L-BFGS-B stops early, inside
    # its bounds, where the objective is unbounded below.
    b_lbfgs, iterations = _jaxopt(cosines, b0, max_iter)
    b = jnp.where(solvable, b_lbfgs, b)
  residual = _residual(cosines, b, active)
  solvable = solvable & jnp.all(jnp.isfinite(b))
  keep = solvable & active
  weights = jnp.where(keep, b / jnp.where(active, scaling.norms, 1.0), 0.0)
  low, high = numerics.off_diagonal_extremes(raw_cosines, active)
  info = NashInfo(
      residual=jnp.where(solvable, residual, 0.0).astype(gram.dtype),
      iterations=iterations.astype(jnp.int32),
      solvable=solvable,
      min_cosine=low,
      max_cosine=high,
  )
  return weights, jnp.where(keep, b, 1.0), info


@numerics.nan_for_nonfinite_gram
def nash(
    gram: jax.Array,
    *,
    solver: Solver = "newton",
    max_iter: int = 100,
    optim_niter: int = 20,
    regularization: float | jax.Array = 0.0,
) -> jax.Array:
  r"""Nash-MTL weights: the exact, unclipped bargaining solution :math:`M a = 1/a`.

  Solves :math:`\min_{a>0} \tfrac12 a^\top M a - \sum_i \log a_i` by damped
  Newton on the cosine matrix (scale invariant; quadratic convergence, a few
  ``K x K`` Cholesky solves, bounded by ``max_iter``). The solution satisfies
  :math:`a_i (M a)_i = 1`, hence :math:`\|J^\top a\|^2 = K` and
  :math:`g_i^\top d = 1/a_i > 0` for every task. In float32 the residual
  :math:`\max_i |a_i (M a)_i - 1|` reaches about ``1e-6`` on well-conditioned
  Grams and stays below ``1e-4`` on every solvable case of the reference
  fixtures, including the scale-disparity cases where the official CCP fails.

  Degenerate inputs (never NaN):

  - a zero gradient (``M_ii`` not a positive normal float): that task gets
    weight 0 and the others are solved for on their own;
  - no positive solution (zero in the convex hull of the nonzero gradients,
    a Pareto-stationary point such as ``g_2 = -g_1``): the objective is
    unbounded below, Newton's iterates run away and the weights are all zero,
    i.e. the update is zero, which increases no task.

  Args:
    gram: ``(K, K)`` Gram matrix of the task gradients.
    solver: ``"newton"`` (default, exact); ``"ccp"``: the paper's
      concave-convex procedure (Eq. 4, then Eq. 5 linearisations with the
      official objective scaling, each convex subproblem solved by
      log-barrier Newton; up to ``optim_niter`` subproblems), which reproduces
      AvivNavon/nash-mtl wherever that code converges. It starts each solve
      afresh from Eq. 4 (the official code linearises at the previous
      step's weights instead), needs the Newton solution for a strictly
      feasible start (so its cost includes Newton's), and like the
      official procedure is not scale invariant: on Grams with norms spanning
      1e-3..1e3 it can stop at a point with relative residual about 1 (check
      ``NashInfo.residual``). ``"jaxopt"``: ``jaxopt.LBFGSB`` on the convex
      problem (a cross-check; imported lazily).
    max_iter: iteration cap of the Newton (or L-BFGS-B) solve.
    optim_niter: number of CCP subproblems (``solver="ccp"``; the paper uses
      20, 1 for MT10).
    regularization: :math:`\rho \ge 0`, a ridge relative to the trace: solve
      :math:`a_i ((M + \rho\,\mathrm{tr}(M) I) a)_i = 1` (0, the default: the
      exact bargaining solution). Why: the exact weight of a task whose
      gradient vanishes (its loss reaching 0) grows like :math:`1/\|g_i\|`
      without bound (5e10 on ``examples/mtl_benchmark.py``'s digits problem,
      see ``docs/nash_mtl_official.md``); the ridge is a private direction of
      squared gain :math:`\rho\,\mathrm{tr}(M)` for every task, so
      :math:`a^\top (M + \rho\,\mathrm{tr}(M) I) a = K` bounds
      :math:`\|a\| \le \sqrt{K / (\rho\,\mathrm{tr}(M))}` and a vanished
      task's share :math:`a_i g_i` of the update goes to 0, while tasks with
      :math:`\|g_i\|^2 \gg \rho\,\mathrm{tr}(M)` keep their exact weights to
      relative :math:`O(\rho\,\mathrm{tr}(M) / \|g_i\|^2)`. The weights stay
      invariant to a common rescaling of the gradients (the ridge scales with
      :math:`M`), no longer to that of one task whose gradient norm is below
      about :math:`\sqrt{\rho}` times the largest; a zero gradient still gets
      weight 0.

  Returns:
    The ``(K,)`` weights ``a`` (sum unconstrained; ``J^T a`` has norm
    ``sqrt(K)`` when solvable, at most ``sqrt(K)`` with ``regularization``).

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> a = optax_mtl.weighting.nash(jac @ jac.T)
    >>> jnp.round(a * (jac @ jac.T @ a), 5)  # a_i (M a)_i = 1
    Array([1., 1.], dtype=float32)
  """
  weights, _, _ = nash_solve(gram, solver=solver, max_iter=max_iter, optim_niter=optim_niter,
                             regularization=regularization)
  return weights


class NashState(NamedTuple):
  """Method state of :func:`nash_mtl` (inside ``AggregationState.weighting_state``).

  Attributes:
    scaled: the last cosine-scale solution ``b = a * n``, the warm start.
    info: :class:`NashInfo` of the last solve.
  """

  scaled: jax.Array
  info: NashInfo


def clip_shared_norm(updates, flags, max_norm):
  """Scales the shared leaves to global norm ``<= max_norm`` (``<= 0`` disables).

  As ``torch.nn.utils.clip_grad_norm_``: factor ``max_norm / (norm + 1e-6)``
  when below 1.
  """
  leaves = jax.tree.leaves(updates)
  selected = shared_lib.selected_leaves(updates, flags)
  dtype = gram_lib.accumulation_dtype(*(x.dtype for x in selected))
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype))) for x in selected))
  factor = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
  factor = jnp.where(max_norm > 0, factor, 1.0)
  flags = flags if flags is not None else [True] * len(leaves)
  scaled = [(leaf * factor.astype(leaf.dtype)) if f else leaf for leaf, f in zip(leaves, flags)]
  return jax.tree.unflatten(jax.tree.structure(updates), scaled)


def _head_weights(a):
  """Weights of the task-specific leaves: ``a``, and 1 for tasks that got no weight.

  A task gets ``a_i = 0`` when its shared gradient is zero (e.g. zero
  initialised heads) or when no bargaining solution exists; its own
  parameters still have a gradient, which it keeps.
  """
  return jnp.where(a > 0, a, 1.0)


def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float | jax.Array = 1.0,
    update_weights_every: int | jax.Array = 1,
    solver: Solver = "newton",
    max_iter: int = 100,
    optim_niter: int = 20,
    shared: shared_lib.SharedMask = None,
    task_specific: Literal["weighted", "unweighted"] = "weighted",
    nonfinite: aggregation.NonFinite = "skip",
    regularization: float | jax.Array = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL (Navon et al., 2022): tasks bargain over the update direction.

  .. math::
    M a = 1/a, \qquad d = J^\top a, \qquad
    d_{\text{shared}} \leftarrow d_{\text{shared}} \min\Big(1, \frac{\text{max\_norm}}{\|d_{\text{shared}}\| + 10^{-6}}\Big)

  The weights :math:`a` are the exact bargaining solution (see
  :func:`optax_mtl.weighting.nash`), solved in-graph. As in the official code
  (AvivNavon/nash-mtl ``NashMTL``): the update of the shared parameters is
  clipped to global norm ``max_norm`` (0 disables); task-specific parameters
  receive their ``a``-weighted gradients, unclipped (``task_specific=
  "unweighted"`` gives them their plain gradients instead; a task whose
  weight is 0, because its shared gradient is zero or no solution exists,
  keeps its plain gradient there, so its head still trains); the weights are
  recomputed every ``update_weights_every`` steps and reused in between (with
  :func:`optax_mtl.task_gradients`, the steps in between cost one backward
  pass; the training loop can make that choice itself, see the extra arg
  ``refresh_weights`` of :func:`optax_mtl.weighted_aggregation`). Unlike the official code it solves exactly (the official CCP fails
  on badly scaled gradients, see the README), handles ``K = 1``, zero
  gradients and Pareto-stationary points (zero update), and warm-starts from
  the last solution in the state.

  Args:
    num_tasks: number of tasks ``K``.
    max_norm: clip norm of the shared update (official default 1.0; 0 or
      less disables).
    update_weights_every: recompute the weights every this many steps.
    solver: ``"newton"`` (exact, default), ``"ccp"`` (the paper's procedure)
      or ``"jaxopt"``; see :func:`optax_mtl.weighting.nash`.
    max_iter: Newton iteration cap.
    optim_niter: CCP subproblems (``solver="ccp"``).
    shared: mask of the shared parameters (only they enter the Gram matrix
      and the clipping).
    task_specific: ``"weighted"`` (official) or ``"unweighted"``.
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.
    regularization: :math:`\rho \ge 0`, a ridge relative to the trace of the
      Gram: solve :math:`a_i ((M + \rho\,\mathrm{tr}(M) I) a)_i = 1` (0, the
      default: exact). It bounds the weights,
      :math:`\|a\| \le \sqrt{K / (\rho\,\mathrm{tr}(M))}`, where a task's
      gradient vanishes; see :func:`optax_mtl.weighting.nash`. On the digits
      problem of ``examples/mtl_benchmark.py``, where the parity task's loss
      reaches 0 and its exact weight 5e10, ``regularization=1e-6`` took
      Nash-MTL's Delta_m% from 64 +- 63 to -1.3 +- 1.3 (3 seeds; exact weights
      with ``task_specific="unweighted"``: -1.5 +- 1.5; see
      ``docs/nash_mtl_official.md``). The official code's weights stay
      bounded there too, but only because its solver stops converging.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Its state is an
    :class:`optax_mtl.AggregationState`; ``weights`` holds ``a`` and
    ``weighting_state`` a :class:`NashState` with the warm start and the
    :class:`NashInfo` diagnostics (residual, iterations, solvable, cosine
    extremes).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_mtl
    >>> params = {"w": jnp.zeros(3)}
    >>> jac = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax_mtl.nash_mtl(2)
    >>> updates, state = tx.update(jac, tx.init(params), params)
    >>> jnp.round(updates["w"], 4)  # d = J^T a clipped to norm 1
    Array([0.0542, 0.7061, 0.7061], dtype=float32)

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  k = contract.check_num_tasks(num_tasks)
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  _check_solver(solver)
  _check_regularization(regularization)

  def init(num_tasks, dtype):
    zero = jnp.zeros([], dtype)
    info = NashInfo(zero, jnp.zeros([], jnp.int32), jnp.ones([], bool), zero, zero)
    return NashState(scaled=jnp.ones((num_tasks,), dtype), info=info)

  def update(gram, state, task_losses):
    del task_losses
    weights, scaled, info = nash_solve(
        gram, solver=solver, warm_start=state.scaled, max_iter=max_iter, optim_niter=optim_niter,
        regularization=regularization)
    info = jax.tree.map(lambda new, old: new.astype(old.dtype), info, state.info)
    return weights, NashState(scaled=scaled.astype(state.scaled.dtype), info=info)

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update),
      shared=shared,
      update_weights_every=update_weights_every,
      task_specific_weights=_head_weights if task_specific == "weighted" else jnp.ones((k,), jnp.float32),
      postprocess=lambda updates, flags: clip_shared_norm(updates, flags, max_norm),
      nonfinite=nonfinite,
  )
