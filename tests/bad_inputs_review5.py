"""Bad inputs found by a fifth review (data, checkpoints, task samplers, models; see
tests/badinput.py): data that leaked or was silently misread, and runs that could not be checked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

import metajax
from metajax.models import Conv4, init_model
from tests.bad_inputs_data_cli import _checkpoint, _cli, _mini, _mini_root, _resume
from tests.badinput import Case

PNG_ROWS = [(f"{label}_{i}.png", label) for label in ("n01", "n02") for i in range(2)]


def _conv4_apply():
  return init_model(Conv4(num_classes=5, filters=4, blocks=3), jax.random.key(0), (8, 8, 1))


def _apply_channel_first():
  params, apply_fn = _conv4_apply()
  return apply_fn(params, jnp.ones((2, 1, 8, 8)))


def _apply_uint8():
  params, apply_fn = _conv4_apply()
  return apply_fn(params, jnp.ones((2, 8, 8, 1), jnp.uint8))


def _apply_rgb():
  params, apply_fn = _conv4_apply()
  return apply_fn(params, jnp.ones((2, 8, 8, 3)))


def _splits_sharing_a_class():
  root = _mini_root()
  shutil.copy(os.path.join(root, "train.csv"), os.path.join(root, "test.csv"))
  return _mini(root, splits=("train", "test"))


def _sixteen_bit_image():
  from PIL import Image
  root = _mini_root(rows=PNG_ROWS)
  Image.new("I;16", (10, 10), 30000).save(os.path.join(root, "images", "n01_0.png"))
  return _mini(root, cache=False)


def _resume_without_run_record():
  return _resume(_checkpoint(record=False))


def _resume_with_an_empty_run_record():
  directory = _checkpoint(record=False)
  with open(os.path.join(directory, "run.json"), "w", encoding="utf-8") as f:
    json.dump({}, f)
  return _resume(directory)


def _omniglot_archive_twice():
  """images_evaluation.zip a copy of images_background.zip (verify=False): every drawing twice,
  so one could be a task's support and query example at once."""
  from tests.test_data import _write_omniglot_zip
  directory = tempfile.mkdtemp()
  background = os.path.join(directory, "images_background.zip")
  _write_omniglot_zip(background, "images_background", [("Latin", 2)], 1, drawers=2)
  shutil.copy(background, os.path.join(directory, "images_evaluation.zip"))
  return metajax.data.load_omniglot_zips(directory, verify=False, cache=False, num_train=1)


CASES = [
    Case("models", "init_model given a channel-first input_shape (C, H, W)",
         lambda: init_model(Conv4(num_classes=5, filters=4, strided=True), jax.random.key(0),
                            (1, 28, 28)), ValueError,
         r"input_shape \(1, 28, 28\) looks channel-first \(C, H, W\); metajax models take NHWC "
         r"images: pass \(28, 28, 1\)"),
    Case("models", "apply_fn given channel-first images", _apply_channel_first, ValueError,
         r"apply_fn was built for NHWC images of \(8, 8, 1\); these of \(1, 8, 8\) are "
         r"channel-first: pass x.transpose\(0, 2, 3, 1\)"),
    Case("models", "apply_fn given uint8 images (0..255, unscaled)", _apply_uint8, TypeError,
         r"apply_fn takes floating-point images scaled as in training \(e.g. x / 255.0\), got "
         r"dtype uint8"),
    Case("models", "apply_fn given images of another channel count", _apply_rgb, ValueError,
         r"apply_fn \(built for images of \(8, 8, 1\), given \(8, 8, 3\)\) failed: the model "
         r"does not take this data"),
    Case("tasks", "episodes with ways=1 (every loss and gradient 0)",
         lambda: metajax.tasks.episodes(ways=1, shots=1, queries=1), ValueError,
         r"ways must be >= 2, got 1: a 1-way task labels every example 0"),
    Case("tasks", "a raw uint32 key of the wrong length",
         lambda: metajax.tasks.episodes(ways=2, shots=1, queries=1)(
             jnp.zeros(3, jnp.uint32), 2, jnp.zeros((5, 3, 8, 8, 1))), ValueError,
         r"key is a raw uint32 key of shape \(3,\); jax.random.PRNGKey keys have shape \(2,\)"),
    Case("data", "miniImageNet train.csv and test.csv sharing a class (test leaks into training)",
         _splits_sharing_a_class, ValueError,
         r"class 'n01' is in both .*train.csv and .*test.csv \(and 1 more\): the splits must be "
         r"disjoint"),
    Case("data", "miniImageNet holding a 16-bit PNG (was clipped to white)", _sixteen_bit_image,
         ValueError, r"n01_0.png \(listed in .*train.csv\) is a I;16 image \(16-bit, 32-bit or "
         r"float\): the loaders read 8-bit images"),
    Case("checkpoints", "resume checkpoints whose run.json is missing (flags unverifiable)",
         _resume_without_run_record, RuntimeError,
         r"checkpoints holds checkpoints but not run.json, the record of the flags that define "
         r"the run"),
    Case("checkpoints", "resume checkpoints whose run.json is {}", _resume_with_an_empty_run_record,
         RuntimeError, r"run.json records none of the flags that define the run"),
    Case("cli", "cosmixture.py --reg without imaml among --solvers",
         _cli("cosmixture", "--solvers", "maml,adjoint", "--reg", "5"), ValueError,
         r"--reg 5.0 is used by the imaml solver only, which --solvers maml,adjoint does not "
         r"run"),
    Case("solvers", "context wrapping unrolled(per_step=True) ((steps,) rates read per entry)",
         lambda: metajax.solvers.context(metajax.solvers.unrolled(
             lambda p, b: jnp.sum(p["context"] ** 2), steps=3, per_step=True), 4), TypeError,
         r"context cannot wrap unrolled\(\.\.\., per_step=True\)"),
    Case("data", "Omniglot's two archives holding the same characters (verify=False)",
         _omniglot_archive_twice, ValueError,
         r"character 0001 is in both .*images_background.zip and .*images_evaluation.zip \(and 1 "
         r"more\): the archives hold disjoint characters"),
]
