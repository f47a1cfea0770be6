"""The conditional flow matching loss and the couplings pi(x_0, x_1) that feed it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import check_choice, check_paired
from .models import _check_model_time

Coupling = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def cfm_loss(
    model: Callable[..., Tensor], x0: Tensor, x1: Tensor, t: float | Tensor, path, cond: Tensor | None = None
) -> Tensor:
    """CFM loss, FM paper Eq. (9)/(14): mean_i || v(x_t, t) - (d_alpha_t x_1 + d_sigma_t x_0) ||^2,
    x_t = alpha_t x_1 + sigma_t x_0.

    Shape checks only (no range check on t, no device sync): callers keep t in [path.t_min, path.t_max].
    """
    check_paired(x0, x1)
    if not callable(getattr(path, "schedule", None)):
        raise TypeError(f"path must be a GaussianPath (fmtoy.paths, with .schedule(t)), got {type(path).__name__}")
    tc = _check_model_time(t, x0.shape[0], x0)  # (n, 1)
    s = path.schedule(tc, check=False)  # no range check, no device sync
    xt = s.alpha_t * x1 + s.sigma_t * x0
    u_cond = s.d_alpha_t * x1 + s.d_sigma_t * x0  # the regression target u_t(x_t | x_1)
    v = model(xt, tc[:, 0]) if cond is None else model(xt, tc[:, 0], cond)
    if not isinstance(v, Tensor) or v.shape != x0.shape:
        raise ValueError(
            f"the model must return a tensor of shape {tuple(x0.shape)}, "
            f"got {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
        )
    return (v - u_cond).square().sum(dim=1).mean()


def independent_coupling(x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """pi(x_0, x_1) = p_0(x_0) q(x_1): keep the independently drawn pairs as they are."""
    check_paired(x0, x1)
    return x0, x1


@torch.no_grad()
def minibatch_ot_coupling(x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """Minibatch OT (Tong et al. 2023): re-pair x1 by the permutation minimising sum_i |x0_i - x1_sigma(i)|^2."""
    check_paired(x0, x1)
    cost = torch.cdist(x0.double(), x1.double()).square().cpu().numpy()
    from scipy.optimize import linear_sum_assignment  # imported on first use (0.3 s)

    _, cols = linear_sum_assignment(cost)
    return x0, x1[torch.as_tensor(cols, device=x1.device)]


COUPLINGS: dict[str, Coupling] = {"independent": independent_coupling, "ot": minibatch_ot_coupling}


def get_coupling(name: str) -> Coupling:
    """The coupling function for `name` ("independent" or "ot")."""
    return COUPLINGS[check_choice("coupling", name, COUPLINGS)]
