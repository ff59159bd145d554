"""Meta-learning around the solvers: losses, meta-objectives, the train step, evaluation."""

from metajax.meta.evaluation import (
    confidence_interval,
    evaluate,
    evaluate_per_task,
    make_evaluator,
)
from metajax.meta.losses import accuracy, cross_entropy_loss, mse_loss
from metajax.meta.mamlpp import lslr_step_sizes, maml_plus_plus, msl_weights, multi_step_objective
from metajax.meta.objectives import PARAMETRIZATIONS, meta_objective, reptile_value_and_grad
from metajax.meta.train import TrainState, init_train_state, make_train_step

__all__ = ["PARAMETRIZATIONS", "TrainState", "accuracy", "confidence_interval",
           "cross_entropy_loss", "evaluate", "evaluate_per_task", "init_train_state",
           "lslr_step_sizes", "make_evaluator", "make_train_step", "maml_plus_plus",
           "meta_objective", "msl_weights", "mse_loss", "multi_step_objective",
           "reptile_value_and_grad"]
