"""The MLP of MAML's sinusoid experiments (1-40-40-1, ReLU)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """A fully connected network.

  Attributes:
    features: hidden widths followed by the output width.
    activation: nonlinearity between layers.
  """

  features: Sequence[int] = (40, 40, 1)
  activation: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = self.activation(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


def make_mlp(key, in_features: int = 1, features: Sequence[int] = (40, 40, 1), *,
             activation: Callable = nn.relu, dtype=jnp.float32):
  """Initializes an :class:`MLP`; returns ``(params, apply_fn)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import make_mlp
    >>> params, apply_fn = make_mlp(jax.random.key(0))
    >>> apply_fn(params, jnp.zeros((5, 1))).shape
    (5, 1)
  """
  module = MLP(tuple(features), activation)
  params = module.init(key, jnp.zeros((1, in_features), dtype))["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def apply_fn(params, x):
    return module.apply({"params": params}, x)

  return params, apply_fn
