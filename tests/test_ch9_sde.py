"""Chapter 9 (scores, SDEs and the Fokker-Planck equation): the exercise solution extracted from the page, and small
numeric versions of the page's claims (noise helps Euler at few steps with the exact field; a constant g = 2 on a
learned score gets worse with more steps, a vanishing one does not; the corrector's bias; the exercises' Gaussian
algebra). The library itself is tested in tests/test_sde.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fmtoy.data import eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField
from fmtoy.metrics import energy_distance
from fmtoy.paths import CondOTPath
from fmtoy.sde import MarginalSDE, euler_maruyama

EXERCISES = 1  # graded code cells the chapter must keep
CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch9_sde.md"
Q, PATH = eight_gaussians(), CondOTPath()
EXACT = ExactField(PATH, Q)


def test_exercise_em_step_is_one_step_of_the_library_sampler(solutions):
    x = torch.randn(32, 2, generator=make_generator(0), dtype=torch.float64)
    z = torch.randn(1, 32, 2, generator=make_generator(1), dtype=torch.float64)
    for g, t0, h in ((0.0, 0.2, 0.1), (1.0, 0.5, 0.05), (2.5, 0.9, 0.02)):
        got = solutions["em_step"](x, EXACT(x, x.new_full((32,), t0)), EXACT.score(x, t0), g, h, z[0])
        want = euler_maruyama(MarginalSDE(EXACT, PATH, g), x, 1, t0=t0, t1=t0 + h, noise=z)
        torch.testing.assert_close(got, want)


def test_a_langevin_step_on_a_gaussian_widens_it_as_the_exercise_says():
    m, v, delta = 0.7, 0.25, 0.1
    x = m + torch.randn(200_000, generator=make_generator(2), dtype=torch.float64) * math.sqrt(v)
    gen = make_generator(3)
    for _ in range(60):
        x = x - delta * (x - m) / v + math.sqrt(2 * delta) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    assert float(x.var()) == pytest.approx(v / (1 - delta / (2 * v)), rel=0.01)
    assert float(x.mean()) == pytest.approx(m, abs=0.01)


def test_the_wrong_factor_breaks_the_variance_of_the_1d_path():
    """The exercise's ODE for V_t with the drift u + g^2 score, integrated: V_1 misses s_1^2 = v_1; with g^2/2 it
    does not."""
    v1, g, n = 0.3, 1.0, 20000
    for factor, ok in ((0.5, True), (1.0, False)):
        big_v, h = 1.0, 1.0 / n
        for k in range(n):
            t = (k + 0.5) * h
            s2, ds2 = t**2 * v1 + (1 - t) ** 2, 2 * t * v1 - 2 * (1 - t)
            big_v += h * (ds2 / s2 * big_v - 2 * factor * g**2 * big_v / s2 + g**2)
        assert (abs(big_v - v1) < 1e-3) == ok


def test_noise_helps_euler_at_eight_steps_with_the_exact_field():
    ref = Q.sample(1500, make_generator(4)).double()
    x0 = torch.randn(1000, 2, generator=make_generator(5), dtype=torch.float64)
    ode = energy_distance(euler_maruyama(MarginalSDE(EXACT, PATH, 0.0), x0, 8), ref)
    sde = [
        energy_distance(euler_maruyama(MarginalSDE(EXACT, PATH, 1.0), x0, 8, make_generator(s)), ref) for s in (0, 1)
    ]
    assert max(sde) < ode
