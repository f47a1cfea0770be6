"""fmtoy.sde, the exact marginal score, the Fokker-Planck residual and fmtoy.symbolic.sde (chapter 9)."""

from __future__ import annotations

import pytest
import torch

from fmtoy.data import GaussianMixture, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField, marginal_log_prob, marginal_score
from fmtoy.metrics import energy_distance, noise_floor
from fmtoy.paths import CondOTPath, VPPath
from fmtoy.sde import (
    PARAMETRISATIONS,
    MarginalSDE,
    Reparametrised,
    brownian_increments,
    coarsen,
    convert,
    euler_maruyama,
)
from fmtoy.solvers import integrate
from fmtoy.symbolic import sde as SS
from fmtoy.teaching.continuity import fokker_planck_residual, relative_residual

TARGET = eight_gaussians()


def _points(n: int = 256, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, 2, generator=make_generator(seed), dtype=torch.float64)


def _autograd_score(x, t, path, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(marginal_log_prob(x, t, path, target).sum(), x)
    return grad


# ----------------------------------------------------------------------------------------------- exact score
@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 1.0])
def test_the_marginal_score_is_the_gradient_of_the_log_density(t):
    x = _points()
    assert torch.allclose(marginal_score(x, t, CondOTPath(), TARGET), _autograd_score(x, t, CondOTPath(), TARGET))


def test_the_marginal_score_of_an_anisotropic_mixture_is_the_gradient_too():
    covs = torch.tensor([[[1.0, 0.6], [0.6, 0.5]], [[0.3, -0.1], [-0.1, 0.8]]])
    q = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), covs)
    x = _points(128, 1)
    for t in (0.2, 0.7):
        assert torch.allclose(marginal_score(x, t, CondOTPath(), q), _autograd_score(x, t, CondOTPath(), q))
        assert torch.allclose(ExactField(VPPath(), q).score(x, t), _autograd_score(x, t, VPPath(), q))


def test_the_score_at_t0_is_that_of_the_standard_normal():
    x = _points()
    assert torch.allclose(ExactField(CondOTPath(), TARGET).score(x, 0.0), -x)


# ----------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("path", [CondOTPath(), CondOTPath(sigma_min=0.01), VPPath()], ids=repr)
def test_every_conversion_round_trips(path):
    x, pred = _points(64, 2), _points(64, 3)
    t = torch.rand(64, generator=make_generator(4), dtype=torch.float64) * 0.9 + 0.05
    for frm in PARAMETRISATIONS:
        for to in PARAMETRISATIONS:
            back = convert(convert(pred, x, t, path, frm, to), x, t, path, to, frm)
            assert torch.allclose(back, pred, atol=1e-9), (frm, to)


@pytest.mark.parametrize("path", [CondOTPath(), VPPath()], ids=repr)
def test_the_score_read_from_the_exact_velocity_is_the_exact_score(path):
    """Tweedie: the exact field's posterior mean of x_0, divided by -sigma_t, is grad log p_t."""
    x, exact = _points(), ExactField(path, TARGET)
    for t in (0.1, 0.5, 0.95):
        got = Reparametrised(exact, path, "velocity", "score")(x, x.new_full((len(x),), t))
        assert torch.allclose(got, exact.score(x, t), atol=1e-8)


def test_conversions_refuse_the_times_where_they_divide_by_zero():
    x, pred = _points(8), _points(8, 1)
    with pytest.raises(ValueError, match="divides by sigma_t, which is 0 at t = 1"):
        convert(pred, x, 1.0, CondOTPath(), "velocity", "score")
    with pytest.raises(ValueError, match="divides by alpha_t, which is 0 at t = 0"):
        convert(pred, x, 0.0, CondOTPath(), "eps", "velocity")
    assert torch.isfinite(convert(pred, x, 0.0, CondOTPath(), "velocity", "score")).all()  # only sigma divides here
    with pytest.raises(ValueError, match="unknown parametrisation 'noise'; allowed: eps, score, velocity, x1"):
        convert(pred, x, 0.5, CondOTPath(), "noise", "score")


def test_the_velocity_to_score_conversion_is_chapter_8s():
    from fmtoy.methods.guidance import score_from_velocity

    x, u = _points(), _points(256, 5)
    for t in (0.2, 0.8):
        assert torch.allclose(convert(u, x, t, VPPath(), "velocity", "score"), score_from_velocity(u, x, t, VPPath()))


# ----------------------------------------------------------------------------------------------- Fokker-Planck
def test_the_marginal_drift_solves_fokker_planck_and_the_wrong_factor_does_not():
    path, x = CondOTPath(), _points(200, 6, 2.5)
    exact = ExactField(path, TARGET)
    for g in (0.5, 1.5):
        right = MarginalSDE(exact, path, g).drift
        wrong = lambda x, t, g=g: exact(x, t) + g**2 * exact.score(x, t)  # noqa: E731
        r = [relative_residual(exact.log_prob, right, x, 0.5, h=h, g=g) for h in (2e-3, 1e-3)]
        w = [relative_residual(exact.log_prob, wrong, x, 0.5, h=h, g=g) for h in (2e-3, 1e-3)]
        assert r[1] < 1e-4 and 3.8 < r[0] / r[1] < 4.2  # finite-difference error only: O(h^2), 4x smaller at h/2
        assert w[1] > 1e-2 and abs(w[0] - w[1]) < 1e-3 * w[1]  # a residual that does not go away with h
    r, scale = fokker_planck_residual(exact.log_prob, exact, 0.0, x, 0.5)
    r0, scale0 = relative_residual(exact.log_prob, exact, x, 0.5), scale.max()
    assert float(r.abs().max() / scale0) == pytest.approx(r0)  # g = 0: the continuity equation of chapter 1


def test_the_drift_is_the_velocity_plus_half_g_squared_times_the_score():
    path, x = CondOTPath(), _points()
    exact = ExactField(path, TARGET)
    t = x.new_full((len(x),), 0.4)
    sde = MarginalSDE(exact, path, lambda t: 2.0 * (1 - t))
    assert torch.allclose(sde.drift(x, t), exact(x, 0.4) + 0.5 * 1.2**2 * exact.score(x, 0.4), atol=1e-9)
    assert torch.allclose(sde.score(x, t), exact.score(x, 0.4), atol=1e-8)


# ----------------------------------------------------------------------------------------------- Euler-Maruyama
def test_g_zero_is_the_euler_solver_exactly():
    path, x0 = CondOTPath(), torch.randn(300, 2, generator=make_generator(7))
    exact = ExactField(path, TARGET)
    assert torch.equal(euler_maruyama(MarginalSDE(exact, path, 0.0), x0, 16), integrate(exact, x0, 16, "euler"))


def test_euler_maruyama_with_the_exact_drift_reaches_the_target():
    path = CondOTPath()
    exact = ExactField(path, TARGET)
    ref = TARGET.sample(1000, make_generator(8)).double()
    floor = noise_floor(TARGET, ref)
    x0 = torch.randn(1000, 2, generator=make_generator(9), dtype=torch.float64)
    out = euler_maruyama(MarginalSDE(exact, path, 1.0), x0, 200, generator=make_generator(10))
    assert energy_distance(out, ref) < floor[0] + 3 * floor[1]
    one = euler_maruyama(MarginalSDE(exact, path, 1.0), x0, 1, generator=make_generator(10))
    assert energy_distance(one, ref) > floor[0] + 10 * floor[1]  # the check can fail: one step ends at N(0, 1.25 I)


def test_seeded_runs_are_reproducible_and_seeds_differ():
    path, x0 = CondOTPath(), torch.randn(100, 2, generator=make_generator(0))
    sde = MarginalSDE(ExactField(path, TARGET), path, 1.0)
    a = euler_maruyama(sde, x0, 10, generator=make_generator(3), langevin=1)
    b = euler_maruyama(sde, x0, 10, generator=make_generator(3), langevin=1)
    c = euler_maruyama(sde, x0, 10, generator=make_generator(4), langevin=1)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_given_noise_is_used_and_coarsening_keeps_the_brownian_path():
    path, x0 = CondOTPath(), torch.randn(50, 2, generator=make_generator(0), dtype=torch.float64)
    sde = MarginalSDE(ExactField(path, TARGET), path, 0.7)
    z = brownian_increments(32, 50, 2, make_generator(1), dtype=torch.float64)
    assert torch.equal(euler_maruyama(sde, x0, 32, noise=z), euler_maruyama(sde, x0, 32, noise=z.clone()))
    zc = coarsen(z, 4)
    assert zc.shape == (8, 50, 2) and torch.allclose(zc[0] * 2.0, z[:4].sum(0))  # sqrt(h_coarse) zc = sum sqrt(h) z
    big = coarsen(brownian_increments(64, 4000, 2, make_generator(2)), 8)
    assert abs(float(big.var()) - 1.0) < 0.05  # still standard normal


def test_the_trajectory_and_the_corrector_count_their_steps():
    path, x0 = CondOTPath(), torch.randn(20, 2, generator=make_generator(0))
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return ExactField(path, TARGET)(x, t)

    tr = euler_maruyama(MarginalSDE(model, path, 1.0), x0, 5, make_generator(1), langevin=2, return_trajectory=True)
    assert tr.shape == (6, 20, 2) and torch.equal(tr[0], x0)
    assert len(calls) == 5 * (1 + 2) and max(calls) < 1.0  # two corrector calls before each step; t = 1 never
    assert calls[:3] == [0.0] * 3 and calls[-3:] == pytest.approx([0.8] * 3)  # float32 times


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(g=-1.0), "g must be a finite number >= 0"),
        (dict(g=lambda t: -1.0), r"g\(t\) must return a finite number >= 0"),
        (dict(noise=torch.zeros(3, 10, 2)), r"noise must have shape \(steps, n, d\) = \(4, 10, 2\)"),
        (dict(t0=0.5, t1=0.5), "need t0 < t1"),
        (dict(langevin=-1), "langevin must be an integer >= 0"),
        (dict(kind="noise"), "unknown parametrisation 'noise'"),
    ],
)
def test_bad_input_gets_one_clear_line(kwargs, match):
    path = CondOTPath()
    sde_kw = {k: kwargs.pop(k) for k in ("g", "kind") if k in kwargs}
    with pytest.raises(ValueError, match=match):
        sde = MarginalSDE(ExactField(path, TARGET), path, **{"g": 1.0, **sde_kw})
        euler_maruyama(sde, torch.zeros(10, 2), 4, **kwargs)


# ----------------------------------------------------------------------------------------------- SymPy
def test_sympy_conversions_round_trip_and_match_chapter_8():
    assert all(SS.check_conversions().values())


def test_sympy_finds_where_each_conversion_is_singular_on_condot():
    sing = SS.singular_times("ot")
    assert sing["velocity -> pair"] == [] and sing["x1 -> pair"] == [1]
    assert sing["eps -> pair"] == [0] and sing["score -> pair"] == [0] and sing["pair -> score"] == [1]


def test_sympy_fokker_planck_holds_for_every_g_and_not_for_the_wrong_factor():
    res = SS.marginal_sde_residuals()
    assert res["u, g = 0"] == 0 and res["u + g^2/2 score"] == 0
    assert res["u + g^2 score"] != 0 and not SS.is_zero(res["u + g^2 score"], method="points")


# ----------------------------------------------------------------------------------------------- study helpers
def test_sampler_scores_count_the_corrector_calls_and_add_the_cross_entropy():
    from fmtoy.sde import sampler_scores

    path, x0 = CondOTPath(), torch.randn(200, 2, generator=make_generator(0), dtype=torch.float64)
    ref = TARGET.sample(200, make_generator(1)).double()
    sde = MarginalSDE(ExactField(path, TARGET), path, 1.0)
    got = sampler_scores(sde, x0, ref, (3, 4, 8), seed=2, langevin=1, target=TARGET)
    assert set(got) == {4, 8, "xent"}  # 3 calls cannot be spent as steps of 1 + 1 calls
    x8 = euler_maruyama(sde, x0, 4, make_generator(2), langevin=1)
    assert got[8] == energy_distance(x8, ref) and got["xent"] == -float(TARGET.log_prob(x8).mean())


def test_fitted_order_is_the_slope_and_strong_errors_need_dividing_steps():
    from fmtoy.sde import fitted_order, strong_errors

    assert fitted_order({8: 0.5, 16: 0.25, 32: 0.125}) == pytest.approx(1.0)
    assert fitted_order({8: 0.64, 16: 0.16, 32: 0.04}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2 positive errors"):
        fitted_order({8: 0.0, 16: 0.1})
    path = CondOTPath()
    sde = MarginalSDE(ExactField(path, TARGET), path, 1.0)
    with pytest.raises(ValueError, match="must divide fine = 64"):
        strong_errors(sde, torch.zeros(4, 2), (8, 48), 64)
    errs = strong_errors(
        sde, torch.randn(300, 2, generator=make_generator(3), dtype=torch.float64), (8, 16, 32), 256, make_generator(4)
    )
    assert errs[8] > errs[16] > errs[32] and 0.7 < fitted_order(errs) < 1.4  # strong order 1 for additive noise


def test_cross_entropy_is_the_mean_negative_log_density():
    from fmtoy.metrics import cross_entropy

    x = TARGET.sample(500, make_generator(5))
    assert cross_entropy(x, TARGET) == pytest.approx(-float(TARGET.log_prob(x).mean()))
    with pytest.raises(TypeError, match="target must have .log_prob"):
        cross_entropy(x, object())
