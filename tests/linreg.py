"""Linear-regression inner problems and their closed forms, computed in numpy float64.

Parameters are ``{'w': (d,), 'b': ()}``; the loss is ``0.5 * mean((x @ w + b - y) ** 2)``,
so with ``xa = [x, 1]`` the Hessian is ``A = xa.T xa / n`` and the linear term ``c = xa.T y / n``.
The references below use only these matrices, never the solvers under test.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.linalg

RTOL = {jnp.float64: 1e-8, jnp.float32: 1e-4}


def loss_fn(params, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def flat(params):
  return np.concatenate([np.ravel(np.asarray(params["w"], np.float64)),
                         np.ravel(np.asarray(params["b"], np.float64))])


def unflat(vector, dtype):
  return {"w": jnp.asarray(vector[:-1], dtype), "b": jnp.asarray(vector[-1], dtype)}


class Problem:
  """One task: support and query sets, theta, and the quadratic's matrices."""

  def __init__(self, seed: int = 0, d: int = 4, n_support: int = 16, n_query: int = 12,
               dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    self.dtype = dtype
    xs, xq = rng.normal(size=(n_support, d)), rng.normal(size=(n_query, d))
    w_true = rng.normal(size=d)
    ys = xs @ w_true + 0.3 + 0.1 * rng.normal(size=n_support)
    yq = xq @ w_true + 0.3 + 0.1 * rng.normal(size=n_query)
    # Round inputs to the test dtype so the reference sees exactly what the solver sees.
    cast = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)
    self.xs, self.ys, self.xq, self.yq = map(cast, (xs, ys, xq, yq))
    self.theta = cast(rng.normal(size=d + 1))
    self.A, self.c = self._quadratic(self.xs, self.ys)
    self.Aq, self.cq = self._quadratic(self.xq, self.yq)

  @staticmethod
  def _quadratic(x, y):
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return xa.T @ xa / len(x), xa.T @ y / len(x)

  @property
  def support(self):
    return (jnp.asarray(self.xs, self.dtype), jnp.asarray(self.ys, self.dtype))

  @property
  def query(self):
    return (jnp.asarray(self.xq, self.dtype), jnp.asarray(self.yq, self.dtype))

  @property
  def params(self):
    return unflat(self.theta, self.dtype)

  def query_grad(self, phi):
    """Gradient of the query loss at ``phi`` (a flat vector)."""
    return self.Aq @ phi - self.cq

  # --- closed forms -------------------------------------------------------
  def unrolled(self, steps, step_size):
    """phi_K and d phi_K / d theta for K steps of GD with a scalar or per-parameter step."""
    D = np.diag(np.broadcast_to(step_size, self.theta.shape))
    M = np.eye(len(self.theta)) - D @ self.A
    phi = self.theta.copy()
    for _ in range(steps):
      phi = M @ phi + D @ self.c
    return phi, np.linalg.matrix_power(M, steps)

  def unrolled_step_size_grad(self, steps, step_size, cotangent):
    """d (cotangent . phi_K) / d step sizes (per parameter) by the adjoint recursion."""
    a = np.broadcast_to(step_size, self.theta.shape).astype(np.float64)
    M = np.eye(len(self.theta)) - np.diag(a) @ self.A
    phis = [self.theta.copy()]
    for _ in range(steps):
      phis.append(phis[-1] - a * (self.A @ phis[-1] - self.c))
    grad, lam = np.zeros_like(a), cotangent.copy()
    for k in reversed(range(steps)):
      grad += lam * -(self.A @ phis[k] - self.c)
      lam = M.T @ lam
    return grad

  def proximal(self, reg):
    """phi* = (A + reg I)^-1 (c + reg theta) and d phi*/d theta = reg (A + reg I)^-1."""
    inv = np.linalg.inv(self.A + reg * np.eye(len(self.theta)))
    phi = inv @ (self.c + reg * self.theta)
    return phi, reg * inv, inv @ (self.theta - phi)  # last: d phi*/d reg

  def gradient_flow(self, t1):
    """phi(T) = p_inf + expm(-A T)(theta - p_inf) and d phi(T)/d theta = expm(-A T)."""
    p_inf = np.linalg.solve(self.A, self.c)
    E = scipy.linalg.expm(-self.A * t1)
    phi = p_inf + E @ (self.theta - p_inf)
    return phi, E, -(self.A @ phi - self.c)  # last: d phi/d T


def batch(n_tasks: int, dtype, **kw):
  """A batch of problems and their stacked support/query sets."""
  problems = [Problem(seed=s, dtype=dtype, **kw) for s in range(n_tasks)]
  for p in problems[1:]:  # one shared theta: the meta-parameters
    p.theta = problems[0].theta
  stack = lambda parts: tuple(jnp.stack(p) for p in zip(*parts))
  return problems, stack([p.support for p in problems]), stack([p.query for p in problems])


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def flat_jnp(params):
  """:func:`flat` for traced values."""
  return jnp.concatenate([jnp.ravel(params["w"]), jnp.ravel(params["b"])])


def unflat_jnp(vector):
  """:func:`unflat` for traced values."""
  return {"w": vector[:-1], "b": vector[-1]}
