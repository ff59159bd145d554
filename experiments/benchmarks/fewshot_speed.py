"""Meta-iterations per second on Omniglot-shaped data, per solver.

Workload: Conv4 (64 filters, strided, transductive batch norm), 28x28x1 images,
5-way 1-shot, 15 queries per class, meta-batch 32, images generated on device
(1200 classes x 20). Solvers: MAML (1 step, alpha 0.4), first-order MAML,
iMAML (16 GD steps, reg 2, 5 CG steps) and the adjoint solver (Euler, 4 steps of
0.1, checkpoint adjoint). Each solver runs in its own process with the default
(automatic) program shape; compile time is the first call, speed the median
of the following calls. Writes ``fewshot_speed.md`` beside this file.

Run: ``python experiments/benchmarks/fewshot_speed.py [--iterations 5] [--timeout 900]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOLVERS = ("maml", "fomaml", "imaml", "adjoint")


def measure(solver: str, iterations: int) -> dict:
  import diffrax
  import jax
  import numpy as np
  import optax

  import metajax

  images = jax.random.randint(jax.random.key(0), (1200, 20, 28, 28, 1), 0, 256).astype("uint8")
  module = metajax.models.Conv4(5, filters=64, strided=True)
  params, apply_fn = metajax.models.init_model(module, jax.random.key(1), (28, 28, 1))
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  s = metajax.solvers
  adapt = {
      "maml": lambda: s.unrolled(loss, steps=1, step_size=0.4),
      "fomaml": lambda: s.unrolled(loss, steps=1, step_size=0.4, first_order=True),
      "imaml": lambda: s.implicit(loss, reg=2.0, optimizer=s.inner_optimizers.gd(0.1), max_steps=16,
                                  tol=0.0,
                                  linear_solver=s.linear_solvers.cg(maxiter=5, tol=0)),
      "adjoint": lambda: s.adjoint(loss, t1=0.4, solver=diffrax.Euler(), dt0=0.1,
                                   stepsize_controller=diffrax.ConstantStepSize(), max_steps=8),
  }[solver]()
  optimizer = optax.adam(1e-3)
  step = metajax.meta.make_train_step(
      jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)), optimizer,
      metajax.tasks.episodes(ways=5, shots=1, queries=15, rotations=True), meta_batch_size=32)
  state = metajax.meta.init_train_state(params, optimizer)
  key = jax.random.key(2)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, key, images))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, key, images))
    times.append(time.perf_counter() - start)
  q1, med, q3 = np.percentile(times, [25, 50, 75])
  return {"solver": solver, "compile_s": compile_s, "s_per_it": med, "q1": q1, "q3": q3,
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--timeout", type=int, default=900)
  parser.add_argument("--solvers", default=",".join(SOLVERS))
  parser.add_argument("--out", default=os.path.join(HERE, "fewshot_speed.md"))
  args = parser.parse_args()
  rows = []
  for solver in args.solvers.split(","):
    try:
      out = subprocess.run([sys.executable, __file__, "--child", solver, str(args.iterations)],
                           capture_output=True, text=True, timeout=args.timeout, check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
      rows.append({"solver": solver, "timeout": args.timeout})
    print(rows[-1], flush=True)
  env = next((r for r in rows if "jax" in r), {})
  lines = [
      "# Few-shot meta-training speed (Omniglot-shaped, 5-way 1-shot, meta-batch 32, Conv4)",
      "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, backend {env.get('backend')} "
      f"({env.get('device')}), jax {env.get('jax')}. Default program shape (automatic; on "
      "CPU: convolutions as patches @ kernel, one compiled program per task). Median and IQR of "
      f"{args.iterations} meta-iterations after the first (compile) call.",
      "",
      "| solver | compile + first call (s) | s / meta-iteration | IQR | meta-iterations / s |",
      "|---|---|---|---|---|",
  ]
  for r in rows:
    if "timeout" in r:
      lines.append(f"| {r['solver']} | > {r['timeout']} (stopped) | - | - | - |")
    else:
      lines.append(f"| {r['solver']} | {r['compile_s']:.1f} | {r['s_per_it']:.3f} | "
                   f"{r['q1']:.3f}-{r['q3']:.3f} | {1 / r['s_per_it']:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--child":
    print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
  else:
    main()
