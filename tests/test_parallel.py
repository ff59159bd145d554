"""A task batch sharded over 4 fake CPU devices gives the single-device meta-gradient."""

import jax
import jax.numpy as jnp
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
