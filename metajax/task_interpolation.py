"""Task interpolation (MLTI, Yao et al. 2021): new tasks as convex combinations of two tasks.

Re-exported as [`metajax.tasks.mix_tasks`][metajax.tasks.mix_tasks] and
[`metajax.tasks.interpolate`][metajax.tasks.interpolate].
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metajax.solvers import _common
from metajax.solvers._result import RESULTS, error_if
from metajax.tasks import Task, _check_key


def _check_alpha(alpha) -> float:
  try:
    value = float(alpha) if not isinstance(alpha, (bool, np.bool_, str)) and \
        np.ndim(alpha) == 0 else None
  except (TypeError, jax.errors.ConcretizationTypeError):
    value = None
  if value is None or not (math.isfinite(value) and value > 0):
    raise ValueError(f"alpha must be a finite number > 0 (the Beta(alpha, alpha) mixing "
                     f"distribution), got {alpha!r}.")
  return value


def mix_tasks(key, tasks: Task, *, alpha: float = 0.5) -> Task:
  """Each task mixed with another task of the batch: ``lam * T_i + (1 - lam) * T_j``.

  For every task ``i`` a partner ``j != i`` is drawn uniformly from the batch and a weight
  ``lam ~ Beta(alpha, alpha)``; every floating-point leaf of the support and the query (inputs,
  regression targets, one-hot or soft labels) becomes ``lam * x_i + (1 - lam) * x_j`` with the
  same ``lam`` throughout the task. Integer leaves (class labels) are kept: MLTI's
  non-label-sharing interpolation pairs class ``k`` of one task with class ``k`` of the other,
  so the labels must agree position by position, as they do for
  [`episodes`][metajax.tasks.episodes] (examples grouped by class); where they differ it raises at
  run time. Mixing happens on the inputs (MLTI also mixes hidden features; this is its
  input-level form) and runs on device, inside ``jit``.

  Args:
    key: a PRNG key.
    tasks: a [`Task`][metajax.tasks.Task] batch with a leading task axis of at least 2.
    alpha: the Beta distribution's parameter (MLTI: 0.5 to 2).

  Examples:
    >>> import jax, metajax
    >>> tasks = metajax.tasks.sinusoid()(jax.random.key(0), 4)
    >>> mixed = metajax.tasks.mix_tasks(jax.random.key(1), tasks)
    >>> mixed.support[0].shape
    (4, 10, 1)
  """
  _check_key(key)
  alpha = _check_alpha(alpha)
  if not isinstance(tasks, Task):
    raise TypeError(f"tasks must be a metajax.tasks.Task batch, got {type(tasks).__name__}.")
  for path, x in jax.tree_util.tree_leaves_with_path(tasks):
    if not hasattr(x, "shape") or not jnp.ndim(x):
      raise ValueError(f"tasks{jax.tree_util.keystr(path)} is {type(x).__name__} "
                       f"{getattr(x, 'shape', '')}: every leaf of tasks must be an array with a "
                       "leading task axis.")
  sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(tasks)}
  if len(sizes) != 1:
    raise ValueError(f"every leaf of tasks needs the same leading task axis; got sizes {sizes}.")
  n = sizes.pop()
  if n < 2:
    raise ValueError(f"task interpolation mixes two tasks of a batch: it needs at least 2 tasks, "
                     f"got {n}.")
  key_partner, key_weight = jax.random.split(key)
  partner = (jnp.arange(n) + jax.random.randint(key_partner, (n,), 1, n)) % n
  leaves = jax.tree.leaves(tasks)
  floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  if not floats:
    raise TypeError("tasks has no floating-point leaves to interpolate.")
  dtype = jnp.result_type(*floats)
  lam = jax.random.beta(key_weight, alpha, alpha, (n,), dtype)
  mismatch = []

  def mix(x):
    other = x[partner]
    if jnp.issubdtype(x.dtype, jnp.floating):
      w = lam.reshape((n,) + (1,) * (x.ndim - 1)).astype(x.dtype)
      return w * x + (1 - w) * other
    mismatch.append(jnp.sum(x != other))
    return x

  mixed = jax.tree.map(mix, tasks)
  if mismatch:
    differing = sum(mismatch[1:], mismatch[0])
    code = jnp.where(differing == 0, RESULTS.successful, RESULTS.invalid_input)
    mixed = error_if(mixed, code, "metajax mix_tasks: integer labels of paired tasks differ "
                     "(integer leaves are class labels, kept, not mixed: MLTI pairs class k with "
                     "class k, so group each task's examples by class as episodes() does, use "
                     "one-hot float labels, or cast integer inputs to float)",
                     differing_labels=differing)
  return mixed


def interpolate(family: Callable, *, alpha: float = 0.5) -> Callable:
  """A task family whose tasks are MLTI interpolations of ``family``'s (see
  [`mix_tasks`][metajax.tasks.mix_tasks]).

  ``sample(key, num_tasks, *data)`` draws ``num_tasks`` tasks from ``family`` with
  ``split(key)[0]`` and mixes them with [`mix_tasks`][metajax.tasks.mix_tasks] under
  ``split(key)[1]``: a drop-in
  ``sample_tasks`` for [`metajax.meta.make_train_step`][metajax.meta.make_train_step] (meta-batches
  of at least 2).

  Examples:
    >>> import jax, metajax
    >>> sample = metajax.tasks.interpolate(metajax.tasks.sinusoid(), alpha=2.0)
    >>> sample(jax.random.key(0), 3).query[1].shape
    (3, 10, 1)
  """
  _common.check_callable("family", family)
  _common.check_family("family", family)
  alpha = _check_alpha(alpha)

  def sample(key, num_tasks: int, *data) -> Task:
    _check_key(key)
    key_tasks, key_mix = jax.random.split(key)
    return mix_tasks(key_mix, family(key_tasks, num_tasks, *data), alpha=alpha)

  return sample
