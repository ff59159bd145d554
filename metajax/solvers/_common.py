"""Small pytree and validation helpers shared by the inner solvers."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax.solvers._result import RESULTS

PyTree = Any


# A fixed number of gradient steps "diverged" when the objective rose more than this many times
# its start (|start|). Descent only lowers it, but a coarse step may raise it a little and still
# be what the user wants: MAML's 0.4 steps raise a fresh Conv4's support loss 23% at the first
# meta-iteration and train fine. An unstable step grows it geometrically (a quadratic at 1.5x
# its step limit: 1e6-fold in 10 steps).
LOSS_RISE = 100.0


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


def proximal_term(phi: PyTree, theta: PyTree, reg) -> jax.Array:
  """``reg/2 |phi - theta|^2``: what the implicit and adjoint objectives add to the loss."""
  diff = tree_sub(phi, theta)
  return 0.5 * reg * tree_vdot(diff, diff)


def is_traced(value) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def params_dtype(params: PyTree, name: str = "params"):
  """The floating dtype of a parameter pytree (the widest one present)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)  # one traversal serves every check
  if not leaves:
    raise ValueError(f"{name} is an empty pytree: there is nothing to adapt.")
  for path, x in leaves:
    if not hasattr(x, "dtype"):
      raise TypeError(f"{name}{jax.tree_util.keystr(path)} is a Python {type(x).__name__}; "
                      f"{name} leaves must be arrays (wrap it with jnp.asarray).")
  bad = [f"{name}{jax.tree_util.keystr(path)} ({x.dtype})" for path, x in leaves
         if not jnp.issubdtype(x.dtype, jnp.floating)]
  if bad:
    raise TypeError(f"{name} must hold floating-point arrays only; found {', '.join(bad[:3])}"
                    f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (write 2.0, not 2, "
                    "for a number).")
  return jnp.result_type(*(x.dtype for _, x in leaves))


def check_float_dtype(dtype, name: str = "dtype") -> None:
  """``dtype`` must be a floating-point dtype (e.g. ``jnp.float32``)."""
  try:
    floating = jnp.issubdtype(dtype, jnp.floating)
  except TypeError as err:
    raise TypeError(f"{name} must be a floating-point dtype, got {dtype!r}.") from err
  if not floating:
    raise TypeError(f"{name} must be a floating-point dtype such as jnp.float32, got "
                    f"{jnp.dtype(dtype).name}.")


def check_one_dtype(params, solver: str) -> None:
  """Solvers whose loops carry params as one state need one floating dtype throughout."""
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
  if len(dtypes) > 1:
    raise TypeError(f"the {solver} solver needs params of one dtype, got {dtypes}; cast them "
                    "(e.g. jax.tree.map(lambda p: p.astype(jnp.float32), params)).")
  if dtypes:
    check_not_half(dtypes[0], solver,
                   "its tolerances and line searches are not meaningful in half precision")


def check_not_half(dtype, solver: str, why: str) -> None:
  """Half-precision params (bfloat16, float16) are refused, saying ``why``."""
  if str(dtype) in ("bfloat16", "float16"):
    raise TypeError(f"the {solver} solver needs float32 or float64 params, got {dtype}: {why}; "
                    "keep float32 params and cast inside loss_fn for mixed precision.")


def default_tol(dtype, *, float64: float, float32: float) -> float:
  """A tolerance suited to ``dtype`` (tighter in double precision)."""
  return float64 if jnp.finfo(dtype).bits >= 64 else float32


def check_callable(name: str, value) -> None:
  if not callable(value):
    raise TypeError(f"{name} must be callable, got {type(value).__name__}.")


def check_family(name: str, family, num_data: int | None = None) -> None:
  """``family(key, num_tasks, *data)`` must accept its arguments (``num_data`` data arrays;
  None: any). A factory passed uncalled (``metajax.tasks.sinusoid``) is named here."""
  try:
    signature = inspect.signature(family)
  except (TypeError, ValueError):  # a builtin or C callable: nothing to check
    return
  try:
    if num_data is None:
      signature.bind_partial(None, None)
    else:
      signature.bind(None, None, *([None] * num_data))
  except TypeError as err:
    given = "" if num_data is None else f" with {num_data} data argument(s)"
    raise TypeError(f"{name} is called as {name}(key, num_tasks, *data){given}, which its "
                    f"signature {signature} does not accept ({err}). A task family is what a "
                    "factory returns: metajax.tasks.sinusoid(), not metajax.tasks.sinusoid; the "
                    "data arrays after the key are those the family samples from.") from None


def takes_positional(fn, n: int) -> bool:
  """Whether ``fn`` accepts ``n`` positional arguments (True when it cannot be inspected)."""
  try:
    inspect.signature(fn).bind(*range(n))
  except TypeError:
    return False
  except ValueError:  # no signature (some builtins, C callables)
    return True
  return True


def check_not_solver(name: str, value, call: str) -> None:
  """``value`` (a loss or metric) must not be an inner solver: ``call(adapt, loss_fn)`` swapped."""
  if hasattr(value, "hyperparameters") and hasattr(value, "loss_fn"):
    raise TypeError(f"{call}: {name} is an inner solver ({value!r}); the arguments look "
                    f"swapped: pass the solver first, {call}(adapt, {name}).")


@contextlib.contextmanager
def naming_model_inputs(call: str, **data):
  """Within ``with``: flax's own errors (ScopeParamShapeError: inputs of another width or
  channel count than the model was built for) become a ValueError naming ``call`` and the
  shapes of ``data``; any other error passes unchanged."""
  try:
    yield
  except Exception as err:
    if not type(err).__module__.startswith("flax."):
      raise
    shapes = "; ".join(f"{name} shapes {jax.tree.map(lambda x: tuple(jnp.shape(x)), value)}"
                       for name, value in data.items())
    raise ValueError(f"{call} failed: the model does not take this data ({shapes}; inputs of "
                     f"another width or channel count than the model was initialized for?): "
                     f"{type(err).__name__}: {err}") from err


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int (it is static), got {value!r}.")
  low = 0 if allow_zero else 1
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}.")
  return int(value)


def check_tolerance(name: str, value) -> None:
  """A static tolerance: ``None`` or a finite float >= 0."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise TypeError(f"{name} must be a float >= 0 or None, got {value!r}.")
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite float >= 0 or None, got {value!r}.")


def check_hyperparameter(name: str, value, *, strict: bool = True, signed: bool = False) -> None:
  """Validates a float hyperparameter (or a pytree of them) that is concrete.

  Traced leaves are skipped here and checked at run time (``hyperparameter_result``).
  Concrete ``jax.Array`` values captured inside ``jit`` are checked too: they are read with
  numpy, never converted through a tracer.
  """
  if value is None:
    raise TypeError(f"{name} must be a float, got None.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(value):
    where = f"{name}{jax.tree_util.keystr(path)}"
    if isinstance(leaf, jax.core.Tracer):
      continue
    if isinstance(leaf, (str, bytes)) or leaf is None:
      raise TypeError(f"{where} must be a float or an array, got {leaf!r}.")
    try:
      arr = np.asarray(leaf)
    except Exception as err:
      raise TypeError(f"{where} must be a float or an array, got {leaf!r}.") from err
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) \
        or np.issubdtype(arr.dtype, np.complexfloating):
      raise TypeError(f"{where} must be a real number, got dtype {arr.dtype}.")
    if arr.size == 0:
      raise ValueError(f"{where} is an empty array.")
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"{where} must be finite, got {_show(arr)}.")
    if not signed and (np.any(arr <= 0) if strict else np.any(arr < 0)):
      raise ValueError(f"{where} must be {'>' if strict else '>='} 0, got {_show(arr)}.")
  if not jax.tree.leaves(value):
    raise ValueError(f"{name} is an empty pytree.")


def check_static_scalar(name: str, value, why: str = "") -> float:
  """A positive float fixed when an object is built: concrete (not traced) and 0-d."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} is fixed when it is built, so it must be a concrete float, got a "
                    f"traced value {value.aval}{why}.")
  check_hyperparameter(name, value, strict=True)
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}{why}.")
  return float(value)


def _show(arr: np.ndarray) -> str:
  if arr.ndim == 0:
    return repr(arr.item())
  bad = arr[~np.isfinite(arr)] if not np.all(np.isfinite(arr)) else arr[arr <= 0]
  return f"an array of shape {arr.shape} containing {bad.ravel()[0].item()!r}"


def hyperparameter_result(value, *, strict: bool = True, signed: bool = False) -> jax.Array:
  """Run-time check of a possibly traced hyperparameter: ``RESULTS.invalid_hyperparameter`` or 0.

  As ``check_hyperparameter``: finite, and ``> 0`` (``strict``) or ``>= 0``; ``signed``
  values need only be finite.
  """
  ok = jnp.ones((), bool)
  for leaf in jax.tree.leaves(value):
    leaf = jnp.asarray(leaf)
    ok &= jnp.all(jnp.isfinite(leaf))
    if not signed:
      ok &= jnp.all(leaf > 0 if strict else leaf >= 0)
  return jnp.where(ok, RESULTS.successful, RESULTS.invalid_hyperparameter).astype(jnp.int32)


def worst(value) -> jax.Array:
  """A scalar summary of a hyperparameter for messages: its first non-finite entry (NaN or
  +-inf) if it has one, else its smallest."""
  leaves = [jnp.ravel(jnp.asarray(x)) for x in jax.tree.leaves(value)]
  if not leaves:
    return jnp.zeros(())
  flat = jnp.concatenate(leaves)
  bad = ~jnp.isfinite(flat)
  return jnp.where(jnp.any(bad), flat[jnp.argmax(bad)], jnp.min(flat))


def as_scalar(name: str, value, dtype) -> jax.Array:
  """Casts a scalar hyperparameter to ``dtype``, checking that it is a scalar."""
  arr = jnp.asarray(value)
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
  return arr.astype(dtype)
