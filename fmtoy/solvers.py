"""Fixed-step ODE solvers for dx/dt = v_t(x), the flow map Phi_{s->t}, the divergence of a field, and exact
log-likelihoods of a flow.

Sampling integrates the flow ODE from t=0 (source) to t=1 (data). The log-likelihood uses the instantaneous
change of variables, d/dt log p_t(x_t) = -div v_t(x_t), integrated backwards from t=1 to t=0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._checks import (
    check_choice,
    check_generator,
    check_points,
    check_positive_int,
    check_time,
    check_unit_time,
    check_velocity_output,
)
from .threads import thread_policy

Velocity = Callable[[Tensor, Tensor], Tensor]  # v(x, t): x (n, d), t (n,) -> (n, d)
Field = Callable[[Tensor, float], Tensor]  # the same field with a scalar time, as the steps below use it

SOLVERS = ("euler", "midpoint", "rk4")
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}  # velocity evaluations per step
DIVERGENCES = ("exact", "hutchinson")


# ----------------------------------------------------------------------------------------------- one step each
def euler_step(f: Field, x: Tensor, t: float, t_next: float) -> Tensor:
    """Explicit Euler, order 1: x_{k+1} = x_k + h v(x_k, t_k), h = t_{k+1} - t_k."""
    h = t_next - t
    return x + h * f(x, t)


def midpoint_step(f: Field, x: Tensor, t: float, t_next: float) -> Tensor:
    """Explicit midpoint, order 2: x_{k+1} = x_k + h v(x_k + h/2 v(x_k, t_k), t_k + h/2)."""
    h, t_mid = t_next - t, 0.5 * (t + t_next)
    return x + h * f(x + 0.5 * h * f(x, t), t_mid)


def rk4_step(f: Field, x: Tensor, t: float, t_next: float) -> Tensor:
    """Classical Runge-Kutta, order 4: x_{k+1} = x_k + h/6 (k1 + 2 k2 + 2 k3 + k4)."""
    h, t_mid = t_next - t, 0.5 * (t + t_next)
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t_mid)
    k3 = f(x + 0.5 * h * k2, t_mid)
    k4 = f(x + h * k3, t_next)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


STEP_FUNCTIONS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}


# ----------------------------------------------------------------------------------------------- validation
def _check_velocity(velocity) -> None:
    if not callable(velocity):
        raise TypeError(f"velocity must be a callable v(x, t) -> (n, d), got {type(velocity).__name__}")


def nfe(method: str, steps: int) -> int:
    """Number of velocity evaluations of `steps` fixed steps: 1 (euler), 2 (midpoint) or 4 (rk4) per step."""
    check_choice("solver", method, SOLVERS)
    return STAGES[method] * check_positive_int("steps", steps)


def steps_for_nfe(method: str, nfe: int, exact: bool = True) -> int:
    """Fixed steps of `method` that spend `nfe` velocity evaluations: nfe / stages (1 euler, 2 midpoint, 4 rk4);
    exact=False rounds down (at least one step) instead of refusing an nfe that is not a multiple of the stages."""
    check_choice("solver", method, SOLVERS)
    nfe, per = check_positive_int("nfe", nfe), STAGES[method]
    if exact and nfe % per:
        raise ValueError(f"{method} spends {per} evaluations per step, so nfe must be a multiple of {per}, got {nfe}")
    return max(1, nfe // per)


# ----------------------------------------------------------------------------------------------- integration
def integrate(
    velocity: Velocity,
    x0: Tensor,
    steps: int,
    method: str = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    grad: bool = False,
    threads: str | int | None = None,
) -> Tensor:
    """Solve dx/dt = v_t(x) from x(t0) = x0 to t1 (backwards if t1 < t0): the flow phi_t (chapter 1, the flow ODE).

    Returns x(t1), shape (n, d), or the trajectory x(t_0..t_steps), shape (steps + 1, n, d).
    Runs under torch.no_grad unless grad=True, with fmtoy's CPU thread policy (fmtoy.threads).
    """
    _check_velocity(velocity)
    x0 = check_points(x0, name="x0")
    steps = check_positive_int("steps", steps)
    step = STEP_FUNCTIONS[check_choice("solver", method, SOLVERS)]
    t0, t1 = check_unit_time("t0", t0), check_unit_time("t1", t1)
    n = x0.shape[0]

    def f(x: Tensor, t: float) -> Tensor:
        return check_velocity_output(velocity(x, x.new_full((n,), t)), x)

    times = [t0 + (t1 - t0) * k / steps for k in range(steps)] + [t1]
    with torch.enable_grad() if grad else torch.no_grad(), thread_policy(threads, x0.device) as tuner:
        x, trajectory = x0, [x0]
        for k in range(steps):
            tuner.tick()
            x = step(f, x, times[k], times[k + 1])
            if return_trajectory:
                trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


def flow_map(
    velocity: Velocity,
    x: Tensor,
    s: float | Tensor,
    t: float | Tensor,
    steps: int | None = None,
    method: str = "rk4",
    steps_per_unit: int = 256,
    threads: str | int | None = None,
) -> Tensor:
    """The flow map Phi_{s->t}(x) of dx/dr = v_r(x) (ch. 10), row by row: s and t are numbers or tensors (n,).

    Shared s, t: integrate from s to t. Per-row times: on the clock r = s + tau (t - s), tau from 0 to 1,
    dx/dtau = (t - s) v_{s + tau (t - s)}(x), so every row takes the same number of steps over its own interval.
    steps defaults to ceil(max |t - s| * steps_per_unit) (at least 1); s = t returns x.
    """
    _check_velocity(velocity)
    x = check_points(x)
    n = x.shape[0]
    times = []
    for name, v in (("s", s), ("t", t)):
        if isinstance(v, Tensor) and v.numel() > 1:
            times.append(check_time(v, n, like=x).reshape(n))
        else:
            times.append(check_unit_time(name, v))
    s, t = times
    if steps is None:  # (a device sync for per-row times: only when the caller leaves the step count to us)
        span = float((t - s).abs().max()) if isinstance(s, Tensor) or isinstance(t, Tensor) else abs(t - s)
        steps = max(1, math.ceil(span * check_positive_int("steps_per_unit", steps_per_unit) - 1e-9))
    steps = check_positive_int("steps", steps)
    if not isinstance(s, Tensor) and not isinstance(t, Tensor):
        return x.clone() if s == t else integrate(velocity, x, steps, method, s, t, threads=threads)
    s = s if isinstance(s, Tensor) else x.new_full((n,), s)
    t = t if isinstance(t, Tensor) else x.new_full((n,), t)
    length = (t - s).to(x.dtype)

    def rescaled(y: Tensor, tau: Tensor) -> Tensor:
        return length[:, None] * velocity(y, s + tau * length)

    return integrate(rescaled, x, steps, method, 0.0, 1.0, threads=threads)


def integrate_average(
    average: Callable[[Tensor, Tensor, Tensor], Tensor],
    x0: Tensor,
    steps: int,
    return_trajectory: bool = False,
    threads: str | int | None = None,
) -> Tensor:
    """N steps of an average-velocity model s(x, t, d) (shortcut, MeanFlow; ch. 6): x_{t+d} = x_t + d s(x_t, t, d),
    d = 1/N, t = 0, d, ..., 1 - d (one call per step), under torch.no_grad and the CPU thread policy."""
    if not callable(average):
        raise TypeError(f"the model must be a callable s(x, t, d) -> (n, d), got {type(average).__name__}")
    x = check_points(x0, name="x0")
    steps = check_positive_int("steps", steps)
    n, d = x.shape[0], 1.0 / steps
    dvec = x.new_full((n,), d)
    trajectory = [x]
    with torch.no_grad(), thread_policy(threads, x.device) as tuner:
        for i in range(steps):
            tuner.tick()
            x = x + d * check_velocity_output(average(x, x.new_full((n,), i * d), dvec), x)
            if return_trajectory:
                trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


def sample(
    velocity: Velocity,
    source,
    n: int,
    steps: int = 100,
    method: str = "euler",
    generator: torch.Generator | None = None,
    device=None,
    return_trajectory: bool = False,
) -> Tensor:
    """Draw x_0 ~ p_0 = source and push it through the flow: x_1 = psi_1(x_0) ~ p_1 (integrate from 0 to 1)."""
    if not hasattr(source, "sample"):
        raise TypeError(
            f"source must be a fmtoy Distribution with .sample(n, generator, device), got {type(source).__name__}"
        )
    x0 = source.sample(n, generator, device)
    return integrate(velocity, x0, steps, method, 0.0, 1.0, return_trajectory)


# ----------------------------------------------------------------------------------------------- divergence
def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Probes with iid entries +-1 (prob 1/2 each): E[eps eps^T] = I, Hutchinson's estimator."""
    check_generator(generator, like.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return bits.to(like.dtype).mul_(2).sub_(1)


def _time_vector(t: float | Tensor, n: int, like: Tensor) -> Tensor:
    """t (float, 0-d, (n,) or (n, 1)) checked to lie in [0, 1], as the (n,) vector velocity fields take."""
    return check_time(t, n, like=like).expand(n, 1).reshape(n).contiguous()


def _velocity_and_divergence(
    velocity: Velocity, x: Tensor, t: Tensor, probes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """v_t(x) and div v_t(x) from one forward pass: exact, or Hutchinson with probes (K, n, d); both detached.

    Gradients are taken with respect to x only, so parameters' .grad is never touched."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = check_velocity_output(velocity(x, t), x)
        if not v.requires_grad:
            raise ValueError(
                "velocity(x, t) is not differentiable in x (was it computed under torch.no_grad or "
                "detached?); the divergence needs autograd through the field"
            )
        div = x.new_zeros(x.shape[0])
        if probes is None:  # tr(J) = sum_i d v_i / d x_i: one vector-Jacobian product per coordinate
            d = x.shape[1]
            for i in range(d):
                (g,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < d - 1, materialize_grads=True)
                div += g[:, i]
        else:  # eps^T J eps, averaged over the K probes
            k = probes.shape[0]
            for j in range(k):
                (g,) = torch.autograd.grad(v, x, probes[j], retain_graph=j < k - 1, materialize_grads=True)
                div += (g * probes[j]).sum(1)
            div /= k
    return v.detach(), div


def divergence(
    velocity: Velocity,
    x: Tensor,
    t: float | Tensor,
    method: str = "exact",
    generator: torch.Generator | None = None,
    n_probes: int = 1,
) -> Tensor:
    """div v_t(x) = tr(dv_t/dx), shape (n,): exact (autograd) or Hutchinson E[eps^T (dv_t/dx) eps], eps = +-1."""
    _check_velocity(velocity)
    x = check_points(x)
    check_choice("divergence method", method, DIVERGENCES)
    n_probes = check_positive_int("n_probes", n_probes)
    n = x.shape[0]
    t = _time_vector(t, n, x)
    probes = None if method == "exact" else _rademacher((n_probes, *x.shape), x, generator)
    return _velocity_and_divergence(velocity, x, t, probes)[1]


# ----------------------------------------------------------------------------------------------- likelihood
def log_likelihood(
    velocity: Velocity,
    x1: Tensor,
    source,
    steps: int = 50,
    method: str = "rk4",
    divergence: str = "exact",
    generator: torch.Generator | None = None,
    n_probes: int = 1,
) -> Tensor:
    """log p_1(x_1) = log p_0(x_0) - int_0^1 div v_t(x_t) dt (instantaneous change of variables, thm-inst-cov).

    The augmented state (x_t, l_t) with dl/dt = div v_t(x_t), l_1 = 0 is integrated backwards from t=1 to t=0
    (velocity and divergence from one forward pass per stage), so log p_1(x_1) = log p_0(x_0) + l_0. Shape (n,).
    Hutchinson probes are drawn once per call and reused along the path (as in FFJORD).
    """
    _check_velocity(velocity)
    if not hasattr(source, "log_prob"):
        raise TypeError(f"source must be a fmtoy Distribution with .log_prob(x), got {type(source).__name__}")
    x1 = check_points(x1, getattr(source, "dim", None), name="x1")
    check_choice("divergence method", divergence, DIVERGENCES)
    n_probes = check_positive_int("n_probes", n_probes)
    n, d = x1.shape
    probes = None if divergence == "exact" else _rademacher((n_probes, n, d), x1, generator)

    def augmented(z: Tensor, t: Tensor) -> Tensor:
        v, div = _velocity_and_divergence(velocity, z[:, :d], t, probes)
        return torch.cat([v.to(z.dtype), div[:, None]], dim=1)

    z1 = torch.cat([x1.detach(), x1.new_zeros(n, 1)], dim=1)
    z0 = integrate(augmented, z1, steps, method, t0=1.0, t1=0.0)
    return source.log_prob(z0[:, :d]) + z0[:, d]
