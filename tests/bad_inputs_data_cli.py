"""Bad inputs to the data loaders, the experiment scripts' flags and checkpoint resume.

Every :class:`~tests.badinput.Case` provokes one kind of mistake. Data cases write small
generated files to a fresh temporary directory (nothing is downloaded); command-line cases call
the script's ``parse_args`` in process; checkpoint cases write a tiny orbax checkpoint first.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import zipfile
from typing import NamedTuple

import numpy as np

from tests.badinput import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- data ------------------------------------------------------------------------------------


def _data():
  import metajax.data
  return metajax.data


def _group(*args, **kwargs):
  from metajax.data._common import group_by_class
  return group_by_class(*args, **kwargs)


@functools.cache
def _png(shade: int = 0, size: int = 12) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.new("L", (size, size), shade).save(buffer, format="PNG")
  return buffer.getvalue()


def _omniglot_dir(drawers=(3, 3, 3, 3), *, bad_member=False, names=None) -> str:
  """Both official zips, laid out like the real ones; character ``i + 1`` has ``drawers[i]``.

  ``bad_member``: every drawing's bytes are not an image; ``names``: each zip holds only that file.
  """
  directory = tempfile.mkdtemp()
  half = len(drawers) // 2
  for name, characters in (("images_background", range(half)),
                           ("images_evaluation", range(half, len(drawers)))):
    with zipfile.ZipFile(os.path.join(directory, f"{name}.zip"), "w") as archive:
      if names:
        archive.writestr(names, b"no drawings here")
        continue
      for c in characters:
        for d in range(1, drawers[c] + 1):
          member = f"{name}/Alphabet/character{c + 1:02d}/{c + 1:04d}_{d:02d}.png"
          archive.writestr(member, b"not a png" if bad_member else _png(c * 20))
  return directory


def _truncate(path: str, keep: int = 40) -> None:
  with open(path, "rb") as f:
    head = f.read(keep)
  with open(path, "wb") as f:
    f.write(head)


def _omniglot(directory, **kwargs):
  return _data().load_omniglot_zips(directory, **{"verify": False, **kwargs})


def _truncated_zip():
  directory = _omniglot_dir()
  _truncate(os.path.join(directory, "images_evaluation.zip"))
  return _omniglot(directory, num_train=2)


def _corrupt_member_data():
  directory = _omniglot_dir()
  path = os.path.join(directory, "images_background.zip")
  data = bytearray(open(path, "rb").read())
  start = data.index(b"\x89PNG")  # the first stored member's bytes
  data[start + 20:start + 40] = b"\xff" * 20  # its CRC no longer matches
  open(path, "wb").write(bytes(data))
  return _omniglot(directory, num_train=2)


def _size_checked_zip():
  directory = _omniglot_dir()
  return _data().load_omniglot_zips(directory, num_train=2, verify=True)


def _corrupt_omniglot_cache():
  directory = _omniglot_dir()
  open(os.path.join(directory, "omniglot_28.npz"), "wb").write(b"PK\x03\x04 truncated")
  return _omniglot(directory, num_train=2)


def _stamped(directory) -> np.ndarray:
  """The source stamp of ``directory``'s archives: the cache is then taken as built from them."""
  from metajax.data._common import source_stamp
  return np.array(source_stamp([os.path.join(directory, f"images_{part}.zip")
                                for part in ("background", "evaluation")]))


def _old_omniglot_cache():
  directory = _omniglot_dir()
  split = np.zeros((2, 3, 28, 28, 1), np.uint8)
  np.savez(os.path.join(directory, "omniglot_28.npz"), train=split, test=split,
           sources=_stamped(directory))
  return _omniglot(directory, num_train=2)


def _wrong_size_omniglot_cache():
  directory = _omniglot_dir()
  np.savez(os.path.join(directory, "omniglot_28.npz"),
           characters=np.zeros((4, 3, 14, 14), np.uint8), sources=_stamped(directory))
  return _omniglot(directory, num_train=2)


def _mini_root(classes=(("n01", 2), ("n02", 2)), *, header=("filename", "label"),
               rows=None, skip_images=(), bad_images=()) -> str:
  """``train.csv`` and ``images/`` as in Ravi & Larochelle's split, with tiny JPEGs."""
  from PIL import Image
  root = tempfile.mkdtemp()
  os.mkdir(os.path.join(root, "images"))
  if rows is None:
    rows = [(f"{label}{i:08d}.jpg", label) for label, n in classes for i in range(n)]
  with open(os.path.join(root, "train.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)
  for row in rows:
    if len(row) < 2 or row[0] in skip_images:
      continue
    path = os.path.join(root, "images", row[0])
    if row[0] in bad_images:
      open(path, "wb").write(b"not a jpeg")
    else:
      Image.new("RGB", (10, 10), (40, 80, 120)).save(path)
  return root


def _mini(root, **kwargs):
  return _data().load_miniimagenet(root, **{"splits": ("train",), **kwargs})


def _corrupt_mini_cache():
  root = _mini_root()
  np.savez(os.path.join(root, "mini_train_84.npz"), images=np.zeros((2, 2, 84, 84, 3), np.uint8))
  _truncate(os.path.join(root, "mini_train_84.npz"), keep=300)
  return _mini(root)


DATA = [
    Case("data", "load_digits with a negative class index",
         lambda: _data().load_digits((0, 1, -1), (5, 6, 7)), ValueError,
         r"train_classes holds \[-1\], outside the digit classes 0\.\.9"),
    Case("data", "load_digits with a class above 9",
         lambda: _data().load_digits((0, 1), (5, 10)), ValueError,
         r"test_classes holds \[10\], outside the digit classes 0\.\.9"),
    Case("data", "load_digits with a class listed twice",
         lambda: _data().load_digits((0, 1, 1), (5,)), ValueError,
         r"train_classes repeats \[1\]"),
    Case("data", "load_digits with an empty class list",
         lambda: _data().load_digits((), (5,)), ValueError, r"train_classes is empty"),
    Case("data", "load_digits with a non-integer class",
         lambda: _data().load_digits((0, 1.5), (5,)), TypeError,
         r"train_classes must hold ints 0\.\.9, got 1\.5"),
    Case("data", "load_digits with a string for a class list",
         lambda: _data().load_digits("01234", (5,)), TypeError,
         r"train_classes must be a sequence of digit classes"),
    Case("data", "load_digits with overlapping train and test classes",
         lambda: _data().load_digits((0, 1, 2), (2, 3)), ValueError,
         r"train_classes and test_classes overlap: \[2\]"),
    Case("data", "group_by_class with classes of unequal size",
         lambda: _group(np.arange(7), np.array([0, 0, 1, 1, 1, 2, 2])), ValueError,
         r"most have 2, but class 1 has 3"),
    Case("data", "group_by_class with a class smaller than per_class",
         lambda: _group(np.arange(4), np.array([0, 0, 0, 1]), per_class=2), ValueError,
         r"class 1 has 1 examples, fewer than per_class=2"),
    Case("data", "group_by_class with more labels than images",
         lambda: _group(np.arange(3), np.arange(4)), ValueError, r"3 images but 4 labels"),
    Case("data", "group_by_class with per_class=0",
         lambda: _group(np.arange(4), np.arange(4), per_class=0), ValueError,
         r"per_class must be >= 1, got 0"),
    Case("data", "load_omniglot_zips in a folder without the archives",
         lambda: _omniglot(tempfile.mkdtemp()), FileNotFoundError,
         r"missing Omniglot archives .*images_background\.zip.*brendenlake/omniglot"),
    Case("data", "load_omniglot_zips on an archive of the wrong size (truncated download)",
         _size_checked_zip, ValueError,
         r"images_background\.zip is \d+ bytes, expected 9464212: a truncated or different "
         r"download"),
    Case("data", "load_omniglot_zips on a truncated zip (verify=False)", _truncated_zip,
         ValueError,
         r"images_evaluation\.zip is not a readable zip archive .*truncated or corrupt"),
    Case("data", "load_omniglot_zips on a zip whose member data is corrupt",
         _corrupt_member_data, ValueError,
         r"images_background\.zip is not a readable zip archive \(BadZipFile: Bad CRC-32"),
    Case("data", "load_omniglot_zips on a zip holding a drawing that is not an image",
         lambda: _omniglot(_omniglot_dir(bad_member=True), num_train=2), ValueError,
         r"images_background\.zip: .*0001_01\.png is not a readable image"),
    Case("data", "load_omniglot_zips with a character missing a drawing",
         lambda: _omniglot(_omniglot_dir((3, 3, 2, 3)), num_train=2), ValueError,
         r"images_background\.zip and .*images_evaluation\.zip: characters have unequal numbers "
         r"of examples: most have 3, but character 3 has 2"),
    Case("data", "load_omniglot_zips on zips without drawings",
         lambda: _omniglot(_omniglot_dir(names="readme.txt"), num_train=2), ValueError,
         r"no Omniglot drawings \(<character>_<drawer>\.png\) found in .*images_background\.zip"),
    Case("data", "load_omniglot_zips with image_size=0",
         lambda: _omniglot(tempfile.mkdtemp(), image_size=0), ValueError,
         r"image_size must be >= 1, got 0"),
    Case("data", "load_omniglot_zips with num_train=0",
         lambda: _omniglot(tempfile.mkdtemp(), num_train=0), ValueError,
         r"num_train must be >= 1, got 0"),
    Case("data", "load_omniglot_zips with num_train leaving no test characters",
         lambda: _omniglot(_omniglot_dir(), num_train=4), ValueError,
         r"num_train=4 must be between 1 and 3: there are 4 characters"),
    Case("data", "load_omniglot_zips with a corrupt cache file", _corrupt_omniglot_cache,
         ValueError, r"cache file .*omniglot_28\.npz is corrupt or truncated .*delete it"),
    Case("data", "load_omniglot_zips with a cache from the old split format", _old_omniglot_cache,
         ValueError, r"cache file .*omniglot_28\.npz does not hold the array 'characters' .*"
                     r"\['test', 'train'\].*delete it"),
    Case("data", "load_omniglot_zips with a cache of another image size",
         _wrong_size_omniglot_cache, ValueError,
         r"cache file .*omniglot_28\.npz holds 'characters' as uint8 \(4, 3, 14, 14\), expected "
         r"uint8 \(\*, \*, 28, 28\); delete it"),
    Case("data", "vinyals_split of a 3-D array",
         lambda: _data().vinyals_split(np.zeros((10, 28, 28), np.uint8), 5), ValueError,
         r"by_character must have shape \(characters, drawers, H, W\), got \(10, 28, 28\)"),
    Case("data", "load_miniimagenet with a root that does not exist",
         lambda: _mini(os.path.join(tempfile.mkdtemp(), "nowhere")), FileNotFoundError,
         r"miniImageNet root .*nowhere is not a directory"),
    Case("data", "load_miniimagenet without the split file",
         lambda: _mini(_mini_root(), splits=("val",)), FileNotFoundError,
         r"val\.csv not found"),
    Case("data", "load_miniimagenet with an unknown split",
         lambda: _mini(_mini_root(), splits=("dev",)), ValueError,
         r"unknown splits \['dev'\]"),
    Case("data", "load_miniimagenet with splits given as one string",
         lambda: _mini(_mini_root(), splits="train"), TypeError,
         r"splits must be a sequence of split names such as \('train',\), not the string"),
    Case("data", "load_miniimagenet with image_size=-1",
         lambda: _mini(_mini_root(), image_size=-1), ValueError,
         r"image_size must be >= 1, got -1"),
    Case("data", "load_miniimagenet with a bad CSV header",
         lambda: _mini(_mini_root(header=("file", "class"))), ValueError,
         r"train\.csv has the header 'file,class', expected 'filename,label'"),
    Case("data", "load_miniimagenet with an empty CSV file",
         lambda: _mini(_mini_root(header=None, rows=[])), ValueError,
         r"train\.csv is empty"),
    Case("data", "load_miniimagenet with a CSV row lacking its label",
         lambda: _mini(_mini_root(rows=[("a.jpg", "n01"), ("b.jpg",)])), ValueError,
         r"train\.csv line 3: expected 'filename,label', got 'b\.jpg'"),
    Case("data", "load_miniimagenet with listed images missing",
         lambda: _mini(_mini_root(skip_images=("n0100000001.jpg", "n0200000000.jpg"))),
         FileNotFoundError,
         r"2 of the 4 images listed in .*train\.csv are missing from .*images: "
         r"\['n0100000001\.jpg', 'n0200000000\.jpg'\]"),
    Case("data", "load_miniimagenet with an image file that is not an image",
         lambda: _mini(_mini_root(bad_images=("n0200000001.jpg",))), ValueError,
         r"images/n0200000001\.jpg \(listed in .*train\.csv\) is not a readable image"),
    Case("data", "load_miniimagenet with classes of unequal size",
         lambda: _mini(_mini_root(classes=(("n01", 3), ("n02", 2), ("n03", 3)))), ValueError,
         r"train\.csv: classes have unequal numbers of examples: most have 3, but class n02 "
         r"has 2"),
    Case("data", "load_miniimagenet with a truncated cache file", _corrupt_mini_cache, ValueError,
         r"cache file .*mini_train_84\.npz is corrupt or truncated .*delete it"),
]


# --- command line ----------------------------------------------------------------------------


@functools.cache
def _script(name: str):
  """``experiments/<name>.py`` imported as a module (its ``main`` is not run)."""
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _cli(name: str, *argv: str):
  """A call running ``experiments/<name>.py``'s ``parse_args(argv)``; argparse's exit becomes a
  ``ValueError`` carrying what it wrote to stderr."""
  def call():
    stderr = io.StringIO()
    try:
      with contextlib.redirect_stderr(stderr):
        return _script(name).parse_args(list(argv))
    except SystemExit as err:
      raise ValueError(stderr.getvalue().strip() or str(err)) from None
  return call


def _cli_with_env(env: dict, name: str, *argv: str):
  """:func:`_cli` with the environment variables ``env`` set during the call."""
  call = _cli(name, *argv)

  def with_env():
    saved = {var: os.environ.get(var) for var in env}
    os.environ.update(env)
    try:
      return call()
    finally:
      for var, value in saved.items():
        if value is None:
          os.environ.pop(var, None)
        else:
          os.environ[var] = value
  return with_env


def _fewshot_data(shots: int, per_class: int, classes: int = 5):
  fewshot = _script("fewshot")
  args = argparse.Namespace(shots=shots, config="digits")
  data = {"train": np.zeros((classes, per_class, 8, 8, 1)),
          "test": np.zeros((classes, per_class, 8, 8, 1))}
  return fewshot.check_data(args, fewshot.CONFIGS["digits"], data)


CLI = [
    Case("cli", "sinusoid.py --iterations 0", _cli("sinusoid", "--iterations", "0"), ValueError,
         r"sinusoid.py: error: --iterations must be >= 1, got 0"),
    Case("cli", "sinusoid.py --meta-batch -3", _cli("sinusoid", "--meta-batch", "-3"), ValueError,
         r"--meta-batch must be >= 1, got -3"),
    Case("cli", "sinusoid.py --chunk that does not divide --iterations",
         _cli("sinusoid", "--iterations", "100", "--chunk", "30"), ValueError,
         r"--chunk 30 must divide --iterations 100"),
    Case("cli", "sinusoid.py --chunk 0", _cli("sinusoid", "--chunk", "0"), ValueError,
         r"--chunk must be >= 1, got 0"),
    Case("cli", "sinusoid.py --inner-steps 0", _cli("sinusoid", "--inner-steps", "0"),
         ValueError, r"--inner-steps must be >= 1, got 0"),
    Case("cli", "sinusoid.py --inner-lr nan", _cli("sinusoid", "--inner-lr", "nan"), ValueError,
         r"--inner-lr must be a finite number > 0, got nan"),
    Case("cli", "sinusoid.py --inner-lr 0", _cli("sinusoid", "--inner-lr", "0"), ValueError,
         r"--inner-lr must be a finite number > 0, got 0\.0"),
    Case("cli", "sinusoid.py --meta-lr -0.001", _cli("sinusoid", "--meta-lr", "-0.001"),
         ValueError, r"--meta-lr must be a finite number > 0, got -0\.001"),
    Case("cli", "sinusoid.py --reg inf", _cli("sinusoid", "--reg", "inf"), ValueError,
         r"--reg must be a finite number > 0, got inf"),
    Case("cli", "sinusoid.py --t1 0", _cli("sinusoid", "--solver", "adjoint", "--t1", "0"),
         ValueError, r"--t1 must be a finite number > 0, got 0\.0"),
    Case("cli", "sinusoid.py --cg-steps 0", _cli("sinusoid", "--cg-steps", "0"), ValueError,
         r"--cg-steps must be >= 1, got 0"),
    Case("cli", "sinusoid.py --cg-ridge -1", _cli("sinusoid", "--cg-ridge", "-1"), ValueError,
         r"--cg-ridge must be a finite number >= 0, got -1\.0"),
    Case("cli", "sinusoid.py --shots 0", _cli("sinusoid", "--shots", "0"), ValueError,
         r"--shots must be >= 1, got 0"),
    Case("cli", "sinusoid.py --eval-tasks 1 (no confidence interval)",
         _cli("sinusoid", "--eval-tasks", "1"), ValueError, r"--eval-tasks must be >= 2, got 1"),
    Case("cli", "sinusoid.py --eval-steps 0", _cli("sinusoid", "--eval-steps", "0"), ValueError,
         r"--eval-steps must be >= 1, got 0"),
    Case("cli", "sinusoid.py --eval-shots 0", _cli("sinusoid", "--eval-shots", "0"), ValueError,
         r"--eval-shots must be >= 1, got 0"),
    Case("cli", "sinusoid.py --seed beyond 32 bits (would repeat seed 0)",
         _cli("sinusoid", "--seed", str(2**32)), ValueError,
         r"--seed must be between 0 and 4294967295, got 4294967296"),
    Case("cli", "sinusoid.py --solver with an unknown name",
         _cli("sinusoid", "--solver", "mamll"), ValueError,
         r"argument --solver: invalid choice: 'mamll'"),
    Case("cli", "sinusoid.py --iterations that is not an integer",
         _cli("sinusoid", "--iterations", "1e3"), ValueError,
         r"argument --iterations: invalid int value: '1e3'"),
    Case("cli", "sinusoid.py --checkpoint-every 0", _cli("sinusoid", "--checkpoint-every", "0"),
         ValueError, r"sinusoid.py: error: --checkpoint-every must be >= 1, got 0"),
    Case("cli", "sinusoid.py --devices 0", _cli("sinusoid", "--devices", "0"), ValueError,
         r"sinusoid.py: error: --devices must be >= 1, got 0"),
    Case("cli", "sinusoid.py --devices beyond the devices JAX sees",
         _cli("sinusoid", "--devices", "99"), ValueError,
         r"--devices 99 exceeds the \d+ cpu devices JAX sees \(jax\.devices\(\)\)"),
    Case("cli", "sinusoid.py --meta-batch that is not a multiple of --devices",
         _cli("sinusoid", "--meta-batch", "25", "--devices", "2"), ValueError,
         r"--meta-batch 25 must be a multiple of --devices 2 \(each device adapts the same "
         r"number of tasks\)"),
    Case("cli", "sinusoid.py --num-processes without --coordinator",
         _cli("sinusoid", "--num-processes", "2"), ValueError,
         r"--num-processes and --process-id need --coordinator HOST:PORT \(process 0's address"),
    Case("cli", "sinusoid.py --coordinator without a port",
         _cli("sinusoid", "--coordinator", "localhost", "--num-processes", "2",
              "--process-id", "0"), ValueError,
         r"--coordinator must be HOST:PORT with PORT in 1\.\.65535 \(e\.g\. 10\.0\.0\.1:1234\), "
         r"or auto, got 'localhost'"),
    Case("cli", "sinusoid.py --coordinator with a port beyond 65535",
         _cli("sinusoid", "--coordinator", "localhost:70000", "--num-processes", "2",
              "--process-id", "0"), ValueError,
         r"--coordinator must be HOST:PORT .*got 'localhost:70000'"),
    Case("cli", "sinusoid.py --coordinator without --num-processes and --process-id",
         _cli("sinusoid", "--coordinator", "localhost:1234"), ValueError,
         r"--coordinator localhost:1234 needs --num-processes and --process-id \(or "
         r"\$JAX_NUM_PROCESSES and \$JAX_PROCESS_ID"),
    Case("cli", "sinusoid.py --process-id not below --num-processes",
         _cli("sinusoid", "--coordinator", "localhost:1234", "--num-processes", "2",
              "--process-id", "2"), ValueError,
         r"--process-id 2 must be below --num-processes 2 \(processes are numbered 0 to 1\)"),
    Case("cli", "sinusoid.py --process-id -1", _cli("sinusoid", "--process-id", "-1"),
         ValueError, r"--process-id must be >= 0, got -1"),
    Case("cli", "sinusoid.py --num-processes 0", _cli("sinusoid", "--num-processes", "0"),
         ValueError, r"--num-processes must be >= 1, got 0"),
    Case("cli", "sinusoid.py with JAX_NUM_PROCESSES that is not an integer",
         _cli_with_env({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "two",
                        "JAX_PROCESS_ID": "0"}, "sinusoid"), ValueError,
         r"JAX_NUM_PROCESSES must be an integer \(it stands in for --num-processes\), got 'two'"),
    Case("cli", "amaml.py --steps with a zero", _cli("amaml", "--steps", "10,0"), ValueError,
         r"amaml.py: error: --steps must be comma-separated positive ints, got '10,0'"),
    Case("cli", "amaml.py --steps that are not ints", _cli("amaml", "--steps", "10,5e1"),
         ValueError, r"--steps must be comma-separated positive ints, got '10,5e1'"),
    Case("cli", "amaml.py --family unknown", _cli("amaml", "--family", "alpine"), ValueError,
         r"argument --family: invalid choice: 'alpine'"),
    Case("cli", "amaml.py --shots above the points per function",
         _cli("amaml", "--shots", "2000"), ValueError,
         r"--shots must be <= 1000 \(the points per function\), got 2000"),
    Case("cli", "amaml.py --solvers naming a solver twice",
         _cli("amaml", "--solvers", "maml,adjoint,maml"), ValueError,
         r"--solvers must name each of maml,fomaml,reptile,imaml,adjoint at most once"),
    Case("cli", "amaml.py --meta-batch above --tasks",
         _cli("amaml", "--meta-batch", "8", "--tasks", "4"), ValueError,
         r"--meta-batch \(8\) must be <= --tasks \(4\)"),
    Case("cli", "cosmixture.py --meta-batch 0", _cli("cosmixture", "--meta-batch", "0"),
         ValueError, r"cosmixture.py: error: --meta-batch must be >= 1, got 0"),
    Case("cli", "cosmixture.py --chunk that does not divide --iterations",
         _cli("cosmixture", "--iterations", "30", "--chunk", "20"), ValueError,
         r"--chunk 20 must divide --iterations 30"),
    Case("cli", "cosmixture.py --solvers with an unknown name",
         _cli("cosmixture", "--solvers", "maml,imaml2"), ValueError,
         r"--solvers has unknown names \['imaml2'\]; choose from maml,fomaml,reptile,imaml,"
         r"adjoint"),
    Case("cli", "cosmixture.py --solvers metasgd (not wired for learned step sizes)",
         _cli("cosmixture", "--solvers", "maml,metasgd"), ValueError,
         r"--solvers metasgd is not supported by cosmixture\.py"),
    Case("cli", "cosmixture.py --solvers with an empty name",
         _cli("cosmixture", "--solvers", "maml,,imaml"), ValueError,
         r"--solvers 'maml,,imaml' has an empty name"),
    Case("cli", "cosmixture.py --solvers naming a solver twice",
         _cli("cosmixture", "--solvers", "maml,imaml,maml"), ValueError,
         r"--solvers repeats \['maml'\]"),
    Case("cli", "cosmixture.py --devices that does not divide the default --meta-batch 10",
         _cli("cosmixture", "--devices", "4"), ValueError,
         r"cosmixture.py: error: --meta-batch 10 must be a multiple of --devices 4"),
    Case("cli", "cosmixture.py --inner-lr -0.05", _cli("cosmixture", "--inner-lr", "-0.05"),
         ValueError, r"--inner-lr must be a finite number > 0, got -0\.05"),
    Case("cli", "fewshot.py --meta-batch 0 --iterations 0 (not replaced by the config's)",
         _cli("fewshot", "--meta-batch", "0", "--iterations", "0"), ValueError,
         r"fewshot.py: error: --iterations must be >= 1, got 0"),
    Case("cli", "fewshot.py --meta-batch 0", _cli("fewshot", "--meta-batch", "0"), ValueError,
         r"--meta-batch must be >= 1, got 0"),
    Case("cli", "fewshot.py --chunk that does not divide the config's iterations",
         _cli("fewshot", "--chunk", "3"), ValueError, r"--chunk 3 must divide --iterations 1000"),
    Case("cli", "fewshot.py --checkpoint-every 0", _cli("fewshot", "--checkpoint-every", "0"),
         ValueError, r"--checkpoint-every must be >= 1, got 0"),
    Case("cli", "fewshot.py --eval-tasks 0", _cli("fewshot", "--eval-tasks", "0"), ValueError,
         r"--eval-tasks must be >= 2, got 0"),
    Case("cli", "fewshot.py --shots 0", _cli("fewshot", "--shots", "0"), ValueError,
         r"--shots must be >= 1, got 0"),
    Case("cli", "fewshot.py --meta-batch that is not a multiple of --devices",
         _cli("fewshot", "--meta-batch", "6", "--devices", "4"), ValueError,
         r"fewshot.py: error: --meta-batch 6 must be a multiple of --devices 4"),
    Case("cli", "fewshot.py --process-id without --coordinator",
         _cli("fewshot", "--process-id", "1"), ValueError,
         r"fewshot.py: error: --num-processes and --process-id need --coordinator HOST:PORT"),
    Case("cli", "fewshot.py --config omniglot-5way without --data-dir",
         _cli("fewshot", "--config", "omniglot-5way"), ValueError,
         r"--config omniglot-5way needs --data-dir"),
    Case("cli", "fewshot.py --data-dir with --config digits (silently unused)",
         _cli("fewshot", "--data-dir", "/data/omniglot"), ValueError,
         r"--data-dir is not used by --config digits"),
    Case("cli", "fewshot.py --shots more than the data's examples per class",
         lambda: _fewshot_data(shots=170, per_class=174), SystemExit,
         r"--shots 170 plus the 10 queries of --config digits need 180 examples per class; "
         r"the train split has 174"),
    Case("cli", "fewshot.py --config with more ways than the data's classes",
         lambda: _fewshot_data(shots=1, per_class=20, classes=4), SystemExit,
         r"--config digits draws 5 classes per task; the test split has 4"),
]


# --- checkpoints -----------------------------------------------------------------------------


class _State(NamedTuple):  # the fields of metajax.meta.TrainState
  meta_params: dict
  opt_state: tuple
  step: object


def _state(step=0, width=4, metasgd=False):
  import jax.numpy as jnp
  params = {"Dense_0": {"kernel": jnp.ones((3, width)), "bias": jnp.zeros(width)}}
  if metasgd:
    params = {"params": params, "step_size": params}
  return _State(params, (), jnp.asarray(step, jnp.int32))


def _run_args(**changes):
  run = dict(config="digits", solver="maml", shots=1, meta_batch=2, seed=0, iterations=8, chunk=1)
  return argparse.Namespace(**{**run, **changes})


def _checkpoint(step=2, *, record=True, **state_kwargs) -> str:
  """``<out>/checkpoints`` holding one checkpoint written as fewshot.py writes them."""
  fewshot = _script("fewshot")
  directory = os.path.join(tempfile.mkdtemp(), "checkpoints")
  manager = fewshot.checkpoint_manager(directory)
  if record:
    fewshot.check_run(directory, _run_args(), resuming=False)
  fewshot.save(manager, _state(step, **state_kwargs))
  manager.wait_until_finished()
  manager.close()
  return directory


def _resume(directory, state=None, **changes):
  fewshot = _script("fewshot")
  manager = fewshot.checkpoint_manager(directory)
  try:
    return fewshot.resume(manager, _state() if state is None else state, _run_args(**changes))
  finally:
    manager.close()


def _damaged(damage):
  directory = _checkpoint()
  damage(os.path.join(directory, "2", "default"))
  return _resume(directory)


def _overwrite_metadata(item):
  open(os.path.join(item, "_METADATA"), "w").write("garbage")


def _drop_array_data(item):
  for name in ("manifest.ocdbt", "ocdbt.process_0"):
    path = os.path.join(item, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _unreadable_run_file():
  directory = _checkpoint()
  open(os.path.join(directory, "run.json"), "w").write("{not json")
  return _resume(directory)


def _sinusoid_with_another_inner_lr():
  """A sinusoid.py run record, resumed with another ``--inner-lr``."""
  sinusoid = _script("sinusoid")
  directory = os.path.join(tempfile.mkdtemp(), "checkpoints")
  recorded = sinusoid.parse_args(["--out", directory])
  sinusoid.checkpoints.check_run(directory, recorded, resuming=False,
                                 run_flags=sinusoid.RUN_FLAGS)
  changed = sinusoid.parse_args(["--out", directory, "--inner-lr", "0.01"])
  return sinusoid.checkpoints.check_run(directory, changed, resuming=True,
                                        run_flags=sinusoid.RUN_FLAGS)


def _checkpoints_path_is_a_file():
  out = tempfile.mkdtemp()
  open(os.path.join(out, "checkpoints"), "w").write("x")
  return _resume(os.path.join(out, "checkpoints"))


CHECKPOINTS = [
    Case("checkpoints", "resume from a checkpoint whose item directory was deleted",
         lambda: _damaged(shutil.rmtree), RuntimeError,
         r"cannot restore the checkpoint .*checkpoints/2 \(.*\); it is incomplete or corrupt; "
         r"delete .*checkpoints to start afresh, or pass another --out"),
    Case("checkpoints", "resume from a checkpoint whose metadata file is garbage",
         lambda: _damaged(_overwrite_metadata), RuntimeError,
         r"cannot restore the checkpoint .*checkpoints/2 .*incomplete or corrupt"),
    Case("checkpoints", "resume from a checkpoint whose array data is missing",
         lambda: _damaged(_drop_array_data), RuntimeError,
         r"cannot restore the checkpoint .*checkpoints/2 \(ValueError: NOT_FOUND: .*\); it is "
         r"incomplete or corrupt; delete .*checkpoints"),
    Case("checkpoints", "resume with another --solver into the same --out",
         lambda: _resume(_checkpoint(), _state(metasgd=True), solver="metasgd"), RuntimeError,
         r"the checkpoints in .*checkpoints belong to another run: --solver metasgd "
         r"\(checkpoints: maml\); rerun with the checkpoints' flags, or delete"),
    Case("checkpoints", "resume with other --shots and --seed into the same --out",
         lambda: _resume(_checkpoint(), shots=5, seed=1), RuntimeError,
         r"--shots 5 \(checkpoints: 1\), --seed 1 \(checkpoints: 0\)"),
    Case("checkpoints", "resume a checkpoint of another structure (same flags)",
         lambda: _resume(_checkpoint(), _state(metasgd=True)), RuntimeError,
         r"checkpoint .*checkpoints/2 does not match this run's training state \(it lacks "
         r"meta_params\.params\.Dense_0\.bias.*; it has meta_params\.Dense_0\.bias.*another "
         r"--solver, --config or model"),
    Case("checkpoints", "resume a checkpoint of other shapes (another model)",
         lambda: _resume(_checkpoint(width=8)), RuntimeError,
         r"meta_params\.Dense_0\.bias has shape \(8,\) in it, \(4,\) here"),
    Case("checkpoints", "resume a checkpoint past --iterations",
         lambda: _resume(_checkpoint(step=6), iterations=4), RuntimeError,
         r"checkpoint in .*checkpoints is at iteration 6, past --iterations 4; pass --iterations "
         r"6 or more"),
    Case("checkpoints", "resume with a --chunk that does not divide the iterations left",
         lambda: _resume(_checkpoint(step=3), iterations=6, chunk=2), RuntimeError,
         r"at iteration 3: --chunk 2 does not divide the 3 iterations left to --iterations 6"),
    Case("checkpoints", "sinusoid.py resumed with another --inner-lr into the same --out",
         _sinusoid_with_another_inner_lr, RuntimeError,
         r"the checkpoints in .*checkpoints belong to another run: --inner-lr 0\.01 \(checkpoints: "
         r"0\.001\); rerun with the checkpoints' flags, or delete"),
    Case("checkpoints", "resume with an unreadable run record", _unreadable_run_file,
         RuntimeError, r"checkpoints/run\.json is unreadable \(.*\); delete .*checkpoints"),
    Case("checkpoints", "a --out whose checkpoints path is a file", _checkpoints_path_is_a_file,
         RuntimeError, r"checkpoints is a file, not a checkpoint directory"),
]

CASES = DATA + CLI + CHECKPOINTS
