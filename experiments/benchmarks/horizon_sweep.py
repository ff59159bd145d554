"""Solver defaults against the length of the inner problem, on the sinusoid MLP.

The workload of ``solver_defaults.py`` (MLP 1-40-40-1 ReLU, 25 sinusoid tasks, 10-shot,
``jit(value_and_grad(meta_objective(adapt, mse)))``, float32), swept over how far the inner
loop goes:

1. Horizon ``t1`` of the gradient flow ``dphi/dt = -grad L``: MAML's ``t1 / 0.01`` Euler steps
   of 0.01 (what MAML with that many steps computes), the adjoint's default grid (10 Euler
   steps, whatever ``t1``), and the adjoint on MAML's grid (``steps=t1 / 0.01``); each next to
   the float64 flow (Tsit5 at 1e-8). The default grid's step grows with ``t1``: past the flow's
   stability limit it diverges, and the solver raises (the row says so) instead of answering.
2. Inner steps of the implicit default (Barzilai-Borwein on ``reg=2``): ``max_steps`` 5 to 80,
   next to the float64 proximal solution (3000 L-BFGS iterations).

Per row: compile (s), median (IQR) ms per meta-gradient (the programs called in turn), XLA peak
(MB), the meta-loss (query loss after adaptation) and its relative distance to the exact inner
problem's. Everything in one process. Writes ``horizon_sweep.md`` beside this file.

Run: ``python experiments/benchmarks/horizon_sweep.py [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from benchmarks.solver_defaults import (  # noqa: E402
  REG,
  SHOTS,
  TASKS,
  compile_program,
  sinusoid_problem,
  time_alternately,
)

import metajax  # noqa: E402

S = metajax.solvers
HORIZONS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
BB_STEPS = (5, 10, 20, 40, 80)
MAML_STEP = 0.01


def configs(loss):
  """name -> (inner solver, the exact inner problem it approximates: ('flow', t1) or 'prox')."""
  rows = {}
  for t1 in HORIZONS:
    k = round(t1 / MAML_STEP)
    rows[f"t1={t1}: MAML, {k} steps of {MAML_STEP}"] = (
        S.unrolled(loss, steps=k, step_size=MAML_STEP), ("flow", t1))
    rows[f"t1={t1}: adjoint default (10 Euler steps of {t1 / 10:g})"] = (
        S.adjoint(loss, t1=t1), ("flow", t1))
    rows[f"t1={t1}: adjoint, steps={k} (MAML's grid)"] = (
        S.adjoint(loss, t1=t1, steps=k), ("flow", t1))
  for k in BB_STEPS:
    rows[f"implicit(reg={REG:g}), max_steps={k}{' (default)' if k == 20 else ''}"] = (
        S.implicit(loss, reg=REG, max_steps=k), ("prox", None))
  return rows


def reference(loss, params, tasks, target) -> float:
  """float64 meta-loss of the exact inner problem (needs ``jax_enable_x64``)."""
  kind, t1 = target
  adapt = (S.adjoint(loss, t1=t1, rtol=1e-8, atol=1e-8, max_steps=200_000, throw=False)
           if kind == "flow" else
           S.implicit(loss, reg=REG, optimizer=S.inner_optimizers.lbfgs(), max_steps=3000,
                      throw=False))
  to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
  return float(jax.jit(metajax.meta.meta_objective(adapt, loss))(to64(params), to64(tasks)))


def _first_line(error: Exception) -> str:
  """The solver's own message out of the runtime error that carries it (no traceback lines)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = next((line for line in lines if "SolverError" in line), lines[-1])
  return message.split("SolverError: ", 1)[-1].replace("|", "/")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "horizon_sweep.md"))
  args = parser.parse_args(argv)
  params, loss, tasks = sinusoid_problem()
  rows, compiled = {}, {}
  for name, (adapt, target) in configs(loss).items():
    program, compile_s = compile_program(adapt, loss, params, tasks)
    rows[name] = dict(compile_s=compile_s, target=target,
                      mb=common.compiled_peak_bytes(program) / 2**20)
    try:
      value, _ = jax.block_until_ready(program(params, tasks))
    except Exception as error:  # noqa: BLE001 (the solver's own divergence error is the result)
      rows[name]["raised"] = _first_line(error)
      print(name, "raised:", rows[name]["raised"], flush=True)
      continue
    rows[name]["loss"] = float(value)
    compiled[name] = program
  for name, (q1, med, q3) in time_alternately(compiled, params, tasks, args.repeats,
                                               warmup_s=1.0).items():
    rows[name].update(ms=med, q1=q1, q3=q3)
    print(name, rows[name], flush=True)
  unadapted = float(jax.jit(metajax.meta.meta_objective(lambda p, support: p, loss))(
      params, tasks))
  jax.config.update("jax_enable_x64", True)
  refs = {target: reference(loss, params, tasks, target)
          for target in {r["target"] for r in rows.values()}}
  env = common.environment()
  lines = [
      "# Solver defaults against the length of the inner problem (sinusoid MLP)",
      "",
      f"MLP 1-40-40-1 ReLU, {TASKS} sinusoid tasks, {SHOTS}-shot, float32, "
      "`jit(value_and_grad(meta_objective(adapt, mse)))`; median (IQR) of "
      f"{args.repeats} calls per program, the programs called in turn after 1 s of warm-up "
      "each; compile = lowering + XLA compilation; XLA peak = buffer assignment. Accuracy: "
      "the meta-loss and its relative distance to a float64 reference of the same inner "
      "problem (the gradient flow to t1 by Tsit5 at 1e-8; the proximal problem at "
      f"reg={REG:g} by 3000 L-BFGS iterations). All rows measured in one process.",
      "",
      f"Machine: {env['machine']}, {env['cpus']} CPUs, backend {env['backend']} "
      f"({env['device']}); Python {env['python']}, jax {env['jax']}, optax {env['optax']}, "
      f"diffrax {__import__('diffrax').__version__}.",
      "",
      "| inner solver | compile (s) | per meta-gradient (ms) | XLA peak (MB) | meta-loss | "
      "exact | vs exact |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    ref = refs[r["target"]]
    if "raised" in r:
      lines.append(f"| {name} | {r['compile_s']:.2f} | raised: {r['raised']} | {r['mb']:.1f} "
                   f"| - | {ref:.4f} | - |")
      continue
    lines.append(
        f"| {name} | {r['compile_s']:.2f} | {r['ms']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) | "
        f"{r['mb']:.1f} | {r['loss']:.4f} | {ref:.4f} | {abs(r['loss'] - ref) / ref:.2%} |")
  lines += ["", "MAML's rows are Euler on the same flow with step 0.01, so they are also its "
            "discretization error at that step; the adjoint default keeps 10 steps, so its "
            "time stays flat while its error grows with t1 until it raises. Without "
            f"adaptation the meta-loss is {unadapted:.4f}: where a row ends above it, its first "
            "steps overshot (a step past the flow's stability limit at this initialization) "
            "and had not recovered by t1.", ""]
  text = "\n".join(lines)
  common.write_report(args.out, text)


if __name__ == "__main__":
  main()
