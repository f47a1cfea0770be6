"""Device selection: `device="auto"` picks cuda, then mps, then cpu; an absent device is a clear error."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch.device for `device` ("auto", "cpu", "cuda", "cuda:1", "mps"), checking it exists."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'mps', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available here; use device='auto' or 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(
                f"device {device!r} was requested but MPS is not available here; use device='auto' or 'cpu'"
            )
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    return dev


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a torch.Generator on `device` seeded with `seed` (same seed, same device: same samples)."""
    return torch.Generator(device=resolve_device(device)).manual_seed(int(seed))
