"""Execution strategies vs PyTorch peers: seconds per meta-iteration, compile time, peak memory.

Workloads: second-order MAML unless the row names another solver, Adam 1e-3 outer:
  (a) ``sinusoid``: MLP 1-40-40-1, 10-shot, 10 queries, meta-batch 25, alpha 0.01,
      K in {1, 5, 10, 25, 50}.
  (b) ``conv``: Omniglot-shaped Conv4 (64 filters, stride 2, batch norm with each task's own
      statistics), 5-way 1-shot, 15 queries per class, meta-batch 16, alpha 0.4, K in {1, 5, 10}.

metajax rows time ``metajax.meta.make_train_step`` (task sampling on device included) under the
named strategy; ``default`` is what a user gets without choosing (``unroll="auto"``,
``task_batching="auto"``, ``tasks_per_call="auto"``). Peer rows (``peers.py``: torch.func,
TorchOpt, higher; on CUDA when torch sees a GPU) time one meta-iteration on a fixed task batch.
Every row runs in its own process; ``first call`` is compile + one step for metajax (one step for
torch), ``compile`` is first call minus the median step, ``peak MB`` is the growth of the
process's peak resident memory after setup. Writes ``strategies.md`` and ``strategies.png``
beside this file (``--out PREFIX`` to write elsewhere, e.g. a GPU run).

Run: ``python experiments/benchmarks/strategies.py [--workloads sinusoid,conv] [--quick]``
(peers need ``pip install -e ".[peers]"``; without torch their rows are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {"sinusoid": (1, 5, 10, 25, 50), "conv": (1, 5, 10)}
STEP_SIZE = {"sinusoid": 0.01, "conv": 0.4}
META_BATCH = {"sinusoid": 25, "conv": 16}
# metajax rows: (solver, strategy). Strategies: default (automatic), scan / unroll / scan-unroll-5
# (inner loop form: rolled scan, full unroll, scan with 5 steps per iteration; tasks vmapped),
# one-program (conv: the whole meta-batch in one jit, tasks_per_call=None), lax-conv (conv: XLA's
# convolution instead of patches @ kernel, the rest automatic).
METAJAX_ROWS = {
    "sinusoid": [("maml", "default"), ("maml", "scan"), ("maml", "unroll"),
                 ("fomaml", "default"), ("imaml", "default"), ("adjoint", "default")],
    "conv": [("maml", "default"), ("maml", "one-program"), ("maml", "lax-conv"),
             ("fomaml", "default")],
}
PEERS = ("torch.func", "torchopt", "higher")


def _rss_mb() -> float:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _time(step, budget_s: float, max_reps: int) -> dict:
  import numpy as np
  base_rss = _rss_mb()
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  while len(times) < 3 or (sum(times) < budget_s and len(times) < max_reps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  q1, med, q3 = np.percentile(times, [25, 50, 75])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"first_s": first, "s_per_it": med, "q1": q1, "q3": q3, "reps": len(times),
          "peak_mb": max(peak - base_rss, 0.0)}


def _metajax_step(workload: str, solver: str, strategy: str, steps: int):
  import jax
  import optax

  import metajax
  s = metajax.solvers
  alpha = STEP_SIZE[workload]
  if workload == "sinusoid":
    params, apply_fn = metajax.models.make_mlp(jax.random.key(0))
    loss = metajax.meta.mse_loss(apply_fn)
    sample, data = metajax.tasks.sinusoid(num_support=10, num_query=10), ()
  else:
    module = metajax.models.Conv4(5, filters=64, strided=True,
                                  conv_impl="lax" if strategy == "lax-conv" else "auto")
    params, apply_fn = metajax.models.init_model(module, jax.random.key(0), (28, 28, 1))
    loss = metajax.meta.cross_entropy_loss(apply_fn)
    sample = metajax.tasks.episodes(ways=5, shots=1, queries=15)
    data = (jax.random.randint(jax.random.key(1), (1200, 20, 28, 28, 1), 0, 256)
            .astype("uint8"),)
  unroll = {"scan": 1, "unroll": True, "scan-unroll-5": 5}.get(strategy, "auto")
  adapt = {
      "maml": lambda: s.unrolled(loss, steps=steps, step_size=alpha, unroll=unroll),
      "fomaml": lambda: s.unrolled(loss, steps=steps, step_size=alpha, first_order=True),
      "imaml": lambda: s.implicit(loss, reg=2.0, optimizer=s.inner_optimizers.gd(alpha),
                                  max_steps=steps, tol=0.0,
                                  linear_solver=s.linear_solvers.cg(maxiter=5, tol=0.0)),
      # the adaptive solve, as strategies.md was measured (the default grid has 10 steps
      # whatever K)
      "adjoint": lambda: s.adjoint(loss, t1=steps * alpha, steps=None),
  }[solver]()
  optimizer = optax.adam(1e-3)
  train_step = metajax.meta.make_train_step(
      jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)), optimizer, sample,
      meta_batch_size=META_BATCH[workload],
      tasks_per_call=None if strategy == "one-program" else "auto")
  box = [metajax.meta.init_train_state(params, optimizer)]
  key = jax.random.key(2)

  def step():
    box[0], losses = train_step(box[0], key, *data)
    jax.block_until_ready(losses)
  return step


def _peer_step(workload: str, peer: str, steps: int):
  import peers
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  batch = peers.task_batch(workload, META_BATCH[workload])
  return peers.make_step(peer, workload, steps, STEP_SIZE[workload], batch)


def child(spec: dict) -> dict:
  sys.path.insert(0, HERE)
  budget = 3.0 if spec["workload"] == "sinusoid" else 10.0
  if spec["framework"] == "metajax":
    step = _metajax_step(spec["workload"], spec["solver"], spec["strategy"], spec["steps"])
    import jax
    versions = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
  else:
    step = _peer_step(spec["workload"], spec["strategy"], spec["steps"])
    import peers
    import torch
    versions = {"torch": torch.__version__, "torch_device": str(peers.device())}
  out = _time(step, budget, 200)
  out["compile_s"] = (out["first_s"] - out["s_per_it"]) if spec["framework"] == "metajax" else 0.0
  return {**spec, **out, **versions}


def run_all(args) -> list[dict]:
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
    print("torch not installed: peer rows skipped (pip install -e '.[peers]')", file=sys.stderr)
  rows = []
  host = {"machine": platform.machine(), "cpus": os.cpu_count(),
          "python": platform.python_version()}  # in every row, failed ones too
  for workload in args.workloads.split(","):
    all_steps = STEPS[workload] if not args.quick else STEPS[workload][:2]
    if args.steps:
      all_steps = [int(k) for k in args.steps.split(",")]
    metajax_rows = METAJAX_ROWS[workload]
    if args.metajax:
      metajax_rows = [tuple(item.split(":")) for item in args.metajax.split(",")]
    for steps in all_steps:
      specs = [dict(workload=workload, steps=steps, framework="metajax", solver=solver,
                    strategy=strategy, host=host) for solver, strategy in metajax_rows]
      if have_torch and not args.no_peers:
        specs += [dict(workload=workload, steps=steps, framework="torch", solver="maml",
                       strategy=peer, host=host) for peer in PEERS]
      for spec in specs:
        if spec["strategy"] in ("one-program", "lax-conv") and steps > 5:
          continue  # slower than the default at K=1 and 5; spares minutes of compilation
        try:
          out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                               capture_output=True, text=True, timeout=args.timeout, check=True)
          rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
          rows.append({**spec, "timeout": args.timeout})
        except subprocess.CalledProcessError as e:
          rows.append({**spec, "error": e.stderr.strip().splitlines()[-1][:200]})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def _label(r: dict) -> str:
  if r["framework"] == "torch":
    return r["strategy"]
  return f"metajax {r['solver']}" + ("" if r["strategy"] == "default" else f" ({r['strategy']})")


def write_report(rows: list[dict], path: str) -> str:
  env = next((r for r in rows if "jax" in r), {})
  host = rows[0]["host"]
  torch_v = next((f"{r['torch']} on {r.get('torch_device', 'cpu')}" for r in rows if "torch" in r),
                 "not installed")
  lines = [
      "# Execution strategies vs PyTorch peers",
      "",
      f"Machine: {host['machine']}, {host['cpus']} CPUs, backend {env.get('device')}; "
      f"jax {env.get('jax')}, torch {torch_v}, Python {host['python']}. "
      "Produced by `python experiments/benchmarks/strategies.py`; every row its own process. "
      "Seconds per meta-iteration: median and interquartile range. `compile` = first call minus "
      "the median step (metajax only). `peak MB` = growth of peak RSS after setup. `x vs fastest "
      "peer` = fastest peer's median / this row's median (> 1: metajax faster).",
      "",
  ]
  for workload in dict.fromkeys(r["workload"] for r in rows):
    lines += [f"## {workload} (meta-batch {META_BATCH[workload]}, alpha {STEP_SIZE[workload]})", "",
              "| K | implementation | s / meta-iteration | IQR | first call (s) | compile (s) | "
              "peak MB | x vs fastest peer | x vs torch.func |",
              "|---|---|---|---|---|---|---|---|---|"]
    for steps in dict.fromkeys(r["steps"] for r in rows if r["workload"] == workload):
      group = [r for r in rows if r["workload"] == workload and r["steps"] == steps]
      peer_times = {r["strategy"]: r["s_per_it"] for r in group
                    if r["framework"] == "torch" and "s_per_it" in r}
      fastest = min(peer_times.values()) if peer_times else None
      for r in group:
        if "s_per_it" not in r:
          why = f"> {r['timeout']} s, stopped" if "timeout" in r else r.get("error", "failed")
          lines.append(f"| {steps} | {_label(r)} | {why} | | | | | | |")
          continue
        vs = f"{fastest / r['s_per_it']:.2f}" if fastest and r["framework"] == "metajax" else ""
        vs_func = (f"{peer_times['torch.func'] / r['s_per_it']:.1f}"
                   if "torch.func" in peer_times and r["framework"] == "metajax" else "")
        lines.append(
            f"| {steps} | {_label(r)} | {r['s_per_it']:.4g} | {r['q1']:.4g}-{r['q3']:.4g} | "
            f"{r['first_s']:.2f} | {r['compile_s']:.2f} | {r['peak_mb']:.0f} | {vs} | {vs_func} |")
    lines.append("")
  text = "\n".join(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text


def plot(rows: list[dict], path: str) -> None:
  sys.path.insert(0, os.path.dirname(HERE))
  import common
  workloads = list(dict.fromkeys(r["workload"] for r in rows))

  def draw(axes):
    for ax, workload in zip(list(axes) if len(workloads) > 1 else [axes], workloads):
      group = [r for r in rows if r["workload"] == workload and "s_per_it" in r]
      for label in dict.fromkeys(_label(r) for r in group):
        pts = [(r["steps"], r["s_per_it"]) for r in group if _label(r) == label]
        ax.plot(*zip(*pts), marker="o" if label.startswith("metajax") else "x",
                linestyle="-" if label.startswith("metajax") else "--", label=label)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("inner steps K")
      ax.set_ylabel("seconds / meta-iteration")
      ax.set_title(workload)
      ax.legend(fontsize=7)
  common.save_plot(path, draw, panels=len(workloads))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default="sinusoid,conv")
  parser.add_argument("--quick", action="store_true", help="only the two smallest K")
  parser.add_argument("--steps", help="comma-separated K values instead of the workload's")
  parser.add_argument("--metajax", help="comma-separated solver:strategy rows, e.g. maml:scan")
  parser.add_argument("--no-peers", action="store_true", help="skip the PyTorch rows")
  parser.add_argument("--timeout", type=int, default=900)
  parser.add_argument("--rows", help="re-render the report from a JSON-lines file of rows")
  parser.add_argument("--out", default=os.path.join(HERE, "strategies"))
  args = parser.parse_args()
  if args.rows:
    with open(args.rows, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  else:
    rows = run_all(args)
    with open(args.out + ".jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  print(write_report(rows, args.out + ".md"))
  plot(rows, args.out + ".png")


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(child(json.loads(sys.argv[2]))))
  else:
    main()
