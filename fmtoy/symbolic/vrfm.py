"""SymPy derivations of chapter 7 (variational rectified flow matching): the constant-velocity analysis, MSE as a
Gaussian NLL, the Gaussian KL, the ELBO identity on a linear-Gaussian model, the KL weight as a decoder variance,
the joint density of (x_t, v), and the straight-line ODE that one fixed latent can follow exactly (Euler included).
All in one coordinate: the d-dimensional statements are sums of d copies.
"""

from __future__ import annotations

from typing import NamedTuple

import sympy as sp

from .continuity import continuity_residual
from .core import gaussian_density

t, x, v, z = sp.symbols("t x v z", real=True)
x0, x1, xi0, theta = sp.symbols("x_0 x_1 xi_0 theta", real=True)  # source/target means, start point, velocity
mu, s = sp.Symbol("mu", real=True), sp.Symbol("s", positive=True)  # q = N(mu, s^2)
lam, sigma = sp.Symbol("lambda", positive=True), sp.Symbol("sigma", positive=True)


def _log_gauss(y: sp.Expr, mean: sp.Expr, std: sp.Expr) -> sp.Expr:
    """log N(y; mean, std^2), expanded."""
    return sp.expand_log(sp.log(gaussian_density(y, mean, std)), force=True)


# --- the constant-velocity analysis ------------------------------------------------------------------------------
class ConstantVelocity(NamedTuple):
    """log p_1(xi_0 + theta) - log p_0(xi_0) for N(x_0, 1) -> N(x_1, 1) under u = theta, its factorisation, the
    theta that makes it vanish for every xi_0, and the continuity residual of p_t = N(x_0 + t theta, 1) under u."""

    residual: sp.Expr
    factored: sp.Expr
    solutions: list
    continuity: sp.Expr


def constant_velocity_analysis() -> ConstantVelocity:
    """A constant field theta has div = 0, so log p_t is constant along x_t = xi_0 + t theta (Eq. CoV); p_0 = N(x_0, 1)
    and p_1 = N(x_1, 1) then force 0 = (x_1 - x_0 - theta)(2 xi_0 - x_0 - x_1 + theta) / 2 for all xi_0."""
    residual = sp.expand(_log_gauss(xi0 + theta, x1, 1) - _log_gauss(xi0, x0, 1))
    factored = sp.factor(residual)
    coeffs = sp.Poly(residual, xi0).all_coeffs()  # every power of xi_0 must vanish
    solutions = sp.solve(coeffs, theta, dict=True)
    cont = continuity_residual(gaussian_density(x, x0 + t * theta, 1), theta)
    return ConstantVelocity(residual, factored, solutions, cont)


# --- MSE = Gaussian NLL; its minimiser is the mean ----------------------------------------------------------------
def mse_as_nll() -> tuple[sp.Expr, sp.Expr]:
    """(-log N(v; c, 1) - [(v - c)^2 / 2 + log(2 pi) / 2],  argmin_c sum_k w_k (v_k - c)^2 - sum_k w_k v_k) for
    three weighted velocities: both 0, i.e. MSE is a unit-variance Gaussian NLL and its optimum is the mean."""
    c = sp.Symbol("c", real=True)
    nll_gap = sp.simplify(-_log_gauss(v, c, 1) - ((v - c) ** 2 / 2 + sp.log(2 * sp.pi) / 2))
    w = sp.symbols("w_1:4", positive=True)
    vs = sp.symbols("v_1:4", real=True)
    risk = sum(wk * (vk - c) ** 2 for wk, vk in zip(w, vs))
    (c_star,) = sp.solve(sp.diff(risk, c), c)
    return nll_gap, sp.simplify(c_star - sum(wk * vk for wk, vk in zip(w, vs)) / sum(w))


# --- the joint density of (x_t, v) -------------------------------------------------------------------------------
def pair_jacobian() -> sp.Expr:
    """det d(x_0, x_1)/d(x_t, v) for x_0 = x_t - t v, x_1 = x_t + (1 - t) v: 1, so p(x_t, v) = p_0(x_0) q(x_1)."""
    xt = sp.Symbol("x_t", real=True)
    m = sp.Matrix([xt - t * v, xt + (1 - t) * v]).jacobian([xt, v])
    return sp.simplify(m.det())


# --- the Gaussian KL -------------------------------------------------------------------------------------------------
def gaussian_kl_1d() -> tuple[sp.Expr, sp.Expr]:
    """(KL(N(mu, s^2) || N(0, 1)) by integrating q log(q / p) over z, the closed form (s^2 + mu^2 - 1 - log s^2)/2)."""
    q = gaussian_density(z, mu, s)
    log_ratio = sp.expand(_log_gauss(z, mu, s) - _log_gauss(z, 0, 1))
    kl = sp.simplify(sp.integrate(q * log_ratio, (z, -sp.oo, sp.oo)))
    return kl, (s**2 + mu**2 - 1 - sp.log(s**2)) / 2


# --- the ELBO on a linear-Gaussian model ----------------------------------------------------------------------------
class LinearGaussianELBO(NamedTuple):
    """Model p(z) = N(0, 1), p(v|z) = N(a z + b, sigma^2); q(z) = N(mu, s^2). All closed forms."""

    log_marginal: sp.Expr  # log p(v) = log N(v; b, a^2 + sigma^2)
    elbo: sp.Expr  # E_q log p(v|z) - KL(q || p(z))
    posterior_mean: sp.Expr  # p(z|v) = N(m*, s*^2)
    posterior_var: sp.Expr
    kl_to_posterior: sp.Expr  # KL(q || p(z|v))


def linear_gaussian_elbo() -> LinearGaussianELBO:
    """The ELBO identity log p(v) = ELBO + KL(q || p(z|v)) in closed form (E_q z = mu, E_q z^2 = mu^2 + s^2)."""
    a, b = sp.symbols("a b", real=True)
    log_marginal = _log_gauss(v, b, sp.sqrt(a**2 + sigma**2))
    # E_q log N(v; a z + b, sigma^2): the square is quadratic in z, so only E z and E z^2 enter
    rec = -((v - b - a * mu) ** 2 + a**2 * s**2) / (2 * sigma**2) - sp.log(2 * sp.pi * sigma**2) / 2
    kl_prior = (s**2 + mu**2 - 1 - sp.log(s**2)) / 2
    post_var = sigma**2 / (a**2 + sigma**2)
    post_mean = a * (v - b) / (a**2 + sigma**2)
    kl_post = (sp.log(post_var / s**2) + (s**2 + (mu - post_mean) ** 2) / post_var - 1) / 2
    return LinearGaussianELBO(log_marginal, rec - kl_prior, post_mean, post_var, kl_post)


# --- the KL weight is a decoder variance -----------------------------------------------------------------------------
def kl_weight_identity() -> sp.Expr:
    """lambda (-ELBO) - [(v - m)^2 + lambda KL] - (lambda/2) log(pi lambda) for sigma^2 = lambda / 2: zero, so
    MSE + lambda KL is lambda times the negative ELBO of N(v; m, lambda/2) plus a constant (per coordinate)."""
    m, kl = sp.symbols("m KL", real=True)
    neg_elbo = -_log_gauss(v, m, sp.sqrt(lam / 2)) + kl
    return sp.simplify(
        sp.expand_log(lam * neg_elbo - ((v - m) ** 2 + lam * kl) - lam / 2 * sp.log(sp.pi * lam), force=True)
    )


# --- one fixed latent, one straight line ----------------------------------------------------------------------------
def straight_line_ode() -> tuple[sp.Expr, sp.Expr]:
    """(ODE residual of x_t = (1 - t) x_0 + t h under dx/dt = (h - x)/(1 - t), one Euler step's error from a point on
    that line at t_k to t_k + dt): both 0, so the field of a latent that encodes x_1 = h is followed exactly."""
    h, tk, dt = sp.symbols("h t_k Delta", real=True)
    line = (1 - t) * x0 + t * h
    ode = sp.simplify(sp.diff(line, t) - (h - line) / (1 - t))
    xk = line.subs(t, tk)
    euler = sp.simplify(xk + dt * (h - xk) / (1 - tk) - line.subs(t, tk + dt))
    return ode, euler
