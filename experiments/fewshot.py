"""Few-shot classification with the papers' protocols: digits (default), Omniglot, miniImageNet.

Solvers: MAML, first-order MAML, Meta-SGD, Reptile, iMAML and the adjoint
solver (``--solver``). Named configs carry the papers' hyperparameters
(``--config``): MAML Omniglot 5-way (1 step alpha=0.4, meta-batch 32, 3 steps
at test), 20-way (5 steps alpha=0.1, meta-batch 16), miniImageNet (5 steps
alpha=0.01, 10 at test, meta-batch 4 / 2); iMAML reg=2, 16 inner GD steps, 5 CG
steps on the official code's damped operator (``official_ridge``), tested as its
paper tests (reg 0: plain GD). The adjoint trains on the flow to ``adjoint_t1``
and tests on the flow to MAML's test horizon. Evaluation adapts on 600
test tasks and reports accuracy with 95% confidence intervals. ``--baseline``
also trains the same network on all meta-train classes and fine-tunes it on
each test task (non-meta-learned).

Checkpoints (orbax) are written every ``--checkpoint-every`` iterations, at the
end and on SIGTERM (which then exits with status 143), and a rerun with the same
``--out`` resumes from the latest one (``experiments/runner.py``); iteration ``i``
always samples its tasks from ``fold_in(key, i)``, so a resumed run is the
same run. ``checkpoints/run.json`` records the flags that define the run
(``--config --solver --shots --meta-batch --seed --mlti``): a rerun with other values
into the same ``--out`` is refused, as is a checkpoint that is unreadable or
does not match the model. Metrics go to ``metrics.jsonl``; plots to ``training.png``.
``--devices`` splits each meta-batch over a device mesh, ``--coordinator --num-processes
--process-id`` over several processes (process 0 writes the outputs).

Solvers also include the second-wave methods of ``experiments/recipes.py`` (``anil``, ``boil``,
``mamlpp``, ``cavia``, ``ml3``) and ``--mlti ALPHA`` trains any of them on task interpolations.

Run: ``python experiments/fewshot.py [--config digits] [--solver maml] [--shots 1] [--baseline]``.
Omniglot: ``--config omniglot-5way --data-dir DIR`` (see metajax.data.omniglot for the files).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a file: the repository root holds experiments/
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metajax  # noqa: E402
from experiments import common, recipes, runner  # noqa: E402
from experiments.checkpoints import (  # noqa: E402, F401  (the checkpoint API, also fewshot.*)
  RUN_FLAGS,
  CheckpointError,
  check_run,
  checkpoint_manager,
  restore_latest,
  resume,
  save,
)


@dataclasses.dataclass(frozen=True)
class Config:
  dataset: str
  ways: int
  shots: int = 1
  queries: int = 15
  filters: int = 64
  blocks: int = 4
  strided: bool = False
  rotations: bool = False
  inner_steps: int = 1
  inner_lr: float = 0.4
  test_steps: int = 3
  meta_batch: int = 32
  meta_batch_5shot: int | None = None
  meta_lr: float = 1e-3
  iterations: int = 60_000
  imaml_inner_steps: int = 16
  imaml_inner_lr: float = 0.1
  imaml_reg: float = 2.0
  imaml_cg_steps: int = 5
  imaml_test_steps: int = 16  # iMAML's test protocol: reg 0, this many GD steps of imaml_inner_lr
  adjoint_t1: float | None = None  # None: inner_steps * inner_lr
  adjoint_steps: int = 10  # the adjoint's fixed Euler grid (its default)
  pretrain_steps: int = 2000


CONFIGS = {
    # Real data shipped with scikit-learn: classes 0-4 (+ rotations) meta-train, 5-9 meta-test.
    # MAML's Omniglot 5-way protocol (1 step alpha=0.4, 3 at test), meta-batch 16. iMAML and
    # the adjoint at <= 3x MAML's time per meta-iteration (benchmarks/fewshot_solvers.md):
    # iMAML 5 GD steps of 0.2 on reg 1, 3 CG steps; the adjoint 2 Euler steps to t1 = 0.8.
    # iMAML meta-learns little here: GD does not reach a stationary point of this Conv4's
    # proximal problem, which its implicit gradient assumes (benchmarks/imaml_premise.md).
    "digits": Config("digits", ways=5, queries=10, filters=32, blocks=3, rotations=True,
                     inner_steps=1, inner_lr=0.4, test_steps=3, meta_batch=16,
                     iterations=1000, imaml_inner_steps=5, imaml_inner_lr=0.2, imaml_reg=1.0,
                     imaml_cg_steps=3, imaml_test_steps=12, adjoint_t1=0.8, adjoint_steps=2,
                     pretrain_steps=1000),
    "omniglot-5way": Config("omniglot", ways=5, strided=True, rotations=True, inner_steps=1,
                            inner_lr=0.4, test_steps=3, meta_batch=32),
    "omniglot-20way": Config("omniglot", ways=20, strided=True, rotations=True, inner_steps=5,
                             inner_lr=0.1, test_steps=5, meta_batch=16),
    "miniimagenet": Config("miniimagenet", ways=5, filters=32, inner_steps=5, inner_lr=0.01,
                           test_steps=10, meta_batch=4, meta_batch_5shot=2, imaml_inner_lr=0.01),
}


def parse_args(argv=None):
  """Parsed and checked flags; ``--iterations`` and ``--meta-batch`` default to the config's."""
  p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                              description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="digits")
  p.add_argument("--solver", choices=recipes.SOLVERS, default="maml")
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--iterations", type=int, default=None, help="default: the config's")
  p.add_argument("--meta-batch", type=int, default=None, help="default: the config's")
  p.add_argument("--chunk", type=int, default=1,
                 help="meta-iterations fused per jitted call, capped at --iterations, which it "
                      "must divide (convs on CPU: keep 1, a rolled loop around convolutions is "
                      "~20x slower on XLA:CPU)")
  p.add_argument("--eval-tasks", type=int, default=600)
  runner.add_flags(p, checkpoint_every=500)
  p.add_argument("--baseline", action="store_true", help="also run the pretrain+finetune baseline")
  p.add_argument("--data-dir", default=None, help="Omniglot zips / miniImageNet root")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="default: runs/<config>-<solver>-<shots>shot")
  recipes.add_method_flags(p, context_size=100)
  common.add_device_flags(p)
  args = p.parse_args(argv)
  recipes.check_method_flags(p, args)
  common.check_flags(p, args, positive_int=("--shots", "--iterations", "--meta-batch", "--chunk",
                                            "--checkpoint-every"),
                     int_range={"--eval-tasks": (2, None), "--seed": common.SEED_RANGE})
  config = CONFIGS[args.config]
  if args.iterations is None:
    args.iterations = config.iterations
  if args.meta_batch is None:
    five_shot = args.shots > 1 and config.meta_batch_5shot is not None
    args.meta_batch = config.meta_batch_5shot if five_shot else config.meta_batch
  common.check_chunk(p, args)
  if config.dataset == "digits" and args.data_dir is not None:
    p.error("--data-dir is not used by --config digits (scikit-learn ships the data).")
  if config.dataset != "digits" and args.data_dir is None:
    p.error(f"--config {args.config} needs --data-dir (nothing is downloaded; see "
            f"metajax.data.{config.dataset}).")
  common.setup_devices(p, args)
  return args


# What makes a fewshot run the same run (run.json): the checkpoint flags, the method's, and what
# --data-dir holds (its arrays' shapes and a digest of each class's first image), so a resume
# on other data is refused while the same data at another path resumes.
FEWSHOT_RUN_FLAGS = (*RUN_FLAGS, "context_size", "context_lr", "data_dir_holds")


def data_fingerprint(data) -> str:
  """``train (shape), test (shape), sha1 ...`` of the splits (the first image of each class)."""
  digest = hashlib.sha1()
  for split in ("train", "test"):
    digest.update(np.ascontiguousarray(np.asarray(data[split])[:, 0]).tobytes())
  return (f"train {tuple(np.shape(data['train']))}, test {tuple(np.shape(data['test']))}, "
          f"sha1 {digest.hexdigest()[:12]}")


def load_data(config: Config, data_dir):
  if config.dataset == "digits":
    return metajax.data.load_digits()
  if config.dataset == "omniglot":
    return metajax.data.load_omniglot_zips(data_dir)
  data = metajax.data.load_miniimagenet(data_dir, splits=("train", "test"))
  return data


def check_data(args, config: Config, data) -> None:
  """Raises ``SystemExit`` naming the flag when the episodes do not fit the loaded data."""
  need = args.shots + config.queries
  for split, images in data.items():
    classes, per_class = images.shape[:2]
    if per_class < need:
      raise SystemExit(f"fewshot.py: error: --shots {args.shots} plus the {config.queries} "
                       f"queries of --config {args.config} need {need} examples per class; the "
                       f"{split} split has {per_class}.")
    available = classes * (4 if config.rotations and split == "train" else 1)
    if available < config.ways:
      raise SystemExit(f"fewshot.py: error: --config {args.config} draws {config.ways} classes "
                       f"per task; the {split} split has {available}.")


def official_ridge(reg: float, cg_damping: float = 1.0, lam_damping: float = 10.0) -> float:
  """The ``ridge`` at which ``cg`` solves iMAML's official operator.

  The official code (``imaml_dev``) runs CG on ``(1 + cg_damping) v + H v / (reg + lam_damping)``
  (``lam_damping`` hard-coded to 10). Times ``(reg + lam_damping) / reg`` that is ``(I + H / reg +
  ridge I) v`` with the ridge returned here, and CG from zero is invariant to that scale (Adam,
  the outer optimizer, nearly so): reg=2 gives ridge 11, not ``cg_damping`` alone.

  Example:
    >>> official_ridge(2.0)
    11.0
  """
  return (1.0 + cg_damping) * (reg + lam_damping) / reg - 1.0


def solver_args(args, config: Config):
  """The flags common.make_adapt and recipes.build read, filled from the config. MAML++ trains
  with the test-time number of steps (as its paper does)."""
  imaml = args.solver == "imaml"
  steps = {"imaml": config.imaml_inner_steps, "mamlpp": config.test_steps}.get(
      args.solver, config.inner_steps)
  return argparse.Namespace(
      solver=args.solver, reg=config.imaml_reg, cg_steps=config.imaml_cg_steps,
      cg_ridge=official_ridge(config.imaml_reg), t1=config.adjoint_t1,
      ode_steps=config.adjoint_steps, inner_steps=steps,
      inner_lr=config.imaml_inner_lr if imaml else config.inner_lr,
      meta_lr=config.meta_lr, iterations=getattr(args, "iterations", config.iterations),
      context_size=getattr(args, "context_size", 100),
      context_lr=getattr(args, "context_lr", 1.0))


def make_model(config: Config, num_classes: int, key, image_shape, context: int = 0):
  module = metajax.models.Conv4(num_classes, filters=config.filters, strided=config.strided,
                                blocks=config.blocks, context=context)
  return metajax.models.init_model(module, key, image_shape)


def pretrain_baseline(config, train_images, image_shape, key, test_tasks, batch_size=64):
  """Trains the network on all meta-train classes, then fine-tunes a fresh head per test task."""
  num_classes = train_images.shape[0] * (4 if config.rotations else 1)
  params, apply_fn = make_model(config, num_classes, key, image_shape)
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  sample = metajax.tasks.class_batches(batch_size=batch_size, rotations=config.rotations)
  optimizer = optax.adam(1e-3)

  @jax.jit  # one step per call: a rolled loop around convolutions is slow on XLA:CPU
  def train_step(params, opt_state, key):
    grads = jax.grad(loss)(params, sample(key, train_images))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for i in range(config.pretrain_steps):
    params, opt_state = train_step(params, opt_state, jax.random.fold_in(key, i))
  head = params["Dense_0"]["kernel"].shape[0]
  params = {**params, "Dense_0": {"kernel": jnp.zeros((head, config.ways)),
                                  "bias": jnp.zeros((config.ways,))}}
  _, fine_apply = make_model(config, config.ways, key, image_shape)
  fine_loss = metajax.meta.cross_entropy_loss(fine_apply)
  finetune = metajax.solvers.unrolled(fine_loss, steps=config.test_steps, step_size=config.inner_lr)
  return metajax.meta.evaluate_per_task(finetune, metajax.meta.accuracy(fine_apply), params,
                                        test_tasks, chunk=eval_chunk(config))


def eval_chunk(config: Config, solver: str = "maml") -> int:
  """Tasks per jitted evaluation call. For convs on CPU tasks and steps are both unrolled, so
  compile size grows with tasks x steps: keep that product near 48 (iMAML tests with
  ``imaml_test_steps``)."""
  return max(1, 48 // (config.imaml_test_steps if solver == "imaml" else config.test_steps))


def make_finetune(args, config: Config, loss_fn, meta_params, learn):
  """The test-time adaptation and the initialization it starts from: ``(finetune, theta)``.

  iMAML tests as its paper does: no proximal term, ``config.imaml_test_steps`` GD steps of
  ``config.imaml_inner_lr``. The adjoint integrates the gradient flow to MAML's test horizon
  ``config.test_steps * config.inner_lr`` on a grid of ``config.test_steps`` steps. The others
  follow MAML's protocol, ``config.test_steps`` gradient steps of ``config.inner_lr``; Meta-SGD
  takes them with its learned per-parameter step sizes ``meta_params['step_size']``.
  """
  theta = meta_params["params"] if learn else meta_params
  if args.solver == "imaml":
    return metajax.solvers.unrolled(loss_fn, steps=config.imaml_test_steps,
                                    step_size=config.imaml_inner_lr), theta
  if args.solver == "adjoint":
    return metajax.solvers.adjoint(loss_fn, t1=config.test_steps * config.inner_lr,
                                   steps=config.test_steps), theta
  if args.solver != "metasgd":
    return metajax.solvers.unrolled(loss_fn, steps=config.test_steps,
                                    step_size=config.inner_lr), theta
  steps = metajax.solvers.unrolled(loss_fn, steps=config.test_steps)
  step_size = meta_params["step_size"]
  return (lambda params, support: steps(params, support, step_size=step_size)), theta


def main(argv=None):
  args = parse_args(argv)
  config = CONFIGS[args.config]
  meta_batch, iterations = args.meta_batch, args.iterations  # resolved by parse_args
  out = args.out if args.out is not None else os.path.join(
      "runs", f"{args.config}-{args.solver}-{args.shots}shot")
  data = load_data(config, args.data_dir)
  check_data(args, config, data)
  args.data_dir_holds = data_fingerprint(data)
  train_images, test_images = jax.device_put(data["train"]), jax.device_put(data["test"])
  image_shape = train_images.shape[2:]
  key_init, key_train, key_eval, key_base = jax.random.split(jax.random.key(args.seed), 4)

  sargs = solver_args(args, config)
  recipe = recipes.build(
      sargs, lambda context: make_model(config, config.ways, key_init, image_shape, context),
      metajax.meta.cross_entropy_loss, jax.random.fold_in(key_init, 1), outputs=config.ways,
      classification=True)
  learn, loss_fn, apply_fn = recipe.learn, recipe.loss_fn, recipe.apply_fn
  optimizer = common.outer_optimizer(sargs)
  sample = metajax.tasks.episodes(ways=config.ways, shots=args.shots, queries=config.queries,
                                  rotations=config.rotations)
  if args.mlti is not None:
    sample = metajax.tasks.interpolate(sample, alpha=args.mlti)
  mesh = common.task_mesh(args)
  train_step = metajax.meta.make_train_step(recipe.value_and_grad, optimizer, sample,
                                            meta_batch_size=meta_batch, iterations=args.chunk,
                                            mesh=mesh)
  state = metajax.meta.init_train_state(recipe.meta_params, optimizer)
  try:
    trained = runner.train(
        train_step, state, key_train, (train_images,),
        args=args, out=out, desc=f"{args.config}/{args.solver}", metric="query_loss",
        config={**dataclasses.asdict(config), **vars(args), **common.environment()},
        run_flags=FEWSHOT_RUN_FLAGS, mesh=mesh)
  except CheckpointError as err:
    raise SystemExit(f"fewshot.py: error: {err}") from err
  state, train_seconds = trained.state, trained.seconds

  test_tasks = metajax.tasks.episodes(ways=config.ways, shots=args.shots,
                                      queries=config.queries)(key_eval, args.eval_tasks,
                                                              test_images)
  finetune, theta = (make_finetune(args, config, loss_fn, state.meta_params, learn)
                     if args.solver in recipes.CLASSIC
                     else recipe.finetune(state.meta_params, config.test_steps))
  per_task = metajax.meta.evaluate_per_task(finetune, metajax.meta.accuracy(apply_fn), theta,
                                            test_tasks, chunk=eval_chunk(config, args.solver))
  mean, ci = metajax.meta.confidence_interval(per_task)
  result = {"config": args.config, "solver": args.solver, "mlti": args.mlti, "shots": args.shots,
            "accuracy": mean, "ci95": ci, "iterations": iterations,
            "train_seconds": train_seconds, **common.environment()}
  if args.baseline:
    base = pretrain_baseline(config, train_images, image_shape, key_base, test_tasks)
    result["baseline_accuracy"], result["baseline_ci95"] = metajax.meta.confidence_interval(base)
  trained.write(event="eval", **result)
  trained.close()
  if not common.is_primary():
    return result
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)

  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  curve = [(r["iteration"], r["query_loss"]) for r in records if r["event"] == "train"]

  def draw(plt):
    plt.plot(*zip(*curve))
    plt.xlabel("meta-iteration")
    plt.ylabel("query loss (meta-train)")
    plt.title(f"{args.config} {args.solver} {config.ways}-way {args.shots}-shot")
  common.save_plot(os.path.join(out, "training.png"), draw)

  print(f"\n{args.config} {config.ways}-way {args.shots}-shot, {args.solver}: "
        f"{100 * mean:.2f} ± {100 * ci:.2f}% over {args.eval_tasks} tasks "
        f"({iterations} iterations, {train_seconds:.0f}s)")
  if args.baseline:
    print(f"pretrain + fine-tune baseline: {100 * result['baseline_accuracy']:.2f} ± "
          f"{100 * result['baseline_ci95']:.2f}%")
  return result


if __name__ == "__main__":
  main()
