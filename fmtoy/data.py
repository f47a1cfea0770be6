"""2D target distributions with exact sampling and exact log-densities (the playground's ground truth).

Gaussian mixtures (closed form), a checkerboard (uniform on squares, closed form), rings (circles + Gaussian
noise, closed form through the Bessel function I_0), and moons / spirals (curves + Gaussian noise: the density
is an integral over the curve parameter, evaluated by composite Gauss-Legendre quadrature).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import check_choice, check_generator, check_points, check_positive, check_positive_int
from .device import resolve_device

LOG_2PI = math.log(2 * math.pi)
_CHUNK = 1 << 22  # max elements of an (n, K) temporary in log_prob; larger inputs are processed in row chunks


def _chunks(x: Tensor, k: int) -> list[Tensor]:
    """Split the rows of x so that each chunk times k stays below _CHUNK elements."""
    return list(x.split(max(1, _CHUNK // max(k, 1))))


class Distribution:
    """A distribution on R^dim with `sample(n)` and an exact `log_prob(x)`."""

    name: str = "distribution"
    dim: int = 2

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw n iid samples x ~ p, shape (n, dim), float32, on `device` (default: the generator's, else cpu)."""
        n = check_positive_int("n", n)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if device is None:
            dev = generator.device if generator is not None else torch.device("cpu")
        else:
            dev = resolve_device(device)
        check_generator(generator, dev, what="samples were requested")
        return self._sample(n, generator, dev)

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) for x of shape (n, dim); returns shape (n,) in the dtype of x."""
        return self._log_prob(check_points(x, self.dim))

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _as_float64(name: str, value, ndim: int) -> Tensor:
    """Convert an array-like to a float64 cpu tensor with `ndim` dimensions and finite entries."""
    try:
        t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
        t = t.to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}") from e
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must contain only finite numbers")
    return t


class GaussianMixture(Distribution):
    """p(x) = sum_k w_k N(x; m_k, S_k); log p = logsumexp_k [log w_k + log N(x; m_k, S_k)]."""

    def __init__(self, weights, means, covs, name: str = "gaussian_mixture") -> None:
        w = _as_float64("weights", weights, 1)
        m = _as_float64("means", means, 2)
        c = _as_float64("covs", covs, 3)
        k, d = m.shape
        if k == 0 or d == 0:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(m.shape)}")
        if w.shape != (k,) or c.shape != (k, d, d):
            raise ValueError(
                f"shapes must be weights (K,), means (K, d), covs (K, d, d); got weights "
                f"{tuple(w.shape)}, means {tuple(m.shape)}, covs {tuple(c.shape)}"
            )
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
        scale = 1.0 + c.abs().amax(dim=(1, 2))
        asym = (c - c.transpose(1, 2)).abs().amax(dim=(1, 2))
        if (asym > 1e-8 * scale).any():
            bad = int(torch.nonzero(asym > 1e-8 * scale)[0])
            raise ValueError(f"covs[{bad}] is not symmetric: {c[bad].tolist()}")
        c = 0.5 * (c + c.transpose(1, 2))
        eig, vec = torch.linalg.eigh(c)
        if (eig[:, 0] < -1e-10 * scale).any():
            bad = int(torch.nonzero(eig[:, 0] < -1e-10 * scale)[0])
            raise ValueError(
                f"covs[{bad}] is not positive semi-definite (smallest eigenvalue "
                f"{eig[bad, 0].item():.3g}); a covariance matrix must be symmetric PSD"
            )
        self.name, self.dim = name, d
        self.weights, self.means, self.covs = w / w.sum(), m, c
        self._root = vec * eig.clamp_min(0).sqrt()[:, None, :]  # S_k = root_k root_k^T (works for PSD)
        chol, info = torch.linalg.cholesky_ex(c)
        self._singular = [int(i) for i in torch.nonzero(info)]
        if not self._singular:
            self._chol_inv = torch.linalg.inv(chol)  # whitening: z = L^{-1}(x - m)
            self._log_det = 2 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)

    @property
    def n_components(self) -> int:
        """Number of mixture components K."""
        return self.weights.shape[0]

    @property
    def is_empirical(self) -> bool:
        """True when every covariance is zero (point masses, e.g. from_points): no density exists."""
        return bool((self.covs == 0).all())

    @classmethod
    def from_points(cls, points: Tensor, name: str = "empirical") -> GaussianMixture:
        """Empirical distribution (1/N) sum_i delta_{x_i}: equal weights, zero covariances (no density)."""
        points = check_points(points, name="points")
        n, d = points.shape
        return cls(torch.ones(n), points, torch.zeros(n, d, d), name=name)

    def component(self, k: int) -> GaussianMixture:
        """The k-th component N(m_k, S_k) as a one-component mixture."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.n_components:
            raise ValueError(f"component index must be an int in [0, {self.n_components - 1}], got {k!r}")
        return GaussianMixture(torch.ones(1), self.means[k : k + 1], self.covs[k : k + 1], name=f"{self.name}[{k}]")

    def _float32_on(self, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(weights, roots, means) as float32 on `dev`, converted once per device (sampling is in the training loop)."""
        cache = self.__dict__.setdefault("_f32_cache", {})
        if dev not in cache:
            cache[dev] = tuple(a.float().to(dev) for a in (self.weights, self._root, self.means))
        return cache[dev]

    def _draw(self, n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, Tensor]:
        """n samples and the index of the component each came from."""
        weights, roots, means = self._float32_on(dev)
        idx = torch.multinomial(weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, device=dev, dtype=torch.float32)
        return means[idx] + (roots[idx] @ z[:, :, None])[:, :, 0], idx

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        return self._draw(n, g, dev)[0]

    def _log_prob(self, x: Tensor) -> Tensor:
        if self._singular:
            if self.is_empirical:
                raise ValueError(
                    f"{self.name!r} is an empirical data set (point masses, zero covariances, e.g. "
                    "from_points): it has no density, so log_prob is undefined; compare samples "
                    "instead (fmtoy.metrics.w2 / energy_distance)"
                )
            raise ValueError(
                f"components {self._singular} of {self.name!r} have singular covariances, so the "
                "mixture has no density on R^d; log_prob needs positive-definite covariances"
            )
        like = dict(dtype=x.dtype, device=x.device)
        m, a = self.means.to(**like), self._chol_inv.to(**like)
        const = (self.weights.log() - 0.5 * self._log_det - 0.5 * self.dim * LOG_2PI).to(**like)
        out = []
        for xc in _chunks(x, self.n_components * self.dim):
            z = torch.einsum("kij,nkj->nki", a, xc[:, None, :] - m)  # whitened residuals (n, K, d)
            out.append(torch.logsumexp(const - 0.5 * (z * z).sum(-1), dim=1))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"GaussianMixture(name={self.name!r}, dim={self.dim}, n_components={self.n_components})"


class StandardNormal(GaussianMixture):
    """The source N(0, I_dim): one component, log p = -|x|^2/2 - (d/2) log 2 pi."""

    def __init__(self, dim: int = 2) -> None:
        dim = check_positive_int("dim", dim)
        super().__init__(torch.ones(1), torch.zeros(1, dim), torch.eye(dim)[None], name="standard_normal")

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        return torch.randn(n, self.dim, generator=g, device=dev, dtype=torch.float32)


def circle_mixture(k: int, radius: float, std: float, name: str | None = None) -> GaussianMixture:
    """K equal-weight isotropic Gaussians N(r (cos 2 pi j/K, sin 2 pi j/K), std^2 I), j = 0 ... K-1, on a circle."""
    k = check_positive_int("k", k)
    radius, std = check_positive("radius", radius), check_positive("std", std)
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(k), means, std**2 * torch.eye(2).expand(k, 2, 2), name=name or f"circle_{k}")


def eight_gaussians(radius: float = 4.0, std: float = 0.5) -> GaussianMixture:
    """Eight equal-weight isotropic Gaussians on a circle of radius r (circle_mixture with K = 8)."""
    return circle_mixture(8, radius, std, name="eight_gaussians")


class LabelledMixture(GaussianMixture):
    """A Gaussian mixture whose components carry class labels: q(x) = sum_c p(c) q(x | c), q(x | c) the mixture of
    the components labelled c (weights renormalised), p(c) the total weight of class c (chapter 8)."""

    def __init__(self, weights, means, covs, labels, name: str = "labelled_mixture") -> None:
        super().__init__(weights, means, covs, name=name)
        try:
            raw = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"labels must be integers 0 ... C-1, one per component; got {labels!r}") from e
        if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)):
            raise ValueError(f"labels must be integers 0 ... C-1, one per component; got {raw.tolist()}")
        lab = torch.as_tensor(raw.astype(np.int64))
        if lab.shape != (self.n_components,):
            raise ValueError(f"labels must have one entry per component ({self.n_components}), got {tuple(lab.shape)}")
        classes = int(lab.max()) + 1 if lab.numel() else 0
        if lab.min() < 0 or sorted(set(lab.tolist())) != list(range(classes)) or classes < 2:
            raise ValueError(f"labels must use every class 0 ... C-1 with C >= 2, got {lab.tolist()}")
        self.labels, self.n_classes = lab, classes
        self.class_prior = torch.zeros(classes, dtype=torch.float64).index_add_(0, lab, self.weights)  # p(c)

    @classmethod
    def from_points(cls, points: Tensor, labels=None, name: str = "empirical") -> LabelledMixture:
        """Labelled point masses (1/N) sum_i delta_{x_i} with one label per point (no density)."""
        if labels is None:
            raise TypeError("LabelledMixture.from_points(points, labels) needs one class label per point")
        points = check_points(points, name="points")
        n, d = points.shape
        return cls(torch.ones(n), points, torch.zeros(n, d, d), labels, name=name)

    def check_class(self, c: int) -> int:
        """c if it is a class of this mixture (an int in [0, C-1]), else ValueError."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.n_classes:
            raise ValueError(f"class must be an int in [0, {self.n_classes - 1}], got {c!r}")
        return c

    def conditional(self, c: int) -> GaussianMixture:
        """q(x | c): the components labelled c, their weights renormalised."""
        keep = self.labels == self.check_class(c)
        return GaussianMixture(self.weights[keep], self.means[keep], self.covs[keep], name=f"{self.name} | c={c}")

    def sample_labelled(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        """(x, c): n iid draws of (x, label) from q(x, c) = p(c) q(x | c); x float32 (n, dim), c int64 (n,)."""
        n = check_positive_int("n", n)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        dev = resolve_device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
        check_generator(generator, dev, what="samples were requested")
        x, idx = self._draw(n, generator, dev)
        return x, self.labels.to(dev)[idx]

    def class_log_probs(self, x: Tensor) -> Tensor:
        """log q(x | c) for every class, shape (n, C), in the dtype of x."""
        x = check_points(x, self.dim)
        return torch.stack([self.conditional(c).log_prob(x) for c in range(self.n_classes)], dim=1)

    def __repr__(self) -> str:
        return (
            f"LabelledMixture(name={self.name!r}, dim={self.dim}, n_components={self.n_components}, "
            f"n_classes={self.n_classes})"
        )


def labelled_gaussians(std: float = 0.5, overlap: float = 0.7) -> LabelledMixture:
    """Two classes of three Gaussians each: class 0 at (-3, 0), (0, 3) and (overlap, 0), class 1 at their mirror
    images (3, 0), (0, -3), (-overlap, 0); the two inner components overlap (chapter 8's labelled target)."""
    std, overlap = check_positive("std", std), check_positive("overlap", overlap, allow_zero=True)
    means = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [overlap, 0.0], [3.0, 0.0], [0.0, -3.0], [-overlap, 0.0]])
    covs = std**2 * torch.eye(2).expand(6, 2, 2)
    return LabelledMixture(torch.ones(6), means, covs, [0, 0, 0, 1, 1, 1], name="labelled_gaussians")


class Checkerboard(Distribution):
    """Uniform on the black squares (i + j even) of a squares x squares grid on [-h, h]^2; log p = -inf elsewhere."""

    def __init__(self, squares: int = 4, half_width: float = 4.0) -> None:
        self.squares = check_positive_int("squares", squares)
        self.half_width = check_positive("half_width", half_width)
        self.name, self.dim, self.side = "checkerboard", 2, 2 * self.half_width / self.squares
        ij = torch.cartesian_prod(torch.arange(self.squares), torch.arange(self.squares))
        self.black = ij[ij.sum(1) % 2 == 0]  # (n_black, 2) cell indices
        self.log_density = -math.log(len(self.black) * self.side**2)

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        cell = torch.randint(len(self.black), (n,), generator=g, device=dev)
        u = torch.rand(n, 2, generator=g, device=dev, dtype=torch.float32)
        return -self.half_width + self.side * (self.black.to(dev)[cell] + u)

    def _log_prob(self, x: Tensor) -> Tensor:
        ij = torch.floor((x + self.half_width) / self.side)
        inside = ((ij >= 0) & (ij < self.squares)).all(1) & (ij.sum(1) % 2 == 0)
        return torch.full_like(x[:, 0], self.log_density).masked_fill(~inside, -math.inf)


def _isotropic_mixture_log_prob(x: Tensor, centres: Tensor, log_w: Tensor, std: float) -> Tensor:
    """log sum_m w_m N(x; c_m, std^2 I) in 2D; -|x - c|^2/2s^2 is expanded so one addmm gives all logits."""
    c, s2 = centres.to(x), std**2
    bias = log_w.to(x) - (c * c).sum(1) / (2 * s2)
    out = [torch.logsumexp(torch.addmm(bias, xc, c.T / s2), dim=1) for xc in _chunks(x, len(c))]
    return torch.cat(out) - (x * x).sum(1) / (2 * s2) - math.log(2 * math.pi * s2)


class Rings(Distribution):
    """Circles + N(0, s^2 I) noise, w_k ~ R_k: p = sum_k w_k e^{-(r-R_k)^2/2s^2} i0e(r R_k/s^2) / (2 pi s^2)."""

    def __init__(self, radii: Sequence[float] = (1.0, 2.5, 4.0), std: float = 0.25) -> None:
        if not isinstance(radii, (list, tuple)) or len(radii) == 0:
            raise ValueError(f"radii must be a non-empty list or tuple of positive numbers, got {radii!r}")
        self.radii = torch.tensor([check_positive("each radius", r) for r in radii], dtype=torch.float64)
        self.std, self.name, self.dim = check_positive("std", std), "rings", 2
        self.weights = self.radii / self.radii.sum()  # uniform along the total length

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        k = torch.multinomial(self.weights.float().to(dev), n, replacement=True, generator=g)
        theta = 2 * math.pi * torch.rand(n, generator=g, device=dev, dtype=torch.float32)
        circle = self.radii.float().to(dev)[k, None] * torch.stack([theta.cos(), theta.sin()], dim=1)
        return circle + self.std * torch.randn(n, 2, generator=g, device=dev, dtype=torch.float32)

    def _log_prob(self, x: Tensor) -> Tensor:
        r, radii = x.norm(dim=1, keepdim=True), self.radii.to(x)
        s2 = self.std**2
        log_k = (
            self.weights.log().to(x) - (r - radii) ** 2 / (2 * s2) + torch.special.i0e(r * radii / s2).log()
        )  # angular integral = I_0(r R / s^2)
        return torch.logsumexp(log_k, dim=1) - math.log(2 * math.pi * s2)


class CurveNoise(Distribution):
    """x = c_a(u) + std * eps, arc a ~ weights, u ~ U[0, 1]: p(x) = sum_a w_a int_0^1 N(x; c_a(u), std^2 I) du.

    The u-integral is computed by composite Gauss-Legendre quadrature (`order` nodes per panel, panels at most
    2 std long along the curve by default), i.e. an isotropic mixture with the nodes as centres. Against an 8x
    finer rule (tests/test_data.py) log p differs by < 1e-7 where p > 1e-8 max p and by < 1e-4 where
    p > 1e-20 max p; only in the far tails (> 9 std from every curve) does the relative error grow.
    """

    def __init__(
        self,
        curves: Sequence[Callable[[Tensor], Tensor]],
        weights: Sequence[float],
        std: float,
        name: str = "curve",
        panels: int | None = None,
        order: int = 8,
    ) -> None:
        if len(curves) == 0 or len(weights) != len(curves) or any(not callable(c) for c in curves):
            raise ValueError("curves must be a non-empty list of callables u -> (m, 2) with one weight each")
        w = torch.tensor([check_positive("each weight", v) for v in weights], dtype=torch.float64)
        self.curves, self.weights, self.name, self.dim = list(curves), w / w.sum(), name, 2
        self.std, self.order = check_positive("std", std), check_positive_int("order", order)
        if panels is None:  # panel length <= 2 std on every arc
            fine = torch.linspace(0, 1, 2001, dtype=torch.float64)
            speed = max(float((c(fine).diff(dim=0).norm(dim=1) * 2000).max()) for c in self.curves)
            panels = max(8, math.ceil(speed / (2 * self.std)))
        self.panels = check_positive_int("panels", panels)
        g, gw = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(self.order))
        left = torch.arange(self.panels, dtype=torch.float64)[:, None] / self.panels
        u = (left + (g + 1) / (2 * self.panels)).reshape(-1)  # nodes in [0, 1]
        log_du = (gw / (2 * self.panels)).log().repeat(self.panels)  # their weights (sum to 1)
        self.centres = torch.cat([c(u) for c in self.curves])  # (arcs * panels * order, 2)
        self.log_w = torch.cat([log_du + lw for lw in self.weights.log()])

    def _sample(self, n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
        a = torch.multinomial(self.weights.float().to(dev), n, replacement=True, generator=g)
        u = torch.rand(n, generator=g, device=dev, dtype=torch.float32)
        on_curve = torch.stack([c(u) for c in self.curves])  # (arcs, n, 2)
        point = on_curve[a, torch.arange(n, device=dev)]
        return point.float() + self.std * torch.randn(n, 2, generator=g, device=dev, dtype=torch.float32)

    def _log_prob(self, x: Tensor) -> Tensor:
        return _isotropic_mixture_log_prob(x, self.centres, self.log_w, self.std)


def checkerboard(squares: int = 4, half_width: float = 4.0) -> Checkerboard:
    """Uniform on the black squares of a checkerboard on [-half_width, half_width]^2 (log p = -inf off them)."""
    return Checkerboard(squares, half_width)


def rings(radii: Sequence[float] = (1.0, 2.5, 4.0), std: float = 0.25) -> Rings:
    """Concentric noisy circles; exact density via I_0 (torch.special.i0e)."""
    return Rings(radii, std)


def _moon(u: Tensor, scale: float, upper: bool) -> Tensor:
    """A point of the upper half circle of two_moons, or of the lower one (its reflection through 0)."""
    c, s = torch.cos(math.pi * u), torch.sin(math.pi * u)
    return scale * (torch.stack([c - 0.5, s - 0.25], dim=-1) if upper else torch.stack([0.5 - c, 0.25 - s], dim=-1))


def two_moons(scale: float = 2.5, std: float = 0.25, panels: int | None = None) -> CurveNoise:
    """sklearn-style two moons (half circles of radius `scale`, centred at 0) + N(0, std^2 I) noise."""
    s = check_positive("scale", scale)
    curves = [partial(_moon, scale=s, upper=True), partial(_moon, scale=s, upper=False)]  # picklable: workers
    return CurveNoise(curves, [1.0, 1.0], std, name="two_moons", panels=panels)


def _spiral_arm(u: Tensor, radius: float, th0: float, th1: float, shift: float) -> Tensor:
    """A point of one arm of spirals: theta^2 uniform in [th0^2, th1^2], r = radius theta / th1."""
    th = torch.sqrt(th0**2 + (th1**2 - th0**2) * u)
    r = radius * th / th1
    return torch.stack([r * torch.cos(th + shift), r * torch.sin(th + shift)], dim=-1)


def spirals(radius: float = 4.0, turns: float = 1.5, std: float = 0.25, panels: int | None = None) -> CurveNoise:
    """Two interleaved Archimedean arms r = radius theta/theta_max (theta^2 uniform: ~uniform length) + noise."""
    radius, std = check_positive("radius", radius), check_positive("std", std)
    th1 = 2 * math.pi * check_positive("turns", turns)
    th0 = min(math.pi / 4, th1 / 2)
    arms = [partial(_spiral_arm, radius=radius, th0=th0, th1=th1, shift=shift) for shift in (0.0, math.pi)]
    return CurveNoise(arms, [1.0, 1.0], std, name="spirals", panels=panels)


DATASETS: dict[str, Callable[..., Distribution]] = {
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "two_moons": two_moons,
    "rings": rings,
    "spirals": spirals,
    "standard_normal": StandardNormal,
    "gaussian_mixture": GaussianMixture,
    "labelled_gaussians": labelled_gaussians,
}


def list_datasets() -> list[str]:
    """Names accepted by get_dataset."""
    return sorted(DATASETS)


def get_dataset(name: str, **kwargs) -> Distribution:
    """Build the named distribution (gaussian_mixture needs weights=, means=, covs=)."""
    check_choice("dataset", name, DATASETS)
    try:
        return DATASETS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"get_dataset({name!r}): {e}") from e
