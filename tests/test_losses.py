"""Tests for fmtoy.losses: the CFM regression target, the exact field minimises the loss, couplings."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import draw_batch

from fmtoy.data import eight_gaussians
from fmtoy.device import make_generator
from fmtoy.losses import COUPLINGS, cfm_loss, get_coupling, independent_coupling, minibatch_ot_coupling
from fmtoy.marginal import ExactField
from fmtoy.paths import CondOTPath, get_path


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_condot_target_is_x1_minus_scaled_x0(sigma_min):
    """For CondOT the regression target is x1 - (1 - sigma_min) x0 (FM Eq. 23): a zero model pays its mean square."""
    x0, x1, t = draw_batch(64)
    path = CondOTPath(sigma_min)
    loss = cfm_loss(lambda x, s: torch.zeros_like(x), x0, x1, t, path)
    expected = (x1 - (1 - sigma_min) * x0).square().sum(1).mean()
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert cfm_loss(lambda x, s: x1 - (1 - sigma_min) * x0, x0, x1, t, path).item() == 0.0


@pytest.mark.parametrize("name", ["ot", "ve", "vp"])
def test_model_sees_xt_and_t_and_zero_loss_at_the_target(name):
    """cfm_loss feeds the model x_t = psi_t(x0|x1) and t (n,), and regresses on path.target_velocity."""
    path = get_path(name)
    x0, x1, t = draw_batch(32, seed=1)
    t = t * path.t_max

    def oracle(x, s):
        assert s.shape == (32,) and torch.equal(s, t)
        assert torch.allclose(x, path.sample_xt(x0, x1, t), rtol=1e-12, atol=1e-12)
        return path.target_velocity(x0, x1, t)

    assert cfm_loss(oracle, x0, x1, t, path).item() < 1e-20


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
@pytest.mark.parametrize("kind", ["scale", "smooth"])
def test_exact_marginal_field_minimises_the_loss(sigma_min, kind):
    """L(u + delta) - L(u) = E|delta|^2 (the cross term has mean 0 because u_t(x) = E[target | x_t = x], FM Thm 2).

    Same samples for both losses; the check |D - E|delta|^2| < 5 standard errors (a z-test of E[delta (u - target)]
    = 0) fails if u is not the conditional mean of the target: e.g. 0.95 u is off by 11-19 standard errors.
    """
    path = CondOTPath(sigma_min)
    x0, x1, t = draw_batch(20000, seed=2)
    t = t * path.t_max
    u = ExactField(path, eight_gaussians())
    # (a constant shift would be a weak probe: E u = E target = 0 by the symmetry of eight_gaussians)
    delta = (lambda x, s: 0.2 * u(x, s)) if kind == "scale" else (lambda x, s: 0.5 * torch.sin(x) * s[:, None])
    exact = cfm_loss(u, x0, x1, t, path)
    perturbed = cfm_loss(lambda x, s: u(x, s) + delta(x, s), x0, x1, t, path)
    xt = path.sample_xt(x0, x1, t)
    dv = delta(xt, t)
    cross = 2 * (dv * (u(xt, t) - path.target_velocity(x0, x1, t))).sum(1)
    se = cross.std() / len(cross) ** 0.5
    gap, expected = (perturbed - exact).item(), dv.square().sum(1).mean().item()
    assert gap > 0
    assert abs(gap - expected) < 5 * se.item()


def test_cond_is_passed_to_the_model():
    x0, x1, t = draw_batch(8)
    seen = {}

    def model(x, s, c):
        seen["c"] = c
        return torch.zeros_like(x)

    cond = torch.rand(8, 1, dtype=torch.float64)
    cfm_loss(model, x0, x1, t, CondOTPath(), cond=cond)
    assert seen["c"] is cond


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(4, 2), torch.randn(5, 2), torch.rand(4)), ValueError, "same shape"),
        ((torch.randn(4, 2), torch.randn(4, 2), torch.rand(3)), ValueError, "3 entries but x has 4 rows"),
        ((torch.randn(4), torch.randn(4), torch.rand(4)), ValueError, "x0 must have shape"),
        (([[0.0, 0.0]], torch.randn(1, 2), torch.rand(1)), TypeError, "x0 must be a torch.Tensor"),
    ],
)
def test_cfm_loss_bad_inputs(args, err, match):
    with pytest.raises(err, match=match):
        cfm_loss(lambda x, s: x, *args, CondOTPath())


def test_cfm_loss_bad_model_or_path():
    x0, x1, t = draw_batch(4)
    with pytest.raises(ValueError, match="model must return a tensor of shape"):
        cfm_loss(lambda x, s: x[:, :1], x0, x1, t, CondOTPath())
    with pytest.raises(TypeError, match="GaussianPath"):
        cfm_loss(lambda x, s: x, x0, x1, t, "ot")


def test_ot_coupling_is_a_permutation_with_lower_cost():
    g = make_generator(3)
    x0, x1 = torch.randn(256, 2, generator=g), eight_gaussians().sample(256, generator=g)
    y0, y1 = minibatch_ot_coupling(x0, x1)
    assert torch.equal(y0, x0)
    # a permutation: every row of x1 appears exactly once
    d = torch.cdist(y1.double(), x1.double())
    assert (d.min(1).values == 0).all() and torch.equal(d.argmin(1).sort().values, torch.arange(256))
    ot_cost = (y0 - y1).square().sum(1).mean()
    ind_cost = (x0 - x1).square().sum(1).mean()
    assert ot_cost < 0.5 * ind_cost  # ~19 vs ~2 for 8 gaussians of radius 4 (E|x0 - x1|^2 = 2 + 16 + 0.5 = 18.5)


def test_ot_coupling_matches_brute_force():
    """The assignment is the exact minimiser of sum_i |x0_i - x1_sigma(i)|^2 over all 720 permutations."""
    g = make_generator(4)
    x0, x1 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x0, x1).square()
    best = min(sum(cost[i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
    y0, y1 = minibatch_ot_coupling(x0, x1)
    assert abs((y0 - y1).square().sum().item() - best) < 1e-9


def test_registry_and_independent():
    x0, x1 = torch.randn(5, 2), torch.randn(5, 2)
    y0, y1 = independent_coupling(x0, x1)
    assert y0 is x0 and y1 is x1
    assert get_coupling("ot") is minibatch_ot_coupling and set(COUPLINGS) == {"independent", "ot"}
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'; allowed: independent, ot"):
        get_coupling("sinkhorn")
    with pytest.raises(ValueError, match="same shape"):
        minibatch_ot_coupling(torch.randn(5, 2), torch.randn(6, 2))
