"""Device-varying types inside ``shard_map`` (``check_vma=True``): what the solvers need of them."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def varying_axes(tree: PyTree) -> frozenset:
  """The ``shard_map`` mesh axes along which some leaf of ``tree`` varies between devices."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    try:
      aval = jax.typeof(leaf)
    except TypeError:  # not an array (a Python number): invariant
      continue
    vma = getattr(aval, "vma", None)  # jax < 0.10 spells it vma, later manual_axis_type.varying
    if vma is None:
      vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    axes.update(vma)
  return frozenset(axes)


def vary_like(params: PyTree, *others: PyTree) -> PyTree:
  """``params`` made device-varying along every ``shard_map`` axis that ``others`` vary on.

  Inside ``shard_map`` (``check_vma=True``, the default) parameters passed in replicated are
  *invariant*, and JAX transposes the implicit broadcast of an invariant value into a ``psum``:
  the gradient of a device's support loss with respect to invariant parameters is summed over
  every device's tasks. That is right for the outer (meta-)gradient and wrong for an inner step,
  which must see its own task only. Marking the parameters varying before the inner loop keeps
  each device's adaptation local; the outer gradient with respect to the invariant input is still
  reduced by JAX (the transpose of this cast). Outside ``shard_map`` this returns ``params``.
  """
  if not in_manual_context():
    return params
  axes = varying_axes(others)
  if not axes:
    return params
  return jax.tree.map(lambda leaf: vary(leaf, axes), params)


def vary(x: jax.Array, axes) -> jax.Array:
  """``x`` made device-varying along ``axes`` (those it already varies on are skipped)."""
  missing = tuple(sorted(set(axes) - varying_axes(x)))
  if not missing:
    return x
  cast = getattr(jax.lax, "pcast", None)
  return cast(x, missing, to="varying") if cast else jax.lax.pvary(x, missing)


def in_manual_context() -> bool:
  """Whether the caller traces inside ``shard_map`` or ``pmap`` (mesh axes are manual)."""
  return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def refuse_varying(support: PyTree, solver: str, what: str, *, gd_works: bool = False) -> None:
  """Raises a clear error where ``what`` cannot run on device-varying values (``shard_map`` with
  ``check_vma=True``): JAX's varying-type check rejects loops in optax and diffrax that mix
  per-device and replicated values, with an error that does not say what to do."""
  if not varying_axes(support):
    return
  alternatives = ["metajax.meta.make_train_step(..., mesh=mesh, shard_map=True)",
                  "jax.shard_map(..., check_vma=False) with the meta-gradient reduced by "
                  "jax.lax.pmean"]
  if gd_works:
    alternatives.append("the default optimizer (inner_optimizers.barzilai_borwein()) or "
                        "inner_optimizers.gd(step_size)")
  raise NotImplementedError(
      f"metajax {solver} solver: {what} cannot run inside jax.shard_map with check_vma=True "
      "(its loops mix per-device and replicated values, which JAX's varying-type check "
      f"rejects); use {', or '.join(alternatives)}.")
