"""Chapter 3 (FM paper Thm 2): L_FM - L_CFM is theta-free, equal gradients (also for Bregman losses, not for L1),
the x_0 form of the CFM loss, the posterior median field, the SymPy identities and the exercise solutions."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp
import torch
from helpers import draw_batch, small_model

import fmtoy.symbolic as S
from fmtoy.data import GaussianMixture, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.losses import cfm_loss
from fmtoy.marginal import marginal_velocity
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath, get_path
from fmtoy.teaching import objectives as obj

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "ch3_cfm.md"
TARGET = eight_gaussians()
PATH = CondOTPath()
Q1D = GaussianMixture(torch.tensor([0.75, 0.25]), torch.tensor([[-1.0], [2.5]]), torch.tensor([[[0.04]], [[0.04]]]))


def batch(n: int, seed: int = 0, target=TARGET, path=PATH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return draw_batch(n, seed, target, path)


def small_net(seed: int = 0, dim: int = 2) -> VelocityMLP:
    return small_model(seed, dim=dim, time_features=8).double()


# ----------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("sigma_min", [0.0, 0.1, 0.5])
def test_x0_form_equals_library_cfm_loss(sigma_min):
    """FM paper Eq. 23 (x_0 form) == cfm_loss on CondOTPath(sigma_min) == conditional_loss("l2"), same samples."""
    x0, x1, t = batch(512, seed=1)
    net, path = small_net(), CondOTPath(sigma_min)
    ref = cfm_loss(net, x0, x1, t, path)
    assert torch.allclose(obj.cfm_loss_x0(net, x0, x1, t, sigma_min), ref, rtol=1e-12)
    assert torch.allclose(obj.conditional_loss(net, x0, x1, t, path), ref, rtol=1e-12)
    # and it is not the loss of another sigma_min: the check can fail
    assert not torch.allclose(obj.cfm_loss_x0(net, x0, x1, t, sigma_min + 0.2), ref, rtol=1e-6)


@pytest.mark.parametrize("name", ["ot", "ve", "vp"])
def test_conditional_l2_loss_is_cfm_loss_on_every_path(name):
    path = get_path(name)
    x0, x1, t = batch(256, seed=2, path=path)
    t = t.clamp(path.t_min, path.t_max)
    net = small_net()
    assert torch.allclose(obj.conditional_loss(net, x0, x1, t, path), cfm_loss(net, x0, x1, t, path), rtol=1e-12)


def test_fm_cfm_gap_does_not_depend_on_the_model():
    """gap(v) = L_FM - L_CFM on one batch; gap(v_a) - gap(v_b) = mean 2 (v_a - v_b).(y - u), a mean-zero average.

    z-test at 5 standard errors. With a wrong field (0.8 u) the difference is many standard errors off.
    """
    x0, x1, t = batch(20000, seed=3)
    xt, y = PATH.sample_xt(x0, x1, t), PATH.target_velocity(x0, x1, t)
    u = marginal_velocity(xt, t, PATH, TARGET)
    model_a = lambda x, s: torch.zeros_like(x)  # noqa: E731
    model_b = lambda x, s: 0.8 * marginal_velocity(x, s, PATH, TARGET) + torch.sin(x)  # noqa: E731
    gaps = [obj.fm_loss(m, xt, t, PATH, TARGET) - obj.conditional_loss(m, x0, x1, t, PATH) for m in (model_a, model_b)]
    z = 2 * ((model_a(xt, t) - model_b(xt, t)) * (y - u)).sum(1)
    se = z.std() / len(z) ** 0.5
    assert abs(gaps[0] - gaps[1]) < 5 * se
    assert abs(gaps[0] - gaps[1] - z.mean()) < 1e-8  # the identity itself, exactly on the batch
    # the theta-free part equals minus the posterior variance on average (Thm statement), to MC accuracy
    const = u.square().sum(1) - y.square().sum(1)
    assert abs(gaps[0] - const.mean()) < 1e-8  # v = 0: gap is exactly the theta-free part
    # regressing on a wrong field (0.8 u) instead, the "gap" depends on the model by many standard errors
    wrong = [
        (m(xt, t) - 0.8 * u).square().sum(1).mean() - obj.conditional_loss(m, x0, x1, t, PATH)
        for m in (model_a, model_b)
    ]
    assert abs(wrong[0] - wrong[1]) > 10 * se


def test_training_log_gap_is_flat_while_losses_fall():
    """During CFM training the logged L_FM - L_CFM moves < 5% as much as L_FM, and sits near the theta-free part."""
    torch.manual_seed(0)
    net = VelocityMLP(hidden=32, depth=2, time_features=8)
    noise = torch.randn(50, 2)
    log = obj.train_logged(
        net,
        PATH,
        TARGET,
        steps=60,
        batch_size=128,
        lr=5e-3,
        eval_size=4000,
        eval_every=10,
        snapshot_every=30,
        snapshot_noise=noise,
    )
    fm, cfm = torch.tensor(log["fm"]), torch.tensor(log["cfm"])
    gap = fm - cfm
    assert log["step"] == [0, 10, 20, 30, 40, 50, 60]
    assert fm[-1] < 0.5 * fm[0]  # it trained
    assert gap.std() < 0.05 * fm.std()
    assert abs(gap.mean() - log["constant"]) < 0.5  # cross-term MC error ~ 2 |v| sd(y) / sqrt(4000) ~ 0.2
    assert [s for s, _ in log["snapshots"]] == [0, 30, 60] and log["snapshots"][0][1].shape == (50, 2)


def _bias_ratio(discrepancy, n_batches: int = 8, n: int = 4096) -> float:
    """||mean_k (g_CFM - g_FM)_k||^2 / sum_j se_j^2 over K same-sample batches: ~1 if unbiased, >> 1 if biased."""
    net = small_net(seed=4)
    diffs = []
    for k in range(n_batches):
        x0, x1, t = batch(n, seed=100 + k)
        xt = PATH.sample_xt(x0, x1, t)
        g_c = obj.loss_gradient(net, obj.conditional_loss, x0, x1, t, PATH, discrepancy)
        g_f = obj.loss_gradient(net, obj.fm_loss, xt, t, PATH, TARGET, discrepancy=discrepancy)
        diffs.append(g_c - g_f)
    d = torch.stack(diffs)
    return float(d.mean(0).square().sum() / (d.var(0) / n_batches).sum())


@pytest.mark.parametrize("name", ["l2", "exp", "quadratic"])
def test_bregman_gradients_are_unbiased(name):
    """E[g_CFM - g_FM] = 0 (Thm 2 and its Bregman form): the ratio statistic is ~1 (0.4 ... 1.8 over 15 seeds)."""
    div = {
        "l2": "l2",
        "exp": obj.bregman_divergence(obj.exp_potential(2.0)),
        "quadratic": obj.bregman_divergence(obj.quadratic_potential(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))),
    }[name]
    assert _bias_ratio(div) < 3.0


def test_l1_gradients_are_biased():
    """L1 is not Bregman: the same statistic is far above 1 (~150-270), and the large-batch cosine is below 1."""
    assert _bias_ratio("l1") > 30.0
    x0, x1, t = batch(1 << 15, seed=7)
    net = small_net(seed=4)
    g_c = obj.loss_gradient(net, obj.l1_loss, x0, x1, t, PATH)
    g_f = obj.loss_gradient(net, obj.fm_loss, PATH.sample_xt(x0, x1, t), t, PATH, TARGET, discrepancy="l1")
    assert obj.compare_gradients(g_c, g_f)["cosine"] < 0.95


def test_gradient_agreement_error_shrinks_with_batch_size():
    """Relative error of the CFM minibatch gradient falls ~ n^-1/2 (x16 batch: ~4x smaller; asserted > 2x)."""
    res = obj.gradient_agreement(small_net(seed=5), PATH, TARGET, [64, 1024], repeats=4, reference_size=1 << 14)
    assert res["rel_cfm"][1] < 0.5 * res["rel_cfm"][0]
    assert res["cos_fm"][1] > res["cos_fm"][0] and res["ref_cosine"] > 0.9
    assert set(res) >= {"cos_cfm", "cos_std_cfm", "rel_fm", "rel_std_fm", "cos_cfm_mean", "ref_rel_error"}


# -------------------------------------------------------------------------------------------- discrepancies
def test_bregman_divergence_closed_forms():
    g = make_generator(0)
    y, v = torch.randn(100, 2, generator=g, dtype=torch.float64), torch.randn(100, 2, generator=g, dtype=torch.float64)
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    quad = obj.bregman_divergence(obj.quadratic_potential(a))(y, v)
    assert torch.allclose(quad, (((y - v) @ a) * (y - v)).sum(1), rtol=1e-12)
    sq = obj.bregman_divergence(lambda x: x.square().sum(1))(y, v)
    assert torch.allclose(sq, obj.squared_error(y, v), rtol=1e-12)
    s = 2.0
    ex = obj.bregman_divergence(obj.exp_potential(s))(y, v)
    closed = (s * s * (torch.exp(y / s) - torch.exp(v / s)) - s * torch.exp(v / s) * (y - v)).sum(1)
    assert torch.allclose(ex, closed, rtol=1e-12) and (ex >= 0).all()
    assert torch.allclose(obj.bregman_divergence(obj.exp_potential(s))(v, v), torch.zeros(100, dtype=torch.float64))


def test_bregman_divergence_is_differentiable_in_the_prediction():
    """d/dv D_phi(y, v) = Hess phi(v) (v - y): for phi = x^T A x it is 2 A (v - y)."""
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    v = torch.tensor([[0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    obj.bregman_divergence(obj.quadratic_potential(a))(y, v).sum().backward()
    assert torch.allclose(v.grad, 2 * (v.detach() - y) @ a, rtol=1e-12)


# ----------------------------------------------------------------------------------------------- posterior fields
@pytest.mark.parametrize("target", [TARGET, Q1D], ids=["eight_gaussians", "1d"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_posterior_mean_is_the_marginal_field(target, t):
    """c E[x_1 | x] + r x from x1_posterior equals fmtoy.marginal's u_t(x) (Theorem 1 two ways)."""
    x = 3 * torch.randn(200, target.dim, generator=make_generator(1), dtype=torch.float64)
    assert torch.allclose(
        obj.posterior_mean_velocity(x, t, PATH, target), marginal_velocity(x, t, PATH, target), rtol=1e-9, atol=1e-9
    )


def test_posterior_median_splits_the_posterior_in_half():
    """Draw x_1 ~ p(x_1 | x) and check P(u(x|x_1) <= median) = 1/2 within 4 binomial standard errors; mean != median."""
    x, t, m = torch.tensor([[0.3]], dtype=torch.float64), 0.4, 40000
    w, mu, var, c, r = obj.x1_posterior(x, t, PATH, Q1D)
    g = make_generator(2)
    k = torch.multinomial(w[0], m, replacement=True, generator=g)
    x1 = mu[0, k] + var[0, k].sqrt() * torch.randn(m, 1, generator=g, dtype=torch.float64)
    u = c * x1 + r * x  # u_t(x | x_1)
    assert torch.allclose(u, PATH.conditional_velocity(x.expand(m, 1), t, x1), rtol=1e-10)
    med = obj.posterior_median_velocity(x, t, PATH, Q1D)
    assert abs((u <= med).double().mean() - 0.5) < 4 * 0.5 / m**0.5
    assert abs(u.mean() - marginal_velocity(x, t, PATH, Q1D)) < 4 * u.std() / m**0.5
    assert abs(med - u.mean()) > 0.5  # the toy is lopsided: median and mean differ


def test_l1_minimiser_at_a_point_is_the_median():
    """Minimising the L1 objective over a constant v (subgradient = mean sign) gives the posterior median."""
    x, t = torch.tensor([[0.3]], dtype=torch.float64), 0.4
    w, mu, var, c, r = obj.x1_posterior(x, t, PATH, Q1D)
    g = make_generator(3)
    k = torch.multinomial(w[0], 20000, replacement=True, generator=g)
    u = c * (mu[0, k] + var[0, k].sqrt() * torch.randn(20000, 1, generator=g, dtype=torch.float64)) + r * x
    lo, hi = u.min(), u.max()
    for _ in range(60):  # bisection on the subgradient of mean |u - v|
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (u < mid).double().mean() < 0.5 else (lo, mid)
    assert abs(mid - obj.posterior_median_velocity(x, t, PATH, Q1D)) < 0.05


# ----------------------------------------------------------------------------------------------- SymPy
def test_sympy_two_point_gap_is_independent_of_v():
    """The chapter's check: the CFM integrand as sampled (x_1 ~ q, x ~ p_t(.|x_1)) minus the FM integrand p_t(x)
    (v - u(x))^2 is free of v for the posterior average, not for the prior average; the rest is the posterior
    variance times p_t(x)."""
    x, v, a, b, t = sp.symbols("x v a b t", real=True)
    pi_a = sp.Symbol("pi_a", positive=True)
    dens = lambda x1: sp.exp(-((x - t * x1) ** 2) / (2 * (1 - t) ** 2))  # noqa: E731
    p = pi_a * dens(a) + (1 - pi_a) * dens(b)
    w = pi_a * dens(a) / p
    u_a, u_b = (a - x) / (1 - t), (b - x) / (1 - t)
    cfm = pi_a * dens(a) * (v - u_a) ** 2 + (1 - pi_a) * dens(b) * (v - u_b) ** 2
    posterior, prior = w * u_a + (1 - w) * u_b, pi_a * u_a + (1 - pi_a) * u_b
    assert sp.simplify(sp.diff(cfm - p * (v - posterior) ** 2, v)) == 0
    assert min(S.values_at_random_points(sp.diff(cfm - p * (v - prior) ** 2, v))) > 1e-6  # the check can fail
    rest = cfm - p * (v - posterior) ** 2 - p * w * (1 - w) * (u_a - u_b) ** 2
    assert S.is_zero(rest, method="points")
    point = {x: sp.Rational(1, 10), v: sp.Rational(-7, 5), a: -1, b: sp.Rational(5, 2), t: sp.Rational(2, 5)}
    assert abs(rest.subs({**point, pi_a: sp.Rational(3, 4)}).evalf(40)) < 1e-30


def test_sympy_bregman_identity_and_l1_counterexample():
    phi, v = sp.Function("phi"), sp.Symbol("v", real=True)
    w, ya, yb = sp.symbols("w y_a y_b", real=True)
    D = lambda y, vv: phi(y) - phi(vv) - sp.diff(phi(vv), vv) * (y - vv)  # noqa: E731
    m = w * ya + (1 - w) * yb
    gap = w * D(ya, v) + (1 - w) * D(yb, v) - D(m, v)
    assert sp.simplify(gap - (w * phi(ya) + (1 - w) * phi(yb) - phi(m))) == 0
    assert sp.simplify(sp.diff(gap, v)) == 0
    l1 = w * sp.Abs(v - ya) + (1 - w) * sp.Abs(v - yb) - sp.Abs(v - m)
    slope = sp.diff(l1, v).subs({w: sp.Rational(1, 4), ya: 0, yb: 1, v: sp.Rational(1, 2)})
    assert sp.simplify(slope) == sp.Rational(1, 2)


def test_sympy_x0_form_target():
    x0, x1, s, t = sp.symbols("x_0 x_1 sigma_min t", real=True)
    psi = (1 - (1 - s) * t) * x0 + t * x1
    assert sp.simplify((x1 - (1 - s) * psi) / (1 - (1 - s) * t) - (x1 - (1 - s) * x0)) == 0
    assert sp.simplify(sp.diff(psi, t) - (x1 - (1 - s) * x0)) == 0


# ----------------------------------------------------------------------------------------------- exercises
def test_solutions_are_found(solutions):
    assert {"cfm_loss_x0", "exp_bregman"} <= set(solutions)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_solution_x0_loss(sigma_min, solutions):
    f = solutions["cfm_loss_x0"]
    x0, x1, t = batch(300, seed=8)
    net = small_net()
    assert torch.allclose(f(net, x0, x1, t, sigma_min), cfm_loss(net, x0, x1, t, CondOTPath(sigma_min)), rtol=1e-10)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_solution_exp_bregman(scale, solutions):
    f = solutions["exp_bregman"]
    g = make_generator(9)
    y, v = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(f(y, v, scale), obj.bregman_divergence(obj.exp_potential(scale))(y, v), rtol=1e-10)


# ----------------------------------------------------------------------------------------------- bad inputs
NET = VelocityMLP(hidden=8, depth=1, time_features=2)
X = torch.zeros(4, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: obj.cfm_loss_x0(NET, X, X, 0.5, sigma_min=1.0), ValueError, "sigma_min"),
        (lambda: obj.cfm_loss_x0(NET, X, X, 0.5, sigma_min=-0.1), ValueError, "sigma_min"),
        (lambda: obj.cfm_loss_x0(NET, X, torch.zeros(3, 2), 0.5), ValueError, "same shape"),
        (lambda: obj.cfm_loss_x0(NET, X, X, 1.5), ValueError, r"\[0, 1\]"),
        (lambda: obj.fm_loss(NET, X, 0.5, "ot", TARGET), TypeError, "GaussianPath"),
        (lambda: obj.conditional_loss(NET, X, X, 0.5, PATH, discrepancy="l3"), ValueError, "l1, l2"),
        (lambda: obj.conditional_loss(lambda x, t: x[:, :1], X, X, 0.5, PATH), ValueError, "shape"),
        (lambda: obj.exp_potential(0.0), ValueError, "scale"),
        (lambda: obj.quadratic_potential(torch.tensor([[1.0, 2.0], [2.0, 1.0]])), ValueError, "positive-definite"),
        (lambda: obj.quadratic_potential(torch.ones(2, 3)), ValueError, "square"),
        (lambda: obj.bregman_divergence(3.0), TypeError, "callable"),
        (lambda: obj.bregman_divergence(lambda x: x)(X, X), ValueError, "one value per row"),
        (lambda: obj.loss_gradient(lambda x, t: x, obj.conditional_loss, X, X, 0.5, PATH), TypeError, "nn.Module"),
        (lambda: obj.compare_gradients(torch.ones(3), torch.ones(4)), ValueError, "differ in size"),
        (lambda: obj.compare_gradients(torch.ones(3), torch.zeros(3)), ValueError, "zero"),
        (lambda: obj.compare_gradients(torch.ones(3, 1), torch.ones(3)), ValueError, "flat"),
        (lambda: obj.gradient_agreement(NET, PATH, TARGET, []), ValueError, "batch_sizes"),
        (lambda: obj.gradient_agreement(NET, PATH, TARGET, [8], t=1.0), ValueError, "t must lie"),
        (
            lambda: obj.train_logged(NET, PATH, TARGET, steps=1, batch_size=4, lr=1e-3, eval_size=-1),
            ValueError,
            "eval_size",
        ),
        (
            lambda: obj.train_logged(NET, PATH, TARGET, steps=1, batch_size=4, lr=1e-3, snapshot_every=1),
            ValueError,
            "snapshot_noise",
        ),
        (lambda: obj.train_logged(NET, PATH, TARGET, steps=0, batch_size=4, lr=1e-3), ValueError, "steps"),
        (
            lambda: obj.posterior_median_velocity(
                X,
                0.5,
                PATH,
                GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.diag(torch.tensor([1.0, 2.0]))[None]),
            ),
            ValueError,
            "isotropic",
        ),
        (lambda: obj.posterior_median_velocity(X, 1.0, PATH, TARGET), ValueError, "t must lie"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
