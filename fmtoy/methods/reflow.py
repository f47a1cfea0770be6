"""Reflow (Liu et al. 2023; ch. 10): the rectified coupling (x_0, Phi_{0->1}(x_0)) of a flow, its transport costs,
and flow matching on a fixed coupling, on fmtoy.train.fit.

Rectify((X_0, X_1)) is the flow of v(x, t) = E[X_1 - X_0 | X_t = x], X_t = (1 - t) X_0 + t X_1. Started from the
independent coupling it is the marginal CondOT flow (exact on the playground); one reflow trains a new field on the
pairs (X_0, Phi_{0->1}(X_0)), a second one on the pairs of the first network's flow, and so on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_paired, check_points, check_positive_int
from ..data import StandardNormal
from ..device import make_generator, resolve_device
from ..losses import cfm_loss
from ..marginal import ExactField, exact_field_of
from ..paths import CondOTPath
from ..solvers import SOLVERS, Velocity, flow_map
from ..train import (
    FitContext,
    FitResult,
    RecipeConfig,
    build_model,
    check_config,
    fit,
    fit_options,
    run_config,
)

COSTS: dict[str, Callable[[Tensor], Tensor]] = {
    "squared": lambda z: z.square().sum(1),  # |z|^2: the kinetic energy of a straight path
    "euclidean": lambda z: z.norm(dim=1),  # |z|: convex, not strictly
}


def rectified_coupling(velocity: Velocity, x0: Tensor, steps: int = 64, method: str = "rk4") -> tuple[Tensor, Tensor]:
    """(x_0, Phi_{0->1}(x_0)): the coupling a flow defines (Liu et al. 2023, Rectify), the end points by `steps`
    fixed steps of `method` (no gradient)."""
    x0 = check_points(x0, name="x0")
    return x0, flow_map(velocity, x0, 0.0, 1.0, steps=check_positive_int("steps", steps), method=method)


def transport_cost(x0: Tensor, x1: Tensor, cost: str = "squared") -> tuple[float, float]:
    """(mean, standard error) of c(x_1 - x_0) over paired rows: E c(X_1 - X_0) of a coupling, c in COSTS (ch. 10,
    Thm. reflow)."""
    x0, x1 = check_paired(x0, x1)
    c = COSTS[check_choice("cost", cost, COSTS)]((x1 - x0).double())
    if len(c) < 2:
        raise ValueError(f"a transport cost with a standard error needs at least 2 pairs, got {len(c)}")
    return float(c.mean()), float(c.std() / len(c) ** 0.5)


def pool_sampler(x0: Tensor, x1: Tensor) -> Callable[[FitContext], tuple[Tensor, Tensor]]:
    """draw(ctx) -> batch_size rows (x_0, x_1) of a fixed coupling, drawn with replacement from fit's generator."""
    x0, x1 = check_paired(x0, x1)
    pools: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def draw(ctx: FitContext) -> tuple[Tensor, Tensor]:
        if ctx.device not in pools:
            pools[ctx.device] = (x0.to(ctx.device, torch.float32), x1.to(ctx.device, torch.float32))
        a, b = pools[ctx.device]
        idx = torch.randint(len(a), (ctx.batch_size,), generator=ctx.generator, device=ctx.device)
        return a[idx], b[idx]

    return draw


def fit_coupling(model: nn.Module, x0: Tensor, x1: Tensor, *, progress: bool = False, **options) -> FitResult:
    """Flow matching on the fixed coupling (x0[i], x1[i]) with fmtoy.train.fit: mean |v(x_t, t) - (x_1 - x_0)|^2,
    x_t = (1 - t) x_0 + t x_1, t ~ U[0, 1] (the CFM loss, CondOT path). Its minimiser is the coupling's rectified
    field E[X_1 - X_0 | X_t = x]. options: the loop's (fmtoy.train.FitConfig: steps, batch_size, lr = 3e-3, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. fmtoy.models.VelocityMLP), got {type(model).__name__}")
    draw, path = pool_sampler(x0, x1), CondOTPath()
    config = fit_options(options, lr=3e-3)

    def loss_fn(ctx: FitContext) -> Tensor:
        a, b = draw(ctx)
        t = torch.rand(ctx.batch_size, generator=ctx.generator, device=ctx.device)
        return cfm_loss(model, a, b, t, path)

    return fit(model, loss_fn, config, name="reflow", progress=progress)


@dataclass
class ReflowConfig(RecipeConfig):
    """A reflow recipe for train_reflow: `rounds` reflows of config.data's exact CondOT flow, each a VelocityMLP
    trained on `pairs` pairs (x_0, Phi_{0->1}(x_0)) of the flow before it (the exact field's for round 1), the end
    points by `teacher_steps` steps of `solver`."""

    steps: int = 2000
    batch_size: int = 256
    rounds: int = 1
    pairs: int = 20000
    teacher_steps: int = 32
    solver: str = "rk4"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rounds", "pairs", "teacher_steps"):
            check_positive_int(name, getattr(self, name))
        check_choice("solver", self.solver, SOLVERS)


def fit_reflow(
    model: nn.Module,
    teacher: Velocity,
    *,
    rounds: int = 1,
    pairs: int = 20000,
    teacher_steps: int = 32,
    solver: str = "rk4",
    progress: bool = False,
    **options,
) -> FitResult:
    """`rounds` reflows of the flow of `teacher` (a velocity field v(x, t): the exact field, a trained flow): round k
    fits a network (model's architecture and initial weights) to the pairs (x_0, Phi_{0->1}(x_0)) of round k - 1's
    flow, x_0 ~ N(0, I) (`pairs` rows, seeded by the loop's seed). The result's model is the last round's; the
    earlier ones are result.modules["round_1"], ... options: the loop's (steps, batch_size, lr, seed, device, ...)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "dim"):
        raise TypeError(f"model must be a fmtoy.models.VelocityMLP, got {type(model).__name__}")
    if not callable(teacher):
        raise TypeError(
            f"teacher must be a velocity field v(x, t) (e.g. fmtoy.marginal.ExactField), got {type(teacher).__name__}"
        )
    rounds, pairs = check_positive_int("rounds", rounds), check_positive_int("pairs", pairs)
    check_positive_int("teacher_steps", teacher_steps)
    check_choice("solver", solver, SOLVERS)
    config = fit_options(options, lr=3e-3)
    dev, fresh = resolve_device(config.device), copy.deepcopy(model)  # every round starts from model's weights
    x0 = StandardNormal(model.dim).sample(pairs, make_generator(config.seed, "cpu")).double()
    earlier: dict[str, nn.Module] = {}
    seconds, result = 0.0, None
    for k in range(1, rounds + 1):
        if result is not None:
            teacher = earlier[f"round_{k - 1}"] = result.model
            model = copy.deepcopy(fresh)
        src = x0.to(dev, torch.float64 if isinstance(teacher, ExactField) else torch.float32)
        _, x1 = rectified_coupling(teacher, src, teacher_steps, solver)
        result = fit_coupling(model, src, x1, progress=progress, **vars(config))
        seconds += result.seconds
    result.modules.update(earlier)
    result.seconds = seconds
    return result


def train_reflow(config: ReflowConfig, progress: bool = False) -> FitResult:
    """config.rounds reflows of config.data's exact CondOT flow (fit_reflow): the whole recipe in one call."""
    check_config(config, ReflowConfig)
    field = exact_field_of(config.data)
    model = build_model(config, field.target.dim)
    return run_config(fit_reflow, config, model, field, progress=progress)


__all__ = [
    "COSTS",
    "rectified_coupling",
    "transport_cost",
    "pool_sampler",
    "fit_coupling",
    "fit_reflow",
    "ReflowConfig",
    "train_reflow",
]
