"""Variational rectified flow matching (Guo & Schwing 2025; chapter 7): a latent z makes the velocity multimodal.

Model (ch. 7, Def. def-ch7-vrfm): p(v | x_t, t, z) = N(v; v_theta(x_t, t, z), sigma^2 I), prior p(z) = N(0, I), encoder
q_phi(z | x_0, x_1, x_t, t) = N(mu, diag exp(logvar)). Loss (ch. 7, Eq. eq-ch7-loss), one reparametrised z per pair:
    ||v_theta(x_t, t, z) - (x_1 - x_0)||^2 + kl_weight KL(q_phi || p)  =  kl_weight (-ELBO) + const,
the negative ELBO of the decoder variance sigma^2 = kl_weight / 2 (Thm thm-ch7-elbo). Sampling: z ~ p(z) once per
trajectory, held fixed while the ODE dx/dt = v_theta(x, t, z) is integrated (Prop prop-ch7-fixed-z). Also: the
paper's synthetic settings, the exact distribution p(v | x_t, t) of the velocity for Gaussian-mixture source and
target (the ground truth, Prop prop-ch7-velocity-posterior), and the chapter's seed study: train_and_score gives one
seed's scores (mean log q and energy distance per NFE), fmtoy.metrics.across_seeds turns them into Spreads, and
seed_verdict names a winner only when every seed agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_paired, check_points, check_positive, check_positive_int, check_unit_time
from ..data import Distribution, GaussianMixture, StandardNormal, circle_mixture, eight_gaussians
from ..device import make_generator, resolve_device
from ..losses import cfm_loss
from ..marginal import ExactField, _check_models, posterior_weights
from ..metrics import Spread, _mean_pairwise, energy_distance
from ..models import VelocityMLP, _check_model_time
from ..paths import CondOTPath, GaussianPath
from ..solvers import integrate
from ..threads import check_threads, under_policy
from ..train import LR_SCHEDULES, FitConfig, FitContext, FitResult, check_config, fit, pair_sampler, run_config
from ..workers import train_many

POSTERIOR_INPUTS = ("x0", "x1", "xt", "t")
METHODS = ("rfm", "vrfm")


# ----------------------------------------------------------------------------------------------- settings
def two_modes_1d(std: float = 0.1) -> GaussianMixture:
    """The paper's 1D target: (1/2) N(-1, std^2) + (1/2) N(+1, std^2) (source N(0, 1))."""
    std = check_positive("std", std)
    return GaussianMixture(
        torch.ones(2), torch.tensor([[-1.0], [1.0]]), torch.full((2, 1, 1), std**2), name="two_modes_1d"
    )


def hexagon(radius: float = 1.0, std: float = 0.05, name: str = "hexagon") -> GaussianMixture:
    """Six equal-weight Gaussians on a circle of radius r (the paper's 2D setting; circle_mixture with K = 6)."""
    return circle_mixture(6, radius, std, name=name)


@dataclass(frozen=True)
class VRFMSetting:
    """A source -> target problem and the paper's latent size and KL weight for it (App. D.1)."""

    name: str
    source: GaussianMixture
    target: GaussianMixture
    latent_dim: int
    kl_weight: float

    @property
    def dim(self) -> int:
        """Dimension of x."""
        return self.target.dim


def _settings() -> dict[str, Callable[[], VRFMSetting]]:
    return {
        "two_modes_1d": lambda: VRFMSetting("two_modes_1d", StandardNormal(1), two_modes_1d(), 4, 1.0),
        "hexagon_2d": lambda: VRFMSetting(
            "hexagon_2d", hexagon(1 / 3, name="hexagon_r1/3"), hexagon(1.0, name="hexagon_r1"), 8, 0.1
        ),
        "eight_gaussians": lambda: VRFMSetting("eight_gaussians", StandardNormal(2), eight_gaussians(), 8, 0.1),
    }


SETTINGS = tuple(_settings())


def get_setting(name: str) -> VRFMSetting:
    """The named setting: "two_modes_1d" (N(0,1) -> modes at +-1), "hexagon_2d" (circle r = 1/3 -> r = 1),
    "eight_gaussians" (N(0, I) -> fmtoy's eight Gaussians)."""
    return _settings()[check_choice("setting", name, SETTINGS)]()


# ----------------------------------------------------------------------------------------------- the encoder
class PosteriorEncoder(nn.Module):
    """q_phi(z | x_0, x_1, x_t, t) = N(mu, diag exp(logvar)): an MLP on the chosen inputs (ch. 7, Def. def-ch7-vrfm)."""

    def __init__(
        self, dim: int, latent_dim: int, hidden: int = 64, depth: int = 2, inputs: tuple[str, ...] = POSTERIOR_INPUTS
    ) -> None:
        super().__init__()
        self.dim, self.latent_dim = check_positive_int("dim", dim), check_positive_int("latent_dim", latent_dim)
        self.hidden, self.depth = check_positive_int("hidden", hidden), check_positive_int("depth", depth)
        self.inputs = check_posterior_inputs(inputs)
        width = sum(1 if k == "t" else dim for k in self.inputs)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x0: Tensor, x1: Tensor, xt: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (n, latent_dim), from the inputs named in self.inputs (the others are ignored)."""
        check_paired(x0, x1)
        if xt.shape != x0.shape:
            raise ValueError(f"xt must have the shape of x0 {tuple(x0.shape)}, got {tuple(xt.shape)}")
        w = self.net[0].weight
        values = {"x0": x0, "x1": x1, "xt": xt, "t": _check_model_time(t, x0.shape[0], x0)}
        h = torch.cat([values[k].to(w.dtype) for k in self.inputs], dim=1)
        mu, logvar = self.net(h).chunk(2, dim=1)
        return mu.to(x0.dtype), logvar.to(x0.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, latent_dim={self.latent_dim}, inputs={self.inputs}"


def check_posterior_inputs(inputs) -> tuple[str, ...]:
    """A non-empty tuple of distinct names from ("x0", "x1", "xt", "t"), in that canonical order."""
    if isinstance(inputs, str) or not isinstance(inputs, (tuple, list)) or not inputs:
        raise ValueError(f"posterior inputs must be a non-empty tuple of names from {POSTERIOR_INPUTS}, got {inputs!r}")
    for k in inputs:
        check_choice("posterior input", k, POSTERIOR_INPUTS)
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"posterior inputs must be distinct, got {inputs!r}")
    return tuple(k for k in POSTERIOR_INPUTS if k in inputs)


# ----------------------------------------------------------------------------------------------- KL, z, loss
def _check_mu_logvar(mu: Tensor, logvar: Tensor) -> None:
    for name, v in (("mu", mu), ("logvar", logvar)):
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point torch.Tensor, got "
                f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}"
            )
    if mu.ndim != 2 or mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must have the same shape (n, latent_dim), got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag e^logvar) || N(0, I)) = 1/2 sum_k (e^logvar_k + mu_k^2 - 1 - logvar_k), (n,) (Thm thm-ch7-elbo)."""
    _check_mu_logvar(mu, logvar)
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(dim=1)


def reparametrise(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): differentiable in (mu, logvar) (Thm thm-ch7-elbo)."""
    _check_mu_logvar(mu, logvar)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


class VRFMLoss(NamedTuple):
    """The batch loss total = mse + kl_weight * kl and its two parts (batch means)."""

    total: Tensor
    mse: Tensor
    kl: Tensor


def _latent_dim(model: nn.Module) -> int:
    return int(getattr(model, "cond_dim", 0))


def _posterior(encoder, model: nn.Module, x0: Tensor, x1: Tensor, xt: Tensor, tc: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, logvar) = encoder(x0, x1, xt, t), checked to be (n, k) with k the model's latent size (cond_dim)."""
    k = _latent_dim(model)
    if k == 0:
        raise ValueError(
            "the model has cond_dim = 0 (no latent input); VRFM needs VelocityMLP(cond_dim=latent_dim), "
            "or pass encoder=None for the plain RFM loss"
        )
    if not callable(encoder):
        raise TypeError(
            f"encoder must be a PosteriorEncoder (or a callable (x0, x1, xt, t) -> (mu, logvar)) or None, "
            f"got {type(encoder).__name__}"
        )
    out = encoder(x0, x1, xt, tc)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"the encoder must return (mu, logvar), got {type(out).__name__}")
    mu, logvar = out
    _check_mu_logvar(mu, logvar)
    if mu.shape != (x0.shape[0], k):
        raise ValueError(
            f"the encoder's mu must have shape (n, latent_dim) = {(x0.shape[0], k)} (latent_dim = the "
            f"model's cond_dim), got {tuple(mu.shape)}"
        )
    return mu, logvar


def _schedule_xt(path: GaussianPath, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = alpha_t x_1 + sigma_t x_0 with t (n, 1), as cfm_loss computes it (unchecked schedule, no sync)."""
    s = path.schedule(t, check=False)
    return s.alpha_t * x1 + s.sigma_t * x0


def _schedule_v(path: GaussianPath, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """v = alpha'_t x_1 + sigma'_t x_0 (x_1 - x_0 for CondOT), the regression target of cfm_loss."""
    s = path.schedule(t, check=False)
    return s.d_alpha_t * x1 + s.d_sigma_t * x0


def vrfm_loss(
    model: nn.Module,
    encoder: Callable | None,
    x0: Tensor,
    x1: Tensor,
    t: float | Tensor,
    kl_weight: float = 1.0,
    path: GaussianPath | None = None,
    generator: torch.Generator | None = None,
) -> VRFMLoss:
    """mean_i ||v_theta(x_t, t, z_i) - (x_1 - x_0)||^2 + kl_weight mean_i KL(q_phi(.|pair_i) || N(0, I)) (eq-ch7-loss).

    One reparametrised z_i ~ q_phi per pair. encoder=None ignores the posterior: z = 0 and KL = 0 (for a model
    with cond_dim = 0, no z at all), which is exactly fmtoy.losses.cfm_loss, the RFM loss.
    """
    kl_weight = check_positive("kl_weight", kl_weight, allow_zero=True)
    path = CondOTPath() if path is None else path
    check_paired(x0, x1)
    k = _latent_dim(model)
    if encoder is None:
        z = x0.new_zeros(x0.shape[0], k) if k else None
        mse = cfm_loss(model, x0, x1, t, path, cond=z)
        return VRFMLoss(mse, mse, mse.new_zeros(()))
    tc = _check_model_time(t, x0.shape[0], x0)
    mu, logvar = _posterior(encoder, model, x0, x1, _schedule_xt(path, x0, x1, tc), tc)
    z = reparametrise(mu, logvar, generator)
    mse = cfm_loss(model, x0, x1, tc[:, 0], path, cond=z)
    kl = gaussian_kl(mu, logvar).mean()
    return VRFMLoss(mse + kl_weight * kl, mse, kl)


def gaussian_log_likelihood(v: Tensor, mean: Tensor, sigma2: float) -> Tensor:
    """log N(v; mean, sigma2 I) = -|v - mean|^2 / (2 sigma2) - (d/2) log(2 pi sigma2), shape (n,)."""
    d = v.shape[-1]
    return -(v - mean).square().sum(-1) / (2 * sigma2) - 0.5 * d * math.log(2 * math.pi * sigma2)


def vrfm_elbo(
    model: nn.Module,
    encoder: Callable,
    x0: Tensor,
    x1: Tensor,
    t: float | Tensor,
    kl_weight: float,
    path: GaussianPath | None = None,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ELBO <= log p_theta(v | x_t, t) per pair, decoder variance sigma^2 = kl_weight / 2 (Thm thm-ch7-elbo), (n,).

    ELBO = E_q[log N(v; v_theta(x_t, t, z), sigma^2 I)] - KL(q_phi || N(0, I)), with n_samples reparametrised z.
    """
    kl_weight = check_positive("kl_weight", kl_weight)
    n_samples = check_positive_int("n_samples", n_samples)
    path = CondOTPath() if path is None else path
    check_paired(x0, x1)
    tc = _check_model_time(t, x0.shape[0], x0)
    xt, v = _schedule_xt(path, x0, x1, tc), _schedule_v(path, x0, x1, tc)
    mu, logvar = _posterior(encoder, model, x0, x1, xt, tc)
    rec = (
        sum(
            gaussian_log_likelihood(v, model(xt, tc[:, 0], reparametrise(mu, logvar, generator)), kl_weight / 2)
            for _ in range(n_samples)
        )
        / n_samples
    )
    return rec - gaussian_kl(mu, logvar)


# ----------------------------------------------------------------------------------------------- sampling
def latent_field(model: nn.Module, z: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """x, t -> v_theta(x, t, z): the ODE of one fixed latent per trajectory (z of shape (n, k) or (1, k))."""
    k = _latent_dim(model)
    if k == 0:
        raise ValueError("the model has cond_dim = 0 (no latent); VRFM needs VelocityMLP(cond_dim=latent_dim)")
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != k:
        raise ValueError(
            f"z must be a tensor of shape (n, {k}) or (1, {k}), got "
            f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
        )

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        zz = z.to(x.device, x.dtype)
        return model(x, t, zz if zz.shape[0] == x.shape[0] else zz.expand(x.shape[0], k))

    return velocity


def sample_vrfm(
    model: nn.Module,
    x0: Tensor,
    steps: int = 20,
    method: str = "euler",
    z: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    resample_z: bool = False,
) -> Tensor:
    """Integrate dx/dt = v_theta(x, t, z) from x0 with z ~ N(0, I) drawn ONCE per trajectory and held fixed.

    z: given latents (n, k) or (1, k) instead of prior draws. resample_z=True draws a fresh z at every velocity
    evaluation instead (not the VRFM sampler; for comparison). A model with cond_dim = 0 is integrated as it is.
    """
    x0 = check_points(x0, getattr(model, "dim", None), name="x0")
    k = _latent_dim(model)
    if k == 0:
        return integrate(lambda x, t: model(x, t), x0, steps, method, return_trajectory=return_trajectory)
    if resample_z:
        if z is not None:
            raise ValueError("give either z (fixed latents) or resample_z=True, not both")

        def fresh(x: Tensor, t: Tensor) -> Tensor:
            return model(x, t, torch.randn(x.shape[0], k, generator=generator, device=x.device, dtype=x.dtype))

        return integrate(fresh, x0, steps, method, return_trajectory=return_trajectory)
    if z is None:
        z = torch.randn(x0.shape[0], k, generator=generator, device=x0.device, dtype=x0.dtype)
    return integrate(latent_field(model, z), x0, steps, method, return_trajectory=return_trajectory)


@torch.no_grad()
def velocity_spread(
    model: nn.Module, x: Tensor, t: float | Tensor, n_z: int = 64, generator: torch.Generator | None = None
) -> Tensor:
    """sqrt(tr Cov_{z ~ N(0, I)}[v_theta(x, t, z)]) per point, shape (n,): 0 for a model that ignores z."""
    x = check_points(x, getattr(model, "dim", None))
    n_z = check_positive_int("n_z", n_z)
    if n_z < 2:
        raise ValueError(f"n_z must be >= 2 to estimate a spread, got {n_z}")
    k = _latent_dim(model)
    if k == 0:
        return x.new_zeros(x.shape[0])
    n = x.shape[0]
    tt = _check_model_time(t, n, x)[:, 0]
    z = torch.randn(n_z, k, generator=generator, device=x.device, dtype=x.dtype)
    v = model(x.repeat(n_z, 1), tt.repeat(n_z), z.repeat_interleave(n, dim=0)).view(n_z, n, -1)
    return v.var(dim=0).sum(-1).sqrt()


@torch.no_grad()
def endpoint_switch(model: nn.Module, z: Tensor, steps: int = 20) -> tuple[float, float]:
    """From x_0 = 0 (1D) with latents z: (fraction of endpoints > 0, accuracy of the best single threshold on z . d),
    d the unit difference of the mean latents that end above and below 0 (sample_vrfm, Euler)."""
    z = check_points(z, _latent_dim(model) or None, name="z")
    end = sample_vrfm(model, z.new_zeros(len(z), 1), steps, z=z)[:, 0]
    up = end > 0
    if up.all() or not up.any():
        return float(up.double().mean()), 1.0
    d = z[up].mean(0) - z[~up].mean(0)
    order = torch.argsort(z @ (d / d.norm()))
    above = up[order].double()
    # a threshold after the k lowest projections predicts "below" for those, "above" for the rest
    correct = (1 - above).cumsum(0) + (above.sum() - above.cumsum(0))
    best = max(float(above.sum()), float(correct.max()))
    return float(up.double().mean()), best / len(z)


@torch.no_grad()
def mode_fractions(
    model: nn.Module, x0: Tensor, modes: Tensor, steps: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """Fraction of the rows of x0 (one prior z each, sample_vrfm) whose endpoint is nearest to each of the modes."""
    end = sample_vrfm(model, x0, steps, generator=generator)
    nearest = torch.cdist(end.double(), modes.double()).argmin(1)
    return torch.bincount(nearest, minlength=len(modes)).double() / len(x0)


# ----------------------------------------------------------------------------------------------- ground truth
class VelocityPosterior(NamedTuple):
    """p(v | x_t = x, t) = sum_P weights[:, P] N(v; means[:, P], covs[P]) for each row x (pairs P = i * K1 + j)."""

    weights: Tensor  # (n, P)
    means: Tensor  # (n, P, d)
    covs: Tensor  # (P, d, d)

    def mean(self) -> Tensor:
        """E[v | x_t = x] = the marginal field u_t(x), shape (n, d)."""
        return (self.weights[:, :, None] * self.means).sum(1)

    def total_variance(self) -> Tensor:
        """tr Cov[v | x_t = x] = sum_P w_P (tr covs_P + |means_P|^2) - |u_t(x)|^2, shape (n,)."""
        second = (self.weights * (self.covs.diagonal(dim1=1, dim2=2).sum(-1) + self.means.square().sum(-1))).sum(1)
        return (second - self.mean().square().sum(-1)).clamp_min(0.0)

    def distribution(self, i: int = 0) -> GaussianMixture:
        """p(v | x_t = x_i, t) as a GaussianMixture (for plotting its density)."""
        return GaussianMixture(self.weights[i], self.means[i], self.covs, name=f"p(v | x_t = x[{i}])")


def velocity_posterior(
    x: Tensor,
    t: float,
    target: GaussianMixture,
    source: GaussianMixture | None = None,
    path: GaussianPath | None = None,
) -> VelocityPosterior:
    """Exact p(v | x_t = x, t), v = alpha'_t x_1 + sigma'_t x_0, independent mixtures x_0, x_1 (ch. 7, Prop 3).

    Given components (i, j), (x_t, v) is jointly Gaussian: v | x_t = x is N(m_ij + B_ij C_ij^{-1}(x - mu_ij),
    V_ij - B_ij C_ij^{-1} B_ij^T), C = alpha^2 S1 + sigma^2 S0, B = alpha' alpha S1 + sigma' sigma S0,
    V = alpha'^2 S1 + sigma'^2 S0; the pair weights are fmtoy.marginal.posterior_weights. Computed in float64.
    """
    path = CondOTPath() if path is None else path
    source = _check_models(path, target, source)
    x = check_points(x, target.dim).to(torch.float64)
    t = check_unit_time("t", t)
    tt = torch.tensor([t], dtype=torch.float64)
    a, s, da, ds = (float(v) for v in path.schedule(tt))
    s0, s1 = source.covs[:, None], target.covs[None]  # (K0, 1, d, d), (1, K1, d, d)
    m0, m1 = source.means[:, None], target.means[None]  # (K0, 1, d), (1, K1, d)
    c = a**2 * s1 + s**2 * s0
    b = da * a * s1 + ds * s * s0
    v = da**2 * s1 + ds**2 * s0
    gain = torch.linalg.solve(c, b.transpose(-1, -2)).transpose(-1, -2)  # B C^{-1} (C, B symmetric)
    covs = (v - gain @ b.transpose(-1, -2)).flatten(0, 1)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    mu = (a * m1 + s * m0).flatten(0, 1)  # (P, d)
    mean_v = (da * m1 + ds * m0).flatten(0, 1)
    gain = gain.flatten(0, 1)  # (P, d, d)
    means = mean_v + torch.einsum("pij,npj->npi", gain, x[:, None, :] - mu)
    weights = posterior_weights(x, t, path, target, source)
    return VelocityPosterior(weights, means, covs)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class VRFMConfig:
    """A VRFM (or, method="rfm", the plain RFM baseline with the same network and optimiser) training recipe.

    The paper's toy recipe (App. D.1): loss MSE + kl_weight KL with one reparametrised sample, t ~ U(0, 1),
    latent 4 (1D) / 8 (2D), KL weight 1.0 (1D) / 0.1 (2D), AdamW, lr 1e-3, batch 1000, 20k iterations:
    VRFMConfig.paper(setting). The defaults keep AdamW and batch 1000 but train 2000 iterations with lr 3e-3
    decayed to 0 by a cosine (10x fewer steps; at lr 1e-3 constant, 2000 steps leave even the RFM baseline far from
    converged). Chapter 7 trains cheaper still, to afford three seeds: 1000 steps of batch 128 at lr 6e-3.
    latent_dim / kl_weight = None take the setting's values.
    """

    setting: str = "hexagon_2d"
    method: str = "vrfm"
    latent_dim: int | None = None
    kl_weight: float | None = None
    posterior_inputs: tuple[str, ...] = POSTERIOR_INPUTS
    hidden: int = 64
    depth: int = 3
    encoder_hidden: int = 64
    encoder_depth: int = 2
    steps: int = 2000
    batch_size: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    threads: str | int | None = None

    def __post_init__(self) -> None:
        setting = get_setting(self.setting)
        check_choice("method", self.method, METHODS)
        if self.latent_dim is None:
            self.latent_dim = setting.latent_dim
        if self.kl_weight is None:
            self.kl_weight = setting.kl_weight
        check_positive_int("latent_dim", self.latent_dim)
        check_positive("kl_weight", self.kl_weight, allow_zero=True)
        self.posterior_inputs = check_posterior_inputs(self.posterior_inputs)
        for name in ("hidden", "depth", "encoder_hidden", "encoder_depth", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        resolve_device(self.device)
        check_threads(self.threads)

    @classmethod
    def paper(cls, setting: str = "hexagon_2d", **changes) -> VRFMConfig:
        """The paper's full toy recipe (App. D.1): 20k AdamW iterations, lr 1e-3, batch 1000 (opt-in: minutes)."""
        return cls(
            **{
                "setting": setting,
                "steps": 20_000,
                "batch_size": 1000,
                "lr": 1e-3,
                "lr_schedule": "constant",
                **changes,
            }
        )


def build_vrfm(config: VRFMConfig, dim: int) -> tuple[VelocityMLP, PosteriorEncoder | None]:
    """(v_theta, q_phi) for config, initialised from torch.manual_seed(config.seed) (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.method == "rfm":
            return VelocityMLP(dim=dim, hidden=config.hidden, depth=config.depth), None
        model = VelocityMLP(dim=dim, hidden=config.hidden, depth=config.depth, cond_dim=config.latent_dim)
        encoder = PosteriorEncoder(
            dim, config.latent_dim, config.encoder_hidden, config.encoder_depth, config.posterior_inputs
        )
        return model, encoder


def fit_vrfm(
    model: nn.Module,
    encoder: PosteriorEncoder | None,
    target: Distribution,
    source: Distribution,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    weight_decay: float = 0.01,
    lr_schedule: str = "constant",
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = False,
    log_every: int = 100,
    threads: str | int | None = None,
) -> FitResult:
    """Minimise vrfm_loss with AdamW over (v_theta, q_phi) by fmtoy.train.fit: x_0 ~ source, x_1 ~ target
    independently, t ~ U(0, 1). Loss parts "mse" and "kl" per step; modules "model" and "encoder" (None for RFM)."""
    draw = pair_sampler(model, target, source)
    kl_weight = check_positive("kl_weight", kl_weight, allow_zero=True)
    config = FitConfig(
        steps,
        batch_size,
        lr,
        lr_schedule,
        "adamw",
        weight_decay,
        seed=seed,
        device=device,
        threads=threads,
        log_every=log_every,
    )
    path = CondOTPath()

    def loss_fn(ctx: FitContext) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = draw(ctx)
        t = torch.rand(ctx.batch_size, generator=ctx.generator, device=ctx.device)
        out = vrfm_loss(model, encoder, x0, x1, t, kl_weight, path, generator=ctx.generator)
        return out.total, {"mse": out.mse, "kl": out.kl}

    modules = {"model": model} if encoder is None else {"model": model, "encoder": encoder}
    result = fit(modules, loss_fn, config, name="vrfm" if encoder is not None else "rfm", progress=progress)
    result.modules.setdefault("encoder", None)
    return result


def train_vrfm(config: VRFMConfig, progress: bool = False) -> FitResult:
    """Build and train the config's model (VRFM, or the RFM baseline) on its setting: the whole recipe in one call."""
    check_config(config, VRFMConfig)
    setting = get_setting(config.setting)
    model, encoder = build_vrfm(config, setting.dim)
    return run_config(fit_vrfm, config, model, encoder, setting.target, setting.source, progress=progress)


# ----------------------------------------------------------------------------------------------- evaluation over seeds
EXACT, DATA, REDRAWN = "exact u_t", "data", ", z redrawn"  # reference rows and the suffix of a z-redrawn row
EVAL_SEED, Z_SEED, FRESH_SEED = 10_000, 20_000, 30_000  # generator offsets: evaluation draws never share a stream


def eval_draws(setting: VRFMSetting, n: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(x_0 ~ source, reference ~ target), n points each, from make_generator(EVAL_SEED + seed): one seed's test set."""
    n = check_positive_int("n", n)
    g = make_generator(EVAL_SEED + seed)
    return setting.source.sample(n, g), setting.target.sample(n, g)


class EnergyToReference:
    """x -> energy_distance(x, reference) (fmtoy.metrics' unbiased U-statistic) with E|Y - Y'| computed once."""

    def __init__(self, reference: Tensor) -> None:
        self.reference = check_points(reference, name="reference").detach().double()
        if len(self.reference) < 2:
            raise ValueError(f"the reference needs at least 2 points, got {len(self.reference)}")
        self.self_term = _mean_pairwise(self.reference, self.reference, True)

    @under_policy
    def __call__(self, x: Tensor) -> float:
        """2 E|X - Y| - E|X - X'| - E|Y - Y'| for the rows of x (at least 2) against the reference."""
        x = check_points(x, self.reference.shape[1], name="x").detach().double().to(self.reference.device)
        if len(x) < 2:
            raise ValueError(f"x needs at least 2 points, got {len(x)}")
        return 2 * _mean_pairwise(x, self.reference, False) - _mean_pairwise(x, x, True) - self.self_term


def sample_scores(target: GaussianMixture, x1: Tensor, reference: Tensor | EnergyToReference) -> dict[str, float]:
    """{"ll": mean log q(x1) under the exact target (not a proper score), "ed": energy distance of x1 to reference}."""
    ed = reference(x1) if isinstance(reference, EnergyToReference) else energy_distance(x1, reference)
    return {"ll": float(target.log_prob(x1.to(torch.float64)).mean()), "ed": ed}


@torch.no_grad()
def scores_vs_nfe(
    model: Callable,
    target: GaussianMixture,
    x0: Tensor,
    reference: Tensor | EnergyToReference,
    nfes: Sequence[int],
    seed: int = 0,
    resample_z: bool = False,
) -> dict[tuple[str, int], float]:
    """{(metric, nfe): sample_scores} of sample_vrfm(model, x0, nfe), Euler, z from make_generator(Z_SEED + seed)."""
    out: dict[tuple[str, int], float] = {}
    for n in nfes:
        x1 = sample_vrfm(model, x0, n, generator=make_generator(Z_SEED + seed), resample_z=resample_z)
        out.update({(k, n): v for k, v in sample_scores(target, x1, reference).items()})
    return out


def train_and_score(
    runs: Mapping[tuple[str, str], VRFMConfig],
    seed: int,
    nfes: Sequence[int],
    n: int = 2000,
    redraw: Sequence[tuple[str, str]] = (),
    reference_rows: bool = True,
    fits: Mapping[tuple[str, str], FitResult] | None = None,
) -> tuple[dict[tuple[str, str], FitResult], dict[tuple[str, str, str, int], float]]:
    """One seed of a study: train runs {(setting, name): config} with config.seed = seed (in worker processes,
    fmtoy.workers.train_many), then score every run, the
    runs in `redraw` with z redrawn at every step (name + REDRAWN) and, if reference_rows, the exact field (EXACT,
    Euler in float64) and a fresh target sample (DATA), all on eval_draws(setting, n, seed). Returns (fits,
    {(setting, name, metric, nfe): value}), the per-seed half of fmtoy.metrics.across_seeds. `fits`: these runs,
    already trained with this seed (train_seeds), instead of training them here."""
    if fits is None:
        fits = dict(zip(runs, train_many(train_vrfm, [replace(cfg, seed=seed) for cfg in runs.values()])))
    elif set(fits) != set(runs):
        raise ValueError(f"fits must hold the runs {sorted(runs)}, got {sorted(fits)}")
    fits = dict(fits)
    scores: dict[tuple[str, str, str, int], float] = {}
    for s in dict.fromkeys(s for s, _ in runs):
        st = get_setting(s)
        x0, ref = eval_draws(st, n, seed)
        ref = EnergyToReference(ref)
        rows = {name: (fits[s, name].model, x0, False) for s2, name in runs if s2 == s}
        rows.update({name + REDRAWN: (fits[s, name].model, x0, True) for s2, name in redraw if s2 == s})
        if reference_rows:
            rows[EXACT] = (ExactField(CondOTPath(), st.target, st.source), x0.double(), False)
        for name, (model, start, again) in rows.items():
            got = scores_vs_nfe(model, st.target, start, ref, nfes, seed, resample_z=again)
            scores.update({(s, name, k, nfe): v for (k, nfe), v in got.items()})
        if reference_rows:
            fresh = sample_scores(st.target, st.target.sample(n, make_generator(FRESH_SEED + seed)), ref)
            scores.update({(s, DATA, k, nfe): v for k, v in fresh.items() for nfe in nfes})
    return fits, scores


def train_seeds(
    runs: Mapping[tuple[str, str], VRFMConfig], seeds: Sequence[int]
) -> dict[int, dict[tuple[str, str], FitResult]]:
    """{seed: {key: train_vrfm(config with that seed)}} for every run and seed, all trained side by side in worker
    processes (fmtoy.workers.train_many): the `fits` of train_and_score when a study has fewer runs than cores."""
    keys = [(seed, key) for seed in seeds for key in runs]
    done = train_many(train_vrfm, [replace(runs[key], seed=seed) for seed, key in keys])
    out: dict[int, dict[tuple[str, str], FitResult]] = {seed: {} for seed in seeds}
    for (seed, key), result in zip(keys, done):
        out[seed][key] = result
    return out


def seed_verdict(a: Spread, b: Spread, higher_is_better: bool, names: tuple[str, str] = ("A", "B")) -> str:
    """names[0] if a beats b for every seed, names[1] if b beats a for every seed, else "split" (Spread.below/above)."""
    if a.above(b) if higher_is_better else a.below(b):
        return names[0]
    if b.above(a) if higher_is_better else b.below(a):
        return names[1]
    return "split"
