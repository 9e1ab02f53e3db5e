"""The registry of transforms that the common battery (test_battery.py) runs.

A method joins the battery with one ``Case`` line. The first case of each factory is its
primary case, the one the quick tier (``pytest -m "not slow"``) runs; the others are variants
(other options of the same method), in the slow tier.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

import optax_mtl


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  # Numeric hyperparameters checked under optax.inject_hyperparams: name -> two values.
  injectable: dict = dataclasses.field(default_factory=dict)
  # Arguments that must stay static under optax.inject_hyperparams.
  static_args: tuple = ("num_tasks",)

  def __str__(self) -> str:
    return self.name


CASES = [
    Case("linear_scalarization", optax_mtl.linear_scalarization,
         injectable={"weights": (np.array([1.0, 2.0, 0.5]), np.array([0.1, 1.0, 3.0]))}),
    Case("linear_scalarization_mean", optax_mtl.linear_scalarization,
         kwargs={"reduction": "mean"}),
    Case("nash_mtl", optax_mtl.nash_mtl, injectable={"max_norm": (1.0, 0.3)}),
    Case("nash_mtl_every2_unweighted", optax_mtl.nash_mtl,
         kwargs={"update_weights_every": 2, "task_specific": "unweighted", "max_norm": 0.0},
         injectable={"update_weights_every": (2, 1)}),
    Case("mgda", optax_mtl.mgda),
    Case("mgda_l2_fw_sum_k", optax_mtl.mgda,
         kwargs={"normalization": "l2", "solver": "fw", "weights_sum": "num_tasks"},
         injectable={"max_iter": (250, 3)}),
    Case("mgda_loss_plus_pgd", optax_mtl.mgda, kwargs={"normalization": "loss+", "solver": "pgd"}),
    Case("aligned_mtl", optax_mtl.aligned_mtl,
         injectable={"preference": (np.ones(3), np.array([1.0, 2.0, 3.0]))}),
    Case("aligned_mtl_median_weighted", optax_mtl.aligned_mtl,
         kwargs={"scale_mode": "median", "task_specific": "weighted"}),
    Case("scale_invariant", optax_mtl.scale_invariant),
    Case("random_weighting", optax_mtl.random_weighting, kwargs={"key": 3},
         static_args=("num_tasks", "key")),
    Case("dwa", optax_mtl.dwa, kwargs={"window": 2}, static_args=("num_tasks", "window"),
         injectable={"temperature": (2.0, 0.5)}),
    Case("dwa_blockwise_sum", optax_mtl.dwa, kwargs={"window": 2, "mode": "blockwise", "reduction": "sum"},
         static_args=("num_tasks", "window")),
    Case("uncertainty_weighting", optax_mtl.uncertainty_weighting, injectable={"learning_rate": (0.025, 0.1)}),
    # The weights' gradient sign(w_i n_i - target_i) n_i reads alpha only through the sign: alpha must
    # move a target across a weighted norm to matter (2.0 gives 1.5's updates on the battery's batches).
    Case("gradnorm", optax_mtl.gradnorm, injectable={"alpha": (1.5, 4.0)}),
    Case("pcgrad", optax_mtl.pcgrad, kwargs={"key": 1}, static_args=("num_tasks", "key")),
    Case("pcgrad_mean_skip_self", optax_mtl.pcgrad, kwargs={"key": 2, "reduction": "mean", "skip_self": True},
         static_args=("num_tasks", "key")),
    Case("graddrop", optax_mtl.graddrop, kwargs={"key": 4}, static_args=("num_tasks", "key"),
         injectable={"leak": (0.0, 0.3)}),
    Case("graddrop_global", optax_mtl.graddrop, kwargs={"key": 5, "purity": "global", "leak": 0.5, "eps": 1e-8},
         static_args=("num_tasks", "key")),
    Case("gradvac", optax_mtl.gradvac, kwargs={"key": 6}, static_args=("num_tasks", "key"),
         injectable={"beta": (0.5, 0.2)}),
    Case("gradvac_on_correction", optax_mtl.gradvac, kwargs={"key": 7, "ema": "on_correction", "eps": 0.0},
         static_args=("num_tasks", "key")),
    Case("cagrad", optax_mtl.cagrad, injectable={"c": (0.4, 0.1)}),
    Case("cagrad_mean_rescale0", optax_mtl.cagrad, kwargs={"reduction": "mean", "rescale": 0, "c": 0.5}),
    Case("imtl_g", optax_mtl.imtl_g),
    Case("upgrad", optax_mtl.upgrad, injectable={"preference": (np.ones(3) / 3, np.array([1.0, 2.0, 3.0]))}),
    Case("upgrad_torchjd", optax_mtl.upgrad, kwargs={"regularization": 1e-4, "task_specific": "weighted"}),
    Case("dualproj", optax_mtl.dualproj),
]


def _primary_cases() -> list[Case]:
  first = {}
  for case in CASES:
    first.setdefault(case.factory, case)
  return list(first.values())


PRIMARY_CASES = _primary_cases()


def case_params(cases=CASES) -> list:
  """``cases`` as pytest params named by the case, the variants marked ``slow``."""
  return [pytest.param(case, id=case.name, marks=() if case in PRIMARY_CASES else pytest.mark.slow)
          for case in cases]
