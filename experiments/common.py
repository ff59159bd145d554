"""Pieces shared by the experiment scripts: flag checks, solver choice, logging, progress, plots."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import jax
import optax

import metajax

SOLVERS = ("maml", "fomaml", "metasgd", "reptile", "imaml", "adjoint")
# jax.random.key(seed) keeps 32 bits with float64 off: seed 2**32 is seed 0 again.
SEED_RANGE = (0, 2**32 - 1)


def _flag_value(args, flag: str):
  return getattr(args, flag.lstrip("-").replace("-", "_"))


def check_flags(parser, args, *, positive_int=(), positive_float=(), nonnegative_float=(),
                int_range=None) -> None:
  """Rejects out-of-range numeric flags with ``parser.error`` (exit status 2), naming the flag.

  Flags are written as on the command line (``"--meta-batch"``); one whose value is None (an
  optional flag left unset) is skipped.

  Args:
    parser: the ``argparse.ArgumentParser`` that parsed ``args``.
    args: the parsed namespace.
    positive_int: integer flags that must be >= 1.
    positive_float: float flags that must be finite and > 0.
    nonnegative_float: float flags that must be finite and >= 0.
    int_range: ``{flag: (low, high)}`` for integer flags with other bounds (inclusive; ``high``
      may be None).

  Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="demo")
    >>> _ = p.add_argument("--iterations", type=int)
    >>> check_flags(p, p.parse_args(["--iterations", "0"]), positive_int=["--iterations"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
  """
  bounds = {flag: (1, None) for flag in positive_int}
  bounds.update(int_range or {})
  for flag, (low, high) in bounds.items():
    value = _flag_value(args, flag)
    if value is None:
      continue
    if value < low or (high is not None and value > high):
      allowed = f">= {low}" if high is None else f"between {low} and {high}"
      parser.error(f"{flag} must be {allowed}, got {value}.")
  for flags, strict in ((positive_float, True), (nonnegative_float, False)):
    for flag in flags:
      value = _flag_value(args, flag)
      if value is None:
        continue
      if not math.isfinite(value) or value < 0 or (strict and value == 0):
        parser.error(f"{flag} must be a finite number {'> 0' if strict else '>= 0'}, "
                     f"got {value}.")


def check_chunk(parser, args) -> None:
  """Caps ``--chunk`` at ``--iterations``, which it must then divide (``parser.error`` if not).

  Each jitted call runs ``--chunk`` meta-iterations, so a chunk that does not divide the
  iterations would train more or fewer iterations than asked. Sets ``args.chunk``.
  """
  chunk = min(args.chunk, args.iterations)
  if args.iterations % chunk:
    parser.error(f"--chunk {args.chunk} must divide --iterations {args.iterations} (each jitted "
                 "call runs --chunk meta-iterations).")
  args.chunk = chunk


def add_solver_flags(parser, *, inner_steps: int, inner_lr: float, solvers=SOLVERS) -> None:
  parser.add_argument("--solver", choices=solvers, default="maml")
  parser.add_argument("--inner-steps", type=int, default=inner_steps)
  parser.add_argument("--inner-lr", type=float, default=inner_lr)
  parser.add_argument("--reg", type=float, default=2.0, help="iMAML proximal strength")
  parser.add_argument("--cg-steps", type=int, default=5, help="iMAML linear-solve iterations")
  parser.add_argument("--cg-ridge", type=float, default=0.0,
                      help="iMAML linear-solve damping (official code: 1.0)")
  parser.add_argument("--t1", type=float, default=None,
                      help="adjoint horizon (default inner_steps * inner_lr)")


def check_solver_flags(parser, args) -> None:
  """:func:`check_flags` for the flags of :func:`add_solver_flags`."""
  check_flags(parser, args, positive_int=("--inner-steps", "--cg-steps"),
              positive_float=("--inner-lr", "--reg", "--t1"), nonnegative_float=("--cg-ridge",))


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
    return s.implicit(loss_fn, reg=args.reg, optimizer=s.inner_optimizers.gd(args.inner_lr),
                      max_steps=args.inner_steps, tol=0.0,
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


def machine_line(env: dict, *, diffrax: bool = False) -> str:
  """``Machine: <arch>, <n> CPUs, backend <b>; jax <v>[, diffrax <v>]`` for a report header."""
  line = (f"Machine: {env['machine']}, {env['cpus']} CPUs, backend {env['backend']}; "
          f"jax {env['jax']}")
  if diffrax:
    line += f", diffrax {__import__('diffrax').__version__}"
  return line


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
