"""Adjoint solver: diagnostics, failures, settings, adjoint methods."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import metajax
from tests import linreg


def test_info_counts_steps_and_reports_success():
  problem = linreg.Problem()
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=2.0)
  _, info = jax.jit(adapt.solve)(problem.params, problem.support)
  assert bool(info.success) and int(info.result) == metajax.solvers.RESULTS.successful
  assert int(info.steps) == int(info.stats["num_accepted_steps"]) + int(
      info.stats["num_rejected_steps"]) > 0
  assert float(info.stats["time"]) == pytest.approx(2.0)


def test_tighter_tolerance_takes_more_steps_and_is_more_accurate():
  problem = linreg.Problem()
  phi_ref = problem.gradient_flow(2.0)[0]
  errors, steps = [], []
  for tol in (1e-4, 1e-8):
    adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=2.0, rtol=tol, atol=tol)
    phi, info = adapt.solve(problem.params, problem.support)
    errors.append(linreg.rel_err(linreg.flat(phi), phi_ref))
    steps.append(int(info.steps))
  assert errors[1] < errors[0] / 100 and steps[1] > steps[0]


def test_throw_on_max_steps_names_the_time_reached():
  problem = linreg.Problem()
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=50.0, steps=None, max_steps=4)
  with pytest.raises(Exception, match=r"adjoint solver, ODE stage .*step cap .max_steps. "
                                      r"was reached.*time=[0-9.e+-]+, t1=50, ode_steps=4"):
    jax.block_until_ready(jax.jit(adapt)(problem.params, problem.support))
  quiet = metajax.solvers.adjoint(linreg.loss_fn, t1=50.0, steps=None, max_steps=4,
                                  throw=False)
  _, info = quiet.solve(problem.params, problem.support)
  assert not bool(info.success)
  assert int(info.result) == metajax.solvers.RESULTS.max_steps_reached


def test_throw_on_non_finite_state():
  blow_up = lambda p, b: -jnp.exp(jnp.sum(p["w"]) * 50.0)  # gradient flow diverges
  adapt = metajax.solvers.adjoint(blow_up, t1=1.0, solver=diffrax.Euler(), dt0=0.1,
                                  stepsize_controller=diffrax.ConstantStepSize())
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  with pytest.raises(Exception, match="non-finite"):
    jax.block_until_ready(jax.jit(adapt)(params, None))


def test_proximal_term_matches_shifted_closed_form():
  problem = linreg.Problem()
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=1.0, reg=0.7, steps=None)
  import scipy.linalg
  A, c = problem.A + 0.7 * np.eye(5), problem.c + 0.7 * problem.theta
  p_inf = np.linalg.solve(A, c)
  expected = p_inf + scipy.linalg.expm(-A) @ (problem.theta - p_inf)
  assert linreg.rel_err(linreg.flat(adapt(problem.params, problem.support)), expected) < 1e-8


def test_bad_settings_name_the_argument():
  problem = linreg.Problem()
  for kwargs, match in [({"t1": 0.0}, "t1 must be > 0"), ({"t1": 1.0, "reg": -1.0}, "reg must be"),
                        ({"t1": 1.0, "adjoint": "magic"}, "adjoint must be one of"),
                        ({"t1": 1.0, "stepsize_controller": diffrax.ConstantStepSize()},
                         "dt0 is required"),
                        ({"t1": 1.0, "solver": "rk4"}, "solver must be a diffrax solver"),
                        ({"t1": 1.0, "max_steps": 0}, "max_steps must be >= 1"),
                        ({"t1": 1.0, "steps": 0}, "steps must be >= 1")]:
    with pytest.raises((ValueError, TypeError), match=match):
      metajax.solvers.adjoint(linreg.loss_fn, **kwargs)(problem.params, problem.support)
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=1.0)
  with pytest.raises(ValueError, match="t1 must be > 0"):
    adapt(problem.params, problem.support, t1=-1.0)


def test_checkpoint_adjoint_memory_is_bounded_in_trajectory_length():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 8, (128, 1), activation=jnp.tanh)
  loss = metajax.meta.mse_loss(apply_fn)
  support = (jax.random.normal(jax.random.key(1), (64, 8)), jnp.zeros((64, 1)))
  sizes = []
  for steps in (10, 400):
    adapt = metajax.solvers.adjoint(loss, t1=0.01 * steps, solver=diffrax.Euler(), dt0=0.01,
                                    stepsize_controller=diffrax.ConstantStepSize(),
                                    max_steps=512)
    f = jax.jit(jax.grad(lambda t: loss(adapt(t, support), support)))
    sizes.append(f.lower(params).compile().memory_analysis().temp_size_in_bytes)
  assert sizes[1] == sizes[0]  # memory is set by max_steps, not by the trajectory length


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_fixed_grid_caps_its_steps_and_is_unrolled_gd(dtype):
  """A constant step with dt0 and t1 given: max_steps defaults to the grid's 5 steps (+1), so
  diffrax's loop stores 6 steps, not 4096; Euler on the gradient flow is unrolled GD, whose
  meta-gradient is the closed form (I - aA)^K (through jit and grad)."""
  problem = linreg.Problem(dtype=dtype)
  grid = dict(t1=0.5, solver=diffrax.Euler(), dt0=0.1,
              stepsize_controller=diffrax.ConstantStepSize())
  cotangent = problem.query_grad(problem.theta)
  temps, grads = [], []
  for max_steps in (None, 4096):
    adapt = metajax.solvers.adjoint(linreg.loss_fn, max_steps=max_steps, **grid)
    vjp = jax.jit(jax.grad(lambda t: jnp.vdot(linreg.flat_jnp(adapt(t, problem.support)),
                                              jnp.asarray(cotangent, dtype))))
    temps.append(vjp.lower(problem.params).compile().memory_analysis().temp_size_in_bytes)
    grads.append(linreg.flat(vjp(problem.params)))
  _, jacobian = problem.unrolled(5, 0.1)
  for grad in grads:
    assert linreg.rel_err(grad, jacobian.T @ cotangent) <= linreg.RTOL[dtype]
  assert temps[0] * 2 < temps[1], temps  # (MLP, 25 tasks: 2.2 vs 42 MB)
  _, info = jax.jit(metajax.solvers.adjoint(linreg.loss_fn, **grid).solve)(
      problem.params, problem.support)
  assert int(info.steps) == 5 and bool(info.success)
  # t1 given at call time: the grid is not known ahead, the cap is the adaptive default
  called = metajax.solvers.adjoint(linreg.loss_fn, **grid).solve(problem.params, problem.support,
                                                                 t1=jnp.asarray(0.8, dtype))[1]
  assert int(called.steps) == 8 and bool(called.success)


def test_backsolve_adjoint_instance_equals_the_string_form():
  problem = linreg.Problem()
  grads = []
  for method in ("backsolve", diffrax.BacksolveAdjoint()):
    adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=1.0, steps=None, adjoint=method)
    grads.append(linreg.flat(jax.grad(
        lambda t: linreg.loss_fn(adapt(t, problem.support), problem.query))(problem.params)))
  phi, E, _ = problem.gradient_flow(1.0)
  assert linreg.rel_err(grads[1], E.T @ problem.query_grad(phi)) <= 1e-6
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)


def test_t1_100_matches_the_closed_form():
  """Long horizons: at t1 = 100 the default adjoint is exact. ``expm(-100 A)`` is ~5e-15 here, so a
  *relative* error of the meta-gradient measures float64 round-off of O(1) values (the old
  benchmark's 8e4), not the solver: compare absolutely."""
  problem = linreg.Problem()
  _, expected, _ = problem.gradient_flow(100.0)
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=100.0, steps=None)
  jac = jax.jit(jax.jacrev(lambda theta: linreg.flat_jnp(adapt(linreg.unflat_jnp(theta),
                                                                problem.support))))(
      jnp.asarray(problem.theta))
  assert np.abs(expected).max() < 1e-13
  np.testing.assert_allclose(np.asarray(jac), expected, rtol=0, atol=1e-12)


def test_t1_100_slow_modes_relative_error():
  """A quadratic (linear regression in its eigenbasis) with eigenvalues down to 1e-3 keeps
  ``expm(-100 A)`` of order one: the meta-gradient at t1 = 100 is relatively exact too."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  A = basis @ np.diag([1e-3, 1e-2, 0.1, 1.0, 2.0]) @ basis.T
  c, theta = rng.normal(size=5), rng.normal(size=5)
  Aq, cq = np.eye(5), rng.normal(size=5)
  loss = lambda p, batch: 0.5 * p @ batch[0] @ p - batch[1] @ p
  query_loss = lambda p: 0.5 * p @ jnp.asarray(Aq) @ p - jnp.asarray(cq) @ p
  adapt = metajax.solvers.adjoint(loss, t1=100.0, steps=None)
  support = (jnp.asarray(A), jnp.asarray(c))
  grad = jax.jit(jax.grad(lambda t: query_loss(adapt(t, support))))(jnp.asarray(theta))
  E = scipy.linalg.expm(-100.0 * A)
  p_inf = np.linalg.solve(A, c)
  phi = p_inf + E @ (theta - p_inf)
  expected = E.T @ (Aq @ phi - cq)
  assert np.linalg.norm(expected) > 0.1
  assert linreg.rel_err(grad, expected) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_default_grid_is_gradient_descent_with_a_learnable_horizon(dtype):
  """The default: 10 Euler steps of t1/10, i.e. 10 GD steps, with t1 passed at call time
  (traced) keeping the count; d(query loss)/d t1 equals the closed form's derivative."""
  problem = linreg.Problem(dtype=dtype)
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=1.0)
  outer = lambda theta, t1: linreg.loss_fn(adapt(theta, problem.support, t1=t1), problem.query)
  g_theta, g_t1 = jax.jit(jax.grad(outer, argnums=(0, 1)))(problem.params, jnp.asarray(0.8, dtype))
  phi, jac = problem.unrolled(10, 0.08)
  tol = linreg.RTOL[dtype]
  assert linreg.rel_err(linreg.flat(g_theta), jac.T @ problem.query_grad(phi)) <= tol

  def closed_loss(t1):
    phi_t = problem.unrolled(10, t1 / 10)[0]
    return 0.5 * np.mean((np.c_[problem.xq, np.ones(len(problem.xq))] @ phi_t - problem.yq) ** 2)
  expected = (closed_loss(0.8 + 1e-6) - closed_loss(0.8 - 1e-6)) / 2e-6
  assert abs(float(g_t1) - expected) <= (1e-6 if dtype == jnp.float64 else 1e-3) * abs(expected)
  _, info = jax.jit(adapt.solve)(problem.params, problem.support)
  assert int(info.steps) == 10 and bool(info.success)


def test_each_trace_converts_the_loss_as_it_is_then():
  """jax.closure_convert memoizes on the function object: reusing its conversion across traces
  gave later traces the first trace's constants (here a stale weight: a silently wrong flow;
  with traced constants an "Execution supplied 19 arguments but compiled program expected 24"
  or UnexpectedTracerError, seen on the few-shot Conv4 after the train step's probe trace)."""
  weight = {"value": 1.0}
  loss = lambda p, b: weight["value"] * 0.5 * jnp.sum((p - b) ** 2)
  adapt = metajax.solvers.adjoint(loss, t1=1.0, steps=None)
  theta, target = jnp.zeros(2), jnp.ones(2)
  first = jax.jit(lambda t: adapt(t, target))(theta)
  np.testing.assert_allclose(first, 1 - np.exp(-1.0), rtol=1e-6)
  weight["value"] = 2.0
  second = jax.jit(lambda t: adapt(t, target) * 1.0)(theta)  # a new trace
  np.testing.assert_allclose(second, 1 - np.exp(-2.0), rtol=1e-6)


def test_default_grid_reports_divergence_by_the_objective_it_descends():
  """Euler on 0.5 a (p - b)^2 with step h multiplies p - b by (1 - a h): stable for a h < 2.
  t1=30 (h=3, a=1): p - b = (-2)^10 (1024-fold, finite) must be reported, not returned."""
  quad = lambda p, batch: 0.5 * batch[0] * jnp.sum((p - batch[1]) ** 2)
  theta, support = jnp.zeros(2), (1.0, jnp.ones(2))
  phi, info = metajax.solvers.adjoint(quad, t1=30.0, throw=False).solve(theta, support)
  np.testing.assert_allclose(phi, 1 - (-2.0) ** 10)
  assert int(info.result) == metajax.solvers.RESULTS.diverged
  for t1 in (19.0, 1e-3, 21.0):  # h=1.9: contracting; tiny; h=2.1: F up 6.7-fold, not 100
    _, info = metajax.solvers.adjoint(quad, t1=t1, throw=False).solve(theta, support)
    assert bool(info.success), t1
  # Under vmap the failing task is named (task 2's curvature a=5 puts h=1 past the limit).
  curvatures = jnp.array([1.0, 1.0, 5.0])
  batch = (curvatures, jnp.ones((3, 2)))
  adapt = metajax.solvers.adjoint(quad, t1=10.0)
  with pytest.raises(Exception, match=r"\(task 2; 1 of 3 tasks failed\).*the grid diverged"):
    jax.block_until_ready(jax.jit(jax.vmap(adapt, (None, 0)))(theta, batch))


def test_default_grid_does_not_flag_a_flow_whose_gradient_grows():
  """Leaving a saddle: 0.5 (u v - 1)^2 from u = v = 1e-5 grows |grad| ~3e4-fold along a stable
  grid (step 0.1, Hessian eigenvalues <= 2) while the objective falls: successful."""
  loss = lambda p, batch: 0.5 * (p[0] * p[1] - batch) ** 2
  phi, info = metajax.solvers.adjoint(loss, t1=11.0, steps=110, throw=False).solve(
      jnp.full(2, 1e-5), 1.0)
  assert bool(info.success) and float(info.loss) < 0.5 and float(jnp.abs(phi).min()) > 0.1


@pytest.mark.parametrize("solver", [None, diffrax.Euler(), diffrax.Tsit5()])
def test_dt0_alone_takes_constant_steps_as_in_diffrax(solver):
  """dt0 alone used to switch on adaptive (PID) steps; as in diffrax it means constant steps.
  On 0.5 |p - b|^2 from 0, Euler steps of dt0 are gradient descent: 1 - (1 - dt0)^(t1/dt0);
  Tsit5 takes the same 10 constant steps, each 5th-order accurate (1 - exp(-1))."""
  loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
  adapt = metajax.solvers.adjoint(loss, t1=1.0, dt0=0.1,
                                  **({} if solver is None else {"solver": solver}))
  phi, info = adapt.solve(jnp.zeros(1), jnp.ones(1))
  assert int(info.steps) == 10 and int(info.stats["num_rejected_steps"]) == 0
  expected = 1 - np.exp(-1.0) if isinstance(solver, diffrax.Tsit5) else 1 - 0.9 ** 10
  np.testing.assert_allclose(phi, [expected], rtol=1e-6)
