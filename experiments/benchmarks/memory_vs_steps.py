"""Peak memory and time of one meta-gradient against the number of inner steps K.

Unrolled (MAML, second order, rolled scan), unrolled with remat, and implicit
(iMAML-GD: K inner GD steps, 5 CG steps) on an MLP 1-512-512-1 (264k parameters)
whose parameters dominate memory (10 support points). Each (solver, K) runs in
its own process and reports:

- XLA peak: the compiled meta-gradient's buffer assignment (temp + arguments +
  outputs, ``memory_analysis()``), deterministic;
- RSS: the process's peak resident memory after running it (includes the
  runtime, ~0.3 GB here);
- device peak: on an accelerator, the allocator's peak bytes in use (``memory_stats()``);
- time: median and IQR of 20 runs after warm-up.

Writes ``memory_vs_steps.md`` and ``memory_vs_steps.png`` beside this file (``--out PREFIX``
to write elsewhere, e.g. a GPU run).

Run: ``python experiments/benchmarks/memory_vs_steps.py [--out PREFIX]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

STEPS = (10, 50, 100, 200, 400)
SOLVERS = ("unrolled", "unrolled+remat", "implicit")


def measure(solver: str, steps: int) -> dict:
  import jax
  import jax.numpy as jnp

  import metajax

  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), 1, (512, 512, 1))
  loss = metajax.meta.mse_loss(apply_fn)
  task = metajax.tasks.sinusoid(num_support=10, num_query=10)(jax.random.key(1), 1)
  support, query = jax.tree.map(lambda x: x[0], task)
  if solver == "implicit":
    adapt = metajax.solvers.implicit(
        loss, reg=2.0, optimizer=metajax.solvers.inner_optimizers.gd(1e-3), max_steps=steps,
        tol=0.0,
        linear_solver=metajax.solvers.linear_solvers.cg(maxiter=5, tol=0))
  else:
    adapt = metajax.solvers.unrolled(loss, steps=steps, step_size=1e-3, unroll=1,
                                     remat=solver.endswith("remat"))
  meta_grad = jax.jit(jax.grad(lambda p: loss(adapt(p, support), query)))
  compiled = meta_grad.lower(params).compile()
  xla_peak = common.compiled_peak_bytes(compiled)
  q1, med, q3 = common.time_calls(compiled, params, repeats=20, warmup=3)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  stats = jax.devices()[0].memory_stats() or {}
  n_params = sum(x.size for x in jax.tree.leaves(params))
  del jnp
  return {"solver": solver, "steps": steps, "xla_peak": xla_peak, "rss": rss,
          "device_peak": stats.get("peak_bytes_in_use"), "ms": med,
          "ms_q1": q1, "ms_q3": q3, "params": int(n_params), "jax": jax.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(HERE, "memory_vs_steps"))
  args = parser.parse_args()
  results = []
  for solver in SOLVERS:
    for steps in STEPS:
      out = subprocess.check_output([sys.executable, __file__, "--child", solver, str(steps)])
      results.append(json.loads(out.decode().strip().splitlines()[-1]))
      print(results[-1], flush=True)
  base = {s: next(r for r in results if r["solver"] == s and r["steps"] == STEPS[0])
          for s in SOLVERS}
  mb = lambda b: b / 2 ** 20
  lines = [
      "# Peak memory and time of one meta-gradient vs inner steps K",
      "",
      f"MLP 1-512-512-1 ({results[0]['params']:,} float32 parameters), 10 support / 10 query "
      "points; unrolled = second-order MAML as a rolled scan; implicit = iMAML-GD (K inner GD "
      "steps, reg=2, 5 CG steps). Each row ran in its own process. XLA peak = compiled buffer "
      "assignment (temp + arguments + outputs); RSS = process peak resident memory. Time: median "
      "(IQR) of 20 runs.",
      "",
      f"Machine: {os.cpu_count()} CPUs, backend {results[0]['backend']} "
      f"({results[0].get('device')}), jax {results[0]['jax']}.",
      "",
  ]
  on_device = results[0].get("device_peak") is not None
  lines += (["| solver | K | XLA peak (MB) | vs K=10 | device peak (MB) | RSS (MB) | time (ms) |",
             "|---|---|---|---|---|---|---|"] if on_device else
            ["| solver | K | XLA peak (MB) | vs K=10 | RSS (MB) | time (ms) |",
             "|---|---|---|---|---|---|"])
  for r in results:
    ratio = r["xla_peak"] / base[r["solver"]]["xla_peak"]
    device_peak = f" {mb(r['device_peak']):.1f} |" if on_device else ""
    lines.append(f"| {r['solver']} | {r['steps']} | {mb(r['xla_peak']):.1f} | {ratio:.2f}x |"
                 f"{device_peak} {mb(r['rss']):.0f} | "
                 f"{r['ms']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f}) |")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  def draw(axes):
    for solver in SOLVERS:
      rows = [r for r in results if r["solver"] == solver]
      axes[0].plot(STEPS, [mb(r["xla_peak"]) for r in rows], marker="o", label=solver)
      axes[1].plot(STEPS, [r["ms"] for r in rows], marker="o", label=solver)
    axes[0].set(xlabel="inner steps K", ylabel="XLA peak memory (MB)", yscale="log")
    axes[1].set(xlabel="inner steps K", ylabel="time per meta-gradient (ms)")
    axes[0].legend()
  common.save_plot(args.out + ".png", draw, panels=2)

if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--child":
    print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
  else:
    main()
