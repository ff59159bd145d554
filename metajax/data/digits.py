"""scikit-learn's digits: real handwritten digits (8x8) that ship with the package."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metajax.data._common import group_by_class


def load_digits(train_classes: Sequence[int] = (0, 1, 2, 3, 4),
                test_classes: Sequence[int] = (5, 6, 7, 8, 9)) -> dict[str, np.ndarray]:
  """Digits as class-indexed float32 arrays in [0, 1], disjoint meta-train/meta-test classes.

  Returns ``{'train': (len(train_classes), 174, 8, 8, 1), 'test': (...)}``
  (every class is truncated to 174 examples, the smallest class size).

  Example:
    >>> from metajax.data import load_digits
    >>> load_digits()['train'].shape
    (5, 174, 8, 8, 1)
  """
  try:
    from sklearn.datasets import load_digits as sklearn_digits
  except ImportError as err:
    raise ImportError("load_digits needs scikit-learn: pip install 'metajax[digits]'.") from err
  overlap = set(train_classes) & set(test_classes)
  if overlap:
    raise ValueError(f"train_classes and test_classes overlap: {sorted(overlap)}.")
  bunch = sklearn_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  grouped = group_by_class(images, bunch.target)  # (10, 174, 8, 8, 1), sorted by digit
  pick = lambda classes: grouped[np.asarray(classes, dtype=int)]
  return {"train": pick(train_classes), "test": pick(test_classes)}
