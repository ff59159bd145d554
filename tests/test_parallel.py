"""A task batch sharded over 4 fake CPU devices gives the single-device meta-gradient."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
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


def test_shard_helpers_find_the_task_axis_as_make_train_step_does():
  # jax.make_mesh: Explicit axes by default; a 1-D mesh's only axis is the task axis
  data = jax.make_mesh((4,), ("data",))
  assert metajax.parallel.shard_tasks(jnp.zeros((8, 2)), data).sharding.spec == P("data")
  sample = jax.jit(metajax.parallel.shard_family(metajax.tasks.sinusoid(), data),
                   static_argnums=1)
  tasks = sample(jax.random.key(0), 8)
  assert len(tasks.support[0].sharding.device_set) == 4
  # 2 x 2 (tasks, model): the tasks split over the 2-wide 'tasks' axis only
  grid = jax.make_mesh((2, 2), ("tasks", "model"))
  assert metajax.parallel.shard_tasks(jnp.zeros((6, 2)), grid).sharding.spec == P("tasks")
  with pytest.raises(ValueError, match="multiple of the mesh size 2 along its task axis 'tasks'"):
    metajax.parallel.shard_tasks(jnp.zeros((5, 2)), grid)


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


# --- scale-out: a train step over a mesh, shard_map, pmap, micro-batches -----------------------

from jax.sharding import PartitionSpec as P  # noqa: E402

TRAIN_SOLVERS = {  # defaults, as a user gets them
    "unrolled": lambda: metajax.solvers.unrolled(linreg.loss_fn, steps=5, step_size=0.1),
    "implicit": lambda: metajax.solvers.implicit(linreg.loss_fn, reg=2.0),
    "adjoint": lambda: metajax.solvers.adjoint(linreg.loss_fn, t1=1.0),
}
D = 4  # features of the linear-regression tasks


def linreg_tasks(dtype):
  """A task family of linear regressions (support 16, query 12 points), sampled on device."""
  def sample(key, num_tasks):
    kx, kq, kw, kn = jax.random.split(key, 4)
    w = jax.random.normal(kw, (num_tasks, D, 1), dtype)
    xs = jax.random.normal(kx, (num_tasks, 16, D), dtype)
    xq = jax.random.normal(kq, (num_tasks, 12, D), dtype)
    noise = 0.1 * jax.random.normal(kn, (num_tasks, 16), dtype)
    return metajax.tasks.Task((xs, (xs @ w)[..., 0] + 0.3 + noise), (xq, (xq @ w)[..., 0] + 0.3))
  return sample


def theta0(dtype):
  return {"w": jnp.full((D,), 0.1, dtype), "b": jnp.zeros((), dtype)}


def _train(name, dtype, *, iterations=20, meta_batch_size=8, calls=1, **kwargs):
  objective = metajax.meta.meta_objective(TRAIN_SOLVERS[name](), linreg.loss_fn)
  optimizer = optax.adam(1e-2)
  step = metajax.meta.make_train_step(jax.value_and_grad(objective), optimizer,
                                      linreg_tasks(dtype), meta_batch_size=meta_batch_size,
                                      iterations=iterations // calls, **kwargs)
  state = metajax.meta.init_train_state(theta0(dtype), optimizer)
  for _ in range(calls):
    state, losses = step(state, jax.random.key(3))
  return step, state, losses


MESHES = {
    "auto": lambda: {"mesh": metajax.parallel.task_mesh()},
    "explicit": lambda: {"mesh": jax.make_mesh((4,), ("tasks",), axis_types=(
        jax.sharding.AxisType.Explicit,))},
    "shard_map": lambda: {"mesh": metajax.parallel.task_mesh(), "shard_map": True},
}


@pytest.mark.parametrize("name", list(TRAIN_SOLVERS))
def test_sharded_train_step_equals_one_device_and_is_partitioned(name):
  """20 meta-iterations over 4 devices (Auto mesh, Explicit mesh, shard_map) give the
  one-device meta-parameters; the compiled step holds each device's 2 of the 8 tasks, never the
  whole batch, and reduces across devices."""
  dtype = jnp.float32
  _, single, single_losses = _train(name, dtype)
  for mode, kwargs in MESHES.items():
    step, state, losses = _train(name, dtype, calls=2, **kwargs())
    assert step.cache_sizes() == {"step": 1}, mode
    err = linreg.rel_err(linreg.flat(state.meta_params), linreg.flat(single.meta_params))
    assert err <= 1e-5, (mode, err)
    assert np.allclose(losses, single_losses[10:], rtol=1e-5), mode
    leaf = state.meta_params["w"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, mode
    hlo = step.lower(state, jax.random.key(3)).compile().as_text()
    assert "f32[2,16,4]" in hlo and "f32[8,16,4]" not in hlo, mode  # tasks split 4 ways
    assert "all-reduce" in hlo, mode


def test_micro_batches_equal_the_whole_batch():
  """4 micro-batches of 8 tasks (scanned, means averaged) = one batch of 32, float64; over a
  mesh too."""
  _, whole, whole_losses = _train("unrolled", jnp.float64, iterations=3, meta_batch_size=32)
  for kwargs in ({}, {"mesh": metajax.parallel.task_mesh()}):
    step, state, losses = _train("unrolled", jnp.float64, iterations=3, meta_batch_size=32,
                                 micro_batches=4, **kwargs)
    assert linreg.rel_err(linreg.flat(state.meta_params),
                          linreg.flat(whole.meta_params)) <= 1e-6
    assert np.allclose(losses, whole_losses, rtol=1e-6)
    assert step.cache_sizes() == {"step": 1}


def test_per_call_groups_over_a_mesh_equal_one_device():
  """tasks_per_call (the CPU conv-net path) over a mesh: each group's program is split over the
  devices and the run equals one device."""
  _, single, _ = _train("unrolled", jnp.float64, iterations=3)
  step, state, _ = _train("unrolled", jnp.float64, iterations=3, tasks_per_call=4,
                          mesh=metajax.parallel.task_mesh())
  assert step.cache_sizes()["tasks"] == 1
  assert linreg.rel_err(linreg.flat(state.meta_params), linreg.flat(single.meta_params)) <= 1e-12


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["unrolled", "implicit"])
def test_default_solvers_inside_a_default_shard_map_give_the_meta_gradient(name, dtype):
  """Inside jax.shard_map (check_vma=True) each device's inner steps see its own tasks only
  (an invariant theta would have its inner gradient summed over every device's tasks); the
  implicit default (Barzilai-Borwein, no line search) runs there too."""
  problems, support, query = linreg.batch(8, dtype)
  tasks = metajax.tasks.Task(support, query)
  objective = metajax.meta.meta_objective(TRAIN_SOLVERS[name](), linreg.loss_fn)
  single = jax.jit(jax.grad(objective))(problems[0].params, tasks)

  def local(theta, tasks):
    return jax.grad(lambda p: jax.lax.pmean(objective(p, tasks), "tasks"))(theta)
  sharded = jax.jit(jax.shard_map(local, mesh=metajax.parallel.task_mesh(),
                                  in_specs=(P(), P("tasks")), out_specs=P()))(
      problems[0].params, tasks)
  tol = 1e-12 if dtype == jnp.float64 else 1e-5
  assert linreg.rel_err(linreg.flat(sharded), linreg.flat(single)) <= tol
  closed_form = np.mean([jacobian.T @ p.query_grad(phi) for p in problems
                         for phi, jacobian in [p.unrolled(5, 0.1) if name == "unrolled"
                                               else p.proximal(2.0)[:2]]], axis=0)
  assert linreg.rel_err(linreg.flat(sharded), closed_form) <= linreg.RTOL[dtype]


@pytest.mark.parametrize("name", list(TRAIN_SOLVERS))
def test_pmap_and_shard_map_without_vma_check_give_the_meta_gradient(name):
  """What older code does (pmap, or shard_map(check_vma=False)) with lax.pmean of the
  meta-gradient works for every solver (the adjoint differentiates with DirectAdjoint there)."""
  problems, support, query = linreg.batch(8, jnp.float64)
  tasks = metajax.tasks.Task(support, query)
  objective = metajax.meta.meta_objective(TRAIN_SOLVERS[name](), linreg.loss_fn)
  single = jax.jit(jax.grad(objective))(problems[0].params, tasks)
  local = lambda theta, tasks: jax.lax.pmean(jax.grad(objective)(theta, tasks), "tasks")
  per_device = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), tasks)
  pmapped = jax.pmap(local, axis_name="tasks", in_axes=(None, 0))(problems[0].params, per_device)
  assert linreg.rel_err(linreg.flat(jax.tree.map(lambda x: x[0], pmapped)),
                        linreg.flat(single)) <= 1e-10
  unchecked = jax.jit(jax.shard_map(local, mesh=metajax.parallel.task_mesh(), check_vma=False,
                                    in_specs=(P(), P("tasks")), out_specs=P()))(
      problems[0].params, tasks)
  assert linreg.rel_err(linreg.flat(unchecked), linreg.flat(single)) <= 1e-10
