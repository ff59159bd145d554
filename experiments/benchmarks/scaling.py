"""Meta-iterations per second against the number of devices: the train step over a mesh.

Workload: sinusoid MLP 1-40-40-1 ReLU, meta-batch 32 (10-shot), Adam 1e-3, float32;
MAML (5 steps of 0.01), iMAML and the adjoint with their defaults (``reg=2``, ``t1=0.05``;
``scaling.md`` was measured with the defaults before 2026-11-24: L-BFGS and adaptive Tsit5).
For each device count (fake CPU devices here: ``XLA_FLAGS=--xla_force_host_platform_device_count``,
one subprocess per count) three train steps run the same iterations from the same key:
no mesh (the baseline, measured in the same process), ``mesh=`` (jit partitions the task axis)
and ``mesh=, shard_map=True``. Reported: compile time (first call minus a steady call), median
and interquartile range of the time per meta-iteration, meta-iterations per second, whether the
compiled program holds each device's share of the tasks only (HLO shapes), the relative
difference of the first meta-loss from the baseline's (same meta-parameters, same tasks: float32
sums in another order), and the largest over the first 5 meta-iterations (the runs drift apart:
Adam's first updates are the signs of gradient entries, some ~0 for dead ReLU units, and the
L-BFGS line search and the adaptive ODE steps branch on rounding). Fake devices share the
host's cores, so they test correctness and partitioning, not speed-up; on an accelerator host
run with ``--devices`` to time real devices. Writes ``scaling.md`` beside this file.

Run: ``python experiments/benchmarks/scaling.py [--counts 1 2 4 8] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
META_BATCH, ITERATIONS = 32, 5


def _worker(count: int, repeats: int) -> list[dict]:
  import jax
  import numpy as np
  import optax

  import metajax

  params, apply_fn = metajax.models.make_mlp(jax.random.key(0), features=(40, 40, 1))
  loss = metajax.meta.mse_loss(apply_fn)
  solvers = {"MAML (5 x 0.01)": metajax.solvers.unrolled(loss, steps=5, step_size=0.01),
             "iMAML (default)": metajax.solvers.implicit(loss, reg=2.0),
             "adjoint (default)": metajax.solvers.adjoint(loss, t1=0.05)}
  devices = jax.devices()[:count]
  mesh = metajax.parallel.task_mesh(devices)
  modes = {"no mesh": {}, "mesh": {"mesh": mesh}, "mesh, shard_map": {"mesh": mesh,
                                                                      "shard_map": True}}
  rows = []
  for solver, adapt in solvers.items():
    value_and_grad = jax.value_and_grad(metajax.meta.meta_objective(adapt, loss))
    baseline = None
    for mode, kwargs in modes.items():
      optimizer = optax.adam(1e-3)
      step = metajax.meta.make_train_step(value_and_grad, optimizer, metajax.tasks.sinusoid(),
                                          meta_batch_size=META_BATCH, iterations=ITERATIONS,
                                          **kwargs)
      state = metajax.meta.init_train_state(params, optimizer)
      if mode == "no mesh":
        state = jax.device_put(state, devices[0])
      key = jax.random.key(1)
      start = time.perf_counter()
      state, losses = step(state, key)
      jax.block_until_ready(losses)
      first = time.perf_counter() - start
      first_losses = np.asarray(losses, np.float64)
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        state, losses = step(state, key)
        jax.block_until_ready(losses)
        times.append((time.perf_counter() - start) / ITERATIONS)
      if baseline is None:
        baseline = first_losses
      hlo = step.lower(state, key).compile().as_text()
      q1, median, q3 = np.percentile(times, [25, 50, 75])
      rows.append({
          "devices": count, "solver": solver, "mode": mode,
          "compile_s": first - median * ITERATIONS, "ms_per_iteration": 1e3 * median,
          "iqr_ms": (1e3 * q1, 1e3 * q3), "iterations_per_s": 1.0 / median,
          "partitioned": (f"f32[{META_BATCH // count},10,1]" in hlo
                          and (count == 1 or f"f32[{META_BATCH},10,1]" not in hlo)),
          "vs_no_mesh": float(abs(first_losses[0] - baseline[0]) / abs(baseline[0])),
          "drift_5": float(np.max(np.abs(first_losses - baseline) / np.abs(baseline)))})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def _table(rows: list[dict], machine: str) -> str:
  lines = [
      "# Meta-training over a mesh: meta-iterations per second against device count", "",
      __doc__.split("\n\n")[1].replace("\n", " "), "", f"Machine: {machine}", "",
      "| devices | solver | train step | compile (s) | ms / meta-iteration (IQR) "
      "| meta-iterations / s | tasks split in the program | first meta-loss vs no mesh "
      "| first 5 |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['solver']} | {r['mode']} | {r['compile_s']:.1f} "
        f"| {r['ms_per_iteration']:.1f} ({r['iqr_ms'][0]:.1f}-{r['iqr_ms'][1]:.1f}) "
        f"| {r['iterations_per_s']:.1f} | {'yes' if r['partitioned'] else 'NO'} "
        f"| {r['vs_no_mesh']:.1e} | {r['drift_5']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="scaling.py", description=__doc__.splitlines()[0])
  parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8],
                      help="fake CPU device counts, one subprocess each")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--devices", type=int,
                      help="time this many real devices in this process (no fake devices)")
  args = parser.parse_args(argv)
  if args.worker is not None or args.devices is not None:
    _worker(args.worker or args.devices, args.repeats)
    return
  rows = []
  for count in args.counts:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--worker", str(count), "--repeats",
                          str(args.repeats)], env=env, check=True, capture_output=True,
                         text=True).stdout
    rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"{count} devices done", flush=True)
  sys.path.insert(0, os.path.dirname(HERE))
  import common
  machine = common.machine_line(common.environment()).removeprefix("Machine: ")
  text = _table(rows, machine)
  print(text)
  with open(os.path.join(HERE, "scaling.md"), "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  main()
