"""Loop forms for inner iterations, chosen from the backend and the model."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# Fully unrolling more steps than this costs compile time for no speed (sinusoid MLP, meta-batch
# 25, experiments/benchmarks/strategies.md: at K=10 the full unroll compiles in 7.6 s and runs
# 3.96 ms/iteration vs a scan's 2.6 s and 3.98 ms; at K=50, 34 s and 2.3x slower). At K=5 the full
# unroll is ~9% faster than a scan and matches a hand-written loop (maml_overhead.md).
FULL_UNROLL_MAX_STEPS = 5


def _jaxprs_in(value):
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
    yield value.jaxpr
  elif hasattr(value, "eqns"):  # Jaxpr
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _jaxprs_in(item)


def contains_primitive(jaxpr, name: str) -> bool:
  """Whether a primitive or a named ``jit`` call ``name`` appears in ``jaxpr``, sub-jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name or eqn.params.get("name") == name:
      return True
    for value in eqn.params.values():
      if any(contains_primitive(sub, name) for sub in _jaxprs_in(value)):
        return True
  return False


def uses_convolution(fn: Callable, *args, patches: bool = False) -> bool:
  """Whether ``fn(*args)`` runs an XLA convolution (traced abstractly, nothing executes).

  With ``patches=True``, convolutions written as patches @ kernel
  (``metajax.models.layers.conv_patches``) count too.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.solvers import uses_convolution
    >>> conv = lambda k, x: jax.lax.conv(x, k, (1, 1), "SAME")
    >>> uses_convolution(conv, jnp.ones((2, 1, 3, 3)), jnp.ones((1, 1, 5, 5)))
    True
  """
  closed = jax.make_jaxpr(fn)(*args)
  names = ("conv_general_dilated", "conv_patches") if patches else ("conv_general_dilated",)
  return any(contains_primitive(closed.jaxpr, name) for name in names)


def choose_unroll(steps: int, loss_fn: Callable, params, batch) -> int | bool:
  """The loop form ``unroll="auto"`` picks for ``steps`` inner iterations.

  On CPU an XLA convolution inside a rolled loop runs ~20x slower than
  unrolled, so nets with ``lax`` convolutions on CPU are always fully unrolled
  (metajax's models compute convolutions as patches on CPU, which loop at full
  speed: ``metajax.models.layers``). Otherwise loops of
  at most ``FULL_UNROLL_MAX_STEPS`` steps are fully unrolled (as fast as a
  hand-written loop) and longer ones are a rolled ``lax.scan`` (bounded compile
  time).

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.solvers import choose_unroll
    >>> choose_unroll(50, lambda p, b: jnp.sum(p * b), jnp.ones(3), jnp.ones(3))
    1
  """
  if steps <= FULL_UNROLL_MAX_STEPS:
    return True
  if jax.default_backend() == "cpu" and uses_convolution(loss_fn, params, batch):
    return True
  return 1


def resolve_unroll(unroll, steps: int, loss_fn, params, batch) -> int | bool:
  if unroll == "auto":
    return choose_unroll(steps, loss_fn, params, batch)
  if unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1):
    return unroll
  raise ValueError(f"unroll must be 'auto', True, or an int >= 1; got {unroll!r}.")


def repeat(step: Callable[[Any], tuple[Any, Any]], carry, length: int, unroll: int | bool):
  """Applies ``step`` ``length`` times; returns the carry and stacked outputs."""
  if unroll is True:
    outputs = []
    for _ in range(length):
      carry, out = step(carry)
      outputs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
  return jax.lax.scan(lambda c, _: step(c), carry, None, length=length, unroll=unroll)


TASK_BATCHING = ("vmap", "unroll", "map")


def choose_task_batching(loss_fn: Callable, params, batch) -> str:
  """How ``task_batching="auto"`` maps a per-task function over the task axis.

  Per-task convolution weights under ``vmap`` become grouped convolutions,
  which XLA:CPU runs on a slow path (jax-ml/jax#13800), and convolutions in a
  rolled ``lax.map`` run ~20x slower than unrolled ones: conv nets on CPU get
  a Python loop over tasks inside one ``jit`` (``"unroll"``). Everything else
  (MLPs anywhere, any model on GPU/TPU) is vectorized with ``vmap``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.solvers import choose_task_batching
    >>> choose_task_batching(lambda p, b: jnp.sum(p * b), jnp.ones(3), jnp.ones(3))
    'vmap'
  """
  if jax.default_backend() == "cpu" and uses_convolution(loss_fn, params, batch):
    return "unroll"
  return "vmap"


def map_tasks(fn: Callable, tasks, mode: str):
  """``fn`` over the leading task axis of ``tasks``: ``vmap``, a Python loop, or ``lax.map``."""
  if mode == "vmap":
    return jax.vmap(fn)(tasks)
  if mode == "map":
    return jax.lax.map(fn, tasks)
  if mode == "unroll":
    n = jax.tree.leaves(tasks)[0].shape[0]
    outs = [fn(jax.tree.map(lambda x, i=i: x[i], tasks)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  raise ValueError(f"task_batching must be 'auto' or one of {TASK_BATCHING}, got {mode!r}.")
