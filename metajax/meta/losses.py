"""Losses and metrics on ``(inputs, targets)`` batches, with their inputs checked."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from metajax.solvers._result import RESULTS, error_if


def _pair(name: str, batch):
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise TypeError(f"{name}: batch must be a pair (inputs, targets), got "
                    f"{type(batch).__name__}{length}.")
  return batch


def mse_loss(apply_fn: Callable) -> Callable:
  """``loss_fn(params, (x, y))`` = mean squared error of ``apply_fn(params, x)``.

  Predictions and targets must have the same shape (no silent broadcasting of ``(n,)``
  targets against ``(n, 1)`` predictions).

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import mse_loss
    >>> loss = mse_loss(lambda p, x: p * x)
    >>> float(loss(2.0, (jnp.ones(3), jnp.zeros(3))))
    4.0
  """
  def loss_fn(params, batch):
    x, y = _pair("mse_loss", batch)
    pred = apply_fn(params, x)
    if jnp.shape(pred) != jnp.shape(y):
      raise ValueError(f"mse_loss: predictions have shape {jnp.shape(pred)} but targets have "
                       f"shape {jnp.shape(y)}; reshape the targets (no broadcasting).")
    if not jnp.issubdtype(jnp.result_type(y), jnp.inexact):
      y = jnp.asarray(y, jnp.result_type(pred))
    return jnp.mean((pred - y) ** 2)
  return loss_fn


def _check_labels(name: str, logits, labels):
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"{name}: labels must be integers, got dtype {jnp.result_type(labels)}.")
  if jnp.shape(logits)[:-1] != jnp.shape(labels):
    raise ValueError(f"{name}: logits have shape {jnp.shape(logits)}, so labels must have shape "
                     f"{jnp.shape(logits)[:-1]}; got {jnp.shape(labels)}.")
  num_classes = jnp.shape(logits)[-1]
  bad = jnp.any((labels < 0) | (labels >= num_classes))
  code = jnp.where(bad, RESULTS.invalid_input, RESULTS.successful)
  return error_if(logits, code, f"metajax {name}: labels must lie in [0, {num_classes})",
                  smallest_label=jnp.min(labels), largest_label=jnp.max(labels))


def cross_entropy_loss(apply_fn: Callable) -> Callable:
  """``loss_fn(params, (x, labels))`` = mean softmax cross-entropy of the logits.

  Labels must be integers in ``[0, num_classes)`` with the logits' leading shape; an
  out-of-range label raises (at run time under ``jit``), never wraps around or gives NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import cross_entropy_loss
    >>> loss = cross_entropy_loss(lambda p, x: x @ p)
    >>> round(float(loss(jnp.zeros((2, 2)), (jnp.ones((3, 2)), jnp.array([0, 1, 0])))), 4)
    0.6931
  """
  def loss_fn(params, batch):
    x, labels = _pair("cross_entropy_loss", batch)
    logits = apply_fn(params, x)
    logits = _check_labels("cross_entropy_loss", logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


def accuracy(apply_fn: Callable) -> Callable:
  """``metric(params, (x, labels))`` = fraction of argmax predictions equal to the labels.

  NaN when any logit is NaN or infinite (a diverged adaptation), never a chance-level score.

  Examples:
    >>> import jax.numpy as jnp
    >>> from metajax.meta import accuracy
    >>> float(accuracy(lambda p, x: x)(None, (jnp.eye(3), jnp.array([0, 1, 1]))))
    0.6666666865348816
  """
  def metric(params, batch):
    x, labels = _pair("accuracy", batch)
    logits = apply_fn(params, x)
    logits = _check_labels("accuracy", logits, labels)
    correct = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    # argmax of a NaN row is 0: a diverged model would score chance, not fail. NaN instead
    # (evaluate's confidence interval then refuses it, as it does a NaN loss).
    return jnp.where(jnp.all(jnp.isfinite(logits)), correct, jnp.nan)
  return metric

