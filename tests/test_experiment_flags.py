"""Experiment flags: config defaults, chunking, Meta-SGD evaluation (the bad-input rows of the
data loaders, flags and checkpoints run in tests/test_bad_inputs.py)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a bare `pytest` puts tests/, not the repository root, on sys.path
  sys.path.insert(0, ROOT)

from tests.bad_inputs_data_cli import CASES, _script  # noqa: E402


def test_table_covers_each_area_with_distinct_inputs():
  assert {c.area for c in CASES} == {"data", "cli", "checkpoints"}
  assert len(CASES) >= 35 and len({c.id for c in CASES}) == len(CASES)


def test_fewshot_resolves_config_defaults_with_is_none():
  args = _script("fewshot").parse_args(["--shots", "5", "--config", "miniimagenet",
                                        "--data-dir", "/data", "--chunk", "30000"])
  assert (args.iterations, args.meta_batch, args.chunk) == (60_000, 2, 30_000)
  args = _script("fewshot").parse_args(["--iterations", "5", "--chunk", "10"])
  assert (args.iterations, args.meta_batch, args.chunk) == (5, 16, 5)  # chunk capped


def test_cosmixture_chunk_larger_than_iterations_trains_them_all():
  """--iterations 5 --chunk 10 used to train nothing and report 5 iterations."""
  args = _script("cosmixture").parse_args(["--iterations", "5", "--chunk", "10"])
  assert args.iterations // args.chunk * args.chunk == 5


def test_fewshot_metasgd_finetunes_with_the_learned_step_sizes():
  """Review A.1 #5: Meta-SGD was evaluated with the scalar config.inner_lr."""
  fewshot = _script("fewshot")
  config = fewshot.CONFIGS["digits"]  # test_steps=3, inner_lr=0.4
  loss = lambda p, batch: 0.5 * jnp.sum((p["w"] - batch) ** 2)
  theta, support = {"w": jnp.zeros(2)}, jnp.ones(2)
  step_size = {"w": jnp.array([0.0, 0.1])}
  meta_params = {"params": theta, "step_size": step_size}
  args = lambda solver: type("Args", (), {"solver": solver})()
  finetune, start = fewshot.make_finetune(args("metasgd"), config, None, loss, meta_params,
                                          ("step_size",))
  assert start is theta
  # Three steps of per-parameter GD on 0.5 (w - 1)^2: w = 1 - (1 - a)^3.
  np.testing.assert_allclose(jax.jit(finetune)(theta, support)["w"], [0.0, 1 - 0.9 ** 3],
                             rtol=1e-6)
  maml, _ = fewshot.make_finetune(args("maml"), config, None, loss, theta, ())
  np.testing.assert_allclose(maml(theta, support)["w"], [1 - 0.6 ** 3] * 2, rtol=1e-6)
