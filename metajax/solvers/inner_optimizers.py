"""Inner optimizers for the implicit solver: run to a tolerance, never differentiated."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax.solvers import _common, _loops, linear_solvers


class ImplicitInfo(NamedTuple):
  """Diagnostics of the forward (inner) solve.

  Attributes:
    inner_residual: ``||grad_phi [L(phi) + reg/2 ||phi - theta||^2]||`` reached.
    inner_iterations: iterations run.
    converged: whether the residual met the tolerance.
  """

  inner_residual: jax.Array
  inner_iterations: jax.Array
  converged: jax.Array


INNER_CHOICES = ("lbfgs", "gd", "newton_cg")


def _newton_cg_step(objective, phi, value, grad, cg_steps):
  """One Hessian-free Newton step with a backtracking (Armijo) line search."""
  hvp = lambda v: jax.jvp(jax.grad(objective), (phi,), (v,))[1]
  direction = linear_solvers.cg(maxiter=cg_steps, tol=0.0)(hvp, grad)
  slope = _common.tree_vdot(grad, direction)
  # Not a descent direction (indefinite Hessian): fall back to the gradient.
  direction = jax.lax.cond(slope > 0, lambda: direction, lambda: grad)
  slope = jnp.maximum(slope, _common.tree_vdot(grad, grad) * (slope <= 0))

  def trial(t):
    return _common.tree_axpy(-t, direction, phi)

  def not_enough(carry):
    t, i = carry
    return (objective(trial(t)) > value - 1e-4 * t * slope) & (i < 30)

  t, _ = jax.lax.while_loop(not_enough, lambda c: (0.5 * c[0], c[1] + 1),
                            (jnp.ones((), slope.dtype), 0))
  return trial(t)


def minimize(inner, *, steps: int, tol: float | None, step_size: float | None,
             newton_cg_steps: int, unroll: bool | str = "auto") -> Callable:
  """Builds ``solve(objective, x0) -> (x, ImplicitInfo)`` for the chosen inner optimizer.

  Stops after ``steps`` iterations or when ``||grad|| <= tol * ||grad(x0)||``.
  With ``tol=0`` (a fixed iteration count) the loop may be unrolled
  (``unroll=True``, or ``"auto"`` for convolutions on CPU, where XLA runs
  convolutions in rolled loops ~20x slower); no gradient flows through it, so
  unrolling costs compile time, not memory.
  """
  if isinstance(inner, str):
    if inner not in INNER_CHOICES:
      raise ValueError(f"inner must be one of {INNER_CHOICES} or an optax optimizer, "
                       f"got {inner!r}.")
    if inner == "gd" and step_size is None:
      raise ValueError("inner='gd' needs inner_step_size (iMAML-GD uses 0.1).")
    if inner != "gd" and step_size is not None:
      raise ValueError(f"inner_step_size is only used by inner='gd', not inner={inner!r}.")
  elif not hasattr(inner, "update"):
    raise TypeError(f"inner must be a string or an optax GradientTransformation, got {inner!r}.")
  if tol is not None and (not isinstance(tol, (int, float)) or tol < 0):
    raise ValueError(f"inner_tol must be a float >= 0 or None, got {tol!r}.")
  _common.check_positive_int("newton_cg_steps", newton_cg_steps)
  optimizer = {"lbfgs": optax.lbfgs(), "gd": optax.sgd(step_size) if step_size else None}.get(
      inner) if isinstance(inner, str) else inner
  extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

  def solve(objective, x0):
    dtype = _common.params_dtype(x0)
    rtol = tol if tol is not None else _common.default_tol(dtype, float64=1e-10, float32=1e-5)
    value_and_grad = jax.value_and_grad(objective)
    value0, grad0 = value_and_grad(x0)
    threshold = rtol * _common.tree_norm(grad0)
    state0 = None if optimizer is None else optimizer.init(x0)

    def cond(carry):
      i, _, _, _, grad, _ = carry
      return (i < steps) & (_common.tree_norm(grad) > threshold)

    def body(carry):
      i, x, state, value, grad, _ = carry
      if optimizer is None:  # newton_cg
        x = _newton_cg_step(objective, x, value, grad, newton_cg_steps)
      else:
        kwargs = dict(value=value, grad=grad, value_fn=objective) if extra_args else {}
        updates, state = optimizer.update(grad, state, x, **kwargs)
        x = optax.apply_updates(x, updates)
      value, grad = value_and_grad(x)
      return i + 1, x, state, value, grad, value

    init = (jnp.zeros((), jnp.int32), x0, state0, value0, grad0, value0)
    fixed = tol == 0
    if fixed and unroll == "auto":
      unrolled_loop = jax.default_backend() == "cpu" and _loops.uses_convolution(
          lambda p, _: objective(p), x0, None)
    else:
      unrolled_loop = fixed and unroll is True
    if unrolled_loop:
      carry = init
      for _ in range(steps):
        carry = body(carry)
      iterations, x, _, _, grad, _ = carry
    else:
      iterations, x, _, _, grad, _ = jax.lax.while_loop(cond, body, init)
    residual = _common.tree_norm(grad)
    return x, ImplicitInfo(residual, iterations, residual <= threshold)

  return solve
