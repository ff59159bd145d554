"""Preemption-safe checkpoints for the experiment scripts (orbax): save, check, resume.

A run directory holds ``run.json`` (the flags that make a run the same run, :data:`RUN_FLAGS` or
a script's own list) and orbax checkpoints; a rerun into the same directory resumes from the
latest one, and refuses (``CheckpointError``, saying what to do) checkpoints of another run,
unreadable ones, or ones that do not match the training state.

Atomic: orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` once every array and its metadata are written (a rename is atomic on a POSIX file
system; on cloud storage orbax writes a ``commit_success.txt`` last instead). A process killed
mid-save leaves only the temporary directory, which ``latest_step`` ignores (and
:func:`checkpoint_manager` deletes): the rerun resumes from the previous complete checkpoint.
Multi-process: every process calls :func:`save` (orbax writes each array once and synchronizes
the processes); only process 0 writes ``run.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax


class CheckpointError(RuntimeError):
  """A checkpoint directory this run cannot resume from; the message says what to do."""


RUN_FLAGS = ("config", "solver", "shots", "meta_batch", "seed", "mlti")  # what makes a run the same


def checkpoint_manager(directory):
  """An orbax ``CheckpointManager`` for ``directory``, or None when orbax is not installed."""
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    print("orbax-checkpoint not installed: no checkpoints", file=sys.stderr)
    return None
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is a file, not a checkpoint directory; delete it, or "
                          "pass another --out.")
  if os.path.isdir(directory) and jax.process_index() == 0:
    _remove_partial_saves(directory)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _remove_partial_saves(directory) -> None:
  """Deletes what saves killed midway left: orbax's ``<step>.orbax-checkpoint-tmp*`` folders
  (never read; orbax's own ``cleanup_tmp_directories`` warns from a closed event loop)."""
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _cause(err: Exception) -> str:
  """``Type: message``, cut to its first line and 200 characters (tensorstore's run long)."""
  text = (str(err).splitlines() or [""])[0]
  return f"{type(err).__name__}: {text[:200]}{' ...' if len(text) > 200 else ''}"


def _fresh(directory) -> str:
  return f"delete {directory} to start afresh, or pass another --out"


def check_run(directory, args, *, resuming: bool, run_flags=RUN_FLAGS, write: bool = True) -> None:
  """Records ``run_flags`` (attribute names of ``args``) in ``directory/run.json``; when resuming
  they must be unchanged. ``write=False`` (processes other than 0) only checks."""
  path = os.path.join(directory, "run.json")
  run = {name: getattr(args, name, None) for name in run_flags}
  if resuming and not os.path.exists(path):
    raise CheckpointError(f"{directory} holds checkpoints but not run.json, the record of the "
                          "flags that define the run: this rerun cannot be checked to be the same "
                          f"run; {_fresh(directory)}.")
  if resuming:
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as err:
      raise CheckpointError(f"{path} is unreadable ({err}); {_fresh(directory)}.") from err
    if not set(saved) & set(run_flags):
      raise CheckpointError(f"{path} records none of the flags that define the run "
                            f"({', '.join(run_flags)}): this rerun cannot be checked to be the "
                            f"same run; {_fresh(directory)}.")
    changed = [f"--{name.replace('_', '-')} {run[name]} (checkpoints: {saved[name]})"
               for name in run_flags if name in saved and saved[name] != run[name]]
    if changed:
      raise CheckpointError(f"the checkpoints in {directory} belong to another run: "
                            f"{', '.join(changed)}; rerun with the checkpoints' flags, or "
                            f"{_fresh(directory)}.")
    return
  if write:
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(run, f)


def _leaf_shapes(tree) -> dict[str, tuple | None]:
  """``{'meta_params.Dense_0.kernel': shape, ...}`` for a pytree or an orbax metadata tree."""
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {name(path): getattr(leaf, "shape", None) for path, leaf in leaves}


def _mismatch(saved: dict, wanted: dict) -> str:
  """How the checkpoint's leaves ``saved`` differ from the state's ``wanted`` ('' if not)."""
  few = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                             else "")
  parts = []
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing:
    parts.append(f"it lacks {few(missing)}")
  if extra:
    parts.append(f"it has {few(extra)}, which this run does not")
  parts += [f"{n} has shape {tuple(saved[n])} in it, {tuple(wanted[n])} here"
            for n in sorted(wanted) if n in saved and None not in (saved[n], wanted[n])
            and tuple(saved[n]) != tuple(wanted[n])][:3]
  return "; ".join(parts)


def restore_latest(manager, state):
  """``state`` restored from the latest checkpoint of ``manager`` (as is if there is none).

  Raises:
    CheckpointError: the checkpoint does not match ``state`` (another ``--solver``, ``--config``
      or model wrote it), or it cannot be read (incomplete or corrupt); the message names the
      checkpoint and what to do.
  """
  if manager is None or manager.latest_step() is None:
    return state
  import orbax.checkpoint as ocp
  directory, step = str(manager.directory), manager.latest_step()
  where = os.path.join(directory, str(step))
  corrupt = (f"it is incomplete or corrupt; {_fresh(directory)} (deleting {where} alone "
             "resumes from the previous checkpoint, if any)")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(os.path.join(where, "default"))
  except Exception as err:  # whatever orbax raises on a damaged checkpoint
    raise CheckpointError(f"cannot restore the checkpoint {where} ({_cause(err)}); "
                          f"{corrupt}.") from err
  tree = getattr(metadata, "item_metadata", None)  # None: unreadable here; restore will tell
  mismatch = tree is not None and _mismatch(_leaf_shapes(getattr(tree, "tree", tree)),
                                            _leaf_shapes(state))
  if mismatch:
    raise CheckpointError(f"the checkpoint {where} does not match this run's training state "
                          f"({mismatch}): it was written with another --solver, --config or "
                          f"model; {_fresh(directory)}.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as err:
    raise CheckpointError(f"cannot restore the checkpoint {where} ({_cause(err)}); "
                          f"{corrupt}.") from err


def resume(manager, state, args, *, run_flags=RUN_FLAGS, write: bool = True):
  """Checks the run's flags against the checkpoints, restores the latest, checks what is left.

  ``run_flags`` and ``write``: see :func:`check_run`.

  Raises:
    CheckpointError: see :func:`check_run` and :func:`restore_latest`; also a checkpoint past
      ``--iterations``, or remaining iterations that ``--chunk`` does not divide.
  """
  if manager is None:
    return state
  directory = str(manager.directory)
  check_run(directory, args, resuming=manager.latest_step() is not None, run_flags=run_flags,
            write=write)
  state = restore_latest(manager, state)
  step = int(state.step)
  if step > args.iterations:
    raise CheckpointError(f"the checkpoint in {directory} is at iteration {step}, past "
                          f"--iterations {args.iterations}; pass --iterations {step} or more to "
                          f"continue it, or {_fresh(directory)}.")
  if (args.iterations - step) % args.chunk:
    raise CheckpointError(f"the checkpoint in {directory} is at iteration {step}: --chunk "
                          f"{args.chunk} does not divide the {args.iterations - step} iterations "
                          f"left to --iterations {args.iterations}; pass a --chunk that does.")
  return state


def latest_metadata(manager) -> dict:
  """The JSON metadata :func:`save` stored with the latest checkpoint ({} if none).

  Checkpoints written before the metadata existed, or whose metadata file is damaged (orbax
  logs it and reads nothing), give {}: the runner then uses the key the flags give and counts
  the training time from this session.
  """
  if manager is None or manager.latest_step() is None:
    return {}
  return dict(manager.metadata(manager.latest_step()).custom_metadata or {})


def save(manager, state, metadata: dict | None = None) -> None:
  """Saves ``state`` at iteration ``state.step`` with ``metadata`` (JSON) beside it.

  Every process calls it; orbax writes in the background (``manager.wait_until_finished()``
  waits) and a later save first waits for the one before.
  """
  if manager is not None:
    import orbax.checkpoint as ocp
    manager.save(int(state.step), args=ocp.args.StandardSave(state),
                 custom_metadata=metadata or {})


def read_checkpoint(path):
  """The arrays of the checkpoint at ``path`` (``<out>/checkpoints/<step>``) as numpy arrays,
  whatever devices and processes wrote it (e.g. to compare runs, or inspect a multi-host run).
  """
  import numpy as np
  import orbax.checkpoint as ocp
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  item = os.path.join(path, "default")
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(item).item_metadata
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          getattr(tree, "tree", tree))
    return jax.tree.map(np.asarray, checkpointer.restore(item, target))
