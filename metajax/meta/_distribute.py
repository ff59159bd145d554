"""How a train step spreads a meta-batch: over a mesh's task axis, and over micro-batches.

[`make_train_step`][metajax.meta.make_train_step] builds ``batch_value_and_grad(meta_params,
tasks, step) -> (loss, grads)`` from the user's ``value_and_grad`` with the pieces here:

- ``jit`` over a mesh: the sampled tasks are constrained to a task-axis sharding and the
  meta-parameters are replicated; XLA partitions the per-task work and reduces the meta-gradient.
- ``shard_map`` over a mesh: each device runs ``value_and_grad`` on its own tasks and the means
  are averaged with ``lax.pmean`` (``check_vma=False``: every device adapts to its own tasks;
  see ``metajax.solvers._vma`` for what the default check does to inner gradients).
- micro-batches: the meta-batch is split into equal groups scanned one after another, their
  means averaged: the same numbers as the whole batch, with the memory of one group.

Explicit mesh axes are used as Auto inside the step: the solvers' loops under ``vmap`` cannot
carry a task axis typed as split over an Explicit mesh (a JAX limitation).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TASK_AXIS = "tasks"


def check_mesh(mesh, name: str = "mesh") -> None:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{name} must be a jax.sharding.Mesh (e.g. metajax.parallel.task_mesh() or "
                    f"jax.make_mesh((n,), ('tasks',))), got {type(mesh).__name__}.")


def task_axis(mesh: Mesh) -> str:
  """The mesh axis the tasks are split over: ``"tasks"``, or the only axis of a 1-D mesh."""
  check_mesh(mesh)
  if TASK_AXIS in mesh.axis_names:
    return TASK_AXIS
  if len(mesh.axis_names) == 1:
    return mesh.axis_names[0]
  raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}; name the one to split tasks over "
                   f"{TASK_AXIS!r} (the others hold replicated meta-parameters).")


def auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis of type Auto (same devices, same names)."""
  types = getattr(mesh, "axis_types", None)
  auto = jax.sharding.AxisType.Auto
  if types is None or all(t == auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def axis_size(mesh: Mesh) -> int:
  return int(mesh.shape[task_axis(mesh)])


def check_batch(meta_batch_size: int, micro_batches: int, mesh: Mesh | None) -> None:
  """Micro-batches divide the meta-batch; each divides the mesh's task axis."""
  if meta_batch_size % micro_batches:
    raise ValueError(f"micro_batches ({micro_batches}) must divide meta_batch_size "
                     f"({meta_batch_size}).")
  if mesh is None:
    return
  group, size = meta_batch_size // micro_batches, axis_size(mesh)
  if group % size:
    per = "meta_batch_size" if micro_batches == 1 else (
        f"meta_batch_size / micro_batches ({meta_batch_size} / {micro_batches})")
    raise ValueError(f"{per} = {group} tasks must be a multiple of the mesh's task axis "
                     f"{task_axis(mesh)!r} ({size} devices): every device adapts the same "
                     "number of tasks.")


def replicate(tree, mesh: Mesh):
  """``tree`` replicated over ``mesh``; leaves already placed so are left as they are.

  Works across processes (``jax.distributed``), where ``jax.device_put`` cannot place a
  process-local array (or a PRNG key) on devices of other processes: every process holds the
  whole value, from which its devices' copies are made.
  """
  target = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, target)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(put, tree)


def constrain_tasks(tasks, mesh: Mesh, *, leading: int = 0):
  """Inside ``jit``: ``tasks`` with their task axis (after ``leading`` axes) split over ``mesh``."""
  spec = PartitionSpec(*([None] * leading), task_axis(mesh))
  return jax.lax.with_sharding_constraint(tasks, NamedSharding(mesh, spec))


def over_mesh(value_and_grad: Callable, mesh: Mesh, *, shard_map: bool) -> Callable:
  """``(meta_params, tasks, step) -> (loss, grads)`` with the tasks split over ``mesh``."""
  axis = task_axis(mesh)
  if not shard_map:
    return lambda params, tasks, step: value_and_grad(params, constrain_tasks(tasks, mesh), step)

  def local(params, tasks, step):  # one device's tasks: their mean loss and meta-gradient
    return jax.lax.pmean(value_and_grad(params, tasks, step), axis)

  spec = PartitionSpec()
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec(axis), spec),
                         out_specs=spec, check_vma=False)
  return lambda params, tasks, step: mapped(params, constrain_tasks(tasks, mesh), step)


def in_micro_batches(value_and_grad: Callable, micro_batches: int,
                     mesh: Mesh | None) -> Callable:
  """``value_and_grad`` over ``micro_batches`` equal groups of tasks in a ``lax.scan``; the mean
  of the groups' means (equal sizes: the mean over the whole batch)."""
  if micro_batches == 1:
    return value_and_grad

  def accumulated(params, tasks, step):
    groups = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), tasks)
    if mesh is not None:
      groups = constrain_tasks(groups, mesh, leading=1)
    first = jax.tree.map(lambda x: x[0], groups)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(value_and_grad, params, first, step))

    def add(total, group):
      out = value_and_grad(params, group, step)
      return jax.tree.map(jnp.add, total, out), None

    total, _ = jax.lax.scan(add, zeros, groups)
    return jax.tree.map(lambda x: (x / micro_batches).astype(x.dtype), total)

  return accumulated

