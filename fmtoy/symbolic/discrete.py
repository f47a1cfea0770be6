"""SymPy for chapter 11: discrete flow matching on T tokens with the mixture path p_t(a | c) = (1 - kappa) p_0(a)
+ kappa delta(a, c) (uniform, mask or generic source), its conditional rates kappa' / (1 - kappa) (delta(y, c) -
delta(y, a)), which solve the Kolmogorov forward equation (the slip without 1 / (1 - kappa) does not), and the
discrete marginalization theorem on two coordinates: posterior-weighted rates generate the marginal path.

Convention: t = 0 noise, t = 1 data; the data tokens are the first D (D = T, or D = T - 1 with the mask token T - 1);
a rate matrix R has rows = from-state a, columns = to-state y, and rows summing to 0."""

from __future__ import annotations

from typing import NamedTuple

import sympy as sp

from .._checks import check_choice, check_positive_int
from .core import is_zero, t

SOURCES = ("uniform", "mask", "generic")
MARGINAL_RATES = ("posterior", "data marginal")  # the right weight, and the slip that ignores the current state
kappa = sp.Function("kappa")(t)  # a generic schedule: kappa_0 = 0, kappa_1 = 1, increasing
dkappa = sp.diff(kappa, t)


def _delta(i: int, j: int) -> int:
    """The Kronecker delta."""
    return int(i == j)


def _rate_matrix(tokens: int, c: int, factor: sp.Expr) -> sp.Matrix:
    """R[a, y] = factor (delta(y, c) - delta(y, a)): jump to c at rate `factor`, rows summing to 0."""
    return sp.Matrix(tokens, tokens, lambda a, y: factor * (_delta(y, c) - _delta(y, a)))


def _tokens(tokens) -> int:
    """Return `tokens` if it is an integer >= 2, or raise ValueError."""
    check_positive_int("tokens", tokens)
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2 (a mask source needs one data token besides the mask), got {tokens!r}")
    return tokens


def source_distribution(tokens: int, source: str = "uniform") -> list[sp.Expr]:
    """p_0 on T tokens: 1/T each ("uniform"), all mass on the mask token T - 1 ("mask"), or symbols p_0, ...,
    p_{T-2} with the last 1 - their sum ("generic")."""
    tokens, source = _tokens(tokens), check_choice("source", source, SOURCES)
    if source == "uniform":
        return [sp.Rational(1, tokens)] * tokens
    if source == "mask":
        return [sp.Integer(0)] * (tokens - 1) + [sp.Integer(1)]
    ps = list(sp.symbols(f"p_0:{tokens - 1}", positive=True))
    return [*ps, 1 - sum(ps)]


class MixturePath(NamedTuple):
    """The mixture path on T tokens: p[a, c] = p_t(a | c) (T x D), rates[c] = R_c (T x T, R_c[a, y] = u_t(y, a | c)),
    the source p0 (T entries), dkappa_factor = kappa' / (1 - kappa), and the source's name."""

    p: sp.Matrix
    rates: list[sp.Matrix]
    p0: list[sp.Expr]
    dkappa_factor: sp.Expr
    source: str


def mixture_path(tokens: int, source: str = "uniform") -> MixturePath:
    """p_t(a | c) = (1 - kappa) p_0(a) + kappa delta(a, c) (eq-ch11-mixture) and its conditional rates
    u_t(y, a | c) = kappa' / (1 - kappa) (delta(y, c) - delta(y, a)) (eq-ch11-cond-rates)."""
    p0 = source_distribution(tokens, source)
    n_data = tokens - 1 if source == "mask" else tokens
    p = sp.Matrix(tokens, n_data, lambda a, c: (1 - kappa) * p0[a] + kappa * _delta(a, c))
    factor = dkappa / (1 - kappa)
    rates = [_rate_matrix(tokens, c, factor) for c in range(n_data)]
    return MixturePath(p, rates, p0, factor, source)


def wrong_rates(path: MixturePath) -> list[sp.Matrix]:
    """The slip kappa' (delta(y, c) - delta(y, a)), without 1 / (1 - kappa): right at t = 0 only."""
    path = _path(path)
    tokens, n_data = path.p.shape
    return [_rate_matrix(tokens, c, dkappa) for c in range(n_data)]


def _path(path) -> MixturePath:
    """Return `path` if it is a MixturePath, or raise TypeError."""
    if not isinstance(path, MixturePath):
        raise TypeError(f"path must be a MixturePath (from mixture_path), got {type(path).__name__}")
    return path


def _rates(path: MixturePath, rates) -> list[sp.Matrix]:
    """path.rates if `rates` is None, else `rates` after checking it is D matrices of shape T x T."""
    if rates is None:
        return path.rates
    tokens, n_data = path.p.shape
    ok = isinstance(rates, (list, tuple)) and len(rates) == n_data
    if not ok or not all(isinstance(r, sp.MatrixBase) and r.shape == (tokens, tokens) for r in rates):
        raise ValueError(f"rates must be a list of {n_data} sympy matrices of shape ({tokens}, {tokens})")
    return list(rates)


def kolmogorov_residuals(path: MixturePath, rates: list[sp.Matrix] | None = None) -> sp.Matrix:
    """d/dt p_t(y | c) - sum_a p_t(a | c) R_c[a, y] (eq-ch11-kolmogorov), T x D and simplified: zero for the
    conditional rates (the default), for any source p_0 that sums to 1."""
    path = _path(path)
    rates = _rates(path, rates)
    tokens, n_data = path.p.shape
    out = sp.zeros(tokens, n_data)
    for c in range(n_data):
        flow = path.p[:, c].T * rates[c]
        for y in range(tokens):
            out[y, c] = sp.factor(sp.cancel(sp.diff(path.p[y, c], t) - flow[0, y]))
    return out


def rate_checks(path: MixturePath, rates: list[sp.Matrix] | None = None) -> dict[str, bool]:
    """Whether each R_c is a rate matrix: rows sum to 0, and every off-diagonal entry is >= 0 whenever 0 <= kappa < 1
    and kappa' >= 0 (checked by SymPy's sign assumptions after kappa = k / (1 + k), kappa' = d with k, d >= 0)."""
    path = _path(path)
    rates = _rates(path, rates)
    k, d = sp.Dummy("k", nonnegative=True), sp.Dummy("d", nonnegative=True)
    signs = [(dkappa, d), (kappa, k / (1 + k))]  # the derivative first: it contains kappa
    rows = all(sp.cancel(sum(r[a, :])) == 0 for r in rates for a in range(r.rows))
    off = all(
        sp.factor(sp.cancel(r[a, y].subs(signs))).is_nonnegative is True
        for r in rates
        for a in range(r.rows)
        for y in range(r.cols)
        if a != y
    )
    return {"rows sum to 0": rows, "off-diagonal >= 0": off}


def residual_is_zero(residual: sp.Matrix, n: int = 3) -> bool:
    """True if every entry of `residual` is identically 0 by is_zero(..., method="points")."""
    if not isinstance(residual, sp.MatrixBase):
        raise TypeError(f"residual must be a sympy Matrix, got {type(residual).__name__}")
    return all(is_zero(e, method="points", n=n) for e in residual)


class MarginalKolmogorov(NamedTuple):
    """Two coordinates over T tokens: the marginal p[a, b] = p_t(a, b) (T x T), the target q (D x D symbols summing to
    1), the joint generator (T^2 x T^2, state (a, b) at index a T + b) and residual = d/dt p_t - flux (T x T)."""

    p: sp.Matrix
    q: sp.Matrix
    generator: sp.Matrix
    residual: sp.Matrix


def marginal_kolmogorov_residual(
    values: int = 2, source: str = "uniform", rates: str = "posterior"
) -> MarginalKolmogorov:
    """d/dt p_t(c', d') - sum_x p_t(x) Q(x -> (c', d')) on two coordinates with `values` data tokens each, a generic
    q(c, d) and the marginal rates u^i_t(y, x) = kappa' / (1 - kappa) (post_i(y | x) - delta(y, x^i))
    (eq-ch11-marginal-rates), one coordinate moving at a time: identically zero for rates="posterior", not for
    "data marginal" (post_i replaced by the i-th marginal of q). Not simplified: test it with residual_is_zero."""
    check_positive_int("values", values)
    source, rates = check_choice("source", source, SOURCES), check_choice("rates", rates, MARGINAL_RATES)
    tokens = values + (source == "mask")
    if tokens < 2:
        raise ValueError(f"values must be >= 2 for a {source} source (one token is no path), got {values!r}")
    path = mixture_path(tokens, source)
    cond, f = path.p, path.dkappa_factor
    qs = [sp.Symbol(f"q_{{{c}{d}}}", positive=True) for c in range(values) for d in range(values)]
    q = sp.Matrix(values, values, [*qs[:-1], 1 - sum(qs[:-1])])
    pair = [(c, d) for c in range(values) for d in range(values)]
    p = sp.Matrix(tokens, tokens, lambda a, b: sum(q[c, d] * cond[a, c] * cond[b, d] for c, d in pair))

    def post(i: int, y: int, a: int, b: int) -> sp.Expr:
        """post_i(y | a, b), 0 at the mask token; or the data marginal q_i(y) for the slip."""
        if y >= values:
            return sp.Integer(0)
        if rates == "data marginal":
            return sum(q[y, e] if i == 0 else q[e, y] for e in range(values))
        if i == 0:
            return sum(q[y, d] * cond[a, y] * cond[b, d] for d in range(values)) / p[a, b]
        return sum(q[c, y] * cond[a, c] * cond[b, y] for c in range(values)) / p[a, b]

    def u(i: int, y: int, a: int, b: int) -> sp.Expr:
        """u^i_t(y, (a, b))."""
        return f * (post(i, y, a, b) - _delta(y, (a, b)[i]))

    generator = sp.zeros(tokens**2, tokens**2)
    for a in range(tokens):
        for b in range(tokens):
            frm = a * tokens + b
            for y in range(tokens):
                if y != a:
                    generator[frm, y * tokens + b] = u(0, y, a, b)
                if y != b:
                    generator[frm, a * tokens + y] = u(1, y, a, b)
            generator[frm, frm] = u(0, a, a, b) + u(1, b, a, b)
    flux = p.reshape(1, tokens**2) * generator
    residual = sp.Matrix(tokens, tokens, lambda c, d: sp.diff(p[c, d], t) - flux[0, c * tokens + d])
    return MarginalKolmogorov(p, q, generator, residual)


def check_discrete() -> dict[str, bool]:
    """The conditional identities for uniform, mask and generic sources on T = 3 (boundary values, Kolmogorov, rate
    matrix properties) and the two-coordinate marginalization theorem for uniform and mask sources, values = 2."""
    ok = {}
    for source in SOURCES:
        path, name = mixture_path(3, source), f"{source}, T = 3"
        at0, at1 = path.p.subs(kappa, 0), path.p.subs(kappa, 1)
        ok[f"p_0 = source, p_1 = delta ({name})"] = all(
            sp.simplify(at0[a, c] - path.p0[a]) == 0 and at1[a, c] == _delta(a, c)
            for a in range(path.p.rows)
            for c in range(path.p.cols)
        )
        ok[f"Kolmogorov forward ({name})"] = kolmogorov_residuals(path).is_zero_matrix is True
        for k, v in rate_checks(path).items():
            ok[f"{k} ({name})"] = v
    for source in ("uniform", "mask"):
        m = marginal_kolmogorov_residual(2, source)
        ok[f"joint generator rows sum to 0 ({source}, values = 2)"] = residual_is_zero(
            m.generator * sp.ones(m.generator.cols, 1)
        )
        ok[f"marginal Kolmogorov forward ({source}, values = 2)"] = residual_is_zero(m.residual)
    return ok


__all__ = [
    "SOURCES",
    "MARGINAL_RATES",
    "kappa",
    "dkappa",
    "source_distribution",
    "MixturePath",
    "mixture_path",
    "wrong_rates",
    "kolmogorov_residuals",
    "rate_checks",
    "residual_is_zero",
    "MarginalKolmogorov",
    "marginal_kolmogorov_residual",
    "check_discrete",
]
