"""fmtoy.methods.consistency (chapter 10): the boundary condition holds for every weight, the targets carry no
gradient and use the right times, training's target agrees with distillation's Euler target to first order in the
step, a consistency model of the exact 1D Gaussian map is exact at its optimum, the exact consistency function has
zero error, multistep sampling is seeded and checked, seeded runs are reproducible; bad input is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmtoy.data import GaussianMixture, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField
from fmtoy.methods.consistency import (
    ConsistencyConfig,
    ConsistencyMLP,
    ExactConsistency,
    consistency_error,
    consistency_loss,
    distillation_target,
    fit_consistency,
    grid_times,
    ode_step,
    sample_consistency,
    train_consistency,
    training_target,
)
from fmtoy.methods.shortcut import exact_grid_trajectory
from fmtoy.paths import CondOTPath
from fmtoy.solvers import flow_map
from fmtoy.teaching.objectives import x1_posterior
from fmtoy.train import FitConfig, fit, pair_sampler

D64 = torch.float64
TARGET = eight_gaussians()
EXACT = ExactField(CondOTPath(), TARGET)


def test_the_boundary_condition_holds_for_any_weights():
    torch.manual_seed(0)
    f = ConsistencyMLP(hidden=16, depth=1)
    x = torch.randn(20, 2)
    torch.testing.assert_close(f(x, 1.0), x, rtol=0, atol=0)
    assert (f(x, 0.5) - x).abs().max() > 1e-3  # elsewhere the network moves the point


def test_targets_carry_no_gradient_and_use_the_next_time():
    torch.manual_seed(1)
    f = ConsistencyMLP(hidden=16, depth=1)
    x0, x1 = torch.randn(8, 2), torch.randn(8, 2)
    t = torch.full((8,), 0.25)
    y = training_target(f, x0, x1, t, 0.25)
    assert not y.requires_grad
    torch.testing.assert_close(y, f(0.5 * x0 + 0.5 * x1, 0.5).detach())
    seen = []

    def field(x, tt):
        seen.append(tt.clone())
        return torch.ones_like(x)

    y = distillation_target(lambda x, tt: x * tt[:, None], field, x0, t, 0.25, "euler")
    assert torch.equal(seen[0], t)
    torch.testing.assert_close(y, (x0 + 0.25) * 0.5)
    torch.testing.assert_close(ode_step(field, x0, t, 0.5, "rk4"), x0 + 0.5)


def test_grid_times_are_interval_starts():
    t = grid_times(4000, 8, make_generator(0))
    assert set((t * 8).tolist()) == set(range(8)) and t.max() <= 7 / 8


def test_training_target_matches_distillation_to_first_order_in_the_step():
    # E[f(x + D V, t + D) | x_t = x] - f(x + D u_t(x), t + D) = D^2/2 tr(Var(V) f'') + O(D^3), V = x_1 - x_0: about
    # 4x smaller per halving of D (ch. 10, Prop. training vs distillation). f: the exact consistency function; V from
    # the exact posterior, centred on its exact mean u_t(x) (which removes the first-order sampling noise).
    f = ExactConsistency(EXACT, steps=16)
    x, t, n = torch.tensor([[2.0, 0.3]], dtype=D64), 0.5, 20000
    w, mu, var, _, _ = x1_posterior(x, t, CondOTPath(), TARGET)
    g = make_generator(4)
    comp = torch.multinomial(w[0], n, replacement=True, generator=g)
    x1 = mu[0, comp] + var[0, comp].sqrt() * torch.randn(n, 2, generator=g, dtype=D64)
    u = EXACT(x, t)
    v = (x1 - x) / (1 - t)
    v = v - v.mean(0) + u
    x0, x1 = x - t * v, x + (1 - t) * v  # the pairs through x at time t
    gaps = []
    for delta in (0.2, 0.1, 0.05, 0.025):
        ct = training_target(f, x0, x1, torch.full((n,), t, dtype=D64), delta).mean(0)
        gaps.append((ct - f(x + delta * u, t + delta)[0]).norm().item())
    assert all(3 < a / b < 8 for a, b in zip(gaps, gaps[1:])), gaps


class Tabular(nn.Module):
    """f(x, t_n) = x + (1 - t_n)(a_n x + b_n): one affine map per grid time, a family holding the exact 1D answer."""

    def __init__(self, intervals: int) -> None:
        super().__init__()
        self.n, self.dim = intervals, 1
        self.a, self.b = nn.Parameter(torch.zeros(intervals + 1)), nn.Parameter(torch.zeros(intervals + 1))

    def forward(self, x, t):
        k = torch.round(t * self.n).long()
        return x + (1 - t)[:, None] * (self.a[k][:, None] * x + self.b[k][:, None])


def test_a_consistency_model_of_the_exact_1d_gaussian_map_is_exact_at_its_optimum():
    m, s, n = 1.5, 0.5, 4
    q = GaussianMixture(torch.ones(1), torch.tensor([[m]]), torch.tensor([[[s * s]]]))
    field = ExactField(CondOTPath(), q)
    model = Tabular(n)
    draw = pair_sampler(model, q)
    run = fit(
        model,
        lambda ctx: consistency_loss(model, *draw(ctx), field=field, intervals=n, generator=ctx.generator),
        FitConfig(steps=800, batch_size=512, lr=0.05, lr_schedule="constant", device="cpu"),
    )
    assert run.final(last=50) < 1e-4
    tt = torch.arange(n, dtype=D64) / n
    sig = ((1 - tt) ** 2 + tt**2 * s * s).sqrt()  # Phi_{t->1}(x) = m + (s / sigma_t)(x - t m)
    a, b = (s / sig - 1) / (1 - tt), m * (1 - tt * s / sig) / (1 - tt)
    torch.testing.assert_close(model.a.detach()[:n].double(), a, atol=1e-2, rtol=0)
    torch.testing.assert_close(model.b.detach()[:n].double(), b, atol=1e-2, rtol=0)


def test_the_exact_consistency_function_has_no_error_and_a_network_has_some():
    z = torch.randn(300, 2, generator=make_generator(5), dtype=D64)
    traj = exact_grid_trajectory(EXACT, z, 16, substeps=4)
    times, errs = consistency_error(ExactConsistency(EXACT, steps=64), traj)
    assert times.tolist() == [k / 16 for k in range(16)] and errs.max() < 1e-4
    torch.manual_seed(0)
    net = ConsistencyMLP(hidden=16, depth=1).double()
    assert consistency_error(net, traj)[1].min() > 0.1
    with pytest.raises(ValueError, match="trajectory"):
        consistency_error(net, traj[0])


def test_multistep_sampling_is_seeded_and_checked():
    torch.manual_seed(2)
    f = ConsistencyMLP(hidden=16, depth=1)
    z = torch.randn(40, 2, generator=make_generator(6))
    one = sample_consistency(f, z, 1)
    torch.testing.assert_close(one, f(z, 0.0).detach())
    a = sample_consistency(f, z, 4, make_generator(7), intervals=16)
    b = sample_consistency(f, z, 4, make_generator(7), intervals=16)
    assert torch.equal(a, b) and not torch.equal(a, sample_consistency(f, z, 4, make_generator(8)))
    calls = []
    sample_consistency(lambda x, t: calls.append(t[0].item()) or x, z, 4, make_generator(0))
    assert calls == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="generator"):
        sample_consistency(f, z, 2)
    with pytest.raises(ValueError, match="divide"):
        sample_consistency(f, z, 3, make_generator(0), intervals=16)


def test_seeded_runs_are_reproducible_for_each_mode():
    small = dict(steps=40, batch_size=64, hidden=16, depth=1, device="cpu", intervals=4, teacher_steps=30)
    for mode, field in (("distillation", "exact"), ("distillation", "flow"), ("training", "exact")):
        config = ConsistencyConfig(mode=mode, field=field, seed=1, **small)
        a, b = train_consistency(config), train_consistency(config)
        assert a.losses == b.losses and a.config == config
        z = torch.randn(30, 2, generator=make_generator(9))
        assert torch.equal(a.model(z, 0.0), b.model(z, 0.0))


def test_distillation_lowers_the_error_against_the_exact_map():
    z = torch.randn(400, 2, generator=make_generator(10), dtype=D64)
    end = flow_map(EXACT, z, 0.0, 1.0, steps=32)
    config = ConsistencyConfig(
        steps=600, batch_size=128, hidden=32, depth=2, intervals=8, solver="midpoint", device="cpu"
    )
    untrained = ConsistencyMLP(hidden=32, depth=2)
    run = train_consistency(config)
    err = {
        k: (m.double()(z, 0.0) - end).norm(dim=1).mean().item()
        for k, m in (("before", untrained), ("after", run.model))
    }
    assert err["after"] < err["before"] / 2  # from 2.8 (the untrained network) to about 1.0 in 600 steps


def test_bad_consistency_input_is_refused():
    f = ConsistencyMLP(hidden=8, depth=1)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="needs field"):
        consistency_loss(f, x, x, "distillation")
    with pytest.raises(ValueError, match="mode"):
        consistency_loss(f, x, x, "bootstrap")
    with pytest.raises(ValueError, match="intervals"):
        ConsistencyConfig(intervals=0)
    with pytest.raises(ValueError, match="field"):
        ConsistencyConfig(field="teacher")
    with pytest.raises(TypeError, match="ConsistencyMLP"):
        fit_consistency(nn.Linear(2, 2), TARGET, mode="training", steps=1, batch_size=2)
    with pytest.raises(ValueError, match="Gaussian-mixture"):
        train_consistency(ConsistencyConfig(data="checkerboard", steps=1, batch_size=2))
