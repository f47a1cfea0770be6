"""Chapter 11 (discrete flow matching): the exercise solution extracted from the page, and small versions of the
page's claims (one step samples the product of the marginals, the masked source beats the uniform one, the
joint-posterior step is exact for kappa = t only, the cross-entropy estimate from test points). The library itself is
tested in tests/test_discrete.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmtoy.device import make_generator
from fmtoy.methods import discrete as D

EXERCISES = 1  # graded code cells the chapter must keep
CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch11_discrete.md"
Q = D.discretise("eight_gaussians", 16, 5.0)


def test_exercise_euler_probs_is_the_library_step(solutions):
    path = D.MixturePath(16)
    gen = make_generator(0)
    for t, h in ((0.0, 1.0), (0.2, 0.05), (0.9, 0.1)):
        x = torch.randint(16, (32, 2), generator=gen)
        post = torch.rand(32, 2, 16, generator=gen, dtype=torch.float64).softmax(-1)
        torch.testing.assert_close(solutions["euler_probs"](x, post, t, h), path.euler_step(x, post, t, h))


def test_the_exercise_one_step_claim_for_a_correlated_and_an_independent_target():
    q1 = torch.rand(16, generator=make_generator(1), dtype=torch.float64)
    independent = D.GridDistribution(torch.outer(q1, q1.flip(0)))
    for q, tv_zero in ((Q, False), (independent, True)):
        path = D.MixturePath(16, "mask")
        p = D.propagate(D.ExactPosterior(path, q), path, 1)
        assert (D.total_variation(p, q) < 1e-12) == tv_zero


def test_the_masked_source_beats_the_uniform_one_beyond_one_step():
    tv = {}
    for source in D.SOURCES:
        path = D.MixturePath(16, source)
        tv[source] = [D.total_variation(D.propagate(D.ExactPosterior(path, Q), path, n), Q) for n in (1, 2, 8, 32)]
    assert tv["mask"][0] == pytest.approx(tv["uniform"][0], abs=1e-12)
    assert all(m < u for m, u in zip(tv["mask"][1:], tv["uniform"][1:]))


def test_the_test_point_estimate_of_the_cross_entropy_is_unbiased():
    path = D.MixturePath(16)
    p = D.propagate(D.ExactPosterior(path, Q), path, 4)
    exact = Q.entropy() + D.kl_divergence(Q, p)
    x = Q.sample(400_000, make_generator(2))
    assert float(-p.log()[x[:, 0], x[:, 1]].mean()) == pytest.approx(exact, abs=0.01)
