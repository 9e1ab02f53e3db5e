"""The small convolutional trunk of ``train_step.py --model conv``, shared by ``K`` linear heads.

``depth`` 3x3 convolutions with stride 2 (``SAME`` padding, ReLU), channels
doubling up to ``width``, then a global average pool: the representation
``z`` is ``(batch, width)`` and the heads are those of the MLP model
(``gradient_paths.py``), one linear regression head per task. Inputs are
``(batch, image_size, image_size, 3)`` images (NHWC). ``torch_trunk`` is the
same trunk in PyTorch, for the peers of ``train_step.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gradient_paths

CHANNELS_IN = 3
heads_losses = gradient_paths.heads_losses
heads_losses_per_task = gradient_paths.heads_losses_per_task
is_shared = gradient_paths.is_shared


def channels(width: int, depth: int) -> list[int]:
  return [max(width >> (depth - 1 - i), 8) for i in range(depth)]


def init_params(key, width, depth, num_tasks, head_dim):
  keys = jax.random.split(key, depth + num_tasks)
  trunk, fan_in = [], CHANNELS_IN
  for i, out in enumerate(channels(width, depth)):
    scale = 1.0 / jnp.sqrt(9.0 * fan_in)
    trunk.append({"w": jax.random.normal(keys[i], (3, 3, fan_in, out)) * scale, "b": jnp.zeros((out,))})
    fan_in = out
  return {"trunk": trunk, "heads": gradient_paths.init_heads(keys[depth:], width, head_dim)}


def init_for(sizes, num_tasks):
  """``init_params`` at the sizes of ``train_step.py``'s command line (``width``, ``depth``, ...)."""
  return init_params(jax.random.key(0), sizes.width, sizes.depth, num_tasks, sizes.head_dim)


def input_shape(sizes):
  """The shape of one example."""
  return (sizes.image_size, sizes.image_size, CHANNELS_IN)


def encoder(params, x, y):
  del y
  h = x
  for layer in params["trunk"]:
    h = lax.conv_general_dilated(h, layer["w"], window_strides=(2, 2), padding="SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"][None, None, None, :])
  return jnp.mean(h, axis=(1, 2))


def torch_trunk(torch, trunk):
  """``encoder`` in ``torch.nn`` (NCHW) with the same weights and the same padding."""
  nn = torch.nn

  class SameConv(nn.Conv2d):
    """A strided convolution padded as XLA's ``SAME``.

    XLA pads ``total // 2`` before and the rest after (a side of 32 at stride 2:
    0 and 1); ``Conv2d(padding=1)`` would pad 1 and 1, shifting every window.
    """

    def forward(self, h):
      pads = []
      for size, kernel, stride in zip(h.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # F.pad: last dimension first
        pads += [total // 2, total - total // 2]
      return super().forward(nn.functional.pad(h, pads))

  layers = []
  for layer in trunk:
    height, width, fan_in, out = layer["w"].shape
    conv = SameConv(fan_in, out, kernel_size=(height, width), stride=2)
    with torch.no_grad():
      conv.weight.copy_(torch.as_tensor(np.array(layer["w"]).transpose(3, 2, 0, 1)))  # HWIO -> OIHW
      conv.bias.copy_(torch.as_tensor(np.array(layer["b"])))
    layers += [conv, nn.ReLU()]
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def torch_inputs(x):
  """A batch of NHWC images in the NCHW layout of ``torch_trunk``."""
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def task_losses(params, x, y):
  return heads_losses(params, encoder(params, x, y), x, y)
