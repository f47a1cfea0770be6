"""fmtoy.methods.discrete (chapter 11): the grid, the mixture path and its rates, the exact posterior against
brute-force Bayes, the Kolmogorov equation, the exact propagation of the sampler against its samples, and seeded
training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from fmtoy.device import make_generator
from fmtoy.methods import discrete as D

Q = D.discretise("eight_gaussians", 16, 5.0)


def exact(source="uniform", power=1.0, target=Q):
    path = D.MixturePath(target.values, source, power)
    return path, D.ExactPosterior(path, target)


@pytest.fixture(scope="module")
def small():
    """A random 3 x 3 target: small enough for brute-force Bayes."""
    probs = torch.rand(3, 3, generator=make_generator(0), dtype=torch.float64) + 0.05
    return D.GridDistribution(probs, lim=1.0)


# ----------------------------------------------------------------------------------------------- the grid
def test_grid_distribution_normalises_samples_and_scores():
    q = D.GridDistribution(torch.arange(1.0, 17.0).reshape(4, 4), lim=2.0)
    assert float(q.probs.sum()) == pytest.approx(1.0)
    x = q.sample(200_000, make_generator(1))
    freq = torch.bincount(x[:, 0] * 4 + x[:, 1], minlength=16).double() / len(x)
    assert (freq - q.probs.reshape(-1)).abs().max() < 0.003
    assert torch.allclose(q.log_prob(torch.tensor([[3, 3]])), q.probs[3, 3].log().reshape(1))
    assert q.entropy() == pytest.approx(float(-(q.probs * q.probs.log()).sum()))
    assert torch.allclose(q.centres(), torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64))
    assert torch.allclose(q.to_points(torch.tensor([[0, 3]])), torch.tensor([[-1.5, 1.5]], dtype=torch.float64))


def test_discretise_puts_the_mass_on_the_modes_and_keeps_zeros():
    assert float(Q.probs.sum()) == pytest.approx(1.0)
    a, b = divmod(int(Q.probs.argmax()), 16)
    assert abs(math.hypot(*Q.to_points(torch.tensor([[a, b]]))[0]) - 4.0) < 0.5  # on the circle of modes
    board = D.discretise("checkerboard", 8, 4.0)
    assert (board.probs == 0).sum() == 32 and torch.allclose(
        board.probs[board.probs > 0], torch.tensor(1 / 32.0, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda: D.GridDistribution(torch.ones(3, 4)), ValueError, "square"),
        (lambda: D.GridDistribution(-torch.ones(3, 3)), ValueError, ">= 0"),
        (lambda: D.GridDistribution(torch.ones(65, 65)), ValueError, "[2, 64]"),
        (lambda: D.MixturePath(16, "noise"), ValueError, "allowed: mask, uniform"),
        (lambda: D.MixturePath(16, power=0.5), ValueError, "power must be >= 1"),
        (lambda: D.MixturePath(1), ValueError, "values"),
        (lambda: D.MixturePath(4).rate_factor(1.0), ValueError, "infinite at t = 1"),
        (lambda: Q.log_prob(torch.tensor([[0.0, 1.0]])), TypeError, "integer tokens"),
        (lambda: Q.log_prob(torch.tensor([[0, 16]])), ValueError, "tokens in [0, 15]"),
        (
            lambda: D.MixturePath(4).euler_step(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 4) / 4, 0.5, 0.6),
            ValueError,
            "too long",
        ),
        (lambda: D.ExactPosterior(D.MixturePath(8), Q), ValueError, "8 values"),
        (lambda: D.propagate(D.PosteriorMLP(16), D.MixturePath(16), 2, joint=True), TypeError, "joint=True"),
        (
            lambda: D.fit_discrete(D.PosteriorMLP(16), Q, D.MixturePath(16, "mask"), steps=1, batch_size=2),
            ValueError,
            "must agree",
        ),
        (lambda: D.DiscreteConfig(values=100), ValueError, "values"),
    ],
)
def test_bad_input_is_one_clear_error(call, err, words):
    with pytest.raises(err) as info:
        call()
    assert words in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- the path
@pytest.mark.parametrize("source", D.SOURCES)
def test_conditional_path_samples_and_rates(source):
    path = D.MixturePath(5, source, power=2.0)
    k = path.conditional(0.6)
    assert torch.allclose(k.sum(0), torch.ones(5, dtype=torch.float64))
    x1 = torch.full((100_000, 2), 3, dtype=torch.long)
    xt = path.sample_xt(x1, torch.full((100_000,), 0.6), make_generator(2))
    freq = torch.bincount(xt[:, 0], minlength=path.tokens).double() / len(xt)
    assert (freq - k[:, 3]).abs().max() < 0.006
    x = path.sample_source(7, make_generator(3))
    u = path.conditional_rates(x, x1[:7], 0.6)
    assert torch.allclose(u.sum(-1), torch.zeros(7, 2, dtype=torch.float64), atol=1e-12)  # rows sum to 0
    off = u.masked_fill(F.one_hot(x, path.tokens).bool(), 0.0)
    assert (off >= 0).all() and off.max() == pytest.approx(path.rate_factor(0.6))


def test_posterior_is_brute_force_bayes(small):
    for source in D.SOURCES:
        path, ex = exact(source, 1.5, small)
        t, k = 0.4, path.conditional(0.4)
        for a, b in itertools.product(range(path.tokens), repeat=2):
            joint = torch.tensor([[small.probs[c, d] * k[a, c] * k[b, d] for d in range(3)] for c in range(3)])
            if joint.sum() == 0:
                continue
            joint = joint / joint.sum()
            got = ex(torch.tensor([[a, b]]), t)[0]
            assert torch.allclose(got[0], joint.sum(1)) and torch.allclose(got[1], joint.sum(0))
            assert torch.allclose(ex.joint_posterior_grid(t)[a, b], joint)
        assert float(ex.marginal(t).sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("source, power", [("uniform", 1.0), ("uniform", 2.0), ("mask", 1.0), ("mask", 3.0)])
def test_the_exact_marginal_rates_satisfy_the_kolmogorov_equation(source, power):
    path, ex = exact(source, power)
    for t in (0.1, 0.5, 0.9, 0.99):
        dp = ex.dmarginal(t)
        assert float((ex.flux(t) - dp).abs().max()) < 1e-12 * float(dp.abs().max())
    s0 = path.source_probs()
    assert torch.allclose(ex.marginal(0.0), s0[:, None] * s0[None, :])
    assert torch.allclose(ex.marginal(1.0)[: Q.values, : Q.values], Q.probs)


def test_rates_without_the_posterior_do_not():
    """The data marginal q^i in place of the posterior (what the rates would be if x_t said nothing about x_1)."""
    path, ex = exact()
    states, t = D.all_states(path.tokens), 0.5
    q1, q2 = Q.marginals()
    prior = torch.stack([q1, q2])[None].expand(len(states), 2, -1)
    wrong = D.apply_generator(path.rates(states, prior, t), ex.marginal(t))
    assert float((wrong - ex.dmarginal(t)).abs().max()) > 0.1 * float(ex.dmarginal(t).abs().max())


def test_monte_carlo_of_conditional_rates_is_the_marginal_rate():
    path, ex = exact()
    t = 0.5
    mc, counts = D.average_conditional_rates(path, Q, t, 1_000_000, make_generator(4))
    rate = ex.rates(D.all_states(path.tokens), t)
    f = path.rate_factor(t)
    post = rate / f + F.one_hot(D.all_states(path.tokens), path.tokens)
    var = post * (1 - post)
    se = (var / counts.clamp_min(1)[:, None, None]).sqrt() * f
    ok = (counts[:, None, None] * var) > 5
    z = ((mc - rate) / se)[ok]
    assert ok.sum() > 1000 and 0.9 < float(z.square().mean()) < 1.1


def test_kolmogorov_solve_converges_with_the_order_of_its_method():
    path, ex = exact()
    errs = {
        m: [D.total_variation(D.kolmogorov_solve(ex, n, m), Q) for n in (16, 32, 64)] for m in ("euler", "midpoint")
    }
    for m, order in (("euler", 2.0), ("midpoint", 4.0)):
        ratios = [errs[m][0] / errs[m][1], errs[m][1] / errs[m][2]]
        assert all(0.8 * order < r < 1.25 * order for r in ratios), (m, ratios)


# ----------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("source", D.SOURCES)
def test_one_step_samples_the_product_of_the_marginals(source):
    path, ex = exact(source)
    q1, q2 = Q.marginals()
    p = D.propagate(ex, path, 1)
    assert D.total_variation(p, torch.outer(q1, q2)) < 1e-12
    assert D.total_variation(p, Q) > 0.2


@pytest.mark.parametrize("source", D.SOURCES)
def test_the_factorised_sampler_converges_with_order_one(source):
    path, ex = exact(source)
    tv = [D.total_variation(D.propagate(ex, path, n), Q) for n in (8, 16, 32, 64)]
    assert all(1.8 < a / b < 2.2 for a, b in zip(tv, tv[1:])), tv
    assert float(D.propagate(ex, path, 8).sum()) == pytest.approx(1.0)


def test_the_joint_posterior_sampler_is_exact_for_linear_kappa_only():
    for source in D.SOURCES:
        path, ex = exact(source)
        assert all(D.total_variation(D.propagate(ex, path, n, joint=True), Q) < 1e-12 for n in (1, 3, 8))
        path2, ex2 = exact(source, 2.0)
        tv = [D.total_variation(D.propagate(ex2, path2, n, joint=True), Q) for n in (4, 8, 16)]
        assert tv[0] > tv[1] > tv[2] > 1e-3


def test_propagate_is_the_law_of_sample_ctmc():
    path, ex = exact("mask", 2.0)
    n = 200_000
    x = D.sample_ctmc(ex, path, path.sample_source(n, make_generator(5)), 4, make_generator(6))
    tk = path.tokens
    freq = torch.bincount(x[:, 0] * tk + x[:, 1], minlength=tk * tk).double().reshape(tk, tk) / n
    p = D.propagate(ex, path, 4)
    assert float(p[tk - 1].sum()) > 0.01  # kappa = t^2: Euler leaves some tokens masked at t = 1
    assert D.total_variation(freq, p) < 0.03 < D.total_variation(freq, D.propagate(ex, path, 8))
    traj = D.sample_ctmc(ex, path, x[:5], 3, make_generator(7), return_trajectory=True)
    assert traj.shape == (4, 5, 2) and torch.equal(traj[0], x[:5])


def test_sampling_is_reproducible_from_the_seed():
    path, ex = exact()
    runs = [D.sample_ctmc(ex, path, path.sample_source(50, make_generator(8)), 5, make_generator(9)) for _ in (0, 1)]
    assert torch.equal(*runs)


def test_distances():
    path, ex = exact()
    assert D.total_variation(ex.marginal(1.0), Q) < 1e-12 and abs(D.kl_divergence(Q, ex.marginal(1.0))) < 1e-12
    p = D.propagate(ex, path, 4)
    kl = D.kl_divergence(Q, p)
    assert kl > 0 and kl == pytest.approx(float((Q.probs * (Q.probs / p).log()).sum()))
    zero = p.clone()
    zero[0, 0] = 0.0
    assert D.kl_divergence(Q, zero) == math.inf


# ----------------------------------------------------------------------------------------------- training
def test_a_short_seeded_run_is_reproducible_and_beats_the_untrained_network():
    config = D.DiscreteConfig(values=16, steps=300, batch_size=128, hidden=64, seed=3)
    runs = [D.train_discrete(config) for _ in (0, 1)]
    assert runs[0].losses == runs[1].losses
    target, path = config.build()
    untrained = D.PosteriorMLP(16, hidden=64)
    tv = [D.total_variation(D.propagate(m, path, 16), target) for m in (untrained, runs[0].model)]
    assert tv[1] < 0.5 * tv[0]
    assert runs[0].final(last=50) < runs[0].losses[0]


def test_the_masked_loss_ignores_unmasked_coordinates():
    path = D.MixturePath(16, "mask")
    model = D.PosteriorMLP(16, 17, hidden=32)
    x1 = torch.tensor([[1, 2], [3, 4]])
    t = torch.tensor([0.5, 0.5])
    unmasked = D.discrete_fm_loss(model, x1, x1.clone(), t, path)
    assert float(unmasked.detach()) == 0.0
    half = torch.tensor([[16, 2], [3, 16]])
    logits = model(half, t)
    want = 0.5 * (F.cross_entropy(logits[0, 0][None], x1[0, :1]) + F.cross_entropy(logits[1, 1][None], x1[1, 1:]))
    assert float(D.discrete_fm_loss(model, x1, half, t, path).detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_the_monte_carlo_check_sees_rates_of_the_wrong_time():
    class Late(D.ExactPosterior):
        def rates(self, x, t):
            return super().rates(x, t + 0.05)

    path = D.MixturePath(16)
    right = D.monte_carlo_rate_check(D.ExactPosterior(path, Q), 0.5, 400_000, make_generator(11))
    wrong = D.monte_carlo_rate_check(Late(path, Q), 0.5, 400_000, make_generator(11))
    assert 0.9 < right["mean z^2"] < 1.1 and wrong["mean z^2"] > 2
