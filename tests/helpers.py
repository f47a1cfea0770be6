"""Shared test helpers (imported by the test modules): one batch drawer, one small-model factory and one
`fmtoy sample` runner. Seeded
generators come from fmtoy.device.make_generator; a chapter's exercise solutions from the `solutions` fixture."""

from __future__ import annotations

import torch
from torch import nn

from fmtoy.data import Distribution, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.models import VelocityMLP


def draw_batch(
    n: int, seed: int = 0, target: Distribution | None = None, path=None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, x1, t): x1 ~ target (eight Gaussians), x0 ~ N(0, I), t ~ U[path.t_min, path.t_max) (U[0, 1) without a
    path), drawn in that order (x1, x0, t) from one generator seeded with `seed`."""
    target = eight_gaussians() if target is None else target
    g = make_generator(seed)
    x1 = target.sample(n, generator=g).to(dtype)
    x0 = torch.randn(n, target.dim, generator=g, dtype=dtype)
    lo, hi = (0.0, 1.0) if path is None else (path.t_min, path.t_max)
    return x0, x1, lo + (hi - lo) * torch.rand(n, generator=g, dtype=dtype)


def small_model(
    seed: int = 0, cls: type[nn.Module] = VelocityMLP, hidden: int = 32, depth: int = 2, **kwargs
) -> nn.Module:
    """cls(hidden=32, depth=2, **kwargs) initialised after torch.manual_seed(seed): a network that trains in ms."""
    torch.manual_seed(seed)
    return cls(hidden=hidden, depth=depth, **kwargs)


def sample_run(run, out, *options: str) -> None:
    """`fmtoy sample --run RUN --out OUT --device cpu OPTIONS...` in this process; it must exit 0."""
    from fmtoy.cli import main

    assert main(["sample", "--run", str(run), "--out", str(out), "--device", "cpu", *options]) == 0
