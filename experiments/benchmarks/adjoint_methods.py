"""Adjoint methods for the gradient-flow solver: cost vs trajectory length, error vs tolerance.

1. Time and XLA peak memory of one meta-gradient against the horizon ``t1`` for
   ``adjoint="checkpoint"`` (RecursiveCheckpointAdjoint) and ``"backsolve"``
   (BacksolveAdjoint), MLP 1-256-256-1 on sinusoid support sets, Tsit5 with a
   PID controller (rtol = atol = 1e-6, float32).
2. Relative meta-gradient error against the closed form ``expm(-A T)`` on a
   linear-regression inner problem (float64) as the tolerance tightens, and as
   the horizon grows (backsolve reconstructs the state backward in time, which
   is unstable on contracting flows; Deleu et al. 2022, Fig. 2). At long horizons
   ``expm(-A T)`` vanishes (eigenvalues 0.32-1.57: ~5e-15 at T = 100), so the relative
   error there measures round-off, not the solver: the table gives the absolute error and
   the reference's size too, and a second problem with slow modes (eigenvalues down to
   1e-3) keeps the meta-gradient of order one at T = 100.

Writes ``adjoint_methods.md`` and ``adjoint_methods.png`` beside this file.
Run: ``python experiments/benchmarks/adjoint_methods.py``.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import metajax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("checkpoint", "backsolve")
HORIZONS = (0.05, 0.1, 0.2)  # MAML-scale: K steps of 0.01 is t1 = 0.01 K
TOLERANCES = (1e-3, 1e-5, 1e-7, 1e-9)


def cost_vs_horizon():
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (256, 256, 1))
  loss = metajax.meta.mse_loss(apply_fn)
  task = metajax.tasks.sinusoid(num_support=10, num_query=10)(jax.random.key(1), 1)
  support, query = jax.tree.map(lambda x: x[0], task)
  rows = []
  for method in METHODS:
    for t1 in HORIZONS:
      adapt = metajax.solvers.adjoint(loss, t1=t1, adjoint=method, rtol=1e-6, atol=1e-6,
                                      throw=False, max_steps=4096)
      f = jax.jit(jax.grad(lambda p: loss(adapt(p, support), query)))
      compiled = f.lower(params).compile()
      _, info = jax.jit(lambda p: adapt.solve(p, support))(params)
      q1, med, q3 = common.time_calls(compiled, params, repeats=1)
      rows.append(dict(method=method, t1=t1, steps=int(info.steps), ok=bool(info.success),
                       mb=common.compiled_peak_bytes(compiled) / 2 ** 20, ms=med, q1=q1, q3=q3))
      print(rows[-1], flush=True)
  return rows


def _linreg():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 4)), rng.normal(size=16)
  xq, yq = rng.normal(size=(12, 4)), rng.normal(size=12)
  xa, xqa = np.c_[x, np.ones(16)], np.c_[xq, np.ones(12)]
  A, c = xa.T @ xa / 16, xa.T @ y / 16
  Aq, cq = xqa.T @ xqa / 12, xqa.T @ yq / 12
  theta = rng.normal(size=5)
  loss = lambda p, b: 0.5 * jnp.mean((b[0] @ p[:-1] + p[-1] - b[1]) ** 2)
  return loss, (jnp.asarray(x), jnp.asarray(y)), (jnp.asarray(xq), jnp.asarray(yq)), \
      A, c, Aq, cq, theta


def _slow_modes():
  """A quadratic inner loss with eigenvalues 1e-3 .. 2: expm(-100 A) stays of order one."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  A = basis @ np.diag([1e-3, 1e-2, 0.1, 1.0, 2.0]) @ basis.T
  c, theta, cq = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
  loss = lambda p, b: 0.5 * p @ b[0] @ p - b[1] @ p
  return loss, (jnp.asarray(A), jnp.asarray(c)), (jnp.eye(5), jnp.asarray(cq)), \
      A, c, np.eye(5), cq, theta


def flow_meta_gradient(problem, t1):
  """The exact meta-gradient of the query loss after the gradient flow to ``t1``."""
  _, _, _, A, c, Aq, cq, theta = problem
  p_inf = np.linalg.solve(A, c)
  E = scipy.linalg.expm(-A * t1)
  return E.T @ (Aq @ (p_inf + E @ (theta - p_inf)) - cq)


def _errors(problem, method, t1, tol):
  """(relative error, absolute error, reference norm) of the meta-gradient at ``t1``."""
  loss, support, query, *_, theta = problem
  ref = flow_meta_gradient(problem, t1)
  adapt = metajax.solvers.adjoint(loss, t1=t1, adjoint=method, rtol=tol, atol=tol,
                                  throw=False, max_steps=100_000)
  g = np.asarray(jax.jit(jax.grad(lambda p: loss(adapt(p, support), query)))(
      jnp.asarray(theta)))
  diff = float(np.linalg.norm(g - ref))
  return diff / float(np.linalg.norm(ref)), diff, float(np.linalg.norm(ref))


def error_vs_tolerance_and_horizon():
  linreg, slow = _linreg(), _slow_modes()
  by_tol = [dict(method=m, tol=tol, err=_errors(linreg, m, 1.0, tol)[0])
            for m in METHODS for tol in TOLERANCES]
  by_t1 = []
  for m in METHODS:
    for t1 in (1.0, 10.0, 100.0):
      rel, absolute, size = _errors(linreg, m, t1, 1e-8)
      slow_rel = _errors(slow, m, t1, 1e-8)[0]
      by_t1.append(dict(method=m, t1=t1, err=rel, abs=absolute, size=size, slow=slow_rel))
  return by_tol, by_t1


def main():
  cost = cost_vs_horizon()
  by_tol, by_t1 = error_vs_tolerance_and_horizon()
  env = common.environment()
  lines = [
      "# Adjoint methods for the gradient-flow solver",
      "",
      common.machine_line(env, diffrax=True) + ".",
      "",
      "## Cost vs horizon (MLP 1-256-256-1, float32, Tsit5, rtol = atol = 1e-6, max_steps 4096)",
      "",
      "| adjoint | t1 | ODE steps | reached t1 | XLA peak (MB) | time (ms, 1 run after warm-up) |",
      "|---|---|---|---|---|---|",
      *[f"| {r['method']} | {r['t1']:g} | {r['steps']} | {r['ok']} | {r['mb']:.1f} | "
        f"{r['ms']:.1f} ({r['q1']:.1f}-{r['q3']:.1f}) |" for r in cost],
      "",
      "## Meta-gradient error vs the closed form (linear regression, float64, t1 = 1)",
      "",
      "| tolerance | " + " | ".join(METHODS) + " |",
      "|---|" + "---|" * len(METHODS),
      *[f"| {tol:g} | " + " | ".join(f"{r['err']:.2e}" for r in by_tol if r['tol'] == tol) + " |"
        for tol in TOLERANCES],
      "",
      "## Meta-gradient error vs horizon (tolerance 1e-8)",
      "",
      "Linear regression (eigenvalues 0.32-1.57): relative and absolute error and the size of "
      "the exact meta-gradient, which vanishes like expm(-A T); slow modes (eigenvalues "
      "1e-3-2, meta-gradient of order one at every T): relative error.",
      "",
      "| adjoint | t1 | relative error | absolute error | norm of exact gradient | "
      "slow modes: relative error |",
      "|---|---|---|---|---|---|",
      *[f"| {r['method']} | {r['t1']:g} | {r['err']:.2e} | {r['abs']:.2e} | {r['size']:.2e} | "
        f"{r['slow']:.2e} |" for r in by_t1],
      "",
  ]
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(HERE, "adjoint_methods.md"), "w", encoding="utf-8") as f:
    f.write(text)
  def draw(axes):
    for m in METHODS:
      for ax, rows, x, y in ((axes[0], cost, "t1", "ms"), (axes[1], by_tol, "tol", "err"),
                             (axes[2], by_t1, "t1", "slow")):
        rows = [r for r in rows if r["method"] == m]
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=m)
    axes[0].set(xscale="log", yscale="log", xlabel="t1", ylabel="ms per meta-gradient")
    axes[1].set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="relative gradient error")
    axes[2].set(xscale="log", yscale="log", xlabel="t1",
                ylabel="relative gradient error (slow modes)")
    axes[0].legend()
  common.save_plot(os.path.join(HERE, "adjoint_methods.png"), draw, panels=3)

if __name__ == "__main__":
  main()
