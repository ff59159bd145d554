"""The adjoint solver: the inner loop as the gradient-flow ODE, integrated by diffrax (A-MAML)."""

from __future__ import annotations

import math
from typing import Any, Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from metajax.solvers import _common, _vma
from metajax.solvers._result import RESULTS, AdaptInfo, all_finite, error_if
from metajax.solvers.base import InnerSolver

PyTree = Any
ADJOINT_CHOICES = ("checkpoint", "backsolve")
DEFAULT_MAX_STEPS = 4096  # the cap of adaptive (or call-time t1) solves
class _DefaultSteps(int):
  """The default ``steps``: an ``int`` (10) that an explicit ``steps=10`` is not (``is``)."""


# the default fixed grid: this many equal Euler steps over [0, t1]
DEFAULT_STEPS = _DefaultSteps(10)
# Solves capped at this many steps store every step for the backward pass instead of
# recomputing from recursive checkpoints: Euler, 10 steps, sinusoid MLP, 25 tasks (2-core
# CPU): 4.4 -> 2.8 ms per meta-gradient, compile 2.9 -> 2.0 s; memory 16 states at most.
STORED_STEPS = 16
# A fixed grid "diverged" when F = L + reg/2 |phi - theta|^2 ended more than this many times |F|
# above its start (the flow only decreases F; see _common.LOSS_RISE).
GRID_RISE = _common.LOSS_RISE
GRID_MESSAGES = {
    RESULTS.diverged: "the grid diverged: the objective L + reg/2 |phi - theta|^2, which the "
                      f"flow only decreases, rose more than {GRID_RISE:g}-fold (objective_start "
                      "to objective_end), so the step t1/steps is past the flow's stability limit "
                      "(raise steps=, shorten t1, or pass steps=None for the adaptive solve)",
    RESULTS.nonfinite: "a non-finite value (NaN or inf) appeared (check the support data and "
                       "the loss; a step t1/steps past the flow's stability limit also does "
                       "this: raise steps= or pass steps=None for the adaptive solve)",
}


def _adjoint_method(adjoint, solver, controller, cap=None) -> diffrax.AbstractAdjoint:
  if isinstance(adjoint, diffrax.AbstractAdjoint):
    return adjoint
  if adjoint == "checkpoint":
    stored = cap is not None and cap <= STORED_STEPS
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=cap if stored else None)
  if adjoint == "backsolve":
    return diffrax.BacksolveAdjoint(solver=solver, stepsize_controller=controller)
  raise ValueError(f"adjoint must be one of {ADJOINT_CHOICES} or a diffrax.AbstractAdjoint, "
                   f"got {adjoint!r}.")


def _in_normalized_time(controller, t1):
  """``controller`` with its time-valued settings divided by ``t1``.

  The solve runs in normalized time ``s = t / t1`` on ``[0, 1]``; users give times in real
  units (``dtmax``, ``dtmin``, ``step_ts``, ``jump_ts``, ``StepTo.ts``).
  """
  scale = lambda v: None if v is None else jax.lax.stop_gradient(jnp.asarray(v) / t1)
  if isinstance(controller, diffrax.PIDController):
    return eqx.tree_at(lambda c: (c.dtmin, c.dtmax), controller,
                       (scale(controller.dtmin), scale(controller.dtmax)),
                       is_leaf=lambda x: x is None)
  if isinstance(controller, diffrax.ClipStepSizeController):
    inner = _in_normalized_time(controller.controller, t1)
    return eqx.tree_at(lambda c: (c.controller, c.step_ts, c.jump_ts), controller,
                       (inner, scale(controller.step_ts), scale(controller.jump_ts)),
                       is_leaf=lambda x: x is None)
  if isinstance(controller, diffrax.StepTo):
    return diffrax.StepTo(ts=scale(controller.ts))
  return controller


def _check_step_to(controller, t1) -> None:
  """``StepTo.ts`` must run from 0 to ``t1`` (real time), checked where both are concrete."""
  if not isinstance(controller, diffrax.StepTo) or _common.is_traced((controller.ts, t1)):
    return
  ts, end = np.asarray(controller.ts, np.float64), float(np.asarray(t1))
  if ts.ndim != 1 or ts.size < 2 or np.any(np.diff(ts) <= 0):
    raise ValueError(f"stepsize_controller=StepTo(ts=...) needs increasing times, got {ts}.")
  if ts[0] != 0 or not np.isclose(ts[-1], end, rtol=1e-6, atol=0):
    raise ValueError(f"stepsize_controller=StepTo(ts=...) must step from 0 to t1={end:g} (the "
                     f"flow runs on [0, t1], in real time): its ts run from {ts[0]:g} to "
                     f"{ts[-1]:g}.")


class Adjoint(InnerSolver):
  """Gradient flow integrated by diffrax, differentiated by an adjoint (see
  [`adjoint`][metajax.solvers.adjoint])."""

  name = "adjoint"
  hyperparameters = ("t1", "reg")

  def __init__(self, loss_fn, *, t1, reg, steps, solver, dt0, stepsize_controller, rtol, atol,
               max_steps, adjoint, throw):
    super().__init__(loss_fn, throw=throw)
    _common.check_hyperparameter("t1", t1, strict=True)
    _common.check_hyperparameter("reg", reg, strict=False)
    self.max_steps = (None if max_steps is None
                      else _common.check_positive_int("max_steps", max_steps))
    self.steps = None if steps is None else _common.check_positive_int("steps", steps)
    chosen = [name for name, value in (("stepsize_controller", stepsize_controller),
                                       ("rtol", rtol), ("atol", atol), ("dt0", dt0))
              if value is not None]
    if self.steps is not None and steps is not DEFAULT_STEPS and chosen:
      verb = "chooses" if len(chosen) == 1 else "choose"
      raise ValueError(f"steps={self.steps} sets the default fixed grid, but {', '.join(chosen)} "
                       f"{verb} the steps instead; pass one or the other.")
    # The default grid: no step-size control asked for (no controller, rtol, atol or dt0).
    self.grid = self.steps is not None and not chosen
    if self.grid and self.max_steps is not None and self.max_steps < self.steps:
      raise ValueError(f"max_steps={self.max_steps} is below steps={self.steps}: the fixed grid "
                       "takes exactly steps steps; lower steps, or pass steps=None to cap an "
                       "adaptive solve.")
    # dt0 alone: constant steps of dt0, as diffrax's default controller takes them (an adaptive
    # solve is asked for with rtol/atol, a controller, or steps=None).
    dt0_steps = chosen == ["dt0"] and self.steps is not None
    if dt0_steps:
      stepsize_controller = diffrax.ConstantStepSize()
    if solver is None:
      solver = diffrax.Euler() if self.grid or dt0_steps else diffrax.Tsit5()
    self.solver = solver
    if not isinstance(self.solver, diffrax.AbstractSolver):
      raise TypeError(f"solver must be a diffrax solver (e.g. diffrax.Tsit5()), got {solver!r}.")
    if stepsize_controller is not None and not isinstance(
        stepsize_controller, diffrax.AbstractStepSizeController):
      raise TypeError("stepsize_controller must be a diffrax step-size controller, got "
                      f"{stepsize_controller!r}.")
    if isinstance(stepsize_controller, diffrax.ConstantStepSize) and dt0 is None:
      raise ValueError("dt0 is required with a constant step size (e.g. dt0=step_size).")
    if dt0 is not None:
      _common.check_hyperparameter("dt0", dt0, strict=True)
    if stepsize_controller is not None and (rtol is not None or atol is not None):
      raise ValueError("rtol/atol configure the default controller; set them inside "
                       "stepsize_controller instead.")
    _common.check_tolerance("rtol", rtol)
    _common.check_tolerance("atol", atol)
    _adjoint_method(adjoint, self.solver, stepsize_controller)  # validates early
    _check_step_to(stepsize_controller, t1)
    fixed = self.grid or isinstance(stepsize_controller, (diffrax.ConstantStepSize,
                                                          diffrax.StepTo))
    if fixed and isinstance(self.solver, diffrax.AbstractImplicitSolver):
      root = getattr(self.solver, "root_finder", None)
      tols = [getattr(root, name, None) for name in ("rtol", "atol")]
      if not all(isinstance(tol, (int, float)) for tol in tols):  # diffrax refuses this
        where = ("the default fixed grid" if self.grid
                 else f"stepsize_controller={type(stepsize_controller).__name__}")
        raise ValueError(
            f"solver={type(self.solver).__name__}() is implicit: its root finder takes its "
            f"tolerances from an adaptive controller, and {where} has none. Pass steps=None "
            "(or rtol=/atol=) for the adaptive solve, or give the solver a root_finder with "
            "its own rtol and atol.")
    self.t1, self.reg, self.dt0 = t1, reg, dt0
    self.stepsize_controller, self.rtol, self.atol, self.adjoint = (
        stepsize_controller, rtol, atol, adjoint)

  def _step_cap(self, t1_call) -> int:
    """``max_steps``, or with ``None`` the steps a fixed grid takes (known before the solve:
    ``ConstantStepSize`` with ``dt0`` and a concrete ``t1`` from construction, or ``StepTo``),
    else ``DEFAULT_MAX_STEPS``. diffrax's checkpointed loop costs time and memory per
    *allowed* step, so a tight cap is what makes a short fixed grid cheap."""
    if self.max_steps is not None:
      return self.max_steps
    if self.grid:
      return self.steps + 1  # normalized time: steps equal steps whatever t1
    controller = self.stepsize_controller
    if isinstance(controller, diffrax.StepTo):
      return len(controller.ts)  # len(ts) - 1 steps, one spare
    if (isinstance(controller, diffrax.ConstantStepSize) and t1_call is None
        and not _common.is_traced(self.t1)):
      steps = math.ceil(float(np.asarray(self.t1)) / float(np.asarray(self.dt0)) * (1 - 1e-12))
      return max(steps, 1) + 1  # one spare for a last step shortened by rounding
    return DEFAULT_MAX_STEPS

  def _solve(self, params, support, *, t1=None, reg=None):
    _common.check_one_dtype(params, "adjoint")
    _vma.refuse_varying(support, "adjoint", "diffrax's ODE solve")
    dtype = _common.params_dtype(params)
    t1_ = self.t1 if t1 is None else t1
    reg_ = self.reg if reg is None else reg
    if t1 is not None:
      _common.check_hyperparameter("t1", t1_, strict=True)
      if isinstance(self.stepsize_controller, diffrax.StepTo):
        raise ValueError("a call-time t1 cannot move StepTo's fixed times (they end at the t1 "
                         "given to adjoint(...)): use the default grid (steps=) or "
                         "ConstantStepSize with dt0 to pass or learn t1.")
    if reg is not None:
      _common.check_hyperparameter("reg", reg_, strict=False)
    t1_ = _common.as_scalar("t1", t1_, dtype)
    reg_ = _common.as_scalar("reg", reg_, dtype)
    hyper_result = jnp.maximum(_common.hyperparameter_result(t1_),
                               _common.hyperparameter_result(reg_, strict=False))
    reported_t1 = t1_
    if _common.is_traced((t1_, reg_)):  # an invalid traced value: integrate a harmless flow
      t1_ = jnp.where(hyper_result == 0, t1_, jnp.ones_like(t1_))
      reg_ = jnp.where(hyper_result == 0, reg_, jnp.zeros_like(reg_))
    # Closure conversion: traced values loss_fn closes over become ODE arguments, which
    # every diffrax adjoint (BacksolveAdjoint too) differentiates.
    # jax.closure_convert memoizes on the function object and argument types: for the same
    # loss_fn traced again (a later jit, a probe trace, evaluate after training) it would hand
    # back the constants of the first trace, stale tracers among them ("Execution supplied 19
    # arguments but compiled program expected 24", UnexpectedTracerError). A fresh function
    # per solve keeps the conversion to this trace.
    loss_fn, consts = jax.closure_convert(lambda p, b: self.loss_fn(p, b), params, support)
    grad_fn = jax.grad(loss_fn)

    def drift(phi, args):
      theta, support_, reg__, _, consts_ = args
      return _common.tree_axpy(reg__, _common.tree_sub(phi, theta),
                               grad_fn(phi, support_, *(consts_ or ())))

    def vector_field(s, phi, args):
      # Normalized time s = t / t1 on [0, 1]: the flow is autonomous, so this is exact, and
      # t1 becomes an ODE argument that every adjoint method differentiates.
      return jax.tree.map(lambda d: -args[3] * d, drift(phi, args))

    controller = self.stepsize_controller
    if self.grid:
      controller = diffrax.ConstantStepSize()
    elif controller is None:
      tol = _common.default_tol(dtype, float64=1e-10, float32=1e-6)
      controller = diffrax.PIDController(rtol=tol if self.rtol is None else self.rtol,
                                         atol=tol if self.atol is None else self.atol)
    else:
      controller = _in_normalized_time(controller, t1_)
    cap = self._step_cap(t1)
    method = _adjoint_method(self.adjoint, self.solver, controller, cap)
    if self.adjoint == "checkpoint" and _vma.in_manual_context():
      # Inside shard_map / pmap, diffrax's checkpointed loop fails (equinox closure conversion
      # sees other argument types); DirectAdjoint differentiates the same discrete solve exactly,
      # in memory that grows with max_steps.
      method = diffrax.DirectAdjoint()
    # Step sizes carry no gradient (BacksolveAdjoint cannot differentiate its
    # initial state, and diffrax's automatic first step depends on y0).
    if self.grid:
      first_step = jnp.asarray(1.0 / self.steps, dtype)
    elif self.dt0 is not None:
      first_step = jax.lax.stop_gradient(jnp.asarray(self.dt0, dtype) / t1_)
    elif isinstance(method, diffrax.BacksolveAdjoint):
      first_step = jnp.asarray(1e-2, dtype)
    else:
      first_step = None
    args = (params, support, reg_, t1_, tuple(consts) or None)  # () breaks BacksolveAdjoint
    try:
      sol = diffrax.diffeqsolve(
          diffrax.ODETerm(vector_field), self.solver, t0=jnp.zeros((), dtype),
          t1=jnp.ones((), dtype), dt0=first_step, y0=params, args=args,
          saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller, adjoint=method,
          max_steps=cap, throw=False)
    except (TypeError, RuntimeError) as err:
      if "does not provide error estimates" in str(err):
        raise ValueError(
            f"metajax adjoint solver: solver={type(self.solver).__name__}() has no error "
            "estimate, so it cannot take the adaptive steps that "
            + ("rtol/atol or steps=None ask for" if self.stepsize_controller is None
               else f"stepsize_controller={type(self.stepsize_controller).__name__} takes")
            + ": give it constant steps (dt0= alone, or the default grid steps=), or use a "
            "solver with an error estimate (diffrax.Tsit5(), diffrax.Heun()).") from err
      if any(k in str(err) for k in ("forward-mode", "jvp", "Unexpected tangent")):
        raise TypeError(
            f"metajax adjoint solver: adjoint={self.adjoint!r} supports reverse mode only "
            "(jax.grad, jax.vjp), not forward mode (jax.jvp, jax.jacfwd, jax.hessian) or "
            "grad of grad; pass adjoint=diffrax.ForwardMode() for forward mode, or use the "
            "unrolled or implicit solver.") from err
      raise
    phi = jax.tree.map(lambda y: y[-1], sol.ys)
    steps = sol.stats["num_steps"]
    result = jnp.where(
        sol.result == diffrax.RESULTS.successful, RESULTS.successful,
        jnp.where(sol.result == diffrax.RESULTS.max_steps_reached, RESULTS.max_steps_reached,
                  RESULTS.ode_failed))
    residual = _common.tree_norm(drift(phi, args))  # NaN when the loss or its gradient is
    finite = all_finite(phi) & jnp.isfinite(residual)
    result = jnp.where(finite, result, RESULTS.nonfinite)
    loss = loss_fn(phi, support, *consts)
    time_reached = sol.ts[-1] * t1_
    values = {"time": time_reached, "t1": reported_t1, "ode_steps": steps, "reg": reg_}
    if self.grid:
      # No error control: a step past the stability limit is caught the way gradient descent's
      # is. The flow and every stable step decrease F = L + reg/2 |phi - theta|^2; an unstable
      # grid raises it (a non-convex flow may grow its gradient, never F).
      start, end = jax.lax.stop_gradient((
          loss_fn(params, support, *consts),
          loss + _common.proximal_term(phi, params, reg_)))
      rose = end > start + GRID_RISE * jnp.abs(start) + jnp.finfo(dtype).eps
      result = jnp.where((result == RESULTS.successful) & rose, RESULTS.diverged, result)
      values.update(objective_start=start, objective_end=end)
    result = jnp.where(hyper_result != 0, hyper_result, result).astype(jnp.int32)
    if self.throw:
      stage = (f"gradient flow, fixed grid of steps={self.steps} {type(self.solver).__name__} "
               "steps of t1/steps" if self.grid else "gradient flow")
      phi = error_if(phi, result, f"metajax adjoint solver, ODE stage ({stage})",
                     GRID_MESSAGES if self.grid else None, **values)
    info = AdaptInfo(
        result=result, steps=steps,
        residual=residual, loss=loss,
        stats={"num_accepted_steps": sol.stats["num_accepted_steps"],
               "num_rejected_steps": sol.stats["num_rejected_steps"], "time": time_reached})
    return phi, info


def adjoint(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    t1: Any,
    reg: Any = 0.0,
    steps: int | None = DEFAULT_STEPS,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    adjoint: str | diffrax.AbstractAdjoint = "checkpoint",
    throw: bool = True,
) -> Adjoint:
  """Gradient flow ``dphi/dt = -grad L(phi) - reg (phi - theta)`` from ``phi(0) = theta`` to ``t1``.

  How the solve is differentiated is an argument, as in diffrax:

  - ``"checkpoint"`` (default): ``diffrax.RecursiveCheckpointAdjoint``, the
    exact gradient of the discrete solve with memory logarithmic in
    ``max_steps`` (recomputation instead of storage); a solve capped at 16 steps or fewer (a
    short fixed grid) stores every step instead (1.6x faster, no recursion). Reverse mode only.
  - ``"backsolve"``: ``diffrax.BacksolveAdjoint``, A-MAML's continuous adjoint
    with constant memory. It reconstructs the state backward in time, which is
    unstable on contracting gradient flows (Deleu et al. 2022, Fig. 2): its
    gradient error grows with ``t1`` (``experiments/benchmarks/adjoint_methods.md``: on a
    quadratic with eigenvalues 1e-3 to 2 at rtol 1e-8, relative error 3e-11 at ``t1=10``
    but 0.23 at ``t1=100``, where ``"checkpoint"`` stays at 5e-10). Nothing in the solve
    detects this: prefer ``"checkpoint"`` for long horizons.
  - any ``diffrax.AbstractAdjoint``, e.g. ``diffrax.ForwardMode()`` for ``jax.jvp``/``jacfwd``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set. It may close over
      traced values (closure-converted into ODE arguments, so every adjoint differentiates
      them).
    t1: adaptation horizon ``T`` (finite, > 0). May be passed at call time, possibly
      traced, and then receives its meta-gradient (a learned horizon).
    reg: optional proximal strength (>= 0; A-MAML's code uses 1.0); call-time too.
    steps: the default fixed grid, used when none of ``stepsize_controller``, ``rtol``,
      ``atol`` or ``dt0`` is given: ``steps`` equal explicit Euler steps of ``t1 / steps``
      (static; a call-time ``t1`` keeps the count). ``None``: the adaptive default instead,
      Tsit5 with a PID controller at ``rtol``/``atol``. Why a fixed Euler grid: gradient
      flows of ReLU networks are stiff and non-smooth, so explicit solvers are limited by
      stability, not by order (Euler's interval per gradient evaluation is the widest), and
      error control on the state spends dozens of 6-stage steps on a short horizon. Sinusoid
      MLP, 25 tasks, ``t1=0.05`` (``experiments/benchmarks/solver_defaults.md``): the grid
      costs 1.4x MAML's 5 steps per meta-gradient (adaptive: 97x) and its query loss is 0.9%
      from the exact flow's (MAML's 5 steps: 3%). Accuracy against the exact flow is
      first order: on the linear-regression closed form (eigenvalues 0.3 to 1.6, ``t1=1.5``)
      10 steps miss the exact adaptation ``phi - theta`` by 2.9% (``steps=None``: 1e-8); the
      result is exactly
      ``steps`` gradient-descent steps of ``t1 / steps`` (tested against that closed form),
      differentiated through the grid. Raise ``steps`` for a closer flow, or pass
      ``steps=None`` (or ``rtol``) for error control on smooth problems. Long horizons need
      more steps: the grid step ``t1 / steps`` must stay below the flow's stability limit (2 /
      (the largest Hessian eigenvalue + reg), as for gradient descent). On that MLP 10 steps
      give a query loss 10% above the exact flow's at ``t1=0.2`` (4.79 vs 4.36); at ``t1=0.4``
      5 of 25 tasks reach NaN, at ``t1=0.8`` 20 of 25 diverge (``benchmarks/horizon_sweep.md``
      in the repository: MAML's, the default's and finer grids by ``t1``). The grid is
      checked: a 100-fold rise of ``L + reg/2 |phi - theta|^2``, which the flow only
      decreases, is ``diverged``; it, or a NaN, raises naming the grid. ``max_steps`` below
      ``steps`` is refused.
    solver: a diffrax solver; default ``diffrax.Euler()`` on the default grid and with
      ``dt0`` alone, else ``diffrax.Tsit5()``. A solver without an error estimate (Euler)
      cannot take adaptive steps: give it ``dt0`` (or the default grid), not ``rtol``/``atol``.
    dt0: the step, in real time. Alone (no ``stepsize_controller``, ``rtol`` or ``atol``) it
      means constant steps of ``dt0``, as in diffrax (``t1 / dt0`` of them; a call-time ``t1``
      keeps the step, not the count); with an adaptive controller, its first step. Not together
      with an explicit ``steps``.
    stepsize_controller: default: the fixed grid of ``steps``; with ``steps=None``, ``rtol``
      or ``atol``, ``diffrax.PIDController(rtol, atol)``. Its times
      (``dtmin``, ``dtmax``, ``StepTo.ts``, ``ClipStepSizeController``'s ``step_ts`` and
      ``jump_ts``) are in real time units, as with diffrax directly.
    rtol: relative tolerance of the adaptive controller (giving it asks for adaptive steps);
      ``None``: 1e-10 in float64, 1e-6 in float32. Looser is faster but the meta-gradient
      degrades faster than the state (``experiments/benchmarks/gradient_error.md``, smooth
      tanh MLP, t1 = 1: relative meta-gradient error 7e-2 at 1e-4, 1.4e-4 at 1e-6, 1.5e-8 at
      1e-10;
      ``solver_defaults.md``: 1e-4 is ~4x faster on the sinusoid MLP). Non-smooth (ReLU)
      flows at tight tolerances can hit ``max_steps``: that raises.
    atol: absolute tolerance of the adaptive controller; ``None``: as ``rtol``.
    max_steps: step cap (static). ``None`` (default): the steps a fixed grid takes (the
      default grid, ``stepsize_controller=diffrax.ConstantStepSize()`` with ``dt0`` and ``t1`` given
      here, or ``diffrax.StepTo``), plus one; otherwise 4096. diffrax's checkpointed loop
      costs time and memory per allowed step: Euler, 5 steps, sinusoid MLP, 25 tasks
      (2-core CPU): 33 ms and 42 MB XLA temp at 4096 against 2.7 ms and 2.2 MB at 6 (MAML,
      the same Euler steps unrolled: 1.1 ms).
    adjoint: ``"checkpoint"``, ``"backsolve"``, or any ``diffrax.AbstractAdjoint``.
    throw: raise (a ``JaxRuntimeError`` under ``jit``) naming the time reached and the task
      when ``max_steps`` is hit, the ODE solver fails or the state becomes non-finite;
      ``False`` reports it in ``AdaptInfo.result`` instead.

  Returns:
    An [`InnerSolver`][metajax.solvers.InnerSolver]: ``adapt(params, support, *, t1=None,
    reg=None)``; ``adapt.solve(...)`` returns ``(phi, AdaptInfo)`` with
    ``stats={"num_accepted_steps", "num_rejected_steps", "time"}``.

  Examples:
    >>> import jax.numpy as jnp, metajax
    >>> loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
    >>> adapt = metajax.solvers.adjoint(loss, t1=1.0)  # 10 Euler steps: 1 - 0.9 ** 10
    >>> phi = adapt(jnp.zeros(1), jnp.ones(1))
    >>> round(float(phi[0]), 5)
    0.65132
    >>> exact = metajax.solvers.adjoint(loss, t1=1.0, steps=None)  # adaptive: 1 - exp(-1)
    >>> round(float(exact(jnp.zeros(1), jnp.ones(1))[0]), 5)
    0.63212
  """
  return Adjoint(loss_fn, t1=t1, reg=reg, steps=steps, solver=solver, dt0=dt0,
                 stepsize_controller=stepsize_controller, rtol=rtol, atol=atol,
                 max_steps=max_steps, adjoint=adjoint, throw=throw)
