"""One result type for every inner solver, and loud failures under ``jit``/``vmap``/``grad``.

Every solver's ``solve`` returns ``(phi, AdaptInfo)``; ``AdaptInfo.result`` is a
[`RESULTS`][metajax.solvers.RESULTS]
code. With ``throw=True`` (the default) a failure raises at run time, through
``error_if``: a check that costs one ``lax.cond`` when nothing failed and, on failure, calls
the host once with every task's values, so that the message names the solver, the stage, the
task index (under ``vmap``), the meta-iteration (inside
[`metajax.meta.make_train_step`][metajax.meta.make_train_step]) and
the value reached.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from metajax.solvers._vma import vary, varying_axes


class RESULTS(enum.IntEnum):
  """Status codes shared by all solvers and stages (``AdaptInfo.result``)."""

  successful = 0
  max_steps_reached = 1
  nonfinite = 2
  diverged = 3
  linear_solve_failed = 4
  ode_failed = 5
  invalid_hyperparameter = 6
  invalid_input = 7

  @property
  def message(self) -> str:
    return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "successful",
    RESULTS.max_steps_reached: "the step cap (max_steps) was reached before the solve met its "
                               "tolerance (raise max_steps or loosen the tolerance)",
    RESULTS.nonfinite: "a non-finite value (NaN or inf) appeared (check the support data, the "
                       "loss and the step size)",
    RESULTS.diverged: "the iteration diverged (its residual grew more than 1e4-fold: lower "
                      "the inner step size; for the linear solve of the implicit gradient, "
                      "damp it with ridge=, raise reg or use fewer iterations)",
    RESULTS.linear_solve_failed: "the linear solve missed its tolerance (raise maxiter, damp it "
                                 "with ridge=, or use tol=0 for a fixed number of iterations)",
    RESULTS.ode_failed: "the ODE solver failed (step size underflow or an internal error)",
    RESULTS.invalid_hyperparameter: "a hyperparameter passed as a traced value was out of range "
                                    "(NaN, inf, or not positive; see the values reached)",
    RESULTS.invalid_input: "an input was out of range (see the values reached)",
}

# A fixed-iteration stage (tol=0) "diverged" when its residual grew by more than this factor.
DIVERGENCE_FACTOR = 1e4


class SolverError(RuntimeError):
  """A metajax solver (or the train step) failed; the message names the stage and the values.

  Under ``jit`` it reaches the caller wrapped in a ``jax.errors.JaxRuntimeError`` whose text
  ends with this message.
  """


class _DropSolverErrors(logging.Filter):
  """JAX logs every exception raised in a callback; ours are re-raised to the caller anyway."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, SolverError)


logging.getLogger("jax._src.callback").addFilter(_DropSolverErrors())


class AdaptInfo(NamedTuple):
  """What one adaptation did; the same fields for every solver.

  Diagnostics are not differentiable: differentiating any field in reverse mode raises.

  Attributes:
    result: a [`RESULTS`][metajax.solvers.RESULTS] code (int32; per task under ``vmap``).
    steps: inner iterations run (unrolled, implicit) or ODE steps taken (adjoint).
    residual: the norm of the inner objective's gradient at the adapted parameters
      (the support loss's for unrolled; the proximal objective's for implicit;
      the gradient-flow vector field's for adjoint).
    loss: the support loss at the adapted parameters.
    stats: solver-specific extras (see each solver's docstring).
  """

  result: jax.Array
  steps: jax.Array
  residual: jax.Array
  loss: jax.Array
  stats: dict

  @property
  def success(self) -> jax.Array:
    """``result == RESULTS.successful`` (an array; per task under ``vmap``)."""
    return self.result == RESULTS.successful

  def messages(self) -> list[str]:
    """Human-readable status of each task (concrete values only)."""
    return [RESULTS(int(code)).message for code in np.ravel(np.asarray(self.result))]


def nondifferentiable(info):
  """Marks the float fields of ``info`` so that reverse-mode differentiation through them raises."""
  msg = ("metajax solver diagnostics (AdaptInfo / LinearSolveInfo) are not differentiable; "
         "differentiate the adapted parameters instead.")
  def mark(x):
    if isinstance(x, jax.Array | jax.core.Tracer) and jnp.issubdtype(x.dtype, jnp.inexact):
      return eqxi.nondifferentiable_backward(x, msg=msg)
    return x
  return jax.tree.map(mark, info)


def all_finite(tree) -> jax.Array:
  """Whether every inexact leaf of ``tree`` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def fixed_iteration_result(finite, residual, initial_residual) -> jax.Array:
  """The status of a stage that ran a fixed number of iterations (``tol=0``)."""
  diverged = residual > DIVERGENCE_FACTOR * jnp.maximum(
      initial_residual, jnp.finfo(jnp.asarray(residual).dtype).tiny)
  return jnp.where(~finite, RESULTS.nonfinite,
                   jnp.where(diverged, RESULTS.diverged, RESULTS.successful)).astype(jnp.int32)


# -------------------------------------------------------------------------------------------
# Context for messages: values of enclosing scopes (the meta-iteration) that a failure names.

_CONTEXT: list[dict] = []


@contextlib.contextmanager
def context(**values):
  """Adds traced ``values`` (e.g. ``meta_iteration=state.step``) to every failure message
  raised by a solver traced inside this block."""
  _CONTEXT.append(values)
  try:
    yield
  finally:
    _CONTEXT.pop()


def _context_values() -> dict:
  merged = {}
  for values in _CONTEXT:
    merged.update(values)
  return merged


def _fmt(value) -> str:
  value = np.asarray(value)
  if value.dtype.kind in "iub":
    return str(int(value))
  return f"{float(value):.4g}"


THROW_HINT = "(throw=False returns the status in AdaptInfo.result instead of raising.)"


def _format(header: str, codes, values: dict, context_values: dict,
            messages: dict | None = None, hint: str = THROW_HINT) -> str:
  codes = np.asarray(codes)
  failing = np.argwhere(codes != 0)
  first = tuple(failing[0]) if failing.size else ()
  code = RESULTS(int(codes[first])) if codes.ndim else RESULTS(int(codes))
  where = ""
  if codes.ndim:  # batched (vmap over tasks): name the first failing task and how many failed
    index = first[0] if len(first) == 1 else first
    where = f" (task {index}; {len(failing)} of {codes.size} tasks failed)"
  parts = [f"{name}={_fmt(np.asarray(v)[first] if np.ndim(v) else v)}"
           for name, v in values.items()]
  ctx = [f"{name} {_fmt(np.ravel(np.asarray(v))[0])}" for name, v in context_values.items()]
  at = f" at {', '.join(ctx)}" if ctx else ""
  message = (messages or {}).get(code, code.message)
  return f"{header}{where}{at}: {message}. Reached: {', '.join(parts)}. {hint}"


def error_if(x, result, header: str, messages: dict | None = None, hint: str = THROW_HINT,
             **values):
  """Returns ``x``; raises at run time where ``result`` (an int code, maybe batched) is not 0.

  ``header`` names the solver and stage, e.g. ``"metajax unrolled solver, inner stage"``;
  ``values`` (scalars per task) are reported at the first failing task; ``messages`` replaces
  the text of some codes (a stage whose advice differs from the generic one); ``hint`` ends the
  message (by default: how ``throw=False`` returns the status instead). Works eagerly and
  under ``jit``, ``vmap``, ``grad`` and ``jvp`` (``x``'s tangent passes through unchanged);
  nothing reaches the host unless something failed.
  """
  if not any(isinstance(v, jax.core.Tracer)
             for v in jax.tree.leaves((x, result, values, _context_values()))):
    if np.any(np.asarray(result) != 0):  # eager: a plain Python exception
      raise SolverError(_format(header, np.asarray(result), values, _context_values(),
                                messages, hint))
    return x
  result = jnp.asarray(result, jnp.int32)
  names, ctx_names = list(values), list(_context_values())  # dicts would be flattened sorted
  values = tuple(jax.lax.stop_gradient(jnp.asarray(v)) for v in values.values())
  context_values = tuple(jax.lax.stop_gradient(jnp.asarray(v))
                         for v in _context_values().values())

  @jax.custom_jvp
  def check(x, result, values, context_values):
    failed = eqxi.unvmap_any(result != 0)

    def fail():
      def raise_error(result, values, context_values):
        raise SolverError(_format(header, result, dict(zip(names, values)),
                                  dict(zip(ctx_names, context_values)), messages, hint))
      out = jax.pure_callback(raise_error, jax.ShapeDtypeStruct(result.shape, result.dtype),
                              result, values, context_values, vmap_method="broadcast_all")
      return vary(out, varying_axes(result))  # inside shard_map: typed like the other branch

    # Only the scalars enter the branch (a branch carrying x measured ~5% slower on the MAML
    # step); x is tied to the check by adding 0 * token, so the check runs wherever x is used.
    token = jax.lax.cond(failed, fail, lambda: result)
    def tie(leaf):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        return leaf
      return leaf + jnp.zeros((), leaf.dtype) * token.astype(leaf.dtype)
    return jax.tree.map(tie, x)

  @check.defjvp
  def check_jvp(primals, tangents):
    return check(*primals), tangents[0]

  return check(x, result, values, context_values)
