"""Bad inputs to the solvers, the meta-learning API and the train step (see tests/badinput.py)."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import optax

import metajax
from metajax.solvers import inner_optimizers, linear_solvers
from tests.badinput import Case

S = metajax.solvers
NAN, INF = float("nan"), float("inf")
RUNTIME = (RuntimeError, jax.errors.JaxRuntimeError)


def _quad(p, b):
  return 0.5 * jnp.sum((p - b) ** 2)


THETA, SUPPORT = jnp.zeros(2), jnp.ones(2)
NEGATIVE = jnp.asarray(-1.0)  # a concrete jax.Array, captured by closures inside jit
LOSS = metajax.meta.mse_loss(lambda p, x: x @ p)
TASKS = metajax.tasks.Task((jnp.ones((3, 4, 2)), jnp.ones((3, 4))),
                           (jnp.ones((3, 4, 2)), jnp.ones((3, 4))))


def _adapt(solver):
  return {"unrolled": S.unrolled(_quad, steps=2, step_size=0.1),
          "implicit": S.implicit(_quad, reg=1.0), "adjoint": S.adjoint(_quad, t1=1.0)}[solver]


def _jit_call(adapt, **hyper):
  names = sorted(hyper)
  return jax.jit(lambda t, s, *v: adapt(t, s, **dict(zip(names, v))))(
      THETA, SUPPORT, *[jnp.asarray(hyper[n]) for n in names])


def _train_with(loss_fn, sample, nonfinite="raise"):
  adapt = S.unrolled(loss_fn, steps=1, step_size=0.1, throw=False)
  vg = jax.value_and_grad(metajax.meta.meta_objective(adapt, loss_fn))
  step = metajax.meta.make_train_step(vg, optax.sgd(0.1), sample, meta_batch_size=2,
                                      nonfinite=nonfinite)
  state = metajax.meta.init_train_state(jnp.zeros(2), optax.sgd(0.1))
  return step(state, jax.random.key(0))


def _linear_sample(key, n):
  x = jax.random.normal(key, (n, 4, 2))
  return metajax.tasks.Task((x, jnp.ones((n, 4))), (x, jnp.ones((n, 4))))


def _nan_sample(key, n):
  x = jax.random.normal(key, (n, 4, 2))
  return metajax.tasks.Task((x.at[:, 0, 0].set(jnp.nan), jnp.ones((n, 4))), (x, jnp.ones((n, 4))))


CASES = [
    # --- solvers: settings at construction ------------------------------------------------
    Case("solvers", "unrolled steps=0", lambda: S.unrolled(_quad, steps=0), ValueError,
         "steps must be >= 1"),
    Case("solvers", "unrolled steps as a float", lambda: S.unrolled(_quad, steps=2.0), TypeError,
         "steps must be a Python int"),
    Case("solvers", "unrolled step_size=nan", lambda: S.unrolled(_quad, steps=1, step_size=NAN),
         ValueError, "step_size must be finite"),
    Case("solvers", "unrolled negative step_size",
         lambda: S.unrolled(_quad, steps=1, step_size=-0.1), ValueError, "step_size must be >= 0"),
    Case("solvers", "unrolled step_size as a string",
         lambda: S.unrolled(_quad, steps=1, step_size="0.1"), TypeError,
         "step_size must be a float"),
    Case("solvers", "unrolled Meta-SGD rates containing NaN",
         lambda: S.unrolled(_quad, steps=1)(THETA, SUPPORT, step_size=jnp.array([0.1, NAN])),
         ValueError, "step_size must be finite"),
    Case("solvers", "unrolled negative scalar step_size at call time",
         lambda: S.unrolled(_quad, steps=1)(THETA, SUPPORT, step_size=-0.1),
         ValueError, "step_size must be >= 0"),
    Case("solvers", "unrolled step_size together with optimizer=",
         lambda: S.unrolled(_quad, steps=1, step_size=0.1, optimizer=optax.sgd(0.1)), ValueError,
         "step_size is only used by plain gradient descent"),
    Case("solvers", "unrolled optimizer given as a string",
         lambda: S.unrolled(_quad, steps=1, optimizer="adam"), TypeError,
         "optimizer must be an optax GradientTransformation"),
    Case("solvers", "unrolled unroll=0", lambda: S.unrolled(_quad, steps=1, unroll=0), ValueError,
         "unroll must be"),
    Case("solvers", "throw given as a string", lambda: S.unrolled(_quad, steps=1, throw="yes"),
         TypeError, "throw must be True or False"),
    Case("solvers", "loss_fn that is not callable", lambda: S.implicit(3.0, reg=1.0), TypeError,
         "loss_fn must be callable"),
    Case("solvers", "implicit reg=0", lambda: S.implicit(_quad, reg=0.0), ValueError,
         "reg must be > 0"),
    Case("solvers", "implicit reg=nan", lambda: S.implicit(_quad, reg=NAN), ValueError,
         "reg must be finite"),
    Case("solvers", "implicit reg=inf", lambda: S.implicit(_quad, reg=INF), ValueError,
         "reg must be finite"),
    Case("solvers", "implicit optimizer given as a string",
         lambda: S.implicit(_quad, reg=1.0, optimizer="gd"), TypeError,
         "optimizer must be an object"),
    Case("solvers", "implicit gd with step size 0", lambda: inner_optimizers.gd(0.0), ValueError,
         "gd step_size must be > 0"),
    Case("solvers", "implicit max_steps=0", lambda: S.implicit(_quad, reg=1.0, max_steps=0),
         ValueError, "max_steps must be >= 1"),
    Case("solvers", "implicit negative tol", lambda: S.implicit(_quad, reg=1.0, tol=-1e-3),
         ValueError, "tol must be a finite float >= 0"),
    Case("solvers", "implicit tol=nan", lambda: S.implicit(_quad, reg=1.0, tol=NAN), ValueError,
         "tol must be a finite float >= 0"),
    Case("solvers", "implicit linear_solver given as a plain function",
         lambda: S.implicit(_quad, reg=1.0, linear_solver=lambda mv, b: b), TypeError,
         "linear_solver must be a metajax.solvers.linear_solvers solver"),
    Case("solvers", "cg tol=nan", lambda: linear_solvers.cg(tol=NAN), ValueError,
         "tol must be a finite float >= 0"),
    Case("solvers", "cg tol=0 without maxiter", lambda: linear_solvers.cg(tol=0), ValueError,
         "tol=0 runs exactly maxiter iterations"),
    Case("solvers", "cg negative ridge", lambda: linear_solvers.cg(ridge=-1.0), ValueError,
         "ridge must be a finite float >= 0"),
    Case("solvers", "neumann scale=nan", lambda: linear_solvers.neumann(scale=NAN), ValueError,
         "scale must be finite"),
    Case("solvers", "adjoint t1=nan", lambda: S.adjoint(_quad, t1=NAN), ValueError,
         "t1 must be finite"),
    Case("solvers", "adjoint t1=0", lambda: S.adjoint(_quad, t1=0.0), ValueError,
         "t1 must be > 0"),
    Case("solvers", "adjoint negative reg", lambda: S.adjoint(_quad, t1=1.0, reg=-1.0),
         ValueError, "reg must be >= 0"),
    Case("solvers", "adjoint solver given as a string",
         lambda: S.adjoint(_quad, t1=1.0, solver="rk4"), TypeError,
         "solver must be a diffrax solver"),
    Case("solvers", "adjoint unknown adjoint method",
         lambda: S.adjoint(_quad, t1=1.0, adjoint="magic"), ValueError, "adjoint must be one of"),
    Case("solvers", "adjoint constant step size without dt0",
         lambda: S.adjoint(_quad, t1=1.0, stepsize_controller=diffrax.ConstantStepSize()),
         ValueError, "dt0 is required"),
    Case("solvers", "adjoint rtol with a custom controller",
         lambda: S.adjoint(_quad, t1=1.0, rtol=1e-3,
                           stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)),
         ValueError, "rtol/atol configure the default controller"),
    Case("solvers", "adjoint negative dt0", lambda: S.adjoint(_quad, t1=1.0, dt0=-0.1),
         ValueError, "dt0 must be > 0"),
    Case("solvers", "adjoint steps=0", lambda: S.adjoint(_quad, t1=1.0, steps=0),
         ValueError, "steps must be >= 1"),
    Case("solvers", "adjoint steps=2.5", lambda: S.adjoint(_quad, t1=1.0, steps=2.5),
         TypeError, "steps must be"),
    Case("solvers", "adjoint steps together with rtol",
         lambda: S.adjoint(_quad, t1=1.0, steps=20, rtol=1e-4), ValueError,
         r"steps=20 sets the default fixed grid, but rtol chooses the steps instead"),
    # --- solvers: calls ---------------------------------------------------------------------
    Case("solvers", "return_info=True passed at call time (old API)",
         lambda: _adapt("unrolled")(THETA, SUPPORT, return_info=True), TypeError,
         "use adapt.solve"),
    Case("solvers", "an unknown call-time hyperparameter",
         lambda: _adapt("implicit")(THETA, SUPPORT, step_size=0.1), TypeError,
         r"unknown call-time hyperparameters \['step_size'\]; it accepts \['reg'\]"),
    Case("solvers", "integer params", lambda: _adapt("unrolled")(jnp.zeros(2, int), SUPPORT),
         TypeError, "params must hold floating-point arrays"),
    Case("solvers", "empty params pytree", lambda: _adapt("implicit")({}, SUPPORT), ValueError,
         "params is an empty pytree"),
    Case("solvers", "an empty support set",
         lambda: S.unrolled(LOSS, steps=1)(THETA, (jnp.ones((0, 2)), jnp.ones((0,)))), ValueError,
         r"support\[0\] is empty"),
    Case("solvers", "loss_fn returning a vector",
         lambda: S.unrolled(lambda p, b: (p - b) ** 2, steps=1)(THETA, SUPPORT), ValueError,
         "loss_fn\\(params, support\\) must return a scalar"),
    Case("solvers", "loss_fn returning an integer",
         lambda: S.unrolled(lambda p, b: jnp.sum(b > 0), steps=1)(THETA, SUPPORT), TypeError,
         "must return a floating-point scalar"),
    Case("solvers", "call-time reg=nan", lambda: _adapt("implicit")(THETA, SUPPORT, reg=NAN),
         ValueError, "reg must be finite"),
    Case("solvers", "call-time reg as a vector",
         lambda: _adapt("implicit")(THETA, SUPPORT, reg=jnp.ones(2)), ValueError,
         "reg must be a scalar"),
    Case("solvers", "call-time t1 negative", lambda: _adapt("adjoint")(THETA, SUPPORT, t1=-1.0),
         ValueError, "t1 must be > 0"),
    Case("solvers", "concrete jax.Array reg=-1 captured inside jit",
         lambda: jax.jit(lambda t: _adapt("implicit")(t, SUPPORT, reg=NEGATIVE))(THETA),
         ValueError, "reg must be > 0"),
    Case("solvers", "traced negative reg (checked at run time)",
         lambda: _jit_call(_adapt("implicit"), reg=-1.0), RUNTIME,
         "implicit solver, inner stage.*traced value was out of range.*reg=-1"),
    Case("solvers", "traced t1=nan (checked at run time)",
         lambda: _jit_call(_adapt("adjoint"), t1=NAN), RUNTIME,
         "adjoint solver, ODE stage.*traced value was out of range"),
    Case("solvers", "traced NaN step size (checked at run time)",
         lambda: _jit_call(_adapt("unrolled"), step_size=NAN), RUNTIME,
         "unrolled solver, inner stage.*out of range.*step_size=nan"),
    Case("solvers", "NaN in the support data (unrolled)",
         lambda: jax.jit(_adapt("unrolled"))(THETA, jnp.array([1.0, NAN])), RUNTIME,
         "unrolled solver, inner stage.*non-finite.*inner_step=0"),
    Case("solvers", "NaN in the support data under vmap names the task",
         lambda: jax.jit(jax.vmap(_adapt("implicit"), (None, 0)))(
             THETA, jnp.ones((3, 2)).at[2, 0].set(NAN)), RUNTIME,
         r"implicit solver, inner stage \(proximal problem\) \(task 2; 1 of 3 tasks failed\)"),
    Case("solvers", "a loss that returns NaN (adjoint)",
         lambda: jax.jit(S.adjoint(lambda p, b: jnp.sum(p) * jnp.nan, t1=1.0))(THETA, SUPPORT),
         RUNTIME, "adjoint solver, ODE stage .gradient flow, fixed grid of steps=10 Euler.*"
         "non-finite.*stability limit also does this: raise steps= or pass steps=None"),
    Case("solvers", "adjoint default grid past the flow's stability limit (t1=50, 10 steps of 5)",
         lambda: jax.jit(S.adjoint(_quad, t1=50.0))(THETA, SUPPORT), RUNTIME,
         r"adjoint solver, ODE stage \(gradient flow, fixed grid of steps=10 Euler steps of "
         r"t1/steps\): the grid diverged.*rose more than 100-fold.*past the "
         r"flow's stability limit \(raise steps=.*steps=None.*objective_start=1, "
         r"objective_end=1\.1e\+12"),
    Case("solvers", "adjoint max_steps below the fixed grid's steps",
         lambda: S.adjoint(_quad, t1=1.0, max_steps=4), ValueError,
         r"max_steps=4 is below steps=10: the fixed grid takes exactly steps steps"),
    Case("solvers", "diverging unrolled inner loop (step size too large)",
         lambda: jax.jit(S.unrolled(_quad, steps=200, step_size=50.0))(THETA, SUPPORT), RUNTIME,
         "unrolled solver, inner stage.*non-finite"),
    Case("solvers", "diverging fixed-step implicit GD (step size too large)",
         lambda: jax.jit(S.implicit(_quad, reg=1.0, optimizer=inner_optimizers.gd(5.0),
                                    max_steps=20, tol=0))(THETA, SUPPORT), RUNTIME,
         "implicit solver, inner stage.*(diverged|non-finite)"),
    Case("solvers", "inner step cap reached before the tolerance",
         lambda: jax.jit(S.implicit(_quad, reg=1.0, optimizer=inner_optimizers.gd(1e-3),
                                    max_steps=3, tol=1e-6))(THETA, SUPPORT), RUNTIME,
         "step cap .max_steps. was reached.*iterations=3"),
    Case("solvers", "diverging Neumann series in the implicit gradient",
         lambda: jax.jit(jax.grad(lambda t: jnp.sum(S.implicit(
             lambda p, b: 0.5 * p @ jnp.diag(jnp.array([1.0, 10.0])) @ p - b @ p, reg=1.0,
             linear_solver=linear_solvers.neumann(terms=20))(t, SUPPORT))))(THETA), RUNTIME,
         "linear-solve stage.*diverged.*damp it with ridge=, raise reg.*relative_residual=7"),
    Case("solvers", "adjoint max_steps reached",
         lambda: jax.jit(S.adjoint(_quad, t1=50.0, steps=None, max_steps=4))(THETA, SUPPORT),
         RUNTIME,
         "adjoint solver, ODE stage.*max_steps.*time="),
    Case("solvers", "jvp through the default (checkpoint) adjoint",
         lambda: jax.jvp(lambda t: _adapt("adjoint")(t, SUPPORT), (THETA,), (THETA,)), TypeError,
         "supports reverse mode only.*diffrax.ForwardMode"),
    Case("solvers", "differentiating the diagnostics (AdaptInfo)",
         lambda: jax.grad(lambda t: _adapt("implicit").solve(t, SUPPORT)[1].residual)(THETA),
         Exception, "diagnostics .* are not differentiable"),
    # --- meta ---------------------------------------------------------------------------------
    Case("meta", "mse_loss with (n,) targets against (n, 1) predictions",
         lambda: metajax.meta.mse_loss(lambda p, x: x * p)(1.0, (jnp.ones((4, 1)), jnp.ones(4))),
         ValueError, r"predictions have shape \(4, 1\) but targets have shape \(4,\)"),
    Case("meta", "a batch that is not an (inputs, targets) pair",
         lambda: metajax.meta.mse_loss(lambda p, x: x)(1.0, jnp.ones(3)), TypeError,
         "batch must be a pair"),
    Case("meta", "cross_entropy_loss with a label above the number of classes",
         lambda: jax.jit(metajax.meta.cross_entropy_loss(lambda p, x: x @ p))(
             jnp.zeros((2, 3)), (jnp.ones((2, 2)), jnp.array([0, 3]))), RUNTIME,
         r"labels must lie in \[0, 3\).*largest_label=3"),
    Case("meta", "cross_entropy_loss with label -1",
         lambda: metajax.meta.cross_entropy_loss(lambda p, x: x @ p)(
             jnp.zeros((2, 3)), (jnp.ones((2, 2)), jnp.array([0, -1]))), RuntimeError,
         "smallest_label=-1"),
    Case("meta", "cross_entropy_loss with float labels",
         lambda: metajax.meta.cross_entropy_loss(lambda p, x: x @ p)(
             jnp.zeros((2, 3)), (jnp.ones((2, 2)), jnp.array([0.0, 1.0]))), TypeError,
         "labels must be integers"),
    Case("meta", "cross_entropy_loss with labels of the wrong shape",
         lambda: metajax.meta.cross_entropy_loss(lambda p, x: x @ p)(
             jnp.zeros((2, 3)), (jnp.ones((2, 2)), jnp.array([[0], [1]]))), ValueError,
         r"labels must have shape \(2,\)"),
    Case("meta", "accuracy with a label out of range",
         lambda: metajax.meta.accuracy(lambda p, x: x)(None, (jnp.eye(3), jnp.array([0, 1, 5]))),
         RuntimeError, r"accuracy: labels must lie in \[0, 3\)"),
    Case("meta", "learn= names a hyperparameter the solver does not take",
         lambda: metajax.meta.meta_objective(S.implicit(LOSS, reg=1.0), LOSS, learn=("t1",)),
         ValueError, r"learn names \['t1'\].*it accepts \['reg'\]"),
    Case("meta", "learn= given as a bare string",
         lambda: metajax.meta.meta_objective(S.implicit(LOSS, reg=1.0), LOSS, learn="reg"),
         TypeError, "not the string 'reg'"),
    Case("meta", "learn= with an unknown parametrization",
         lambda: metajax.meta.meta_objective(S.implicit(LOSS, reg=1.0), LOSS,
                                             learn={"reg": "exp"}), ValueError,
         "choose a parametrization"),
    Case("meta", "meta_params without the learned hyperparameter",
         lambda: metajax.meta.meta_objective(S.implicit(LOSS, reg=1.0), LOSS, learn=("reg",))(
             {"params": jnp.zeros(2)}, TASKS), ValueError, r"lacks the learned hyperparameters"),
    Case("meta", "tasks that are not a Task",
         lambda: metajax.meta.meta_objective(S.unrolled(LOSS, steps=1), LOSS)(
             jnp.zeros(2), (TASKS.support, TASKS.query)), TypeError,
         "tasks must be a metajax.tasks.Task"),
    Case("meta", "support and query with different numbers of tasks",
         lambda: metajax.meta.meta_objective(S.unrolled(LOSS, steps=1), LOSS)(
             jnp.zeros(2), TASKS._replace(query=jax.tree.map(lambda x: x[:2], TASKS.query))),
         ValueError, "same number of tasks"),
    Case("meta", "unknown task_batching",
         lambda: metajax.meta.meta_objective(S.unrolled(LOSS, steps=1), LOSS,
                                             task_batching="pmap"), ValueError,
         "task_batching must be one of"),
    Case("meta", "make_train_step with a non-optax optimizer",
         lambda: metajax.meta.make_train_step(lambda p, t: (0.0, p), "adam",
                                              metajax.tasks.sinusoid(), meta_batch_size=2),
         TypeError, "optimizer must be an optax GradientTransformation"),
    Case("meta", "make_train_step meta_batch_size=0",
         lambda: metajax.meta.make_train_step(lambda p, t: (0.0, p), optax.sgd(0.1),
                                              metajax.tasks.sinusoid(), meta_batch_size=0),
         ValueError, "meta_batch_size must be >= 1"),
    Case("meta", "make_train_step with an unknown nonfinite policy",
         lambda: metajax.meta.make_train_step(lambda p, t: (0.0, p), optax.sgd(0.1),
                                              metajax.tasks.sinusoid(), meta_batch_size=2,
                                              nonfinite="ignore"), ValueError,
         "nonfinite must be one of"),
    Case("meta", "train step called with an integer seed instead of a key",
         lambda: metajax.meta.make_train_step(lambda p, t: (0.0, p), optax.sgd(0.1),
                                              metajax.tasks.sinusoid(), meta_batch_size=2)(
             metajax.meta.init_train_state(jnp.zeros(2), optax.sgd(0.1)), 0), TypeError,
         "key must be a PRNG key"),
    Case("meta", "train step called with a bare params pytree as the state",
         lambda: metajax.meta.make_train_step(lambda p, t: (0.0, p), optax.sgd(0.1),
                                              metajax.tasks.sinusoid(), meta_batch_size=2)(
             jnp.zeros(2), jax.random.key(0)), TypeError,
         "state must be a metajax.meta.TrainState"),
    Case("meta", "NaN in the support data stops training, naming the meta-iteration",
         lambda: _train_with(LOSS, _nan_sample), RUNTIME,
         "train step, outer stage.*non-finite.*meta_iteration=0, meta_loss=nan"),
    Case("meta", "init_train_state with integer meta-parameters",
         lambda: metajax.meta.init_train_state(jnp.zeros(2, int), optax.sgd(0.1)), TypeError,
         "meta_params must hold floating-point arrays"),
    Case("meta", "confidence_interval over NaN values",
         lambda: metajax.meta.confidence_interval([1.0, NAN, 2.0]), ValueError,
         "non-finite entries"),
    Case("meta", "confidence_interval of one value",
         lambda: metajax.meta.confidence_interval([1.0]), ValueError, "at least 2 entries"),
    Case("meta", "evaluate with chunk=0",
         lambda: metajax.meta.evaluate(S.unrolled(LOSS, steps=1), LOSS, jnp.zeros(2), TASKS,
                                       chunk=0), ValueError, "chunk must be >= 1"),
    # --- parallel -------------------------------------------------------------------------
    Case("parallel", "shard_tasks with a batch not divisible by the devices",
         lambda: metajax.parallel.shard_tasks(jnp.zeros((6, 2)), metajax.parallel.task_mesh()),
         ValueError, "multiple of the mesh size"),
    Case("parallel", "task_mesh over no devices", lambda: metajax.parallel.task_mesh([]),
         ValueError, "devices is empty"),
    # --- found by a new-user probe ----------------------------------------------------------
    Case("solvers", "params with a Python float leaf",
         lambda: _adapt("unrolled")({"w": jnp.zeros(2), "b": 0.0}, SUPPORT), TypeError,
         r"params\['b'\] is a Python float"),
    Case("solvers", "implicit with params of mixed float32/float64 dtypes",
         lambda: S.implicit(lambda p, b: jnp.sum((p["w"] - b) ** 2 + p["b"] ** 2), reg=1.0)(
             {"w": jnp.zeros(2, jnp.float32), "b": jnp.zeros(2)}, SUPPORT),
         TypeError, r"needs params of one dtype, got \['float32', 'float64'\]"),
    Case("solvers", "implicit with bfloat16 params",
         lambda: _adapt("implicit")(jnp.zeros(2, jnp.bfloat16), SUPPORT), TypeError,
         "needs float32 or float64 params, got bfloat16"),
    Case("solvers", "adjoint with float16 params",
         lambda: _adapt("adjoint")(jnp.zeros(2, jnp.float16), SUPPORT), TypeError,
         "needs float32 or float64 params, got float16"),
    Case("meta", "train step given the objective instead of its value_and_grad",
         lambda: metajax.meta.make_train_step(
             metajax.meta.meta_objective(S.unrolled(LOSS, steps=1), LOSS), optax.sgd(0.1),
             _linear_sample, meta_batch_size=2)(
                 metajax.meta.init_train_state(jnp.zeros(2), optax.sgd(0.1)), jax.random.key(0)),
         TypeError, r"must return \(loss, grads\).*jax.value_and_grad"),
    Case("meta", "sample_tasks returning more tasks than meta_batch_size",
         lambda: _train_with(LOSS, lambda k, n: _linear_sample(k, 3)), ValueError,
         "must return tasks with a leading axis of meta_batch_size=2; got sizes \\[3\\]"),
    Case("meta", "evaluate over one task (no confidence interval)",
         lambda: metajax.meta.evaluate(S.unrolled(LOSS, steps=1), LOSS, jnp.zeros(2),
                                       jax.tree.map(lambda x: x[:1], TASKS)), ValueError,
         "evaluate needs at least 2 tasks"),
    Case("meta", "evaluate with a metric that is not a scalar per task",
         lambda: metajax.meta.evaluate(S.unrolled(LOSS, steps=1), lambda p, b: b[0] @ p,
                                       jnp.zeros(2), TASKS), ValueError,
         "must return a scalar per task, got shape \\(4,\\)"),
    Case("models", "make_mlp with an integer seed instead of a key",
         lambda: metajax.models.make_mlp(0), TypeError, "key must be a PRNG key"),
    Case("parallel", "shard_tasks with a scalar leaf",
         lambda: metajax.parallel.shard_tasks({"a": jnp.ones((4, 3)), "s": jnp.float32(1.0)},
                                              metajax.parallel.task_mesh()), ValueError,
         r"tasks\['s'\] is a scalar"),
    Case("parallel", "shard_tasks with a string for the mesh",
         lambda: metajax.parallel.shard_tasks(jnp.ones((4, 3)), "mesh"), TypeError,
         "mesh must be a jax.sharding.Mesh"),
    Case("parallel", "task_mesh over device names instead of devices",
         lambda: metajax.parallel.task_mesh(["cpu0"]), TypeError,
         "devices must be jax.Device objects"),
    Case("parallel", "shard_family of a Task instead of a family",
         lambda: metajax.parallel.shard_family(
             metajax.tasks.sinusoid()(jax.random.key(0), 4), metajax.parallel.task_mesh()),
         TypeError, "family must be a task family"),
    Case("parallel", "shard_family with a device list for the mesh",
         lambda: metajax.parallel.shard_family(metajax.tasks.sinusoid(), jax.devices()),
         TypeError, "mesh must be a jax.sharding.Mesh"),
    Case("parallel", "shard_family sampling a batch not divisible by the devices",
         lambda: metajax.parallel.shard_family(metajax.tasks.sinusoid(),
                                               metajax.parallel.task_mesh())(jax.random.key(0), 6),
         ValueError, r"\(size 6\) must be a multiple of the mesh size 4"),
]
