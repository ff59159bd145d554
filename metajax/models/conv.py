"""MAML's Conv4 and ResNet-12, with batch norm inside the inner loop as an explicit choice.

Batch-norm modes (``norm=``):

- ``"transductive"``: normalize with the statistics of the current batch, in
  the inner loop and at test time (MAML's setting; the query set is normalized
  with its own statistics).
- ``"frozen"``: normalize with stored statistics held in ``params`` under
  ``mean``/``var`` and excluded from gradients (``stop_gradient``); set them
  from data with [`calibrate_batch_stats`][metajax.models.calibrate_batch_stats]. Their gradient is
  zero, so plain
  gradient descent never moves them, but they are leaves of the trainable pytree:
  an optimizer whose update does not come from the gradient alone (weight decay:
  ``optax.adamw``, ``add_decayed_weights``) *does* move them. Wrap such an
  optimizer (outer, or an inner ``optax`` optimizer) in
  [`freeze_batch_stats`][metajax.models.freeze_batch_stats] to keep them fixed.
- ``"per_step"``: MAML++'s per-step batch norm: ``scale``/``bias`` have a
  leading axis of ``num_steps`` entries (shape ``(num_steps, features)``) and the
  statistics are those of the current batch; [`select_step`][metajax.models.select_step] picks the
  entry
  for inner step ``k``.
- ``"none"``: no normalization.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  """Batch norm over all axes but the last, in one of [`NORM_MODES`][metajax.models.NORM_MODES].

  With ``mode="frozen"`` the stored ``mean``/``var`` are entries of ``params`` that receive no
  gradient; weight decay still moves them unless the optimizer is wrapped in
  [`freeze_batch_stats`][metajax.models.freeze_batch_stats] (see the module docstring).

  Attributes:
    mode: one of [`NORM_MODES`][metajax.models.NORM_MODES].
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
    strided: Omniglot variant: stride-2 convolutions instead of max-pooling, "SAME" padded as
      in MAML's TensorFlow code (on an even side: 0 before, 1 after); learn2learn's
      ``OmniglotCNN`` pads 1 on both sides, so the same weights give other outputs there.
    norm: batch-norm mode (see module docstring).
    num_steps: entries of per-step batch-norm parameters (``norm="per_step"``).
    blocks: number of conv blocks (4 in the paper; fewer for tiny images).
    conv_impl: ``"auto"`` (patches @ kernel on CPU, XLA's convolution elsewhere),
      ``"lax"`` or ``"patches"``; see ``metajax.models.layers``. Same parameters.
    context: length of a CAVIA context vector (0: none). The network is then called
      ``apply_fn(params, x, context=c)`` and every block's batch-normalized features are
      modulated by FiLM, ``x * (1 + gamma) + beta`` with ``(gamma, beta)`` a linear map of ``c``
      (layers ``FiLM_i``, zero at ``c = 0``: the zero context is the plain network, as in CAVIA's
      classifier). A context fed to the input
      instead would be cancelled by the first batch norm (a constant per channel).

  Every attribute is checked when the module is initialized
  ([`init_model`][metajax.models.init_model]): positive
  ints, known ``norm`` and ``conv_impl`` names, and images large enough for ``blocks``
  max-pooled blocks (at least ``2 ** blocks`` pixels a side unless ``strided``). With
  ``norm="frozen"`` the stored statistics are trainable leaves: see
  [`freeze_batch_stats`][metajax.models.freeze_batch_stats].
  """

  num_classes: int
  filters: int = 64
  strided: bool = False
  norm: str = "transductive"
  num_steps: int = 1
  blocks: int = 4
  conv_impl: str = "auto"
  context: int = 0

  def check(self, input_shape=None) -> None:
    """Raises naming the attribute (or the image size) that cannot build this network."""
    _check_int("Conv4", "num_classes", self.num_classes)
    if isinstance(self.context, (bool, np.bool_)) or not isinstance(
        self.context, (int, np.integer)) or self.context < 0:
      raise ValueError(f"Conv4.context must be an int >= 0 (0: no context), got "
                       f"{self.context!r}.")
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
  def __call__(self, x, context=None):
    self.check(x.shape[1:3])
    context = self._context(context, x.dtype)
    for i in range(self.blocks):
      stride = 2 if self.strided else 1
      x = Conv(self.filters, (3, 3), strides=stride, padding="SAME", impl=self.conv_impl)(x)
      x = BatchNorm(self.norm, self.num_steps)(x)
      if context is not None:  # CAVIA's FiLM; zero bias, so c = 0 is the plain block (a zero
        # kernel too would leave the context without a gradient, and the kernel without one)
        gamma, beta = jnp.split(nn.Dense(2 * self.filters, name=f"FiLM_{i}")(context), 2)
        x = x * (1 + gamma) + beta
      x = nn.relu(x)
      if not self.strided:  # VALID, as MAML: 84 -> 42 -> 21 -> 10 -> 5
        x = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


  def _context(self, context, dtype):
    if not self.context:
      if context is not None:
        raise ValueError("Conv4 got a context but was built with context=0; build it with "
                         "Conv4(..., context=d).")
      return None
    if context is None:  # initialization, and the context's starting value
      return jnp.zeros((self.context,), dtype)
    if jnp.shape(context) != (self.context,):
      raise ValueError(f"Conv4 takes a context of shape ({self.context},), got "
                       f"{jnp.shape(context)}.")
    return jnp.asarray(context, dtype)


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
    conv_impl: as [`Conv4`][metajax.models.Conv4]'s.

  Every attribute is checked when the module is initialized
  ([`init_model`][metajax.models.init_model]).
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
    module: a ``flax.linen`` module taking a batch of NHWC images (e.g.
      [`Conv4`][metajax.models.Conv4]).
    key: PRNG key for the initialization.
    input_shape: ``(H, W, C)`` of one image (positive ints).
    dtype: floating-point dtype of the parameters (and of the dummy input used to
      initialize); the solvers take float32 or float64.

  Returns:
    ``(params, apply_fn)`` with ``apply_fn(params, x)`` for ``x`` of shape ``(N, H, W, C)``;
    ``apply_fn.module`` is ``module`` (read by
    [`calibrate_batch_stats`][metajax.models.calibrate_batch_stats]).

  Raises:
    TypeError, ValueError: naming the argument or the module attribute that is wrong (the
      module's own ``check``, e.g. ``Conv4.check``, runs first).

  Examples:
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
  h, w, c = input_shape
  if h in (1, 3, 4) and w > 4 and c > 4:  # (C, H, W): a 1-3 pixel high image with 28 channels
    raise ValueError(f"input_shape {input_shape} looks channel-first (C, H, W); metajax models "
                     f"take NHWC images: pass ({w}, {c}, {h}) and the images as "
                     "x.transpose(0, 2, 3, 1).")
  _check_float_dtype(dtype)
  if callable(getattr(module, "check", None)) and _common.takes_positional(module.check, 1):
    module.check(input_shape)
  # One compiled program: eager init dispatches (and compiles) every op on its own, ~3x slower
  # for a Conv4 on 84 x 84 images.
  params = jax.jit(module.init)(key, jnp.zeros((2, *input_shape), dtype))["params"]
  # flax layers keep their own param_dtype (float32) whatever the input's: one dtype throughout
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def apply_fn(params, x, **kwargs):  # kwargs: e.g. Conv4's context=
    shape = tuple(jnp.shape(x))
    if len(shape) != 4:
      fix = ("add the channel axis with x[..., None]" if shape[1:] == input_shape[:2]
             else "add a batch axis with x[None] for one image")
      raise ValueError(f"apply_fn takes a batch of NHWC images (N, H, W, C) of {input_shape}, "
                       f"got shape {shape}; {fix}.")
    if shape[1:] == (c, h, w) != input_shape:
      raise ValueError(f"apply_fn was built for NHWC images of {input_shape}; these of "
                       f"{shape[1:]} are channel-first: pass x.transpose(0, 2, 3, 1).")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"apply_fn takes floating-point images scaled as in training (e.g. "
                      f"x / 255.0), got dtype {jnp.result_type(x)}.")
    with _common.naming_model_inputs(
        f"apply_fn (built for images of {input_shape}, given {shape[1:]})", x=x):
      return module.apply({"params": params}, x, **kwargs)

  apply_fn.module = module
  return params, apply_fn
