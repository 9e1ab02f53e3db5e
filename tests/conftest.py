"""Test configuration: 8 fake CPU devices and strict rank promotion.

Both settings must precede any JAX operation, hence they live here.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
