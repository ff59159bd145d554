"""Experiment flags: config defaults, chunking, Meta-SGD evaluation (the bad-input rows of the
data loaders, flags and checkpoints run in tests/test_bad_inputs.py)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a bare `pytest` puts tests/, not the repository root, on sys.path
  sys.path.insert(0, ROOT)

from tests.bad_inputs_data_cli import CASES, _script  # noqa: E402


def test_table_covers_each_area_with_distinct_inputs():
  assert {c.area for c in CASES} == {"data", "cli", "checkpoints"}
  assert len(CASES) >= 35 and len({c.id for c in CASES}) == len(CASES)


def test_fewshot_resolves_config_defaults_with_is_none():
  args = _script("fewshot").parse_args(["--shots", "5", "--config", "miniimagenet",
                                        "--data-dir", "/data", "--chunk", "30000"])
  assert (args.iterations, args.meta_batch, args.chunk) == (60_000, 2, 30_000)
  args = _script("fewshot").parse_args(["--iterations", "5", "--chunk", "10"])
  assert (args.iterations, args.meta_batch, args.chunk) == (5, 16, 5)  # chunk capped


def test_cosmixture_chunk_larger_than_iterations_trains_them_all():
  """--iterations 5 --chunk 10 used to train nothing and report 5 iterations."""
  args = _script("cosmixture").parse_args(["--iterations", "5", "--chunk", "10"])
  assert args.iterations // args.chunk * args.chunk == 5


def test_compare_methods_gives_every_method_flags_its_script_accepts():
  """The scripts refuse flags a method would ignore (sinusoid.py --solver cavia --inner-lr):
  every run the comparison launches must parse, with the flags it was given."""
  compare = _script("compare_methods")
  args = compare.parse_args([])
  for solver, mlti in compare.ROWS:
    parsed = compare.sinusoid.parse_args(compare.run_flags(solver, mlti, args))
    assert parsed.solver == solver and parsed.iterations == args.sinusoid_iterations
    assert parsed.inner_steps == 5
    for shots in (1, 5):
      parsed = compare.fewshot.parse_args(compare.run_flags(solver, mlti, args, shots))
      assert (parsed.solver, parsed.shots, parsed.mlti) == (solver, shots, mlti)


def test_fewshot_metasgd_finetunes_with_the_learned_step_sizes():
  """Regression: Meta-SGD was evaluated with the scalar config.inner_lr."""
  fewshot = _script("fewshot")
  config = fewshot.CONFIGS["digits"]  # test_steps=3, inner_lr=0.4
  loss = lambda p, batch: 0.5 * jnp.sum((p["w"] - batch) ** 2)
  theta, support = {"w": jnp.zeros(2)}, jnp.ones(2)
  step_size = {"w": jnp.array([0.0, 0.1])}
  meta_params = {"params": theta, "step_size": step_size}
  args = lambda solver: type("Args", (), {"solver": solver})()
  finetune, start = fewshot.make_finetune(args("metasgd"), config, loss, meta_params,
                                          ("step_size",))
  assert start is theta
  # Three steps of per-parameter GD on 0.5 (w - 1)^2: w = 1 - (1 - a)^3.
  np.testing.assert_allclose(jax.jit(finetune)(theta, support)["w"], [0.0, 1 - 0.9 ** 3],
                             rtol=1e-6)
  maml, _ = fewshot.make_finetune(args("maml"), config, loss, theta, ())
  np.testing.assert_allclose(maml(theta, support)["w"], [1 - 0.6 ** 3] * 2, rtol=1e-6)


def test_fewshot_imaml_and_adjoint_train_and_test_with_their_configured_protocols():
  """Digits: iMAML tests as its paper does (reg 0, 12 GD steps of 0.2), the adjoint trains on 2
  Euler steps to t1=0.8 and tests on MAML's horizon (3 steps of 0.4). On 0.5 (w - 1)^2 from 0, k
  GD steps of a give w = 1 - (1 - a)^k."""
  fewshot, common = _script("fewshot"), _script("common")
  config = fewshot.CONFIGS["digits"]
  loss = lambda p, batch: 0.5 * jnp.sum((p["w"] - batch) ** 2)
  theta, support = {"w": jnp.zeros(2)}, jnp.ones(2)
  args = lambda solver: type("Args", (), {"solver": solver})()
  imaml, start = fewshot.make_finetune(args("imaml"), config, loss, theta, ())
  assert start is theta
  np.testing.assert_allclose(imaml(theta, support)["w"], [1 - 0.8 ** 12] * 2, rtol=1e-6)
  adjoint, _ = fewshot.make_finetune(args("adjoint"), config, loss, theta, ())
  np.testing.assert_allclose(adjoint(theta, support)["w"], [1 - 0.6 ** 3] * 2, rtol=1e-5)
  train, _ = common.make_adapt(fewshot.solver_args(args("adjoint"), config), loss)
  np.testing.assert_allclose(train(theta, support)["w"], [1 - 0.6 ** 2] * 2, rtol=1e-5)
  sargs = fewshot.solver_args(args("imaml"), config)
  assert (sargs.reg, sargs.cg_steps, sargs.inner_steps, sargs.inner_lr) == (1.0, 3, 5, 0.2)


def test_official_ridge_solves_imaml_official_damped_operator():
  """imaml_dev solves (2 I + H / (reg + 10)) y = v; cg with official_ridge(reg) on I + H / reg
  must give reg / (reg + 10) * y, also for an indefinite H."""
  fewshot = _script("fewshot")
  assert fewshot.official_ridge(2.0) == 11.0
  reg = 1.0
  a = np.random.default_rng(0).normal(size=(6, 6))
  hessian = (a + a.T) * 2.0  # eigenvalues of both signs
  v = np.arange(1.0, 7.0)
  official = np.linalg.solve(2 * np.eye(6) + hessian / (reg + 10), v)
  solve = metajax.solvers.linear_solvers.cg(maxiter=6, tol=0.0, ridge=fewshot.official_ridge(reg))
  with jax.enable_x64():
    ours = solve(lambda x: x + jnp.asarray(hessian) @ x / reg, jnp.asarray(v))
  np.testing.assert_allclose(ours, reg / (reg + 10) * official, rtol=1e-8)


def test_amaml_pools_are_standardized_and_tasks_come_from_them():
  amaml = _script("amaml")
  train, test = amaml.make_pools("cos_mixture2d", 6, jax.random.key(0), dtype=jnp.float32)
  assert train[0].shape == (6, 2 * amaml.POOL_POINTS, 2) and train[1].shape[-1] == 1
  for a in train:  # standardized with the meta-train pool's statistics
    np.testing.assert_allclose(a.mean((0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(a.std((0, 1)), 1.0, atol=1e-4)
  assert not np.allclose(train[1][:, :5], test[1][:, :5])  # different functions
  tasks = amaml.pool_sampler(7, 3)(jax.random.key(1), 4, *train)
  assert tasks.support[0].shape == (4, 7, 2) and tasks.query[1].shape == (4, 3, 1)
  # every support point is a point of the pool's first half, every query of the second half
  xs = np.asarray(tasks.support[0]).reshape(-1, 2)
  pool_x = np.asarray(train[0])
  first = pool_x[:, :amaml.POOL_POINTS].reshape(-1, 2)
  second = pool_x[:, amaml.POOL_POINTS:].reshape(-1, 2)
  assert all(np.any(np.all(np.isclose(first, x), -1)) for x in xs)
  xq = np.asarray(tasks.query[0]).reshape(-1, 2)
  assert all(np.any(np.all(np.isclose(second, x), -1)) for x in xq)


def test_amaml_adjoint_memory_is_flat_in_trajectory_length_and_maml_grows():
  """A-MAML's memory claim at a small scale (2 and 16 inner steps), and one short run."""
  amaml = _script("amaml")
  args = amaml.parse_args(["--iterations", "2", "--chunk", "1", "--tasks", "4",
                           "--meta-batch", "2", "--shots", "5", "--queries", "5"])
  pools = amaml.make_pools("cos_mixture", 4, jax.random.key(0), dtype=jnp.float32)
  params, apply_fn = __import__("metajax").models.make_mlp(
      jax.random.key(1), 1, (8, 1), activation=jnp.tanh)
  loss = __import__("metajax").meta.mse_loss(apply_fn)
  batch = amaml.pool_sampler(5, 5)(jax.random.key(2), 2, *pools[0])
  peak = {(name, k): amaml.peak_memory_mb(amaml.meta_gradient(name, loss, k, args)[1], params,
                                          batch)
          for name in ("maml", "adjoint") for k in (2, 16)}
  assert peak["adjoint", 16] <= 1.2 * peak["adjoint", 2]
  assert peak["maml", 16] > 2 * peak["maml", 2]
  row = amaml.run_one("maml", 2, args, params, apply_fn, pools, jax.random.key(2))
  assert np.isfinite(row["rmse"]) and row["ci95"] > 0 and row["peak_mb"] == peak["maml", 2]


def _recipe(solver, classification, **flags):
  import argparse
  recipes = _script("recipes")
  args = argparse.Namespace(solver=solver, inner_steps=2, inner_lr=0.1, meta_lr=1e-3,
                            iterations=20, reg=2.0, cg_steps=2, cg_ridge=0.0, t1=None,
                            context_size=3, context_lr=1.0, **flags)
  if classification:
    module = lambda context: metajax.models.init_model(
        metajax.models.Conv4(3, filters=4, blocks=2, context=context), jax.random.key(0),
        (8, 8, 1))
    loss_of, outputs = metajax.meta.cross_entropy_loss, 3
  else:
    module = lambda extra: metajax.models.make_mlp(jax.random.key(0), in_features=1 + extra,
                                                   features=(8, 1))
    loss_of, outputs = metajax.meta.mse_loss, 1
  return recipes.build(args, module, loss_of, jax.random.key(1), outputs=outputs,
                       classification=classification)


@pytest.mark.parametrize("solver, classification", [
    ("anil", False), ("boil", False), ("mamlpp", False), ("cavia", False), ("ml3", False),
    ("anil", True), ("cavia", True)])  # the conv paths that differ (ml3's: below)
def test_every_method_recipe_trains_and_finetunes(solver, classification):
  images = jax.random.uniform(jax.random.key(2), (6, 4, 8, 8, 1))
  recipe = _recipe(solver, classification)
  sample = (metajax.tasks.episodes(ways=3, shots=1, queries=2) if classification
            else metajax.tasks.interpolate(metajax.tasks.sinusoid(num_support=4, num_query=4)))
  data = (images,) if classification else ()
  opt = optax.adam(1e-3)
  step = metajax.meta.make_train_step(recipe.value_and_grad, opt, sample, meta_batch_size=2)
  state = metajax.meta.init_train_state(recipe.meta_params, opt)
  state, losses = step(state, jax.random.key(0), *data)
  assert bool(jnp.isfinite(losses).all())
  finetune, theta = recipe.finetune(state.meta_params, 2)
  tasks = sample(jax.random.key(3), 2, *data)
  phi = jax.jit(finetune)(theta, jax.tree.map(lambda x: x[0], tasks.support))
  assert bool(jnp.isfinite(recipe.loss_fn(phi, jax.tree.map(lambda x: x[0], tasks.query))))
  head = [k for k in theta if k.startswith("Dense")][-1] if solver in ("anil", "boil") else None
  if solver == "anil":  # only the head moved
    assert all(bool(jnp.all(phi[k]["kernel"] == theta[k]["kernel"]))
               for k in theta if k != head and "kernel" in theta[k])
  if solver == "boil":
    assert bool(jnp.all(phi[head]["kernel"] == theta[head]["kernel"]))
  if solver == "cavia":
    assert phi["context"].shape == (3,) and bool(jnp.any(phi["context"] != 0))
  if solver == "mamlpp":
    assert jax.tree.leaves(state.meta_params["step_size"])[0].shape == (2,)


def test_ml3_classification_loss_starts_as_the_task_loss_and_can_learn():
  recipes = _script("recipes")
  apply_fn = lambda p, x: x @ p
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  inner = recipes.ml3_inner_loss(loss, apply_fn, classification=True)
  psi = recipes.ml3_init(jax.random.key(0), 2 * 3, jnp.float32)
  theta = jax.random.normal(jax.random.key(1), (4, 3))
  batch = (jax.random.normal(jax.random.key(2), (6, 4)), jnp.arange(6) % 3)
  assert float(inner(theta, batch, psi)) == float(loss(theta, batch))  # last layer starts at 0
  grad_w2 = jax.grad(lambda q: inner(theta, batch, q))(psi)["w2"]
  assert float(jnp.abs(grad_w2).max()) > 0


@pytest.mark.parametrize("solver", ["imaml", "adjoint"])
def test_fewshot_trains_and_evaluates_imaml_and_adjoint(solver, tmp_path):
  """End to end on digits with the config's iMAML / adjoint settings (the adjoint once failed
  here with 'Execution supplied 19 arguments but compiled program expected 24')."""
  result = _script("fewshot").main(["--solver", solver, "--iterations", "2", "--meta-batch", "2",
                                    "--eval-tasks", "4", "--out", str(tmp_path)])
  assert result["iterations"] == 2 and 0.0 <= result["accuracy"] <= 1.0
