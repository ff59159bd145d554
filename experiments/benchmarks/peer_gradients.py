"""metajax's meta-gradients against the PyTorch peers: torch.func, higher, TorchOpt, learn2learn.

Each scenario computes one quantity with metajax and with every peer that implements it, in
float64, from identical weights (metajax's initialization copied into ``torch.nn`` modules) on
the same 4 tasks; a row gives the largest absolute difference and that difference over the largest
|value|. Scenarios: second-order MAML (K=1, 5), first-order MAML, Meta-SGD, momentum-SGD and Adam
inner loops, ANIL, a conv net with batch norm (the task's statistics), iMAML (theta and a learned
``reg``) and Reptile, on MLPs 1-8-8-1 (tanh, ReLU) and a 3-block conv net. A peer that is not
installed is skipped and named in the table; learn2learn is optional (without torchvision, its
MAML and MetaSGD modules are loaded alone). Writes ``peer_gradients.md`` beside this file.

Run: ``pip install -e ".[peers]"`` then ``python experiments/benchmarks/peer_gradients.py``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import types
from collections import namedtuple

import jax
import jax.flatten_util

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import metajax  # noqa: E402
from experiments import common  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
S = metajax.solvers
TASKS, SHOTS = 4, 10
ADAPTED = "adapted params (task 1)"
Problem = namedtuple("Problem", "params loss tasks net layout torch_loss torch_tasks")


def _optional(name: str):
  return importlib.import_module(name) if importlib.util.find_spec(name) else None


def _learn2learn():
  """learn2learn's algorithms (``MAML``, ``MetaSGD``), or None when it is not installed.

  Its package ``__init__`` imports torchvision (for its datasets); without it, the two algorithm
  modules, plain torch, are loaded alone under a stub package.
  """
  spec = importlib.util.find_spec("learn2learn")
  if spec is None:
    return None
  try:
    return importlib.import_module("learn2learn").algorithms
  except ImportError:
    pass
  for name in [m for m in sys.modules if m.split(".")[0] == "learn2learn"]:
    del sys.modules[name]
  root = spec.submodule_search_locations[0]
  package, algorithms = types.ModuleType("learn2learn"), types.ModuleType("learn2learn.algorithms")
  package.__path__, algorithms.__path__ = [root], [os.path.join(root, "algorithms")]
  sys.modules.update({"learn2learn": package, "learn2learn.algorithms": algorithms})
  utils = importlib.import_module("learn2learn.utils")
  package.__dict__.update({k: v for k, v in vars(utils).items() if not k.startswith("_")})
  algorithms.MAML = importlib.import_module("learn2learn.algorithms.maml").MAML
  algorithms.MetaSGD = importlib.import_module("learn2learn.algorithms.meta_sgd").MetaSGD
  return algorithms


higher, torchopt, L2L = _optional("higher"), _optional("torchopt"), _learn2learn()
INSTALLED = {"torch.func": True, "torch (by hand)": True, "higher": higher is not None,
             "TorchOpt": torchopt is not None, "learn2learn": L2L is not None}
ROWS: list[tuple] = []

# ----------------------------------------------------------------------------- weights, tasks
_TORCH_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias"}


_torch_layout = lambda a: a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
_flax_layout = lambda a: a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0) if a.ndim == 4 else a


def to_torch(tree, layout) -> dict:
  """metajax's ``{layer: {leaf: array}}`` -> torch's ``{name: tensor}``."""
  return {f"{prefix}.{_TORCH_NAME[k]}": torch.tensor(_torch_layout(np.asarray(v)))
          for layer, prefix in layout.items() for k, v in tree[layer].items()}


def to_flax(named: dict, layout) -> dict:
  """torch's ``{name: tensor}`` -> metajax's nested dict."""
  out = {}
  for layer, prefix in layout.items():
    keys = ("scale", "bias") if layer.startswith("BatchNorm") else ("kernel", "bias")
    out[layer] = {k: _flax_layout(named[f"{prefix}.{_TORCH_NAME[k]}"].detach().numpy())
                  for k in keys}
  return out


_grads = lambda net, layout: to_flax({n: p.grad for n, p in net.named_parameters()}, layout)


def _problem(params, apply_fn, loss, torch_loss, module, layout, data, images=False):
  """Bundles both sides; ``net()`` is a fresh torch module holding metajax's weights."""
  def net():
    m = module()
    m.load_state_dict(to_torch(params, layout))
    return m
  nchw = lambda a: torch.tensor(a.transpose(0, 1, 4, 2, 3) if images and a.ndim == 5 else a)
  torch_tasks = [tuple(nchw(a)[i] for a in data) for i in range(TASKS)]
  tasks = metajax.tasks.Task(tuple(map(jnp.asarray, data[:2])), tuple(map(jnp.asarray, data[2:])))
  return Problem(params, loss(apply_fn), tasks, net, layout, torch_loss, torch_tasks)


def mlp_problem(act: str, seed: int) -> Problem:
  """MLP 1-8-8-1 (tanh or ReLU, biases perturbed off zero) on 4 sinusoid tasks, 10-shot."""
  rng = np.random.default_rng(seed)
  params, apply_fn = metajax.models.make_mlp(
      jax.random.key(seed), 1, (8, 8, 1), activation=jnp.tanh if act == "tanh" else jax.nn.relu,
      kernel_init=jax.nn.initializers.normal(0.7) if act == "tanh" else None, dtype=jnp.float64)
  params = jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape) * (v.ndim == 1), params)
  amp, phase = rng.uniform(0.1, 5.0, (TASKS, 1, 1)), rng.uniform(0, np.pi, (TASKS, 1, 1))
  xs, xq = rng.uniform(-5, 5, (2, TASKS, SHOTS, 1))
  data = (xs, amp * np.sin(xs + phase), xq, amp * np.sin(xq + phase))
  A = nn.Tanh if act == "tanh" else nn.ReLU
  module = lambda: nn.Sequential(nn.Linear(1, 8), A(), nn.Linear(8, 8), A(), nn.Linear(8, 1))
  layout = {f"Dense_{i}": str(2 * i) for i in range(3)}
  return _problem(params, apply_fn, metajax.meta.mse_loss, F.mse_loss, module, layout, data)


def conv_problem(ways: int = 5, shots: int = 2, queries: int = 3, side: int = 8) -> Problem:
  """3 x [conv 3x3 (4 filters), BN with the task's statistics, ReLU, max-pool], linear head."""
  rng = np.random.default_rng(9)
  module_jax = metajax.models.Conv4(num_classes=ways, filters=4, blocks=3)
  params, apply_fn = metajax.models.init_model(module_jax, jax.random.key(0), (side, side, 1),
                                               dtype=jnp.float64)
  params = jax.tree.map(  # BN scale/bias and biases off 1 and 0
      lambda v: jnp.asarray(v, jnp.float64) + 0.2 * rng.standard_normal(v.shape) * (v.ndim == 1),
      params)
  images = lambda n: rng.uniform(0, 1, (TASKS, ways * n, side, side, 1))
  labels = lambda n: np.tile(np.arange(ways), n)[None].repeat(TASKS, 0)
  data = (images(shots), labels(shots), images(queries), labels(queries))

  def module():
    layers = []
    for i in range(3):
      layers += [nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1),
                 nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4, ways))
  layout = {**{f"Conv_{i}": str(4 * i) for i in range(3)},
            **{f"BatchNorm_{i}": str(4 * i + 1) for i in range(3)}, "Dense_0": "13"}
  return _problem(params, apply_fn, metajax.meta.cross_entropy_loss, F.cross_entropy, module,
                  layout, data, images=True)


# ----------------------------------------------------------------------------- comparisons
def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def rows(scenario: str, ours: dict, peers: dict) -> None:
  """One row per peer and quantity; ``peers[name]()`` returns ``{quantity: value}``."""
  for peer, run in peers.items():
    if not INSTALLED[peer]:
      ROWS.append((scenario, peer, None, None))
      continue
    for quantity, value in run().items():
      if quantity not in ours:
        continue
      a, b = _flat(ours[quantity]), _flat(value)
      diff = float(np.abs(a - b).max())
      ROWS.append((f"{scenario}: {quantity}", peer, diff, diff / float(np.abs(a).max())))
      print(*ROWS[-1], flush=True)


def ours(prob: Problem, adapt) -> dict:
  """metajax: the meta-gradient of the mean query loss, and task 1's adapted parameters."""
  g = jax.grad(metajax.meta.meta_objective(adapt, prob.loss))(prob.params, prob.tasks)
  support = jax.tree.map(lambda x: x[0], prob.tasks.support)
  return {"meta-gradient": g, ADAPTED: adapt(prob.params, support)}


# ----------------------------------------------------------------------------- the peers
def torch_func(prob, steps, lr, *, first_order=False, adapted=None) -> dict:
  """MAML by hand with torch.func; ``lr``: a float or per-parameter tensors (Meta-SGD, then
  differentiated too); ``adapted``: the parameter names the inner loop updates (all by default)."""
  net = prob.net()
  theta = {k: v.detach() for k, v in net.named_parameters()}
  names = adapted or list(theta)
  rates = lr if isinstance(lr, dict) else {n: torch.tensor(lr) for n in names}
  f = lambda p, x, y: prob.torch_loss(functional_call(net, p, (x,)), y)

  def adapt(p, r, x, y):
    for _ in range(steps):
      g = grad(lambda sub, p=p: f({**p, **sub}, x, y))({n: p[n] for n in names})
      g = {n: v.detach() for n, v in g.items()} if first_order else g
      p = {**p, **{n: p[n] - r[n] * g[n] for n in names}}
    return p
  meta = lambda p, r: sum(f(adapt(p, r, *t[:2]), *t[2:]) for t in prob.torch_tasks) / TASKS
  g_theta, g_rates = grad(meta, argnums=(0, 1))(theta, rates)
  out = {"meta-gradient": to_flax(g_theta, prob.layout),
         ADAPTED: to_flax(adapt(theta, rates, *prob.torch_tasks[0][:2]), prob.layout)}
  if isinstance(lr, dict):
    out["step-size gradient"] = to_flax(g_rates, prob.layout)
  return out


def higher_maml(prob, steps, make_opt, *, first_order=False) -> dict:
  """higher.innerloop_ctx around a torch.optim optimizer; first order drops the gradients'
  graph in ``grad_callback``."""
  net = prob.net()
  opt, names = make_opt(net.parameters()), [n for n, _ in net.named_parameters()]
  callback = (lambda gs: [g.detach() for g in gs]) if first_order else None
  for i, (xs, ys, xq, yq) in enumerate(prob.torch_tasks):
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
      for _ in range(steps):
        diffopt.step(prob.torch_loss(fnet(xs), ys), grad_callback=callback)
      (prob.torch_loss(fnet(xq), yq) / TASKS).backward()
      if i == 0:
        adapted = to_flax(dict(zip(names, fnet.parameters())), prob.layout)
  return {"meta-gradient": _grads(net, prob.layout), ADAPTED: adapted}


def torchopt_maml(prob, steps, make_opt) -> dict:
  """TorchOpt's object-oriented meta-optimizers (MetaSGD, MetaAdam), states restored per task."""
  net = prob.net()
  inner = make_opt(net)
  net_state, opt_state = torchopt.extract_state_dict(net), torchopt.extract_state_dict(inner)
  for i, (xs, ys, xq, yq) in enumerate(prob.torch_tasks):
    for _ in range(steps):
      inner.step(prob.torch_loss(net(xs), ys))
    (prob.torch_loss(net(xq), yq) / TASKS).backward()
    if i == 0:
      adapted = to_flax(dict(net.named_parameters()), prob.layout)
    torchopt.recover_state_dict(net, net_state)
    torchopt.recover_state_dict(inner, opt_state)
  return {"meta-gradient": _grads(net, prob.layout), ADAPTED: adapted}


def l2l_maml(prob, steps, lr, *, first_order=False, rates=None, head=False) -> dict:
  """learn2learn's MAML (or MetaSGD with ``rates``; or ANIL's recipe with ``head``: MAML of the
  last layer on the body's features)."""
  net = prob.net()
  names = [n for n, _ in net.named_parameters()]
  if rates is not None:
    wrapper = L2L.MetaSGD(net, lr=lr, first_order=first_order)
    with torch.no_grad():
      for lr_, n in zip(wrapper.lrs, names):
        lr_.copy_(rates[n])
  else:
    wrapper = L2L.MAML(net[-1] if head else net, lr=lr, first_order=first_order)
  body = net[:-1] if head else nn.Identity()
  for i, (xs, ys, xq, yq) in enumerate(prob.torch_tasks):
    learner = wrapper.clone()
    features_s, features_q = body(xs), body(xq)
    for _ in range(steps):
      learner.adapt(prob.torch_loss(learner(features_s), ys))
    (prob.torch_loss(learner(features_q), yq) / TASKS).backward()
    if i == 0 and not head:
      adapted = to_flax(dict(learner.module.named_parameters()), prob.layout)
  out = {"meta-gradient": _grads(net, prob.layout)}
  if not head:
    out[ADAPTED] = adapted
  if rates is not None:
    out["step-size gradient"] = to_flax(dict(zip(names, [r.grad for r in wrapper.lrs])),
                                        prob.layout)
  return out


def torchopt_imaml(prob, reg, lr, steps, cg_steps) -> dict:
  """TorchOpt's implicit differentiation (``custom_root``) of iMAML's condition
  ``grad L(phi) + reg (phi - theta) = 0``, as in its iMAML example; the same GD inner loop."""
  from torchopt.diff.implicit import custom_root
  net = prob.net()
  names = [n for n, _ in net.named_parameters()]
  f = lambda p, x, y: prob.torch_loss(functional_call(net, dict(zip(names, p)), (x,)), y)

  def condition(phi, theta, r, x, y):
    return tuple(g + r * (p - t) for g, p, t in zip(grad(f)(phi, x, y), phi, theta))

  @custom_root(condition, argnums=(1, 2),
               solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0))
  def solve(phi, theta, r, x, y):
    phi, theta = tuple(p.detach() for p in phi), tuple(t.detach() for t in theta)
    for _ in range(steps):
      phi = tuple(p - lr * (g + float(r) * (p - t))
                  for g, p, t in zip(grad(f)(phi, x, y), phi, theta))
    return phi
  theta = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
  r = torch.tensor(reg, requires_grad=True)
  phis = [solve(theta, theta, r, xs, ys) for xs, ys, _, _ in prob.torch_tasks]
  total = sum(f(phi, xq, yq) for phi, (_, _, xq, yq) in zip(phis, prob.torch_tasks)) / TASKS
  total.backward()
  return {"meta-gradient": to_flax(dict(zip(names, [t.grad for t in theta])), prob.layout),
          "reg gradient": r.grad.numpy(), ADAPTED: to_flax(dict(zip(names, phis[0])), prob.layout)}


def torch_reptile(prob, steps, make_opt, epsilon) -> dict:
  """Reptile by hand: a copy trained per task, then ``theta += epsilon (mean phi - theta)``."""
  net = prob.net()
  moves = [torch.zeros_like(p) for p in net.parameters()]
  for xs, ys, _, _ in prob.torch_tasks:
    learner = copy.deepcopy(net)
    opt = make_opt(learner.parameters())
    for _ in range(steps):
      opt.zero_grad()
      prob.torch_loss(learner(xs), ys).backward()
      opt.step()
    for move, p, q in zip(moves, net.parameters(), learner.parameters()):
      move += (q.detach() - p.detach()) / TASKS
  with torch.no_grad():
    for p, move in zip(net.parameters(), moves):
      p += epsilon * move
  return {"new theta": to_flax(dict(net.named_parameters()), prob.layout)}


# ----------------------------------------------------------------------------- scenarios
def run_scenarios() -> dict:
  """Fills ``ROWS``; returns the facts the conventions list states."""
  tanh, relu, conv = mlp_problem("tanh", 0), mlp_problem("relu", 1), conv_problem()
  sgd = torch.optim.SGD
  for prob, act, k in ((tanh, "tanh", 1), (tanh, "tanh", 5), (relu, "ReLU", 5)):
    rows(f"MAML K={k}, {act}", ours(prob, S.unrolled(prob.loss, steps=k, step_size=0.05)), {
        "torch.func": lambda prob=prob, k=k: torch_func(prob, k, 0.05),
        "higher": lambda prob=prob, k=k: higher_maml(prob, k, lambda p: sgd(p, lr=0.05)),
        "TorchOpt": lambda prob=prob, k=k: torchopt_maml(
            prob, k, lambda n: torchopt.MetaSGD(n, lr=0.05)),
        "learn2learn": lambda prob=prob, k=k: l2l_maml(prob, k, 0.05)})

  fo = S.unrolled(tanh.loss, steps=5, step_size=0.05, first_order=True)
  rows("first-order MAML K=5, tanh", ours(tanh, fo), {
      "torch.func": lambda: torch_func(tanh, 5, 0.05, first_order=True),
      "higher": lambda: higher_maml(tanh, 5, lambda p: sgd(p, lr=0.05), first_order=True),
      "learn2learn": lambda: l2l_maml(tanh, 5, 0.05, first_order=True)})

  rng = np.random.default_rng(5)
  step_sizes = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.01, 0.1, p.shape)), tanh.params)
  objective = metajax.meta.meta_objective(S.unrolled(tanh.loss, steps=2), tanh.loss,
                                          learn=("step_size",))
  g = jax.grad(objective)({"params": tanh.params, "step_size": step_sizes}, tanh.tasks)
  rates = to_torch(step_sizes, tanh.layout)
  rows("Meta-SGD K=2, tanh", {"meta-gradient": g["params"],
                              "step-size gradient": g["step_size"]}, {
      "torch.func": lambda: torch_func(tanh, 2, rates),
      "learn2learn": lambda: l2l_maml(tanh, 2, 0.05, rates=rates)})

  lr, adam, peer_fn = 0.03, torch.optim.Adam, {"higher": higher_maml, "TorchOpt": torchopt_maml}
  meta_adam = lambda **kw: lambda n: torchopt.MetaAdam(n, lr, **kw)
  for name, prob, opt, makers in (  # K=4 steps; makers: peer -> its optimizer from the params
      ("SGD momentum 0.9 K=4, tanh", tanh, optax.sgd(lr, momentum=0.9),
       {"higher": lambda p: sgd(p, lr, momentum=0.9),
        "TorchOpt": lambda n: torchopt.MetaSGD(n, lr, momentum=0.9)}),
      ("Adam eps=1e-8 eps_root=1e-8 (differentiable_adam) K=4, ReLU", relu,
       S.differentiable_adam(lr), {"TorchOpt": meta_adam(eps=1e-8, eps_root=1e-8)}),
      ("Adam eps=0 K=4, tanh", tanh, optax.adam(lr, eps=0.0),
       {"higher": lambda p: adam(p, lr, eps=0.0), "TorchOpt": meta_adam(eps=0.0)}),
      ("Adam eps=1e-3 K=4, tanh (higher: epsilon-hat, differs)", tanh, optax.adam(lr, eps=1e-3),
       {"higher": lambda p: adam(p, lr, eps=1e-3), "TorchOpt": meta_adam(eps=1e-3)})):
    rows(name, ours(prob, S.unrolled(prob.loss, steps=4, optimizer=opt)),
         {peer: lambda peer=peer, make=make, prob=prob: peer_fn[peer](prob, 4, make)
          for peer, make in makers.items()})
  facts = {"optax_nan": not np.isfinite(_flat(ours(relu, S.unrolled(
      relu.loss, steps=4, optimizer=optax.adam(lr)))["meta-gradient"])).all()}
  if torchopt is not None:
    facts["torchopt_nan"] = not np.isfinite(_flat(torchopt_maml(
        relu, 4, meta_adam())["meta-gradient"])).all()

  head = ["4.weight", "4.bias"]
  anil = S.masked(S.unrolled(tanh.loss, steps=3, step_size=0.1), S.path_mask("Dense_2"))
  rows("ANIL K=3, tanh", ours(tanh, anil), {
      "torch.func": lambda: torch_func(tanh, 3, 0.1, adapted=head),
      "learn2learn": lambda: l2l_maml(tanh, 3, 0.1, head=True)})

  rows("conv + batch norm MAML K=2", ours(conv, S.unrolled(conv.loss, steps=2, step_size=0.4)), {
      "torch.func": lambda: torch_func(conv, 2, 0.4),
      "higher": lambda: higher_maml(conv, 2, lambda p: sgd(p, lr=0.4)),
      "learn2learn": lambda: l2l_maml(conv, 2, 0.4)})

  reg, steps, step = 2.0, 20, 0.02
  for cg in (3, 5):
    imaml = S.implicit(tanh.loss, reg=reg, optimizer=S.inner_optimizers.gd(step), max_steps=steps,
                       tol=0.0, linear_solver=S.linear_solvers.cg(maxiter=cg, tol=0.0))
    objective = metajax.meta.meta_objective(imaml, tanh.loss, learn=("reg",))
    g = jax.grad(objective)({"params": tanh.params, "reg": jnp.asarray(reg)}, tanh.tasks)
    rows(f"iMAML reg={reg:g}, GD {step} x {steps}, CG x {cg}, tanh", {
        "meta-gradient": g["params"], "reg gradient": g["reg"],
        ADAPTED: imaml(tanh.params, jax.tree.map(lambda x: x[0], tanh.tasks.support))},
        {"TorchOpt": lambda cg=cg: torchopt_imaml(tanh, reg, step, steps, cg)})
  facts["imaml_residual"], facts["imaml_eig"] = [], []
  for task in range(TASKS):  # stationarity and the smallest eigenvalue of I + H / reg at phi
    support = jax.tree.map(lambda x, task=task: x[task], tanh.tasks.support)
    phi, unravel = jax.flatten_util.ravel_pytree(imaml(tanh.params, support))
    theta, task_loss = _flat(tanh.params), lambda v, support=support: tanh.loss(unravel(v), support)
    res = lambda v, task_loss=task_loss: jax.grad(task_loss)(v) + reg * (v - theta)
    facts["imaml_residual"].append(float(jnp.linalg.norm(res(phi)) / jnp.linalg.norm(res(theta))))
    facts["imaml_eig"].append(float(jnp.linalg.eigvalsh(
        jnp.eye(phi.size) + jax.hessian(task_loss)(phi) / reg)[0]))

  for name, opt, make in (("SGD 0.02", optax.sgd(0.02), lambda p: sgd(p, lr=0.02)),
                          ("Adam(b1=0) 1e-3", optax.adam(1e-3, b1=0.0),
                           lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.0, 0.999)))):
    adapt = S.unrolled(relu.loss, steps=5, optimizer=opt)
    _, direction = metajax.meta.reptile_value_and_grad(adapt, relu.loss)(relu.params, relu.tasks)
    new = jax.tree.map(lambda p, d: p - 0.1 * d, relu.params, direction)
    rows(f"Reptile K=5 {name}, epsilon 0.1, ReLU", {"new theta": new}, {
        "torch (by hand)": lambda make=make: torch_reptile(relu, 5, make, 0.1)})
  return facts


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "peer_gradients.md"))
  args = parser.parse_args(argv)
  start = time.time()
  facts = run_scenarios()
  seconds = time.time() - start
  env = common.environment()
  l2l_note = "" if L2L is None or hasattr(L2L, "__file__") else (
      " (its MAML and MetaSGD modules loaded alone: no torchvision)")
  nan = lambda key: {True: "NaN", False: "finite", None: "not run"}[facts.get(key)]
  lines = [
      "# Meta-gradients against the PyTorch peers",
      "",
      "The same quantity computed by metajax and by each peer (torch.func, higher, TorchOpt, "
      "learn2learn; Reptile by hand in torch), in float64 on both sides, from identical weights "
      f"(metajax's initialization copied into `torch.nn` modules) on the same {TASKS} tasks: "
      "MLP 1-8-8-1 (tanh or ReLU) on sinusoid tasks, 10-shot; 3 x [conv 3x3 with 4 filters, "
      "batch norm with the task's own statistics, ReLU, max-pool] and a linear head on 8x8 "
      "images, 5-way 2-shot. Max rel = max abs difference / max |metajax value|. "
      f"All rows ran in one process in {seconds:.0f} s.",
      "",
      f"{common.machine_line(env)}, optax {env['optax']}; torch {_version('torch')}, "
      f"TorchOpt {_version('torchopt')}, higher {_version('higher')}, "
      f"learn2learn {_version('learn2learn')}{l2l_note}.",
      "",
      "| scenario | peer | max abs diff | max rel diff |",
      "|---|---|---|---|",
  ]
  for scenario, peer, diff, rel in ROWS:
    cells = ("skipped (not installed)", "") if diff is None else (f"{diff:.1e}", f"{rel:.1e}")
    lines.append(f"| {scenario} | {peer} | {cells[0]} | {cells[1]} |")
  lines += [
      "",
      "Conventions that matter:",
      "",
      "- higher's Adam divides by `sqrt(v) + eps` before the bias correction of `v`, the "
      "paper's epsilon-hat form (`eps / sqrt(1 - b2^t)` after it); optax, torch.optim and "
      "TorchOpt add `eps` after. They agree only with `eps=0` (the eps=1e-3 row shows the gap).",
      "- `optax.adam` (`eps_root=0`) differentiates `sqrt(v)` at `v = 0`, where a ReLU unit "
      f"gets no gradient: its meta-gradient on the ReLU MLP here is {nan('optax_nan')}, "
      f"TorchOpt's `MetaAdam` default (`eps_root=0`) {nan('torchopt_nan')}. "
      "`metajax.solvers.differentiable_adam` sets `eps_root=1e-8`, matching "
      "`MetaAdam(eps_root=1e-8)`; `d sqrt(v + eps_root) / dv` near `v = 0` multiplies rounding "
      "by up to `1 / (2 sqrt(eps_root)) = 5e3`, hence that row's ~1e-13 (~1e-16 at "
      "`eps_root=1e-4`).",
      "- iMAML: metajax solves `grad L(phi) / reg + (phi - theta) = 0` but takes `reg`'s "
      "derivative as that of `grad L + reg (phi - theta)`, TorchOpt's condition, so the "
      "learned-`reg` gradients agree at the point the fixed inner budget reached (relative "
      "stationarity residual per task: "
      f"{', '.join(f'{r:.2f}' for r in facts['imaml_residual'])}), not only at a solution. "
      "The systems differ by the factor `reg`, which CG's iterates do not depend on in exact "
      "arithmetic; at these points `I + H / reg` is indefinite on some tasks (smallest "
      f"eigenvalue per task: {', '.join(f'{e:.2f}' for e in facts['imaml_eig'])}), where CG "
      "amplifies rounding with each step: hence ~1e-13 after 5 steps against ~1e-15 after 3.",
      "- First-order MAML: higher drops the gradients' graph in `grad_callback`, torch.func "
      "detaches them; learn2learn has `first_order=True`.",
      "- The meta-objective is the mean over tasks of the query loss (the peers divide each "
      "task's loss by the task count); losses are means over examples.",
      "",
  ]
  common.write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
  main()
