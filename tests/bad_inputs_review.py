"""Bad inputs found by a review of the landed API as a demanding user (see tests/badinput.py)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax
from experiments.checkpoints import CheckpointError
from metajax.solvers import inner_optimizers, linear_solvers
from tests.bad_inputs_data_cli import _cli, _mini, _mini_root, _script
from tests.badinput import Case

S, M = metajax.solvers, metajax.meta
RUNTIME = (RuntimeError, jax.errors.JaxRuntimeError)
LOSS = M.mse_loss(lambda p, x: x @ p["w"] + p["b"])
PARAMS = {"w": jnp.ones((2,)), "b": jnp.zeros(())}
TASKS = metajax.tasks.Task((jnp.ones((3, 4, 2)), jnp.ones((3, 4))),
                           (jnp.ones((3, 4, 2)), jnp.ones((3, 4))))
MAML = S.unrolled(LOSS, steps=1, step_size=0.1)
WITH_STEP = {"params": PARAMS, "step_size": jnp.asarray(0.1)}


def _quad(p, b):
  return 0.5 * jnp.sum((p - b) ** 2)


def _train(state_optimizer, key):
  vg = jax.value_and_grad(M.meta_objective(MAML, LOSS))
  sample = lambda k, n: jax.tree.map(lambda x: x[:n], TASKS)
  step = M.make_train_step(vg, optax.adam(1e-3), sample, meta_batch_size=2)
  return step(M.init_train_state(PARAMS, state_optimizer), key)


def _equinox_with_batch_norm():
  import equinox as eqx
  return metajax.models.from_equinox(
      eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)),
                         eqx.nn.BatchNorm(4, axis_name="batch")]))


def _context_objective():
  loss = M.mse_loss(metajax.models.with_context(lambda p, x: x @ p["w"] + p["b"]))
  return M.meta_objective(S.context(S.unrolled(loss, steps=1), 2), loss)(PARAMS, TASKS)


def _stale_comparison():
  """A --runs directory holding a finished run of 2 iterations, asked for 500."""
  out = os.path.join(tempfile.mkdtemp(), "sinusoid-maml")
  os.makedirs(out)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"query_mse": 1.0}, f)
  with open(os.path.join(out, "compare_flags.json"), "w", encoding="utf-8") as f:
    json.dump(["--iterations", "2"], f)
  compare = _script("compare_methods")
  return compare._run(compare.sinusoid, ["--iterations", "500"], out)


def _resume_on_other_data():
  fewshot = _script("fewshot")
  directory = tempfile.mkdtemp()
  run = dict(config="miniimagenet", solver="maml", shots=1, meta_batch=2, seed=0, mlti=None,
             context_size=100, context_lr=1.0)
  holds = lambda classes: fewshot.data_fingerprint(
      {"train": np.zeros((classes, 2, 4, 4, 3), np.uint8), "test": np.ones((2, 2, 4, 4, 3))})
  fewshot.check_run(directory, argparse.Namespace(**run, data_dir_holds=holds(5)),
                    resuming=False, run_flags=fewshot.FEWSHOT_RUN_FLAGS)
  fewshot.check_run(directory, argparse.Namespace(**run, data_dir_holds=holds(7)),
                    resuming=True, run_flags=fewshot.FEWSHOT_RUN_FLAGS)


def _nan_query_step():
  vg = jax.value_and_grad(M.meta_objective(MAML, LOSS))
  bad = metajax.tasks.Task(TASKS.support, (TASKS.query[0].at[0].set(jnp.nan), TASKS.query[1]))
  step = M.make_train_step(vg, optax.adam(1e-3), lambda k, n: bad, meta_batch_size=3)
  return step(M.init_train_state(PARAMS, optax.adam(1e-3)), jax.random.key(0))


def _flax_mlp_on_wider_inputs():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (8, 1))
  adapt = S.unrolled(M.mse_loss(apply_fn), steps=1, step_size=0.1)
  return adapt(params, (jnp.ones(5), jnp.ones((5, 1))))  # x of shape (5,): 5 features, not 1


def _train_with_data_the_family_does_not_take():
  vg = jax.value_and_grad(M.meta_objective(MAML, LOSS))
  step = M.make_train_step(vg, optax.adam(1e-3), lambda k, n: TASKS, meta_batch_size=3)
  return step(M.init_train_state(PARAMS, optax.adam(1e-3)), jax.random.key(0), jnp.ones(3))


def _conv4_on_grayscale_without_channels():
  params, apply_fn = metajax.models.init_model(metajax.models.Conv4(3, filters=4, blocks=2),
                                               jax.random.key(0), (8, 8, 1))
  return apply_fn(params, jnp.zeros((3, 8, 8)))


CASES = [
    Case("meta", "meta_params holding a hyperparameter that learn= does not name",
         lambda: jax.grad(M.meta_objective(MAML, LOSS, learn=("step_size",)))(
             {**WITH_STEP, "reg": jnp.asarray(1.0)}, TASKS), ValueError,
         r"meta_params has \['reg'\] beside 'params'.*gets no gradient"),
    Case("meta", "Meta-SGD meta_params {'params', 'step_size'} with learn= left out",
         lambda: M.meta_objective(MAML, LOSS)(WITH_STEP, TASKS), ValueError,
         r"nothing is learned here.*pass learn=\('step_size',\)"),
    Case("meta", "make_evaluator called with the Meta-SGD meta_params dict",
         lambda: M.make_evaluator(MAML, LOSS)(WITH_STEP, TASKS), ValueError,
         r"params is a dict with 'params' and the hyperparameters \['step_size'\].*"
         r"pass learn=.*meta_params\['params'\] alone"),
    Case("meta", "Reptile given a meta_params dict with a step size",
         lambda: M.reptile_value_and_grad(MAML, LOSS)(WITH_STEP, TASKS), ValueError,
         "Reptile learns no hyperparameters"),
    Case("meta", "meta_objective with learn=None", lambda: M.meta_objective(MAML, LOSS, learn=None),
         TypeError, r"learn must be a tuple of names or a dict, got None"),
    Case("solvers", "params lacking a key the loss looks up",
         lambda: MAML({"w": jnp.ones((2,))}, (jnp.ones((4, 2)), jnp.ones(4))), ValueError,
         r"loss_fn\(params, support\) failed.*KeyError: 'b' \(params has the keys \['w'\]\)"),
    Case("solvers", "context() over a model whose weights do not take the context inputs",
         _context_objective, TypeError,
         r"loss_fn\(params, support\) failed.*dot_general requires contracting dimensions"),
    Case("solvers", "gd step_size given as a traced value",
         lambda: jax.jit(inner_optimizers.gd)(0.1), TypeError,
         "gd step_size is fixed when it is built.*traced value"),
    Case("solvers", "gd step_size given as an array of two steps",
         lambda: inner_optimizers.gd(jnp.array([0.1, 0.2])), ValueError,
         r"gd step_size must be a scalar, got shape \(2,\).*unrolled's step_size="),
    Case("solvers", "neumann scale given as an array",
         lambda: linear_solvers.neumann(scale=jnp.array([1.0, 2.0])), ValueError,
         r"neumann scale must be a scalar, got shape \(2,\)"),
    Case("solvers", "adjoint with an implicit diffrax solver on the default fixed grid",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Kvaerno5()), ValueError,
         r"solver=Kvaerno5\(\) is implicit.*Pass steps=None"),
    Case("solvers", "adjoint with StepTo times that do not start at 0",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Euler(),
                           stepsize_controller=diffrax.StepTo(ts=jnp.array([0.2, 0.5, 1.0]))),
         ValueError, r"must step from 0 to t1=1 .*its ts run from 0.2 to 1"),
    Case("solvers", "adjoint with StepTo times that end before t1",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Euler(),
                           stepsize_controller=diffrax.StepTo(ts=jnp.array([0.0, 0.5, 0.9]))),
         ValueError, r"must step from 0 to t1=1 .*run from 0 to 0.9"),
    Case("solvers", "adjoint with StepTo times that go back",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Euler(),
                           stepsize_controller=diffrax.StepTo(ts=jnp.array([0.0, 0.7, 0.5, 1.0]))),
         ValueError, "StepTo.*needs increasing times"),
    Case("solvers", "adjoint with StepTo times and a call-time t1",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Euler(),
                           stepsize_controller=diffrax.StepTo(ts=jnp.array([0.0, 0.5, 1.0])))(
             jnp.zeros(2), jnp.ones(2), t1=2.0), ValueError,
         "a call-time t1 cannot move StepTo's fixed times"),
    Case("meta", "train state built with another optimizer than the train step's",
         lambda: _train(optax.sgd(0.1), jax.random.key(0)), TypeError,
         r"state.opt_state is not the state of the optimizer.*init_train_state"),
    Case("meta", "train step key given as an int32 pair",
         lambda: _train(optax.adam(1e-3), jnp.array([0, 1])), TypeError,
         "key must be a PRNG key"),
    Case("cli", "fewshot.py --out under a path that is a file",
         _cli("fewshot", "--out", os.path.join(os.path.abspath(__file__), "run")), ValueError,
         r"fewshot.py: error: --out .*run cannot be a directory: .*bad_inputs_review.py is a file"),
    Case("cli", "compare_methods.py reusing a finished run made with other flags",
         _stale_comparison, SystemExit,
         r"holds a finished run made with other flags \(--iterations 2; now --iterations 500\)"),
    Case("checkpoints", "fewshot.py resumed with a --data-dir holding other data",
         _resume_on_other_data, CheckpointError,
         r"belong to another run: --data-dir-holds train \(7, 2, 4, 4, 3\).*\(checkpoints: "
         r"train \(5, 2, 4, 4, 3\)"),
    Case("cli", "sinusoid.py --mlti with --meta-batch 1",
         _cli("sinusoid", "--mlti", "0.5", "--meta-batch", "1"), ValueError,
         r"--mlti mixes pairs of tasks of a meta-batch: it needs --meta-batch >= 2, got 1"),
    Case("cli", "amaml.py --iterations that fit in one chunk (nothing left to time)",
         _cli("amaml", "--iterations", "4"), ValueError,
         r"--iterations 4 must be at least 2 x --chunk 4"),
    Case("data", "load_miniimagenet with an image listed in two classes",
         lambda: _mini(_mini_root(rows=[("a.jpg", "n01"), ("b.jpg", "n01"), ("a.jpg", "n02")])),
         ValueError, r"train\.csv lists a\.jpg twice \(lines 2 and 4\)"),
    Case("models", "from_equinox on a module with eqx.nn.BatchNorm (stateful)",
         _equinox_with_batch_norm, TypeError,
         r"from_equinox: Sequential holds stateful layers \(eqx.nn.BatchNorm"),
    Case("solvers", "traced Meta-SGD rates with an inf in one leaf (the message shows the inf)",
         lambda: jax.jit(lambda rates: MAML(PARAMS, (jnp.ones((4, 2)), jnp.ones(4)),
                                            step_size=rates))(
             {"w": jnp.array([0.1, jnp.inf]), "b": jnp.asarray(0.01)}), RUNTIME,
         r"unrolled solver, inner stage.*step_size=inf"),
    Case("meta", "tasks with an empty query (0 query examples)",
         lambda: M.meta_objective(MAML, LOSS)(PARAMS, metajax.tasks.Task(
             TASKS.support, (TASKS.query[0][:, :0], TASKS.query[1][:, :0]))), ValueError,
         r"tasks.query\[0\] is empty \(shape \(3, 0, 2\)\): every task needs at least one "
         "support and one query example"),
    Case("meta", "train step meeting a NaN in the query data (message names the query)",
         _nan_query_step, RUNTIME,
         r"outer stage.*check the tasks' support and query data.*nonfinite='skip'"),
    Case("solvers", "unrolled with bfloat16 params (updates round away)",
         lambda: S.unrolled(_quad, steps=5, step_size=1e-3)(jnp.ones(4, jnp.bfloat16),
                                                            jnp.full(4, 2.0, jnp.bfloat16)),
         TypeError, r"unrolled solver needs float32 or float64 params, got bfloat16.*rounds away"),
    Case("meta", "meta_objective with adapt and loss_fn swapped",
         lambda: M.meta_objective(LOSS, MAML), TypeError,
         r"meta_objective: loss_fn is an inner solver .*arguments look swapped"),
    Case("meta", "evaluate with adapt and the metric swapped",
         lambda: M.evaluate(LOSS, MAML, PARAMS, TASKS), TypeError,
         r"metric_fn is an inner solver .*arguments look swapped"),
    Case("meta", "reptile_value_and_grad with adapt and loss_fn swapped",
         lambda: M.reptile_value_and_grad(LOSS, MAML), TypeError,
         r"reptile_value_and_grad: loss_fn is an inner solver"),
    Case("meta", "train step given a family factory (tasks.sinusoid, not tasks.sinusoid())",
         lambda: M.make_train_step(jax.value_and_grad(M.meta_objective(MAML, LOSS)),
                                   optax.adam(1e-3), metajax.tasks.sinusoid, meta_batch_size=2),
         TypeError, r"sample_tasks is called as sample_tasks\(key, num_tasks, \*data\).*"
                    r"metajax.tasks.sinusoid\(\), not metajax.tasks.sinusoid"),
    Case("tasks", "interpolate given a family factory",
         lambda: metajax.tasks.interpolate(metajax.tasks.sinusoid), TypeError,
         r"family is called as family\(key, num_tasks, \*data\)"),
    Case("meta", "train step given data its family does not take",
         _train_with_data_the_family_does_not_take, TypeError,
         r"sample_tasks\(key, num_tasks, \*data\) with 1 data argument\(s\)"),
    Case("meta", "meta_params holding an int32 hyperparameter",
         lambda: M.init_train_state({"params": PARAMS, "reg": jnp.int32(2)}, optax.adam(1e-3)),
         TypeError, r"found meta_params\['reg'\] \(int32\) \(write 2.0, not 2"),
    Case("solvers", "a flax MLP given inputs of another width",
         _flax_mlp_on_wider_inputs, ValueError,
         r"the model does not take this data \(support shapes \(\(5,\), \(5, 1\)\).*"
         "ScopeParamShapeError"),
    Case("models", "Conv4 apply_fn given grayscale images without the channel axis",
         _conv4_on_grayscale_without_channels, ValueError,
         r"got shape \(3, 8, 8\); add the channel axis with x\[\.\.\., None\]"),
]
