"""The same CFM training step and ODE likelihood built on the peer libraries (benchmark only, never used by fmtoy).

Peers: Meta's `flow_matching` (CC BY-NC; AffineProbPath + CondOTScheduler, ODESolver) and TorchCFM (MIT;
ConditionalFlowMatcher(sigma=0)). They are optional: `available()` says which are importable.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Callable

import torch
from torch import Tensor

PEERS = ("flow_matching", "torchcfm")


def available() -> dict[str, str | None]:
    """Version string of each peer library, or None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in PEERS:
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError:
            out[name] = None
    return out


def target_fn(peer: str) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(x0, x1, t) -> (x_t, regression target) for CondOT (x_t = (1-t) x0 + t x1, target x1 - x0) via `peer`."""
    if peer == "flow_matching":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())

        def meta(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            s = path.sample(t=t, x_0=x0, x_1=x1)
            return s.x_t, s.dx_t

        return meta
    if peer == "torchcfm":
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        fm = ConditionalFlowMatcher(sigma=0.0)

        def cfm(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            _, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
            return xt, ut

        return cfm
    raise ValueError(f"unknown peer {peer!r}; allowed: {', '.join(PEERS)}")


def peer_loss(model: Callable, x0: Tensor, x1: Tensor, t: Tensor, peer: str) -> Tensor:
    """CFM loss mean_b ||v(x_t, t) - target||^2 with x_t and the target computed by `peer` (fmtoy's convention)."""
    xt, target = target_fn(peer)(x0, x1, t)
    return (model(xt, t) - target).pow(2).sum(-1).mean()


def train_peer(
    peer: str,
    model: torch.nn.Module,
    target,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    lr_schedule: str = "cosine",
) -> float:
    """The CFM training loop a peer user writes (N(0, I) source, t ~ U[0, 1]) with fmtoy's optimizer settings
    (fused Adam, same lr schedule), the path sampling and target done by `peer`; returns wall seconds."""
    step_targets = target_fn(peer)
    if lr_schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; allowed: constant, cosine, linear")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x1 = target.sample(batch_size, generator=g)
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(batch_size, generator=g)
        xt, ut = step_targets(x0, x1, t)
        loss = (model(xt, t) - ut).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if lr_schedule != "constant":
            f = 0.5 * (1 + math.cos(math.pi * step / steps)) if lr_schedule == "cosine" else 1 - step / steps
            for group in opt.param_groups:
                group["lr"] = lr * f
        opt.step()
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{peer} training diverged (loss {loss.item()})")
    return seconds


class _TimeVector(torch.nn.Module):
    """Wrap v(x, t_vec) for flow_matching's ODESolver, which calls v(x=x, t=<0-d tensor>)."""

    def __init__(self, velocity: Callable) -> None:
        super().__init__()
        self.velocity = velocity

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.velocity(x, t.to(x.dtype).reshape(-1).expand(x.shape[0]))


def meta_log_likelihood(
    velocity: Callable, x1: Tensor, log_p0: Callable[[Tensor], Tensor], *, steps: int, method: str = "midpoint"
) -> Tensor:
    """log p_1(x1) by flow_matching's ODESolver.compute_likelihood (exact divergence, fixed grid of `steps` steps)."""
    from flow_matching.solver import ODESolver

    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=x1.dtype)  # step_size=None: torchdiffeq steps on this grid
    _, logp = ODESolver(velocity_model=_TimeVector(velocity)).compute_likelihood(
        x_1=x1, log_p0=log_p0, step_size=None, method=method, time_grid=grid, exact_divergence=True
    )
    return logp.detach()
