"""PyTorch peers for the issue-6 workloads: second-order MAML with torch.func, higher and TorchOpt.

Each builder returns ``step()``, one meta-iteration (second-order MAML, K plain SGD inner steps,
Adam 1e-3 outer update, finished on the device before it returns) on a fixed task batch of
``torch`` tensors, on CUDA when torch sees a GPU and on the CPU otherwise:
``support_x (B, n, ...)``, ``support_y``, ``query_x``, ``query_y``. The networks match metajax's:
the sinusoid MLP 1-40-40-1 ReLU and MAML's Omniglot Conv4 (4 x [3x3 conv stride 2, 64 filters,
batch norm with the task's own statistics, ReLU], linear head). Install with
``pip install -e ".[peers]"``; nothing in ``metajax`` imports torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PEERS = ("torch.func", "torchopt", "higher")


def mlp() -> nn.Module:
  return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                       nn.Linear(40, 1))


def conv4(ways: int = 5, filters: int = 64) -> nn.Module:
  layers, channels = [], 1
  for _ in range(4):
    layers += [nn.Conv2d(channels, filters, 3, stride=2, padding=1),
               nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU()]
    channels = filters
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * 2 * 2, ways))


def device() -> torch.device:
  """Where the peers run: the first CUDA GPU when torch sees one, else the CPU."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def task_batch(workload: str, meta_batch: int, seed: int = 0):
  """Random tasks shaped like the workload (inputs only matter for speed), on :func:`device`."""
  g = torch.Generator().manual_seed(seed)
  if workload == "sinusoid":
    make = lambda n: (torch.rand(meta_batch, n, 1, generator=g) * 10 - 5,
                      torch.randn(meta_batch, n, 1, generator=g))
    (sx, sy), (qx, qy) = make(10), make(10)
  else:  # 5-way 1-shot, 15 queries per class, 28x28x1
    sx = torch.rand(meta_batch, 5, 1, 28, 28, generator=g)
    qx = torch.rand(meta_batch, 75, 1, 28, 28, generator=g)
    sy = torch.arange(5).repeat(meta_batch, 1)
    qy = torch.arange(5).repeat_interleave(15).repeat(meta_batch, 1)
  return tuple(t.to(device()) for t in (sx, sy, qx, qy))


def _loss(workload: str):
  return F.mse_loss if workload == "sinusoid" else F.cross_entropy


def make_step(peer: str, workload: str, steps: int, step_size: float, batch):
  """One second-order MAML meta-iteration with ``peer``; returns ``step() -> loss``."""
  torch.manual_seed(0)
  model = (mlp() if workload == "sinusoid" else conv4()).to(device())
  loss_fn = _loss(workload)
  meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  sx, sy, qx, qy = batch
  tasks = sx.shape[0]

  if peer == "torch.func":
    from torch.func import functional_call, grad, vmap
    params = dict(model.named_parameters())

    def loss(p, x, y):
      return loss_fn(functional_call(model, p, (x,)), y)

    def task_loss(p, x_s, y_s, x_q, y_q):
      for _ in range(steps):
        g = grad(loss)(p, x_s, y_s)
        p = {k: p[k] - step_size * g[k] for k in p}
      return loss(p, x_q, y_q)

    def meta_loss(p):
      return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy).mean()

    def step():
      meta_opt.zero_grad()
      grads = grad(meta_loss)(params)
      for k, v in params.items():
        v.grad = grads[k]
      meta_opt.step()

  elif peer == "higher":
    import higher
    inner_opt = torch.optim.SGD(model.parameters(), lr=step_size)

    def step():
      meta_opt.zero_grad()
      for t in range(tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diff):
          for _ in range(steps):
            diff.step(loss_fn(fmodel(sx[t]), sy[t]))
          (loss_fn(fmodel(qx[t]), qy[t]) / tasks).backward()
      meta_opt.step()

  elif peer == "torchopt":
    import torchopt
    inner_opt = torchopt.MetaSGD(model, lr=step_size)

    def step():
      meta_opt.zero_grad()
      initial = torchopt.extract_state_dict(model)
      for t in range(tasks):
        for _ in range(steps):
          inner_opt.step(loss_fn(model(sx[t]), sy[t]))
        (loss_fn(model(qx[t]), qy[t]) / tasks).backward()
        torchopt.recover_state_dict(model, initial)
      meta_opt.step()

  else:
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}.")
  if device().type == "cuda":
    def synchronized_step():
      step()
      torch.cuda.synchronize()
    return synchronized_step
  return step
