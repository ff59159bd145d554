"""experiments/runner.py: the experiment scripts' training loop survives SIGKILL and SIGTERM.

A run killed at random moments and rerun into the same --out ends bit-identical to a run never
interrupted (CPU); a save killed midway is never read; SIGTERM saves and exits with status 143.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a bare `pytest` puts tests/, not the repository root, on sys.path
  sys.path.insert(0, ROOT)

import metajax  # noqa: E402
from experiments import checkpoints, runner  # noqa: E402

SINUSOID = os.path.join(ROOT, "experiments", "sinusoid.py")
# 120 chunks of 2 meta-iterations (~20 ms each on 2 cores). Each session is killed by progress,
# not by a timer: after 1-6 chunks of its own and then a random fraction of a chunk, so the 10
# kills end near iteration 40 of 240 whatever the machine's load.
TINY = ["--iterations", "240", "--chunk", "2", "--meta-batch", "2", "--shots", "3",
        "--eval-tasks", "2", "--eval-queries", "3", "--eval-steps", "1"]
OFTEN = ["--checkpoint-every", "4"]
TIMING = ("seconds", "train_seconds")


def _records(out):
  """The metrics log's train and eval records without their timings (config records mark
  restarts and differ by ``resumed_from``)."""
  lines = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
  return [{k: v for k, v in r.items() if k not in TIMING} for r in lines
          if r["event"] != "config"]


def _steps(out):
  """The iterations of the complete (finalized) checkpoints in ``out``."""
  directory = out / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.exists()) else []


def _final_state(out):
  """The latest checkpoint's arrays."""
  return checkpoints.read_checkpoint(out / "checkpoints" / str(_steps(out)[-1]))


def _events(out):
  path = out / "metrics.jsonl"
  return [json.loads(line)["event"] for line in path.read_text().splitlines()
          if line.endswith("}")] if path.exists() else []


def _start(out, env, log):
  """A session of the run in ``out`` and the number of sessions its log will show before it
  (none when there is no checkpoint yet: a run starting from iteration 0 empties the log)."""
  sessions = _events(out).count("config") if _steps(out) else 0
  return subprocess.Popen([sys.executable, SINUSOID, *TINY, *OFTEN, "--out", str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=open(log, "w")), sessions


def _wait_for_training(process, sessions, out, records=1, timeout=120.0):
  """Until the new session (after its config record) has logged ``records`` train records."""
  deadline = time.time() + timeout
  while True:
    events = _events(out)
    if events.count("config") > sessions:
      mine = events[len(events) - events[::-1].index("config"):]
      if mine.count("train") >= records:
        return
    assert process.poll() is None, f"exited with {process.returncode} before training"
    assert time.time() < deadline, "no train record"
    time.sleep(0.005)


def test_killed_and_preempted_runs_resume_bit_identically(tmp_path, experiment_env):
  straight = tmp_path / "straight"  # one checkpoint, at the end: how often is no run flag
  done = subprocess.run([sys.executable, SINUSOID, *TINY, "--out", str(straight)],
                        capture_output=True, text=True, timeout=300, env=experiment_env)
  assert done.returncode == 0, done.stderr[-2000:]

  out, rng, resumed = tmp_path / "interrupted", random.Random(12), []
  for kill in range(5):  # SIGKILL at a random moment of each session's training
    process, sessions = _start(out, experiment_env, tmp_path / f"session{kill}.log")
    _wait_for_training(process, sessions, out, records=rng.randint(1, 6))
    time.sleep(rng.uniform(0.0, 0.03))
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL, "finished before it was killed"
    resumed.append(_steps(out)[-1] if _steps(out) else 0)

  process, sessions = _start(out, experiment_env, tmp_path / "sigterm.log")  # preemption
  _wait_for_training(process, sessions, out)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == runner.PREEMPTED == 143
  stderr = (tmp_path / "sigterm.log").read_text()
  stopped = _records(out)[-1]["iteration"]
  assert (f"SIGTERM: stopped at iteration {stopped} with a checkpoint in {out}/checkpoints; "
          "rerun the same command to resume.") in stderr
  assert _steps(out)[-1] == stopped < 240  # saved at the chunk it stopped after

  done = subprocess.run([sys.executable, SINUSOID, *TINY, *OFTEN, "--out", str(out)],
                        capture_output=True, text=True, timeout=300, env=experiment_env)
  assert done.returncode == 0, done.stderr[-2000:]
  # Every rerun resumed from the latest complete checkpoint the kill left (a rerun from 0, a kill
  # before the first checkpoint, starts the log afresh).
  starts = [json.loads(line)["resumed_from"] for line in
            (out / "metrics.jsonl").read_text().splitlines() if '"config"' in line]
  sessions = [0, *resumed, stopped]
  fresh = max(i for i, start in enumerate(sessions) if start == 0)
  assert starts == sessions[fresh:] and resumed == sorted(resumed) and resumed[-1] > 0
  assert _records(out) == _records(straight)  # no duplicate or missing records, same losses
  final, expected = _final_state(out), _final_state(straight)
  assert int(final["step"]) == 240
  jax.tree.map(np.testing.assert_array_equal, final, expected)  # bit-identical
  assert json.loads((out / "results.json").read_text())["rows"] == json.loads(
      (straight / "results.json").read_text())["rows"]


def _state(scale=1.0):
  optimizer = optax.adam(1e-3)
  return metajax.meta.init_train_state({"w": jnp.full((3,), scale, jnp.float32)}, optimizer)


def test_a_save_killed_midway_is_never_restored_and_is_cleaned_up(tmp_path):
  """orbax writes <step>.orbax-checkpoint-tmp and renames it when complete: the leftover
  of a killed save is ignored, and the next manager deletes it."""
  directory = tmp_path / "checkpoints"
  manager = checkpoints.checkpoint_manager(directory)
  checkpoints.save(manager, _state(2.0)._replace(step=jnp.int32(2)), {"seconds": 1.5})
  manager.wait_until_finished()
  manager.close()
  partial = directory / "4.orbax-checkpoint-tmp"  # a copy of 2 with its arrays missing
  shutil.copytree(directory / "2", partial)
  shutil.rmtree(partial / "default" / "d")
  manager = checkpoints.checkpoint_manager(directory)
  assert manager.latest_step() == 2 and not partial.exists()
  restored = checkpoints.restore_latest(manager, _state())
  assert int(restored.step) == 2 and float(restored.meta_params["w"][0]) == 2.0
  assert checkpoints.latest_metadata(manager) == {"seconds": 1.5}
  manager.close()


def test_truncate_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"event": "config", "resumed_from": 0}, {"event": "train", "iteration": 2},
           {"event": "train", "iteration": 4}, {"event": "train", "iteration": 6},
           {"event": "eval", "mse": 1.0}]
  text = "".join(json.dumps(line) + "\n" for line in lines)
  for iteration, kept in ((4, 3), (6, 4), (5, 3), (0, 0)):
    path.write_text(text)
    runner.truncate_log(str(path), iteration)
    assert path.read_text() == "".join(json.dumps(line) + "\n" for line in lines[:kept])
  path.write_text(text[:text.index('{"event": "train", "iteration": 6}') + 20])  # a kill cut it
  runner.truncate_log(str(path), 6)
  assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
  path.write_text(json.dumps(lines[0]) + "\n[1, 2]\n" + json.dumps(lines[1]) + "\n")
  runner.truncate_log(str(path), 6)
  assert path.read_text() == json.dumps(lines[0]) + "\n"
  runner.truncate_log(str(tmp_path / "missing.jsonl"), 2)  # nothing to cut
  assert not (tmp_path / "missing.jsonl").exists()


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed from the main thread only")
  before = signal.getsignal(signal.SIGTERM)
  with runner._Preemption() as preemption:
    assert signal.getsignal(signal.SIGTERM) == preemption._handle  # or the kill would end pytest
    assert not preemption.agreed()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not preemption.requested and time.time() < deadline:
      time.sleep(0.01)  # the handler runs between bytecodes of the main thread
    assert preemption.agreed()
  assert signal.getsignal(signal.SIGTERM) is before


def test_replicate_puts_state_key_and_data_on_every_device_of_the_mesh():
  mesh = metajax.parallel.task_mesh()
  key = jax.random.key(7)
  state, placed_key, (images,) = metajax.parallel.put_replicated(
      (_state(), key, (np.arange(12, dtype=np.uint8).reshape(3, 4),)), mesh)
  for leaf in [*jax.tree.leaves(state), placed_key, images]:
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(
        jax.devices())
  assert images.dtype == np.uint8 and state.step.dtype == jnp.int32
  np.testing.assert_array_equal(jax.random.key_data(placed_key), jax.random.key_data(key))
  assert jax.random.key_impl(placed_key) == jax.random.key_impl(key)


@pytest.mark.parametrize("metadata", [{}, {"key": [0, 9], "key_impl": "threefry2x32"}])
def test_the_checkpoint_key_is_used_when_saved(metadata):
  key = jax.random.key(3)
  restored = runner._restored_key(metadata, key)
  want = jax.random.key(9) if metadata else key
  np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(want))
  assert runner._key_metadata(key) == {"key": [0, 3], "key_impl": "threefry2x32"}


def test_sigterm_without_orbax_says_nothing_was_saved(capsys):
  with pytest.raises(SystemExit) as stopped:
    runner._stop(None, None, None, 12, "runs/x")
  assert stopped.value.code == runner.PREEMPTED
  assert ("SIGTERM: stopped at iteration 12 without a checkpoint (orbax-checkpoint is not "
          "installed).") in capsys.readouterr().err


def test_amaml_grid_resumes_at_its_first_unfinished_cell(tmp_path):
  """amaml.py's grid writes each finished cell atomically; a rerun with the same flags reuses it
  (another flag, or a file cut short by a kill, runs the cell again)."""
  from experiments import amaml
  args = amaml.parse_args(["--out", str(tmp_path), "--iterations", "2", "--chunk", "1"])
  calls = []
  run = lambda: calls.append(1) or {"solver": "maml", "rmse": 0.5}
  assert amaml.cell(args, "maml", 10, run) == {"solver": "maml", "rmse": 0.5}
  assert amaml.cell(args, "maml", 10, lambda: pytest.fail("a finished cell ran again")) == {
      "solver": "maml", "rmse": 0.5}
  other = amaml.parse_args(["--out", str(tmp_path), "--iterations", "2", "--chunk", "1",
                            "--seed", "1"])
  amaml.cell(other, "maml", 10, run)
  path = tmp_path / "cells" / "maml-10.json"
  path.write_text(path.read_text()[:10])  # cut short
  amaml.cell(other, "maml", 10, run)
  assert len(calls) == 3 and not list((tmp_path / "cells").glob("*.tmp"))
