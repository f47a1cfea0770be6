"""Tests for fmtoy.methods.shortcut: the d grid, the network, the self-consistency target and loss (no gradient
through the target), stratified batches, N-step sampling (exactly N calls), the exact shortcut, the error map,
and a short seeded training that beats flow matching at one step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import small_model

from fmtoy.data import circle_mixture, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.marginal import ExactField
from fmtoy.methods.shortcut import (
    ExactShortcut,
    ShortcutConfig,
    ShortcutMLP,
    exact_grid_trajectory,
    exact_shortcut,
    fit_shortcut,
    level_of,
    n_levels,
    off_mode_fraction,
    one_step_yardsticks,
    sample_shortcut,
    sc_rows,
    self_consistency_loss,
    self_paired_error,
    shortcut_batch,
    shortcut_error_map,
    shortcut_loss,
    shortcut_target,
    step_sizes,
)
from fmtoy.metrics import energy_distance
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath
from fmtoy.solvers import integrate
from fmtoy.train import fit_cfm as train

D64 = torch.float64
A = torch.tensor([[-0.3, 1.2], [-0.8, 0.4]], dtype=D64)  # a linear field u(x) = A x (Euler is not exact)


def linear_shortcut(a: torch.Tensor = A, perturb: float = 0.0):
    """Exact shortcut of u(x) = A x: s(x, t, d) = (expm(A d) - I) x / d, s(x, t, 0) = A x; optionally perturbed."""

    def s(x, t, d):
        d = torch.as_tensor(d, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        mats = torch.where(
            d[:, None, None] > 0,
            (torch.linalg.matrix_exp(a * d[:, None, None]) - torch.eye(2, dtype=x.dtype))
            / d.clamp_min(1e-300)[:, None, None],
            a.expand(len(d), 2, 2),
        )
        out = (mats @ x[:, :, None])[:, :, 0]
        return out + perturb * d[:, None] ** 2 * x  # a perturbation that vanishes at d = 0

    return s


def small_shortcut(seed: int = 0, max_steps: int = 8) -> ShortcutMLP:
    return small_model(seed, ShortcutMLP, max_steps=max_steps)


# ----------------------------------------------------------------------------------------------- the d grid
def test_grid_and_levels():
    assert n_levels(128) == 8 and step_sizes(4) == [1.0, 0.5, 0.25]
    d = torch.tensor([1.0, 0.5, 0.25, 1 / 128, 0.0])
    assert level_of(d, 5, 128).tolist() == [0, 1, 2, 7, 7]  # d = 0 is the flow-matching branch, level log2 M
    assert level_of(0.25, 3, 128).tolist() == [2, 2, 2]


@pytest.mark.parametrize("bad", [0.3, 1 / 256, 2.0, -0.5])
def test_off_grid_step_is_refused(bad):
    with pytest.raises(ValueError, match="power of two"):
        level_of(bad, 1, 128)


@pytest.mark.parametrize("bad", [0, 1, 3, 100, 2.0, True])
def test_max_steps_must_be_power_of_two(bad):
    with pytest.raises(ValueError, match="max_steps"):
        ShortcutMLP(max_steps=bad)


def test_network_shapes_and_fm_branch():
    net, x = small_shortcut(max_steps=8), torch.randn(5, 2)
    out = net(x, torch.rand(5), 0.25)
    assert out.shape == (5, 2)
    assert torch.equal(net(x, 0.3, 0.0), net(x, 0.3, 1 / 8)) and torch.equal(net.velocity(x, 0.3), net(x, 0.3, 0.0))
    assert not torch.allclose(net(x, 0.3, 1.0), net(x, 0.3, 0.5))  # each level has its own embedding
    with pytest.raises(ValueError, match="d has 3 entries"):
        net(x, 0.3, torch.full((3,), 0.5))


# ----------------------------------------------------------------------------------------------- self-consistency
def test_self_consistency_loss_zero_for_exact_linear_shortcut_positive_when_perturbed():
    g = make_generator(0)
    x = torch.randn(256, 2, generator=g, dtype=D64)
    t = torch.rand(256, generator=g, dtype=D64) * 0.5
    d = torch.tensor([0.25, 0.125, 1 / 64], dtype=D64).repeat(86)[:256]
    exact = self_consistency_loss(linear_shortcut(), x, t, d)
    assert exact < 1e-24
    perturbed = self_consistency_loss(linear_shortcut(perturb=0.3), x, t, d)
    assert perturbed > 1e-4  # residual ~ (3/2) 0.3 d^2 x: mean square ~ 1e-3 at these d
    euler = self_consistency_loss(lambda x_, t_, d_: x_ @ A.T, x, t, d)  # the plain velocity: Euler steps
    assert euler > 1e-4


def test_target_is_exact_for_exact_shortcut():
    x = torch.randn(64, 2, generator=make_generator(1), dtype=D64)
    s = linear_shortcut()
    assert torch.allclose(shortcut_target(s, x, 0.25, 0.125), s(x, 0.25, 0.25), atol=1e-13)


def test_target_has_no_gradient():
    net = small_shortcut().double()
    x = torch.randn(16, 2, dtype=D64)
    target = shortcut_target(net, x, torch.zeros(16, dtype=D64), 0.25)
    assert not target.requires_grad and target.grad_fn is None
    with pytest.raises(RuntimeError):  # autograd finds no path to the parameters
        torch.autograd.grad(target.sum(), list(net.parameters()))


def test_shortcut_loss_gradient_ignores_the_target():
    """Online targets: the gradient equals that of the same loss with a frozen copy as teacher (same batch)."""
    net = small_shortcut(max_steps=8).double()
    g = make_generator(2)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=D64), eight_gaussians().sample(64, g).double()
    loss = shortcut_loss(net, x0, x1, k=0.5, generator=make_generator(3))
    grads = torch.autograd.grad(loss, list(net.parameters()))
    frozen = copy.deepcopy(net).requires_grad_(False)
    loss_f = shortcut_loss(net, x0, x1, teacher=frozen, k=0.5, generator=make_generator(3))
    grads_f = torch.autograd.grad(loss_f, list(net.parameters()))
    assert torch.equal(loss, loss_f)
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(grads, grads_f))
    # with the gradient through the target (what stop-gradient prevents) the gradient would differ:
    b = shortcut_batch(x0, x1, 0.5, 8, make_generator(3))
    m, half = b.n_sc, torch.exp2(-(b.level[: b.n_sc] + 1).double())
    tc, hc = b.t[:m, None], half[:, None]
    s1 = net(b.xt[:m], b.t[:m], half)
    live = 0.5 * (s1 + net(b.xt[:m] + hc * s1, (tc + hc)[:, 0], half))
    full = torch.cat([live, x1[m:] - x0[m:]])
    loss_live = (net.forward_level(b.xt, b.t, b.level) - full).square().sum(1).mean()
    grads_live = torch.autograd.grad(loss_live, list(net.parameters()))
    assert torch.allclose(loss_live, loss)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_live))


def test_sc_weight_multiplies_only_the_self_consistency_rows():
    """loss = (w * sum over SC rows + sum over FM rows) / B; the parts stay unweighted means; w = 1 is the default."""
    net = small_shortcut(max_steps=8).double()
    g = make_generator(5)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=D64), eight_gaussians().sample(64, g).double()
    plain, fm, sc = shortcut_loss(net, x0, x1, k=0.25, generator=make_generator(6), return_parts=True)
    assert torch.equal(plain, shortcut_loss(net, x0, x1, k=0.25, generator=make_generator(6), sc_weight=1.0))
    heavy, fm4, sc4 = shortcut_loss(net, x0, x1, k=0.25, generator=make_generator(6), return_parts=True, sc_weight=4.0)
    m = sc_rows(64, 0.25, 8)
    assert torch.equal(fm, fm4) and torch.equal(sc, sc4)
    assert torch.allclose(heavy, (4.0 * m * sc + (64 - m) * fm) / 64, atol=1e-12)
    assert torch.allclose(plain, (m * sc + (64 - m) * fm) / 64, atol=1e-12)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="sc_weight"):
            shortcut_loss(net, x0, x1, k=0.25, sc_weight=bad)
        with pytest.raises(ValueError, match="sc_weight"):
            ShortcutConfig(sc_weight=bad)
    res = fit_shortcut(
        small_shortcut(max_steps=8),
        eight_gaussians(),
        steps=3,
        batch_size=32,
        sc_weight=4.0,
        teacher="online",
        device="cpu",
    )
    assert len(res.losses) == 3 and len(res.parts["sc"]) == 3


# ----------------------------------------------------------------------------------------------- batches
def test_batch_is_stratified_with_t_on_the_grid():
    g = make_generator(4)
    x0, x1 = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g)
    b = shortcut_batch(x0, x1, k=0.25, max_steps=128, generator=g)
    assert b.n_sc == 64
    sc, fm = b.level[:64], b.level[64:]
    counts = torch.bincount(sc, minlength=7)
    assert (counts >= 64 // 7).all() and counts[0] == 64 // 7 + 64 % 7  # the remainder goes to d = 1
    assert (fm == 7).all()
    d = torch.exp2(-sc.float())
    assert torch.equal(b.t[:64] / d, torch.round(b.t[:64] / d)) and (b.t[:64] + d <= 1).all()
    assert torch.equal(b.t[64:] * 128, torch.round(b.t[64:] * 128)) and (b.t < 1).all()
    t = b.t[:, None]
    assert torch.allclose(b.xt, (1 - t) * x0 + t * x1)


def test_too_small_batch_is_refused():
    assert sc_rows(256, 0.125, 128) == 32
    with pytest.raises(ValueError, match="never train"):
        sc_rows(48, 0.125, 128)  # 6 rows for 7 levels
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        sc_rows(256, 1.5)
    with pytest.raises(ValueError, match="never train"):
        fit_shortcut(small_shortcut(max_steps=128), eight_gaussians(), steps=1, batch_size=16, device="cpu")


# ----------------------------------------------------------------------------------------------- sampling
class Counter(torch.nn.Module):
    """Wraps a shortcut and records every call's (t, d)."""

    def __init__(self, s) -> None:
        super().__init__()
        self.s, self.calls, self.max_steps = s, [], s.max_steps

    def forward(self, x, t, d):
        self.calls.append((float(t[0]), float(d[0])))
        return self.s(x, t, d)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sampling_calls_the_network_exactly_steps_times(steps):
    s = Counter(small_shortcut(max_steps=8))
    x0 = torch.randn(10, 2)
    out = sample_shortcut(s, x0, steps)
    assert len(s.calls) == steps and out.shape == (10, 2)
    assert s.calls == [(i / steps, 1 / steps) for i in range(steps)]
    traj = sample_shortcut(s, x0, steps, return_trajectory=True)
    assert traj.shape == (steps + 1, 10, 2) and torch.equal(traj[-1], out)


def test_max_steps_sampling_is_the_fm_branch_euler():
    net = small_shortcut(max_steps=8)
    x0 = torch.randn(10, 2)
    assert torch.allclose(sample_shortcut(net, x0, 8), integrate(net.velocity, x0, 8), atol=1e-6)
    for bad in (3, 16, 0):
        with pytest.raises(ValueError, match="power of two"):
            sample_shortcut(net, x0, bad)


def test_self_paired_error_is_zero_for_an_exact_shortcut_and_euler_gap_for_the_velocity():
    x0 = torch.randn(64, 2, generator=make_generator(11), dtype=D64)
    assert self_paired_error(linear_shortcut(), x0, 1, max_steps=8) < 1e-12  # exact: 1 step = 8 steps
    velocity = lambda y, t, d: y @ A.T  # noqa: E731  (plain Euler at every d)
    want = x0 @ (torch.eye(2, dtype=D64) + A).T - x0 @ torch.linalg.matrix_power(torch.eye(2, dtype=D64) + A / 8, 8).T
    got = self_paired_error(velocity, x0, 1, max_steps=8)
    assert abs(got - want.norm(dim=1).mean().item()) < 1e-12
    net = small_shortcut(max_steps=8)
    assert self_paired_error(net, x0.float(), 8) == 0.0  # M steps against M steps


def test_one_step_yardsticks_agree_with_their_definitions():
    net, target = small_shortcut(max_steps=8), eight_gaussians()
    x0, ref = torch.randn(200, 2, generator=make_generator(14)), target.sample(200, make_generator(15))
    end = sample_shortcut(net, x0[:50], 8)  # as if the model's 8 steps were the exact flow
    ys = one_step_yardsticks(net, x0, ref, target, exact_end=end)
    assert set(ys) == {
        "ED, N=1",
        "ED, N=8",
        "self-paired",
        "paired to exact, N=1",
        "paired to exact, N=8",
        "off-mode, N=1",
        "off-mode, N=8",
    }
    assert ys["ED, N=1"] == energy_distance(sample_shortcut(net, x0, 1), ref)
    assert abs(ys["self-paired"] - self_paired_error(net, x0)) < 1e-6
    assert ys["paired to exact, N=8"] < 1e-6 and ys["off-mode, N=8"] == off_mode_fraction(
        sample_shortcut(net, x0, 8), target
    )
    assert set(one_step_yardsticks(net, x0, ref)) == {"ED, N=1", "ED, N=8", "self-paired"}
    with pytest.raises(ValueError, match="more than"):
        one_step_yardsticks(net, x0[:10], ref, exact_end=end)
    with pytest.raises(TypeError):
        one_step_yardsticks(lambda x, t, d: x, x0, ref)


def test_off_mode_fraction_of_the_data_is_the_chi_tail():
    far = circle_mixture(2, 20.0, 0.5)  # modes 80 sd apart: only the own component counts
    x = far.sample(200_000, make_generator(12))
    assert abs(off_mode_fraction(x, far) - math.exp(-4.5)) < 0.001  # P(|N(0, I_2)| > 3) = e^{-9/2}, SE 0.0002
    target = eight_gaussians()  # neighbours 6.1 sd apart: a little of each tail is near the next mode
    assert 0.009 < off_mode_fraction(target.sample(100_000, make_generator(13)), target) < math.exp(-4.5)
    assert off_mode_fraction(target.means, target) == 0.0
    assert off_mode_fraction(torch.zeros(5, 2), target) == 1.0  # the origin: 8 sd from every mode
    with pytest.raises(TypeError, match="GaussianMixture"):
        off_mode_fraction(x, object())


# ----------------------------------------------------------------------------------------------- exact shortcut
def test_exact_shortcut_of_linear_field_matches_matrix_exponential():
    x = torch.randn(32, 2, generator=make_generator(5), dtype=D64)
    field = lambda y, t: y @ A.T  # noqa: E731
    got = exact_shortcut(field, x, 0.25, 0.5)
    assert torch.allclose(got, linear_shortcut()(x, 0.25, 0.5), atol=1e-10)
    assert torch.allclose(exact_shortcut(field, x, 0.3, 0.0), field(x, 0.3))
    with pytest.raises(ValueError, match="t \\+ d"):
        exact_shortcut(field, x, 0.75, 0.5)
    per_row = ExactShortcut(field)(x, torch.tensor([0.0, 0.5]).repeat(16).double(), torch.full((32,), 0.25))
    assert torch.allclose(per_row, linear_shortcut()(x, 0.0, 0.25), atol=1e-10)


def test_exact_playground_shortcut_is_self_consistent_and_one_step_exact():
    field = ExactField(CondOTPath(), eight_gaussians())
    x = torch.randn(200, 2, generator=make_generator(6), dtype=D64)
    s = ExactShortcut(field, steps_per_unit=64)
    resid = self_consistency_loss(s, x, 0.0, 0.25) / s(x, 0.0, 0.5).square().sum(1).mean()
    assert resid < 1e-8  # RK4 error only
    euler = self_consistency_loss(lambda y, t, d: field(y, t), x, 0.0, 0.25)
    assert euler > 0.1  # the velocity is not a shortcut
    one = sample_shortcut(s, x, 1)
    fine = integrate(field, x, 64, "rk4")
    assert torch.allclose(one, fine, atol=1e-12)


def test_error_map_is_zero_for_the_exact_shortcut_and_grows_with_d_for_the_velocity():
    field = ExactField(CondOTPath(), eight_gaussians())
    x0 = torch.randn(100, 2, generator=make_generator(7), dtype=D64)
    exact = shortcut_error_map(ExactShortcut(field, steps_per_unit=32), field, x0, max_steps=8, substeps=4)
    assert [len(ts) for ts, _ in exact] == [1, 2, 4, 8]
    assert max(e.max().item() for _, e in exact) < 1e-6
    velocity = shortcut_error_map(lambda y, t, d: field(y, t), field, x0, max_steps=8, substeps=4)
    per_level = [e.mean().item() for _, e in velocity]
    assert per_level[0] > 2.0 and per_level[0] > per_level[1] > per_level[2] > per_level[3]  # Euler: error ~ d
    traj = exact_grid_trajectory(field, x0, max_steps=8, substeps=4)  # computed once, reused
    again = shortcut_error_map(lambda y, t, d: field(y, t), None, None, max_steps=8, trajectory=traj)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(velocity, again))
    with pytest.raises(ValueError, match="trajectory"):
        shortcut_error_map(lambda y, t, d: field(y, t), None, None, max_steps=16, trajectory=traj)
    with pytest.raises(ValueError, match="precomputed"):
        shortcut_error_map(lambda y, t, d: field(y, t), None, None, max_steps=8)


# ----------------------------------------------------------------------------------------------- training
def test_training_is_reproducible_and_validated():
    kw = dict(steps=5, batch_size=32, device="cpu", teacher="online")
    a = fit_shortcut(small_shortcut(max_steps=8), eight_gaussians(), **kw)
    b = fit_shortcut(small_shortcut(max_steps=8), eight_gaussians(), **kw)
    assert a.losses == b.losses and len(a.losses) == 5 and a.ema_model is None
    assert all(math.isfinite(v) for v in a.parts["fm"] + a.parts["sc"])
    c = fit_shortcut(small_shortcut(max_steps=8), eight_gaussians(), steps=3, batch_size=32, device="cpu")
    assert c.ema_model is not None and not c.ema_model.training
    with pytest.raises(ValueError, match="teacher"):
        fit_shortcut(small_shortcut(max_steps=8), eight_gaussians(), steps=1, batch_size=32, teacher="bad")
    with pytest.raises(TypeError):
        fit_shortcut(VelocityMLP(), eight_gaussians(), steps=1, batch_size=32)


def test_short_training_beats_flow_matching_at_one_step():
    target, steps, batch = eight_gaussians(), 400, 128
    torch.manual_seed(0)
    fm = train(
        VelocityMLP(hidden=64, depth=3),
        CondOTPath(),
        target,
        steps=steps,
        batch_size=batch,
        lr=3e-3,
        device="cpu",
        progress=False,
    ).model
    torch.manual_seed(0)
    sc = fit_shortcut(
        ShortcutMLP(hidden=64, depth=3, max_steps=16),
        target,
        steps=steps,
        batch_size=batch,
        teacher="online",
        device="cpu",
    ).model
    x0, ref = torch.randn(1000, 2, generator=make_generator(8)), target.sample(1000, make_generator(9))
    ed_fm = energy_distance(integrate(fm, x0, 1), ref)
    ed_sc = energy_distance(sample_shortcut(sc, x0, 1), ref)
    assert ed_fm > 1.0  # one Euler step of the mean velocity: everything near the origin
    assert ed_sc < ed_fm / 3
