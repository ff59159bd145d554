"""The transformation matrix: every solver under jit, vmap, grad, jvp, jacfwd, grad-of-grad,
hessian, vmap-of-grad, grad-of-vmap and closure capture, against closed forms (float64).

Unsupported cells raise an error the test checks. The same matrix is published in the README.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metajax
from tests import linreg

S = metajax.solvers

# name -> (adapt factory, closed form (problem) -> (phi, dphi/dtheta), rtol)
SOLVERS = {
    "unrolled": (lambda loss: S.unrolled(loss, steps=4, step_size=0.3),
                 lambda p: p.unrolled(4, 0.3), 1e-9),
    "implicit": (lambda loss: S.implicit(loss, reg=2.0),
                 lambda p: p.proximal(2.0)[:2], 1e-6),
    "adjoint": (lambda loss: S.adjoint(loss, t1=0.7),  # the default grid: 10 GD steps of 0.07
                lambda p: p.unrolled(10, 0.07), 1e-9),
    "adjoint_adaptive": (lambda loss: S.adjoint(loss, t1=0.7, steps=None),
                         lambda p: p.gradient_flow(0.7)[:2], 1e-6),
    "adjoint_backsolve": (lambda loss: S.adjoint(loss, t1=0.7, steps=None, adjoint="backsolve"),
                          lambda p: p.gradient_flow(0.7)[:2], 1e-5),
    "adjoint_forward": (lambda loss: S.adjoint(loss, t1=0.7, steps=None,
                                               adjoint=diffrax.ForwardMode()),
                        lambda p: p.gradient_flow(0.7)[:2], 1e-6),
}
# (solver, transformation) -> regex of the error an unsupported cell raises.
UNSUPPORTED = {
    ("adjoint", "jvp"): "supports reverse mode only",
    ("adjoint", "jacfwd"): "supports reverse mode only",
    # hessian (forward over reverse) works on the default grid: its steps are stored, so the
    # backward pass is a plain scan JAX can push tangents through.
    ("adjoint", "grad_grad"): "Reverse-mode differentiation does not work for lax.while_loop",
    ("adjoint_adaptive", "jvp"): "supports reverse mode only",
    ("adjoint_adaptive", "jacfwd"): "supports reverse mode only",
    ("adjoint_adaptive", "hessian"): "supports reverse mode only",
    ("adjoint_adaptive", "grad_grad"): "Reverse-mode differentiation does not work for "
                                       "lax.while_loop",
    ("adjoint_backsolve", "jvp"): "supports reverse mode only",
    ("adjoint_backsolve", "jacfwd"): "supports reverse mode only",
    ("adjoint_backsolve", "hessian"): "supports reverse mode only",
    ("adjoint_backsolve", "grad_grad"): "Unexpected tangent.*cannot be autodifferentiated",
    ("adjoint_forward", "grad"): "Reverse-mode differentiation does not work",
    ("adjoint_forward", "vmap_grad"): "Reverse-mode differentiation does not work",
    ("adjoint_forward", "grad_vmap"): "Reverse-mode differentiation does not work",
    ("adjoint_forward", "grad_grad"): "Reverse-mode differentiation does not work",
    ("adjoint_forward", "hessian"): "Reverse-mode differentiation does not work",
    ("adjoint_forward", "closure"): "Reverse-mode differentiation does not work",
}
TRANSFORMS = ["jit", "vmap", "grad", "jvp", "jacfwd", "grad_grad", "hessian", "vmap_grad",
              "grad_vmap", "closure"]


def _query_loss(problem, phi):
  return linreg.loss_fn(phi, problem.query)


def _check(name, transform):
  make, closed_form, rtol = SOLVERS[name]
  problems, support, query = linreg.batch(2, jnp.float64)
  problem = problems[0]
  adapt = make(linreg.loss_fn)
  phi_ref, jac = closed_form(problem)
  grad_ref = jac.T @ problem.query_grad(phi_ref)
  theta = problem.params
  meta_loss = lambda t: _query_loss(problem, adapt(t, problem.support))
  close = lambda actual, expected: linreg.rel_err(actual, expected) <= rtol

  if transform == "jit":
    assert close(linreg.flat(jax.jit(adapt)(theta, problem.support)), phi_ref)
  elif transform == "vmap":
    phis = jax.vmap(adapt, (None, 0))(theta, support)
    for i, p in enumerate(problems):
      assert close(linreg.flat(jax.tree.map(lambda x, i=i: x[i], phis)), closed_form(p)[0])
  elif transform == "grad":
    assert close(linreg.flat(jax.grad(meta_loss)(theta)), grad_ref)
  elif transform == "jvp":
    tangent = linreg.unflat(np.arange(1.0, 6.0), jnp.float64)
    _, out = jax.jvp(lambda t: adapt(t, problem.support), (theta,), (tangent,))
    assert close(linreg.flat(out), jac @ np.arange(1.0, 6.0))
  elif transform == "jacfwd":
    flat_adapt = lambda v: linreg.flat_jnp(adapt(linreg.unflat_jnp(v), problem.support))
    assert close(jax.jacfwd(flat_adapt)(jnp.asarray(problem.theta)), jac)
  elif transform == "hessian":
    # The meta-loss is quadratic in theta for linear regression: its Hessian is J^T Aq J.
    flat_loss = lambda v: meta_loss(linreg.unflat_jnp(v))
    assert close(jax.hessian(flat_loss)(jnp.asarray(problem.theta)), jac.T @ problem.Aq @ jac)
  elif transform == "grad_grad":
    # d/ds of the meta-gradient's sum along theta + s * 1: the Hessian's row sums, summed.
    direction = np.ones(5)
    g = lambda s: jnp.sum(linreg.flat_jnp(jax.grad(meta_loss)(
        linreg.unflat_jnp(jnp.asarray(problem.theta) + s * direction))))
    expected = np.ones(5) @ (jac.T @ problem.Aq @ jac) @ direction
    assert abs(float(jax.grad(g)(0.0)) - expected) <= rtol * abs(expected) * 10
  elif transform in ("vmap_grad", "grad_vmap"):
    expected = np.mean([cf[1].T @ p.query_grad(cf[0]) for p in problems
                        for cf in [closed_form(p)]], axis=0)
    per_task = lambda t, s, q: linreg.loss_fn(adapt(t, s), q)
    if transform == "vmap_grad":
      grads = jax.vmap(jax.grad(per_task), (None, 0, 0))(theta, support, query)
      got = np.mean([linreg.flat(jax.tree.map(lambda x, i=i: x[i], grads)) for i in range(2)], 0)
    else:
      got = linreg.flat(jax.grad(lambda t: jnp.mean(jax.vmap(per_task, (None, 0, 0))(
          t, support, query)))(theta))
    assert close(got, expected)
  elif transform == "closure":
    # loss_fn closes over a scale w being differentiated: L_w = w * L, so the inner problem is
    # the closed form's with A, c scaled by w; check d(meta-loss)/dw by central differences of
    # the closed form.
    def outer(w):
      scaled = make(lambda p, b: w * linreg.loss_fn(p, b))
      return _query_loss(problem, scaled(theta, problem.support))
    eps, w0 = 1e-5, 1.3
    values = []
    for w in (w0 - eps, w0 + eps):
      shifted = linreg.Problem()
      shifted.A, shifted.c = w * problem.A, w * problem.c
      phi_w = closed_form(shifted)[0]
      values.append(0.5 * np.mean((np.c_[problem.xq, np.ones(len(problem.xq))] @ phi_w
                                   - problem.yq) ** 2))
    expected = (values[1] - values[0]) / (2 * eps)
    assert abs(float(jax.grad(outer)(w0)) - expected) <= max(rtol, 1e-7) * 10 * abs(expected)
  else:
    raise AssertionError(transform)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_transformation_matrix(name, transform):
  if (name, transform) in UNSUPPORTED:
    with pytest.raises(Exception, match=UNSUPPORTED[(name, transform)]):
      _check(name, transform)
  else:
    _check(name, transform)
