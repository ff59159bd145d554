"""Meta-objectives, the jitted meta-training step, and evaluation with confidence intervals."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from metajax.solvers import _common, _loops
from metajax.tasks import Task

PyTree = Any


def mse_loss(apply_fn: Callable) -> Callable:
  """``loss_fn(params, (x, y))`` = mean squared error of ``apply_fn(params, x)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import mse_loss
    >>> loss = mse_loss(lambda p, x: p * x)
    >>> float(loss(2.0, (jnp.ones(3), jnp.zeros(3))))
    4.0
  """
  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((apply_fn(params, x) - y) ** 2)
  return loss_fn


def cross_entropy_loss(apply_fn: Callable) -> Callable:
  """``loss_fn(params, (x, labels))`` = mean softmax cross-entropy of the logits.

  Example:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import cross_entropy_loss
    >>> loss = cross_entropy_loss(lambda p, x: x @ p)
    >>> round(float(loss(jnp.zeros((2, 2)), (jnp.ones((3, 2)), jnp.array([0, 1, 0])))), 4)
    0.6931
  """
  def loss_fn(params, batch):
    x, labels = batch
    logits = apply_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


def accuracy(apply_fn: Callable) -> Callable:
  """``metric(params, (x, labels))`` = fraction of argmax predictions equal to the labels.

  Example:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import accuracy
    >>> float(accuracy(lambda p, x: x)(None, (jnp.eye(3), jnp.array([0, 1, 1]))))
    0.6666666865348816
  """
  def metric(params, batch):
    x, labels = batch
    return jnp.mean(jnp.argmax(apply_fn(params, x), axis=-1) == labels)
  return metric


def _split(meta_params, learn: Sequence[str]):
  if not learn:
    return meta_params, {}
  if not isinstance(meta_params, dict) or "params" not in meta_params:
    raise ValueError(
        f"with learn={tuple(learn)!r}, meta_params must be a dict {{'params': ..., "
        + ", ".join(f"'{name}': ..." for name in learn) + "}.")
  missing = [name for name in learn if name not in meta_params]
  if missing:
    raise ValueError(f"meta_params lacks the learned hyperparameters {missing}.")
  return meta_params["params"], {name: meta_params[name] for name in learn}


def _task_batching(mode: str, loss_fn: Callable, params, tasks: Task) -> str:
  if mode != "auto":
    return mode
  first = jax.tree.map(lambda x: x[0], tasks.support)
  return _loops.choose_task_batching(loss_fn, params, first)


def meta_objective(adapt: Callable, loss_fn: Callable, *, learn: Sequence[str] = (),
                   task_batching: str = "auto"):
  """The meta-objective: mean over tasks of the query loss after adaptation.

  Args:
    adapt: an inner solver, ``adapt(params, support, **hyperparams)``.
    loss_fn: ``loss_fn(params, batch) -> scalar`` (used on the query set).
    learn: names of call-time hyperparameters of ``adapt`` that are learned
      too (``'step_size'`` for Meta-SGD, ``'reg'``, ``'t1'``). Then
      ``meta_params = {'params': theta, name: value, ...}``.
    task_batching: how tasks are mapped: ``"vmap"``, ``"unroll"`` (a Python
      loop over tasks inside the jitted program), ``"map"`` (``lax.map``), or
      ``"auto"`` (see :func:`metajax.solvers.choose_task_batching`). The
      numerics are the same either way.

  Returns:
    ``objective(meta_params, tasks) -> scalar`` where ``tasks`` is a
    :class:`~metajax.tasks.Task` with a leading task axis.

  Example:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 4)
    >>> objective = metajax.meta.meta_objective(adapt, loss)
    >>> jax.grad(objective)(jnp.ones((1, 1)), tasks).shape
    (1, 1)
  """
  def task_loss(params, hyper, task):
    return loss_fn(adapt(params, task.support, **hyper), task.query)

  def objective(meta_params, tasks: Task):
    params, hyper = _split(meta_params, learn)
    mode = _task_batching(task_batching, loss_fn, params, tasks)
    return jnp.mean(_loops.map_tasks(lambda task: task_loss(params, hyper, task), tasks, mode))

  return objective


def reptile_value_and_grad(adapt: Callable, loss_fn: Callable, *, task_batching: str = "auto"):
  """Reptile's meta-update as a gradient: ``theta - mean_tasks(adapt(theta, support))``.

  Feeding it to ``optax.sgd(epsilon)`` gives Reptile's
  ``theta <- theta + epsilon * (phi - theta)``. The loss returned is the mean
  query loss after adaptation (for logging).

  Example:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=5, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 4)
    >>> value, direction = metajax.meta.reptile_value_and_grad(adapt, loss)(jnp.ones((1, 1)), tasks)
  """
  def value_and_grad(params, tasks: Task):
    def one(task):
      phi = adapt(params, task.support)
      return loss_fn(phi, task.query), phi
    mode = _task_batching(task_batching, loss_fn, params, tasks)
    losses, phis = _loops.map_tasks(one, tasks, mode)
    direction = jax.tree.map(lambda p, f: p - jnp.mean(f, axis=0), params, phis)
    return jnp.mean(losses), direction
  return value_and_grad


class TrainState(NamedTuple):
  """Meta-training state: meta-parameters, optimizer state, iteration count."""

  meta_params: PyTree
  opt_state: PyTree
  step: jax.Array


def init_train_state(meta_params, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh :class:`TrainState` for ``meta_params``."""
  return TrainState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))


def make_train_step(value_and_grad: Callable, optimizer: optax.GradientTransformation,
                    sample_tasks: Callable, *, meta_batch_size: int, iterations: int = 1,
                    tasks_per_call: int | str | None = "auto"):
  """A meta-training step: sample tasks on device, adapt, meta-gradient, update.

  Args:
    value_and_grad: ``(meta_params, tasks) -> (loss, grads)`` whose loss and
      gradient are means over the tasks, e.g.
      ``jax.value_and_grad(meta_objective(adapt, loss_fn))`` or
      :func:`reptile_value_and_grad`.
    optimizer: the outer optax optimizer.
    sample_tasks: a task family, ``sample_tasks(key, num_tasks, *data) -> Task``;
      ``data`` (e.g. class-indexed images for :func:`metajax.tasks.episodes`)
      is passed to every ``train_step`` call as a device array, not baked into
      the compiled program.
    meta_batch_size: tasks per meta-iteration (static).
    iterations: meta-iterations per call (static); >1 removes per-call
      overhead (fused with ``lax.scan`` when the whole batch is one program).
    tasks_per_call: how many tasks one compiled program handles. ``None``:
      the whole meta-batch, sampling and update in one jitted program. An int
      dividing ``meta_batch_size``: the batch is split into equal groups, each
      group's ``value_and_grad`` is one call of a single compiled program
      (dispatched asynchronously; nothing is copied to the host) and their
      means are averaged before the update; compile time then grows with the
      group, not the meta-batch. ``"auto"`` (default): 1 for convolutional
      models on CPU (XLA convolutions or :mod:`metajax.models.layers` patches),
      where one task per program is fastest and compiles in seconds (a whole
      unrolled meta-batch compiles for minutes; issue 6), else ``None``.

  Returns:
    ``train_step(state, key, *data) -> (state, losses)`` with ``losses`` of
    shape ``(iterations,)``. It compiles once and never round-trips to the
    host (``train_step.cache_sizes()`` counts the compilations of its
    programs). Iteration ``i`` samples its tasks from ``fold_in(key, i)``: with
    a fixed ``key`` the run is the same however iterations are grouped into
    calls (and after resuming from a checkpoint).

  Example:
    >>> import jax, jax.numpy as jnp, optax, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> vg = jax.value_and_grad(metajax.meta.meta_objective(adapt, loss))
    >>> opt = optax.adam(1e-3)
    >>> step = metajax.meta.make_train_step(vg, opt, metajax.tasks.sinusoid(), meta_batch_size=4)
    >>> state = metajax.meta.init_train_state(jnp.ones((1, 1)), opt)
    >>> state, losses = step(state, jax.random.key(0))
    >>> step.cache_sizes()
    {'step': 1}
  """
  _common.check_positive_int("meta_batch_size", meta_batch_size)
  _common.check_positive_int("iterations", iterations)
  if tasks_per_call not in ("auto", None):
    _common.check_positive_int("tasks_per_call", tasks_per_call)
    if meta_batch_size % tasks_per_call:
      raise ValueError(f"tasks_per_call ({tasks_per_call}) must divide meta_batch_size "
                       f"({meta_batch_size}).")
  return _TrainStep(value_and_grad, optimizer, sample_tasks, meta_batch_size, iterations,
                    tasks_per_call)


def _apply_update(optimizer, state: TrainState, grads) -> TrainState:
  updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
  return TrainState(optax.apply_updates(state.meta_params, updates), opt_state, state.step + 1)


class _TrainStep:
  """The callable :func:`make_train_step` returns (one program, or per-group dispatch)."""

  def __init__(self, value_and_grad, optimizer, sample_tasks, meta_batch_size, iterations,
               tasks_per_call):
    self._value_and_grad, self._sample_tasks = value_and_grad, sample_tasks
    self._batch, self._iterations, self._per_call = meta_batch_size, iterations, tasks_per_call

    def sample(state: TrainState, key, data):  # iteration i draws from fold_in(key, i)
      return sample_tasks(jax.random.fold_in(key, state.step), meta_batch_size, *data)

    def one_iteration(state: TrainState, key, data):
      loss, grads = value_and_grad(state.meta_params, sample(state, key, data))
      return _apply_update(optimizer, state, grads), loss

    def fused(state: TrainState, key, *data):
      if iterations == 1:
        state, loss = one_iteration(state, key, data)
        return state, loss[None]
      return jax.lax.scan(lambda s, _: one_iteration(s, key, data), state, None,
                          length=iterations)

    def sample_groups(state: TrainState, key, *data):
      tasks = sample(state, key, data)
      size = self._per_call
      return tuple(jax.tree.map(lambda x, i=i: x[i * size:(i + 1) * size], tasks)
                   for i in range(meta_batch_size // size))

    def update(state: TrainState, losses, grads):
      mean = lambda *xs: jnp.mean(jnp.stack(xs), axis=0)
      return _apply_update(optimizer, state, jax.tree.map(mean, *grads)), mean(*losses)[None]

    self._fused, self._sample_groups = jax.jit(fused), jax.jit(sample_groups)
    self._group_value_and_grad, self._update = jax.jit(value_and_grad), jax.jit(update)

  def _resolve(self, state: TrainState, key, data) -> None:
    if self._per_call != "auto":
      return
    self._per_call = None
    if jax.default_backend() == "cpu" and _loops.uses_convolution(
        lambda p, k, *d: self._value_and_grad(p, self._sample_tasks(k, 1, *d)),
        state.meta_params, key, *data, patches=True):
      self._per_call = 1

  @property
  def tasks_per_call(self) -> int | None:
    """Tasks per compiled call (resolved on the first call when ``"auto"``)."""
    return self._per_call

  @property
  def _one_program(self) -> bool:
    return self._per_call in (None, "auto") or self._per_call == self._batch

  def cache_sizes(self) -> dict:
    """Compilations of each program this step has run (1 each after any number of calls)."""
    if self._one_program:
      return {"step": self._fused._cache_size()}
    return {"sample": self._sample_groups._cache_size(),
            "tasks": self._group_value_and_grad._cache_size(),
            "update": self._update._cache_size()}

  def __call__(self, state: TrainState, key, *data):
    self._resolve(state, key, data)
    if self._one_program:
      return self._fused(state, key, *data)
    losses = []
    for _ in range(self._iterations):
      groups = self._sample_groups(state, key, *data)
      results = [self._group_value_and_grad(state.meta_params, group) for group in groups]
      state, loss = self._update(state, tuple(r[0] for r in results),
                                 tuple(r[1] for r in results))
      losses.append(loss)
    return state, losses[0] if len(losses) == 1 else jnp.concatenate(losses)


def confidence_interval(values, level: float = 0.95) -> tuple[float, float]:
  """Mean and half-width of the normal-approximation confidence interval.

  Example:
    >>> from metajax.meta import confidence_interval
    >>> mean, half = confidence_interval([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(half, 3)
    (2.0, 1.132)
  """
  values = jnp.asarray(values, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  if values.ndim != 1 or values.shape[0] < 2:
    raise ValueError(f"values must be 1-D with at least 2 entries, got shape {values.shape}.")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}.")
  z = math.sqrt(2.0) * _erfinv(level)
  n = values.shape[0]
  return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(n))


def _erfinv(x: float) -> float:
  return float(jax.scipy.special.erfinv(jnp.asarray(x, jnp.float32)))


def evaluate(adapt: Callable, metric_fn: Callable, params, tasks: Task, *,
             level: float = 0.95, chunk: int = 25,
             task_batching: str = "auto") -> tuple[float, float]:
  """Mean and confidence half-width over tasks of ``metric_fn(adapt(params, support), query)``.

  Example:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 8)
    >>> mean, ci = metajax.meta.evaluate(adapt, loss, jnp.ones((1, 1)), tasks)
  """
  per_task = evaluate_per_task(adapt, metric_fn, params, tasks, chunk=chunk,
                               task_batching=task_batching)
  return confidence_interval(per_task, level)


def evaluate_per_task(adapt: Callable, metric_fn: Callable, params, tasks: Task, *,
                      chunk: int = 25, task_batching: str = "auto"):
  """``metric_fn(adapt(params, support), query)`` for every task, ``chunk`` tasks per jitted call.

  Example:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 8)
    >>> metajax.meta.evaluate_per_task(adapt, loss, jnp.ones((1, 1)), tasks, chunk=4).shape
    (8,)
  """
  _common.check_positive_int("chunk", chunk)
  n = jax.tree.leaves(tasks)[0].shape[0]
  mode = _task_batching(task_batching, metric_fn, params, tasks)

  @jax.jit
  def run(params, batch):
    return _loops.map_tasks(lambda t: metric_fn(adapt(params, t.support), t.query), batch, mode)

  parts = []
  for start in range(0, n, chunk):
    batch = jax.tree.map(lambda x: x[start:start + chunk], tasks)
    size = jax.tree.leaves(batch)[0].shape[0]
    if size < chunk:  # pad the last chunk to reuse the compiled function
      batch = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], chunk - size, 0)]),
                           batch)
    parts.append(run(params, batch)[:size])
  return jnp.concatenate(parts)
