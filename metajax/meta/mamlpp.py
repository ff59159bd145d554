"""MAML++ (Antoniou et al. 2019): the multi-step loss, its annealing, derivative-order annealing.

Per-layer, per-step learned inner step sizes (LSLR) are ``unrolled(..., per_step=True)`` with
``learn=("step_size",)`` ([`lslr_step_sizes`][metajax.meta.lslr_step_sizes] builds the initial
tree); per-step batch norm is
``Conv4(norm="per_step")`` with ``step_aware=True`` and
[`metajax.models.select_step`][metajax.models.select_step].
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metajax.meta.objectives import task_mean
from metajax.solvers import _common
from metajax.solvers._unrolled import Unrolled


def _check_unrolled(adapt, what: str) -> Unrolled:
  if not isinstance(adapt, Unrolled):
    raise TypeError(f"{what} needs the query loss after every inner step, which only "
                    f"metajax.solvers.unrolled(...) has; got {adapt!r}.")
  return adapt


def multi_step_objective(adapt: Unrolled, loss_fn: Callable, *,
                         learn: Sequence[str] | Mapping[str, str] = (),
                         task_batching: str = "auto"):
  """MAML++'s multi-step loss: a weighted sum of the query losses after every inner step.

  Args:
    adapt: an [`unrolled`][metajax.solvers.unrolled] solver with ``K`` steps. With
      ``step_aware=True`` the query loss after step ``k`` (0-based) is
      ``loss_fn(phi_k, query, k)``, as MAML++ evaluates it with step ``k``'s batch norm.
    loss_fn: the query loss, ``loss_fn(params, batch)``.
    learn: as in [`meta_objective`][metajax.meta.meta_objective].
    task_batching: as in [`meta_objective`][metajax.meta.meta_objective].

  Returns:
    ``objective(meta_params, tasks, step_weights)``: the mean over tasks of
    ``sum_k step_weights[k] * loss_fn(phi_k, query)``, ``step_weights`` a ``(K,)`` array (a
    call argument, so an annealed schedule never recompiles;
    [`msl_weights`][metajax.meta.msl_weights]). With
    weights ``(0, ..., 0, 1)`` it equals [`meta_objective`][metajax.meta.meta_objective].

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=3, step_size=0.1)
    >>> objective = metajax.meta.multi_step_objective(adapt, loss)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 4)
    >>> weights = metajax.meta.msl_weights(3, meta_iteration=0, anneal_iterations=100)
    >>> jax.grad(objective)(jnp.ones((1, 1)), tasks, weights).shape
    (1, 1)
  """
  adapt = _check_unrolled(adapt, "multi_step_objective")
  _common.check_callable("loss_fn", loss_fn)
  if adapt.step_aware and not _common.takes_positional(loss_fn, 3):
    raise TypeError("with a step_aware solver, multi_step_objective evaluates the query after "
                    "step k as loss_fn(phi_k, query, k) (MAML++'s per-step batch norm); this "
                    "loss_fn takes fewer arguments: pass the solver's step-aware loss.")

  def task_loss(params, hyper, task, step_weights):
    weights = jnp.asarray(step_weights)
    if weights.shape != (adapt.steps,):
      raise ValueError(f"step_weights must have shape ({adapt.steps},), one weight per inner "
                       f"step; got {weights.shape}.")
    path = adapt.trajectory(params, task.support, **hyper)
    steps = jnp.arange(adapt.steps)
    per_step = (lambda phi, k: loss_fn(phi, task.query, k)) if adapt.step_aware else (
        lambda phi, k: loss_fn(phi, task.query))
    losses = jax.vmap(per_step)(path, steps)
    return jnp.sum(weights.astype(losses.dtype) * losses)

  probe = (lambda p, b: loss_fn(p, b, jnp.int32(0))) if adapt.step_aware else loss_fn  # "auto"
  return task_mean(task_loss, adapt, probe, learn=learn, task_batching=task_batching,
                   name="multi_step_objective", extra=("step_weights",))


def msl_weights(steps: int, meta_iteration, anneal_iterations: int) -> jax.Array:
  """MAML++'s annealed per-step importance of the multi-step loss (traceable).

  Starts uniform (``1/K`` each); every non-final weight decays linearly to ``0.03/K`` over
  ``anneal_iterations`` meta-iterations while the final one grows to ``1 - (K-1) 0.03/K``;
  from ``anneal_iterations`` on, only the final step counts (MAML++ then drops the multi-step
  loss). The weights always sum to 1. (MAML++'s code counts epochs; here, meta-iterations.)

  Args:
    steps: the number of inner steps ``K``.
    meta_iteration: the current meta-iteration (an int or a traced int scalar).
    anneal_iterations: how long the multi-step loss lasts (a positive int).

  Examples:
    >>> import metajax
    >>> metajax.meta.msl_weights(4, 0, 100).tolist()
    [0.25, 0.25, 0.25, 0.25]
    >>> metajax.meta.msl_weights(4, 100, 100).tolist()
    [0.0, 0.0, 0.0, 1.0]
  """
  steps = _common.check_positive_int("steps", steps)
  anneal_iterations = _common.check_positive_int("anneal_iterations", anneal_iterations)
  if isinstance(meta_iteration, (bool, np.bool_)) or jnp.ndim(meta_iteration) != 0:
    raise ValueError(f"meta_iteration must be a scalar int (the meta-iteration), got "
                     f"{meta_iteration!r}.")
  if not isinstance(meta_iteration, jax.core.Tracer):
    value = np.asarray(meta_iteration)
    if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value) or value < 0:
      raise ValueError(f"meta_iteration must be >= 0, got {meta_iteration}.")
  t = jnp.asarray(meta_iteration, jnp.result_type(float))  # float64 when x64 is on
  decay = 1.0 / steps / anneal_iterations
  floor = 0.03 / steps
  early = jnp.maximum(1.0 / steps - t * decay, floor) * jnp.ones(steps - 1)
  last = jnp.minimum(1.0 / steps + t * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
  annealing = jnp.concatenate([early, last[None]])
  final_only = jnp.zeros(steps).at[-1].set(1.0)
  return jnp.where(t < anneal_iterations, annealing, final_only)


def lslr_step_sizes(params, steps: int, value: float) -> dict:
  """Initial per-layer, per-step step sizes (LSLR): every leaf of ``params`` gets
  ``value * ones(steps)``, for ``unrolled(..., per_step=True)`` and ``learn=("step_size",)``.

  Examples:
    >>> import jax.numpy as jnp, metajax
    >>> metajax.meta.lslr_step_sizes({'w': jnp.ones((3, 2))}, 2, 0.5)['w'].tolist()
    [0.5, 0.5]
  """
  steps = _common.check_positive_int("steps", steps)
  _common.check_hyperparameter("value", value, strict=False)
  _common.params_dtype(params)  # floating-point leaves only
  return jax.tree.map(lambda p: jnp.full((steps,), value, jnp.asarray(p).dtype), params)


def maml_plus_plus(adapt: Unrolled, loss_fn: Callable, *, msl_iterations: int,
                   first_order_iterations: int = 0,
                   learn: Sequence[str] | Mapping[str, str] = (),
                   task_batching: str = "auto"):
  """MAML++'s meta-gradient: the annealed multi-step loss and derivative-order annealing.

  Args:
    adapt: an [`unrolled`][metajax.solvers.unrolled] solver (second order; for LSLR build it with
      ``per_step=True`` and learn ``"step_size"``; for per-step batch norm, ``step_aware``).
    loss_fn: the query loss.
    msl_iterations: meta-iterations with the multi-step loss
      ([`msl_weights`][metajax.meta.msl_weights]); then only the final step's query loss.
    first_order_iterations: meta-iterations run first order (``first_order=True``) before
      switching to second order (MAML++'s code switches at epoch 80 of 150). ``0``: always
      second order.
    learn: as in [`meta_objective`][metajax.meta.meta_objective].
    task_batching: as in [`meta_objective`][metajax.meta.meta_objective].

  Returns:
    ``value_and_grad(meta_params, tasks, meta_iteration) -> (loss, grads)``, marked
    ``takes_meta_iteration = True`` so that [`make_train_step`][metajax.meta.make_train_step] passes
    the
    meta-iteration (``jax.jit`` keeps the mark; a ``functools.partial`` or a decorator of your
    own must copy it). The schedule is evaluated on device: one compilation for the whole run
    (both derivative orders are compiled, one runs per iteration).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=2, step_size=0.1)
    >>> vg = metajax.meta.maml_plus_plus(adapt, loss, msl_iterations=10, first_order_iterations=5)
    >>> step = metajax.meta.make_train_step(vg, optax.adam(1e-3), metajax.tasks.sinusoid(),
    ...                                     meta_batch_size=4, iterations=8)
    >>> state, losses = step(metajax.meta.init_train_state(jnp.ones((1, 1)), optax.adam(1e-3)),
    ...                      jax.random.key(0))
    >>> losses.shape
    (8,)
  """
  adapt = _check_unrolled(adapt, "maml_plus_plus")
  msl_iterations = _common.check_positive_int("msl_iterations", msl_iterations)
  first_order_iterations = _common.check_positive_int(
      "first_order_iterations", first_order_iterations, allow_zero=True)
  second = jax.value_and_grad(multi_step_objective(adapt, loss_fn, learn=learn,
                                                   task_batching=task_batching))
  first = second
  if first_order_iterations and not adapt.first_order:
    first_order = copy.copy(adapt)
    first_order.first_order = True
    first = jax.value_and_grad(multi_step_objective(first_order, loss_fn, learn=learn,
                                                    task_batching=task_batching))

  def value_and_grad(meta_params, tasks, meta_iteration):
    weights = msl_weights(adapt.steps, meta_iteration, msl_iterations)
    if first is second:
      return second(meta_params, tasks, weights)
    return jax.lax.cond(meta_iteration < first_order_iterations,
                        lambda: first(meta_params, tasks, weights),
                        lambda: second(meta_params, tasks, weights))

  value_and_grad.takes_meta_iteration = True
  return value_and_grad
