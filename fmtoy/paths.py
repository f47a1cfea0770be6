"""Conditional Gaussian probability paths x_t = alpha_t x_1 + sigma_t x_0 (Lipman et al. 2023, "FM paper").

p_t(x | x_1) = N(x; alpha_t x_1, sigma_t^2 I) with x_0 ~ N(0, I): t = 0 is noise, t = 1 is data.
The flow psi_t(x_0) = alpha_t x_1 + sigma_t x_0 (FM Eq. 11) generates it with the field of Thm 3 (FM Eq. 15)
    u_t(x | x_1) = sigma'_t / sigma_t (x - alpha_t x_1) + alpha'_t x_1.
Each path states [t_min, t_max], the times where sigma_t > 0 and every field is finite; training samples t there.
Where sigma_t = 0 (t = 1 for CondOT with sigma_min = 0 and for VP) the conditional field and density are singular:
the methods raise ValueError there instead of returning inf / nan.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ._checks import check_choice, check_points, check_positive, check_time
from .data import Distribution, GaussianMixture, StandardNormal

LOG_2PI = math.log(2 * math.pi)
T_EDGE = 1e-5  # t_max = 1 - T_EDGE for paths with sigma_1 = 0


def _as_time(t: float | Tensor) -> Tensor:
    """t as a floating tensor (any shape, autograd kept) after checking 0 <= t <= 1."""
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), dtype=torch.get_default_dtype())
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    with torch.no_grad():
        if torch.isnan(t).any() or (t < 0).any() or (t > 1).any():
            raise ValueError("t must lie in [0, 1] (t=0 is noise, t=1 is data)")
    return t


class SchedulerOutput(NamedTuple):
    """alpha_t, sigma_t and their t-derivatives, elementwise in t (FM Eq. 10; as flow_matching's SchedulerOutput)."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


class GaussianPath:
    """x_t = alpha_t x_1 + sigma_t x_0: p_t(x|x_1) = N(alpha_t x_1, sigma_t^2 I) (FM Eq. 10, mu_t = alpha_t x_1)."""

    name: str = "gaussian"
    t_min: float = 0.0
    t_max: float = 1.0

    # --- schedule: subclasses implement _alpha, _sigma, _d_alpha, _d_sigma on a checked tensor t -------------------
    def schedule(self, t: float | Tensor, check: bool = True) -> SchedulerOutput:
        """(alpha_t, sigma_t, alpha'_t, sigma'_t) at t, the one way to read a path's schedule; check=False skips the
        0 <= t <= 1 check (no host-device sync: training losses, whose t the loop keeps in [t_min, t_max])."""
        t = _as_time(t) if check else t
        return SchedulerOutput(self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t))

    def alpha(self, t: float | Tensor) -> Tensor:
        """alpha_t, the data coefficient (mu_t(x_1) = alpha_t x_1, FM Eq. 10), elementwise in t."""
        return self._alpha(_as_time(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        """sigma_t, the noise coefficient (std of p_t(x|x_1), FM Eq. 10), elementwise in t."""
        return self._sigma(_as_time(t))

    def d_alpha(self, t: float | Tensor) -> Tensor:
        """d alpha_t / dt, elementwise in t."""
        return self._d_alpha(_as_time(t))

    def d_sigma(self, t: float | Tensor) -> Tensor:
        """d sigma_t / dt, elementwise in t."""
        return self._d_sigma(_as_time(t))

    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def source(self, target: Distribution) -> Distribution:
        """p_0, where sampling starts: the law of alpha_0 x_1 + sigma_0 x_0, x_1 ~ target, x_0 ~ N(0, I) (FM Eq. 10 at
        t = 0). N(0, I) itself when alpha_0 = 0 and sigma_0 = 1 (CondOT); for a GaussianMixture target the exact
        mixture (VE: the data blurred by N(0, sigma_max^2 I), not N(0, I)); otherwise a sampler of that law."""
        if not isinstance(target, Distribution):
            raise TypeError(f"target must be a fmtoy.data.Distribution, got {type(target).__name__}")
        alpha0, sigma0 = (float(v) for v in self._coef(torch.zeros(1, dtype=torch.float64), "alpha", "sigma"))
        if alpha0 == 0.0 and sigma0 == 1.0:
            return StandardNormal(target.dim)
        if isinstance(
            target, GaussianMixture
        ):  # each component N(m, C) becomes N(alpha_0 m, alpha_0^2 C + sigma_0^2 I)
            eye = torch.eye(target.dim, dtype=target.covs.dtype)
            covs = alpha0**2 * target.covs + sigma0**2 * eye
            return GaussianMixture(target.weights, alpha0 * target.means, covs, name=f"p_0({self.name}, {target.name})")
        return PathSource(self, target, alpha0, sigma0)

    # --- shared machinery --------------------------------------------------------------------------------------
    def _prepare(self, x: Tensor, t: float | Tensor, other: Tensor, other_name: str) -> Tensor:
        """Check x (n, d) and `other` of the same shape; return t as (n, 1) or (1, 1) in x's dtype."""
        check_points(x)
        check_points(other, name=other_name)
        if other.shape != x.shape:
            raise ValueError(
                f"{other_name} must have the same shape as the points, got {tuple(other.shape)} and {tuple(x.shape)}"
            )
        return check_time(t, x.shape[0], like=x)

    def _coef(self, t: Tensor, *names: str) -> list[Tensor]:
        """The named schedule values at t; ValueError where one is not finite (t beyond t_max)."""
        out = [getattr(self, "_" + k)(t) for k in names]
        for k, v in zip(names, out):
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"path {self.name!r}: {k}(t) is not finite at some t in [{t.min().item():.6g}, "
                    f"{t.max().item():.6g}]; its fields are finite for t in [{self.t_min}, {self.t_max}]"
                )
        return out

    def _nonzero_sigma(self, t: Tensor) -> Tensor:
        """sigma_t, with ValueError where it is 0 (p_t(x|x_1) is a point mass: no density, singular field)."""
        (sigma,) = self._coef(t, "sigma")
        if (sigma <= 0).any():
            raise ValueError(
                f"path {self.name!r} has sigma_t = 0 at t = {t[sigma <= 0].max().item():.6g}: "
                f"p_t(x|x_1) is a point mass there and u_t(x|x_1) is singular; use t in "
                f"[{self.t_min}, {self.t_max}]"
            )
        return sigma

    def sample_xt(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> Tensor:
        """psi_t(x_0 | x_1) = alpha_t x_1 + sigma_t x_0 (FM paper Eq. 11); differentiable in t."""
        t = self._prepare(x0, t, x1, "x1")
        alpha, sigma = self._coef(t, "alpha", "sigma")
        return alpha * x1 + sigma * x0

    def target_velocity(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> Tensor:
        """d/dt psi_t(x_0) = alpha'_t x_1 + sigma'_t x_0, the CFM regression target (FM paper Eq. 14)."""
        t = self._prepare(x0, t, x1, "x1")
        d_alpha, d_sigma = self._coef(t, "d_alpha", "d_sigma")
        return d_alpha * x1 + d_sigma * x0

    def conditional_velocity(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        """u_t(x|x_1) = sigma'_t/sigma_t (x - alpha_t x_1) + alpha'_t x_1 (FM paper Thm 3, Eq. 15)."""
        t = self._prepare(x, t, x1, "x1")
        sigma = self._nonzero_sigma(t)
        alpha, d_alpha, d_sigma = self._coef(t, "alpha", "d_alpha", "d_sigma")
        return d_sigma / sigma * (x - alpha * x1) + d_alpha * x1

    def conditional_mean_std(self, t: float | Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_t, sigma_t) = (alpha_t x_1, sigma_t) of p_t(x|x_1) (FM paper Eq. 10); shapes (n, d) and (n, 1)."""
        x1 = check_points(x1, name="x1")
        t = check_time(t, x1.shape[0], like=x1)
        alpha, sigma = self._coef(t, "alpha", "sigma")
        return alpha * x1, sigma.expand(x1.shape[0], 1)

    def conditional_log_prob(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        """log p_t(x|x_1) = log N(x; alpha_t x_1, sigma_t^2 I) (FM paper Eq. 10); shape (n,)."""
        t = self._prepare(x, t, x1, "x1")
        sigma = self._nonzero_sigma(t)
        (alpha,) = self._coef(t, "alpha")
        d = x.shape[1]
        r2 = ((x - alpha * x1) ** 2).sum(1)
        return -0.5 * r2 / sigma[:, 0] ** 2 - d * sigma[:, 0].log() - 0.5 * d * LOG_2PI

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, t in [{self.t_min}, {self.t_max}])"


class PathSource(Distribution):
    """p_0 = law of alpha_0 x_1 + sigma_0 x_0 for a target without a closed-form p_0: sampling only (see
    GaussianPath.source)."""

    def __init__(self, path: GaussianPath, target: Distribution, alpha0: float, sigma0: float) -> None:
        self.path, self.target, self.alpha0, self.sigma0 = path, target, alpha0, sigma0
        self.dim, self.name = target.dim, f"p_0({path.name}, {target.name})"

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        x1 = self.target.sample(n, generator=g, device=dev)
        return self.alpha0 * x1 + self.sigma0 * torch.randn(n, self.dim, generator=g, device=dev, dtype=x1.dtype)

    def _log_prob(self, x: Tensor) -> Tensor:
        raise ValueError(
            f"{self.name} has no closed-form density (the target {self.target.name!r} is not a "
            "GaussianMixture); it can only be sampled"
        )


class CondOTPath(GaussianPath):
    """alpha_t = t, sigma_t = 1 - (1 - sigma_min) t (FM paper Eq. 20; Eq. 22 for psi_t)."""

    name = "ot"

    def __init__(self, sigma_min: float = 0.0) -> None:
        self.sigma_min = check_positive("sigma_min", sigma_min, allow_zero=True)
        if self.sigma_min >= 1:
            raise ValueError(f"sigma_min must be < 1 (sigma_1 = sigma_min is the data-end noise std), got {sigma_min}")
        # sigma_min = 0: sigma_1 = 0, u_t(x|x_1) is finite only for t < 1
        self.t_max = 1.0 if self.sigma_min > 0 else 1.0 - T_EDGE

    def _alpha(self, t: Tensor) -> Tensor:
        return t.clone()

    def _sigma(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.sigma_min) * t

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1 - self.sigma_min))

    def conditional_velocity(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        """u_t(x|x_1) = (x_1 - (1 - sigma_min) x) / (1 - (1 - sigma_min) t) (FM Eq. 21), finite where sigma_t > 0."""
        t = self._prepare(x, t, x1, "x1")
        sigma = self._nonzero_sigma(t)
        return (x1 - (1 - self.sigma_min) * x) / sigma

    def __repr__(self) -> str:
        return f"CondOTPath(sigma_min={self.sigma_min})"


class VEPath(GaussianPath):
    """alpha_t = 1, sigma_t = s_{1-t}, s_u = sigma_min (sigma_max / sigma_min)^u (FM paper Eqs. 16-17).

    sigma_max should be about the largest distance between data points (Song & Ermon 2020): the default 10 suits
    fmtoy's 2D sets (support within radius ~4-5, diameter ~8-10). p_0 is the data blurred by N(0, sigma_max^2 I),
    i.e. approximately N(0, sigma_max^2 I), not N(0, I).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0) -> None:
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp((1 - t) * self.log_ratio)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -self.log_ratio * self._sigma(t)

    def __repr__(self) -> str:
        return f"VEPath(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class VPPath(GaussianPath):
    """alpha_t = a_{1-t}, sigma_t = sqrt(1 - a_{1-t}^2), a_s = e^{-T(s)/2}, T(s) = int_0^s beta (FM paper Eqs. 18-19).

    beta(s) = beta_min + s (beta_max - beta_min), so T(s) = beta_min s + (beta_max - beta_min) s^2 / 2.
    sigma_1 = 0 and sigma'_t -> -inf as t -> 1, so t_max = 1 - 1e-5 (sigma ~ 1e-3 there with beta_min = 0.1).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min = check_positive("beta_min", beta_min, allow_zero=True)
        self.beta_max = check_positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.t_max = 1.0 - T_EDGE

    def _big_t(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._big_t(1 - t))

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._big_t(1 - t)))

    def _d_alpha(self, t: Tensor) -> Tensor:  # d/dt a_{1-t} = a_{1-t} beta(1-t) / 2
        return 0.5 * self._alpha(t) * (self.beta_min + (1 - t) * (self.beta_max - self.beta_min))

    def _d_sigma(self, t: Tensor) -> Tensor:  # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


def _call_schedule(f: Callable[[Tensor], Tensor], t: Tensor, what: str) -> Tensor:
    """f(t) as a tensor of t's shape and dtype (a constant is broadcast)."""
    y = f(t)
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y, dtype=t.dtype, device=t.device)
    try:
        return y.to(t.dtype).broadcast_to(t.shape) if y.shape != t.shape else y.to(t.dtype)
    except RuntimeError as e:
        raise ValueError(f"{what}(t) must be elementwise in t (shape {tuple(t.shape)}), got {tuple(y.shape)}") from e


def _autograd_derivative(f: Callable[[Tensor], Tensor], t: Tensor, what: str) -> Tensor:
    """d f / dt elementwise by autograd (keeps the graph when t requires grad, for higher derivatives)."""
    with torch.enable_grad():
        tt = t if t.requires_grad else t.detach().requires_grad_(True)
        y = _call_schedule(f, tt, what)
        if not y.requires_grad:
            return torch.zeros_like(t)
        (g,) = torch.autograd.grad(y.sum(), tt, create_graph=t.requires_grad, allow_unused=True)
    return torch.zeros_like(t) if g is None else g


class AffinePath(GaussianPath):
    """Any schedule x_t = alpha(t) x_1 + sigma(t) x_0 (FM paper Eq. 10 with mu_t = alpha_t x_1); derivatives by
    autograd when not given. alpha, sigma must be elementwise torch functions of t; [t_min, t_max] is where
    sigma > 0 (e.g. t_max < 1 for the cosine schedule alpha = sin(pi t/2), sigma = cos(pi t/2))."""

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor],
        sigma: Callable[[Tensor], Tensor],
        d_alpha: Callable[[Tensor], Tensor] | None = None,
        d_sigma: Callable[[Tensor], Tensor] | None = None,
        name: str = "affine",
        *,
        t_min: float = 0.0,
        t_max: float = 1.0,
    ) -> None:
        for k, f in (("alpha", alpha), ("sigma", sigma), ("d_alpha", d_alpha), ("d_sigma", d_sigma)):
            if f is not None and not callable(f):
                raise TypeError(f"{k} must be a callable of t (a torch function), got {type(f).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        t_min = check_positive("t_min", t_min, allow_zero=True)
        t_max = check_positive("t_max", t_max)
        if not t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.fns = {"alpha": alpha, "sigma": sigma, "d_alpha": d_alpha, "d_sigma": d_sigma}
        self.name, self.t_min, self.t_max = name, t_min, t_max

    def _alpha(self, t: Tensor) -> Tensor:
        return _call_schedule(self.fns["alpha"], t, "alpha")

    def _sigma(self, t: Tensor) -> Tensor:
        return _call_schedule(self.fns["sigma"], t, "sigma")

    def _d_alpha(self, t: Tensor) -> Tensor:
        f = self.fns["d_alpha"]
        return _call_schedule(f, t, "d_alpha") if f else _autograd_derivative(self.fns["alpha"], t, "alpha")

    def _d_sigma(self, t: Tensor) -> Tensor:
        f = self.fns["d_sigma"]
        return _call_schedule(f, t, "d_sigma") if f else _autograd_derivative(self.fns["sigma"], t, "sigma")

    def __repr__(self) -> str:
        return f"AffinePath(name={self.name!r}, t in [{self.t_min}, {self.t_max}])"


PATHS: dict[str, type[GaussianPath]] = {"ot": CondOTPath, "ve": VEPath, "vp": VPPath}


def list_paths() -> list[str]:
    """Names accepted by get_path."""
    return sorted(PATHS)


def get_path(name: str, **kwargs) -> GaussianPath:
    """Build the named path: "ot" (sigma_min), "ve" (sigma_min, sigma_max), "vp" (beta_min, beta_max)."""
    cls = PATHS[check_choice("path", name, PATHS)]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"path {name!r} does not take {unknown}; its parameters are {params}")
    return cls(**kwargs)


# --- another schedule -------------------------------------------------------------------------------------------
def cosine_path(sigma_min: float = 0.0) -> AffinePath:
    """alpha_t = sin(pi t / 2), sigma_t = sigma_min + (1 - sigma_min) cos(pi t / 2) (book Ch. 4, cosine schedule)."""
    sigma_min = check_positive("sigma_min", sigma_min, allow_zero=True)
    if sigma_min >= 1:
        raise ValueError(f"sigma_min must be < 1 (sigma_1 = sigma_min is the data-end noise std), got {sigma_min}")
    h = math.pi / 2
    return AffinePath(
        lambda t: torch.sin(h * t),
        lambda t: sigma_min + (1 - sigma_min) * torch.cos(h * t),
        lambda t: h * torch.cos(h * t),
        lambda t: -(1 - sigma_min) * h * torch.sin(h * t),
        name="cosine",
        t_max=1.0 if sigma_min > 0 else 1.0 - T_EDGE,
    )
