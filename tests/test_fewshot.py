"""Few-shot classification: models, batch-norm modes, adapters, episodes, the jitted step."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax
from metajax.models import Conv4, ResNet12, init_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _class_images(num_classes=6, per_class=5, size=8):
  """Class c, example e: constant image of value 10 c + e, with a marker pixel for rotations."""
  images = np.zeros((num_classes, per_class, size, size, 1), np.uint8)
  for c in range(num_classes):
    for e in range(per_class):
      images[c, e] = 10 * c + e
      images[c, e, 0, 0] = 255
  return jnp.asarray(images)


def test_episodes_draw_distinct_classes_with_permuted_labels():
  images = _class_images()
  sample = jax.jit(metajax.tasks.episodes(ways=3, shots=2, queries=2), static_argnums=1)
  tasks = sample(jax.random.key(0), 50, images)
  xs, ls = tasks.support
  xq, lq = tasks.query
  assert xs.shape == (50, 6, 8, 8, 1) and xq.shape == (50, 6, 8, 8, 1) and xs.dtype == jnp.float32
  values = np.round(np.asarray(xs[..., 1, 1, 0]) * 255).astype(int)  # 10 c + e
  qvalues = np.round(np.asarray(xq[..., 1, 1, 0]) * 255).astype(int)
  mappings = set()
  for t in range(50):
    classes = values[t] // 10
    assert all(len(set(classes[ls[t] == k])) == 1 for k in range(3))  # one class per label
    assert len(set(classes)) == 3  # distinct classes
    for k in range(3):  # support and query examples of a class are distinct
      assert not set(values[t][ls[t] == k]) & set(qvalues[t][lq[t] == k])
    mappings.add(tuple(classes[ls[t] == k][0] for k in range(3)))
  assert len(mappings) > 20  # labels are permuted per episode


def test_samplers_take_numpy_images_as_loaded():
  images = np.asarray(_class_images())  # what metajax.data's loaders return
  tasks = metajax.tasks.episodes(ways=3, shots=2, queries=2)(jax.random.key(0), 4, images)
  same = metajax.tasks.episodes(ways=3, shots=2, queries=2)(jax.random.key(0), 4,
                                                            jnp.asarray(images))
  chex.assert_trees_all_equal(tasks, same)
  x, labels = metajax.tasks.class_batches(batch_size=5)(jax.random.key(1), images)
  assert x.shape == (5, 8, 8, 1) and labels.shape == (5,)


def test_episodes_rotations_add_rotated_classes():
  images = _class_images(num_classes=2)
  tasks = metajax.tasks.episodes(ways=8, shots=1, queries=1, rotations=True)(
      jax.random.key(0), 4, images)
  corners = np.asarray(tasks.support[0][..., 0])  # marker at (0, 0) moves with rotation
  marked = {(int(np.argmax(img.max(1))), int(np.argmax(img.max(0)))) for t in corners for img in t}
  assert marked == {(0, 0), (0, 7), (7, 0), (7, 7)}


def test_episodes_errors_name_the_problem():
  images = _class_images()
  with pytest.raises(ValueError, match="ways=7 exceeds the 6 classes"):
    metajax.tasks.episodes(ways=7, shots=1, queries=1)(jax.random.key(0), 2, images)
  with pytest.raises(ValueError, match="shots \\+ queries = 6 exceeds the 5 .*shots=3 \\+ "
                                       "queries=3"):
    metajax.tasks.episodes(ways=2, shots=3, queries=3)(jax.random.key(0), 2, images)
  with pytest.raises(ValueError, match="images must have shape"):
    metajax.tasks.episodes(ways=2, shots=1, queries=1)(jax.random.key(0), 2, images[0])
  # checked the same way when the family is traced (num_tasks static, images traced)
  sample = jax.jit(metajax.tasks.episodes(ways=7, shots=1, queries=1), static_argnums=1)
  with pytest.raises(ValueError, match="ways=7 exceeds the 6 classes"):
    sample(jax.random.key(0), 2, images)


def test_task_families_run_under_jit_with_static_num_tasks():
  key = jax.random.key(3)
  for family in (metajax.tasks.sinusoid(num_support=3, num_query=4),
                 metajax.tasks.cos_mixture(num_support=3, num_query=4),
                 metajax.tasks.regression_family(lambda x, a, b: a * x + b,
                                                 {"a": (1.0, 2.0), "b": (-1.0, 0.0)},
                                                 num_support=3, num_query=4, x_range=(0.0, 1.0))):
    eager = family(key, 5)
    jitted = jax.jit(family, static_argnums=1)(key, 5)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)  # XLA fuses differently
    assert eager.support[0].shape == (5, 3, 1) and eager.query[1].shape == (5, 4, 1)
  images = _class_images(num_classes=3, per_class=4)
  x, labels = jax.jit(metajax.tasks.class_batches(batch_size=6, rotations=True))(key, images)
  assert x.shape == (6, 8, 8, 1) and int(labels.max()) < 12
  tasks = jax.jit(metajax.tasks.episodes(ways=5, shots=1, queries=2, rotations=True),
                  static_argnums=1)(key, 2, images)
  assert tasks.query[0].shape == (2, 10, 8, 8, 1)
  raw = metajax.tasks.sinusoid()(jax.random.PRNGKey(0), 2)  # raw uint32 keys are keys too
  assert raw.support[0].shape == (2, 10, 1)


@pytest.mark.parametrize("module,shape,out", [
    (Conv4(5, filters=8), (28, 28, 1), (2, 5)),
    (Conv4(20, filters=8, strided=True), (28, 28, 1), (2, 20)),
    (Conv4(5, filters=8), (84, 84, 3), (2, 5)),
    (ResNet12(5, widths=(4, 4, 8, 8)), (84, 84, 3), (2, 5)),
])
def test_models_shapes(module, shape, out):
  params, apply_fn = init_model(module, jax.random.key(0), shape)
  assert apply_fn(params, jnp.ones((2, *shape))).shape == out


def test_conv4_is_mamls_architecture():
  params, _ = init_model(Conv4(5), jax.random.key(0), (84, 84, 3))
  assert [params[f"Conv_{i}"]["kernel"].shape for i in range(4)] == [
      (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 64), (3, 3, 64, 64)]
  assert params["Dense_0"]["kernel"].shape == (5 * 5 * 64, 5)  # 84 -> 42 -> 21 -> 10 -> 5
  mini, _ = init_model(Conv4(5, filters=32), jax.random.key(0), (84, 84, 3))
  assert mini["Dense_0"]["kernel"].shape == (800, 5)  # MAML miniImageNet: 5 x 5 x 32
  omniglot, _ = init_model(Conv4(5, strided=True), jax.random.key(0), (28, 28, 1))
  assert omniglot["Dense_0"]["kernel"].shape == (2 * 2 * 64, 5)  # 28 -> 14 -> 7 -> 4 -> 2


def test_transductive_and_frozen_batch_norm():
  x = jax.random.normal(jax.random.key(1), (16, 4, 4, 3)) * 5 + 2
  bn = metajax.models.BatchNorm("transductive")
  params = bn.init(jax.random.key(0), x)["params"]
  y = bn.apply({"params": params}, x)
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), 1, atol=1e-3)

  frozen = metajax.models.BatchNorm("frozen")
  fparams = frozen.init(jax.random.key(0), x)["params"]
  fparams = {**fparams, "mean": jnp.full(3, 2.0), "var": jnp.full(3, 25.0)}
  grads = jax.grad(lambda p: jnp.sum(frozen.apply({"params": p}, x) ** 2))(fparams)
  assert float(jnp.abs(grads["mean"]).max()) == 0 and float(jnp.abs(grads["var"]).max()) == 0
  assert float(jnp.abs(grads["scale"]).max()) > 0
  # Frozen statistics do not follow the batch: a shifted batch stays shifted.
  shifted = frozen.apply({"params": fparams}, x + 10.0)
  assert float(shifted.mean()) > 1.5


def test_calibrate_batch_stats_matches_batch_statistics():
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  params, apply_fn = init_model(Conv4(5, filters=4, norm="frozen", blocks=2), jax.random.key(0),
                                (8, 8, 1))
  calibrated = metajax.models.calibrate_batch_stats(params, apply_fn, images)
  _, transductive_apply = init_model(Conv4(5, filters=4, blocks=2), jax.random.key(0), (8, 8, 1))
  without = {k: ({kk: vv for kk, vv in v.items() if kk not in ("mean", "var")}
                 if k.startswith("BatchNorm") else v) for k, v in calibrated.items()}
  np.testing.assert_allclose(apply_fn(calibrated, images), transductive_apply(without, images),
                             rtol=1e-4, atol=1e-5)


def test_per_step_batch_norm_with_step_aware_unrolled_solver():
  module = Conv4(3, filters=4, norm="per_step", num_steps=3, blocks=2)
  params, apply_fn = init_model(module, jax.random.key(0), (8, 8, 1))
  assert params["BatchNorm_0"]["scale"].shape == (3, 4)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  labels = jnp.arange(6) % 3
  loss = lambda p, b, step: metajax.meta.cross_entropy_loss(apply_fn)(
      metajax.models.select_step(p, step), b)
  adapt = metajax.solvers.unrolled(loss, steps=2, step_size=0.5, step_aware=True)
  phi = adapt(params, (x, labels))
  # Steps 0 and 1 adapted their own rows; row 2 (unused in the inner loop) is unchanged.
  delta = jnp.abs(phi["BatchNorm_0"]["bias"] - params["BatchNorm_0"]["bias"]).sum(1)
  assert float(delta[0]) > 0 and float(delta[1]) > 0 and float(delta[2]) == 0


def test_select_step_moves_only_per_step_rows_and_clamps_array_steps():
  """Regression: step 3 of 3 wrapped to row 0, and 1-D batch-norm leaves were rotated."""
  rows = jnp.arange(12.0).reshape(3, 4)
  params = {"BatchNorm_0": {"scale": rows, "bias": rows + 100},  # per-step: (num_steps, C)
            "BatchNorm_1": {"scale": jnp.ones(4), "bias": jnp.arange(4.0)},  # transductive
            "ResidualBlock_0": {"BatchNorm_0": {"scale": rows, "bias": rows}},
            "Dense_0": {"kernel": rows, "bias": jnp.arange(4.0)}}
  for step in (0, 1, 2):
    out = metajax.models.select_step(params, step)
    np.testing.assert_array_equal(out["BatchNorm_0"]["scale"][0], rows[step])
    np.testing.assert_array_equal(out["BatchNorm_0"]["bias"][0], rows[step] + 100)
    np.testing.assert_array_equal(out["ResidualBlock_0"]["BatchNorm_0"]["bias"][0], rows[step])
    for name in ("BatchNorm_1", "Dense_0"):  # untouched, including the 1-D bias [0, 1, 2, 3]
      chex.assert_trees_all_equal(out[name], params[name])
  with pytest.raises(ValueError, match="step=3 is out of range .*num_steps=3"):
    metajax.models.select_step(params, 3)
  with pytest.raises(ValueError, match="step=-1 is out of range"):
    metajax.models.select_step(params, np.int32(-1))
  # jax.Array steps (traced in step-aware solvers) clamp to [0, num_steps - 1], jit or not
  pick = jax.jit(lambda p, k: metajax.models.select_step(p, k)["BatchNorm_0"]["scale"][0])
  for step, row in ((3, 2), (7, 2), (-1, 0), (1, 1)):
    np.testing.assert_array_equal(pick(params, jnp.int32(step)), rows[row])
    np.testing.assert_array_equal(
        metajax.models.select_step(params, jnp.int32(step))["BatchNorm_0"]["scale"][0], rows[row])
  with pytest.raises(TypeError, match="step must be an integer scalar"):
    metajax.models.select_step(params, jnp.float32(1.0))
  with pytest.raises(ValueError, match="no per-step batch-norm parameters"):
    metajax.models.select_step({"BatchNorm_1": params["BatchNorm_1"]}, 0)


def test_per_step_unrolled_solver_with_as_many_steps_as_rows_runs_eagerly():
  """unrolled(step_aware=True) evaluates its final loss at step K: a jax.Array, clamped."""
  params = {"BatchNorm_0": {"scale": jnp.ones((2, 3)), "bias": jnp.zeros((2, 3))}}

  def loss(p, batch, step):
    layer = metajax.models.select_step(p, step)["BatchNorm_0"]
    return jnp.sum((batch[0] * layer["scale"][0] + layer["bias"][0] - batch[1]) ** 2)

  adapt = metajax.solvers.unrolled(loss, steps=2, step_size=0.1, step_aware=True, unroll=True)
  phi, info = adapt.solve(params, (jnp.ones(3), 2.0 * jnp.ones(3)))
  delta = jnp.abs(phi["BatchNorm_0"]["bias"] - params["BatchNorm_0"]["bias"]).sum(1)
  assert float(delta[0]) > 0 and float(delta[1]) > 0 and bool(jnp.isfinite(info.loss))


def test_calibrate_batch_stats_takes_the_module_for_a_wrapped_apply_fn():
  """Regression: a wrapped apply_fn has no .module attribute."""
  module = Conv4(5, filters=4, norm="frozen", blocks=2)
  params, apply_fn = init_model(module, jax.random.key(0), (8, 8, 1))
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  expected = metajax.models.calibrate_batch_stats(params, apply_fn, images)
  wrapped = jax.jit(lambda p, x: apply_fn(p, x))
  with pytest.raises(TypeError, match="has no .module attribute.*pass module="):
    metajax.models.calibrate_batch_stats(params, wrapped, images)
  for fn in (wrapped, None):
    got = metajax.models.calibrate_batch_stats(params, fn, images, module=module)
    chex.assert_trees_all_equal(got, expected)
  assert float(jnp.abs(expected["BatchNorm_0"]["mean"]).max()) > 0


def test_freeze_batch_stats_keeps_frozen_statistics_under_weight_decay():
  """Regression: adamw's weight decay moved the stored mean and var (they are params)."""
  module = Conv4(3, filters=4, norm="frozen", blocks=2)
  params, apply_fn = init_model(module, jax.random.key(0), (8, 8, 1))
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) + 1.0
  params = metajax.models.calibrate_batch_stats(params, apply_fn, images)
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  batch = (images, jnp.arange(8) % 3)

  grad = jax.jit(jax.grad(loss))

  def train(optimizer, steps=10):
    p, state = params, optimizer.init(params)
    for _ in range(steps):
      updates, state = optimizer.update(grad(p, batch), state, p)
      p = optax.apply_updates(p, updates)
    return p

  adamw = optax.adamw(1e-2, weight_decay=0.1)
  plain, frozen = train(adamw), train(metajax.models.freeze_batch_stats(adamw))
  stats = lambda p: {k: (v["mean"], v["var"]) for k, v in p.items() if "mean" in v}
  chex.assert_trees_all_equal(stats(frozen), stats(params))  # exactly unchanged
  assert float(jnp.abs(plain["BatchNorm_0"]["mean"] - params["BatchNorm_0"]["mean"]).max()) > 0
  # The other leaves train as adamw would with its decay masked off the statistics (the
  # recipe without the wrapper; Adam's own update of a zero gradient is zero).
  decay_mask = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key not in ("mean", "var"), p)
  masked = train(optax.adamw(1e-2, weight_decay=0.1, mask=decay_mask))
  chex.assert_trees_all_equal(stats(masked), stats(params))
  chex.assert_trees_all_close(frozen, masked, rtol=1e-6, atol=1e-7)


def test_models_check_their_attributes_before_initializing():
  with pytest.raises(ValueError, match="Conv4.filters must be >= 1"):
    Conv4(5, filters=0).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))  # flax's own init too
  with pytest.raises(ValueError, match="too small for Conv4 with blocks=4"):
    init_model(Conv4(5, filters=4), jax.random.key(0), (12, 12, 1))
  # strided blocks (like ResNet-12's SAME pooling) never shrink an image to nothing
  params, apply_fn = init_model(Conv4(5, filters=2, strided=True), jax.random.key(0), (3, 3, 1))
  assert apply_fn(params, jnp.ones((2, 3, 3, 1))).shape == (2, 5)
  with pytest.raises(TypeError, match="from_equinox takes an equinox.Module.*init_model"):
    metajax.models.from_equinox(Conv4(5))


def test_nnx_and_equinox_adapters_adapt_like_raw_params():
  import equinox as eqx
  from flax import nnx

  x = jax.random.normal(jax.random.key(0), (10, 3))
  y = jax.random.normal(jax.random.key(1), (10, 2))
  raw_loss = lambda p, b: jnp.mean((b[0] @ p["w"] + p["b"] - b[1]) ** 2)
  raw_adapt = metajax.solvers.unrolled(raw_loss, steps=3, step_size=0.1)
  for params, apply_fn, to_raw in [
      (*metajax.models.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0))),
       lambda p: {"w": p["kernel"][...], "b": p["bias"][...]}),
      (*metajax.models.from_equinox(eqx.nn.Linear(3, 2, key=jax.random.key(0))),
       lambda p: {"w": p.weight.T, "b": p.bias}),
  ]:
    adapt = metajax.solvers.unrolled(metajax.meta.mse_loss(apply_fn), steps=3, step_size=0.1)
    phi = adapt(params, (x, y))
    expected = raw_adapt(to_raw(params), (x, y))
    chex.assert_trees_all_close(to_raw(phi), expected, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda p: metajax.meta.mse_loss(apply_fn)(adapt(p, (x, y)), (x, y)))(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def test_nnx_batch_norm_in_training_mode_is_transductive_and_leaves_the_module_alone():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear, self.norm = nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.linear(x))

  net = Net(nnx.Rngs(0))
  mean_before = np.asarray(net.norm.mean[...])
  params, apply_fn = metajax.models.from_nnx(net)
  x = jax.random.normal(jax.random.key(0), (6, 3)) + 2.0
  out = jax.jit(apply_fn)(params, x)  # was: TraceContextError (mutating BatchStat under jit)
  # training mode normalizes with the batch's own statistics (transductive batch norm)
  np.testing.assert_allclose(np.asarray(out.mean(0)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(apply_fn(params, x)), np.asarray(out), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(net.norm.mean[...]), mean_before)  # not updated
  adapt = metajax.solvers.unrolled(metajax.meta.mse_loss(apply_fn), steps=2, step_size=0.1)
  assert jax.tree.structure(jax.jit(adapt)(params, (x, jnp.ones((6, 4))))) == \
      jax.tree.structure(params)


def _conv_setup(dtype=jnp.float32, conv_impl="auto"):
  images = jax.device_put(_class_images(num_classes=6, per_class=5, size=8))
  params, apply_fn = init_model(Conv4(3, filters=4, blocks=2, conv_impl=conv_impl),
                                jax.random.key(0), (8, 8, 1), dtype=dtype)
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  sample = metajax.tasks.episodes(ways=3, shots=1, queries=2, dtype=dtype)
  return images, params, loss, sample


@pytest.mark.parametrize("mode", ["unroll", "map"])
def test_task_batching_modes_give_vmaps_numbers(mode):
  images, params, loss, sample = _conv_setup(jnp.float64)
  tasks = sample(jax.random.key(0), 3, images)
  adapt = metajax.solvers.unrolled(loss, steps=2, step_size=0.4)
  grads = {m: jax.jit(jax.grad(metajax.meta.meta_objective(adapt, loss, task_batching=m)))(
      params, tasks) for m in ("vmap", mode)}
  chex.assert_trees_all_close(grads[mode], grads["vmap"], rtol=1e-9, atol=1e-12)


def test_auto_task_batching_picks_unroll_for_lax_convs_on_cpu():
  images, params, loss, sample = _conv_setup(conv_impl="lax")
  support = jax.tree.map(lambda x: x[0], sample(jax.random.key(0), 1, images).support)
  assert metajax.solvers.choose_task_batching(loss, params, support) == "unroll"
  assert metajax.solvers.choose_unroll(20, loss, params, support) is True
  # patches (the CPU default of metajax's models) vectorize and loop at full speed
  images, params, loss, sample = _conv_setup(conv_impl="patches")
  assert metajax.solvers.choose_task_batching(loss, params, support) == "vmap"
  assert metajax.solvers.choose_unroll(20, loss, params, support) == 1
  assert metajax.solvers.uses_convolution(loss, params, support, patches=True)
  assert not metajax.solvers.uses_convolution(loss, params, support)


@pytest.mark.parametrize("solver,conv_impl", [("maml", "patches"), ("maml", "lax"),
                                              ("imaml", "auto")])
def test_fewshot_train_step_compiles_once_and_copies_no_images(solver, conv_impl):
  images, params, loss, sample = _conv_setup(conv_impl=conv_impl)
  if solver == "maml":
    adapt = metajax.solvers.unrolled(loss, steps=1, step_size=0.4)
  else:
    adapt = metajax.solvers.implicit(
        loss, reg=2.0, optimizer=metajax.solvers.inner_optimizers.gd(0.4), max_steps=3, tol=0.0,
        linear_solver=metajax.solvers.linear_solvers.cg(maxiter=5, tol=0))
  optimizer = optax.adam(1e-3)
  step = metajax.meta.make_train_step(
      jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)), optimizer, sample,
      meta_batch_size=3)
  state = metajax.meta.init_train_state(params, optimizer)
  key = jax.random.key(0)
  state, _ = step(state, key, images)
  with jax.transfer_guard("disallow"):  # images already on device: no host-to-device copy
    for _ in range(3):
      state, losses = step(state, key, images)
  assert step.tasks_per_call == 1  # convs on CPU: one compiled per-task program
  assert step.cache_sizes() == {"sample": 1, "tasks": 1, "update": 1} and int(state.step) == 4
  assert bool(jnp.isfinite(losses).all())
