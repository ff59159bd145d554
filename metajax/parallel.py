"""Task-axis parallelism: shard a task batch over a device mesh; ``jit`` does the rest.

The one-argument path is [`make_train_step(..., mesh=task_mesh())`][metajax.meta.make_train_step]:
tasks sampled into the task sharding, state replicated, meta-gradient reduced (optionally under
``shard_map``, in micro-batches). The pieces below serve code that builds its own loop.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metajax.meta._distribute import TASK_AXIS, auto_mesh, axis_size, check_mesh, task_axis
from metajax.meta._distribute import replicate as _replicate

__all__ = ["TASK_AXIS", "put_replicated", "replicated", "shard_family", "shard_tasks", "task_mesh",
           "task_sharding"]


def task_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"tasks"`` over ``devices`` (default: all devices).

  Examples:
    >>> from metajax.parallel import task_mesh
    >>> task_mesh().axis_names
    ('tasks',)
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices is empty: a task mesh needs at least one device.")
  bad = [d for d in devices if not isinstance(d, jax.Device)]
  if bad:
    raise TypeError(f"devices must be jax.Device objects (e.g. jax.devices()), got {bad[0]!r}.")
  return Mesh(np.asarray(devices), (TASK_AXIS,))


def task_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (task) axis over the mesh's task axis (``"tasks"``, or
  the only axis of a 1-D mesh, as in [`make_train_step`][metajax.meta.make_train_step]).

  Inside ``jit``, where tasks are sampled on device, [`shard_family`][metajax.parallel.shard_family]
  applies it to a task family's batches; outside, see [`shard_tasks`][metajax.parallel.shard_tasks].

  Examples:
    >>> from metajax.parallel import task_mesh, task_sharding
    >>> tuple(task_sharding(task_mesh()).spec)
    ('tasks',)
  """
  return NamedSharding(mesh, PartitionSpec(task_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that replicates an array (meta-parameters) on every device.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.parallel import replicated, task_mesh
    >>> theta = jax.device_put(jnp.zeros(3), replicated(task_mesh()))
    >>> theta.sharding.is_fully_replicated
    True
  """
  return NamedSharding(mesh, PartitionSpec())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` (meta-parameters, a training state, a key) replicated on ``mesh``.

  Leaves already replicated there are left as they are. Across processes
  (``jax.distributed``) every process passes the whole value (the same on each), where
  ``jax.device_put`` would refuse a process-local array or key.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.parallel import put_replicated, task_mesh
    >>> state = put_replicated({"theta": jnp.zeros(3), "key": jax.random.key(0)}, task_mesh())
    >>> state["theta"].sharding.is_fully_replicated
    True
  """
  check_mesh(mesh)
  return _replicate(tree, mesh)


def shard_tasks(tasks: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tasks`` with its task axis split over ``mesh``.

  The number of tasks must be a multiple of the mesh size. Inside ``jit``
  (where tasks are sampled on device) use [`shard_family`][metajax.parallel.shard_family].

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.parallel import shard_tasks, task_mesh
    >>> import jax
    >>> x = shard_tasks(jnp.zeros((len(jax.devices()) * 2, 3)), task_mesh())
  """
  check_mesh(mesh)
  _check_task_axis(tasks, mesh)
  return jax.device_put(tasks, task_sharding(mesh))


def shard_family(family: Callable, mesh: Mesh) -> Callable:
  """A task family whose sampled batches have their task axis split over ``mesh``.

  ``sample(key, num_tasks, *data)`` calls ``family`` and constrains the result to
  [`task_sharding`][metajax.parallel.task_sharding] (``jax.lax.with_sharding_constraint``), so
  that inside a jitted train step ([`make_train_step`][metajax.meta.make_train_step]) sampling
  and adaptation run on every device's share of the tasks. ``num_tasks`` must be a multiple of
  the mesh size.

  Examples:
    >>> import jax
    >>> from metajax.parallel import shard_family, task_mesh
    >>> from metajax.tasks import sinusoid
    >>> sample = shard_family(sinusoid(), task_mesh())
    >>> tasks = jax.jit(sample, static_argnums=1)(jax.random.key(0), 2 * len(jax.devices()))
    >>> len(tasks.support[0].sharding.device_set) == len(jax.devices())
    True
  """
  if not callable(family):
    raise TypeError(f"family must be a task family, sample(key, num_tasks, *data), got "
                    f"{type(family).__name__}.")
  check_mesh(mesh)

  def sample(key, num_tasks, *data):
    tasks = family(key, num_tasks, *data)
    _check_task_axis(tasks, mesh)
    # a constraint names Auto axes (jax.make_mesh's default axes are Explicit)
    return jax.lax.with_sharding_constraint(tasks, task_sharding(auto_mesh(mesh)))

  return sample


def _check_task_axis(tasks, mesh: Mesh) -> None:
  """Every leaf has a leading task axis whose size is a multiple of the mesh's task axis."""
  size, name = axis_size(mesh), task_axis(mesh)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tasks):
    where = f"tasks{jax.tree_util.keystr(path)}"
    if np.ndim(leaf) == 0:
      raise ValueError(f"{where} is a scalar: every leaf needs a leading task axis.")
    if np.shape(leaf)[0] % size:
      raise ValueError(f"the task axis of {where} (size {np.shape(leaf)[0]}) must be a "
                       f"multiple of the mesh size {size} along its task axis {name!r}.")
