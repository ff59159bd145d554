"""Convolution as patches @ kernel equals XLA's convolution, values and derivatives."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metajax
from metajax.models.layers import Conv, conv_patches


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


CASES = [((3, 3), (1, 1), "SAME", 8), ((3, 3), (2, 2), "SAME", 7), ((3, 3), (2, 2), "SAME", 28),
         ((1, 1), (1, 1), "SAME", 5), ((5, 3), (2, 1), "VALID", 9), ((3, 3), (1, 1), "VALID", 6),
         ((2, 2), (2, 2), "SAME", 5)]


@pytest.mark.parametrize("kernel_size,strides,padding,size", CASES)
def test_conv_patches_equals_xla_convolution_and_its_second_derivatives(kernel_size, strides,
                                                                        padding, size):
  with jax.enable_x64():
    kx, kk, kv = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, size, size + 1, 3), jnp.float64)
    kernel = jax.random.normal(kk, (*kernel_size, 3, 4), jnp.float64)
    got = conv_patches(x, kernel, strides, padding)
    want = _lax_conv(x, kernel, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    # a nonlinear scalar of the output: gradient and Hessian-vector product in (x, kernel)
    def scalar(conv, x, kernel):
      return jnp.sum(jnp.tanh(conv(x, kernel, strides, padding)) ** 2)
    v = jax.tree.map(lambda a: jax.random.normal(kv, a.shape, a.dtype), (x, kernel))
    hvp = lambda f: jax.jvp(jax.grad(lambda a, b: scalar(f, a, b), argnums=(0, 1)),
                            (x, kernel), v)
    chex.assert_trees_all_close(hvp(conv_patches), hvp(_lax_conv), rtol=1e-10, atol=1e-10)


def test_conv_module_matches_flax_conv_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  flax_conv = nn.Conv(5, (3, 3), strides=2, padding="SAME")
  reference = flax_conv.init(jax.random.key(2), x)
  for impl in ("lax", "patches", "auto"):
    ours = Conv(5, (3, 3), strides=2, padding="SAME", impl=impl)
    params = ours.init(jax.random.key(2), x)
    chex.assert_trees_all_equal(params, reference)  # same names, shapes, initial values
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(reference, x),
                               rtol=1e-5, atol=1e-5)


def test_conv4_maml_meta_gradient_is_the_same_with_either_impl():
  with jax.enable_x64():
    x = jax.random.normal(jax.random.key(3), (4, 12, 12, 1), jnp.float64)
    labels = jnp.array([0, 1, 2, 0])
    grads = {}
    for impl in ("lax", "patches"):
      params, apply_fn = metajax.models.init_model(
          metajax.models.Conv4(3, filters=4, strided=True, conv_impl=impl), jax.random.key(4),
          (12, 12, 1), dtype=jnp.float64)
      params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
      loss = metajax.meta.cross_entropy_loss(apply_fn)
      adapt = metajax.solvers.unrolled(loss, steps=2, step_size=0.4)
      grads[impl] = jax.jit(jax.grad(lambda p: loss(adapt(p, (x, labels)), (x, labels))))(params)
    # cuDNN's float64 convolution algorithms differ from a matmul at ~1e-7 relative (seen on an
    # H100); XLA:CPU's agree to rounding.
    rtol = 1e-9 if jax.default_backend() == "cpu" else 1e-6
    chex.assert_trees_all_close(grads["patches"], grads["lax"], rtol=rtol, atol=1e-12)


def test_conv_rejects_bad_arguments():
  x = jnp.ones((1, 5, 5, 2))
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    Conv(3, (3, 3), impl="fft").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'"):
    conv_patches(x, jnp.ones((3, 3, 2, 3)), (1, 1), "CIRCULAR")
  with pytest.raises(ValueError, match="x must be NHWC with 4 channels"):
    conv_patches(x, jnp.ones((3, 3, 4, 3)))
  for kwargs, match in [
      ({"padding": "CIRCULAR", "impl": "lax"}, "Conv.padding must be 'SAME' or 'VALID'"),
      ({"strides": 0}, r"Conv.strides must be a \(height, width\) pair of positive ints, "
                       r"got \(0, 0\)"),
      ({"kernel_size": 3}, r"Conv.kernel_size must be a \(height, width\) pair"),
      ({"features": 0}, "Conv.features must be a positive int, got 0"),
  ]:
    with pytest.raises(ValueError, match=match):
      Conv(**{"features": 3, "kernel_size": (3, 3), **kwargs}).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"Conv takes NHWC inputs \(N, H, W, C\)"):
    Conv(3, (3, 3)).init(jax.random.key(0), x[0])


@pytest.mark.parametrize("name", ["strategies", "strategies_gpu"])
def test_strategies_benchmark_renders_its_committed_results(tmp_path, name):
  """Committed benchmark rows (CPU and GPU runs) re-render; the script runs without torch."""
  import json
  import os
  import subprocess
  import sys
  here = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks")
  rows = os.path.join(here, f"{name}.jsonl")
  out = tmp_path / "strategies"
  done = subprocess.run([sys.executable, os.path.join(here, "strategies.py"), "--rows", rows,
                         "--out", str(out)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  text = (tmp_path / "strategies.md").read_text()
  assert text == open(os.path.join(here, f"{name}.md"), encoding="utf-8").read()
  with open(rows, encoding="utf-8") as f:
    n = sum(1 for line in f if line.strip())
  assert text.count("| metajax") + sum(text.count(f"| {p} |") for p in
                                       ("torch.func", "torchopt", "higher")) == n
  default_conv = [json.loads(line) for line in open(rows, encoding="utf-8")
                  if '"conv"' in line and '"default"' in line and '"maml"' in line]
  assert {r["steps"] for r in default_conv} == {1, 5, 10}
