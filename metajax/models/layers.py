"""A 2-D convolution with a choice of implementation: XLA's convolution or patches @ kernel.

On XLA:CPU the derivatives of ``lax.conv_general_dilated`` (input and kernel gradients, and their
derivatives in second-order MAML) run on slow paths; the same convolution written as strided
slices concatenated into patches and one matrix multiply is ~1.7-1.8x faster for second-order MAML
on MAML's Conv4 (experiments/benchmarks/strategies.md), and all of its derivatives are matrix
multiplies, pads and slices.
``impl="auto"`` uses patches on CPU and XLA's convolution elsewhere (cuDNN on GPU).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "lax", "patches")


def _pads(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
  """(output size, low pad, high pad) of one spatial axis, as XLA computes them."""
  if padding == "SAME":
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2
  if padding == "VALID":
    return (size - kernel) // stride + 1, 0, 0
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")


@functools.partial(jax.jit, static_argnames=("strides", "padding"))
def conv_patches(x, kernel, strides: tuple[int, int] = (1, 1), padding: str = "SAME"):
  """NHWC x HWIO convolution as strided slices -> patches -> one matrix multiply.

  Equals ``lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=("NHWC", "HWIO", "NHWC"))``. It is a named ``jit`` (inlined
  when compiled) so that [`metajax.solvers.uses_convolution`][metajax.solvers.uses_convolution] can
  find it.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models.layers import conv_patches
    >>> x, k = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    >>> conv_patches(x, k, (2, 2)).shape
    (2, 3, 3, 4)
    >>> float(conv_patches(x, k)[0, 2, 2, 0])  # an interior pixel sums 3 x 3 x 3 ones
    27.0
  """
  kh, kw, cin, cout = kernel.shape
  if x.ndim != 4 or x.shape[-1] != cin:
    raise ValueError(f"x must be NHWC with {cin} channels (the kernel's), got shape {x.shape}.")
  sh, sw = tuple(strides)
  oh, top, bottom = _pads(x.shape[1], kh, sh, padding)
  ow, left, right = _pads(x.shape[2], kw, sw, padding)
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  columns = [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
             for i in range(kh) for j in range(kw)]
  patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
  return patches @ kernel.reshape(kh * kw * cin, cout)


def resolve_conv_impl(impl: str) -> str:
  """``"auto"`` -> ``"patches"`` on CPU, ``"lax"`` elsewhere; validates the name."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "patches" if jax.default_backend() == "cpu" else "lax"
  return impl


def _check_pair(name: str, value) -> tuple[int, int]:
  """A (height, width) pair of positive ints."""
  try:
    pair = tuple(value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                           for v in pair):
    raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}.")
  return tuple(int(v) for v in pair)


class Conv(nn.Module):
  """``flax.linen.Conv`` (NHWC, same parameter names, shapes and initialization) with ``impl``.

  Attributes:
    features: output channels.
    kernel_size: (height, width).
    strides: int or (height, width) stride.
    padding: ``"SAME"`` or ``"VALID"``.
    use_bias: add a learned bias.
    impl: ``"auto"``, ``"lax"`` (``lax.conv_general_dilated``) or ``"patches"``
      (``conv_patches``); the parameters and the numbers are the same.
    kernel_init: kernel initializer (flax's default: LeCun normal).
    param_dtype: parameter dtype at initialization (float32, as flax's).
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Callable = nn.linear.default_kernel_init
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    impl = resolve_conv_impl(self.impl)
    _check_pair("Conv.kernel_size", self.kernel_size)
    strides = self.strides
    if isinstance(strides, (int, np.integer)) and not isinstance(strides, bool):
      strides = (strides,) * 2
    strides = _check_pair("Conv.strides", strides)
    if isinstance(self.features, bool) or not isinstance(self.features, (int, np.integer)) \
        or self.features < 1:
      raise ValueError(f"Conv.features must be a positive int, got {self.features!r}.")
    if self.padding not in ("SAME", "VALID"):
      raise ValueError(f"Conv.padding must be 'SAME' or 'VALID', got {self.padding!r}.")
    if x.ndim != 4:
      raise ValueError(f"Conv takes NHWC inputs (N, H, W, C), got shape {x.shape}.")
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if impl == "patches":
      y = conv_patches(x, kernel, strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return y
