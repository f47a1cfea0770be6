"""Flow matching objectives side by side (book chapter 3, FM paper Thm 2): L_FM against the exact marginal field,
L_CFM with any regression discrepancy (squared error, a Bregman divergence, L1), gradients of both, and the posterior
median field.

A *discrepancy* is a callable D(y, v) -> (n,) comparing a regression target y (n, d) with a prediction v (n, d) (not
the divergence div v of fmtoy.solvers): "l2" is ||y - v||^2 (the CFM loss), "l1" is sum_k |y_k - v_k|. Bregman
divergences D_phi(y, v) = phi(y) - phi(v) - <grad phi(v), y - v> have a v-dependent part affine in y: that is why
FM and CFM share gradients.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_paired, check_points, check_positive, check_positive_int, check_time
from ..data import Distribution, GaussianMixture
from ..device import make_generator
from ..marginal import marginal_velocity
from ..paths import GaussianPath
from ..threads import under_policy
from ..train import FitConfig, fit

Discrepancy = Callable[[Tensor, Tensor], Tensor]
Potential = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- discrepancies
def squared_error(y: Tensor, v: Tensor) -> Tensor:
    """D(y, v) = ||y - v||^2 per row (ch. 3 Eq. (L_FM)/(L_CFM)); shape (n,)."""
    return (y - v).square().sum(dim=1)


def l1_error(y: Tensor, v: Tensor) -> Tensor:
    """D(y, v) = sum_k |y_k - v_k| per row: not a Bregman divergence (its minimiser is the median); shape (n,)."""
    return (y - v).abs().sum(dim=1)


def bregman_divergence(phi: Potential) -> Discrepancy:
    """D_phi(y, v) = phi(y) - phi(v) - <grad phi(v), y - v> (ch. 3 Eq. (Bregman)); grad phi by autograd."""
    if not callable(phi):
        raise TypeError(
            f"phi must be a callable x (n, d) -> (n,) (a strictly convex potential), got {type(phi).__name__}"
        )

    def bregman(y: Tensor, v: Tensor) -> Tensor:
        track = v.requires_grad
        with torch.enable_grad():
            vv = v if track else v.detach().requires_grad_(True)
            phi_v = phi(vv)
            if not isinstance(phi_v, Tensor) or phi_v.shape != v.shape[:1]:
                raise ValueError(
                    f"phi must return one value per row, shape ({v.shape[0]},), got "
                    f"{tuple(phi_v.shape) if isinstance(phi_v, Tensor) else type(phi_v).__name__}"
                )
            (grad,) = torch.autograd.grad(phi_v.sum(), vv, create_graph=track)
        out = phi(y) - phi_v - ((y - vv) * grad).sum(dim=1)
        return out if track else out.detach()

    return bregman


def exp_potential(scale: float = 1.0) -> Potential:
    """phi(x) = s^2 sum_k exp(x_k / s): D_phi(y, v) is s^2 times the generalised KL between e^(v/s) and e^(y/s)."""
    s = check_positive("scale", scale)
    return lambda x: s * s * torch.exp(x / s).sum(dim=1)


def quadratic_potential(a: Tensor) -> Potential:
    """phi(x) = x^T A x for a symmetric positive-definite A: D_phi(y, v) = (y - v)^T A (y - v)."""
    if not isinstance(a, Tensor) or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"A must be a square matrix tensor (d, d), got "
            f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}"
        )
    if not torch.allclose(a, a.T) or torch.linalg.eigvalsh(a.double()).min() <= 0:
        raise ValueError("A must be symmetric positive-definite (phi(x) = x^T A x strictly convex)")
    return lambda x: ((x @ a.to(x.dtype)) * x).sum(dim=1)


DISCREPANCIES: dict[str, Discrepancy] = {"l2": squared_error, "l1": l1_error}


def get_discrepancy(discrepancy: str | Discrepancy) -> Discrepancy:
    """A discrepancy by name ("l2", "l1") or the callable D(y, v) -> (n,) itself."""
    if callable(discrepancy):
        return discrepancy
    return DISCREPANCIES[check_choice("discrepancy", discrepancy, DISCREPANCIES)]


# ----------------------------------------------------------------------------------------------- losses
def _predict(model: Callable[..., Tensor], x: Tensor, t: Tensor) -> Tensor:
    v = model(x, t[:, 0].expand(x.shape[0]))
    if not isinstance(v, Tensor) or v.shape != x.shape:
        raise ValueError(
            f"the model must return a tensor of shape {tuple(x.shape)}, "
            f"got {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
        )
    return v


def _check_path(path) -> GaussianPath:
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a fmtoy.paths.GaussianPath (e.g. CondOTPath()), got {type(path).__name__}")
    return path


def fm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    t: float | Tensor,
    path: GaussianPath,
    target: GaussianMixture,
    source: GaussianMixture | None = None,
    discrepancy: str | Discrepancy = "l2",
) -> Tensor:
    """L_FM = mean_i D(u_t(x_i), v(x_i, t_i)), u_t the exact marginal field (ch. 3 Eq. (L_FM), FM paper Eq. 5)."""
    x = check_points(x)
    tc = check_time(t, x.shape[0], like=x)
    div = get_discrepancy(discrepancy)
    with torch.no_grad():
        u = marginal_velocity(x, tc[:, 0].expand(x.shape[0]), _check_path(path), target, source)
    return div(u, _predict(model, x, tc)).mean()


def conditional_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    x1: Tensor,
    t: float | Tensor,
    path: GaussianPath,
    discrepancy: str | Discrepancy = "l2",
) -> Tensor:
    """mean_i D(u_t(x_t|x_1), v(x_t, t)), x_t = alpha x_1 + sigma x_0 (ch. 3 Eq. (L_CFM); "l2": FM paper Eq. 9)."""
    path, div = _check_path(path), get_discrepancy(discrepancy)
    xt = path.sample_xt(x0, x1, t)
    tc = check_time(t, xt.shape[0], like=xt)
    return div(path.target_velocity(x0, x1, tc), _predict(model, xt, tc)).mean()


def bregman_loss(
    model: Callable[..., Tensor], x0: Tensor, x1: Tensor, t: float | Tensor, path: GaussianPath, phi: Potential
) -> Tensor:
    """Bregman CFM loss mean_i D_phi(u_t(x_t|x_1), v(x_t, t)) (ch. 3 Eq. (Bregman)); same gradient as its FM form."""
    return conditional_loss(model, x0, x1, t, path, bregman_divergence(phi))


def l1_loss(model: Callable[..., Tensor], x0: Tensor, x1: Tensor, t: float | Tensor, path: GaussianPath) -> Tensor:
    """L1 CFM loss mean_i sum_k |u_t(x_t|x_1)_k - v_k(x_t, t)|: minimised by the posterior median, not the mean."""
    return conditional_loss(model, x0, x1, t, path, l1_error)


def cfm_loss_x0(
    model: Callable[..., Tensor], x0: Tensor, x1: Tensor, t: float | Tensor, sigma_min: float = 0.0
) -> Tensor:
    """CFM loss in x_0 form, FM paper Eq. (23): mean ||v(psi_t(x_0), t) - (x_1 - (1 - sigma_min) x_0)||^2."""
    s = check_positive("sigma_min", sigma_min, allow_zero=True)
    if s >= 1:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    x0, x1 = check_paired(x0, x1)
    tc = check_time(t, x0.shape[0], like=x0)
    psi = tc * x1 + (1 - (1 - s) * tc) * x0
    return squared_error(x1 - (1 - s) * x0, _predict(model, psi, tc)).mean()


# ----------------------------------------------------------------------------------------------- gradients
def loss_gradient(model: nn.Module, loss_fn: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """grad_theta loss_fn(model, *args, **kwargs), flattened over the trainable parameters (zeros where unused)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    with torch.enable_grad():
        loss = loss_fn(model, *args, **kwargs)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def compare_gradients(g: Tensor, reference: Tensor) -> dict[str, float]:
    """cosine(g, ref) = <g, ref> / (|g| |ref|) and relative error |g - ref| / |ref| of two flat gradients."""
    for name, v in (("g", g), ("reference", reference)):
        if not isinstance(v, Tensor) or v.ndim != 1:
            raise ValueError(f"{name} must be a flat (1-D) tensor, e.g. from loss_gradient")
    if g.shape != reference.shape:
        raise ValueError(f"gradients differ in size: {g.shape[0]} and {reference.shape[0]}")
    norm = reference.norm()
    if norm == 0:
        raise ValueError("the reference gradient is zero: cosine and relative error are undefined")
    g, reference = g.double(), reference.double()
    cos = torch.dot(g, reference) / (g.norm() * reference.norm()).clamp_min(1e-300)
    return {"cosine": float(cos), "rel_error": float((g - reference).norm() / reference.norm())}


def _draw(
    path: GaussianPath, target: Distribution, n: int, t: float | None, gen: torch.Generator, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(x0, x1, t): x0 ~ N(0, I), x1 ~ q, t ~ U[t_min, t_max] (or the fixed t)."""
    x1 = target.sample(n, generator=gen).to(dtype)
    x0 = torch.randn(n, target.dim, generator=gen).to(dtype)
    if t is None:
        tt = torch.rand(n, generator=gen).to(dtype) * (path.t_max - path.t_min) + path.t_min
    else:
        tt = torch.full((n,), float(t), dtype=dtype)
    return x0, x1, tt


@under_policy
def gradient_agreement(
    model: nn.Module,
    path: GaussianPath,
    target: GaussianMixture,
    batch_sizes: list[int],
    repeats: int = 8,
    t: float | None = None,
    discrepancy: str | Discrepancy = "l2",
    reference_size: int = 1 << 15,
    seed: int = 0,
) -> dict[str, list[float] | float]:
    """Minibatch FM and CFM gradients vs a large-batch FM reference (ch. 3, Thm 2): mean and std over repeats.

    Per batch size n: cosine and relative error of `repeats` independent estimates g_CFM(n), g_FM(n) against the
    reference grad L_FM on `reference_size` samples, plus the repeat-averaged g_CFM (an n * repeats sample).
    Also `ref_cosine` / `ref_rel_error`: g_CFM vs g_FM on the same reference batch. t=None draws t ~ U[t_min, t_max].
    """
    path = _check_path(path)
    repeats, reference_size = (
        check_positive_int("repeats", repeats),
        check_positive_int("reference_size", reference_size),
    )
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
    if t is not None:
        t = float(check_time(t)[0, 0])
        if not path.t_min <= t <= path.t_max:
            raise ValueError(f"t must lie in [{path.t_min}, {path.t_max}] for path {path.name!r}, got {t}")
    dtype = next(model.parameters()).dtype
    gen = make_generator(seed)

    def grads(n: int) -> tuple[Tensor, Tensor]:
        x0, x1, tt = _draw(path, target, n, t, gen, dtype)
        g_cfm = loss_gradient(model, conditional_loss, x0, x1, tt, path, discrepancy)
        g_fm = loss_gradient(model, fm_loss, path.sample_xt(x0, x1, tt), tt, path, target, discrepancy=discrepancy)
        return g_cfm, g_fm

    ref_cfm, ref = grads(reference_size)
    out: dict[str, list[float] | float] = {"batch_sizes": list(batch_sizes), **compare_gradients(ref_cfm, ref)}
    out["ref_cosine"], out["ref_rel_error"] = out.pop("cosine"), out.pop("rel_error")
    keys = [f"{s}_{k}" for k in ("cfm", "fm") for s in ("cos", "cos_std", "rel", "rel_std")] + [
        "cos_cfm_mean",
        "rel_cfm_mean",
    ]
    out.update({k: [] for k in keys})
    for n in batch_sizes:
        pairs = [grads(n) for _ in range(repeats)]
        for k, col in (("cfm", 0), ("fm", 1)):
            stats = [compare_gradients(p[col], ref) for p in pairs]
            for name, field in (("cos", "cosine"), ("rel", "rel_error")):
                vals = torch.tensor([s[field] for s in stats], dtype=torch.float64)
                out[f"{name}_{k}"].append(float(vals.mean()))
                out[f"{name}_std_{k}"].append(float(vals.std()) if repeats > 1 else 0.0)
        mean = compare_gradients(torch.stack([p[0] for p in pairs]).mean(0), ref)
        out["cos_cfm_mean"].append(mean["cosine"])
        out["rel_cfm_mean"].append(mean["rel_error"])
    return out


# ----------------------------------------------------------------------------------------------- training with logs
def train_logged(
    model: nn.Module,
    path: GaussianPath,
    target: GaussianMixture,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    discrepancy: str | Discrepancy = "l2",
    seed: int = 0,
    eval_size: int = 0,
    eval_every: int = 10,
    snapshot_every: int = 0,
    snapshot_noise: Tensor | None = None,
    snapshot_steps: int = 16,
    lr_schedule: str = "constant",
    threads: str | int | None = None,
) -> dict:
    """fmtoy.train.fit (Adam, constant lr by default) on the conditional loss with `discrepancy`, logging L_FM and
    L_CFM on a fixed evaluation batch.

    Returns {"step", "fm", "cfm"} (logged every eval_every steps, step 0 included, if eval_size > 0), "constant" =
    mean(||u||^2 - ||target||^2) on the evaluation batch (the theta-free part of L_FM - L_CFM for "l2", ch. 3),
    and "snapshots": [(step, samples)] with samples = Euler(snapshot_steps) flow of snapshot_noise.
    """
    path = _check_path(path)
    steps, batch_size = check_positive_int("steps", steps), check_positive_int("batch_size", batch_size)
    eval_every, snapshot_steps = (
        check_positive_int("eval_every", eval_every),
        check_positive_int("snapshot_steps", snapshot_steps),
    )
    lr = check_positive("lr", lr)
    if isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 0:
        raise ValueError(f"eval_size must be an integer >= 0 (0: no evaluation), got {eval_size!r}")
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 0:
        raise ValueError(f"snapshot_every must be an integer >= 0 (0: no snapshots), got {snapshot_every!r}")
    if snapshot_every and snapshot_noise is None:
        raise ValueError("snapshot_every > 0 needs snapshot_noise, the x_0 points (m, d) to push through the flow")
    from ..solvers import integrate

    div = get_discrepancy(discrepancy)
    dtype = next(model.parameters()).dtype
    log: dict = {"step": [], "fm": [], "cfm": [], "constant": math.nan, "snapshots": []}
    if eval_size:
        e0, e1, et = _draw(path, target, eval_size, None, make_generator(seed + 10_000), dtype)
        ex, ey = path.sample_xt(e0, e1, et), path.target_velocity(e0, e1, et)
        eu = marginal_velocity(ex, et, path, target)
        log["constant"] = float((eu.square().sum(1) - ey.square().sum(1)).mean())

    def record(step: int) -> None:
        if eval_size and step % eval_every == 0:
            with torch.no_grad():
                v = model(ex, et)
                log["step"].append(step)
                log["fm"].append(float(div(eu, v).mean()))
                log["cfm"].append(float(div(ey, v).mean()))
        if snapshot_every and step % snapshot_every == 0:
            log["snapshots"].append((step, integrate(model, snapshot_noise.to(dtype), snapshot_steps)))

    def loss_fn(ctx) -> Tensor:
        x0, x1, t = _draw(path, target, ctx.batch_size, None, ctx.generator, dtype)
        return conditional_loss(model, x0, x1, t, path, div)

    config = FitConfig(steps, batch_size, lr, lr_schedule, seed=seed, device="cpu", threads=threads)
    log["losses"] = fit(model, loss_fn, config, name="train_logged", callback=record).losses
    return log


# ----------------------------------------------------------------------------------------------- median field
def x1_posterior(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Posterior of x_1 given x_t = x (x_0 ~ N(0, I), q = sum_j b_j N(m_j, s_j I)), ch. 3: a Gaussian mixture.

    Returns (w (n, K), means (n, K, d), variances (T, K, 1), c, r), T = 1 or n, with u_t(x|x_1) = c x_1 + r x
    (c = alpha' - sigma' alpha / sigma, r = sigma' / sigma, shapes (T, 1)); all float64.
    """
    path = _check_path(path)
    if not isinstance(target, GaussianMixture):
        raise TypeError(f"target must be a fmtoy.data.GaussianMixture, got {type(target).__name__}")
    x = check_points(x, target.dim).double()
    tc = check_time(t, x.shape[0], like=x)
    if (tc > path.t_max).any() or (tc < path.t_min).any():
        raise ValueError(f"t must lie in [{path.t_min}, {path.t_max}] for path {path.name!r}")
    s = target.covs[:, 0, 0]
    if not torch.equal(target.covs, s[:, None, None] * torch.eye(target.dim, dtype=target.covs.dtype)):
        raise ValueError("the posterior median field needs isotropic target components (covs[k] = s_k I)")
    al, sg, dal, dsg = path.schedule(tc)  # (T, 1)
    if (sg <= 0).any():
        raise ValueError("sigma_t = 0 at some t: u_t(x|x_1) is singular there")
    c, r = dal - dsg * al / sg, dsg / sg
    s, m = s[None, :], target.means[None]  # (1, K), (1, K, d)
    var_x = al**2 * s + sg**2  # (T, K): x_t | j ~ N(al m_j, var_x I)
    gain = (al * s / var_x)[..., None]  # (T, K, 1)
    resid = x[:, None, :] - al[..., None] * m  # (n, K, d)
    logw = target.weights.log()[None] - 0.5 * (resid.square().sum(-1) / var_x + target.dim * var_x.log())
    w = torch.softmax(logw, dim=1)
    return w, m + gain * resid, (s * sg**2 / var_x)[..., None], c, r


def _mixture_median(w: Tensor, mu: Tensor, var: Tensor, iters: int = 80) -> Tensor:
    """Coordinatewise median of sum_j w_j N(mu_j, var_j) (w (n, K), mu (n, K, d), var (., K, 1)) by bisection."""
    sd = var.clamp_min(1e-24).sqrt()
    lo = (mu - 12 * sd).amin(1) - 1.0
    hi = (mu + 12 * sd).amax(1) + 1.0
    normal = torch.distributions.Normal(0.0, 1.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cdf = (w[..., None] * normal.cdf((mid[:, None, :] - mu) / sd)).sum(1)
        below = cdf < 0.5
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def posterior_median_velocity(x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture) -> Tensor:
    """Coordinatewise median of u_t(x|x_1) over x_1 ~ p(x_1|x_t = x): the minimiser of the L1 loss (ch. 3)."""
    w, mu, var, c, r = x1_posterior(x, t, path, target)
    return (c * _mixture_median(w, mu, var) + r * x.double()).to(x.dtype)


def posterior_mean_velocity(x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture) -> Tensor:
    """E[u_t(x|x_1) | x_t = x] = c E[x_1 | x] + r x: Theorem 1's field, via the same posterior (cross-check)."""
    w, mu, _, c, r = x1_posterior(x, t, path, target)
    return (c * (w[..., None] * mu).sum(1) + r * x.double()).to(x.dtype)


__all__ = [
    "squared_error",
    "l1_error",
    "bregman_divergence",
    "exp_potential",
    "quadratic_potential",
    "DISCREPANCIES",
    "get_discrepancy",
    "fm_loss",
    "conditional_loss",
    "bregman_loss",
    "l1_loss",
    "cfm_loss_x0",
    "loss_gradient",
    "compare_gradients",
    "gradient_agreement",
    "train_logged",
    "posterior_median_velocity",
    "posterior_mean_velocity",
    "x1_posterior",
]
