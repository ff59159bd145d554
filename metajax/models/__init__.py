"""Paper architectures as ``(params, apply_fn)`` pairs, plus adapters for other module systems."""

from metajax.models.mlp import MLP, make_mlp

__all__ = ["MLP", "make_mlp"]
