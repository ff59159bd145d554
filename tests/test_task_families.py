"""A-MAML's synthetic task families (``alpine2d``, ``cos_mixture``, ``cos_mixture2d``):
shapes, parameter ranges recovered from the data by a grid fit, determinism by key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metajax

FAMILIES = {
    "alpine2d": (metajax.tasks.alpine2d, 2, 10.0),
    "cos_mixture": (metajax.tasks.cos_mixture, 1, 1.0),
    "cos_mixture2d": (metajax.tasks.cos_mixture2d, 2, 1.0),
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shapes_dtypes_and_input_range(name, dtype):
  family, input_dim, bound = FAMILIES[name]
  tasks = family(num_support=7, num_query=5, dtype=dtype)(jax.random.key(0), 3)
  (xs, ys), (xq, yq) = tasks
  assert xs.shape == (3, 7, input_dim) and ys.shape == (3, 7, 1)
  assert xq.shape == (3, 5, input_dim) and yq.shape == (3, 5, 1)
  assert {a.dtype for a in (xs, ys, xq, yq)} == {jnp.dtype(dtype)}
  assert float(jnp.abs(xs).max()) <= bound and float(jnp.abs(xq).max()) <= bound
  assert bool(jnp.all(jnp.isfinite(ys)))


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic_by_key(name):
  sample = FAMILIES[name][0](num_support=4, num_query=4)
  a, b, c = sample(jax.random.key(3), 2), sample(jax.random.key(3), 2), sample(jax.random.key(4), 2)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  assert not np.allclose(a.support[1], c.support[1])
  jitted = jax.jit(sample, static_argnums=1)(jax.random.key(3), 2)
  np.testing.assert_allclose(jitted.support[1], a.support[1], rtol=1e-6, atol=1e-6)


def test_alpine2d_fits_its_formula_with_shifts_in_range():
  tasks = metajax.tasks.alpine2d(num_support=12, num_query=4, dtype=jnp.float64)(
      jax.random.key(1), 4)
  grid = np.linspace(-8.0, 8.0, 1601)  # wider than [-5, 5]: the fit may land outside
  g = lambda v, k: np.abs(v[None] * np.sin(v[None] + np.pi + k[:, None] * np.pi / 12) + v / 10)
  fitted = []
  for x, y in zip(np.asarray(tasks.support[0]), np.asarray(tasks.support[1])[..., 0]):
    first, second = g(x[:, 0], grid), g(x[:, 1], grid)  # (grid, n)
    error = np.abs(first[:, None, :] + second[None, :, :] - y).max(-1)
    i, j = np.unravel_index(np.argmin(error), error.shape)
    assert error[i, j] < 0.02
    assert -5.01 <= grid[i] <= 5.01 and -5.01 <= grid[j] <= 5.01
    fitted.append((grid[i], grid[j]))
  # The two shifts are drawn independently (A-MAML's code ties them): they differ.
  assert max(abs(k1 - k2) for k1, k2 in fitted) > 0.5


def test_cos_mixture2d_fits_its_formula_with_parameters_in_range():
  tasks = metajax.tasks.cos_mixture2d(num_support=20, num_query=4, dtype=jnp.float64)(
      jax.random.key(2), 3)
  freqs, phases = np.linspace(2.0, 7.0, 501), np.linspace(0.0, 2.5, 251)
  for x, y in zip(np.asarray(tasks.support[0]), np.asarray(tasks.support[1])[..., 0]):
    target = -(y + np.sum(x ** 2, -1))  # = c * sum_d cos(f pi x_d + p)
    assert np.abs(target).max() <= 2.0 + 1e-9
    u = np.cos(freqs[:, None, None, None] * np.pi * x[None, None] + phases[None, :, None, None])
    u = u.sum(-1)  # (freqs, phases, n)
    c = np.sum(u * target, -1) / np.sum(u * u, -1)  # least squares in c
    error = np.abs(c[..., None] * u - target).max(-1)
    i, j = np.unravel_index(np.argmin(error), error.shape)
    assert error[i, j] < 0.05
    assert 2.99 <= freqs[i] <= 6.01 and 0.49 <= phases[j] <= 2.01 and 0.09 <= c[i, j] <= 1.01
