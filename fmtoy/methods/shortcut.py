"""Shortcut models (Frans et al. 2025; ch. 6): the step-conditioned network s(x, t, d), the self-consistency target
from two half steps, the loss and its training loop, N-step sampling, and the exact shortcut of a known field.

Step sizes live on a dyadic grid: level l <-> d = 2^-l, l = 0 ... L = log2(M), M = max_steps (128 by default).
Level L is the flow-matching branch: s(x, t, 0) and s(x, t, 1/M) are the same output, as in the official code,
which trains its flow-matching rows with the embedding of d = 1/M. Self-consistency (ch. 6, Eq. SC):
    s(x_t, t, 2d) = s(x_t, t, d)/2 + s(x'_{t+d}, t + d, d)/2,    x'_{t+d} = x_t + d s(x_t, t, d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_choice, check_paired, check_points, check_positive, check_positive_int, check_unit_time
from ..data import Distribution, get_dataset
from ..metrics import paired_error
from ..models import VelocityMLP, _check_model_time
from ..solvers import flow_map, integrate, integrate_average
from ..threads import thread_policy
from ..train import (
    FitContext,
    FitResult,
    RecipeConfig,
    build_model,
    check_config,
    check_ema,
    fit,
    fit_options,
    pair_sampler,
    run_config,
)

Shortcut = Callable[[Tensor, Tensor, Tensor], Tensor]  # s(x, t, d): x (n, dim), t (n,), d (n,) -> (n, dim)
TEACHERS = ("ema", "online")


# ----------------------------------------------------------------------------------------------- the d grid
def check_max_steps(max_steps: int) -> int:
    """Return M if it is a power of two >= 2 (the finest step 1/M, the flow-matching branch), else ValueError."""
    ok = isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 2
    if not ok or max_steps & (max_steps - 1):
        raise ValueError(
            f"max_steps must be a power of two >= 2 (e.g. 128: steps d = 1, 1/2, ..., 1/128), got {max_steps!r}"
        )
    return max_steps


def n_levels(max_steps: int = 128) -> int:
    """Number of step sizes d = 1, 1/2, ..., 1/M: log2(M) + 1."""
    return int(math.log2(check_max_steps(max_steps))) + 1


def step_sizes(max_steps: int = 128) -> list[float]:
    """The d grid [1, 1/2, ..., 1/M]; entry l is the step of level l = log2(1/d)."""
    return [2.0**-level for level in range(n_levels(max_steps))]


def level_of(d: float | Tensor, n: int, max_steps: int = 128, like: Tensor | None = None) -> Tensor:
    """Levels log2(1/d) as a long tensor (n,); d = 0 (the flow-matching velocity) maps to level log2(M).

    d may be a number or a tensor of shape (), (n,) or (n, 1); every entry must be 0 or on the grid 2^-l, l <= log2 M.
    """
    top = n_levels(max_steps) - 1
    dev = like.device if like is not None else None
    if isinstance(d, bool) or not isinstance(d, (int, float, Tensor)):
        raise TypeError(f"d must be a float or a tensor, got {type(d).__name__}")
    dd = torch.as_tensor(d, dtype=torch.float64, device=dev).reshape(-1)
    if dd.numel() not in (1, n):
        raise ValueError(f"d has {dd.numel()} entries but x has {n} rows")
    level = torch.round(-torch.log2(dd.clamp_min(2.0 ** -(top + 8)))).clamp(0, top + 8)
    ok = (dd == 0) | ((torch.exp2(-level) - dd).abs() <= 1e-9 * dd)
    level = torch.where(dd == 0, torch.full_like(level, top), level)
    if not bool((ok & (level <= top)).all()):
        bad = dd[~(ok & (level <= top))][0].item()
        raise ValueError(
            f"step size d must be 0 (the flow-matching velocity) or a power of two 2^-l with "
            f"1/{max_steps} <= d <= 1 (max_steps={max_steps}); got d = {bad!r}"
        )
    return level.long().expand(n)


# ----------------------------------------------------------------------------------------------- the network
class ShortcutMLP(nn.Module):
    """s_theta(x, t, d) = MLP([x, gamma(t), e(log2(1/d))]): VelocityMLP plus one learned embedding per step level."""

    def __init__(
        self, dim: int = 2, hidden: int = 128, depth: int = 3, time_features: int = 32, max_steps: int = 128
    ) -> None:
        super().__init__()
        self.max_steps = check_max_steps(max_steps)
        self.levels = n_levels(max_steps)
        # the level enters as a one-hot vector through VelocityMLP's conditioning MLP: its own embedding per level
        self.net = VelocityMLP(dim=dim, hidden=hidden, depth=depth, time_features=time_features, cond_dim=self.levels)
        self.dim, self.hidden, self.depth = self.net.dim, self.net.hidden, self.net.depth

    def forward(self, x: Tensor, t: float | Tensor, d: float | Tensor = 0.0) -> Tensor:
        """The shortcut s(x, t, d), shape (n, dim); d = 0 or 1/M gives the flow-matching velocity (Eq. SC)."""
        x = check_points(x, self.dim)
        return self.forward_level(x, t, level_of(d, x.shape[0], self.max_steps, like=x))

    def forward_level(self, x: Tensor, t: float | Tensor, level: Tensor) -> Tensor:
        """s(x, t, 2^-level) for a long tensor of levels (n,), unchecked (the training loop's fast path)."""
        w = self.net.net[0].weight
        return self.net(x, t, F.one_hot(level, self.levels).to(w.dtype))

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        """v(x, t) = s(x, t, 0), the flow-matching branch, in the signature fmtoy.solvers.integrate expects."""
        return self(x, t, 0.0)

    def extra_repr(self) -> str:
        return f"max_steps={self.max_steps} ({self.levels} step levels)"


def _column(v: float | Tensor, n: int, like: Tensor) -> Tensor:
    """A number or a tensor (), (n,), (n, 1) as an (n, 1) column in like's dtype and device."""
    return _check_model_time(v, n, like)


# ----------------------------------------------------------------------------------------------- target and losses
def shortcut_target(s: Shortcut, x: Tensor, t: float | Tensor, d: float | Tensor, clip: float | None = None) -> Tensor:
    """Target for s(x, t, 2d): s(x, t, d)/2 + s(x', t + d, d)/2, x' = x + d s(x, t, d) (Eq. SC), without gradient.

    clip: clamp x' and the target to [-clip, clip] per coordinate (the official code uses +-4 on image latents).
    """
    x = check_points(x)
    n = x.shape[0]
    if clip is not None:
        clip = check_positive("clip", clip)
    with torch.no_grad():
        tc, dc = _column(t, n, x), _column(d, n, x)
        s1 = s(x, tc[:, 0], dc[:, 0])
        x2 = x + dc * s1
        if clip is not None:
            x2 = x2.clamp(-clip, clip)
        s2 = s(x2, tc[:, 0] + dc[:, 0], dc[:, 0])
        y = 0.5 * (s1 + s2)
        if clip is not None:
            y = y.clamp(-clip, clip)
    return y.detach()


def self_consistency_loss(
    model: Shortcut,
    x: Tensor,
    t: float | Tensor,
    d: float | Tensor,
    teacher: Shortcut | None = None,
    clip: float | None = None,
) -> Tensor:
    """mean_i |s(x_i, t_i, 2 d_i) - target_i|^2, the target from two d-steps of `teacher` (default: model), no grad."""
    x = check_points(x)
    n = x.shape[0]
    tc, dc = _column(t, n, x), _column(d, n, x)
    y = shortcut_target(model if teacher is None else teacher, x, tc, dc, clip)
    return (model(x, tc[:, 0], 2 * dc[:, 0]) - y).square().sum(1).mean()


class ShortcutBatch(NamedTuple):
    """One training batch: rows [0, n_sc) self-consistency at (t, d) on the d grid, rows [n_sc, n) flow matching."""

    xt: torch.Tensor  # (n, dim) points on the CondOT path x_t = (1 - t) x_0 + t x_1
    t: torch.Tensor  # (n,) times: multiples of d for self-consistency rows, of 1/M for flow-matching rows
    level: torch.Tensor  # (n,) long: log2(1/d) of the asked step; log2(M) on flow-matching rows
    n_sc: int  # number of self-consistency rows


def sc_rows(batch_size: int, k: float, max_steps: int = 128) -> int:
    """floor(k * batch) self-consistency rows; ValueError unless every level 0 ... log2(M) - 1 gets at least one."""
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1:
        raise ValueError(
            f"k (the self-consistency fraction of the batch) must be a number in (0, 1), "
            f"e.g. 0.25 (FM : SC = 3 : 1) or 0.125 (the official code); got {k!r}"
        )
    sc_levels = n_levels(max_steps) - 1
    m = int(k * batch_size)
    if m < sc_levels:
        need = math.ceil(sc_levels / k)
        raise ValueError(
            f"batch_size={batch_size} with k={k} gives {m} self-consistency rows, fewer than the "
            f"{sc_levels} step levels d = 1 ... 2/{max_steps}: some levels would never train. Use "
            f"batch_size >= {need}, a larger k, or a smaller max_steps"
        )
    return m


def shortcut_batch(
    x0: Tensor, x1: Tensor, k: float = 0.25, max_steps: int = 128, generator: torch.Generator | None = None
) -> ShortcutBatch:
    """Stratified levels (each of 0 ... L-1 gets floor(m / L) rows, the rest d = 1, as in the official code), t on
    the grid of its own d; flow-matching rows get t ~ U{0, 1/M, ..., 1 - 1/M} and level L."""
    x0, x1 = check_paired(x0, x1)
    n, dev = x0.shape[0], x0.device
    m = sc_rows(n, k, max_steps)
    top = n_levels(max_steps) - 1
    per = m // top
    level = torch.full((n,), top, dtype=torch.long, device=dev)
    level[: per * top] = torch.arange(top - 1, -1, -1, device=dev).repeat_interleave(per)
    level[per * top : m] = 0
    sections = torch.exp2(level.to(x0.dtype))  # 2^l grid points on [0, 1) per level
    u = torch.rand(n, generator=generator, device=dev, dtype=x0.dtype)
    t = torch.floor(u * sections) / sections
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    return ShortcutBatch(xt, t, level, m)


def shortcut_loss(
    model: nn.Module,
    x0: Tensor,
    x1: Tensor,
    teacher: nn.Module | None = None,
    k: float = 0.25,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    clip: float | None = 10.0,
    return_parts: bool = False,
    sc_weight: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Shortcut loss (ch. 6, Eq. L): mean over the batch of |s(x_t, t, 0) - (x_1 - x_0)|^2 (flow-matching rows) and
    sc_weight * |s(x_t, t, 2d) - sg(target)|^2 (a fraction k of rows, Eq. SC; the official code: weight 1); the
    target comes from `teacher` (EMA copy or the model itself) and carries no gradient. return_parts: also the two
    parts' unweighted means (detached)."""
    if not isinstance(model, ShortcutMLP):
        raise TypeError(f"model must be a fmtoy.methods.shortcut.ShortcutMLP, got {type(model).__name__}")
    teacher = model if teacher is None else teacher
    max_steps = model.max_steps if max_steps is None else check_max_steps(max_steps)
    if max_steps != model.max_steps:
        raise ValueError(f"max_steps={max_steps} disagrees with the model's max_steps={model.max_steps}")
    sc_weight = check_positive("sc_weight", sc_weight)
    b = shortcut_batch(x0, x1, k, max_steps, generator)
    m = b.n_sc
    half = torch.exp2(-(b.level[:m] + 1).to(x0.dtype))  # the two half steps d of the step 2d
    sc_target = shortcut_target(teacher, b.xt[:m], b.t[:m], half, clip)
    y = torch.cat([sc_target, x1[m:] - x0[m:]])  # regression targets: SC rows, then flow-matching rows
    err = (model.forward_level(b.xt, b.t, b.level) - y).square().sum(1)
    loss = err.mean() if sc_weight == 1.0 else (sc_weight * err[:m].sum() + err[m:].sum()) / len(err)
    if return_parts:
        return loss, err[m:].detach().mean(), err[:m].detach().mean()
    return loss


# ----------------------------------------------------------------------------------------------- training
def fit_shortcut(
    model: ShortcutMLP,
    target: Distribution,
    source: Distribution | None = None,
    *,
    k: float = 0.25,
    teacher: str = "ema",
    ema_decay: float = 0.999,
    clip: float | None = 10.0,
    sc_weight: float = 1.0,
    progress: bool = False,
    **options,
) -> FitResult:
    """Minimise shortcut_loss with fmtoy.train.fit; teacher "ema" (official: rate 0.999) or "online" (the model
    itself, still without gradient through the target); sc_weight multiplies the SC rows' squared error. Loss parts
    "fm" and "sc" (unweighted) per step. options: the loop's
    (fmtoy.train.FitConfig: steps, batch_size, lr = 3e-3, lr_schedule, seed, device, threads)."""
    if not isinstance(model, ShortcutMLP):
        raise TypeError(f"model must be a fmtoy.methods.shortcut.ShortcutMLP, got {type(model).__name__}")
    draw = pair_sampler(model, target, source)
    check_choice("teacher", teacher, TEACHERS)
    if teacher == "ema" and check_ema(ema_decay) is None:
        raise ValueError("teacher='ema' needs ema_decay, a number in (0, 1) such as 0.999")
    config = fit_options(options, lr=3e-3, ema_decay=ema_decay if teacher == "ema" else None)
    sc_rows(config.batch_size, k, model.max_steps)
    check_positive("sc_weight", sc_weight)

    def loss_fn(ctx: FitContext) -> tuple[Tensor, dict[str, Tensor]]:
        ema = ctx.ema[0] if ctx.ema else None
        x0, x1 = draw(ctx)
        loss, fm, sc = shortcut_loss(
            model, x0, x1, ema, k, generator=ctx.generator, clip=clip, return_parts=True, sc_weight=sc_weight
        )
        return loss, {"fm": fm, "sc": sc}

    return fit(model, loss_fn, config, name="shortcut", progress=progress)


@dataclass
class ShortcutConfig(RecipeConfig):
    """A shortcut-model recipe for train_shortcut; the defaults are chapter 6's (4000 steps of 256, online teacher:
    at this budget EMA targets fail, see the chapter's ablation; the official code uses EMA 0.999)."""

    steps: int = 4000
    batch_size: int = 256
    max_steps: int = 128
    k: float = 0.25
    teacher: str = "online"
    ema_decay: float = 0.999
    clip: float | None = 10.0
    sc_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_max_steps(self.max_steps)
        check_positive("sc_weight", self.sc_weight)
        sc_rows(self.batch_size, self.k, self.max_steps)
        check_choice("teacher", self.teacher, TEACHERS)
        check_ema(self.ema_decay)


def train_shortcut(config: ShortcutConfig, progress: bool = False) -> FitResult:
    """Build a ShortcutMLP for config.data and train it with fit_shortcut: the whole recipe in one call."""
    check_config(config, ShortcutConfig)
    target = get_dataset(config.data)
    model = build_model(config, target.dim, ShortcutMLP, max_steps=config.max_steps)
    return run_config(fit_shortcut, config, model, target, progress=progress)


# ----------------------------------------------------------------------------------------------- sampling
def check_sampling_steps(steps: int, max_steps: int = 128) -> int:
    """Return N if it is a power of two with 1 <= N <= M (the shortcut only knows d = 1/N on its grid)."""
    ok = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 and not steps & (steps - 1)
    if not ok or steps > max_steps:
        raise ValueError(
            f"steps must be a power of two between 1 and max_steps={max_steps} (the shortcut is trained "
            f"for d = 1, 1/2, ..., 1/{max_steps}), got {steps!r}"
        )
    return steps


def sample_shortcut(
    s: Shortcut, x0: Tensor, steps: int, max_steps: int | None = None, return_trajectory: bool = False
) -> Tensor:
    """N Euler steps with the shortcut at d = 1/N: x_{t+d} = x_t + d s(x_t, t, d), t = 0, d, ..., 1 - d (N calls)."""
    max_steps = getattr(s, "max_steps", 128) if max_steps is None else check_max_steps(max_steps)
    return integrate_average(s, x0, check_sampling_steps(steps, max_steps), return_trajectory)


def self_paired_error(s: Shortcut, x0: Tensor, steps: int = 1, max_steps: int | None = None) -> float:
    """mean_i |x_i^(steps) - x_i^(M)|: `steps` shortcut steps against M of the same model from the same noise (M its
    max_steps), the gap part 4 of ch. 6's theorem says perfect self-consistency closes."""
    max_steps = getattr(s, "max_steps", 128) if max_steps is None else check_max_steps(max_steps)
    few, many = sample_shortcut(s, x0, steps, max_steps), sample_shortcut(s, x0, max_steps, max_steps)
    return paired_error(few, many)


def one_step_yardsticks(
    s: ShortcutMLP,
    x0: Tensor,
    reference: Tensor,
    mixture: Distribution | None = None,
    exact_end: Tensor | None = None,
) -> dict[str, float]:
    """Ch. 6's yardsticks of one step against M = s.max_steps steps from the noise x0: energy distances to
    `reference` (N = 1, N = M), the self-paired error mean |x^(1) - x^(M)| (part 4 of Thm. the exact shortcut),
    with `mixture` the off-mode fractions, with exact_end = phi_{0,1}(x0[:m]) the paired errors on those m rows."""
    from ..metrics import energy_distance

    if not isinstance(s, ShortcutMLP):
        raise TypeError(f"s must be a fmtoy.methods.shortcut.ShortcutMLP, got {type(s).__name__}")
    x0 = check_points(x0, s.dim, name="x0")
    one, many = sample_shortcut(s, x0, 1), sample_shortcut(s, x0, s.max_steps)
    top = f"N={s.max_steps}"
    out = {
        "ED, N=1": energy_distance(one, reference),
        f"ED, {top}": energy_distance(many, reference),
        "self-paired": paired_error(one, many),
    }
    if exact_end is not None:
        exact_end = check_points(exact_end, s.dim, name="exact_end")
        m = len(exact_end)
        if m > len(x0):
            raise ValueError(f"exact_end has {m} rows, more than x0's {len(x0)}")
        for key, x in (("N=1", one), (top, many)):
            out[f"paired to exact, {key}"] = paired_error(x[:m], exact_end)
    if mixture is not None:
        out["off-mode, N=1"], out[f"off-mode, {top}"] = (
            off_mode_fraction(one, mixture),
            off_mode_fraction(many, mixture),
        )
    return out


def off_mode_fraction(x: Tensor, mixture: Distribution, sds: float = 3.0) -> float:
    """Fraction of the points x farther than `sds` standard deviations (Mahalanobis) from every component of a
    Gaussian mixture: the mass in the bridges between modes (data: P(chi_2 > sds) = exp(-sds^2 / 2) in 2D)."""
    x = check_points(x).double()
    if not (hasattr(mixture, "means") and hasattr(mixture, "covs")):
        raise TypeError(f"mixture must be a fmtoy GaussianMixture (means, covs), got {type(mixture).__name__}")
    sds = check_positive("sds", sds)
    means, covs = mixture.means.double().to(x.device), mixture.covs.double().to(x.device)
    diff = x[:, None, :] - means[None]  # (n, K, dim)
    maha = torch.einsum("nki,kij,nkj->nk", diff, torch.linalg.inv(covs), diff)
    return float((maha.min(1).values > sds**2).double().mean())


# ----------------------------------------------------------------------------------------------- exact shortcut
def exact_shortcut(
    field: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: float, d: float, steps_per_unit: int = 256
) -> Tensor:
    """s*(x, t, d) = (phi_{t, t+d}(x) - x) / d by RK4 (fmtoy.solvers.flow_map) with ceil(d * steps_per_unit) steps;
    d = 0: the field u_t(x)."""
    x = check_points(x)
    t, d = check_unit_time("t", t), check_unit_time("d", d)
    if t + d > 1 + 1e-12:
        raise ValueError(f"t + d must be <= 1 (the flow ends at t = 1), got t = {t}, d = {d}")
    if d == 0:
        with torch.no_grad():
            return field(x, x.new_full((x.shape[0],), t))
    steps = max(1, math.ceil(d * check_positive_int("steps_per_unit", steps_per_unit) - 1e-9))
    return (flow_map(field, x, t, min(t + d, 1.0), steps=steps) - x) / d  # (Phi_{t->t+d}(x) - x) / d, ch. 10


class ExactShortcut:
    """The exact shortcut of a known field as a callable s(x, t, d) (rows grouped by their (t, d) pair)."""

    def __init__(
        self, field: Callable[[Tensor, Tensor], Tensor], steps_per_unit: int = 256, max_steps: int = 128
    ) -> None:
        if not callable(field):
            raise TypeError(f"field must be a callable v(x, t) -> (n, d), got {type(field).__name__}")
        self.field, self.steps_per_unit = field, check_positive_int("steps_per_unit", steps_per_unit)
        self.max_steps = check_max_steps(max_steps)

    def __call__(self, x: Tensor, t: float | Tensor, d: float | Tensor) -> Tensor:
        """s*(x, t, d) for per-row (or shared) t and d."""
        x = check_points(x)
        n = x.shape[0]
        td = torch.cat([_column(t, n, x), _column(d, n, x)], 1).double()
        pairs, inverse = torch.unique(td, dim=0, return_inverse=True)
        out = torch.empty_like(x)
        for j, (tj, dj) in enumerate(pairs.tolist()):
            rows = inverse == j
            out[rows] = exact_shortcut(self.field, x[rows], tj, dj, self.steps_per_unit)
        return out


def exact_grid_trajectory(
    field: Callable[[Tensor, Tensor], Tensor], x0: Tensor, max_steps: int = 128, substeps: int = 4
) -> Tensor:
    """The exact flow phi_{0,t}(x0) at t = 0, 1/M, ..., 1, shape (M + 1, n, dim): RK4 with M * substeps steps."""
    max_steps = check_max_steps(max_steps)
    substeps = check_positive_int("substeps", substeps)
    x0 = check_points(x0, name="x0")
    return integrate(field, x0, max_steps * substeps, "rk4", return_trajectory=True)[::substeps]


def shortcut_error_map(
    s: Shortcut,
    field: Callable[[Tensor, Tensor], Tensor] | None,
    x0: Tensor | None,
    max_steps: int = 128,
    substeps: int = 4,
    trajectory: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """RMS error sqrt(mean |s(x, t, d) - s*(x, t, d)|^2) over x ~ p_t at every grid (t, d), d = 2^-l, t in d N.

    One RK4 trajectory of the exact field from x0 ~ p_0 (exact_grid_trajectory; or `trajectory`, one computed
    before, with field and x0 None) gives x_t ~ p_t on the 1/M grid and s*(x_t, t, d) = (x_{t+d} - x_t) / d for
    every (t, d). Returns, per level l = 0 ... log2 M, (t starts, errors).
    """
    max_steps = check_max_steps(max_steps)
    if trajectory is None:
        if field is None or x0 is None:
            raise ValueError("give the exact field and x0, or a precomputed trajectory")
        traj = exact_grid_trajectory(field, x0, max_steps, substeps)
    else:
        traj = trajectory
        if not isinstance(traj, Tensor) or traj.ndim != 3 or traj.shape[0] != max_steps + 1:
            shape = tuple(traj.shape) if isinstance(traj, Tensor) else type(traj).__name__
            raise ValueError(
                f"trajectory must have shape (max_steps + 1, n, dim) = ({max_steps + 1}, n, dim), got {shape}"
            )
    out = []
    with torch.no_grad(), thread_policy(None, traj.device) as tuner:  # one model call per cell: a loop to tune
        for level in range(n_levels(max_steps)):
            stride = max_steps >> level
            starts = torch.arange(0, max_steps, stride)
            d = stride / max_steps
            errs = []
            for a in starts.tolist():
                tuner.tick()
                xa = traj[a]
                truth = (traj[a + stride] - xa) / d
                pred = s(xa, xa.new_full((len(xa),), a / max_steps), xa.new_full((len(xa),), d)).to(xa.dtype)
                errs.append((pred - truth).square().sum(1).mean().sqrt())
            out.append((starts.double() / max_steps, torch.stack(errs).double()))
    return out


__all__ = [
    "check_max_steps",
    "n_levels",
    "step_sizes",
    "level_of",
    "ShortcutMLP",
    "shortcut_target",
    "self_consistency_loss",
    "ShortcutBatch",
    "sc_rows",
    "shortcut_batch",
    "shortcut_loss",
    "fit_shortcut",
    "ShortcutConfig",
    "train_shortcut",
    "check_sampling_steps",
    "sample_shortcut",
    "exact_shortcut",
    "ExactShortcut",
    "exact_grid_trajectory",
    "shortcut_error_map",
    "self_paired_error",
    "one_step_yardsticks",
    "off_mode_fraction",
]
