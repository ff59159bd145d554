"""Tasks and on-device task families.

A task family is a function ``sample(key, num_tasks) -> Task`` that runs inside
``jit``: every array it returns has a leading task axis of size ``num_tasks``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metajax.solvers import _common

PyTree = Any


class Task(NamedTuple):
  """One task (or a batch of tasks, with a leading task axis on every leaf).

  Attributes:
    support: the batch the inner solver adapts on.
    query: the batch the adapted parameters are evaluated on.
  """

  support: PyTree
  query: PyTree


def _uniform(key, shape, low, high, dtype):
  return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)


def regression_family(target_fn, param_ranges: dict, *, num_support: int, num_query: int,
                      x_range: tuple[float, float], dtype=jnp.float32):
  """A 1-D regression task family ``y = target_fn(x, **task_params)``.

  Each task draws its parameters uniformly from ``param_ranges`` and its inputs
  uniformly from ``x_range``. Batches are ``(x, y)`` with shapes ``(n, 1)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import regression_family
    >>> sample = regression_family(lambda x, a: a * x, {'a': (1.0, 2.0)},
    ...                            num_support=5, num_query=7, x_range=(-1.0, 1.0))
    >>> sample(jax.random.key(0), 3).query[0].shape
    (3, 7, 1)
  """
  _common.check_positive_int("num_support", num_support)
  _common.check_positive_int("num_query", num_query)
  names = sorted(param_ranges)

  def sample(key, num_tasks: int) -> Task:
    _common.check_positive_int("num_tasks", num_tasks)
    key_params, key_x = jax.random.split(key)
    keys = jax.random.split(key_params, len(names))
    task_params = {
        name: _uniform(k, (num_tasks, 1, 1), *param_ranges[name], dtype)
        for name, k in zip(names, keys)
    }
    x = _uniform(key_x, (num_tasks, num_support + num_query, 1), *x_range, dtype)
    y = target_fn(x, **task_params).astype(dtype)
    return Task(support=(x[:, :num_support], y[:, :num_support]),
                query=(x[:, num_support:], y[:, num_support:]))

  return sample


def sinusoid(*, num_support: int = 10, num_query: int = 10, dtype=jnp.float32):
  """MAML's sinusoid family: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].

  Example:
    >>> import jax
    >>> from metajax.tasks import sinusoid
    >>> tasks = sinusoid(num_support=10)(jax.random.key(0), 25)
    >>> tasks.support[0].shape
    (25, 10, 1)
  """
  return regression_family(
      lambda x, amplitude, phase: amplitude * jnp.sin(x - phase),
      {"amplitude": (0.1, 5.0), "phase": (0.0, jnp.pi)},
      num_support=num_support, num_query=num_query, x_range=(-5.0, 5.0), dtype=dtype)


def cos_mixture(*, num_support: int = 100, num_query: int = 100, dtype=jnp.float32):
  """A-MAML's CosMixture family: ``y = -c cos(f pi x + p) - x^2``.

  ``c`` in U[0.1, 1], ``p`` in U[0.5, 2], ``f`` in U[3, 6], ``x`` in U[-1, 1]
  (Li et al. 2021, arXiv 2110.08432).

  Example:
    >>> import jax
    >>> from metajax.tasks import cos_mixture
    >>> cos_mixture(num_support=10, num_query=10)(jax.random.key(0), 4).support[1].shape
    (4, 10, 1)
  """
  return regression_family(
      lambda x, c, p, f: -c * jnp.cos(f * jnp.pi * x + p) - x ** 2,
      {"c": (0.1, 1.0), "p": (0.5, 2.0), "f": (3.0, 6.0)},
      num_support=num_support, num_query=num_query, x_range=(-1.0, 1.0), dtype=dtype)


def _rotate(images, quarter_turns):
  """Rotates NHWC (or HWC) images by ``quarter_turns`` * 90 degrees (traced int)."""
  branches = [lambda x, k=k: jnp.rot90(x, k, axes=(-3, -2)) for k in range(4)]
  return jax.lax.switch(quarter_turns, branches, images)


def episodes(*, ways: int, shots: int, queries: int, rotations: bool = False,
             dtype=jnp.float32):
  """An N-way K-shot classification task family over class-indexed images, on device.

  Returns ``sample(key, num_tasks, images)`` where ``images`` has shape
  ``(num_classes, examples_per_class, H, W, C)`` (uint8 images are scaled to
  [0, 1]). Each task draws ``ways`` distinct classes in random order, so the
  labels ``0..ways-1`` are permuted per episode, and ``shots + queries``
  distinct examples per class. With ``rotations``, each class also appears
  rotated by 90, 180 and 270 degrees as three extra classes (Omniglot's
  augmentation): ``4 * num_classes`` classes in all.

  Batches are ``(x, labels)`` with ``x`` of shape ``(ways * shots, H, W, C)``
  (support) or ``(ways * queries, H, W, C)`` (query), grouped by class.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import episodes
    >>> images = jnp.zeros((10, 6, 8, 8, 1), jnp.uint8)
    >>> tasks = episodes(ways=5, shots=1, queries=2)(jax.random.key(0), 3, images)
    >>> tasks.support[0].shape, tasks.query[1].shape
    ((3, 5, 8, 8, 1), (3, 10))
  """
  for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
    _common.check_positive_int(name, value)

  def one_task(key, images):
    num_classes, per_class = images.shape[:2]
    key_classes, key_examples = jax.random.split(key)
    total_classes = num_classes * (4 if rotations else 1)
    classes = jax.random.choice(key_classes, total_classes, (ways,), replace=False)
    keys = jax.random.split(key_examples, ways)
    picks = jax.vmap(lambda k: jax.random.choice(k, per_class, (shots + queries,),
                                                 replace=False))(keys)
    x = images[(classes % num_classes)[:, None], picks]  # (ways, shots + queries, H, W, C)
    if rotations:
      x = jax.vmap(_rotate)(x, classes // num_classes)
    x = x.astype(dtype) / 255.0 if images.dtype == jnp.uint8 else x.astype(dtype)
    labels = jnp.broadcast_to(jnp.arange(ways)[:, None], (ways, shots + queries))
    flat = lambda a, n: a[:, :n].reshape(ways * n, *a.shape[2:])
    tail = lambda a: a[:, shots:].reshape(ways * queries, *a.shape[2:])
    return Task(support=(flat(x, shots), flat(labels, shots)), query=(tail(x), tail(labels)))

  def sample(key, num_tasks: int, images) -> Task:
    _common.check_positive_int("num_tasks", num_tasks)
    if images.ndim != 5:
      raise ValueError("images must have shape (num_classes, examples_per_class, H, W, C), "
                       f"got {images.shape}.")
    num_classes, per_class = images.shape[:2]
    if num_classes * (4 if rotations else 1) < ways:
      raise ValueError(f"ways={ways} exceeds the {num_classes} classes available.")
    if per_class < shots + queries:
      raise ValueError(f"shots + queries = {shots + queries} exceeds the {per_class} "
                       "examples per class.")
    return jax.vmap(one_task, in_axes=(0, None))(jax.random.split(key, num_tasks), images)

  return sample


def class_batches(*, batch_size: int, rotations: bool = False, dtype=jnp.float32):
  """Supervised minibatches over class-indexed images with fixed global labels, on device.

  Returns ``sample(key, images) -> (x, labels)`` with labels in
  ``[0, num_classes)`` (``[0, 4 * num_classes)`` with ``rotations``: class
  ``c + k * num_classes`` is class ``c`` rotated by ``k * 90`` degrees). Used for
  the non-meta-learned pretraining baseline.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import class_batches
    >>> x, labels = class_batches(batch_size=4)(jax.random.key(0), jnp.zeros((3, 5, 8, 8, 1)))
    >>> x.shape, labels.shape
    ((4, 8, 8, 1), (4,))
  """
  _common.check_positive_int("batch_size", batch_size)

  def sample(key, images):
    num_classes, per_class = images.shape[:2]
    key_class, key_example = jax.random.split(key)
    labels = jax.random.randint(key_class, (batch_size,), 0,
                                num_classes * (4 if rotations else 1))
    picks = jax.random.randint(key_example, (batch_size,), 0, per_class)
    x = images[labels % num_classes, picks]
    if rotations:
      x = jax.vmap(_rotate)(x, labels // num_classes)
    x = x.astype(dtype) / 255.0 if images.dtype == jnp.uint8 else x.astype(dtype)
    return x, labels

  return sample
