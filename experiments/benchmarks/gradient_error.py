"""Meta-gradient error of each solver against a known answer, by trajectory length and tolerance.

1. Linear regression (float64), closed forms: MAML's K steps of 0.01 against
   ``(I - 0.01 A)^K`` (its own objective: exact at every K) and against the gradient flow
   ``expm(-A K 0.01)`` it discretizes; iMAML against ``reg (A + reg I)^-1`` by CG iterations;
   the adjoint against ``expm(-A t1)`` by tolerance and horizon.
2. A smooth MLP (1-32-32-1 tanh, one CosMixture task of 100 points, float64): the gradient flow to
   t1 = 1 with no closed form. Reference: Richardson-extrapolated Euler (``2 g(8000) - g(4000)``
   steps, error O(h^2) ~ 1e-8 relative). Rows: the adjoint by tolerance; MAML's Euler steps by
   K (first order in the step ``t1 / K``).

Writes ``gradient_error.md`` and ``gradient_error.png`` beside this file.
Run: ``python experiments/benchmarks/gradient_error.py``.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from benchmarks.adjoint_methods import _linreg, flow_meta_gradient  # noqa: E402

import metajax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
S = metajax.solvers
TOLERANCES = (1e-4, 1e-6, 1e-8, 1e-10)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _meta_gradient(adapt, loss, support, query, theta):
  return np.asarray(jax.jit(jax.grad(lambda p: loss(adapt(p, support), query)))(theta))


def linear_regression() -> list[dict]:
  problem = _linreg()
  loss, support, query, A, c, Aq, cq, theta = problem
  theta_j = jnp.asarray(theta)
  eye = np.eye(len(theta))
  flow = lambda t1: flow_meta_gradient(problem, t1)

  rows = []
  for k in (10, 100, 400):
    M = np.linalg.matrix_power(eye - 0.01 * A, k)
    own = M.T @ (Aq @ (M @ theta + np.linalg.solve(A, (eye - M) @ c)) - cq)
    g = _meta_gradient(S.unrolled(loss, steps=k, step_size=0.01), loss, support, query, theta_j)
    rows.append(dict(solver="MAML (K steps of 0.01)", knob=f"K={k}",
                     own=_rel(g, own), flow=_rel(g, flow(0.01 * k))))
  reg = 1.0
  inv = np.linalg.inv(A + reg * eye)
  phi = inv @ (c + reg * theta)
  exact = reg * inv.T @ (Aq @ phi - cq)
  for iters in (1, 2, 3, 5):
    adapt = S.implicit(loss, reg=reg, tol=1e-12,
                       linear_solver=S.linear_solvers.cg(maxiter=iters, tol=0.0))
    rows.append(dict(solver="iMAML (reg 1)", knob=f"CG iterations={iters}",
                     own=_rel(_meta_gradient(adapt, loss, support, query, theta_j), exact),
                     flow=float("nan")))
  for tol in TOLERANCES:
    for t1 in (1.0, 4.0):
      adapt = S.adjoint(loss, t1=t1, rtol=tol, atol=tol)
      g = _meta_gradient(adapt, loss, support, query, theta_j)
      rows.append(dict(solver=f"adjoint (t1={t1:g})", knob=f"tolerance={tol:g}",
                       own=_rel(g, flow(t1)), flow=_rel(g, flow(t1))))
  return rows


def smooth_mlp() -> tuple[list[dict], list[dict]]:
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (32, 32, 1),
                                             activation=jnp.tanh, dtype=jnp.float64)
  loss = metajax.meta.mse_loss(apply_fn)
  task = metajax.tasks.cos_mixture(num_support=100, num_query=100, dtype=jnp.float64)(
      jax.random.key(1), 1)
  support, query = jax.tree.map(lambda x: x[0], task)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])

  def grad_of(adapt):
    return flat(jax.jit(jax.grad(lambda p: loss(adapt(p, support), query)))(params))

  euler = lambda k: grad_of(S.unrolled(loss, steps=k, step_size=1.0 / k))
  g4000, g8000 = euler(4000), euler(8000)
  reference = 2 * g8000 - g4000
  adjoint_rows = [dict(tol=tol, err=_rel(grad_of(S.adjoint(loss, t1=1.0, rtol=tol, atol=tol)),
                                         reference)) for tol in TOLERANCES]
  maml_rows = [dict(k=k, err=_rel(euler(k), reference)) for k in (10, 100, 1000)]
  maml_rows.append(dict(k=8000, err=_rel(g8000, reference)))
  return adjoint_rows, maml_rows


def main():
  linreg_rows = linear_regression()
  adjoint_rows, maml_rows = smooth_mlp()
  env = common.environment()
  lines = [
      "# Meta-gradient error against known answers",
      "",
      common.machine_line(env, diffrax=True) + ". float64.",
      "",
      "## Linear regression (closed forms)",
      "",
      "`own objective`: against the exact meta-gradient of what the solver computes (MAML: K "
      "steps of 0.01; iMAML: the proximal solution; adjoint: the gradient flow). `vs the flow`: "
      "against `expm(-A t1)` at the same horizon t1 = 0.01 K.",
      "",
      "| solver | setting | relative error, own objective | relative error vs the flow |",
      "|---|---|---|---|",
      *[f"| {r['solver']} | {r['knob']} | {r['own']:.2e} | "
        + ("-" if np.isnan(r["flow"]) else f"{r['flow']:.2e}") + " |" for r in linreg_rows],
      "",
      "## Smooth MLP (1-32-32-1 tanh, CosMixture task, gradient flow to t1 = 1)",
      "",
      "Reference: Richardson-extrapolated Euler, `2 g(8000 steps) - g(4000 steps)`.",
      "",
      "| adjoint tolerance | relative error |",
      "|---|---|",
      *[f"| {r['tol']:g} | {r['err']:.2e} |" for r in adjoint_rows],
      "",
      "| MAML Euler steps K (step 1/K) | relative error vs the flow |",
      "|---|---|",
      *[f"| {r['k']} | {r['err']:.2e} |" for r in maml_rows],
      "",
  ]
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(HERE, "gradient_error.md"), "w", encoding="utf-8") as f:
    f.write(text)

  def draw(axes):
    axes[0].plot([r["k"] for r in maml_rows], [r["err"] for r in maml_rows], marker="o",
                 label="MAML Euler (MLP)")
    ks = [10, 100, 400]
    axes[0].plot(ks, [r["flow"] for r in linreg_rows if r["solver"].startswith("MAML")],
                 marker="s", label="MAML vs flow (linear regression)")
    axes[0].set(xscale="log", yscale="log", xlabel="inner steps K",
                ylabel="relative error vs the gradient flow")
    axes[1].plot([r["tol"] for r in adjoint_rows], [r["err"] for r in adjoint_rows], marker="o",
                 label="adjoint (MLP)")
    for t1 in (1.0, 4.0):
      mine = [r for r in linreg_rows if r["solver"] == f"adjoint (t1={t1:g})"]
      axes[1].plot(TOLERANCES, [r["own"] for r in mine], marker="s",
                   label=f"adjoint (linear regression, t1={t1:g})")
    axes[1].set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="relative error")
    for ax in axes:
      ax.legend()
  common.save_plot(os.path.join(HERE, "gradient_error.png"), draw, panels=2)


if __name__ == "__main__":
  main()
