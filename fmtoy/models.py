"""The learned velocity field v_theta(x, t [, c]): a small MLP on [x, Fourier(t), embed(c)] with SiLU activations."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._checks import check_points, check_positive_int


def _check_model_time(t: float | Tensor, n: int, like: Tensor) -> Tensor:
    """Return t as an (n, 1) tensor; accepts a float, a 0-d tensor, (n,) or (n, 1). Shapes only: no device sync."""
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or have shape (n,) or (n, 1), got {tuple(t.shape)}")
    if t.ndim == 1 and t.shape[0] not in (1, n):
        raise ValueError(f"t has {t.shape[0]} entries but x has {n} rows")
    return t.reshape(-1, 1).expand(n, 1)


def time_frequencies(time_features: int) -> Tensor:
    """2 pi f_k for time_features / 2 geometric frequencies f_k from 0.5 to 32 cycles per unit time: smooth enough for
    coarse ODE steps. time_features: a positive even integer (sin and cos pairs), else ValueError."""
    check_positive_int("time_features", time_features)
    if time_features % 2:
        raise ValueError(f"time_features must be even (sin and cos pairs), got {time_features}")
    return 2 * math.pi * torch.logspace(math.log10(0.5), math.log10(32.0), time_features // 2)


def fourier_time(t: Tensor, freqs: Tensor) -> Tensor:
    """gamma(t) = [t, sin(2 pi f t), cos(2 pi f t)] for t of shape (n, 1); shape (n, 1 + 2 len(freqs))."""
    a = t * freqs
    return torch.cat([t, a.sin(), a.cos()], dim=1)


class VelocityMLP(nn.Module):
    """v_theta(x, t, c) = MLP([x, gamma(t), e(c)]), gamma(t) = (t, sin(2 pi f_k t), cos(2 pi f_k t)): the CFM
    regressor."""

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 3, time_features: int = 32, cond_dim: int = 0
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.hidden = check_positive_int("hidden", hidden)
        self.depth = check_positive_int("depth", depth)
        self.time_features, freqs = time_features, time_frequencies(time_features)
        if isinstance(cond_dim, bool) or not isinstance(cond_dim, int) or cond_dim < 0:
            raise ValueError(f"cond_dim must be an integer >= 0 (0: no conditioning input), got {cond_dim!r}")
        self.cond_dim = cond_dim
        self.register_buffer("freqs", freqs, persistent=False)
        cond_width = time_features if cond_dim else 0
        self.cond_embed = (
            nn.Sequential(nn.Linear(cond_dim, cond_width), nn.SiLU(), nn.Linear(cond_width, cond_width))
            if cond_dim
            else None
        )
        layers: list[nn.Module] = []
        width = dim + 1 + time_features + cond_width
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def time_embedding(self, t: Tensor) -> Tensor:
        """gamma(t) = [t, sin(2 pi f t), cos(2 pi f t)] for t of shape (n, 1); shape (n, 1 + time_features)."""
        return fourier_time(t, self.freqs)

    def forward(self, x: Tensor, t: float | Tensor, cond: Tensor | float | None = None) -> Tensor:
        """Velocity v_theta(x, t[, cond]) of shape (n, dim), in the dtype of x (computed in the weights' dtype)."""
        x = check_points(x, self.dim)
        n, out_dtype = x.shape[0], x.dtype
        w = self.net[0].weight
        h = x.to(w.dtype)
        parts = [h, self.time_embedding(_check_model_time(t, n, h))]
        if self.cond_embed is None:
            if cond is not None:
                raise ValueError(
                    "this model has cond_dim=0 (no conditioning input) but cond was given; "
                    "build it with VelocityMLP(cond_dim=...) to condition on an extra input"
                )
        else:
            parts.append(self.cond_embed(self._check_cond(cond, n, h)))
        return self.net(torch.cat(parts, dim=1)).to(out_dtype)

    def _check_cond(self, cond: Tensor | float | None, n: int, like: Tensor) -> Tensor:
        """Return cond as (n, cond_dim); a scalar (or (n,) when cond_dim == 1) is broadcast."""
        if cond is None:
            raise ValueError(
                f"this model was built with cond_dim={self.cond_dim} and needs cond of shape "
                f"(n, {self.cond_dim}); got cond=None"
            )
        if isinstance(cond, bool) or not isinstance(cond, (int, float, Tensor)):
            raise TypeError(f"cond must be a float or a tensor, got {type(cond).__name__}")
        c = torch.as_tensor(cond, dtype=like.dtype, device=like.device)
        if c.ndim == 0 or (c.ndim == 1 and self.cond_dim == 1 and c.shape[0] in (1, n)):
            c = c.reshape(-1, 1)
        if c.ndim != 2 or c.shape[1] != self.cond_dim or c.shape[0] not in (1, n):
            extra = " (or a scalar, or shape (n,))" if self.cond_dim == 1 else ""
            raise ValueError(f"cond must have shape (n, {self.cond_dim}) with n = {n}{extra}, got {tuple(c.shape)}")
        return c.expand(n, self.cond_dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, depth={self.depth}, time_features={self.time_features}, "
            f"cond_dim={self.cond_dim}"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (entries of all tensors with requires_grad)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
