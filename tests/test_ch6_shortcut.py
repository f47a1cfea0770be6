"""Chapter 6 (shortcut models): the SymPy identities (exact shortcut and self-consistency, Euler's residual, the
Euler-level recursion, the small-d coefficient, the MeanFlow limit), MeanFlow's training pieces, and the exercise
solution extracted from the page."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sympy as sp
import torch
from chapter_solutions import solution_namespace

from fmtoy.data import eight_gaussians
from fmtoy.device import make_generator
from fmtoy.methods.meanflow import (
    MeanFlowConfig,
    MeanFlowMLP,
    fit_meanflow,
    meanflow_loss,
    meanflow_times,
    sample_meanflow,
)
from fmtoy.methods.shortcut import ShortcutMLP
from fmtoy.methods.shortcut import shortcut_target as reference_target
from fmtoy.symbolic import is_zero
from fmtoy.symbolic import shortcut as Z
from fmtoy.symbolic.shortcut import d, h, lam, x

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch6_shortcut.md"
D64 = torch.float64
# torch.func.jvp's first call scripts decompositions and warns (torch's own deprecation warning)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]
FLOWS = {"linear": Z.linear_flow(), "gaussian": Z.gaussian_marginal_flow()}


# ----------------------------------------------------------------------------------------------- symbolic
@pytest.mark.parametrize("name", FLOWS)
def test_closed_form_flows_are_flows(name):
    assert sp.simplify(Z.flow_residual(FLOWS[name])) == 0


@pytest.mark.parametrize("name", FLOWS)
def test_exact_shortcut_is_self_consistent_euler_is_not(name):
    flow = FLOWS[name]
    assert sp.simplify(Z.self_consistency_residual(Z.exact_shortcut(flow))) == 0
    assert not is_zero(Z.self_consistency_residual(Z.velocity_shortcut(flow)), method="points")


def test_linear_euler_residual_closed_form():
    res = Z.self_consistency_residual(Z.velocity_shortcut(Z.linear_flow()))
    assert sp.simplify(res + lam**2 * d * x / 2) == 0


def test_exact_shortcut_tends_to_velocity():
    s = Z.exact_shortcut(Z.linear_flow())(x, Z.t, d)
    assert sp.limit(s, d, 0) == lam * x
    g = Z.gaussian_marginal_flow()
    sg = Z.exact_shortcut(g)(x, Z.t, d)
    assert is_zero(sp.limit(sg, d, 0) - g.u, method="points")


def test_split_self_consistency_for_exact_shortcut():
    """Any split e + (D - e), not only e = D/2."""
    s = Z.exact_shortcut(Z.linear_flow())
    assert sp.simplify(Z.split_step_residual(s)) == 0
    assert sp.simplify(Z.split_step_residual(Z.velocity_shortcut(Z.linear_flow()))) != 0


@pytest.mark.parametrize("j", range(4))
def test_euler_level_recursion(j):
    built = Z.euler_level_shortcut(lam * x, j)
    assert sp.simplify(built - ((1 + lam * h) ** (2**j) - 1) * x / (2**j * h)) == 0


def test_one_step_error_of_the_euler_built_shortcut():
    rel = (1 + lam / 128) ** 128 / sp.exp(lam) - 1
    assert sp.simplify(sp.series(rel, lam, 0, 3).removeO() + lam**2 / 256) == 0


def test_euler_level_recursion_time_dependent_field():
    """Level 1 averages two Euler steps: the second at time t + h and at the moved point."""
    u = Z.t * x
    assert sp.expand(Z.euler_level_shortcut(u, 1) - (u + (Z.t + h) * (x + h * u)) / 2) == 0


def test_small_d_coefficient_is_half_the_acceleration():
    a, half_accel = Z.small_d_coefficient()
    assert sp.simplify(a - half_accel) == 0


def test_meanflow_limit_and_exact_shortcuts_satisfy_it():
    limit = Z.meanflow_limit()
    assert sp.expand(limit.derived - limit.meanflow) == 0
    for flow in FLOWS.values():
        assert is_zero(Z.meanflow_residual(Z.exact_shortcut(flow), flow.u), method="points")
        assert not is_zero(Z.meanflow_residual(Z.velocity_shortcut(flow), flow.u), method="points")


def test_symbolic_inputs_are_checked():
    with pytest.raises(TypeError):
        Z.self_consistency_residual("not callable")
    with pytest.raises(TypeError):
        Z.linear_flow("a b")
    with pytest.raises(ValueError):
        Z.euler_level_shortcut(x, -1)


# ----------------------------------------------------------------------------------------------- MeanFlow
def test_meanflow_times_fraction_and_range():
    for law in ("logit_normal", "uniform"):
        t, dd = meanflow_times(400, 0.25, make_generator(0), law=law)
        assert (dd[:100] > 0).all() and (dd[100:] == 0).all()
        assert ((t >= 0) & (t + dd <= 1)).all()
    with pytest.raises(ValueError):
        meanflow_times(10, 1.5)
    with pytest.raises(ValueError, match="law"):
        meanflow_times(10, 0.25, law="normal")


def test_meanflow_times_follow_the_official_law_mirrored():
    """Official: t, r ~ sigmoid(N(-0.4, 1)) with t = 1 noise, (t, r) = (max, min), r = t on the flow-matching rows.
    Mirrored (t -> 1 - t): both ends ~ sigmoid(N(0.4, 1)), and the flow-matching rows take the noise-side draw, the min
    of two, whose logit has mean 0.4 - 1/sqrt(pi) (the expected minimum of two N(0.4, 1))."""
    n = 200_000
    t, dd = meanflow_times(n, 0.5, make_generator(1), dtype=D64)
    m = n // 2
    ends = torch.cat([t[:m], t[:m] + dd[:m]])
    logit = torch.log(ends / (1 - ends))
    assert abs(logit.mean().item() - 0.4) < 0.01 and abs(logit.std().item() - 1.0) < 0.01
    fm = torch.log(t[m:] / (1 - t[m:]))
    assert abs(fm.mean().item() - (0.4 - 1 / math.sqrt(math.pi))) < 0.01
    tu, _ = meanflow_times(n, 0.0, make_generator(2), dtype=D64, law="uniform")
    assert abs(tu.mean().item() - 1 / 3) < 0.005  # the min of two uniforms: density 2(1 - t), biased to noise


def test_meanflow_defaults_are_the_official_ones():
    import inspect

    assert inspect.signature(meanflow_loss).parameters["eps"].default == 0.01
    config = MeanFlowConfig()
    assert (config.fraction, config.power, config.eps, config.law) == (0.25, 1.0, 0.01, "logit_normal")
    with pytest.raises(ValueError, match="eps"):
        MeanFlowConfig(eps=0.0)
    with pytest.raises(ValueError, match="law"):
        MeanFlowConfig(law="bad")


def test_adaptive_weight_is_the_gradient_of_a_log_loss_whose_minimiser_is_not_the_mean():
    """w = sg(1 / (e^2 + c)) gives the gradient of log(e^2 + c): for a two-point target its minimiser sits near a
    point, not at the mean; with power 0 (plain squared error) it is the mean."""
    y = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=D64).repeat(50, 1)

    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor([[0.5, 0.0]], dtype=D64))

        def forward(self, x, t, dd):
            return self.c.expand(x.shape[0], 2) + 0 * x

    net = Const()
    zeros, ones = torch.zeros_like(y), torch.ones(len(y), dtype=D64)
    loss = meanflow_loss(net, zeros, y, ones * 0.3, ones * 0.0, power=1.0, eps=0.01)
    (grad,) = torch.autograd.grad(loss, [net.c])
    e2 = (y - net.c.detach()).square().sum(1)
    want = (2 * (net.c.detach() - y) / (e2 + 0.01)[:, None]).mean(0)
    assert torch.allclose(grad[0], want)
    for power, want_c in ((0.0, 0.0), (1.0, 2.0)):
        net = Const()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)  # below 2 / curvature (~ 1 / eps) at the point
        for _ in range(1500):
            opt.zero_grad()
            meanflow_loss(net, zeros, y, ones * 0.3, ones * 0.0, power=power, eps=0.01).backward()
            opt.step()
        c = net.c.detach()
        assert abs(c[0, 0].item() - want_c) < 0.05, (power, c)


def test_meanflow_loss_is_zero_for_the_exact_average_velocity_of_a_point_pair():
    """One pair (x0, x1): every path is the straight line, the average velocity is x1 - x0 for all (t, d)."""
    x0, x1 = torch.tensor([[0.3, -1.0]], dtype=D64), torch.tensor([[2.0, 1.0]], dtype=D64)

    class Const(torch.nn.Module):
        def forward(self, x, t, dd):
            return (x1 - x0).expand(x.shape[0], 2) + 0 * x

    t, dd = torch.tensor([0.2, 0.5], dtype=D64), torch.tensor([0.3, 0.0], dtype=D64)
    loss = meanflow_loss(Const(), x0.expand(2, 2), x1.expand(2, 2), t, dd, power=0.0)
    assert loss.item() < 1e-24


def test_meanflow_target_has_no_gradient_and_training_runs():
    torch.manual_seed(0)
    net = MeanFlowMLP(hidden=16, depth=1)
    g = make_generator(1)
    x0, x1 = torch.randn(32, 2, generator=g), eight_gaussians().sample(32, g)
    t, dd = meanflow_times(32, 0.5, g)
    loss = meanflow_loss(net, x0, x1, t, dd, power=0.0)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    # the same loss against a frozen target: equal gradients
    net.zero_grad()
    tc, dc = t[:, None], dd[:, None]
    xt, v = (1 - tc) * x0 + tc * x1, x1 - x0
    _, ds = torch.func.jvp(
        lambda a, b, c: net(a, b[:, 0], c[:, 0]), (xt, tc, dc), (v, torch.ones_like(tc), -torch.ones_like(dc))
    )
    frozen = (v + dc * ds).detach()
    ((net(xt, t, dd) - frozen).square().sum(1).mean()).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, net.parameters()))
    res = fit_meanflow(MeanFlowMLP(hidden=16, depth=1), eight_gaussians(), steps=5, batch_size=16, device="cpu")
    assert len(res.losses) == 5 and sample_meanflow(res.model, torch.randn(4, 2), 2).shape == (4, 2)


# ----------------------------------------------------------------------------------------------- exercise
def _solutions() -> dict[str, object]:
    return solution_namespace(CHAPTER)


def test_solution_shortcut_target():
    f = _solutions()["shortcut_target"]
    a = torch.tensor([[-0.5, 1.0], [-1.0, 0.2]], dtype=D64)

    def s_exact(y, t, dd):
        mats = (torch.linalg.matrix_exp(a * dd[:, None, None]) - torch.eye(2, dtype=D64)) / dd[:, None, None]
        return (mats @ y[:, :, None])[:, :, 0]

    g = make_generator(2)
    y = torch.randn(16, 2, generator=g, dtype=D64)
    t, dd = torch.rand(16, generator=g, dtype=D64) * 0.5, torch.full((16,), 0.25, dtype=D64)
    assert torch.allclose(f(s_exact, y, t, dd), s_exact(y, t, 2 * dd), atol=1e-12)
    torch.manual_seed(3)
    net = ShortcutMLP(hidden=16, depth=1, max_steps=8)
    yf = torch.randn(8, 2, generator=g)
    tf, df = torch.zeros(8), torch.full((8,), 0.125)
    out = f(net, yf, tf, df)
    assert not out.requires_grad
    assert torch.allclose(out, reference_target(net, yf, tf, df), atol=1e-6)


def test_exercise_points_match_title():
    import re

    import jupytext

    nb = jupytext.read(CHAPTER)
    total = sum(
        c.metadata.get("points", 0)
        for c in nb.cells
        if c.cell_type == "code" and c.metadata.get("exercise") == "ex-ch6-shortcut-target"
    )
    title = re.search(r"The shortcut target from two half steps \(code, (\d+) points\)", CHAPTER.read_text())
    assert title and int(title.group(1)) == total == 3
