"""The experiment scripts' training loop: chunks, progress, metrics, checkpoints, preemption.

:func:`train` runs a jitted ``train_step(state, key, *data)`` (from
``metajax.meta.make_train_step``) ``--chunk`` meta-iterations per call up to ``--iterations``,
writing one ``train`` record per chunk to ``<out>/metrics.jsonl`` and an orbax checkpoint to
``<out>/checkpoints`` every ``--checkpoint-every`` iterations and at the end.

A rerun with the same ``--out`` resumes from the latest complete checkpoint and continues
bit-identically: the checkpoint holds the meta-parameters, the optimizer state and the
iteration (the ``TrainState``), and beside them the training key and the training time so far;
iteration ``i`` samples its tasks from ``fold_in(key, i)``; the metrics log is cut back to the
checkpoint's iteration (a ``config`` record with ``resumed_from`` marks each restart).

SIGTERM (a scheduler preempting the job) sets a flag: at the next chunk boundary every process
saves a checkpoint, the run prints where, and exits with status :data:`PREEMPTED` (143, 128 +
SIGTERM, so a scheduler sees the job did not finish); rerunning the command resumes it.

Multi-process: every process runs the loop and saves (orbax needs every process), only process 0
writes the metrics, prints progress and (in the scripts) results; the processes agree on stopping
at the same chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

import metajax
from experiments import checkpoints, common

PREEMPTED = 128 + signal.SIGTERM  # the exit status after a SIGTERM: checkpoint saved


def add_flags(parser, *, checkpoint_every: int) -> None:
  """``--checkpoint-every`` (``--out``, ``--iterations`` and ``--chunk`` are the scripts')."""
  parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                      help="meta-iterations between checkpoints (also saved at the end and on "
                           "SIGTERM); a rerun with the same --out resumes from the latest")


@dataclasses.dataclass
class Trained:
  """What :func:`train` leaves: the final state and the log, for the script's evaluation."""

  state: Any  # the final TrainState, on this process's first device
  seconds: float  # training time over every session of the run
  resumed_from: int  # the iteration this session started from
  log: common.JsonLog | None  # metrics.jsonl, open for more records (None off process 0)

  def write(self, **record) -> None:
    """Appends ``record`` to the metrics log (on process 0; elsewhere does nothing)."""
    if self.log is not None:
      self.log.write(**record)

  def close(self) -> None:
    if self.log is not None:
      self.log.close()


def truncate_log(path: str, iteration: int) -> None:
  """Cuts ``path`` (JSON lines) after the last record up to ``iteration``.

  Kept: ``config`` records and ``train`` records of iterations up to ``iteration``, up to the
  first other line (a later iteration, an evaluation, a line cut short by a kill). Iteration 0
  (no checkpoint) empties the log.
  """
  if not os.path.exists(path):
    return
  keep = 0
  if iteration > 0:
    with open(path, "rb") as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          break
        if not isinstance(record, dict):
          break
        train = record.get("event") == "train" and record.get("iteration", 0) <= iteration
        if not (line.endswith(b"\n") and (train or record.get("event") == "config")):
          break
        keep += len(line)
  os.truncate(path, keep)


class _Preemption:
  """Within ``with``: SIGTERM sets :attr:`requested` instead of killing the process."""

  def __init__(self):
    self.requested, self._previous = False, None

  def _handle(self, signum, frame):
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process gets the same answer)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _key_metadata(key) -> dict:
  return {"key": np.asarray(jax.random.key_data(key)).tolist(),
          "key_impl": str(jax.random.key_impl(key))}


def _restored_key(metadata: dict, key):
  """The training key saved with the checkpoint (``key`` when it has none)."""
  if "key" not in metadata:
    return key
  data = np.asarray(metadata["key"], np.asarray(jax.random.key_data(key)).dtype)
  return jax.random.wrap_key_data(data, impl=metadata.get("key_impl", jax.random.key_impl(key)))


def train(train_step, state, key, data=(), *, args, out: str, desc: str, metric: str,
          config: dict, run_flags=checkpoints.RUN_FLAGS, mesh=None) -> Trained:
  """Trains ``state`` to ``args.iterations``, resuming from ``out``'s checkpoints.

  Args:
    train_step: ``train_step(state, key, *data) -> (state, losses)`` running ``args.chunk``
      meta-iterations per call.
    state: the initial ``TrainState``; replaced by the latest checkpoint's, if any.
    key: the training key (iteration ``i`` samples from ``fold_in(key, i)``).
    data: the extra arguments of ``train_step`` (e.g. class-indexed images).
    args: the parsed flags: ``iterations``, ``chunk``, ``checkpoint_every`` and ``run_flags``.
    out: the run directory (``checkpoints/`` and ``metrics.jsonl`` go there).
    desc: the progress bar's label.
    metric: the name of the mean query loss in the ``train`` records.
    config: the fields of the ``config`` record written at each (re)start.
    run_flags: the names in ``args`` that must be unchanged to resume (``run.json``).
    mesh: a ``"tasks"`` mesh the train step splits tasks over (the state, key and data are
      replicated on it first), or None.

  Returns:
    A :class:`Trained`: the final state (on this process's first device), the training time,
    the metrics log.

  Raises:
    checkpoints.CheckpointError: the checkpoints in ``out`` cannot be resumed (the message
      says why and what to do).
    SystemExit: with status :data:`PREEMPTED` after a SIGTERM (a checkpoint was saved).
  """
  primary = common.is_primary()
  if mesh is not None:
    state, key, data = metajax.parallel.put_replicated((state, key, tuple(data)), mesh)
  manager = checkpoints.checkpoint_manager(os.path.join(out, "checkpoints"))
  state = checkpoints.resume(manager, state, args, run_flags=run_flags, write=primary)
  saved = checkpoints.latest_metadata(manager)
  key = _restored_key(saved, key)
  if mesh is not None and "key" in saved:
    key = metajax.parallel.put_replicated(key, mesh)
  start_step, before = int(state.step), float(saved.get("seconds", 0.0))
  log = None
  if primary:
    path = os.path.join(out, "metrics.jsonl")
    truncate_log(path, start_step)
    log = common.JsonLog(path)
    log.write(event="config", resumed_from=start_step, **config)
  bar = common.progress(args.iterations, desc) if primary else None
  if bar is not None:
    bar.update(start_step)
  start = time.time()
  seconds = lambda: before + time.time() - start
  with _Preemption() as preemption:
    while int(state.step) < args.iterations:
      state, losses = train_step(state, key, *data)
      step, loss = int(state.step), float(losses.mean())  # one host read per chunk
      if log is not None:
        log.write(event="train", iteration=step, **{metric: loss}, seconds=seconds())
        bar.update(args.chunk)
        bar.set_postfix(**{metric: f"{loss:.3f}"})
      stop = preemption.agreed()
      if step % args.checkpoint_every < args.chunk or step >= args.iterations or stop:
        checkpoints.save(manager, state, {**_key_metadata(key), "seconds": seconds()})
      if stop:
        _stop(manager, bar, log, step, out)
  _close(manager, bar)
  if mesh is not None:  # off the mesh, for evaluation on this process alone
    state = jax.device_put(jax.device_get(state), jax.local_devices()[0])
  return Trained(state, seconds(), start_step, log)


def _close(manager, bar) -> None:
  """Waits for the checkpoint being written and closes the manager and the progress bar."""
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if bar is not None:
    bar.close()


def _stop(manager, bar, log, step: int, out: str):
  """Waits for the checkpoint at ``step``, says so and exits with :data:`PREEMPTED`."""
  _close(manager, bar)
  if log is not None:
    log.close()
  saved = (f"with a checkpoint in {os.path.join(out, 'checkpoints')}; rerun the same command to "
           "resume" if manager is not None else "without a checkpoint (orbax-checkpoint is not "
           "installed)")
  if common.is_primary():
    print(f"{os.path.basename(sys.argv[0])}: SIGTERM: stopped at iteration {step} {saved}.",
          file=sys.stderr, flush=True)
  raise SystemExit(PREEMPTED)
