"""Every solver against its closed form on linear regression, float32 and float64,
per task and as ``jit(grad(mean(vmap(...))))`` over a task batch (README, "Numerics")."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import metajax
from tests import linreg

# name -> (make adapt, closed form (problem) -> (phi, dphi/dtheta), rtol float64, rtol float32)
SOLVERS = {
    "unrolled": (lambda: metajax.solvers.unrolled(linreg.loss_fn, steps=5, step_size=0.3),
                 lambda p: p.unrolled(5, 0.3), 1e-8, 1e-4),
    "unrolled_scan": (lambda: metajax.solvers.unrolled(linreg.loss_fn, steps=30, step_size=0.1,
                                                       unroll=1),
                      lambda p: p.unrolled(30, 0.1), 1e-8, 1e-4),
    "unrolled_remat": (lambda: metajax.solvers.unrolled(linreg.loss_fn, steps=5, step_size=0.3,
                                                        remat=True),
                       lambda p: p.unrolled(5, 0.3), 1e-8, 1e-4),
    # The defaults (20 L-BFGS iterations, 10 CG iterations: fixed budgets) solve these
    # 5-parameter problems exactly; a tolerance-based solve (tol=1e-6, cg() to 1e-6) too.
    "implicit": (lambda: metajax.solvers.implicit(linreg.loss_fn, reg=2.0),
                 lambda p: p.proximal(2.0)[:2], 1e-8, 1e-4),
    "implicit_tight": (lambda: metajax.solvers.implicit(
        linreg.loss_fn, reg=2.0, tol=1e-6, linear_solver=metajax.solvers.linear_solvers.cg()),
                       lambda p: p.proximal(2.0)[:2], 1e-5, 1e-3),
    "implicit_newton_cg": (lambda: metajax.solvers.implicit(linreg.loss_fn, reg=0.5,
                                                            optimizer=metajax.solvers.inner_optimizers.newton_cg()),
                           lambda p: p.proximal(0.5)[:2], 1e-5, 1e-3),
    # The default: 10 Euler steps of t1/10, i.e. gradient descent, differentiated through the
    # grid (every step stored); 20 steps are checkpointed recursively.
    "adjoint": (lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.5),
                lambda p: p.unrolled(10, 0.15), 1e-8, 1e-4),
    "adjoint_grid_20": (lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.5, steps=20),
                        lambda p: p.unrolled(20, 0.075), 1e-8, 1e-4),
    "adjoint_adaptive": (lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.5, steps=None),
                         lambda p: p.gradient_flow(1.5)[:2], 1e-5, 1e-3),
    "adjoint_backsolve": (lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.5, steps=None,
                                                          adjoint="backsolve"),
                          lambda p: p.gradient_flow(1.5)[:2], 1e-5, 1e-3),
}
DTYPES = [jnp.float64, jnp.float32]


def _tol(name, dtype):
  return SOLVERS[name][2] if dtype == jnp.float64 else SOLVERS[name][3]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_single_task_matches_closed_form(name, dtype):
  make, closed_form, *_ = SOLVERS[name]
  problem = linreg.Problem(dtype=dtype)
  adapt = make()
  phi = adapt(problem.params, problem.support)
  assert jax.tree.map(lambda x: x.dtype, phi) == {"w": dtype, "b": dtype}
  phi_ref, jac_ref = closed_form(problem)
  assert linreg.rel_err(linreg.flat(phi), phi_ref) <= _tol(name, dtype)

  outer = lambda theta: metajax.meta.mse_loss(lambda p, x: x @ p["w"] + p["b"])(
      adapt(theta, problem.support), problem.query) / 2
  grad = jax.grad(outer)(problem.params)
  assert jax.tree.map(lambda x: x.dtype, grad) == {"w": dtype, "b": dtype}
  grad_ref = jac_ref.T @ problem.query_grad(phi_ref)
  assert linreg.rel_err(linreg.flat(grad), grad_ref) <= _tol(name, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_batched_meta_gradient_under_jit_vmap_grad(name, dtype):
  make, closed_form, *_ = SOLVERS[name]
  problems, support, query = linreg.batch(3, dtype)
  adapt = make()

  def meta_loss(theta):
    per_task = jax.vmap(lambda s, q: linreg.loss_fn(adapt(theta, s), q), in_axes=(0, 0))
    return jnp.mean(per_task(support, query))

  grad = jax.jit(jax.grad(meta_loss))(problems[0].params)
  grad_ref = np.mean([cf[1].T @ p.query_grad(cf[0]) for p in problems
                      for cf in [closed_form(p)]], axis=0)
  assert linreg.rel_err(linreg.flat(grad), grad_ref) <= _tol(name, dtype)


def test_first_order_maml_uses_identity_jacobian():
  problem = linreg.Problem()
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=4, step_size=0.2, first_order=True)
  grad = jax.grad(lambda t: linreg.loss_fn(adapt(t, problem.support), problem.query))(
      problem.params)
  phi_ref, jac = problem.unrolled(4, 0.2)
  assert linreg.rel_err(linreg.flat(grad), problem.query_grad(phi_ref)) <= 1e-10
  # ... and that differs from the second-order gradient, so the test can fail.
  assert linreg.rel_err(linreg.flat(grad), jac.T @ problem.query_grad(phi_ref)) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_meta_sgd_per_parameter_step_sizes_at_call_time(dtype):
  problem = linreg.Problem(dtype=dtype)
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=3)
  rates = np.linspace(0.1, 0.4, 5)
  step_size = linreg.unflat(rates, dtype)

  def outer(theta, step_size):
    return linreg.loss_fn(adapt(theta, problem.support, step_size=step_size), problem.query)

  g_theta, g_rates = jax.jit(jax.grad(outer, argnums=(0, 1)))(problem.params, step_size)
  phi_ref, jac = problem.unrolled(3, rates)
  cot = problem.query_grad(phi_ref)
  tol = 1e-8 if dtype == jnp.float64 else 1e-4
  assert linreg.rel_err(linreg.flat(g_theta), jac.T @ cot) <= tol
  assert linreg.rel_err(linreg.flat(g_rates), problem.unrolled_step_size_grad(3, rates, cot)) <= tol


def test_scalar_step_size_gradient_is_sum_of_per_parameter_ones():
  problem = linreg.Problem()
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=3)
  g = jax.grad(lambda a: linreg.loss_fn(adapt(problem.params, problem.support, step_size=a),
                                        problem.query))(0.25)
  phi_ref, _ = problem.unrolled(3, 0.25)
  expected = problem.unrolled_step_size_grad(3, 0.25, problem.query_grad(phi_ref)).sum()
  assert abs(float(g) - expected) <= 1e-10 * abs(expected)


def test_implicit_reg_gradient_matches_closed_form():
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=1.0)
  outer = lambda reg: linreg.loss_fn(adapt(problem.params, problem.support, reg=reg),
                                     problem.query)
  g = jax.jit(jax.grad(outer))(1.7)
  phi, _, dphi_dreg = problem.proximal(1.7)
  expected = problem.query_grad(phi) @ dphi_dreg
  assert abs(float(g) - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_adjoint_t1_and_reg_gradients(adjoint):
  problem = linreg.Problem()
  adapt = metajax.solvers.adjoint(linreg.loss_fn, t1=1.0, steps=None, adjoint=adjoint)
  outer = lambda t1: linreg.loss_fn(adapt(problem.params, problem.support, t1=t1), problem.query)
  g = jax.jit(jax.grad(outer))(0.8)
  phi, _, dphi_dt = problem.gradient_flow(0.8)
  expected = problem.query_grad(phi) @ dphi_dt
  assert abs(float(g) - expected) <= 1e-6 * abs(expected)
  # reg: the flow -grad L - reg (phi - theta) is the gradient flow of A + reg I, c + reg theta.
  outer_reg = lambda reg: linreg.loss_fn(adapt(problem.params, problem.support, reg=reg),
                                         problem.query)
  eps = 1e-5
  shifted = []
  for reg in (0.5 - eps, 0.5 + eps):
    A, c = problem.A + reg * np.eye(5), problem.c + reg * problem.theta
    p_inf = np.linalg.solve(A, c)
    phi_r = p_inf + scipy.linalg.expm(-A * 1.0) @ (problem.theta - p_inf)
    shifted.append(0.5 * np.mean((np.c_[problem.xq, np.ones(len(problem.xq))] @ phi_r
                                  - problem.yq) ** 2))
  expected_reg = (shifted[1] - shifted[0]) / (2 * eps)  # central difference of the closed form
  assert abs(float(jax.grad(outer_reg)(0.5)) - expected_reg) <= 1e-5 * abs(expected_reg)


@pytest.mark.parametrize("steps,step_size", [(1, 0.4), (7, 0.1), (25, 0.05)])
def test_euler_gradient_flow_is_unrolled_gradient_descent(steps, step_size):
  problem = linreg.Problem()
  flow = metajax.solvers.adjoint(linreg.loss_fn, t1=steps * step_size, solver=diffrax.Euler(),
                                 dt0=step_size, stepsize_controller=diffrax.ConstantStepSize())
  gd = metajax.solvers.unrolled(linreg.loss_fn, steps=steps, step_size=step_size)
  outer = lambda adapt: lambda t: linreg.loss_fn(adapt(t, problem.support), problem.query)
  assert linreg.rel_err(linreg.flat(flow(problem.params, problem.support)),
                        linreg.flat(gd(problem.params, problem.support))) <= 1e-10
  assert linreg.rel_err(linreg.flat(jax.grad(outer(flow))(problem.params)),
                        linreg.flat(jax.grad(outer(gd))(problem.params))) <= 1e-10
