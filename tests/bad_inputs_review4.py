"""Bad inputs found by a fourth review as a demanding user (see tests/badinput.py): settings that
were silently ignored or replaced, and errors that did not name what was wrong."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import optax

import metajax
from tests.bad_inputs_data_cli import _cli
from tests.bad_inputs_review import LOSS, MAML, PARAMS, RUNTIME, TASKS, _quad
from tests.badinput import Case

S, M = metajax.solvers, metajax.meta


def _flax_mlp_on_a_wider_query():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (8, 1))
  loss = M.mse_loss(apply_fn)
  tasks = metajax.tasks.Task((jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1))),
                             (jnp.ones((2, 5, 2)), jnp.ones((2, 5, 1))))  # 2 features, not 1
  return M.meta_objective(S.unrolled(loss, steps=1, step_size=0.1), loss)(params, tasks)


def _accuracy_of_nan_logits():
  """A 3-way linear classifier adapted on clean support, scored on NaN query inputs: argmax of
  a NaN row is 0, so accuracy used to report chance level (1/3) with a CI of 0."""
  apply_fn = lambda p, x: x @ p
  labels = jnp.tile(jnp.arange(3), (4, 1))
  support = (jnp.tile(jnp.eye(3), (4, 1, 1)), labels)
  tasks = metajax.tasks.Task(support, (jnp.full((4, 3, 3), jnp.nan), labels))
  adapt = S.unrolled(M.cross_entropy_loss(apply_fn), steps=1, step_size=0.1)
  return M.evaluate(adapt, M.accuracy(apply_fn), jnp.zeros((3, 3)), tasks)


def _inner_optax_adam_train_step():
  """optax.adam (eps_root=0) inside the inner loop of a ReLU MLP: the meta-loss is finite, the
  meta-gradient NaN (the derivative of sqrt(v) at v = 0)."""
  params, apply_fn = metajax.models.make_mlp(jax.random.key(3), 1, (8, 8, 1))
  loss = M.mse_loss(apply_fn)
  adapt = S.unrolled(loss, steps=2, optimizer=optax.adam(0.1))
  family = metajax.tasks.sinusoid(num_support=5, num_query=5)
  step = M.make_train_step(jax.value_and_grad(M.meta_objective(adapt, loss)), optax.adam(1e-3),
                           family, meta_batch_size=2)
  return step(M.init_train_state(params, optax.adam(1e-3)), jax.random.key(0))


def _context_loss():
  return M.mse_loss(metajax.models.with_context(lambda w, x: x @ w))


CASES = [
    Case("solvers", "context given a step size of neither scalar nor the context's shape",
         lambda: S.context(S.unrolled(_context_loss(), steps=1), 1)(
             jnp.ones((2, 1)), (jnp.ones((4, 1)), jnp.ones((4, 1))),
             step_size=jnp.array([0.5, 0.2, 0.1])), ValueError,
         r"context: step_size must be a scalar or an array of the context's shape \(1,\) \(one "
         r"per entry\), got shape \(3,\)"),
    Case("solvers", "context wrapping context",
         lambda: S.context(S.context(S.unrolled(_context_loss(), steps=1), 1), 1), TypeError,
         r"context cannot wrap context\(\.\.\.\): the model takes one context"),
    Case("solvers", "unrolled step_aware=True with a loss of two arguments",
         lambda: S.unrolled(_quad, steps=2, step_aware=True), TypeError,
         r"step_aware=True calls loss_fn\(params, batch, step\).*this loss_fn takes fewer"),
    Case("solvers", "path_mask with a misspelt pattern and invert=True (BOIL would adapt all)",
         lambda: S.path_mask("W", invert=True)(PARAMS), ValueError,
         r"path_mask\('W', invert=True\): the pattern matches no parameter path, so inverting "
         r"it would select every parameter; the parameter paths are \['b', 'w'\]"),
    Case("meta", "a learned hyperparameter given as None (nothing would be learned)",
         lambda: M.meta_objective(MAML, LOSS, learn=("step_size",))(
             {"params": PARAMS, "step_size": None}, TASKS), ValueError,
         r"meta_params\['step_size'\] is None, but learn= names it"),
    Case("solvers", "adjoint with an explicit steps=10 and dt0 (one was ignored)",
         lambda: S.adjoint(_quad, t1=1.0, steps=10, dt0=0.1), ValueError,
         r"steps=10 sets the default fixed grid, but dt0 chooses the steps instead"),
    Case("solvers", "adjoint with Euler and rtol (adaptive steps need an error estimate)",
         lambda: S.adjoint(_quad, t1=1.0, solver=diffrax.Euler(), rtol=1e-3)(
             jnp.zeros(2), jnp.ones(2)), ValueError,
         r"solver=Euler\(\) has no error estimate, so it cannot take the adaptive steps that "
         r"rtol/atol or steps=None ask for: give it constant steps \(dt0= alone"),
    Case("meta", "query inputs of another width than the model's (support fine)",
         _flax_mlp_on_a_wider_query, ValueError,
         r"loss_fn\(adapted params, query\) failed: the model does not take this data "
         r"\(query shapes \(\(2, 5, 2\), \(2, 5, 1\)\); support shapes \(\(2, 5, 1\), "
         r"\(2, 5, 1\)\).*ScopeParamShapeError"),
    Case("meta", "evaluate with accuracy on NaN logits (used to score chance level)",
         _accuracy_of_nan_logits, ValueError,
         r"values holds 4 non-finite entries \(NaN or inf\): the tasks' metric diverged"),
    Case("meta", "train step through an inner optax.adam: finite loss, NaN meta-gradient",
         _inner_optax_adam_train_step, RUNTIME,
         r"outer stage.*a finite meta_loss with meta_gradient_finite=False.*"
         r"metajax.solvers.differentiable_adam"),
    Case("cli", "sinusoid.py --solver adjoint --reg 3 (reg is iMAML's)",
         _cli("sinusoid", "--solver", "adjoint", "--reg", "3"), ValueError,
         r"--reg 3.0 is used by --solver imaml only; --solver adjoint would ignore it"),
    Case("cli", "sinusoid.py --t1 0.5 with MAML", _cli("sinusoid", "--t1", "0.5"), ValueError,
         r"--t1 0.5 is used by --solver adjoint only; --solver maml would ignore it"),
    Case("cli", "sinusoid.py --solver maml --cg-steps 9", _cli("sinusoid", "--cg-steps", "9"),
         ValueError, r"--cg-steps 9 is used by --solver imaml only"),
    Case("cli", "fewshot.py --solver maml --context-lr 9 (CAVIA's flag)",
         _cli("fewshot", "--solver", "maml", "--context-lr", "9"), ValueError,
         r"--context-lr 9.0 is used by --solver cavia only; --solver maml would ignore it"),
    Case("cli", "sinusoid.py --solver cavia --inner-lr 0.7 (CAVIA steps by --context-lr)",
         _cli("sinusoid", "--solver", "cavia", "--inner-lr", "0.7"), ValueError,
         r"--inner-lr 0.7 is not used by --solver cavia; --solver cavia would ignore it"),
]
