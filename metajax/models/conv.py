"""MAML's Conv4 and ResNet-12, with batch norm inside the inner loop as an explicit choice.

Batch-norm modes (``norm=``):

- ``"transductive"``: normalize with the statistics of the current batch, in
  the inner loop and at test time (MAML's setting; the query set is normalized
  with its own statistics).
- ``"frozen"``: normalize with stored statistics held in ``params`` under
  ``mean``/``var`` and excluded from gradients (``stop_gradient``); set them
  from data with :func:`calibrate_batch_stats`. Their gradient is zero, so plain
  gradient descent never moves them, but they are leaves of the trainable pytree:
  an optimizer whose update does not come from the gradient alone (weight decay:
  ``optax.adamw``, ``add_decayed_weights``) *does* move them. Wrap such an
  optimizer (outer, or an inner ``optax`` optimizer) in
  :func:`freeze_batch_stats` to keep them fixed.
- ``"per_step"``: MAML++'s per-step batch norm: ``scale``/``bias`` have a
  leading axis of ``num_steps`` entries (shape ``(num_steps, features)``) and the
  statistics are those of the current batch; :func:`select_step` picks the entry
  for inner step ``k``.
- ``"none"``: no normalization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.models.layers import CONV_IMPLS, Conv
from metajax.solvers import _common

NORM_MODES = ("transductive", "frozen", "per_step", "none")


def _check_int(owner: str, name: str, value) -> None:
  _common.check_positive_int(f"{owner}.{name}", value)


def _check_norm(owner: str, norm, num_steps) -> None:
  if not isinstance(norm, str) or norm not in NORM_MODES:
    raise ValueError(f"{owner}.norm must be one of {NORM_MODES}, got {norm!r}.")
  _check_int(owner, "num_steps", num_steps)
  if num_steps != 1 and norm != "per_step":
    raise ValueError(f"{owner}.num_steps={num_steps} only applies to norm='per_step', got "
                     f"norm={norm!r}; drop num_steps or use norm='per_step'.")


def _check_conv_impl(owner: str, conv_impl) -> None:
  if not isinstance(conv_impl, str) or conv_impl not in CONV_IMPLS:
    raise ValueError(f"{owner}.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")


class BatchNorm(nn.Module):
  """Batch norm over all axes but the last, in one of :data:`NORM_MODES`.

  With ``mode="frozen"`` the stored ``mean``/``var`` are entries of ``params`` that receive no
  gradient; weight decay still moves them unless the optimizer is wrapped in
  :func:`freeze_batch_stats` (see the module docstring).

  Attributes:
    mode: one of :data:`NORM_MODES`.
    num_steps: rows of per-step ``scale``/``bias`` (``mode="per_step"`` only).
    epsilon: added to the variance (finite, > 0).
  """

  mode: str = "transductive"
  num_steps: int = 1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    _check_norm("BatchNorm", self.mode, self.num_steps)
    _common.check_hyperparameter("BatchNorm.epsilon", self.epsilon)
    if self.mode == "none":
      return x
    features = x.shape[-1]
    shape = (self.num_steps, features) if self.mode == "per_step" else (features,)
    scale = self.param("scale", nn.initializers.ones, shape, x.dtype)
    bias = self.param("bias", nn.initializers.zeros, shape, x.dtype)
    if self.mode == "per_step":  # select_step has rotated the step's entry into row 0
      scale, bias = scale[0], bias[0]
    axes = tuple(range(x.ndim - 1))
    if self.mode == "frozen":
      mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (features,), x.dtype))
      var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (features,), x.dtype))
    else:
      mean, var = jnp.mean(x, axes), jnp.var(x, axes)
      self.sow("intermediates", "batch_stats", (mean, var))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class Conv4(nn.Module):
  """MAML's 4 x [3x3 conv, BN, ReLU, 2x2 max-pool] network with a linear head.

  Attributes:
    num_classes: ways of the task.
    filters: 64 (Omniglot) or 32 (miniImageNet).
    strided: Omniglot variant: stride-2 convolutions instead of max-pooling.
    norm: batch-norm mode (see module docstring).
    num_steps: entries of per-step batch-norm parameters (``norm="per_step"``).
    blocks: number of conv blocks (4 in the paper; fewer for tiny images).
    conv_impl: ``"auto"`` (patches @ kernel on CPU, XLA's convolution elsewhere),
      ``"lax"`` or ``"patches"``; see :mod:`metajax.models.layers`. Same parameters.

  Every attribute is checked when the module is initialized (:func:`init_model`): positive
  ints, known ``norm`` and ``conv_impl`` names, and images large enough for ``blocks``
  max-pooled blocks (at least ``2 ** blocks`` pixels a side unless ``strided``). With
  ``norm="frozen"`` the stored statistics are trainable leaves: see :func:`freeze_batch_stats`.
  """

  num_classes: int
  filters: int = 64
  strided: bool = False
  norm: str = "transductive"
  num_steps: int = 1
  blocks: int = 4
  conv_impl: str = "auto"

  def check(self, input_shape=None) -> None:
    """Raises naming the attribute (or the image size) that cannot build this network."""
    _check_int("Conv4", "num_classes", self.num_classes)
    _check_int("Conv4", "filters", self.filters)
    _check_int("Conv4", "blocks", self.blocks)
    if not isinstance(self.strided, (bool, np.bool_)):
      raise TypeError(f"Conv4.strided must be True or False, got {self.strided!r}.")
    _check_norm("Conv4", self.norm, self.num_steps)
    _check_conv_impl("Conv4", self.conv_impl)
    if input_shape is not None and not self.strided:
      height, width = input_shape[:2]
      if min(height, width) < 2 ** self.blocks:
        sizes = [min(height, width)]
        while len(sizes) <= self.blocks:
          sizes.append(sizes[-1] // 2)
        raise ValueError(
            f"images of {height} x {width} are too small for Conv4 with blocks={self.blocks}: "
            f"each block max-pools by 2 ({' -> '.join(map(str, sizes))}), so they need at least "
            f"{2 ** self.blocks} pixels a side; use fewer blocks, larger images or "
            "strided=True.")

  @nn.compact
  def __call__(self, x):
    self.check(x.shape[1:3])
    for _ in range(self.blocks):
      stride = 2 if self.strided else 1
      x = Conv(self.filters, (3, 3), strides=stride, padding="SAME", impl=self.conv_impl)(x)
      x = nn.relu(BatchNorm(self.norm, self.num_steps)(x))
      if not self.strided:  # VALID, as MAML: 84 -> 42 -> 21 -> 10 -> 5
        x = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ResidualBlock(nn.Module):
  filters: int
  norm: str
  num_steps: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    shortcut = BatchNorm(self.norm, self.num_steps)(
        Conv(self.filters, (1, 1), impl=self.conv_impl)(x))
    for i in range(3):
      x = Conv(self.filters, (3, 3), padding="SAME", use_bias=False, impl=self.conv_impl)(x)
      x = BatchNorm(self.norm, self.num_steps)(x)
      if i < 2:
        x = nn.leaky_relu(x, 0.1)
    x = nn.leaky_relu(x + shortcut, 0.1)
    return nn.max_pool(x, (2, 2), (2, 2), padding="SAME")


class ResNet12(nn.Module):
  """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): 4 residual blocks, global pooling.

  Attributes:
    num_classes: ways of the task.
    widths: filters of the four blocks.
    norm: batch-norm mode.
    num_steps: entries of per-step batch-norm parameters.
    conv_impl: as :class:`Conv4`'s.

  Every attribute is checked when the module is initialized (:func:`init_model`).
  """

  num_classes: int
  widths: tuple = (64, 160, 320, 640)
  norm: str = "transductive"
  num_steps: int = 1
  conv_impl: str = "auto"

  def check(self, input_shape=None) -> None:
    """Raises naming the attribute that cannot build this network."""
    del input_shape  # SAME max-pooling and global pooling take any image size
    _check_int("ResNet12", "num_classes", self.num_classes)
    if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, Sequence) \
        or not self.widths:
      raise ValueError(f"ResNet12.widths must be a non-empty tuple of filter counts, got "
                       f"{self.widths!r}.")
    for i, width in enumerate(self.widths):
      _check_int("ResNet12", f"widths[{i}]", width)
    _check_norm("ResNet12", self.norm, self.num_steps)
    _check_conv_impl("ResNet12", self.conv_impl)

  @nn.compact
  def __call__(self, x):
    self.check()
    for width in self.widths:
      x = ResidualBlock(width, self.norm, self.num_steps, self.conv_impl)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _check_input_shape(input_shape) -> tuple[int, int, int]:
  if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
    raise TypeError(f"input_shape must be a tuple (H, W, C) of positive ints, got "
                    f"{input_shape!r}.")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), one image without the batch axis, got "
                     f"{tuple(input_shape)} ({len(input_shape)} entries).")
  for name, value in zip(("H", "W", "C"), input_shape):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"input_shape must be (H, W, C) of positive ints, got "
                       f"{tuple(input_shape)} ({name}={value!r}).")
  return tuple(int(v) for v in input_shape)


def _check_float_dtype(dtype) -> None:
  _common.check_float_dtype(dtype)


def init_model(module: nn.Module, key, input_shape, dtype=jnp.float32):
  """Initializes a flax module for NHWC inputs of ``input_shape``; returns ``(params, apply_fn)``.

  Args:
    module: a ``flax.linen`` module taking a batch of NHWC images (e.g. :class:`Conv4`).
    key: PRNG key for the initialization.
    input_shape: ``(H, W, C)`` of one image (positive ints).
    dtype: floating-point dtype of the dummy input used to initialize.

  Returns:
    ``(params, apply_fn)`` with ``apply_fn(params, x)`` for ``x`` of shape ``(N, H, W, C)``;
    ``apply_fn.module`` is ``module`` (read by :func:`calibrate_batch_stats`).

  Raises:
    TypeError, ValueError: naming the argument or the module attribute that is wrong (the
      module's own ``check``, e.g. :meth:`Conv4.check`, runs first).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model
    >>> params, apply_fn = init_model(Conv4(num_classes=5, filters=8), jax.random.key(0),
    ...                               (28, 28, 1))
    >>> apply_fn(params, jnp.zeros((3, 28, 28, 1))).shape
    (3, 5)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen Module (e.g. Conv4(...)), got "
                    f"{type(module).__module__}.{type(module).__name__}; use from_nnx or "
                    "from_equinox for flax.nnx or equinox modules.")
  input_shape = _check_input_shape(input_shape)
  _check_float_dtype(dtype)
  if callable(getattr(module, "check", None)):
    module.check(input_shape)
  params = module.init(key, jnp.zeros((2, *input_shape), dtype))["params"]

  def apply_fn(params, x):
    if getattr(x, "ndim", 4) != 4:
      raise ValueError(f"apply_fn takes a batch of NHWC images (N, H, W, C), got shape "
                       f"{tuple(x.shape)}; add a batch axis with x[None] for one image.")
    return module.apply({"params": params}, x)

  apply_fn.module = module
  return params, apply_fn


def _per_step_rows(tree, found: list) -> None:
  """Collects the leading-axis sizes of per-step batch-norm ``scale``/``bias`` pairs."""
  if not isinstance(tree, Mapping):
    return
  if _is_per_step_layer(tree):
    found.append(tree["scale"].shape[0])
  for value in tree.values():
    _per_step_rows(value, found)


def _is_per_step_layer(node) -> bool:
  """A ``norm="per_step"`` :class:`BatchNorm`: 2-D ``scale`` and ``bias`` of one shape."""
  scale, bias = node.get("scale"), node.get("bias")
  return (getattr(scale, "ndim", None) == 2 and getattr(bias, "ndim", None) == 2
          and scale.shape == bias.shape)


def _roll_per_step(tree, shift):
  if not isinstance(tree, Mapping):
    return tree
  rolled = {k: _roll_per_step(v, shift) for k, v in tree.items()}
  if _is_per_step_layer(tree):
    rolled["scale"] = jnp.roll(tree["scale"], -shift, axis=0)
    rolled["bias"] = jnp.roll(tree["bias"], -shift, axis=0)
  return type(tree)(rolled) if not isinstance(tree, dict) else rolled


def select_step(params, step: int | jax.Array):
  """Rotates per-step batch-norm parameters so that inner step ``step``'s entry is row 0.

  Use inside a loss for MAML++-style per-step batch norm (``norm="per_step"``). Only the
  ``scale``/``bias`` of per-step layers move (pairs of 2-D arrays of shape
  ``(num_steps, features)``); every other leaf, including the 1-D ``scale``/``bias`` of other
  batch-norm modes, is returned unchanged.

  Out-of-range steps:

  - a Python (or NumPy) int outside ``[0, num_steps)`` raises ``ValueError``;
  - a ``jax.Array`` step (traced, as in :func:`metajax.solvers.unrolled` with
    ``step_aware=True``, or concrete) is clamped to ``[0, num_steps - 1]``: steps past the
    last entry use the last one, as MAML++ does when it evaluates the query set after the
    final inner step. The result is the same with or without ``jit``.

  Args:
    params: parameters of a model with ``norm="per_step"`` batch norm.
    step: the inner step, a scalar int.

  Raises:
    ValueError: ``params`` has no per-step batch-norm layer, its layers disagree on
      ``num_steps``, or an int ``step`` is out of range.
    TypeError: ``step`` is not an integer scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, select_step
    >>> params, apply_fn = init_model(Conv4(5, filters=4, norm="per_step", num_steps=3),
    ...                               jax.random.key(0), (28, 28, 1))
    >>> apply_fn(select_step(params, 2), jnp.zeros((2, 28, 28, 1))).shape
    (2, 5)
  """
  rows: list = []
  _per_step_rows(params, rows)
  if not rows:
    raise ValueError("select_step found no per-step batch-norm parameters in params (scale "
                     "and bias of shape (num_steps, features)); build the model with "
                     "norm='per_step'.")
  if len(set(rows)) != 1:
    raise ValueError(f"select_step: the per-step batch-norm layers of params disagree on "
                     f"num_steps: {sorted(set(rows))}.")
  num_steps = rows[0]
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"step must be an integer scalar, got {step!r}.")
  if isinstance(step, (int, np.integer)):
    if not 0 <= step < num_steps:
      raise ValueError(f"step={int(step)} is out of range for per-step batch norm with "
                       f"num_steps={num_steps}: it must be in [0, {num_steps - 1}].")
    shift = int(step)
  else:
    dtype, shape = getattr(step, "dtype", None), getattr(step, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or shape != ():
      shown = f"dtype {dtype}, shape {shape}" if dtype is not None else repr(step)
      raise TypeError(f"step must be an integer scalar (the inner step), got {shown}.")
    shift = jnp.clip(step, 0, num_steps - 1)
  return _roll_per_step(params, shift)


def calibrate_batch_stats(params, apply_fn: Callable | None, images, *,
                          module: nn.Module | None = None):
  """Sets the stored statistics of a ``norm="frozen"`` model from a batch of images.

  Runs a transductive copy of the network on ``images`` and writes each layer's
  batch mean and variance into ``params[...]['mean'/'var']``.

  Args:
    params: parameters of a model built with ``norm="frozen"``.
    apply_fn: the ``apply_fn`` of :func:`init_model`, which carries the module; may be
      ``None`` (or a wrapped function) when ``module`` is given.
    images: a batch ``(N, H, W, C)`` of floating-point images, scaled as in training
      (uint8 images are rejected: :func:`metajax.tasks.episodes` scales them to [0, 1]).
    module: the flax module behind ``params`` (overrides ``apply_fn.module``).

  Returns:
    ``params`` with every frozen layer's ``mean``/``var`` replaced.

  Raises:
    TypeError, ValueError: no module is available, the module has no ``norm="frozen"``
      layers, ``params`` stores no statistics, or ``images`` is not a floating rank-4 batch.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, calibrate_batch_stats
    >>> module = Conv4(5, filters=4, norm="frozen")
    >>> params, apply_fn = init_model(module, jax.random.key(0), (28, 28, 1))
    >>> params = calibrate_batch_stats(params, apply_fn, jnp.ones((8, 28, 28, 1)))
    >>> wrapped = lambda p, x: apply_fn(p, x)  # no .module: name it
    >>> params = calibrate_batch_stats(params, wrapped, jnp.ones((8, 28, 28, 1)), module=module)
  """
  if module is None:
    module = getattr(apply_fn, "module", None)
    if module is None:
      raise TypeError("calibrate_batch_stats needs the flax module behind params: apply_fn "
                      f"({getattr(apply_fn, '__name__', type(apply_fn).__name__)}) has no "
                      ".module attribute (only init_model's apply_fn carries one); pass "
                      "module=, e.g. calibrate_batch_stats(params, apply_fn, images, "
                      "module=Conv4(..., norm='frozen')).")
  if not isinstance(module, nn.Module) or not hasattr(module, "norm"):
    raise TypeError(f"module must be a flax.linen module with a norm attribute (Conv4, "
                    f"ResNet12), got {type(module).__name__}.")
  if module.norm != "frozen":
    raise ValueError(f"calibrate_batch_stats needs a model with norm='frozen' layers (stored "
                     f"statistics to set), got {type(module).__name__} with "
                     f"norm={module.norm!r}.")
  stored: list = []
  jax.tree_util.tree_map_with_path(
      lambda path, _: stored.append(path) if _leaf_name(path) in ("mean", "var") else None,
      params)
  if not stored:
    raise ValueError("params stores no batch-norm statistics ('mean'/'var'): they are not the "
                     "parameters of a norm='frozen' model.")
  if not (hasattr(images, "ndim") and hasattr(images, "dtype")):
    raise TypeError(f"images must be an array (N, H, W, C), got {type(images).__name__}.")
  if images.ndim != 4:
    raise ValueError(f"images must be a batch of NHWC images (N, H, W, C), got shape "
                     f"{tuple(images.shape)} (rank {images.ndim}); for episodes' "
                     "(num_classes, examples, H, W, C) arrays, reshape to (-1, H, W, C).")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating-point and scaled as in training, got dtype "
                    f"{images.dtype} (scale uint8 images to [0, 1]).")
  transductive = module.clone(norm="transductive")
  _, state = transductive.apply({"params": _drop_stats(params)}, images,
                                mutable=["intermediates"])
  return _write_stats(params, state["intermediates"])


def _leaf_name(path):
  return getattr(path[-1], "key", None) if path else None


def freeze_batch_stats(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps an optax optimizer so that stored batch-norm statistics never move.

  ``norm="frozen"`` keeps its ``mean``/``var`` in the trainable ``params`` with a zero
  gradient. Plain gradient steps leave them alone, but weight decay (``optax.adamw``,
  ``add_decayed_weights``) shrinks them towards zero. This wrapper sends every leaf named
  ``mean`` or ``var`` to ``optax.set_to_zero()`` and all others to ``optimizer``
  (``optax.multi_transform``); it works for the outer optimizer and for an inner ``optax``
  optimizer, and for Meta-SGD's ``{"params", "step_size"}`` pytrees too.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from metajax.models import freeze_batch_stats
    >>> params = {"BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2),
    ...                           "mean": jnp.ones(2), "var": jnp.ones(2)}}
    >>> opt = freeze_batch_stats(optax.adamw(0.1, weight_decay=0.5))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> float(jnp.abs(updates["BatchNorm_0"]["mean"]).max())
    0.0
  """
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(f"optimizer must be an optax GradientTransformation, got "
                    f"{type(optimizer).__name__}.")

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _leaf_name(path) in ("mean", "var") else "trainable", params)

  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def _drop_stats(tree):
  if isinstance(tree, Mapping):
    return {k: _drop_stats(v) for k, v in tree.items() if k not in ("mean", "var")}
  return tree


def _write_stats(params, stats):
  if not isinstance(params, Mapping):
    return params
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping) and "mean" in v and k in stats:
      mean, var = stats[k]["batch_stats"][0]
      out[k] = {**v, "mean": mean, "var": var}
    else:
      out[k] = _write_stats(v, stats.get(k, {})) if isinstance(v, Mapping) else v
  return out
