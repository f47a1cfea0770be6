"""Chapter 2 (Theorem 1, the marginalization trick): the checks the chapter shows, and its exercise solutions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sympy as sp
import torch

import fmtoy.symbolic as S
from fmtoy.data import GaussianMixture, StandardNormal, eight_gaussians
from fmtoy.device import make_generator as gen  # a seeded CPU generator
from fmtoy.marginal import ExactField, marginal_distribution, marginal_velocity
from fmtoy.paths import CondOTPath, VPPath
from fmtoy.teaching.checks import marginal_velocity_mc, relative_field_error
from fmtoy.train import TrainConfig, build_model, train_flow

EXERCISES = 2  # graded code cells the chapter must keep
CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch2_marginal.md"
PATH, TARGET = CondOTPath(), eight_gaussians()


def points(t: float, n: int, seed: int = 1) -> torch.Tensor:
    return marginal_distribution(t, PATH, TARGET).sample(n, generator=gen(seed)).double()


# ------------------------------------------------------------------------------------------------ symbolic
def test_posterior_average_satisfies_continuity_and_prior_average_does_not():
    p, u = S.two_component_marginal_1d()
    assert S.continuity_residual(p, u) == 0
    m1, m2 = sp.symbols("m_1 m_2", real=True)
    w = sp.Symbol("w", positive=True)
    alpha, sigma = sp.Function("alpha", real=True)(S.t), sp.Function("sigma", positive=True)(S.t)
    u1, u2 = (S.gaussian_conditional_velocity(alpha * m, sigma) for m in (m1, m2))
    wrong = S.continuity_residual(p, w * u1 + (1 - w) * u2, simplify=False)
    assert min(S.values_at_random_points(wrong)) > 1e-6  # a true identity gives ~1e-58 at 60 digits


def test_condot_two_gaussians_satisfy_continuity():
    p, u = S.two_component_marginal_1d(
        x1s=(-2, 3),
        weights=(sp.Rational(1, 3), sp.Rational(2, 3)),
        alpha=S.t,
        sigma=1 - S.t,
        target_std=sp.Rational(1, 2),
    )
    assert S.is_zero(S.continuity_residual(p, u, simplify=False), method="points")
    assert not S.is_zero(S.continuity_residual(p, 1.1 * u, simplify=False), method="points")


def test_component_field_is_the_gaussian_field_of_the_component_path():
    """The chapter's positive-width check conditions on the component k: for q = N(m, tau^2) (one component) the
    exact marginal field is the FM Theorem 3 field of the Gaussian path N(alpha m, alpha^2 tau^2 + sigma^2)."""
    m, tau = 1.5, 0.5
    q = GaussianMixture(torch.tensor([1.0]), torch.tensor([[m]]), torch.tensor([[[tau**2]]]))
    x = torch.linspace(-3, 4, 15, dtype=torch.float64)[:, None]
    for t in (0.2, 0.7):  # CondOT, sigma_min = 0: alpha_t = t, sigma_t = 1 - t
        std = sp.sqrt(S.t**2 * tau**2 + (1 - S.t) ** 2)
        u = sp.lambdify((S.x, S.t), S.gaussian_conditional_velocity(S.t * m, std))
        want = torch.tensor([float(u(xi, t)) for xi in x[:, 0].tolist()], dtype=torch.float64)
        got = marginal_velocity(x, t, PATH, q)[:, 0]
        assert torch.allclose(got, want, atol=1e-10), t


# ------------------------------------------------------------------------------------------------ Monte Carlo
def test_mc_single_point_target_is_the_conditional_field():
    x1 = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    x = torch.randn(50, 2, generator=gen(0), dtype=torch.float64)
    for path in (CondOTPath(), CondOTPath(sigma_min=0.1), VPPath()):
        got = marginal_velocity_mc(x, 0.3, path, GaussianMixture.from_points(x1), 7, generator=gen(1))
        torch.testing.assert_close(got, path.conditional_velocity(x, 0.3, x1.expand(50, 2)))


def test_mc_converges_at_rate_one_over_sqrt_n():
    t = 0.5
    x = points(t, 200)
    u = marginal_velocity(x, t, PATH, TARGET)
    sizes = [2**k for k in range(6, 13)]
    rmse = []
    for n in sizes:
        sq = [
            ((marginal_velocity_mc(x, t, PATH, TARGET, n, gen(100 * n + r)) - u) ** 2).sum(1).mean() for r in range(4)
        ]
        rmse.append(float(torch.stack(sq).mean().sqrt()))
    log_n, log_e = torch.tensor(sizes).double().log(), torch.tensor(rmse, dtype=torch.float64).log()
    a = torch.stack([log_n, torch.ones_like(log_n)], 1)
    slope = float(torch.linalg.lstsq(a, log_e[:, None]).solution[0])
    # 4 repeats x 200 points per N: the log-RMSE scatters by a few percent, the slope by well under 0.15
    assert abs(slope + 0.5) < 0.15, (slope, rmse)
    assert rmse[-1] < 0.15  # RMSE of the exact field at N = 4096 is ~0.07 (speeds are O(5))


def test_mc_dtype_time_vector_and_determinism():
    x = points(0.7, 64).float()
    t = torch.full((64,), 0.7)
    a = marginal_velocity_mc(x, t, PATH, TARGET, 256, generator=gen(5))
    b = marginal_velocity_mc(x, 0.7, PATH, TARGET, 256, generator=gen(5))
    assert a.dtype == torch.float32 and a.shape == (64, 2)
    torch.testing.assert_close(a, b)
    # per-row times: each row equals the single-time estimate at its own t (same samples x1_k)
    ts = torch.tensor([0.2, 0.9]).repeat(32)
    c = marginal_velocity_mc(x, ts, PATH, TARGET, 256, generator=gen(5))
    d = marginal_velocity_mc(x[1::2], 0.9, PATH, TARGET, 256, generator=gen(5))
    torch.testing.assert_close(c[1::2], d)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(n_samples=0), ValueError),
        (dict(n_samples=2.5), ValueError),
        (dict(t=1.0), ValueError),  # sigma_1 = 0 for CondOT(sigma_min=0)
        (dict(t=1.5), ValueError),
        (dict(x=torch.zeros(3, 3)), ValueError),
        (dict(x=[[0.0, 0.0]]), TypeError),
        (dict(path="ot"), TypeError),
        (dict(target="eight_gaussians"), TypeError),
    ],
)
def test_mc_bad_inputs(kwargs, err):
    args = dict(x=torch.zeros(3, 2), t=0.5, path=PATH, target=TARGET, n_samples=8)
    args.update(kwargs)
    with pytest.raises(err):
        marginal_velocity_mc(**args)


# ------------------------------------------------------------------------------------------------ field error
def test_relative_field_error_of_known_fields():
    exact = ExactField(PATH, TARGET)
    assert relative_field_error(exact, 0.5, PATH, TARGET, n=512, generator=gen(0)) < 1e-5
    scaled = relative_field_error(lambda x, t: 1.2 * exact(x, t), 0.5, PATH, TARGET, n=512, generator=gen(0))
    assert scaled == pytest.approx(0.2, rel=1e-4)
    zero = relative_field_error(lambda x, t: torch.zeros_like(x), 0.5, PATH, TARGET, n=512, generator=gen(0))
    assert zero == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(velocity="model"), TypeError),
        (dict(n=0), ValueError),
        (dict(t=torch.tensor(0.5)), TypeError),
        (dict(t=2.0), ValueError),
        (dict(target=StandardNormal(3)), ValueError),
    ],
)
def test_relative_field_error_bad_inputs(kwargs, err):
    args = dict(velocity=ExactField(PATH, TARGET), t=0.5, path=PATH, target=TARGET, n=16)
    args.update(kwargs)
    with pytest.raises(err):
        relative_field_error(**args)


def test_short_training_approaches_the_exact_field():
    config = TrainConfig(steps=100, batch_size=128, hidden=64, device="cpu")
    trained = train_flow(config, progress=False).model
    untrained = build_model(config)
    for t in (0.5, 0.9):
        e_trained = relative_field_error(trained, t, PATH, TARGET, n=1024, generator=gen(2))
        e_untrained = relative_field_error(untrained, t, PATH, TARGET, n=1024, generator=gen(2))
        assert e_untrained > 0.9  # a random MLP's output is ~0 next to speeds O(5)
        assert e_trained < 0.6, (t, e_trained)


# ------------------------------------------------------------------------------------------------ exercises
def test_solution_mc_marginal_velocity(solutions):
    fn = solutions["mc_marginal_velocity"]
    t, n = 0.6, 4096
    x = points(t, 300).float()
    x1 = TARGET.sample(n, generator=gen(9))
    got = fn(x, t, x1)
    same_samples = marginal_velocity_mc(x, t, PATH, TARGET, n, generator=gen(9))
    torch.testing.assert_close(got, same_samples, atol=1e-3, rtol=1e-3)
    rmse = float((got.double() - marginal_velocity(x.double(), t, PATH, TARGET)).pow(2).sum(1).mean().sqrt())
    assert rmse < 0.2  # MC error ~ 4.5 / sqrt(4096) ~ 0.07 (see the convergence test)


def test_solution_empirical_marginal_velocity(solutions):
    fn = solutions["empirical_marginal_velocity"]
    y = torch.randn(12, 2, generator=gen(3), dtype=torch.float64) * 2
    x = torch.randn(100, 2, generator=gen(4), dtype=torch.float64) * 2
    for t in (0.0, 0.3, 0.8):
        want = marginal_velocity(x, t, PATH, GaussianMixture.from_points(y))
        torch.testing.assert_close(fn(x, t, y), want, atol=1e-6, rtol=1e-6)
    assert math.isclose(float(fn(x, 0.0, y).add(x).sub(y.mean(0)).abs().max()), 0.0, abs_tol=1e-9)
