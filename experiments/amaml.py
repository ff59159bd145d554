"""A-MAML's synthetic meta-regression protocol: every solver across trajectory lengths.

Protocol (Li et al., arXiv 2110.08432, and its official code): task families Alpine2D,
CosMixture and CosMixture2D (:mod:`metajax.tasks`); a fixed pool of 100 meta-train and 100
meta-test functions, 1000 support-pool and 1000 query-pool points each, of which each task
draws ``--shots`` (100) and ``--queries`` (100); inputs and outputs standardized with the
meta-train pool's statistics; MLP with two hidden layers of 32 tanh units, float64; meta-batch
5, plain SGD meta-updates of 0.01. Inner trajectories of K steps of 0.01 (t1 = 0.01 K):

- ``maml`` / ``fomaml``: K gradient steps of 0.01, second / first order;
- ``reptile``: K steps of 0.01, meta-gradient ``theta - phi``;
- ``imaml``: the proximal problem (reg ``--reg``, A-MAML's ``meta_reg`` 1.0) by K GD steps of
  0.01, 5 CG steps;
- ``adjoint``: the gradient flow with the same proximal term (A-MAML's code) to
  t1 = 0.01 K, metajax's defaults (Tsit5, PID 1e-10, checkpoint adjoint).

Each solver adapts with itself at test time. For every (solver, K): query RMSE over the
meta-test functions with a 95% confidence interval, time per meta-iteration, and the XLA peak
memory of the meta-gradient program (buffer assignment of one meta-batch).

Run: ``python experiments/amaml.py --family cos_mixture --steps 10,50,100,200,400``.
Writes ``<out>/amaml-<family>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a file: the repository root holds experiments/
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metajax  # noqa: E402
from experiments import common  # noqa: E402

FAMILIES = {"alpine2d": metajax.tasks.alpine2d, "cos_mixture": metajax.tasks.cos_mixture,
            "cos_mixture2d": metajax.tasks.cos_mixture2d}
AMAML_SOLVERS = ("maml", "fomaml", "reptile", "imaml", "adjoint")
POOL_POINTS = 1000


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                              description=__doc__.splitlines()[0])
  p.add_argument("--family", default="cos_mixture", choices=sorted(FAMILIES))
  p.add_argument("--solvers", default=",".join(AMAML_SOLVERS),
                 help=f"comma-separated, from {','.join(AMAML_SOLVERS)}")
  p.add_argument("--steps", default="10,50,100,200,400",
                 help="comma-separated inner trajectory lengths K (t1 = K * --step-size)")
  p.add_argument("--step-size", type=float, default=0.01)
  p.add_argument("--iterations", type=int, default=500)
  p.add_argument("--chunk", type=int, default=50,
                 help="meta-iterations per jitted call (must divide --iterations)")
  p.add_argument("--meta-batch", type=int, default=5)
  p.add_argument("--meta-lr", type=float, default=0.01)
  p.add_argument("--shots", type=int, default=100)
  p.add_argument("--queries", type=int, default=100)
  p.add_argument("--reg", type=float, default=1.0)
  p.add_argument("--tasks", type=int, default=100, help="meta-train and meta-test functions")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/amaml")
  args = p.parse_args(argv)
  common.check_flags(p, args, positive_int=("--iterations", "--chunk", "--meta-batch",
                                            "--shots", "--queries"),
                     positive_float=("--step-size", "--meta-lr", "--reg"),
                     int_range={"--tasks": (2, None), "--seed": common.SEED_RANGE})
  common.check_chunk(p, args)
  if args.iterations < 2 * args.chunk:  # the first chunk compiles: time the others
    p.error(f"--iterations {args.iterations} must be at least 2 x --chunk {args.chunk}: the "
            "time per meta-iteration is measured on the chunks after the first (which "
            "compiles); lower --chunk or raise --iterations.")
  args.solver_list = _names(p, "--solvers", args.solvers, AMAML_SOLVERS)
  try:
    args.step_list = [int(k) for k in args.steps.split(",")]
  except ValueError:
    p.error(f"--steps must be comma-separated positive ints, got {args.steps!r}.")
  if any(k < 1 for k in args.step_list):
    p.error(f"--steps must be comma-separated positive ints, got {args.steps!r}.")
  for flag, value in (("--shots", args.shots), ("--queries", args.queries)):
    if value > POOL_POINTS:
      p.error(f"{flag} must be <= {POOL_POINTS} (the points per function), got {value}.")
  if args.meta_batch > args.tasks:
    p.error(f"--meta-batch ({args.meta_batch}) must be <= --tasks ({args.tasks}).")
  return args


def _names(parser, flag, value, allowed):
  names = value.split(",")
  unknown = [n for n in names if n not in allowed]
  if unknown or len(set(names)) != len(names):
    parser.error(f"{flag} must name each of {','.join(allowed)} at most once, got {value!r}.")
  return names


def make_pools(family_name: str, num_tasks: int, key, dtype=jnp.float64):
  """Meta-train and meta-test pools ``(x, y)``: ``(num_tasks, 2 * POOL_POINTS, d)`` each,
  standardized with the meta-train pool's mean and standard deviation (A-MAML's scaler)."""
  family = FAMILIES[family_name](num_support=POOL_POINTS, num_query=POOL_POINTS, dtype=dtype)
  pools = []
  for k in jax.random.split(key):
    tasks = family(k, num_tasks)
    pools.append(tuple(jnp.concatenate(parts, axis=1)
                       for parts in zip(tasks.support, tasks.query)))
  (x_train, y_train) = pools[0]
  stats = [(a.mean((0, 1)), a.std((0, 1))) for a in (x_train, y_train)]
  return [tuple((a - m) / s for a, (m, s) in zip(pool, stats)) for pool in pools]


def pool_sampler(shots: int, queries: int):
  """``sample(key, n, x, y) -> Task``: n functions of the pool, ``shots`` support points from
  the first half of each function's points and ``queries`` query points from the second."""
  def sample(key, num_tasks, x, y):
    key_tasks, key_s, key_q = jax.random.split(key, 3)
    idx = jax.random.choice(key_tasks, x.shape[0], (num_tasks,), replace=False)
    pick = lambda k, n, offset: offset + jax.vmap(
        lambda kk: jax.random.choice(kk, POOL_POINTS, (n,), replace=False))(
            jax.random.split(k, num_tasks))
    s, q = pick(key_s, shots, 0), pick(key_q, queries, POOL_POINTS)
    take = lambda a, rows: jax.vmap(lambda ai, r: ai[r])(a[idx], rows)
    return metajax.tasks.Task(support=(take(x, s), take(y, s)), query=(take(x, q), take(y, q)))
  return sample


def make_solver(name: str, loss_fn, steps: int, args):
  s = metajax.solvers
  if name in ("maml", "fomaml", "reptile"):
    return s.unrolled(loss_fn, steps=steps, step_size=args.step_size,
                      first_order=name == "fomaml")
  if name == "imaml":
    return s.implicit(loss_fn, reg=args.reg, optimizer=s.inner_optimizers.gd(args.step_size),
                      max_steps=steps, tol=0.0,
                      linear_solver=s.linear_solvers.cg(maxiter=5, tol=0.0))
  # The gradient flow itself (adaptive steps), as the committed results were measured; the
  # library's default fixed grid would be 10 Euler steps whatever the horizon.
  return s.adjoint(loss_fn, t1=steps * args.step_size, reg=args.reg, steps=None)


def meta_gradient(name: str, loss_fn, steps: int, args):
  """``(adapt, value_and_grad)`` of solver ``name`` with ``steps`` inner steps."""
  adapt = make_solver(name, loss_fn, steps, args)
  if name == "reptile":
    return adapt, metajax.meta.reptile_value_and_grad(adapt, loss_fn)
  return adapt, jax.value_and_grad(metajax.meta.meta_objective(adapt, loss_fn))


def peak_memory_mb(value_and_grad, params, batch) -> float:
  """XLA's buffer assignment (temp + arguments + outputs) of one meta-gradient, in MiB."""
  compiled = jax.jit(value_and_grad).lower(params, batch).compile()
  return common.compiled_peak_bytes(compiled) / 2 ** 20


def run_one(name: str, steps: int, args, params, apply_fn, pools, key) -> dict:
  loss_fn = metajax.meta.mse_loss(apply_fn)
  adapt, value_and_grad = meta_gradient(name, loss_fn, steps, args)
  sample = pool_sampler(args.shots, args.queries)
  peak_mb = peak_memory_mb(value_and_grad, params, sample(key, args.meta_batch, *pools[0]))
  optimizer = optax.sgd(args.meta_lr)
  train_step = metajax.meta.make_train_step(value_and_grad, optimizer, sample,
                                            meta_batch_size=args.meta_batch,
                                            iterations=args.chunk)
  state = metajax.meta.init_train_state(params, optimizer)
  state, _ = jax.block_until_ready(train_step(state, key, *pools[0]))  # compile + 1st chunk
  chunk_seconds = []
  for _ in range(args.iterations // args.chunk - 1):
    start = time.perf_counter()
    state, losses = jax.block_until_ready(train_step(state, key, *pools[0]))
    chunk_seconds.append(time.perf_counter() - start)
  test = sample(jax.random.fold_in(key, 1), args.tasks, *pools[1])
  rmse = lambda p, b: jnp.sqrt(loss_fn(p, b))
  mean, ci = metajax.meta.evaluate(adapt, rmse, state.meta_params, test, chunk=20)
  ms = 1e3 * float(np.median(chunk_seconds)) / args.chunk if chunk_seconds else float("nan")
  return {"solver": name, "steps": steps, "t1": steps * args.step_size, "rmse": mean,
          "ci95": ci, "ms_per_iteration": ms, "peak_mb": peak_mb,
          "final_train_loss": float(losses[-1]) if chunk_seconds else float("nan")}


CELL_FLAGS = ("family", "step_size", "iterations", "chunk", "meta_batch", "meta_lr", "shots",
              "queries", "reg", "tasks", "seed")  # what makes a cell's result the same result


def cell(args, name: str, steps: int, run) -> dict:
  """One cell's row: ``run()``, written to ``<out>/cells/`` as soon as it finishes, or the row an
  earlier run of the same flags left there (a preempted grid resumes at its first unfinished
  cell; a cell's own training is short and restarts)."""
  path = os.path.join(args.out, "cells", f"{name}-{steps}.json")
  flags = {flag: getattr(args, flag) for flag in CELL_FLAGS}
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
      if saved.get("flags") == flags:
        return saved["row"]
    except (OSError, ValueError, AttributeError, KeyError):
      pass  # unreadable (killed while writing): run the cell again
  row = run()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"flags": flags, "row": row}, f)
  os.replace(path + ".tmp", path)  # atomic: a kill leaves the old file or the new one
  return row


def report(rows, args) -> str:
  env = common.environment()
  lines = [
      f"# A-MAML protocol: {args.family}, {args.shots}-shot, {args.iterations} meta-iterations",
      "",
      f"MLP {2 if args.family.endswith('2d') else 1}-32-32-1 tanh, float64, meta-batch "
      f"{args.meta_batch}, SGD {args.meta_lr}, {args.tasks} meta-train / {args.tasks} "
      f"meta-test functions, inner steps of {args.step_size} (t1 = {args.step_size} K), reg "
      f"{args.reg} for iMAML and the adjoint. RMSE on standardized outputs over the meta-test "
      "functions (95% CI); time per meta-iteration (median over chunks after compilation); XLA "
      "peak of the meta-gradient program.",
      "",
      common.machine_line(env) + ".",
      "",
      "| solver | K | t1 | query RMSE (95% CI) | ms / meta-iteration | XLA peak (MB) |",
      "|---|---|---|---|---|---|",
      *[f"| {r['solver']} | {r['steps']} | {r['t1']:g} | {r['rmse']:.3f} ± {r['ci95']:.3f} | "
        f"{r['ms_per_iteration']:.1f} | {r['peak_mb']:.2f} |" for r in rows],
      "",
  ]
  for name in args.solver_list:
    mine = [r for r in rows if r["solver"] == name]
    if len(mine) > 1:
      lines.append(f"- {name}: peak memory at K={mine[-1]['steps']} is "
                   f"{mine[-1]['peak_mb'] / mine[0]['peak_mb']:.2f}x its K={mine[0]['steps']} "
                   "value.")
  return "\n".join(lines) + "\n"


def plot(rows, args, path):
  def draw(axes):
    for name in args.solver_list:
      mine = [r for r in rows if r["solver"] == name]
      ks = [r["steps"] for r in mine]
      axes[0].errorbar(ks, [r["rmse"] for r in mine], yerr=[r["ci95"] for r in mine],
                       marker="o", label=name, capsize=3)
      axes[1].plot(ks, [r["ms_per_iteration"] for r in mine], marker="o", label=name)
      axes[2].plot(ks, [r["peak_mb"] for r in mine], marker="o", label=name)
    for ax, label in zip(axes, ("query RMSE", "ms per meta-iteration", "XLA peak (MB)")):
      ax.set(xscale="log", xlabel="inner steps K (t1 = 0.01 K)", ylabel=label)
    axes[1].set(yscale="log")
    axes[2].set(yscale="log")
    axes[0].legend()
  return common.save_plot(path, draw, panels=3)


def main(argv=None):
  args = parse_args(argv)
  jax.config.update("jax_enable_x64", True)  # A-MAML's float64
  os.makedirs(args.out, exist_ok=True)
  key_init, key_pool, key_train = jax.random.split(jax.random.key(args.seed), 3)
  pools = make_pools(args.family, args.tasks, key_pool)
  in_features = pools[0][0].shape[-1]
  params, apply_fn = metajax.models.make_mlp(key_init, in_features, (32, 32, 1),
                                             activation=jnp.tanh, dtype=jnp.float64)
  rows = []
  for name in args.solver_list:
    for steps in args.step_list:
      rows.append(cell(args, name, steps,
                       lambda: run_one(name, steps, args, params, apply_fn, pools, key_train)))
      print(rows[-1], flush=True)
  stem = os.path.join(args.out, f"amaml-{args.family}")
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "args": {k: v for k, v in vars(args).items()},
               **common.environment()}, f, indent=1)
  text = report(rows, args)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  plot(rows, args, stem + ".png")
  print(text)
  return rows


if __name__ == "__main__":
  main()
