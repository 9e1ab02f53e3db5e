"""Test configuration: 8 fake CPU devices and strict rank promotion.

Both settings must precede any JAX operation, hence they live here.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  """Drops JAX's compilation caches after each test module.

  The suite compiles thousands of functions in one process; each executable
  keeps memory mappings, and together they reach the kernel's map limit
  (vm.max_map_count, 65530), where XLA:CPU compilation fails and crashes.
  """
  yield
  jax.clear_caches()
