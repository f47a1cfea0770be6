"""Tests for fmtoy.data: exact densities integrate to 1, samplers agree with them, validation is clear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import logsumexp

from fmtoy import data
from fmtoy.data import (
    CurveNoise,
    GaussianMixture,
    StandardNormal,
    eight_gaussians,
    get_dataset,
    list_datasets,
    rings,
    spirals,
    two_moons,
)
from fmtoy.device import make_generator

NAMES = ["eight_gaussians", "checkerboard", "two_moons", "rings", "spirals", "standard_normal", "labelled_gaussians"]

# Midpoint grid on [-7, 7]^2 with h = 0.1. Every smooth density here has std >= 0.25 = 2.5 h, so the midpoint
# rule is spectrally accurate (aliasing error ~ exp(-2 pi^2 std^2 / h^2) < 1e-50); the mass outside the box is
# < 1e-8 (the closest mode is 6 std from the edge); the checkerboard squares have edges on grid lines, so the
# midpoint rule is exact for it. Hence |integral - 1| < 1e-6 leaves a wide margin and any bug in a normalising
# constant (factor 2, wrong log det, wrong weights) fails it.
H, L = 0.1, 7.0
CENTRES = torch.arange(-L + H / 2, L, H, dtype=torch.float64)
GRID = torch.cartesian_prod(CENTRES, CENTRES)  # (140^2, 2), row-major in (x, y)


def random_gmm(seed: int = 0, k: int = 4, d: int = 2) -> GaussianMixture:
    """Random mixture with full covariances (eigenvalues >= 0.1) and one zero weight."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d)) * 0.5
    covs = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d)
    w = rng.uniform(0.2, 1.0, size=k)
    w[-1] = 0.0
    return GaussianMixture(w, rng.uniform(-3, 3, size=(k, d)), covs, name="random")


def make(name: str):
    return random_gmm() if name == "random_gmm" else get_dataset(name)


@pytest.fixture(scope="module")
def grid_density():
    cache = {}

    def get(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in cache:
            logp = make(name).log_prob(GRID)
            cache[name] = (logp, logp.exp())
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES + ["random_gmm"])
def test_density_integrates_to_one(name, grid_density):
    _, p = grid_density(name)
    assert abs(p.sum().item() * H * H - 1) < 1e-6


@pytest.mark.parametrize("name", NAMES + ["random_gmm"])
def test_mean_log_prob_of_samples_matches_grid_entropy(name, grid_density):
    """E_p[log p(X)] by Monte Carlo (50k samples) equals int p log p on the grid within 5 standard errors."""
    dist = make(name)
    lp = dist.log_prob(dist.sample(50_000, make_generator(1)).double())
    assert torch.isfinite(lp).all()  # samples lie on the support (checkerboard: log p = -inf off it)
    logp, p = grid_density(name)
    neg_entropy = (torch.where(p > 0, p * logp, 0.0)).sum().item() * H * H
    se = lp.std().item() / math.sqrt(len(lp))
    assert abs(lp.mean().item() - neg_entropy) < 5 * se + 1e-6


@pytest.mark.parametrize("name", NAMES + ["random_gmm"])
def test_binned_samples_pass_chi_square_against_log_prob(name, grid_density):
    """Pearson chi^2 of 50k samples in 0.7 x 0.7 bins vs bin masses from the grid density; reject at p < 1e-6."""
    n, per_bin = 50_000, 7
    _, p = grid_density(name)
    nb = len(CENTRES) // per_bin
    probs = p.reshape(nb, per_bin, nb, per_bin).sum((1, 3)).reshape(-1) * H * H
    x = make(name).sample(n, make_generator(2)).double()
    idx = torch.floor((x + L) / (per_bin * H)).long()
    inside = ((idx >= 0) & (idx < nb)).all(1)
    counts = torch.bincount(idx[inside, 0] * nb + idx[inside, 1], minlength=nb * nb).double()
    big = probs * n >= 5  # merge sparse bins (and the outside of the box) into one cell
    obs = torch.cat([counts[big], (n - counts[big].sum()).reshape(1)])
    exp = torch.cat([probs[big] * n, (n - probs[big].sum() * n).reshape(1)])
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert stat < scipy.stats.chi2.ppf(1 - 1e-6, df=len(obs) - 1)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_gmm_log_prob_matches_scipy(d):
    gmm = random_gmm(seed=d, k=5, d=d)
    x = torch.randn(200, d, dtype=torch.float64, generator=make_generator(d)) * 3
    with np.errstate(divide="ignore"):  # one weight is 0: log 0 = -inf, as in fmtoy
        logw = np.log(gmm.weights.numpy())
    comps = [
        lw + scipy.stats.multivariate_normal(m, c).logpdf(x.numpy()).reshape(-1)
        for lw, m, c in zip(logw, gmm.means.numpy(), gmm.covs.numpy())
    ]
    ref = logsumexp(np.stack(comps), axis=0)
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), ref, rtol=1e-10, atol=1e-10)
    lp32 = gmm.log_prob(x.float())
    assert lp32.dtype == torch.float32
    np.testing.assert_allclose(lp32.double().numpy(), ref, rtol=1e-5, atol=1e-4)


def test_gmm_attributes_and_standard_normal():
    gmm = random_gmm()
    assert gmm.weights.dtype == gmm.means.dtype == gmm.covs.dtype == torch.float64
    assert gmm.n_components == 4 and gmm.dim == 2 and abs(gmm.weights.sum().item() - 1) < 1e-12
    comp = gmm.component(1)
    assert comp.n_components == 1 and torch.equal(comp.means[0], gmm.means[1])
    x = torch.randn(50, 3, dtype=torch.float64)
    expected = -0.5 * (x * x).sum(1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(StandardNormal(3).log_prob(x), expected, rtol=0, atol=1e-12)
    g8 = eight_gaussians()
    torch.testing.assert_close(g8.means.norm(dim=1), torch.full((8,), 4.0, dtype=torch.float64))


def test_empirical_has_no_density_but_samples_its_points():
    pts = torch.tensor([[0.0, 1.0], [2.0, -1.0], [3.0, 3.0]])
    emp = GaussianMixture.from_points(pts)
    assert emp.is_empirical and emp.n_components == 3
    x = emp.sample(300, make_generator(0))
    assert ((x[:, None, :] - pts[None]).abs().sum(-1) == 0).any(1).all()
    with pytest.raises(ValueError, match="empirical"):
        emp.log_prob(pts)


def test_checkerboard_is_minus_inf_off_support():
    cb = get_dataset("checkerboard")
    lp = cb.log_prob(torch.tensor([[-3.0, -3.0], [-3.0, -1.0], [6.0, 0.0], [0.5, 0.5]]))
    assert torch.isfinite(lp[[0, 3]]).all() and torch.isinf(lp[[1, 2]]).all()
    assert abs(lp[0].item() + math.log(8 * 4)) < 1e-6  # 8 black squares of area 4


@pytest.mark.parametrize("factory", [two_moons, spirals])
def test_curve_quadrature_matches_a_much_finer_rule(factory):
    """The documented accuracy: vs 8x more panels, |d log p| < 1e-7 where p > 1e-8 max p, < 1e-4 where > 1e-20."""
    coarse = factory()
    fine = factory(panels=8 * coarse.panels)
    a, b = coarse.log_prob(GRID), fine.log_prob(GRID)
    err, rel = (a - b).abs(), b - b.max()
    assert err[rel > math.log(1e-8)].max() < 1e-7
    assert err[rel > math.log(1e-20)].max() < 1e-4


def test_rings_closed_form_matches_quadrature_over_the_circles():
    """Bessel closed form vs the curve integral (Gauss-Legendre over each full circle, same weights)."""
    dist = rings(radii=(1.0, 2.5), std=0.3)

    def circle(r):
        return lambda u: r * torch.stack([torch.cos(2 * math.pi * u), torch.sin(2 * math.pi * u)], -1)

    quad = CurveNoise([circle(1.0), circle(2.5)], [1.0, 2.5], std=0.3, panels=200)
    a, b = dist.log_prob(GRID), quad.log_prob(GRID)
    mask = b > b.max() - math.log(1e8)
    assert (a - b)[mask].abs().max() < 1e-9


@pytest.mark.parametrize("name", NAMES + ["random_gmm"])
def test_sampling_is_reproducible_and_float32(name):
    dist = make(name)
    x1 = dist.sample(500, make_generator(7))
    x2 = dist.sample(500, make_generator(7), device="cpu")
    x3 = dist.sample(500, make_generator(8))
    assert x1.shape == (500, 2) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert dist.sample(3).shape == (3, 2)  # global RNG
    lp = dist.log_prob(x1.double())
    assert lp.dtype == torch.float64 and lp.shape == (500,)
    assert dist.log_prob(x1).dtype == torch.float32


def test_log_prob_of_10k_points_is_fast():
    """Typically < 0.05 s wall (spirals, the slowest). CPU time (robust to other jobs on the machine), best of 5,
    against 0.2 s per thread."""
    import time

    for name in NAMES:
        dist, x = get_dataset(name), torch.randn(10_000, 2) * 3
        times = []
        for _ in range(5):
            t0 = time.process_time()
            dist.log_prob(x)
            times.append(time.process_time() - t0)
        assert min(times) < 0.2 * torch.get_num_threads(), (name, times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_sampling_and_log_prob(name):
    dist = get_dataset(name)
    x = dist.sample(1000, make_generator(0, "cuda"))
    assert x.device.type == "cuda" and torch.equal(x, dist.sample(1000, make_generator(0, "cuda")))
    torch.testing.assert_close(dist.log_prob(x).cpu(), dist.log_prob(x.cpu()), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="generator"):
        dist.sample(10, make_generator(0, "cpu"), device="cuda")


def test_registry():
    assert list_datasets() == sorted(NAMES + ["gaussian_mixture"])
    assert set(data.DATASETS) == set(list_datasets())
    assert get_dataset("gaussian_mixture", weights=[1.0], means=[[0.0, 0.0]], covs=[np.eye(2)]).n_components == 1
    assert get_dataset("eight_gaussians", radius=2.0).means.norm(dim=1).max().item() == pytest.approx(2.0)


def test_bad_shape_inputs():
    dist = get_dataset("two_moons")
    for bad in (torch.zeros(5), torch.zeros(5, 3), torch.zeros(2, 5, 2)):
        with pytest.raises(ValueError, match="shape"):
            dist.log_prob(bad)
    with pytest.raises(TypeError, match="floating"):
        dist.log_prob(torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        dist.log_prob(np.zeros((5, 2)))


@pytest.mark.parametrize("name", ["nope", "Rings", "", 3])
def test_unknown_dataset_lists_names(name):
    with pytest.raises(ValueError, match="allowed: checkerboard, eight_gaussians"):
        get_dataset(name)


@pytest.mark.parametrize("n", [0, -5, 2.5, "10", True, None])
def test_bad_sample_size(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        get_dataset("rings").sample(n)


EYE = np.eye(2)
BAD_GMMS = [
    (dict(weights=[1.0, -0.5], means=[[0, 0], [1, 1]], covs=[EYE, EYE]), "weights must be >= 0"),
    (dict(weights=[0.0, 0.0], means=[[0, 0], [1, 1]], covs=[EYE, EYE]), "positive sum"),
    (dict(weights=[1.0], means=[[0, 0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive semi-definite"),
    (dict(weights=[1.0], means=[[0, 0]], covs=[[[1.0, 0.5], [0.0, 1.0]]]), "not symmetric"),
    (dict(weights=[1.0, 1.0, 1.0], means=[[0, 0], [1, 1]], covs=[EYE, EYE]), "shapes must be"),
    (dict(weights=[1.0, 1.0], means=[[0, 0], [1, 1]], covs=[np.eye(3), np.eye(3)]), "shapes must be"),
    (dict(weights=[1.0], means=[0.0, 0.0], covs=[EYE]), "means must have 2 dimension"),
    (dict(weights=[1.0], means=[[np.nan, 0.0]], covs=[EYE]), "finite"),
]


@pytest.mark.parametrize("kwargs,match", BAD_GMMS)
def test_bad_gaussian_mixture(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: eight_gaussians(std=0.0), ValueError, "std must be a finite number > 0"),
        (lambda: spirals(turns=-1.0), ValueError, "turns"),
        (lambda: rings(radii=()), ValueError, "radii"),
        (lambda: get_dataset("checkerboard", squares=0), ValueError, "squares must be a positive integer"),
        (lambda: get_dataset("rings", foo=1), TypeError, "rings"),
        (lambda: get_dataset("gaussian_mixture"), TypeError, "gaussian_mixture"),
        (lambda: StandardNormal(dim=0), ValueError, "dim"),
        (lambda: random_gmm().component(4), ValueError, "component index"),
        (lambda: StandardNormal().sample(5, generator="seed"), TypeError, "generator"),
        (lambda: StandardNormal().sample(5, device="tpu"), ValueError, "device"),
        (
            lambda: GaussianMixture([1.0, 1.0], [[0, 0], [1, 1]], [EYE, 0 * EYE]).log_prob(torch.zeros(1, 2)),
            ValueError,
            "singular",
        ),
    ],
)
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize(
    "name", ["eight_gaussians", "checkerboard", "two_moons", "rings", "spirals", "standard_normal"]
)
def test_samples_are_float32_even_with_a_float64_default_dtype(name):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = get_dataset(name).sample(64, generator=make_generator(0))
    finally:
        torch.set_default_dtype(old)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
