"""SymPy for chapter 8: the velocity-score conversion u = a_t x + b_t grad log p_t derived from FM Theorem 3, checked
on a two-class Gaussian mixture in 1D, classifier guidance and CFG as velocities of the posterior and tilted scores,
and why the tilt of p_t is not the path of the tilted target."""

from __future__ import annotations

from typing import NamedTuple

import sympy as sp

from .core import _expr, _tidy, gaussian_density, is_zero, t, x, x1
from .paths import path_schedule

w = sp.Symbol("w", real=True)  # the guidance weight
pi0 = sp.Symbol("pi_0", positive=True)  # p(c = 0); p(c = 1) = 1 - pi_0
m0, m1 = sp.symbols("m_0 m_1", real=True)  # class means of the 1D example
v0, v1 = sp.symbols("v_0 v_1", positive=True)  # class variances
_a, _b = sp.symbols("a b")


def score_coefficients(alpha: sp.Expr, sigma: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(a_t, b_t) solving u_t(x | x_1) = a_t x + b_t d/dx log p_t(x | x_1) for every x and x_1 (FM Theorem 3 field of
    p_t(x | x_1) = N(alpha_t x_1, sigma_t^2)): coefficients of x and x_1 matched; they do not depend on x_1."""
    alpha, sigma = _expr("alpha", alpha), _expr("sigma", sigma)
    u = sp.diff(sigma, t) / sigma * (x - alpha * x1) + sp.diff(alpha, t) * x1
    score = -(x - alpha * x1) / sigma**2
    residual = sp.expand(u - _a * x - _b * score)
    eqs = [residual.coeff(x), residual.coeff(x1)]
    sol = sp.solve(eqs, [_a, _b], dict=True)
    if len(sol) != 1:
        raise ValueError(f"no unique (a_t, b_t) for alpha = {alpha}, sigma = {sigma}")
    return _tidy(sol[0][_a]), _tidy(sol[0][_b])


def path_score_coefficients(name: str) -> tuple[sp.Expr, sp.Expr]:
    """(a_t, b_t) for fmtoy's path `name` ("ot", "vp", "ve")."""
    return score_coefficients(*path_schedule(name))


class TwoClassMixture(NamedTuple):
    """The 1D two-class example along a path: p_t(x | c) (c = 0, 1), p_t(x), and the exact fields u_t(x | c), u_t(x)."""

    p_c: tuple[sp.Expr, sp.Expr]
    p: sp.Expr
    u_c: tuple[sp.Expr, sp.Expr]
    u: sp.Expr
    alpha: sp.Expr
    sigma: sp.Expr


def two_class_mixture(name: str = "ot") -> TwoClassMixture:
    """q(x | c) = N(m_c, v_c), p(0) = pi_0, along path `name`: p_t(x | c) = N(alpha m_c, alpha^2 v_c + sigma^2); the
    class fields by Gaussian conditioning (E[xdot | x_t = x, c]), the marginal field by FM Theorem 1 (posterior
    average)."""
    alpha, sigma = path_schedule(name)
    da, ds = sp.diff(alpha, t), sp.diff(sigma, t)
    p_c, u_c = [], []
    for m, v in ((m0, v0), (m1, v1)):
        var = alpha**2 * v + sigma**2
        p_c.append(gaussian_density(x, alpha * m, sp.sqrt(var)))
        u_c.append(da * m + (alpha * da * v + sigma * ds) / var * (x - alpha * m))
    prior = (pi0, 1 - pi0)
    p = prior[0] * p_c[0] + prior[1] * p_c[1]
    u = (prior[0] * p_c[0] * u_c[0] + prior[1] * p_c[1] * u_c[1]) / p
    return TwoClassMixture(tuple(p_c), p, tuple(u_c), u, alpha, sigma)


def _score(density: sp.Expr) -> sp.Expr:
    return sp.diff(sp.log(density), x)


def conversion_residuals(name: str = "ot") -> dict[str, sp.Expr]:
    """u - (a x + b score) for the marginal and both class fields of the two-class example: all zero."""
    m = two_class_mixture(name)
    a, b = score_coefficients(m.alpha, m.sigma)
    out = {"u_t(x)": m.u - (a * x + b * _score(m.p))}
    for c in (0, 1):
        out[f"u_t(x | {c})"] = m.u_c[c] - (a * x + b * _score(m.p_c[c]))
    return out


def guidance_residuals(name: str = "ot", c: int = 0) -> dict[str, sp.Expr]:
    """CFG (1 - w) u + w u_c minus the velocity a x + b grad[w log p_t(x | c) + (1 - w) log p_t(x)] of the tilted
    score, and classifier guidance u + w b grad log p_t(c | x) minus CFG: both zero for every w."""
    m = two_class_mixture(name)
    a, b = score_coefficients(m.alpha, m.sigma)
    cfg = (1 - w) * m.u + w * m.u_c[c]
    tilted = a * x + b * (w * _score(m.p_c[c]) + (1 - w) * _score(m.p))
    prior = pi0 if c == 0 else 1 - pi0
    classifier = m.u + w * b * _score(prior * m.p_c[c] / m.p)  # p_t(c | x) = p(c) p_t(x | c) / p_t(x)
    return {"CFG - tilted-score velocity": cfg - tilted, "classifier guidance - CFG": classifier - cfg}


def all_zero(residuals: dict[str, sp.Expr], n: int = 4) -> dict[str, bool]:
    """is_zero at random high-precision points for each residual."""
    return {k: is_zero(r, method="points", n=n) for k, r in residuals.items()}


class TiltVsPath(NamedTuple):
    """Precisions at time t of the tilt p_t(x | c)^w p_t(x)^(1-w) and of the path of the tilted target q^w (CondOT,
    Gaussian q(x | c) = N(m, v) and q(x) = N(0, V)): they agree at t = 0 and t = 1 only (for w != 0, 1)."""

    tilt: sp.Expr
    path_of_tilt: sp.Expr


def tilt_vs_path() -> TiltVsPath:
    """The two precisions (inverse variances) for CondOT, alpha = t, sigma = 1 - t."""
    v, big_v = sp.symbols("v V", positive=True)
    sig2 = (1 - t) ** 2
    tilt = w / (t**2 * v + sig2) + (1 - w) / (t**2 * big_v + sig2)  # precisions of a product of Gaussians add
    tilted_target_var = 1 / (w / v + (1 - w) / big_v)
    return TiltVsPath(sp.simplify(tilt), sp.simplify(1 / (t**2 * tilted_target_var + sig2)))


__all__ = [
    "w",
    "score_coefficients",
    "path_score_coefficients",
    "TwoClassMixture",
    "two_class_mixture",
    "conversion_residuals",
    "guidance_residuals",
    "all_zero",
    "TiltVsPath",
    "tilt_vs_path",
]
