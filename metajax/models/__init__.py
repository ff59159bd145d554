"""Paper architectures as ``(params, apply_fn)`` pairs, plus adapters for other module systems."""

from metajax.models.adapters import from_equinox, from_nnx, with_context
from metajax.models.batch_norm import calibrate_batch_stats, freeze_batch_stats, select_step
from metajax.models.conv import NORM_MODES, BatchNorm, Conv4, ResNet12, init_model
from metajax.models.mlp import MAML_KERNEL_INIT, MLP, make_mlp

__all__ = ["MAML_KERNEL_INIT", "MLP", "NORM_MODES", "BatchNorm", "Conv4", "ResNet12",
           "calibrate_batch_stats", "freeze_batch_stats", "from_equinox", "from_nnx",
           "init_model", "make_mlp", "select_step", "with_context"]
