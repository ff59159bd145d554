"""A task batch sharded over 4 fake CPU devices gives the single-device meta-gradient."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import metajax
from tests import linreg

SOLVERS = {
    "unrolled": lambda: metajax.solvers.unrolled(linreg.loss_fn, steps=5, step_size=0.3),
    "implicit": lambda: metajax.solvers.implicit(linreg.loss_fn, reg=2.0),
    "adjoint": lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.5),
}


def test_four_fake_devices_are_present():
  assert len(jax.devices()) == 4, "tests/conftest.py forces 4 host devices"


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_sharded_meta_gradient_equals_single_device(name, dtype):
  problems, support, query = linreg.batch(8, dtype)
  tasks = metajax.tasks.Task(support, query)
  objective = metajax.meta.meta_objective(SOLVERS[name](), linreg.loss_fn)
  grad_fn = jax.jit(jax.grad(objective))
  single = grad_fn(problems[0].params, jax.device_put(tasks, jax.devices()[0]))

  mesh = metajax.parallel.task_mesh()
  sharded_tasks = metajax.parallel.shard_tasks(tasks, mesh)
  assert len(sharded_tasks.support[0].sharding.device_set) == 4
  theta = jax.device_put(problems[0].params, metajax.parallel.replicated(mesh))
  sharded = grad_fn(theta, sharded_tasks)
  tol = 1e-12 if dtype == jnp.float64 else 1e-5
  assert linreg.rel_err(linreg.flat(sharded), linreg.flat(single)) <= tol


def test_shard_tasks_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="multiple of the mesh size 4"):
    metajax.parallel.shard_tasks(jnp.zeros((6, 2)), metajax.parallel.task_mesh())


@pytest.mark.parametrize("placement", ["device_0", "replicated"])
def test_train_step_with_placed_meta_params_compiles_once(placement):
  """Meta-parameters put on a device or replicated over the mesh: the state init_train_state
  builds is placed alike, so later calls (whose state comes out of the step) reuse the first
  call's program; the sharded run equals the unplaced one."""
  import optax
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), features=(8, 1))
  loss_fn = metajax.meta.mse_loss(apply_fn)
  value_and_grad = jax.value_and_grad(metajax.meta.meta_objective(
      metajax.solvers.unrolled(loss_fn, steps=2, step_size=0.01), loss_fn))
  mesh = metajax.parallel.task_mesh()
  family = metajax.tasks.sinusoid()
  if placement == "device_0":
    placed, sample = jax.device_put(params, jax.devices()[0]), family
  else:
    placed = jax.device_put(params, metajax.parallel.replicated(mesh))
    sample = metajax.parallel.shard_family(family, mesh)
  optimizer = optax.sgd(0.01)
  runs = {}
  for name, (start, sampler) in {"plain": (params, family), "placed": (placed, sample)}.items():
    step = metajax.meta.make_train_step(value_and_grad, optimizer, sampler, meta_batch_size=8,
                                        iterations=2)
    state = metajax.meta.init_train_state(start, optimizer)
    for _ in range(3):
      state, _ = step(state, jax.random.key(1))
    assert step.cache_sizes() == {"step": 1}, name
    runs[name] = state.meta_params
  flat = lambda tree: np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)
  assert linreg.rel_err(flat(runs["placed"]), flat(runs["plain"])) <= 1e-5
