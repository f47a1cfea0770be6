"""Chapter 7 (variational rectified flow matching): the SymPy identities the page asserts (constant-velocity
analysis, MSE as a Gaussian NLL, the Gaussian KL, the ELBO gap, the KL weight as a decoder variance, the straight
line of an endpoint code), the exercise solutions extracted from the page, and small numeric versions of the
page's claims (exact fixed-latent sampling for an endpoint code, collapse of an x_t-only encoder)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sympy as sp
import torch
from torch import nn

from fmtoy.device import make_generator
from fmtoy.methods.vrfm import (
    VRFMConfig,
    gaussian_kl,
    get_setting,
    reparametrise,
    sample_vrfm,
    train_vrfm,
    velocity_posterior,
)
from fmtoy.metrics import energy_distance, straightness
from fmtoy.symbolic import continuity_residual, gaussian_density
from fmtoy.symbolic import vrfm as SV

EXERCISES = 2  # graded code cells the chapter must keep
CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch7_vrfm.md"


# ----------------------------------------------------------------------------------------------- SymPy
def test_constant_velocity_forces_the_linear_interpolation():
    cv = SV.constant_velocity_analysis()
    issue_form = (SV.x1 - SV.x0 - SV.theta) * (2 * SV.xi0 - SV.x0 - SV.x1 + SV.theta) / 2
    assert sp.simplify(cv.residual - issue_form) == 0
    assert sp.simplify(cv.factored - issue_form) == 0
    assert cv.solutions == [{SV.theta: SV.x1 - SV.x0}]
    assert cv.continuity == 0
    # any other constant leaves a residual that depends on the starting point
    wrong = cv.residual.subs(SV.theta, SV.x1 - SV.x0 + 1)
    assert sp.diff(wrong, SV.xi0) != 0


def test_mse_is_a_unit_gaussian_nll_minimised_by_the_mean():
    assert SV.mse_as_nll() == (0, 0)
    assert SV.pair_jacobian() == 1


def test_kl_elbo_and_kl_weight_identities():
    kl, closed = SV.gaussian_kl_1d()
    assert sp.simplify(kl - closed) == 0
    assert sp.simplify(closed.subs({SV.mu: 0, SV.s: 1})) == 0
    lg = SV.linear_gaussian_elbo()
    assert sp.simplify(lg.log_marginal - lg.elbo - lg.kl_to_posterior) == 0
    # the gap vanishes at the posterior
    at_post = lg.kl_to_posterior.subs({SV.mu: lg.posterior_mean, SV.s: sp.sqrt(lg.posterior_var)})
    assert sp.simplify(at_post) == 0
    assert sp.simplify(SV.kl_weight_identity()) == 0


def test_endpoint_code_follows_its_straight_line_and_euler_is_exact():
    assert SV.straight_line_ode() == (0, 0)


def test_unequal_widths_exercise():
    """Exercise ex-ch7-unequal: a constant field cannot rescale; the linear interpolation of mean and std can."""
    s0, s1 = sp.symbols("s_0 s_1", positive=True)
    xi, x, t, theta = sp.symbols("xi x t theta", real=True)
    x0, x1 = SV.x0, SV.x1
    res = sp.expand(
        sp.expand_log(sp.log(gaussian_density(xi + theta, x1, s1)) - sp.log(gaussian_density(xi, x0, s0)), force=True)
    )
    assert sp.simplify(sp.Poly(res, xi).coeff_monomial(xi**2) - (1 / (2 * s0**2) - 1 / (2 * s1**2))) == 0
    m, sd = (1 - t) * x0 + t * x1, (1 - t) * s0 + t * s1
    psi = m + sd / s0 * (xi - x0)
    u = x1 - x0 + (s1 - s0) / sd * (x - m)
    assert sp.simplify(sp.diff(psi, t) - u.subs(x, psi)) == 0  # the field generates the flow
    assert sp.diff(psi, t, 2) == 0  # straight lines at constant speed
    assert sp.simplify(continuity_residual(gaussian_density(x, m, sd), u)) == 0


# ----------------------------------------------------------------------------------------------- exercises
def test_exercise_gaussian_kl(solutions):
    g = make_generator(0)
    mu, logvar = torch.randn(32, 5, generator=g), 2 * torch.randn(32, 5, generator=g)
    torch.testing.assert_close(solutions["gaussian_kl"](mu, logvar), gaussian_kl(mu, logvar))
    assert torch.equal(solutions["gaussian_kl"](torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))
    assert math.isclose(solutions["gaussian_kl"](torch.zeros(1, 2), torch.full((1, 2), -120.0)).item(), 119.0)


def test_exercise_reparametrised_sample(solutions):
    mu = torch.randn(8, 3, generator=make_generator(1), requires_grad=True)
    logvar = torch.randn(8, 3, generator=make_generator(2), requires_grad=True)
    eps = torch.randn(8, 3, generator=make_generator(3))
    z = solutions["sample_z"](mu, logvar, eps)
    torch.testing.assert_close(z, reparametrise(mu, logvar, make_generator(3)))  # same eps, same z
    z.sum().backward()
    torch.testing.assert_close(logvar.grad, 0.5 * (0.5 * logvar).exp().detach() * eps)
    assert torch.equal(mu.grad, torch.ones(8, 3))


# ----------------------------------------------------------------------------------------------- numeric claims
class _EndpointCode(nn.Module):
    """v(x, t, z) = (h(z) - x) / (1 - t), h(z) = sign(z_1) + 0.1 z_2: h(N(0, I)) is exactly the 1D two-mode target."""

    dim, cond_dim = 1, 2

    def forward(self, x, t, z):
        return (self.h(z) - x) / (1 - t[:, None])

    @staticmethod
    def h(z):
        return torch.sign(z[:, :1]) + 0.1 * z[:, 1:2]


@pytest.mark.parametrize("nfe", [1, 2, 5, 20])
def test_fixed_latent_sampling_of_an_endpoint_code_is_exact(nfe):
    one_d = get_setting("two_modes_1d")
    x0 = one_d.source.sample(4000, make_generator(0)).double()
    z = torch.randn(4000, 2, generator=make_generator(1), dtype=torch.float64)
    out = sample_vrfm(_EndpointCode(), x0, nfe, z=z)
    torch.testing.assert_close(out, _EndpointCode.h(z), rtol=1e-10, atol=1e-10)
    ref = one_d.target.sample(4000, make_generator(2)).double()
    assert abs(energy_distance(out, ref)) < 0.005
    traj = sample_vrfm(_EndpointCode(), x0, nfe, z=z, return_trajectory=True)
    assert straightness(traj) < 1e-20  # every path is the straight line to h(z)
    if nfe > 1:  # redrawing z: the last step still jumps to h(z_last) ~ q, but the paths zig-zag between modes
        redrawn = sample_vrfm(
            _EndpointCode(), x0, nfe, generator=make_generator(3), resample_z=True, return_trajectory=True
        )
        assert straightness(redrawn) > 0.1


def test_an_xt_only_encoder_collapses_and_an_x1_encoder_does_not():
    base = dict(setting="two_modes_1d", steps=300, batch_size=256, hidden=32, encoder_hidden=32, device="cpu")
    collapsed = train_vrfm(VRFMConfig(posterior_inputs=("xt",), **base))
    informed = train_vrfm(VRFMConfig(posterior_inputs=("x1",), **base))
    kl_xt, kl_x1 = (sum(r.kl[-50:]) / 50 for r in (collapsed, informed))
    assert kl_xt < 0.01 < 0.2 < kl_x1, (kl_xt, kl_x1)
    assert sum(informed.mse[-50:]) < 0.8 * sum(collapsed.mse[-50:])


def test_the_crossing_points_of_the_page():
    one_d, hexa = get_setting("two_modes_1d"), get_setting("hexagon_2d")
    p1 = velocity_posterior(torch.zeros(1, 1, dtype=torch.float64), 0.5, one_d.target, one_d.source)
    c, b = 0.25 * (1 + 0.01), 0.5 * (0.01 - 1)  # C = t^2 S1 + (1-t)^2 S0, B = t S1 - (1-t) S0
    gain = 1 + 0.5 * (-b) / c
    torch.testing.assert_close(p1.means[0, :, 0], torch.tensor([-gain, gain], dtype=torch.float64))
    torch.testing.assert_close(p1.weights[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    p2 = velocity_posterior(torch.zeros(1, 2, dtype=torch.float64), 0.25, hexa.target, hexa.source)
    big = p2.weights[0] > 0.01
    assert int(big.sum()) == 6
    torch.testing.assert_close(
        p2.means[0, big].norm(dim=1), torch.full((6,), 4 / 3, dtype=torch.float64), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(p2.mean(), torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)
