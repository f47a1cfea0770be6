"""Closed-form marginal path p_t, marginal field u_t and score grad log p_t for Gaussian-mixture source and target
(the ground truth).

Independent coupling x_0 ~ p = sum_i a_i N(m0_i, S0_i), x_1 ~ q = sum_j b_j N(m1_j, S1_j) (S1_j = 0 allowed:
GaussianMixture.from_points), any GaussianPath x_t = alpha_t x_1 + sigma_t x_0. Given the pair (i, j),
    x_t ~ N(mu_ij, C_ij),  mu_ij = alpha m1_j + sigma m0_i,  C_ij = alpha^2 S1_j + sigma^2 S0_i,
and the velocity xdot = alpha' x_1 + sigma' x_0 is jointly Gaussian with x_t (cross-covariance
D_ij = alpha alpha' S1_j + sigma sigma' S0_i), so by Gaussian conditioning
    E[xdot | x_t = x, i, j] = alpha' m1_j + sigma' m0_i + D_ij C_ij^{-1} (x - mu_ij),
    p_t(x) = sum_ij a_i b_j N(x; mu_ij, C_ij),   u_t(x) = sum_ij w_ij(x) E[xdot | x_t = x, i, j],
with posterior responsibilities w_ij(x) = a_i b_j N(x; mu_ij, C_ij) / p_t(x). For the source N(0, I) this is
exactly Theorem 1 of the FM paper (Eq. 8): u_t(x) = E_{x_1 ~ q}[u_t(x|x_1) p_t(x|x_1)] / p_t(x), the
posterior average of the conditional fields of Thm 3, with p_t(x) = E_{x_1 ~ q} p_t(x|x_1) (Eq. 6).

Everything is computed in float64 (results are returned in the input dtype), vectorised over points and all
K_src x K_tgt component pairs (rows are processed in chunks to bound memory); isotropic covariances (S = s I, incl.
point masses) take a scalar fast path. Component pairs are flattened source-major: index i * K_tgt + j.
Where C_ij is singular (a point-mass target at t = 1 with sigma_1 = 0) p_t has no density: ValueError.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._checks import check_points, check_time
from .data import GaussianMixture, StandardNormal, get_dataset
from .paths import CondOTPath, GaussianPath
from .threads import under_policy

LOG_2PI = math.log(2 * math.pi)
_CHUNK = 1 << 21  # max elements of a (rows, K_src, K_tgt) temporary (times d * d on the general path)


def _check_models(path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None) -> GaussianMixture:
    """Validate the path and the two mixtures; return the source (default N(0, I))."""
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a fmtoy.paths.GaussianPath (e.g. CondOTPath()), got {type(path).__name__}")
    for role, dist in (("target", target), ("source", source)):
        if dist is not None and not isinstance(dist, GaussianMixture):
            raise TypeError(
                f"{role} must be a fmtoy.data.GaussianMixture (the closed form exists only for Gaussian "
                f"mixtures, incl. GaussianMixture.from_points), got {type(dist).__name__}"
            )
    if target is None:
        raise TypeError("target must be a fmtoy.data.GaussianMixture, got None")
    source = StandardNormal(target.dim) if source is None else source
    if source.dim != target.dim:
        raise ValueError(f"source and target must have the same dimension, got {source.dim} and {target.dim}")
    return source


def _schedule(path: GaussianPath, t: Tensor) -> list[Tensor]:
    """[alpha, sigma, alpha', sigma'] at t; ValueError where one is not finite (t beyond path.t_max)."""
    out = list(path.schedule(t))
    for k, v in zip(("alpha", "sigma", "d_alpha", "d_sigma"), out):
        if not torch.isfinite(v).all():
            raise ValueError(
                f"path {path.name!r}: {k}_t is not finite at some t in [{t.min().item():.6g}, "
                f"{t.max().item():.6g}]; evaluate the marginal for t in [{path.t_min}, {path.t_max}]"
            )
    return out


def _singular(t: Tensor, path: GaussianPath) -> ValueError:
    return ValueError(
        f"p_t has no density at t = {t.max().item():.6g}: some C_ij = alpha_t^2 S1_j + sigma_t^2 S0_i "
        f"is singular (a point-mass target, e.g. from_points, where sigma_t = 0 such as t = 1 with "
        f"sigma_min = 0); use t in [{path.t_min}, {path.t_max}], sigma_min > 0, or a target with "
        "positive covariances"
    )


def _isotropic(covs: Tensor) -> Tensor | None:
    """The scales s_k if every covs[k] = s_k I exactly (point masses included), else None."""
    s = covs[:, 0, 0]
    return s if torch.equal(covs, s[:, None, None] * torch.eye(covs.shape[1], dtype=covs.dtype)) else None


def _contract(w: Tensor, m: Tensor) -> Tensor:
    """w @ m for (n, K) x (K, d); small products as a broadcast sum (tiny float64 BLAS calls stall on a busy CPU)."""
    return w @ m if w.numel() > 1 << 16 else (w[:, :, None] * m).sum(1)


def _pairs(
    x: Tensor,
    t: Tensor,
    path: GaussianPath,
    target: GaussianMixture,
    source: GaussianMixture,
    force_general: bool = False,
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """logits (n, K0, K1) = log a_i b_j N(x; mu_ij, C_ij) in float64, and w -> sum_ij w_ij E[xdot | x_t = x, i, j]."""
    dev, d = x.device, x.shape[1]
    a, m0, S0 = (v.to(dev) for v in (source.weights, source.means, source.covs))
    b, m1, S1 = (v.to(dev) for v in (target.weights, target.means, target.covs))
    s0, s1 = _isotropic(source.covs), _isotropic(target.covs)
    al, sg, dal, dsg = (v[:, :, None] for v in _schedule(path, t))  # (T, 1, 1), T = 1 or n
    log_ab = a.log()[:, None] + b.log()[None, :]
    if s0 is not None and s1 is not None and not force_general:  # C_ij = c_ij I, D_ij = e_ij I
        s0, s1 = s0.to(dev)[None, :, None], s1.to(dev)[None, None, :]
        c = al**2 * s1 + sg**2 * s0
        if (c <= 0).any():
            raise _singular(t, path)
        r = (al * dal * s1 + sg * dsg * s0) / c  # D C^{-1} = r_ij I
        quad = sum((x[:, k, None, None] - (al * m1[:, k] + sg * m0[:, k, None])) ** 2 for k in range(d))
        logits = torch.addcmul(log_ab - 0.5 * d * (c.log() + LOG_2PI), quad, -0.5 / c)

        def velocity(w: Tensor) -> Tensor:  # sum_ij w_ij [r x + (alpha' - r alpha) m1_j + (sigma' - r sigma) m0_i]
            if r.shape[0] == 1:  # one time for all rows: one (n, K) x (K, d + 1) product
                base = (dal - r * al)[0, :, :, None] * m1 + (dsg - r * sg)[0, :, :, None] * m0[:, None]
                out = _contract(w.flatten(1), torch.cat([base, r[0, :, :, None]], -1).flatten(0, 1))
                return out[:, -1:] * x + out[:, :-1]
            wr = w * r
            return (
                wr.sum((1, 2))[:, None] * x
                + _contract((w * dal - wr * al).sum(1), m1)
                + _contract((w * dsg - wr * sg).sum(2), m0)
            )

        def score(w: Tensor) -> Tensor:  # sum_ij w_ij (mu_ij - x) / c_ij
            wc = w / c
            return -wc.sum((1, 2))[:, None] * x + _contract((wc * al).sum(1), m1) + _contract((wc * sg).sum(2), m0)

        return logits, velocity, score
    al, sg, dal, dsg = (v[..., None, None] for v in (al, sg, dal, dsg))  # (T, 1, 1, 1, 1)
    mu = (al * m1[None, None, :, :, None] + sg * m0[None, :, None, :, None])[..., 0]  # (T, K0, K1, d)
    resid = x[:, None, None, :] - mu  # (n, K0, K1, d)
    S0, S1 = S0[None, :, None], S1[None, None, :]
    chol, info = torch.linalg.cholesky_ex(al**2 * S1 + sg**2 * S0)  # (T, K0, K1, d, d)
    if (info != 0).any():
        raise _singular(t, path)
    prec_r = torch.cholesky_solve(resid[..., None], chol)  # C^{-1} (x - mu), (n, K0, K1, d, 1)
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logits = log_ab - 0.5 * ((resid * prec_r[..., 0]).sum(-1) + log_det + d * LOG_2PI)
    mean_v = (dal * m1[None, None, :, :, None] + dsg * m0[None, :, None, :, None])[..., 0]
    ev = mean_v + ((al * dal * S1 + sg * dsg * S0) * prec_r.transpose(-1, -2)).sum(-1)  # E[xdot | x_t = x, i, j]
    return logits, lambda w: (w[..., None] * ev).sum((1, 2)), lambda w: -(w[..., None] * prec_r[..., 0]).sum((1, 2))


@under_policy
def _evaluate(
    x: Tensor,
    t: float | Tensor,
    path: GaussianPath,
    target: GaussianMixture,
    source: GaussianMixture | None,
    what: str,
    force_general: bool = False,
) -> Tensor:
    """Chunked driver: what = "log_prob" (n,), "weights" (n, K0 K1), "velocity" or "score" (n, d), in x's dtype."""
    source = _check_models(path, target, source)
    x = check_points(x, target.dim)
    n, d = x.shape
    t = check_time(t, n, like=x)
    dev = x.device if x.device.type in ("cpu", "cuda") else torch.device("cpu")  # mps has no float64
    x64, t64 = x.to(dev, torch.float64), t.to(dev, torch.float64)
    if t64.shape[0] > 1 and not t64.requires_grad and bool((t64 == t64[0]).all()):
        t64 = t64[:1]  # one time for all rows (how solvers call fields): the cheaper shared-time path
    k = source.n_components * target.n_components
    iso = _isotropic(source.covs) is not None and _isotropic(target.covs) is not None and not force_general
    rows = max(1, _CHUNK // (k if iso else k * d * d))
    out = []
    for start in range(0, n, rows):
        tc = t64 if t64.shape[0] == 1 else t64[start : start + rows]
        logits, velocity, score = _pairs(x64[start : start + rows], tc, path, target, source, force_general)
        flat = logits.flatten(1)
        log_p = torch.logsumexp(flat, dim=1)
        if what == "log_prob":
            out.append(log_p)
            continue
        w = (flat - log_p[:, None]).exp()  # posterior responsibilities (torch.softmax is slow on some CPU builds)
        out.append(w if what == "weights" else (velocity if what == "velocity" else score)(w.view_as(logits)))
    return torch.cat(out).to(x.device, x.dtype)


def marginal_log_prob(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None
) -> Tensor:
    """log p_t(x) = log sum_ij a_i b_j N(x; mu_ij, C_ij) (FM paper Eq. 6 in closed form); shape (n,)."""
    return _evaluate(x, t, path, target, source, "log_prob")


def marginal_velocity(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None
) -> Tensor:
    """u_t(x) = sum_ij w_ij(x) E[xdot | x_t = x, i, j] (FM paper Thm 1 / Eq. 8 for a N(0, I) source); (n, d)."""
    return _evaluate(x, t, path, target, source, "velocity")


def marginal_score(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None
) -> Tensor:
    """grad log p_t(x) = sum_ij w_ij(x) C_ij^{-1} (mu_ij - x), the score of the mixture p_t (chapter 9); (n, d)."""
    return _evaluate(x, t, path, target, source, "score")


def posterior_weights(
    x: Tensor, t: float | Tensor, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None
) -> Tensor:
    """w_ij(x) = a_i b_j N(x; mu_ij, C_ij) / p_t(x), flattened source-major to (n, K_src * K_tgt); rows sum to 1."""
    return _evaluate(x, t, path, target, source, "weights")


def marginal_distribution(
    t: float | Tensor, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None
) -> GaussianMixture:
    """p_t = sum_ij a_i b_j N(mu_ij, C_ij) as a GaussianMixture (component i * K_tgt + j); t a single time."""
    source = _check_models(path, target, source)
    t = check_time(t, like=torch.zeros((), dtype=torch.float64))
    if t.numel() != 1:
        raise ValueError(f"marginal_distribution needs a single time t, got {t.numel()} values")
    al, sg, _, _ = (v.item() for v in _schedule(path, t))
    k, d = source.n_components * target.n_components, target.dim
    means = (al * target.means[None] + sg * source.means[:, None]).reshape(k, d)
    covs = (al**2 * target.covs[None] + sg**2 * source.covs[:, None]).reshape(k, d, d)
    weights = (source.weights[:, None] * target.weights[None]).reshape(k)
    return GaussianMixture(weights, means, covs, name=f"p_t(t={t.item():.4g}, {path.name}, {target.name})")


def exact_field_of(data: str, path: GaussianPath | None = None) -> ExactField:
    """The exact marginal field from N(0, I) to the named data set along `path` (CondOT by default): ch. 10's
    referee. ValueError unless the data set is a Gaussian mixture (only then is the field known in closed form)."""
    target = get_dataset(data)
    if not isinstance(target, GaussianMixture):
        raise ValueError(
            f"the exact field is known for Gaussian-mixture data sets only (e.g. eight_gaussians), got {data!r}: "
            "reflow and consistency distillation from the exact field need one (use a trained flow otherwise)"
        )
    return ExactField(CondOTPath() if path is None else path, target)


class ExactField:
    """The exact marginal field u_t(x) as a velocity field v(x, t) (t a float or shape (n,)), plus log p_t(x)."""

    def __init__(self, path: GaussianPath, target: GaussianMixture, source: GaussianMixture | None = None) -> None:
        self.source = _check_models(path, target, source)
        self.path, self.target = path, target

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        """u_t(x) (FM paper Thm 1, Eq. 8), shape (n, d)."""
        return marginal_velocity(x, t, self.path, self.target, self.source)

    def log_prob(self, x: Tensor, t: float | Tensor) -> Tensor:
        """log p_t(x) (FM paper Eq. 6), shape (n,)."""
        return marginal_log_prob(x, t, self.path, self.target, self.source)

    def score(self, x: Tensor, t: float | Tensor) -> Tensor:
        """grad log p_t(x) in closed form (chapter 9), shape (n, d)."""
        return marginal_score(x, t, self.path, self.target, self.source)

    def distribution(self, t: float | Tensor) -> GaussianMixture:
        """p_t as a GaussianMixture."""
        return marginal_distribution(t, self.path, self.target, self.source)

    def __repr__(self) -> str:
        return f"ExactField(path={self.path!r}, target={self.target!r}, source={self.source!r})"
