"""metajax: gradient-based meta-learning in JAX with interchangeable inner solvers."""

from metajax import data, meta, models, parallel, solvers, tasks

__version__ = "0.1.0"
__all__ = ["data", "meta", "models", "parallel", "solvers", "tasks"]
