"""Test configuration: 8 fake CPU devices, strict rank promotion, full-precision matmuls on GPU,
and a compilation cache that lives as long as the test process.

These settings must precede any JAX operation, hence they live here.
"""

import atexit
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
if jax.default_backend() != "cpu":
  # The tests hold float32 paths to float32 tolerances; a GPU's default float32 matmul rounds to
  # TF32 (the library's own Gram and weightings are at full precision regardless, and
  # test_precision covers reduced precisions explicitly).
  jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same program (the same transform on the same problem, jitted anew in
# each test): XLA's persistent cache, keyed on the program and never on the Python function,
# compiles each once per process. The directory is new for every process (an xdist worker
# included, since JAX's cache does not lock its files) and removed at exit, so no run reads
# another run's executables.
_CACHE_DIR = tempfile.mkdtemp(prefix="optax_mtl_tests_xla_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  """Drops JAX's in-memory compilation caches after each test module.

  The suite compiles thousands of functions in one process; each executable
  keeps memory mappings, and together they reach the kernel's map limit
  (vm.max_map_count, 65530), where XLA:CPU compilation fails and crashes.
  The persistent cache above keeps serialised executables on disk, not mapped.
  """
  yield
  jax.clear_caches()
