"""The MLP of MAML's sinusoid experiments (1-40-40-1, ReLU)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.solvers import _common
from metajax.tasks import _check_key

MAML_KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.01)
"""The weight initializer of MAML's sinusoid code (``tf.truncated_normal(stddev=0.01)``)."""


class MLP(nn.Module):
  """A fully connected network.

  Attributes:
    features: hidden widths followed by the output width (a non-empty sequence of positive
      ints).
    activation: nonlinearity between layers (callable).
    kernel_init: weight initializer (callable).

  The attributes are checked when the module is initialized.
  """

  features: Sequence[int] = (40, 40, 1)
  activation: Callable = nn.relu
  kernel_init: Callable = nn.initializers.lecun_normal()

  def check(self) -> None:
    """Raises naming the attribute that cannot build this network."""
    _check_features(self.features, "MLP.features")
    _common.check_callable("MLP.activation", self.activation)
    _common.check_callable("MLP.kernel_init", self.kernel_init)

  @nn.compact
  def __call__(self, x):
    self.check()
    for width in self.features[:-1]:
      x = self.activation(nn.Dense(width, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.features[-1], kernel_init=self.kernel_init)(x)


def _check_features(features, name: str = "features") -> tuple[int, ...]:
  if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
    raise TypeError(f"{name} must be a sequence of layer widths such as (40, 40, 1), got "
                    f"{features!r}.")
  if not features:
    raise ValueError(f"{name} is empty: it needs at least the output width, e.g. (1,).")
  for i, width in enumerate(features):
    _common.check_positive_int(f"{name}[{i}]", width)
  return tuple(int(w) for w in features)


def make_mlp(key, in_features: int = 1, features: Sequence[int] = (40, 40, 1), *,
             activation: Callable | None = None, kernel_init: Callable | None = None,
             dtype=jnp.float32):
  """Initializes an [`MLP`][metajax.models.MLP]; returns ``(params, apply_fn)``.

  Args:
    key: PRNG key for the initialization.
    in_features: input width.
    features: hidden widths followed by the output width.
    activation: nonlinearity between layers; ``None`` is ReLU (``flax.linen.relu``), MAML's.
    kernel_init: weight initializer; ``None`` is flax's LeCun normal. MAML's sinusoid code uses
      [`MAML_KERNEL_INIT`][metajax.models.MAML_KERNEL_INIT] (truncated normal, standard deviation
      0.01). Biases start at zero.
    dtype: parameter dtype.

  Raises:
    TypeError, ValueError: naming the argument (``in_features``, ``features[i]``,
      ``activation``, ``kernel_init`` or ``dtype``) and what was wrong.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import make_mlp
    >>> params, apply_fn = make_mlp(jax.random.key(0))
    >>> apply_fn(params, jnp.zeros((5, 1))).shape
    (5, 1)
  """
  _common.check_positive_int("in_features", in_features)
  _check_key(key)
  features = _check_features(features)
  activation = nn.relu if activation is None else activation
  _common.check_callable("activation", activation)
  if kernel_init is not None:
    _common.check_callable("kernel_init", kernel_init)
  _common.check_float_dtype(dtype)
  module = MLP(features, activation)
  if kernel_init is not None:
    module = module.clone(kernel_init=kernel_init)
  params = module.init(key, jnp.zeros((1, in_features), dtype))["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def apply_fn(params, x):
    return module.apply({"params": params}, x)

  return params, apply_fn
