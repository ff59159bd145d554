"""Task families, meta-objectives, the jitted train step, evaluation, the sinusoid experiment."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sinusoid_family_uses_maml_ranges_on_device():
  sample = jax.jit(metajax.tasks.sinusoid(num_support=10, num_query=15), static_argnums=1)
  tasks = sample(jax.random.key(0), 2000)
  (xs, ys), (xq, yq) = tasks
  assert xs.shape == (2000, 10, 1) and xq.shape == (2000, 15, 1)
  x = np.concatenate([xs, xq], 1)
  assert -5 <= x.min() < -4.9 and 4.9 < x.max() <= 5
  amplitude = np.abs(np.concatenate([ys, yq], 1)).max(axis=(1, 2))
  assert amplitude.max() <= 5.0 and amplitude.max() > 4.5
  # y = A sin(x - phase) with phase in [0, pi]: recover A and phase per task by least squares.
  basis = np.concatenate([np.sin(x), np.cos(x)], 2)[..., :]
  y = np.concatenate([ys, yq], 1)[..., 0]
  coef = np.stack([np.linalg.lstsq(b, t, rcond=None)[0] for b, t in zip(basis, y)])
  amp, phase = np.hypot(coef[:, 0], coef[:, 1]), np.arctan2(-coef[:, 1], coef[:, 0])
  assert 0.1 - 1e-4 <= amp.min() and amp.max() <= 5.0 + 1e-4
  assert -1e-4 <= phase.min() and phase.max() <= np.pi + 1e-4


def test_cos_mixture_family_matches_its_formula():
  tasks = metajax.tasks.cos_mixture(num_support=50, num_query=50)(jax.random.key(1), 100)
  x, y = tasks.support
  assert float(jnp.abs(x).max()) <= 1.0
  # y + x^2 = -c cos(...) with c in [0.1, 1]
  assert float(jnp.abs(y + x ** 2).max()) <= 1.0 + 1e-6


def _training_setup(meta_batch_size=4, iterations=1, tasks_per_call="auto"):
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.01)
  traces = []

  def sample(key, n):
    traces.append(1)  # runs once per trace of the train step
    return metajax.tasks.sinusoid()(key, n)

  optimizer = optax.adam(1e-3)
  step = metajax.meta.make_train_step(
      jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)), optimizer, sample,
      meta_batch_size=meta_batch_size, iterations=iterations, tasks_per_call=tasks_per_call)
  return step, metajax.meta.init_train_state(params, optimizer), traces


def test_train_step_compiles_once_and_never_copies_from_host():
  step, state, traces = _training_setup()
  keys = list(jax.random.split(jax.random.key(0), 5))  # slicing happens outside the guard
  state, _ = step(state, keys[0])
  traced = len(traces)  # the first call traces (and may trace once more to pick tasks_per_call)
  with jax.transfer_guard("disallow"):  # any implicit host<->device copy raises
    for key in keys[1:]:
      state, losses = step(state, key)
  assert len(traces) == traced <= 2
  assert step.tasks_per_call is None  # an MLP: the whole meta-batch is one program
  assert step.cache_sizes() == {"step": 1}
  assert int(state.step) == 5 and losses.shape == (1,)


def test_grouped_tasks_per_call_equal_one_program_and_compile_once():
  with jax.enable_x64():
    whole, state, _ = _training_setup(meta_batch_size=6, iterations=2, tasks_per_call=None)
    grouped, _, traces = _training_setup(meta_batch_size=6, iterations=2, tasks_per_call=2)
    state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
    key = jax.random.key(5)
    s_whole, l_whole = whole(state, key)
    s_grouped, l_grouped = grouped(state, key)
    traced = len(traces)
    with jax.transfer_guard("disallow"):
      s_grouped, l_grouped2 = grouped(s_grouped, key)
    s_whole, l_whole2 = whole(s_whole, key)
  assert len(traces) == traced
  assert grouped.cache_sizes() == {"sample": 1, "tasks": 1, "update": 1}
  assert l_grouped.shape == (2,) and int(s_grouped.step) == 4
  chex.assert_trees_all_close(s_grouped.meta_params, s_whole.meta_params, rtol=1e-10)
  np.testing.assert_allclose(jnp.concatenate([l_grouped, l_grouped2]),
                             jnp.concatenate([l_whole, l_whole2]), rtol=1e-10)


def test_tasks_per_call_must_divide_meta_batch():
  with pytest.raises(ValueError, match="tasks_per_call \\(4\\) must divide meta_batch_size"):
    _training_setup(meta_batch_size=6, tasks_per_call=4)
  with pytest.raises(ValueError, match="tasks_per_call"):
    _training_setup(tasks_per_call=0)


def test_fused_iterations_equal_separate_calls():
  single, state, _ = _training_setup()
  fused, _, _ = _training_setup(iterations=3)
  key = jax.random.key(3)
  s_fused, losses = fused(state, key)
  s_single = state
  for _ in range(3):
    s_single, _ = single(s_single, key)
  chex.assert_trees_all_close(s_fused.meta_params, s_single.meta_params, rtol=1e-5, atol=1e-7)
  assert losses.shape == (3,)


def test_meta_training_reduces_query_loss():
  step, state, _ = _training_setup(meta_batch_size=25, iterations=500)
  state, first = step(state, jax.random.key(0))
  state, last = step(state, jax.random.key(1))
  assert float(last[-100:].mean()) < 0.8 * float(first[:100].mean())


def test_learned_step_size_receives_gradient():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  adapt = metajax.solvers.unrolled(loss, steps=1)
  objective = metajax.meta.meta_objective(adapt, loss, learn=("step_size",))
  meta_params = {"params": params, "step_size": jax.tree.map(lambda p: 0 * p + 0.01, params)}
  tasks = metajax.tasks.sinusoid()(jax.random.key(0), 8)
  grads = jax.grad(objective)(meta_params, tasks)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["step_size"]))
  with pytest.raises(ValueError, match="meta_params must be a dict"):
    objective(params, tasks)


def test_python_numbers_among_meta_params_become_float_arrays():
  """reg=2 is the number 2.0 to learn, as reg=2.0 is (not an int32 leaf grad refuses)."""
  params = {"w": jnp.ones(2, jnp.float32)}
  for reg in (2, 2.0):
    state = metajax.meta.init_train_state({"params": params, "reg": reg}, optax.adam(1e-3))
    assert state.meta_params["reg"].dtype == jnp.float32 and float(state.meta_params["reg"]) == 2
  with pytest.raises(TypeError, match=r"meta_params\['flag'\] \(bool\)"):
    metajax.meta.init_train_state({"params": params, "flag": True}, optax.adam(1e-3))


def test_confidence_interval_is_normal_approximation():
  values = np.random.default_rng(0).normal(size=400)
  mean, half = metajax.meta.confidence_interval(values)
  assert mean == pytest.approx(values.mean(), rel=1e-6)
  assert half == pytest.approx(1.959964 * values.std(ddof=1) / 20, rel=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    metajax.meta.confidence_interval([1.0])
  # any real level, a numpy scalar (e.g. read from a config array) too
  assert metajax.meta.confidence_interval(values, level=np.float32(0.9)) == pytest.approx(
      metajax.meta.confidence_interval(values, level=0.9), rel=1e-6)


def test_evaluate_reports_per_task_mean():
  loss = metajax.meta.mse_loss(lambda p, x: p * x)
  adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.0)
  tasks = metajax.tasks.sinusoid()(jax.random.key(0), 16)
  mean, half = metajax.meta.evaluate(adapt, loss, jnp.zeros(()), tasks)
  expected = jnp.mean(tasks.query[1] ** 2, axis=(1, 2))
  assert mean == pytest.approx(float(expected.mean()), rel=1e-5) and half > 0


def test_evaluate_twice_with_the_same_functions_compiles_once():
  """``evaluate`` used to build a new ``jit`` (and compile for ~60 s) on every call."""
  traces = []
  loss = metajax.meta.mse_loss(lambda p, x: p * x)

  def metric(params, batch):
    traces.append(1)  # runs when the evaluation program is traced
    return loss(params, batch)

  adapt = metajax.solvers.implicit(loss, reg=1.0)
  sample = metajax.tasks.sinusoid()
  first = metajax.meta.evaluate(adapt, metric, jnp.zeros(()), sample(jax.random.key(0), 30),
                                chunk=10)
  traced = len(traces)
  second = metajax.meta.evaluate(adapt, metric, jnp.ones(()), sample(jax.random.key(1), 30),
                                 chunk=10)
  assert traced >= 1 and len(traces) == traced  # the second call reused the compiled program
  assert first != second
  metajax.meta.evaluate(adapt, metric, jnp.ones(()), sample(jax.random.key(1), 30), chunk=15)
  assert len(traces) > traced  # a new chunk size is a new shape: compiled again


@pytest.mark.parametrize("solver", ["fomaml", "metasgd", "reptile", "imaml", "adjoint"])
def test_sinusoid_experiment_runs_end_to_end(solver, tmp_path, experiment_env):
  out = tmp_path / solver
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "sinusoid.py"), "--solver", solver,
         "--iterations", "40", "--chunk", "20", "--eval-tasks", "20", "--out", str(out)]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=experiment_env)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads((out / "results.json").read_text())
  assert [row["steps"] for row in result["rows"]] == [1, 5, 10]
  assert all(np.isfinite(row["mse"]) and row["ci95"] > 0 for row in result["rows"])
  lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [line["event"] for line in lines] == ["config", "train", "train", "eval"]
  assert (out / "adaptation.png").stat().st_size > 1000
  assert "| 10 |" in run.stdout


def test_sinusoid_experiment_with_defaults_meets_the_maml_paper(tmp_path, release_env):
  """The README's main job, unchanged: 70,000 meta-iterations (~40 s on 2 cores), 600 test tasks
  (MAML's run through the script; the other solvers run short in the test above)."""
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "sinusoid.py"), "--out", str(tmp_path)]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=release_env)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads((tmp_path / "results.json").read_text())
  assert [row["steps"] for row in result["rows"]] == [1, 5, 10]
  for row in result["rows"]:  # MAML paper: 0.67 / 0.38 / 0.35
    assert row["mse"] <= row["paper"], result["rows"]
  log = (tmp_path / "metrics.jsonl").read_text().splitlines()
  events = [json.loads(line)["event"] for line in log]
  assert events[0] == "config" and events[-1] == "eval" and set(events[1:-1]) == {"train"}
  assert (tmp_path / "adaptation.png").stat().st_size > 1000 and "| 10 |" in run.stdout


def test_cosmixture_experiment_compares_all_solvers(tmp_path, experiment_env):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "cosmixture.py"), "--iterations", "20",
         "--chunk", "10", "--eval-tasks", "20", "--inner-steps", "3", "--out", str(tmp_path)]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=experiment_env)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["solver"] for r in rows] == ["maml", "fomaml", "imaml", "adjoint"]
  assert all(np.isfinite(r["rmse"]) and r["ci95"] > 0 for r in rows)
  assert "| adjoint |" in run.stdout


def test_make_mlp_maml_kernel_init_is_truncated_normal_with_zero_biases():
  params, _ = metajax.models.make_mlp(jax.random.key(0),
                                      kernel_init=metajax.models.MAML_KERNEL_INIT)
  kernels = jnp.concatenate([layer["kernel"].ravel() for layer in params.values()])
  assert float(jnp.abs(kernels).max()) <= 0.02  # truncated at 2 standard deviations of 0.01
  assert 0.007 < float(kernels.std()) < 0.01  # truncation shrinks the std to ~0.0088
  assert all(float(jnp.abs(layer["bias"]).max()) == 0.0 for layer in params.values())
  default, _ = metajax.models.make_mlp(jax.random.key(0))
  assert float(default["Dense_1"]["kernel"].std()) > 0.1  # LeCun normal: 1/sqrt(40)
