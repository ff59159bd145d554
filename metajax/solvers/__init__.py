"""Inner solvers: ``adapt = solver(loss_fn, ...)``, then ``phi = adapt(theta, support)``.

Every solver is an [`InnerSolver`][metajax.solvers.InnerSolver]; ``adapt.solve(theta, support)``
returns
``(phi, AdaptInfo)`` with a [`RESULTS`][metajax.solvers.RESULTS] status. Failures raise by default
(``throw=True``).
"""

from metajax.solvers import inner_optimizers, linear_solvers
from metajax.solvers._adjoint import Adjoint, adjoint
from metajax.solvers._implicit import Implicit, LinearSolveInfo, implicit
from metajax.solvers._loops import choose_task_batching, choose_unroll, uses_convolution
from metajax.solvers._result import RESULTS, AdaptInfo
from metajax.solvers._unrolled import Unrolled, differentiable_adam, unrolled
from metajax.solvers.base import InnerSolver
from metajax.solvers.wrappers import (
    Context,
    LearnedLoss,
    Masked,
    context,
    learned_loss,
    masked,
    path_mask,
)

__all__ = [
    "RESULTS", "AdaptInfo", "Adjoint", "Context", "Implicit", "InnerSolver", "LearnedLoss",
    "LinearSolveInfo", "Masked", "Unrolled", "adjoint", "choose_task_batching", "choose_unroll",
    "context", "differentiable_adam", "implicit", "inner_optimizers", "learned_loss",
    "linear_solvers", "masked", "path_mask", "unrolled", "uses_convolution",
]
