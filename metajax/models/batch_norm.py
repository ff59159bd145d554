"""Batch norm in the inner loop: per-step parameters (MAML++), stored statistics, frozen statistics.

Utilities over the parameters of [`metajax.models.Conv4`][metajax.models.Conv4] /
[`ResNet12`][metajax.models.ResNet12] built with
``norm="per_step"`` or ``norm="frozen"`` (see ``metajax.models.conv``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def _per_step_rows(tree, found: list) -> None:
  """Collects the leading-axis sizes of per-step batch-norm ``scale``/``bias`` pairs."""
  if not isinstance(tree, Mapping):
    return
  if _is_per_step_layer(tree):
    found.append(tree["scale"].shape[0])
  for value in tree.values():
    _per_step_rows(value, found)


def _is_per_step_layer(node) -> bool:
  """A ``norm="per_step"`` [`BatchNorm`][metajax.models.BatchNorm]: 2-D ``scale`` and ``bias`` of
  one shape."""
  scale, bias = node.get("scale"), node.get("bias")
  return (getattr(scale, "ndim", None) == 2 and getattr(bias, "ndim", None) == 2
          and scale.shape == bias.shape)


def _roll_per_step(tree, shift):
  if not isinstance(tree, Mapping):
    return tree
  rolled = {k: _roll_per_step(v, shift) for k, v in tree.items()}
  if _is_per_step_layer(tree):
    rolled["scale"] = jnp.roll(tree["scale"], -shift, axis=0)
    rolled["bias"] = jnp.roll(tree["bias"], -shift, axis=0)
  return type(tree)(rolled) if not isinstance(tree, dict) else rolled


def select_step(params, step: int | jax.Array):
  """Rotates per-step batch-norm parameters so that inner step ``step``'s entry is row 0.

  Use inside a loss for MAML++-style per-step batch norm (``norm="per_step"``). Only the
  ``scale``/``bias`` of per-step layers move (pairs of 2-D arrays of shape
  ``(num_steps, features)``); every other leaf, including the 1-D ``scale``/``bias`` of other
  batch-norm modes, is returned unchanged.

  Out-of-range steps:

  - a Python (or NumPy) int outside ``[0, num_steps)`` raises ``ValueError``;
  - a ``jax.Array`` step (traced, as in [`metajax.solvers.unrolled`][metajax.solvers.unrolled] with
    ``step_aware=True``, or concrete) is clamped to ``[0, num_steps - 1]``: steps past the
    last entry use the last one, as MAML++ does when it evaluates the query set after the
    final inner step. The result is the same with or without ``jit``.

  Args:
    params: parameters of a model with ``norm="per_step"`` batch norm.
    step: the inner step, a scalar int.

  Raises:
    ValueError: ``params`` has no per-step batch-norm layer, its layers disagree on
      ``num_steps``, or an int ``step`` is out of range.
    TypeError: ``step`` is not an integer scalar.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, select_step
    >>> params, apply_fn = init_model(Conv4(5, filters=4, norm="per_step", num_steps=3),
    ...                               jax.random.key(0), (28, 28, 1))
    >>> apply_fn(select_step(params, 2), jnp.zeros((2, 28, 28, 1))).shape
    (2, 5)
  """
  rows: list = []
  _per_step_rows(params, rows)
  if not rows:
    raise ValueError("select_step found no per-step batch-norm parameters in params (scale "
                     "and bias of shape (num_steps, features)); build the model with "
                     "norm='per_step'.")
  if len(set(rows)) != 1:
    raise ValueError(f"select_step: the per-step batch-norm layers of params disagree on "
                     f"num_steps: {sorted(set(rows))}.")
  num_steps = rows[0]
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"step must be an integer scalar, got {step!r}.")
  if isinstance(step, (int, np.integer)):
    if not 0 <= step < num_steps:
      raise ValueError(f"step={int(step)} is out of range for per-step batch norm with "
                       f"num_steps={num_steps}: it must be in [0, {num_steps - 1}].")
    shift = int(step)
  else:
    dtype, shape = getattr(step, "dtype", None), getattr(step, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or shape != ():
      shown = f"dtype {dtype}, shape {shape}" if dtype is not None else repr(step)
      raise TypeError(f"step must be an integer scalar (the inner step), got {shown}.")
    shift = jnp.clip(step, 0, num_steps - 1)
  return _roll_per_step(params, shift)


def calibrate_batch_stats(params, apply_fn: Callable | None, images, *,
                          module: nn.Module | None = None):
  """Sets the stored statistics of a ``norm="frozen"`` model from a batch of images.

  Runs a transductive copy of the network on ``images`` and writes each layer's
  batch mean and variance into ``params[...]['mean'/'var']``.

  Args:
    params: parameters of a model built with ``norm="frozen"``.
    apply_fn: the ``apply_fn`` of [`init_model`][metajax.models.init_model], which carries the
      module; may be ``None`` (or a wrapped function) when ``module`` is given.
    images: a batch ``(N, H, W, C)`` of floating-point images, scaled as in training
      (uint8 images are rejected: [`metajax.tasks.episodes`][metajax.tasks.episodes] scales them to
      [0, 1]).
    module: the flax module behind ``params`` (overrides ``apply_fn.module``).

  Returns:
    ``params`` with every frozen layer's ``mean``/``var`` replaced.

  Raises:
    TypeError, ValueError: no module is available, the module has no ``norm="frozen"``
      layers, ``params`` stores no statistics, or ``images`` is not a floating rank-4 batch.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metajax.models import Conv4, init_model, calibrate_batch_stats
    >>> module = Conv4(5, filters=4, norm="frozen")
    >>> params, apply_fn = init_model(module, jax.random.key(0), (28, 28, 1))
    >>> params = calibrate_batch_stats(params, apply_fn, jnp.ones((8, 28, 28, 1)))
    >>> wrapped = lambda p, x: apply_fn(p, x)  # no .module: name it
    >>> params = calibrate_batch_stats(params, wrapped, jnp.ones((8, 28, 28, 1)), module=module)
  """
  if module is None:
    module = getattr(apply_fn, "module", None)
    if module is None:
      raise TypeError("calibrate_batch_stats needs the flax module behind params: apply_fn "
                      f"({getattr(apply_fn, '__name__', type(apply_fn).__name__)}) has no "
                      ".module attribute (only init_model's apply_fn carries one); pass "
                      "module=, e.g. calibrate_batch_stats(params, apply_fn, images, "
                      "module=Conv4(..., norm='frozen')).")
  if not isinstance(module, nn.Module) or not hasattr(module, "norm"):
    raise TypeError(f"module must be a flax.linen module with a norm attribute (Conv4, "
                    f"ResNet12), got {type(module).__name__}.")
  if module.norm != "frozen":
    raise ValueError(f"calibrate_batch_stats needs a model with norm='frozen' layers (stored "
                     f"statistics to set), got {type(module).__name__} with "
                     f"norm={module.norm!r}.")
  stored: list = []
  jax.tree_util.tree_map_with_path(
      lambda path, _: stored.append(path) if _leaf_name(path) in ("mean", "var") else None,
      params)
  if not stored:
    raise ValueError("params stores no batch-norm statistics ('mean'/'var'): they are not the "
                     "parameters of a norm='frozen' model.")
  if not (hasattr(images, "ndim") and hasattr(images, "dtype")):
    raise TypeError(f"images must be an array (N, H, W, C), got {type(images).__name__}.")
  if images.ndim != 4:
    raise ValueError(f"images must be a batch of NHWC images (N, H, W, C), got shape "
                     f"{tuple(images.shape)} (rank {images.ndim}); for episodes' "
                     "(num_classes, examples, H, W, C) arrays, reshape to (-1, H, W, C).")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating-point and scaled as in training, got dtype "
                    f"{images.dtype} (scale uint8 images to [0, 1]).")
  transductive = module.clone(norm="transductive")
  _, state = transductive.apply({"params": _drop_stats(params)}, images,
                                mutable=["intermediates"])
  return _write_stats(params, state["intermediates"])


def _leaf_name(path):
  return getattr(path[-1], "key", None) if path else None


def freeze_batch_stats(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps an optax optimizer so that stored batch-norm statistics never move.

  ``norm="frozen"`` keeps its ``mean``/``var`` in the trainable ``params`` with a zero
  gradient. Plain gradient steps leave them alone, but weight decay (``optax.adamw``,
  ``add_decayed_weights``) shrinks them towards zero. This wrapper sends every leaf named
  ``mean`` or ``var`` to ``optax.set_to_zero()`` and all others to ``optimizer``
  (``optax.multi_transform``); it works for the outer optimizer and for an inner ``optax``
  optimizer, and for Meta-SGD's ``{"params", "step_size"}`` pytrees too.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from metajax.models import freeze_batch_stats
    >>> params = {"BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2),
    ...                           "mean": jnp.ones(2), "var": jnp.ones(2)}}
    >>> opt = freeze_batch_stats(optax.adamw(0.1, weight_decay=0.5))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> float(jnp.abs(updates["BatchNorm_0"]["mean"]).max())
    0.0
  """
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(f"optimizer must be an optax GradientTransformation, got "
                    f"{type(optimizer).__name__}.")

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _leaf_name(path) in ("mean", "var") else "trainable", params)

  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def _drop_stats(tree):
  if isinstance(tree, Mapping):
    return {k: _drop_stats(v) for k, v in tree.items() if k not in ("mean", "var")}
  return tree


def _write_stats(params, stats):
  if not isinstance(params, Mapping):
    return params
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping) and "mean" in v and k in stats:
      mean, var = stats[k]["batch_stats"][0]
      out[k] = {**v, "mean": mean, "var": var}
    else:
      out[k] = _write_stats(v, stats.get(k, {})) if isinstance(v, Mapping) else v
  return out
