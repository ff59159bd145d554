"""MAML++ (per-step rates, multi-step loss, annealing) and task interpolation (MLTI).

MAML++'s pieces are checked against the closed-form recurrence of gradient descent on linear
regression (``phi <- phi - D_k (A phi - c)``, tests/linreg.py), differentiated with ``jnp``;
the multi-step loss weights against a transcription of MAML++'s own code. MLTI's mixed tasks are
checked to be convex combinations of two tasks of the batch by recovering the pair and the weight.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import metajax
from tests import linreg

S, M = metajax.solvers, metajax.meta
K = 3


def recurrence(problem, theta_flat, rates_per_step, scales=None):
  """phi_1..phi_K of GD with per-step, per-leaf rates ``rates_per_step[k] = (a_w, a_b)``."""
  A, c = jnp.asarray(problem.A), jnp.asarray(problem.c)
  d = A.shape[0] - 1
  phis, phi = [], theta_flat
  for k, (a_w, a_b) in enumerate(rates_per_step):
    rate = jnp.concatenate([jnp.full(d, a_w), jnp.full(1, a_b)])
    scale = 1.0 if scales is None else scales[k]
    phi = phi - rate * scale * (A @ phi - c)
    phis.append(phi)
  return phis


def query_loss(problem, phi_flat):
  return linreg.loss_fn(linreg.unflat_jnp(phi_flat), problem.query)


RATES = {"w": jnp.asarray([0.3, 0.1, 0.5]), "b": jnp.asarray([0.2, 0.4, 0.05])}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_per_layer_per_step_rates_match_closed_form(dtype):
  problem = linreg.Problem(dtype=dtype)
  adapt = S.unrolled(linreg.loss_fn, steps=K, per_step=True)
  rates = jax.tree.map(lambda a: a.astype(dtype), RATES)
  phi = adapt(problem.params, problem.support, step_size=rates)
  theta = jnp.asarray(problem.theta)
  ref = lambda r: recurrence(problem, theta, list(zip(r["w"], r["b"])))[-1]
  tol = 1e-12 if dtype == jnp.float64 else 1e-5
  assert linreg.rel_err(linreg.flat(phi), ref(RATES)) <= tol

  outer = lambda r: linreg.loss_fn(adapt(problem.params, problem.support, step_size=r),
                                   problem.query)
  grads = jax.jit(jax.grad(outer))(rates)
  grads_ref = jax.grad(lambda r: query_loss(problem, ref(r)))(RATES)
  assert grads["w"].shape == (K,) and grads["w"].dtype == dtype
  for name in ("w", "b"):
    assert linreg.rel_err(grads[name], grads_ref[name]) <= tol * 10


def test_one_rate_per_step_for_all_parameters_and_learned_lslr():
  problem = linreg.Problem()
  theta = jnp.asarray(problem.theta)
  per_step = jnp.asarray([0.3, 0.1, 0.5])
  adapt = S.unrolled(linreg.loss_fn, steps=K, per_step=True, step_size=per_step)
  ref = recurrence(problem, theta, [(a, a) for a in per_step])[-1]
  assert linreg.rel_err(linreg.flat(adapt(problem.params, problem.support)), ref) <= 1e-12

  lslr = M.lslr_step_sizes(problem.params, K, 0.2)
  assert jax.tree.map(jnp.shape, lslr) == {"w": (K,), "b": (K,)}
  tasks = metajax.tasks.Task(jax.tree.map(lambda a: a[None], problem.support),
                             jax.tree.map(lambda a: a[None], problem.query))
  objective = M.meta_objective(adapt, linreg.loss_fn, learn={"step_size": "log"})
  meta_params = {"params": problem.params, "step_size": jax.tree.map(jnp.log, lslr)}
  grads = jax.grad(objective)(meta_params, tasks)
  grads_ref = jax.grad(lambda log_r: query_loss(problem, recurrence(
      problem, theta, list(zip(jnp.exp(log_r["w"]), jnp.exp(log_r["b"]))))[-1]))(
          meta_params["step_size"])
  for name in ("w", "b"):
    assert linreg.rel_err(grads["step_size"][name], grads_ref[name]) <= 1e-10


def test_multi_step_objective_matches_closed_form_and_reduces_to_maml():
  problems, support, query = linreg.batch(3, jnp.float64)
  tasks = metajax.tasks.Task(support, query)
  adapt = S.unrolled(linreg.loss_fn, steps=K, step_size=0.25)
  objective = M.multi_step_objective(adapt, linreg.loss_fn)
  weights = jnp.asarray([0.2, 0.3, 0.5])

  def reference(theta_flat):
    return sum(sum(w * query_loss(p, phi) for w, phi in zip(
        weights, recurrence(p, theta_flat, [(0.25, 0.25)] * K))) for p in problems) / 3

  theta = problems[0].params
  value, grads = jax.jit(jax.value_and_grad(objective))(theta, tasks, weights)
  value_ref, grads_ref = jax.value_and_grad(reference)(jnp.asarray(problems[0].theta))
  assert linreg.rel_err(value, value_ref) <= 1e-12
  assert linreg.rel_err(linreg.flat(grads), grads_ref) <= 1e-12

  final_only = jnp.asarray([0.0, 0.0, 1.0])
  maml = jax.value_and_grad(M.meta_objective(adapt, linreg.loss_fn))(theta, tasks)
  msl = jax.value_and_grad(objective)(theta, tasks, final_only)
  assert linreg.rel_err(msl[0], maml[0]) <= 1e-14
  assert linreg.rel_err(linreg.flat(msl[1]), linreg.flat(maml[1])) <= 1e-14


def test_step_aware_multi_step_loss_passes_the_step_to_the_query_loss():
  """MAML++ evaluates the query after step k with step k's batch norm: loss_fn(phi, q, k)."""
  problems, support, query = linreg.batch(2, jnp.float64)
  scaled = lambda p, b, k: (k + 1.0) * linreg.loss_fn(p, b)
  adapt = S.unrolled(scaled, steps=K, step_size=0.1, step_aware=True)
  objective = M.multi_step_objective(adapt, scaled)
  weights = jnp.asarray([0.5, 0.25, 0.25])
  value = objective(problems[0].params, metajax.tasks.Task(support, query), weights)
  theta = jnp.asarray(problems[0].theta)
  ref = sum(sum(w * (k + 1) * query_loss(p, phi) for k, (w, phi) in enumerate(zip(
      weights, recurrence(p, theta, [(0.1, 0.1)] * K, scales=[1.0, 2.0, 3.0]))))
      for p in problems) / 2
  assert linreg.rel_err(value, ref) <= 1e-12


def maml_pp_reference_weights(steps, epoch, anneal_epochs):
  """MAML++'s get_per_step_loss_importance_vector (AntreasAntoniou/HowToTrainYourMAMLPytorch)."""
  loss_weights = np.ones(shape=(steps,)) * (1.0 / steps)
  decay_rate = 1.0 / steps / anneal_epochs
  min_value_for_non_final_losses = 0.03 / steps
  for i in range(len(loss_weights) - 1):
    loss_weights[i] = np.maximum(loss_weights[i] - (epoch * decay_rate),
                                 min_value_for_non_final_losses)
  loss_weights[-1] = np.minimum(loss_weights[-1] + (epoch * (steps - 1) * decay_rate),
                                1.0 - ((steps - 1) * min_value_for_non_final_losses))
  return loss_weights


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_msl_weights_follow_maml_plus_plus_schedule(steps):
  for it in (0, 1, 7, 30, 99):
    got = np.asarray(M.msl_weights(steps, it, 100))
    np.testing.assert_allclose(got, maml_pp_reference_weights(steps, it, 100), atol=1e-7)
    assert abs(got.sum() - 1) < 1e-6
  for it in (100, 5000):
    assert np.asarray(M.msl_weights(steps, it, 100)).tolist() == [0.0] * (steps - 1) + [1.0]
  traced = jax.jit(lambda i: M.msl_weights(steps, i, 100))(jnp.int32(30))
  np.testing.assert_allclose(traced, maml_pp_reference_weights(steps, 30, 100), atol=1e-7)


def test_maml_plus_plus_anneals_derivative_order_inside_one_compiled_step():
  problems, support, query = linreg.batch(4, jnp.float64)
  theta = problems[0].params
  adapt = S.unrolled(linreg.loss_fn, steps=K, step_size=0.25)
  vg = M.maml_plus_plus(adapt, linreg.loss_fn, msl_iterations=4, first_order_iterations=2)
  assert vg.takes_meta_iteration is True
  tasks = metajax.tasks.Task(support, query)
  fo = S.unrolled(linreg.loss_fn, steps=K, step_size=0.25, first_order=True)
  by_order = {solver: jax.jit(jax.value_and_grad(M.multi_step_objective(solver, linreg.loss_fn)))
              for solver in (fo, adapt)}
  jit_vg = jax.jit(vg)
  for it in range(6):
    w = M.msl_weights(K, it, 4)
    expected = by_order[fo if it < 2 else adapt](theta, tasks, w)
    got = jit_vg(theta, tasks, jnp.int32(it))
    assert linreg.rel_err(got[0], expected[0]) <= 1e-13
    assert linreg.rel_err(linreg.flat(got[1]), linreg.flat(expected[1])) <= 1e-13
  first = jax.grad(M.multi_step_objective(fo, linreg.loss_fn))(theta, tasks, M.msl_weights(K, 0, 4))
  second = jax.grad(M.multi_step_objective(adapt, linreg.loss_fn))(theta, tasks,
                                                                  M.msl_weights(K, 0, 4))
  assert linreg.rel_err(linreg.flat(first), linreg.flat(second)) > 1e-3  # the orders differ

  # In the train step the schedule runs on device: one compilation across the switch, and the
  # trajectory equals applying the expected meta-gradients by hand.
  sample = lambda key, n: metajax.tasks.Task(support, query)
  opt = optax.sgd(0.1)
  step = M.make_train_step(vg, opt, sample, meta_batch_size=4, iterations=3)
  state = M.init_train_state(theta, opt)
  for _ in range(2):
    state, _ = step(state, jax.random.key(0))
  assert step.cache_sizes() == {"step": 1}
  params = theta
  for it in range(6):
    g = by_order[fo if it < 2 else adapt](params, tasks, M.msl_weights(K, it, 4))[1]
    params = jax.tree.map(lambda p, gi: p - 0.1 * gi, params, g)
  assert linreg.rel_err(linreg.flat(state.meta_params), linreg.flat(params)) <= 1e-12


# -- MLTI ----------------------------------------------------------------------------------------
def _find_pair(mixed, tasks, i):
  """(j, lam) with mixed[i] == lam * tasks[i] + (1 - lam) * tasks[j], or None."""
  flat = lambda t, k: jnp.concatenate([jnp.ravel(x[k]) for x in jax.tree.leaves(t)
                                       if jnp.issubdtype(x.dtype, jnp.floating)])
  m, a = np.asarray(flat(mixed, i), np.float64), np.asarray(flat(tasks, i), np.float64)
  for j in range(jax.tree.leaves(tasks)[0].shape[0]):
    if j == i:
      continue
    b = np.asarray(flat(tasks, j), np.float64)
    lam = float(np.dot(m - b, a - b) / np.dot(a - b, a - b))
    if np.linalg.norm(lam * a + (1 - lam) * b - m) <= 1e-5 * np.linalg.norm(m):
      return j, lam
  return None


def test_mixed_regression_tasks_are_convex_combinations_of_two_tasks():
  tasks = metajax.tasks.sinusoid(dtype=jnp.float64)(jax.random.key(0), 6)
  mixed = jax.jit(lambda k, t: metajax.tasks.mix_tasks(k, t, alpha=0.5))(jax.random.key(1), tasks)
  for i in range(6):
    found = _find_pair(mixed, tasks, i)
    assert found is not None, f"mixed task {i} is not lam * T_{i} + (1 - lam) * T_j"
    assert 0.0 <= found[1] <= 1.0


def test_mixing_weights_follow_the_beta_distribution():
  n = 4000
  tasks = metajax.tasks.Task((jnp.ones((n, 1)), jnp.arange(n, dtype=jnp.float64)[:, None]),
                             (jnp.ones((n, 1)), jnp.zeros((n, 1))))
  mixed = metajax.tasks.mix_tasks(jax.random.key(2), tasks, alpha=0.5)
  assert bool(jnp.all(mixed.support[0] == 1.0))  # equal inputs stay equal
  assert bool(jnp.all((mixed.support[1] >= 0) & (mixed.support[1] <= n - 1)))
  # The weights' law, read off a two-task batch (task 0's partner is task 1):
  pair = metajax.tasks.Task(jnp.asarray([[1.0], [0.0]]), jnp.asarray([[0.0], [0.0]]))
  lams = jax.vmap(lambda k: metajax.tasks.mix_tasks(k, pair, alpha=0.5).support[0, 0])(
      jax.random.split(jax.random.key(3), n))
  assert scipy.stats.kstest(np.asarray(lams), scipy.stats.beta(0.5, 0.5).cdf).pvalue > 1e-3


def test_mixed_episodes_keep_aligned_labels_and_mix_images():
  images = jax.random.uniform(jax.random.key(0), (8, 6, 5, 5, 1))
  family = metajax.tasks.episodes(ways=3, shots=2, queries=2)
  tasks = family(jax.random.key(1), 4, images)
  mixed = metajax.tasks.interpolate(family, alpha=2.0)(jax.random.key(1), 4, images)
  base = family(jax.random.split(jax.random.key(1))[0], 4, images)
  assert bool(jnp.all(mixed.support[1] == base.support[1]))
  for i in range(4):
    assert _find_pair(mixed, base, i) is not None
  assert not bool(jnp.all(mixed.support[0] == tasks.support[0]))


def test_misaligned_integer_labels_raise_under_jit():
  x = jnp.ones((2, 3, 2))
  labels = jnp.asarray([[0, 1, 2], [2, 1, 0]])
  tasks = metajax.tasks.Task((x, labels), (x, labels))
  with pytest.raises(Exception, match="integer labels of paired tasks differ"):
    jax.block_until_ready(jax.jit(metajax.tasks.mix_tasks)(jax.random.key(0), tasks))


def test_interpolated_family_trains_in_one_compiled_step():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), features=(8, 1))
  loss = M.mse_loss(apply_fn)
  vg = jax.value_and_grad(M.meta_objective(S.unrolled(loss, steps=1, step_size=0.01), loss))
  opt = optax.adam(1e-3)
  step = M.make_train_step(vg, opt, metajax.tasks.interpolate(metajax.tasks.sinusoid()),
                           meta_batch_size=4, iterations=2)
  state = M.init_train_state(params, opt)
  for _ in range(2):
    state, losses = step(state, jax.random.key(0))
  assert step.cache_sizes() == {"step": 1} and bool(jnp.all(jnp.isfinite(losses)))


def test_maml_plus_plus_with_per_step_batch_norm_trains_every_steps_row():
  """Step k's support and query both use batch-norm row k (select_step), so after one
  meta-gradient every row 0..K-1 has moved and no other."""
  module = metajax.models.Conv4(3, filters=4, blocks=1, norm="per_step", num_steps=3)
  params, apply_fn = metajax.models.init_model(module, jax.random.key(0), (4, 4, 1))
  loss = lambda p, b, k: M.cross_entropy_loss(apply_fn)(metajax.models.select_step(p, k), b)
  adapt = S.unrolled(loss, steps=2, step_size=0.1, step_aware=True)
  vg = M.maml_plus_plus(adapt, loss, msl_iterations=10)
  x = jax.random.normal(jax.random.key(1), (2, 6, 4, 4, 1))
  labels = jnp.tile(jnp.arange(3), (2, 2))
  tasks = metajax.tasks.Task((x, labels), (x, labels))
  _, grads = jax.jit(vg)(params, tasks, jnp.int32(0))
  row_norms = jnp.abs(grads["BatchNorm_0"]["scale"]).sum(axis=1)
  assert float(row_norms[0]) > 0 and float(row_norms[1]) > 0 and float(row_norms[2]) == 0
