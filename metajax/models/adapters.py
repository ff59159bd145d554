"""Adapters: use a flax NNX module or an equinox module as ``(params, apply_fn)``."""

from __future__ import annotations

from typing import Any, Callable

import jax


def from_nnx(module) -> tuple[Any, Callable]:
  """Splits a ``flax.nnx`` module into trainable ``nnx.Param`` state and an apply function.

  Non-parameter state (e.g. batch-norm running statistics) stays fixed inside
  ``apply_fn``; ``params`` is a pytree that every solver can adapt.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from metajax.models import from_nnx
    >>> params, apply_fn = from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> apply_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def apply_fn(params, *args, **kwargs):
    return nnx.merge(graphdef, params, rest)(*args, **kwargs)

  return params, apply_fn


def from_equinox(module, *, batched: bool = True) -> tuple[Any, Callable]:
  """Splits an equinox module into its inexact arrays and an apply function.

  Args:
    module: an ``equinox.Module`` (called on one example, as equinox layers are).
    batched: ``apply_fn`` maps the module over the leading axis of its input.

  Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from metajax.models import from_equinox
    >>> params, apply_fn = from_equinox(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    >>> apply_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
  """
  import equinox as eqx

  params, static = eqx.partition(module, eqx.is_inexact_array)

  def apply_fn(params, x):
    model = eqx.combine(params, static)
    return jax.vmap(model)(x) if batched else model(x)

  return params, apply_fn
