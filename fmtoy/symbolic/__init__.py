"""SymPy derivations the book displays, one module per topic: core (symbols, checks, is_zero), continuity
(chapters 1-2), paths (chapters 4-5), shortcut (chapter 6), vrfm (chapter 7). `import fmtoy.symbolic as S` gives
the names of core, continuity and paths in one namespace."""
from .continuity import (continuity_residual, flux_divergence, linear_flow_log_density, log_density_rate,
                         two_component_marginal_1d)
from .core import (PATH_PARAMS, beta_max, beta_min, gaussian_density, is_zero, s, sigma_max, sigma_min, t,
                   values_at_random_points, x, x1, y)
from .paths import (PredictionWeights, RotatedGaussian2D, cross_check_paths, gaussian_conditional_velocity,
                    ot_velocity, path_schedule, prediction_loss_weights, rotated_gaussian_2d,
                    standard_normal_expectation, ve_velocity, vp_velocity)

__all__ = ["continuity_residual", "flux_divergence", "linear_flow_log_density", "log_density_rate",
           "two_component_marginal_1d", "PATH_PARAMS", "beta_max", "beta_min", "gaussian_density", "is_zero", "s",
           "sigma_max", "sigma_min", "t", "values_at_random_points", "x", "x1", "y", "PredictionWeights",
           "RotatedGaussian2D", "cross_check_paths", "gaussian_conditional_velocity", "ot_velocity", "path_schedule",
           "prediction_loss_weights", "rotated_gaussian_2d", "standard_normal_expectation", "ve_velocity",
           "vp_velocity"]
