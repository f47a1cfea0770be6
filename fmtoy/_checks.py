"""Input validation shared by every fmtoy module: clear errors instead of deep torch tracebacks."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


def check_choice(kind: str, name: str, allowed: Iterable[str]) -> str:
    """Return `name` if it is one of `allowed`, else raise ValueError listing the allowed names."""
    allowed = sorted(allowed)
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")
    return name


def check_positive_int(name: str, value: int) -> int:
    """Return `value` if it is an integer >= 1, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    """Return `value` if it is a finite number > 0 (or >= 0 with allow_zero), else raise ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_points(x: Tensor, dim: int | None = None, name: str = "x") -> Tensor:
    """Return `x` if it is a floating tensor of shape (n, dim), else raise ValueError."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_paired(a: Tensor, b: Tensor, names: tuple[str, str] = ("x0", "x1")) -> tuple[Tensor, Tensor]:
    """Return (a, b) if both are point sets of one shape (n, d), row i of one paired with row i of the other."""
    a, b = check_points(a, name=names[0]), check_points(b, name=names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (n, d), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def check_time(t: float | Tensor, n: int | None = None, like: Tensor | None = None) -> Tensor:
    """Return t as a tensor of shape (n, 1) (or (1, 1) for a scalar) after checking 0 <= t <= 1.

    `t` may be a Python float, a 0-d tensor, or a tensor of shape (n,) or (n, 1).
    `like` supplies dtype and device for the result.
    """
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.reshape(1, 1)
    elif t.ndim == 1:
        t = t[:, None]
    elif not (t.ndim == 2 and t.shape[1] == 1):
        raise ValueError(f"t must be a scalar or have shape (n,) or (n, 1), got {tuple(t.shape)}")
    if n is not None and t.shape[0] not in (1, n):
        raise ValueError(f"t has {t.shape[0]} entries but x has {n} rows")
    if torch.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise ValueError(
            f"t must lie in [0, 1] (t=0 is noise, t=1 is data); got values in "
            f"[{t.min().item():.4g}, {t.max().item():.4g}]"
        )
    return t


def check_unit_time(name: str, value: float | Tensor) -> float:
    """Return a single time (a number or a one-element tensor) as a float after checking 0 <= value <= 1."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (t=0 is noise, t=1 is data), got {value!r}")
    return float(value)


def check_velocity_output(v: Tensor, x: Tensor) -> Tensor:
    """Return v if a velocity field's output v(x, t) is a tensor shaped like x, else raise ValueError."""
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return v


def check_generator(generator: torch.Generator | None, device: torch.device, what: str = "x is") -> None:
    """Raise unless generator is None or a torch.Generator on the same device type as `device`."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but {what} on {device}; "
            "make the generator on the same device (fmtoy.device.make_generator(seed, device))"
        )
