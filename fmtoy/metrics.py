"""Sample-quality and path metrics: W2, energy distance, MMD, model NLL and its gap to the entropy, straightness,
kinetic energy. Distances between point sets return Python floats and are computed in float64."""

from __future__ import annotations

import math
import statistics
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import check_paired, check_points, check_positive, check_positive_int
from .data import StandardNormal
from .solvers import STAGES, Velocity, integrate, log_likelihood, steps_for_nfe
from .threads import under_policy

W2_MAX_POINTS = 10_000  # the assignment problem costs O(n^3) time and an n x n matrix of memory
_CHUNK = 1 << 22  # max entries of one block of pairwise distances


def _pair(x: Tensor, y: Tensor, min_points: int = 1) -> tuple[Tensor, Tensor]:
    """Check two point sets of the same dimension (at least `min_points` each); return float64 copies."""
    x, y = check_points(x, name="x"), check_points(y, name="y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if min(len(x), len(y)) < min_points:
        raise ValueError(f"x and y need at least {min_points} points each, got {len(x)} and {len(y)}")
    return x.detach().double(), y.detach().double().to(x.device)


def _blocks(x: Tensor, m: int) -> list[Tensor]:
    return list(x.split(max(1, _CHUNK // max(m, 1))))


# ----------------------------------------------------------------------------------------------- set distances
def w2(x: Tensor, y: Tensor) -> float:
    """Exact W2 between equal-size empirical sets: sqrt(min_perm 1/n sum_i |x_i - y_perm(i)|^2) (assignment)."""
    x, y = _pair(x, y)
    if len(x) != len(y):
        raise ValueError(
            f"w2 needs equal-size sets (an assignment), got {len(x)} and {len(y)} points; subsample the larger one"
        )
    if len(x) > W2_MAX_POINTS:
        raise ValueError(
            f"w2 solves an O(n^3) assignment problem; n = {len(x)} exceeds {W2_MAX_POINTS}, subsample the sets"
        )
    cost = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square_().cpu().numpy()
    from scipy.optimize import linear_sum_assignment  # imported on first use (0.3 s)

    rows, cols = linear_sum_assignment(cost)
    return math.sqrt(float(np.mean(cost[rows, cols])))


def _mean_pairwise(x: Tensor, y: Tensor, same: bool, kernel=None) -> float:
    """Mean of k(|x_i - y_j|) over all pairs, or over pairs i != j when `same` (x is y): a U-statistic."""
    total = 0.0
    for block in _blocks(x, len(y)):
        dist = torch.cdist(block, y, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 on the diagonal
        total += float((dist if kernel is None else kernel(dist)).sum())
    if not same:
        return total / (len(x) * len(y))
    n = len(x)
    if kernel is not None:  # remove the diagonal terms k(0)
        total -= n * float(kernel(x.new_zeros(())))
    return total / (n * (n - 1))


def paired_error(x: Tensor, y: Tensor) -> float:
    """mean_i |x_i - y_i| in float64: the distance between paired samples (the same noise through two samplers, or a
    sample and the exact flow map's image of its noise)."""
    x, y = check_paired(x, y, ("x", "y"))
    return float((x.double() - y.double()).norm(dim=1).mean())


def nearest_mode(x: Tensor, mixture) -> Tensor:
    """Index of the nearest component mean of a Gaussian mixture for each row of x, shape (n,) (chapter 10: the mode a
    sample landed in, the basin of a noise point)."""
    x = check_points(x)
    if not hasattr(mixture, "means"):
        raise TypeError(f"mixture must be a fmtoy GaussianMixture (with means), got {type(mixture).__name__}")
    return torch.cdist(x.double(), mixture.means.double().to(x.device)).argmin(1)


def switched_modes(x: Tensor, y: Tensor, mixture) -> float:
    """Fraction of paired rows whose nearest component mean (of a Gaussian mixture) differs between x_i and y_i: how
    much of a paired error is samples landing in another mode (chapter 10)."""
    x, y = check_paired(x, y, ("x", "y"))
    return float((nearest_mode(x, mixture) != nearest_mode(y, mixture)).double().mean())


@under_policy
def energy_distance(x: Tensor, y: Tensor) -> float:
    """Unbiased energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics, i != j): mean 0 when p = q."""
    x, y = _pair(x, y, min_points=2)
    return 2 * _mean_pairwise(x, y, False) - _mean_pairwise(x, x, True) - _mean_pairwise(y, y, True)


def mmd(x: Tensor, y: Tensor, bandwidth: float = 1.0) -> float:
    """Unbiased MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y), k(a,b) = exp(-|a-b|^2 / (2 h^2)) (Gretton et al. 2012)."""
    h = check_positive("bandwidth", bandwidth)
    x, y = _pair(x, y, min_points=2)

    def kernel(dist: Tensor) -> Tensor:
        return torch.exp(-dist.square() / (2 * h * h))

    return (
        _mean_pairwise(x, x, True, kernel)
        + _mean_pairwise(y, y, True, kernel)
        - 2 * _mean_pairwise(x, y, False, kernel)
    )


def noise_floor(
    target, reference: Tensor, draws: int = 5, seed: int = 0, metric: Callable[[Tensor, Tensor], float] | None = None
) -> tuple[float, float]:
    """(mean, sd) of metric(fresh target sample, reference) over `draws` samples of the reference's size (generators
    seed, ..., seed + draws - 1): what the distance reads when nothing is wrong. Report distances beside it."""
    from .device import make_generator

    metric = energy_distance if metric is None else metric
    draws = check_positive_int("draws", draws)
    if draws < 2:
        raise ValueError(f"draws must be >= 2 to give a spread, got {draws}")
    ref = check_points(reference, name="reference")
    vals = torch.tensor(
        [metric(target.sample(len(ref), make_generator(seed + i)).to(ref.dtype), ref) for i in range(draws)],
        dtype=torch.float64,
    )
    return float(vals.mean()), float(vals.std())


class Spread(float):
    """A statistic over seeds: the float is the mean, .values the per-seed values, .sd their sample standard
    deviation; formatted 'mean ± sd'. A claim compares seed by seed (below, above), never the means alone."""

    values: tuple[float, ...]
    seeds: tuple[int, ...]
    sd: float

    def __new__(cls, values: Sequence[float], seeds: Sequence[int] | None = None) -> Spread:
        vals = tuple(float(v) for v in values)
        if len(vals) < 2:
            raise ValueError(f"a spread needs values from at least 2 seeds, got {len(vals)}")
        seeds = tuple(range(len(vals))) if seeds is None else tuple(seeds)
        if len(seeds) != len(vals):
            raise ValueError(f"{len(vals)} values but {len(seeds)} seeds")
        obj = super().__new__(cls, statistics.fmean(vals))
        obj.values, obj.seeds, obj.sd = vals, seeds, statistics.stdev(vals)
        return obj

    def __reduce__(self):
        return (Spread, (self.values, self.seeds))

    @property
    def mean(self) -> float:
        return float(self)

    def __format__(self, spec: str) -> str:
        return f"{format(float(self), spec or '.4g')} ± {format(self.sd, spec or '.2g')}"

    def __str__(self) -> str:
        return format(self, "")

    def __repr__(self) -> str:
        return f"Spread({self} over seeds {list(self.seeds)})"

    def _pairs(self, other: float | Spread) -> list[tuple[float, float]]:
        if isinstance(other, Spread):
            if other.seeds != self.seeds:
                raise ValueError(f"compare spreads over the same seeds, got {list(self.seeds)} and {list(other.seeds)}")
            return list(zip(self.values, other.values))
        return [(v, float(other)) for v in self.values]

    def below(self, other: float | Spread) -> bool:
        """True if the value is below `other` for every seed (paired by seed when other is a Spread)."""
        return all(a < b for a, b in self._pairs(other))

    def above(self, other: float | Spread) -> bool:
        """True if the value is above `other` for every seed (paired by seed when other is a Spread)."""
        return all(a > b for a, b in self._pairs(other))

    def verdict(self, other: float | Spread) -> str:
        """ "below" or "above" `other` when that holds for every seed, else "not separated from": the word a
        comparative sentence may use."""
        return "below" if self.below(other) else "above" if self.above(other) else "not separated from"

    def in_floor_units(self, floor: tuple[float, float]) -> Spread:
        """(value - floor mean) / floor sd per seed: how far above its noise floor (noise_floor's (mean, sd))."""
        mean, sd = floor
        if not sd > 0:
            raise ValueError(f"the floor's sd must be > 0, got {sd}")
        return Spread([(v - mean) / sd for v in self.values], self.seeds)


def across_seeds(fn: Callable[[int], float | Mapping[str, float]], seeds: Sequence[int] = (0, 1, 2)):
    """Spread of fn(seed) over seeds, or {key: Spread} when fn returns a dict: how every comparative claim of the
    book is computed (at least 2 seeds; 3 by default)."""
    results = [fn(int(s)) for s in seeds]
    if all(isinstance(r, Mapping) for r in results):
        keys = list(results[0])
        if any(list(r) != keys for r in results):
            raise ValueError("fn must return the same keys for every seed")
        return {k: Spread([r[k] for r in results], seeds) for k in keys}
    return Spread(results, seeds)


def quality_vs_nfe(
    velocity: Velocity,
    x0: Tensor,
    reference: Tensor,
    nfes: Sequence[int],
    method: str = "euler",
    metric: Callable[[Tensor, Tensor], float] | None = None,
) -> dict[int, float]:
    """{nfe: metric(psi_1(x0), reference)} for each nfe the solver can spend exactly (a multiple of its stages): the
    quality-vs-cost sweep of chapters 5-7; metric defaults to energy_distance (report it beside its noise floor)."""
    metric = energy_distance if metric is None else metric
    x0 = check_points(x0, name="x0")
    return {
        n: metric(integrate(velocity, x0, steps_for_nfe(method, n), method), reference)
        for n in nfes
        if n % STAGES[method] == 0
    }


# ----------------------------------------------------------------------------------------------- likelihood
def cross_entropy(samples: Tensor, target) -> float:
    """-mean log q(x) of samples under the true density q (target.log_prob), in nats: H(q) for samples of q up to
    sampling noise, more for samples that spread, less for samples that shrink onto the modes (chapter 9)."""
    samples = check_points(samples, name="samples")
    if not hasattr(target, "log_prob"):
        raise TypeError(f"target must have .log_prob(x) (a fmtoy Distribution), got {type(target).__name__}")
    return -float(target.log_prob(samples).mean())


def nll(velocity: Velocity, x: Tensor, source, steps: int = 50, method: str = "rk4") -> float:
    """Mean negative log-likelihood -1/n sum_i log p_1(x_i) of the flow (instantaneous change of variables,
    thm-inst-cov)."""
    return -float(log_likelihood(velocity, x, source, steps=steps, method=method).mean())


def nll_gap(
    velocity: Velocity,
    target,
    source=None,
    n: int = 2000,
    generator: torch.Generator | None = None,
    steps: int = 50,
    method: str = "rk4",
    device=None,
) -> dict[str, float]:
    """On x ~ q (target): gap = mean(log q(x) - log p_1(x)), a Monte-Carlo estimate of KL(q || p_1) >= 0.

    Returns dict(nll = -mean log p_1, entropy = -mean log q, gap, gap_stderr); using the same samples for both
    terms makes the gap's standard error much smaller than either term's.
    """
    n = check_positive_int("n", n)
    if n < 2:
        raise ValueError(f"n must be >= 2 to estimate a standard error, got {n}")
    if not (hasattr(target, "sample") and hasattr(target, "log_prob")):
        raise TypeError(f"target must be a fmtoy Distribution with sample and log_prob, got {type(target).__name__}")
    source = StandardNormal(target.dim) if source is None else source
    x = target.sample(n, generator, device)
    log_q = target.log_prob(x).double()
    log_p = log_likelihood(velocity, x, source, steps=steps, method=method).double()
    gap = log_q - log_p
    return {
        "nll": -float(log_p.mean()),
        "entropy": -float(log_q.mean()),
        "gap": float(gap.mean()),
        "gap_stderr": float(gap.std() / math.sqrt(n)),
    }


# ----------------------------------------------------------------------------------------------- paths
def _check_trajectory(trajectory: Tensor) -> Tensor:
    if not isinstance(trajectory, Tensor):
        raise TypeError(
            f"trajectory must be a torch.Tensor of shape (steps + 1, n, d), got {type(trajectory).__name__}"
        )
    if trajectory.ndim != 3 or trajectory.shape[0] < 2:
        raise ValueError(
            f"trajectory must have shape (steps + 1, n, d) with steps >= 1 (e.g. integrate(..., "
            f"return_trajectory=True)), got {tuple(trajectory.shape)}"
        )
    if not trajectory.is_floating_point():
        raise TypeError(f"trajectory must be a floating-point tensor, got dtype {trajectory.dtype}")
    return trajectory.detach().double()


def straightness(trajectory: Tensor) -> float:
    """S = int_0^1 E |(x_1 - x_0) - dx_t/dt|^2 dt (Liu et al. 2022); 0 iff paths are straight at constant speed.

    dx/dt is the finite difference on the trajectory's uniform grid over [0, 1] (steps + 1 points)."""
    x = _check_trajectory(trajectory)
    steps = x.shape[0] - 1
    velocity = (x[1:] - x[:-1]) * steps  # (steps, n, d)
    chord = x[-1] - x[0]  # (n, d)
    return float((velocity - chord).square().sum(-1).mean())


def kinetic_energy(trajectory: Tensor) -> float:
    """E = int_0^1 E |dx_t/dt|^2 dt, dx/dt by finite differences on a uniform grid over [0, 1]."""
    x = _check_trajectory(trajectory)
    steps = x.shape[0] - 1
    return float(((x[1:] - x[:-1]) * steps).square().sum(-1).mean())
