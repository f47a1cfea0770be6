"""fmtoy: a small PyTorch playground for flow matching on 2D mixtures, with exact ground truth.

Modules (one concept each): data (target distributions), paths (conditional probability paths), marginal
(the exact marginal field, Theorem 1), models, losses, train, solvers, metrics, viz, widgets, symbolic, continuity
and objectives (chapters 1 and 3), shortcut and meanflow (chapter 6), vrfm (chapter 7), assignments and grade
(course tooling), cli.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .data import GaussianMixture, StandardNormal, eight_gaussians, get_dataset, list_datasets
from .device import make_generator, resolve_device
from .losses import cfm_loss
from .marginal import ExactField, marginal_log_prob, marginal_velocity
from .models import VelocityMLP
from .paths import AffinePath, CondOTPath, VEPath, VPPath, get_path, list_paths
from .solvers import SOLVERS, integrate, log_likelihood, sample
from .train import FitConfig, FitResult, TrainConfig, fit, load_checkpoint, save_checkpoint, train_cfm, train_flow

__all__ = [
    "__version__", "GaussianMixture", "StandardNormal", "eight_gaussians", "get_dataset", "list_datasets",
    "make_generator", "resolve_device", "cfm_loss", "ExactField", "marginal_log_prob", "marginal_velocity",
    "VelocityMLP", "AffinePath", "CondOTPath", "VEPath", "VPPath", "get_path", "list_paths", "SOLVERS",
    "integrate", "log_likelihood", "sample", "TrainConfig", "load_checkpoint", "save_checkpoint", "train_cfm", "fit", "FitConfig", "FitResult",
    "train_flow",
]
