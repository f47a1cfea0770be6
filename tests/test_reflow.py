"""fmtoy.methods.reflow (chapter 10): the rectified coupling of the exact flow lowers every convex transport cost on
the playground, the Jensen chain cost <= kinetic energy <= independent cost with straightness as the gap, training on
a fixed coupling learns its rectified field, and seeded reflow runs are reproducible; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from fmtoy.data import GaussianMixture, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField, exact_field_of
from fmtoy.methods.reflow import (
    COSTS,
    ReflowConfig,
    fit_coupling,
    fit_reflow,
    pool_sampler,
    rectified_coupling,
    train_reflow,
    transport_cost,
)
from fmtoy.metrics import kinetic_energy, straightness
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath
from fmtoy.solvers import integrate
from fmtoy.train import FitContext

D64 = torch.float64
TARGET = eight_gaussians()
EXACT = ExactField(CondOTPath(), TARGET)


def test_the_rectified_coupling_does_not_raise_any_convex_cost_on_the_playground():
    z = torch.randn(3000, 2, generator=make_generator(0), dtype=D64)
    independent = TARGET.sample(3000, make_generator(1)).double()
    x0, x1 = rectified_coupling(EXACT, z, steps=32)
    assert torch.equal(x0, z)
    for cost in COSTS:
        before, se_before = transport_cost(z, independent, cost)
        after, se_after = transport_cost(x0, x1, cost)
        assert after < before - 10 * (se_before + se_after), cost  # by far more than the sampling noise
    # the same noise through the exact flow: the end points are samples of the target (first two moments)
    assert x1.mean(0).abs().max() < 0.2 and abs(x1.square().sum(1).mean() - 16.5) < 0.5


def test_the_jensen_chain_and_straightness_as_its_gap():
    z = torch.randn(1000, 2, generator=make_generator(2), dtype=D64)
    traj = integrate(EXACT, z, 64, "rk4", return_trajectory=True)
    cost, _ = transport_cost(traj[0], traj[-1])
    energy = kinetic_energy(traj)
    independent, se = transport_cost(z, TARGET.sample(1000, make_generator(3)).double())
    assert cost < energy < independent - 5 * se
    assert straightness(traj) == pytest.approx(energy - cost, rel=1e-10)  # S = KE - E|Z_1 - Z_0|^2, exactly
    straight = z[None] + torch.linspace(0, 1, 9, dtype=D64)[:, None, None] * (traj[-1] - z)[None]
    assert straightness(straight) < 1e-20 and kinetic_energy(straight) == pytest.approx(cost, rel=1e-12)


def test_transport_cost_values_and_errors():
    x0 = torch.zeros(4, 2, dtype=D64)
    x1 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], dtype=D64)
    assert transport_cost(x0, x1)[0] == pytest.approx(12.5)
    assert transport_cost(x0, x1, "euclidean")[0] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="cost"):
        transport_cost(x0, x1, "cubic")
    with pytest.raises(ValueError, match="same shape"):
        transport_cost(x0, x1[:3])
    with pytest.raises(ValueError, match="at least 2"):
        transport_cost(x0[:1], x1[:1])


def test_pool_sampler_draws_paired_rows_reproducibly():
    a = torch.arange(20, dtype=D64).reshape(10, 2)
    draw = pool_sampler(a, -a)
    batches = []
    for _ in range(2):
        ctx = FitContext(make_generator(5), torch.device("cpu"), 64, 1)
        batches.append(draw(ctx))
    torch.testing.assert_close(batches[0], batches[1])
    x0, x1 = batches[0]
    assert x0.dtype == torch.float32 and torch.equal(x1, -x0)  # row i stays paired with row i
    assert len({int(v) for v in x0[:, 0]}) == 10  # every row of the pool gets drawn
    with pytest.raises(ValueError, match="same shape"):
        pool_sampler(a, a[:5])


def test_fitting_a_fixed_coupling_learns_its_rectified_field():
    # the coupling x_1 = x_0 + c: straight parallel lines, rectified field v = c everywhere
    g = make_generator(6)
    x0 = torch.randn(4000, 2, generator=g)
    shift = torch.tensor([2.0, -1.0])
    torch.manual_seed(0)
    model = VelocityMLP(hidden=32, depth=2)
    run = fit_coupling(model, x0, x0 + shift, steps=300, batch_size=256, lr=1e-2, device="cpu")
    assert run.final() < 0.01
    z = torch.randn(500, 2, generator=g)
    err = (integrate(model, z, 1) - (z + shift)).norm(dim=1).mean()
    assert err < 0.1  # one Euler step reproduces the coupling


def test_seeded_reflow_is_reproducible_and_keeps_its_rounds():
    config = ReflowConfig(
        steps=60, batch_size=64, hidden=16, depth=1, rounds=2, pairs=500, teacher_steps=4, device="cpu", seed=3
    )
    a, b = train_reflow(config), train_reflow(config)
    assert a.losses == b.losses
    z = torch.randn(50, 2, generator=make_generator(7))
    torch.testing.assert_close(integrate(a.model, z, 4), integrate(b.model, z, 4), rtol=0, atol=0)
    assert set(a.modules) == {"model", "round_1"} and a.round_1 is not a.model
    other = train_reflow(ReflowConfig(**{**vars(config), "seed": 4}))
    assert other.losses != a.losses


def test_the_second_round_learns_the_first_rounds_pairs():
    # round 2's pairs come from round 1's network: reflowing a network trained on x_1 = x_0 + c keeps the shift
    shift = torch.tensor([1.0, 0.5])

    def teacher(x, t):
        return shift.to(x.dtype).expand_as(x)

    torch.manual_seed(1)
    run = fit_reflow(
        VelocityMLP(hidden=32, depth=2),
        teacher,
        rounds=2,
        pairs=2000,
        teacher_steps=2,
        steps=300,
        batch_size=256,
        lr=1e-2,
        device="cpu",
    )
    z = torch.randn(300, 2, generator=make_generator(8))
    for net in (run.round_1, run.model):
        assert (integrate(net, z, 1) - (z + shift)).norm(dim=1).mean() < 0.1


def test_bad_reflow_input_is_refused():
    with pytest.raises(ValueError, match="Gaussian-mixture"):
        exact_field_of("checkerboard")
    with pytest.raises(ValueError, match="rounds"):
        ReflowConfig(rounds=0)
    with pytest.raises(ValueError, match="solver"):
        ReflowConfig(solver="heun")
    with pytest.raises(TypeError, match="teacher"):
        fit_reflow(VelocityMLP(hidden=8, depth=1), "exact", steps=1, batch_size=2)
    with pytest.raises(TypeError, match="unknown training option"):
        fit_reflow(VelocityMLP(hidden=8, depth=1), EXACT, step=1)
    assert isinstance(exact_field_of("eight_gaussians").target, GaussianMixture)
