"""A-MAML's CosMixture regression: MAML vs first-order MAML vs iMAML vs the adjoint solver.

Tasks ``y = -c cos(f pi x + p) - x^2`` (c in [0.1, 1], p in [0.5, 2], f in [3, 6],
x in [-1, 1]; Li et al. 2021). Model: MLP 1-32-32-1 tanh (A-MAML's). Each
solver is meta-trained with the same budget (Adam, meta-batch 10) and adapts
with its own inner solver at test time; the table reports query RMSE after
adaptation over the test tasks with 95% confidence intervals.

Inner problem: K=20 steps of 0.05 (unrolled), the gradient flow to t1 = 1.0
(adjoint with its defaults: since 2026-11-24 a fixed grid of 10 Euler steps; the committed
``results/cosmixture.txt`` was measured with the adaptive Tsit5 solve, ``steps=None``), and
iMAML's proximal problem with reg=1
(A-MAML's code uses the same proximal strength) solved by 20 GD steps of 0.05
with 5 CG steps.

Each solver trains in ``<out>/<solver>/`` (``metrics.jsonl``, orbax ``checkpoints/`` every
``--checkpoint-every`` meta-iterations, at the end and on SIGTERM, which then exits with status
143); a rerun with the same ``--out`` resumes where it stopped (a finished solver is only
evaluated again), bit-identically (``experiments/runner.py``). ``--devices`` and
``--coordinator --num-processes --process-id`` split each meta-batch over devices and processes.

Run: ``python experiments/cosmixture.py [--iterations 2000] [--solvers maml,fomaml,imaml,adjoint]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

if __package__ in (None, ""):  # run as a file: the repository root holds experiments/
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metajax  # noqa: E402
from experiments import checkpoints, common, runner  # noqa: E402

# Meta-SGD's learned step sizes would need their own initialization and evaluation here.
COSMIXTURE_SOLVERS = tuple(s for s in common.CLASSIC_SOLVERS if s != "metasgd")
# The flags that make a solver's run the same run: a rerun into the same --out must keep them.
RUN_FLAGS = ("solver", "shots", "meta_batch", "seed", "inner_steps", "inner_lr", "reg")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                              description=__doc__.splitlines()[0])
  p.add_argument("--solvers", default="maml,fomaml,imaml,adjoint",
                 help=f"comma-separated, from {','.join(COSMIXTURE_SOLVERS)}")
  p.add_argument("--iterations", type=int, default=2000)
  p.add_argument("--chunk", type=int, default=100,
                 help="meta-iterations per jitted call (capped at --iterations, must divide it)")
  p.add_argument("--meta-batch", type=int, default=10)
  p.add_argument("--shots", type=int, default=20)
  p.add_argument("--inner-steps", type=int, default=20)
  p.add_argument("--inner-lr", type=float, default=0.05)
  p.add_argument("--reg", type=float, default=1.0)
  p.add_argument("--eval-tasks", type=int, default=600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/cosmixture")
  runner.add_flags(p, checkpoint_every=500)
  common.add_device_flags(p)
  args = p.parse_args(argv)
  common.check_flags(p, args, positive_int=("--iterations", "--chunk", "--meta-batch", "--shots",
                                            "--inner-steps", "--checkpoint-every"),
                     positive_float=("--inner-lr", "--reg"),
                     int_range={"--eval-tasks": (2, None), "--seed": common.SEED_RANGE})
  common.check_chunk(p, args)
  names = args.solvers.split(",")
  if "" in names:
    p.error(f"--solvers {args.solvers!r} has an empty name: separate names by single commas.")
  if "metasgd" in names:
    p.error("--solvers metasgd is not supported by cosmixture.py; choose from "
            f"{','.join(COSMIXTURE_SOLVERS)}.")
  unknown = [n for n in names if n not in COSMIXTURE_SOLVERS]
  if unknown:
    p.error(f"--solvers has unknown names {unknown}; choose from {','.join(COSMIXTURE_SOLVERS)}.")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    p.error(f"--solvers repeats {repeated}: name each solver once.")
  if "imaml" not in names and args.reg != p.get_default("reg"):
    p.error(f"--reg {args.reg} is used by the imaml solver only, which --solvers "
            f"{args.solvers} does not run.")
  common.setup_devices(p, args)
  return args


def run_solver(solver, args, params, apply_fn, keys):
  """Trains ``solver`` in ``<out>/<solver>`` (resuming from its checkpoints) and evaluates it."""
  loss_fn = metajax.meta.mse_loss(apply_fn)
  sargs = argparse.Namespace(solver=solver, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                             reg=args.reg, cg_steps=5, t1=None)
  adapt, learn = common.make_adapt(sargs, loss_fn)
  optimizer = optax.adam(1e-3)
  family = metajax.tasks.cos_mixture(num_support=args.shots, num_query=args.shots)
  mesh = common.task_mesh(args)
  train_step = metajax.meta.make_train_step(
      common.value_and_grad_for(sargs, adapt, loss_fn, learn), optimizer, family,
      meta_batch_size=args.meta_batch, iterations=args.chunk, mesh=mesh)
  state = metajax.meta.init_train_state(params, optimizer)
  run_args = argparse.Namespace(**{**vars(args), "solver": solver})
  try:
    trained = runner.train(train_step, state, keys[0], args=run_args,
                           out=os.path.join(args.out, solver), desc=f"cosmixture/{solver}",
                           metric="query_mse", config={**vars(run_args), **common.environment()},
                           run_flags=RUN_FLAGS, mesh=mesh)
  except checkpoints.CheckpointError as err:
    raise SystemExit(f"cosmixture.py: error: {err}") from err
  state = trained.state
  rmse = lambda p, batch: jnp.sqrt(loss_fn(p, batch))
  test_tasks = family(keys[1], args.eval_tasks)
  mean, ci = metajax.meta.evaluate(adapt, rmse, state.meta_params, test_tasks, chunk=100)
  before, before_ci = metajax.meta.evaluate(lambda p, s: p, rmse, state.meta_params, test_tasks,
                                            chunk=100)
  row = {"solver": solver, "rmse": mean, "ci95": ci, "rmse_before": before,
         "ci95_before": before_ci, "train_seconds": trained.seconds}
  trained.write(event="eval", **row)
  trained.close()
  return row


def main(argv=None):
  args = parse_args(argv)
  key_init, key_train, key_eval = jax.random.split(jax.random.key(args.seed), 3)
  params, apply_fn = metajax.models.make_mlp(key_init, 1, (32, 32, 1), activation=jnp.tanh)
  rows = []
  for solver in args.solvers.split(","):
    rows.append(run_solver(solver, args, params, apply_fn, (key_train, key_eval)))
    if common.is_primary():
      print(rows[-1], flush=True)
  result = {"rows": rows, "args": vars(args), **common.environment()}
  if not common.is_primary():
    return result
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"\nCosMixture, {args.shots}-shot, {args.iterations} meta-iterations, "
        f"{args.eval_tasks} test tasks")
  print("| solver | query RMSE after adaptation (95% CI) | before adaptation | train (s) |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['solver']} | {r['rmse']:.3f} ± {r['ci95']:.3f} | {r['rmse_before']:.3f} ± "
          f"{r['ci95_before']:.3f} | {r['train_seconds']:.0f} |")
  return result


if __name__ == "__main__":
  main()
