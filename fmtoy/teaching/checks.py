"""Numeric checks the chapters run against the exact objects: a Monte-Carlo estimate of the marginal field and the
relative error of a field (chapter 2, FM paper Eq. 8), and the kinetic-energy bound of chapter 5."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._checks import check_points, check_positive_int, check_time
from ..data import GaussianMixture
from ..marginal import _CHUNK, _contract, _schedule, marginal_distribution, marginal_velocity
from ..paths import GaussianPath


def marginal_velocity_mc(
    x: Tensor, t: float | Tensor, path: GaussianPath, target, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """sum_k u_t(x|x1_k) p_t(x|x1_k) / sum_k p_t(x|x1_k), x1_k ~ q: Monte-Carlo FM paper Eq. 8 (N(0, I) source)."""
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a fmtoy.paths.GaussianPath (e.g. CondOTPath()), got {type(path).__name__}")
    if not callable(getattr(target, "sample", None)) or not isinstance(getattr(target, "dim", None), int):
        raise TypeError(
            f"target must be a fmtoy.data.Distribution (anything with .sample(n) and .dim), got {type(target).__name__}"
        )
    n_samples = check_positive_int("n_samples", n_samples)
    x = check_points(x, target.dim)
    t = check_time(t, x.shape[0], like=x).to(torch.float64)
    al, sg, dal, dsg = _schedule(path, t)  # (T, 1) each, T = 1 or n
    if (sg <= 0).any():
        raise ValueError(
            f"sigma_t = 0 at t = {t.max().item():.6g}: p_t(x|x_1) is a point mass and the estimate is "
            f"undefined; use t in [{path.t_min}, {path.t_max}] with sigma_t > 0 (e.g. t < 1 for "
            "CondOTPath(sigma_min=0))"
        )
    x1 = target.sample(n_samples, generator=generator).to(x.device, torch.float64)  # x1_k ~ q, (K, d)
    x64, al, sg, dal, dsg = (v.to(x.device) for v in (x.to(torch.float64), al, sg, dal, dsg))
    rows = max(1, _CHUNK // (n_samples * x.shape[1]))
    means = []
    for s in range(0, x.shape[0], rows):
        a, v = (c if c.shape[0] == 1 else c[s : s + rows] for c in (al, sg))
        logits = -((x64[s : s + rows, None] - a[:, :, None] * x1) ** 2).sum(-1) / (2 * v**2)  # log p_t(x|x1_k) + c
        w = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).exp()  # w_k = p_t(x|x1_k) / sum_j p_t(x|x1_j)
        means.append(_contract(w, x1))  # sum_k w_k x1_k
    mean = torch.cat(means)
    # u_t(x|x_1) = sigma'/sigma (x - alpha x_1) + alpha' x_1 is affine in x_1, so its weighted average is:
    return (dsg / sg * x64 + (dal - dsg / sg * al) * mean).to(x.dtype)


def relative_field_error(
    velocity: Callable,
    t: float,
    path: GaussianPath,
    target: GaussianMixture,
    n: int = 4096,
    generator: torch.Generator | None = None,
    source: GaussianMixture | None = None,
) -> float:
    """sqrt(E_{x~p_t} |v_t(x) - u_t(x)|^2 / E_{x~p_t} |u_t(x)|^2): p_t-weighted relative error of a field (Eq. 8)."""
    if not callable(velocity):
        raise TypeError(f"velocity must be a callable v(x, t) -> (n, d), got {type(velocity).__name__}")
    n = check_positive_int("n", n)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float in [0, 1], got {type(t).__name__}")
    x = marginal_distribution(t, path, target, source).sample(n, generator=generator).to(torch.float64)
    u = marginal_velocity(x, t, path, target, source)
    dev = next((p.device for p in velocity.parameters()), x.device) if hasattr(velocity, "parameters") else x.device
    with torch.no_grad():
        v = velocity(x.to(dev, torch.float32), torch.full((n,), float(t), device=dev)).to("cpu", torch.float64)
    return float(((v - u) ** 2).sum(1).mean().div((u**2).sum(1).mean()).sqrt())


def kinetic_energy_bound(
    path, target, n: int = 2000, steps: int = 200, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Ch. 5: marginal int E_{p_t}|u_t(x)|^2 dt <= conditional int E|alpha' x_1 + sigma' x_0|^2 dt, same samples.

    x_t = alpha_t x_1 + sigma_t x_0 with x_1 ~ target (a GaussianMixture), x_0 ~ N(0, I); u_t is the exact
    marginal field (fmtoy.marginal). Quadrature: midpoint rule in u on the geometric grid 1 - t = (1 - t_min) r^u,
    r = (1 - t_end) / (1 - t_min), t_end = min(t_max, 1 - 1e-5), which is exact for integrands ~ 1/(1 - t).
    The gap is int E|xdot - u_t(x_t)|^2 dt >= 0 (a variance), the minimum of the CFM loss times (t_end - t_min).
    """

    n, steps = check_positive_int("n", n), check_positive_int("steps", steps)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (one node on each half of [t_min, t_end]), got {steps}")
    t_lo, t_hi = float(path.t_min), min(float(path.t_max), 1.0 - 1e-5)
    x1 = target.sample(n, generator).double()
    x0 = torch.randn(n, target.dim, generator=generator, dtype=torch.float64)
    half = steps // 2  # midpoint rule on [t_lo, 1/2] (uniform), then on [1/2, t_end] (geometric in 1 - t)
    t_mid = max(0.5, t_lo)
    log_r = math.log((1.0 - t_hi) / (1.0 - t_mid))
    nodes = [(t_lo + (t_mid - t_lo) * (k + 0.5) / half, (t_mid - t_lo) / half) for k in range(half)]
    for k in range(steps - half):
        one_minus_t = (1.0 - t_mid) * math.exp(log_r * (k + 0.5) / (steps - half))
        nodes.append((1.0 - one_minus_t, one_minus_t * abs(log_r) / (steps - half)))
    marg = cond = 0.0
    for t_k, dt in nodes:
        t = torch.tensor(t_k, dtype=torch.float64)
        xt = path.sample_xt(x0, x1, t)
        xdot = path.target_velocity(x0, x1, t)
        marg += dt * float(marginal_velocity(xt, t, path, target).square().sum(1).mean())
        cond += dt * float(xdot.square().sum(1).mean())
    return {"marginal": marg, "conditional": cond, "gap": cond - marg, "t_end": t_hi}
