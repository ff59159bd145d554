"""fewshot.py end to end: trains, checkpoints, resumes bit-identically (a file of its own so the
two test workers can run it beside test_fewshot.py's model tests)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fewshot_experiment_checkpoints_and_resumes(tmp_path, experiment_env):
  script = os.path.join(ROOT, "experiments", "fewshot.py")
  common = [sys.executable, script, "--meta-batch", "2", "--eval-tasks", "10",
            "--checkpoint-every", "2"]
  run = lambda out, iters: subprocess.run(common + ["--iterations", str(iters), "--out", str(out)],
                                          capture_output=True, text=True, timeout=900,
                                          env=experiment_env)
  first = run(tmp_path / "resumed", 2)
  assert first.returncode == 0, first.stderr[-2000:]
  second = run(tmp_path / "resumed", 4)  # resumes from iteration 2
  assert second.returncode == 0, second.stderr[-2000:]
  straight = run(tmp_path / "straight", 4)
  assert straight.returncode == 0, straight.stderr[-2000:]
  lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().split("\n")
           if x]
  assert [x["resumed_from"] for x in lines if x["event"] == "config"] == [0, 2]
  assert [x["iteration"] for x in lines if x["event"] == "train"] == [1, 2, 3, 4]
  resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
  fresh = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert resumed["accuracy"] == pytest.approx(fresh["accuracy"], abs=1e-6)
  assert (tmp_path / "resumed" / "training.png").exists()
  # The run records what --data-dir held, so a resume on other data is refused.
  record = json.loads((tmp_path / "resumed" / "checkpoints" / "run.json").read_text())
  assert record["data_dir_holds"].startswith("train (") and record["context_lr"] == 1.0
