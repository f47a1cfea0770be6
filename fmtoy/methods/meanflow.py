"""MeanFlow (Geng et al. 2025) in this book's convention (ch. 6): the average velocity s(x, t, d) over [t, t + d],
trained with the MeanFlow identity s = u + d (u . grad_x s + d_t s - d_d s), the d -> 0 limit of self-consistency.

The target uses the conditional velocity v = x_1 - x_0 for u (as CFM does), the total derivative comes from one
forward-mode JVP with tangent (v, 1, -1) (the end time r = t + d stays fixed), and it carries no gradient.

Defaults follow the official code (Gsunshine/meanflow, meanflow.py and configs/default.py), mirrored to this book's
time (t = 0 noise, t = 1 data; the official code has t = 1 noise): two logit-normal times, sorted, give (t, r); the
flow-matching rows (d = 0) keep the noise-side one, t = min; the adaptive weight's constant is norm_eps = 0.01.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_paired, check_points, check_positive, check_positive_int
from ..data import Distribution, get_dataset
from ..models import VelocityMLP, _check_model_time
from ..solvers import integrate_average
from ..train import (
    FitContext,
    FitResult,
    RecipeConfig,
    build_model,
    check_config,
    fit,
    fit_options,
    pair_sampler,
    run_config,
)


class MeanFlowMLP(nn.Module):
    """s_theta(x, t, d) = MLP([x, gamma(t), e(d)]) with a continuous step size d in [0, 1] (VelocityMLP, cond = d)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_features: int = 32) -> None:
        super().__init__()
        self.net = VelocityMLP(dim=dim, hidden=hidden, depth=depth, time_features=time_features, cond_dim=1)
        self.dim = self.net.dim

    def forward(self, x: Tensor, t: float | Tensor, d: float | Tensor = 0.0) -> Tensor:
        """The average velocity over [t, t + d], shape (n, dim); d = 0 is the instantaneous velocity."""
        x = check_points(x, self.dim)
        return self.net(x, t, _check_model_time(d, x.shape[0], x))

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        """v(x, t) = s(x, t, 0) for fmtoy.solvers.integrate."""
        return self(x, t, 0.0)


TIME_LAWS = ("logit_normal", "uniform")
LOGIT_MEAN, LOGIT_STD = 0.4, 1.0  # the official P_mean = -0.4, P_std = 1.0, mirrored (t -> 1 - t)


def meanflow_times(
    n: int,
    fraction: float = 0.25,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
    law: str = "logit_normal",
) -> tuple[Tensor, Tensor]:
    """(t, d): two draws from `law` sorted to t <= r, d = r - t on a fraction of rows; d = 0 (flow matching) at
    t = min of the two elsewhere (official sample_tr, mirrored). law: "logit_normal" (sigmoid(N(0.4, 1)), the official
    default mirrored) or "uniform"."""
    n = check_positive_int("n", n)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction (rows with d > 0) must be a number in [0, 1], got {fraction!r}")
    check_choice("law", law, TIME_LAWS)
    if law == "uniform":
        a = torch.rand(n, 2, generator=generator, device=device, dtype=dtype)
    else:
        g = torch.randn(n, 2, generator=generator, device=device, dtype=dtype)
        a = torch.sigmoid(g * LOGIT_STD + LOGIT_MEAN)
    a = a.sort(dim=1).values
    m = int(round(fraction * n))
    t = a[:, 0]
    d = torch.cat([a[:m, 1] - a[:m, 0], torch.zeros(n - m, device=device, dtype=dtype)])
    return t, d


def meanflow_loss(
    model: nn.Module, x0: Tensor, x1: Tensor, t: Tensor, d: Tensor, power: float = 1.0, eps: float = 0.01
) -> Tensor:
    """mean_i w_i |s(x_t, t, d) - sg(v + d (v . grad_x s + d_t s - d_d s))|^2, v = x_1 - x_0, x_t = (1-t) x_0 + t x_1
    (ch. 6, Prop. MeanFlow); adaptive weight w = sg(1 / (|err|^2 + eps)^power) (official: power 1, eps 0.01; power 0:
    plain squared error)."""
    x0, x1 = check_paired(x0, x1)
    power = check_positive("power", power, allow_zero=True)
    eps = check_positive("eps", eps)
    tc, dc = _check_model_time(t, x0.shape[0], x0), _check_model_time(d, x0.shape[0], x0)
    xt, v = (1 - tc) * x0 + tc * x1, x1 - x0
    with warnings.catch_warnings():  # torch loads its JVP decompositions through torch.jit.script, once per process
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        s, ds = torch.func.jvp(
            lambda a, b, c: model(a, b[:, 0], c[:, 0]), (xt, tc, dc), (v, torch.ones_like(tc), -torch.ones_like(dc))
        )
    y = (v + dc * ds).detach()  # the regression target, without gradient
    err = (s - y).square().sum(1)
    weight = (err.detach() + eps).pow(-power) if power > 0 else torch.ones_like(err)
    return (weight * err).mean()


def fit_meanflow(
    model: MeanFlowMLP,
    target: Distribution,
    source: Distribution | None = None,
    *,
    fraction: float = 0.25,
    power: float = 1.0,
    eps: float = 0.01,
    law: str = "logit_normal",
    progress: bool = False,
    **options,
) -> FitResult:
    """meanflow_loss minimised with fmtoy.train.fit; (t, d) from meanflow_times(law). options: the loop's
    (fmtoy.train.FitConfig: steps, batch_size, lr = 3e-3, lr_schedule, seed, device, threads)."""
    if not isinstance(model, MeanFlowMLP):
        raise TypeError(f"model must be a fmtoy.methods.meanflow.MeanFlowMLP, got {type(model).__name__}")
    draw = pair_sampler(model, target, source)
    config = fit_options(options, lr=3e-3)
    meanflow_times(1, fraction, law=law)
    check_positive("eps", eps)

    def loss_fn(ctx: FitContext) -> Tensor:
        x0, x1 = draw(ctx)
        t, d = meanflow_times(ctx.batch_size, fraction, ctx.generator, ctx.device, law=law)
        return meanflow_loss(model, x0, x1, t, d, power, eps)

    return fit(model, loss_fn, config, name="meanflow", progress=progress)


@dataclass
class MeanFlowConfig(RecipeConfig):
    """A MeanFlow recipe for train_meanflow (4000 steps of 256; fraction, power, eps and the time law: the official
    code's, mirrored to this book's time)."""

    steps: int = 4000
    batch_size: int = 256
    fraction: float = 0.25
    power: float = 1.0
    eps: float = 0.01
    law: str = "logit_normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        meanflow_times(1, self.fraction, law=self.law)
        check_positive("power", self.power, allow_zero=True)
        check_positive("eps", self.eps)


def train_meanflow(config: MeanFlowConfig, progress: bool = False) -> FitResult:
    """Build a MeanFlowMLP for config.data and train it with fit_meanflow: the whole recipe in one call."""
    check_config(config, MeanFlowConfig)
    target = get_dataset(config.data)
    return run_config(fit_meanflow, config, build_model(config, target.dim, MeanFlowMLP), target, progress=progress)


def sample_meanflow(model: nn.Module, x0: Tensor, steps: int = 1, return_trajectory: bool = False) -> Tensor:
    """x_{t+d} = x_t + d s(x_t, t, d), d = 1/steps: one network call per step (fmtoy.solvers.integrate_average)."""
    return integrate_average(model, x0, steps, return_trajectory)


__all__ = [
    "MeanFlowMLP",
    "TIME_LAWS",
    "meanflow_times",
    "meanflow_loss",
    "fit_meanflow",
    "MeanFlowConfig",
    "train_meanflow",
    "sample_meanflow",
]
