"""Omniglot (Lake et al. 2015), read from the official archives or through tensorflow-datasets.

Nothing is downloaded. Two routes:

1. **Direct (pillow only).** Place ``images_background.zip`` and
   ``images_evaluation.zip`` (github.com/brendenlake/omniglot, ``python/``) in a
   folder and call :func:`load_omniglot_zips`. Their sizes and sha256 sums are
   in :data:`OMNIGLOT_ARCHIVES` and are checked.
2. **tensorflow-datasets.** Place all four archives of :data:`OMNIGLOT_ARCHIVES`
   in tfds's manual directory (default ``~/tensorflow_datasets/downloads/manual/``)
   and prepare once where TensorFlow is installed
   (``pip install tensorflow-datasets tensorflow-cpu importlib_resources``)::

     import tensorflow_datasets as tfds
     tfds.builder("omniglot", data_dir=D, file_format="array_record").download_and_prepare(
         download_config=tfds.download.DownloadConfig(manual_dir=ZIPS))

   Reading needs no TensorFlow: :func:`load_omniglot_tfds` uses
   ``tfds.data_source(..., download=False)`` (``pip install 'metajax[tfds]'``).

Either way images are resized to 28x28 (Lanczos), inverted (strokes bright),
stored as uint8, and split as Vinyals et al. (2016): 1200 characters for
meta-training and 423 for meta-testing, taken in the order of Omniglot's
global character index (1..1623). 20 drawings per character.
"""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np

from metajax.data._common import cached, require_pillow, sha256

OMNIGLOT_ARCHIVES = {
    "images_background.zip": (9464212,
                              "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "images_evaluation.zip": (6462886,
                              "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
    "images_background_small1.zip": (
        1319022, "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
    "images_background_small2.zip": (
        1580917, "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
}
DIRECT_ARCHIVES = ("images_background.zip", "images_evaluation.zip")
_NAME = re.compile(r"(\d{4})_(\d{2})\.png$")


def _to_array(image, image_size: int) -> np.ndarray:
  """Grayscale, Lanczos resize, invert: strokes become bright on a dark background."""
  Image = require_pillow("Omniglot")
  image = image.convert("L").resize((image_size, image_size), Image.LANCZOS)
  return 255 - np.asarray(image, np.uint8)


def vinyals_split(by_character: np.ndarray, num_train: int = 1200) -> dict[str, np.ndarray]:
  """Splits ``(characters, drawers, H, W)`` into train (first ``num_train``) and test, adding C=1.

  Example:
    >>> import numpy as np
    >>> from metajax.data import vinyals_split
    >>> split = vinyals_split(np.zeros((10, 20, 28, 28), np.uint8), num_train=6)
    >>> split['train'].shape, split['test'].shape
    ((6, 20, 28, 28, 1), (4, 20, 28, 28, 1))
  """
  if not 0 < num_train < len(by_character):
    raise ValueError(f"num_train={num_train} must be between 1 and the {len(by_character)} "
                     "characters minus one.")
  by_character = by_character[..., None]
  return {"train": by_character[:num_train], "test": by_character[num_train:]}


def load_omniglot_zips(directory: str, *, image_size: int = 28, num_train: int = 1200,
                       verify: bool = True, cache: bool = True) -> dict[str, np.ndarray]:
  """Omniglot from the two official zips in ``directory``, as class-indexed uint8 arrays.

  Args:
    directory: folder holding ``images_background.zip`` and ``images_evaluation.zip``.
    image_size: output height and width.
    num_train: characters in the meta-training split (Vinyals: 1200).
    verify: check each archive's sha256 against :data:`OMNIGLOT_ARCHIVES`.
    cache: save the decoded arrays as ``omniglot_<size>.npz`` in ``directory``
      and reuse them.

  Returns:
    ``{'train': (1200, 20, 28, 28, 1), 'test': (423, 20, 28, 28, 1)}`` (uint8).

  Example:
    >>> from metajax.data import load_omniglot_zips
    >>> data = load_omniglot_zips("~/data/omniglot")  # doctest: +SKIP
  """
  directory = os.path.expanduser(directory)
  paths = [os.path.join(directory, name) for name in DIRECT_ARCHIVES]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"missing Omniglot archives {missing}; download {list(DIRECT_ARCHIVES)} from "
        "github.com/brendenlake/omniglot (python/) and place them in directory.")
  if verify:
    for path in paths:
      expected = OMNIGLOT_ARCHIVES[os.path.basename(path)][1]
      actual = sha256(path)
      if actual != expected:
        raise ValueError(f"{path} has sha256 {actual}, expected {expected} (pass verify=False "
                         "for a modified copy).")

  def build():
    drawings: dict[int, list] = {}
    for path in paths:
      with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
          match = _NAME.search(name)
          if match:
            image = require_pillow("Omniglot").open(io.BytesIO(archive.read(name)))
            drawings.setdefault(int(match.group(1)), []).append(_to_array(image, image_size))
    if not drawings:
      raise ValueError(f"no Omniglot drawings (<char>_<drawer>.png) found in {paths}.")
    sizes = {len(v) for v in drawings.values()}
    if len(sizes) != 1:
      raise ValueError(f"characters have differing numbers of drawings: {sorted(sizes)}.")
    return vinyals_split(np.stack([np.stack(drawings[c]) for c in sorted(drawings)]), num_train)

  return cached(os.path.join(directory, f"omniglot_{image_size}.npz") if cache else None, build)


def load_omniglot_tfds(data_dir: str | None = None, *, image_size: int = 28,
                       num_train: int = 1200) -> dict[str, np.ndarray]:
  """Omniglot prepared by tensorflow-datasets (array_record), read without TensorFlow.

  Reads both tfds splits with ``tfds.data_source('omniglot', download=False)``,
  groups drawings by global character label and applies :func:`vinyals_split`.

  Example:
    >>> from metajax.data import load_omniglot_tfds
    >>> data = load_omniglot_tfds("~/tensorflow_datasets")  # doctest: +SKIP
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    raise ImportError("load_omniglot_tfds needs tensorflow-datasets: "
                      "pip install 'metajax[tfds]'.") from err
  Image = require_pillow("Omniglot")
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  drawings: dict[int, list] = {}
  for split in ("train", "test"):
    source = tfds.data_source("omniglot", split=split, data_dir=data_dir, download=False)
    for i in range(len(source)):
      example = source[i]
      image = np.asarray(example["image"], np.uint8)
      image = Image.fromarray(image[..., 0] if image.ndim == 3 else image)
      drawings.setdefault(int(example["label"]), []).append(_to_array(image, image_size))
  sizes = {len(v) for v in drawings.values()}
  if len(sizes) != 1:
    raise ValueError(f"characters have differing numbers of drawings: {sorted(sizes)}.")
  return vinyals_split(np.stack([np.stack(drawings[c]) for c in sorted(drawings)]), num_train)
