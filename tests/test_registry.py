"""The transform registry (transforms.py) and the quick tier cover the whole public API.

``pytest -m "not slow"`` must still touch every public method transform and every weighting:
each transform through its primary case in the battery's unmarked tests, each weighting in
test_degenerate's unmarked tests.
"""

import inspect

import optax_mtl
import test_aggregation
import test_battery
import test_degenerate
from transforms import CASES, PRIMARY_CASES, case_params


# Transform builders that take a weighting rather than being a method: test_aggregation runs them.
BUILDERS = {optax_mtl.weighted_aggregation}


def method_transforms() -> set:
  """The factories in ``optax_mtl.__all__`` whose first parameter is ``num_tasks``, less the builders."""
  found = set()
  for name in optax_mtl.__all__:
    value = getattr(optax_mtl, name)
    if inspect.isfunction(value) and next(iter(inspect.signature(value).parameters), None) == "num_tasks":
      found.add(value)
  return found - BUILDERS


def marks(function) -> set:
  return {mark.name for mark in getattr(function, "pytestmark", [])}


def test_every_public_transform_has_a_primary_case_in_the_quick_tier():
  transforms = method_transforms()
  assert len(transforms) >= 16
  assert {case.factory for case in PRIMARY_CASES} == transforms
  assert {case.factory for case in CASES} == transforms
  quick = [p.values[0] for p in case_params() if not any(m.name == "slow" for m in p.marks)]
  assert quick == PRIMARY_CASES
  quick_battery = [name for name, fn in vars(test_battery).items()
                   if name.startswith("test_") and "slow" not in marks(fn)]
  assert "test_chain_with_adam_under_jit" in quick_battery and len(quick_battery) >= 5


def test_the_builders_are_run_by_the_quick_tier():
  quick = [fn for name, fn in vars(test_aggregation).items() if name.startswith("test_") and "slow" not in marks(fn)]
  for builder in BUILDERS:
    assert any(f"optax_mtl.{builder.__name__}(" in inspect.getsource(fn) for fn in quick), builder.__name__


def test_every_weighting_is_run_by_the_quick_tier():
  assert set(test_degenerate.WEIGHTINGS) == set(optax_mtl.weighting.__all__)
  assert "slow" not in marks(test_degenerate.test_weighting_is_finite_and_keeps_its_properties)


def test_the_slow_marker_is_registered(pytestconfig):
  assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
  assert "--strict-markers" in pytestconfig.getini("addopts")

