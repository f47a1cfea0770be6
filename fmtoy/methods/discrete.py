"""Discrete flow matching on a finite grid (chapter 11; Campbell et al. 2024, Gat et al. 2024), exactly.

A state is x = (x^1, x^2); each coordinate is one of T tokens: the V data values 0 ... V-1, and for a masked source
also the mask token V. A rate u(y, x) is that of jumping from x to y; a generator Q has rows = "from" and rows
summing to 0; distributions are row vectors, d/dt p_t = p_t Q_t (the Kolmogorov forward equation).

The mixture path p_t(x^i | x_1^i) = (1 - kappa_t) p_0(x^i) + kappa_t delta(x^i, x_1^i) (MixturePath) has the
conditional rates kappa'/(1 - kappa) (delta(y, x_1^i) - delta(y, x^i)); the marginal rates replace delta(y, x_1^i)
by the posterior p(x_1^i = y | x_t = x) (the discrete marginalization trick). On a V x V grid with V <= 64 every
posterior, rate and the exact distribution of a sampler's output are enumerated (ExactPosterior, propagate); a
network (PosteriorMLP) learns the per-coordinate posterior with a cross-entropy loss on the one training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_choice, check_positive, check_positive_int
from ..data import Distribution, get_dataset
from ..device import resolve_device
from ..models import _check_model_time, fourier_time, time_frequencies
from ..threads import thread_policy, under_policy
from ..train import FitContext, FitResult, RecipeConfig, build_model, check_config, fit, fit_options, run_config

SOURCES = ("uniform", "mask")
MAX_VALUES = 64
Posterior = Callable[[Tensor, float], Tensor]  # (x (n, 2) long, t) -> (n, 2, V) probabilities p(x_1^i = c | x)


def _check_values(values: int) -> int:
    if isinstance(values, bool) or not isinstance(values, int) or not 2 <= values <= MAX_VALUES:
        raise ValueError(f"values (grid values per coordinate) must be an integer in [2, {MAX_VALUES}], got {values!r}")
    return values


def _check_states(x: Tensor, tokens: int, name: str = "x") -> Tensor:
    """x if it is an integer tensor of shape (n, 2) with entries in [0, tokens), else a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of grid states, shape (n, 2), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) (one token per coordinate), got {tuple(x.shape)}")
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer tokens (torch.long), got dtype {x.dtype}")
    if len(x) and (x.min() < 0 or x.max() >= tokens):
        raise ValueError(f"{name} must hold tokens in [0, {tokens - 1}], got values in [{x.min()}, {x.max()}]")
    return x.long()


def _device(generator: torch.Generator | None, device) -> torch.device:
    """Where to draw: the generator's device, else `device` (default cpu)."""
    return generator.device if generator is not None else resolve_device(device or "cpu")


def _check_t(t: float) -> float:
    if isinstance(t, Tensor) and t.numel() == 1:
        t = float(t)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be a number in [0, 1], got {t!r}")
    return float(t)


# ----------------------------------------------------------------------------------------------- the data
class GridDistribution:
    """q(a, b) on the V x V grid: cell (a, b) is centred at (c_a, c_b), c_k = -lim + (k + 1/2) 2 lim / V."""

    def __init__(self, probs: Tensor, lim: float = 5.0, name: str = "grid") -> None:
        p = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
        if p.ndim != 2 or p.shape[0] != p.shape[1]:
            raise ValueError(f"probs must be a square (V, V) table, got shape {tuple(p.shape)}")
        _check_values(p.shape[0])
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError("probs must be finite and >= 0 with a positive sum")
        self.probs, self.lim, self.name = p / p.sum(), check_positive("lim", lim), name

    @property
    def values(self) -> int:
        return self.probs.shape[0]

    def centres(self) -> Tensor:
        """The cell centres c_0 < ... < c_{V-1} of one axis, (V,) float64."""
        return -self.lim + (torch.arange(self.values, dtype=torch.float64) + 0.5) * (2 * self.lim / self.values)

    def to_points(self, x: Tensor) -> Tensor:
        """The cell centres of grid states x (n, 2), as points of R^2 (n, 2) float64 (for plots and metrics)."""
        return self.centres()[_check_states(x, self.values).cpu()]

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n states (n, 2) long drawn from q, on the generator's device (or `device`)."""
        n = check_positive_int("n", n)
        dev = _device(generator, device)
        flat = torch.multinomial(self.probs.reshape(-1).to(dev), n, replacement=True, generator=generator)
        return torch.stack([flat // self.values, flat % self.values], dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) for states x (n, 2); -inf on cells of mass 0."""
        x = _check_states(x, self.values)
        return self.probs.to(x.device).log()[x[:, 0], x[:, 1]]

    def entropy(self) -> float:
        """H(q) = -sum q log q in nats."""
        p = self.probs[self.probs > 0]
        return float(-(p * p.log()).sum())

    def marginals(self) -> tuple[Tensor, Tensor]:
        """(q^1, q^2): the distributions of each coordinate, (V,) each."""
        return self.probs.sum(1), self.probs.sum(0)

    def __repr__(self) -> str:
        return f"GridDistribution(name={self.name!r}, values={self.values}, lim={self.lim:g})"


def discretise(dist: Distribution | str, values: int = 32, lim: float = 5.0) -> GridDistribution:
    """q(a, b) proportional to p(c_a, c_b), the density at the cell centres of [-lim, lim]^2 (the mass outside the
    box is dropped): a 2D data set as a grid distribution."""
    dist = get_dataset(dist) if isinstance(dist, str) else dist
    if not isinstance(dist, Distribution) or dist.dim != 2:
        raise TypeError(f"dist must be a 2D fmtoy Distribution or a data set name, got {dist!r}")
    grid = GridDistribution(torch.ones(_check_values(values), values), lim)
    c = grid.centres()
    pts = torch.cartesian_prod(c, c)
    logp = dist.log_prob(pts).reshape(values, values)
    if not torch.isfinite(logp).any():
        raise ValueError(f"{dist.name} has no mass at the cell centres of [-{lim:g}, {lim:g}]^2")
    return GridDistribution((logp - logp.max()).exp(), lim, name=dist.name)


# ----------------------------------------------------------------------------------------------- the path
class MixturePath:
    """p_t(x^i | x_1^i) = (1 - kappa_t) p_0(x^i) + kappa_t delta(x^i, x_1^i), kappa_t = t^power (eq-ch11-mixture);
    p_0 uniform over the V values, or all mass on the mask token V (source="mask")."""

    def __init__(self, values: int, source: str = "uniform", power: float = 1.0) -> None:
        self.values = _check_values(values)
        self.source = check_choice("source", source, SOURCES)
        self.power = check_positive("power", power)
        if self.power < 1:
            raise ValueError(
                f"power must be >= 1 (kappa_t = t^power; below 1 the rate is infinite at t = 0), got {power}"
            )
        self.tokens = values + (source == "mask")
        self.mask = values if source == "mask" else None

    def kappa(self, t: float) -> float:
        return t**self.power

    def dkappa(self, t: float) -> float:
        return self.power * t ** (self.power - 1)

    def rate_factor(self, t: float) -> float:
        """kappa_t' / (1 - kappa_t), the speed of every conditional rate; t < 1."""
        t = _check_t(t)
        if t >= 1:
            raise ValueError("the rates kappa'/(1 - kappa) are infinite at t = 1; evaluate at t < 1")
        return self.dkappa(t) / (1.0 - self.kappa(t))

    def source_probs(self) -> Tensor:
        """p_0 over the T tokens, (T,) float64."""
        if self.mask is None:
            return torch.full((self.tokens,), 1.0 / self.values, dtype=torch.float64)
        return F.one_hot(torch.tensor(self.mask), self.tokens).double()

    def source_grid(self) -> Tensor:
        """p_0(a, b) = p_0(a) p_0(b) over the T x T states, (T, T) float64: where every chain starts."""
        s0 = self.source_probs()
        return s0[:, None] * s0[None, :]

    def conditional(self, t: float) -> Tensor:
        """K_t[a, c] = p_t(x^i = a | x_1^i = c), (T, V) float64: columns sum to 1."""
        k = self.kappa(_check_t(t))
        return (1 - k) * self.source_probs()[:, None] + k * torch.eye(self.tokens, self.values, dtype=torch.float64)

    def sample_source(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n states of p_0 = p_0 x p_0, (n, 2) long."""
        n = check_positive_int("n", n)
        dev = _device(generator, device)
        if self.mask is not None:
            return torch.full((n, 2), self.mask, dtype=torch.long, device=dev)
        return torch.randint(self.values, (n, 2), generator=generator, device=dev)

    def sample_xt(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ p_t(. | x_1) coordinate by coordinate: x_1^i with probability kappa_t, else a draw of p_0."""
        x1 = _check_states(x1, self.values, "x1")
        t = _check_model_time(t, len(x1), x1.double())
        keep = torch.rand(x1.shape, generator=generator, device=x1.device, dtype=torch.float64) < self.kappa(t)
        return torch.where(keep, x1, self.sample_source(len(x1), generator, x1.device))

    def conditional_rates(self, x: Tensor, x1: Tensor, t: float) -> Tensor:
        """u_t^i(y, x | x_1) = kappa'/(1 - kappa) (delta(y, x_1^i) - delta(y, x^i)) (eq-ch11-cond-rates), (n, 2, T)."""
        x, x1 = _check_states(x, self.tokens), _check_states(x1, self.values, "x1")
        return self.rate_factor(t) * (F.one_hot(x1, self.tokens) - F.one_hot(x, self.tokens)).double()

    def rates(self, x: Tensor, posterior: Tensor, t: float) -> Tensor:
        """The rates of a per-coordinate posterior (n, 2, V) at states x (n, 2): kappa'/(1 - kappa) (p(x_1^i = y | x)
        - delta(y, x^i)) (eq-ch11-marginal-rates), (n, 2, T); zero out of an unmasked token (mask source)."""
        return self.rate_factor(t) * (self._pad(x, posterior) - F.one_hot(x, self.tokens).double())

    def _pad(self, x: Tensor, posterior: Tensor) -> Tensor:
        """The posterior over the T tokens (mask: probability 0), and delta(., x^i) at an unmasked token (the mask
        path never leaves a data token, whatever the posterior says)."""
        post = posterior.double()
        if self.mask is None:
            return post
        post = F.pad(post, (0, 1))
        return torch.where((x == self.mask)[..., None], post, F.one_hot(x, self.tokens).double())

    def euler_step(self, x: Tensor, posterior: Tensor, t: float, h: float) -> Tensor:
        """P^i(y | x) = delta(y, x^i) + h u_t^i(y, x) (eq-ch11-euler), (n, 2, T): each coordinate, with probability
        lambda = h kappa'/(1 - kappa), is redrawn from its posterior."""
        lam = h * self.rate_factor(t)
        if lam > 1 + 1e-12:
            raise ValueError(
                f"h kappa'/(1 - kappa) = {lam:.3g} > 1 at t = {t:g}: the step is too long; take more steps"
            )
        one = F.one_hot(x, self.tokens).double()
        return (1 - lam) * one + lam * self._pad(x, posterior)

    def __repr__(self) -> str:
        return f"MixturePath(values={self.values}, source={self.source!r}, power={self.power:g})"


# ----------------------------------------------------------------------------------------------- exact objects
def all_states(tokens: int, device=None) -> Tensor:
    """Every state (a, b) of the T x T grid in row-major order, (T^2, 2) long."""
    r = torch.arange(tokens, device=device)
    return torch.cartesian_prod(r, r)


class ExactPosterior:
    """The exact posterior p(x_1^i | x_t) of a mixture path and a grid target, by enumeration: posterior(x, t) as a
    network's, the marginal p_t, the marginal rates, their flux p_t Q_t and d/dt p_t in closed form."""

    def __init__(self, path: MixturePath, target: GridDistribution) -> None:
        if not isinstance(path, MixturePath) or not isinstance(target, GridDistribution):
            raise TypeError("ExactPosterior(path, target) needs a MixturePath and a GridDistribution")
        if path.values != target.values:
            raise ValueError(f"the path has {path.values} values per coordinate, the target {target.values}")
        self.path, self.target, self._cache = path, target, {}

    def marginal(self, t: float) -> Tensor:
        """p_t(a, b) = sum_{c, d} q(c, d) K_t[a, c] K_t[b, d], (T, T) float64."""
        k = self.path.conditional(t)
        return k @ self.target.probs @ k.T

    def dmarginal(self, t: float) -> Tensor:
        """d/dt p_t in closed form: K' q K^T + K q K'^T with K' = kappa' (I - p_0 1^T), (T, T)."""
        k = self.path.conditional(t)
        dk = self.path.dkappa(_check_t(t)) * (
            torch.eye(self.path.tokens, self.path.values, dtype=torch.float64) - self.path.source_probs()[:, None]
        )
        q = self.target.probs
        return dk @ q @ k.T + k @ q @ dk.T

    def posterior_grid(self, t: float) -> Tensor:
        """[a, b, i, c] = p(x_1^i = c | x_t = (a, b)), (T, T, 2, V) float64; at a state of p_t-mass 0 (never
        visited), the data marginal q^i."""
        t = _check_t(t)
        if t not in self._cache:
            k, q = self.path.conditional(t), self.target.probs
            num1 = torch.einsum("ac,cb->abc", k, q @ k.T)  # sum_d q(c, d) K[a, c] K[b, d]
            num2 = torch.einsum("bd,ad->abd", k, k @ q)
            p = num1.sum(-1, keepdim=True)
            ok = p > 0
            q1, q2 = self.target.marginals()
            post1 = torch.where(ok, num1 / p.clamp_min(1e-300), q1)
            post2 = torch.where(ok, num2 / p.clamp_min(1e-300), q2)
            self._cache = {t: torch.stack([post1, post2], dim=2)}  # one time at a time: a sampler's step
        return self._cache[t]

    def joint_posterior_grid(self, t: float) -> Tensor:
        """[a, b, c, d] = p(x_1 = (c, d) | x_t = (a, b)), (T, T, V, V): the posterior a per-coordinate model
        factorises."""
        k, q = self.path.conditional(t), self.target.probs
        num = torch.einsum("ac,cd,bd->abcd", k, q, k)
        p = num.sum((2, 3), keepdim=True)
        return torch.where(p > 0, num / p.clamp_min(1e-300), q)

    def __call__(self, x: Tensor, t: float) -> Tensor:
        """p(x_1^i = c | x_t = x) for states x (n, 2): (n, 2, V), like PosteriorMLP.posterior."""
        x = _check_states(x, self.path.tokens)
        return self.posterior_grid(t).to(x.device)[x[:, 0], x[:, 1]]

    def rates(self, x: Tensor, t: float) -> Tensor:
        """The marginal rates u_t^i(y, x) (eq-ch11-marginal-rates), (n, 2, T)."""
        x = _check_states(x, self.path.tokens)
        return self.path.rates(x, self(x, t), t)

    def flux(self, t: float, p: Tensor | None = None) -> Tensor:
        """(p Q_t)(y) = sum_x p(x) Q_t(x, y) for the marginal generator Q_t (one coordinate jumps at a time), (T, T);
        p defaults to p_t, where the Kolmogorov equation says it is d/dt p_t."""
        return apply_generator(self.rates(all_states(self.path.tokens), t), self.marginal(t) if p is None else p)


def apply_generator(rates: Tensor, p: Tensor) -> Tensor:
    """p Q for the generator Q((a, b) -> (y, b)) = u^1(y, (a, b)), Q((a, b) -> (a, y)) = u^2(y, (a, b)), from the
    per-coordinate rates (T^2, 2, T) of all states (row-major); p (T, T)."""
    tokens = p.shape[0]
    u = rates.reshape(tokens, tokens, 2, tokens)
    return torch.einsum("ad,adc->cd", p, u[:, :, 0]) + torch.einsum("cb,cbd->cd", p, u[:, :, 1])


@under_policy
def average_conditional_rates(
    path: MixturePath, target: GridDistribution, t: float, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Monte Carlo of the marginalization trick without the posterior: n pairs x_1 ~ q, x_t ~ p_t(. | x_1), and at each
    state the mean of the conditional rates u_t(., x | x_1) over the pairs that landed there. ((T^2, 2, T) mean
    rates, (T^2,) counts); a state no pair reached has rates 0."""
    x1 = target.sample(check_positive_int("n", n), generator)
    xt = path.sample_xt(x1, torch.full((n,), _check_t(t)), generator)
    tk = path.tokens
    state = xt[:, 0] * tk + xt[:, 1]
    counts = torch.bincount(state, minlength=tk * tk)
    hits = torch.stack([torch.bincount(state * tk + x1[:, i], minlength=tk**3) for i in (0, 1)], dim=1)
    freq = hits.reshape(tk * tk, tk, 2).transpose(1, 2).double() / counts.clamp_min(1)[:, None, None]
    seen = (counts > 0)[:, None, None]
    return torch.where(seen, path.rate_factor(t) * (freq - F.one_hot(all_states(tk), tk).double()), 0.0), counts


@under_policy
def monte_carlo_rate_check(
    exact: ExactPosterior, t: float, n: int, generator: torch.Generator | None = None, min_count: float = 5.0
) -> dict[str, float]:
    """average_conditional_rates against the enumerated rates: each entry's error over its binomial standard error
    (entries with count p (1 - p) > min_count, where the binomial is near normal). {"entries", "mean z^2" (near 1 if
    the marginalization trick holds), "largest error" (over all states reached; falls like 1 / sqrt(n))}."""
    path = exact.path
    avg, counts = average_conditional_rates(path, exact.target, t, n, generator)
    states = all_states(path.tokens)
    rate, f = exact.rates(states, t), path.rate_factor(t)
    post = path._pad(states, exact(states, t))
    var, reached = post * (1 - post), counts[:, None, None]
    ok = reached * var > min_count
    z = ((avg - rate) / (f * (var / reached.clamp_min(1)).sqrt()))[ok]
    return {
        "entries": int(ok.sum()),
        "mean z^2": float(z.square().mean()),
        "largest error": float((avg - rate).abs()[counts > 0].max()),
    }


def kolmogorov_solve(
    exact: ExactPosterior, steps: int, method: str = "midpoint", threads: str | int | None = None
) -> Tensor:
    """p_1 from p_0 by integrating d/dt p = p Q_t (the exact marginal generator) with `steps` Euler or midpoint
    steps; neither evaluates the rates at t = 1. (T, T) float64. threads: as propagate."""
    steps, method = check_positive_int("steps", steps), check_choice("method", method, ("euler", "midpoint"))
    p, h = exact.path.source_grid(), 1.0 / steps
    with thread_policy(threads) as tuner:
        for k in range(steps):
            t = k * h
            if method == "euler":
                p = p + h * exact.flux(t, p)
            else:
                p = p + h * exact.flux(t + h / 2, p + h / 2 * exact.flux(t, p))
            tuner.tick()
    return p


# ----------------------------------------------------------------------------------------------- samplers
def as_posterior(model) -> Posterior:
    """posterior(x, t) -> (n, 2, V) probabilities: ExactPosterior itself, or a PosteriorMLP's softmax (no grad)."""
    if isinstance(model, ExactPosterior):
        return model
    if isinstance(model, PosteriorMLP):

        def posterior(x: Tensor, t: float) -> Tensor:
            with torch.no_grad():
                return model.posterior(x.to(model.device), t).to(x.device)

        return posterior
    if callable(model):
        return model
    raise TypeError(f"model must be an ExactPosterior, a PosteriorMLP or a callable (x, t), got {type(model).__name__}")


def time_grid(steps: int) -> list[float]:
    """t_k = k / steps, k = 0 ... steps - 1: the left ends of a sampler's steps (t = 1 is never evaluated)."""
    steps = check_positive_int("steps", steps)
    return [k / steps for k in range(steps)]


def sample_ctmc(
    model,
    path: MixturePath,
    x0: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    threads: str | int | None = None,
) -> Tensor:
    """Euler sampling of the CTMC (eq-ch11-euler): at t_k = k / steps every coordinate independently draws its next
    token from P^i(. | x_k); one posterior call per step. (n, 2) long, or (steps + 1, n, 2). threads: as propagate."""
    post_fn, x = as_posterior(model), _check_states(x0, path.tokens, "x0")
    traj, h = [x], 1.0 / check_positive_int("steps", steps)
    with thread_policy(threads, x.device) as tuner:
        for t in time_grid(steps):
            probs = path.euler_step(x, post_fn(x, t), t, h)
            x = torch.multinomial(probs.reshape(-1, path.tokens).float(), 1, generator=generator).reshape(x.shape)
            traj.append(x)
            tuner.tick()
    return torch.stack(traj) if return_trajectory else x


def propagate(
    model,
    path: MixturePath,
    steps: int,
    joint: bool = False,
    return_all: bool = False,
    threads: str | int | None = None,
) -> Tensor | list[Tensor]:
    """The exact distribution (T, T) of sample_ctmc's output from p_0, by pushing the distribution over all T^2
    states through each step (no sampling): p_{k+1}(c, d) = sum_{a, b} p_k(a, b) P^1(c | a, b) P^2(d | a, b).
    joint=True (an ExactPosterior only): redraw the coordinates from the joint posterior p(x_1 | x_t) instead of
    the product of its marginals. return_all: [p_0, ..., p_steps]. threads: the CPU thread policy (fmtoy.threads)."""
    post_fn, h = as_posterior(model), 1.0 / check_positive_int("steps", steps)
    if joint and not isinstance(model, ExactPosterior):
        raise TypeError("joint=True needs the ExactPosterior (a per-coordinate model has no joint posterior)")
    states, tk = all_states(path.tokens), path.tokens
    p, out = path.source_grid(), []
    with thread_policy(threads) as tuner:
        for t in time_grid(steps):
            out.append(p)
            post = post_fn(states, t)
            step = path.euler_step(states, post, t, h).reshape(tk, tk, 2, tk)
            p = torch.einsum("ab,abc,abd->cd", out[-1], step[:, :, 0], step[:, :, 1])
            if joint:  # both coordinates jump with probability lam^2: from p(x_1 | x_t), not the product of marginals
                lam2, pad = (h * path.rate_factor(t)) ** 2, path._pad(states, post).reshape(tk, tk, 2, tk)
                jp = F.pad(model.joint_posterior_grid(t), (0, tk - path.values, 0, tk - path.values))
                p = p + lam2 * (
                    torch.einsum("ab,abcd->cd", out[-1], jp)
                    - torch.einsum("ab,abc,abd->cd", out[-1], pad[:, :, 0], pad[:, :, 1])
                )
            tuner.tick()
    out.append(p)
    return out if return_all else p


# ----------------------------------------------------------------------------------------------- distances
def _on_tokens(q: GridDistribution | Tensor, tokens: int) -> Tensor:
    probs = q.probs if isinstance(q, GridDistribution) else torch.as_tensor(q, dtype=torch.float64)
    pad = tokens - probs.shape[0]
    return F.pad(probs, (0, pad, 0, pad)) if pad > 0 else probs


def total_variation(p: Tensor, q: GridDistribution | Tensor) -> float:
    """TV(p, q) = (1/2) sum_x |p(x) - q(x)| over the grid states (a mask state has q = 0)."""
    q = _on_tokens(q, p.shape[0])
    return 0.5 * float((p.double() - q).abs().sum())


def kl_divergence(q: GridDistribution | Tensor, p: Tensor) -> float:
    """KL(q || p) = sum_x q(x) log(q(x) / p(x)) in nats: the target's excess cross-entropy under the model's exact
    output distribution p (inf if p misses a state of q)."""
    q = _on_tokens(q, p.shape[0])
    on = q > 0
    if (p[on] <= 0).any():
        return math.inf
    return float((q[on] * (q[on].log() - p.double()[on].log())).sum())


# ----------------------------------------------------------------------------------------------- the network
class PosteriorMLP(nn.Module):
    """p_theta(x_1^i | x_t, t) = softmax_i(MLP([e(x_t^1), e(x_t^2), gamma(t)])): one (V,) distribution per
    coordinate, the discrete denoiser (eq-ch11-loss)."""

    def __init__(
        self,
        values: int,
        tokens: int | None = None,
        hidden: int = 128,
        depth: int = 3,
        embed: int = 16,
        time_features: int = 32,
        dim: int = 2,
    ) -> None:
        super().__init__()
        self.values = _check_values(values)
        self.tokens = values if tokens is None else tokens
        if self.tokens not in (values, values + 1):
            raise ValueError(f"tokens must be values ({values}) or values + 1 (a mask token), got {tokens!r}")
        self.dim = check_positive_int("dim", dim)
        self.embed = nn.Embedding(self.dim * self.tokens, check_positive_int("embed", embed))
        self.register_buffer("freqs", time_frequencies(time_features), persistent=False)
        layers: list[nn.Module] = []
        width = self.dim * embed + 1 + time_features
        for _ in range(check_positive_int("depth", depth)):
            layers += [nn.Linear(width, check_positive_int("hidden", hidden)), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, self.dim * values))
        self.net = nn.Sequential(*layers)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        """Logits (n, dim, V) of p_theta(x_1^i = c | x_t = x, t)."""
        x = _check_states(x, self.tokens) if self.dim == 2 else x.long()
        offset = torch.arange(self.dim, device=x.device) * self.tokens
        e = self.embed(x + offset).flatten(1)
        tt = _check_model_time(t, len(x), e)
        return self.net(torch.cat([e, fourier_time(tt, self.freqs)], dim=1)).reshape(-1, self.dim, self.values)

    def posterior(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The probabilities (n, dim, V), float64."""
        return self(x, t).double().softmax(-1)


def discrete_fm_loss(model: nn.Module, x1: Tensor, xt: Tensor, t: Tensor, path: MixturePath) -> Tensor:
    """E[sum_i -log p_theta(x_1^i | x_t, t)] over the coordinates that carry information (eq-ch11-loss): all for a
    uniform source, the masked ones for a masked source (an unmasked token is x_1^i itself)."""
    logits = model(xt, t)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x1.reshape(-1), reduction="none").reshape(x1.shape)
    if path.mask is not None:
        nll = nll * (xt == path.mask)
    return nll.sum(1).mean()


def fit_discrete(
    model: PosteriorMLP, target: GridDistribution, path: MixturePath, *, progress: bool = False, **options
) -> FitResult:
    """discrete_fm_loss minimised with fmtoy.train.fit; each step draws x_1 ~ q, t ~ U[0, 1), x_t ~ p_t(. | x_1).
    options: the loop's (fmtoy.train.FitConfig: steps, batch_size, lr = 3e-3, lr_schedule, seed, device, threads)."""
    if not isinstance(model, PosteriorMLP):
        raise TypeError(f"model must be a fmtoy.methods.discrete.PosteriorMLP, got {type(model).__name__}")
    if not isinstance(target, GridDistribution) or not isinstance(path, MixturePath):
        raise TypeError("fit_discrete(model, target, path) needs a GridDistribution target and a MixturePath")
    if (model.values, model.tokens) != (path.values, path.tokens) or target.values != path.values:
        raise ValueError(
            f"the model has {model.values} values and {model.tokens} tokens, the path {path.values} and "
            f"{path.tokens}, the target {target.values} values: they must agree"
        )
    config = fit_options(options, lr=3e-3)

    def loss_fn(ctx: FitContext) -> Tensor:
        x1 = target.sample(ctx.batch_size, ctx.generator)
        t = torch.rand(ctx.batch_size, generator=ctx.generator, device=ctx.device)
        return discrete_fm_loss(model, x1, path.sample_xt(x1, t, ctx.generator), t, path)

    return fit(model, loss_fn, config, name="discrete", progress=progress)


@dataclass
class DiscreteConfig(RecipeConfig):
    """A discrete flow-matching recipe for train_discrete: config.data discretised on a values x values grid of
    [-lim, lim]^2, the mixture path with kappa_t = t^power from a uniform or masked source."""

    steps: int = 2000
    batch_size: int = 256
    values: int = 32
    lim: float = 5.0
    source: str = "uniform"
    power: float = 1.0
    embed: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        MixturePath(self.values, self.source, self.power)
        check_positive("lim", self.lim)
        check_positive_int("embed", self.embed)

    def build(self) -> tuple[GridDistribution, MixturePath]:
        """(target, path) of this recipe."""
        return discretise(self.data, self.values, self.lim), MixturePath(self.values, self.source, self.power)


def initial_model(config: DiscreteConfig) -> PosteriorMLP:
    """The PosteriorMLP that train_discrete(config) starts from, initialised from torch.manual_seed(config.seed) (the
    global RNG is left untouched)."""
    check_config(config, DiscreteConfig)
    tokens = config.values + (config.source == "mask")
    return build_model(config, 2, PosteriorMLP, values=config.values, tokens=tokens, embed=config.embed)


def train_discrete(config: DiscreteConfig, progress: bool = False) -> FitResult:
    """Train initial_model(config) on config's grid and path with fit_discrete: the whole recipe in one call."""
    check_config(config, DiscreteConfig)
    target, path = config.build()
    return run_config(fit_discrete, config, initial_model(config), target, path, progress=progress)


__all__ = [
    "SOURCES",
    "GridDistribution",
    "discretise",
    "MixturePath",
    "all_states",
    "ExactPosterior",
    "apply_generator",
    "average_conditional_rates",
    "monte_carlo_rate_check",
    "kolmogorov_solve",
    "as_posterior",
    "time_grid",
    "sample_ctmc",
    "propagate",
    "total_variation",
    "kl_divergence",
    "PosteriorMLP",
    "discrete_fm_loss",
    "fit_discrete",
    "DiscreteConfig",
    "initial_model",
    "train_discrete",
]
