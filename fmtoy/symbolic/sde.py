"""SymPy for chapter 9: the four readings of one model (velocity, x1, eps, score) derived from the 2x2 system of an
affine Gaussian path, where each conversion is singular, and the Fokker-Planck equation of the marginal-preserving
SDEs on a 1D Gaussian path (for every g_t), with the wrong factor g^2 instead of g^2 / 2 as the check that fails."""

from __future__ import annotations

from typing import NamedTuple

import sympy as sp

from .core import _tidy, gaussian_density, is_zero, sigma_min, t, x
from .paths import path_schedule

KINDS = ("velocity", "x1", "eps", "score")
alpha, sigma = sp.Function("alpha")(t), sp.Function("sigma")(t)  # a generic schedule
g = sp.Function("g")(t)  # a generic diffusion coefficient g_t
m, v1 = sp.Symbol("m", real=True), sp.Symbol("v_1", positive=True)  # the 1D target N(m, v_1)
READING = {  # the symbol of each given reading, as the chapter writes it
    "velocity": sp.Symbol("u", real=True),
    "x1": sp.Symbol(r"\hat{x}_1", real=True),
    "eps": sp.Symbol(r"\hat{\varepsilon}", real=True),
    "score": sp.Symbol("s", real=True),
}
_x1, _eps = sp.Dummy("x1", real=True), sp.Dummy("eps", real=True)  # the unknown pair (x1_hat, eps_hat)


def _system(a: sp.Expr, s: sp.Expr) -> dict[str, sp.Expr]:
    """Each reading as a function of the pair (x1_hat, eps_hat), with x = a x1_hat + s eps_hat."""
    return {
        "velocity": sp.diff(a, t) * _x1 + sp.diff(s, t) * _eps,
        "x1": _x1,
        "eps": _eps,
        "score": -_eps / s,  # Tweedie for x_0 ~ N(0, 1): grad log p_t(x) = -E[x_0 | x_t = x] / sigma_t
    }


class Conversions(NamedTuple):
    """conversion[(frm, to)]: the `to` reading as a function of x and the `frm` reading (the symbol READING[frm]);
    pair[frm]: (x1_hat, eps_hat) from x and that reading; divisor[frm]: what the pair divides by."""

    conversion: dict[tuple[str, str], sp.Expr]
    pair: dict[str, tuple[sp.Expr, sp.Expr]]
    divisor: dict[str, sp.Expr]


def conversions(a: sp.Expr = alpha, s: sp.Expr = sigma) -> Conversions:
    """Solve x = a x1_hat + s eps_hat together with the definition of each reading for (x1_hat, eps_hat), then write
    every other reading in terms of it (eq-ch9-conversions); a, s a schedule in t (generic by default)."""
    readings = _system(a, s)
    pair, divisor, conversion = {}, {}, {}
    for frm in KINDS:
        eqs = [sp.Eq(x, a * _x1 + s * _eps), sp.Eq(READING[frm], readings[frm])]
        sol = sp.solve(eqs, [_x1, _eps], dict=True)
        if len(sol) != 1:
            raise ValueError(f"no unique (x1_hat, eps_hat) from the {frm} reading")
        pair[frm] = (sp.simplify(sol[0][_x1]), sp.simplify(sol[0][_eps]))
        divisor[frm] = sp.factor(sp.lcm(*(sp.denom(sp.together(e)) for e in pair[frm])))
        for to in KINDS:
            conversion[frm, to] = sp.simplify(readings[to].subs({_x1: pair[frm][0], _eps: pair[frm][1]}))
    return Conversions(conversion, pair, divisor)


def round_trips(c: Conversions | None = None) -> dict[tuple[str, str], sp.Expr]:
    """conversion(to -> frm) of conversion(frm -> to) minus the frm reading: all zero."""
    c = conversions() if c is None else c
    out = {}
    for (frm, to), e in c.conversion.items():
        if frm != to:
            back = c.conversion[to, frm].subs(READING[to], e)
            out[frm, to] = sp.simplify(back - READING[frm])
    return out


def singular_times(name: str) -> dict[str, list[sp.Expr]]:
    """Times in [0, 1] where each reading's pair conversion divides by zero on fmtoy's path `name` ("ot", "vp", "ve";
    sigma_min = 0 for "ot"), and where score_from the pair (-eps / sigma) does."""
    a, s = path_schedule(name)
    if name == "ot":
        a, s = a.subs(sigma_min, 0), s.subs(sigma_min, 0)
    c = conversions(a, s)
    out = {}
    for frm in KINDS:
        zeros = sp.solveset(sp.numer(sp.together(c.divisor[frm])), t, sp.Interval(0, 1))
        out[f"{frm} -> pair"] = sorted(zeros) if zeros.is_FiniteSet else [zeros]
    zeros = sp.solveset(s, t, sp.Interval(0, 1))
    out["pair -> score"] = sorted(zeros) if zeros.is_FiniteSet else [zeros]
    return out


class GaussianPath1D(NamedTuple):
    """The marginal path of the 1D target N(m, v_1) from N(0, 1): p_t = N(alpha m, alpha^2 v_1 + sigma^2), its field
    u_t (Gaussian conditioning, FM Theorem 1) and its score."""

    p: sp.Expr
    u: sp.Expr
    score: sp.Expr


def gaussian_path_1d(a: sp.Expr = alpha, s: sp.Expr = sigma) -> GaussianPath1D:
    """p_t, u_t and grad log p_t of the 1D Gaussian target along the schedule (a, s)."""
    var = a**2 * v1 + s**2
    da, ds = sp.diff(a, t), sp.diff(s, t)
    p = gaussian_density(x, a * m, sp.sqrt(var))
    u = da * m + (a * da * v1 + s * ds) / var * (x - a * m)
    return GaussianPath1D(p, u, -(x - a * m) / var)


def fokker_planck(p: sp.Expr, drift: sp.Expr, diffusion: sp.Expr = g) -> sp.Expr:
    """d/dt p + d/dx (drift p) - (diffusion^2 / 2) d^2/dx^2 p (eq-ch9-fp, 1D): zero when p is the density of
    dX = drift dt + diffusion dW."""
    return sp.diff(p, t) + sp.diff(drift * p, x) - diffusion**2 / 2 * sp.diff(p, x, 2)


def marginal_sde_residuals(a: sp.Expr = alpha, s: sp.Expr = sigma) -> dict[str, sp.Expr]:
    """Fokker-Planck residuals / p of the 1D Gaussian path for the drifts u (g = 0: the continuity equation),
    u + (g^2 / 2) score (the family, any g_t: zero) and u + g^2 score (the wrong factor: not zero)."""
    path = gaussian_path_1d(a, s)
    drifts = {
        "u, g = 0": (path.u, sp.Integer(0)),
        "u + g^2/2 score": (path.u + g**2 / 2 * path.score, g),
        "u + g^2 score": (path.u + g**2 * path.score, g),
    }
    return {k: _tidy(fokker_planck(path.p, f, gg) / path.p) for k, (f, gg) in drifts.items()}


def check_conversions() -> dict[str, bool]:
    """The round trips vanish, and the velocity -> score conversion is chapter 8's u = a_t x + b_t score."""
    from .guidance import score_coefficients

    c = conversions()
    ok = {f"{frm} -> {to} -> {frm}": r == 0 for (frm, to), r in round_trips(c).items()}
    a_t, b_t = score_coefficients(alpha, sigma)
    ok["velocity = a_t x + b_t score (chapter 8)"] = is_zero(
        c.conversion["score", "velocity"] - (a_t * x + b_t * READING["score"]), method="points"
    )
    return ok


__all__ = [
    "KINDS",
    "READING",
    "alpha",
    "sigma",
    "g",
    "m",
    "v1",
    "Conversions",
    "conversions",
    "round_trips",
    "singular_times",
    "GaussianPath1D",
    "gaussian_path_1d",
    "fokker_planck",
    "marginal_sde_residuals",
    "check_conversions",
]
