"""Helpers shared by the dataset loaders."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def group_by_class(images, labels, *, per_class: int | None = None) -> np.ndarray:
  """Stacks images into ``(num_classes, per_class, ...)`` in sorted label order.

  Classes with more than ``per_class`` examples are truncated (first ones kept);
  ``per_class=None`` uses the smallest class size.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels.")
  classes = np.unique(labels)
  counts = np.array([(labels == c).sum() for c in classes])
  size = int(counts.min()) if per_class is None else per_class
  if counts.min() < size:
    raise ValueError(f"class {classes[counts.argmin()]} has {counts.min()} examples, "
                     f"fewer than per_class={size}.")
  return np.stack([images[labels == c][:size] for c in classes])


def cached(path: str | None, build):
  """Loads ``{'name': array}`` from the ``.npz`` at ``path``, else builds and saves it."""
  if path and os.path.exists(path):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  arrays = build()
  if path:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  return arrays


def require_pillow(purpose: str):
  try:
    from PIL import Image
  except ImportError as err:
    raise ImportError(f"{purpose} needs pillow: pip install 'metajax[omniglot]'.") from err
  return Image
