"""Omniglot (Lake et al. 2015), read from the official archives or through tensorflow-datasets.

Nothing is downloaded. Two routes:

1. **Direct (pillow only).** Place ``images_background.zip`` and
   ``images_evaluation.zip`` (github.com/brendenlake/omniglot, ``python/``) in a
   folder and call [`load_omniglot_zips`][metajax.data.load_omniglot_zips]. Their sizes and sha256
   sums are
   in [`OMNIGLOT_ARCHIVES`][metajax.data.OMNIGLOT_ARCHIVES] and are checked.
2. **tensorflow-datasets.** Place all four archives of
[`OMNIGLOT_ARCHIVES`][metajax.data.OMNIGLOT_ARCHIVES]
   in tfds's manual directory (default ``~/tensorflow_datasets/downloads/manual/``)
   and prepare once where TensorFlow is installed
   (``pip install tensorflow-datasets tensorflow-cpu importlib_resources``)::

     import tensorflow_datasets as tfds
     tfds.builder("omniglot", data_dir=D, file_format="array_record").download_and_prepare(
         download_config=tfds.download.DownloadConfig(manual_dir=ZIPS))

   Reading needs no TensorFlow: [`load_omniglot_tfds`][metajax.data.load_omniglot_tfds] uses
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
import zlib

import numpy as np

from metajax.data._common import (
    cached,
    check_disjoint,
    check_positive_int,
    eight_bit,
    group_by_class,
    require_pillow,
    sha256,
)

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


def _to_array(image, image_size: int, where: str = "image") -> np.ndarray:
  """Grayscale, Lanczos resize, invert: strokes become bright on a dark background."""
  Image = require_pillow("Omniglot")
  image = eight_bit(image, "L", where).resize((image_size, image_size), Image.LANCZOS)
  return 255 - np.asarray(image, np.uint8)


def vinyals_split(by_character: np.ndarray, num_train: int = 1200) -> dict[str, np.ndarray]:
  """Splits ``(characters, drawers, H, W)`` into train (first ``num_train``) and test, adding C=1.

  Raises:
    ValueError: ``by_character`` is not 4-D, or ``num_train`` leaves no character for one split.

  Examples:
    >>> import numpy as np
    >>> from metajax.data import vinyals_split
    >>> split = vinyals_split(np.zeros((10, 20, 28, 28), np.uint8), num_train=6)
    >>> split['train'].shape, split['test'].shape
    ((6, 20, 28, 28, 1), (4, 20, 28, 28, 1))
  """
  if np.ndim(by_character) != 4:
    raise ValueError("by_character must have shape (characters, drawers, H, W), got "
                     f"{np.shape(by_character)}.")
  num_train = check_positive_int("num_train", num_train)
  total = len(by_character)
  if num_train >= total:
    raise ValueError(f"num_train={num_train} must be between 1 and {total - 1}: there are "
                     f"{total} characters and the test split needs at least one.")
  by_character = by_character[..., None]
  return {"train": by_character[:num_train], "test": by_character[num_train:]}


def _check_archive(path: str) -> None:
  """Compares ``path``'s size, then its sha256, with
  [`OMNIGLOT_ARCHIVES`][metajax.data.OMNIGLOT_ARCHIVES]."""
  size, digest = OMNIGLOT_ARCHIVES[os.path.basename(path)]
  actual_size = os.path.getsize(path)
  if actual_size != size:
    raise ValueError(f"{path} is {actual_size} bytes, expected {size}: a truncated or different "
                     "download; download it again (or pass verify=False for a modified copy).")
  actual = sha256(path)
  if actual != digest:
    raise ValueError(f"{path} has sha256 {actual}, expected {digest}: a corrupt or different "
                     "download; download it again (or pass verify=False for a modified copy).")


def _read_archive(path: str, image_size: int, images: list, labels: list) -> None:
  """Appends each ``<character>_<drawer>.png`` drawing of the zip at ``path`` and its character."""
  Image = require_pillow("Omniglot")
  try:
    with zipfile.ZipFile(path) as archive:
      for name in sorted(archive.namelist()):
        match = _NAME.search(name)
        if (not match or name.startswith("__MACOSX/")
            or os.path.basename(name).startswith("._")):  # macOS's resource forks: not drawings
          continue
        data = archive.read(name)
        try:
          with Image.open(io.BytesIO(data)) as image:
            images.append(_to_array(image, image_size, f"{path}: {name}"))
        except OSError as err:  # PIL.UnidentifiedImageError, truncated image data
          raise ValueError(f"{path}: {name} is not a readable image ({err}); download the "
                           "archive again.") from err
        labels.append(int(match.group(1)))
  except (zipfile.BadZipFile, zlib.error, EOFError) as err:
    raise ValueError(f"{path} is not a readable zip archive ({type(err).__name__}: {err}): it "
                     "is truncated or corrupt; download it again.") from err


def _by_character(images: list, labels: list, source: str) -> np.ndarray:
  """``(characters, drawers, H, W)`` in character order; every character needs as many drawings."""
  if not images:
    raise ValueError(f"no Omniglot drawings (<character>_<drawer>.png) found in {source}.")
  try:
    return group_by_class(np.stack(images), np.asarray(labels), noun="character")
  except ValueError as err:
    raise ValueError(f"{source}: {err}") from None


def load_omniglot_zips(directory: str, *, image_size: int = 28, num_train: int = 1200,
                       verify: bool = True, cache: bool = True) -> dict[str, np.ndarray]:
  """Omniglot from the two official zips in ``directory``, as class-indexed uint8 arrays.

  Args:
    directory: folder holding ``images_background.zip`` and ``images_evaluation.zip``.
    image_size: output height and width.
    num_train: characters in the meta-training split (Vinyals: 1200).
    verify: check each archive's size and sha256 against
      [`OMNIGLOT_ARCHIVES`][metajax.data.OMNIGLOT_ARCHIVES].
    cache: save the decoded ``(characters, drawers, H, W)`` array, before the split, as
      ``omniglot_<size>.npz`` in ``directory`` and reuse it (for any ``num_train``) while
      the archives are unchanged (other archives rebuild it).

  Returns:
    ``{'train': (1200, 20, 28, 28, 1), 'test': (423, 20, 28, 28, 1)}`` (uint8).

  Raises:
    FileNotFoundError: an archive is missing.
    ValueError: a bad ``image_size`` or ``num_train``, an archive that fails verification or
      cannot be read, characters with different numbers of drawings, or an unreadable cache
      file; the message names the argument or file.

  Examples:
    >>> from metajax.data import load_omniglot_zips
    >>> data = load_omniglot_zips("~/data/omniglot")  # doctest: +SKIP
  """
  image_size = check_positive_int("image_size", image_size)
  num_train = check_positive_int("num_train", num_train)
  directory = os.path.expanduser(directory)
  paths = [os.path.join(directory, name) for name in DIRECT_ARCHIVES]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"missing Omniglot archives {missing}; download {list(DIRECT_ARCHIVES)} from "
        "github.com/brendenlake/omniglot (python/) and place them in directory.")
  if verify:
    for path in paths:
      _check_archive(path)

  def build():
    images, labels, numbers = [], [], []
    for path in paths:
      start = len(labels)
      _read_archive(path, image_size, images, labels)
      numbers.append((path, labels[start:]))
    # the two archives number their characters apart (1-964, 965-1623)
    check_disjoint("character", numbers, "the archives hold disjoint characters (is one a "
                   "copy of the other?).", show=lambda n: f"{n:04d}")
    return {"characters": _by_character(images, labels, " and ".join(paths))}

  path = os.path.join(directory, f"omniglot_{image_size}.npz") if cache else None
  characters = cached(path, build, expect={"characters": (None, None, image_size, image_size)},
                      sources=paths)
  return vinyals_split(characters["characters"], num_train)


def load_omniglot_tfds(data_dir: str | None = None, *, image_size: int = 28,
                       num_train: int = 1200) -> dict[str, np.ndarray]:
  """Omniglot prepared by tensorflow-datasets (array_record), read without TensorFlow.

  Reads both tfds splits with ``tfds.data_source('omniglot', download=False)``,
  groups drawings by global character label and applies
  [`vinyals_split`][metajax.data.vinyals_split].

  Examples:
    >>> from metajax.data import load_omniglot_tfds
    >>> data = load_omniglot_tfds("~/tensorflow_datasets")  # doctest: +SKIP
  """
  image_size = check_positive_int("image_size", image_size)
  num_train = check_positive_int("num_train", num_train)
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    raise ImportError("load_omniglot_tfds needs tensorflow-datasets: "
                      "pip install 'metajax[tfds]'.") from err
  Image = require_pillow("Omniglot")
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  images, labels = [], []
  for split in ("train", "test"):
    source = tfds.data_source("omniglot", split=split, data_dir=data_dir, download=False)
    for i in range(len(source)):
      example = source[i]
      image = np.asarray(example["image"], np.uint8)
      image = Image.fromarray(image[..., 0] if image.ndim == 3 else image)
      images.append(_to_array(image, image_size))
      labels.append(int(example["label"]))
  where = f"tfds omniglot in {data_dir or 'the default data_dir'}"
  return vinyals_split(_by_character(images, labels, where), num_train)
