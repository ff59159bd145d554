"""MAML, iMAML and the adjoint on the few-shot Conv4 (digits config): accuracy and time per step.

Each solver trains ``experiments/fewshot.py --config digits`` (5-way 1-shot, Conv4 32 filters,
meta-batch 16, 1000 meta-iterations) with the config's settings, for each seed, each run in its own
process, one after another; then evaluates on 600 test tasks (the seed fixes the initialization,
the training tasks and the test tasks, so the solvers of one seed see the same tasks). Per run: test
accuracy, compile + first iteration (s), median and IQR of the time per meta-iteration after the
first (from the per-iteration log), and the process's peak resident memory (host; CPU runs hold
their arrays there). Writes ``fewshot_solvers.md`` beside this file.

Run: ``python experiments/benchmarks/fewshot_solvers.py [--seeds 0,1,2] [--iterations 1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOLVERS = ("maml", "imaml", "adjoint")
CHILD = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(solver: str, seed: int, iterations: int, eval_tasks: int, timeout: int) -> dict:
  """One training run in its own process; its result with timings and peak memory."""
  with tempfile.TemporaryDirectory() as out:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.join(ROOT, "experiments", "fewshot.py"),
         "--solver", solver, "--seed", str(seed), "--iterations", str(iterations),
         "--eval-tasks", str(eval_tasks), "--out", out],
        capture_output=True, text=True, timeout=timeout, check=True)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
      result = json.load(f)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
      seconds = [r["seconds"] for r in map(json.loads, f) if r["event"] == "train"]
  peak_kb = int(done.stdout.split("PEAK_RSS_KB")[-1].split()[0])
  row = {**result, "seed": seed, "first_s": seconds[0], "peak_mb": peak_kb / 1024}
  if len(seconds) > 1:
    q1, median, q3 = np.percentile(np.diff(seconds), [25, 50, 75])
    row.update(s_per_it=median, q1=q1, q3=q3)
  return row


def settings(config, official_ridge) -> str:
  """The solvers' training and test settings, in words, read from the digits ``config``."""
  t1 = config.adjoint_t1 if config.adjoint_t1 is not None else (
      config.inner_steps * config.inner_lr)
  return (
      f"MAML: {config.inner_steps} step{'s' * (config.inner_steps != 1)} of "
      f"{config.inner_lr:g}, {config.test_steps} at test. "
      f"iMAML: {config.imaml_inner_steps} GD steps of {config.imaml_inner_lr:g} on reg "
      f"{config.imaml_reg:g}, {config.imaml_cg_steps} CG steps on the official damped operator "
      f"(ridge {official_ridge(config.imaml_reg):g}), tested as its paper does (reg 0: "
      f"{config.imaml_test_steps} GD steps of {config.imaml_inner_lr:g}). Adjoint: "
      f"{config.adjoint_steps} Euler steps to t1 = {t1:g} (stored checkpoints), tested on the "
      f"flow to MAML's test horizon ({config.test_steps} steps to "
      f"{config.test_steps * config.inner_lr:g}).")


def report(rows: list[dict], seeds: list[int], iterations: int, eval_tasks: int) -> str:
  sys.path.insert(0, ROOT)
  from experiments import common, fewshot
  by = {(r["solver"], r["seed"]): r for r in rows if r["iterations"] == iterations}
  init = {(r["solver"], r["seed"]): r["accuracy"] for r in rows if r["iterations"] == 1}
  maml_acc = np.mean([by["maml", s]["accuracy"] for s in seeds])
  maml_it = np.median([by["maml", s]["s_per_it"] for s in seeds])
  lines = [
      "# Few-shot Conv4 (digits config): MAML, iMAML and the adjoint",
      "",
      f"{common.machine_line(rows[0], diffrax=True)}. `experiments/fewshot.py --config digits`, "
      f"5-way 1-shot, meta-batch 16, {iterations} meta-iterations per run, one run per process, "
      f"runs one after another; accuracy on {eval_tasks} test tasks (95% CI), seeds "
      f"{', '.join(map(str, seeds))} (a seed fixes the initialization and the training and test "
      f"tasks). {settings(fewshot.CONFIGS['digits'], fewshot.official_ridge)} Time per "
      "meta-iteration: median (IQR) of the "
      "iterations after the first; peak memory: the process's peak resident set. Control: the "
      "accuracy of the same test protocol after one meta-iteration (one Adam step from the "
      "initialization), so what the training added is visible.",
      "",
      "| solver | seed | accuracy | vs MAML (points) | s / meta-iteration (IQR) | x MAML | "
      "compile + first it. (s) | peak RSS (MB) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for solver in SOLVERS:
    for s in seeds:
      r = by[solver, s]
      lines.append(
          f"| {solver} | {s} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% | "
          f"{100 * (r['accuracy'] - by['maml', s]['accuracy']):+.2f} | {r['s_per_it']:.4f} "
          f"({r['q1']:.4f}-{r['q3']:.4f}) | {r['s_per_it'] / by['maml', s]['s_per_it']:.2f} | "
          f"{r['first_s']:.1f} | {r['peak_mb']:.0f} |")
  lines += ["", "| solver | mean accuracy | vs MAML (points) | median s / meta-iteration | "
            "x MAML | control: after 1 iteration |", "|---|---|---|---|---|---|"]
  for solver in SOLVERS:
    acc = np.mean([by[solver, s]["accuracy"] for s in seeds])
    it = np.median([by[solver, s]["s_per_it"] for s in seeds])
    control = np.mean([init[solver, s] for s in seeds])
    lines.append(f"| {solver} | {100 * acc:.2f}% | {100 * (acc - maml_acc):+.2f} | {it:.4f} | "
                 f"{it / maml_it:.2f} | {100 * control:.2f}% |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--iterations", type=int, default=1000, help="at least 2")
  parser.add_argument("--eval-tasks", type=int, default=600)
  parser.add_argument("--timeout", type=int, default=1800)
  parser.add_argument("--out", default=os.path.join(HERE, "fewshot_solvers.md"))
  args = parser.parse_args()
  if args.iterations < 2:
    parser.error("--iterations must be >= 2 (1 is the control run).")
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for seed in seeds:
    for solver in SOLVERS:
      for iterations in (1, args.iterations):  # 1: the control
        rows.append(run(solver, seed, iterations, args.eval_tasks, args.timeout))
        r = rows[-1]
        print(f"{solver} seed {seed}, {iterations} it.: {100 * r['accuracy']:.2f}%  "
              f"{r.get('s_per_it', float('nan')):.4f} s/it  first {r['first_s']:.1f} s  "
              f"peak {r['peak_mb']:.0f} MB", flush=True)
  text = report(rows, seeds, args.iterations, args.eval_tasks)
  print(text)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  main()
