"""Evaluation over test tasks with confidence intervals; the jitted program is built once."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from metajax.meta.objectives import (
  TASK_BATCHING,
  _learned,
  _split,
  _task_batching,
  check_not_learned,
  check_tasks,
)
from metajax.solvers import _common, _loops
from metajax.tasks import Task


def confidence_interval(values, level: float = 0.95) -> tuple[float, float]:
  """Mean and half-width of the normal-approximation confidence interval.

  The normal approximation is ~29% too narrow for 5 values (Student's t); use >= 30 tasks.

  Examples:
    >>> from metajax.meta import confidence_interval
    >>> mean, half = confidence_interval([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(half, 3)
    (2.0, 1.132)
  """
  values = jnp.asarray(values, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  if values.ndim != 1 or values.shape[0] < 2:
    raise ValueError(f"values must be 1-D with at least 2 entries, got shape {values.shape}.")
  if (isinstance(level, bool) or not isinstance(level, numbers.Real)
      or not 0.0 < float(level) < 1.0):
    raise ValueError(f"level must be in (0, 1), got {level!r}.")
  if not bool(jnp.all(jnp.isfinite(values))):
    bad = int(jnp.sum(~jnp.isfinite(values)))
    raise ValueError(f"values holds {bad} non-finite entries (NaN or inf): the tasks' metric "
                     "diverged; no confidence interval is meaningful.")
  z = math.sqrt(2.0) * float(jax.scipy.special.erfinv(jnp.asarray(level, jnp.float32)))
  n = values.shape[0]
  return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(n))


@functools.lru_cache(maxsize=64)
def _program(adapt: Callable, metric_fn: Callable, mode: str):
  @jax.jit
  def run(params, hyper, batch):
    return _loops.map_tasks(lambda t: metric_fn(adapt(params, t.support, **hyper), t.query),
                            batch, mode)
  return run


def make_evaluator(adapt: Callable, metric_fn: Callable, *,
                   learn: Sequence[str] | Mapping[str, str] = (), chunk: int = 25,
                   task_batching: str = "auto"):
  """``evaluate(meta_params, tasks) -> per-task metrics``, compiled once for these functions.

  Calling it again (or [`evaluate_per_task`][metajax.meta.evaluate_per_task] with the same ``adapt``
  and ``metric_fn``)
  reuses the compiled program: evaluation during training costs no recompilation. The program
  is cached on the function objects, as ``jax.jit`` caches: a value ``adapt`` or ``metric_fn``
  reads from outside (a global, a closed-over variable) is fixed when it is first compiled.
  Learned hyperparameters therefore enter as arguments, with ``learn=`` as in
  [`meta_objective`][metajax.meta.meta_objective]: ``meta_params = {'params': theta,
  'step_size': ...}``.

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> evaluate = metajax.meta.make_evaluator(adapt, loss, chunk=4)
    >>> evaluate(jnp.ones((1, 1)), metajax.tasks.sinusoid()(jax.random.key(0), 8)).shape
    (8,)
  """
  _common.check_callable("adapt", adapt)
  _common.check_callable("metric_fn", metric_fn)
  _common.check_not_solver("metric_fn", metric_fn, "make_evaluator")
  _common.check_positive_int("chunk", chunk)
  learned = _learned(adapt, learn)
  if task_batching not in TASK_BATCHING:
    raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}.")

  def evaluate(meta_params, tasks: Task):
    n = check_tasks(tasks)
    if learned:
      params, hyper = _split(meta_params, learned, adapt)
    else:
      check_not_learned(meta_params, adapt, "meta_params", "pass learn=(...) naming the learned "
                        "hyperparameters, as to meta_objective, or meta_params['params'] alone "
                        "to adapt with the solver's own values")
      params, hyper = meta_params, {}
    mode = _task_batching(task_batching, metric_fn, params, tasks, adapt)
    run = _program(adapt, metric_fn, mode)
    parts = []
    with _common.naming_model_inputs("metric_fn(adapted params, query)", query=tasks.query,
                                     support=tasks.support):
      out = jax.eval_shape(run, params, hyper, jax.tree.map(lambda x: x[:1], tasks))
    if jnp.shape(out) != (1,):
      raise ValueError(f"metric_fn(adapted_params, query) must return a scalar per task, got "
                       f"shape {jnp.shape(out)[1:]}.")
    for start in range(0, n, chunk):
      batch = jax.tree.map(lambda x: x[start:start + chunk], tasks)
      size = min(chunk, n - start)
      if size < chunk:  # pad the last chunk to reuse the compiled function
        batch = jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], chunk - size, 0)]), batch)
      parts.append(run(params, hyper, batch)[:size])
    return jnp.concatenate(parts)

  return evaluate


def evaluate_per_task(adapt: Callable, metric_fn: Callable, meta_params, tasks: Task, *,
                      learn: Sequence[str] | Mapping[str, str] = (), chunk: int = 25,
                      task_batching: str = "auto"):
  """``metric_fn(adapt(params, support), query)`` for every task, ``chunk`` tasks per jitted call.

  ``learn`` names learned hyperparameters in ``meta_params``, as for
  [`make_evaluator`][metajax.meta.make_evaluator].

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 8)
    >>> metajax.meta.evaluate_per_task(adapt, loss, jnp.ones((1, 1)), tasks, chunk=4).shape
    (8,)
  """
  return make_evaluator(adapt, metric_fn, learn=learn, chunk=chunk,
                        task_batching=task_batching)(meta_params, tasks)


def evaluate(adapt: Callable, metric_fn: Callable, meta_params, tasks: Task, *,
             learn: Sequence[str] | Mapping[str, str] = (), level: float = 0.95,
             chunk: int = 25, task_batching: str = "auto") -> tuple[float, float]:
  """Mean and confidence half-width over tasks of ``metric_fn(adapt(params, support), query)``.

  ``learn`` names learned hyperparameters in ``meta_params``, as for
  [`make_evaluator`][metajax.meta.make_evaluator].

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 8)
    >>> mean, ci = metajax.meta.evaluate(adapt, loss, jnp.ones((1, 1)), tasks)
  """
  if check_tasks(tasks) < 2:
    raise ValueError("evaluate needs at least 2 tasks for a confidence interval, got 1; use "
                     "evaluate_per_task for one task.")
  per_task = evaluate_per_task(adapt, metric_fn, meta_params, tasks, learn=learn, chunk=chunk,
                               task_batching=task_batching)
  return confidence_interval(per_task, level)
