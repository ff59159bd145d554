"""Few-shot classification with the papers' protocols: digits (default), Omniglot, miniImageNet.

Solvers: MAML, first-order MAML, Meta-SGD, Reptile, iMAML and the adjoint
solver (``--solver``). Named configs carry the papers' hyperparameters
(``--config``): MAML Omniglot 5-way (1 step alpha=0.4, meta-batch 32, 3 steps
at test), 20-way (5 steps alpha=0.1, meta-batch 16), miniImageNet (5 steps
alpha=0.01, 10 at test, meta-batch 4 / 2); iMAML reg=2, 5 CG steps damped by
1.0 (the official code's cg_damping), 16 inner steps. Evaluation adapts on 600
test tasks and reports accuracy with 95% confidence intervals. ``--baseline``
also trains the same network on all meta-train classes and fine-tunes it on
each test task (non-meta-learned).

Checkpoints (orbax) are written every ``--checkpoint-every`` iterations and a
rerun with the same ``--out`` resumes from the latest one; iteration ``i``
always samples its tasks from ``fold_in(key, i)``, so a resumed run is the
same run. ``checkpoints/run.json`` records the flags that define the run
(``--config --solver --shots --meta-batch --seed``): a rerun with other values
into the same ``--out`` is refused, as is a checkpoint that is unreadable or
does not match the model. Metrics go to ``metrics.jsonl``; plots to ``training.png``.

Run: ``python experiments/fewshot.py [--config digits] [--solver maml] [--shots 1] [--baseline]``.
Omniglot: ``--config omniglot-5way --data-dir DIR`` (see metajax.data.omniglot for the files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import metajax  # noqa: E402


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
  pretrain_steps: int = 2000


CONFIGS = {
    # Real data shipped with scikit-learn: classes 0-4 (+ rotations) meta-train, 5-9 meta-test.
    # MAML's Omniglot 5-way protocol (1 step alpha=0.4, 3 at test), meta-batch 16.
    "digits": Config("digits", ways=5, queries=10, filters=32, blocks=3, rotations=True,
                     inner_steps=1, inner_lr=0.4, test_steps=3, meta_batch=16,
                     iterations=1000, imaml_inner_steps=5, imaml_inner_lr=0.1,
                     pretrain_steps=1000),
    "omniglot-5way": Config("omniglot", ways=5, strided=True, rotations=True, inner_steps=1,
                            inner_lr=0.4, test_steps=3, meta_batch=32),
    "omniglot-20way": Config("omniglot", ways=20, strided=True, rotations=True, inner_steps=5,
                             inner_lr=0.1, test_steps=5, meta_batch=16),
    "miniimagenet": Config("miniimagenet", ways=5, filters=32, inner_steps=5, inner_lr=0.01,
                           test_steps=10, meta_batch=4, meta_batch_5shot=2, imaml_inner_lr=0.01),
}


class CheckpointError(RuntimeError):
  """A checkpoint directory this run cannot resume from; the message says what to do."""


def parse_args(argv=None):
  """Parsed and checked flags; ``--iterations`` and ``--meta-batch`` default to the config's."""
  p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                              description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="digits")
  p.add_argument("--solver", choices=common.SOLVERS, default="maml")
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--iterations", type=int, default=None, help="default: the config's")
  p.add_argument("--meta-batch", type=int, default=None, help="default: the config's")
  p.add_argument("--chunk", type=int, default=1,
                 help="meta-iterations fused per jitted call, capped at --iterations, which it "
                      "must divide (convs on CPU: keep 1, a rolled loop around convolutions is "
                      "~20x slower on XLA:CPU)")
  p.add_argument("--eval-tasks", type=int, default=600)
  p.add_argument("--checkpoint-every", type=int, default=500)
  p.add_argument("--baseline", action="store_true", help="also run the pretrain+finetune baseline")
  p.add_argument("--data-dir", default=None, help="Omniglot zips / miniImageNet root")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="default: runs/<config>-<solver>-<shots>shot")
  args = p.parse_args(argv)
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
  return args


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


def solver_args(args, config: Config):
  """The flags common.make_adapt reads, filled from the config."""
  imaml = args.solver == "imaml"
  return argparse.Namespace(
      solver=args.solver, reg=2.0, cg_steps=5, cg_ridge=1.0, t1=None,
      inner_steps=config.imaml_inner_steps if imaml else config.inner_steps,
      inner_lr=config.imaml_inner_lr if imaml else config.inner_lr,
      meta_lr=config.meta_lr)


def make_model(config: Config, num_classes: int, key, image_shape):
  module = metajax.models.Conv4(num_classes, filters=config.filters, strided=config.strided,
                                blocks=config.blocks)
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


def eval_chunk(config: Config) -> int:
  """Tasks per jitted evaluation call. For convs on CPU tasks and steps are both unrolled, so
  compile size grows with tasks x steps: keep that product near 48."""
  return max(1, 48 // config.test_steps)


RUN_FLAGS = ("config", "solver", "shots", "meta_batch", "seed")  # what makes a run the same run


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
  run = {name: getattr(args, name) for name in RUN_FLAGS}
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


def make_finetune(args, config: Config, adapt, loss_fn, meta_params, learn):
  """The test-time adaptation and the initialization it starts from: ``(finetune, theta)``.

  iMAML and the adjoint solver adapt with the solver they were trained with. The others follow
  MAML's protocol, ``config.test_steps`` gradient steps of ``config.inner_lr``; Meta-SGD takes
  them with its learned per-parameter step sizes ``meta_params['step_size']``.
  """
  theta = meta_params["params"] if learn else meta_params
  if args.solver in ("imaml", "adjoint"):
    return adapt, theta
  if args.solver != "metasgd":
    return metajax.solvers.unrolled(loss_fn, steps=config.test_steps,
                                    step_size=config.inner_lr), theta
  steps = metajax.solvers.unrolled(loss_fn, steps=config.test_steps)
  step_size = meta_params["step_size"]
  return (lambda params, support: steps(params, support, step_size=step_size)), theta


def main(argv=None):
  args = parse_args(argv)
  config = CONFIGS[args.config]
  meta_batch, iterations, chunk = args.meta_batch, args.iterations, args.chunk  # parse_args
  out = args.out if args.out is not None else os.path.join(
      "runs", f"{args.config}-{args.solver}-{args.shots}shot")
  os.makedirs(out, exist_ok=True)
  data = load_data(config, args.data_dir)
  check_data(args, config, data)
  train_images, test_images = jax.device_put(data["train"]), jax.device_put(data["test"])
  image_shape = train_images.shape[2:]
  key_init, key_train, key_eval, key_base = jax.random.split(jax.random.key(args.seed), 4)

  params, apply_fn = make_model(config, config.ways, key_init, image_shape)
  loss_fn = metajax.meta.cross_entropy_loss(apply_fn)
  sargs = solver_args(args, config)
  adapt, learn = common.make_adapt(sargs, loss_fn)
  optimizer = common.outer_optimizer(sargs)
  sample = metajax.tasks.episodes(ways=config.ways, shots=args.shots, queries=config.queries,
                                  rotations=config.rotations)
  train_step = metajax.meta.make_train_step(
      common.value_and_grad_for(sargs, adapt, loss_fn, learn), optimizer, sample,
      meta_batch_size=meta_batch, iterations=chunk)
  state = metajax.meta.init_train_state(common.init_meta_params(sargs, params, learn), optimizer)
  try:
    manager = checkpoint_manager(os.path.join(out, "checkpoints"))
    state = resume(manager, state, args)
  except CheckpointError as err:
    raise SystemExit(f"fewshot.py: error: {err}") from err
  start_step = int(state.step)

  log = common.JsonLog(os.path.join(out, "metrics.jsonl"))
  log.write(event="config", resumed_from=start_step, **{
      **dataclasses.asdict(config), **vars(args), **common.environment()})
  bar = common.progress(iterations, f"{args.config}/{args.solver}")
  bar.update(start_step)
  start = time.time()
  while int(state.step) < iterations:
    state, losses = train_step(state, key_train, train_images)
    step = int(state.step)
    log.write(event="train", iteration=step, query_loss=float(losses.mean()),
              seconds=time.time() - start)
    bar.update(chunk)
    bar.set_postfix(query_loss=f"{float(losses.mean()):.3f}")
    if step % args.checkpoint_every < chunk or step >= iterations:
      save(manager, state)
  bar.close()
  if manager is not None:
    manager.wait_until_finished()
  train_seconds = time.time() - start

  test_tasks = metajax.tasks.episodes(ways=config.ways, shots=args.shots,
                                      queries=config.queries)(key_eval, args.eval_tasks,
                                                              test_images)
  finetune, theta = make_finetune(args, config, adapt, loss_fn, state.meta_params, learn)
  per_task = metajax.meta.evaluate_per_task(finetune, metajax.meta.accuracy(apply_fn), theta,
                                            test_tasks, chunk=eval_chunk(config))
  mean, ci = metajax.meta.confidence_interval(per_task)
  result = {"config": args.config, "solver": args.solver, "shots": args.shots,
            "accuracy": mean, "ci95": ci, "iterations": iterations,
            "train_seconds": train_seconds, **common.environment()}
  if args.baseline:
    base = pretrain_baseline(config, train_images, image_shape, key_base, test_tasks)
    result["baseline_accuracy"], result["baseline_ci95"] = metajax.meta.confidence_interval(base)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  log.write(event="eval", **result)
  log.close()

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
