"""fmtoy: a small PyTorch playground for flow matching on 2D mixtures, with exact ground truth.

    import fmtoy
    result = fmtoy.train_flow(fmtoy.TrainConfig(steps=3000))           # a VelocityMLP v_theta(x, t)
    x1 = fmtoy.sample(result.model, fmtoy.StandardNormal(2), 2000, steps=16, method="midpoint")
    fmtoy.energy_distance(x1, fmtoy.get_dataset("eight_gaussians").sample(2000))

The core modules, one concept each, flat at the top: data (target distributions), paths (conditional probability
paths and their schedules), marginal (the exact marginal field, Theorem 1, and its score), models, losses, train
(fit: the one training loop), solvers (and the flow map, chapter 10), sde (the four readings of a model and the SDEs
with its marginals, chapter 9), metrics, viz, widgets, threads (the CPU thread policy), workers (several runs at
once, one process per core), device, cli. The families, in subpackages: methods (shortcut and meanflow, chapter 6;
vrfm, chapter 7; guidance, chapter 8; reflow and consistency, chapter 10; discrete, chapter 11), teaching
(chapter-only helpers), symbolic (SymPy derivations, one module per topic), course (assignments and the
autograder). The plotting names (plot_samples, ...) load matplotlib on first use.
"""

from __future__ import annotations

from ._version import __version__
from .checkpoints import load_checkpoint, save_checkpoint, save_run
from .data import GaussianMixture, StandardNormal, eight_gaussians, get_dataset, list_datasets
from .device import make_generator, resolve_device
from .losses import cfm_loss
from .marginal import ExactField, marginal_log_prob, marginal_score, marginal_velocity
from .metrics import energy_distance, mmd, nll, nll_gap, w2
from .models import VelocityMLP
from .paths import AffinePath, CondOTPath, GaussianPath, SchedulerOutput, VEPath, VPPath, get_path, list_paths
from .sde import MarginalSDE, convert, euler_maruyama
from .solvers import SOLVERS, divergence, flow_map, integrate, log_likelihood, sample
from .threads import describe as describe_threads
from .train import FitConfig, FitResult, TrainConfig, TrainingDiverging, TrainingInterrupted, fit, fit_cfm, train_flow
from .workers import run_jobs, train_many

_VIZ = (
    "plot_samples",
    "plot_density",
    "plot_field",
    "plot_trajectories",
    "animate_trajectories",
    "show",
    "save_animation",
    "grid_points",
)


def __getattr__(name: str):
    """fmtoy.plot_samples and the other plotting names, imported from fmtoy.viz (matplotlib) on first use."""
    if name in _VIZ:
        from . import viz

        return getattr(viz, name)
    raise AttributeError(f"module 'fmtoy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_VIZ))


__all__ = [
    "__version__",
    "GaussianMixture",
    "StandardNormal",
    "eight_gaussians",
    "get_dataset",
    "list_datasets",
    "make_generator",
    "resolve_device",
    "cfm_loss",
    "ExactField",
    "marginal_log_prob",
    "marginal_velocity",
    "marginal_score",
    "MarginalSDE",
    "convert",
    "euler_maruyama",
    "energy_distance",
    "mmd",
    "nll",
    "nll_gap",
    "w2",
    "VelocityMLP",
    "AffinePath",
    "CondOTPath",
    "GaussianPath",
    "SchedulerOutput",
    "VEPath",
    "VPPath",
    "get_path",
    "list_paths",
    "SOLVERS",
    "divergence",
    "integrate",
    "flow_map",
    "log_likelihood",
    "sample",
    "describe_threads",
    "FitConfig",
    "FitResult",
    "TrainingInterrupted",
    "TrainingDiverging",
    "TrainConfig",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
    "save_run",
    "fit_cfm",
    "train_flow",
    "train_many",
    "run_jobs",
    *_VIZ,
]
