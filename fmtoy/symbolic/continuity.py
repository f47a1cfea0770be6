"""SymPy for chapters 1-2: the continuity equation, the instantaneous change of variables and the two-component
marginal field (FM paper Eqs. 6, 8), and the divergence of a flux."""

from __future__ import annotations

from typing import Sequence

import sympy as sp

from .core import _expr, _symbol, gaussian_density, t, x, y
from .paths import gaussian_conditional_velocity


def continuity_residual(
    p: sp.Expr, u: sp.Expr | Sequence[sp.Expr], t: sp.Symbol = t, xs: Sequence[sp.Symbol] = (x,), simplify: bool = True
) -> sp.Expr:
    """d/dt p_t + div(p_t u_t), zero iff u_t generates p_t (continuity equation, FM paper App. B, Eq. 26)."""
    p, t = _expr("p", p), _symbol("t", t)
    if isinstance(xs, sp.Symbol) or not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise TypeError(f"xs must be a non-empty list of sympy Symbols such as [x] or [x, y], got {xs!r}")
    xs = [_symbol("each entry of xs", xi) for xi in xs]
    if len(set(xs)) != len(xs) or t in xs:
        raise ValueError(f"xs must be distinct space symbols different from t={t}, got {xs}")
    if not isinstance(u, (list, tuple)):
        u = [u]
    if len(u) != len(xs):
        raise ValueError(f"u has {len(u)} components but xs has {len(xs)} coordinates; they must match")
    u = [_expr("each component of u", ui) for ui in u]
    r = sp.diff(p, t) + sum(sp.diff(p * ui, xi) for ui, xi in zip(u, xs))
    return sp.simplify(r) if simplify else r


def log_density_rate(p: sp.Expr, u: sp.Expr, t: sp.Symbol = t, x: sp.Symbol = x) -> sp.Expr:
    """d/dt log p_t(x_t) along dx_t/dt = u_t(x_t): d_t log p + u d_x log p, at a generic point x (1D)."""
    p, u, t, x = _expr("p", p), _expr("u", u), _symbol("t", t), _symbol("x", x)
    logp = sp.expand_log(sp.log(p), force=True)
    return sp.diff(logp, t) + u * sp.diff(logp, x)


def linear_flow_log_density(a: sp.Expr | None = None, b: sp.Expr | None = None) -> tuple[sp.Expr, sp.Expr]:
    """(d/dt log p_t(x_t), -div u) for u = a(t) x + b(t) pushing N(m_0, s_0^2) forward (instantaneous change of
    variables, Chen et al. 2018 Thm 1); p_t = N(m_t, s_t^2) with m' = a m + b, s' = a s, x_t = m_t + s_t z."""
    a = sp.Function("a", real=True)(t) if a is None else _expr("a", a)
    b = sp.Function("b", real=True)(t) if b is None else _expr("b", b)
    if x in a.free_symbols or x in b.free_symbols:
        raise ValueError("a and b must depend on t only (u = a(t) x + b(t) is linear in x)")
    m, sd = sp.Function("m", real=True)(t), sp.Function("s", positive=True)(t)
    z = sp.Symbol("z", real=True)
    logp = sp.expand_log(sp.log(gaussian_density(x, m, sd)), force=True).subs(x, m + z * sd)
    lhs = sp.diff(logp, t).subs({sp.Derivative(m, t): a * m + b, sp.Derivative(sd, t): a * sd})
    return sp.simplify(lhs), -sp.diff(a * x + b, x)


def two_component_marginal_1d(
    x1s: Sequence | None = None,
    weights: Sequence | None = None,
    alpha: sp.Expr | None = None,
    sigma: sp.Expr | None = None,
    target_std: sp.Expr | float = 0,
    t: sp.Symbol = t,
    x: sp.Symbol = x,
) -> tuple[sp.Expr, sp.Expr]:
    """(p_t(x), u_t(x)) = (sum_k w_k p_t(x|k), sum_k w_k p_t(x|k) u_t(x|k) / p_t(x)) (FM paper Eqs. 6, 8).

    Target sum_k w_k N(x1s[k], target_std^2) (point masses when 0) under x_t = alpha_t x_1 + sigma_t x_0:
    component k is the Gaussian path N(alpha m_k, alpha^2 tau^2 + sigma^2) whose Thm 3 field equals
    E[alpha' x_1 + sigma' x_0 | x_t = x, k] (x_1, x_0, x_t jointly Gaussian). Any K >= 1; the book uses K = 2.
    Defaults: x1s = (m_1, m_2), weights = (w, 1 - w), alpha and sigma undefined functions of t.
    """
    t, x = _symbol("t", t), _symbol("x", x)
    x1s = sp.symbols("m_1 m_2", real=True) if x1s is None else [_expr("each x1", m) for m in x1s]
    if weights is None:
        w = sp.Symbol("w", positive=True)
        weights = (w, 1 - w)
    weights = [_expr("each weight", w) for w in weights]
    if len(x1s) == 0 or len(x1s) != len(weights):
        raise ValueError(f"x1s and weights must be non-empty and of equal length, got {len(x1s)} and {len(weights)}")
    if any(w.is_negative for w in weights) or sp.simplify(sum(weights) - 1) != 0:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
    alpha = sp.Function("alpha", real=True)(t) if alpha is None else _expr("alpha", alpha)
    sigma = sp.Function("sigma", positive=True)(t) if sigma is None else _expr("sigma", sigma)
    tau = _expr("target_std", target_std)
    if tau.is_negative:
        raise ValueError(f"target_std must be >= 0, got {tau}")
    std = sigma if tau == 0 else sp.sqrt(alpha**2 * tau**2 + sigma**2)
    comps = [
        (gaussian_density(x, alpha * m, std), gaussian_conditional_velocity(alpha * m, std, t, x, False)) for m in x1s
    ]
    p = sum(w * pk for w, (pk, _) in zip(weights, comps))
    return p, sum(w * pk * uk for w, (pk, uk) in zip(weights, comps)) / p


def flux_divergence(p: sp.Expr, w: Sequence[sp.Expr], xs: Sequence[sp.Symbol] = (x, y)) -> sp.Expr:
    """div(p w) = sum_i d(p w_i)/dx_i; zero means adding w to a field leaves the path p_t unchanged (Ch. 4)."""
    p = _expr("p", p)
    if len(w) != len(xs):
        raise ValueError(f"w has {len(w)} components but xs has {len(xs)} coordinates; they must match")
    xs = [_symbol("each entry of xs", xi) for xi in xs]
    return sp.simplify(sum(sp.diff(p * _expr("each component of w", wi), xi) for wi, xi in zip(w, xs)))


__all__ = [
    "continuity_residual",
    "log_density_rate",
    "linear_flow_log_density",
    "two_component_marginal_1d",
    "flux_divergence",
]
