"""SymPy derivations of ch. 6 (shortcut models), in one dimension: the exact shortcut of a flow satisfies the
self-consistency identity and Euler's velocity does not; the shortcut that self-consistency builds on an Euler base
level; the small-d expansion (half the acceleration); and the MeanFlow identity as the limit of a split step.

A shortcut is a Python callable s(x, t, d) -> sympy.Expr; a flow is phi(x, t, r) -> Expr, the solution at time r
of dx/dt = u(x, t) started from x at time t.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import sympy as sp

from .._checks import check_positive_int
from .core import _expr

t, x, r, m = sp.symbols("t x r m", real=True)
d, h, D, eps = sp.symbols("d h D epsilon", positive=True)
lam = sp.Symbol("lambda", real=True)
s_data = sp.Symbol("s", positive=True)  # std of the 1D Gaussian target N(m, s^2)

ShortcutFn = Callable[[sp.Expr, sp.Expr, sp.Expr], sp.Expr]
FlowFn = Callable[[sp.Expr, sp.Expr, sp.Expr], sp.Expr]


class KnownFlow(NamedTuple):
    """A velocity field u(x, t) with its flow phi(x, t, r) in closed form."""

    u: sp.Expr  # in the symbols x, t
    phi: Callable[[sp.Expr, sp.Expr, sp.Expr], sp.Expr]  # phi(x, t, r)


def _callable(name: str, f) -> None:
    if not callable(f):
        raise TypeError(f"{name} must be a callable of (x, t, d) returning a SymPy expression, got {type(f).__name__}")


def linear_flow(rate: sp.Expr = lam) -> KnownFlow:
    """u(x, t) = lambda x, phi(x, t, r) = x exp(lambda (r - t)): Euler is not exact for it (lambda != 0)."""
    rate = _expr("rate", rate)
    return KnownFlow(rate * x, lambda xx, tt, rr: xx * sp.exp(rate * (rr - tt)))


def gaussian_marginal_flow(mean: sp.Expr = m, std: sp.Expr = s_data) -> KnownFlow:
    """CondOT marginal field from N(0, 1) to N(mean, std^2): sigma_t = sqrt((1-t)^2 + t^2 std^2),
    phi(x, t, r) = r mean + sigma_r / sigma_t (x - t mean), u_t(x) = mean + sigma_t'/sigma_t (x - t mean)."""
    mean, std = _expr("mean", mean), _expr("std", std)

    def sigma(tt: sp.Expr) -> sp.Expr:
        return sp.sqrt((1 - tt) ** 2 + tt**2 * std**2)

    u = mean + sp.diff(sigma(t), t) / sigma(t) * (x - t * mean)
    return KnownFlow(u, lambda xx, tt, rr: rr * mean + sigma(rr) / sigma(tt) * (xx - tt * mean))


def flow_residual(flow: KnownFlow) -> sp.Expr:
    """d/dr phi(x, t, r) - u(phi(x, t, r), r): zero iff phi is the flow of u."""
    p = flow.phi(x, t, r)
    return sp.diff(p, r) - flow.u.subs({x: p, t: r}, simultaneous=True)


def exact_shortcut(flow: KnownFlow) -> ShortcutFn:
    """s*(x, t, d) = (phi(x, t, t + d) - x) / d: the average velocity over [t, t + d] along the trajectory."""
    return lambda xx, tt, dd: (flow.phi(xx, tt, tt + dd) - xx) / dd


def velocity_shortcut(flow: KnownFlow) -> ShortcutFn:
    """s(x, t, d) = u(x, t) for every d: what a flow-matching network offers, i.e. Euler steps."""
    return lambda xx, tt, dd: flow.u.subs({x: xx, t: tt}, simultaneous=True)


def self_consistency_residual(s: ShortcutFn, xx: sp.Expr = x, tt: sp.Expr = t, dd: sp.Expr = d) -> sp.Expr:
    """s(x, t, 2d) - s(x, t, d)/2 - s(x', t + d, d)/2, x' = x + d s(x, t, d): zero iff Eq. (SC) holds."""
    _callable("s", s)
    s1 = s(xx, tt, dd)
    return s(xx, tt, 2 * dd) - s1 / 2 - s(xx + dd * s1, tt + dd, dd) / 2


def euler_level_shortcut(u: sp.Expr, level: int, base: sp.Expr = h) -> sp.Expr:
    """The shortcut at d = 2^level h that Eq. (SC) builds from the base s(x, t, h) = u(x, t) (the flow-matching
    branch): level 0 is u, each level averages two steps of the level below (= the mean velocity of 2^level Euler
    steps of size h)."""
    u, base = _expr("u", u), _expr("base", base)
    level = check_positive_int("level + 1", level + 1) - 1
    s_expr = u  # s_0(x, t)
    for j in range(level):
        step = 2**j * base
        moved = s_expr.subs({x: x + step * s_expr, t: t + step}, simultaneous=True)
        s_expr = sp.expand((s_expr + moved) / 2)
    return s_expr


def small_d_coefficient() -> tuple[sp.Expr, sp.Expr]:
    """Insert s = u + d a(x, t) + d^2 b(x, t) into Eq. (SC), solve its O(d) term for a; returns (a, (u_t + u u_x)/2)."""
    u, a, b = (sp.Function(n)(x, t) for n in ("u", "a", "b"))

    def s(xx, tt, dd):
        rep = {x: xx, t: tt}
        return (
            u.subs(rep, simultaneous=True)
            + dd * a.subs(rep, simultaneous=True)
            + dd**2 * b.subs(rep, simultaneous=True)
        )

    res = self_consistency_residual(s)
    first = sp.diff(res, d).subs(d, 0).doit()  # O(d) coefficient of the residual
    solved = sp.solve(sp.Eq(first, 0), a)[0]
    return sp.simplify(solved), (sp.diff(u, t) + u * sp.diff(u, x)) / 2


def split_step_residual(s: ShortcutFn, first: sp.Expr = eps, total: sp.Expr = D) -> sp.Expr:
    """Self-consistency for any split D = e + (D - e) of a step:
    D s(x, t, D) - e s(x, t, e) - (D - e) s(x', t + e, D - e), x' = x + e s(x, t, e); the paper uses e = D/2."""
    _callable("s", s)
    s1 = s(x, t, first)
    return total * s(x, t, total) - first * s1 - (total - first) * s(x + first * s1, t + first, total - first)


class MeanFlowLimit(NamedTuple):
    """The first-order term in e of split_step_residual for a generic s with s(x, t, 0) = u, and MeanFlow's identity."""

    derived: sp.Expr  # d/de of the residual at e = 0
    meanflow: sp.Expr  # s - u - D (u s_x + s_t - s_d): zero is u = v - (t - r) du/dt with r = t + D


def meanflow_limit() -> MeanFlowLimit:
    """Differentiate the split-step identity at e = 0 (generic s(x, t, d), s(x, t, 0) = u(x, t))."""
    u, s = sp.Function("u")(x, t), sp.Function("s")
    res = split_step_residual(lambda xx, tt, dd: s(xx, tt, dd))
    first = sp.diff(res, eps).subs(eps, 0).doit().subs(s(x, t, 0), u)
    S = s(x, t, D)
    total = sp.diff(S, x) * u + sp.diff(S, t) - sp.diff(S, D)  # d/dt s(x_t, t, r - t) at fixed r = t + D
    return MeanFlowLimit(sp.expand(first), sp.expand(S - u - D * total))


def meanflow_residual(s: ShortcutFn, u: sp.Expr) -> sp.Expr:
    """s - u - d (u s_x + s_t - s_d) for a concrete shortcut s(x, t, d) and field u(x, t): MeanFlow's identity."""
    _callable("s", s)
    S = s(x, t, d)
    return S - _expr("u", u) - d * (u * sp.diff(S, x) + sp.diff(S, t) - sp.diff(S, d))


__all__ = [
    "t",
    "x",
    "r",
    "m",
    "d",
    "h",
    "D",
    "eps",
    "lam",
    "s_data",
    "KnownFlow",
    "linear_flow",
    "gaussian_marginal_flow",
    "flow_residual",
    "exact_shortcut",
    "velocity_shortcut",
    "self_consistency_residual",
    "euler_level_shortcut",
    "small_d_coefficient",
    "split_step_residual",
    "MeanFlowLimit",
    "meanflow_limit",
    "meanflow_residual",
]
