"""fmtoy.marginal: closed-form p_t and u_t against Theorem 1 (Monte Carlo), hand-made Gaussian conditioning, the
continuity equation (finite differences), boundary values, normalisation and the ODE log-likelihood."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fmtoy import marginal as M
from fmtoy.data import GaussianMixture, StandardNormal, eight_gaussians
from fmtoy.device import make_generator as gen  # a seeded CPU generator
from fmtoy.paths import AffinePath, CondOTPath, GaussianPath, VEPath, VPPath

F64 = torch.float64
H = math.pi / 2
COSINE = AffinePath(lambda t: torch.sin(H * t), lambda t: torch.cos(H * t), name="cosine", t_max=1 - 1e-5)
EIGHT = eight_gaussians()


def rotated(angle: float, sx: float, sy: float) -> torch.Tensor:
    """R diag(sx^2, sy^2) R^T: an anisotropic covariance."""
    c, s = math.cos(angle), math.sin(angle)
    r = torch.tensor([[c, -s], [s, c]], dtype=F64)
    return r @ torch.diag(torch.tensor([sx**2, sy**2], dtype=F64)) @ r.T


ANISO = GaussianMixture(
    torch.tensor([0.5, 0.3, 0.2]),
    torch.tensor([[2.0, 1.0], [-2.5, 0.5], [0.0, -3.0]]),
    torch.stack([rotated(0.3, 0.8, 0.2), rotated(1.2, 0.5, 0.4), rotated(-0.7, 1.0, 0.3)]),
    name="aniso",
)
SOURCE2 = GaussianMixture(
    torch.tensor([0.6, 0.4]),
    torch.tensor([[-1.0, 0.5], [1.5, -0.5]]),
    torch.stack([rotated(0.4, 0.9, 0.5), rotated(-1.0, 0.6, 0.8)]),
    name="source2",
)
ISO_SOURCE = GaussianMixture(
    torch.tensor([0.3, 0.7]),
    torch.tensor([[1.0, -1.0], [-0.5, 2.0]]),
    torch.stack([0.5 * torch.eye(2), 1.5 * torch.eye(2)]),
    name="iso_source",
)
POINTS = GaussianMixture.from_points(EIGHT.sample(20, generator=gen(0)))


def sample_pt(path, target, source, ts, n_each, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ p_t for each t in ts (float64) and the matching per-row t vector."""
    xs = [
        M.marginal_distribution(t, path, target, source).sample(n_each, generator=gen(seed + i)).double()
        for i, t in enumerate(ts)
    ]
    return torch.cat(xs), torch.tensor(ts, dtype=F64).repeat_interleave(n_each)


# --- Theorem 1 by Monte Carlo over x_1 ~ q (source N(0, I)) ---------------------------------------------------------


@pytest.mark.parametrize(
    "path,t",
    [(CondOTPath(), 0.5), (CondOTPath(0.05), 0.8), (VEPath(), 0.5), (VPPath(), 0.6), (COSINE, 0.4)],
    ids=["ot", "ot_smin", "ve", "vp", "cosine"],
)
def test_theorem1_monte_carlo(path, t):
    """u_t(x) = E_q[u_t(x|x_1) p_t(x|x_1)] / E_q[p_t(x|x_1)] and p_t(x) = E_q[p_t(x|x_1)] within 5 MC std errors."""
    n_mc, n_x = 100_000, 6
    x1 = EIGHT.sample(n_mc, generator=gen(1)).double().repeat(n_x, 1)
    xs = M.marginal_distribution(t, path, EIGHT).sample(n_x, generator=gen(2)).double()
    xx = xs.repeat_interleave(n_mc, 0)  # all (x, x_1) pairs at once
    log_pc = path.conditional_log_prob(xx, t, x1).view(n_x, n_mc)
    uc = path.conditional_velocity(xx, t, x1).view(n_x, n_mc, 2)
    shift = log_pc.amax(1, keepdim=True)
    w = (log_pc - shift).exp()
    ratio = (w[..., None] * uc).sum(1) / w.sum(1, keepdim=True)
    se = (w[..., None] * (uc - ratio[:, None])).std(1) / w.mean(1, keepdim=True) / math.sqrt(n_mc)  # delta method
    u = M.marginal_velocity(xs, t, path, EIGHT)
    assert ((ratio - u).abs() < 5 * se + 1e-9).all(), (ratio, u, se)
    rel_se = w.std(1) / w.mean(1) / math.sqrt(n_mc)
    log_p = w.mean(1).log() + shift[:, 0]
    assert ((log_p - M.marginal_log_prob(xs, t, path, EIGHT)).abs() < 5 * rel_se).all()


@pytest.mark.parametrize("path", [CondOTPath(), VPPath(), COSINE, VEPath()], ids=["ot", "vp", "cosine", "ve"])
def test_theorem1_exact_for_point_masses(path):
    """from_points target: u_t(x) = sum_j softmax_j(log p_t(x|x_1j)) u_t(x|x_1j) exactly (FM Eq. 8), per-row t."""
    pts = POINTS.means
    n, k = 50, pts.shape[0]
    t = torch.cat(
        [
            torch.rand(n - 2, generator=gen(3), dtype=F64) * min(path.t_max, 0.99),
            torch.tensor([0.0, path.t_max], dtype=F64),
        ]
    )
    x = 3 * torch.randn(n, 2, generator=gen(4), dtype=F64)
    xx, tt, xx1 = x.repeat_interleave(k, 0), t.repeat_interleave(k), pts.repeat(n, 1)
    w = torch.softmax(path.conditional_log_prob(xx, tt, xx1).view(n, k), dim=1)
    ref = (w[..., None] * path.conditional_velocity(xx, tt, xx1).view(n, k, 2)).sum(1)
    u = M.marginal_velocity(x, t, path, POINTS)
    assert ((u - ref).abs() / (1 + ref.abs())).max() < 1e-9
    assert torch.allclose(M.posterior_weights(x, t, path, POINTS), w, atol=1e-12)


# --- hand-made Gaussian conditioning for one source and one target component -------------------------------------


def joint_by_hand(path: GaussianPath, t: float, m0, s0, m1, s1):
    """(mean, cov) of (x_t, xdot) = A (x_0, x_1), A = [[sigma I, alpha I], [sigma' I, alpha' I]]."""
    al, sg, dal, dsg = (
        f(torch.tensor(t, dtype=F64)).item() for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma)
    )
    eye = torch.eye(2, dtype=F64)
    a = torch.cat([torch.cat([sg * eye, al * eye], 1), torch.cat([dsg * eye, dal * eye], 1)])
    cov = torch.block_diag(s0, s1)
    return a @ torch.cat([m0, m1]), a @ cov @ a.T


@pytest.mark.parametrize(
    "path", [CondOTPath(), CondOTPath(0.1), VEPath(), VPPath(), COSINE], ids=["ot", "ot_smin", "ve", "vp", "cosine"]
)
def test_single_pair_matches_bivariate_gaussian_conditioning(path):
    m0, s0 = torch.tensor([0.5, -1.0], dtype=F64), rotated(0.7, 1.3, 0.6)
    m1, s1 = torch.tensor([3.0, 2.0], dtype=F64), rotated(-0.4, 0.2, 0.9)
    src = GaussianMixture(torch.ones(1), m0[None], s0[None])
    tgt = GaussianMixture(torch.ones(1), m1[None], s1[None])
    x = 2 * torch.randn(10, 2, generator=gen(5), dtype=F64)
    for t in (0.0, 0.3, 0.75, min(path.t_max, 0.99)):
        mean, cov = joint_by_hand(path, t, m0, s0, m1, s1)
        cxx, cvx = cov[:2, :2], cov[2:, :2]
        ref = mean[2:] + torch.linalg.solve(cxx, (x - mean[:2]).T).T @ cvx.T
        u = M.marginal_velocity(x, t, path, tgt, src)
        assert ((u - ref).abs() / (1 + ref.abs())).max() < 1e-10
        ref_lp = torch.distributions.MultivariateNormal(mean[:2], cxx).log_prob(x)
        assert torch.allclose(M.marginal_log_prob(x, t, path, tgt, src), ref_lp, rtol=1e-10, atol=1e-10)


def test_single_pair_regression_monte_carlo():
    """E[xdot | x_t] is linear for one Gaussian pair: least squares on sampled (x_t, xdot) recovers u_t."""
    path, t, n = VPPath(), 0.4, 100_000
    src, tgt = SOURCE2.component(0), ANISO.component(0)
    x0, x1 = src.sample(n, generator=gen(6)).double(), tgt.sample(n, generator=gen(7)).double()
    xt, xdot = path.sample_xt(x0, x1, t), path.target_velocity(x0, x1, t)
    design = torch.cat([torch.ones(n, 1, dtype=F64), xt], 1)
    coef = torch.linalg.lstsq(design, xdot).solution
    resid_var = (xdot - design @ coef).var(0)
    probe = torch.cat([torch.ones(5, 1, dtype=F64), xt[:5]], 1)
    se = (resid_var[None] * ((probe @ torch.linalg.inv(design.T @ design)) * probe).sum(1, keepdim=True)).sqrt()
    u = M.marginal_velocity(xt[:5], t, path, tgt, src)
    assert ((probe @ coef - u).abs() < 5 * se).all()


@pytest.mark.parametrize("path", [CondOTPath(), VPPath()], ids=["ot", "vp"])
def test_mixture_source_projection_property(path):
    """u_t = E[xdot | x_t] iff E[(u_t(x_t) - xdot) f(x_t)] = 0 for all f: MC with f = 1, x, y, sin(x y)."""
    t, n = 0.55, 200_000
    x0, x1 = SOURCE2.sample(n, generator=gen(8)).double(), ANISO.sample(n, generator=gen(9)).double()
    xt, xdot = path.sample_xt(x0, x1, t), path.target_velocity(x0, x1, t)
    u = M.marginal_velocity(xt, t, path, ANISO, SOURCE2)
    feats = torch.stack([torch.ones(n, dtype=F64), xt[:, 0], xt[:, 1], torch.sin(xt[:, 0] * xt[:, 1])], 1)

    def z_scores(v):
        g = (v - xdot)[:, :, None] * feats[:, None, :]
        return g.mean(0) / (g.std(0) / math.sqrt(n))

    assert z_scores(u).abs().max() < 5
    assert z_scores(u + 0.05 * torch.tensor([1.0, -1.0], dtype=F64)).abs().max() > 10  # a biased field fails
    assert z_scores(1.05 * u).abs().max() > 10


# --- the continuity equation d/dt p_t + div(p_t u_t) = 0 by central finite differences -------------------------


def continuity_residual(logp, field, x: torch.Tensor, t: torch.Tensor, h: float = 1e-4):
    """(d_t log p + div u + u . grad log p, and the sum of the terms' sizes), both (n,): residual / p_t."""
    dt = (logp(x, t + h) - logp(x, t - h)) / (2 * h)
    u = field(x, t)
    div, u_grad = torch.zeros_like(dt), torch.zeros_like(dt)
    for k in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, k] = h
        div += (field(x + e, t)[:, k] - field(x - e, t)[:, k]) / (2 * h)
        u_grad += u[:, k] * (logp(x + e, t) - logp(x - e, t)) / (2 * h)
    return dt + div + u_grad, dt.abs() + div.abs() + u_grad.abs()


CASES = {
    "ot-eight": (CondOTPath(), EIGHT, None),
    "ot_smin-aniso": (CondOTPath(0.05), ANISO, None),
    "ve-eight": (VEPath(), EIGHT, None),
    "vp-aniso": (VPPath(), ANISO, None),
    "cosine-points": (COSINE, POINTS, None),
    "ot-eight-mixture_source": (CondOTPath(), EIGHT, SOURCE2),
    "ve-points-isotropic_source": (VEPath(), POINTS, ISO_SOURCE),
    "vp-aniso-mixture_source": (VPPath(), ANISO, SOURCE2),
}


@pytest.mark.parametrize("path,target,source", list(CASES.values()), ids=list(CASES))
def test_continuity_equation(path, target, source):
    x, t = sample_pt(path, target, source, [0.15, 0.5, 0.85], 20, seed=10)

    def logp(x, t):
        return M.marginal_log_prob(x, t, path, target, source)

    def field(x, t):
        return M.marginal_velocity(x, t, path, target, source)

    res, scale = continuity_residual(logp, field, x, t)
    assert (res.abs() / scale).max() < 1e-5
    assert scale.min() > 1e-3  # the terms are not trivially small

    def perturbed(x, t):
        return 1.1 * field(x, t) + torch.tensor([0.2, 0.0], dtype=F64)

    res_p, scale_p = continuity_residual(logp, perturbed, x, t)
    assert (res_p.abs() / scale_p).max() > 1e-2


# --- boundary values and normalisation ------------------------------------------------------------------------


def test_endpoints_are_source_and_target():
    x = 3 * torch.randn(64, 2, generator=gen(11), dtype=F64)
    ot, ot_s = CondOTPath(), CondOTPath(sigma_min=0.05)
    assert torch.allclose(M.marginal_log_prob(x, 1.0, ot, EIGHT), EIGHT.log_prob(x), atol=1e-12)
    blurred = eight_gaussians(std=math.sqrt(0.25 + 0.05**2))  # p_1 = q * N(0, sigma_min^2 I)
    assert torch.allclose(M.marginal_log_prob(x, 1.0, ot_s, EIGHT), blurred.log_prob(x), atol=1e-12)
    for path in (ot, ot_s, COSINE):
        assert torch.allclose(M.marginal_log_prob(x, 0.0, path, EIGHT), StandardNormal().log_prob(x), atol=1e-12)
        assert torch.allclose(M.marginal_log_prob(x, 0.0, path, ANISO, SOURCE2), SOURCE2.log_prob(x), atol=1e-12)
    vp = VPPath()
    assert (M.marginal_log_prob(x, vp.t_max, vp, EIGHT) - EIGHT.log_prob(x)).abs().max() < 1e-3
    assert (M.marginal_log_prob(x, vp.t_max, vp, EIGHT) - EIGHT.log_prob(x)).abs().max() > 0


@pytest.mark.parametrize(
    "path,target,source,t",
    [
        (CondOTPath(), EIGHT, None, 0.5),
        (VEPath(), EIGHT, None, 0.5),
        (VPPath(), ANISO, SOURCE2, 0.7),
        (COSINE, POINTS, None, 0.6),
    ],
    ids=["ot", "ve", "vp-mixture_source", "cosine-points"],
)
def test_density_integrates_to_one(path, target, source, t):
    h = 0.04
    g = torch.arange(-10, 10 + h / 2, h, dtype=F64)
    grid = torch.cartesian_prod(g, g)
    mass = M.marginal_log_prob(grid, t, path, target, source).exp().sum().item() * h * h
    assert abs(mass - 1) < 1e-6
    dist = M.marginal_distribution(t, path, target, source)
    assert torch.allclose(dist.log_prob(grid[::997]), M.marginal_log_prob(grid[::997], t, path, target, source))


def test_posterior_weights_order_and_normalisation():
    path, t = VPPath(), 0.6
    x = 2 * torch.randn(30, 2, generator=gen(12), dtype=F64)
    w = M.posterior_weights(x, t, path, ANISO, SOURCE2)
    assert w.shape == (30, 6) and torch.allclose(w.sum(1), torch.ones(30, dtype=F64))
    dist = M.marginal_distribution(t, path, ANISO, SOURCE2)  # component i * K_tgt + j
    logs = torch.stack([dist.component(k).log_prob(x) for k in range(6)], 1) + dist.weights.log()
    assert torch.allclose(w, torch.softmax(logs, 1), atol=1e-12)


def test_general_path_equals_isotropic_fast_path():
    x, t = 3 * torch.randn(40, 2, generator=gen(13), dtype=F64), torch.rand(40, generator=gen(14), dtype=F64)
    for target, source in ((EIGHT, None), (POINTS, None), (EIGHT, ISO_SOURCE)):
        for what, tt in (("velocity", t * 0.99), ("log_prob", t * 0.99), ("velocity", 0.6), ("weights", 0.3)):
            fast = M._evaluate(x, tt, VPPath(), target, source, what)
            slow = M._evaluate(x, tt, VPPath(), target, source, what, force_general=True)
            assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-10)


def test_dtype_scalar_time_and_exact_field():
    field = M.ExactField(CondOTPath(), EIGHT)
    x64 = 3 * torch.randn(100, 2, generator=gen(15), dtype=F64)
    u64 = field(x64, torch.full((100,), 0.7, dtype=F64))
    u32 = field(x64.float(), torch.full((100,), 0.7))
    assert u32.dtype == torch.float32 and u64.dtype == F64
    assert torch.allclose(u32.double(), u64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(field(x64, 0.7), u64) and torch.allclose(field(x64, torch.tensor(0.7)), u64)
    assert torch.allclose(field.log_prob(x64, 0.7), field.distribution(0.7).log_prob(x64))


def test_fast_for_large_empirical_targets():
    """K = 5000 point masses, n = 2000 queries: ~0.2 s of CPU when idle. The bound is CPU time (robust to other
    processes) and loose (spinning BLAS/OpenMP threads count too), yet far below any Python loop over K or n."""
    target = GaussianMixture.from_points(EIGHT.sample(5000, generator=gen(16)))
    x = 3 * torch.randn(2000, 2, generator=gen(17))
    for t, bound in ((torch.full((2000,), 0.7), 2.0), (torch.rand(2000, generator=gen(18)), 3.0)):
        start = time.process_time()
        u = M.marginal_velocity(x, t, CondOTPath(), target)
        seconds = time.process_time() - start
        assert u.shape == (2000, 2) and torch.isfinite(u).all()
        assert seconds < bound, seconds


# --- the exact field integrated backwards reproduces log p_1 ------------------------------------------------------


def test_ode_log_likelihood_matches_closed_form():
    solvers = pytest.importorskip("fmtoy.solvers")
    path = CondOTPath(sigma_min=0.05)
    field = M.ExactField(path, EIGHT)
    x1 = field.distribution(1.0).sample(32, generator=gen(19)).double()
    ll = solvers.log_likelihood(field, x1, StandardNormal(), steps=32, method="rk4")
    assert (ll - field.log_prob(x1, 1.0)).abs().max() < 1e-4  # rk4 error ~1e-5 nats at 32 steps
    wrong = solvers.log_likelihood(lambda x, t: 1.1 * field(x, t), x1, StandardNormal(), steps=32, method="rk4")
    assert (wrong - field.log_prob(x1, 1.0)).abs().max() > 0.1


# --- bad inputs ----------------------------------------------------------------------------------------------------

X = torch.randn(5, 2)
BAD = {
    "t>1": (lambda: M.marginal_velocity(X, 1.2, CondOTPath(), EIGHT), ValueError),
    "t<0": (lambda: M.marginal_log_prob(X, -0.5, CondOTPath(), EIGHT), ValueError),
    "t length": (lambda: M.marginal_velocity(X, torch.rand(4), CondOTPath(), EIGHT), ValueError),
    "x dim": (lambda: M.marginal_velocity(torch.randn(5, 3), 0.5, CondOTPath(), EIGHT), ValueError),
    "x 1d": (lambda: M.marginal_log_prob(torch.randn(5), 0.5, CondOTPath(), EIGHT), ValueError),
    "x int": (lambda: M.marginal_velocity(X.long(), 0.5, CondOTPath(), EIGHT), TypeError),
    "path name": (lambda: M.marginal_velocity(X, 0.5, "ot", EIGHT), TypeError),
    "target not GM": (lambda: M.ExactField(CondOTPath(), torch.zeros(3, 2)), TypeError),
    "source not GM": (lambda: M.marginal_velocity(X, 0.5, CondOTPath(), EIGHT, source="normal"), TypeError),
    "dim mismatch": (lambda: M.marginal_velocity(X, 0.5, CondOTPath(), EIGHT, StandardNormal(3)), ValueError),
    "points at t=1": (lambda: M.marginal_velocity(X, 1.0, CondOTPath(), POINTS), ValueError),
    "points log_prob t=1": (lambda: M.marginal_log_prob(X, 1.0, CondOTPath(), POINTS), ValueError),
    "vp t=1": (lambda: M.marginal_velocity(X, 1.0, VPPath(), EIGHT), ValueError),
    "distribution many t": (lambda: M.marginal_distribution(torch.rand(3), CondOTPath(), EIGHT), ValueError),
}


@pytest.mark.parametrize("call,err", list(BAD.values()), ids=list(BAD))
def test_bad_inputs(call, err):
    with pytest.raises(err):
        call()


def test_error_messages():
    with pytest.raises(ValueError, match="no density at t = 1"):
        M.marginal_velocity(X, 1.0, CondOTPath(), POINTS)
    with pytest.raises(ValueError, match="same dimension"):
        M.marginal_log_prob(X, 0.5, CondOTPath(), EIGHT, StandardNormal(3))
    with pytest.raises(TypeError, match="GaussianMixture"):
        M.marginal_velocity(X, 0.5, CondOTPath(), None)


def test_exact_field_of_a_named_mixture_and_the_refusal_of_others():
    field = M.exact_field_of("eight_gaussians")
    assert isinstance(field, M.ExactField) and isinstance(field.path, CondOTPath)
    assert isinstance(M.exact_field_of("eight_gaussians", VPPath()).path, VPPath)
    with pytest.raises(ValueError, match="Gaussian-mixture data sets only .* got 'checkerboard'"):
        M.exact_field_of("checkerboard")
