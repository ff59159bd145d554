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
