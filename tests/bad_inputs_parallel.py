"""Bad inputs to scale-out: a train step over a mesh, micro-batches, solvers inside shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import metajax
from tests.badinput import Case

S = metajax.solvers
LOSS = metajax.meta.mse_loss(lambda p, x: x @ p)
TASKS = metajax.tasks.Task((jnp.ones((4, 4, 2)), jnp.ones((4, 4))),
                           (jnp.ones((4, 4, 2)), jnp.ones((4, 4))))


def _step(**kwargs):
  kwargs = {"meta_batch_size": 8, **kwargs}
  return metajax.meta.make_train_step(lambda p, t: (0.0, p), optax.sgd(0.1),
                                      metajax.tasks.sinusoid(), **kwargs)


def _in_shard_map(adapt):
  """jax.grad of the meta-objective inside a default (check_vma=True) shard_map."""
  objective = metajax.meta.meta_objective(adapt, LOSS)
  mesh = metajax.parallel.task_mesh()
  def local(theta, tasks):
    return jax.grad(lambda p: jax.lax.pmean(objective(p, tasks), "tasks"))(theta)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("tasks")), out_specs=P()))(
      jnp.zeros(2), TASKS)


CASES = [
    Case("parallel", "make_train_step with a list of devices for the mesh",
         lambda: _step(mesh=jax.devices()), TypeError, "mesh must be a jax.sharding.Mesh"),
    Case("parallel", "make_train_step over a 2-D mesh with no 'tasks' axis",
         lambda: _step(mesh=Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))),
         ValueError, r"mesh has axes \('data', 'model'\); name the one to split tasks over"),
    Case("parallel", "make_train_step with a meta-batch the mesh does not divide",
         lambda: _step(meta_batch_size=6, mesh=metajax.parallel.task_mesh()), ValueError,
         r"meta_batch_size = 6 tasks must be a multiple of the mesh's task axis 'tasks' \(4"),
    Case("parallel", "make_train_step with micro-batches the mesh does not divide",
         lambda: _step(micro_batches=4, mesh=metajax.parallel.task_mesh()), ValueError,
         r"meta_batch_size / micro_batches \(8 / 4\) = 2 tasks must be a multiple"),
    Case("parallel", "make_train_step with micro_batches not dividing the meta-batch",
         lambda: _step(micro_batches=3), ValueError,
         r"micro_batches \(3\) must divide meta_batch_size \(8\)"),
    Case("parallel", "make_train_step with micro_batches=0",
         lambda: _step(micro_batches=0), ValueError, "micro_batches must be >= 1"),
    Case("parallel", "make_train_step with both micro_batches and tasks_per_call",
         lambda: _step(micro_batches=2, tasks_per_call=2), ValueError,
         "both split the meta-batch: use one of them"),
    Case("parallel", "make_train_step with shard_map=True and no mesh",
         lambda: _step(shard_map=True), ValueError, "shard_map=True needs a mesh"),
    Case("parallel", "make_train_step with shard_map='yes'",
         lambda: _step(mesh=metajax.parallel.task_mesh(), shard_map="yes"), TypeError,
         "shard_map must be True or False"),
    Case("parallel", "make_train_step with tasks_per_call not a multiple of the mesh",
         lambda: _step(tasks_per_call=2, mesh=metajax.parallel.task_mesh()), ValueError,
         r"tasks_per_call \(2\) must be a multiple of the mesh's task axis \(4 devices\)"),
    Case("parallel", "implicit with L-BFGS inside a default (check_vma=True) shard_map",
         lambda: _in_shard_map(S.implicit(LOSS, reg=1.0, optimizer=S.inner_optimizers.lbfgs())),
         NotImplementedError,
         r"metajax implicit solver: the lbfgs inner optimizer \(its line search\) cannot run "
         r"inside jax.shard_map with check_vma=True.*check_vma=False.*barzilai_borwein\(\)"),
    Case("parallel", "implicit with Newton-CG inside a default (check_vma=True) shard_map",
         lambda: _in_shard_map(S.implicit(LOSS, reg=1.0,
                                          optimizer=S.inner_optimizers.newton_cg())),
         NotImplementedError, r"newton_cg inner optimizer .* cannot run inside jax.shard_map"),
    Case("parallel", "adjoint inside a default (check_vma=True) shard_map",
         lambda: _in_shard_map(S.adjoint(LOSS, t1=1.0)), NotImplementedError,
         r"metajax adjoint solver: diffrax's ODE solve cannot run inside jax.shard_map with "
         r"check_vma=True.*make_train_step\(\.\.\., mesh=mesh, shard_map=True\)"),
    Case("parallel", "lower() on a train step that dispatches tasks per call",
         lambda: metajax.meta.make_train_step(
             lambda p, t: (jnp.sum(p), p), optax.sgd(0.1), metajax.tasks.sinusoid(),
             meta_batch_size=8, tasks_per_call=4).lower(
                 metajax.meta.init_train_state(jnp.zeros(2), optax.sgd(0.1)),
                 jax.random.key(0)),
         ValueError, r"this step dispatches 4 tasks per call: there is no one program to lower"),
]
