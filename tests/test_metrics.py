"""Metrics: W2 against brute force and closed forms, unbiasedness of the energy distance and MMD, NLL gap = KL for
Gaussian flows, straightness and kinetic energy of analytic trajectories."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fmtoy.data import GaussianMixture, StandardNormal
from fmtoy.device import make_generator as gen  # a seeded CPU generator
from fmtoy.metrics import energy_distance, kinetic_energy, mmd, nll, nll_gap, straightness, w2

F64 = torch.float64


def normal(n, d=2, seed=0, shift=0.0):
    return torch.randn(n, d, generator=gen(seed), dtype=F64) + torch.as_tensor(shift, dtype=F64)


# ----------------------------------------------------------------------------------------------- w2
def test_w2_zero_for_same_set_and_permutation():
    x = normal(200)
    assert w2(x, x) == 0.0
    assert w2(x, x[torch.randperm(200, generator=gen(1))]) == 0.0


def test_w2_of_shifted_set_is_shift_length():
    # sum_i |x_i - x_p(i) - s|^2 = sum_i |x_i - x_p(i)|^2 + n |s|^2 (cross term sums to 0): identity is optimal
    x, shift = normal(300), torch.tensor([3.0, -4.0], dtype=F64)
    assert w2(x, x + shift) == pytest.approx(5.0, abs=1e-9)
    assert w2(x.float(), x.float() + shift.float()) == pytest.approx(5.0, abs=1e-5)


def test_w2_matches_brute_force_and_is_symmetric():
    x, y = normal(6, seed=2), normal(6, seed=3, shift=0.5)
    cost = torch.cdist(x, y) ** 2
    best = min(sum(cost[i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
    assert w2(x, y) == pytest.approx(math.sqrt(best / 6), rel=1e-12)
    assert w2(y, x) == pytest.approx(w2(x, y), rel=1e-12)


def test_w2_in_one_dimension_is_sorted_matching():
    x, y = normal(500, d=1, seed=4), normal(500, d=1, seed=5, shift=1.0) * 2
    sorted_match = (x.sort(0).values - y.sort(0).values).square().mean().sqrt().item()
    assert w2(x, y) == pytest.approx(sorted_match, rel=1e-10)


# ----------------------------------------------------------------------------------------------- energy / mmd
def repeated(stat, n, reps, shift=0.0, d=2, **kw):
    vals = torch.tensor(
        [stat(normal(n, d, seed=2 * r), normal(n, d, seed=2 * r + 1, shift=shift), **kw) for r in range(reps)]
    )
    return vals.mean().item(), vals.std().item() / math.sqrt(reps)


def test_energy_distance_is_unbiased_for_equal_distributions():
    # small sets make the V-statistic's bias (E|X - X'| / n ~ 0.09) 20x the standard error of the mean below
    mean, stderr = repeated(energy_distance, n=20, reps=400)
    assert abs(mean) < 4 * stderr
    assert stderr < 0.005


def test_energy_distance_matches_closed_form_for_shifted_gaussians():
    # 1D, X ~ N(0,1), Y ~ N(mu,1): E|X-Y| = E|N(mu, 2)|, E|X-X'| = E|Y-Y'| = 2 / sqrt(pi)
    mu = 1.0
    e_xy = math.sqrt(2) * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / 4) + mu * math.erf(mu / 2)
    expect = 2 * e_xy - 4 / math.sqrt(math.pi)
    mean, stderr = repeated(energy_distance, n=200, reps=20, shift=mu, d=1)
    assert abs(mean - expect) < 4 * stderr
    assert expect > 20 * stderr


def test_energy_distance_is_symmetric_and_positive_for_shifted():
    x, y = normal(300, seed=1), normal(400, seed=2, shift=[2.0, 0.0])
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-12)
    assert energy_distance(x, y) > 1.0


@pytest.mark.parametrize("h", [0.5, 2.0])
def test_mmd_matches_closed_form(h):
    # X ~ N(0, I), Y ~ N(delta, I): E k(X, Y) = c exp(-|delta|^2 / (2 (h^2 + 2))), c = (h^2 / (h^2 + 2))^{d/2}
    delta = torch.tensor([1.0, 0.5])
    c = (h * h / (h * h + 2)) ** (2 / 2)
    expect = 2 * c * (1 - math.exp(-delta.square().sum().item() / (2 * (h * h + 2))))
    mean, stderr = repeated(mmd, n=150, reps=20, shift=delta.tolist(), bandwidth=h)
    assert abs(mean - expect) < 4 * stderr and expect > 10 * stderr
    mean0, stderr0 = repeated(mmd, n=20, reps=200, bandwidth=h)
    assert abs(mean0) < 4 * stderr0
    x, y = normal(50, seed=7), normal(60, seed=8)
    assert mmd(x, y, bandwidth=h) == pytest.approx(mmd(y, x, bandwidth=h), rel=1e-12)


# ----------------------------------------------------------------------------------------------- likelihood
M, S = torch.tensor([1.5, -0.5]), 0.6


def gaussian_flow(m):
    """CondOT marginal field N(0, I) -> N(m, s^2 I): u_t(x) = m + (t s^2 - (1-t)) / ((1-t)^2 + t^2 s^2) (x - t m)."""

    def field(x, t):
        t, mm = t[:, None], m.to(x.dtype)
        return mm + (t * S**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * S**2) * (x - t * mm)

    return field


TARGET = GaussianMixture([1.0], [M.tolist()], [[[S**2, 0.0], [0.0, S**2]]])


def test_nll_of_exact_flow_matches_closed_form():
    x = TARGET.sample(300, gen(0)).double()
    assert nll(gaussian_flow(M), x, StandardNormal()) == pytest.approx(-TARGET.log_prob(x).mean().item(), abs=1e-4)


def test_nll_gap_is_zero_for_exact_model_and_kl_for_wrong_one():
    entropy = 0.5 * 2 * math.log(2 * math.pi * math.e * S**2)  # H[N(m, s^2 I_2)]
    exact = nll_gap(gaussian_flow(M), TARGET, n=2000, generator=gen(1), steps=20)
    assert set(exact) == {"nll", "entropy", "gap", "gap_stderr"}
    assert abs(exact["gap"]) < 1e-3
    assert abs(exact["entropy"] - entropy) < 4 / math.sqrt(2000)  # std of log q is sqrt(d/2) = 1
    assert exact["nll"] == pytest.approx(exact["entropy"] + exact["gap"], abs=1e-9)
    # model = exact flow to N(m', s^2 I): gap estimates KL(q || p) = |m - m'|^2 / (2 s^2)
    m_wrong = M + torch.tensor([0.3, 0.0])
    wrong = nll_gap(gaussian_flow(m_wrong), TARGET, n=2000, generator=gen(2), steps=20)
    kl = (M - m_wrong).square().sum().item() / (2 * S**2)
    assert abs(wrong["gap"] - kl) < 4 * wrong["gap_stderr"]
    assert kl > 10 * wrong["gap_stderr"]


# ----------------------------------------------------------------------------------------------- paths
def rotation_trajectory(omega, steps=1000, n=50):
    x0 = normal(n, seed=9)
    t = torch.linspace(0, 1, steps + 1, dtype=F64)[:, None, None]
    c, s = torch.cos(omega * t), torch.sin(omega * t)
    return torch.cat([c * x0[:, :1] - s * x0[:, 1:], s * x0[:, :1] + c * x0[:, 1:]], dim=2), x0


def test_straightness_and_energy_of_straight_constant_speed_paths():
    x0, x1 = normal(40, seed=1), normal(40, seed=2, shift=3.0)
    t = torch.linspace(0, 1, 11, dtype=F64)[:, None, None]
    traj = (1 - t) * x0 + t * x1
    assert straightness(traj) == pytest.approx(0.0, abs=1e-20)
    assert kinetic_energy(traj) == pytest.approx((x1 - x0).square().sum(1).mean().item(), rel=1e-12)
    v = torch.tensor([[0.6, -0.8, 2.0]], dtype=F64)
    assert kinetic_energy(t * v) == pytest.approx(v.square().sum().item(), rel=1e-12)  # |v|^2
    assert straightness(t * v) == pytest.approx(0.0, abs=1e-20)


def test_straightness_and_energy_of_rotation():
    # x_t = R(w t) x_0: E = w^2 E|x_0|^2, S = E = w^2 E|x_0|^2 - E|x_1 - x_0|^2 = (w^2 - 2 + 2 cos w) E|x_0|^2
    omega = math.pi / 2
    traj, x0 = rotation_trajectory(omega)
    r2 = x0.square().sum(1).mean().item()
    assert kinetic_energy(traj) == pytest.approx(omega**2 * r2, rel=1e-5)
    assert straightness(traj) == pytest.approx((omega**2 - 2 + 2 * math.cos(omega)) * r2, rel=1e-4)
    assert straightness(traj) > 0.4 * r2


# ----------------------------------------------------------------------------------------------- bad inputs
X = torch.zeros(5, 2)


@pytest.mark.parametrize("fn", [w2, energy_distance, mmd])
@pytest.mark.parametrize(
    "x,y,err,match",
    [
        (X, torch.zeros(5, 3), ValueError, "same dimension"),
        (torch.zeros(5), X, ValueError, r"x must have shape \(n, d\)"),
        (X, [[0.0, 0.0]], TypeError, "y must be a torch.Tensor"),
        (X, torch.zeros(5, 2, dtype=torch.int64), TypeError, "floating-point"),
    ],
)
def test_set_metrics_reject_bad_inputs(fn, x, y, err, match):
    with pytest.raises(err, match=match):
        fn(x, y)


@pytest.mark.parametrize(
    "x,y,match",
    [
        (torch.zeros(5, 2), torch.zeros(6, 2), "equal-size"),
        (torch.zeros(10_001, 2), torch.zeros(10_001, 2), "O\\(n\\^3\\)"),
    ],
)
def test_w2_rejects_unequal_or_huge_sets(x, y, match):
    with pytest.raises(ValueError, match=match):
        w2(x, y)


@pytest.mark.parametrize("fn", [energy_distance, mmd])
def test_u_statistics_need_two_points(fn):
    with pytest.raises(ValueError, match="at least 2 points"):
        fn(torch.zeros(1, 2), X)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("inf"), "median"])
def test_mmd_rejects_bad_bandwidth(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(X, X, bandwidth=bandwidth)


@pytest.mark.parametrize("fn", [straightness, kinetic_energy])
@pytest.mark.parametrize(
    "traj,err",
    [
        (torch.zeros(5, 2), ValueError),
        (torch.zeros(1, 5, 2), ValueError),
        (torch.zeros(3, 5, 2, dtype=torch.int64), TypeError),
        ([[[0.0]]], TypeError),
    ],
)
def test_path_metrics_reject_bad_trajectories(fn, traj, err):
    with pytest.raises(err, match="trajectory"):
        fn(traj)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(n=1), ValueError, "n must be >= 2"),
        (dict(n=0), ValueError, "n must be a positive integer"),
        (dict(target="eight_gaussians"), TypeError, "target must be"),
        (dict(steps=0), ValueError, "steps"),
        (dict(method="rk45"), ValueError, "allowed: euler, midpoint, rk4"),
    ],
)
def test_nll_gap_rejects_bad_inputs(kwargs, err, match):
    args = dict(velocity=gaussian_flow(M), target=TARGET, n=10)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        nll_gap(**args)


def test_noise_floor_is_the_distance_between_two_samples_of_the_target():
    from fmtoy.data import eight_gaussians
    from fmtoy.metrics import noise_floor

    q = eight_gaussians()
    ref = q.sample(1000, gen(1)).double()
    mean, sd = noise_floor(q, ref, draws=4, seed=5)
    assert abs(mean) < 3 * sd + 1e-3 and 0 < sd < 0.02  # unbiased: centred on 0, spread ~ 1/n
    shifted = noise_floor(q, ref + 1.0, draws=4, seed=5)[0]  # a wrong reference reads far above the floor
    assert shifted > mean + 20 * sd
    with pytest.raises(ValueError, match="draws must be >= 2"):
        noise_floor(q, ref, draws=1)


def test_spread_over_seeds_claims_seed_by_seed():
    import pickle

    from fmtoy.metrics import Spread, across_seeds
    from fmtoy.viz import markdown_table

    a = across_seeds(lambda s: {"fast": [0.10, 0.12, 0.30][s], "slow": [0.20, 0.22, 0.25][s]})
    fast, slow = a["fast"], a["slow"]
    assert fast.values == (0.10, 0.12, 0.30) and fast.seeds == (0, 1, 2)
    assert fast == pytest.approx(0.17333333) and fast.sd == pytest.approx(0.1101514)
    assert fast < slow  # the means say "fast is better" ...
    assert not fast.below(slow) and not slow.below(fast)  # ... the seeds disagree (seed 2): no claim either way
    assert fast.below(0.31) and not fast.above(0.1) and slow.above(0.19)
    assert format(fast, ".2f") == "0.17 ± 0.11" and "0.173 ± 0.110" in markdown_table(["m", "v"], [["f", fast]])
    assert pickle.loads(pickle.dumps(fast)).values == fast.values
    units = fast.in_floor_units((0.1, 0.01))
    assert units.values == pytest.approx((0.0, 2.0, 20.0))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Spread([1.0])
    with pytest.raises(ValueError, match="same seeds"):
        fast.below(across_seeds(lambda s: 0.2, seeds=(5, 6, 7)))
    with pytest.raises(ValueError, match="same keys"):
        across_seeds(lambda s: {"a": 1.0} if s else {"b": 1.0})


def test_paired_error_and_switched_modes():
    from fmtoy.data import eight_gaussians
    from fmtoy.metrics import nearest_mode, paired_error, switched_modes

    q = eight_gaussians()
    x = q.means[[0, 1, 2, 3]].double() + 0.1
    y = q.means[[0, 1, 5, 3]].double()
    assert switched_modes(x, y, q) == 0.25 and nearest_mode(x, q).tolist() == [0, 1, 2, 3]
    assert paired_error(x, x + torch.tensor([3.0, 4.0], dtype=torch.float64)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="same shape"):
        paired_error(x, y[:2])
    with pytest.raises(TypeError, match="GaussianMixture"):
        switched_modes(x, y, object())
