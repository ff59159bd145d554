"""Tasks and on-device task families.

A task family is a function ``sample(key, num_tasks) -> Task`` that runs inside
``jit``: every array it returns has a leading task axis of size ``num_tasks``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def _check_num_tasks(num_tasks) -> int:
  """``num_tasks`` fixes the shape of every array a family returns: a positive Python int."""
  if isinstance(num_tasks, jax.core.Tracer):
    raise TypeError("num_tasks must be a Python int, got a traced value: it fixes the shapes "
                    "of the batch, so mark it static under jax.jit (e.g. static_argnums=1).")
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
    raise TypeError(f"num_tasks must be a Python int (it fixes the shapes of the batch), got "
                    f"{num_tasks!r} of type {type(num_tasks).__name__}.")
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
  return int(num_tasks)


def _check_key(key) -> None:
  """A single PRNG key: ``jax.random.key(seed)`` (shape ``()``) or a raw ``uint32[2]`` key."""
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key, got a key array of shape {key.shape}; "
                       "split it and call once per key, or use jax.vmap.")
    return
  shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
  if dtype == jnp.uint32 and len(shape) == 1:  # a raw key, e.g. jax.random.PRNGKey(0)
    raw = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
    if shape != raw:
      raise ValueError(f"key is a raw uint32 key of shape {shape}; jax.random.PRNGKey keys "
                       f"have shape {raw}: use jax.random.key(seed) or jax.random.PRNGKey(seed).")
    return
  if dtype == jnp.uint32 and len(shape) == 2:
    raise ValueError(f"key must be a single PRNG key, got a batch of {shape[0]} raw keys "
                     f"(shape {shape}); call once per key, or use jax.vmap.")
  shown = f"an array of shape {shape} and dtype {dtype}" if shape is not None else repr(key)
  raise TypeError(f"key must be a PRNG key such as jax.random.key(0), got {shown}.")


def _check_bool(name: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}.")


def _check_dtype(dtype) -> None:
  _common.check_float_dtype(dtype)


def _check_range(name: str, value, hint: str = "") -> tuple[float, float]:
  """A ``(low, high)`` pair of finite numbers with ``low < high``."""
  try:
    low, high = value
    low, high = float(low), float(high)
  except (TypeError, ValueError) as err:
    raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}.") from err
  if not (math.isfinite(low) and math.isfinite(high)):
    raise ValueError(f"{name} must be finite, got ({low}, {high}).")
  if not low < high:
    raise ValueError(f"{name} must have low < high, got ({low}, {high}){hint}.")
  return low, high


def _check_param_names(target_fn, names: list[str]) -> None:
  """``target_fn(x, **task_params)`` must accept exactly the names of ``param_ranges``."""
  try:
    signature = inspect.signature(target_fn)
  except (TypeError, ValueError):  # builtins and some wrappers: checked when called
    return
  try:
    signature.bind(None, **dict.fromkeys(names))
  except TypeError as err:
    raise ValueError(f"param_ranges names {names} do not fit target_fn{signature}, which is "
                     f"called as target_fn(x, **task_params): {err}.") from err


def _check_images(images, *, rotations: bool) -> tuple[int, int]:
  """Class-indexed images ``(num_classes, examples_per_class, H, W, C)``: floating or uint8."""
  if not (hasattr(images, "shape") and hasattr(images, "dtype")):
    raise TypeError(f"images must be an array of shape (num_classes, examples_per_class, H, W, "
                    f"C), got {type(images).__name__}.")
  if images.ndim != 5:
    raise ValueError("images must have shape (num_classes, examples_per_class, H, W, C) "
                     f"(rank 5), got shape {tuple(images.shape)} (rank {images.ndim}).")
  if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
    raise TypeError(f"images must be floating-point or uint8 (scaled to [0, 1]), got dtype "
                    f"{images.dtype}.")
  num_classes, per_class, height, width, channels = images.shape
  if num_classes == 0 or per_class == 0:
    raise ValueError(f"images holds no examples: shape {tuple(images.shape)} has "
                     f"{num_classes} classes of {per_class} examples.")
  if 0 in (height, width, channels):
    raise ValueError(f"images are empty: H, W, C = {height}, {width}, {channels}.")
  if rotations and height != width:
    raise ValueError(f"rotations=True needs square images, got H x W = {height} x {width}.")
  return num_classes, per_class


def regression_family(target_fn, param_ranges: dict, *, num_support: int, num_query: int,
                      x_range: tuple[float, float], dtype=jnp.float32, input_dim: int = 1):
  """A regression task family ``y = target_fn(x, **task_params)``.

  Each task draws its parameters uniformly from ``param_ranges`` and its inputs
  uniformly from ``x_range`` (each coordinate). Batches are ``(x, y)`` with shapes
  ``(n, input_dim)`` and ``(n, 1)``.

  Args:
    target_fn: ``target_fn(x, **task_params) -> y``, with ``x`` and each task parameter
      broadcastable (``x``: ``(num_tasks, n, input_dim)``, parameters: ``(num_tasks, 1,
      1)``); ``y`` must have shape ``(num_tasks, n, 1)``.
    param_ranges: a non-empty dict ``{name: (low, high)}`` of finite ``low < high``; the names
      are ``target_fn``'s keyword arguments.
    num_support: support examples per task (a positive int).
    num_query: query examples per task (a positive int).
    x_range: ``(low, high)`` of the inputs, finite with ``low < high``.
    dtype: a floating-point dtype.
    input_dim: the number of input coordinates (a positive int).

  Returns:
    ``sample(key, num_tasks) -> Task``; ``num_tasks`` is a Python int (static under ``jit``).

  Raises:
    TypeError, ValueError: naming the argument, for any of the above that does not hold
      (``target_fn``'s output shape and ``num_tasks`` are checked when ``sample`` runs).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import regression_family
    >>> sample = regression_family(lambda x, a: a * x, {'a': (1.0, 2.0)},
    ...                            num_support=5, num_query=7, x_range=(-1.0, 1.0))
    >>> sample(jax.random.key(0), 3).query[0].shape
    (3, 7, 1)
  """
  _common.check_callable("target_fn", target_fn)
  if not isinstance(param_ranges, Mapping):
    raise TypeError("param_ranges must be a dict {name: (low, high)}, got "
                    f"{type(param_ranges).__name__}.")
  if not param_ranges:
    raise ValueError("param_ranges is empty: a task family needs at least one task parameter "
                     "{name: (low, high)}.")
  bad = [name for name in param_ranges if not (isinstance(name, str) and name.isidentifier())]
  if bad:
    raise TypeError(f"param_ranges names must be identifiers (target_fn's keyword arguments), "
                    f"got {bad}.")
  names = sorted(param_ranges)
  ranges = {name: _check_range(f"param_ranges[{name!r}]", param_ranges[name],
                               "; a fixed value belongs in target_fn itself") for name in names}
  _check_param_names(target_fn, names)
  _common.check_positive_int("num_support", num_support)
  _common.check_positive_int("num_query", num_query)
  x_low, x_high = _check_range("x_range", x_range)
  _check_dtype(dtype)
  _common.check_positive_int("input_dim", input_dim)

  def sample(key, num_tasks: int) -> Task:
    num_tasks = _check_num_tasks(num_tasks)
    _check_key(key)
    key_params, key_x = jax.random.split(key)
    keys = jax.random.split(key_params, len(names))
    task_params = {
        name: _uniform(k, (num_tasks, 1, 1), *ranges[name], dtype)
        for name, k in zip(names, keys)
    }
    x = _uniform(key_x, (num_tasks, num_support + num_query, input_dim), x_low, x_high, dtype)
    y = jnp.asarray(target_fn(x, **task_params))
    if y.shape != x.shape[:2] + (1,):
      raise ValueError(f"target_fn must return y of shape {x.shape[:2] + (1,)} (num_tasks, "
                       f"num_support + num_query, 1), got shape {y.shape}.")
    y = y.astype(dtype)
    return Task(support=(x[:, :num_support], y[:, :num_support]),
                query=(x[:, num_support:], y[:, num_support:]))

  return sample


def sinusoid(*, num_support: int = 10, num_query: int = 10, dtype=jnp.float32):
  """MAML's sinusoid family: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].

  Examples:
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

  Examples:
    >>> import jax
    >>> from metajax.tasks import cos_mixture
    >>> cos_mixture(num_support=10, num_query=10)(jax.random.key(0), 4).support[1].shape
    (4, 10, 1)
  """
  return regression_family(
      lambda x, c, p, f: -c * jnp.cos(f * jnp.pi * x + p) - x ** 2,
      {"c": (0.1, 1.0), "p": (0.5, 2.0), "f": (3.0, 6.0)},
      num_support=num_support, num_query=num_query, x_range=(-1.0, 1.0), dtype=dtype)


def cos_mixture2d(*, num_support: int = 100, num_query: int = 100, dtype=jnp.float32):
  """A-MAML's CosMixture2D: ``y = -c sum_d cos(f pi x_d + p) - sum_d x_d^2`` on ``[-1, 1]^2``.

  ``c``, ``p``, ``f`` as in [`cos_mixture`][metajax.tasks.cos_mixture] (shared by both coordinates).

  Examples:
    >>> import jax
    >>> from metajax.tasks import cos_mixture2d
    >>> cos_mixture2d(num_support=10, num_query=10)(jax.random.key(0), 4).support[0].shape
    (4, 10, 2)
  """
  return regression_family(
      lambda x, c, p, f: jnp.sum(-c * jnp.cos(f * jnp.pi * x + p) - x ** 2, -1, keepdims=True),
      {"c": (0.1, 1.0), "p": (0.5, 2.0), "f": (3.0, 6.0)},
      num_support=num_support, num_query=num_query, x_range=(-1.0, 1.0), dtype=dtype,
      input_dim=2)


def alpine2d(*, num_support: int = 100, num_query: int = 100, dtype=jnp.float32):
  """A-MAML's Alpine2D: a shifted Alpine function on ``[-10, 10]^2``.

  ``y = sum_d |x_d sin(x_d + pi + k_d pi / 12) + x_d / 10|`` with shifts ``k_1, k_2`` in
  U[-5, 5], drawn independently (A-MAML's code declares two shifts but uses the first for
  both coordinates). Inputs span [-10, 10]: standardize them for a tanh network
  (``experiments/amaml.py`` does, as A-MAML's code does).

  Examples:
    >>> import jax
    >>> from metajax.tasks import alpine2d
    >>> alpine2d(num_support=10, num_query=10)(jax.random.key(0), 4).query[1].shape
    (4, 10, 1)
  """
  def alpine(x, k1, k2):
    shift = jnp.pi + jnp.concatenate([k1, k2], axis=-1) * jnp.pi / 12
    return jnp.sum(jnp.abs(x * jnp.sin(x + shift) + x / 10), -1, keepdims=True)

  return regression_family(alpine, {"k1": (-5.0, 5.0), "k2": (-5.0, 5.0)},
                           num_support=num_support, num_query=num_query,
                           x_range=(-10.0, 10.0), dtype=dtype, input_dim=2)


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

  Args:
    ways: classes per task (a positive int, at most the classes available).
    shots: support examples per class (a positive int).
    queries: query examples per class (a positive int); ``shots + queries`` is at most
      ``examples_per_class``.
    rotations: add the three rotated copies of each class (square images only).
    dtype: the floating-point dtype of the returned images.

  Raises:
    TypeError, ValueError: naming the argument (``ways``, ``shots``, ``queries``,
      ``num_tasks``, ``key`` or ``images``) and what was wrong; ``images`` is checked when
      ``sample`` runs (rank 5, floating or uint8, enough classes and examples).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import episodes
    >>> images = jnp.zeros((10, 6, 8, 8, 1), jnp.uint8)
    >>> tasks = episodes(ways=5, shots=1, queries=2)(jax.random.key(0), 3, images)
    >>> tasks.support[0].shape, tasks.query[1].shape
    ((3, 5, 8, 8, 1), (3, 10))
  """
  for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
    _common.check_positive_int(name, value)
  if ways < 2:
    raise ValueError("ways must be >= 2, got 1: a 1-way task labels every example 0, so the "
                     "loss, the meta-gradient and the errors are 0 (and accuracy 1) whatever "
                     "the model.")
  _check_bool("rotations", rotations)
  _check_dtype(dtype)

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
    num_tasks = _check_num_tasks(num_tasks)
    _check_key(key)
    num_classes, per_class = _check_images(images, rotations=rotations)
    images = jnp.asarray(images)  # numpy images cannot be indexed by traced picks
    available = num_classes * (4 if rotations else 1)
    if available < ways:
      where = f" ({num_classes} x 4 rotations)" if rotations else ""
      raise ValueError(f"ways={ways} exceeds the {available} classes available{where} in images "
                       f"of shape {tuple(images.shape)} (axis 0 is the class); lower ways or "
                       "load more classes.")
    if per_class < shots + queries:
      raise ValueError(f"shots + queries = {shots + queries} exceeds the {per_class} examples "
                       f"per class in images of shape {tuple(images.shape)} (axis 1); each "
                       f"class needs shots={shots} + queries={queries} distinct examples.")
    return jax.vmap(one_task, in_axes=(0, None))(jax.random.split(key, num_tasks), images)

  return sample


def class_batches(*, batch_size: int, rotations: bool = False, dtype=jnp.float32):
  """Supervised minibatches over class-indexed images with fixed global labels, on device.

  Returns ``sample(key, images) -> (x, labels)`` with labels in
  ``[0, num_classes)`` (``[0, 4 * num_classes)`` with ``rotations``: class
  ``c + k * num_classes`` is class ``c`` rotated by ``k * 90`` degrees). Used for
  the non-meta-learned pretraining baseline.

  Args:
    batch_size: examples per batch (a positive int).
    rotations: add the three rotated copies of each class (square images only).
    dtype: the floating-point dtype of the returned images.

  Raises:
    TypeError, ValueError: naming the argument; ``images`` (rank 5, floating or uint8, no
      empty axis) is checked when ``sample`` runs.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.tasks import class_batches
    >>> x, labels = class_batches(batch_size=4)(jax.random.key(0), jnp.zeros((3, 5, 8, 8, 1)))
    >>> x.shape, labels.shape
    ((4, 8, 8, 1), (4,))
  """
  _common.check_positive_int("batch_size", batch_size)
  _check_bool("rotations", rotations)
  _check_dtype(dtype)

  def sample(key, images):
    _check_key(key)
    num_classes, per_class = _check_images(images, rotations=rotations)
    images = jnp.asarray(images)
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


from metajax.task_interpolation import interpolate, mix_tasks  # noqa: E402, F401  (uses Task)

__all__ = ["Task", "alpine2d", "class_batches", "cos_mixture", "cos_mixture2d", "episodes",
           "interpolate", "mix_tasks", "regression_family", "sinusoid"]
