"""The MLP of MAML's sinusoid experiments (1-40-40-1, ReLU)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MAML_KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.01)
"""The weight initializer of MAML's sinusoid code (``tf.truncated_normal(stddev=0.01)``)."""


class MLP(nn.Module):
  """A fully connected network.

  Attributes:
    features: hidden widths followed by the output width.
    activation: nonlinearity between layers.
  """

  features: Sequence[int] = (40, 40, 1)
  activation: Callable = nn.relu
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = self.activation(nn.Dense(width, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.features[-1], kernel_init=self.kernel_init)(x)


def make_mlp(key, in_features: int = 1, features: Sequence[int] = (40, 40, 1), *,
             activation: Callable = nn.relu, kernel_init: Callable | None = None,
             dtype=jnp.float32):
  """Initializes an :class:`MLP`; returns ``(params, apply_fn)``.

  Args:
    key: PRNG key for the initialization.
    in_features: input width.
    features: hidden widths followed by the output width.
    activation: nonlinearity between layers.
    kernel_init: weight initializer; ``None`` is flax's LeCun normal. MAML's sinusoid code uses
      :data:`MAML_KERNEL_INIT` (truncated normal, standard deviation 0.01). Biases start at zero.
    dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import make_mlp
    >>> params, apply_fn = make_mlp(jax.random.key(0))
    >>> apply_fn(params, jnp.zeros((5, 1))).shape
    (5, 1)
  """
  module = MLP(tuple(features), activation)
  if kernel_init is not None:
    module = module.clone(kernel_init=kernel_init)
  params = module.init(key, jnp.zeros((1, in_features), dtype))["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def apply_fn(params, x):
    return module.apply({"params": params}, x)

  return params, apply_fn
