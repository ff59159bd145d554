"""Does iMAML's premise hold on the digits Conv4? Its proximal problem, solved and differentiated.

The implicit meta-gradient ``(I + H/reg)^-1 grad L_query(phi*)`` is the gradient of the query loss
at the proximal solution ``phi* = argmin L_support(phi) + reg/2 |phi - theta|^2`` only where
``phi*`` is a smooth stationary point. This script checks that on the few-shot Conv4 of
``experiments/fewshot.py --config digits`` (5-way 1-shot, BN, ReLU, max-pool; its initialization,
seed 0), in float64, per task:

1. Stationarity: the proximal objective's gradient norm after 5, 50 and 400 GD steps of 0.1
   (relative to its value at ``theta``), and after 3000 more steps of 0.01.
2. The meta-gradient: the implicit one (GMRES to 1e-8, no damping) and the official iMAML one
   (3 CG steps on its damped operator, ``fewshot.official_ridge``) against the gradient
   differentiated through the same 400 GD steps (cosine similarity). Where ``phi*`` is a smooth
   minimum the unrolled gradient converges to the implicit one (cosine 1).

Control: the same measurements with only the linear head adapting (the body fixed), where the
proximal problem is smooth and strongly convex. Writes ``imaml_premise.md`` beside this file.

Run: ``python experiments/benchmarks/imaml_premise.py [--tasks 3]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import metajax  # noqa: E402
from experiments import common, fewshot  # noqa: E402

S = metajax.solvers
STEP, STEPS, SLOW_STEP, SLOW_STEPS = 0.1, 400, 0.01, 3000
REGS = (1.0, 2.0)


def _cosine(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(loss, theta, support, query, reg) -> dict:
  """Stationarity of proximal GD and the meta-gradients' agreement, for one task."""
  x0, unravel = ravel_pytree(theta)
  support_loss = lambda x: loss(unravel(x), support)
  prox_grad = jax.jit(jax.grad(lambda x, t: support_loss(x) + 0.5 * reg * jnp.sum((x - t) ** 2)))

  def descend(x, t, step, steps):
    return jax.lax.fori_loop(0, steps, lambda _, y: y - step * prox_grad(y, t), x)

  norm = lambda x: float(jnp.linalg.norm(prox_grad(x, x0)))
  row = {"grad_0": norm(x0)}
  for k in (5, 50, STEPS):
    row[f"grad_{k}"] = norm(jax.jit(descend, static_argnums=(2, 3))(x0, x0, STEP, k)) / row[
        "grad_0"]
  solved = jax.jit(descend, static_argnums=(2, 3))(x0, x0, STEP, STEPS)
  row["grad_slow"] = norm(jax.jit(descend, static_argnums=(2, 3))(
      solved, x0, SLOW_STEP, SLOW_STEPS)) / row["grad_0"]

  query_loss = lambda x: loss(unravel(x), query)
  unrolled = np.asarray(jax.jit(jax.grad(lambda t: query_loss(descend(t, t, STEP, STEPS))))(x0))
  flat_loss = lambda x, batch: loss(unravel(x), batch)
  adapts = {
      "implicit": S.implicit(flat_loss, reg=reg, optimizer=S.inner_optimizers.gd(STEP),
                             max_steps=STEPS, tol=0.0, throw=False,
                             linear_solver=S.linear_solvers.gmres(maxiter=2000, tol=1e-8)),
      "official": S.implicit(flat_loss, reg=reg, optimizer=S.inner_optimizers.gd(STEP),
                             max_steps=STEPS, tol=0.0, linear_solver=S.linear_solvers.cg(
                                 maxiter=3, tol=0.0, ridge=fewshot.official_ridge(reg))),
  }
  for name, adapt in adapts.items():
    grad = jax.jit(jax.grad(lambda t, adapt=adapt: query_loss(adapt(t, support))))(x0)
    row[f"cos_{name}"] = _cosine(np.asarray(grad), unrolled)
  first_order = np.asarray(jax.grad(query_loss)(solved))
  row["cos_first_order"] = _cosine(first_order, unrolled)
  return row


def summary(rows) -> list[str]:
  """The table's reading, from its numbers."""
  conv = [r for r in rows if not r["model"].startswith("control")]
  head = [r for r in rows if r["model"].startswith("control")]
  span = lambda key, group, fmt: (f"{min(r[key] for r in group):{fmt}} to "
                                  f"{max(r[key] for r in group):{fmt}}")
  return [
      f"Conv4: after {STEPS} GD steps the proximal gradient is still "
      f"{span(f'grad_{STEPS}', conv, '.1%')} of its value at theta, and "
      f"{span('grad_slow', conv, '.1%')} after {SLOW_STEPS} more steps of {SLOW_STEP}: GD "
      "does not converge, and the point it reaches is not the stationary point the implicit "
      "function theorem differentiates. The undamped implicit meta-gradient's "
      f"cosine with the unrolled one is {span('cos_implicit', conv, '+.2f')}; the official "
      "damped operator makes it nearly the first-order gradient (its cosines track the first "
      f"order column). Head only: the gradient falls to {span(f'grad_{STEPS}', head, '.0e')} "
      f"and the implicit cosine is {span('cos_implicit', head, '.4f')}: the measurement is "
      "right where the premise holds.",
      "",
      "This is why iMAML meta-learns little on the digits Conv4 (`fewshot_solvers.md`: after "
      "one meta-iteration it already scores within a point of its final accuracy). "
      "`AdaptInfo.residual` reports the proximal gradient's norm at the adapted parameters, "
      "so a run can check its own inner solves.",
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "imaml_premise.md"))
  args = parser.parse_args(argv)
  config = fewshot.CONFIGS["digits"]
  train = jnp.asarray(metajax.data.load_digits()["train"])
  params, apply_fn = fewshot.make_model(config, config.ways, jax.random.key(0), train.shape[2:])
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  sample = metajax.tasks.episodes(ways=config.ways, shots=1, queries=config.queries,
                                  rotations=config.rotations, dtype=jnp.float64)
  supports, queries = sample(jax.random.key(1), args.tasks, train)
  head_name = "Dense_0"
  head_loss = lambda head, batch: loss({**params, head_name: head}, batch)
  rows = []
  for model, model_loss, theta in (("Conv4, all parameters", loss, params),
                                   ("control: linear head only", head_loss, params[head_name])):
    for reg in REGS:
      for task in range(args.tasks):
        support, query = jax.tree.map(lambda x, task=task: x[task], (supports, queries))
        rows.append({"model": model, "reg": reg, "task": task,
                     **measure(model_loss, theta, support, query, reg)})
        print(rows[-1], flush=True)
  env = common.environment()
  lines = [
      "# iMAML's premise on the digits Conv4: is the proximal solution a smooth minimum?",
      "",
      f"`fewshot.py --config digits` Conv4 at its initialization (seed 0), float64, "
      f"{args.tasks} 5-way 1-shot tasks per row. |grad| columns: the proximal objective's "
      f"gradient norm after k GD steps of {STEP}, relative to its value at theta, and after "
      f"{SLOW_STEPS} more steps of {SLOW_STEP}. Cosine columns: each meta-gradient against the "
      f"one differentiated through the same {STEPS} GD steps (1 where the solution is a smooth "
      "minimum): implicit = GMRES to 1e-8 without damping; official = iMAML's code, 3 CG "
      "steps on its damped operator; first order = the query gradient at the solution.",
      "",
      f"Machine: {env['machine']}, {env['cpus']} CPUs, backend {env['backend']}; "
      f"jax {env['jax']}.",
      "",
      f"| adapted | reg | task | \\|grad\\| at theta | after 5 | after 50 | after {STEPS} | "
      f"+{SLOW_STEPS} of {SLOW_STEP} | cos implicit | cos official | cos first order |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['reg']:g} | {r['task']} | {r['grad_0']:.3g} | {r['grad_5']:.2e} | "
        f"{r['grad_50']:.2e} | {r[f'grad_{STEPS}']:.2e} | {r['grad_slow']:.2e} | "
        f"{r['cos_implicit']:+.3f} | {r['cos_official']:+.3f} | {r['cos_first_order']:+.3f} |")
  lines += ["", *summary(rows)]
  text = "\n".join(lines) + "\n"
  common.write_report(args.out, text)


if __name__ == "__main__":
  main()
