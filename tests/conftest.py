"""Test configuration: 8 fake CPU devices, strict rank promotion, full-precision matmuls on GPU.

These settings must precede any JAX operation, hence they live here.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
if jax.default_backend() != "cpu":
  # The tests hold float32 paths to float32 tolerances; a GPU's default float32 matmul rounds to
  # TF32 (the library's own Gram and weightings are at full precision regardless, and
  # test_precision covers reduced precisions explicitly).
  jax.config.update("jax_default_matmul_precision", "highest")


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
