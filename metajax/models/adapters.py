"""Adapters: use a flax NNX module or an equinox module as ``(params, apply_fn)``."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def from_nnx(module) -> tuple[Any, Callable]:
  """Splits a ``flax.nnx`` module into trainable ``nnx.Param`` state and an apply function.

  Non-parameter state (e.g. batch-norm running statistics) stays fixed inside
  ``apply_fn``: each call runs on a copy, so updates a module makes while it runs (a
  ``BatchNorm`` in training mode normalizes with the batch's statistics and would update its
  averages; a ``Dropout`` advances its RNG count) are discarded. A training-mode ``Dropout``
  therefore draws the same mask on every call: call ``module.eval()`` first to turn it off.
  ``params`` is a pytree that every solver can adapt.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from metajax.models import from_nnx
    >>> params, apply_fn = from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> apply_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
  """
  from flax import nnx

  if not isinstance(module, nnx.Module):
    raise TypeError(f"from_nnx takes a flax.nnx.Module, got {_describe(module)}{_hint(module)}")
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"from_nnx: {type(module).__name__} has no nnx.Param state: there is "
                     "nothing to adapt.")

  def apply_fn(params, *args, **kwargs):
    # A copy of the rest per call: what the module mutates while it runs (batch-norm running
    # statistics in training mode, dropout's RNG count) is discarded, so the original module is
    # never changed and apply_fn is a pure function under jit, vmap and grad.
    fixed = jax.tree.map(jnp.array, rest)
    return nnx.merge(graphdef, params, fixed)(*args, **kwargs)

  return params, apply_fn


def from_equinox(module, *, batched: bool = True) -> tuple[Any, Callable]:
  """Splits an equinox module into its inexact arrays and an apply function.

  Args:
    module: an ``equinox.Module`` (called on one example, as equinox layers are).
    batched: ``apply_fn`` maps the module over the leading axis of its input.

  Examples:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from metajax.models import from_equinox
    >>> params, apply_fn = from_equinox(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    >>> apply_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
  """
  import equinox as eqx

  if not isinstance(module, eqx.Module):
    raise TypeError(f"from_equinox takes an equinox.Module, got "
                    f"{_describe(module)}{_hint(module)}")
  if not isinstance(batched, bool):
    raise TypeError(f"batched must be True or False, got {batched!r}.")
  is_state = lambda node: isinstance(node, eqx.nn.StateIndex)
  if any(is_state(node) for node in jax.tree.leaves(module, is_leaf=is_state)):
    raise TypeError(f"from_equinox: {type(module).__name__} holds stateful layers "
                    "(eqx.nn.BatchNorm or another eqx.nn.StateIndex), which are called with a "
                    "state argument that apply_fn(params, x) does not pass; use a stateless "
                    "module (eqx.nn.LayerNorm, GroupNorm) or metajax.models.Conv4 with "
                    "norm='transductive'.")
  params, static = eqx.partition(module, eqx.is_inexact_array)
  if not jax.tree.leaves(params):
    raise ValueError(f"from_equinox: {type(module).__name__} holds no floating-point arrays: "
                     "there is nothing to adapt.")

  def apply_fn(params, x):
    model = eqx.combine(params, static)
    return jax.vmap(model)(x) if batched else model(x)

  return params, apply_fn


def with_context(apply_fn: Callable, *, keyword: str | None = None) -> Callable:
  """CAVIA's model: ``apply_fn`` given a context vector, concatenated to every input by default.

  Returns ``apply(p, x) = apply_fn(p['params'], concat([x, context], axis=-1))`` where
  ``p = {'params': ..., 'context': c}`` (as [`metajax.solvers.context`][metajax.solvers.context]
  returns) and ``c``
  (shape ``(d,)``) is broadcast over the leading axes of ``x``: the network's first layer takes
  ``x.shape[-1] + d`` inputs. With ``keyword``, the context is passed to the network instead,
  ``apply_fn(p['params'], x, **{keyword: c})``, e.g. ``keyword="context"`` for
  ``Conv4(..., context=d)``, which modulates its blocks by FiLM (an input-level context would
  be cancelled by batch norm).

  Examples:
    >>> import jax.numpy as jnp, metajax
    >>> apply_fn = metajax.models.with_context(lambda w, x: x @ w)
    >>> p = {'params': jnp.ones((3, 1)), 'context': jnp.array([1.0, 2.0])}
    >>> apply_fn(p, jnp.zeros((4, 1))).ravel().tolist()
    [3.0, 3.0, 3.0, 3.0]
  """
  if not callable(apply_fn):
    raise TypeError(f"with_context(apply_fn) takes a callable, got {apply_fn!r}.")
  if keyword is not None and not (isinstance(keyword, str) and keyword.isidentifier()):
    raise TypeError(f"keyword must be an argument name of apply_fn, got {keyword!r}.")
  if keyword is None and getattr(getattr(apply_fn, "module", None), "context", 0):
    raise ValueError("this model takes its context as an argument (Conv4(context=d), by FiLM): "
                     "use with_context(apply_fn, keyword='context').")

  def apply(p, x, *args, **kwargs):
    if not (isinstance(p, dict) and set(p) == {"params", "context"}):
      raise TypeError("with_context's apply takes {'params': ..., 'context': ...} (what "
                      "metajax.solvers.context returns), got "
                      f"{sorted(p) if isinstance(p, dict) else type(p).__name__}.")
    context = jnp.asarray(p["context"])
    if context.ndim != 1:
      raise ValueError(f"the context must be a vector (shape (d,)), got shape {context.shape}.")
    if keyword is not None:
      return apply_fn(p["params"], x, *args, **{keyword: context}, **kwargs)
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, context.dtype)  # integer inputs must not truncate it
    full = jnp.broadcast_to(context.astype(dtype), x.shape[:-1] + context.shape)
    x = x.astype(dtype)
    return apply_fn(p["params"], jnp.concatenate([x, full], axis=-1), *args, **kwargs)

  return apply


def _describe(obj) -> str:
  if isinstance(obj, type):
    return f"the class {obj.__module__}.{obj.__qualname__}"
  cls = type(obj)
  return f"{cls.__module__}.{cls.__qualname__}"


def _hint(obj) -> str:
  """Which adapter (or function) fits ``obj``, as the end of an error message."""
  import flax.linen as nn
  if isinstance(obj, nn.Module):
    return " (a flax.linen module: use metajax.models.init_model, or make_mlp for an MLP)."
  try:
    from flax import nnx
    if isinstance(obj, nnx.Module):
      return " (a flax.nnx module: use metajax.models.from_nnx)."
  except ImportError:  # pragma: no cover
    pass
  try:
    import equinox as eqx
    if isinstance(obj, eqx.Module):
      return " (an equinox module: use metajax.models.from_equinox)."
  except ImportError:  # pragma: no cover
    pass
  if isinstance(obj, type):
    return " (a class: pass an instance)."
  return "."
