"""Every method the experiment scripts run (``--solver``), built once over metajax.

The classic solvers (MAML, first-order MAML, Meta-SGD, Reptile, iMAML, the adjoint) come from
``common.make_adapt``; the methods of metajax's second wave are built here:

- ``anil`` / ``boil``: :func:`metajax.solvers.masked` adapting the head (the last ``Dense``
  layer) / everything else, MAML's steps and step size;
- ``mamlpp``: MAML++ with learned per-layer, per-step step sizes (LSLR), the multi-step loss
  for the first 10% of the meta-iterations and first-order gradients for the first 10%
  (:func:`metajax.meta.maml_plus_plus`). The rates are stored as ``log(rate)``
  (``learn={"step_size": "log"}``): learned raw, as in MAML++'s code, they grew under Adam until
  the sinusoid inner loop diverged (meta-loss 1e17 at meta-iteration 1539, 5 steps, raised by the
  train step);
- ``cavia``: :func:`metajax.solvers.context`, a context of ``--context-size`` adapted with
  ``--context-lr``, fed to the regression MLP as extra inputs and to Conv4 by FiLM
  (``Conv4(context=d)``: constant extra input channels, tried first, are cancelled by the first
  batch norm and left CAVIA at 26% on 5-way digits, chance 20%);
- ``ml3``: :func:`metajax.solvers.learned_loss`, the task loss plus a learned correction, a
  small network of (prediction, target) whose last layer starts at zero (so training starts as
  MAML).

``--mlti ALPHA`` (any solver) trains on task interpolations (:func:`metajax.tasks.interpolate`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run or loaded as a file: the repository root holds experiments/
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metajax  # noqa: E402
from experiments import common  # noqa: E402

# The registry of --solver names lives in common (one list for every script).
CLASSIC, METHODS, SOLVERS = common.CLASSIC_SOLVERS, common.METHOD_SOLVERS, common.SOLVERS
ML3_HIDDEN = 16


def add_method_flags(parser, *, context_size: int) -> None:
  """Flags of the second-wave methods (ignored by the others); ``context_size``: CAVIA's
  default context length (its paper: 4 for regression, 100 for classification)."""
  parser.add_argument("--context-size", type=int, default=context_size,
                      help="cavia: context length")
  parser.add_argument("--context-lr", type=float, default=1.0, help="cavia: context step size")
  parser.add_argument("--mlti", type=float, default=None, metavar="ALPHA",
                      help="train on MLTI task interpolations with Beta(ALPHA, ALPHA) weights")


def check_method_flags(parser, args) -> None:
  common.check_flags(parser, args, positive_int=("--context-size",),
                     positive_float=("--context-lr", "--mlti"))
  used_by = {"--context-size": ("cavia",), "--context-lr": ("cavia",)}
  if hasattr(args, "inner_lr"):  # sinusoid.py's flag; CAVIA steps its context by --context-lr
    used_by["--inner-lr"] = tuple(s for s in SOLVERS if s != "cavia")
  common.refuse_unused_flags(parser, args, used_by)


def head_mask(params, *, invert: bool = False):
  """The last ``Dense_i`` layer (the head) of a flax model's params, as a prefix mask."""
  dense = sorted((int(m.group(1)), k) for k in params if (m := re.fullmatch(r"Dense_(\d+)", k)))
  if not dense:
    raise ValueError(f"anil/boil need a flax model with Dense layers; params has {sorted(params)}.")
  head = dense[-1][1]
  return {k: (k == head) != invert for k in params}


def _ml3_features(prediction, target, classification: bool):
  if classification:
    onehot = jax.nn.one_hot(target, prediction.shape[-1], dtype=prediction.dtype)
    return jnp.concatenate([jax.nn.log_softmax(prediction), onehot], axis=-1)
  return jnp.concatenate([prediction, target, (prediction - target) ** 2], axis=-1)


def ml3_init(key, features: int, dtype):
  """The loss network's parameters: ``features -> ML3_HIDDEN (tanh) -> 1``, last layer zero."""
  return {"w1": jax.random.normal(key, (features, ML3_HIDDEN), dtype) / jnp.sqrt(features),
          "b1": jnp.zeros(ML3_HIDDEN, dtype), "w2": jnp.zeros(ML3_HIDDEN, dtype)}


def ml3_inner_loss(loss_fn, apply_fn, classification: bool):
  """``loss(p, batch, psi) = loss_fn(p, batch) + mean(net_psi(prediction, target))``."""
  def inner(params, batch, psi):
    x, target = batch
    features = _ml3_features(apply_fn(params, x), target, classification)
    correction = jnp.tanh(features @ psi["w1"] + psi["b1"]) @ psi["w2"]
    return loss_fn(params, batch) + jnp.mean(correction)
  return inner


@dataclasses.dataclass
class Recipe:
  """A method ready to train: its solver, meta-gradient, initial meta-parameters, test-time
  adaptation."""

  solver: str
  adapt: Any
  learn: Any
  value_and_grad: Callable
  meta_params: Any
  loss_fn: Callable  # the query loss, on what ``adapt`` returns
  stepper: Callable  # meta_params -> (theta, step(phi, support, k)): one test-time step
  apply_fn: Callable

  def start(self, theta):
    """Where test-time adaptation starts from ``theta`` (CAVIA adds a zero context)."""
    return self.adapt.initial(theta) if self.solver == "cavia" else theta

  def finetune(self, meta_params, steps: int):
    """``(adapt_fn, theta)``: ``steps`` test-time steps from ``theta`` (a Python loop: convs on
    CPU run fastest unrolled)."""
    theta, step = self.stepper(meta_params)

    def adapt_fn(params, support):
      phi = self.start(params)
      for k in range(steps):
        phi = step(phi, support, jnp.int32(k))
      return phi
    return adapt_fn, theta


def build(args, make_model: Callable, loss_of: Callable, key, *, outputs: int,
          classification: bool) -> Recipe:
  """The method ``args.solver`` for the model ``make_model(context) -> (params, apply_fn)``
  (``context``: the CAVIA context's length, 0 for the others; the regression model takes that
  many extra inputs, the classifier is ``Conv4(context=...)``) with ``outputs`` outputs and the
  loss ``loss_of(apply_fn)``.

  ``args`` carries ``solver, inner_steps, inner_lr, meta_lr, iterations`` (and the iMAML /
  adjoint flags of ``common.add_solver_flags``, and :func:`add_method_flags`'s).
  """
  s, m = metajax.solvers, metajax.meta
  cavia = args.solver == "cavia"
  params, apply_fn = make_model(args.context_size if cavia else 0)
  if cavia:  # regression: extra inputs; classification: Conv4's FiLM (batch norm would cancel
    # a context fed to the input as constant channels)
    apply_fn = metajax.models.with_context(apply_fn,
                                           keyword="context" if classification else None)
  loss_fn = loss_of(apply_fn)
  steps, lr = args.inner_steps, args.inner_lr
  gd_step = lambda loss, step_size: s.unrolled(loss, steps=1, step_size=step_size)

  if args.solver in CLASSIC:
    adapt, learn = common.make_adapt(args, loss_fn)
    meta_params = common.init_meta_params(args, params, learn)
    one = s.unrolled(loss_fn, steps=1)
    def stepper(mp):
      rates = mp["step_size"] if learn else args.inner_lr
      return (mp["params"] if learn else mp), lambda phi, b, k: one(phi, b, step_size=rates)
    return Recipe(args.solver, adapt, learn, common.value_and_grad_for(args, adapt, loss_fn, learn),
                  meta_params, loss_fn, stepper, apply_fn)

  learn, meta_params = (), params
  if args.solver in ("anil", "boil"):
    mask = lambda p: head_mask(p, invert=args.solver == "boil")
    adapt = s.masked(s.unrolled(loss_fn, steps=steps, step_size=lr), mask)
    one = s.masked(gd_step(loss_fn, lr), mask)
    stepper = lambda mp: (mp, lambda phi, b, k: one(phi, b))
  elif args.solver == "mamlpp":
    adapt = s.unrolled(loss_fn, steps=steps, per_step=True, step_size=jnp.full((steps,), lr))
    learn = {"step_size": "log"}  # stored as log(rate): MAML++'s raw rates diverged (recipe doc)
    meta_params = {"params": params,
                   "step_size": jax.tree.map(jnp.log, m.lslr_step_sizes(params, steps, lr))}
    one = s.unrolled(loss_fn, steps=1)
    def stepper(mp):  # step k uses the learned rates of step min(k, K - 1)
      last, rates = steps - 1, m.PARAMETRIZATIONS["log"](mp["step_size"])
      return mp["params"], lambda phi, b, k: one(phi, b, step_size=jax.tree.map(
          lambda r: r[jnp.minimum(k, last)], rates))
  elif cavia:
    adapt = s.context(s.unrolled(loss_fn, steps=steps, step_size=args.context_lr),
                      args.context_size)
    one = s.masked(gd_step(loss_fn, args.context_lr), {"params": False, "context": True})
    stepper = lambda mp: (mp, lambda phi, b, k: one(phi, b))
  elif args.solver == "ml3":
    inner = ml3_inner_loss(loss_fn, apply_fn, classification)
    adapt = s.learned_loss(s.unrolled(inner, steps=steps, step_size=lr))
    learn = ("loss_params",)
    width = (2 if classification else 3) * outputs
    dtype = jax.tree.leaves(params)[0].dtype
    meta_params = {"params": params, "loss_params": ml3_init(key, width, dtype)}
    one = s.learned_loss(gd_step(inner, lr))
    stepper = lambda mp: (mp["params"], lambda phi, b, k: one(phi, b,
                                                              loss_params=mp["loss_params"]))
  else:
    raise ValueError(f"unknown --solver {args.solver!r}; choose from {SOLVERS}.")

  objective = m.meta_objective(adapt, loss_fn, learn=learn)
  if args.solver == "mamlpp":
    tenth = max(1, args.iterations // 10)
    value_and_grad = m.maml_plus_plus(adapt, loss_fn, msl_iterations=tenth,
                                      first_order_iterations=tenth, learn=learn)
  else:
    value_and_grad = jax.value_and_grad(objective)
  return Recipe(args.solver, adapt, learn, value_and_grad, meta_params, loss_fn, stepper,
                apply_fn)
