"""Failures are loud and named, statuses are truthful, defaults succeed (review 2026-11, Part A)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax
from metajax.solvers import RESULTS, inner_optimizers, linear_solvers
from tests import linreg

S = metajax.solvers


def test_implicit_defaults_converge_on_the_relu_mlp_in_float32():
  """Must-show: implicit(loss, reg=2.0) with defaults succeeds on >= 95% of 64 sinusoid tasks."""
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  tasks = metajax.tasks.sinusoid()(jax.random.key(1), 64)
  adapt = S.implicit(loss, reg=2.0, throw=False)
  _, info = jax.jit(jax.vmap(adapt.solve, (None, 0)))(params, tasks.support)
  assert info.result.shape == (64,) and info.residual.dtype == jnp.float32
  assert int(info.success.sum()) >= 61, np.asarray(info.result)
  assert float(jnp.median(info.steps)) <= 20  # converged, not capped


def test_fixed_iteration_stages_report_what_they_reached():
  a = jnp.diag(jnp.array([1.0, 10.0]))
  loss = lambda p, b: 0.5 * p @ a @ p - b @ p
  # tol=0 runs exactly max_steps iterations: successful when it stayed finite (review #3).
  adapt = S.implicit(loss, reg=1.0, optimizer=inner_optimizers.gd(0.05), max_steps=2000, tol=0.0)
  phi, info = adapt.solve(jnp.zeros(2), jnp.ones(2))
  assert int(info.result) == RESULTS.successful and int(info.steps) == 2000
  np.testing.assert_allclose(phi, [0.5, 1 / 11], rtol=1e-12)
  # A fixed-iteration linear solve that diverged is reported, never "converged" (review #2).
  diverging = S.implicit(loss, reg=1.0, linear_solver=linear_solvers.neumann(terms=20),
                         throw=False)
  info = diverging.linear_solve_info(jnp.zeros(2), jnp.ones(2), jnp.ones(2))
  assert int(info.result) == RESULTS.diverged and float(info.residual) > 1e19
  fine = S.implicit(loss, reg=1.0, linear_solver=linear_solvers.cg(maxiter=5, tol=0))
  assert int(fine.linear_solve_info(jnp.zeros(2), jnp.ones(2), jnp.ones(2)).result) == 0


def test_status_is_per_task_under_vmap_with_throw_false():
  adapt = S.unrolled(lambda p, b: jnp.sum((p - b) ** 2), steps=2, step_size=0.1, throw=False)
  support = jnp.ones((3, 2)).at[1, 0].set(jnp.nan)
  _, info = jax.jit(jax.vmap(adapt.solve, (None, 0)))(jnp.zeros(2), support)
  assert np.asarray(info.result).tolist() == [0, RESULTS.nonfinite, 0]
  assert info.messages()[1].startswith("a non-finite value")


def test_lbfgs_reuses_the_line_search_evaluations():
  calls = []
  def loss(p, b):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * jnp.sum(b * (p - 1.0) ** 2)
  b = jnp.linspace(1.0, 20.0, 20)
  adapt = S.implicit(loss, reg=1.0, tol=1e-9, max_steps=15, throw=False)
  _, info = jax.jit(adapt.solve)(jnp.zeros(20), b)
  jax.effects_barrier()
  calls.clear()
  _, info = jax.jit(adapt.solve)(jnp.zeros(20), b)
  jax.effects_barrier()
  iterations = int(info.steps)
  # One evaluation at theta, the line search's (>= 1 per iteration), one for the reported loss;
  # before, every iteration evaluated the new point once more (review #9: 32 for 15 iterations).
  assert len(calls) <= 2 * iterations + 3, (len(calls), iterations)


def test_adjoint_controller_times_are_in_real_time_units():
  problem = linreg.Problem()
  ctrl = diffrax.PIDController(rtol=1e-3, atol=1e-3, dtmax=0.1)
  adapt = S.adjoint(linreg.loss_fn, t1=10.0, stepsize_controller=ctrl)
  _, info = adapt.solve(problem.params, problem.support)
  assert int(info.steps) >= 100  # diffrax directly: 101 (review #4: metajax took 11)
  step_to = S.adjoint(linreg.loss_fn, t1=2.0, solver=diffrax.Euler(),
                      stepsize_controller=diffrax.StepTo(ts=jnp.array([0.0, 0.5, 1.0, 2.0])))
  phi, info = step_to.solve(problem.params, problem.support)
  assert int(info.steps) == 3
  # Euler with steps 0.5, 0.5, 1.0 on the gradient flow = GD with those step sizes.
  theta = problem.theta.copy()
  for h in (0.5, 0.5, 1.0):
    theta = theta - h * (problem.A @ theta - problem.c)
  assert linreg.rel_err(linreg.flat(phi), theta) < 1e-10


def test_closure_over_a_vmapped_value_in_every_solver():
  # Per-task loss weight w closed over under vmap; implicit: phi* = w b / (w + reg) ...
  def per_task(adapt_factory, theta, w):
    loss = lambda p, b: w * 0.5 * jnp.sum((p - b) ** 2)
    return jnp.sum(adapt_factory(loss)(theta, jnp.ones(2)))
  ws = jnp.array([1.0, 2.0])
  grad = lambda f: jax.grad(lambda t: jax.vmap(lambda w: per_task(f, t, w))(ws).sum())(
      jnp.zeros(2))
  # d phi / d theta = reg / (w + reg) per coordinate (implicit), exp(-w t1) (flow),
  # (1 - a w)^K (unrolled).
  np.testing.assert_allclose(grad(lambda loss: S.implicit(loss, reg=1.0)), 0.5 + 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(grad(lambda loss: S.adjoint(loss, t1=0.5, steps=None)),
                             np.exp(-0.5) + np.exp(-1.0), rtol=1e-6)
  # the default grid: 10 Euler steps of 0.05, (1 - 0.05 w)^10
  np.testing.assert_allclose(grad(lambda loss: S.adjoint(loss, t1=0.5)),
                             0.95 ** 10 + 0.9 ** 10, rtol=1e-6)
  np.testing.assert_allclose(grad(lambda loss: S.unrolled(loss, steps=3, step_size=0.1)),
                             0.9 ** 3 + 0.8 ** 3, rtol=1e-10)


def _linear_training(loss_q, nonfinite="raise", throw=True, support_nan=False):
  def sample(key, n):
    x = jax.random.normal(key, (n, 4, 2))
    xs = x.at[:, 0, 0].set(jnp.nan) if support_nan else x
    return metajax.tasks.Task((xs, jnp.ones((n, 4))), (x, jnp.ones((n, 4))))
  inner = metajax.meta.mse_loss(lambda p, x: x @ p)
  adapt = S.unrolled(inner, steps=1, step_size=0.0, throw=throw)
  vg = jax.value_and_grad(metajax.meta.meta_objective(adapt, loss_q))
  step = metajax.meta.make_train_step(vg, optax.sgd(0.1), sample, meta_batch_size=2,
                                      nonfinite=nonfinite, iterations=3)
  return step, metajax.meta.init_train_state(jnp.zeros(2), optax.sgd(0.1))


def test_nan_in_the_support_stops_training_naming_the_inner_stage_and_meta_iteration():
  step, state = _linear_training(metajax.meta.mse_loss(lambda p, x: x @ p), support_nan=True)
  with pytest.raises(Exception, match=r"unrolled solver, inner stage \(task 0; 2 of 2 tasks "
                                      r"failed\) at meta_iteration 0: a non-finite value"):
    jax.block_until_ready(step(state, jax.random.key(0)))


def test_nan_in_the_loss_or_the_outer_gradient_stops_training():
  nan_loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2) * jnp.nan
  step, state = _linear_training(nan_loss)
  with pytest.raises(Exception, match=r"train step, outer stage .*meta_iteration=0, "
                                      r"meta_loss=nan"):
    jax.block_until_ready(step(state, jax.random.key(0)))
  nan_grad = lambda p, b: jnp.sqrt(jnp.sum(p ** 2))  # finite value 0, NaN gradient at p = 0
  step, state = _linear_training(nan_grad)
  with pytest.raises(Exception, match=r"meta_iteration=0, meta_loss=0, meta_gradient_finite=0"):
    jax.block_until_ready(step(state, jax.random.key(0)))


def test_nonfinite_skip_policy_keeps_the_state_and_counts():
  nan_grad = lambda p, b: jnp.sqrt(jnp.sum(p ** 2))
  step, state = _linear_training(nan_grad, nonfinite="skip")
  new, losses = step(state, jax.random.key(0))
  assert int(new.step) == 3 and int(new.skipped) == 3
  np.testing.assert_array_equal(new.meta_params, state.meta_params)
  ok, state = _linear_training(metajax.meta.mse_loss(lambda p, x: x @ p), nonfinite="skip")
  new, _ = ok(state, jax.random.key(0))
  assert int(new.skipped) == 0 and float(jnp.abs(new.meta_params).max()) > 0


def test_evaluate_twice_with_the_same_functions_compiles_once():
  traces = []
  loss = metajax.meta.mse_loss(lambda p, x: p * x)
  def metric(p, batch):
    traces.append(1)
    return loss(p, batch)
  adapt = S.unrolled(loss, steps=1, step_size=0.1)
  tasks = metajax.tasks.sinusoid()(jax.random.key(0), 10)
  first = metajax.meta.evaluate(adapt, metric, jnp.ones((1, 1)), tasks, chunk=4)
  traced = len(traces)
  second = metajax.meta.evaluate(adapt, metric, jnp.ones((1, 1)), tasks, chunk=4)
  assert len(traces) == traced and first == second


def test_learned_reg_stays_positive_with_the_log_parametrization():
  problem = linreg.Problem()
  adapt = S.implicit(linreg.loss_fn, reg=1.0)
  objective = metajax.meta.meta_objective(adapt, linreg.loss_fn, learn={"reg": "log"})
  tasks = metajax.tasks.Task(jax.tree.map(lambda x: x[None], problem.support),
                             jax.tree.map(lambda x: x[None], problem.query))
  meta_params = {"params": problem.params, "reg": jnp.log(1.7)}
  g = jax.grad(objective)(meta_params, tasks)["reg"]
  phi, _, dphi_dreg = problem.proximal(1.7)
  expected = 1.7 * (problem.query_grad(phi) @ dphi_dreg)  # chain rule through reg = exp(s)
  assert abs(float(g) - expected) <= 1e-6 * abs(expected)
  huge_step = jax.tree.map(lambda p, d: p - 100.0 * d, meta_params, {"params": problem.params,
                                                                       "reg": g})
  assert float(jnp.exp(huge_step["reg"])) > 0  # any update keeps reg positive


def test_jit_of_the_solver_with_every_option():
  problem = linreg.Problem()
  for adapt in (S.unrolled(linreg.loss_fn, steps=2, step_size=0.1),
                S.implicit(linreg.loss_fn, reg=1.0), S.adjoint(linreg.loss_fn, t1=0.5)):
    phi, info = jax.jit(adapt.solve)(problem.params, problem.support)
    assert bool(info.success) and info.stats is not None
    name = adapt.hyperparameters[0]
    phi2 = jax.jit(lambda t, s, h, a=adapt, n=name: a(t, s, **{n: h}))(
        problem.params, problem.support, 0.5)
    assert jax.tree.structure(phi2) == jax.tree.structure(problem.params)


def test_evaluator_takes_learned_step_sizes_as_arguments_and_compiles_once():
  """A Meta-SGD step size read from a closure was frozen at the first compile (the program is
  cached on the functions); with learn= it is an argument: new values, same program."""
  traces = []
  loss = metajax.meta.mse_loss(lambda p, x: p * x)
  def metric(p, batch):
    traces.append(1)
    return loss(p, batch)
  adapt = S.unrolled(loss, steps=1)
  tasks = metajax.tasks.sinusoid()(jax.random.key(0), 6)
  evaluate = metajax.meta.make_evaluator(adapt, metric, learn=("step_size",), chunk=3)
  theta = jnp.full((1, 1), 0.5)
  traced = []
  for rate in (0.0, 0.3):
    per_task = evaluate({"params": theta, "step_size": jnp.asarray(rate)}, tasks)
    traced.append(len(traces))
    for i in range(6):  # one gradient step of `rate`, by hand
      support, query = jax.tree.map(lambda x: x[i], (tasks.support, tasks.query))
      phi = theta - rate * jax.grad(loss)(theta, support)
      np.testing.assert_allclose(per_task[i], loss(phi, query), rtol=1e-5)
  assert traced[0] >= 1 and traced[1] == traced[0]  # the second value reused the program
  mean, _ = metajax.meta.evaluate(adapt, loss, {"params": theta, "step_size": 0.3}, tasks,
                                  learn=("step_size",))
  assert mean == pytest.approx(float(per_task.mean()), rel=1e-5)


@pytest.mark.parametrize("solver,value", [
    ("implicit", {"reg": -1.0}), ("implicit", {"reg": jnp.nan}),
    ("adjoint", {"t1": -0.5}), ("adjoint", {"reg": -3.0})])
def test_throw_false_out_of_range_traced_hyperparameter_gives_nan(solver, value):
  """With throw=False an invalid traced reg or t1 was replaced by a harmless value: a finite
  phi, a finite meta-loss and a zero gradient. phi is NaN now, as unrolled's is."""
  loss = lambda p, b: 0.5 * jnp.sum((p - b) ** 2)
  adapt = (S.implicit(loss, reg=1.0, throw=False) if solver == "implicit"
           else S.adjoint(loss, t1=1.0, throw=False))
  solve = jax.jit(lambda hyper: adapt.solve(jnp.zeros(2), jnp.ones(2), **hyper))
  phi, info = solve(value)
  assert bool(jnp.all(jnp.isnan(phi))) and int(info.result) == RESULTS.invalid_hyperparameter
  phi, info = solve({name: 1.0 for name in value})
  assert bool(jnp.all(jnp.isfinite(phi))) and int(info.result) == RESULTS.successful


def test_wrappers_take_per_parameter_step_sizes_given_at_construction():
  """masked(unrolled(step_size=<tree for the full params>)) refused the constructor's tree
  (only a call-time one was masked); context(unrolled(step_size=<one per entry>)) refused the
  array. Both now equal the same values passed at call time."""
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (4, 1))
  loss = metajax.meta.mse_loss(apply_fn)
  support = (jnp.linspace(-1.0, 1.0, 5)[:, None], jnp.ones((5, 1)))
  rates = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  head = S.path_mask("Dense_1")
  built = S.masked(S.unrolled(loss, steps=1, step_size=rates), head)(params, support)
  called = S.masked(S.unrolled(loss, steps=1), head)(params, support, step_size=rates)
  jax.tree.map(np.testing.assert_array_equal, built, called)
  context_loss = metajax.meta.mse_loss(metajax.models.with_context(lambda w, x: x @ w))
  entries = jnp.array([0.5, 0.1])
  support = (jnp.ones((4, 1)), jnp.full((4, 1), 3.0))
  built = S.context(S.unrolled(context_loss, steps=1, step_size=entries), 2)(jnp.ones((3, 1)),
                                                                             support)
  # one step from a zero context: -rates * d/dc mean((1 + c0 + c1 - 3)^2) = rates * 4
  np.testing.assert_allclose(built["context"], 4.0 * entries, rtol=1e-6)


def test_unrolled_past_its_stability_limit_is_diverged_not_successful():
  """10 GD steps of 0.1 on curvature 30 multiply the error by -2 per step: the support loss
  rises 4^9-fold, finite all along; it was reported successful (the adjoint's grid, which runs
  the same steps, said diverged)."""
  loss = lambda p, b: 0.5 * 30.0 * jnp.sum((p - b) ** 2)
  theta, support = jnp.zeros(2), jnp.ones(2)
  phi, info = S.unrolled(loss, steps=10, step_size=0.1, throw=False).solve(theta, support)
  np.testing.assert_allclose(phi, 1 - (-2.0) ** 10, rtol=1e-6)  # plain GD: 1 - (1 - 3)^10
  assert int(info.result) == RESULTS.diverged
  with pytest.raises(Exception, match=r"support loss rose more than 100-fold.*lower step_size"):
    jax.block_until_ready(jax.jit(S.unrolled(loss, steps=10, step_size=0.1))(theta, support))
  _, info = S.unrolled(loss, steps=10, step_size=0.01, throw=False).solve(theta, support)
  assert int(info.result) == RESULTS.successful


def test_implicit_capped_solve_that_blew_up_is_diverged_not_max_steps():
  """With tol > 0 a solve whose residual grew 1e40-fold was reported max_steps_reached, whose
  advice (raise max_steps) makes it worse."""
  loss = lambda p, b: 0.5 * 100.0 * jnp.sum((p - b) ** 2)
  adapt = S.implicit(loss, reg=1.0, optimizer=inner_optimizers.gd(0.05), max_steps=40,
                     tol=1e-8, throw=False)
  _, info = adapt.solve(jnp.zeros(2), jnp.ones(2))
  assert int(info.result) == RESULTS.diverged
  capped = S.implicit(loss, reg=1.0, optimizer=inner_optimizers.gd(0.001), max_steps=3,
                      tol=1e-8, throw=False)
  assert int(capped.solve(jnp.zeros(2), jnp.ones(2))[1].result) == RESULTS.max_steps_reached


def test_large_finite_values_are_not_called_non_finite_in_float32():
  """|phi|^2 and loss + |grads|^2 overflow float32 past ~1.8e19: a finite phi of 1.5e19 was
  'nonfinite', and the train step skipped a finite meta-gradient of 3e19."""
  loss = lambda p, b: jnp.sum(p * b)
  phi, info = S.unrolled(loss, steps=1, step_size=1.0, throw=False).solve(
      jnp.zeros(2, jnp.float32), jnp.full(2, -1.5e19, jnp.float32))
  assert float(phi[0]) == pytest.approx(1.5e19) and int(info.result) == RESULTS.successful
  value_and_grad = lambda p, tasks: (jnp.float32(1.0), jnp.full_like(p, 3e19))
  sample = lambda key, n: metajax.tasks.Task(jnp.ones((n, 1)), jnp.ones((n, 1)))
  step = metajax.meta.make_train_step(value_and_grad, optax.sgd(1e-30), sample,
                                      meta_batch_size=2, nonfinite="skip")
  new, _ = step(metajax.meta.init_train_state(jnp.zeros(2, jnp.float32), optax.sgd(1e-30)),
                jax.random.key(0))
  assert int(new.skipped) == 0 and int(new.step) == 1
