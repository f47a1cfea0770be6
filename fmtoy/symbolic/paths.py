"""SymPy for chapters 4-5: Thm 3 fields, the VE/VP/CondOT closed forms and a cross-check against fmtoy.paths, a
rotation that leaves a Gaussian path unchanged (ch. 4), and the loss weights of x- and eps-prediction (ch. 5)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import sympy as sp

from .._checks import check_choice, check_positive_int
from .core import (
    PATH_PARAMS,
    _expr,
    _symbol,
    _tidy,
    beta_max,
    beta_min,
    gaussian_density,
    is_zero,
    s,
    sigma_max,
    sigma_min,
    t,
    x,
    x1,
    y,
)


def gaussian_conditional_velocity(
    mu: sp.Expr, sigma: sp.Expr, t: sp.Symbol = t, x: sp.Symbol = x, simplify: bool = True
) -> sp.Expr:
    """u_t(x|x_1) = d/dt psi_t(x_0) at x_0 = psi_t^{-1}(x), psi_t(x_0) = sigma_t x_0 + mu_t (FM paper Thm 3, Eq. 15)."""
    mu, sigma, t, x = _expr("mu", mu), _expr("sigma", sigma), _symbol("t", t), _symbol("x", x)
    if sigma.is_zero:
        raise ValueError("sigma must be non-zero (otherwise psi_t(x_0) = sigma_t x_0 + mu_t is not invertible)")
    if x in mu.free_symbols or x in sigma.free_symbols:
        raise ValueError(f"mu and sigma must not depend on the point {x}; they are functions of t and x_1 only")
    x0 = sp.Dummy("x_0")
    u = sp.diff(sigma * x0 + mu, t).subs(x0, (x - mu) / sigma)
    return _tidy(u) if simplify else u


def path_schedule(name: str) -> tuple[sp.Expr, sp.Expr]:
    """(alpha_t, sigma_t) of fmtoy's path `name` with mu_t = alpha_t x_1 (FM paper Eqs. 16, 18, 20)."""
    check_choice("path", name, PATH_PARAMS)
    if name == "ot":
        return t, 1 - (1 - sigma_min) * t
    if name == "ve":  # sigma_s = sigma_min (sigma_max / sigma_min)^s at s = 1 - t
        return sp.Integer(1), sigma_min * (sigma_max / sigma_min) ** (1 - t)
    big_t = beta_min * s + (beta_max - beta_min) * s**2 / 2  # T(s) = int_0^s beta, beta linear
    a = sp.exp(-big_t / 2).subs(s, 1 - t)
    return a, sp.sqrt(1 - a**2)


def ot_velocity() -> tuple[sp.Expr, sp.Expr]:
    """(derived, paper) for CondOT: u = (x_1 - (1 - sigma_min) x) / (1 - (1 - sigma_min) t) (FM paper Eq. 21)."""
    alpha, sigma = path_schedule("ot")
    paper = (x1 - (1 - sigma_min) * x) / (1 - (1 - sigma_min) * t)
    return gaussian_conditional_velocity(alpha * x1, sigma), paper


def ve_velocity(schedule: str = "generic") -> tuple[sp.Expr, sp.Expr]:
    """(derived, paper) for VE: u = -sigma'_{1-t} / sigma_{1-t} (x - x_1) (FM paper Eq. 17).

    schedule "generic": an arbitrary sigma_s; "geometric": sigma_s = sigma_min (sigma_max/sigma_min)^s (VEPath).
    """
    check_choice("VE schedule", schedule, ("generic", "geometric"))
    geometric = sigma_min * (sigma_max / sigma_min) ** s
    sig_s = sp.Function("sigma", positive=True)(s) if schedule == "generic" else geometric
    paper = -(sp.diff(sig_s, s) / sig_s).subs(s, 1 - t) * (x - x1)  # sigma'_s / sigma_s, then s = 1 - t
    return gaussian_conditional_velocity(x1, sig_s.subs(s, 1 - t)), paper


def vp_velocity(schedule: str = "linear") -> tuple[sp.Expr, sp.Expr]:
    """(derived, paper) for VP: u = -T'(1-t)/2 (e^{-T(1-t)} x - e^{-T(1-t)/2} x_1) / (1 - e^{-T(1-t)}) (FM Eq. 19).

    alpha_s = e^{-T(s)/2}, T(s) = int_0^s beta; schedule "linear": beta(s) = beta_min + s (beta_max - beta_min)
    (VPPath); "generic": an arbitrary T.
    """
    check_choice("VP schedule", schedule, ("generic", "linear"))
    linear = beta_min * s + (beta_max - beta_min) * s**2 / 2
    big_t = sp.Function("T", real=True)(s) if schedule == "generic" else linear
    tm, dtm = big_t.subs(s, 1 - t), sp.diff(big_t, s).subs(s, 1 - t)
    a = sp.exp(-tm / 2)
    paper = -dtm / 2 * (sp.exp(-tm) * x - sp.exp(-tm / 2) * x1) / (1 - sp.exp(-tm))
    return gaussian_conditional_velocity(a * x1, sp.sqrt(1 - a**2)), paper


def cross_check_paths(paths: Sequence | None = None, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Max relative error of fmtoy.paths (alpha, sigma, their t-derivatives, u_t(x|x_1)) against the closed forms."""
    import numpy as np
    import torch

    from fmtoy.paths import CondOTPath, VEPath, VPPath

    check_positive_int("n", n)
    paths = [CondOTPath(), CondOTPath(sigma_min=0.1), VEPath(), VPPath()] if paths is None else list(paths)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for i, path in enumerate(paths):
        name = check_choice("path name", getattr(path, "name", None), PATH_PARAMS)
        params = PATH_PARAMS[name]
        missing = [str(p) for p in params if not hasattr(path, str(p))]
        if missing:
            raise ValueError(f"path {name!r} has no attribute(s) {missing} to read its parameters from")
        values = [float(getattr(path, str(p))) for p in params]
        alpha, sigma = path_schedule(name)
        paper = {"ot": ot_velocity, "ve": lambda: ve_velocity("geometric"), "vp": vp_velocity}[name]()[1]
        forms = {
            "alpha": alpha,
            "sigma": sigma,
            "d_alpha": sp.diff(alpha, t),
            "d_sigma": sp.diff(sigma, t),
            "conditional_velocity": paper,
        }
        lo, hi = max(path.t_min, 0.02), min(path.t_max, 0.98)  # keep sigma_t away from 0
        tt = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        xx = torch.randn(n, 2, generator=g, dtype=torch.float64)
        xx1 = 2 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        numeric = {k: getattr(path, k)(tt) for k in ("alpha", "sigma", "d_alpha", "d_sigma")}
        numeric["conditional_velocity"] = path.conditional_velocity(xx, tt, xx1)
        for k, form in forms.items():
            f = sp.lambdify((x, t, x1, *params), form, modules="numpy")
            if k == "conditional_velocity":
                ref = f(xx.numpy(), tt.numpy()[:, None], xx1.numpy(), *values)
            else:
                ref = f(0.0, tt.numpy(), 0.0, *values) * np.ones(n)
            got = numeric[k].detach().cpu().double().numpy().reshape(np.shape(ref))
            out[f"{i}:{name}/{k}"] = float(np.max(np.abs(got - ref) / (1.0 + np.abs(ref))))
    return out


# --- Book chapter 4: a rotation that leaves the Gaussian path unchanged ------------------------------------------
class RotatedGaussian2D(NamedTuple):
    """p_t = N(mu_t, sigma_t^2 I) in 2D, Thm 3's field u, the rotation w, the flow of u + w and its x_0 symbols."""

    p: sp.Expr
    u: list
    w: list
    flow: list
    x0: tuple


def rotated_gaussian_2d(
    mu: Sequence | None = None, sigma: sp.Expr | None = None, theta: sp.Expr | None = None
) -> RotatedGaussian2D:
    """p_t, u_t (FM Thm 3), w_t = theta'_t J (x - mu_t) and the flow mu_t + sigma_t R(theta_t) x_0 of u + w (Ch. 4).

    Defaults: mu = (mu_1(t), mu_2(t)), sigma(t), theta(t) undefined functions; J = [[0, -1], [1, 0]]."""
    mu = sp.symbols("mu_1 mu_2", cls=sp.Function, real=True) if mu is None else mu
    mu = [m(t) if isinstance(m, sp.core.function.FunctionClass) else _expr("each mu", m) for m in mu]
    if len(mu) != 2:
        raise ValueError(f"mu must have 2 components (a 2D mean), got {len(mu)}")
    sigma = sp.Function("sigma", positive=True)(t) if sigma is None else _expr("sigma", sigma)
    theta = sp.Function("theta", real=True)(t) if theta is None else _expr("theta", theta)
    for name, e in (("mu", mu[0]), ("mu", mu[1]), ("sigma", sigma), ("theta", theta)):
        if {x, y} & e.free_symbols:
            raise ValueError(f"{name} must depend on t (and parameters) only, not on the point (x, y)")
    p = gaussian_density(x, mu[0], sigma) * gaussian_density(y, mu[1], sigma)
    u = [gaussian_conditional_velocity(m, sigma, t, xi) for m, xi in zip(mu, (x, y))]
    om = sp.diff(theta, t)
    w = [-om * (y - mu[1]), om * (x - mu[0])]
    a, b = sp.symbols("x_0 y_0", real=True)
    c, s_ = sp.cos(theta), sp.sin(theta)
    flow = [mu[0] + sigma * (c * a - s_ * b), mu[1] + sigma * (s_ * a + c * b)]
    return RotatedGaussian2D(p, u, w, flow, (a, b))


def standard_normal_expectation(expr: sp.Expr, zs: Sequence[sp.Symbol]) -> sp.Expr:
    """E[expr] for independent z_i ~ N(0, 1), expr a polynomial in zs: E z^k = (k-1)!! for even k, else 0."""
    expr = _expr("expr", expr)
    zs = [_symbol("each entry of zs", z) for z in zs]
    try:
        poly = sp.Poly(sp.expand(expr), *zs)
    except sp.PolynomialError as err:
        raise ValueError(f"expr must be a polynomial in {zs} (Gaussian moments are used term by term)") from err
    moment = lambda k: sp.Integer(0) if k % 2 else sp.factorial2(k - 1)  # noqa: E731
    total = sum(c * sp.Mul(*[moment(k) for k in ks]) for ks, c in poly.terms())
    return sp.simplify(total)


# --- Book chapter 5: diffusion is flow matching -- velocity, x- and eps-prediction losses ------------------------
class PredictionWeights(NamedTuple):
    """x_hat(z, v_hat), eps_hat(z, v_hat) and the weights with
    |v_hat - v|^2 = w_x |x_hat - x|^2 = w_eps |eps_hat - eps|^2."""

    x_hat: sp.Expr
    eps_hat: sp.Expr
    x_weight: sp.Expr
    eps_weight: sp.Expr


def prediction_loss_weights(
    alpha: sp.Expr | None = None, sigma: sp.Expr | None = None, t: sp.Symbol = t
) -> PredictionWeights:
    """For z_t = alpha_t x + sigma_t eps, v = alpha'_t x + sigma'_t eps (Ch. 5): solve
    z_t = alpha x_hat + sigma eps_hat, v_hat = alpha' x_hat + sigma' eps_hat for (x_hat, eps_hat) and return the
    squared-error weights w_x = ((alpha' sigma - alpha sigma') / sigma)^2 and
    w_eps = ((alpha' sigma - alpha sigma') / alpha)^2.

    Defaults: alpha, sigma undefined functions of t. Book convention (t = 0 noise): OT is alpha = t, sigma = 1 - t.
    """
    t = _symbol("t", t)
    alpha = sp.Function("alpha", real=True)(t) if alpha is None else _expr("alpha", alpha)
    sigma = sp.Function("sigma", positive=True)(t) if sigma is None else _expr("sigma", sigma)
    z, v_hat, xs, eps, xh, eh = sp.symbols("z_t v_hat x epsilon x_hat epsilon_hat", real=True)
    if {z, v_hat, xs, eps} & (alpha.free_symbols | sigma.free_symbols):
        raise ValueError("alpha and sigma must depend on t (and parameters) only")
    da, ds = sp.diff(alpha, t), sp.diff(sigma, t)
    sol = sp.solve([alpha * xh + sigma * eh - z, da * xh + ds * eh - v_hat], [xh, eh], dict=True)
    if len(sol) != 1:
        raise ValueError("alpha' sigma - alpha sigma' must be non-zero: otherwise (z_t, v) does not determine (x, eps)")
    x_hat, eps_hat = sp.simplify(sol[0][xh]), sp.simplify(sol[0][eh])
    at_truth = {z: alpha * xs + sigma * eps}
    v_true = da * xs + ds * eps
    # each prediction error is proportional to the velocity error: v_hat - v = gamma/sigma dx = -gamma/alpha deps
    gamma = da * sigma - alpha * ds
    cx, ce = gamma / sigma, -gamma / alpha
    for c, pred, truth in ((cx, x_hat, xs), (ce, eps_hat, eps)):
        r = (v_hat - v_true) - c * (pred.subs(at_truth) - truth)
        if not (sp.simplify(r) == 0 or is_zero(r, method="points")):
            raise ValueError("the prediction errors are not proportional to the velocity error (internal check failed)")
    return PredictionWeights(x_hat, eps_hat, sp.simplify(cx**2), sp.simplify(ce**2))


__all__ = [
    "gaussian_conditional_velocity",
    "path_schedule",
    "ot_velocity",
    "ve_velocity",
    "vp_velocity",
    "cross_check_paths",
    "RotatedGaussian2D",
    "rotated_gaussian_2d",
    "standard_normal_expectation",
    "PredictionWeights",
    "prediction_loss_weights",
]
