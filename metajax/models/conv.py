"""MAML's Conv4 and ResNet-12, with batch norm inside the inner loop as an explicit choice.

Batch-norm modes (``norm=``):

- ``"transductive"``: normalize with the statistics of the current batch, in
  the inner loop and at test time (MAML's setting; the query set is normalized
  with its own statistics).
- ``"frozen"``: normalize with stored statistics held in ``params`` under
  ``mean``/``var`` and excluded from gradients (``stop_gradient``), so neither
  the inner nor the outer loop moves them; set them from data with
  :func:`calibrate_batch_stats`.
- ``"per_step"``: MAML++'s per-step batch norm: ``scale``/``bias`` have a
  leading axis of ``num_steps`` entries and the statistics are those of the
  current batch; :func:`select_step` picks the entry for inner step ``k``.
- ``"none"``: no normalization.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.models.layers import Conv

NORM_MODES = ("transductive", "frozen", "per_step", "none")


class BatchNorm(nn.Module):
  """Batch norm over all axes but the last, in one of :data:`NORM_MODES`."""

  mode: str = "transductive"
  num_steps: int = 1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    if self.mode not in NORM_MODES:
      raise ValueError(f"norm must be one of {NORM_MODES}, got {self.mode!r}.")
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
  """

  num_classes: int
  filters: int = 64
  strided: bool = False
  norm: str = "transductive"
  num_steps: int = 1
  blocks: int = 4
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
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
  """

  num_classes: int
  widths: tuple = (64, 160, 320, 640)
  norm: str = "transductive"
  num_steps: int = 1
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = ResidualBlock(width, self.norm, self.num_steps, self.conv_impl)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def init_model(module: nn.Module, key, input_shape, dtype=jnp.float32):
  """Initializes a flax module for NHWC inputs of ``input_shape``; returns ``(params, apply_fn)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model
    >>> params, apply_fn = init_model(Conv4(num_classes=5, filters=8), jax.random.key(0),
    ...                               (28, 28, 1))
    >>> apply_fn(params, jnp.zeros((3, 28, 28, 1))).shape
    (3, 5)
  """
  params = module.init(key, jnp.zeros((2, *input_shape), dtype))["params"]

  def apply_fn(params, x):
    return module.apply({"params": params}, x)

  apply_fn.module = module
  return params, apply_fn


def _is_per_step_leaf(path) -> bool:
  names = [getattr(k, "key", None) for k in path]
  return any(isinstance(n, str) and n.startswith("BatchNorm") for n in names) and names[-1] in (
      "scale", "bias")


def select_step(params, step: int | jax.Array):
  """Rotates per-step batch-norm parameters so that inner step ``step``'s entry is row 0.

  Use inside a loss for MAML++-style per-step batch norm (``norm="per_step"``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, select_step
    >>> params, apply_fn = init_model(Conv4(5, filters=4, norm="per_step", num_steps=3),
    ...                               jax.random.key(0), (28, 28, 1))
    >>> apply_fn(select_step(params, 2), jnp.zeros((2, 28, 28, 1))).shape
    (2, 5)
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.roll(x, -step, axis=0) if _is_per_step_leaf(path) else x, params)


def calibrate_batch_stats(params, apply_fn: Callable, images):
  """Sets the stored statistics of a ``norm="frozen"`` model from a batch of images.

  Runs a transductive copy of the network on ``images`` and writes each layer's
  batch mean and variance into ``params[...]['mean'/'var']``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, calibrate_batch_stats
    >>> params, apply_fn = init_model(Conv4(5, filters=4, norm="frozen"), jax.random.key(0),
    ...                               (28, 28, 1))
    >>> params = calibrate_batch_stats(params, apply_fn, jnp.ones((8, 28, 28, 1)))
  """
  module = apply_fn.module
  transductive = module.clone(norm="transductive")
  _, state = transductive.apply({"params": _drop_stats(params)}, images,
                                mutable=["intermediates"])
  return _write_stats(params, state["intermediates"])


def _drop_stats(tree):
  if isinstance(tree, dict):
    return {k: _drop_stats(v) for k, v in tree.items() if k not in ("mean", "var")}
  return tree


def _write_stats(params, stats):
  if not isinstance(params, dict):
    return params
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and "mean" in v and k in stats:
      mean, var = stats[k]["batch_stats"][0]
      out[k] = {**v, "mean": mean, "var": var}
    else:
      out[k] = _write_stats(v, stats.get(k, {})) if isinstance(v, dict) else v
  return out
