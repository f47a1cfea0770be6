"""Scores and SDEs of an affine Gaussian path (book chapter 9): four readings of one model, the SDEs that keep the
marginals p_t, and Euler-Maruyama with an optional Langevin corrector.

With x_0 ~ N(0, I) and x_t = alpha_t x_1 + sigma_t x_0, a trained model can be read four ways: the velocity
v = E[alpha' x_1 + sigma' x_0 | x_t = x] (flow matching), the data prediction x1_hat = E[x_1 | x_t = x], the noise
prediction eps_hat = E[x_0 | x_t = x] and the score grad log p_t(x) = -eps_hat / sigma_t (Tweedie's formula). They are
tied by the 2x2 linear system
    x = alpha x1_hat + sigma eps_hat,    v = alpha' x1_hat + sigma' eps_hat,
of determinant alpha sigma' - sigma alpha' (-1 on CondOT): every conversion goes through the pair (x1_hat, eps_hat)
and divides by one schedule quantity on each side; it raises, naming that quantity, where it vanishes.

For dX = f_t(X) dt + g_t dW the density obeys the Fokker-Planck equation d/dt p = -div(f p) + (g^2 / 2) Lap p. The
drift f = u_t + (g_t^2 / 2) grad log p_t keeps the marginals p_t of the flow for every g_t (chapter 9), since
div(p grad log p) = Lap p; g = 0 is the flow ODE. `MarginalSDE` builds that drift from one model call per step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._checks import (
    check_choice,
    check_generator,
    check_points,
    check_positive,
    check_positive_int,
    check_time,
    check_unit_time,
    check_velocity_output,
)
from .paths import GaussianPath
from .threads import thread_policy

Model = Callable[[Tensor, Tensor], Tensor]  # model(x, t): x (n, d), t (n,) -> (n, d)
PARAMETRISATIONS = ("velocity", "x1", "eps", "score")


def _coefficients(path: GaussianPath, t: float | Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """alpha, sigma, alpha', sigma' and t as (n or 1, 1) float64 tensors on x's device."""
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a fmtoy GaussianPath (e.g. CondOTPath()), got {type(path).__name__}")
    t = check_time(t, x.shape[0], like=torch.zeros((), dtype=torch.float64, device=x.device))
    return (*path.schedule(t), t)


def _nonzero(value: Tensor, what: str, t: Tensor, conversion: str) -> Tensor:
    """value, after checking it vanishes nowhere (the conversion divides by it)."""
    bad = value == 0
    if bad.any():
        at = t.expand_as(value)[bad].flatten()[0].item()
        raise ValueError(f"{conversion} divides by {what}, which is 0 at t = {at:.6g}: choose t where {what} != 0")
    return value


def _to_pair(kind: str, pred: Tensor, x: Tensor, c: tuple) -> tuple[Tensor, Tensor]:
    """(x1_hat, eps_hat) from a prediction of kind `kind` at x."""
    al, sg, dal, dsg, t = c
    name = f"the {kind} -> (x1, eps) conversion"
    if kind == "velocity":
        det = _nonzero(al * dsg - sg * dal, "alpha sigma' - sigma alpha'", t, name)
        return (dsg * x - sg * pred) / det, (al * pred - dal * x) / det
    if kind == "x1":
        return pred, (x - al * pred) / _nonzero(sg, "sigma_t", t, name)
    if kind == "eps":
        return (x - sg * pred) / _nonzero(al, "alpha_t", t, name), pred
    eps = -sg * pred  # score: Tweedie, eps_hat = -sigma grad log p
    return (x - sg * eps) / _nonzero(al, "alpha_t", t, name), eps


def _from_pair(kind: str, x1: Tensor, eps: Tensor, c: tuple) -> Tensor:
    """The prediction of kind `kind` from (x1_hat, eps_hat)."""
    al, sg, dal, dsg, t = c
    if kind == "velocity":
        return dal * x1 + dsg * eps
    if kind == "x1":
        return x1
    if kind == "eps":
        return eps
    return -eps / _nonzero(sg, "sigma_t", t, "the (x1, eps) -> score conversion")


def convert(pred: Tensor, x: Tensor, t: float | Tensor, path: GaussianPath, frm: str, to: str) -> Tensor:
    """A prediction `pred` at (x, t) of kind `frm` read as kind `to` (velocity, x1, eps, score), through the pair
    (x1_hat, eps_hat) of the module's 2x2 system (chapter 9, eq-ch9-conversions); computed in float64, returned in
    x's dtype. N(0, I) source only: the score's reading -eps_hat / sigma_t is Tweedie's formula for it."""
    check_choice("parametrisation", frm, PARAMETRISATIONS)
    check_choice("parametrisation", to, PARAMETRISATIONS)
    x = check_points(x)
    pred = check_velocity_output(pred, x)
    if frm == to:
        return pred
    c = _coefficients(path, t, x)
    x64, p64 = x.double(), pred.double()
    x1, eps = _to_pair(frm, p64, x64, c)
    return _from_pair(to, x1, eps, c).to(x.dtype)


class Reparametrised:
    """model (of kind `frm`) read as kind `to`: Reparametrised(net, path, "velocity", "score")(x, t) is the score of a
    velocity network (convert applied to each call)."""

    def __init__(self, model: Model, path: GaussianPath, frm: str = "velocity", to: str = "score") -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t) -> (n, d), got {type(model).__name__}")
        self.model, self.path = model, path
        self.frm = check_choice("parametrisation", frm, PARAMETRISATIONS)
        self.to = check_choice("parametrisation", to, PARAMETRISATIONS)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return convert(self.model(x, t), x, t, self.path, self.frm, self.to)

    def __repr__(self) -> str:
        return f"Reparametrised({self.frm} -> {self.to}, path={self.path!r})"


Diffusion = Callable[[float], float]


def check_diffusion(g: float | Diffusion) -> Diffusion:
    """g_t as a function of t: a number >= 0 (constant) or a callable t -> number >= 0 (checked where it is used)."""
    if callable(g):
        return g
    g = check_positive("g", g, allow_zero=True)
    return lambda t: g


def _g_at(g: Diffusion, t: float) -> float:
    value = g(t)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"g(t) must return a finite number >= 0, got {value!r} at t = {t:.6g}")
    return float(value)


class MarginalSDE:
    """dX = [u_t(X) + (g_t^2 / 2) grad log p_t(X)] dt + g_t dW (eq-ch9-family): the SDE with the marginals p_t of a
    model of kind `kind` (velocity, x1, eps or score), for g a number >= 0 or a function of t. drift(x, t) calls the
    model once and reads the velocity and the score from that one prediction."""

    def __init__(self, model: Model, path: GaussianPath, g: float | Diffusion, kind: str = "velocity") -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t) -> (n, d), got {type(model).__name__}")
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a fmtoy GaussianPath (e.g. CondOTPath()), got {type(path).__name__}")
        self.model, self.path, self.g = model, path, check_diffusion(g)
        self.kind = check_choice("parametrisation", kind, PARAMETRISATIONS)

    def diffusion(self, t: float) -> float:
        """g_t."""
        return _g_at(self.g, t)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f_t(x) = u_t(x) + (g_t^2 / 2) grad log p_t(x) for a time tensor t of equal entries (how the solvers call)."""
        pred = check_velocity_output(self.model(x, t), x)
        g = _g_at(self.g, float(t.reshape(-1)[0]))
        if g == 0.0:
            return convert(pred, x, t, self.path, self.kind, "velocity")
        c = _coefficients(self.path, t, x)
        x1, eps = _to_pair(self.kind, pred.double(), x.double(), c)
        return (_from_pair("velocity", x1, eps, c) + 0.5 * g**2 * _from_pair("score", x1, eps, c)).to(x.dtype)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x) read from the model."""
        return convert(self.model(x, t), x, t, self.path, self.kind, "score")

    def __repr__(self) -> str:
        return f"MarginalSDE(kind={self.kind!r}, path={self.path!r})"


def brownian_increments(steps: int, n: int, d: int, generator: torch.Generator | None = None, dtype=None) -> Tensor:
    """Standard normal draws z_k (steps, n, d): the k-th Euler-Maruyama step adds g sqrt(h) z_k (dW_k = sqrt(h) z_k)."""
    steps, n, d = (check_positive_int(k, v) for k, v in (("steps", steps), ("n", n), ("d", d)))
    dev = generator.device if generator is not None else None
    return torch.randn(steps, n, d, generator=generator, dtype=dtype, device=dev)


def coarsen(z: Tensor, factor: int) -> Tensor:
    """The same Brownian path on a grid `factor` times coarser: sums of `factor` consecutive dW, rescaled to N(0, 1)."""
    factor = check_positive_int("factor", factor)
    if not isinstance(z, Tensor) or z.ndim != 3 or z.shape[0] % factor:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must have shape (steps, n, d) with steps a multiple of {factor}, got {got}")
    return z.reshape(z.shape[0] // factor, factor, *z.shape[1:]).sum(1) / math.sqrt(factor)


def euler_maruyama(
    sde: MarginalSDE,
    x0: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    noise: Tensor | None = None,
    langevin: int = 0,
    langevin_step: float = 0.01,
    return_trajectory: bool = False,
    threads: str | int | None = None,
) -> Tensor:
    """X_{k+1} = X_k + h f_{t_k}(X_k) + g_{t_k} sqrt(h) z_k on a uniform grid from t0 to t1 (eq-ch9-em), the drift taken
    at the left end of each step (so t1 = 1, where the score of a sigma_1 = 0 path is singular, is never evaluated);
    `noise` the z_k (steps, n, d) instead of draws from `generator`. langevin = L > 0: before each step, L corrector
    steps at t_k, x <- x + delta grad log p_t(x) + sqrt(2 delta) z (delta = langevin_step), each one model call more:
    steps (1 + L) calls in all. Returns X(t1) (n, d) or the trajectory (steps + 1, n, d); no_grad, fmtoy's CPU thread
    policy."""
    if not isinstance(sde, MarginalSDE):
        raise TypeError(f"sde must be a fmtoy.sde.MarginalSDE, got {type(sde).__name__}")
    x = check_points(x0, name="x0")
    steps = check_positive_int("steps", steps)
    t0, t1 = check_unit_time("t0", t0), check_unit_time("t1", t1)
    if not t0 < t1:
        raise ValueError(f"euler_maruyama integrates forwards in time: need t0 < t1, got t0={t0}, t1={t1}")
    if isinstance(langevin, bool) or not isinstance(langevin, int) or langevin < 0:
        raise ValueError(f"langevin must be an integer >= 0 (corrector steps per step), got {langevin!r}")
    delta = check_positive("langevin_step", langevin_step)
    check_generator(generator, x.device)
    n, d = x.shape
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != (steps, n, d):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape (steps, n, d) = {(steps, n, d)}, got {got}")
        noise = noise.to(x)
    h = (t1 - t0) / steps
    times = [t0 + (t1 - t0) * k / steps for k in range(steps)] + [t1]
    trajectory = [x]
    with torch.no_grad(), thread_policy(threads, x.device) as tuner:
        for k in range(steps):
            tuner.tick()
            t = x.new_full((n,), times[k])
            for _ in range(langevin):  # corrector at t_k: Langevin dynamics that leave p_{t_k} invariant
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + delta * sde.score(x, t) + math.sqrt(2 * delta) * z
            g = sde.diffusion(times[k])
            x = x + h * sde.drift(x, t)
            if g > 0.0:
                z = (
                    noise[k]
                    if noise is not None
                    else torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                )
                x = x + g * math.sqrt(h) * z
            if return_trajectory:
                trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


def sampler_scores(
    sde: MarginalSDE,
    x0: Tensor,
    reference: Tensor,
    nfes: tuple[int, ...] | list[int],
    seed: int = 0,
    langevin: int = 0,
    langevin_step: float = 0.01,
    target=None,
) -> dict:
    """{nfe: energy distance to reference} of Euler-Maruyama runs spending nfe model calls, nfe / (1 + langevin) steps
    (an nfe that is not a multiple of 1 + langevin is skipped), the noise of each run drawn from make_generator(seed);
    with a target also "xent", the cross-entropy -mean log q of the largest nfe's samples (fmtoy.metrics.cross_entropy).
    fmtoy.metrics.quality_vs_nfe for the SDE samplers of chapter 9."""
    from .device import make_generator
    from .metrics import cross_entropy, energy_distance

    x0, out = check_points(x0, name="x0"), {}
    for n in sorted(nfes):
        steps, rest = divmod(check_positive_int("nfe", n), 1 + langevin)
        if rest:
            continue
        x = euler_maruyama(
            sde, x0, steps, make_generator(seed, x0.device), langevin=langevin, langevin_step=langevin_step
        )
        out[n] = energy_distance(x, reference)
    if target is not None and out:
        out["xent"] = cross_entropy(x, target)
    return out


def strong_errors(
    sde: MarginalSDE,
    x0: Tensor,
    steps: tuple[int, ...] | list[int],
    fine: int,
    generator: torch.Generator | None = None,
) -> dict[int, float]:
    """{N: mean |X_1^(N) - X_1^(fine)|}: Euler-Maruyama with N steps against `fine` steps on the same Brownian path
    (the coarse increments are sums of the fine ones, coarsen), the pathwise (strong) error of chapter 9."""
    x0 = check_points(x0, name="x0")
    fine = check_positive_int("fine", fine)
    bad = [n for n in steps if check_positive_int("steps", n) > fine or fine % n]
    if bad:
        raise ValueError(f"every entry of steps must divide fine = {fine}, got {bad}")
    z = brownian_increments(fine, *x0.shape, generator, dtype=x0.dtype)
    end = euler_maruyama(sde, x0, fine, noise=z)
    return {n: float((euler_maruyama(sde, x0, n, noise=coarsen(z, fine // n)) - end).norm(dim=1).mean()) for n in steps}


def fitted_order(errors: dict[int, float]) -> float:
    """The least-squares slope of log error against log h = log(1 / N): the observed order of convergence."""
    if len(errors) < 2 or any(not (e > 0) for e in errors.values()):
        raise ValueError(f"fitted_order needs at least 2 positive errors, got {errors}")
    pts = [(math.log(1.0 / n), math.log(e)) for n, e in errors.items()]
    mx, my = (sum(v) / len(v) for v in zip(*pts))
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


__all__ = [
    "PARAMETRISATIONS",
    "convert",
    "Reparametrised",
    "check_diffusion",
    "MarginalSDE",
    "brownian_increments",
    "coarsen",
    "euler_maruyama",
    "sampler_scores",
    "strong_errors",
    "fitted_order",
]
