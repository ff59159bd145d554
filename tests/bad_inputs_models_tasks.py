"""Bad inputs to the task families (``metajax.tasks``) and the models (``metajax.models``).

Every :class:`~tests.badinput.Case` provokes one kind of mistake with a tiny input (a few
classes of 8 x 8 images, 4-filter networks), so the whole table runs in seconds.
"""

from __future__ import annotations

import functools

from tests.badinput import Case


def _tasks():
  import metajax.tasks
  return metajax.tasks


def _models():
  import metajax.models
  return metajax.models


def _key():
  import jax
  return jax.random.key(0)


def _images(shape=(4, 3, 8, 8, 1), dtype="uint8"):
  import jax.numpy as jnp
  return jnp.zeros(shape, dtype)


def _family(target_fn=lambda x, a: a * x, param_ranges=None, **kwargs):
  kwargs = {"num_support": 2, "num_query": 2, "x_range": (-1.0, 1.0), **kwargs}
  return _tasks().regression_family(target_fn, {"a": (1.0, 2.0)} if param_ranges is None
                                    else param_ranges, **kwargs)


def _episodes(images=None, num_tasks=2, key=None, **kwargs):
  sample = _tasks().episodes(**{"ways": 2, "shots": 1, "queries": 1, **kwargs})
  return sample(_key() if key is None else key, num_tasks, _images() if images is None
                else images)


def _class_batches(images=None, **kwargs):
  sample = _tasks().class_batches(**{"batch_size": 4, **kwargs})
  return sample(_key(), _images() if images is None else images)


def _jit_sinusoid():
  import jax
  return jax.jit(_tasks().sinusoid(num_support=2, num_query=2))(_key(), 4)


def _split_keys():
  import jax
  return _tasks().sinusoid()(jax.random.split(_key(), 3), 2)


def _conv4(input_shape=(8, 8, 1), **kwargs):
  module = _models().Conv4(**{"num_classes": 3, "filters": 4, "blocks": 2, **kwargs})
  return _models().init_model(module, _key(), input_shape)


def _resnet12(**kwargs):
  module = _models().ResNet12(**{"num_classes": 3, "widths": (4,), **kwargs})
  return _models().init_model(module, _key(), (8, 8, 1))


@functools.cache
def _per_step():
  return _conv4(norm="per_step", num_steps=3)


@functools.cache
def _frozen():
  module = _models().Conv4(3, filters=4, blocks=2, norm="frozen")
  return module, *_models().init_model(module, _key(), (8, 8, 1))


def _select(step, params=None):
  return _models().select_step(_per_step()[0] if params is None else params, step)


def _calibrate(images=None, wrap=False, **kwargs):
  import jax.numpy as jnp
  _, params, apply_fn = _frozen()
  if wrap:  # e.g. a user's own wrapper around init_model's apply_fn: no .module attribute
    inner = apply_fn
    apply_fn = lambda p, x: inner(p, x)
  images = jnp.ones((4, 8, 8, 1)) if images is None else images
  return _models().calibrate_batch_stats(params, apply_fn, images, **kwargs)


def _calibrate_transductive():
  import jax.numpy as jnp
  params, apply_fn = _conv4()
  return _models().calibrate_batch_stats(params, apply_fn, jnp.ones((4, 8, 8, 1)))


def _apply_one_image():
  import jax.numpy as jnp
  params, apply_fn = _conv4()
  return apply_fn(params, jnp.ones((8, 8, 1)))


def _nnx_linear():
  from flax import nnx
  return nnx.Linear(2, 2, rngs=nnx.Rngs(0))


def _mlp_module_init():
  import jax.numpy as jnp
  return _models().MLP(features=()).init(_key(), jnp.ones((1, 1)))


def _batch_norm_epsilon():
  import jax.numpy as jnp
  return _models().BatchNorm(epsilon=0.0).init(_key(), jnp.ones((2, 3)))


TASKS = [
    Case("tasks", "regression_family param range with low > high",
         lambda: _family(param_ranges={"a": (2.0, 1.0)}), ValueError,
         r"param_ranges\['a'\] must have low < high, got \(2\.0, 1\.0\)"),
    Case("tasks", "regression_family param range with an infinite bound",
         lambda: _family(param_ranges={"a": (0.0, float("inf"))}), ValueError,
         r"param_ranges\['a'\] must be finite, got \(0\.0, inf\)"),
    Case("tasks", "regression_family param range that is not a (low, high) pair",
         lambda: _family(param_ranges={"a": (1.0,)}), TypeError,
         r"param_ranges\['a'\] must be a \(low, high\) pair of numbers, got \(1\.0,\)"),
    Case("tasks", "regression_family with empty param_ranges",
         lambda: _family(lambda x: x, param_ranges={}), ValueError,
         r"param_ranges is empty"),
    Case("tasks", "regression_family with param_ranges as a list of pairs",
         lambda: _family(param_ranges=[("a", (1.0, 2.0))]), TypeError,
         r"param_ranges must be a dict \{name: \(low, high\)\}, got list"),
    Case("tasks", "regression_family parameter names that target_fn does not take",
         lambda: _family(param_ranges={"b": (1.0, 2.0)}), ValueError,
         r"param_ranges names \['b'\] do not fit target_fn\(x, a\)"),
    Case("tasks", "regression_family target_fn that is not callable",
         lambda: _family(target_fn="sin"), TypeError, r"target_fn must be callable, got str"),
    Case("tasks", "regression_family target_fn whose output is not shaped like x",
         lambda: _family(target_fn=lambda x, a: (a * x).sum(1))(_key(), 3), ValueError,
         r"target_fn must return y of shape \(3, 4, 1\).*got shape \(3, 1\)"),
    Case("tasks", "regression_family input_dim of 0",
         lambda: _family(input_dim=0), ValueError, r"input_dim must be >= 1, got 0"),
    Case("tasks", "alpine2d with an integer dtype",
         lambda: _tasks().alpine2d(dtype="int32"), TypeError,
         r"dtype must be a floating-point dtype such as jnp.float32, got int32"),
    Case("tasks", "regression_family x_range given high first",
         lambda: _family(x_range=(1.0, -1.0)), ValueError,
         r"x_range must have low < high, got \(1\.0, -1\.0\)"),
    Case("tasks", "regression_family x_range with a NaN",
         lambda: _family(x_range=(float("nan"), 1.0)), ValueError,
         r"x_range must be finite, got \(nan, 1\.0\)"),
    Case("tasks", "regression_family num_query given as a float",
         lambda: _family(num_query=5.0), TypeError,
         r"num_query must be a Python int \(it is static\), got 5\.0"),
    Case("tasks", "sinusoid with num_support=0",
         lambda: _tasks().sinusoid(num_support=0), ValueError, r"num_support must be >= 1, got 0"),
    Case("tasks", "cos_mixture with a negative num_query",
         lambda: _tasks().cos_mixture(num_query=-3), ValueError,
         r"num_query must be >= 1, got -3"),
    Case("tasks", "sinusoid with an integer dtype",
         lambda: _tasks().sinusoid(dtype="int32"), TypeError,
         r"dtype must be a floating-point dtype such as jnp\.float32, got int32"),
    Case("tasks", "a family sampled under jit with num_tasks traced",
         _jit_sinusoid, TypeError,
         r"num_tasks must be a Python int, got a traced value.*static_argnums=1"),
    Case("tasks", "num_tasks given as a float",
         lambda: _tasks().sinusoid()(_key(), 4.0), TypeError,
         r"num_tasks must be a Python int .*got 4\.0 of type float"),
    Case("tasks", "num_tasks=0",
         lambda: _episodes(num_tasks=0), ValueError, r"num_tasks must be >= 1, got 0"),
    Case("tasks", "an int seed where a PRNG key belongs",
         lambda: _tasks().sinusoid()(0, 2), TypeError,
         r"key must be a PRNG key such as jax\.random\.key\(0\), got 0"),
    Case("tasks", "a batch of keys where one key belongs", _split_keys, ValueError,
         r"key must be a single PRNG key, got a key array of shape \(3,\)"),
    Case("tasks", "episodes over images without the class axis (rank 4)",
         lambda: _episodes(_images((12, 8, 8, 1))), ValueError,
         r"images must have shape \(num_classes, examples_per_class, H, W, C\) \(rank 5\), got "
         r"shape \(12, 8, 8, 1\) \(rank 4\)"),
    Case("tasks", "episodes over int32 images",
         lambda: _episodes(_images(dtype="int32")), TypeError,
         r"images must be floating-point or uint8 .*got dtype int32"),
    Case("tasks", "episodes over a Python list of images",
         lambda: _episodes([[0.0]]), TypeError, r"images must be an array of shape .*got list"),
    Case("tasks", "episodes with more ways than classes",
         lambda: _episodes(ways=5), ValueError,
         r"ways=5 exceeds the 4 classes available in images of shape \(4, 3, 8, 8, 1\)"),
    Case("tasks", "episodes with more ways than classes even with rotations",
         lambda: _episodes(_images((1, 3, 8, 8, 1)), ways=5, rotations=True), ValueError,
         r"ways=5 exceeds the 4 classes available \(1 x 4 rotations\)"),
    Case("tasks", "episodes with shots + queries above the examples per class",
         lambda: _episodes(shots=2, queries=2), ValueError,
         r"shots \+ queries = 4 exceeds the 3 examples per class .*shots=2 \+ queries=2"),
    Case("tasks", "episodes with ways=0",
         lambda: _episodes(ways=0), ValueError, r"ways must be >= 1, got 0"),
    Case("tasks", "episodes with rotations over non-square images",
         lambda: _episodes(_images((4, 3, 8, 6, 1)), rotations=True), ValueError,
         r"rotations=True needs square images, got H x W = 8 x 6"),
    Case("tasks", "episodes with rotations given as a string",
         lambda: _tasks().episodes(ways=2, shots=1, queries=1, rotations="yes"), TypeError,
         r"rotations must be True or False, got 'yes'"),
    Case("tasks", "class_batches over images with no classes",
         lambda: _class_batches(_images((0, 3, 8, 8, 1))), ValueError,
         r"images holds no examples: shape \(0, 3, 8, 8, 1\) has 0 classes"),
    Case("tasks", "class_batches over images with empty classes",
         lambda: _class_batches(_images((4, 0, 8, 8, 1))), ValueError,
         r"images holds no examples: .* has 4 classes of 0 examples"),
    Case("tasks", "class_batches over a rank-4 image batch",
         lambda: _class_batches(_images((4, 8, 8, 1), "float32")), ValueError,
         r"images must have shape \(num_classes, examples_per_class, H, W, C\) \(rank 5\)"),
    Case("tasks", "class_batches with batch_size=0",
         lambda: _tasks().class_batches(batch_size=0), ValueError,
         r"batch_size must be >= 1, got 0"),
]

MODELS = [
    Case("models", "make_mlp with empty features",
         lambda: _models().make_mlp(_key(), 1, ()), ValueError,
         r"features is empty: it needs at least the output width"),
    Case("models", "make_mlp with a zero-width layer",
         lambda: _models().make_mlp(_key(), 1, (4, 0, 1)), ValueError,
         r"features\[1\] must be >= 1, got 0"),
    Case("models", "make_mlp with a float layer width",
         lambda: _models().make_mlp(_key(), 1, (4.0, 1)), TypeError,
         r"features\[0\] must be a Python int .*got 4\.0"),
    Case("models", "make_mlp with features given as one int",
         lambda: _models().make_mlp(_key(), 1, 40), TypeError,
         r"features must be a sequence of layer widths such as \(40, 40, 1\), got 40"),
    Case("models", "make_mlp with in_features=0",
         lambda: _models().make_mlp(_key(), 0), ValueError, r"in_features must be >= 1, got 0"),
    Case("models", "make_mlp with an activation given by name",
         lambda: _models().make_mlp(_key(), activation="relu"), TypeError,
         r"activation must be callable, got str"),
    Case("models", "make_mlp with an integer dtype",
         lambda: _models().make_mlp(_key(), dtype="int32"), TypeError,
         r"dtype must be a floating-point dtype such as jnp\.float32, got int32"),
    Case("models", "MLP module initialized directly with empty features", _mlp_module_init,
         ValueError, r"MLP\.features is empty"),
    Case("models", "Conv4 with num_classes=0",
         lambda: _conv4(num_classes=0), ValueError, r"Conv4\.num_classes must be >= 1, got 0"),
    Case("models", "Conv4 with filters=0",
         lambda: _conv4(filters=0), ValueError, r"Conv4\.filters must be >= 1, got 0"),
    Case("models", "Conv4 with blocks=0",
         lambda: _conv4(blocks=0), ValueError, r"Conv4\.blocks must be >= 1, got 0"),
    Case("models", "Conv4 with an unknown norm mode",
         lambda: _conv4(norm="batch"), ValueError,
         r"Conv4\.norm must be one of \('transductive', 'frozen', 'per_step', 'none'\), got "
         r"'batch'"),
    Case("models", "Conv4 with an unknown conv_impl",
         lambda: _conv4(conv_impl="cudnn"), ValueError,
         r"Conv4\.conv_impl must be one of \('auto', 'lax', 'patches'\), got 'cudnn'"),
    Case("models", "Conv4 with num_steps but not norm='per_step'",
         lambda: _conv4(num_steps=5), ValueError,
         r"Conv4\.num_steps=5 only applies to norm='per_step', got norm='transductive'"),
    Case("models", "Conv4 on images too small for its blocks",
         lambda: _conv4((8, 8, 1), blocks=4), ValueError,
         r"images of 8 x 8 are too small for Conv4 with blocks=4: .*8 -> 4 -> 2 -> 1 -> 0.*at "
         r"least 16 pixels a side"),
    Case("models", "ResNet12 with no widths",
         lambda: _resnet12(widths=()), ValueError,
         r"ResNet12\.widths must be a non-empty tuple of filter counts, got \(\)"),
    Case("models", "ResNet12 with a zero width",
         lambda: _resnet12(widths=(4, 0)), ValueError, r"ResNet12\.widths\[1\] must be >= 1"),
    Case("models", "ResNet12 with an unknown norm mode",
         lambda: _resnet12(norm="layer"), ValueError, r"ResNet12\.norm must be one of"),
    Case("models", "BatchNorm with epsilon=0",
         _batch_norm_epsilon, ValueError, r"BatchNorm\.epsilon must be > 0, got 0\.0"),
    Case("models", "init_model input_shape with a batch axis",
         lambda: _conv4((1, 8, 8, 1)), ValueError,
         r"input_shape must be \(H, W, C\), one image without the batch axis, got "
         r"\(1, 8, 8, 1\) \(4 entries\)"),
    Case("models", "init_model input_shape with a zero size",
         lambda: _conv4((8, 0, 1)), ValueError,
         r"input_shape must be \(H, W, C\) of positive ints, got \(8, 0, 1\) \(W=0\)"),
    Case("models", "init_model given a flax.nnx module",
         lambda: _models().init_model(_nnx_linear(), _key(), (8, 8, 1)), TypeError,
         r"module must be a flax\.linen Module .*got flax\.nnx.*Linear; use from_nnx"),
    Case("models", "init_model with an integer dtype",
         lambda: _models().init_model(_models().Conv4(3, filters=4, blocks=2), _key(), (8, 8, 1),
                                      dtype="int32"), TypeError,
         r"dtype must be a floating-point dtype such as jnp\.float32, got int32"),
    Case("models", "apply_fn given one image without a batch axis", _apply_one_image,
         ValueError, r"apply_fn takes a batch of NHWC images \(N, H, W, C\) of \(8, 8, 1\), "
                     r"got shape \(8, 8, 1\); add a batch axis"),
    Case("models", "select_step with step == num_steps",
         lambda: _select(3), ValueError,
         r"step=3 is out of range for per-step batch norm with num_steps=3: it must be in "
         r"\[0, 2\]"),
    Case("models", "select_step with a negative step",
         lambda: _select(-1), ValueError, r"step=-1 is out of range .*num_steps=3"),
    Case("models", "select_step with a float step",
         lambda: _select(1.0), TypeError, r"step must be an integer scalar .*got 1\.0"),
    Case("models", "select_step on a model without per-step batch norm",
         lambda: _select(0, _conv4()[0]), ValueError,
         r"select_step found no per-step batch-norm parameters in params.*norm='per_step'"),
    Case("models", "calibrate_batch_stats with a wrapped apply_fn and no module=",
         lambda: _calibrate(wrap=True), TypeError,
         r"calibrate_batch_stats needs the flax module behind params: apply_fn .*has no "
         r"\.module attribute.*pass module="),
    Case("models", "calibrate_batch_stats on a model without norm='frozen'",
         _calibrate_transductive, ValueError,
         r"calibrate_batch_stats needs a model with norm='frozen' layers .*got Conv4 with "
         r"norm='transductive'"),
    Case("models", "calibrate_batch_stats on episodes-shaped images (rank 5)",
         lambda: _calibrate(_images((2, 2, 8, 8, 1), "float32")), ValueError,
         r"images must be a batch of NHWC images \(N, H, W, C\), got shape \(2, 2, 8, 8, 1\) "
         r"\(rank 5\)"),
    Case("models", "calibrate_batch_stats on raw uint8 images",
         lambda: _calibrate(_images((4, 8, 8, 1))), TypeError,
         r"images must be floating-point and scaled as in training, got dtype uint8"),
    Case("models", "from_nnx given a flax.linen module",
         lambda: _models().from_nnx(_models().Conv4(3)), TypeError,
         r"from_nnx takes a flax\.nnx\.Module, got metajax\.models\.conv\.Conv4 \(a flax\.linen "
         r"module: use metajax\.models\.init_model"),
    Case("models", "from_equinox given a flax.nnx module",
         lambda: _models().from_equinox(_nnx_linear()), TypeError,
         r"from_equinox takes an equinox\.Module, got flax\.nnx.*Linear \(a flax\.nnx module: "
         r"use metajax\.models\.from_nnx\)"),
    Case("models", "from_nnx given a module class instead of an instance",
         lambda: _models().from_nnx(__import__("flax").nnx.Linear), TypeError,
         r"from_nnx takes a flax\.nnx\.Module, got .* \(a class: pass an instance\)"),
    Case("models", "freeze_batch_stats given an optimizer factory, not an optimizer",
         lambda: _models().freeze_batch_stats(__import__("optax").adamw), TypeError,
         r"optimizer must be an optax GradientTransformation, got function"),
]

CASES = TASKS + MODELS
