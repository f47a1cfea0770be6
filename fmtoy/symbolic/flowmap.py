"""SymPy derivations of ch. 10 (flow maps, reflow, consistency models) in one dimension, on ch. 6's closed-form
flows (fmtoy.symbolic.shortcut.KnownFlow): the flow map's semigroup, backward equation and push-forward; the
consistency function; reflow of N(0, 1) -> N(m, s^2) (the costs before and after, straight paths after one reflow,
a fixed point after that); consistency distillation's fixed point on a grid; and consistency training's target
against distillation's to second order in the step.

A flow map is phi(x, s, t): the solution at time t of dx/dr = u(x, r) started from x at time s.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import sympy as sp

from .._checks import check_positive_int
from .core import _expr
from .shortcut import KnownFlow, m, r, s_data, t, x

s_time = sp.Symbol("t_0", real=True)  # the start time of a flow map phi(x, t_0, t) ("s" is the target std)
delta = sp.Symbol("Delta", positive=True)  # a grid step
var = sp.Symbol("v", nonnegative=True)  # a conditional variance Var(X_1 - X_0 | X_t = x)
y = sp.Symbol("y", real=True)

FlowMapFn = Callable[[sp.Expr, sp.Expr, sp.Expr], sp.Expr]


def _flow(flow: KnownFlow) -> KnownFlow:
    if not isinstance(flow, KnownFlow):
        raise TypeError(f"flow must be a fmtoy.symbolic.shortcut.KnownFlow, got {type(flow).__name__}")
    return flow


def semigroup_residual(flow: KnownFlow) -> sp.Expr:
    """phi(phi(x, s, r), r, t) - phi(x, s, t): zero for a flow (Prop. flow map, semigroup)."""
    p = _flow(flow).phi
    return p(p(x, s_time, r), r, t) - p(x, s_time, t)


def backward_residual(flow: KnownFlow) -> sp.Expr:
    """d/ds phi(x, s, t) + u(x, s) d/dx phi(x, s, t): zero for a flow (the map is constant along trajectories)."""
    flow = _flow(flow)
    p = flow.phi(x, s_time, t)
    return sp.diff(p, s_time) + flow.u.subs(t, s_time) * sp.diff(p, x)


def consistency_function(flow: KnownFlow) -> Callable[[sp.Expr, sp.Expr], sp.Expr]:
    """f(x, t) = phi(x, t, 1): where the trajectory through x at time t ends."""
    p = _flow(flow).phi
    return lambda xx, tt: p(xx, tt, sp.Integer(1))


def consistency_residual(f: Callable[[sp.Expr, sp.Expr], sp.Expr], flow: KnownFlow) -> sp.Expr:
    """f(phi(x, t, r), r) - f(x, t): zero iff f takes one value along every trajectory (the consistency condition)."""
    return f(_flow(flow).phi(x, t, r), r) - f(x, t)


def gaussian_pushforward(flow: KnownFlow, mean_s: sp.Expr, std_s: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(mean, variance) at time t of phi(X, s, t), X ~ N(mean_s, std_s^2), for a flow affine in x (a Gaussian flow)."""
    p = sp.expand(_flow(flow).phi(x, s_time, t))
    slope = sp.diff(p, x)
    if sp.simplify(sp.diff(slope, x)) != 0:
        raise ValueError("gaussian_pushforward needs a flow map affine in x (e.g. gaussian_marginal_flow())")
    intercept = sp.simplify(p - slope * x)
    return sp.simplify(slope * _expr("mean_s", mean_s) + intercept), sp.simplify(slope**2 * _expr("std_s", std_s) ** 2)


class GaussianReflow(NamedTuple):
    """Reflow of the CondOT flow from N(0, 1) to N(m, s^2) (ch. 10): transport costs E (X_1 - X_0)^2 of the
    independent and of the rectified coupling, the rectified field and its flow."""

    cost_independent: sp.Expr  # E (X_1 - X_0)^2 with X_0, X_1 independent
    cost_rectified: sp.Expr  # E (phi_{0->1}(X_0) - X_0)^2
    rectified_map: sp.Expr  # phi_{0->1}(x) of the marginal flow: the coupling x_0 -> x_1
    rectified_flow: KnownFlow  # the flow of v(x, t) = E[X_1 - X_0 | X_t = x] for the rectified coupling


def gaussian_reflow(flow: KnownFlow, mean: sp.Expr = m, std: sp.Expr = s_data) -> GaussianReflow:
    """Reflow of a flow from N(0, 1) to N(mean, std^2) whose end map x -> phi(x, 0, 1) is affine, a x + b (the
    Gaussian marginal flow: a = std, b = mean): X_t = (1 - t) X_0 + t (a X_0 + b) is a deterministic function of
    X_0, so E[X_1 - X_0 | X_t = x] = (a - 1) X_0 + b at X_0 = (x - t b) / (1 - t + t a)."""
    flow = _flow(flow)
    mean, std = _expr("mean", mean), _expr("std", std)
    end = sp.expand(flow.phi(x, sp.Integer(0), sp.Integer(1)))
    a = sp.simplify(sp.diff(end, x))
    b = sp.simplify(end - a * x)
    if sp.simplify(sp.diff(a, x)) != 0:
        raise ValueError("gaussian_reflow needs an end map affine in x")
    # E over X_0 ~ N(0, 1), X_1 ~ N(mean, std^2): E X_0 = 0, E X_0^2 = 1
    cost_ind = sp.expand(mean**2 + std**2 + 1)
    cost_rect = sp.expand((a - 1) ** 2 + b**2)
    scale = 1 - t + t * a

    def phi(xx, tt, rr):  # straight lines: X_r = (1 - r) x_0 + r (a x_0 + b), x_0 recovered from (x, t)
        x0 = (xx - tt * b) / (1 - tt + tt * a)
        return (1 - rr) * x0 + rr * (a * x0 + b)

    v = (a - 1) * (x - t * b) / scale + b
    return GaussianReflow(cost_ind, cost_rect, end, KnownFlow(sp.simplify(v), phi))


def acceleration(flow: KnownFlow) -> sp.Expr:
    """d/dt u + u du/dx: the acceleration of the trajectories (zero iff they are straight lines at constant speed)."""
    u = _flow(flow).u
    return sp.diff(u, t) + u * sp.diff(u, x)


def distillation_fixed_point(step: Callable[[sp.Expr, int], sp.Expr], intervals: int) -> list[sp.Expr]:
    """The f(x, t_n), n = 0 ... N, that make consistency distillation's loss zero on the grid t_n = n / N:
    f(x, t_N) = x and f(x, t_n) = f(step(x, n), t_{n+1}), step(x, n) the solver's move from t_n to t_{n+1}."""
    n_int = check_positive_int("intervals", intervals)
    if not callable(step):
        raise TypeError(f"step must be a callable step(x, n) -> SymPy expression, got {type(step).__name__}")
    out = [x]  # f(x, t_N)
    for n in range(n_int - 1, -1, -1):
        out.append(sp.simplify(out[-1].subs(x, step(x, n), simultaneous=True)))
    return out[::-1]


class TrainingBias(NamedTuple):
    """Consistency training's target against distillation's (one Euler step), for a generic smooth f(x, t)."""

    difference: sp.Expr  # E[f(x + D V, t + D)] - f(x + D u, t + D) up to O(D^3), V = X_1 - X_0 given X_t = x
    second_order: sp.Expr  # D^2 / 2 * v * f_xx(x, t)


def training_bias(order: int = 3) -> TrainingBias:
    """Expand E[f(x + Delta V, t + Delta)] - f(x + Delta u, t + Delta) in Delta, E V = u, E V^2 = u^2 + v, to
    O(Delta^order): the first-order terms cancel (E[V | X_t] = u, FM Theorem 1), the second is Delta^2 v f_xx / 2."""
    order = check_positive_int("order", order)
    f = sp.Function("f")
    u, V = sp.Symbol("u", real=True), sp.Symbol("V", real=True)
    ct = sp.series(f(x + delta * V, t + delta), delta, 0, order).removeO()
    cd = sp.series(f(x + delta * u, t + delta), delta, 0, order).removeO()
    ct = sp.expand(ct.doit())
    moments = sp.Poly(ct, V)
    mean_ct = sum(c * (u ** k[0] + (var if k[0] == 2 else 0)) for k, c in moments.terms() if k[0] <= 2)
    if any(k[0] > 2 for k, _ in moments.terms()):
        raise ValueError("order must be at most 3 (only the first two moments of V are given)")
    diff = sp.simplify(sp.expand(mean_ct - cd.doit()))
    return TrainingBias(diff, delta**2 / 2 * var * sp.diff(f(x, t), x, 2))


__all__ = [
    "s_time",
    "delta",
    "var",
    "semigroup_residual",
    "backward_residual",
    "consistency_function",
    "consistency_residual",
    "gaussian_pushforward",
    "GaussianReflow",
    "gaussian_reflow",
    "acceleration",
    "distillation_fixed_point",
    "TrainingBias",
    "training_bias",
]
