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

from metajax.data._common import cached, group_by_class, require_pillow

SPLITS = ("train", "val", "test")


def load_miniimagenet(root: str, *, splits=SPLITS, image_size: int = 84,
                      cache: bool = True) -> dict[str, np.ndarray]:
  """Class-indexed uint8 arrays ``(classes, 600, 84, 84, 3)`` for each requested split.

  Args:
    root: folder with the split CSV files and ``images/``.
    splits: which of ``train``, ``val``, ``test`` to load.
    image_size: output height and width.
    cache: save each split as ``mini_<split>_<size>.npz`` in ``root`` and reuse it.

  Example:
    >>> from metajax.data import load_miniimagenet
    >>> data = load_miniimagenet("~/data/miniimagenet", splits=("test",))  # doctest: +SKIP
  """
  root = os.path.expanduser(root)
  Image = require_pillow("miniImageNet")
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; choose from {SPLITS}.")
  out = {}
  for split in splits:
    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.exists(csv_path):
      raise FileNotFoundError(f"{csv_path} not found: place Ravi & Larochelle's split files "
                              "and images/ in root.")

    def build(csv_path=csv_path):
      with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
      if not rows or set(rows[0]) != {"filename", "label"}:
        raise ValueError(f"{csv_path} must have the header 'filename,label'.")
      images = []
      for row in rows:
        with Image.open(os.path.join(root, "images", row["filename"])) as image:
          image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
          images.append(np.asarray(image, np.uint8))
      labels = [row["label"] for row in rows]
      return {"images": group_by_class(np.stack(images), np.asarray(labels))}

    path = os.path.join(root, f"mini_{split}_{image_size}.npz") if cache else None
    out[split] = cached(path, build)["images"]
  return out
