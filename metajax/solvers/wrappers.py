"""Wrappers that change *what* an inner solver adapts, for every solver.

- [`masked`][metajax.solvers.masked]: adapt a subset of the parameters (ANIL adapts the head, BOIL
the body); the
  rest stays a meta-parameter and still receives its meta-gradient through the adapted part.
- [`context`][metajax.solvers.context]: adapt a context vector fed to the network from zero on every
task, the
  network weights being meta-parameters only (CAVIA).
- [`learned_loss`][metajax.solvers.learned_loss]: an inner loss with meta-learned parameters of its
own (ML3-style
  learned losses, learned regularizers), passed at call time as ``loss_params``.

Each binds, per call, a loss that closes over the (traced) values it holds fixed
([`InnerSolver.with_loss`][metajax.solvers.InnerSolver.with_loss]); every solver differentiates
through such closures.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from metajax.solvers import _common
from metajax.solvers.base import InnerSolver

PyTree = Any


class _Wrapper(InnerSolver):
  """An inner solver that runs ``solver`` on another problem."""

  def __init__(self, solver: InnerSolver, kind: str):
    if not isinstance(solver, InnerSolver):
      raise TypeError(f"{kind}(solver, ...) wraps a metajax inner solver (unrolled(...), "
                      f"implicit(...), adjoint(...)), got {solver!r}.")
    self.solver, self.name = solver, f"{kind}({solver.name})"
    self.loss_fn, self.throw = solver.loss_fn, solver.throw
    self.hyperparameters = solver.hyperparameters

  def _bind_loss(self) -> None:
    self.solver = self.solver.with_loss(self.loss_fn)

  def __repr__(self) -> str:
    return f"metajax.solvers.{self.name.split('(')[0]}({self.solver!r})"


# -- partial adaptation -------------------------------------------------------------------------
def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_mask(pattern: str, *, invert: bool = False) -> Callable[[PyTree], PyTree]:
  """A mask for [`masked`][metajax.solvers.masked]: the leaves whose path matches the regular
  expression ``pattern``.

  Paths are written ``"Dense_2/kernel"`` (dict keys, attribute names and indices joined by
  ``/``). A leaf is selected when the pattern matches the whole of its path or of a leading part
  of it (``re.fullmatch`` on ``"Dense_2"`` and ``"Dense_2/kernel"``): ``"Dense_1"`` selects
  the layer ``Dense_1``, never ``Dense_10``; ``".*/kernel"`` selects every kernel.

  Args:
    pattern: a regular expression.
    invert: select the leaves that do *not* match (e.g. BOIL: everything but the head).

  Returns:
    ``mask(params) -> pytree of bools``; it raises ``ValueError`` listing the paths when no
    leaf matches the pattern (with or without ``invert``: a misspelt pattern inverted would
    select everything) or, with ``invert``, every leaf does.

  Examples:
    >>> import jax.numpy as jnp, metajax
    >>> params = {'body': jnp.ones(2), 'head': jnp.ones(3)}
    >>> metajax.solvers.path_mask('head')(params)
    {'body': False, 'head': True}
  """
  if not isinstance(pattern, str):
    raise TypeError(f"pattern must be a regular expression string, got {pattern!r}.")
  try:
    regex = re.compile(pattern)
  except re.error as err:
    raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}.") from err
  if not isinstance(invert, bool):
    raise TypeError(f"invert must be True or False, got {invert!r}.")

  def matches(name: str) -> bool:
    parts = name.split("/")
    return any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1))

  def mask(params):
    names = [_path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    matched = [matches(n) for n in names]
    if invert and not any(matched):  # a typo would select every leaf (BOIL becomes MAML)
      raise ValueError(f"path_mask({pattern!r}, invert=True): the pattern matches no parameter "
                       f"path, so inverting it would select every parameter; the parameter "
                       f"paths are {names}.")
    hits = [m != invert for m in matched]
    if not any(hits):
      raise ValueError(f"path_mask({pattern!r}{', invert=True' if invert else ''}) selects no "
                       f"parameter; the parameter paths are {names}.")
    return jax.tree.unflatten(jax.tree.structure(params), hits)

  return mask


class Masked(_Wrapper):
  """Adapts the leaves of ``params`` where ``mask`` is True (see
  [`masked`][metajax.solvers.masked])."""

  def __init__(self, solver, mask):
    super().__init__(solver, "masked")
    if isinstance(solver, Context):
      raise TypeError("masked cannot wrap context(...): context already chooses what adapts (the "
                      "context vector); wrap the inner solver instead.")
    if isinstance(mask, str):
      raise TypeError(f"mask must be a pytree of bools or a function of params, got the string "
                      f"{mask!r}; for parameters by name use path_mask({mask!r}).")
    if not callable(mask) and not jax.tree.leaves(mask):
      raise ValueError("mask is empty: pass a pytree of bools like params (True: adapt) or a "
                       "function params -> such a pytree.")
    self.mask = mask

  def resolve_mask(self, params: PyTree) -> PyTree:
    """``mask`` as a pytree of Python bools with exactly the structure of ``params``."""
    mask = self.mask(params) if callable(self.mask) else self.mask
    try:  # a prefix of params' structure broadcasts (optax.masked's convention)
      full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    except ValueError as err:
      raise ValueError(f"mask has structure {jax.tree.structure(mask)}, which is neither the "
                       f"structure of params {jax.tree.structure(params)} nor a prefix of "
                       "it.") from err
    for path, m in jax.tree_util.tree_leaves_with_path(full):
      if not isinstance(m, (bool, jnp.bool_)):
        raise TypeError(f"mask{jax.tree_util.keystr(path)} is {m!r}; mask leaves must be Python "
                        "bools (True: adapt), fixed when the program is traced.")
    if not any(jax.tree.leaves(full)):
      raise ValueError("mask selects no parameter: nothing would be adapted.")
    return full

  def split(self, params: PyTree, mask: PyTree | None = None):
    """``(adapted, merge)``: the masked leaves (``None`` elsewhere) and the inverse of the split."""
    mask = self.resolve_mask(params) if mask is None else mask
    adapted = jax.tree.map(lambda m, p: p if m else None, mask, params)
    merge = lambda sub: jax.tree.map(lambda m, p, a: a if m else p, mask, params, sub)
    return adapted, merge

  def _check_inputs(self, params, support):  # the sub-problem is checked by solver.solve
    _common.params_dtype(params)
    self.resolve_mask(params)

  def _hyperparameter(self, name, value, mask, structure):
    """A per-parameter hyperparameter (Meta-SGD rates), given for the full params, masked as
    they are; anything else as is."""
    if name == "loss_params":
      return value
    if jax.tree.structure(value) == structure:
      return self.split(value, mask)[0]
    if isinstance(value, (dict, list, tuple)) and any(
        hasattr(x, "shape") for x in jax.tree.leaves(value)):
      raise ValueError(f"masked: {name} has structure {jax.tree.structure(value)}; a "
                       f"per-parameter {name} is given for the full params {structure} (the "
                       "unadapted leaves' entries are ignored).")
    return value

  def _solve(self, params, support, **hyperparameters):
    mask = self.resolve_mask(params)
    adapted, merge = self.split(params, mask)
    structure = jax.tree.structure(params)
    for name in self.solver.hyperparameters:  # a per-parameter value given at construction
      own = getattr(self.solver, name, None)
      if name not in hyperparameters and own is not None and structure.num_leaves > 1 \
          and jax.tree.structure(own) == structure:
        hyperparameters[name] = own
    hyperparameters = {name: self._hyperparameter(name, value, mask, structure)
                       for name, value in hyperparameters.items()}
    inner = self.solver.with_loss(lambda sub, batch, *step: self.loss_fn(merge(sub), batch,
                                                                         *step))
    phi, info = inner.solve(adapted, support, **hyperparameters)
    return merge(phi), info


def masked(solver: InnerSolver, mask) -> Masked:
  """Adapt only part of the parameters: ANIL (the head), BOIL (the body), any subset.

  The inner problem is ``solver``'s on the masked leaves, the others held at their
  meta-parameter values; the adapted parameters hold the unmasked leaves unchanged. The unmasked
  leaves still receive a meta-gradient: directly through the query loss and, through the
  adapted leaves, as values the inner loss depends on (backpropagation for ``unrolled``, the
  implicit function theorem for ``implicit``, the adjoint ODE for ``adjoint``).

  Args:
    solver: any inner solver, built with a ``loss_fn`` on the *full* parameters.
    mask: a pytree of bools with the structure of ``params`` (or a prefix of it; ``True``:
      adapt), or a function ``params -> such a pytree`` such as
      [`path_mask`][metajax.solvers.path_mask].

  Returns:
    An [`InnerSolver`][metajax.solvers.InnerSolver] taking ``solver``'s call-time hyperparameters; a
    per-parameter one (Meta-SGD's ``step_size`` tree) is given for the full ``params`` and
    masked the same way. With ``implicit`` the proximal term covers the adapted leaves only.

  Raises:
    TypeError, ValueError: at call time, when the mask's structure does not fit ``params``,
      a leaf is not a bool, or it selects nothing.

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> loss = lambda p, b: jnp.mean((b[0] @ p['body'] @ p['head'] - b[1]) ** 2)
    >>> anil = metajax.solvers.masked(metajax.solvers.unrolled(loss, steps=2, step_size=0.1),
    ...                               {'body': False, 'head': True})
    >>> params = {'body': jnp.eye(2), 'head': jnp.zeros(2)}
    >>> phi = anil(params, (jnp.ones((3, 2)), jnp.ones(3)))
    >>> bool((phi['body'] == params['body']).all()), bool((phi['head'] != 0).all())
    (True, True)
  """
  return Masked(solver, mask)


# -- CAVIA ----------------------------------------------------------------------------------------
class Context(_Wrapper):
  """Adapts a context vector from zero, the network weights fixed (see
  [`context`][metajax.solvers.context])."""

  def __init__(self, solver, shape):
    super().__init__(solver, "context")
    if isinstance(solver, Context):
      raise TypeError("context cannot wrap context(...): the model takes one context; give "
                      "context(solver, shape) the shape of the whole context instead.")
    if getattr(solver, "per_step", False):
      raise TypeError("context cannot wrap unrolled(..., per_step=True): its (steps,) rates "
                      "would be read as one rate per context entry; give the context one step "
                      "size, or one per entry, for all steps.")
    is_int = lambda n: isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
    if is_int(shape):
      shape = (shape,)
    if not (isinstance(shape, tuple) and shape and all(is_int(n) and n >= 1 for n in shape)):
      raise ValueError(f"context shape must be a positive int or a tuple of them, got {shape!r}.")
    self.shape = tuple(int(n) for n in shape)

  @property
  def _masked(self) -> Masked:
    """The solver on ``{'params': ..., 'context': ...}``, adapting the context only."""
    return Masked(self.solver, {"params": False, "context": True})

  def initial(self, params: PyTree) -> PyTree:
    """``{'params': params, 'context': zeros(shape)}``: where every task's adaptation starts."""
    dtype = _common.params_dtype(params)
    return {"params": params, "context": jnp.zeros(self.shape, dtype)}

  def _check_inputs(self, params, support):
    self._masked._check_inputs(self.initial(params), support)

  def _solve(self, params, support, **hyperparameters):
    for name in self.solver.hyperparameters:  # one rate per context entry, given at construction
      own = getattr(self.solver, name, None)
      if name not in hyperparameters and isinstance(own, (jax.Array, np.ndarray)) and own.ndim:
        hyperparameters[name] = own
    for name, value in hyperparameters.items():
      if name == "loss_params" or not any(jnp.ndim(x) for x in jax.tree.leaves(value)):
        continue
      if isinstance(value, (jax.Array, np.ndarray)) and value.shape == self.shape:
        # one per context entry (Meta-SGD on the context): the wrapped solver takes a
        # per-parameter value for the full {'params', 'context'}; the params part is masked off
        hyperparameters[name] = {"params": jax.tree.map(jnp.zeros_like, params), "context": value}
      elif jax.tree.structure(value) == jax.tree.structure(params) and all(
          jnp.shape(v) == jnp.shape(p) for v, p in zip(jax.tree.leaves(value),
                                                       jax.tree.leaves(params))):
        raise ValueError(f"context adapts only the context vector: {name} shaped like params "
                         f"(per-parameter) does not apply; pass a scalar, or an array of the "
                         f"context's shape {self.shape} (one per entry).")
      else:
        shapes = jax.tree.map(jnp.shape, value)
        raise ValueError(f"context: {name} must be a scalar or an array of the context's shape "
                         f"{self.shape} (one per entry), got shape {shapes}.")
    return self._masked._solve(self.initial(params), support, **hyperparameters)


def context(solver: InnerSolver, shape: int | tuple[int, ...]) -> Context:
  """CAVIA: adapt a task's context vector, starting from zero; the network is meta-learned only.

  ``adapt = context(solver, shape)`` is called with the network's parameters ``theta`` and
  returns ``{'params': theta, 'context': c}``, where ``c`` is ``solver``'s adaptation of a
  context started at ``zeros(shape)`` on the support loss with ``theta`` held fixed. ``solver``'s
  ``loss_fn`` (and the query loss of [`meta_objective`][metajax.meta.meta_objective]) take that
  dict, e.g.
  through [`metajax.models.with_context`][metajax.models.with_context], which feeds the context to
  the network's input.
  ``theta`` receives its meta-gradient through the query loss and through ``c``. Reptile does not
  apply (the adapted value has another structure than ``theta``). A call-time hyperparameter is
  a scalar or, for ``unrolled``'s ``step_size``, an array of the context's shape: one rate per
  context entry (Meta-SGD on the context, learnable with ``learn=('step_size',)``).

  Args:
    solver: any inner solver, built with a ``loss_fn`` on ``{'params': ..., 'context': ...}``.
    shape: the context's shape (CAVIA's regression uses 4, its classification 100).

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> apply_fn = metajax.models.with_context(lambda w, x: x @ w)
    >>> loss = metajax.meta.mse_loss(apply_fn)
    >>> adapt = metajax.solvers.context(metajax.solvers.unrolled(loss, steps=1, step_size=0.5),
    ...                                 shape=1)
    >>> phi = adapt(jnp.ones((2, 1)), (jnp.zeros((4, 1)), jnp.ones((4, 1))))
    >>> phi['context'].tolist()
    [1.0]
  """
  return Context(solver, shape)


# -- learned inner losses -------------------------------------------------------------------------
class LearnedLoss(_Wrapper):
  """Runs ``solver`` on ``loss_fn(params, batch, loss_params)`` (see
  [`learned_loss`][metajax.solvers.learned_loss])."""

  def __init__(self, solver):
    super().__init__(solver, "learned_loss")
    self.hyperparameters = tuple(solver.hyperparameters) + ("loss_params",)
    extra = 2 if getattr(solver, "step_aware", False) else 1
    if not _common.takes_positional(solver.loss_fn, 2 + extra):
      raise TypeError("learned_loss calls loss_fn(params, batch, loss_params"
                      + (", step" if extra == 2 else "") + "), but the solver's loss_fn does "
                      "not take that many arguments; build the solver with such a loss.")

  def _check_inputs(self, params, support):
    """Checked by the bound solver, once ``loss_params`` is known."""

  def _solve(self, params, support, *, loss_params=None, **hyperparameters):
    if loss_params is None:
      raise TypeError("learned_loss: pass loss_params= at call time (the inner loss's "
                      "parameters), or meta_objective(..., learn=('loss_params',)) with "
                      "meta_params={'params': ..., 'loss_params': ...}.")
    inner = self.solver.with_loss(
        lambda p, batch, *step: self.loss_fn(p, batch, loss_params, *step))
    return inner.solve(params, support, **hyperparameters)


def learned_loss(solver: InnerSolver) -> LearnedLoss:
  """An inner loss with meta-learned parameters (ML3, learned regularizers, procedural biases).

  ``solver`` is built with ``loss_fn(params, batch, loss_params)`` (with ``step_aware``:
  ``loss_fn(params, batch, loss_params, step)``); the wrapped solver takes ``loss_params`` as a
  call-time hyperparameter, any pytree, so ``meta_objective(adapt, query_loss,
  learn=("loss_params",))`` meta-learns it from ``meta_params = {'params': theta,
  'loss_params': psi}``. Works with every solver: ``unrolled`` backpropagates through the
  steps; ``implicit`` solves ``argmin loss(phi; psi) + reg/2 ||phi - theta||^2`` and gets
  ``d phi / d psi`` from the implicit function theorem; ``adjoint`` from the adjoint ODE.

  Examples:
    >>> import jax, jax.numpy as jnp, metajax
    >>> inner = lambda p, b, psi: jnp.mean((b[0] * p - b[1]) ** 2) + psi * p ** 2
    >>> adapt = metajax.solvers.learned_loss(metajax.solvers.unrolled(inner, steps=1,
    ...                                                                step_size=0.1))
    >>> support = (jnp.ones(3), jnp.ones(3))
    >>> round(float(jax.grad(lambda psi: adapt(jnp.array(1.0), support, loss_params=psi))(0.0)), 4)
    -0.2
  """
  return LearnedLoss(solver)
