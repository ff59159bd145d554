"""The adjoint solver: the inner loop as the gradient-flow ODE, integrated by diffrax (A-MAML)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from metajax.solvers import _common

PyTree = Any
ADJOINT_CHOICES = ("checkpoint", "backsolve")


class AdjointInfo(NamedTuple):
  """Diagnostics of the ODE solve.

  Attributes:
    num_steps: steps taken.
    num_accepted_steps: accepted steps (adaptive controllers).
    num_rejected_steps: rejected steps (adaptive controllers).
    success: whether ``t1`` was reached with a finite state.
  """

  num_steps: jax.Array
  num_accepted_steps: jax.Array
  num_rejected_steps: jax.Array
  success: jax.Array


def _adjoint_method(adjoint, solver, controller) -> diffrax.AbstractAdjoint:
  if isinstance(adjoint, diffrax.AbstractAdjoint):
    return adjoint
  if adjoint == "checkpoint":
    return diffrax.RecursiveCheckpointAdjoint()
  if adjoint == "backsolve":
    return diffrax.BacksolveAdjoint(solver=solver, stepsize_controller=controller)
  raise ValueError(f"adjoint must be one of {ADJOINT_CHOICES} or a diffrax.AbstractAdjoint, "
                   f"got {adjoint!r}.")


def adjoint(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    t1: Any,
    reg: Any = 0.0,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
    adjoint: str | diffrax.AbstractAdjoint = "checkpoint",
    throw: bool = False,
):
  """Gradient flow ``dphi/dt = -grad L(phi) - reg (phi - theta)`` from ``phi(0) = theta`` to ``t1``.

  How the solve is differentiated is an argument, as in diffrax:

  - ``"checkpoint"`` (default): ``diffrax.RecursiveCheckpointAdjoint``, the
    exact gradient of the discrete solve with memory logarithmic in
    ``max_steps`` (recomputation instead of storage).
  - ``"backsolve"``: ``diffrax.BacksolveAdjoint``, A-MAML's continuous adjoint
    with constant memory. It reconstructs the state backward in time, which is
    unstable on contracting gradient flows (Deleu et al. 2022, Fig. 2): its
    gradient error grows with ``t1`` (see
    ``experiments/benchmarks/adjoint_methods.md``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set.
    t1: adaptation horizon ``T`` (> 0). May be passed at call time, possibly
      traced, and then receives its meta-gradient (a learned horizon).
    reg: optional proximal strength (A-MAML's code uses 1.0); call-time too.
    solver: a diffrax solver; default ``diffrax.Tsit5()``.
    dt0: initial (or, with ``diffrax.ConstantStepSize``, fixed) step.
    stepsize_controller: default ``diffrax.PIDController(rtol, atol)``.
    rtol, atol: tolerances of the default controller; ``None``: 1e-10 in
      float64, 1e-6 in float32.
    max_steps: step cap (static).
    adjoint: ``"checkpoint"``, ``"backsolve"``, or any ``diffrax.AbstractAdjoint``.
    throw: raise (a ``JaxRuntimeError`` under ``jit``) naming the time reached
      when ``max_steps`` is hit or the state becomes non-finite.

  Returns:
    ``adapt(params, support, *, t1=None, reg=None, return_info=False)``; with
    ``return_info`` it returns ``(phi, AdjointInfo)``.

  Example:
    >>> import jax.numpy as jnp, metajax
    >>> loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
    >>> adapt = metajax.solvers.adjoint(loss, t1=1.0)
    >>> phi = adapt(jnp.zeros(1), jnp.ones(1))  # 1 - exp(-1)
    >>> round(float(phi[0]), 5)
    0.63212
  """
  _common.check_callable("loss_fn", loss_fn)
  _common.check_nonnegative_float("t1", t1, strict=True)
  _common.check_nonnegative_float("reg", reg)
  _common.check_positive_int("max_steps", max_steps)
  if solver is None:
    solver = diffrax.Tsit5()
  if not isinstance(solver, diffrax.AbstractSolver):
    raise TypeError(f"solver must be a diffrax solver, got {solver!r}.")
  if isinstance(stepsize_controller, diffrax.ConstantStepSize) and dt0 is None:
    raise ValueError("dt0 is required with a constant step size (e.g. dt0=step_size).")
  if stepsize_controller is not None and (rtol is not None or atol is not None):
    raise ValueError("rtol/atol configure the default controller; set them inside "
                     "stepsize_controller instead.")
  _adjoint_method(adjoint, solver, stepsize_controller)  # validates early
  default_t1, default_reg = t1, reg
  grad_fn = jax.grad(loss_fn)

  def vector_field(s, phi, args):
    # Integrated in normalized time s = t / t1 on [0, 1]: the flow is autonomous,
    # so this is exact, and t1 becomes an ODE argument that every adjoint method
    # (BacksolveAdjoint included) differentiates.
    theta, support, reg_, t1_ = args
    drift = _common.tree_axpy(reg_, _common.tree_sub(phi, theta), grad_fn(phi, support))
    return jax.tree.map(lambda d: -t1_ * d, drift)

  term = diffrax.ODETerm(vector_field)

  def adapt(params, support, *, t1=None, reg=None, return_info=False):
    dtype = _common.params_dtype(params)
    t1_ = default_t1 if t1 is None else t1
    reg_ = default_reg if reg is None else reg
    _common.check_nonnegative_float("t1", t1_, strict=True)
    _common.check_nonnegative_float("reg", reg_)
    t1_ = _common.as_scalar("t1", t1_, dtype)
    reg_ = _common.as_scalar("reg", reg_, dtype)
    controller = stepsize_controller
    if controller is None:
      tol = _common.default_tol(dtype, float64=1e-10, float32=1e-6)
      controller = diffrax.PIDController(rtol=tol if rtol is None else rtol,
                                         atol=tol if atol is None else atol)
    method = _adjoint_method(adjoint, solver, controller)
    # Step sizes carry no gradient (BacksolveAdjoint cannot differentiate its
    # initial state, and diffrax's automatic first step depends on y0).
    if dt0 is not None:
      first_step = jax.lax.stop_gradient(jnp.asarray(dt0, dtype) / t1_)
    elif isinstance(method, diffrax.BacksolveAdjoint):
      first_step = jnp.asarray(1e-2, dtype)
    else:
      first_step = None
    sol = diffrax.diffeqsolve(
        term, solver, t0=jnp.zeros((), dtype), t1=jnp.ones((), dtype), dt0=first_step,
        y0=params, args=(params, support, reg_, t1_), saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller, adjoint=method,
        max_steps=max_steps, throw=False)
    phi = jax.tree.map(lambda y: y[-1], sol.ys)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(y)) for y in jax.tree.leaves(phi)]))
    success = (sol.result == diffrax.RESULTS.successful) & finite
    if throw:
      _common.raise_if(~success, "adjoint solver: gradient flow failed (max_steps or a "
                       "non-finite state) at t={time:.6g} of t1={t1:.6g} after {steps} steps",
                       time=sol.ts[-1] * t1_,
                       t1=t1_, steps=sol.stats["num_steps"])
    if not return_info:
      return phi
    stats = sol.stats
    return phi, AdjointInfo(stats["num_steps"], stats["num_accepted_steps"],
                            stats["num_rejected_steps"], success)

  return adapt
