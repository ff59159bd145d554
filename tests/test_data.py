"""Dataset loaders on small generated data in each dataset's real on-disk format."""

import csv
import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

import metajax
from metajax.data import omniglot


def _stroke_png(character: int, drawer: int) -> bytes:
  """A 105x105 Omniglot-like drawing: black strokes on white, position set by the ids."""
  image = Image.new("L", (105, 105), 255)
  draw = ImageDraw.Draw(image)
  x = 10 + (character * 7) % 80
  draw.line([(x, 10), (x + drawer % 5, 95)], fill=0, width=6)
  buffer = io.BytesIO()
  image.convert("1").save(buffer, format="PNG")
  return buffer.getvalue()


def _write_omniglot_zip(path, root, alphabets, first_character, drawers=20):
  character = first_character
  with zipfile.ZipFile(path, "w") as archive:
    for alphabet, n_chars in alphabets:
      for c in range(1, n_chars + 1):
        for d in range(1, drawers + 1):
          name = f"{root}/{alphabet}/character{c:02d}/{character:04d}_{d:02d}.png"
          archive.writestr(name, _stroke_png(character, d))
          if d == 1:  # a zip re-made on macOS: resource forks beside the drawings, skipped
            archive.writestr(f"__MACOSX/{root}/{alphabet}/character{c:02d}/._"
                             f"{character:04d}_{d:02d}.png", b"\0\x05\x16\x07 Mac OS X")
            archive.writestr(f"{root}/{alphabet}/character{c:02d}/._{character:04d}_{d:02d}.png",
                             b"\0\x05\x16\x07 Mac OS X")  # AppleDouble in the folder itself
        character += 1
  return character


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("omniglot")
  nxt = _write_omniglot_zip(directory / "images_background.zip", "images_background",
                            [("Latin", 4), ("Greek", 3)], 1)
  _write_omniglot_zip(directory / "images_evaluation.zip", "images_evaluation",
                      [("Kannada", 3)], nxt)
  return directory


def test_omniglot_zips_checksum_is_verified(omniglot_dir):
  with pytest.raises(ValueError, match=r"images_background.zip is \d+ bytes, expected 9464212"):
    metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=6)
  # Same size, other bytes: the sha256 decides.
  size = omniglot.OMNIGLOT_ARCHIVES["images_background.zip"][0]
  fake = omniglot_dir / "same_size" / "images_background.zip"
  fake.parent.mkdir()
  fake.write_bytes(b"\0" * size)
  with pytest.raises(ValueError, match="images_background.zip has sha256 .* download it again"):
    omniglot._check_archive(str(fake))


def test_omniglot_zips_load_vinyals_split(omniglot_dir):
  data = metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=6, verify=False)
  assert data["train"].shape == (6, 20, 28, 28, 1) and data["test"].shape == (4, 20, 28, 28, 1)
  assert data["train"].dtype == np.uint8
  # Inverted: background dark, strokes bright.
  first = data["train"][0, 0, ..., 0].astype(int)
  assert first[0, 0] == 0 and first.max() > 200
  # Characters follow the global index: character k's stroke sits at x = 10 + 7 (k - 1) / 105 * 28.
  for index, image in enumerate(np.concatenate([data["train"], data["test"]])[:, 0, ..., 0]):
    expected_col = (10 + ((index + 1) * 7) % 80 + 3) * 28 / 105
    assert abs(np.argmax(image.sum(0)) - expected_col) <= 2
  assert os.path.exists(omniglot_dir / "omniglot_28.npz")
  again = metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=6, verify=False)
  np.testing.assert_array_equal(again["test"], data["test"])


def test_omniglot_cache_holds_the_unsplit_characters(omniglot_dir):
  """The cache is split after loading: another num_train gets its own split, not the cached one."""
  six = metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=6, verify=False)
  with np.load(omniglot_dir / "omniglot_28.npz") as cache:
    assert sorted(cache.files) == ["characters", "sources"]  # sources: the archives' stamp
    assert cache["characters"].shape == (10, 20, 28, 28)
  eight = metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=8, verify=False)
  assert eight["train"].shape == (8, 20, 28, 28, 1) and eight["test"].shape == (2, 20, 28, 28, 1)
  both = np.concatenate([six["train"], six["test"]])
  np.testing.assert_array_equal(np.concatenate([eight["train"], eight["test"]]), both)
  uncached = metajax.data.load_omniglot_zips(str(omniglot_dir), num_train=8, verify=False,
                                             cache=False)
  np.testing.assert_array_equal(uncached["train"], eight["train"])


def test_omniglot_missing_archives_say_where_to_put_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="brendenlake/omniglot"):
    metajax.data.load_omniglot_zips(str(tmp_path))


def test_omniglot_archive_table_matches_reference():
  assert set(omniglot.OMNIGLOT_ARCHIVES) == {
      "images_background.zip", "images_evaluation.zip", "images_background_small1.zip",
      "images_background_small2.zip"}
  assert all(len(digest) == 64 for _, digest in omniglot.OMNIGLOT_ARCHIVES.values())


def test_omniglot_tfds_path_on_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")  # in the [test] extra: runs in CI
  characters, drawers = 9, 20

  def as_data_source(self, split, **kwargs):
    # tfds's train split is images_background (first characters), test is images_evaluation.
    labels = range(0, 6) if split == "train" else range(6, characters)
    examples = []
    for label in labels:
      for d in range(drawers):
        image = np.array(Image.open(io.BytesIO(_stroke_png(label + 1, d + 1))).convert("RGB"))
        examples.append({"image": image, "label": label, "alphabet": label // 3})
    return examples

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    data = metajax.data.load_omniglot_tfds(num_train=6)
  assert data["train"].shape == (6, 20, 28, 28, 1) and data["test"].shape == (3, 20, 28, 28, 1)
  assert data["train"][0, 0, 0, 0, 0] == 0 and data["train"].max() > 200


def test_miniimagenet_split_files(tmp_path):
  (tmp_path / "images").mkdir()
  rng = np.random.default_rng(0)
  for split, classes in (("train", ["n01", "n02", "n03"]), ("test", ["n09", "n08"])):
    # test.csv as a spreadsheet saves it: with a UTF-8 byte-order mark
    with open(tmp_path / f"{split}.csv", "w", newline="",
              encoding="utf-8-sig" if split == "test" else "utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["filename", "label"])
      for label in classes:
        for i in range(4):
          name = f"{label}{i:08d}.jpg"
          color = int(label[1:]) * 20
          pixels = np.full((90 + i, 100, 3), color, np.uint8) + rng.integers(0, 3, (90 + i, 100, 3),
                                                                               dtype=np.uint8)
          Image.fromarray(pixels).save(tmp_path / "images" / name)
          writer.writerow([name, label])
  data = metajax.data.load_miniimagenet(str(tmp_path), splits=("train", "test"))
  assert data["train"].shape == (3, 4, 84, 84, 3) and data["test"].shape == (2, 4, 84, 84, 3)
  # Classes sorted by label: test n08 before n09; colour identifies the class.
  assert abs(int(data["test"][0].mean()) - 160) <= 3 and abs(int(data["test"][1].mean()) - 180) <= 3
  with pytest.raises(ValueError, match="unknown splits"):
    metajax.data.load_miniimagenet(str(tmp_path), splits=("dev",))
  with pytest.raises(FileNotFoundError, match="val.csv"):
    metajax.data.load_miniimagenet(str(tmp_path), splits=("val",))


def test_caches_are_rebuilt_when_their_source_files_change(tmp_path):
  (tmp_path / "images").mkdir()
  rows = [(f"n0{c}{i:08d}.jpg", f"n0{c}") for c in (1, 2, 3) for i in range(2)]
  for name, label in rows:
    Image.new("RGB", (10, 10), (int(label[1:]) * 20,) * 3).save(tmp_path / "images" / name)

  def write_split(rows):
    with open(tmp_path / "train.csv", "w", newline="") as f:
      csv.writer(f).writerows([("filename", "label"), *rows])

  write_split(rows)
  load = lambda: metajax.data.load_miniimagenet(str(tmp_path), splits=("train",))["train"]
  assert load().shape == (3, 2, 84, 84, 3) and (tmp_path / "mini_train_84.npz").exists()
  write_split(rows[:4])  # the split file edited down to two classes
  assert load().shape == (2, 2, 84, 84, 3)
  # Omniglot: archives replaced by others (more characters) rebuild omniglot_<size>.npz.
  _write_omniglot_zip(tmp_path / "images_background.zip", "images_background", [("Latin", 3)], 1)
  _write_omniglot_zip(tmp_path / "images_evaluation.zip", "images_evaluation", [("Greek", 2)], 4)
  first = metajax.data.load_omniglot_zips(str(tmp_path), num_train=3, verify=False)
  assert first["test"].shape[0] == 2
  _write_omniglot_zip(tmp_path / "images_evaluation.zip", "images_evaluation", [("Greek", 4)], 4)
  assert metajax.data.load_omniglot_zips(str(tmp_path), num_train=3,
                                         verify=False)["test"].shape[0] == 4


def test_digits_have_disjoint_class_splits():
  data = metajax.data.load_digits()
  assert data["train"].shape == (5, 174, 8, 8, 1) and data["test"].shape == (5, 174, 8, 8, 1)
  assert 0.0 <= data["train"].min() and data["train"].max() <= 1.0
  assert not any(np.array_equal(a, b) for a in data["train"][:, 0] for b in data["test"][:, 0])
  with pytest.raises(ValueError, match="overlap"):
    metajax.data.load_digits((0, 1, 2), (2, 3, 4))


def test_digits_classes_are_validated_not_wrapped():
  """A negative class used to index from the end (-1 leaked digit 9 into meta-training)."""
  with pytest.raises(ValueError, match=r"train_classes holds \[-1\], outside .* 0..9"):
    metajax.data.load_digits((0, 1, -1), (5, 6, 7))
  data = metajax.data.load_digits((3, 0), np.array([9, 1]))  # order kept, numpy ints accepted
  grouped = metajax.data.load_digits(tuple(range(5)), tuple(range(5, 10)))
  np.testing.assert_array_equal(data["train"], grouped["train"][[3, 0]])
  np.testing.assert_array_equal(data["test"][0], grouped["test"][4])  # digit 9
  np.testing.assert_array_equal(data["test"][1], grouped["train"][1])  # digit 1


def test_group_by_class_requires_equal_classes_unless_per_class():
  images, labels = np.arange(7), np.array([2, 1, 2, 1, 2, 0, 0])
  with pytest.raises(ValueError, match=r"most have 2, but class 2 has 3\.$"):
    omniglot.group_by_class(images, labels)
  np.testing.assert_array_equal(omniglot.group_by_class(images, labels, per_class=2),
                                [[5, 6], [1, 3], [0, 2]])


def test_drawings_on_a_transparent_background_keep_their_strokes():
  """convert('L') drops alpha: black strokes on a transparent background became one flat
  image. Transparency is composited onto white first, as a viewer shows it."""
  rgba = Image.new("RGBA", (105, 105), (0, 0, 0, 0))
  ImageDraw.Draw(rgba).line([(50, 10), (50, 95)], fill=(0, 0, 0, 255), width=6)
  opaque = Image.new("L", (105, 105), 255)
  ImageDraw.Draw(opaque).line([(50, 10), (50, 95)], fill=0, width=6)
  np.testing.assert_array_equal(omniglot._to_array(rgba, 28), omniglot._to_array(opaque, 28))
  with pytest.raises(ValueError, match="is a I;16 image"):
    omniglot._to_array(Image.new("I;16", (105, 105), 30000), 28)


def test_an_unwritable_cache_warns_and_returns_the_data(tmp_path):
  from metajax.data._common import cached
  arrays = {"images": np.ones((2, 3), np.uint8)}
  path = str(tmp_path / "no-such-folder" / "cache.npz")  # np.savez cannot create the folder
  with pytest.warns(UserWarning, match="could not write the cache file .*cache.npz"):
    out = cached(path, lambda: arrays, expect={"images": (2, 3)})
  np.testing.assert_array_equal(out["images"], arrays["images"])
