"""The implicit solver: iMAML's proximal inner problem, differentiated by the IFT."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.solvers import _common, linear_solvers
from metajax.solvers.inner_optimizers import minimize

PyTree = Any


class LinearSolveInfo(NamedTuple):
  """Diagnostics of the backward linear solve ``(I + H / reg) g = v``.

  Attributes:
    residual: ``||(I + H/reg) g - v|| / ||v||`` reached.
    maxiter: the linear solver's iteration cap (``-1``: its default).
    converged: whether the residual met the solver's tolerance (always True
      for a fixed iteration count, ``tol=0``).
  """

  residual: jax.Array
  maxiter: int
  converged: jax.Array


def _float_mask(tree):
  return jax.tree.map(lambda x: jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact), tree)


def implicit(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    reg: Any,
    inner: str | optax.GradientTransformation = "lbfgs",
    inner_steps: int = 500,
    inner_tol: float | None = None,
    inner_step_size: float | None = None,
    newton_cg_steps: int = 20,
    linear_solver: linear_solvers.LinearSolver | Callable | None = None,
    throw: bool = False,
):
  """Proximal inner problem solved to tolerance, differentiated implicitly (iMAML).

  The inner problem is ``argmin_phi loss_fn(phi, support) + reg/2 ||phi - theta||^2``
  started from ``theta``. Its meta-gradient solves ``(I + H/reg) g = v`` with
  Hessian-vector products (``H`` the support-loss Hessian at the solution,
  ``v`` the incoming cotangent); no gradient flows through the inner
  iterations, so memory does not grow with their number.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set.
    reg: proximal strength (> 0). May also be passed at call time, possibly
      traced; it then receives its meta-gradient.
    inner: the inner optimizer: ``"lbfgs"`` (default, ``optax.lbfgs`` with a
      zoom line search), ``"gd"`` (iMAML-GD, needs ``inner_step_size``),
      ``"newton_cg"`` (iMAML-HF: Newton steps with ``newton_cg_steps`` CG
      iterations and a backtracking line search), or any optax optimizer.
    inner_steps: iteration cap of the inner solve (static).
    inner_tol: stop when the stationarity residual is at most ``inner_tol``
      times its value at ``theta``. ``None``: 1e-10 (float64) or 1e-5
      (float32); ``0``: always run ``inner_steps`` iterations.
    inner_step_size: step size for ``inner="gd"``.
    newton_cg_steps: CG iterations per Newton step for ``inner="newton_cg"``.
    linear_solver: ``solve(matvec, b)`` for the backward pass; default
      :func:`linear_solvers.cg`. iMAML's setting is ``linear_solvers.cg(maxiter=5, tol=0)``
      (its official code also damps the system: ``ridge=1.0``).
    throw: raise a ``RuntimeError`` (a ``JaxRuntimeError`` under ``jit``)
      naming the stage and the residual reached when the inner solve or the
      linear solve misses its tolerance.

  Returns:
    ``adapt(params, support, *, reg=None, return_info=False)``; with
    ``return_info`` it returns ``(phi, ImplicitInfo)``. ``adapt.linear_solve_info(
    params, support, cotangent)`` reports the backward solve for a cotangent.

  Example:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
    >>> adapt = metajax.solvers.implicit(loss, reg=1.0)
    >>> phi = adapt(jnp.zeros(2), jnp.ones(2))  # (b + reg * theta) / (1 + reg)
    >>> [round(float(v), 6) for v in phi]
    [0.5, 0.5]
  """
  _common.check_callable("loss_fn", loss_fn)
  _common.check_nonnegative_float("reg", reg, strict=True)
  _common.check_positive_int("inner_steps", inner_steps)
  if linear_solver is None:
    linear_solver = linear_solvers.cg()
  _common.check_callable("linear_solver", linear_solver)
  default_reg = reg
  grad_fn = jax.grad(loss_fn)
  solve_inner = minimize(inner, steps=inner_steps, tol=inner_tol, step_size=inner_step_size,
                         newton_cg_steps=newton_cg_steps)

  def proximal(theta, support, reg_):
    def objective(phi):
      diff = _common.tree_sub(phi, theta)
      return loss_fn(phi, support) + 0.5 * reg_ * _common.tree_vdot(diff, diff)
    return objective

  def optimality(phi, theta, support, reg_):
    """``grad L(phi) / reg + (phi - theta)``: zero at the solution; phi-Jacobian I + H/reg."""
    return _common.tree_axpy(1.0 / reg_, grad_fn(phi, support), _common.tree_sub(phi, theta))

  def forward(theta, support, reg_):
    phi, info = solve_inner(proximal(theta, support, reg_), theta)
    if throw:
      _common.raise_if(~info.converged,
                       "implicit solver, inner stage: no convergence after {iterations} "
                       "iterations; stationarity residual {residual:.3e}",
                       iterations=info.inner_iterations, residual=info.inner_residual)
    return phi, info

  def backward_solve(phi, theta, support, reg_, cotangent):
    matvec = lambda u: jax.jvp(lambda p: optimality(p, theta, support, reg_), (phi,), (u,))[1]
    u = linear_solver(matvec, cotangent)
    solved = linear_solver.damped(matvec) if hasattr(linear_solver, "damped") else matvec
    residual = _common.tree_norm(_common.tree_sub(solved(u), cotangent))
    rel = residual / jnp.maximum(_common.tree_norm(cotangent), jnp.finfo(residual.dtype).tiny)
    tol = linear_solver.resolved_tol(cotangent) if hasattr(linear_solver, "resolved_tol") else 0.0
    converged = rel <= 10 * tol if tol > 0 else jnp.ones((), bool)
    maxiter = getattr(linear_solver, "maxiter", None)
    return u, LinearSolveInfo(rel, -1 if maxiter is None else maxiter, converged)

  @jax.custom_vjp
  def solve(theta, support, reg_):
    return forward(theta, support, reg_)

  def solve_fwd(theta, support, reg_):
    phi, info = forward(theta, support, reg_)
    return (phi, info), (phi, theta, support, reg_)

  def solve_bwd(residuals, cotangents):
    phi, theta, support, reg_ = residuals
    phi_bar, _ = cotangents
    phi_bar = jax.tree.map(
        lambda c, p: jnp.zeros_like(p) if c.dtype == jax.dtypes.float0 else c, phi_bar, phi)
    u, lin = backward_solve(phi, theta, support, reg_, phi_bar)
    if throw:
      _common.raise_if(~lin.converged,
                       "implicit solver, linear-solve stage: relative residual {residual:.3e} "
                       "above tolerance", residual=lin.residual)
    mask = _float_mask(support)
    float_support = jax.tree.map(lambda x, m: x if m else None, support, mask)

    def g(theta_, float_support_, reg__):
      full = jax.tree.map(lambda f, x, m: f if m else x, float_support_, support, mask,
                          is_leaf=lambda x: x is None)
      return optimality(phi, theta_, full, reg__)

    _, vjp = jax.vjp(g, theta, float_support, reg_)
    theta_bar, support_bar, reg_bar = vjp(jax.tree.map(jnp.negative, u))
    support_bar = jax.tree.map(
        lambda b, x, m: b if m else np.zeros(np.shape(x), jax.dtypes.float0),
        support_bar, support, mask, is_leaf=lambda x: x is None)
    return theta_bar, support_bar, reg_bar

  solve.defvjp(solve_fwd, solve_bwd)

  def _reg(params, reg_):
    value = default_reg if reg_ is None else reg_
    _common.check_nonnegative_float("reg", value, strict=True)
    return _common.as_scalar("reg", value, _common.params_dtype(params))

  def adapt(params, support, *, reg=None, return_info=False):
    phi, info = solve(params, support, _reg(params, reg))
    return (phi, info) if return_info else phi

  def linear_solve_info(params, support, cotangent, *, reg=None) -> LinearSolveInfo:
    """Runs the forward solve and the backward linear solve for ``cotangent``."""
    reg_ = _reg(params, reg)
    phi, _ = forward(params, support, reg_)
    return backward_solve(phi, params, support, reg_, cotangent)[1]

  adapt.linear_solve_info = linear_solve_info
  return adapt
