"""Pieces shared by the experiment scripts: solver choice, logging, progress, plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import optax

import metajax

SOLVERS = ("maml", "fomaml", "metasgd", "reptile", "imaml", "adjoint")


def add_solver_flags(parser, *, inner_steps: int, inner_lr: float) -> None:
  parser.add_argument("--solver", choices=SOLVERS, default="maml")
  parser.add_argument("--inner-steps", type=int, default=inner_steps)
  parser.add_argument("--inner-lr", type=float, default=inner_lr)
  parser.add_argument("--reg", type=float, default=2.0, help="iMAML proximal strength")
  parser.add_argument("--cg-steps", type=int, default=5, help="iMAML linear-solve iterations")
  parser.add_argument("--cg-ridge", type=float, default=0.0,
                      help="iMAML linear-solve damping (official code: 1.0)")
  parser.add_argument("--t1", type=float, default=None,
                      help="adjoint horizon (default inner_steps * inner_lr)")


def make_adapt(args, loss_fn):
  """The inner solver named by ``args.solver``; returns ``(adapt, learn)``."""
  s = metajax.solvers
  if args.solver in ("maml", "metasgd", "reptile"):
    return s.unrolled(loss_fn, steps=args.inner_steps, step_size=args.inner_lr), (
        ("step_size",) if args.solver == "metasgd" else ())
  if args.solver == "fomaml":
    return s.unrolled(loss_fn, steps=args.inner_steps, step_size=args.inner_lr,
                      first_order=True), ()
  if args.solver == "imaml":
    return s.implicit(loss_fn, reg=args.reg, inner="gd", inner_steps=args.inner_steps,
                      inner_step_size=args.inner_lr, inner_tol=0.0,
                      linear_solver=s.linear_solvers.cg(maxiter=args.cg_steps, tol=0.0,
                                                        ridge=getattr(args, "cg_ridge", 0.0))), ()
  if args.solver == "adjoint":
    t1 = args.t1 if args.t1 is not None else args.inner_steps * args.inner_lr
    return s.adjoint(loss_fn, t1=t1), ()
  raise ValueError(f"unknown --solver {args.solver!r}; choose from {SOLVERS}.")


def value_and_grad_for(args, adapt, loss_fn, learn):
  if args.solver == "reptile":
    return metajax.meta.reptile_value_and_grad(adapt, loss_fn)
  return jax.value_and_grad(metajax.meta.meta_objective(adapt, loss_fn, learn=learn))


def init_meta_params(args, params, learn):
  if not learn:
    return params
  return {"params": params, "step_size": jax.tree.map(lambda p: p * 0 + args.inner_lr, params)}


def outer_optimizer(args):
  return optax.sgd(args.meta_lr) if args.solver == "reptile" else optax.adam(args.meta_lr)


def environment() -> dict:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(),
          "machine": platform.machine()}


class JsonLog:
  """Appends one JSON object per line to ``path``."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write(self, **record) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def progress(total: int, desc: str):
  """A tqdm bar when tqdm is installed, else a plain stderr counter."""
  try:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True)
  except ImportError:
    return _PlainProgress(total, desc)


class _PlainProgress:
  def __init__(self, total, desc):
    self.total, self.desc, self.n, self.start = total, desc, 0, time.time()

  def update(self, n):
    self.n += n
    print(f"{self.desc}: {self.n}/{self.total} ({time.time() - self.start:.0f}s)", file=sys.stderr)

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def save_plot(path: str, draw, *, panels: int | None = None) -> bool:
  """Calls ``draw(plt)`` (or ``draw(axes)`` with ``panels`` side-by-side axes) and saves a PNG.

  Returns False when matplotlib is missing.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: skipping", path, file=sys.stderr)
    return False
  if panels:
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4))
    draw(axes)
  else:
    fig = plt.figure(figsize=(6, 4))
    draw(plt)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def compiled_peak_bytes(compiled) -> int:
  """XLA's buffer assignment for a compiled function: temp + arguments + outputs."""
  mem = compiled.memory_analysis()
  return mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes


def time_calls(fn, *args, repeats: int, warmup: int = 1):
  """Quartiles (q1, median, q3) in milliseconds of ``repeats`` blocking calls of ``fn(*args)``."""
  import numpy as np
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return tuple(np.percentile(np.asarray(times) * 1e3, [25, 50, 75]))
