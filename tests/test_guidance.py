"""Tests for fmtoy.methods.guidance (chapter 8) and the labelled target fmtoy.data.LabelledMixture: the class prior and
conditionals, the velocity-score conversion against autograd, the exact class field against Monte Carlo, the exact
classifier (Bayes, calibration), CFG = classifier guidance, the tilted target and why CFG does not sample it, the
guidance scores, the class-conditional network and a short seeded training run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_model

from fmtoy.data import GaussianMixture, LabelledMixture, labelled_gaussians
from fmtoy.device import make_generator as gen
from fmtoy.marginal import marginal_distribution, marginal_log_prob, marginal_velocity
from fmtoy.methods.guidance import (
    ClassConditionalMLP,
    GuidanceConfig,
    GuidedField,
    SampleKL,
    cfg_velocity,
    class_posterior,
    classifier_guidance_velocity,
    conditional_log_prob,
    conditional_velocity,
    flow_log_density,
    grid,
    grid_kl,
    guidance_scores,
    normalise_on_grid,
    sample_guided,
    sample_kl,
    score_coefficients,
    score_from_velocity,
    tilted_log_density,
    train_guidance,
    velocity_from_score,
)
from fmtoy.paths import CondOTPath, get_path
from fmtoy.teaching.checks import marginal_velocity_mc

D64 = torch.float64
TARGET = labelled_gaussians()
OT = CondOTPath()
PATHS = ("ot", "vp", "ve")
PURITY = "purity"  # guidance_scores: the mean exact classifier q(c | x) on the samples
IN_DISC = 1 - math.exp(-4.5)  # P(chi^2_2 < 9): a 2D Gaussian sample within 3 sds (Mahalanobis) of its own mean


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def random_mixture(seed: int = 0) -> LabelledMixture:
    """Five anisotropic components, three classes with unequal priors (labels not sorted)."""
    g = gen(seed)
    a = torch.randn(5, 2, 2, generator=g, dtype=D64)
    covs = a @ a.transpose(1, 2) * 0.3 + 0.2 * torch.eye(2, dtype=D64)
    means = 3 * torch.randn(5, 2, generator=g, dtype=D64)
    return LabelledMixture(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), means, covs, [2, 0, 1, 0, 2])


def points(n: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, 2, generator=gen(seed), dtype=D64)


# ----------------------------------------------------------------------------------------------- the labelled target
@pytest.mark.parametrize("target", [TARGET, random_mixture()], ids=["labelled_gaussians", "random"])
def test_class_prior_and_conditionals(target):
    prior = target.class_prior
    assert prior.shape == (target.n_classes,) and float(prior.sum()) == pytest.approx(1.0, abs=1e-12)
    for c in range(target.n_classes):
        mask = target.labels == c
        assert float(prior[c]) == pytest.approx(float(target.weights[mask].sum()), abs=1e-12)
        cond = target.conditional(c)
        assert cond.n_components == int(mask.sum())
        torch.testing.assert_close(cond.means, target.means[mask], rtol=0, atol=0)
        torch.testing.assert_close(cond.covs, target.covs[mask], rtol=0, atol=0)
        assert float(cond.weights.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(cond.weights, target.weights[mask] / prior[c], rtol=1e-12, atol=0)


def test_random_mixture_prior_is_the_normalised_class_weight():
    prior = random_mixture().class_prior  # weights 1..5 / 15, labels [2, 0, 1, 0, 2]
    torch.testing.assert_close(prior, torch.tensor([2 + 4, 3, 1 + 5], dtype=D64) / 15, rtol=1e-12, atol=0)
    torch.testing.assert_close(TARGET.class_prior, torch.tensor([0.5, 0.5], dtype=D64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("target", [TARGET, random_mixture()], ids=["labelled_gaussians", "random"])
def test_mixture_density_is_the_prior_average_of_the_class_densities(target):
    x = points(300, seed=1)
    cls = target.class_log_probs(x)
    assert cls.shape == (300, target.n_classes) and cls.dtype == D64
    for c in range(target.n_classes):
        torch.testing.assert_close(cls[:, c], target.conditional(c).log_prob(x), rtol=0, atol=0)
    total = torch.logsumexp(cls + target.class_prior.log(), dim=1)
    torch.testing.assert_close(total, target.log_prob(x), rtol=0, atol=1e-10)


def test_sample_labelled_is_reproducible_and_its_labels_follow_the_prior():
    target, n = random_mixture(), 20000
    x, c = target.sample_labelled(n, gen(3))
    x2, c2 = target.sample_labelled(n, gen(3))
    assert x.shape == (n, 2) and x.dtype == torch.float32 and c.shape == (n,) and c.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(c, c2)
    x3, c3 = target.sample_labelled(n, gen(4))
    assert not torch.equal(c, c3) and not torch.equal(x, x3)
    assert torch.equal(x, target.sample(n, generator=gen(3)))  # the same draws as GaussianMixture.sample
    freq = torch.bincount(c, minlength=target.n_classes).double() / n
    se = (target.class_prior * (1 - target.class_prior) / n).sqrt()
    assert ((freq - target.class_prior).abs() < 4 * se).all(), (freq, target.class_prior)


def test_a_labelled_sample_lies_in_its_own_class():
    n, std = 6000, 0.5
    x, c = TARGET.sample_labelled(n, gen(5))
    x = x.double()
    d2 = ((x[:, None, :] - TARGET.means[None]) ** 2).sum(-1) / std**2  # squared Mahalanobis, (n, K)
    own = TARGET.labels[None, :] == c[:, None]
    inf = torch.tensor(math.inf, dtype=D64)
    near_own = torch.where(own, d2, inf).min(1).values
    near_other = torch.where(~own, d2, inf).min(1).values
    # within 3 sds of a component of its class: at least P(chi^2_2 < 9) (its own component), up to 4 standard errors
    within = (near_own < 9).double().mean()
    assert within > IN_DISC - 4 * math.sqrt(IN_DISC * (1 - IN_DISC) / n), within
    # nearest component of the other class: at most the union bound over other-class components, equal weights,
    # P(closer to m_j than to m_k) = Phi(-|m_j - m_k| / (2 std))
    dist = torch.cdist(TARGET.means, TARGET.means)
    other = TARGET.labels[:, None] != TARGET.labels[None, :]
    bound = sum(normal_cdf(-float(d) / (2 * std)) for d in dist[other]) / TARGET.n_components
    wrong = (near_other < near_own).double().mean()
    assert 0.0 < bound < 0.1
    assert wrong < bound + 4 * math.sqrt(bound * (1 - bound) / n), (wrong, bound)


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, 0, 0, 1, 1], "one entry per component"),
        ([[0, 0, 0, 1, 1, 1]], "one entry per component"),
        ([0, 0, 0, 2, 2, 2], "every class"),  # class 1 missing
        ([1, 1, 1, 2, 2, 2], "every class"),  # class 0 missing
        ([0, 0, 0, 0, 0, 0], "C >= 2"),  # a single class
        ([-1, 0, 0, 1, 1, 1], "every class"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        LabelledMixture(TARGET.weights, TARGET.means, TARGET.covs, labels)


def test_fractional_labels_are_refused_not_truncated():
    with pytest.raises(ValueError, match="labels must be integers"):
        LabelledMixture(TARGET.weights, TARGET.means, TARGET.covs, [0, 0.7, 0, 1, 1, 1])


def test_sample_labelled_refuses_a_generator_that_is_not_one():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        TARGET.sample_labelled(10, generator=5)


def test_labelled_point_masses_need_their_labels():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lm = LabelledMixture.from_points(pts, [0, 1, 1])
    assert lm.is_empirical and lm.class_prior.tolist() == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(TypeError, match="needs one class label per point"):
        LabelledMixture.from_points(pts)


def test_guidance_scores_use_the_chi_square_of_the_dimension():
    d = 10  # within 3 sds in 10D: P(chi^2_10 < 9) = 0.47, so a 2D formula would call every mode empty
    lm = LabelledMixture(
        torch.ones(2), torch.stack([torch.zeros(d), 10 * torch.ones(d)]), torch.eye(d).expand(2, d, d), [0, 1]
    )
    s = guidance_scores(lm.conditional(0).sample(4000, gen(0)), lm, 0)
    inside = float(torch.special.gammainc(torch.tensor(5.0, dtype=D64), torch.tensor(4.5, dtype=D64)))
    assert s["coverage"] == 1.0 and abs(s["in modes"] - inside) < 4 * math.sqrt(inside * (1 - inside) / 4000)


def test_non_numeric_labels_are_a_type_error():
    with pytest.raises(TypeError, match="labels must be integers"):
        LabelledMixture(TARGET.weights, TARGET.means, TARGET.covs, "abcdef")


@pytest.mark.parametrize("c", [2, -1, True, 0.0, None, "0"])
def test_bad_class_index(c):
    with pytest.raises(ValueError, match=r"class must be an int in \[0, 1\]"):
        TARGET.conditional(c)
    with pytest.raises(ValueError, match=r"class must be an int in \[0, 1\]"):
        TARGET.check_class(c)


# ----------------------------------------------------------------------------------------------- velocity and score
@pytest.mark.parametrize("name", PATHS)
def test_velocity_score_round_trip(name):
    path, x, u = get_path(name), points(50, 2), points(50, 3)
    for t in (0.1, 0.5, 0.9, torch.linspace(0.1, 0.9, 50, dtype=D64)):
        s = score_from_velocity(u, x, t, path)
        torch.testing.assert_close(velocity_from_score(s, x, t, path), u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(score_from_velocity(velocity_from_score(u, x, t, path), x, t, path), u)


def test_condot_coefficients():
    t = torch.tensor([0.05, 0.3, 0.5, 0.99], dtype=D64)
    a, b = score_coefficients(OT, t)
    torch.testing.assert_close(a[:, 0], 1 / t, rtol=1e-14, atol=0)
    torch.testing.assert_close(b[:, 0], (1 - t) / t, rtol=1e-12, atol=1e-14)
    a, b = score_coefficients(CondOTPath(sigma_min=0.1), 0.5)  # b = sigma_t / t, sigma_t = 1 - 0.9 t
    assert (float(a), float(b)) == pytest.approx((2.0, 0.55 / 0.5), rel=1e-14)


@pytest.mark.parametrize("name", PATHS)
def test_score_of_the_exact_field_is_the_gradient_of_log_p_t(name):
    path = get_path(name)
    for t in (0.2, 0.5, 0.9):
        x = marginal_distribution(t, path, TARGET).sample(100, generator=gen(7)).double().requires_grad_(True)
        (grad,) = torch.autograd.grad(marginal_log_prob(x, t, path, TARGET).sum(), x)
        score = score_from_velocity(marginal_velocity(x.detach(), t, path, TARGET), x.detach(), t, path)
        torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-8 * float(grad.abs().max()))
        for c in (0, 1):  # and the class field with the class score log p_t(x | c)
            (grad_c,) = torch.autograd.grad(conditional_log_prob(x, t, path, TARGET, c).sum(), x)
            score_c = score_from_velocity(conditional_velocity(x.detach(), t, path, TARGET, c), x.detach(), t, path)
            torch.testing.assert_close(score_c, grad_c, rtol=1e-8, atol=1e-8 * float(grad_c.abs().max()))


def test_conversion_at_alpha_zero_is_refused():
    x = points(4)
    for call in (
        lambda: score_coefficients(OT, 0.0),
        lambda: score_coefficients(OT, torch.tensor([0.5, 0.0])),
        lambda: score_from_velocity(x, x, 0.0, OT),
        lambda: velocity_from_score(x, x, 0.0, OT),
    ):
        with pytest.raises(ValueError, match="alpha_t = 0"):
            call()


# ----------------------------------------------------------------------------------------------- the exact fields
def test_conditional_velocity_agrees_with_monte_carlo():
    t, c, reps, n_mc = 0.5, 0, 32, 2048
    cond = TARGET.conditional(c)
    x = marginal_distribution(t, OT, cond).sample(64, generator=gen(0)).double()
    est = torch.stack([marginal_velocity_mc(x, t, OT, cond, n_mc, gen(100 + r)) for r in range(reps)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    # 128 coordinates, each a mean of 32 independent estimates (t with 31 dof): P(|t| > 5) ~ 2e-5 per coordinate;
    # the self-normalised estimator's O(1 / n_mc) bias is ~ sqrt(reps / n_mc) ~ 0.1 standard errors
    z = (mean - conditional_velocity(x, t, OT, TARGET, c)) / se
    assert z.abs().max() < 5, z.abs().max()
    for wrong in (conditional_velocity(x, t, OT, TARGET, 1 - c), marginal_velocity(x, t, OT, TARGET)):
        assert ((mean - wrong) / se).abs().max() > 20  # the check tells the class field from the others


def test_class_posterior_is_a_probability_and_is_bayes():
    x = points(400, 8)
    for name in PATHS:
        path = get_path(name)
        for t in (0.3, 0.8):
            post = class_posterior(x, t, path, TARGET)
            assert post.shape == (400, 2) and post.dtype == D64
            assert ((post >= 0) & (post <= 1 + 1e-12)).all()  # exp(logit - logsumexp) summed: ~1e-14 rounding
            torch.testing.assert_close(post.sum(1), torch.ones(400, dtype=D64), rtol=0, atol=1e-12)
            logits = torch.stack([conditional_log_prob(x, t, path, TARGET, c) for c in (0, 1)], 1)
            bayes = torch.softmax(logits + TARGET.class_prior.log(), dim=1)
            torch.testing.assert_close(post, bayes, rtol=0, atol=1e-10)
    target = random_mixture()  # three classes, unequal priors
    post = class_posterior(x, 0.7, OT, target)
    logits = torch.stack([conditional_log_prob(x, 0.7, OT, target, c) for c in range(3)], 1)
    torch.testing.assert_close(post, torch.softmax(logits + target.class_prior.log(), 1), rtol=0, atol=1e-10)


def test_class_posterior_near_t0_is_the_prior():
    x = 6 * torch.rand(500, 2, generator=gen(2), dtype=D64) - 3  # the box [-3, 3]^2
    # log p_t(x | k) - log p_t(x | j) = t x.(m_k - m_j) / var + O(t^2) with var ~ 1, |x| <= 4.25, |m_k - m_j| <= 6:
    # the class log-odds move by <= 0.026 at t = 1e-3, the posterior by a quarter of that
    assert (class_posterior(x, 1e-3, OT, TARGET) - 0.5).abs().max() < 0.01
    assert (class_posterior(x, 0.6, OT, TARGET) - 0.5).abs().max() > 0.4  # not the prior once classes separate


def calibration_z(p: torch.Tensor, hit: torch.Tensor, bins: int = 10, min_count: int = 20) -> list[float]:
    """(frequency - mean prediction) / standard error in each populated bin of p; given x the labels are independent
    Bernoulli(p_i) if p is calibrated, so the count in a bin has variance sum p_i (1 - p_i)."""
    idx = (p * bins).long().clamp(max=bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if int(m.sum()) < min_count:
            continue
        se = float((p[m] * (1 - p[m])).sum().sqrt()) / int(m.sum())
        out.append((float(hit[m].double().mean()) - float(p[m].mean())) / se)
    return out


def test_class_posterior_is_calibrated():
    n, t = 4000, 0.6
    g = gen(1)
    x1, c = TARGET.sample_labelled(n, g)
    x0 = torch.randn(n, 2, generator=g)
    xt = (t * x1 + (1 - t) * x0).double()  # x_t ~ p_t(x | c) along CondOT (sigma_min = 0)
    z = calibration_z(class_posterior(xt, t, OT, TARGET)[:, 0], c == 0)
    assert len(z) >= 8 and max(abs(v) for v in z) < 4, z
    # a classifier of the wrong time is not calibrated here: the check can fail
    for wrong_t in (0.3, 0.9):
        z = calibration_z(class_posterior(xt, wrong_t, OT, TARGET)[:, 0], c == 0)
        assert max(abs(v) for v in z) > 4, (wrong_t, z)


# ----------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("name", PATHS)
def test_cfg_endpoints_and_classifier_guidance(name):
    path, x = get_path(name), points(200, 9)
    for t in (0.3, 0.8):
        u = marginal_velocity(x, t, path, TARGET)
        for c in (0, 1):
            uc = conditional_velocity(x, t, path, TARGET, c)
            torch.testing.assert_close(cfg_velocity(x, t, path, TARGET, c, 0), u, rtol=0, atol=0)
            torch.testing.assert_close(cfg_velocity(x, t, path, TARGET, c, 1.0), uc, rtol=0, atol=0)
            for w in (-1.0, 0.5, 2.0, 4.0):
                cfg = cfg_velocity(x, t, path, TARGET, c, w)
                torch.testing.assert_close(cfg, (1 - w) * u + w * uc, rtol=1e-12, atol=1e-12)
                cg = classifier_guidance_velocity(x, t, path, TARGET, c, w)
                torch.testing.assert_close(cg, cfg, rtol=1e-8, atol=1e-8 * float(cfg.abs().max()))
        assert (cfg_velocity(x, t, path, TARGET, 0, 3.0) - cfg_velocity(x, t, path, TARGET, 1, 3.0)).abs().max() > 0.1


def test_classifier_guidance_keeps_the_dtype_and_needs_no_grad():
    x = points(20, 4).float()
    with torch.no_grad():
        v = classifier_guidance_velocity(x, 0.5, OT, TARGET, 1, 2.0)
    assert v.dtype == torch.float32 and not v.requires_grad
    torch.testing.assert_close(v, cfg_velocity(x, 0.5, OT, TARGET, 1, 2.0), rtol=1e-5, atol=1e-4)


def test_guided_field_uses_w_inside_its_interval_only():
    x = points(30, 10)
    field = GuidedField(TARGET, 1, 3.0, interval=(0.2, 0.7))
    assert [field.weight_at(t) for t in (0.0, 0.1, 0.2, 0.5, 0.7, 0.9)] == [1.0, 1.0, 3.0, 3.0, 3.0, 1.0]
    for t in (0.1, 0.9):
        torch.testing.assert_close(field(x, t), conditional_velocity(x, t, OT, TARGET, 1), rtol=0, atol=0)
    for t in (0.3, torch.full((30,), 0.5, dtype=D64)):
        torch.testing.assert_close(field(x, t), cfg_velocity(x, t, OT, TARGET, 1, 3.0), rtol=0, atol=0)
    vp = get_path("vp")
    everywhere = GuidedField(TARGET, 0, 2.0, path=vp)
    torch.testing.assert_close(everywhere(x, 0.05), cfg_velocity(x, 0.05, vp, TARGET, 0, 2.0), rtol=0, atol=0)
    assert GuidedField(TARGET, 0, 2.0).path.name == "ot"


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf, "2", None, True, torch.tensor(2.0)])
def test_bad_guidance_weight(w):
    x = points(3)
    with pytest.raises(ValueError, match="guidance weight w must be a finite number"):
        cfg_velocity(x, 0.5, OT, TARGET, 0, w)
    with pytest.raises(ValueError, match="guidance weight w must be a finite number"):
        classifier_guidance_velocity(x, 0.5, OT, TARGET, 0, w)
    with pytest.raises(ValueError, match="guidance weight w must be a finite number"):
        GuidedField(TARGET, 0, w)
    with pytest.raises(ValueError, match="guidance weight w must be a finite number"):
        tilted_log_density(x, TARGET, 0, w)


@pytest.mark.parametrize(
    "interval, match",
    [
        ((0.5, 0.2), "0 <= lo < hi <= 1"),
        ((0.3, 0.3), "0 <= lo < hi <= 1"),
        ((-0.1, 0.5), "0 <= lo < hi <= 1"),
        ((0.0, 1.5), "0 <= lo < hi <= 1"),
        ((0.1,), "two numbers"),
        ((0.1, 0.2, 0.3), "two numbers"),
        (("a", "b"), "two numbers"),
        (None, "two numbers"),
    ],
)
def test_bad_interval(interval, match):
    with pytest.raises(ValueError, match=match):
        GuidedField(TARGET, 0, 2.0, interval=interval)
    with pytest.raises(ValueError, match=match):
        small_model(0, ClassConditionalMLP, n_classes=2).guided(0, 2.0, interval=interval)


def test_exact_fields_need_a_labelled_target():
    plain = GaussianMixture(TARGET.weights, TARGET.means, TARGET.covs)
    with pytest.raises(TypeError, match="LabelledMixture"):
        class_posterior(points(3), 0.5, OT, plain)
    with pytest.raises(TypeError, match="LabelledMixture"):
        conditional_velocity(points(3), 0.5, OT, plain, 0)
    with pytest.raises(ValueError, match="class must be an int"):
        GuidedField(TARGET, 2, 2.0)


# ----------------------------------------------------------------------------------------------- the tilted target
def test_grid_cells():
    g, area = grid(2.0, 4)
    assert g.shape == (16, 2) and g.dtype == D64 and area == pytest.approx(1.0)
    assert g[:4, 0].tolist() == [-1.5, -0.5, 0.5, 1.5] and set(g[:4, 1].tolist()) == {-1.5}  # row-major, y outer
    with pytest.raises(ValueError):
        grid(0.0, 10)
    with pytest.raises(ValueError):
        grid(6.0, 0)


def test_normalise_on_grid():
    g, area = grid(6.0, 120)
    for w in (0.0, 1.0, 3.0):
        log_p, log_z = normalise_on_grid(tilted_log_density(g, TARGET, 0, w), area)
        assert float(log_p.exp().sum() * area) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(log_p + log_z, tilted_log_density(g, TARGET, 0, w), rtol=0, atol=1e-12)
    # w = 1: the tilt is q(x | c) itself, already normalised (mass outside [-6, 6]^2 is ~1e-9; the midpoint rule at
    # h = std / 5 is exact to far below that for a Gaussian)
    log_p, log_z = normalise_on_grid(tilted_log_density(g, TARGET, 1, 1.0), area)
    assert abs(log_z) < 1e-6
    torch.testing.assert_close(log_p, TARGET.conditional(1).log_prob(g), rtol=0, atol=1e-6)
    x = points(50, 11)
    torch.testing.assert_close(tilted_log_density(x, TARGET, 1, 1.0), TARGET.conditional(1).log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(tilted_log_density(x, TARGET, 1, 0.0), TARGET.log_prob(x), rtol=0, atol=0)


def test_grid_kl():
    g, area = grid(6.0, 120)
    norm = lambda lp: normalise_on_grid(lp, area)[0]  # noqa: E731
    p = norm(tilted_log_density(g, TARGET, 0, 1.0))
    assert grid_kl(p, p, area) == 0.0
    assert grid_kl(p, norm(tilted_log_density(g, TARGET, 0, 3.0)), area) > 0.01
    # two unit Gaussians a distance 1 apart: KL = |m|^2 / 2 = 0.5
    a = -0.5 * (g**2).sum(1) - math.log(2 * math.pi)
    b = -0.5 * ((g - torch.tensor([1.0, 0.0], dtype=D64)) ** 2).sum(1) - math.log(2 * math.pi)
    assert grid_kl(a, b, area) == pytest.approx(0.5, abs=1e-6)


def test_sample_kl():
    assert SampleKL(1.0, 0.1, 10).above() and not SampleKL(0.4, 0.1, 10).above() and SampleKL(0.4, 0.1, 10).above(3)
    assert not SampleKL(0.0, 0.0, 10).above()
    # x ~ N(0, I) against N((1, 0), I): KL = 0.5, and the estimate is within 4 of its standard errors
    x = torch.randn(4000, 2, generator=gen(12), dtype=D64)
    log_p = -0.5 * (x**2).sum(1)
    log_r = -0.5 * ((x - torch.tensor([1.0, 0.0], dtype=D64)) ** 2).sum(1)
    k = sample_kl(log_p, log_r)
    assert k.n == 4000 and abs(k.kl - 0.5) < 4 * k.se and k.se == pytest.approx(1 / math.sqrt(4000), rel=0.05)
    assert k.above(5.0)
    same = sample_kl(log_p, log_p)
    assert same.kl == 0.0 and not same.above()
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_kl(log_p[:1], log_r[:1])


def test_flow_log_density_of_the_unguided_field_is_the_class_density():
    c = 0
    x = TARGET.conditional(c).sample(200, generator=gen(13)).double()
    exact = TARGET.conditional(c).log_prob(x)
    field = GuidedField(TARGET, c, 1.0)  # w = 1: the exact class field, which carries N(0, I) to q(x | c)
    err32 = (flow_log_density(field, x, steps=32, method="rk4") - exact).abs().mean()
    err16 = (flow_log_density(field, x, steps=16, method="rk4") - exact).abs().mean()
    # RK4 is 4th order: the error falls ~16x per halving (observed ~1e-4 at 16 steps, ~4e-6 at 32); a biased log
    # density (a wrong normaliser or divergence) would not shrink with the step
    assert err32 < 1e-4 and err16 / err32 > 8, (err16, err32)
    assert (exact - TARGET.log_prob(x)).abs().mean() > 0.5  # q(x | c) is far from q(x) here: the check has teeth


def test_cfg_does_not_sample_the_tilted_target():
    c, w, n = 0, 4.0, 300
    z = torch.randn(n, 2, generator=gen(14), dtype=D64)
    g, area = grid(6.0, 80)  # the tilt is <= 2^(w - 1) q(x | c): all its mass is well inside [-6, 6]^2
    _, log_z = normalise_on_grid(tilted_log_density(g, TARGET, c, w), area)
    guided = GuidedField(TARGET, c, w)
    x = sample_guided(guided, z, steps=32, method="rk4")
    kl = sample_kl(flow_log_density(guided, x, steps=32), tilted_log_density(x, TARGET, c, w) - log_z)
    assert kl.n == n and kl.above(5.0), kl
    # against it, the unguided field's samples match their (tilt at w = 1) target to the solver's accuracy
    plain = GuidedField(TARGET, c, 1.0)
    x = sample_guided(plain, z, steps=32, method="rk4")
    same = sample_kl(flow_log_density(plain, x, steps=32), tilted_log_density(x, TARGET, c, 1.0))
    assert abs(same.kl) < 1e-3 < kl.kl, (same, kl)


# ----------------------------------------------------------------------------------------------- guidance scores
def test_guidance_scores_of_exact_class_samples():
    n = 4000
    p_se = 0.5 / math.sqrt(n)  # a mean of n numbers in [0, 1] has a standard error <= 1 / (2 sqrt(n))
    for c in (0, 1):
        x = TARGET.conditional(c).sample(n, generator=gen(20 + c))
        s = guidance_scores(x, TARGET, c)
        assert set(s) == {PURITY, "in modes", "coverage"}
        # within 3 sds of its own component with P(chi^2_2 < 9); of another class-c component (>= 6 sds away) with
        # probability < 1e-3, under a standard error of 0.0017
        assert abs(s["in modes"] - IN_DISC) < 4 * math.sqrt(IN_DISC * (1 - IN_DISC) / n), s
        assert s["coverage"] == 1.0
        assert s[PURITY] > 0.85  # the two inner components overlap, the outer four do not
        other = guidance_scores(x, TARGET, 1 - c)
        # only the other class's inner component (1/3 of the samples, 2.8 sds from this class's) comes near: the two
        # outer modes of class 1 - c get no samples
        assert other[PURITY] < 0.15 and other["in modes"] < 1 / 3 and other["coverage"] < 0.5, other
        assert s[PURITY] + other[PURITY] == pytest.approx(1.0, abs=1e-9)
    # averaged over q(x) the classifier gives the prior: E_q[q(c | x)] = p(c)
    x = TARGET.sample(n, generator=gen(22))
    assert abs(guidance_scores(x, TARGET, 0)[PURITY] - 0.5) < 4 * p_se


def test_guidance_scores_coverage_counts_missing_modes():
    cond = TARGET.conditional(0)
    two = GaussianMixture(torch.ones(2), cond.means[:2], cond.covs[:2])  # two of class 0's three modes
    s = guidance_scores(two.sample(3000, generator=gen(23)), TARGET, 0)
    assert s["coverage"] == pytest.approx(2 / 3)
    collapsed = cond.means[:1].float().expand(100, 2)  # all samples at one mode's centre
    s = guidance_scores(collapsed, TARGET, 0)
    assert s[PURITY] > 0.999 and s["in modes"] == 1.0 and s["coverage"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="class must be an int"):
        guidance_scores(collapsed, TARGET, 2)


# ----------------------------------------------------------------------------------------------- the network
def test_class_conditional_mlp():
    model = small_model(0, ClassConditionalMLP, n_classes=2)
    x = points(40, 15).float()
    t = torch.rand(40, generator=gen(16))
    assert model.null == 2
    with torch.no_grad():
        v0, v1, vn = model(x, t, 0), model(x, t, 1), model(x, t, None)
        assert v0.shape == (40, 2) and v0.dtype == torch.float32
        torch.testing.assert_close(vn, model(x, t, 2), rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, torch.ones(40, dtype=torch.long)), v1, rtol=0, atol=0)
        mixed = torch.tensor([0, 1]).repeat(20)
        vm = model(x, t, mixed)
        torch.testing.assert_close(vm[::2], v0[::2])
        torch.testing.assert_close(vm[1::2], v1[1::2])
        assert (v0 - v1).abs().max() > 1e-4 and (v0 - vn).abs().max() > 1e-4  # the label is an input
        for c in (0, 1):
            vc = model(x, 0.4, c)
            vnull = model(x, 0.4, None)
            torch.testing.assert_close(model.guided(c, 1.0)(x, 0.4), vc, rtol=0, atol=0)
            torch.testing.assert_close(model.guided(c, 0.0)(x, 0.4), vnull)
            for w in (-0.5, 2.0, 4.0):
                torch.testing.assert_close(model.guided(c, w)(x, 0.4), (1 - w) * vnull + w * vc)
                torch.testing.assert_close(model.guided(c, w)(x, torch.full((40,), 0.4)), (1 - w) * vnull + w * vc)
            torch.testing.assert_close(model.guided(c, 3.0, interval=(0.5, 1.0))(x, 0.4), vc, rtol=0, atol=0)


@pytest.mark.parametrize(
    "c, err, match",
    [
        (torch.tensor([0.0]), ValueError, "integer tensor"),
        (torch.zeros(40), ValueError, "integer tensor"),
        (torch.zeros(3, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(40, 1, dtype=torch.long), ValueError, "shape"),
        (3, ValueError, r"class indices must lie in \[0, 2\]"),
        (-1, ValueError, r"class indices must lie in \[0, 2\]"),
        (torch.tensor([0, 3]).repeat(20), ValueError, r"class indices must lie in \[0, 2\]"),
        (True, TypeError, "class index"),
        (1.0, TypeError, "class index"),
        ("0", TypeError, "class index"),
    ],
)
def test_bad_class_for_the_network(c, err, match):
    model = small_model(0, ClassConditionalMLP, n_classes=2)
    x = points(40).float()
    with pytest.raises(err, match=match):
        model(x, 0.5, c)
    if not isinstance(c, torch.Tensor):
        with pytest.raises(err, match=match):
            model.guided(c, 2.0)


# ----------------------------------------------------------------------------------------------- training
def test_training_is_reproducible(monkeypatch):
    monkeypatch.delenv("FMTOY_RUN_CACHE", raising=False)  # train, never load a cached run
    config = GuidanceConfig(steps=300, batch_size=128, hidden=32, seed=0, device="cpu")
    a, b = train_guidance(config), train_guidance(config)
    assert isinstance(a.model, ClassConditionalMLP) and a.config == config and len(a.losses) == 300
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.losses == b.losses
    other = train_guidance(GuidanceConfig(steps=300, batch_size=128, hidden=32, seed=1, device="cpu")).model
    assert not all(torch.equal(sa[k], v) for k, v in other.state_dict().items())


def test_short_training_lands_conditional_samples_in_their_modes(monkeypatch):
    monkeypatch.delenv("FMTOY_RUN_CACHE", raising=False)
    # 300 steps at the default lr give a purity ~0.7; 600 steps at lr 1e-2 give ~0.9 for seeds 0-3 (exact: 0.95)
    result = train_guidance(GuidanceConfig(steps=600, batch_size=256, lr=1e-2, hidden=64, seed=0, device="cpu"))
    model = result.model
    z = torch.randn(500, 2, generator=gen(1))
    with torch.no_grad():
        for c in (0, 1):
            s = guidance_scores(sample_guided(model.guided(c, 1.0), z, steps=16, method="midpoint"), TARGET, c)
            assert s[PURITY] > 0.8 and s["coverage"] == 1.0, (c, s)
            # the null class (w = 0) samples q(x), not q(x | c): mean q(c | x) is near the prior 1/2
            u = guidance_scores(sample_guided(model.guided(c, 0.0), z, steps=16), TARGET, c)
            assert u[PURITY] < 0.65, (c, u)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data="eight_gaussians"), "labelled data set"),
        (dict(data="checkerboard"), "labelled data set"),
        (dict(p_uncond=1.0), "p_uncond must be a probability"),
        (dict(p_uncond=-0.1), "p_uncond must be a probability"),
        (dict(p_uncond=True), "p_uncond must be a probability"),
        (dict(p_uncond="0.2"), "p_uncond must be a probability"),
        (dict(path="rectified"), "path"),
        (dict(embed_dim=0), "embed_dim"),
    ],
)
def test_bad_guidance_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kwargs)


def test_guidance_config_defaults():
    config = GuidanceConfig()
    assert (config.data, config.p_uncond, config.path) == ("labelled_gaussians", 0.2, "ot")
    with pytest.raises(TypeError, match="GuidanceConfig"):
        train_guidance(object())


def test_training_draws_t_inside_the_paths_interval(monkeypatch):
    import fmtoy.methods.guidance as G
    from fmtoy.methods.guidance import fit_guidance
    from fmtoy.paths import AffinePath

    seen, real = [], G.cfg_training_loss

    def spy(model, path, x0, x1, labels, t, p_uncond, generator=None):
        seen.append(t.detach().clone())
        return real(model, path, x0, x1, labels, t, p_uncond, generator)

    monkeypatch.setattr(G, "cfg_training_loss", spy)
    path = AffinePath(lambda t: t, lambda t: 1 - t, t_min=0.2, t_max=0.6)  # CondOT restricted to [0.2, 0.6]
    fit_guidance(ClassConditionalMLP(2, hidden=16), path, TARGET, steps=5, batch_size=256, threads=1)
    t = torch.cat(seen)
    assert len(seen) == 5 and t.min() >= 0.2 and t.max() <= 0.6 and t.max() - t.min() > 0.3
