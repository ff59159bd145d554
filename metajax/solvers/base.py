"""The inner-solver contract: ``phi = adapt(params, support, **hyperparameters)``.

Every solver ([`unrolled`][metajax.solvers.unrolled], [`implicit`][metajax.solvers.implicit],
[`adjoint`][metajax.solvers.adjoint]) is an [`InnerSolver`][metajax.solvers.InnerSolver]: a callable
object whose static
settings are fixed at construction and whose call takes only arrays, so ``jax.jit(adapt)``,
``jax.vmap(adapt, in_axes=(None, 0))`` and ``jax.grad`` apply to it directly.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp

from metajax.solvers import _common, _vma
from metajax.solvers._result import RESULTS, AdaptInfo, nondifferentiable

PyTree = Any


class InnerSolver(abc.ABC):
  """An inner solver: ``adapt(params, support, **hyperparameters) -> phi``.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the support set. It may close over
      traced values (learned loss weights, per-task values under ``vmap``): every solver
      differentiates through them.
    throw: raise at run time when the solve fails (the default); with ``throw=False``
      ``solve`` reports the failure in ``AdaptInfo.result`` instead, and a traced
      hyperparameter out of range (``invalid_hyperparameter``) makes ``phi`` NaN.
    hyperparameters: names of the float hyperparameters that may be passed at call time
      (possibly traced, then they receive gradients), e.g. ``("step_size",)``.
  """

  name: str = "inner"
  hyperparameters: tuple[str, ...] = ()

  def __init__(self, loss_fn: Callable, *, throw: bool = True):
    _common.check_callable("loss_fn", loss_fn)
    if not isinstance(throw, bool):
      raise TypeError(f"throw must be True or False, got {throw!r}.")
    self.loss_fn, self.throw = loss_fn, throw
    self._bind_loss()

  def _bind_loss(self) -> None:  # noqa: B027 (a hook: most solvers derive nothing)
    """Recomputes whatever the solver derives from ``self.loss_fn`` (e.g. its gradient)."""

  def with_loss(self, loss_fn: Callable) -> InnerSolver:
    """This solver, with every setting kept, on another inner loss.

    The wrappers of [`metajax.solvers`][metajax.solvers] ([`masked`][metajax.solvers.masked],
    [`context`][metajax.solvers.context], [`learned_loss`][metajax.solvers.learned_loss]) use it to
    bind,
    per call, a loss that closes over traced meta-parameters.

    Examples:
      >>> import jax.numpy as jnp, metajax
      >>> adapt = metajax.solvers.unrolled(lambda p, b: jnp.sum((p - b) ** 2), steps=1,
      ...                                  step_size=0.25)
      >>> halved = adapt.with_loss(lambda p, b: 0.5 * jnp.sum((p - b) ** 2))
      >>> float(halved(jnp.zeros(()), jnp.ones(())))
      0.25
    """
    _common.check_callable("loss_fn", loss_fn)
    new = copy.copy(self)
    new.loss_fn = loss_fn
    new._bind_loss()
    return new

  def __call__(self, params: PyTree, support: PyTree, **hyperparameters) -> PyTree:
    """The adapted parameters (same structure as ``params``)."""
    return self.solve(params, support, **hyperparameters)[0]

  def solve(self, params: PyTree, support: PyTree, **hyperparameters) -> tuple[PyTree, AdaptInfo]:
    """The adapted parameters and an [`AdaptInfo`][metajax.solvers.AdaptInfo].

    With ``throw=True`` a failure still raises; with ``throw=False`` it is reported in
    ``info.result``. The info is not differentiable (reverse mode through it raises).
    """
    self._check_hyperparameter_names(hyperparameters)
    self._check_inputs(params, support)
    # Inside shard_map, the inner loop adapts to this device's tasks only (see vary_like).
    params = _vma.vary_like(params, support, hyperparameters)
    phi, info = self._solve(params, support, **hyperparameters)
    if not self.throw:
      # An out-of-range traced hyperparameter (a learned reg or t1 gone negative) is solved with
      # a stand-in value to keep the solve defined; its phi must not pass for an answer: NaN,
      # as unrolled gives, so a loss after it is NaN (nonfinite='skip' skips it).
      invalid = info.result == RESULTS.invalid_hyperparameter
      phi = jax.tree.map(lambda x: jnp.where(invalid, jnp.asarray(jnp.nan, x.dtype), x), phi)
    return phi, nondifferentiable(info)

  @abc.abstractmethod
  def _solve(self, params, support, **hyperparameters) -> tuple[PyTree, AdaptInfo]:
    ...

  def _check_hyperparameter_names(self, hyperparameters: dict) -> None:
    if "return_info" in hyperparameters:
      raise TypeError("return_info is not a call argument: use adapt.solve(params, support) "
                      "for (phi, AdaptInfo); static options never share the call's namespace.")
    unknown = sorted(set(hyperparameters) - set(self.hyperparameters))
    if unknown:
      raise TypeError(f"{self.name} solver got unknown call-time hyperparameters {unknown}; "
                      f"it accepts {list(self.hyperparameters)}.")

  def _check_inputs(self, params, support) -> None:
    _common.params_dtype(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(support):
      if hasattr(leaf, "shape") and 0 in leaf.shape:
        raise ValueError(f"support{jax.tree_util.keystr(path)} is empty (shape "
                         f"{tuple(leaf.shape)}): a task needs at least one support example.")
    call = f"{self.name} solver: loss_fn(params, support)"
    # flax's own errors (inputs of another width) pass the except clauses below: named here
    with _common.naming_model_inputs(call, support=support):
      try:
        out = jax.eval_shape(self.loss_fn, params, support)
      except (TypeError, ValueError) as err:
        raise type(err)(f"{call} failed on these params and support: {err}") from err
      except (KeyError, IndexError, AttributeError) as err:  # a lookup the params do not have
        keys = f" (params has the keys {sorted(params)})" if isinstance(params, dict) else ""
        raise ValueError(f"{call} failed on these params and support: {type(err).__name__}: "
                         f"{err}{keys}") from err
    if not hasattr(out, "shape") or out.shape != ():
      shape = getattr(out, "shape", type(out).__name__)
      raise ValueError(f"loss_fn(params, support) must return a scalar, got {shape}; reduce it "
                       "(e.g. with jnp.mean) over the batch.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
      raise TypeError(f"loss_fn(params, support) must return a floating-point scalar, got "
                      f"dtype {out.dtype}.")

  def __repr__(self) -> str:
    return f"metajax.solvers.{self.name}(loss_fn={getattr(self.loss_fn, '__name__', '...')})"
