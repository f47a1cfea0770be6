"""Conditioning and guidance (chapter 8): the exact class-conditional field, the velocity-score conversion, the exact
classifier p_t(c | x), classifier guidance and classifier-free guidance (CFG), the tilted target CFG is said to
sample, and a class-conditional network trained with label dropout on the one training loop (fmtoy.train.fit).

Everything exact is for a LabelledMixture target and a N(0, I) source along an affine Gaussian path
x_t = alpha_t x_1 + sigma_t x_0. Then (Tweedie) E[x_0 | x_t = x] = -sigma_t grad log p_t(x), so
    u_t(x) = a_t x + b_t grad log p_t(x),  a_t = alpha'/alpha,  b_t = sigma^2 alpha'/alpha - sigma sigma',
and the same with p_t(x | c) for the class-conditional field u_t(x | c) (FM Theorem 1 for the mixture q(x | c)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_points, check_positive, check_positive_int, check_time
from ..data import LabelledMixture, StandardNormal, get_dataset
from ..marginal import _schedule, marginal_log_prob, marginal_velocity, posterior_weights
from ..models import VelocityMLP
from ..paths import GaussianPath, get_path
from ..solvers import integrate, log_likelihood
from ..threads import under_policy
from ..train import FitContext, FitResult, RecipeConfig, build_model, check_config, fit, fit_options, run_config


def _check_target(target: LabelledMixture) -> LabelledMixture:
    if not isinstance(target, LabelledMixture):
        raise TypeError(
            f"target must be a fmtoy.data.LabelledMixture (e.g. fmtoy.data.labelled_gaussians()), got "
            f"{type(target).__name__}"
        )
    return target


def check_weight(w: float) -> float:
    """A finite guidance weight w (any sign: w = 0 is unconditional, w = 1 conditional, w > 1 guided)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"the guidance weight w must be a finite number (0: unconditional, 1: conditional), got {w!r}")
    return float(w)


# ----------------------------------------------------------------------------------------------- velocity and score
def score_coefficients(path: GaussianPath, t: float | Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, b_t) with u_t(x) = a_t x + b_t grad log p_t(x): a = alpha'/alpha, b = sigma (alpha' sigma/alpha - sigma')
    (chapter 8, eq-ch8-velocity-score); t in (0, 1] where alpha_t > 0."""
    t = check_time(t, like=torch.zeros((), dtype=torch.float64))
    al, sg, dal, dsg = _schedule(path, t)
    if (al <= 0).any():
        raise ValueError(f"alpha_t = 0 at t = {t.min().item():.6g}: the conversion needs alpha_t > 0 (t > 0)")
    a = dal / al
    return a, sg * (a * sg - dsg)


def score_from_velocity(u: Tensor, x: Tensor, t: float | Tensor, path: GaussianPath) -> Tensor:
    """grad log p_t(x) = (u_t(x) - a_t x) / b_t, the inverse of velocity_from_score."""
    a, b = (v.to(x) for v in score_coefficients(path, t))
    return (u - a * x) / b


def velocity_from_score(score: Tensor, x: Tensor, t: float | Tensor, path: GaussianPath) -> Tensor:
    """u_t(x) = a_t x + b_t grad log p_t(x) (eq-ch8-velocity-score)."""
    a, b = (v.to(x) for v in score_coefficients(path, t))
    return a * x + b * score


# ----------------------------------------------------------------------------------------------- exact fields
def conditional_velocity(x: Tensor, t: float | Tensor, path: GaussianPath, target: LabelledMixture, c: int) -> Tensor:
    """u_t(x | c): FM Theorem 1 for the class's mixture q(x | c) (eq-ch8-conditional-field); shape (n, d)."""
    return marginal_velocity(x, t, path, _check_target(target).conditional(c))


def conditional_log_prob(x: Tensor, t: float | Tensor, path: GaussianPath, target: LabelledMixture, c: int) -> Tensor:
    """log p_t(x | c), the marginal path of q(x | c) (FM Eq. 6 per class); shape (n,)."""
    return marginal_log_prob(x, t, path, _check_target(target).conditional(c))


def class_posterior(x: Tensor, t: float | Tensor, path: GaussianPath, target: LabelledMixture) -> Tensor:
    """The exact classifier p_t(c | x) = p_t(x | c) p(c) / p_t(x) (eq-ch8-classifier), shape (n, C): the posterior
    responsibilities of the components, summed per class."""
    target = _check_target(target)
    w = posterior_weights(x, t, path, target)  # (n, K) for the one-component N(0, I) source
    return torch.zeros(w.shape[0], target.n_classes, dtype=w.dtype, device=w.device).index_add_(
        1, target.labels.to(w.device), w
    )


def cfg_velocity(x: Tensor, t: float | Tensor, path: GaussianPath, target: LabelledMixture, c: int, w: float) -> Tensor:
    """u^w_t(x | c) = (1 - w) u_t(x) + w u_t(x | c): classifier-free guidance with the exact fields (eq-ch8-cfg)."""
    w = check_weight(w)
    return (1.0 - w) * marginal_velocity(x, t, path, _check_target(target)) + w * conditional_velocity(
        x, t, path, target, c
    )


@under_policy
def classifier_guidance_velocity(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: LabelledMixture, c: int, w: float
) -> Tensor:
    """u_t(x) + w b_t grad log p_t(c | x) (eq-ch8-classifier-guidance), the classifier's gradient by autograd of
    log p_t(x | c) + log p(c) - log p_t(x): computed without the conditional field."""
    target, w = _check_target(target), check_weight(w)
    x = check_points(x, target.dim)
    with torch.enable_grad():
        xg = x.detach().double().requires_grad_(True)
        log_cls = conditional_log_prob(xg, t, path, target, c) - marginal_log_prob(xg, t, path, target)
        (grad,) = torch.autograd.grad(log_cls.sum(), xg)
    _, b = score_coefficients(path, t)
    return (marginal_velocity(x, t, path, target) + w * (b.to(grad) * grad).to(x.dtype)).detach()


class GuidedField:
    """The exact CFG field v(x, t) = u^w_t(x | c) for a solver, with guidance only for t in `interval` (elsewhere
    w = 1: the conditional field); interval (0, 1) guides everywhere."""

    def __init__(
        self,
        target: LabelledMixture,
        c: int,
        w: float,
        path: GaussianPath | None = None,
        interval: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.target, self.path = _check_target(target), get_path("ot") if path is None else path
        self.c, self.w, self.interval = target.check_class(c), check_weight(w), check_interval(interval)

    def weight_at(self, t: float | Tensor) -> float:
        """w inside the guidance interval, 1 outside."""
        return weight_at(t, self.w, self.interval)

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        return cfg_velocity(x, t, self.path, self.target, self.c, self.weight_at(t))

    def __repr__(self) -> str:
        return f"GuidedField(c={self.c}, w={self.w:g}, interval={self.interval}, target={self.target!r})"


def weight_at(t: float | Tensor, w: float, interval: tuple[float, float]) -> float:
    """The guidance weight at time t (a float, or a solver's time vector: its first entry): w inside, 1 outside"""
    t0 = float(t) if not isinstance(t, Tensor) else float(t.reshape(-1)[0])
    return w if interval[0] <= t0 <= interval[1] else 1.0


def check_interval(interval: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi <= 1: where in time guidance is applied."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be two numbers (lo, hi) with 0 <= lo < hi <= 1, got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"interval must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return lo, hi


# ----------------------------------------------------------------------------------------------- the tilted target
def tilted_log_density(x: Tensor, target: LabelledMixture, c: int, w: float) -> Tensor:
    """w log q(x | c) + (1 - w) log q(x): the unnormalised log of the tilted target q(x | c)^w q(x)^(1 - w)
    (eq-ch8-tilt)."""
    target, w = _check_target(target), check_weight(w)
    return w * target.conditional(c).log_prob(x) + (1.0 - w) * target.log_prob(x)


def grid(lim: float = 6.0, n: int = 120) -> tuple[Tensor, float]:
    """Cell centres of an n x n grid on [-lim, lim]^2 (float64, row-major, y outer) and the cell area."""
    lim, n = check_positive("lim", lim), check_positive_int("n", n)
    h = 2 * lim / n
    c = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), h * h


def normalise_on_grid(log_density: Tensor, area: float) -> tuple[Tensor, float]:
    """(log density - log Z, log Z) with Z = sum exp(log_density) * area (midpoint rule on the grid)."""
    log_z = float(torch.logsumexp(log_density.double(), 0)) + math.log(area)
    return log_density - log_z, log_z


def grid_kl(log_p: Tensor, log_q: Tensor, area: float) -> float:
    """KL(p || q) = sum p (log p - log q) area on a grid (both normalised log densities)."""
    log_p, log_q = log_p.double(), log_q.double()
    return float((log_p.exp() * (log_p - log_q)).sum() * area)


@under_policy
def flow_log_density(field: Callable, x: Tensor, steps: int = 32, method: str = "rk4") -> Tensor:
    """log of the density the ODE dx/dt = field(x, t) carries N(0, I) to, at the points x (instantaneous change of
    variables, backwards from t = 1, exact divergence): what the guided sampler actually samples."""
    x = check_points(x).double()
    return log_likelihood(field, x, StandardNormal(x.shape[1]), steps=steps, method=method)


@dataclass
class SampleKL:
    """KL(p || r) estimated from samples x ~ p with exact log p and log r: the mean of log p - log r, its standard
    error, and the sample size."""

    kl: float
    se: float
    n: int

    def above(self, sds: float = 5.0) -> bool:
        """True if the estimate is more than `sds` standard errors above 0: the sample size cannot explain it."""
        return self.kl > sds * self.se


def sample_kl(log_p: Tensor, log_r: Tensor) -> SampleKL:
    """SampleKL from log p(x_i) and log r(x_i) at samples x_i ~ p."""
    diff = (log_p.double() - log_r.double()).reshape(-1)
    if diff.numel() < 2:
        raise ValueError(f"sample_kl needs at least 2 samples, got {diff.numel()}")
    return SampleKL(float(diff.mean()), float(diff.std() / math.sqrt(diff.numel())), diff.numel())


# ----------------------------------------------------------------------------------------------- what w buys
@torch.no_grad()
def guidance_scores(x: Tensor, target: LabelledMixture, c: int, sds: float = 3.0) -> dict[str, float]:
    """Of samples x meant for class c: "purity", the mean exact classifier q(c | x) on the data; "in modes", the
    fraction within `sds` standard deviations (Mahalanobis) of a component of class c; "coverage", the fraction of
    class c's components holding at least half the samples q(x | c) puts within `sds` of them."""
    target = _check_target(target)
    x = check_points(x, target.dim).double()
    log_cls = target.class_log_probs(x) + target.class_prior.log()
    post = (log_cls - torch.logsumexp(log_cls, 1, keepdim=True)).exp()[:, target.check_class(c)]
    cond = target.conditional(c)
    diff = x[:, None, :] - cond.means[None]
    maha = torch.einsum("nki,kij,nkj->nk", diff, torch.linalg.inv(cond.covs), diff)
    near = maha < sds**2  # (n, K_c)
    share = near.double().mean(0)  # fraction of samples within sds of each component
    inside = torch.special.gammainc(torch.tensor(target.dim / 2, dtype=torch.float64), torch.tensor(sds**2 / 2.0))
    expected = cond.weights * inside  # P(chi^2_d < sds^2); in 2D 1 - exp(-sds^2 / 2)
    return {
        "purity": float(post.mean()),
        "in modes": float(near.any(1).double().mean()),
        "coverage": float((share >= 0.5 * expected).double().mean()),
    }


# ----------------------------------------------------------------------------------------------- the network
class ClassConditionalMLP(nn.Module):
    """v_theta(x, t, c): a VelocityMLP whose conditioning input is a learned embedding e(c) of the class, with one
    extra "null" class C (index n_classes) for the unconditional field v_theta(x, t, null)."""

    def __init__(self, n_classes: int, dim: int = 2, hidden: int = 128, depth: int = 3, embed_dim: int = 16) -> None:
        super().__init__()
        self.n_classes, self.dim = check_positive_int("n_classes", n_classes), check_positive_int("dim", dim)
        self.embed = nn.Embedding(n_classes + 1, check_positive_int("embed_dim", embed_dim))
        self.net = VelocityMLP(dim=dim, hidden=hidden, depth=depth, cond_dim=embed_dim)

    @property
    def null(self) -> int:
        """The index of the null (unconditional) class."""
        return self.n_classes

    def _labels(self, c: int | Tensor | None, n: int, device: torch.device) -> Tensor:
        if c is None:
            c = self.null
        if isinstance(c, bool) or not isinstance(c, (int, Tensor)):
            raise TypeError(f"c must be a class index (int), a tensor of them, or None (unconditional), got {c!r}")
        c = torch.as_tensor(c, device=device)
        if c.dtype.is_floating_point or c.ndim > 1 or (c.ndim == 1 and c.shape[0] not in (1, n)):
            raise ValueError(f"c must be an int or an integer tensor of shape (n,) with n = {n}, got {c!r}")
        if ((c < 0) | (c > self.null)).any():
            raise ValueError(f"class indices must lie in [0, {self.null}] ({self.null}: the null class), got {c}")
        return c.reshape(-1).expand(n)

    def forward(self, x: Tensor, t: float | Tensor, c: int | Tensor | None = None) -> Tensor:
        """v_theta(x, t, c), shape (n, dim); c None is the null class (the unconditional field)."""
        x = check_points(x, self.dim)
        return self.net(x, t, self.embed(self._labels(c, x.shape[0], x.device)))

    def guided(
        self, c: int, w: float, interval: tuple[float, float] = (0.0, 1.0)
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The learned CFG field (1 - w) v(x, t, null) + w v(x, t, c) (w = 1 inside `interval` only), one forward pass
        of 2n rows."""
        c, w, interval = int(self._labels(c, 1, torch.device("cpu"))[0]), check_weight(w), check_interval(interval)

        def field(x: Tensor, t: float | Tensor) -> Tensor:
            n = x.shape[0]
            wt = weight_at(t, w, interval)
            if wt == 1.0:
                return self(x, t, c)
            tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
            tt = tt.expand(n) if tt.numel() == 1 else tt
            labels = torch.cat([torch.full((n,), self.null), torch.full((n,), c)]).to(x.device)
            v = self(torch.cat([x, x]), torch.cat([tt, tt]), labels)
            return (1.0 - wt) * v[:n] + wt * v[n:]

        return field


def cfg_training_loss(
    model: ClassConditionalMLP,
    path: GaussianPath,
    x0: Tensor,
    x1: Tensor,
    labels: Tensor,
    t: Tensor,
    p_uncond: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CFM loss with label dropout: each label is replaced by the null class with probability p_uncond, so one network
    learns u_t(x | c) and u_t(x) (Ho & Salimans 2022); FM Eq. (9) per pair."""
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < p_uncond
    cond = torch.where(drop, torch.full_like(labels, model.null), labels)
    s = path.schedule(t[:, None], check=False)
    xt = s.alpha_t * x1 + s.sigma_t * x0
    target = s.d_alpha_t * x1 + s.d_sigma_t * x0
    return (model(xt, t, cond) - target).square().sum(1).mean()


def fit_guidance(
    model: ClassConditionalMLP,
    path: GaussianPath,
    target: LabelledMixture,
    *,
    p_uncond: float = 0.2,
    progress: bool = False,
    **options,
) -> FitResult:
    """Train v_theta(x, t, c) with cfg_training_loss on fmtoy.train.fit: (x_1, c) ~ q(x, c), x_0 ~ N(0, I),
    t ~ U[path.t_min, path.t_max]; options are fit's (steps, batch_size, lr, seed, ...)."""
    target = _check_target(target)
    if not isinstance(model, ClassConditionalMLP):
        raise TypeError(f"model must be a ClassConditionalMLP, got {type(model).__name__}")
    if model.n_classes != target.n_classes:
        raise ValueError(f"the model has {model.n_classes} classes, the target {target.n_classes}")
    p_uncond = check_probability("p_uncond", p_uncond)
    source = StandardNormal(target.dim)
    t_min, t_max = float(path.t_min), float(path.t_max)  # where the path's fields are finite (fmtoy.paths)
    config = fit_options(options, steps=2000, batch_size=256, lr=3e-3)

    def loss_fn(ctx: FitContext) -> Tensor:
        x1, c = target.sample_labelled(ctx.batch_size, ctx.generator, ctx.device)
        x0 = source.sample(ctx.batch_size, ctx.generator, ctx.device)
        t = torch.rand(ctx.batch_size, generator=ctx.generator, device=ctx.device).mul_(t_max - t_min).add_(t_min)
        return cfg_training_loss(model, path, x0, x1, c, t, p_uncond, ctx.generator)

    return fit(model, loss_fn, config, name="guidance", progress=progress)


def check_probability(name: str, p: float) -> float:
    """A number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


@dataclass
class GuidanceConfig(RecipeConfig):
    """A class-conditional CFM run with label dropout: a labelled data set, p_uncond and the recipe's fields."""

    data: str = "labelled_gaussians"
    p_uncond: float = 0.2
    path: str = "ot"
    embed_dim: int = 16
    steps: int = 2000
    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(get_dataset(self.data), LabelledMixture):
            raise ValueError(
                f"data must be a labelled data set (a LabelledMixture, e.g. 'labelled_gaussians'), got {self.data!r}"
            )
        check_probability("p_uncond", self.p_uncond)
        check_choice("path", self.path, ("ot", "vp", "ve"))
        check_positive_int("embed_dim", self.embed_dim)


def train_guidance(config: GuidanceConfig, progress: bool = False) -> FitResult:
    """Build and train the class-conditional network of `config` (chapter 8's recipe)."""
    check_config(config, GuidanceConfig)
    target = get_dataset(config.data)
    model = build_model(config, target.dim, ClassConditionalMLP, n_classes=target.n_classes, embed_dim=config.embed_dim)
    return run_config(fit_guidance, config, model, get_path(config.path), target, progress=progress)


def sample_guided(field: Callable, z: Tensor, steps: int = 32, method: str = "midpoint") -> Tensor:
    """x_1 = the ODE solution of a guided field from the noise z (t = 0 to 1)."""
    return integrate(field, z, steps, method)
