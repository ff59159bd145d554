"""Meta-objectives: the mean query loss after adaptation, and Reptile's update direction."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from metajax.solvers import _common, _loops
from metajax.tasks import Task

PyTree = Any
PARAMETRIZATIONS = {
    "identity": lambda v: v,
    "log": lambda v: jax.tree.map(jnp.exp, v),  # stored value log(h): h = exp(stored) > 0
    "softplus": lambda v: jax.tree.map(jax.nn.softplus, v),  # h = softplus(stored) > 0
}
TASK_BATCHING = ("auto",) + _loops.TASK_BATCHING


def _learned(adapt: Callable, learn) -> dict[str, Callable]:
  """``learn`` as ``{name: parametrization}``, checked against ``adapt``'s hyperparameters."""
  if isinstance(learn, str):
    raise TypeError(f"learn must be a tuple of names or a dict, not the string {learn!r} "
                    f"(write learn=({learn!r},)).")
  if not isinstance(learn, Iterable):
    raise TypeError(f"learn must be a tuple of names or a dict, got {learn!r} (learn=() "
                    "learns no hyperparameter).")
  items = learn.items() if isinstance(learn, Mapping) else ((name, "identity") for name in learn)
  out = {}
  for name, how in items:
    if how not in PARAMETRIZATIONS:
      raise ValueError(f"learn[{name!r}] = {how!r}: choose a parametrization from "
                       f"{sorted(PARAMETRIZATIONS)}.")
    out[name] = PARAMETRIZATIONS[how]
  accepted = getattr(adapt, "hyperparameters", None)
  if accepted is not None:
    unknown = sorted(set(out) - set(accepted))
    if unknown:
      raise ValueError(f"learn names {unknown}, which this solver does not take at call time; "
                       f"it accepts {list(accepted)}.")
  return out


def check_not_learned(params, adapt: Callable, name: str, hint: str | None = None) -> None:
  """Refuses ``{'params': theta, 'step_size': ...}`` where nothing is learned: the hyperparameter
  would reach the loss as a parameter (a bare KeyError deep inside it)."""
  accepted = getattr(adapt, "hyperparameters", None) or ()
  if isinstance(params, Mapping) and "params" in params:
    named = sorted(set(params) & set(accepted))
    if named:
      hint = hint or (f"pass learn={tuple(named)!r} to learn them, or pass "
                      f"{name}['params'] alone")
      raise ValueError(f"{name} is a dict with 'params' and the hyperparameters {named}, but "
                       f"nothing is learned here, so the whole dict would be adapted as the "
                       f"parameters: {hint}.")


def _split(meta_params, learned: dict, adapt: Callable):
  if not learned:
    check_not_learned(meta_params, adapt, "meta_params")
    return meta_params, {}
  if not isinstance(meta_params, dict) or "params" not in meta_params:
    raise ValueError(
        f"with learn={tuple(learned)!r}, meta_params must be a dict {{'params': ..., "
        + ", ".join(f"'{name}': ..." for name in learned) + "}.")
  missing = [name for name in learned if name not in meta_params]
  if missing:
    raise ValueError(f"meta_params lacks the learned hyperparameters {missing}.")
  unset = [name for name in learned if meta_params[name] is None]
  if unset:  # None has no leaves: nothing would be learned, the solver's own value used
    raise ValueError(", ".join(f"meta_params[{name!r}]" for name in unset) + " is None, but "
                     "learn= names it: give each learned hyperparameter its initial value (a "
                     "float or an array); None would learn nothing.")
  extra = sorted(set(meta_params) - {"params"} - set(learned))
  if extra:
    raise ValueError(f"meta_params has {extra} beside 'params' and the learned {list(learned)}: "
                     f"a key that learn= does not name gets no gradient and would never train "
                     f"(add it to learn=, or drop it).")
  return meta_params["params"], {name: how(meta_params[name]) for name, how in learned.items()}


def check_tasks(tasks) -> int:
  """Validates a batch of tasks (a [`Task`][metajax.tasks.Task] with a leading task axis);
  returns the number of tasks."""
  if not isinstance(tasks, Task):
    raise TypeError(f"tasks must be a metajax.tasks.Task(support, query) with a leading task "
                    f"axis, got {type(tasks).__name__}.")
  sizes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tasks):
    shape = jnp.shape(leaf)
    where = f"tasks{jax.tree_util.keystr(path)}"
    if not shape:
      raise ValueError(f"{where} is a scalar: every leaf of tasks needs a leading task axis.")
    sizes[where] = shape[0]
  if not sizes:
    raise ValueError("tasks has no arrays.")
  if len(set(sizes.values())) > 1:
    raise ValueError("every leaf of tasks must have the same number of tasks (leading axis); "
                     f"got {sizes}.")
  n = next(iter(sizes.values()))
  if n == 0:
    raise ValueError("tasks is empty (0 tasks).")
  for path, leaf in jax.tree_util.tree_leaves_with_path(tasks):
    if 0 in jnp.shape(leaf)[1:]:
      raise ValueError(f"tasks{jax.tree_util.keystr(path)} is empty (shape {jnp.shape(leaf)}): "
                       "every task needs at least one support and one query example.")
  return n


def _task_batching(mode: str, loss_fn: Callable, params, tasks: Task, adapt=None) -> str:
  if mode not in TASK_BATCHING:
    raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {mode!r}.")
  if mode != "auto":
    return mode
  # One task's shapes, abstractly: slicing a task axis split over an Explicit mesh is an error.
  first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
                       tasks.support)
  # the parameters the loss sees (context() adds a context)
  seen = adapt.initial(params) if hasattr(adapt, "initial") else params
  try:
    return _loops.choose_task_batching(loss_fn, seen, first)
  except (TypeError, ValueError, KeyError):  # the loss takes what adapt returns, not params
    if adapt is None:
      raise
    adapted = jax.eval_shape(adapt, params, first)
    return _loops.choose_task_batching(loss_fn, adapted, first)


def _explicit_axes(tree) -> tuple[str, ...]:
  """Mesh axes of ``Explicit`` type that some leaf of ``tree`` is typed with (jit, set_mesh)."""
  axes = []
  for leaf in jax.tree.leaves(tree):
    try:
      mesh = jax.typeof(leaf).sharding.mesh
    except (TypeError, AttributeError):
      continue
    axes += [name for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
             if kind == jax.sharding.AxisType.Explicit and name not in axes]
  return tuple(axes)


def in_auto_axes(fn: Callable, tasks) -> Callable:
  """``fn``, run with the Explicit mesh axes of ``tasks`` treated as Auto (outputs replicated).

  The solvers' loops (``while_loop`` under ``vmap``) cannot carry a task axis typed as split over
  an Explicit mesh (JAX raises "Resource axis ... is not found in mesh"); inside
  ``jax.sharding.auto_axes`` the compiler partitions the task axis as under an Auto mesh, and
  the mean over tasks comes out replicated.
  """
  axes = _explicit_axes(tasks)
  if not axes:
    return fn
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=jax.sharding.PartitionSpec())


def meta_objective(adapt: Callable, loss_fn: Callable, *,
                   learn: Sequence[str] | Mapping[str, str] = (),
                   task_batching: str = "auto"):
  """The meta-objective: mean over tasks of the query loss after adaptation.

  Args:
    adapt: an inner solver, ``adapt(params, support, **hyperparams)``.
    loss_fn: ``loss_fn(params, batch) -> scalar`` (used on the query set).
    learn: call-time hyperparameters of ``adapt`` that are learned too (``'step_size'`` for
      Meta-SGD, ``'reg'``, ``'t1'``); names are checked against ``adapt.hyperparameters``.
      Then ``meta_params = {'params': theta, name: value, ...}``. A dict chooses how each is
      stored: ``{"reg": "log"}`` stores ``log(reg)`` (so ``reg = exp(stored)`` stays
      positive under any update), ``"softplus"`` likewise, ``"identity"`` the value itself.
    task_batching: how tasks are mapped: ``"vmap"``, ``"unroll"`` (a Python
      loop over tasks inside the jitted program), ``"map"`` (``lax.map``), or
      ``"auto"`` (see
      [`metajax.solvers.choose_task_batching`][metajax.solvers.choose_task_batching]). The
      numerics are the same either way.

  Returns:
    ``objective(meta_params, tasks) -> scalar`` where ``tasks`` is a
    [`Task`][metajax.tasks.Task] with a leading task axis.

  Examples:
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

  return task_mean(task_loss, adapt, loss_fn, learn=learn, task_batching=task_batching,
                   name="meta_objective")


def task_mean(task_loss: Callable, adapt: Callable, loss_fn: Callable, *, learn, task_batching,
              name: str, extra: tuple[str, ...] = ()):
  """``objective(meta_params, tasks, *extra)``: the mean over tasks of
  ``task_loss(params, learned_hyperparameters, task, *extra)`` (shared by the meta-objectives);
  ``extra`` names the further arguments the objective takes."""
  if not callable(adapt) or not callable(loss_fn):
    raise TypeError(f"{name}(adapt, loss_fn): both must be callable.")
  _common.check_not_solver("loss_fn", loss_fn, name)
  learned = _learned(adapt, learn)
  if task_batching not in TASK_BATCHING:
    raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}.")

  def objective(meta_params, tasks: Task, *args):
    if len(args) != len(extra):
      raise TypeError(f"the objective of {name} takes (meta_params, tasks"
                      + "".join(f", {e}" for e in extra) + f"); got {2 + len(args)} arguments.")
    check_tasks(tasks)
    params, hyper = _split(meta_params, learned, adapt)
    mode = _task_batching(task_batching, loss_fn, params, tasks, adapt)
    def mean_loss(params, hyper, tasks, args):
      return jnp.mean(_loops.map_tasks(lambda task: task_loss(params, hyper, task, *args), tasks,
                                       mode))
    # the solvers name the support's shape errors: one left here is the query's
    with _common.naming_model_inputs("loss_fn(adapted params, query)", query=tasks.query,
                                     support=tasks.support):
      return in_auto_axes(mean_loss, tasks)(params, hyper, tasks, args)

  return objective


def reptile_value_and_grad(adapt: Callable, loss_fn: Callable, *, task_batching: str = "auto"):
  """Reptile's meta-update as a gradient: ``theta - mean_tasks(adapt(theta, support))``.

  Feeding it to ``optax.sgd(epsilon)`` gives Reptile's
  ``theta <- theta + epsilon * (phi - theta)``. The loss returned is the mean
  query loss after adaptation (for logging).

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=5, step_size=0.1)
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 4)
    >>> value, direction = metajax.meta.reptile_value_and_grad(adapt, loss)(jnp.ones((1, 1)), tasks)
  """
  _common.check_not_solver("loss_fn", loss_fn, "reptile_value_and_grad")
  if task_batching not in TASK_BATCHING:
    raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}.")

  def value_and_grad(params, tasks: Task):
    check_tasks(tasks)
    check_not_learned(params, adapt, "params", "Reptile learns no hyperparameters; pass the "
                      "parameters alone")
    def one(task):
      phi = adapt(params, task.support)
      return loss_fn(phi, task.query), phi
    mode = _task_batching(task_batching, loss_fn, params, tasks, adapt)
    losses, phis = in_auto_axes(lambda t: _loops.map_tasks(one, t, mode), tasks)(tasks)
    if jax.tree.structure(phis) != jax.tree.structure(params):
      raise TypeError("Reptile moves theta toward the adapted parameters, so adapt must return "
                      f"params' structure {jax.tree.structure(params)}; it returned "
                      f"{jax.tree.structure(phis)} (context() adapts a context instead: use "
                      "meta_objective).")
    direction = jax.tree.map(lambda p, f: p - jnp.mean(f, axis=0), params, phis)
    return jnp.mean(losses), direction
  return value_and_grad
