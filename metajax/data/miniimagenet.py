"""miniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (2017) split files.

Nothing is downloaded. Expected layout (as distributed with Ravi & Larochelle's
split)::

  root/
    train.csv  val.csv  test.csv     # header "filename,label"; 64 / 16 / 20 classes
    images/n0153282900000005.jpg ... # 60,000 images (600 per class), any size

Images are resized to 84x84 (bilinear) RGB and stored as uint8.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from metajax.data._common import (
  cached,
  check_disjoint,
  check_positive_int,
  eight_bit,
  group_by_class,
  require_pillow,
)

SPLITS = ("train", "val", "test")
HEADER = ("filename", "label")


def _read_split(csv_path: str) -> tuple[list[str], list[str]]:
  """``(filenames, labels)`` listed in a split file with the header ``filename,label``."""
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM too
      rows = list(csv.reader(f))
  except UnicodeDecodeError as err:
    raise ValueError(f"{csv_path} is not a UTF-8 text CSV file ({err}).") from err
  if not rows:
    raise ValueError(f"{csv_path} is empty: expected the header 'filename,label' and one row "
                     "per image.")
  header = [name.strip() for name in rows[0]]
  if sorted(header) != sorted(HEADER):
    raise ValueError(f"{csv_path} has the header {','.join(rows[0])!r}, expected "
                     "'filename,label'.")
  file_col, label_col = header.index("filename"), header.index("label")
  filenames, labels, first_line = [], [], {}
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue  # a blank line
    if len(row) != 2 or not row[file_col].strip() or not row[label_col].strip():
      raise ValueError(f"{csv_path} line {line}: expected 'filename,label', got "
                       f"{','.join(row)!r}.")
    filenames.append(row[file_col].strip())
    labels.append(row[label_col].strip())
    if filenames[-1] in first_line:  # one drawing in support and query, or in two classes
      raise ValueError(f"{csv_path} lists {filenames[-1]} twice (lines {first_line[filenames[-1]]} "
                       f"and {line}); each image belongs to one class once.")
    first_line[filenames[-1]] = line
  if not filenames:
    raise ValueError(f"{csv_path} lists no images, only the header.")
  return filenames, labels


def _check_disjoint(root: str, splits: tuple[str, ...]) -> None:
  """Meta-test classes and images must not appear in another split (they would leak into
  meta-training and inflate the test accuracy)."""
  listed = {path: _read_split(path) for path in (os.path.join(root, f"{split}.csv")
                                                  for split in splits)}
  for kind, column in (("class", 1), ("image", 0)):
    check_disjoint(kind, [(path, rows[column]) for path, rows in listed.items()],
                   "the splits must be disjoint.")


def load_miniimagenet(root: str, *, splits=SPLITS, image_size: int = 84,
                      cache: bool = True) -> dict[str, np.ndarray]:
  """Class-indexed uint8 arrays ``(classes, 600, 84, 84, 3)`` for each requested split.

  Args:
    root: folder with the split CSV files and ``images/``.
    splits: which of ``train``, ``val``, ``test`` to load (a sequence of names).
    image_size: output height and width.
    cache: save each split as ``mini_<split>_<size>.npz`` in ``root`` and reuse it while
      its split file is unchanged (an edited ``<split>.csv`` rebuilds it).

  Raises:
    FileNotFoundError: ``root``, a split file or listed images are missing (named).
    ValueError: bad ``splits`` or ``image_size``, a malformed split file, classes with
      different numbers of images, an unreadable image or cache file; the message names
      the argument or file.

  Examples:
    >>> from metajax.data import load_miniimagenet
    >>> data = load_miniimagenet("~/data/miniimagenet", splits=("test",))  # doctest: +SKIP
  """
  image_size = check_positive_int("image_size", image_size)
  if isinstance(splits, str):
    raise TypeError(f"splits must be a sequence of split names such as ({splits!r},), not the "
                    f"string {splits!r}.")
  splits = tuple(splits)
  if not splits:
    raise ValueError(f"splits is empty; choose from {SPLITS}.")
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; choose from {SPLITS}.")
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"miniImageNet root {root} is not a directory: it must hold "
                            "Ravi & Larochelle's split files and images/.")
  Image = require_pillow("miniImageNet")
  image_dir = os.path.join(root, "images")
  for split in splits:
    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.exists(csv_path):
      raise FileNotFoundError(f"{csv_path} not found: place Ravi & Larochelle's split files "
                              "and images/ in root.")
  _check_disjoint(root, splits)
  out = {}
  for split in splits:
    csv_path = os.path.join(root, f"{split}.csv")

    def build(csv_path=csv_path):
      filenames, labels = _read_split(csv_path)
      try:  # (classes, per_class) indices into the rows; checked before decoding anything
        order = group_by_class(np.arange(len(labels)), np.asarray(labels))
      except ValueError as err:
        raise ValueError(f"{csv_path}: {err}") from None
      paths = [os.path.join(image_dir, name) for name in filenames]
      missing = [name for name, path in zip(filenames, paths) if not os.path.isfile(path)]
      if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} images listed in {csv_path} "
                                f"are missing from {image_dir}: {missing[:3]}"
                                f"{' ...' if len(missing) > 3 else ''}.")
      images = []
      for path in paths:
        try:
          with Image.open(path) as image:
            image = eight_bit(image, "RGB", f"{path} (listed in {csv_path})").resize(
                (image_size, image_size), Image.BILINEAR)
            images.append(np.asarray(image, np.uint8))
        except OSError as err:  # PIL.UnidentifiedImageError, truncated image data
          raise ValueError(f"{path} (listed in {csv_path}) is not a readable image "
                           f"({err}).") from err
      return {"images": np.stack(images)[order]}

    path = os.path.join(root, f"mini_{split}_{image_size}.npz") if cache else None
    expect = {"images": (None, None, image_size, image_size, 3)}
    # rebuilt when the split file changes (the images may be deleted once cached)
    out[split] = cached(path, build, expect=expect, sources=[csv_path])["images"]
  return out
