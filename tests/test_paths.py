"""fmtoy.paths: Thm 3 fields against autograd time derivatives, schedules, sampling moments, registry, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fmtoy.device import make_generator
from fmtoy.paths import AffinePath, CondOTPath, GaussianPath, SchedulerOutput, VEPath, VPPath, get_path, list_paths

F64 = torch.float64


def cosine(derivatives: bool = False) -> AffinePath:
    """alpha = sin(pi t/2), sigma = cos(pi t/2) (sigma_1 = 0, so t_max < 1); derivatives by autograd unless given."""
    h = math.pi / 2
    d = dict(d_alpha=lambda t: h * torch.cos(h * t), d_sigma=lambda t: -h * torch.sin(h * t)) if derivatives else {}
    return AffinePath(lambda t: torch.sin(h * t), lambda t: torch.cos(h * t), name="cosine", t_max=1 - 1e-5, **d)


PATHS = {
    "ot": CondOTPath(),
    "ot_smin": CondOTPath(sigma_min=0.1),
    "ve": VEPath(),
    "vp": VPPath(),
    "vp_other": VPPath(beta_min=0.5, beta_max=5.0),
    "cosine": cosine(),
    "cosine_explicit": cosine(True),
}
ALL = pytest.mark.parametrize("path", list(PATHS.values()), ids=list(PATHS))


def draws(path: GaussianPath, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (x0, x1, t) in float64 with t inside [t_min, min(t_max, 0.99)]."""
    g = make_generator(seed)
    lo, hi = path.t_min, min(path.t_max, 0.99)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64), 3 * torch.randn(n, 2, generator=g, dtype=F64), t


def time_derivative(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d y[k] / d t[k] for rows that depend only on their own t (autograd, one column at a time)."""
    cols = [torch.autograd.grad(y[:, j].sum(), t, retain_graph=True)[0] for j in range(y.shape[1])]
    return torch.stack(cols, dim=1)


@ALL
def test_conditional_velocity_is_time_derivative_of_flow(path):
    """Thm 3: u_t(psi_t(x_0)|x_1) = d/dt psi_t(x_0), and the CFM target is the same derivative."""
    x0, x1, t = draws(path)
    t.requires_grad_(True)
    xt = path.sample_xt(x0, x1, t)
    dxdt = time_derivative(xt, t)
    t = t.detach()
    u = path.conditional_velocity(xt.detach(), t, x1)
    scale = 1 + dxdt.abs()
    assert ((u - dxdt).abs() / scale).max() < 1e-10
    assert ((path.target_velocity(x0, x1, t) - dxdt).abs() / scale).max() < 1e-12


@ALL
def test_conditional_path_satisfies_continuity_equation(path):
    """d/dt log p_t(x|x_1) + div u_t(x|x_1) + u . grad log p_t(x|x_1) = 0 (exact autograd derivatives)."""
    _, x1, t = draws(path, n=64, seed=1)
    x = (2 * torch.randn(64, 2, dtype=F64, generator=make_generator(2))).requires_grad_(True)
    t.requires_grad_(True)
    logp = path.conditional_log_prob(x, t, x1)
    dlogp_dt, grad = torch.autograd.grad(logp.sum(), (t, x), create_graph=True)
    u = path.conditional_velocity(x, t, x1)
    div = sum(torch.autograd.grad(u[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(2))
    terms = torch.stack([dlogp_dt, div, (u * grad).sum(1)])
    assert (terms.sum(0).abs() / (1 + terms.abs().sum(0))).max() < 1e-10
    assert (terms[0].abs() > 1e-3).any()  # the check is not vacuous


@ALL
def test_derivatives_match_finite_differences(path):
    t = torch.linspace(max(path.t_min, 0.02), min(path.t_max, 0.98), 41, dtype=F64)
    h = 1e-6
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert ((df(t) - fd).abs() / (1 + fd.abs())).max() < 1e-7
    assert path.alpha(t).shape == path.d_sigma(t).shape == t.shape


@ALL
def test_sample_xt_has_conditional_mean_and_std(path):
    """Monte Carlo: x_t = psi_t(x_0|x_1), x_0 ~ N(0, I), has mean alpha_t x_1 and std sigma_t (5 standard errors)."""
    g = make_generator(3)
    n, t = 40_000, 0.6
    x1 = torch.tensor([[1.5, -2.0]], dtype=F64).expand(n, 2)
    xt = path.sample_xt(torch.randn(n, 2, generator=g, dtype=F64), x1, t)
    mean, std = path.conditional_mean_std(t, x1)
    assert mean.shape == (n, 2) and std.shape == (n, 1)
    s = std[0, 0].item()
    assert ((xt.mean(0) - mean[0]).abs() < 5 * s / math.sqrt(n)).all()
    assert ((xt.std(0) - s).abs() < 5 * s / math.sqrt(2 * n)).all()


@ALL
def test_conditional_log_prob_is_gaussian(path):
    x0, x1, t = draws(path, n=32, seed=4)
    x = x0 + 1.0
    mean, std = path.conditional_mean_std(t, x1)
    ref = torch.distributions.Normal(mean, std).log_prob(x).sum(1)
    assert torch.allclose(path.conditional_log_prob(x, t, x1), ref, rtol=1e-12, atol=1e-12)


def test_boundary_values():
    g = make_generator(5)
    x0, x1 = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)
    ot, ot_s = CondOTPath(), CondOTPath(sigma_min=0.1)
    assert torch.equal(ot.sample_xt(x0, x1, 0.0), x0) and torch.allclose(ot.sample_xt(x0, x1, 1.0), x1)
    assert torch.allclose(ot_s.sample_xt(x0, x1, 1.0), x1 + 0.1 * x0)
    ve, vp = VEPath(sigma_min=0.02, sigma_max=8.0), VPPath()
    assert math.isclose(ve.sigma(0.0).item(), 8.0, rel_tol=1e-6)
    assert math.isclose(ve.sigma(1.0).item(), 0.02, rel_tol=1e-6)
    assert vp.alpha(1.0).item() == 1.0 and vp.sigma(1.0).item() == 0.0
    assert math.isclose(vp.alpha(0.0).item(), math.exp(-(0.1 + 19.9 / 2) / 2), rel_tol=1e-6)
    assert math.isclose(vp.alpha(0.3).item() ** 2 + vp.sigma(0.3).item() ** 2, 1.0, rel_tol=1e-6)
    # the non-singular CondOT form is finite up to t = 1 when sigma_min > 0, and equals x_1 - (1 - s) x there
    assert torch.allclose(ot_s.conditional_velocity(x0, 1.0, x1), (x1 - 0.9 * x0) / 0.1)


def test_affine_path_reproduces_condot_and_autograd_derivatives():
    g = make_generator(6)
    aff = AffinePath(lambda t: t, lambda t: 1 - 0.9 * t, t_max=1.0)
    ot = CondOTPath(sigma_min=0.1)
    x, x1, t = torch.randn(20, 2, generator=g, dtype=F64), torch.randn(20, 2, generator=g, dtype=F64), torch.rand(20)
    assert torch.allclose(aff.conditional_velocity(x, t, x1), ot.conditional_velocity(x, t, x1))
    t = torch.rand(50, dtype=F64)
    auto, explicit = cosine(), cosine(derivatives=True)
    assert torch.allclose(auto.d_alpha(t), explicit.d_alpha(t), atol=1e-14)
    assert torch.allclose(auto.d_sigma(t), explicit.d_sigma(t), atol=1e-14)
    const = AffinePath(lambda t: 1.0, lambda t: 2 - t)  # constants broadcast, their derivative is 0
    assert torch.equal(const.d_alpha(t), torch.zeros_like(t)) and torch.equal(const.alpha(t), torch.ones_like(t))


def test_float32_in_float32_out_and_scalar_time():
    path = VPPath()
    x, x1 = torch.randn(7, 2), torch.randn(7, 2)
    u = path.conditional_velocity(x, 0.4, x1)
    assert u.dtype == torch.float32 and u.shape == (7, 2)
    assert torch.allclose(u, path.conditional_velocity(x, torch.full((7,), 0.4), x1))
    assert torch.allclose(u, path.conditional_velocity(x, torch.full((7, 1), 0.4), x1))


def test_registry():
    assert list_paths() == ["ot", "ve", "vp"]
    assert isinstance(get_path("ot"), CondOTPath) and get_path("ot", sigma_min=0.1).sigma_min == 0.1
    assert get_path("ve", sigma_max=5.0).sigma_max == 5.0 and get_path("vp", beta_max=10.0).beta_max == 10.0
    for p in (CondOTPath(), VPPath()):
        assert p.t_min == 0.0 and p.t_max < 1 and p.sigma(p.t_max).item() > 0
    assert CondOTPath(sigma_min=0.1).t_max == 1.0 and VEPath().t_max == 1.0


X, X1 = torch.randn(4, 2), torch.randn(4, 2)
BAD = {
    "t>1": (lambda: CondOTPath().sample_xt(X, X1, 1.5), ValueError),
    "t<0": (lambda: CondOTPath().conditional_velocity(X, -0.1, X1), ValueError),
    "t nan": (lambda: VPPath().alpha(torch.tensor([0.5, float("nan")])), ValueError),
    "t schedule >1": (lambda: VEPath().sigma(torch.tensor([1.2])), ValueError),
    "t string": (lambda: VEPath().sigma("0.5"), TypeError),
    "t wrong length": (lambda: CondOTPath().sample_xt(X, X1, torch.rand(3)), ValueError),
    "t 2d": (lambda: CondOTPath().sample_xt(X, X1, torch.rand(4, 2)), ValueError),
    "x 1d": (lambda: CondOTPath().sample_xt(X[0], X1[0], 0.5), ValueError),
    "x int": (lambda: CondOTPath().sample_xt(X.long(), X1, 0.5), TypeError),
    "x list": (lambda: CondOTPath().conditional_velocity([[0.0, 0.0]], 0.5, X1), TypeError),
    "x1 shape": (lambda: CondOTPath().conditional_velocity(X, 0.5, X1[:2]), ValueError),
    "x1 dim": (lambda: CondOTPath().target_velocity(X, torch.randn(4, 3), 0.5), ValueError),
    "ot singular t=1": (lambda: CondOTPath().conditional_velocity(X, 1.0, X1), ValueError),
    "ot log_prob t=1": (lambda: CondOTPath().conditional_log_prob(X, 1.0, X1), ValueError),
    "vp singular t=1": (lambda: VPPath().target_velocity(X, X1, 1.0), ValueError),
    "cosine t=1": (lambda: cosine().conditional_velocity(X, 1.0, X1), ValueError),
    "unknown name": (lambda: get_path("rectified"), ValueError),
    "unknown kwarg": (lambda: get_path("ot", beta_min=0.1), TypeError),
    "sigma_min<0": (lambda: CondOTPath(sigma_min=-0.1), ValueError),
    "sigma_min>=1": (lambda: CondOTPath(sigma_min=1.0), ValueError),
    "ve max<min": (lambda: VEPath(sigma_min=1.0, sigma_max=0.5), ValueError),
    "ve min=0": (lambda: VEPath(sigma_min=0.0), ValueError),
    "vp max<min": (lambda: VPPath(beta_min=2.0, beta_max=1.0), ValueError),
    "affine not callable": (lambda: AffinePath(1.0, lambda t: 1 - t), TypeError),
    "affine t_max>1": (lambda: AffinePath(lambda t: t, lambda t: 1 - t, t_max=1.5), ValueError),
    "affine bad shape": (
        lambda: AffinePath(lambda t: torch.zeros(3), lambda t: 1 - t).alpha(torch.rand(5)),
        ValueError,
    ),
}


@pytest.mark.parametrize("call,err", list(BAD.values()), ids=list(BAD))
def test_bad_inputs(call, err):
    with pytest.raises(err):
        call()


def test_error_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match="ot, ve, vp"):
        get_path("nope")
    with pytest.raises(ValueError, match=r"sigma_t = 0.*t in \[0.0, 0.99999\]"):
        CondOTPath().conditional_velocity(X, 1.0, X1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        VPPath().sample_xt(X, X1, 2.0)


@ALL
def test_schedule_is_the_one_reading_of_alpha_sigma_and_their_derivatives(path):
    t = torch.linspace(path.t_min, path.t_max, 17, dtype=torch.float64)
    s = path.schedule(t)
    assert isinstance(s, SchedulerOutput)
    for got, method in zip(s, (path.alpha, path.sigma, path.d_alpha, path.d_sigma)):
        torch.testing.assert_close(got, method(t))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        path.schedule(torch.tensor([1.5]))
    unchecked = path.schedule(torch.tensor([0.5]), check=False)  # the training losses' fast path
    torch.testing.assert_close(unchecked.alpha_t, path.alpha(0.5).reshape(1).to(unchecked.alpha_t.dtype))


def test_every_path_names_its_source_p0():
    from fmtoy.data import Checkerboard, StandardNormal, eight_gaussians
    from fmtoy.marginal import marginal_distribution
    from fmtoy.paths import PathSource

    q = eight_gaussians()
    assert type(CondOTPath().source(q)) is StandardNormal and type(CondOTPath(0.1).source(q)) is StandardNormal
    for path in (VEPath(), VPPath()):
        p0 = path.source(q)  # the exact mixture alpha_0 q + sigma_0 N(0, I)
        exact = marginal_distribution(0.0, path, q)
        torch.testing.assert_close(p0.covs, exact.covs)
        torch.testing.assert_close(p0.means, exact.means)
    ve = VEPath().source(q)
    assert ve.covs[0, 0, 0].item() == pytest.approx(10.0**2 + 0.5**2)  # the data blurred by sigma_max = 10
    board = VEPath().source(Checkerboard())  # no closed form: a sampler of x_1 + sigma_max x_0
    assert isinstance(board, PathSource)
    x = board.sample(20000, generator=make_generator(0))
    assert 9.5 < x.std(0).min().item() < 11.0
    with pytest.raises(ValueError, match="has no closed-form density"):
        board.log_prob(x[:3])
    with pytest.raises(TypeError, match="target must be a fmtoy.data.Distribution"):
        CondOTPath().source("eight_gaussians")
