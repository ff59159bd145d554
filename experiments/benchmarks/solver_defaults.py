"""Each solver's defaults on the sinusoid MLP: compile time, time per meta-gradient, accuracy.

Workload: MLP 1-40-40-1 ReLU (``make_mlp``), 25 sinusoid tasks, 10-shot,
``jit(value_and_grad(meta_objective(adapt, mse)))`` in float32. MAML (K=5, step 0.01) is the
baseline; the implicit and adjoint solvers run with their defaults (``reg=2``, ``t1=0.05``,
the same horizon as MAML's 5 steps of 0.01), with the previous implicit default and with
alternatives (the previous adaptive adjoint default, a finer grid). Accuracy is the
meta-loss (query loss after adaptation) next to a float64 reference of the same inner
problem: the proximal problem solved by 3000 L-BFGS iterations, the gradient flow by
Tsit5 at 1e-8. Everything is measured in one process; compile time is lowering plus XLA
compilation of a fresh program. Writes ``solver_defaults.md`` beside this file.

Run: ``python experiments/benchmarks/solver_defaults.py [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import numpy as np  # noqa: E402

import metajax  # noqa: E402

S = metajax.solvers
TASKS, SHOTS, REG, T1 = 25, 10, 2.0, 0.05


def configs(loss):
  """name -> (inner solver, which float64 reference it approximates)."""
  lin, opt = S.linear_solvers, S.inner_optimizers
  return {
      "MAML, unrolled(steps=5, step_size=0.01)": (
          S.unrolled(loss, steps=5, step_size=0.01), "flow"),
      "implicit(reg=2) default: 20 Barzilai-Borwein, cg(maxiter=5, tol=0)": (
          S.implicit(loss, reg=REG), "proximal"),
      "implicit, previous default: 20 L-BFGS, cg(maxiter=10, tol=0)": (
          S.implicit(loss, reg=REG, optimizer=opt.lbfgs(),
                     linear_solver=lin.cg(maxiter=10, tol=0.0)), "proximal"),
      "implicit, 40 Barzilai-Borwein (closer solve)": (
          S.implicit(loss, reg=REG, max_steps=40), "proximal"),
      "implicit, iMAML-GD: gd(0.01) x 16, cg(maxiter=5, tol=0)": (
          S.implicit(loss, reg=REG, optimizer=opt.gd(0.01), max_steps=16), "proximal"),
      "adjoint(t1=0.05) default: 10 Euler steps (stored)": (S.adjoint(loss, t1=T1), "flow"),
      "adjoint, steps=20 (recursive checkpoints)": (S.adjoint(loss, t1=T1, steps=20), "flow"),
      "adjoint, previous default: steps=None (Tsit5, PID 1e-6)": (
          S.adjoint(loss, t1=T1, steps=None), "flow"),
      "adjoint, rtol=atol=1e-4 (Tsit5, PID)": (
          S.adjoint(loss, t1=T1, rtol=1e-4, atol=1e-4), "flow"),
  }


def compile_program(adapt, loss, params, tasks):
  """``(compiled meta-gradient program, seconds to lower and compile it)``."""
  program = jax.jit(jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)))
  start = time.perf_counter()
  compiled = program.lower(params, tasks).compile()
  return compiled, time.perf_counter() - start


def time_alternately(programs: dict, params, tasks, repeats: int, warmup_s: float = 2.0):
  """Per program: quartiles (ms) of ``repeats`` calls, the programs called in turn (A, B, C, A,
  ...) after each ran for ``warmup_s`` seconds, so drifts of the machine hit all alike."""
  for compiled in programs.values():
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
      jax.block_until_ready(compiled(params, tasks))
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, compiled in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, tasks))
      times[name].append(time.perf_counter() - start)
  return {name: np.percentile(np.asarray(t) * 1e3, [25, 50, 75]) for name, t in times.items()}


def references(loss, params, tasks):
  """float64 meta-losses of the exact inner problems (needs ``jax_enable_x64``)."""
  to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
  exact = {
      "proximal": S.implicit(loss, reg=REG, optimizer=S.inner_optimizers.lbfgs(),
                             max_steps=3000, throw=False),
      "flow": S.adjoint(loss, t1=T1, rtol=1e-8, atol=1e-8, max_steps=100_000, throw=False),
  }
  return {name: float(jax.jit(metajax.meta.meta_objective(adapt, loss))(to64(params), to64(tasks)))
          for name, adapt in exact.items()}


def sinusoid_problem():
  """The MLP 1-40-40-1, its MSE loss and the 25 tasks the sinusoid benchmarks measure (JAX is
  started first: its own start-up is not compile time)."""
  params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  tasks = metajax.tasks.sinusoid(num_support=SHOTS, num_query=SHOTS)(jax.random.key(10), TASKS)
  jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))
  return params, loss, tasks


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "solver_defaults.md"))
  args = parser.parse_args(argv)
  params, loss, tasks = sinusoid_problem()
  rows, compiled = {}, {}
  for name, (adapt, target) in configs(loss).items():
    compiled[name], compile_s = compile_program(adapt, loss, params, tasks)
    value, _ = compiled[name](params, tasks)
    rows[name] = dict(compile_s=compile_s, target=target, loss=float(value),
                      mb=common.compiled_peak_bytes(compiled[name]) / 2**20)
  for name, (q1, med, q3) in time_alternately(compiled, params, tasks, args.repeats).items():
    rows[name].update(ms=med, q1=q1, q3=q3)
    print(name, rows[name], flush=True)
  jax.config.update("jax_enable_x64", True)
  refs = references(loss, params, tasks)
  base = rows[next(iter(rows))]
  env = common.environment()
  lines = [
      "# Solver defaults on the sinusoid MLP",
      "",
      f"MLP 1-40-40-1 ReLU, {TASKS} sinusoid tasks, {SHOTS}-shot, float32, "
      "`jit(value_and_grad(meta_objective(adapt, mse)))`; median (IQR) of "
      f"{args.repeats} calls per program, the programs called in turn after 2 s of warm-up "
      "each; compile = lowering + XLA compilation; XLA peak = "
      "buffer assignment. Accuracy: meta-loss and its relative distance to a float64 "
      f"reference of the same inner problem (proximal: {refs['proximal']:.4f}; gradient flow "
      f"to t1={T1}: {refs['flow']:.4f}). All rows measured in one process.",
      "",
      f"Machine: {env['machine']}, {env['cpus']} CPUs, backend {env['backend']} "
      f"({env['device']}); Python {env['python']}, jax {env['jax']}, optax {env['optax']}, "
      f"diffrax {__import__('diffrax').__version__}.",
      "",
      "| inner solver | compile (s) | x MAML | per meta-gradient (ms) | x MAML | XLA peak (MB) "
      "| meta-loss | vs exact inner problem |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    ref = refs[r["target"]]
    lines.append(
        f"| {name} | {r['compile_s']:.2f} | {r['compile_s'] / base['compile_s']:.1f} | "
        f"{r['ms']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) | {r['ms'] / base['ms']:.1f} | "
        f"{r['mb']:.1f} | {r['loss']:.4f} | {abs(r['loss'] - ref) / ref:.2%} |")
  lines += ["", "MAML's row is compared with the gradient flow it discretizes (5 Euler steps "
            "of 0.01). The query loss is the answer's quality whatever the inner problem: lower "
            "is a stronger adaptation (the exact proximal solution adapts more than 5 small "
            "gradient steps).", ""]
  text = "\n".join(lines)
  common.write_report(args.out, text)


if __name__ == "__main__":
  main()
