"""The implicit solver: iMAML's proximal inner problem, differentiated by the IFT."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from metajax.solvers import _common, _vma, inner_optimizers, linear_solvers
from metajax.solvers._result import (
  RESULTS,
  AdaptInfo,
  error_if,
  fixed_iteration_result,
  nondifferentiable,
)
from metajax.solvers.base import InnerSolver

PyTree = Any
# The default linear solve: a fixed budget of CG iterations, iMAML's 5 (see implicit's docstring).
DEFAULT_CG_STEPS = 5


class LinearSolveInfo(NamedTuple):
  """Diagnostics of the linear solve ``(I + H / reg) g = v`` of the implicit gradient.

  Attributes:
    result: a [`RESULTS`][metajax.solvers.RESULTS] code: ``successful``, ``linear_solve_failed``
      (tolerance missed), ``diverged`` (a fixed-iteration solve, ``tol=0``, whose residual
      grew past 1e4 times ``||v||``) or ``nonfinite``.
    residual: ``||(I + H/reg) g - v|| / ||v||`` reached.
    maxiter: the linear solver's iteration cap (``-1``: its default).
  """

  result: jax.Array
  residual: jax.Array
  maxiter: int

  @property
  def success(self) -> jax.Array:
    return self.result == RESULTS.successful


def _linear_result(solver: linear_solvers.LinearSolver, rel, finite, dtype) -> jax.Array:
  tol = solver.resolved_tol_for(dtype)
  if tol > 0:
    met = rel <= 10 * tol
    return jnp.where(~finite, RESULTS.nonfinite, jnp.where(
        met, RESULTS.successful, RESULTS.linear_solve_failed)).astype(jnp.int32)
  return fixed_iteration_result(finite, rel, jnp.ones((), rel.dtype))


class Implicit(InnerSolver):
  """The proximal inner problem solved to tolerance, differentiated implicitly (see
  [`implicit`][metajax.solvers.implicit])."""

  name = "implicit"
  hyperparameters = ("reg",)

  def __init__(self, loss_fn, *, reg, optimizer, max_steps, tol, linear_solver, throw):
    super().__init__(loss_fn, throw=throw)
    _common.check_hyperparameter("reg", reg, strict=True)
    self.reg = reg
    self.optimizer = inner_optimizers.as_inner_optimizer(
        inner_optimizers.barzilai_borwein() if optimizer is None else optimizer)
    self.max_steps = _common.check_positive_int("max_steps", max_steps)
    _common.check_tolerance("tol", tol)
    self.tol = tol
    self.linear_solver = (linear_solvers.cg(maxiter=DEFAULT_CG_STEPS, tol=0.0)
                          if linear_solver is None else linear_solver)
    if not isinstance(self.linear_solver, linear_solvers.LinearSolver):
      raise TypeError("linear_solver must be a metajax.solvers.linear_solvers solver "
                      f"(cg(), gmres(), neumann(), ...), got {self.linear_solver!r}.")
    self._minimize = inner_optimizers.minimize(self.optimizer, steps=max_steps, tol=tol)

  def _bind_loss(self):
    self._grad = jax.grad(self.loss_fn)

  # -- pieces -------------------------------------------------------------------------------
  def _reg(self, params, reg):
    if reg is None:
      reg = self.reg
    else:
      _common.check_hyperparameter("reg", reg, strict=True)
    return _common.as_scalar("reg", reg, _common.params_dtype(params))

  def _optimality(self, theta, support, reg):
    """``F(phi) = grad L(phi) / reg + (phi - theta)``: zero at the solution, Jacobian I + H/reg.

    Written ``grad L / r + (phi - theta) * reg / r`` with ``r = stop_gradient(reg)`` (the same
    values: ``reg / r`` is exactly 1), so that ``dF/dreg = (phi - theta) / reg``, the derivative
    of iMAML's own condition ``grad L + reg (phi - theta)`` (TorchOpt's). At the solution it
    equals ``-grad L / reg^2``; at a point an inexact solve reached, its error is the solve's
    error ``e = phi - phi*`` instead of ``H e / reg``: a learned ``reg``'s gradient is closer
    for ``reg`` below the curvature, where iMAML runs.
    """
    fixed = jax.lax.stop_gradient(reg)
    return lambda phi: _common.tree_axpy(
        1.0 / fixed, self._grad(phi, support),
        jax.tree.map(lambda d: d * (reg / fixed).astype(d.dtype), _common.tree_sub(phi, theta)))

  def _linear_solve(self, damped, b):
    """Solves ``damped(x) = b`` (the operator with the solver's ridge added);
    returns ``(x, LinearSolveInfo)``."""
    solver = self.linear_solver
    x = solver.method(damped, b, maxiter=solver.maxiter, tol=solver.resolved_tol(b))
    residual = _common.tree_norm(_common.tree_sub(damped(x), b))
    norm_b = _common.tree_norm(b)
    rel = residual / jnp.maximum(norm_b, jnp.finfo(residual.dtype).tiny)
    rel = jnp.where(norm_b == 0, residual, rel)
    finite = jnp.isfinite(rel)
    result = _linear_result(solver, rel, finite, _common.params_dtype(b, "cotangent"))
    return x, LinearSolveInfo(result, rel, -1 if solver.maxiter is None else solver.maxiter)

  def _tangent_solve(self, g, y):
    """The IFT's linear solve, transposable (reverse mode) through ``custom_linear_solve``."""
    def solve(matvec, b):
      x, info = self._linear_solve(matvec, b)
      if self.throw:
        x = error_if(x, info.result, "metajax implicit solver, linear-solve stage "
                     "((I + H/reg) g = v of the implicit gradient)",
                     relative_residual=info.residual)
      return x
    return jax.lax.custom_linear_solve(self.linear_solver.damped(g), y, solve, symmetric=True)

  # -- the solve ----------------------------------------------------------------------------
  def _solve(self, params, support, *, reg=None):
    _common.check_one_dtype(params, "implicit")
    if self.optimizer.name in ("lbfgs", "newton_cg"):
      _vma.refuse_varying(support, "implicit", f"the {self.optimizer.name} inner optimizer "
                          "(its line search)", gd_works=True)
    reg_ = self._reg(params, reg)
    hyper_result = (_common.hyperparameter_result(reg_) if _common.is_traced(reg_)
                    else jnp.zeros((), jnp.int32))
    safe_reg = jnp.where(hyper_result == 0, reg_, jnp.ones_like(reg_))

    def forward(_, theta0):
      theta_, support_, reg__ = jax.lax.stop_gradient((params, support, safe_reg))
      dtype = _common.params_dtype(theta_)
      def objective(phi):  # in the parameters' dtype, whatever the loss closes over (the line
        # search needs one dtype)
        value = self.loss_fn(phi, support_) + _common.proximal_term(phi, theta_, reg__)
        return value.astype(dtype)
      out = self._minimize(objective, jax.lax.stop_gradient(theta0), 1.0 / reg__)
      result = jnp.where(hyper_result != 0, hyper_result, out.result).astype(jnp.int32)
      phi = out.x
      if self.throw:
        phi = error_if(phi, result, "metajax implicit solver, inner stage (proximal problem)",
                       iterations=out.iterations, residual=out.residual,
                       relative_residual=out.residual / jnp.maximum(
                           out.initial_residual, jnp.finfo(out.residual.dtype).tiny),
                       reg=reg_)
      # custom_root gives integer aux outputs integer tangents (not float0): carry them as
      # floats through it and cast back below.
      info = AdaptInfo(result=result.astype(out.residual.dtype),
                       steps=out.iterations.astype(out.residual.dtype), residual=out.residual,
                       loss=out.value, stats={"initial_residual": out.initial_residual})
      return phi, info

    optimality = self._optimality(params, support, safe_reg)
    phi, info = jax.lax.custom_root(optimality, params, forward, self._tangent_solve,
                                    has_aux=True)
    # The residual and loss are recomputed from phi (dead code unless used), so that they
    # depend on the inputs and differentiating them raises (custom_root's aux would be 0).
    return phi, info._replace(result=info.result.astype(jnp.int32),
                              steps=info.steps.astype(jnp.int32),
                              residual=safe_reg * _common.tree_norm(optimality(phi)),
                              loss=self.loss_fn(phi, support))

  def linear_solve_info(self, params, support, cotangent, *, reg=None) -> LinearSolveInfo:
    """Runs the inner solve and the backward linear solve for ``cotangent``; reports the latter.

    Examples:
      >>> import jax.numpy as jnp, metajax
      >>> loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
      >>> adapt = metajax.solvers.implicit(loss, reg=1.0)
      >>> info = adapt.linear_solve_info(jnp.zeros(2), jnp.ones(2), jnp.ones(2))
      >>> bool(info.success)
      True
    """
    self._check_inputs(params, support)
    reg_ = self._reg(params, reg)
    phi, _ = self.solve(params, support, reg=reg_)
    f = self._optimality(params, support, reg_)
    matvec = lambda u: jax.jvp(f, (phi,), (u,))[1]
    return nondifferentiable(
        self._linear_solve(self.linear_solver.damped(matvec), cotangent)[1])


def implicit(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    reg: Any,
    optimizer: inner_optimizers.InnerOptimizer | Any = None,
    max_steps: int = 20,
    tol: float | None = 0.0,
    linear_solver: linear_solvers.LinearSolver | None = None,
    throw: bool = True,
) -> Implicit:
  """Proximal inner problem solved to tolerance, differentiated implicitly (iMAML).

  The inner problem is ``argmin_phi loss_fn(phi, support) + reg/2 ||phi - theta||^2``
  started from ``theta``. Its derivative follows from the optimality condition
  ``F(phi) = grad L(phi)/reg + phi - theta = 0`` (``jax.lax.custom_root``): a linear solve
  with ``I + H/reg`` (``H`` the support-loss Hessian at the solution) by Hessian-vector
  products. No gradient flows through the inner iterations, so memory does not grow with
  their number.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set. It may close over
      traced values (a learned loss weight, features computed from meta-parameters,
      per-task values under ``vmap``): they receive their implicit gradients.
    reg: proximal strength (finite, > 0). May also be passed at call time, possibly
      traced; it then receives its meta-gradient (traced values are checked at run time;
      keep a learned ``reg`` positive with ``meta_objective(..., learn={"reg": "log"})``).
    optimizer: the inner optimizer:
      [`inner_optimizers.barzilai_borwein`][metajax.solvers.inner_optimizers.barzilai_borwein]
      (default: gradient descent with scale-free secant step sizes, one gradient per
      iteration, no line search),
      [`inner_optimizers.lbfgs`][metajax.solvers.inner_optimizers.lbfgs] (quasi-Newton with a
      zoom line search: a closer solve of ill-conditioned problems at ~10x the cost),
      [`inner_optimizers.gd`][metajax.solvers.inner_optimizers.gd] (iMAML-GD),
      [`inner_optimizers.newton_cg`][metajax.solvers.inner_optimizers.newton_cg]
      (iMAML-HF), or any optax ``GradientTransformation``.
    max_steps: inner iterations (static): the budget with ``tol=0``, the cap otherwise.
    tol: ``0`` (default): run exactly ``max_steps`` iterations, iMAML's fixed-budget
      setting; the status is ``successful`` unless the run became non-finite or its
      stationarity residual grew 1e4-fold (``diverged``), and ``AdaptInfo.residual`` says how
      stationary the answer is. ``tol > 0``: stop when the residual is at most ``tol`` times
      its value at ``theta``; missing it within ``max_steps`` is an error
      (``max_steps_reached``). ``None``: that, with 1e-10 (float64) or 2e-2 (float32).
      Why a budget by default: on ReLU networks the proximal problem's minimizers sit on
      kinks, where the gradient never vanishes (sinusoid MLP of ``make_mlp``, float64: L-BFGS
      reached a 1e-6 relative residual on 0 of 300 tasks in 300 iterations), so any
      tolerance fails on some tasks of a long run.
    linear_solver: a [`linear_solvers`][metajax.solvers.linear_solvers] solver for the implicit
      gradient; default ``cg(maxiter=5, tol=0)``, iMAML's 5 CG steps (a fixed budget:
      ``I + H/reg`` is indefinite where a ReLU net's Hessian has eigenvalues below ``-reg``,
      and an exact ``cg()`` then missed its tolerance on 72 of 500 sinusoid tasks). It solves
      systems of up to 5 parameters exactly. ``cg()`` solves to 1e-10 (float64) / 1e-6
      (float32); ``cg(ridge=r)`` damps the system (biased). iMAML's official code solves
      ``2 v + H v / (reg + 10)``: ``ridge = 2 (reg + 10) / reg - 1`` up to scale (11 at reg=2).
    throw: raise (a ``JaxRuntimeError`` under ``jit``) naming the stage, the task and the
      residual reached when the inner solve or the linear solve fails, or a NaN appears;
      ``False`` reports it in ``AdaptInfo.result`` instead.

  Returns:
    An [`InnerSolver`][metajax.solvers.InnerSolver]: ``adapt(params, support, *, reg=None)``;
    ``adapt.solve(...)`` returns ``(phi, AdaptInfo)`` with
    ``stats={"initial_residual": ...}``; ``adapt.linear_solve_info(params, support,
    cotangent)`` reports the backward linear solve.

  The defaults (20 Barzilai-Borwein iterations, 5 CG iterations) are chosen for cost: on the
  sinusoid MLP (1-40-40-1 ReLU, 25 tasks, ``reg=2``, 2-core CPU) a meta-gradient costs 2.3x
  MAML's (5 steps) and compiles in 1.6x its time, against 12.8x and 3.1x for 20 L-BFGS
  iterations with 10 CG; the query loss after adaptation is 4.13 (L-BFGS: 3.56, the exact
  proximal solution: 3.40, MAML: 4.42;
  ``experiments/benchmarks/solver_defaults.md``). On linear regression the defaults give the
  closed form to 1e-12. For a closer solve of an ill-conditioned problem raise ``max_steps``
  or pass ``optimizer=inner_optimizers.lbfgs()``.

  Supports ``jit``, ``vmap``, ``grad``, ``jvp``/``jacfwd``, ``grad`` of ``grad``,
  ``hessian`` and closures over traced values (implicit rule through ``custom_root``).
  With a tolerance (``tol > 0``, ``linear_solver=cg()``) a missed tolerance raises: damp
  the system (``linear_solvers.cg(ridge=...)``) or go back to a fixed budget.

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
    >>> adapt = metajax.solvers.implicit(loss, reg=1.0)
    >>> phi = adapt(jnp.zeros(2), jnp.ones(2))  # (b + reg * theta) / (1 + reg)
    >>> [round(float(v), 6) for v in phi]
    [0.5, 0.5]
  """
  return Implicit(loss_fn, reg=reg, optimizer=optimizer, max_steps=max_steps, tol=tol,
                  linear_solver=linear_solver, throw=throw)
