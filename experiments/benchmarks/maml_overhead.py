"""metajax's sinusoid MAML meta-step versus the same step written by hand in plain JAX.

Workload: MLP 1-40-40-1 ReLU, meta-batch 25, 10-shot support and query, K=5 inner
steps of size 0.01, full second order, Adam meta-update. Both programs are jitted
and timed alternately in one process (one meta-step per call, after warm-up);
the table reports the median and interquartile range of each and the ratio of
medians. Writes ``maml_overhead.md`` beside this file.

Run: ``python experiments/benchmarks/maml_overhead.py [--rounds 2000]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import metajax  # noqa: E402

STEPS, STEP_SIZE, META_BATCH, SHOTS, META_LR = 5, 0.01, 25, 10, 1e-3


def metajax_step(params):
  _, apply_fn = metajax.models.make_mlp(jax.random.key(0))
  loss = metajax.meta.mse_loss(apply_fn)
  adapt = metajax.solvers.unrolled(loss, steps=STEPS, step_size=STEP_SIZE)
  optimizer = optax.adam(META_LR)
  step = metajax.meta.make_train_step(
      jax.value_and_grad(metajax.meta.meta_objective(adapt, loss)), optimizer,
      metajax.tasks.sinusoid(num_support=SHOTS, num_query=SHOTS), meta_batch_size=META_BATCH)
  return step, metajax.meta.init_train_state(params, optimizer)


def handwritten_step(params):
  """Plain JAX: hand-written MLP, sampler, inner loop and Adam."""
  def mlp(p, x):
    for name in ("Dense_0", "Dense_1"):
      x = jax.nn.relu(x @ p[name]["kernel"] + p[name]["bias"])
    return x @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]

  def loss(p, x, y):
    return jnp.mean((mlp(p, x) - y) ** 2)

  def sample(key):
    ka, kp, kx = jax.random.split(key, 3)
    amplitude = jax.random.uniform(ka, (META_BATCH, 1, 1), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(kp, (META_BATCH, 1, 1), minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(kx, (META_BATCH, 2 * SHOTS, 1), minval=-5.0, maxval=5.0)
    y = amplitude * jnp.sin(x - phase)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]

  def task_loss(p, xs, ys, xq, yq):
    for _ in range(STEPS):
      g = jax.grad(loss)(p, xs, ys)
      p = jax.tree.map(lambda w, gw: w - STEP_SIZE * gw, p, g)
    return loss(p, xq, yq)

  def meta_loss(p, batch):
    return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, *batch))

  @jax.jit
  def step(state, key):
    p, m, v, t = state
    key = jax.random.fold_in(key, t)
    value, g = jax.value_and_grad(meta_loss)(p, sample(key))
    t = t + 1
    m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
    v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
    correction = jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
    p = jax.tree.map(lambda w, a, b: w - META_LR * correction * a / (jnp.sqrt(b) + 1e-8), p, m, v)
    return (p, m, v, t), value

  zeros = jax.tree.map(jnp.zeros_like, params)
  return step, (params, zeros, zeros, jnp.zeros((), jnp.int32))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2000)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "maml_overhead.md"))
  args = parser.parse_args(argv)
  params, _ = metajax.models.make_mlp(jax.random.key(0))
  programs = {"metajax": metajax_step(params), "hand-written JAX": handwritten_step(params)}
  states = {name: state for name, (_, state) in programs.items()}
  key = jax.random.key(1)
  for name, (step, _) in programs.items():  # compile + warm up
    for _ in range(20):
      states[name], _ = jax.block_until_ready(step(states[name], key))
  times = {name: [] for name in programs}
  for _ in range(args.rounds):
    for name, (step, _) in programs.items():  # alternate A, B, A, B, ...
      start = time.perf_counter()
      states[name], _ = jax.block_until_ready(step(states[name], key))
      times[name].append(time.perf_counter() - start)
  rows = []
  for name, ts in times.items():
    q1, med, q3 = np.percentile(np.asarray(ts) * 1e6, [25, 50, 75])
    rows.append((name, med, q1, q3))
  ratio = rows[0][1] / rows[1][1]
  env = common.environment()
  lines = [
      "# Sinusoid MAML meta-step: metajax vs hand-written JAX",
      "",
      f"Workload: MLP 1-40-40-1, meta-batch {META_BATCH}, {SHOTS}-shot, K={STEPS} inner steps, "
      "second order, Adam. One meta-step per call, timed alternately in one process, "
      f"{args.rounds} rounds after 20 warm-up calls.",
      "",
      f"Machine: {env['machine']}, {env['cpus']} CPUs, backend {env['backend']} "
      f"({env['device']}); Python {env['python']}, jax {env['jax']}, optax {env['optax']}.",
      "",
      "| program | median (us) | IQR (us) |",
      "|---|---|---|",
      *[f"| {n} | {m:.1f} | {a:.1f} - {b:.1f} |" for n, m, a, b in rows],
      "",
      f"**Ratio of medians metajax / hand-written: {ratio:.3f}** (target <= 1.10).",
      "",
  ]
  text = "\n".join(lines)
  common.write_report(args.out, text)
  return ratio


if __name__ == "__main__":
  main()
