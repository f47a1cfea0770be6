"""Chapter 1 (continuity equation): the symbolic and numeric checks the chapter shows, fmtoy.teaching.continuity, and
the exercise solutions extracted from book/ch1_continuity.md."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sympy as sp
import torch

from fmtoy import symbolic as S
from fmtoy.data import GaussianMixture, StandardNormal, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField
from fmtoy.paths import CondOTPath
from fmtoy.solvers import divergence, log_likelihood
from fmtoy.teaching.continuity import continuity_residual, continuity_terms, log_likelihood_terms, relative_residual
from fmtoy.viz import grid_points

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch1_continuity.md"
EXACT = ExactField(CondOTPath(), eight_gaussians())
GRID = grid_points(5.0, 24)[0].double()


def rotation(x: torch.Tensor) -> torch.Tensor:
    """J x with J the rotation by 90 degrees: divergence-free, and div(p J x) = 0 for every radial p."""
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def gaussian(cov) -> GaussianMixture:
    return GaussianMixture([1.0], [[0.0, 0.0]], [cov])


# --- symbolic checks the chapter displays ---------------------------------------------------------------------


def test_affine_gaussian_flow_satisfies_the_continuity_equation():
    m, s = sp.Function("m", real=True)(S.t), sp.Function("s", positive=True)(S.t)
    p = S.gaussian_density(S.x, m, s)
    u = sp.diff(s, S.t) / s * (S.x - m) + sp.diff(m, S.t)
    assert S.continuity_residual(p, u) == 0
    assert S.continuity_residual(p, u + 1) != 0  # a shifted field moves the mass elsewhere
    assert S.continuity_residual(p, 2 * u) != 0


def test_instantaneous_change_of_variables_sign():
    lhs, rhs = S.linear_flow_log_density()  # (d/dt log p_t(x_t), -div u) for u = a x + b
    assert sp.simplify(lhs - rhs) == 0
    assert sp.simplify(lhs + rhs) != 0  # the "+ div" version is wrong


def test_instantaneous_change_of_variables_at_a_fixed_point():
    """The chapter's check: d_t log p + v d_x log p = -d_x v at a generic x (transport and volume terms), for the
    affine flow of N(m_t, s_t^2); the plus sign and a field that does not generate p_t both fail."""
    m, s = sp.Function("m", real=True)(S.t), sp.Function("s", positive=True)(S.t)
    p = S.gaussian_density(S.x, m, s)
    v = sp.diff(s, S.t) / s * (S.x - m) + sp.diff(m, S.t)
    rate = sp.simplify(S.log_density_rate(p, v))
    assert sp.simplify(rate + sp.diff(v, S.x)) == 0
    assert sp.simplify(rate - sp.diff(v, S.x)) != 0
    assert sp.simplify(S.log_density_rate(p, v + 1) + sp.diff(v + 1, S.x)) != 0
    # a check along one particle x_t = m_t + s_t z would pass for a wrong mean: the transport term must matter here
    assert sp.simplify(S.log_density_rate(p, v + sp.diff(m, S.t)) + sp.diff(v, S.x)) != 0


# --- numeric continuity residual ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_exact_mixture_field_has_small_residual_with_second_order_convergence(t):
    coarse = relative_residual(EXACT.log_prob, EXACT, GRID, t, h=1e-2)
    fine = relative_residual(EXACT.log_prob, EXACT, GRID, t, h=1e-3)
    assert fine < 1e-4  # measured ~1e-5: the O(h^2) stencil error
    assert 50 < coarse / fine < 200  # central differences: error ~ h^2, ratio 100


@pytest.mark.parametrize("t", [0.5, 0.9])
@pytest.mark.parametrize("perturbation", ["shift", "rotation"])
def test_perturbed_field_has_large_residual(t, perturbation):
    shift = torch.tensor([0.2, 0.0], dtype=torch.float64)
    wrong = {"shift": lambda x, s: EXACT(x, s) + shift, "rotation": lambda x, s: EXACT(x, s) + 0.2 * rotation(x)}
    assert relative_residual(EXACT.log_prob, wrong[perturbation], GRID, t) > 5e-3  # measured >= 1.9e-2


def test_finite_difference_terms_match_a_translating_gaussian():
    m = torch.tensor([1.0, -0.5], dtype=torch.float64)  # p_t = N(t m, I), u_t = m
    log_p = lambda x, t: gaussian(torch.eye(2)).log_prob(x - t * m)  # noqa: E731
    u = lambda x, t: m.expand_as(x)  # noqa: E731
    x = grid_points(3.0, 10)[0].double()
    dp_dt, div = continuity_terms(log_p, u, x, 0.5, h=1e-3)
    exact = log_p(x, 0.5).exp() * ((x - 0.5 * m) @ m)  # d/dt p_t = p_t (x - t m) . m
    assert torch.allclose(dp_dt, exact, atol=1e-7)
    assert torch.allclose(div, -exact, atol=1e-7)
    r, scale = continuity_residual(log_p, u, x, 0.5)
    assert r.abs().max() < 1e-6 * scale.max()


def test_rotation_is_invisible_to_a_radial_density_but_not_to_an_anisotropic_one():
    x = grid_points(3.0, 16)[0].double()
    radial, stretched = gaussian(torch.eye(2)), gaussian(torch.diag(torch.tensor([1.0, 4.0])))
    r, _ = continuity_residual(lambda y, t: radial.log_prob(y), lambda y, t: rotation(y), x, 0.5)
    assert r.abs().max() < 1e-7  # d/dt p = 0 and div(p J x) = J x . grad p = 0
    r, _ = continuity_residual(lambda y, t: stretched.log_prob(y), lambda y, t: rotation(y), x, 0.5)
    assert r.abs().max() > 1e-2


# --- instantaneous change of variables ----------------------------------------------------------------------------


def test_log_likelihood_terms_of_a_linear_field():
    a = 0.7  # v = a x: x_t = e^{a t} x_0, div v = 2 a, p_1 = N(0, e^{2a} I)
    x1 = torch.randn(50, 2, generator=make_generator(0), dtype=torch.float64)
    log_p0, integral = log_likelihood_terms(lambda x, t: a * x, x1, StandardNormal(2), steps=20)
    assert torch.allclose(integral, torch.full_like(integral, 2 * a), atol=1e-10)
    truth = gaussian(math.exp(2 * a) * torch.eye(2)).log_prob(x1)
    assert torch.allclose(log_p0 - integral, truth, atol=1e-6)
    assert torch.allclose(log_p0 + integral - truth, torch.full_like(truth, 4 * a), atol=1e-6)


def test_exact_field_likelihood_matches_the_data_density_only_with_the_minus_sign():
    q = eight_gaussians()
    x1 = q.sample(64, generator=make_generator(0)).double()
    log_p0, integral = log_likelihood_terms(EXACT, x1, StandardNormal(2), steps=20)
    log_q = q.log_prob(x1)
    assert (log_p0 - integral - log_q).abs().max() < 1e-3  # rk4 with 20 steps: measured 7e-5
    assert (log_p0 + integral - log_q).abs().mean() > 0.5  # measured 1.3


# --- bad inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, 0.0), ValueError),  # stencil leaves [0, 1]
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, 1.0), ValueError),
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, 0.5, h=0.0), ValueError),
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, 0.5, h=-1e-3), ValueError),
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, "0.5"), TypeError),
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID, True), TypeError),
        (lambda: continuity_residual("p", EXACT, GRID, 0.5), TypeError),
        (lambda: continuity_residual(EXACT.log_prob, None, GRID, 0.5), TypeError),
        (lambda: continuity_residual(EXACT.log_prob, EXACT, GRID[:, 0], 0.5), ValueError),  # x not (n, d)
        (lambda: continuity_residual(EXACT.log_prob, EXACT, [[0.0, 0.0]], 0.5), TypeError),
        (lambda: continuity_residual(lambda x, t: x, EXACT, GRID, 0.5), ValueError),  # log p of shape (n, d)
        (lambda: continuity_residual(EXACT.log_prob, lambda x, t: x[:, 0], GRID, 0.5), ValueError),
        (
            lambda: relative_residual(lambda x, t: torch.full((x.shape[0],), -1e4, dtype=x.dtype), EXACT, GRID, 0.5),
            ValueError,
        ),  # p = 0 everywhere
        (lambda: log_likelihood_terms(EXACT, GRID, StandardNormal(2), steps=0), ValueError),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error):
    with pytest.raises(error):
        call()


# --- the exercises' solutions -------------------------------------------------------------------------------------


def test_chapter_has_the_code_solutions(solutions):
    found = solutions
    assert {"divergence_2d", "log_likelihood_euler"} <= set(found)


def test_solution_divergence_2d_matches_fmtoy(solutions):
    divergence_2d = solutions["divergence_2d"]
    x = grid_points(4.0, 8)[0].double()
    for field in (EXACT, lambda y, t: y**3 + rotation(y)):
        for t in (0.2, 0.7):
            ref = divergence(field, x, t)
            assert torch.allclose(divergence_2d(field, x, t), ref, atol=1e-8)


def test_solution_log_likelihood_euler_converges_to_fmtoy(solutions):
    log_likelihood_euler = solutions["log_likelihood_euler"]
    q, source = eight_gaussians(), StandardNormal(2)
    x1 = q.sample(32, generator=make_generator(1)).double()
    ref = log_likelihood(EXACT, x1, source, steps=50)
    err = [(log_likelihood_euler(EXACT, x1, source, steps) - ref).abs().max().item() for steps in (25, 100)]
    assert err[1] < 0.25 and 3.0 < err[0] / err[1] < 5.0  # Euler is first order: 4x steps, 4x less error
