"""fmtoy.methods.vrfm: the Gaussian KL (SymPy closed form and Monte Carlo), the reparametrised sample, the VRFM loss
(and its exact reduction to the RFM loss), the ELBO as a lower bound (exact marginal likelihood by quadrature; tight
at the true posterior), sampling with one latent per trajectory, the exact velocity posterior p(v | x_t, t),
training."""

from __future__ import annotations

import math

import pytest
import sympy as sp
import torch
from torch import nn

from fmtoy.data import GaussianMixture, StandardNormal
from fmtoy.device import make_generator
from fmtoy.losses import cfm_loss
from fmtoy.marginal import marginal_log_prob, marginal_velocity
from fmtoy.methods.vrfm import (
    POSTERIOR_INPUTS,
    SETTINGS,
    PosteriorEncoder,
    VRFMConfig,
    build_vrfm,
    check_posterior_inputs,
    fit_vrfm,
    gaussian_kl,
    get_setting,
    hexagon,
    latent_field,
    reparametrise,
    sample_vrfm,
    train_vrfm,
    two_modes_1d,
    velocity_posterior,
    velocity_spread,
    vrfm_elbo,
    vrfm_loss,
)
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath
from fmtoy.solvers import integrate
from fmtoy.symbolic import vrfm as SV

D64 = torch.float64


def _batch(n: int = 64, dim: int = 2, seed: int = 0, dtype=torch.float32):
    g = make_generator(seed)
    return (
        torch.randn(n, dim, generator=g, dtype=dtype),
        torch.randn(n, dim, generator=g, dtype=dtype) + 1.0,
        torch.rand(n, generator=g, dtype=dtype),
    )


def _nets(dim: int = 2, k: int = 3, seed: int = 0, inputs=POSTERIOR_INPUTS):
    torch.manual_seed(seed)
    return VelocityMLP(dim=dim, hidden=32, depth=2, cond_dim=k), PosteriorEncoder(dim, k, 32, 2, inputs)


# ----------------------------------------------------------------------------------------------- Gaussian KL
def test_gaussian_kl_equals_sympy_closed_form():
    kl_int, closed = SV.gaussian_kl_1d()
    assert sp.simplify(kl_int - closed) == 0  # SymPy's integral = the closed form
    f = sp.lambdify((SV.mu, SV.s), closed)
    g = make_generator(0)
    mu, logvar = torch.randn(50, 4, generator=g, dtype=D64), 2 * torch.randn(50, 4, generator=g, dtype=D64)
    want = torch.tensor(
        [[f(m, math.exp(lv / 2)) for m, lv in zip(r_m.tolist(), r_l.tolist())] for r_m, r_l in zip(mu, logvar)],
        dtype=D64,
    ).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want, rtol=1e-12, atol=1e-12)


def test_gaussian_kl_matches_monte_carlo():
    g = make_generator(1)
    mu = torch.tensor([[0.3, -1.2, 0.0]], dtype=D64)
    logvar = torch.tensor([[-0.7, 0.4, 0.0]], dtype=D64)
    n = 200_000
    z = mu + (0.5 * logvar).exp() * torch.randn(n, 3, generator=g, dtype=D64)
    log_q = (-0.5 * (z - mu) ** 2 / logvar.exp() - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(1)
    log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    ratio = log_q - log_p
    est, err = ratio.mean().item(), ratio.std().item() / math.sqrt(n)
    exact = gaussian_kl(mu, logvar).item()
    assert abs(est - exact) < 4 * err, f"MC {est:.5f} +- {err:.5f} vs closed form {exact:.5f}"


def test_gaussian_kl_zero_only_at_the_prior_and_checks_input():
    zero = torch.zeros(3, 2)
    assert torch.equal(gaussian_kl(zero, zero), torch.zeros(3))
    assert (gaussian_kl(zero + 0.1, zero) > 0).all() and (gaussian_kl(zero, zero - 0.1) > 0).all()
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(TypeError):
        gaussian_kl(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))


def test_reparametrised_sample_moments_gradients_and_seed():
    mu, logvar = torch.full((100_000, 1), 0.5), torch.full((100_000, 1), math.log(4.0))
    z = reparametrise(mu, logvar, make_generator(0))
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 2.0) < 0.02
    assert torch.equal(z, reparametrise(mu, logvar, make_generator(0)))
    m, lv = torch.zeros(5, 2, requires_grad=True), torch.zeros(5, 2, requires_grad=True)
    zz = reparametrise(m, lv, make_generator(3))
    zz.sum().backward()
    eps = reparametrise(torch.zeros(5, 2), torch.zeros(5, 2), make_generator(3))
    assert torch.equal(m.grad, torch.ones(5, 2))  # dz/dmu = 1
    torch.testing.assert_close(lv.grad, 0.5 * eps)  # dz/dlogvar = exp(logvar/2) eps / 2


# ----------------------------------------------------------------------------------------------- the loss
def test_encoder_ignored_is_exactly_the_rfm_loss():
    x0, x1, t = _batch()
    model, _ = _nets()
    path = CondOTPath()
    out = vrfm_loss(model, None, x0, x1, t, kl_weight=0.7)
    rfm = cfm_loss(lambda x, s: model(x, s, torch.zeros(len(x), 3)), x0, x1, t, path)
    assert torch.equal(out.total, rfm) and torch.equal(out.mse, rfm) and out.kl.item() == 0.0
    plain = VelocityMLP(hidden=32, depth=2)  # a model without latent input: no z at all
    assert torch.equal(vrfm_loss(plain, None, x0, x1, t).total, cfm_loss(plain, x0, x1, t, path))
    # a hand-written RFM loss, ||v(x_t, t) - (x_1 - x_0)||^2 averaged over the batch
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    by_hand = (plain(xt, t) - (x1 - x0)).square().sum(1).mean()
    torch.testing.assert_close(vrfm_loss(plain, None, x0, x1, t).total, by_hand, rtol=1e-6, atol=1e-6)


def test_loss_is_mse_plus_weighted_kl_with_one_reparametrised_sample():
    x0, x1, t = _batch()
    model, enc = _nets()
    out = vrfm_loss(model, enc, x0, x1, t, kl_weight=0.3, generator=make_generator(5))
    torch.testing.assert_close(out.total, out.mse + 0.3 * out.kl)
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    mu, logvar = enc(x0, x1, xt, t)
    z = reparametrise(mu, logvar, make_generator(5))
    mse = (model(xt, t, z) - (x1 - x0)).square().sum(1).mean()
    torch.testing.assert_close(out.mse, mse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kl, gaussian_kl(mu, logvar).mean())
    again = vrfm_loss(model, enc, x0, x1, t, kl_weight=0.3, generator=make_generator(5))
    assert torch.equal(out.total, again.total)  # seeded: reproducible
    out.total.backward()
    assert all(p.grad is not None for p in enc.parameters())  # the encoder is trained through z and the KL


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_loss_is_kl_weight_times_negative_elbo_plus_a_constant(lam):
    x0, x1, t = _batch(dtype=D64)
    model, enc = _nets()
    model, enc = model.double(), enc.double()
    loss = vrfm_loss(model, enc, x0, x1, t, kl_weight=lam, generator=make_generator(2)).total
    elbo = vrfm_elbo(model, enc, x0, x1, t, kl_weight=lam, n_samples=1, generator=make_generator(2))
    const = lam * 2 / 2 * math.log(math.pi * lam)  # (lambda d / 2) log(pi lambda), d = 2
    torch.testing.assert_close(loss, (lam * -elbo).mean() - const, rtol=1e-10, atol=1e-10)
    assert sp.simplify(SV.kl_weight_identity()) == 0


def test_loss_rejects_bad_input():
    x0, x1, t = _batch()
    model, enc = _nets()
    with pytest.raises(ValueError, match="kl_weight"):
        vrfm_loss(model, enc, x0, x1, t, kl_weight=-1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        vrfm_loss(VelocityMLP(cond_dim=2, hidden=8), enc, x0, x1, t)
    with pytest.raises(ValueError, match="cond_dim = 0"):
        vrfm_loss(VelocityMLP(hidden=8), enc, x0, x1, t)
    with pytest.raises(ValueError, match="same shape"):
        vrfm_loss(model, enc, x0, x1[:3], t)
    with pytest.raises(TypeError, match="encoder"):
        vrfm_loss(model, "encoder", x0, x1, t)


def test_posterior_inputs_select_what_the_encoder_sees():
    x0, x1, t = _batch()
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    _, enc = _nets(inputs=("x1",))
    a = enc(x0, x1, xt, t)
    b = enc(x0 + 5.0, x1, xt - 1.0, t * 0.5)  # only x_1 matters
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(enc(x0, x1 + 1.0, xt, t)[0], a[0])
    assert check_posterior_inputs(["t", "x0"]) == ("x0", "t")
    for bad in ((), "x0", ("x0", "x0"), ("x2",)):
        with pytest.raises(ValueError):
            check_posterior_inputs(bad)


# ----------------------------------------------------------------------------------------------- the ELBO
def _exact_log_marginal_1d_latent(model, xt, t, v, sigma2, grid: int = 4001, lim: float = 9.0):
    """log p_theta(v | x_t, t) = log int N(v; v_theta(x_t, t, z), sigma2) N(z; 0, 1) dz by the trapezoid rule."""
    zs = torch.linspace(-lim, lim, grid, dtype=D64)
    n = xt.shape[0]
    with torch.no_grad():
        mean = model(xt.repeat(grid, 1), t.repeat(grid), zs.repeat_interleave(n)[:, None]).view(grid, n, -1)
    log_lik = -(v - mean).square().sum(-1) / (2 * sigma2) - 0.5 * v.shape[1] * math.log(2 * math.pi * sigma2)
    log_prior = -0.5 * zs**2 - 0.5 * math.log(2 * math.pi)
    w = torch.full((grid,), 2 * lim / (grid - 1), dtype=D64)
    w[0] = w[-1] = w[0] / 2
    return torch.logsumexp(log_lik + log_prior[:, None] + w.log()[:, None], dim=0)


class _StrongZ(nn.Module):
    """v_theta(x, t, z) = mlp(x, t, z) + 2 tanh(z) (1, -1): an untrained MLP whose output clearly depends on z."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp, self.dim, self.cond_dim = mlp, mlp.dim, mlp.cond_dim

    def forward(self, x, t, z):
        return self.mlp(x, t, z) + 2 * torch.tanh(z) * torch.tensor([1.0, -1.0], dtype=z.dtype)


def test_elbo_is_a_lower_bound_on_the_exact_marginal_likelihood():
    """1D latent: log p_theta(v | x_t, t) is a 1D integral over z (quadrature); the ELBO never exceeds it."""
    x0, x1, t = _batch(n=32, dim=2, seed=4, dtype=D64)
    mlp, enc = _nets(k=1, seed=1)
    model, enc = _StrongZ(mlp.double()), enc.double()  # a nonlinear decoder that clearly depends on z
    lam = 0.5
    xt, v = (1 - t)[:, None] * x0 + t[:, None] * x1, x1 - x0
    log_p = _exact_log_marginal_1d_latent(model, xt, t, v, lam / 2)
    with torch.no_grad():
        elbos = torch.stack(
            [vrfm_elbo(model, enc, x0, x1, t, lam, n_samples=1, generator=make_generator(s)) for s in range(2000)]
        )
    elbo, err = elbos.mean(0), elbos.std(0) / math.sqrt(len(elbos))
    assert (elbo <= log_p + 4 * err).all(), f"ELBO above log p by {(elbo - log_p).max():.4f}"
    assert (log_p - elbo).mean() > 0.1  # a random encoder leaves a real gap


class _Linear(nn.Module):
    """v_theta(x, t, z) = a z + b: p_theta(v) = N(b, a^2 + sigma^2) in closed form."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.dim, self.cond_dim, self.a, self.b = 1, 1, a, b

    def forward(self, x, t, z):
        return self.a * z + self.b


def test_elbo_gap_is_the_kl_to_the_posterior_and_closes_at_it():
    a, b, lam = 1.5, -0.4, 0.6
    sigma2 = lam / 2
    x0, x1, t = _batch(n=16, dim=1, seed=7, dtype=D64)
    v = x1 - x0
    model = _Linear(a, b)
    sym = SV.linear_gaussian_elbo()
    assert sp.simplify(sym.log_marginal - sym.elbo - sym.kl_to_posterior) == 0
    log_p = -((v[:, 0] - b) ** 2) / (2 * (a * a + sigma2)) - 0.5 * torch.log(2 * math.pi * torch.tensor(a * a + sigma2))
    post_mean, post_var = a * (v - b) / (a * a + sigma2), sigma2 / (a * a + sigma2)

    def exact(x0_, x1_, xt_, t_):
        return post_mean, torch.full_like(post_mean, math.log(post_var))

    def off(x0_, x1_, xt_, t_):
        return post_mean + 0.5, torch.full_like(post_mean, math.log(post_var) + 1.0)

    reps = 100_000  # one z per copy of each pair: E_q by Monte Carlo

    def elbo(encoder):
        out = vrfm_elbo(
            model,
            lambda *_: tuple(a.repeat(reps, 1) for a in encoder()),
            x0.repeat(reps, 1),
            x1.repeat(reps, 1),
            t.repeat(reps),
            lam,
            generator=make_generator(0),
        ).view(reps, -1)
        return out.mean(0), 4 * out.std(0) / math.sqrt(reps)

    tight, tol = elbo(lambda: exact(x0, x1, None, t))
    assert ((tight - log_p).abs() <= tol + 1e-9).all()
    loose, tol = elbo(lambda: off(x0, x1, None, t))
    gap = sp.lambdify(
        (SV.mu, SV.s, SV.v, sp.Symbol("a", real=True), sp.Symbol("b", real=True), SV.sigma), sym.kl_to_posterior
    )
    want = torch.tensor(
        [
            gap(m + 0.5, math.exp((math.log(post_var) + 1.0) / 2), vv, a, b, math.sqrt(sigma2))
            for m, vv in zip(post_mean[:, 0].tolist(), v[:, 0].tolist())
        ],
        dtype=D64,
    )
    assert ((log_p - loose - want).abs() <= tol).all(), f"gap {log_p - loose} vs KL(q || posterior) {want}"
    assert (want > 0.1).all()


# ----------------------------------------------------------------------------------------------- sampling
def test_sample_holds_one_latent_per_trajectory():
    model, _ = _nets(k=2)
    x0 = torch.randn(10, 2, generator=make_generator(0))
    z = torch.randn(10, 2, generator=make_generator(1))
    out = sample_vrfm(model, x0, steps=5, z=z)
    assert torch.equal(out, integrate(latent_field(model, z), x0, 5))
    drawn = sample_vrfm(model, x0, steps=5, generator=make_generator(1))
    assert torch.equal(drawn, out)  # z ~ N(0, I) drawn once, from the generator
    traj = sample_vrfm(model, x0, steps=5, z=z, return_trajectory=True)
    assert traj.shape == (6, 10, 2) and torch.equal(traj[-1], out)
    one = sample_vrfm(model, x0, steps=5, z=z[:1])  # one z shared by every trajectory
    assert torch.equal(one, sample_vrfm(model, x0, steps=5, z=z[:1].expand(10, 2)))
    fresh = sample_vrfm(model, x0, steps=5, generator=make_generator(1), resample_z=True)
    assert not torch.equal(fresh, out)
    with pytest.raises(ValueError, match="either z"):
        sample_vrfm(model, x0, z=z, resample_z=True)
    with pytest.raises(ValueError, match="shape"):
        latent_field(model, torch.zeros(10, 3))
    plain = VelocityMLP(hidden=8)
    assert torch.equal(sample_vrfm(plain, x0, steps=3), integrate(plain, x0, 3))


# ----------------------------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("name", SETTINGS)
def test_velocity_posterior_mean_is_the_marginal_field(name):
    s = get_setting(name)
    x = s.source.sample(64, make_generator(0)).double() * 1.5
    for t in (0.0, 0.3, 0.8):
        post = velocity_posterior(x, t, s.target, s.source)
        torch.testing.assert_close(post.weights.sum(1), torch.ones(64, dtype=D64))
        torch.testing.assert_close(
            post.mean(), marginal_velocity(x, t, CondOTPath(), s.target, s.source), rtol=1e-9, atol=1e-9
        )


def test_velocity_posterior_density_is_the_pair_density():
    """p(v | x_t = x) = p_0(x - t v) q(x + (1 - t) v) / p_t(x): the change of variables has Jacobian 1."""
    assert SV.pair_jacobian() == 1
    s = get_setting("hexagon_2d")
    t = 0.25
    x = torch.tensor([[0.05, -0.02]], dtype=D64)
    v = torch.randn(200, 2, generator=make_generator(3), dtype=D64)
    dist = velocity_posterior(x, t, s.target, s.source).distribution(0)
    want = (
        s.source.log_prob(x - t * v)
        + s.target.log_prob(x + (1 - t) * v)
        - marginal_log_prob(x, t, CondOTPath(), s.target, s.source)
    )
    torch.testing.assert_close(dist.log_prob(v), want, rtol=1e-9, atol=1e-9)


def test_velocity_posterior_general_covariances_and_total_variance():
    """Law of total variance on a non-isotropic mixture: E[tr Var(v | x_t)] + E|u_t(x_t)|^2 = E|v|^2 (Monte Carlo)."""
    src = GaussianMixture([1.0, 2.0], [[0.0, 0.0], [1.0, -1.0]], [[[0.5, 0.2], [0.2, 0.3]], [[0.2, 0.0], [0.0, 0.4]]])
    tgt = GaussianMixture([1.0, 1.0], [[2.0, 1.0], [-2.0, 0.5]], [[[0.1, 0.05], [0.05, 0.2]], [[0.3, 0.0], [0.0, 0.1]]])
    g, n, t = make_generator(0), 100_000, 0.4
    x0, x1 = src.sample(n, g).double(), tgt.sample(n, g).double()
    xt, v = (1 - t) * x0 + t * x1, x1 - x0
    post = velocity_posterior(xt, t, tgt, src)
    lhs = post.total_variance() + post.mean().square().sum(1)
    rhs = v.square().sum(1)
    diff = lhs - rhs
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(n)
    # the conditional covariances are positive definite and do not depend on x
    assert (torch.linalg.eigvalsh(post.covs) > 0).all()
    torch.testing.assert_close(post.mean(), marginal_velocity(xt, t, CondOTPath(), tgt, src), rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------- settings, config
def test_settings_are_the_papers():
    one = get_setting("two_modes_1d")
    assert one.dim == 1 and one.latent_dim == 4 and one.kl_weight == 1.0
    assert torch.equal(one.target.means, torch.tensor([[-1.0], [1.0]], dtype=D64))
    assert isinstance(one.source, StandardNormal) and one.source.dim == 1
    hexa = get_setting("hexagon_2d")
    assert hexa.latent_dim == 8 and hexa.kl_weight == 0.1
    torch.testing.assert_close(hexa.source.means.norm(dim=1), torch.full((6,), 1 / 3, dtype=D64))
    torch.testing.assert_close(hexa.target.means, 3 * hexa.source.means)
    assert get_setting("eight_gaussians").target.n_components == 8
    assert two_modes_1d(0.2).covs[0, 0, 0].item() == pytest.approx(0.04)
    assert hexagon(2.0).means.norm(dim=1).max().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown setting"):
        get_setting("moons")


def test_config_defaults_paper_recipe_and_validation():
    c = VRFMConfig(setting="two_modes_1d")
    assert (c.latent_dim, c.kl_weight) == (4, 1.0)
    p = VRFMConfig.paper("hexagon_2d")
    assert (p.steps, p.batch_size, p.lr, p.lr_schedule, p.latent_dim, p.kl_weight) == (
        20_000,
        1000,
        1e-3,
        "constant",
        8,
        0.1,
    )
    assert VRFMConfig.paper("two_modes_1d", kl_weight=0.5).kl_weight == 0.5
    for bad in (
        dict(method="ddpm"),
        dict(kl_weight=-1.0),
        dict(latent_dim=0),
        dict(steps=0),
        dict(posterior_inputs=("x9",)),
        dict(lr_schedule="step"),
        dict(seed=-1),
        dict(device="tpu"),
    ):
        with pytest.raises(ValueError):
            VRFMConfig(**bad)
    model, enc = build_vrfm(VRFMConfig(method="rfm"), 2)
    assert enc is None and model.cond_dim == 0
    model, enc = build_vrfm(VRFMConfig(posterior_inputs=("x1",)), 2)
    assert model.cond_dim == 8 and enc.inputs == ("x1",)


def test_training_is_reproducible_and_rfm_has_no_kl():
    cfg = VRFMConfig(setting="two_modes_1d", steps=30, batch_size=64, hidden=16, encoder_hidden=16, device="cpu")
    a, b = train_vrfm(cfg), train_vrfm(cfg)
    assert a.losses == b.losses and len(a.losses) == 30 and a.encoder is not None
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(a.mse) + 1.0 * torch.tensor(a.kl))
    r = train_vrfm(VRFMConfig(setting="two_modes_1d", method="rfm", steps=30, batch_size=64, hidden=16, device="cpu"))
    assert r.encoder is None and set(r.kl) == {0.0} and r.losses == r.mse
    with pytest.raises(ValueError, match="dimensions"):
        fit_vrfm(
            VelocityMLP(hidden=8),
            None,
            two_modes_1d(),
            StandardNormal(1),
            steps=1,
            batch_size=4,
            lr=1e-3,
            kl_weight=0.0,
            device="cpu",
        )


class _IgnoresZ(nn.Module):
    """A latent-conditioned velocity that ignores its latent."""

    def __init__(self, base: nn.Module, k: int) -> None:
        super().__init__()
        self.base, self.dim, self.cond_dim = base, base.dim, k

    def forward(self, x, t, z):
        return self.base(x, t)


def _latent_matters(model, threshold: float = 0.2) -> bool:
    """The spread of v_theta(x, t, z) over z ~ N(0, I), averaged over points where velocities cross (1D)."""
    x = torch.linspace(-0.6, 0.6, 13)[:, None]
    spread = torch.stack([velocity_spread(model, x, t, n_z=64, generator=make_generator(0)) for t in (0.2, 0.5)])
    return spread.mean().item() > threshold


def test_after_training_the_latent_changes_the_velocity():
    cfg = VRFMConfig(setting="two_modes_1d", steps=300, batch_size=256, hidden=32, encoder_hidden=32, device="cpu")
    res = train_vrfm(cfg)
    assert _latent_matters(res.model), "the trained VRFM velocity barely depends on z"
    assert not _latent_matters(_IgnoresZ(res.model.__class__(dim=1, hidden=32, depth=3), 4))
    deaf = res.model
    with torch.no_grad():  # cut z out of the same trained network
        deaf.cond_embed[-1].weight.zero_()
        deaf.cond_embed[-1].bias.zero_()
    assert not _latent_matters(deaf)
    assert velocity_spread(deaf, torch.zeros(3, 1), 0.5).abs().max().item() == 0.0


# ------------------------------------------------------------------------------- chapter 7's multi-seed study helpers
def test_energy_to_reference_is_the_metrics_energy_distance():
    from fmtoy.methods.vrfm import EnergyToReference
    from fmtoy.metrics import energy_distance

    g = make_generator(0)
    x, ref = torch.randn(300, 2, generator=g, dtype=torch.float64), torch.randn(400, 2, generator=g) + 0.5
    assert EnergyToReference(ref)(x) == pytest.approx(energy_distance(x, ref), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        EnergyToReference(ref[:1])


def test_eval_draws_differ_by_seed_and_repeat_for_the_same_seed():
    from fmtoy.methods.vrfm import eval_draws

    st = get_setting("hexagon_2d")
    a, b, c = eval_draws(st, 50, 0), eval_draws(st, 50, 0), eval_draws(st, 50, 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1]) and not torch.equal(a[0], a[1])


def test_seed_verdict_names_a_winner_only_when_every_seed_agrees():
    from fmtoy.methods.vrfm import seed_verdict
    from fmtoy.metrics import Spread

    seeds = (0, 1, 2)
    low, high = Spread([1.0, 2.0, 3.0], seeds), Spread([1.5, 2.5, 3.5], seeds)
    mixed = Spread([0.5, 2.5, 3.5], seeds)  # the mean is above `low`'s, but seed 0 is below
    assert seed_verdict(low, high, higher_is_better=False) == "A"  # lower distance wins
    assert seed_verdict(low, high, higher_is_better=True, names=("x", "y")) == "y"
    assert seed_verdict(low, mixed, higher_is_better=False) == "split"
    assert seed_verdict(mixed, low, higher_is_better=True) == "split"


def test_train_and_score_trains_each_run_with_the_seed_and_scores_every_row():
    from dataclasses import replace

    from fmtoy.methods.vrfm import DATA, EXACT, REDRAWN, train_and_score

    base = VRFMConfig(setting="two_modes_1d", steps=20, batch_size=32, device="cpu")
    runs = {("two_modes_1d", "vrfm"): base, ("two_modes_1d", "rfm"): replace(base, method="rfm")}
    fits, scores = train_and_score(runs, seed=3, nfes=(1, 4), n=64, redraw=[("two_modes_1d", "vrfm")])
    assert {f.config.seed for f in fits.values()} == {3}
    names = {"vrfm", "rfm", "vrfm" + REDRAWN, EXACT, DATA}
    assert set(scores) == {("two_modes_1d", m, k, n) for m in names for k in ("ll", "ed") for n in (1, 4)}
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["two_modes_1d", DATA, "ll", 1] == scores["two_modes_1d", DATA, "ll", 4]  # no NFE: one value
    _, again = train_and_score(runs, seed=3, nfes=(1, 4), n=64, redraw=[("two_modes_1d", "vrfm")])
    assert again == scores  # the same seed: the same runs and the same evaluation draws
    _, other = train_and_score(runs, seed=4, nfes=(1, 4), n=64)
    assert other["two_modes_1d", "vrfm", "ed", 4] != scores["two_modes_1d", "vrfm", "ed", 4]
    from fmtoy.methods.vrfm import train_seeds

    trained = train_seeds(runs, (3, 4))  # all seeds at once, then scored: the same as training seed by seed
    assert {seed: {k: f.config.seed for k, f in fs.items()} for seed, fs in trained.items()} == {
        seed: dict.fromkeys(runs, seed) for seed in (3, 4)
    }
    _, given = train_and_score(runs, seed=3, nfes=(1, 4), n=64, redraw=[("two_modes_1d", "vrfm")], fits=trained[3])
    assert given == scores
    with pytest.raises(ValueError, match="fits must hold the runs"):
        train_and_score(runs, seed=3, nfes=(1,), n=64, fits={("two_modes_1d", "vrfm"): fits["two_modes_1d", "vrfm"]})
