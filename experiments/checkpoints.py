"""Preemption-safe checkpoints for the experiment scripts (orbax): save, check, resume.

A run directory holds ``run.json`` (the flags that make a run the same run, :data:`RUN_FLAGS`)
and orbax checkpoints; a rerun into the same directory resumes from the latest one, and refuses
(``CheckpointError``, saying what to do) checkpoints of another run, unreadable ones, or ones
that do not match the training state.
"""

from __future__ import annotations

import json
import os
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
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _cause(err: Exception) -> str:
  """``Type: message``, cut to its first line and 200 characters (tensorstore's run long)."""
  text = (str(err).splitlines() or [""])[0]
  return f"{type(err).__name__}: {text[:200]}{' ...' if len(text) > 200 else ''}"


def _fresh(directory) -> str:
  return f"delete {directory} to start afresh, or pass another --out"


def check_run(directory, args, *, resuming: bool) -> None:
  """Records :data:`RUN_FLAGS` in ``directory/run.json``; when resuming they must be unchanged."""
  path = os.path.join(directory, "run.json")
  run = {name: getattr(args, name, None) for name in RUN_FLAGS}
  if resuming and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as err:
      raise CheckpointError(f"{path} is unreadable ({err}); {_fresh(directory)}.") from err
    changed = [f"--{name.replace('_', '-')} {run[name]} (checkpoints: {saved[name]})"
               for name in RUN_FLAGS if name in saved and saved[name] != run[name]]
    if changed:
      raise CheckpointError(f"the checkpoints in {directory} belong to another run: "
                            f"{', '.join(changed)}; rerun with the checkpoints' flags, or "
                            f"{_fresh(directory)}.")
    return
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


def resume(manager, state, args):
  """Checks the run's flags against the checkpoints, restores the latest, checks what is left.

  Raises:
    CheckpointError: see :func:`check_run` and :func:`restore_latest`; also a checkpoint past
      ``--iterations``, or remaining iterations that ``--chunk`` does not divide.
  """
  if manager is None:
    return state
  directory = str(manager.directory)
  check_run(directory, args, resuming=manager.latest_step() is not None)
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


def save(manager, state):
  if manager is not None:
    import orbax.checkpoint as ocp
    manager.save(int(state.step), args=ocp.args.StandardSave(state))
