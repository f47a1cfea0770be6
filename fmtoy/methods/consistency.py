"""Consistency models (Song et al. 2023; ch. 10) in this book's time (t = 0 noise, t = 1 data): a network f(x, t)
for the flow map to the data end, f(x_t, t) = Phi_{t->1}(x_t), trained by consistency distillation (from a velocity
field: the exact one or a trained flow) or consistency training (from data pairs alone), on fmtoy.train.fit.

Parametrisation: f_theta(x, t) = x + (1 - t) F_theta(x, t), so the boundary condition f(x, 1) = x holds for every
theta, and F is the average velocity over [t, 1] (ch. 6's shortcut with d = 1 - t). Training times lie on the grid
t_n = n / N, n = 0 ... N - 1; the loss is |f_theta(x_{t_n}, t_n) - sg f_teacher(x_{t_{n+1}}, t_{n+1})|^2 with
    distillation:  x_{t_{n+1}} = one `solver` step of the field from x_{t_n}, x_{t_n} = (1 - t_n) x_0 + t_n x_1,
    training:      x_{t_{n+1}} = (1 - t_{n+1}) x_0 + t_{n+1} x_1, the same pair (x_0, x_1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_paired, check_points, check_positive_int
from ..data import Distribution, get_dataset
from ..device import resolve_device
from ..marginal import exact_field_of
from ..models import VelocityMLP, _check_model_time
from ..solvers import SOLVERS, Velocity, flow_map
from ..threads import thread_policy
from ..train import (
    FitContext,
    FitResult,
    RecipeConfig,
    TrainConfig,
    build_model,
    check_config,
    check_ema,
    fit,
    fit_options,
    pair_sampler,
    run_config,
    train_flow,
)

Consistency = Callable[[Tensor, Tensor], Tensor]  # f(x, t): x (n, dim), t (n,) -> (n, dim)
MODES = ("distillation", "training")
TEACHERS = ("online", "ema")
FIELDS = ("exact", "flow")


class ConsistencyMLP(nn.Module):
    """f_theta(x, t) = x + (1 - t) F_theta(x, t), F_theta a VelocityMLP: f(x, 1) = x for every theta (ch. 10)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_features: int = 32) -> None:
        super().__init__()
        self.net = VelocityMLP(dim=dim, hidden=hidden, depth=depth, time_features=time_features)
        self.dim, self.hidden, self.depth = self.net.dim, self.net.hidden, self.net.depth

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        """f(x, t), the model's Phi_{t->1}(x), shape (n, dim)."""
        x = check_points(x, self.dim)
        tc = _check_model_time(t, x.shape[0], x)
        return x + (1 - tc) * self.net(x, tc[:, 0])


def check_intervals(intervals: int) -> int:
    """N >= 1: the training grid t_n = n / N."""
    return check_positive_int("intervals", intervals)


def ode_step(field: Velocity, x: Tensor, t: Tensor, dt: float, solver: str = "rk4") -> Tensor:
    """One `solver` step of dx/dt = field(x, t) from per-row times t (n,) to t + dt (at most 1), without gradient."""
    return flow_map(field, x, t, (t + dt).clamp(max=1.0), steps=1, method=solver)


def distillation_target(
    f: Consistency, field: Velocity, x: Tensor, t: Tensor, dt: float, solver: str = "rk4"
) -> Tensor:
    """sg f(x', t + dt), x' = one solver step of the field from (x, t): the consistency distillation target (Song et
    al. 2023, Eq. 7, in this book's time)."""
    with torch.no_grad():
        x_next = ode_step(field, x, t, dt, solver).to(x.dtype)
        return f(x_next, t + dt).detach()


def training_target(f: Consistency, x0: Tensor, x1: Tensor, t: Tensor, dt: float) -> Tensor:
    """sg f(x_{t + dt}, t + dt), x_{t + dt} = (1 - t - dt) x_0 + (t + dt) x_1 of the same pair: consistency training's
    target (Song et al. 2023, Eq. 10): the distillation target with the conditional velocity x_1 - x_0 for u_t."""
    r = (t + dt)[:, None]
    with torch.no_grad():
        return f((1 - r) * x0 + r * x1, t + dt).detach()


def grid_times(
    n: int, intervals: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> Tensor:
    """n times t_k = k / N, k ~ U{0, ..., N - 1} (the start of a grid interval)."""
    k = torch.randint(check_intervals(intervals), (check_positive_int("n", n),), generator=generator, device=device)
    return k.to(dtype) / intervals


def consistency_loss(
    model: Consistency,
    x0: Tensor,
    x1: Tensor,
    mode: str = "distillation",
    field: Velocity | None = None,
    intervals: int = 16,
    solver: str = "rk4",
    teacher: Consistency | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mean_i |f(x_{t_i}, t_i) - target_i|^2 on grid times t_i (ch. 10): the distillation target (needs `field`) or
    the training target; the target comes from `teacher` (default: the model itself, without gradient)."""
    check_choice("mode", mode, MODES)
    x0, x1 = check_paired(x0, x1)
    if mode == "distillation" and not callable(field):
        raise ValueError("mode='distillation' needs field, the velocity v(x, t) to distil (exact or trained)")
    dt = 1.0 / check_intervals(intervals)
    t = grid_times(len(x0), intervals, generator, x0.device, x0.dtype)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    teacher = model if teacher is None else teacher
    if mode == "distillation":
        y = distillation_target(teacher, field, xt, t, dt, solver)
    else:
        y = training_target(teacher, x0, x1, t, dt)
    return (model(xt, t) - y).square().sum(1).mean()


def fit_consistency(
    model: ConsistencyMLP,
    target: Distribution,
    source: Distribution | None = None,
    *,
    mode: str = "distillation",
    field: Velocity | None = None,
    intervals: int = 16,
    solver: str = "rk4",
    teacher: str = "online",
    ema_decay: float = 0.999,
    progress: bool = False,
    **options,
) -> FitResult:
    """Minimise consistency_loss with fmtoy.train.fit; teacher "online" (the model, no gradient; improved consistency
    training's choice) or "ema". options: the loop's (steps, batch_size, lr = 3e-3, lr_schedule, seed, device, ...)."""
    if not isinstance(model, ConsistencyMLP):
        raise TypeError(f"model must be a fmtoy.methods.consistency.ConsistencyMLP, got {type(model).__name__}")
    check_choice("mode", mode, MODES)
    check_choice("teacher", teacher, TEACHERS)
    check_intervals(intervals)
    check_choice("solver", solver, SOLVERS)
    if mode == "distillation" and not callable(field):
        raise ValueError("mode='distillation' needs field, the velocity v(x, t) to distil (exact or trained)")
    if teacher == "ema" and check_ema(ema_decay) is None:
        raise ValueError("teacher='ema' needs ema_decay, a number in (0, 1) such as 0.999")
    draw = pair_sampler(model, target, source)
    config = fit_options(options, lr=3e-3, ema_decay=ema_decay if teacher == "ema" else None)
    if isinstance(field, nn.Module):
        field = field.to(resolve_device(config.device)).eval()

    def loss_fn(ctx: FitContext) -> Tensor:
        x0, x1 = draw(ctx)
        ema = ctx.ema[0] if ctx.ema else None
        return consistency_loss(model, x0, x1, mode, field, intervals, solver, ema, ctx.generator)

    return fit(model, loss_fn, config, name=f"consistency {mode}", progress=progress)


@dataclass
class ConsistencyConfig(RecipeConfig):
    """A consistency-model recipe for train_consistency. mode "distillation" distils `field`: "exact" (config.data's
    exact CondOT field, a Gaussian mixture) or "flow" (a flow-matching teacher trained first by train_flow with
    teacher_steps steps and this recipe's network, batch, lr and seed); mode "training" needs no field."""

    steps: int = 2000
    batch_size: int = 256
    mode: str = "distillation"
    field: str = "exact"
    intervals: int = 16
    solver: str = "rk4"
    teacher: str = "online"
    ema_decay: float = 0.999
    teacher_steps: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mode", self.mode, MODES)
        check_choice("field", self.field, FIELDS)
        check_intervals(self.intervals)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("teacher", self.teacher, TEACHERS)
        check_ema(self.ema_decay)
        check_positive_int("teacher_steps", self.teacher_steps)

    def flow_teacher(self) -> TrainConfig:
        """The TrainConfig of the flow-matching teacher of field="flow": this recipe's shared fields (data, network,
        batch, lr, seed, device, ...) with teacher_steps steps (the same recipe as the chapter's FM row)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RecipeConfig)}
        return TrainConfig(**{**shared, "steps": self.teacher_steps})


def _fit_recipe(
    model,
    target,
    *,
    data: str,
    mode: str,
    field: str,
    intervals: int,
    solver: str,
    teacher: str,
    ema_decay: float,
    teacher_steps: int,
    hidden: int,
    depth: int,
    progress: bool = False,
    **options,
) -> FitResult:
    """train_consistency's loop: the field to distil built from the recipe's fields, then fit_consistency."""
    velocity = None
    if mode == "distillation":
        if field == "exact":
            velocity = exact_field_of(data)
        else:
            recipe = ConsistencyConfig(data=data, hidden=hidden, depth=depth, teacher_steps=teacher_steps, **options)
            velocity = train_flow(recipe.flow_teacher(), progress=False).model
    return fit_consistency(
        model,
        target,
        mode=mode,
        field=velocity,
        intervals=intervals,
        solver=solver,
        teacher=teacher,
        ema_decay=ema_decay,
        progress=progress,
        **options,
    )


def train_consistency(config: ConsistencyConfig, progress: bool = False) -> FitResult:
    """Build a ConsistencyMLP for config.data and train it (fit_consistency): the whole recipe in one call."""
    check_config(config, ConsistencyConfig)
    target = get_dataset(config.data)
    model = build_model(config, target.dim, ConsistencyMLP)
    return run_config(_fit_recipe, config, model, target, progress=progress)


# ----------------------------------------------------------------------------------------------- sampling
def sample_consistency(
    f: Consistency, z: Tensor, steps: int = 1, generator: torch.Generator | None = None, intervals: int | None = None
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1, this book's time): x = f(z, 0), then for
    t_k = k / steps, k = 1 ... steps - 1, renoise along the path, x_t = (1 - t_k) eps + t_k x with fresh eps ~ N(0, I)
    from `generator`, and x = f(x_t, t_k). One call per step; `intervals` (the training grid) must be a multiple of
    steps so that every t_k was trained."""
    z = check_points(z, name="z")
    steps = check_positive_int("steps", steps)
    if intervals is not None and check_intervals(intervals) % steps:
        raise ValueError(
            f"steps={steps} must divide the training grid's intervals={intervals}: the times k / steps "
            "must be grid times the model was trained at"
        )
    if steps > 1 and generator is None:
        raise ValueError("multistep sampling draws fresh noise: pass a torch.Generator (fmtoy.device.make_generator)")
    n = z.shape[0]
    with torch.no_grad(), thread_policy(None, z.device) as tuner:
        x = f(z, z.new_zeros(n))
        for k in range(1, steps):
            tuner.tick()
            tk = k / steps
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x = f((1 - tk) * eps + tk * x, z.new_full((n,), tk))
    return x


class ExactConsistency:
    """The exact consistency function f*(x, t) = Phi_{t->1}(x) of a known field (fmtoy.solvers.flow_map, RK4)."""

    def __init__(self, field: Velocity, steps: int = 64) -> None:
        if not callable(field):
            raise TypeError(f"field must be a callable v(x, t) -> (n, d), got {type(field).__name__}")
        self.field, self.steps = field, check_positive_int("steps", steps)

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        return flow_map(self.field, x, t, 1.0, steps=self.steps)


def consistency_error(f: Consistency, trajectory: Tensor) -> tuple[Tensor, Tensor]:
    """RMS error sqrt(mean |f(x_t, t) - Phi_{t->1}(x_t)|^2) over x_t ~ p_t at every time t_k = k / M of an exact
    trajectory (M + 1, n, dim) from x_0 ~ p_0 (e.g. fmtoy.methods.shortcut.exact_grid_trajectory), whose last
    frame is Phi_{t_k->1}(x_{t_k}) for every k. Returns (times (M,), errors (M,)), t = 1 left out (f(x, 1) = x)."""
    if not isinstance(trajectory, Tensor) or trajectory.ndim != 3 or trajectory.shape[0] < 2:
        shape = tuple(trajectory.shape) if isinstance(trajectory, Tensor) else type(trajectory).__name__
        raise ValueError(f"trajectory must have shape (M + 1, n, dim) with M >= 1, got {shape}")
    m, end = trajectory.shape[0] - 1, trajectory[-1]
    errs = []
    with torch.no_grad():
        for k in range(m):
            xk = trajectory[k]
            pred = f(xk, xk.new_full((len(xk),), k / m)).to(end.dtype)
            errs.append((pred - end).square().sum(1).mean().sqrt())
    return torch.arange(m, dtype=torch.float64) / m, torch.stack(errs).double()


__all__ = [
    "MODES",
    "ConsistencyMLP",
    "check_intervals",
    "ode_step",
    "distillation_target",
    "training_target",
    "grid_times",
    "consistency_loss",
    "fit_consistency",
    "ConsistencyConfig",
    "train_consistency",
    "sample_consistency",
    "ExactConsistency",
    "consistency_error",
]
