"""metajax: gradient-based meta-learning in JAX with interchangeable inner solvers."""

from metajax import meta, models, solvers, tasks

__version__ = "0.1.0"
__all__ = ["meta", "models", "solvers", "tasks"]
