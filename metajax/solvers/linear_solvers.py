"""Linear solvers with jaxopt's signature ``solve(matvec, b) -> x``.

Each factory fixes the iteration cap and tolerance and returns a
[`LinearSolver`][metajax.solvers.linear_solvers.LinearSolver], a callable that the implicit solver
uses in its backward
pass. ``tol=None`` picks a tolerance from the dtype of ``b`` (1e-10 in float64,
1e-6 in float32); ``tol=0`` runs exactly ``maxiter`` iterations, as in iMAML's
"5 CG steps". ``ridge`` solves ``(A + ridge I) x = b`` instead: a damped
system, as iMAML's official code uses to keep CG stable when the inner Hessian
is indefinite (it solves ``(1 + cg_damping) v + H v / (reg + 10)``, which is
``ridge = (1 + cg_damping) (reg + 10) / reg - 1`` on ``I + H / reg`` up to
scale: 11 at reg=2, 21 at reg=1, with cg_damping=1); it biases the meta-gradient, so the
default is 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jaxopt

from metajax.solvers import _common

__all__ = ["LinearSolver", "bicgstab", "cg", "gmres", "neumann", "normal_cg"]


@dataclasses.dataclass(frozen=True)
class LinearSolver:
  """A configured linear solver: ``solver(matvec, b) -> x`` with ``matvec(x) = A x``.

  Attributes:
    name: which method.
    maxiter: iteration cap (``None``: the method's default).
    tol: relative residual tolerance (``None``: from the dtype; ``0``: run
      ``maxiter`` iterations).
  """

  name: str
  maxiter: int | None
  tol: float | None
  method: Callable = dataclasses.field(repr=False)
  ridge: float = 0.0

  def resolved_tol(self, b) -> float:
    return self.resolved_tol_for(_common.params_dtype(b, "b"))

  def resolved_tol_for(self, dtype) -> float:
    if self.tol is not None:
      return self.tol
    return _common.default_tol(dtype, float64=1e-10, float32=1e-6)

  def damped(self, matvec: Callable) -> Callable:
    """``matvec`` plus ``ridge`` times the identity: the operator actually solved."""
    if not self.ridge:
      return matvec
    return lambda x: _common.tree_axpy(self.ridge, x, matvec(x))

  def __call__(self, matvec: Callable, b):
    return self.method(self.damped(matvec), b, maxiter=self.maxiter, tol=self.resolved_tol(b))


def _check(maxiter, tol, ridge=0.0):
  _common.check_tolerance("ridge", ridge)
  if maxiter is not None:
    _common.check_positive_int("maxiter", maxiter)
  _common.check_tolerance("tol", tol)
  if tol == 0 and maxiter is None:
    raise ValueError("tol=0 runs exactly maxiter iterations: set maxiter too (iMAML: "
                     "cg(maxiter=5, tol=0)).")


def _jaxopt(name: str, fn: Callable) -> Callable:
  def factory(*, maxiter: int | None = None, tol: float | None = None,
              ridge: float = 0.0) -> LinearSolver:
    _check(maxiter, tol, ridge)
    return LinearSolver(name, maxiter, tol,
                        lambda matvec, b, maxiter, tol: fn(matvec, b, maxiter=maxiter, tol=tol),
                        float(ridge))
  factory.__name__ = name
  factory.__doc__ = (
      f"jaxopt's ``{fn.__name__}`` with an iteration cap and tolerance.\n\n"
      "  Example:\n"
      "    >>> import jax.numpy as jnp\n"
      "    >>> from metajax.solvers import linear_solvers\n"
      f"    >>> solve = linear_solvers.{name}(maxiter=50)\n"
      "    >>> x = solve(lambda v: 2.0 * v, jnp.ones(3))\n"
      "    >>> [round(float(v), 4) for v in x]\n"
      "    [0.5, 0.5, 0.5]\n")
  return factory


cg = _jaxopt("cg", jaxopt.linear_solve.solve_cg)
normal_cg = _jaxopt("normal_cg", jaxopt.linear_solve.solve_normal_cg)
gmres = _jaxopt("gmres", jaxopt.linear_solve.solve_gmres)
bicgstab = _jaxopt("bicgstab", jaxopt.linear_solve.solve_bicgstab)


def neumann(*, terms: int = 20, scale: float = 1.0, ridge: float = 0.0) -> LinearSolver:
  """Truncated Neumann series ``x = scale * sum_k (I - scale A)^k b``.

  Converges when the eigenvalues of ``scale * A`` lie in (0, 2). For the
  implicit solver's system ``(I + H / reg) g = v``, ``scale = 1`` converges
  when ``0 < H < reg`` (a strongly regularized inner problem).

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.solvers import linear_solvers
    >>> x = linear_solvers.neumann(terms=60, scale=0.5)(lambda v: 2.5 * v, jnp.ones(2))
    >>> [round(float(v), 4) for v in x]
    [0.4, 0.4]
  """
  _common.check_positive_int("terms", terms)
  _check(None, None, ridge)
  scale = _common.check_static_scalar("neumann scale", scale)

  def method(matvec, b, maxiter, tol):
    del tol
    def body(_, x):  # x <- x + scale * (b - A x): partial sums of the series
      return _common.tree_axpy(scale, _common.tree_sub(b, matvec(x)), x)
    return jax.lax.fori_loop(0, maxiter, body, jax.tree.map(lambda v: v * 0, b))

  return LinearSolver("neumann", terms, 0.0, method, float(ridge))
