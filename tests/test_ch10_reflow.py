"""Chapter 10 (reflow, consistency models, the flow map): the exercise solution extracted from the page, and small
versions of the page's claims (one reflow of the exact flow straightens it and lowers its cost; consistency
distillation's zero-loss model with Euler steps is the solver's composition; multistep consistency sampling re-noises
along the path). The library itself is tested in tests/test_reflow.py, tests/test_consistency.py and
tests/test_solvers.py."""

from __future__ import annotations

from pathlib import Path

import torch

from fmtoy.data import eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField
from fmtoy.methods.consistency import ConsistencyMLP, distillation_target
from fmtoy.methods.reflow import ReflowConfig, train_reflow, transport_cost
from fmtoy.metrics import straightness
from fmtoy.paths import CondOTPath
from fmtoy.solvers import integrate

EXERCISES = 1  # graded code cells the chapter must keep
CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch10_reflow.md"
EXACT = ExactField(CondOTPath(), eight_gaussians())


def test_exercise_cd_target_is_the_library_euler_target(solutions):
    torch.manual_seed(0)
    f = ConsistencyMLP(hidden=16, depth=1)
    g = make_generator(1)
    x, t = torch.randn(20, 2, generator=g), torch.rand(20, generator=g) * 0.5
    for field in (EXACT, lambda y, tt: torch.cos(y) * tt[:, None]):
        got = solutions["cd_target"](f, field, x, t, 0.125)
        torch.testing.assert_close(got, distillation_target(f, field, x, t, 0.125, "euler"))
        assert not got.requires_grad


def test_one_short_reflow_straightens_the_exact_flow_and_lowers_its_cost():
    z = torch.randn(1000, 2, generator=make_generator(2), dtype=torch.float64)
    exact_path = integrate(EXACT, z, 32, "rk4", return_trajectory=True)
    run = train_reflow(
        ReflowConfig(steps=300, batch_size=256, hidden=64, depth=2, pairs=5000, teacher_steps=16, device="cpu")
    )
    learned_path = integrate(run.model, z, 32, "rk4", return_trajectory=True).double()
    assert straightness(learned_path) < straightness(exact_path) / 10
    assert transport_cost(z, learned_path[-1])[0] < transport_cost(z, exact_path[-1])[0]
