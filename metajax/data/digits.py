"""scikit-learn's digits: real handwritten digits (8x8) that ship with the package."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metajax.data._common import group_by_class


def _check_classes(name: str, classes) -> list[int]:
  """``classes`` as a list of distinct ints in 0..9; otherwise raises, naming ``name``."""
  if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
    raise TypeError(f"{name} must be a sequence of digit classes (ints 0..9), got {classes!r}.")
  values = list(classes)
  if not values:
    raise ValueError(f"{name} is empty: give at least one digit class (0..9).")
  for c in values:
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
      raise TypeError(f"{name} must hold ints 0..9, got {c!r} in {values}.")
  outside = [int(c) for c in values if not 0 <= c <= 9]
  if outside:  # a negative index would silently pick a digit from the end
    raise ValueError(f"{name} holds {outside}, outside the digit classes 0..9.")
  repeated = sorted({int(c) for c in values if values.count(c) > 1})
  if repeated:
    raise ValueError(f"{name} repeats {repeated}: each class may appear once.")
  return [int(c) for c in values]


def load_digits(train_classes: Sequence[int] = (0, 1, 2, 3, 4),
                test_classes: Sequence[int] = (5, 6, 7, 8, 9)) -> dict[str, np.ndarray]:
  """Digits as class-indexed float32 arrays in [0, 1], disjoint meta-train/meta-test classes.

  Args:
    train_classes: meta-training digits: distinct ints in 0..9.
    test_classes: meta-test digits: distinct ints in 0..9, none of them in ``train_classes``.

  Returns:
    ``{'train': (len(train_classes), 174, 8, 8, 1), 'test': (...)}``, classes in the order
    given (every class is truncated to 174 examples, the smallest class size).

  Raises:
    TypeError, ValueError: a class list that is not a non-empty sequence of distinct ints in
      0..9, or classes in both lists; the message names the argument.

  Examples:
    >>> from metajax.data import load_digits
    >>> load_digits()['train'].shape
    (5, 174, 8, 8, 1)
  """
  train = _check_classes("train_classes", train_classes)
  test = _check_classes("test_classes", test_classes)
  overlap = set(train) & set(test)
  if overlap:
    raise ValueError(f"train_classes and test_classes overlap: {sorted(overlap)}.")
  try:
    from sklearn.datasets import load_digits as sklearn_digits
  except ImportError as err:
    raise ImportError("load_digits needs scikit-learn: pip install 'metajax[digits]'.") from err
  bunch = sklearn_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  smallest = int(np.bincount(bunch.target).min())  # 174
  grouped = group_by_class(images, bunch.target, per_class=smallest)  # (10, 174, 8, 8, 1)
  return {"train": grouped[np.asarray(train)], "test": grouped[np.asarray(test)]}
