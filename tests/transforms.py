"""The registry of transforms that the common battery (test_battery.py) runs.

A method joins the battery with one ``Case`` line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

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
]
