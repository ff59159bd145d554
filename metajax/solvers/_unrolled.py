"""Unrolled inner loops: MAML, first-order MAML, Meta-SGD, Reptile's inner loop."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.solvers import _common, _loops
from metajax.solvers._result import RESULTS, AdaptInfo, all_finite, error_if
from metajax.solvers.base import InnerSolver

PyTree = Any
DEFAULT_STEP_SIZE = 0.01


def _step_size_tree(step_size, params: PyTree, dtype, steps: int | None = None) -> PyTree:
  """Broadcasts a scalar step size, or checks a per-parameter (Meta-SGD) one.

  With ``steps`` (``per_step=True``) every leaf has a leading axis of length ``steps``: a
  ``(steps,)`` array for the whole tree, or per leaf ``(steps,)`` (MAML++'s per-layer, per-step
  rates) or ``(steps, *param.shape)``.
  """
  lead = () if steps is None else (steps,)
  what = "a per-parameter step size" if steps is None else "a per-step step size (per_step=True)"
  if jax.tree.structure(step_size) == jax.tree.structure(params):
    def check(path, a, p):
      a = jnp.asarray(a)
      if a.shape not in (lead, lead + p.shape):
        raise ValueError(
            f"step_size{jax.tree_util.keystr(path)} has shape {a.shape}; {what} must have "
            f"shape {lead} or {lead + p.shape} (the parameter's shape {p.shape}).")
      return a.astype(p.dtype)
    return jax.tree_util.tree_map_with_path(check, step_size, params)
  if len(jax.tree.leaves(step_size)) == 1 and not isinstance(step_size, (dict, list, tuple)):
    a = (_common.as_scalar("step_size", step_size, dtype) if steps is None
         else _per_step_array(step_size, steps))
    return jax.tree.map(lambda p: a.astype(p.dtype), params)
  raise ValueError(
      "step_size must be a scalar or a pytree with the same structure as params "
      f"(Meta-SGD); got structure {jax.tree.structure(step_size)} for params "
      f"{jax.tree.structure(params)}.")


def _per_step_array(step_size, steps: int) -> jax.Array:
  """One rate per inner step for every parameter: an array of shape ``(steps,)``."""
  a = jnp.asarray(step_size)
  if a.shape != (steps,):
    raise ValueError(f"step_size has shape {a.shape}; with per_step=True one rate per inner "
                     f"step needs shape ({steps},), or a pytree like params.")
  return a


def _per_step_list(step_size, per_step: bool):
  """With ``per_step``, a list or tuple of numbers is the ``(steps,)`` array of rates."""
  if per_step and isinstance(step_size, (list, tuple)) and step_size and all(
      isinstance(a, (int, float, np.number)) and not isinstance(a, bool) for a in step_size):
    return jnp.asarray(step_size, dtype=float)
  return step_size


def _check_step_size(step_size, per_step: bool = False) -> None:
  """A scalar step size (or, with ``per_step``, a ``(steps,)`` array of them) must be finite and
  >= 0; a per-parameter tree (Meta-SGD, MAML++'s per-layer rates) only finite: Meta-SGD's
  learned rates set direction as well as size and may be negative (Li et al. 2017)."""
  per_parameter = isinstance(step_size, (dict, list, tuple)) or (
      len(jax.tree.leaves(step_size)) == 1
      and jnp.ndim(jax.tree.leaves(step_size)[0]) > int(per_step))
  _common.check_hyperparameter("step_size", step_size, strict=False, signed=per_parameter)


DIVERGED_MESSAGE = (
    f"the support loss rose more than {_common.LOSS_RISE:g}-fold over the inner steps "
    "(support_loss_start to support_loss_last, at the last step), which gradient descent does "
    "past its stability limit (a step of 2 / the largest Hessian eigenvalue): lower step_size")


class Unrolled(InnerSolver):
  """K inner steps differentiated by backpropagation (see
  [`unrolled`][metajax.solvers.unrolled])."""

  name = "unrolled"

  def __init__(self, loss_fn, *, steps, step_size, optimizer, first_order, remat, unroll,
               step_aware, per_step, throw):
    super().__init__(loss_fn, throw=throw)
    self.steps = _common.check_positive_int("steps", steps)
    if optimizer is not None and step_size is not None:
      raise ValueError(
          "step_size is only used by plain gradient descent; with optimizer= set the "
          "learning rate inside the optax optimizer instead.")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
      raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
    for flag, value in (("first_order", first_order), ("remat", remat),
                        ("step_aware", step_aware), ("per_step", per_step)):
      if not isinstance(value, bool):
        raise TypeError(f"{flag} must be True or False, got {value!r}.")
    if not (unroll == "auto" or unroll is True or (
        isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1)):
      raise ValueError(f"unroll must be 'auto', True, or an int >= 1; got {unroll!r}.")
    if per_step and optimizer is not None:
      raise ValueError("per_step=True gives plain gradient descent one step size per inner "
                       "step; with optimizer= use an optax schedule instead.")
    if per_step and step_size is None:
      step_size = jnp.full((self.steps,), DEFAULT_STEP_SIZE)
    step_size = _per_step_list(step_size, per_step)
    self.per_step = per_step
    self.step_size = DEFAULT_STEP_SIZE if step_size is None and optimizer is None else step_size
    if self.step_size is not None:
      _check_step_size(self.step_size, per_step)
      if per_step and not isinstance(self.step_size, (dict, list, tuple)):
        _per_step_array(self.step_size, self.steps)
    self.optimizer, self.first_order, self.remat = optimizer, first_order, remat
    self.unroll, self.step_aware = unroll, step_aware
    if step_aware and not _common.takes_positional(loss_fn, 3):
      raise TypeError("step_aware=True calls loss_fn(params, batch, step) with the inner step's "
                      "index, but this loss_fn takes fewer positional arguments: give it a step "
                      "argument, or drop step_aware.")
    self.hyperparameters = () if optimizer is not None else ("step_size",)

  def _bind_loss(self):
    self._value_and_grad = jax.value_and_grad(self.loss_fn)

  def _loss_args(self, k):
    return (k,) if self.step_aware else ()

  def _check_inputs(self, params, support):
    if self.step_aware:  # loss_fn takes the step index: check it with step 0
      probe = self.with_loss(lambda p, b: self.loss_fn(p, b, jnp.int32(0)))
      probe.step_aware = False
      return probe._check_inputs(params, support)
    return super()._check_inputs(params, support)

  def trajectory(self, params: PyTree, support: PyTree, **hyperparameters) -> PyTree:
    """The parameters after each inner step, stacked: every leaf gains a leading axis of length
    ``steps`` (entry ``k`` is the result of step ``k + 1``; the last entry is ``adapt(...)``).

    Checked and differentiable like the call (MAML++'s multi-step loss,
    [`metajax.meta.multi_step_objective`][metajax.meta.multi_step_objective], uses it).

    Examples:
      >>> import jax.numpy as jnp, metajax
      >>> adapt = metajax.solvers.unrolled(lambda p, b: 0.5 * jnp.sum((p - b) ** 2), steps=2,
      ...                                  step_size=0.5)
      >>> adapt.trajectory(jnp.zeros(()), jnp.ones(())).tolist()
      [0.5, 0.75]
    """
    self._check_hyperparameter_names(hyperparameters)
    self._check_inputs(params, support)
    return self._run(params, support, trajectory=True, **hyperparameters)[2]

  def _solve(self, params, support, *, step_size=None):
    return self._run(params, support, step_size=step_size)[:2]

  def _extra_args(self, loss, grads, support, k) -> dict:
    """What optax optimizers that read the objective take (``optax.lbfgs``'s line search,
    ``optax.polyak_sgd``): ``value``, ``grad`` and ``value_fn``, as optax's own loops pass them;
    transformations that take no extra arguments ignore them."""
    if not isinstance(self.optimizer, optax.GradientTransformationExtraArgs):
      return {}
    return dict(value=loss, grad=grads,
                value_fn=lambda p: self.loss_fn(p, support, *self._loss_args(k)))

  def _run(self, params, support, *, step_size=None, trajectory=False):
    dtype = _common.params_dtype(params)
    _common.check_not_half(dtype, "unrolled", "a step smaller than half precision's resolution "
                           "rounds away and leaves params unchanged, silently")
    rates = None
    if self.optimizer is None:
      if step_size is None:
        step_size = self.step_size
      else:
        step_size = _per_step_list(step_size, self.per_step)
        _check_step_size(step_size, self.per_step)
      rates = _step_size_tree(step_size, params, dtype, self.steps if self.per_step else None)

    def step(carry):
      phi, opt_state, k = carry
      loss, grads = self._value_and_grad(phi, support, *self._loss_args(k))
      if self.first_order:
        grads = jax.lax.stop_gradient(grads)
      if self.optimizer is None:
        rates_k = jax.tree.map(lambda a: a[k], rates) if self.per_step else rates
        phi = jax.tree.map(lambda p, g, a: p - a * g, phi, grads, rates_k)
      else:
        updates, opt_state = self.optimizer.update(grads, opt_state, phi, **self._extra_args(
            loss, grads, support, k))
        phi = optax.apply_updates(phi, updates)
      return (phi, opt_state, k + 1), (loss, phi if trajectory else None)

    if self.remat:
      step = jax.checkpoint(step)
    opt_state = None if self.optimizer is None else self.optimizer.init(params)
    probe = (lambda p, b: self.loss_fn(p, b, jnp.int32(0))) if self.step_aware else self.loss_fn
    n_unroll = _loops.resolve_unroll(self.unroll, self.steps, probe, params, support)
    carry = (params, opt_state, jnp.zeros((), jnp.int32))
    (phi, _, k), (losses, path) = _loops.repeat(step, carry, self.steps, n_unroll)

    finite_losses = jnp.isfinite(losses)
    finite = jnp.all(finite_losses) & all_finite(phi)
    # Gradient descent past its stability limit raises the support loss geometrically, long
    # before it overflows (float64: never, in a few steps): as the adjoint's grid, a loss that
    # ended more than LOSS_RISE-fold above its start is `diverged`. A transient spike that
    # recovers is not (MAML's sinusoid training: 0.145 -> 48 -> 0.044). Free: the loss before
    # the last step is computed anyway (the one after it is not, so steps=1 is checked for NaN
    # only).
    start, last = losses[0], losses[-1]
    floor = jnp.sqrt(jnp.finfo(losses.dtype).eps)
    rose = last > start + _common.LOSS_RISE * jnp.maximum(jnp.abs(start), floor)
    # Traced (learned) step sizes are checked for finiteness only: Meta-SGD's learned
    # per-parameter rates set direction and size and may turn negative (Li et al. 2017);
    # learn={"step_size": "log"} keeps them positive.
    hyper_ok = (RESULTS.successful if rates is None or not _common.is_traced(rates)
                else _common.hyperparameter_result(rates, signed=True))
    result = jnp.where(hyper_ok != 0, hyper_ok, jnp.where(
        ~finite, RESULTS.nonfinite, jnp.where(rose, RESULTS.diverged, RESULTS.successful)))
    result = result.astype(jnp.int32)
    first_bad = jnp.where(jnp.all(finite_losses), self.steps, jnp.argmin(finite_losses))
    if self.throw:
      values = dict(inner_step=first_bad, support_loss=jnp.where(
          first_bad < self.steps, losses[jnp.minimum(first_bad, self.steps - 1)], losses[-1]))
      if rates is not None:
        values["step_size"] = _common.worst(rates)
      values.update(support_loss_start=start, support_loss_last=last)
      messages = {RESULTS.diverged: DIVERGED_MESSAGE}
      phi = error_if(phi, result, "metajax unrolled solver, inner stage", messages, **values)
      if trajectory:
        path = error_if(path, result, "metajax unrolled solver, inner stage", messages,
                        **values)
    final_loss, grads = self._value_and_grad(phi, support, *self._loss_args(k))
    info = AdaptInfo(result=result, steps=k, residual=_common.tree_norm(grads), loss=final_loss,
                     stats={"losses": losses})
    return phi, info, path


def unrolled(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    steps: int,
    step_size: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool = False,
    unroll: int | bool | str = "auto",
    step_aware: bool = False,
    per_step: bool = False,
    throw: bool = True,
) -> Unrolled:
  """K inner steps, differentiated by backpropagation through the loop (MAML).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set. It may close over
      traced values (differentiated or vmapped): plain backpropagation sees them.
    steps: number of inner steps ``K`` (static).
    step_size: inner learning rate for plain gradient descent (finite, >= 0): a scalar, or
      a pytree shaped like ``params`` for per-parameter step sizes (Meta-SGD). Default
      0.01. It can also be passed at call time (possibly traced), and then receives a
      meta-gradient. A scalar must be finite and >= 0; per-parameter (Meta-SGD) rates and
      traced (learned) values must be finite but may be negative, as Meta-SGD's learned
      rates are (they set direction and size); ``meta_objective(..., learn={"step_size":
      "log"})`` keeps learned rates positive.
    optimizer: any optax ``GradientTransformation`` used as the inner
      optimizer instead of gradient descent. To differentiate through Adam, use
      ``optax.adam(lr, eps_root=1e-8)`` (or
      [`differentiable_adam`][metajax.solvers.differentiable_adam]):
      with ``eps_root=0`` the square root has an infinite derivative wherever a
      gradient entry is exactly zero, which turns meta-gradients into NaN. Optimizers that
      read the objective get ``value``, ``grad`` and ``value_fn`` as optax's own loops pass
      them (``optax.polyak_sgd``, ``optax.lbfgs``); a line search runs in a ``while_loop``,
      which reverse mode cannot differentiate (JAX refuses it under ``grad``): for L-BFGS
      use ``implicit(..., optimizer=inner_optimizers.lbfgs())``.
    first_order: first-order MAML; inner gradients are treated as constants so
      ``d phi / d theta`` is the identity (step sizes still get gradients).
    remat: rematerialize each inner step in the backward pass (same gradient,
      memory of one step instead of ``K``).
    unroll: how the loop is written: ``True`` (Python loop, fully unrolled),
      an int (``lax.scan`` unrolled by that factor; ``1`` is a rolled scan),
      or ``"auto"`` (see [`metajax.solvers.choose_unroll`][metajax.solvers.choose_unroll]).
    step_aware: call ``loss_fn(params, batch, step)`` with the inner step
      index ``0..K-1`` (an int32 scalar), e.g. for MAML++'s per-step batch norm
      with [`metajax.models.select_step`][metajax.models.select_step].
    per_step: one step size per inner step (MAML++'s LSLR): ``step_size`` gains a leading
      axis of length ``steps`` and step ``k`` uses entry ``k``. A ``(steps,)`` array sets one
      rate per step for every parameter; a pytree like ``params`` with leaves of shape
      ``(steps,)`` sets per-layer, per-step rates (learn them with
      ``meta_objective(..., learn=("step_size",))``); leaves of shape ``(steps, *p.shape)``
      per-parameter, per-step rates. Default ``0.01`` at every step.
    throw: raise when the support loss or the adapted parameters become non-finite (or a
      traced step size is negative or NaN), naming the inner step, the task and the loss
      reached; ``False`` reports it in ``AdaptInfo.result`` instead.

  Returns:
    An [`InnerSolver`][metajax.solvers.InnerSolver]: ``adapt(params, support, *, step_size=None)``
    returns the adapted params; ``adapt.solve(...)`` returns ``(phi, AdaptInfo)`` with
    ``stats={"losses": support loss before each step, shape (steps,)}``.

  Supports ``jit``, ``vmap``, ``grad``, ``jvp``/``jacfwd``, ``grad`` of ``grad`` and
  closures over traced values (it is plain JAX).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import metajax
    >>> loss = lambda p, b: jnp.mean((b[0] * p['w'] - b[1]) ** 2)
    >>> adapt = metajax.solvers.unrolled(loss, steps=3, step_size=0.1)
    >>> support = (jnp.ones(4), 2.0 * jnp.ones(4))
    >>> phi = adapt({'w': jnp.array(0.0)}, support)
    >>> round(float(phi['w']), 4)
    0.976
  """
  return Unrolled(loss_fn, steps=steps, step_size=step_size, optimizer=optimizer,
                  first_order=first_order, remat=remat, unroll=unroll, step_aware=step_aware,
                  per_step=per_step, throw=throw)


def differentiable_adam(learning_rate, **kwargs) -> optax.GradientTransformation:
  """``optax.adam`` with ``eps_root=1e-8``, safe to differentiate through.

  Examples:
    >>> import metajax
    >>> opt = metajax.solvers.differentiable_adam(1e-2)
  """
  kwargs.setdefault("eps_root", 1e-8)
  return optax.adam(learning_rate, **kwargs)
