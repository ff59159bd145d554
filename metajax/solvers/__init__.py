"""Inner solvers: ``adapt = solver(loss_fn, ...)``, then ``phi = adapt(theta, support)``."""

from metajax.solvers import linear_solvers
from metajax.solvers._loops import choose_task_batching, choose_unroll, uses_convolution
from metajax.solvers.adjoint import AdjointInfo, adjoint
from metajax.solvers.implicit import LinearSolveInfo, implicit
from metajax.solvers.inner_optimizers import ImplicitInfo
from metajax.solvers.unrolled import UnrolledInfo, differentiable_adam, unrolled

__all__ = [
    "AdjointInfo", "ImplicitInfo", "LinearSolveInfo", "UnrolledInfo", "adjoint",
    "choose_task_batching", "choose_unroll", "differentiable_adam", "implicit",
    "linear_solvers", "unrolled", "uses_convolution",
]
