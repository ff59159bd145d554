"""The experiment scripts across processes (jax.distributed on localhost, CPU collectives) and
their device flags.

Two processes with 2 CPU devices each train like one process with 4; only process 0 writes
the logs and results, and both save the orbax checkpoints.
"""

import argparse
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a bare `pytest` puts tests/, not the repository root, on sys.path
  sys.path.insert(0, ROOT)

from experiments import checkpoints, common  # noqa: E402

SINUSOID = os.path.join(ROOT, "experiments", "sinusoid.py")
TINY = ["--iterations", "20", "--chunk", "5", "--checkpoint-every", "10", "--meta-batch", "4",
        "--shots", "3", "--eval-tasks", "2", "--eval-queries", "3", "--eval-steps", "1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(experiment_env, devices: int) -> dict:
  return {**experiment_env, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _two_processes(flags, env, timeout=240):
  """Runs sinusoid.py as processes 0 and 1 of a 2-process job; their (returncode, stdout,
  stderr)."""
  address = f"localhost:{_free_port()}"
  processes = [subprocess.Popen([sys.executable, SINUSOID, *flags, "--coordinator", address,
                                 "--num-processes", "2", "--process-id", str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()


def _meta_params(out):
  return checkpoints.read_checkpoint(out / "checkpoints" / "20")["meta_params"]


def test_two_processes_train_like_one_process_with_four_devices(tmp_path, experiment_env):
  two, one = tmp_path / "two", tmp_path / "one"
  runs = _two_processes([*TINY, "--out", str(two)], _env(experiment_env, 2))
  for returncode, _, stderr in runs:
    assert returncode == 0, stderr[-2000:]
  assert "| 1 |" in runs[0][1] and "| 1 |" not in runs[1][1]  # the results table: process 0
  single = subprocess.run([sys.executable, SINUSOID, *TINY, "--devices", "4", "--out", str(one)],
                          capture_output=True, text=True, timeout=240,
                          env=_env(experiment_env, 4))
  assert single.returncode == 0, single.stderr[-2000:]
  got, want = _meta_params(two), _meta_params(one)  # both processes saved; orbax joined them
  got, want = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (got, want))
  assert got.dtype == np.float32 and got.shape == want.shape == (40 + 40 + 40 * 40 + 40 + 40 + 1,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  assert [r["event"] for r in records] == ["config", *["train"] * 4, "eval"]  # process 0 only
  assert records[0]["processes"] == 2 and records[0]["devices"] == 4
  assert json.loads((two / "results.json").read_text())["iterations"] == 20


def test_two_processes_refuse_devices_that_leave_some_out(tmp_path, experiment_env):
  runs = _two_processes([*TINY, "--devices", "2", "--out", str(tmp_path)],
                        _env(experiment_env, 2))
  for returncode, _, stderr in runs:
    assert returncode == 2
    assert ("sinusoid.py: error: --devices 2 must be all 4 devices of the 2 processes (the mesh "
            "spans every process); leave --devices out.") in stderr


def _device_args(*argv, meta_batch=8):
  parser = argparse.ArgumentParser(prog="demo")
  parser.add_argument("--meta-batch", type=int, default=meta_batch)
  common.add_device_flags(parser)
  args = parser.parse_args(list(argv))
  common.setup_devices(parser, args)
  return args


def test_devices_default_to_one_on_cpu_and_build_a_task_mesh():
  args = _device_args()
  assert args.devices == 1 and common.task_mesh(args) is None  # CPU, one process
  mesh = common.task_mesh(_device_args("--devices", "4"))
  assert mesh.axis_names == ("tasks",) and mesh.devices.size == 4
  assert common.is_primary()


def test_process_flags_come_from_the_environment(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  parser = argparse.ArgumentParser(prog="demo")
  common.add_device_flags(parser)
  args = parser.parse_args(["--process-id", "5"])  # a flag wins over its variable
  common.check_process_flags(parser, args)
  assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 8, 5)
  for var in common.PROCESS_ENV.values():
    monkeypatch.delenv(var)
  args = parser.parse_args([])
  common.check_process_flags(parser, args)  # neither flags nor variables: one process
  assert (args.coordinator, args.num_processes, args.process_id) == (None, None, None)
