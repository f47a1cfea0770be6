"""Plots and animations of 2D flows: samples, densities log p_t, velocity fields v_t and ODE trajectories x_t.

Everything uses plain matplotlib (works with the Agg backend). Animations are FuncAnimations; `to_html` turns
one into a self-contained JavaScript player (play, pause, step, scrub) that needs no running kernel.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage
from torch import Tensor

from ._checks import check_choice, check_positive, check_positive_int, check_unit_time, check_velocity_output

ANIMATION_FORMATS = (".gif", ".html", ".mp4")
FIELD_KINDS = ("quiver", "stream")


# ----------------------------------------------------------------------------------------------- helpers
def _as_array(x: Tensor | np.ndarray, ndim: int, name: str, shape: str) -> np.ndarray:
    """x as a float64 numpy array with `ndim` dims and last dim 2, else a clear error."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    elif isinstance(x, np.ndarray):
        x = x.astype(np.float64)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape {shape}, got {type(x).__name__}")
    if x.ndim != ndim or x.shape[-1] != 2:
        raise ValueError(f"{name} must have shape {shape} (2D points), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _axes(ax: Axes | None, figsize: tuple[float, float] = (4, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    elif not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def square_axes(ax: Axes, lim: float) -> Axes:
    """Square axes [-lim, lim]^2 with equal aspect (every 2D picture of the book); returns the Axes."""
    lim = check_positive("lim", lim)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    return ax


def _auto_lim(x: np.ndarray) -> float:
    """Half-width of a square that holds every point, with a 5% margin."""
    return 1.05 * max(float(np.abs(x).max()), 1e-3)


def grid_points(lim: float = 5.0, grid: int = 200) -> tuple[Tensor, np.ndarray]:
    """Cell centres of a grid x grid raster of [-lim, lim]^2 and the 1D centres.

    points[i * grid + j] = (centres[j], centres[i]), so values.reshape(grid, grid) is an image with rows along y.
    """
    lim, grid = check_positive("lim", lim), check_positive_int("grid", grid)
    centres = -lim + (np.arange(grid) + 0.5) * (2 * lim / grid)
    xx, yy = np.meshgrid(centres, centres, indexing="xy")
    points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float32)
    return points, centres


def _eval_density(log_prob_fn: Callable, points: Tensor, grid: int, log: bool, *args) -> np.ndarray:
    with torch.no_grad():
        values = log_prob_fn(points, *args)
    if not isinstance(values, Tensor) or values.shape != (points.shape[0],):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"log_prob_fn(x) must return a tensor of shape (n,) = ({points.shape[0]},), got {got}")
    values = values.detach().cpu().double()
    values = values if log else values.exp()
    return values.reshape(grid, grid).numpy()


def _eval_field(velocity: Callable, points: Tensor, t: float) -> np.ndarray:
    with torch.no_grad():
        v = velocity(points, points.new_full((points.shape[0],), t))
    return check_velocity_output(v, points).detach().cpu().double().numpy()


def _model_device(fn: Callable) -> torch.device:
    """The device of a torch module's parameters (cpu for plain callables), so grids are built where the model is."""
    params = getattr(fn, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- static plots
def plot_samples(
    x: Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    s: float = 2.0,
    alpha: float = 0.5,
    color: str = "C0",
    lim: float | None = None,
    title: str | None = None,
    **kwargs,
) -> Axes:
    """Scatter plot of samples x ~ p (n, 2), e.g. x_1 = phi_1(x_0) (the flow ODE, chapter 1); returns the Axes."""
    x = _as_array(x, 2, "x", "(n, 2)")
    ax = _axes(ax)
    ax.scatter(x[:, 0], x[:, 1], s=s, alpha=alpha, color=color, linewidths=0, **kwargs)
    square_axes(ax, _auto_lim(x) if lim is None else lim)
    if title:
        ax.set_title(title)
    return ax


def plot_over_reference(
    samples: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    lim: float | None = None,
    s: float = 1.0,
    color: str = "C0",
    ref_color: str = "0.8",
    title: str | None = None,
    fontsize: float = 9,
) -> Axes:
    """Samples (color) drawn over samples of the target (light grey) on square axes: where x_1 lands against q."""
    ref = _as_array(reference, 2, "reference", "(m, 2)")
    x = _as_array(samples, 2, "samples", "(n, 2)")
    ax = _axes(ax)
    ax.scatter(ref[:, 0], ref[:, 1], s=s, color=ref_color, linewidths=0)
    ax.scatter(x[:, 0], x[:, 1], s=s, color=color, linewidths=0)
    square_axes(ax, _auto_lim(ref) if lim is None else lim)
    if title:
        ax.set_title(title, fontsize=fontsize)
    return ax


def _plot_rows(rows: dict, ax: Axes, xlabel: str, ylabel: str, title: str | None, numbers: type, kind: str) -> Axes:
    """rows {label: {x: value or Spread}} as lines with a Spread's sd as error bars (the x keys of type `numbers`,
    named `kind` in the error for a row that has none)."""
    for label, by_x in rows.items():
        xs = sorted(k for k in by_x if isinstance(k, numbers) and not isinstance(k, bool))
        if not xs:
            raise ValueError(f"row {label!r} has no {kind} keys, got {list(by_x)}")
        vals = [by_x[k] for k in xs]
        ax.errorbar(
            xs,
            [float(v) for v in vals],
            yerr=[getattr(v, "sd", 0.0) for v in vals],
            fmt="o-",
            ms=3,
            capsize=2,
            label=label,
        )
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_vs_nfe(
    rows: dict,
    floor: tuple[float, float] | None = None,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    ylabel: str = "energy distance",
) -> Axes:
    """A quality-vs-cost figure: rows {label: {nfe: value or Spread}} as lines over NFE (log 2 axis), a Spread's sd as
    error bars, and the noise floor (mean, sd) as a grey band of mean +- 3 sd (chapters 5-10's tables, drawn)."""
    ax = _axes(ax, figsize=(5.5, 3.8))
    if floor is not None:
        ax.axhspan(floor[0] - 3 * floor[1], floor[0] + 3 * floor[1], color="0.85", zorder=0, label="noise floor ± 3 sd")
    _plot_rows(rows, ax, "NFE", ylabel, title, int, "integer NFE")
    ax.set_xscale("log", base=2)
    return ax


def plot_vs_time(rows: dict, ax: Axes | None = None, *, title: str | None = None, ylabel: str = "error") -> Axes:
    """rows {label: {t: value or Spread}} as lines over t in [0, 1] (t = 0 noise, t = 1 data), a Spread's sd as error
    bars, log y axis: an error against the exact object along the flow (chapter 10's consistency models)."""
    ax = _axes(ax, figsize=(5.5, 3.8))
    _plot_rows(rows, ax, "t", ylabel, title, float, "float time")
    ax.set(yscale="log", xlim=(0, 1))
    return ax


def markdown_table(
    header: Sequence[object], rows: Sequence[Sequence[object]], fmt: str = ".3f", align: str | None = None
) -> str:
    """A markdown table: numbers formatted with `fmt` (strings as they are); align per column, e.g. "lrr"."""
    header = [str(h).replace("|", "\\|") for h in header]
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row needs {len(header)} cells (one per header), got {sorted({len(r) for r in rows})}")
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - set("lrc"):
        raise ValueError(f"align must have one of l, r, c per column ({len(header)}), got {align!r}")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    cell = lambda v: format(v, fmt) if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731 (Spread too)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def show_table(header: Sequence[object], rows: Sequence[Sequence[object]], title: str | None = None, **kwargs) -> None:
    """Display markdown_table(header, rows, **kwargs) in a notebook (a bold title above it if given)."""
    from IPython.display import Markdown, display

    display(Markdown((f"**{title}**\n\n" if title else "") + markdown_table(header, rows, **kwargs)))


def plot_grid_values(
    values: Tensor | np.ndarray,
    lim: float,
    ax: Axes | None = None,
    *,
    norm=None,
    cmap: str = "magma",
    title: str | None = None,
) -> AxesImage:
    """An image of one value per point of grid_points(lim, grid) (values of shape (grid * grid,)): e.g. a one-step
    sampler's error |x^(1) - Phi_{0->1}(x_0)| over the noise x_0 (chapter 10). Returns the image (for a colorbar)."""
    if not isinstance(values, (Tensor, np.ndarray)):
        raise TypeError(f"values must be a torch.Tensor or numpy array of shape (grid * grid,), got {type(values)}")
    arr = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else values.astype(np.float64)
    grid = int(round(np.sqrt(arr.size)))
    if arr.ndim != 1 or grid * grid != arr.size:
        raise ValueError(f"values must hold grid * grid entries (one per grid_points cell), got {arr.size}")
    ax = _axes(ax)
    lim = check_positive("lim", lim)
    image = ax.imshow(arr.reshape(grid, grid), origin="lower", extent=(-lim, lim, -lim, lim), norm=norm, cmap=cmap)
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_density(
    log_prob_fn: Callable[[Tensor], Tensor],
    ax: Axes | None = None,
    *,
    lim: float = 5.0,
    grid: int = 200,
    log: bool = False,
    cmap: str = "viridis",
    title: str | None = None,
) -> Axes:
    """Image of p(x) = exp(log_prob_fn(x)) (or log p with log=True) on the cell centres of grid_points(lim, grid)."""
    if not callable(log_prob_fn):
        raise TypeError(f"log_prob_fn must be a callable x (n, 2) -> (n,), got {type(log_prob_fn).__name__}")
    points, _ = grid_points(lim, grid)
    values = _eval_density(log_prob_fn, points.to(_model_device(log_prob_fn)), grid, log)
    ax = _axes(ax)
    ax.imshow(values, origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, interpolation="nearest")
    square_axes(ax, lim)
    if title:
        ax.set_title(title)
    return ax


def plot_field(
    velocity: Callable[[Tensor, Tensor], Tensor],
    t: float,
    ax: Axes | None = None,
    *,
    lim: float = 5.0,
    grid: int = 20,
    kind: str = "quiver",
    color: str = "k",
    title: str | None = None,
) -> Axes:
    """Arrows (quiver) or streamlines of the velocity field v_t(x) at time t on a grid x grid raster (chapter 1)."""
    if not callable(velocity):
        raise TypeError(f"velocity must be a callable v(x, t) -> (n, 2), got {type(velocity).__name__}")
    t, kind = check_unit_time("t", t), check_choice("field kind", kind, FIELD_KINDS)
    points, centres = grid_points(lim, grid)
    v = _eval_field(velocity, points.to(_model_device(velocity)), t)
    ax = _axes(ax)
    x, y = points[:, 0].numpy(), points[:, 1].numpy()
    if kind == "quiver":
        ax.quiver(x, y, v[:, 0], v[:, 1], color=color, angles="xy")
    else:
        ax.streamplot(
            centres,
            centres,
            v[:, 0].reshape(grid, grid),
            v[:, 1].reshape(grid, grid),
            color=color,
            density=1.0,
            linewidth=0.7,
        )
    square_axes(ax, lim)
    ax.set_title(title if title is not None else f"v(x, t={t:.2f})")
    return ax


def plot_trajectories(
    traj: Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    max_lines: int = 200,
    color: str = "0.4",
    alpha: float = 0.4,
    lw: float = 0.6,
    show_ends: bool = True,
    lim: float | None = None,
    title: str | None = None,
) -> Axes:
    """Paths t -> x_t of the first max_lines particles of a trajectory (steps+1, n, 2), with x_0 and x_1 marked."""
    traj = _as_array(traj, 3, "traj", "(steps + 1, n, 2)")
    max_lines = check_positive_int("max_lines", max_lines)
    ax = _axes(ax)
    paths = np.transpose(traj[:, :max_lines], (1, 0, 2))  # (lines, steps + 1, 2)
    ax.add_collection(LineCollection(paths, colors=color, alpha=alpha, linewidths=lw))
    if show_ends:
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, color="C0", linewidths=0, label="x_0 (noise)")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, color="C3", linewidths=0, label="x_1 (samples)")
    square_axes(ax, _auto_lim(traj) if lim is None else lim)
    if title:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------------------------- animations
def frame_indices(n_times: int, max_frames: int) -> np.ndarray:
    """Indices 0 = k_0 < ... < k_m = n_times - 1 of the trajectory times shown: all, or max_frames evenly spaced."""
    n_times = check_positive_int("n_times", n_times)
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 2:
        raise ValueError(f"max_frames must be an integer >= 2 (first and last time), got {max_frames!r}")
    if n_times <= max_frames:
        return np.arange(n_times)
    return np.round(np.linspace(0, n_times - 1, max_frames)).astype(int)


class TrajectoryAnimation(animation.FuncAnimation):
    """A FuncAnimation of particles along a trajectory; frame k shows traj[frame_indices[k]] at time times[k]."""

    fig: plt.Figure
    particles: object
    frame_indices: np.ndarray
    times: np.ndarray

    _saving = False

    def draw_frame(self, k: int) -> None:
        """Draw frame k (0 <= k < len(frame_indices)) on the figure."""
        self._draw_was_started = True
        self._update(k)

    def save(self, *args, **kwargs) -> None:
        """FuncAnimation.save without the extra canvas redraw per frame (each writer renders the frame itself)."""
        self._saving = True
        try:
            super().save(*args, **kwargs)
        finally:
            self._saving = False

    def _post_draw(self, framedata, blit) -> None:
        if not self._saving:
            super()._post_draw(framedata, blit)


def animate_trajectories(
    traj: Tensor | np.ndarray,
    *,
    field: Callable | None = None,
    density: Callable | None = None,
    times: Sequence[float] | None = None,
    interval: int = 100,
    max_frames: int = 30,
    lim: float | None = None,
    grid: int = 48,
    field_grid: int = 12,
    s: float = 4.0,
    figsize: tuple[float, float] = (4, 4),
    dpi: int = 72,
) -> TrajectoryAnimation:
    """Animate particles x_t moving along the flow ODE (chapter 1) from a trajectory (steps+1, n, 2).

    field: optional v(x, t) drawn as field_grid^2 arrows (t a tensor of shape (n,)); density: optional
    log p_t(x) = density(x, t) drawn as a grid^2 image (t a float), e.g. ExactField.log_prob.
    Frames are subsampled to at most max_frames (see frame_indices); times defaults to linspace(0, 1, steps + 1).
    Keep max_frames, figsize and dpi modest: each frame is a PNG (defaults: ~0.5-1.5 MB of HTML for 500 particles).
    """
    arr = _as_array(traj, 3, "traj", "(steps + 1, n, 2)")
    n_times = arr.shape[0]
    idx = frame_indices(n_times, max_frames)
    interval = check_positive_int("interval (ms)", interval)
    times = np.linspace(0.0, 1.0, n_times) if times is None else np.asarray(times, dtype=np.float64)
    if times.shape != (n_times,):
        raise ValueError(f"times must have one entry per trajectory time ({n_times}), got shape {times.shape}")
    for name, fn in (("field", field), ("density", density)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable (x, t) or None, got {type(fn).__name__}")
    if (field is not None or density is not None) and not ((times >= 0) & (times <= 1)).all():
        raise ValueError("times must lie in [0, 1] to draw a field or density background")
    lim = _auto_lim(arr) if lim is None else check_positive("lim", lim)
    g, gf = check_positive_int("grid", grid), check_positive_int("field_grid", field_grid)

    fig, ax = plt.subplots(figsize=figsize, dpi=check_positive_int("dpi", dpi))
    square_axes(ax, lim)
    ax.set_xticks([])
    ax.set_yticks([])
    title = ax.set_title("t = 0.00")  # set before tight_layout so the layout leaves room for it
    fig.tight_layout()
    image = arrows = None
    if density is not None:
        dens_points = grid_points(lim, g)[0].to(_model_device(density))
        image = ax.imshow(
            np.zeros((g, g)),
            origin="lower",
            extent=(-lim, lim, -lim, lim),
            cmap="Blues",
            interpolation="nearest",
            zorder=0,
        )
    if field is not None:
        field_points = grid_points(lim, gf)[0].to(_model_device(field))
        xy = field_points.cpu().numpy()
        arrows = ax.quiver(
            xy[:, 0],
            xy[:, 1],
            np.zeros(len(xy)),
            np.zeros(len(xy)),
            color="0.5",
            angles="xy",
            scale_units="xy",
            scale=8.0,
            width=0.004,
            zorder=1,
        )
    x0 = arr[0]
    hue = (np.arctan2(x0[:, 1], x0[:, 0]) + np.pi) / (2 * np.pi)  # colour = angle of x_0: shows who goes where
    particles = ax.scatter(x0[:, 0], x0[:, 1], c=hue, cmap="hsv", vmin=0, vmax=1, s=s, linewidths=0, zorder=2)

    cache: dict[int, tuple] = {}  # per-frame background, computed once (the HTML and GIF writers redraw every frame)

    def background(k: int, t: float) -> tuple:
        if k not in cache:
            dens = _eval_density(density, dens_points, g, False, t) if image is not None else None
            vel = _eval_field(field, field_points, t) if arrows is not None else None
            cache[k] = (dens, vel)
        return cache[k]

    def update(k: int):
        i, t = int(idx[k]), float(times[idx[k]])
        particles.set_offsets(arr[i])
        title.set_text(f"t = {t:.2f}")
        dens, vel = background(k, t)
        if dens is not None:
            image.set_data(dens)
            image.set_clim(0.0, max(float(dens.max()), 1e-12))
        if vel is not None:
            arrows.set_UVC(vel[:, 0], vel[:, 1])
        return (particles,)

    anim = TrajectoryAnimation(fig, update, frames=len(idx), interval=interval, repeat=True, blit=False)
    anim._update = update
    anim.fig, anim.particles, anim.frame_indices, anim.times = fig, particles, idx, times[idx]
    return anim


def _grid_image(probs: Tensor | np.ndarray, name: str = "probs") -> np.ndarray:
    """A (V, V) table as the array imshow draws with origin="lower": rows = the second coordinate."""
    if not isinstance(probs, (Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (V, V), got {type(probs).__name__}")
    arr = probs.detach().cpu().double().numpy() if isinstance(probs, Tensor) else np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a square (V, V) table of finite numbers, got shape {arr.shape}")
    return arr.T


def plot_grid_distribution(
    probs: Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    lim: float = 5.0,
    vmax: float | None = None,
    title: str | None = None,
    fontsize: float = 9,
) -> Axes:
    """A distribution p(a, b) on the V x V grid of [-lim, lim]^2 as an image, cell (a, b) at (c_a, c_b) (chapter 11)."""
    img = _grid_image(probs)
    ax = _axes(ax)
    ax.imshow(
        img,
        origin="lower",
        extent=(-lim, lim, -lim, lim),
        cmap="Blues",
        vmin=0.0,
        vmax=float(img.max()) if vmax is None else vmax,
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)
    return ax


def animate_chain(
    dists: Sequence[Tensor | np.ndarray],
    points: Tensor | np.ndarray,
    *,
    lim: float = 5.0,
    times: Sequence[float] | None = None,
    interval: int = 200,
    s: float = 6.0,
    figsize: tuple[float, float] = (7, 3.6),
    dpi: int = 72,
) -> TrajectoryAnimation:
    """A CTMC sampling chain (chapter 11): left, the exact distribution p_k of the chain after step k (dists, each
    (V, V)); right, chains' states as points (points (steps + 1, n, 2), NaN for a state not drawn, e.g. masked)."""
    imgs = [_grid_image(d, "dists[k]") for d in dists]
    pts = points.detach().cpu().double().numpy() if isinstance(points, Tensor) else np.asarray(points, float)
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (steps + 1, n, 2), got {pts.shape}")
    if len(imgs) != len(pts):
        raise ValueError(f"one distribution per time: got {len(imgs)} distributions and {len(pts)} point sets")
    times = np.linspace(0.0, 1.0, len(imgs)) if times is None else np.asarray(times, dtype=np.float64)
    if times.shape != (len(imgs),):
        raise ValueError(f"times must have one entry per frame ({len(imgs)}), got shape {times.shape}")
    fig, (left, right) = plt.subplots(1, 2, figsize=figsize, dpi=check_positive_int("dpi", dpi))
    vmax = max(float(i.max()) for i in imgs)
    image = left.imshow(
        imgs[0],
        origin="lower",
        extent=(-lim, lim, -lim, lim),
        cmap="Blues",
        vmin=0.0,
        vmax=vmax,
        interpolation="nearest",
    )
    particles = right.scatter(pts[0, :, 0], pts[0, :, 1], s=s, color="C0", linewidths=0)
    square_axes(right, lim)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    titles = (left.set_title("exact law, t = 0.00", fontsize=9), right.set_title("chains", fontsize=9))
    fig.tight_layout()

    def update(k: int):
        image.set_data(imgs[k])
        particles.set_offsets(pts[k])
        titles[0].set_text(f"exact law of the chain, t = {times[k]:.2f}")
        titles[1].set_text(f"{pts.shape[1]} chains, step {k} of {len(imgs) - 1}")
        return (particles,)

    anim = TrajectoryAnimation(
        fig, update, frames=len(imgs), interval=check_positive_int("interval (ms)", interval), repeat=True, blit=False
    )
    anim._update = update
    anim.fig, anim.particles, anim.frame_indices, anim.times = fig, particles, np.arange(len(imgs)), times
    return anim


def _check_animation(anim) -> animation.Animation:
    if not isinstance(anim, animation.Animation):
        raise TypeError(
            f"anim must be a matplotlib Animation (e.g. from animate_trajectories), got {type(anim).__name__}"
        )
    return anim


# matplotlib's player draws its buttons with Font Awesome 4 from a CDN; plain characters keep the page offline.
PLAYER_ICONS = {
    "fa fa-minus": "\u2212",
    "fa fa-fast-backward": "\u21e4",
    "fa fa-step-backward": "\u2039",
    "fa fa-play fa-flip-horizontal": "\u25c0",
    "fa fa-pause": "\u2016",
    "fa fa-play": "\u25b6",
    "fa fa-step-forward": "\u203a",
    "fa fa-fast-forward": "\u21e5",
    "fa fa-plus": "+",
}
_FA_LINK = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">\s*')


def to_html(anim: animation.Animation) -> str:
    """The animation as self-contained HTML + JavaScript (play, pause, step, scrub; frames embedded as PNG), with no
    external resource (the player's icon font is replaced by plain characters)."""
    html = _FA_LINK.sub("", _check_animation(anim).to_jshtml())
    for cls, char in PLAYER_ICONS.items():
        html = html.replace(f'<i class="{cls}"></i>', f'<span aria-hidden="true">{char}</span>')
    return html.replace('<img id="_anim_img', f'<img alt="{_animation_alt(anim)}" id="_anim_img', 1)


def _animation_alt(anim: animation.Animation) -> str:
    """Alt text for the player's image: 'Animation: ' and the figure's titles (HTML-escaped)."""
    from html import escape

    fig = anim._fig
    titles = [fig._suptitle.get_text()] if getattr(fig, "_suptitle", None) else []
    titles += [ax.get_title() for ax in fig.axes if ax.get_title()]
    text = "; ".join(t.replace("$", "") for t in titles) or "particles moving along the flow"
    return escape(f"Animation (use the controls below to play, step or scrub): {text}", quote=True)


def show(anim: animation.Animation):
    """Display the animation in a notebook as the JS player; closes its figure so no extra static PNG appears."""
    from IPython.display import HTML

    html = to_html(anim)
    plt.close(anim._fig)
    return HTML(html)


def _check_animation_path(path: str | os.PathLike) -> Path:
    """`path` as a Path if its extension is .gif, .html or .mp4 (and ffmpeg is installed for .mp4), else an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANIMATION_FORMATS:
        raise ValueError(
            f"cannot save an animation as {path.name!r}: unsupported extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(ANIMATION_FORMATS)}"
        )
    if suffix == ".mp4" and not animation.writers.is_available("ffmpeg"):
        raise RuntimeError(
            f"cannot write {path.name!r}: saving .mp4 needs ffmpeg, which is not installed or not "
            "on PATH; install ffmpeg (e.g. `apt install ffmpeg`, `conda install ffmpeg`, "
            "`brew install ffmpeg`) or save as .gif instead"
        )
    return path


def save_animation(anim: animation.Animation, path: str | os.PathLike, fps: float | None = None) -> Path:
    """Write the animation to .gif (Pillow), .mp4 (needs ffmpeg) or .html (the JS player); returns the path."""
    _check_animation(anim)
    path = _check_animation_path(path)
    fps = 1000.0 / anim._interval if fps is None else check_positive("fps", fps)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        anim.save(path, writer=animation.PillowWriter(fps=fps))
    elif suffix == ".html":
        path.write_text(to_html(anim), encoding="utf-8")
    else:
        anim.save(path, writer=animation.FFMpegWriter(fps=fps))
    return path
