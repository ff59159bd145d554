"""Bad inputs to the second-wave methods: masked/context/learned_loss, MAML++, MLTI (see
tests/badinput.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import metajax
from tests.bad_inputs_api import LOSS, RUNTIME, TASKS
from tests.bad_inputs_data_cli import _cli
from tests.badinput import Case

S, M, T = metajax.solvers, metajax.meta, metajax.tasks
PARAMS = {"body": jnp.ones((2, 2)), "head": jnp.ones(2)}
SUPPORT = (jnp.ones((4, 2)), jnp.ones(4))


def _loss(p, b):
  return jnp.mean((b[0] @ p["body"] @ p["head"] - b[1]) ** 2)


def _gd(loss=_loss, **kw):
  return S.unrolled(loss, steps=kw.pop("steps", 2), step_size=kw.pop("step_size", 0.1), **kw)


_CONTEXT_LOSS = M.mse_loss(metajax.models.with_context(lambda w, x: x @ w))
_LABELS = T.Task((jnp.ones((2, 3, 2)), jnp.asarray([[0, 1, 2], [2, 1, 0]])),
                 (jnp.ones((2, 3, 2)), jnp.asarray([[0, 1, 2], [2, 1, 0]])))

CASES = [
    Case("solvers", "masked wrapping a plain function instead of a solver",
         lambda: S.masked(_loss, {"body": False, "head": True}), TypeError,
         r"masked\(solver, \.\.\.\) wraps a metajax inner solver"),
    Case("solvers", "masked with a mask whose keys are not params'",
         lambda: S.masked(_gd(), {"head": True, "tail": False})(PARAMS, SUPPORT), ValueError,
         "mask has structure .* which is neither the structure of params"),
    Case("solvers", "masked with array leaves in the mask",
         lambda: S.masked(_gd(), {"body": jnp.asarray(False), "head": jnp.asarray(True)})(
             PARAMS, SUPPORT), TypeError, r"mask\['body'\] is .*must be Python bools"),
    Case("solvers", "masked with a mask that selects nothing",
         lambda: S.masked(_gd(), {"body": False, "head": False})(PARAMS, SUPPORT), ValueError,
         "mask selects no parameter"),
    Case("solvers", "path_mask with a pattern that matches no parameter",
         lambda: S.masked(_gd(), S.path_mask("Dense_9"))(PARAMS, SUPPORT), ValueError,
         r"path_mask\('Dense_9'\) selects no parameter; the parameter paths are "
         r"\['body', 'head'\]"),
    Case("solvers", "path_mask with an invalid regular expression",
         lambda: S.path_mask("head("), ValueError, "is not a valid regular expression"),
    Case("solvers", "context with a zero-length context",
         lambda: S.context(_gd(_CONTEXT_LOSS), 0), ValueError,
         "context shape must be a positive int"),
    Case("solvers", "context given a per-parameter (Meta-SGD) step size for the network",
         lambda: S.context(S.unrolled(_CONTEXT_LOSS, steps=1), 1)(
             jnp.ones((2, 1)), (jnp.ones((3, 1)), jnp.ones((3, 1))), step_size=jnp.ones((2, 1))),
         ValueError, "context adapts only the context vector"),
    Case("solvers", "learned_loss called without loss_params",
         lambda: S.learned_loss(_gd(lambda p, b, psi: _loss(p, b)))(PARAMS, SUPPORT), TypeError,
         "learned_loss: pass loss_params= at call time"),
    Case("solvers", "per_step=True with one step size per step of the wrong length",
         lambda: S.unrolled(_loss, steps=3, per_step=True, step_size=jnp.ones(2) * 0.1),
         ValueError, r"one rate per inner step needs shape \(3,\)"),
    Case("solvers", "per_step=True with a per-layer leaf missing the step axis",
         lambda: S.unrolled(_loss, steps=3, per_step=True)(
             PARAMS, SUPPORT, step_size={"body": jnp.ones(3), "head": jnp.ones(2)}), ValueError,
         r"step_size\['head'\] has shape \(2,\); a per-step step size .* must have shape \(3,\)"),
    Case("solvers", "per_step=True together with an optax optimizer",
         lambda: S.unrolled(_loss, steps=3, per_step=True,
                            optimizer=S.differentiable_adam(0.1)), ValueError,
         "per_step=True gives plain gradient descent one step size per inner step"),
    Case("meta", "multi_step_objective over the implicit solver (no inner steps)",
         lambda: M.multi_step_objective(S.implicit(LOSS, reg=1.0), LOSS), TypeError,
         "multi_step_objective needs the query loss after every inner step"),
    Case("meta", "multi_step_objective with one weight too few",
         lambda: M.multi_step_objective(S.unrolled(LOSS, steps=3), LOSS)(
             jnp.zeros(2), TASKS, jnp.ones(2) / 2), ValueError,
         r"step_weights must have shape \(3,\), one weight per inner step; got \(2,\)"),
    Case("meta", "multi_step_objective called without step_weights",
         lambda: M.multi_step_objective(S.unrolled(LOSS, steps=3), LOSS)(jnp.zeros(2), TASKS),
         TypeError, r"takes \(meta_params, tasks, step_weights\); got 2 arguments"),
    Case("meta", "msl_weights at a negative meta-iteration",
         lambda: M.msl_weights(3, -1, 100), ValueError, "meta_iteration must be >= 0, got -1"),
    Case("meta", "maml_plus_plus with msl_iterations=0",
         lambda: M.maml_plus_plus(S.unrolled(LOSS, steps=2), LOSS, msl_iterations=0), ValueError,
         "msl_iterations must be"),
    Case("meta", "Reptile over a CAVIA context solver (the adapted value is not params)",
         lambda: M.reptile_value_and_grad(S.context(S.unrolled(_CONTEXT_LOSS, steps=1), 1),
                                          _CONTEXT_LOSS)(
             jnp.ones((2, 1)), T.Task((jnp.ones((2, 3, 1)), jnp.ones((2, 3, 1))),
                                      (jnp.ones((2, 3, 1)), jnp.ones((2, 3, 1))))), TypeError,
         "Reptile moves theta toward the adapted parameters"),
    Case("tasks", "mix_tasks over a single task",
         lambda: T.mix_tasks(jax.random.key(0), jax.tree.map(lambda x: x[:1], TASKS)),
         ValueError, "needs at least 2 tasks, got 1"),
    Case("tasks", "interpolate with alpha = 0",
         lambda: T.interpolate(T.sinusoid(), alpha=0.0), ValueError,
         r"alpha must be a finite number > 0 \(the Beta\(alpha, alpha\)"),
    Case("tasks", "mix_tasks over tasks whose integer labels are not grouped alike",
         lambda: jax.jit(T.mix_tasks)(jax.random.key(0), _LABELS), RUNTIME,
         "integer labels of paired tasks differ"),
    Case("tasks", "mix_tasks given a tuple instead of a Task",
         lambda: T.mix_tasks(jax.random.key(0), (jnp.ones((2, 3)), jnp.ones((2, 3)))),
         TypeError, "tasks must be a metajax.tasks.Task batch"),
    Case("models", "with_context's apply given the network's params only",
         lambda: metajax.models.with_context(lambda w, x: x @ w)(jnp.ones((3, 1)),
                                                                 jnp.ones((4, 1))),
         TypeError, r"with_context's apply takes \{'params': \.\.\., 'context': \.\.\.\}"),
    Case("models", "with_context with a matrix context",
         lambda: metajax.models.with_context(lambda w, x: x @ w)(
             {"params": jnp.ones((3, 1)), "context": jnp.ones((2, 1))}, jnp.ones((4, 1))),
         ValueError, r"the context must be a vector \(shape \(d,\)\), got shape \(2, 1\)"),
    Case("models", "Conv4 with a negative context length",
         lambda: metajax.models.init_model(metajax.models.Conv4(3, filters=4, blocks=1,
                                                                context=-1),
                                           jax.random.key(0), (4, 4, 1)), ValueError,
         r"Conv4.context must be an int >= 0 \(0: no context\), got -1"),
    Case("models", "with_context with a keyword that is not a name",
         lambda: metajax.models.with_context(lambda w, x: x @ w, keyword="2nd"), TypeError,
         "keyword must be an argument name of apply_fn"),
    Case("solvers", "masked given step_size for the adapted part only",
         lambda: S.masked(_gd(), {"body": False, "head": True})(
             PARAMS, SUPPORT, step_size={"head": jnp.ones(2)}), ValueError,
         r"a per-parameter step_size is given for the full params"),
    Case("solvers", "masked wrapping a context solver",
         lambda: S.masked(S.context(_gd(_CONTEXT_LOSS), 1), {"params": True}), TypeError,
         r"masked cannot wrap context\(\.\.\.\)"),
    Case("solvers", "masked with a parameter name as the mask",
         lambda: S.masked(_gd(), "head"), TypeError, r"for parameters by name use "
         r"path_mask\('head'\)"),
    Case("solvers", "learned_loss over a solver whose loss takes no loss_params",
         lambda: S.learned_loss(_gd()), TypeError,
         r"learned_loss calls loss_fn\(params, batch, loss_params\)"),
    Case("meta", "multi_step_objective of a step_aware solver with a 2-argument query loss",
         lambda: M.multi_step_objective(S.unrolled(lambda p, b, k: LOSS(p, b), steps=2,
                                                   step_aware=True), LOSS), TypeError,
         r"evaluates the query after step k as loss_fn\(phi_k, query, k\)"),
    Case("meta", "msl_weights at a vector of meta-iterations",
         lambda: M.msl_weights(3, jnp.asarray([1, 2]), 10), ValueError,
         "meta_iteration must be a scalar int"),
    Case("meta", "msl_weights at a negative meta-iteration given as an array",
         lambda: M.msl_weights(2, jnp.asarray(-500), 100), ValueError,
         "meta_iteration must be >= 0, got -500"),
    Case("meta", "lslr_step_sizes for integer params",
         lambda: M.lslr_step_sizes({"w": jnp.ones(3, jnp.int32)}, 2, 0.1), TypeError,
         "params must hold floating-point arrays only"),
    Case("tasks", "mix_tasks over tasks holding Python lists",
         lambda: T.mix_tasks(jax.random.key(0), T.Task(([1.0, 2.0], [1.0, 2.0]),
                                                       ([1.0, 2.0], [1.0, 2.0]))),
         ValueError, r"tasks\.support\[0\]\[0\] is float : every leaf of tasks must be an array"),
    Case("models", "with_context without keyword= on a Conv4 that takes its context by FiLM",
         lambda: metajax.models.with_context(metajax.models.init_model(
             metajax.models.Conv4(3, filters=4, blocks=1, context=2), jax.random.key(0),
             (4, 4, 1))[1]), ValueError, r"use with_context\(apply_fn, keyword='context'\)"),
    Case("cli", "sinusoid.py --context-size 0", _cli("sinusoid", "--context-size", "0"),
         ValueError, "--context-size must be >= 1, got 0"),
    Case("cli", "fewshot.py --mlti 0 (no Beta(0, 0))", _cli("fewshot", "--mlti", "0"),
         ValueError, "--mlti must be a finite number > 0, got 0.0"),
    Case("cli", "sinusoid.py --solver with an unknown method",
         _cli("sinusoid", "--solver", "protonet"), ValueError,
         "argument --solver: invalid choice: 'protonet'"),
]
