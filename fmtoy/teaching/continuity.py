"""Numeric checks of the continuity equation d/dt p_t + div(p_t u_t) = 0 and of the instantaneous change of
variables log p_1(x_1) = log p_0(x_0) - int_0^1 div v_t(x_t) dt (book chapter 1, thm-continuity and thm-inst-cov), and
of its stochastic form, the Fokker-Planck equation d/dt p_t + div(p_t f_t) - (g^2 / 2) Lap p_t = 0 (chapter 9).

Derivatives are central finite differences in float64 with step h: the truncation error is O(h^2) and the
round-off error O(eps / h), so h ~ 1e-3 resolves a residual down to ~1e-6 of the size of its terms.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._checks import check_points, check_positive, check_positive_int
from ..solvers import integrate, log_likelihood
from ..threads import under_policy

LogProb = Callable[[Tensor, float], Tensor]  # log p_t(x): x (n, d), t float -> (n,)
Velocity = Callable[[Tensor, Tensor], Tensor]  # u_t(x): x (n, d), t (n,) -> (n, d)


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {type(fn).__name__}")


def _check_t_h(t: float, h: float) -> tuple[float, float]:
    """t and h as floats with 0 <= t - h < t + h <= 1 (the stencil must stay inside the time interval)."""
    if isinstance(t, Tensor) and t.numel() == 1:
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"t must be a single number in [0, 1], got {t!r}")
    h = check_positive("h", h)
    if not (0.0 <= t - h and t + h <= 1.0):
        raise ValueError(f"the time stencil t +- h must lie in [0, 1], got t={t}, h={h}; use h <= min(t, 1 - t)")
    return float(t), h


def _log_density(log_prob_fn: LogProb, x: Tensor, t: float) -> Tensor:
    out = log_prob_fn(x, t)
    if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"log_prob_fn(x, t) must return a tensor of shape (n,) = ({x.shape[0]},), got {got}")
    return out.to(torch.float64)


def _flux(log_prob_fn: LogProb, velocity: Velocity, x: Tensor, t: float) -> Tensor:
    """p_t(x) u_t(x), shape (n, d): the probability flux of chapter 1."""
    v = velocity(x, x.new_full((x.shape[0],), t))
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return _log_density(log_prob_fn, x, t).exp()[:, None] * v.to(torch.float64)


@under_policy
@torch.no_grad()
def continuity_terms(
    log_prob_fn: LogProb, velocity: Velocity, x: Tensor, t: float, h: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """(d/dt p_t(x), div(p_t u_t)(x)) by central differences, each of shape (n,), float64 (FM Eq. 26)."""
    _check_callable("log_prob_fn", log_prob_fn)
    _check_callable("velocity", velocity)
    x = check_points(x).to(torch.float64)
    t, h = _check_t_h(t, h)
    dp_dt = (_log_density(log_prob_fn, x, t + h).exp() - _log_density(log_prob_fn, x, t - h).exp()) / (2 * h)
    div = torch.zeros_like(dp_dt)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x[0])
        e[i] = h
        div += (_flux(log_prob_fn, velocity, x + e, t)[:, i] - _flux(log_prob_fn, velocity, x - e, t)[:, i]) / (2 * h)
    return dp_dt, div


@under_policy
def continuity_residual(
    log_prob_fn: LogProb, velocity: Velocity, x: Tensor, t: float, h: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """(r, scale): r = d/dt p_t + div(p_t u_t) at x (FM Eq. 26) and scale = |d/dt p_t| + |div(p_t u_t)|, shape (n,)."""
    dp_dt, div = continuity_terms(log_prob_fn, velocity, x, t, h)
    return dp_dt + div, dp_dt.abs() + div.abs()


@under_policy
@torch.no_grad()
def fokker_planck_terms(
    log_prob_fn: LogProb, drift: Velocity, g: float, x: Tensor, t: float, h: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor]:
    """(d/dt p_t, div(p_t f_t), (g^2 / 2) Lap p_t) at x by central differences, each (n,), float64 (eq-ch9-fp): the
    Fokker-Planck equation of dX = f_t(X) dt + g dW is first + second - third = 0. Lap p: O(h^2) truncation, O(eps/h^2)
    round-off (h = 1e-3: ~1e-10 of p)."""
    g = check_positive("g", g, allow_zero=True)
    dp_dt, div = continuity_terms(log_prob_fn, drift, x, t, h)
    x = check_points(x).to(torch.float64)
    t, h = _check_t_h(t, h)
    p = _log_density(log_prob_fn, x, t).exp()
    lap = torch.zeros_like(p)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x[0])
        e[i] = h
        lap += (_log_density(log_prob_fn, x + e, t).exp() - 2 * p + _log_density(log_prob_fn, x - e, t).exp()) / h**2
    return dp_dt, div, 0.5 * g**2 * lap


@under_policy
def fokker_planck_residual(
    log_prob_fn: LogProb, drift: Velocity, g: float, x: Tensor, t: float, h: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """(r, scale): r = d/dt p_t + div(p_t f_t) - (g^2 / 2) Lap p_t at x (eq-ch9-fp) and scale = the sum of the three
    terms' absolute values, shape (n,); g = 0 is continuity_residual."""
    dp_dt, div, diffusion = fokker_planck_terms(log_prob_fn, drift, g, x, t, h)
    return dp_dt + div - diffusion, dp_dt.abs() + div.abs() + diffusion.abs()


@under_policy
def relative_residual(
    log_prob_fn: LogProb, velocity: Velocity, x: Tensor, t: float, h: float = 1e-3, g: float = 0.0
) -> float:
    """max_x |d/dt p_t + div(p_t u_t)| / max_x (|d/dt p_t| + |div(p_t u_t)|) over the points x (FM Eq. 26); with
    g > 0, the same for the Fokker-Planck residual of the drift `velocity` and noise g (eq-ch9-fp)."""
    if g == 0.0:
        r, scale = continuity_residual(log_prob_fn, velocity, x, t, h)
    else:
        r, scale = fokker_planck_residual(log_prob_fn, velocity, g, x, t, h)
    top = float(scale.max())
    if top == 0.0:
        raise ValueError("both terms of the continuity equation vanish at every point; choose points where p_t > 0")
    return float(r.abs().max()) / top


def log_likelihood_terms(
    velocity: Velocity, x1: Tensor, source, steps: int = 50, method: str = "rk4"
) -> tuple[Tensor, Tensor]:
    """(log p_0(x_0), int_0^1 div v_t(x_t) dt) along the flow through x_1: log p_1(x_1) = first - second
    (thm-inst-cov)."""
    steps = check_positive_int("steps", steps)
    log_p1 = log_likelihood(velocity, x1, source, steps=steps, method=method)
    x0 = integrate(velocity, x1, steps, method, t0=1.0, t1=0.0)  # the same steps as inside log_likelihood
    log_p0 = source.log_prob(x0)
    return log_p0, log_p0 - log_p1
