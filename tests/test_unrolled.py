"""Unrolled solver behaviour beyond closed forms: inner optimizers, diagnostics, errors, loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax
from metajax.solvers import _loops
from tests import linreg


def _relu_net_loss(params, batch):
  x, y = batch
  hidden = jax.nn.relu(x @ params["w1"])  # dead units give exactly-zero gradients
  return jnp.mean((hidden @ params["w2"] - y) ** 2)


def _relu_problem():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(3, 8))), "w2": jnp.asarray(rng.normal(size=(8,)))}
  params["w1"] = params["w1"].at[:, :3].set(-10.0)  # three dead hidden units
  x = jnp.asarray(np.abs(rng.normal(size=(10, 3))))
  return params, (x, jnp.asarray(rng.normal(size=10)))


def test_adam_inner_loop_gives_finite_meta_gradient():
  params, support = _relu_problem()
  adapt = metajax.solvers.unrolled(_relu_net_loss, steps=5,
                                   optimizer=metajax.solvers.differentiable_adam(1e-2))
  grad = jax.grad(lambda p: _relu_net_loss(adapt(p, support), support))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
  # The hazard is real: plain optax.adam (eps_root=0) gives NaN here.
  plain = metajax.solvers.unrolled(_relu_net_loss, steps=5, optimizer=optax.adam(1e-2))
  bad = jax.grad(lambda p: _relu_net_loss(plain(p, support), support))(params)
  assert any(bool(jnp.any(jnp.isnan(g))) for g in jax.tree.leaves(bad))


def test_optax_sgd_inner_optimizer_equals_plain_gradient_descent():
  problem = linreg.Problem()
  via_optax = metajax.solvers.unrolled(linreg.loss_fn, steps=4, optimizer=optax.sgd(0.3))
  phi_ref, _ = problem.unrolled(4, 0.3)
  assert linreg.rel_err(linreg.flat(via_optax(problem.params, problem.support)), phi_ref) < 1e-12


def _quadratic(p, b):  # minimum 0 at p = b: Polyak's step knows f* = 0
  return 0.5 * jnp.sum(jnp.array([2.0, 1.0]) * (p - b) ** 2)


def test_optimizers_that_read_the_objective_get_value_and_value_fn():
  theta, target = jnp.array([0.5, 0.5]), jnp.array([1.0, -1.0])
  # optax.polyak_sgd needs value=: its step is min(f / |g|^2, max_lr), written out here.
  adapt = metajax.solvers.unrolled(_quadratic, steps=3,
                                   optimizer=optax.polyak_sgd(max_learning_rate=1.0))
  expected = np.asarray(theta, np.float64)
  for _ in range(3):
    g = np.array([2.0, 1.0]) * (expected - np.asarray(target))
    expected = expected - min(_quadratic(expected, np.asarray(target)) / (g @ g), 1.0) * g
  np.testing.assert_allclose(adapt(theta, target), expected, rtol=1e-6)
  assert jnp.all(jnp.isfinite(jax.grad(lambda t: _quadratic(adapt(t, target), target))(theta)))
  # optax.lbfgs needs value, grad and value_fn: the same iterates as optax's own loop.
  lbfgs = optax.lbfgs()
  adapt = metajax.solvers.unrolled(_quadratic, steps=6, optimizer=lbfgs)
  phi, state = theta, lbfgs.init(theta)
  value_fn = lambda p: _quadratic(p, target)
  for _ in range(6):
    value, grad = jax.value_and_grad(value_fn)(phi)
    updates, state = lbfgs.update(grad, state, phi, value=value, grad=grad, value_fn=value_fn)
    phi = optax.apply_updates(phi, updates)
  np.testing.assert_allclose(adapt(theta, target), phi, rtol=1e-6)
  np.testing.assert_allclose(phi, target, atol=1e-5)  # and it converged


def test_info_reports_support_losses():
  problem = linreg.Problem()
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=6, step_size=0.2)
  phi, info = adapt.solve(problem.params, problem.support)
  losses = info.stats["losses"]
  assert losses.shape == (6,) and int(info.steps) == 6 and bool(info.success)
  assert bool(jnp.all(jnp.diff(losses) < 0))  # GD with a small step decreases the loss
  assert float(info.loss) < float(losses[-1])
  np.testing.assert_allclose(float(info.loss), linreg.loss_fn(phi, problem.support))


@pytest.mark.parametrize("unroll", [True, 1, 3, "auto"])
def test_loop_forms_agree(unroll):
  problem = linreg.Problem()
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=12, step_size=0.2, unroll=unroll)
  phi_ref, _ = problem.unrolled(12, 0.2)
  assert linreg.rel_err(linreg.flat(adapt(problem.params, problem.support)), phi_ref) < 1e-12


def test_auto_loop_form_follows_steps_and_convolutions():
  dense = lambda p, b: jnp.sum(p * b)
  assert _loops.choose_unroll(3, dense, jnp.ones(3), jnp.ones(3)) is True
  assert _loops.choose_unroll(50, dense, jnp.ones(3), jnp.ones(3)) == 1

  def conv(p, b):
    return jnp.sum(jax.lax.conv(b, p, (1, 1), "SAME"))
  kernel, images = jnp.ones((2, 1, 3, 3)), jnp.ones((1, 1, 5, 5))
  assert _loops.uses_convolution(conv, kernel, images)
  assert not _loops.uses_convolution(dense, jnp.ones(3), jnp.ones(3))
  expected = True if jax.default_backend() == "cpu" else 1
  assert _loops.choose_unroll(50, conv, kernel, images) == expected


def test_remat_gives_same_gradient_with_less_saved_memory():
  # Wide activations (256 x 512 per step) dominate the saved residuals; remat keeps only params.
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 8, (512, 1),
                                             activation=jnp.tanh, dtype=jnp.float64)
  loss = metajax.meta.mse_loss(apply_fn)
  support = (jax.random.normal(jax.random.key(1), (256, 8)), jnp.zeros((256, 1)))
  grads, temp_bytes = [], []
  for remat in (False, True):
    # 0.005: at 0.05 these 20 steps diverged (support loss 0.52 -> 1e10), unreported until the
    # unrolled solver checked the loss's rise
    adapt = metajax.solvers.unrolled(loss, steps=20, step_size=0.005, remat=remat, unroll=1)
    f = jax.jit(jax.grad(lambda t: loss(adapt(t, support), support)))
    grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(f(params))]))
    temp_bytes.append(f.lower(params).compile().memory_analysis().temp_size_in_bytes)
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)
  assert temp_bytes[1] < 0.7 * temp_bytes[0]


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 2.5}, "steps must be a Python int"),
    ({"steps": 2, "step_size": -0.1}, "step_size must be >= 0"),
    ({"steps": 2, "step_size": float("nan")}, "step_size must be finite"),
    ({"steps": 2, "step_size": 0.1, "optimizer": optax.sgd(0.1)}, "step_size is only used"),
    ({"steps": 2, "optimizer": "adam"}, "optax GradientTransformation"),
    ({"steps": 2, "unroll": 0}, "unroll must be"),
])
def test_bad_settings_name_the_argument(kwargs, match):
  problem = linreg.Problem()
  with pytest.raises((ValueError, TypeError), match=match):
    metajax.solvers.unrolled(linreg.loss_fn, **kwargs)(problem.params, problem.support)


def test_bad_call_time_step_size_names_the_argument():
  problem = linreg.Problem()
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=2)
  with pytest.raises(ValueError, match="step_size"):
    adapt(problem.params, problem.support, step_size={"w": 0.1})
  with pytest.raises(ValueError, match=r"step_size\['w'\] has shape"):
    adapt(problem.params, problem.support, step_size={"w": jnp.ones(2), "b": 0.1})
  with pytest.raises(TypeError, match="floating-point"):
    adapt({"w": jnp.arange(4), "b": jnp.zeros(())}, problem.support)


def test_reptile_direction_is_theta_minus_mean_adapted():
  problems, support, query = linreg.batch(3, jnp.float64)
  adapt = metajax.solvers.unrolled(linreg.loss_fn, steps=4, step_size=0.2)
  value_and_grad = metajax.meta.reptile_value_and_grad(adapt, linreg.loss_fn)
  _, direction = jax.jit(value_and_grad)(problems[0].params,
                                         metajax.tasks.Task(support, query))
  expected = problems[0].theta - np.mean([p.unrolled(4, 0.2)[0] for p in problems], axis=0)
  assert linreg.rel_err(linreg.flat(direction), expected) < 1e-12
