"""SymPy tools the symbolic modules share: the symbols t, x, y, x_1, s and the path parameters, argument checks,
the 1D Gaussian density, and `is_zero`, a fast identity check at random high-precision points.

Simplification strategy (kept fast): fields and residuals go through `sp.simplify` once; identities that are too
heavy for it are checked by `is_zero(expr, method="points")`, which substitutes random rationals for every symbol,
function value and derivative and evaluates with 60 significant digits (mpmath; tolerance 1e-30 relative).
"""

from __future__ import annotations

import random

import sympy as sp

from .._checks import check_choice, check_positive_int

t, x, y, x1, s = sp.symbols("t x y x_1 s", real=True)  # time, space, data point x_1, diffusion time s = 1 - t
sigma_min, sigma_max, beta_min, beta_max = sp.symbols("sigma_min sigma_max beta_min beta_max", positive=True)
PATH_PARAMS = {"ot": (sigma_min,), "ve": (sigma_min, sigma_max), "vp": (beta_min, beta_max)}


def _expr(name: str, value) -> sp.Expr:
    """Return `value` as a SymPy expression, or raise TypeError."""
    try:
        e = sp.sympify(value, strict=True)
    except (sp.SympifyError, TypeError) as err:
        raise TypeError(f"{name} must be a SymPy expression (or a number), got {type(value).__name__}") from err
    if not isinstance(e, sp.Expr):
        raise TypeError(f"{name} must be a SymPy expression, got {type(e).__name__}")
    return e


def _symbol(name: str, value) -> sp.Symbol:
    """Return `value` if it is a SymPy Symbol, or raise TypeError."""
    if not isinstance(value, sp.Symbol):
        raise TypeError(f"{name} must be a sympy.Symbol, got {value!r} ({type(value).__name__})")
    return value


def gaussian_density(x: sp.Expr, mean: sp.Expr, std: sp.Expr) -> sp.Expr:
    """N(x; mean, std^2) in 1D, the conditional path p_t(x|x_1) of FM paper Eq. (10)."""
    x, mean, std = _expr("x", x), _expr("mean", mean), _expr("std", std)
    return sp.exp(-((x - mean) ** 2) / (2 * std**2)) / (sp.sqrt(2 * sp.pi) * std)


def _tidy(e: sp.Expr) -> sp.Expr:
    """One `sp.simplify`; log-powers such as log(r**(x - x_1)) are expanded back to (x - x_1) log r."""
    e = sp.simplify(e)
    return sp.factor(sp.expand_log(e, force=True)) if e.has(sp.log) else e


def values_at_random_points(expr: sp.Expr, n: int = 3, seed: int = 0, digits: int = 60) -> list[float]:
    """|expr| / max |top-level term| at n random points: every symbol, function value and derivative becomes an
    independent random rational in (0, 1); evaluated with mpmath at `digits` significant digits."""
    import mpmath

    expr = _expr("expr", expr)
    check_positive_int("n", n)
    check_positive_int("digits", digits)
    jets = expr.atoms(sp.Subs) | expr.atoms(sp.Derivative) | expr.atoms(sp.core.function.AppliedUndef)
    e = expr.xreplace({j: sp.Dummy() for j in jets})  # top-down: a derivative is replaced before its function
    args = sorted(e.free_symbols, key=sp.default_sort_key)
    f = sp.lambdify(args, list(sp.Add.make_args(e)), modules="mpmath")
    rng, out = random.Random(seed), []
    with mpmath.workdps(digits):
        for _ in range(n):
            terms = f(*[mpmath.mpf(rng.randint(1, 999)) / 1000 for _ in args])
            scale = max(abs(v) for v in terms)
            out.append(float(abs(mpmath.fsum(terms)) / scale) if scale else 0.0)
    return out


def is_zero(expr: sp.Expr, method: str = "simplify", n: int = 3, seed: int = 0, tol: float = 1e-30) -> bool:
    """True if `expr` is identically 0: by `sp.simplify` ("simplify"), or at n random points ("points") where the
    60-digit value is below `tol` relative to its largest term (a wrong identity gives O(1), a true one ~1e-58)."""
    check_choice("method", method, ("simplify", "points"))
    expr = _expr("expr", expr)
    if method == "simplify":
        return sp.simplify(expr) == 0
    return all(v <= tol for v in values_at_random_points(expr, n, seed))


__all__ = [
    "t",
    "x",
    "y",
    "x1",
    "s",
    "sigma_min",
    "sigma_max",
    "beta_min",
    "beta_max",
    "PATH_PARAMS",
    "gaussian_density",
    "values_at_random_points",
    "is_zero",
]
