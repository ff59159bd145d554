"""Small pytree and validation helpers shared by the inner solvers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product of two pytrees with the same structure."""
  parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(parts[1:], parts[0])


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of a pytree seen as one flat vector."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """Returns ``alpha * x + y`` leaf by leaf."""
  return jax.tree.map(lambda xi, yi: (alpha * xi).astype(yi.dtype) + yi, x, y)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: x - y, a, b)


def params_dtype(params: PyTree):
  """The floating dtype of a parameter pytree (the widest one present)."""
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
  if not leaves:
    raise ValueError("params is an empty pytree: there is nothing to adapt.")
  floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  if len(floats) != len(leaves):
    bad = [str(x.dtype) for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
    raise TypeError(f"params must hold floating-point arrays only; found dtypes {bad}.")
  return jnp.result_type(*floats)


def default_tol(dtype, *, float64: float, float32: float) -> float:
  """A tolerance suited to ``dtype`` (tighter in double precision)."""
  return float64 if jnp.finfo(dtype).bits >= 64 else float32


def check_callable(name: str, value) -> None:
  if not callable(value):
    raise TypeError(f"{name} must be callable, got {type(value).__name__}.")


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be a Python int (it is static), got {value!r}.")
  low = 0 if allow_zero else 1
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}.")
  return value


def check_nonnegative_float(name: str, value, *, strict: bool = False) -> None:
  """Validates a float setting (``> 0`` if ``strict``) when concrete; traced values pass."""
  if isinstance(value, jax.core.Tracer) or value is None:
    return
  try:
    arr = jnp.asarray(value)
  except TypeError as err:
    raise TypeError(f"{name} must be a float or an array, got {value!r}.") from err
  if isinstance(arr, jax.core.Tracer):
    return
  if not jnp.issubdtype(arr.dtype, jnp.number):
    raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}.")
  if bool(jnp.any(arr <= 0)) if strict else bool(jnp.any(arr < 0)):
    raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {value!r}.")


def as_scalar(name: str, value, dtype) -> jax.Array:
  """Casts a scalar hyperparameter to ``dtype``, checking that it is a scalar."""
  arr = jnp.asarray(value)
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
  return arr.astype(dtype)


def raise_if(failed, message: str, **values) -> None:
  """Raises ``RuntimeError(message.format(**values))`` at run time where ``failed``.

  Works eagerly and under ``jit``/``vmap``/``grad`` (inside ``jit`` the error
  surfaces as a ``JaxRuntimeError`` whose text holds the message).
  """
  def check(failed, **values):
    failed = np.asarray(failed)
    if np.any(failed):
      worst = {k: np.asarray(v)[failed].max() if np.ndim(v) else v for k, v in values.items()}
      raise RuntimeError(message.format(**worst))
  jax.debug.callback(check, failed, **values)
