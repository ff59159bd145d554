"""Implicit solver: linear solvers, diagnostics, failures, memory, integer-labelled supports."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax
from metajax.solvers import RESULTS, inner_optimizers, linear_solvers
from tests import linreg

LINEAR_SOLVERS = {
    "cg": linear_solvers.cg(),
    "normal_cg": linear_solvers.normal_cg(),
    "gmres": linear_solvers.gmres(),
    "bicgstab": linear_solvers.bicgstab(),
    # (I + H/reg) has eigenvalues in [1, 1 + |H|/reg]: scale keeps the series convergent.
    "neumann": linear_solvers.neumann(terms=400, scale=0.5),
}


def _meta_grad(adapt, problem):
  return jax.grad(lambda t: linreg.loss_fn(adapt(t, problem.support), problem.query))(
      problem.params)


@pytest.mark.parametrize("name", list(LINEAR_SOLVERS))
def test_every_linear_solver_gives_the_closed_form_meta_gradient(name):
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=4.0, linear_solver=LINEAR_SOLVERS[name])
  phi, jac, _ = problem.proximal(4.0)
  assert linreg.rel_err(linreg.flat(_meta_grad(adapt, problem)),
                        jac.T @ problem.query_grad(phi)) <= 1e-6


@pytest.mark.parametrize("inner,kwargs", [
    (inner_optimizers.gd(0.2), {"max_steps": 2000}),
    (optax.adam(0.05), {"max_steps": 4000, "tol": 1e-9}),
    (inner_optimizers.newton_cg(), {}),
    (inner_optimizers.lbfgs(), {}),
    (inner_optimizers.barzilai_borwein(), {}),  # the default, 20 iterations
])
def test_inner_optimizers_reach_the_proximal_solution(inner, kwargs):
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=1.0, optimizer=inner, **kwargs)
  phi, info = adapt.solve(problem.params, problem.support)
  assert bool(info.success)
  assert linreg.rel_err(linreg.flat(phi), problem.proximal(1.0)[0]) <= 1e-6


def test_imaml_paper_setting_in_one_line_is_close_but_truncated():
  problem = linreg.Problem(d=30, n_support=40)
  paper = metajax.solvers.implicit(linreg.loss_fn, reg=2.0,
                                   linear_solver=linear_solvers.cg(maxiter=5, tol=0))
  phi, jac, _ = problem.proximal(2.0)
  err = linreg.rel_err(linreg.flat(_meta_grad(paper, problem)), jac.T @ problem.query_grad(phi))
  assert 1e-12 < err < 0.05  # 5 CG steps: an approximation, and a good one


def test_diagnostics_and_linear_solve_info():
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=2.0)
  phi, info = jax.jit(adapt.solve)(problem.params, problem.support)
  assert bool(info.success) and int(info.steps) >= 1
  assert float(info.residual) < 1e-9
  lin = adapt.linear_solve_info(problem.params, problem.support, phi)
  assert bool(lin.success) and float(lin.residual) < 1e-9
  short = metajax.solvers.implicit(linreg.loss_fn, reg=2.0,
                                   linear_solver=linear_solvers.cg(maxiter=1, tol=1e-10))
  lin_short = short.linear_solve_info(problem.params, problem.support, phi)
  assert int(lin_short.result) == RESULTS.linear_solve_failed
  assert float(lin_short.residual) > 1e-6
  assert lin_short.maxiter == 1


def test_throw_names_the_inner_stage_and_residual():
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=2.0, optimizer=inner_optimizers.gd(1e-3),
                                   max_steps=3, tol=None)
  with pytest.raises(Exception, match=r"inner stage .*step cap .max_steps. was reached.*"
                                      r"iterations=3, residual=\d"):
    jax.block_until_ready(jax.jit(adapt)(problem.params, problem.support))
  quiet = metajax.solvers.implicit(linreg.loss_fn, reg=2.0, optimizer=inner_optimizers.gd(1e-3),
                                   max_steps=3, tol=None, throw=False)
  _, info = quiet.solve(problem.params, problem.support)
  assert int(info.result) == RESULTS.max_steps_reached
  # The default fixed budget (tol=0) ran its 3 iterations: successful, residual reported.
  budget = metajax.solvers.implicit(linreg.loss_fn, reg=2.0, optimizer=inner_optimizers.gd(1e-3),
                                    max_steps=3)
  _, info = budget.solve(problem.params, problem.support)
  assert int(info.result) == RESULTS.successful and int(info.steps) == 3
  assert float(info.residual) > 1e-3


def test_throw_names_the_linear_solve_stage():
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=2.0,
                                   linear_solver=linear_solvers.cg(maxiter=1, tol=1e-10))
  with pytest.raises(Exception, match=r"linear-solve stage .*missed its tolerance.*"
                                      r"relative_residual=\d"):
    jax.block_until_ready(jax.jit(lambda t: _meta_grad(adapt, problem))(problem.params))


def test_integer_labels_in_support_and_vmap_with_grad():
  # Classification support (float images, int labels): the custom VJP must skip int leaves.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 10, 3)))
  labels = jnp.asarray(rng.integers(0, 2, size=(4, 10)))
  loss = metajax.meta.cross_entropy_loss(lambda p, x: x @ p)
  adapt = metajax.solvers.implicit(loss, reg=1.0)
  objective = metajax.meta.meta_objective(adapt, loss)
  tasks = metajax.tasks.Task((x, labels), (x, labels))
  grad = jax.jit(jax.grad(objective))(jnp.zeros((3, 2)), tasks)
  assert grad.shape == (3, 2) and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0


def test_bad_settings_name_the_argument():
  problem = linreg.Problem()
  for kwargs, match in [({"reg": 0.0}, "reg must be > 0"), ({"reg": -1.0}, "reg must be > 0"),
                        ({"reg": float("nan")}, "reg must be finite"),
                        ({"reg": 1.0, "optimizer": "bfgs"}, "optimizer must be an object"),
                        ({"reg": 1.0, "max_steps": 0}, "max_steps must be >= 1"),
                        ({"reg": 1.0, "tol": -1.0}, "tol must be")]:
    with pytest.raises((ValueError, TypeError), match=match):
      metajax.solvers.implicit(linreg.loss_fn, **kwargs)(problem.params, problem.support)
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=1.0)
  with pytest.raises(ValueError, match="reg must be a scalar"):
    adapt(problem.params, problem.support, reg=jnp.ones(2))
  with pytest.raises(ValueError, match="reg must be > 0"):
    adapt(problem.params, problem.support, reg=0.0)


MEMORY_SCRIPT = r"""
import jax, jax.numpy as jnp, metajax, sys
steps = int(sys.argv[1])
params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 16, (256, 256, 1))
loss = metajax.meta.mse_loss(apply_fn)
support = (jax.random.normal(jax.random.key(1), (64, 16)), jnp.zeros((64, 1)))
adapt = metajax.solvers.implicit(loss, reg=2.0,
                                 optimizer=metajax.solvers.inner_optimizers.gd(0.01),
                                 max_steps=steps, tol=0.0,
                                 linear_solver=metajax.solvers.linear_solvers.cg(maxiter=5, tol=0))
f = jax.jit(jax.grad(lambda t: loss(adapt(t, support), support)))
print(f.lower(params).compile().memory_analysis().temp_size_in_bytes)
"""


def test_compiled_memory_does_not_grow_with_inner_steps():
  # XLA's buffer assignment for one meta-gradient, at 10 and 400 inner steps.
  sizes = [int(subprocess.check_output([sys.executable, "-c", MEMORY_SCRIPT, str(k)]))
           for k in (10, 400)]
  assert sizes[1] <= 1.0 * sizes[0]


def test_ridge_solves_the_damped_system():
  problem = linreg.Problem()
  adapt = metajax.solvers.implicit(linreg.loss_fn, reg=2.0,
                                   linear_solver=linear_solvers.cg(ridge=0.5))
  phi, jac, _ = problem.proximal(2.0)
  # (I + H/reg + ridge I) g = v  =>  g = ((1 + ridge) I + A/reg)^-1 v
  v = problem.query_grad(phi)
  expected = np.linalg.solve(1.5 * np.eye(5) + problem.A / 2.0, v)
  assert linreg.rel_err(linreg.flat(_meta_grad(adapt, problem)), expected) <= 1e-8
  with pytest.raises(ValueError, match="ridge must be"):
    linear_solvers.cg(ridge=-1.0)


def test_barzilai_borwein_steps_are_capped_at_one_over_reg():
  """On L = -c/2 ||p - b||^2 (c < reg) the proximal objective has curvature reg - c along every
  direction, so the first (Cauchy) step would be 1 / (reg - c); it is capped at 1 / reg, which
  gives phi_1 = theta + (c / reg) (theta - b) exactly."""
  c, reg, b, theta = 0.5, 2.0, jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  loss = lambda p, b_: -0.5 * c * jnp.sum((p - b_) ** 2)
  one_step = metajax.solvers.implicit(loss, reg=reg, max_steps=1)
  np.testing.assert_allclose(one_step(theta, b), theta + c / reg * (theta - b), rtol=1e-6)
  # ... and the capped steps still converge: (reg - c) / reg of the residual remains per step.
  phi = metajax.solvers.implicit(loss, reg=reg, max_steps=60)(theta, b)
  np.testing.assert_allclose(phi, (reg * theta - c * b) / (reg - c), rtol=1e-6)


def test_default_on_the_sinusoid_relu_mlp_is_stable_and_adapts_more_than_maml():
  """The defaults on a ReLU network (where L-BFGS never meets a tolerance): every task's
  residual shrinks (none diverges) and the query loss after adaptation is below MAML's."""
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  tasks = metajax.tasks.sinusoid()(jax.random.key(10), 25)
  adapt = metajax.solvers.implicit(loss, reg=2.0)
  info = jax.jit(jax.vmap(lambda s: adapt.solve(params, s)[1]))(tasks.support)
  ratio = np.asarray(info.residual / info.stats["initial_residual"])
  assert (np.asarray(info.result) == RESULTS.successful).all()
  assert ratio.max() < 0.5 and np.median(ratio) < 0.03
  meta_loss = lambda a: float(jax.jit(metajax.meta.meta_objective(a, loss))(params, tasks))
  maml = metajax.solvers.unrolled(loss, steps=5, step_size=0.01)
  assert meta_loss(adapt) < meta_loss(maml)


def test_learned_reg_gradient_off_the_solution_is_imaml_s_form():
  """After a fixed inner budget (10 GD steps, not converged) the reg-gradient is the implicit
  function theorem on iMAML's condition grad L + reg (phi - theta) = 0 at the point reached:
  d query / d reg = -grad_q(phi_K)^T (A + reg I)^-1 (phi_K - theta) (TorchOpt's implicit iMAML
  gives the same). The form grad L / reg + phi - theta differentiates to -grad L / reg^2, equal
  only at the solution: 200% off here at reg 0.5."""
  problem = linreg.Problem()
  reg, lr, steps = 0.5, 0.1, 10
  adapt = metajax.solvers.implicit(
      linreg.loss_fn, reg=1.0, optimizer=metajax.solvers.inner_optimizers.gd(lr),
      max_steps=steps, tol=0.0,
      linear_solver=metajax.solvers.linear_solvers.cg(maxiter=100, tol=1e-13))
  query_loss = lambda r: linreg.loss_fn(adapt(problem.params, problem.support, reg=r),
                                        problem.query)
  got = float(jax.grad(query_loss)(jnp.asarray(reg)))
  eye = np.eye(len(problem.theta))
  phi = problem.theta.copy()
  for _ in range(steps):  # gradient descent on L + reg/2 |phi - theta|^2
    phi = phi - lr * (problem.A @ phi - problem.c + reg * (phi - problem.theta))
  expected = -problem.query_grad(phi) @ np.linalg.solve(problem.A + reg * eye, phi - problem.theta)
  assert got == pytest.approx(expected, rel=1e-10)
  converged = problem.proximal(reg)
  assert abs(expected - problem.query_grad(converged[0]) @ converged[2]) > 1e-3  # not converged
