"""The jitted meta-training step: sample tasks on device, adapt, meta-gradient, update."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax.meta import _distribute
from metajax.solvers import _common, _loops
from metajax.solvers._result import RESULTS, all_finite, context, error_if

PyTree = Any
NONFINITE_POLICIES = ("raise", "skip")


class TrainState(NamedTuple):
  """Meta-training state.

  Attributes:
    meta_params: the meta-parameters (and learned hyperparameters).
    opt_state: the outer optimizer's state.
    step: meta-iterations run (int32).
    skipped: meta-iterations whose update was skipped for a non-finite loss or meta-gradient
      (``make_train_step(..., nonfinite="skip")``; int32).
  """

  meta_params: PyTree
  opt_state: PyTree
  step: jax.Array
  skipped: jax.Array


def _check_optimizer(optimizer) -> None:
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")


def init_train_state(meta_params, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh [`TrainState`][metajax.meta.TrainState] for ``meta_params``.

  Python numbers among the meta-parameters (a learned ``reg=2.0``) become arrays of a fixed
  dtype, so the train step never recompiles on weak types.

  Examples:
    >>> import jax.numpy as jnp, optax, metajax
    >>> params = jnp.ones(2, jnp.float32)
    >>> state = metajax.meta.init_train_state({'params': params, 'reg': 2.0}, optax.sgd(0.1))
    >>> state.meta_params['reg'].dtype, state.meta_params['reg'].weak_type
    (dtype('float32'), False)
  """
  _check_optimizer(optimizer)
  leaves = jax.tree.leaves(meta_params)
  if not leaves:
    raise ValueError("meta_params is an empty pytree: there is nothing to meta-train.")
  strong = [x.dtype for x in leaves if hasattr(x, "dtype") and not getattr(x, "weak_type", False)
            and jnp.issubdtype(x.dtype, jnp.floating)]
  dtype = jnp.result_type(*strong) if strong else jnp.asarray(0.0).dtype
  def cast(x):  # a Python int among meta-parameters is a number to learn (reg=2 means 2.0)
    x = jnp.asarray(float(x) if isinstance(x, int) and not isinstance(x, bool) else x)
    weak_float = getattr(x, "weak_type", False) and jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(dtype if weak_float else x.dtype)
  meta_params = jax.tree.map(cast, meta_params)
  _common.params_dtype(meta_params, "meta_params")
  state = TrainState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32),
                     jnp.zeros((), jnp.int32))
  return _place_like_meta_params(state)


def _place_like_meta_params(state: TrainState) -> TrainState:
  """Meta-parameters placed on a device (``device_put``) or replicated over a mesh: the rest of
  the state goes there too, so that the train step's first call and its later calls (whose state
  comes out of the step, placed) see the same placement and compile once."""
  placed = {x.sharding for x in jax.tree.leaves(state.meta_params)
            if isinstance(x, jax.Array) and x.committed}
  if len(placed) != 1:
    return state
  sharding = placed.pop()
  if not sharding.is_fully_replicated:  # partitioned meta-parameters: leave placement to jit
    return state
  return jax.device_put(state, sharding)


def make_train_step(value_and_grad: Callable, optimizer: optax.GradientTransformation,
                    sample_tasks: Callable, *, meta_batch_size: int, iterations: int = 1,
                    tasks_per_call: int | str | None = "auto", nonfinite: str = "raise",
                    mesh: jax.sharding.Mesh | None = None, shard_map: bool = False,
                    micro_batches: int = 1):
  """A meta-training step: sample tasks on device, adapt, meta-gradient, update.

  Args:
    value_and_grad: ``(meta_params, tasks) -> (loss, grads)`` whose loss and
      gradient are means over the tasks, e.g.
      ``jax.value_and_grad(meta_objective(adapt, loss_fn))`` or
      [`reptile_value_and_grad`][metajax.meta.reptile_value_and_grad]. A function with the attribute
      ``takes_meta_iteration = True`` ([`maml_plus_plus`][metajax.meta.maml_plus_plus]) is called
      ``value_and_grad(meta_params, tasks, meta_iteration)`` with the meta-iteration as a
      traced int32, for schedules evaluated on device.
    optimizer: the outer optax optimizer.
    sample_tasks: a task family, ``sample_tasks(key, num_tasks, *data) -> Task``;
      ``data`` (e.g. class-indexed images for [`metajax.tasks.episodes`][metajax.tasks.episodes])
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
      models on CPU (XLA convolutions or ``metajax.models.layers`` patches),
      where one task per program is fastest and compiles in seconds (a whole
      unrolled meta-batch compiles for minutes), else ``None``.
    nonfinite: what a non-finite meta-loss or meta-gradient does:
      ``"raise"`` (default) stops training with an error naming the stage and the
      meta-iteration; ``"skip"`` leaves the state unchanged for that meta-iteration and
      counts it in ``state.skipped``. Inner-solver failures raise inside the solver
      (naming the meta-iteration too) unless it was built with ``throw=False``.
    mesh: a ``jax.sharding.Mesh`` to meta-train data-parallel over tasks (``None``: one
      device). The tasks are sampled on device straight into a sharding that splits them over
      the mesh's ``"tasks"`` axis (or its only axis), the state is replicated on every device
      (the step places it), and the meta-gradient is reduced across devices; the numbers are
      the single-device ones. Auto and Explicit axis types both work (Explicit axes are used as
      Auto inside the step). The task axis must divide the meta-batch (each micro-batch).
      With ``tasks_per_call`` an int (or ``"auto"`` on a CPU conv net, where it becomes the
      task axis' size), each per-call program is split over the mesh in the same way.
    shard_map: with a ``mesh``, run ``value_and_grad`` under ``jax.shard_map`` (one program
      per device on its own tasks, means averaged with ``lax.pmean``) instead of letting
      ``jit`` partition it. Same numbers; for code that wants explicit per-device programs.
    micro_batches: split each meta-batch into this many equal groups processed one after
      another in a ``lax.scan`` and average their meta-gradients: the whole batch's numbers
      with the memory of one group (a meta-batch larger than fits on the devices at once).

  Returns:
    ``train_step(state, key, *data) -> (state, losses)`` with ``losses`` of
    shape ``(iterations,)``. It compiles once and never round-trips to the
    host (``train_step.cache_sizes()`` counts the compilations of its
    programs). Iteration ``i`` samples its tasks from ``fold_in(key, i)``: with
    a fixed ``key`` the run is the same however iterations are grouped into
    calls (and after resuming from a checkpoint).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, metajax
    >>> loss = metajax.meta.mse_loss(lambda p, x: p * x)
    >>> adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.1)
    >>> vg = jax.value_and_grad(metajax.meta.meta_objective(adapt, loss))
    >>> opt = optax.adam(1e-3)
    >>> step = metajax.meta.make_train_step(vg, opt, metajax.tasks.sinusoid(), meta_batch_size=4)
    >>> state = metajax.meta.init_train_state(jnp.ones((1, 1)), opt)
    >>> state, losses = step(state, jax.random.key(0))
    >>> step.cache_sizes()["step"] <= 1  # one compilation, however many calls
    True
  """
  _common.check_callable("value_and_grad", value_and_grad)
  _common.check_callable("sample_tasks", sample_tasks)
  _common.check_family("sample_tasks", sample_tasks)
  _check_optimizer(optimizer)
  _common.check_positive_int("meta_batch_size", meta_batch_size)
  _common.check_positive_int("iterations", iterations)
  if tasks_per_call not in ("auto", None):
    _common.check_positive_int("tasks_per_call", tasks_per_call)
    if meta_batch_size % tasks_per_call:
      raise ValueError(f"tasks_per_call ({tasks_per_call}) must divide meta_batch_size "
                       f"({meta_batch_size}).")
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}.")
  _common.check_positive_int("micro_batches", micro_batches)
  if not isinstance(shard_map, bool):
    raise TypeError(f"shard_map must be True or False, got {shard_map!r}.")
  if shard_map and mesh is None:
    raise ValueError("shard_map=True needs a mesh: make_train_step(..., mesh=mesh, "
                     "shard_map=True).")
  if mesh is not None:
    _distribute.task_axis(mesh)  # a Mesh, with an axis to split tasks over
  _distribute.check_batch(meta_batch_size, micro_batches, mesh)
  if micro_batches > 1 and tasks_per_call not in ("auto", None):
    raise ValueError(f"micro_batches ({micro_batches}) and tasks_per_call ({tasks_per_call}) "
                     "both split the meta-batch: use one of them.")
  if mesh is not None and isinstance(tasks_per_call, int) and (
      tasks_per_call % _distribute.axis_size(mesh)):
    raise ValueError(f"tasks_per_call ({tasks_per_call}) must be a multiple of the mesh's task "
                     f"axis ({_distribute.axis_size(mesh)} devices) so that every per-call "
                     "program splits its tasks over the mesh.")
  return _TrainStep(value_and_grad, optimizer, sample_tasks, meta_batch_size, iterations,
                    tasks_per_call, nonfinite, mesh, shard_map, micro_batches)


NONFINITE_MESSAGE = (
    "a non-finite value (NaN or inf) appeared (check the tasks' support and query data, the loss "
    "and the step sizes; a finite meta_loss with meta_gradient_finite=False is a derivative "
    "that is infinite where the loss is not: an inner optax.adam (eps_root=0) differentiated "
    "where a gradient is exactly 0, e.g. a dead ReLU unit, does this, and "
    "metajax.solvers.differentiable_adam does not)")


def _checked_update(optimizer, state: TrainState, loss, grads, nonfinite: str):
  """The optax update, with the non-finite policy applied to the loss and the meta-gradient.

  One scalar carries the check (the loss and every gradient leaf finite, leaf by leaf: a
  squared norm would overflow float32 for finite gradients past ~1e19), one branch.
  Returns the new state and the (checked) loss.
  """
  grads_finite = all_finite(grads)  # leaf by leaf: |grads|^2 overflows float32 past ~1e19
  ok = jnp.isfinite(loss) & grads_finite
  if nonfinite == "raise":
    code = jnp.where(ok, RESULTS.successful, RESULTS.nonfinite)
    loss = error_if(
        loss, code, "metajax train step, outer stage (meta-loss and meta-gradient)",
        messages={RESULTS.nonfinite: NONFINITE_MESSAGE},
        hint="(make_train_step(..., nonfinite='skip') skips such meta-iterations instead of "
             "raising.)",
        meta_iteration=state.step, meta_loss=loss,
        meta_gradient_finite=grads_finite)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    return TrainState(optax.apply_updates(state.meta_params, updates), opt_state,
                      state.step + 1, state.skipped), loss
  updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
  new_params = optax.apply_updates(state.meta_params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return TrainState(keep(new_params, state.meta_params), keep(opt_state, state.opt_state),
                    state.step + 1, state.skipped + (~ok).astype(jnp.int32)), loss


class _TrainStep:
  """The callable [`make_train_step`][metajax.meta.make_train_step] returns (one program, or
  per-group dispatch)."""

  def __init__(self, value_and_grad, optimizer, sample_tasks, meta_batch_size, iterations,
               tasks_per_call, nonfinite, mesh, shard_map, micro_batches):
    self._value_and_grad, self._sample_tasks = value_and_grad, sample_tasks
    self._mesh = None if mesh is None else _distribute.auto_mesh(mesh)
    self._micro_batches = micro_batches
    takes_iteration = getattr(value_and_grad, "takes_meta_iteration", False) is True
    self._batch, self._iterations, self._per_call = meta_batch_size, iterations, tasks_per_call
    self._optimizer, self._checked_states, self._checked_data = optimizer, set(), set()

    def sample(state: TrainState, key, data):  # iteration i draws from fold_in(key, i)
      tasks = sample_tasks(jax.random.fold_in(key, state.step), meta_batch_size, *data)
      sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tasks)}
      if sizes != {meta_batch_size}:
        raise ValueError(f"sample_tasks(key, {meta_batch_size}, ...) must return tasks with a "
                         f"leading axis of meta_batch_size={meta_batch_size}; got sizes "
                         f"{sorted(sizes, key=str)}.")
      return tasks

    def group_value_and_grad(meta_params, tasks, step):
      with context(meta_iteration=step):  # inner-solver failures name the meta-iteration
        out = (value_and_grad(meta_params, tasks, step) if takes_iteration
               else value_and_grad(meta_params, tasks))
      if not (isinstance(out, tuple) and len(out) == 2 and jnp.ndim(out[0]) == 0):
        raise TypeError("value_and_grad(meta_params, tasks) must return (loss, grads) with a "
                        f"scalar loss, got {type(out).__name__}"
                        f"{' of shape ' + str(jnp.shape(out)) if hasattr(out, 'shape') else ''}; "
                        "wrap the objective: jax.value_and_grad(meta_objective(adapt, loss_fn)).")
      return out

    spread = group_value_and_grad
    if self._mesh is not None:
      spread = _distribute.over_mesh(spread, self._mesh, shard_map=shard_map)
    batch_value_and_grad = _distribute.in_micro_batches(spread, micro_batches, self._mesh)

    def one_iteration(state: TrainState, key, data):
      loss, grads = batch_value_and_grad(state.meta_params, sample(state, key, data), state.step)
      return _checked_update(optimizer, state, loss, grads, nonfinite)

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
      state, loss = _checked_update(optimizer, state, mean(*losses),
                                    jax.tree.map(mean, *grads), nonfinite)
      return state, loss[None]

    self._fused, self._sample_groups = jax.jit(fused), jax.jit(sample_groups)
    self._group_value_and_grad, self._update = jax.jit(spread), jax.jit(update)
    self._task_value_and_grad = group_value_and_grad  # unsplit, for the convolution probe

  def _resolve(self, state: TrainState, key, data) -> None:
    if self._per_call != "auto":
      return
    self._per_call = None
    if self._micro_batches > 1:
      return
    # The probe samples a whole meta-batch, as training does (a family may need it: sharded
    # families check the batch divides the mesh; task interpolation needs a pair), and traces
    # the meta-gradient of its first two tasks only.
    probe_tasks = min(2, self._batch)
    def probe(p, k, *d):
      tasks = jax.tree.map(lambda x: x[:probe_tasks], self._sample_tasks(k, self._batch, *d))
      return self._task_value_and_grad(p, tasks, jnp.int32(0))
    if jax.default_backend() == "cpu" and _loops.uses_convolution(
        probe, state.meta_params, key, *data, patches=True):
      self._per_call = 1 if self._mesh is None else _distribute.axis_size(self._mesh)

  @property
  def tasks_per_call(self) -> int | None:
    """Tasks per compiled call (resolved on the first call when ``"auto"``)."""
    return self._per_call

  @property
  def _one_program(self) -> bool:
    return self._per_call in (None, "auto") or self._per_call == self._batch

  def lower(self, state: TrainState, key, *data):
    """The one-program step lowered for these arguments (``.compile().as_text()`` shows how it
    is partitioned over a mesh); not available when tasks are dispatched per call."""
    state, key, data = self._prepare(state, key, data)
    if not self._one_program:
      raise ValueError(f"this step dispatches {self._per_call} tasks per call: there is no one "
                       "program to lower (pass tasks_per_call=None).")
    return self._fused.lower(state, key, *data)

  def cache_sizes(self) -> dict:
    """Compilations of each program this step has run (1 each after any number of calls)."""
    if self._one_program:
      return {"step": self._fused._cache_size()}
    return {"sample": self._sample_groups._cache_size(),
            "tasks": self._group_value_and_grad._cache_size(),
            "update": self._update._cache_size()}

  def _check_opt_state(self, state: TrainState) -> None:
    """``state.opt_state`` must be what this step's optimizer makes for ``state.meta_params``
    (shapes and structure; checked once per structure)."""
    signature = (jax.tree.structure(state.meta_params), jax.tree.structure(state.opt_state))
    if signature in self._checked_states:
      return
    expected = jax.eval_shape(self._optimizer.init, state.meta_params)
    shapes = lambda tree: [jnp.shape(x) for x in jax.tree.leaves(tree)]
    if (jax.tree.structure(expected) != signature[1]
        or shapes(expected) != shapes(state.opt_state)):
      raise TypeError(
          "state.opt_state is not the state of the optimizer given to make_train_step for "
          f"state.meta_params: expected {type(expected).__name__} "
          f"({len(jax.tree.leaves(expected))} arrays), got {type(state.opt_state).__name__} "
          f"({len(jax.tree.leaves(state.opt_state))} arrays). Build the state with "
          "init_train_state(meta_params, the same optimizer).")
    self._checked_states.add(signature)

  def _prepare(self, state: TrainState, key, data: tuple):
    """Checks the arguments, places them on the mesh, resolves ``tasks_per_call="auto"``."""
    if not isinstance(state, TrainState):
      raise TypeError(f"state must be a metajax.meta.TrainState (from init_train_state), got "
                      f"{type(state).__name__}.")
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.shape == (2,) and key.dtype == jnp.uint32))):
      raise TypeError(f"key must be a PRNG key (jax.random.key(seed)), got {key!r}.")
    self._check_opt_state(state)
    if len(data) not in self._checked_data:
      _common.check_family("sample_tasks", self._sample_tasks, len(data))
      self._checked_data.add(len(data))
    if self._mesh is not None:  # replicated on the mesh (a no-op once the step has placed it)
      state, key, data = _distribute.replicate((state, key, data), self._mesh)
    self._resolve(state, key, data)
    return state, key, data

  def __call__(self, state: TrainState, key, *data):
    state, key, data = self._prepare(state, key, data)
    if self._one_program:
      return self._fused(state, key, *data)
    losses = []
    for _ in range(self._iterations):
      groups = self._sample_groups(state, key, *data)
      results = [self._group_value_and_grad(state.meta_params, group, state.step)
                 for group in groups]
      state, loss = self._update(state, tuple(r[0] for r in results),
                                 tuple(r[1] for r in results))
      losses.append(loss)
    return state, losses[0] if len(losses) == 1 else jnp.concatenate(losses)
