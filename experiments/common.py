"""Pieces shared by the experiment scripts: flag checks, solver choice, devices and processes,
logging, progress, plots."""

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

# The one registry of --solver names: the classic solvers, built by make_adapt, then the
# second-wave methods, built by experiments/recipes.py (recipes.CLASSIC/METHODS/SOLVERS are these).
CLASSIC_SOLVERS = ("maml", "fomaml", "metasgd", "reptile", "imaml", "adjoint")
METHOD_SOLVERS = ("anil", "boil", "mamlpp", "cavia", "ml3")
SOLVERS = CLASSIC_SOLVERS + METHOD_SOLVERS
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
  check_out(parser, getattr(args, "out", None))
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


def check_out(parser, out) -> None:
  """``--out`` must be a directory this process can create or write (checked before training,
  creating nothing): its nearest existing ancestor must be a writable directory."""
  if out is None:
    return
  path = os.path.abspath(out)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    parser.error(f"--out {out} cannot be a directory: {path} is a file.")
  if not os.access(path, os.W_OK):
    parser.error(f"--out {out}: {path} is not writable.")


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
  """``--solver`` (from ``solvers``, by default every name of :data:`SOLVERS`) and the inner
  solvers' flags."""
  parser.add_argument("--solver", choices=solvers, default="maml")
  parser.add_argument("--inner-steps", type=int, default=inner_steps)
  parser.add_argument("--inner-lr", type=float, default=inner_lr)
  parser.add_argument("--reg", type=float, default=2.0, help="iMAML proximal strength")
  parser.add_argument("--cg-steps", type=int, default=5, help="iMAML linear-solve iterations")
  parser.add_argument("--cg-ridge", type=float, default=0.0,
                      help="iMAML linear-solve damping (official code: 11 at reg 2)")
  parser.add_argument("--t1", type=float, default=None,
                      help="adjoint horizon (default inner_steps * inner_lr)")


def check_solver_flags(parser, args) -> None:
  """:func:`check_flags` for the flags of :func:`add_solver_flags`, and
  :func:`refuse_unused_flags` for the solver-specific ones."""
  check_flags(parser, args, positive_int=("--inner-steps", "--cg-steps"),
              positive_float=("--inner-lr", "--reg", "--t1"), nonnegative_float=("--cg-ridge",))
  refuse_unused_flags(parser, args, {"--reg": ("imaml",), "--cg-steps": ("imaml",),
                                     "--cg-ridge": ("imaml",), "--t1": ("adjoint",)})


def refuse_unused_flags(parser, args, used_by: dict[str, tuple[str, ...]]) -> None:
  """``parser.error`` for a flag of ``used_by`` given a value other than its default when
  ``--solver`` is not among the solvers that use it: it would be ignored without a word (and
  still recorded with the run's flags).

  Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="demo")
    >>> _ = p.add_argument("--solver", default="maml")
    >>> _ = p.add_argument("--reg", type=float, default=2.0)
    >>> refuse_unused_flags(p, p.parse_args(["--reg", "5"]), {"--reg": ("imaml",)})
    Traceback (most recent call last):
    ...
    SystemExit: 2
  """
  for flag, solvers in used_by.items():
    value, default = _flag_value(args, flag), parser.get_default(flag.lstrip("-").replace("-", "_"))
    if args.solver not in solvers and value != default:
      users = (f"is used by --solver {' or '.join(solvers)} only" if len(solvers) <= 3
               else f"is not used by --solver {args.solver}")
      parser.error(f"{flag} {value} {users}; --solver {args.solver} would ignore it.")


# Cluster launchers (or a user) may set these instead of the flags (JAX reads the first itself).
PROCESS_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
               "process_id": "JAX_PROCESS_ID"}


def add_device_flags(parser) -> None:
  """``--devices`` and the multi-process flags ``--coordinator --num-processes --process-id``.

  Check them with :func:`setup_devices`, which starts ``jax.distributed`` when asked.
  """
  parser.add_argument("--devices", type=int, default=None,
                      help="devices to split each meta-batch over (a 'tasks' mesh; 1: no mesh). "
                           "Default: every device of every process, or 1 on CPU with one "
                           "process (XLA's CPU devices share the same cores)")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="multi-process: the address of process 0's coordinator (every process "
                           "passes the same), or 'auto' to let JAX read a cluster's environment "
                           "(SLURM, Open MPI, Cloud TPU, Kubernetes). Default: "
                           "$JAX_COORDINATOR_ADDRESS; neither: one process")
  parser.add_argument("--num-processes", type=int, default=None,
                      help="multi-process: how many (default: $JAX_NUM_PROCESSES)")
  parser.add_argument("--process-id", type=int, default=None,
                      help="multi-process: this process's number, 0 to --num-processes - 1 "
                           "(default: $JAX_PROCESS_ID); process 0 writes the logs and results")


def _process_flags_from_env(parser, args) -> None:
  """Fills the multi-process flags left unset from :data:`PROCESS_ENV`."""
  for name, var in PROCESS_ENV.items():
    value = os.environ.get(var)
    if getattr(args, name) is not None or not value:
      continue
    if name != "coordinator":
      try:
        value = int(value)
      except ValueError:
        parser.error(f"{var} must be an integer (it stands in for --{name.replace('_', '-')}), "
                     f"got {value!r}.")
    setattr(args, name, value)


def check_process_flags(parser, args) -> None:
  """Rejects inconsistent multi-process flags with ``parser.error`` (touches no device)."""
  _process_flags_from_env(parser, args)
  check_flags(parser, args, positive_int=("--devices", "--num-processes"),
              int_range={"--process-id": (0, None)})
  coordinator, count, index = args.coordinator, args.num_processes, args.process_id
  if coordinator is None:
    if count is not None or index is not None:
      parser.error("--num-processes and --process-id need --coordinator HOST:PORT (process 0's "
                   "address, the same for every process).")
    return
  if coordinator == "auto":
    return
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    parser.error(f"--coordinator must be HOST:PORT with PORT in 1..65535 (e.g. 10.0.0.1:1234), "
                 f"or auto, got {coordinator!r}.")
  if count is None or index is None:
    parser.error(f"--coordinator {coordinator} needs --num-processes and --process-id (or "
                 "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID; --coordinator auto reads all three "
                 "from a cluster's environment).")
  if index >= count:
    parser.error(f"--process-id {index} must be below --num-processes {count} (processes are "
                 f"numbered 0 to {count - 1}).")


def start_processes(args) -> None:
  """``jax.distributed.initialize`` with the multi-process flags, if any was given (once)."""
  if args.coordinator is None or jax.distributed.is_initialized():
    return
  if args.coordinator == "auto":
    jax.distributed.initialize(num_processes=args.num_processes, process_id=args.process_id)
  else:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def setup_devices(parser, args, *, meta_batch: str = "--meta-batch") -> None:
  """Checks the device flags, starts ``jax.distributed`` if asked, resolves ``args.devices``.

  Call at the end of ``parse_args``: it is the first thing to touch the devices, as
  ``jax.distributed.initialize`` requires. ``--devices`` must not exceed the devices JAX sees,
  must be all of them with several processes (the mesh spans every process), and must divide
  the meta-batch (the flag named ``meta_batch``); each is a ``parser.error``.
  """
  batch = _flag_value(args, meta_batch)
  if getattr(args, "mlti", None) is not None and batch < 2:
    parser.error(f"--mlti mixes pairs of tasks of a meta-batch: it needs {meta_batch} >= 2, "
                 f"got {batch}.")
  check_process_flags(parser, args)
  start_processes(args)
  available, processes = jax.device_count(), jax.process_count()
  if args.devices is None:
    single_cpu = jax.default_backend() == "cpu" and processes == 1
    args.devices = 1 if single_cpu else available
  if args.devices > available:
    parser.error(f"--devices {args.devices} exceeds the {available} {jax.default_backend()} "
                 "devices JAX sees (jax.devices()).")
  if processes > 1 and args.devices != available:
    parser.error(f"--devices {args.devices} must be all {available} devices of the {processes} "
                 "processes (the mesh spans every process); leave --devices out.")
  if batch % args.devices:
    parser.error(f"{meta_batch} {batch} must be a multiple of --devices {args.devices} (each "
                 "device adapts the same number of tasks).")


def task_mesh(args):
  """The ``"tasks"`` mesh over the first ``args.devices`` devices, or None for one device."""
  if args.devices == 1:
    return None
  return metajax.parallel.task_mesh(jax.devices()[:args.devices])


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs, results and plots."""
  return jax.process_index() == 0


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
    grid = getattr(args, "ode_steps", None)  # None: the solver's default grid
    return s.adjoint(loss_fn, t1=t1, **({} if grid is None else {"steps": grid})), ()
  raise ValueError(f"unknown --solver {args.solver!r}; choose from {CLASSIC_SOLVERS}.")


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
          "machine": platform.machine(), "processes": jax.process_count()}


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


def write_report(path: str, text: str) -> None:
  """Prints a benchmark's markdown report and writes it to ``path`` (the committed results)."""
  print(text)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


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
