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


# Who runs which written notebook (make notebooks) top to bottom: tests/test_lab.py opens every chapter with a widget
# in JupyterLab, the playground from its .md (make lab's view) and the others as their .ipynb; tests/test_notebooks.py
# runs the rest with nbclient (the playground's .ipynb and the chapters without a widget). Every chapter once each.
AS_MARKDOWN = "playground"


def widget_chapters() -> list[str]:
    """The chapters whose code builds an interactive_figure, in toc order (fmtoy.course.notebooks.widget_chapters)."""
    from pathlib import Path

    from fmtoy.course import notebooks

    return [p.stem for p in notebooks.widget_chapters(Path(__file__).resolve().parents[1])]


def nbclient_chapters() -> list[str]:
    """The written notebooks that JupyterLab does not run as .ipynb (tests/test_lab.py): nbclient runs them."""
    from pathlib import Path

    from fmtoy.course.notebooks import chapter_notebooks

    root, lab = Path(__file__).resolve().parents[1], set(widget_chapters()) - {AS_MARKDOWN}
    return [p.stem for p in chapter_notebooks(root) if p.stem not in lab]
