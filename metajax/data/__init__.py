"""Few-shot datasets as class-indexed arrays ``(num_classes, examples_per_class, H, W, C)``.

Nothing here downloads. ``digits`` ships with scikit-learn; Omniglot and
miniImageNet are read from files the user placed on disk (see each loader).
"""

from metajax.data.digits import load_digits
from metajax.data.miniimagenet import load_miniimagenet
from metajax.data.omniglot import (
    OMNIGLOT_ARCHIVES,
    load_omniglot_tfds,
    load_omniglot_zips,
    vinyals_split,
)

__all__ = ["OMNIGLOT_ARCHIVES", "load_digits", "load_miniimagenet", "load_omniglot_tfds",
           "load_omniglot_zips", "vinyals_split"]
