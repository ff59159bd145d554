"""Unrolled inner loops: MAML, first-order MAML, Meta-SGD, Reptile's inner loop."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax.solvers import _common, _loops

PyTree = Any
_UNSET = object()


class UnrolledInfo(NamedTuple):
  """Diagnostics of one unrolled adaptation.

  Attributes:
    losses: support loss before each inner step, shape ``(steps,)``.
    final_loss: support loss at the adapted parameters.
    grad_norm: norm of the support-loss gradient at the adapted parameters.
  """

  losses: jax.Array
  final_loss: jax.Array
  grad_norm: jax.Array


def _step_size_tree(step_size, params: PyTree, dtype) -> PyTree:
  """Broadcasts a scalar step size, or checks a per-parameter (Meta-SGD) one."""
  if jax.tree.structure(step_size) == jax.tree.structure(params):
    def check(path, a, p):
      a = jnp.asarray(a)
      if a.shape not in ((), p.shape):
        raise ValueError(
            f"step_size{jax.tree_util.keystr(path)} has shape {a.shape}; a per-parameter "
            f"step size must be a scalar or match the parameter's shape {p.shape}.")
      return a.astype(p.dtype)
    return jax.tree_util.tree_map_with_path(check, step_size, params)
  if len(jax.tree.leaves(step_size)) == 1 and not isinstance(step_size, (dict, list, tuple)):
    a = _common.as_scalar("step_size", step_size, dtype)
    return jax.tree.map(lambda p: a.astype(p.dtype), params)
  raise ValueError(
      "step_size must be a scalar or a pytree with the same structure as params "
      f"(Meta-SGD); got structure {jax.tree.structure(step_size)} for params "
      f"{jax.tree.structure(params)}.")


def unrolled(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    steps: int,
    step_size: Any = _UNSET,
    optimizer: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool = False,
    unroll: int | bool | str = "auto",
    step_aware: bool = False,
):
  """K inner steps, differentiated by backpropagation through the loop (MAML).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set.
    steps: number of inner steps ``K`` (static).
    step_size: inner learning rate for plain gradient descent: a scalar, or a
      pytree shaped like ``params`` for per-parameter step sizes (Meta-SGD).
      Defaults to 0.01. It can also be passed at call time (possibly traced),
      and then receives a meta-gradient.
    optimizer: any optax ``GradientTransformation`` used as the inner
      optimizer instead of gradient descent. To differentiate through Adam, use
      ``optax.adam(lr, eps_root=1e-8)`` (or :func:`differentiable_adam`):
      with ``eps_root=0`` the square root has an infinite derivative wherever a
      gradient entry is exactly zero, which turns meta-gradients into NaN.
    first_order: first-order MAML; inner gradients are treated as constants so
      ``d phi / d theta`` is the identity (step sizes still get gradients).
    remat: rematerialize each inner step in the backward pass (same gradient,
      memory of one step instead of ``K``).
    unroll: how the loop is written: ``True`` (Python loop, fully unrolled),
      an int (``lax.scan`` unrolled by that factor; ``1`` is a rolled scan),
      or ``"auto"`` (see :func:`metajax.solvers.choose_unroll`).
    step_aware: call ``loss_fn(params, batch, step)`` with the inner step
      index ``0..K-1`` (an int32 scalar), e.g. for MAML++'s per-step batch norm
      with :func:`metajax.models.select_step`.

  Returns:
    ``adapt(params, support, *, step_size=None, return_info=False)`` returning
    adapted params (and an :class:`UnrolledInfo` when ``return_info``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import metajax
    >>> loss = lambda p, b: jnp.mean((b[0] * p['w'] - b[1]) ** 2)
    >>> adapt = metajax.solvers.unrolled(loss, steps=3, step_size=0.1)
    >>> support = (jnp.ones(4), 2.0 * jnp.ones(4))
    >>> phi = adapt({'w': jnp.array(0.0)}, support)
    >>> round(float(phi['w']), 4)
    0.976
  """
  _common.check_callable("loss_fn", loss_fn)
  _common.check_positive_int("steps", steps)
  if optimizer is not None and step_size is not _UNSET:
    raise ValueError(
        "step_size is only used by plain gradient descent; with optimizer= set the "
        "learning rate inside the optax optimizer instead.")
  if optimizer is not None and not hasattr(optimizer, "update"):
    raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
  default_step_size = 0.01 if step_size is _UNSET else step_size
  if step_size is not _UNSET and len(jax.tree.leaves(step_size)) == 1:
    _common.check_nonnegative_float("step_size", jax.tree.leaves(step_size)[0])
  value_and_grad = jax.value_and_grad(loss_fn)

  def adapt(params, support, *, step_size=None, return_info=False):
    dtype = _common.params_dtype(params)
    if optimizer is not None and step_size is not None:
      raise ValueError("step_size cannot be passed at call time when optimizer= is set.")
    rates = None
    if optimizer is None:
      rates = _step_size_tree(default_step_size if step_size is None else step_size,
                              params, dtype)

    def step(carry):
      phi, opt_state, k = carry
      loss, grads = value_and_grad(phi, support, *((k,) if step_aware else ()))
      if first_order:
        grads = jax.lax.stop_gradient(grads)
      if optimizer is None:
        phi = jax.tree.map(lambda p, g, a: p - a * g, phi, grads, rates)
      else:
        updates, opt_state = optimizer.update(grads, opt_state, phi)
        phi = optax.apply_updates(phi, updates)
      return (phi, opt_state, k + 1), loss

    if remat:
      step = jax.checkpoint(step)
    opt_state = None if optimizer is None else optimizer.init(params)
    probe = (lambda p, b: loss_fn(p, b, 0)) if step_aware else loss_fn
    n_unroll = _loops.resolve_unroll(unroll, steps, probe, params, support)
    carry = (params, opt_state, jnp.zeros((), jnp.int32))
    (phi, _, k), losses = _loops.repeat(step, carry, steps, n_unroll)
    if not return_info:
      return phi
    final_loss, grads = value_and_grad(phi, support, *((k,) if step_aware else ()))
    return phi, UnrolledInfo(losses, final_loss, _common.tree_norm(grads))

  return adapt


def differentiable_adam(learning_rate, **kwargs) -> optax.GradientTransformation:
  """``optax.adam`` with ``eps_root=1e-8``, safe to differentiate through.

  Example:
    >>> import metajax
    >>> opt = metajax.solvers.differentiable_adam(1e-2)
  """
  kwargs.setdefault("eps_root", 1e-8)
  return optax.adam(learning_rate, **kwargs)
