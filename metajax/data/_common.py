"""Helpers shared by the dataset loaders: argument checks, grouping by class, the array cache."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` as an int if it is an integer >= 1; otherwise raises, naming ``name``.

  Examples:
    >>> from metajax.data._common import check_positive_int
    >>> check_positive_int("image_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: image_size must be >= 1, got 0.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return int(value)


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _listing(items: list, limit: int = 5) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def group_by_class(images, labels, *, per_class: int | None = None,
                   noun: str = "class") -> np.ndarray:
  """Stacks images into ``(num_classes, per_class, ...)`` in sorted label order.

  Within a class, examples keep their order.

  Args:
    images: ``(N, ...)`` examples.
    labels: ``(N,)`` labels, any sortable type.
    per_class: keep the first ``per_class`` examples of each class; every class must have at
      least that many. ``None``: every class must have the same number of examples.
    noun: what a class is called in error messages (``"character"`` for Omniglot).

  Returns:
    ``(num_classes, per_class, ...)`` array.

  Raises:
    ValueError: a length mismatch, no examples, or a class of the wrong size (the message names
      the class and how many examples it has).

  Examples:
    >>> import numpy as np
    >>> from metajax.data._common import group_by_class
    >>> group_by_class(np.arange(4), np.array(["b", "a", "b", "a"])).tolist()
    [[1, 3], [0, 2]]
    >>> group_by_class(np.arange(3), np.array(["a", "a", "b"]))
    Traceback (most recent call last):
    ...
    ValueError: classes have unequal numbers of examples: most have 2, but class b has 1.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}.")
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels.")
  if not len(labels):
    raise ValueError("no examples to group: images and labels are empty.")
  classes, counts = np.unique(labels, return_counts=True)
  if per_class is None:
    sizes, frequency = np.unique(counts, return_counts=True)
    size = int(sizes[frequency == frequency.max()].max())  # the most common; ties: the largest
    odd = [f"{noun} {c} has {n}" for c, n in zip(classes, counts) if n != size]
    if odd:
      nouns = noun + ("es" if noun.endswith("s") else "s")
      raise ValueError(f"{nouns} have unequal numbers of examples: most have {size}, but "
                       f"{_listing(odd)}.")
  else:
    size = check_positive_int("per_class", per_class)
    small = [f"{noun} {c} has {n}" for c, n in zip(classes, counts) if n < size]
    if small:
      raise ValueError(f"{_listing(small)} examples, fewer than per_class={size}.")
  return np.stack([images[labels == c][:size] for c in classes])


def source_stamp(paths) -> str:
  """A digest of the names, sizes and modification times of ``paths``: changes when a source
  file is replaced or edited (a cache built from other files is then rebuilt)."""
  digest = hashlib.sha1()
  for path in paths:
    info = os.stat(path)
    digest.update(f"{os.path.basename(path)}:{info.st_size}:{info.st_mtime_ns};".encode())
  return digest.hexdigest()


def cached(path: str | None, build, *, expect: dict[str, tuple], dtype=np.uint8, sources=()):
  """Loads ``{'name': array}`` from the ``.npz`` at ``path``, else builds and saves it.

  Args:
    path: the cache file, or None for no cache.
    build: ``() -> {'name': array}``, called when there is no cache file.
    expect: the arrays the cache must hold and their shapes (``None``: any size on that axis).
    dtype: the dtype every cached array must have.
    sources: the files the arrays are built from; the cache records their
      [`source_stamp`][metajax.data._common.source_stamp] and is rebuilt when it differs.

  Raises:
    ValueError: the cache file is unreadable (corrupt or truncated) or does not hold the expected
      arrays; the message names the file and says to delete it.
  """
  stamp = source_stamp(sources) if sources else None

  def rebuild():
    arrays = build()
    if path:
      tmp = path + ".tmp.npz"
      try:
        np.savez(tmp, **arrays, **({} if stamp is None else {"sources": np.array(stamp)}))
        os.replace(tmp, path)
      except OSError as err:  # a read-only dataset folder, a full disk: the data is still good
        warnings.warn(f"could not write the cache file {path} ({type(err).__name__}: {err}); "
                      "the data was loaded without it and will be decoded again next time "
                      "(pass cache=False to skip the cache).", stacklevel=3)
    return arrays

  if not (path and os.path.exists(path)):
    return rebuild()
  fix = "delete it and it will be rebuilt from the source files"
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as err:  # any failure to read means the file is unusable
    raise ValueError(f"cache file {path} is corrupt or truncated ({type(err).__name__}: "
                     f"{err}); {fix}.") from err
  if stamp is not None and str(arrays.pop("sources", "")) != stamp:
    return rebuild()  # built from other source files (or before they were recorded)
  arrays.pop("sources", None)
  for name, shape in expect.items():
    if name not in arrays:
      raise ValueError(f"cache file {path} does not hold the array {name!r} (it holds "
                       f"{sorted(arrays)}: written by another metajax version?); {fix}.")
    array = arrays[name]
    if (array.dtype != dtype or array.ndim != len(shape)
        or any(want not in (None, got) for want, got in zip(shape, array.shape))):
      want = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
      raise ValueError(f"cache file {path} holds {name!r} as {array.dtype} {array.shape}, "
                       f"expected {np.dtype(dtype)} {want}; {fix}.")
  return arrays


def check_disjoint(kind: str, parts, why: str, show=repr) -> None:
  """Refuses a ``kind`` (a class, an image) found in two of ``parts``, ``[(source, names)]``,
  naming it (``show(name)``) and both sources; ``why`` ends the message."""
  seen = {}
  for source, names in parts:
    names = set(names)
    shared = sorted(names & set(seen))
    if shared:
      more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
      raise ValueError(f"{kind} {show(shared[0])} is in both {seen[shared[0]]} and {source}"
                       f"{more}: {why}")
    seen.update(dict.fromkeys(names, source))


def eight_bit(image, mode: str, where: str):
  """``image`` (PIL) converted to the 8-bit ``mode`` (``"L"`` or ``"RGB"``).

  Transparency is composited onto white first (``convert`` would drop the alpha channel and
  with it a drawing on a transparent background); 16-bit and float images are refused, as
  ``convert`` clips them to 255 or 0 instead of rescaling.
  """
  if image.mode in ("I", "F") or image.mode.startswith("I;"):
    raise ValueError(f"{where} is a {image.mode} image (16-bit, 32-bit or float): the loaders "
                     "read 8-bit images; convert it to 8-bit (L or RGB) first.")
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    Image = require_pillow("images with transparency")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA"))
  return image.convert(mode)


def require_pillow(purpose: str):
  try:
    from PIL import Image
  except ImportError as err:
    raise ImportError(f"{purpose} needs pillow: pip install 'metajax[omniglot]'.") from err
  return Image
