"""Solvers: convergence orders on ODEs with known solutions, NFE counts, divergence vs analytic traces,
and the change-of-variables log-likelihood against a closed-form Gaussian flow."""

from __future__ import annotations

import math

import pytest
import torch

from fmtoy.data import StandardNormal
from fmtoy.device import make_generator
from fmtoy.models import VelocityMLP
from fmtoy.solvers import SOLVERS, divergence, integrate, log_likelihood, nfe, sample

F64 = torch.float64
# dx/dt = A x with A = a I + b J (J a quarter turn): x(t) = e^{a t} R(b t) x(0)
A_SCALE, A_ROT = -0.5, 2.0
A = torch.tensor([[A_SCALE, -A_ROT], [A_ROT, A_SCALE]], dtype=F64)


def linear_field(x, t):
    return x @ A.T


def linear_solution(x0, t):
    c, s = math.cos(A_ROT * t), math.sin(A_ROT * t)
    return math.exp(A_SCALE * t) * x0 @ torch.tensor([[c, -s], [s, c]], dtype=F64).T


def nonautonomous_field(x, t):  # dx/dt = 2 t x  ->  x(t) = x(0) exp(t^2): tests the stage times
    return 2 * t[:, None] * x


def nonautonomous_solution(x0, t):
    return x0 * math.exp(t * t)


ODES = {"linear": (linear_field, linear_solution), "nonautonomous": (nonautonomous_field, nonautonomous_solution)}


def points(n=16, d=2, seed=0, dtype=F64):
    return torch.randn(n, d, generator=make_generator(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------- integrate
@pytest.mark.parametrize("ode", ODES)
@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_convergence_order(ode, method, order):
    field, solution = ODES[ode]
    x0 = points()
    exact = solution(x0, 1.0)
    errors = [(integrate(field, x0, steps, method) - exact).abs().max().item() for steps in (16, 32, 64)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    # halving h divides the global error by 2^order (asymptotically; +-20% on these step sizes)
    assert all(0.8 * 2**order < r < 1.2 * 2**order for r in ratios), (errors, ratios)


@pytest.mark.parametrize("method", SOLVERS)
def test_backward_integration_inverts_forward(method):
    x0 = points()
    steps = {"euler": 2000, "midpoint": 100, "rk4": 20}[method]
    back = integrate(linear_field, linear_solution(x0, 1.0), steps, method, t0=1.0, t1=0.0)
    assert torch.allclose(back, x0, atol=5e-3)
    there_and_back = integrate(linear_field, integrate(linear_field, x0, steps, method), steps, method, 1.0, 0.0)
    assert torch.allclose(there_and_back, x0, atol=5e-3)


def test_partial_interval_matches_exact_solution():
    x0 = points()
    x = integrate(nonautonomous_field, nonautonomous_solution(x0, 0.25), 20, "rk4", t0=0.25, t1=0.75)
    assert torch.allclose(x, nonautonomous_solution(x0, 0.75), atol=1e-7)


@pytest.mark.parametrize("method", SOLVERS)
def test_trajectory_shape_and_endpoints(method):
    x0 = points(n=5, d=3)
    field = lambda x, t: -x  # noqa: E731
    traj = integrate(field, x0, 7, method, return_trajectory=True)
    assert traj.shape == (8, 5, 3)
    assert torch.equal(traj[0], x0)
    assert torch.equal(traj[-1], integrate(field, x0, 7, method))
    # along the trajectory |x_t| = e^{-t} |x_0| on the grid t_k = k / 7
    t = torch.arange(8, dtype=F64) / 7
    expect = torch.exp(-t)[:, None, None] * x0
    assert torch.allclose(traj, expect, atol={"euler": 0.1, "midpoint": 1e-2, "rk4": 1e-5}[method])


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_velocity_calls_equal_nfe_and_time_is_a_vector(method, steps):
    x0 = points(n=6, dtype=torch.float32)
    calls = []

    def counting(x, t):
        calls.append(t.clone())
        assert t.shape == (6,) and t.dtype == x.dtype and t.device == x.device
        return torch.sin(x)

    integrate(counting, x0, steps, method)
    assert len(calls) == nfe(method, steps) == {"euler": 1, "midpoint": 2, "rk4": 4}[method] * steps
    stages = {"euler": [0.0], "midpoint": [0.0, 0.5], "rk4": [0.0, 0.5, 0.5, 1.0]}[method]
    expect = torch.tensor([(k + c) / steps for k in range(steps) for c in stages])
    assert torch.allclose(torch.stack(calls)[:, 0], expect)
    assert all((c == c[0]).all() for c in calls)


def test_no_grad_by_default_and_grad_flag():
    model = VelocityMLP(hidden=16, depth=1)
    x0 = points(n=4, dtype=torch.float32)
    assert not integrate(model, x0, 3, "midpoint").requires_grad
    out = integrate(model, x0, 3, "midpoint", grad=True)
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sample_pushes_source_through_the_flow():
    shift = torch.tensor([3.0, -1.0])
    x = sample(lambda x, t: shift.expand_as(x), StandardNormal(), 4000, steps=5, generator=make_generator(0))
    assert x.shape == (4000, 2)
    # x = x_0 + shift with x_0 ~ N(0, I): the mean is within 5 standard errors of the shift
    assert ((x.mean(0) - shift).abs() < 5 / math.sqrt(4000)).all()


def test_sample_same_generator_same_samples():
    field = lambda x, t: -x  # noqa: E731
    a = sample(field, StandardNormal(), 10, generator=make_generator(3))
    b = sample(field, StandardNormal(), 10, generator=make_generator(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- divergence
def test_exact_divergence_of_linear_field_is_trace():
    a = torch.randn(3, 3, generator=make_generator(1), dtype=F64)
    x = points(n=10, d=3)
    div = divergence(lambda x, t: x @ a.T + t[:, None], x, 0.3)
    assert div.shape == (10,)
    assert torch.allclose(div, torch.full((10,), torch.trace(a).item(), dtype=F64), atol=1e-12)


def nonlinear_field(x, t):
    x0, x1 = x[:, 0], x[:, 1]
    return torch.stack([torch.sin(x0 * x1) * (1 + t), x0**2 * x1**3 + t], dim=1)


def nonlinear_divergence(x, t):  # d/dx0 sin(x0 x1)(1+t) + d/dx1 x0^2 x1^3
    x0, x1 = x[:, 0], x[:, 1]
    return (1 + t) * x1 * torch.cos(x0 * x1) + 3 * x0**2 * x1**2


def test_exact_divergence_of_nonlinear_field():
    x = points(n=20)
    t = torch.rand(20, generator=make_generator(2), dtype=F64)
    assert torch.allclose(divergence(nonlinear_field, x, t), nonlinear_divergence(x, t), atol=1e-12)
    with torch.no_grad():  # the caller's no_grad does not matter
        assert torch.allclose(divergence(nonlinear_field, x, t[:, None]), nonlinear_divergence(x, t), atol=1e-12)


def test_hutchinson_is_exact_for_diagonal_jacobians():
    # eps^T D eps = sum_i D_ii eps_i^2 = tr D for Rademacher probes (Gaussian probes would not be exact)
    x = points(n=50)
    field = lambda x, t: torch.stack([x[:, 0] ** 3, torch.sin(x[:, 1])], 1)  # noqa: E731
    est = divergence(field, x, 0.5, method="hutchinson", generator=make_generator(0))
    assert torch.allclose(est, divergence(field, x, 0.5), atol=1e-12)


def test_hutchinson_is_unbiased_with_the_rademacher_variance():
    # for v = A x: eps^T A eps = tr A + (A_01 + A_10) eps_0 eps_1, so the variance is (A_01 + A_10)^2 per probe
    a = torch.tensor([[0.3, 2.0], [0.5, -1.0]], dtype=F64)
    x = points(n=4000)
    est = divergence(lambda x, t: x @ a.T, x, 0.0, method="hutchinson", generator=make_generator(1))
    stderr = 2.5 / math.sqrt(4000)
    assert abs(est.mean().item() - torch.trace(a).item()) < 5 * stderr
    assert abs(est.var().item() - 2.5**2) < 0.1 * 2.5**2
    # nonlinear field, many probes per point: within Monte-Carlo error of the exact divergence
    x = points(n=8)
    est = divergence(nonlinear_field, x, 0.2, method="hutchinson", n_probes=4000, generator=make_generator(2))
    exact = divergence(nonlinear_field, x, 0.2)
    with torch.no_grad():
        xg = x.clone().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(lambda z: nonlinear_field(z, torch.full((8,), 0.2, dtype=F64)), xg)
    off = torch.stack([jac[i, 0, i, 1] + jac[i, 1, i, 0] for i in range(8)])  # per-point std of one probe
    assert ((est - exact).abs() <= 5 * off.abs() / math.sqrt(4000) + 1e-12).all()


def test_divergence_of_model_leaves_no_grad_and_matches_jacobian():
    torch.manual_seed(0)
    model = VelocityMLP(hidden=32, depth=2)
    x, t = points(n=6, dtype=torch.float32), torch.rand(6)
    div = divergence(model, x, t)
    assert not div.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        divergence(model, x, t, method="hutchinson")
    assert all(p.grad is None for p in model.parameters())
    jac = torch.autograd.functional.jacobian(lambda z: model(z, t), x)  # (n, d, n, d)
    trace = torch.stack([jac[i, :, i, :].trace() for i in range(6)])
    assert torch.allclose(div, trace, atol=1e-5)


def test_divergence_rejects_a_non_differentiable_field():
    def detached(x, t):
        with torch.no_grad():
            return torch.sin(x)

    with pytest.raises(ValueError, match="not differentiable"):
        divergence(detached, points(n=3), 0.5)


# ----------------------------------------------------------------------------------------------- likelihood
M, S = torch.tensor([1.5, -0.5], dtype=F64), 0.6


def gaussian_ot_field(x, t):
    """CondOT marginal field from N(0, I) to N(m, s^2 I): x_t ~ N(t m, ((1-t)^2 + t^2 s^2) I) and
    u_t(x) = m + (t s^2 - (1-t)) / ((1-t)^2 + t^2 s^2) (x - t m)   (Cov(x_1 - x_0, x_t) / Var x_t)."""
    t = t[:, None]
    var = (1 - t) ** 2 + t**2 * S**2
    return M + (t * S**2 - (1 - t)) / var * (x - t * M)


def gaussian_log_prob(x, m=M, s=S):
    d = x.shape[1]
    return -0.5 * ((x - m) ** 2).sum(1) / s**2 - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)


def test_log_likelihood_of_gaussian_flow_is_exact():
    x1 = M + S * points(n=200, seed=5)
    source = StandardNormal()
    ll = log_likelihood(gaussian_ot_field, x1, source, steps=40, method="rk4")
    truth = gaussian_log_prob(x1)
    assert ll.shape == (200,) and ll.dtype == F64
    assert (ll - truth).abs().max() < 1e-4
    # the same flow with the divergence term's sign flipped is far off: the sign is tested
    x0 = integrate(gaussian_ot_field, x1, 40, "rk4", t0=1.0, t1=0.0)
    integral_of_div = source.log_prob(x0) - ll
    wrong = source.log_prob(x0) + integral_of_div
    assert (wrong - truth).abs().min() > 0.5
    # Rademacher Hutchinson is exact here (the Jacobian is a multiple of I)
    hutch = log_likelihood(
        gaussian_ot_field, x1, source, steps=40, divergence="hutchinson", generator=make_generator(0)
    )
    assert (hutch - truth).abs().max() < 1e-4


@pytest.mark.parametrize("method,steps,tol", [("euler", 400, 2e-2), ("midpoint", 40, 2e-3)])
def test_log_likelihood_other_solvers_converge(method, steps, tol):
    x1 = M + S * points(n=50, seed=6)
    ll = log_likelihood(gaussian_ot_field, x1, StandardNormal(), steps=steps, method=method)
    assert (ll - gaussian_log_prob(x1)).abs().max() < tol


def test_log_likelihood_of_model_flow_integrates_to_one():
    # p_1 is the push-forward of N(0, I) by a random smooth flow (far from N(0, I): L1 distance ~0.4), so its
    # integral over R^2 is 1 (midpoint rule on [-7, 7]^2: error << 2e-3); flipping the divergence's sign gives ~1.2
    torch.manual_seed(0)
    model = VelocityMLP(hidden=32, depth=2).double()
    with torch.no_grad():
        model.net[-1].weight.mul_(20.0)
    g = torch.linspace(-7, 7, 41, dtype=F64)
    grid, cell = torch.cartesian_prod(g, g), (g[1] - g[0]).item() ** 2
    ll = log_likelihood(model, grid, StandardNormal(), steps=8)
    assert abs(ll.exp().sum().item() * cell - 1) < 2e-3
    log_p0 = StandardNormal().log_prob(integrate(model, grid, 8, "rk4", t0=1.0, t1=0.0))
    assert abs((2 * log_p0 - ll).exp().sum().item() * cell - 1) > 0.05
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- bad inputs
FIELD = lambda x, t: -x  # noqa: E731
X = torch.zeros(4, 2)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(steps=1.5), ValueError, "steps"),
        (dict(steps=True), ValueError, "steps"),
        (dict(method="heun"), ValueError, "allowed: euler, midpoint, rk4"),
        (dict(t0=-0.1), ValueError, r"t0 must be a number in \[0, 1\]"),
        (dict(t1=1.5), ValueError, r"t1 must be a number in \[0, 1\]"),
        (dict(t1=float("nan")), ValueError, "t1"),
        (dict(x0=torch.zeros(4)), ValueError, r"x0 must have shape \(n, d\)"),
        (dict(x0=torch.zeros(4, 2, 1)), ValueError, "x0 must have shape"),
        (dict(x0=[[0.0, 0.0]]), TypeError, "x0 must be a torch.Tensor"),
        (dict(x0=torch.zeros(4, 2, dtype=torch.long)), TypeError, "floating-point"),
        (dict(velocity="rk4"), TypeError, "velocity must be a callable"),
        (dict(velocity=lambda x, t: x[:, :1]), ValueError, "must return a tensor shaped like x"),
    ],
)
def test_integrate_rejects_bad_inputs(kwargs, err, match):
    args = dict(velocity=FIELD, x0=X, steps=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        integrate(**args)


@pytest.mark.parametrize("method,steps", [("rk5", 3), ("euler", 0), ("midpoint", 2.0)])
def test_nfe_rejects_bad_inputs(method, steps):
    with pytest.raises(ValueError):
        nfe(method, steps)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(method="jacobian"), ValueError, "allowed: exact, hutchinson"),
        (dict(n_probes=0), ValueError, "n_probes"),
        (dict(t=1.2), ValueError, r"\[0, 1\]"),
        (dict(t=torch.zeros(3)), ValueError, "t has 3 entries"),
        (dict(x=torch.zeros(4)), ValueError, "shape"),
        (dict(generator=0, method="hutchinson"), TypeError, "generator"),
    ],
)
def test_divergence_rejects_bad_inputs(kwargs, err, match):
    args = dict(velocity=lambda x, t: x**2, x=X.double(), t=0.5)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        divergence(**args)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x1=torch.zeros(4, 3)), ValueError, r"x1 must have shape \(n, 2\)"),
        (dict(source=object()), TypeError, "source must be"),
        (dict(divergence="trace"), ValueError, "allowed: exact, hutchinson"),
        (dict(method="dopri5"), ValueError, "allowed: euler, midpoint, rk4"),
        (dict(steps=0), ValueError, "steps"),
    ],
)
def test_log_likelihood_rejects_bad_inputs(kwargs, err, match):
    args = dict(velocity=lambda x, t: x**2, x1=X, source=StandardNormal())
    args.update(kwargs)
    with pytest.raises(err, match=match):
        log_likelihood(**args)


def test_steps_for_nfe_and_the_quality_sweep():
    from fmtoy.data import eight_gaussians
    from fmtoy.marginal import ExactField
    from fmtoy.metrics import quality_vs_nfe
    from fmtoy.paths import CondOTPath
    from fmtoy.solvers import steps_for_nfe

    assert [steps_for_nfe(m, 8) for m in ("euler", "midpoint", "rk4")] == [8, 4, 2]
    assert steps_for_nfe("rk4", 2, exact=False) == 1
    with pytest.raises(ValueError, match="midpoint spends 2 evaluations per step, so nfe must be a multiple of 2"):
        steps_for_nfe("midpoint", 3)
    q = eight_gaussians()
    g = make_generator(0)
    x0, ref = torch.randn(1500, 2, generator=g), q.sample(1500, generator=g)
    sweep = quality_vs_nfe(ExactField(CondOTPath(), q), x0, ref, (1, 2, 4, 16), "midpoint")
    assert list(sweep) == [2, 4, 16]  # NFE 1 cannot be spent by midpoint: left out
    assert sweep[16] < sweep[2] / 5  # more evaluations, closer to the target


# ----------------------------------------------------------------------------------------------- the flow map (ch. 10)
def test_flow_map_semigroup_inverse_and_per_row_times():
    from fmtoy.data import eight_gaussians
    from fmtoy.marginal import ExactField
    from fmtoy.paths import CondOTPath
    from fmtoy.solvers import flow_map

    field = ExactField(CondOTPath(), eight_gaussians())
    x = torch.randn(400, 2, generator=make_generator(0), dtype=torch.float64)
    whole = flow_map(field, x, 0.0, 1.0, steps=64)
    resid = {}
    for steps in (8, 16):  # two legs on grids unlike the whole step's: Phi_{0.3->1} o Phi_{0->0.3} = Phi_{0->1}
        legs = flow_map(field, flow_map(field, x, 0.0, 0.3, steps=steps), 0.3, 1.0, steps=2 * steps)
        resid[steps] = (legs - whole).norm(dim=1).max().item()
    assert resid[16] < 1e-4 and resid[8] / resid[16] > 8  # to solver tolerance, which falls at RK4's order
    back = flow_map(field, whole, 1.0, 0.0, steps=64)  # Phi_{1->0} inverts Phi_{0->1}
    assert (back - x).abs().max() < 1e-4
    s = torch.rand(400, generator=make_generator(1), dtype=torch.float64) * 0.5
    t = s + 0.5
    rows = flow_map(field, x, s, t, steps=32)
    for i in (0, 7, 399):  # per-row times: each row its own interval, the same number of steps
        one = flow_map(field, x[i : i + 1], s[i].item(), t[i].item(), steps=32)
        torch.testing.assert_close(rows[i : i + 1], one, rtol=1e-12, atol=1e-12)
    assert torch.equal(flow_map(field, x, 0.4, 0.4), x)
    calls = []
    flow_map(lambda y, tt: calls.append(1) or y, x, 0.0, 0.5, method="euler", steps_per_unit=4)
    assert len(calls) == 2  # ceil(0.5 * 4) steps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(s=1.5), "s must be"),
        (dict(t=torch.full((10,), 1.2)), r"t must lie in \[0, 1\]"),
        (dict(t=torch.full((3,), 0.5)), "t has 3 entries but x has 10 rows"),
        (dict(steps=0), "steps"),
        (dict(method="heun"), "allowed: euler, midpoint, rk4"),
    ],
)
def test_flow_map_rejects_bad_input(kwargs, match):
    from fmtoy.solvers import flow_map

    args = dict(velocity=lambda y, tt: y, x=torch.zeros(10, 2), s=0.0, t=1.0)
    with pytest.raises(ValueError, match=match):
        flow_map(**{**args, **kwargs})
