"""Chapter 5 (OT vs diffusion paths): loss-weight identities, OT straightness, the kinetic-energy bound,
minibatch-OT pairing, and the exercise solution extracted from the page."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp
import torch

from fmtoy import symbolic as S
from fmtoy.data import eight_gaussians
from fmtoy.device import make_generator as _gen  # a seeded CPU generator
from fmtoy.losses import independent_coupling, minibatch_ot_coupling
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath, VEPath, VPPath
from fmtoy.symbolic import sigma_min, t, x, x1
from fmtoy.teaching.checks import kinetic_energy_bound

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch5_paths.md"
D64 = torch.float64


# ----------------------------------------------------------------------------------------------- symbolic
def test_generic_weights():
    w = S.prediction_loss_weights()
    a, s = sp.Function("alpha", real=True)(t), sp.Function("sigma", positive=True)(t)
    gamma = sp.diff(a, t) * s - a * sp.diff(s, t)
    assert S.is_zero(w.x_weight - gamma**2 / s**2)
    assert S.is_zero(w.eps_weight - gamma**2 / a**2)


def test_ot_weights_and_convention_flip():
    ot, flip = S.prediction_loss_weights(t, 1 - t), S.prediction_loss_weights(1 - t, t)
    assert sp.simplify(ot.x_weight - 1 / (1 - t) ** 2) == 0 and sp.simplify(ot.eps_weight - 1 / t**2) == 0
    assert sp.simplify(flip.x_weight - 1 / t**2) == 0 and sp.simplify(flip.eps_weight - 1 / (1 - t) ** 2) == 0
    assert sp.simplify(ot.x_weight / ot.eps_weight - (t / (1 - t)) ** 2) == 0  # SNR
    assert sp.simplify(ot.eps_weight - (t / (1 - t)) ** 2) != 0  # the note's claim fails
    a, s = S.path_schedule("ot")  # with sigma_min
    w = S.prediction_loss_weights(a, s)
    assert sp.simplify(w.x_weight - 1 / s**2) == 0 and sp.simplify(w.eps_weight - 1 / t**2) == 0


def test_vp_weight_exercise_identity():
    a = sp.Function("a", positive=True)(t)
    w = S.prediction_loss_weights(a, sp.sqrt(1 - a**2))
    assert S.is_zero(w.eps_weight - (sp.diff(a, t) / (a * sp.sqrt(1 - a**2))) ** 2, method="points")


def test_degenerate_schedule_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        S.prediction_loss_weights(t, 2 * t)  # gamma = 2t - 2t = 0
    with pytest.raises(TypeError):
        S.prediction_loss_weights("a b c", 1 - t)
    with pytest.raises(ValueError):
        S.prediction_loss_weights(x * t, 1 - t)


def test_ot_straight_vp_curved():
    z0 = sp.Symbol("x_0", real=True)
    acc = {}
    for name in ("ot", "vp"):
        a, s = S.path_schedule(name)
        u = S.gaussian_conditional_velocity(a * x1, s)
        acc[name] = sp.diff(u.subs(x, a * x1 + s * z0), t)
    assert sp.simplify(acc["ot"]) == 0
    assert not S.is_zero(acc["vp"], method="points")
    a, s = S.path_schedule("ot")
    assert sp.simplify(sp.diff(a * x1 + s * z0, t) - (x1 - (1 - sigma_min) * z0)) == 0


# ----------------------------------------------------------------------------------------------- numeric
def test_three_losses_agree_for_a_fixed_network():
    torch.manual_seed(0)
    net, n, g = VelocityMLP(hidden=32), 512, _gen(1)
    xd, eps = eight_gaussians().sample(n, g).double(), torch.randn(n, 2, generator=g, dtype=D64)
    tt = 0.02 + 0.96 * torch.rand(n, 1, generator=g, dtype=D64)
    z = tt * xd + (1 - tt) * eps
    with torch.no_grad():
        v = net(z.float(), tt[:, 0].float()).double()
    lv = (v - (xd - eps)).square().sum(1)
    lx = (z + (1 - tt) * v - xd).square().sum(1) / (1 - tt[:, 0]) ** 2
    le = (z - tt * v - eps).square().sum(1) / tt[:, 0] ** 2
    assert torch.allclose(lx, lv, rtol=1e-9) and torch.allclose(le, lv, rtol=1e-9)
    le_wrong = (z - tt * v - eps).square().sum(1) * ((1 - tt[:, 0]) / tt[:, 0]) ** 2
    assert not torch.allclose(le_wrong, lv, rtol=1e-2)


@pytest.mark.parametrize("path", [CondOTPath(), VEPath(), VPPath()], ids=repr)
def test_kinetic_energy_bound(path):
    b = kinetic_energy_bound(path, eight_gaussians(), n=400, steps=40, generator=_gen(2))
    assert 0 < b["marginal"] < b["conditional"]
    assert b["gap"] > 0.1 * b["conditional"]  # not tight: crossing conditional paths average out
    if isinstance(path, CondOTPath):  # exact: E|x1 - x0|^2 = 16.5 + 2; MC sd ~ 0.6 at n = 400
        assert abs(b["conditional"] - 18.5) < 2.5


def test_kinetic_energy_bound_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        kinetic_energy_bound(CondOTPath(), eight_gaussians(), steps=1)
    with pytest.raises(ValueError):
        kinetic_energy_bound(CondOTPath(), eight_gaussians(), n=0)


def test_minibatch_ot_pairs_move_less():
    g = _gen(3)
    x0 = torch.randn(256, 2, generator=g, dtype=D64)
    y = eight_gaussians().sample(256, g).double()
    ind = (torch.sub(*independent_coupling(x0, y))).square().sum(1).mean()
    ot = (torch.sub(*minibatch_ot_coupling(x0, y))).square().sum(1).mean()
    assert ot < 0.8 * ind  # independent: E|x0 - x1|^2 = 18.5 (MC sd ~ 0.6); OT pairing roughly halves it


def test_minibatch_ot_pairs_between_eight_gaussians_and_moons_move_less():
    from fmtoy.data import two_moons

    g = _gen(5)
    x0, y = eight_gaussians(radius=2.5).sample(256, g).double(), two_moons().sample(256, g).double()
    ind = (torch.sub(*independent_coupling(x0, y))).square().sum(1).mean()
    ot = (torch.sub(*minibatch_ot_coupling(x0, y))).square().sum(1).mean()
    assert ind > 8.0  # independent: E|x0|^2 + E|x1|^2 - 2 E x0 . E x1 ~ 13 (MC sd ~ 0.6 at n = 256)
    assert ot < 0.3 * ind  # the batch OT plan between two 2D shapes is ~10x cheaper (seeds 0-4: 0.08-0.12)


# ----------------------------------------------------------------------------------------------- exercises
def test_solution_velocity_from_eps(solutions):
    f, g = solutions["velocity_from_eps"], _gen(4)
    xd, eps = 3 * torch.randn(64, 2, generator=g, dtype=D64), torch.randn(64, 2, generator=g, dtype=D64)
    tt = 0.05 + 0.9 * torch.rand(64, 1, generator=g, dtype=D64)
    z = tt * xd + (1 - tt) * eps
    assert torch.allclose(f(z, tt, eps), xd - eps)
    e_hat = eps + 0.3 * torch.randn(64, 2, generator=g, dtype=D64)
    lhs = (f(z, tt, e_hat) - (xd - eps)).square().sum(1)
    assert torch.allclose(lhs, (e_hat - eps).square().sum(1) / tt[:, 0] ** 2)


# ------------------------------------------------------------------------------------ OT map, VP curvature, NLL
def test_ot_flow_is_gradient_of_convex_function():
    a, s = S.path_schedule("ot")
    phi = s * x**2 / 2 + a * x1 * x  # Brenier potential, per coordinate
    assert sp.simplify(sp.diff(phi, x) - (a * x1 + s * x)) == 0
    assert S.is_zero(sp.diff(phi, x, 2) - s)
    assert all(s.subs({t: v, sigma_min: 0.01}) > 0 for v in (0, 0.5, 1))  # Hessian sigma_t I > 0


def test_vp_turns_without_overshoot_ot_ve_straight():
    p0, p1 = torch.tensor([[1.0, -1.5]], dtype=D64), torch.tensor([[3.0, 2.0]], dtype=D64)
    ts = torch.linspace(0, 1 - 1e-5, 1001, dtype=D64)
    for path, curved in ((VPPath(), True), (CondOTPath(), False), (VEPath(), False)):
        c = torch.cat([path.sample_xt(p0, p1, float(s)) for s in ts])
        assert ((c - p1).norm(dim=1).diff() <= 1e-12).all()  # no overshoot: distance to x1 decreases
        u = torch.nn.functional.normalize(torch.diff(c, dim=0), dim=1)
        turn = torch.rad2deg(torch.acos((u[1:] * u[:-1]).sum(1).clamp(-1, 1)).sum()).item()
        assert (turn > 45) if curved else (turn < 1)  # VP ~ 89 deg, OT/VE ~ 0


def test_exact_ot_field_has_zero_nll_gap():
    from fmtoy.marginal import ExactField
    from fmtoy.metrics import nll_gap

    target = eight_gaussians()
    f = ExactField(CondOTPath(), target)
    r = nll_gap(
        lambda z, s: f(z, s.clamp(max=1 - 1e-5)), target, source=f.distribution(0.0), n=200, steps=16, generator=_gen(6)
    )
    assert abs(r["gap"]) < 0.01 and r["gap_stderr"] < 0.01  # exact field: KL(q || p_1) = 0 up to RK4 error
