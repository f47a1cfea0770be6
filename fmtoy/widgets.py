"""ipywidgets controls the chapters reuse (data set, path, solver, t, NFE, seed, sigma_min) and a live figure."""

from __future__ import annotations

import inspect
import statistics
import time
import weakref
from typing import Callable, Sequence

import ipywidgets as W

from ._checks import check_choice, check_positive_int
from .data import DATASETS, list_datasets
from .paths import list_paths
from .solvers import SOLVERS
from .threads import follow_policy

_LIVE: list[weakref.ref] = []  # the interactive_figures of this process, oldest first (for redraw_times)
_REDRAWING = [0]  # > 0 while an interactive_figure's draw runs
NFE_CHOICES = tuple(2**k for k in range(9))  # 1, 2, 4, ..., 256 velocity evaluations
_STYLE = {"description_width": "initial"}


def buildable_datasets() -> list[str]:
    """The data sets get_dataset(name) builds without arguments (gaussian_mixture needs weights/means/covs)."""

    def needs_args(name: str) -> bool:
        params = inspect.signature(DATASETS[name]).parameters.values()
        return any(p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)

    return [name for name in list_datasets() if not needs_args(name)]


def dataset_dropdown(value: str = "eight_gaussians", description: str = "data") -> W.Dropdown:
    """Dropdown of the data sets q(x_1) (fmtoy.data registry, those that need no arguments)."""
    options = buildable_datasets()
    return W.Dropdown(options=options, value=check_choice("dataset", value, options), description=description)


def path_dropdown(value: str = "ot", description: str = "path") -> W.Dropdown:
    """Dropdown of the probability paths x_t = alpha_t x_1 + sigma_t x_0 (fmtoy.paths registry)."""
    options = list_paths()
    return W.Dropdown(options=options, value=check_choice("path", value, options), description=description)


def solver_dropdown(value: str = "euler", description: str = "solver") -> W.Dropdown:
    """Dropdown of the fixed-step ODE solvers (fmtoy.solvers.SOLVERS)."""
    options = list(SOLVERS)
    return W.Dropdown(options=options, value=check_choice("solver", value, options), description=description)


def t_slider(value: float = 0.5, step: float = 0.01, description: str = "t") -> W.FloatSlider:
    """Slider for the time t in [0, 1] (t=0 noise, t=1 data)."""
    _check_range("t", value, 0.0, 1.0)
    return W.FloatSlider(
        value=value, min=0.0, max=1.0, step=step, description=description, continuous_update=False, readout_format=".2f"
    )


def nfe_slider(value: int = 8, description: str = "NFE") -> W.SelectionSlider:
    """Slider for the number of velocity evaluations (solver steps), powers of two 1 ... 256."""
    if value not in NFE_CHOICES:
        raise ValueError(f"nfe value must be a power of two in {list(NFE_CHOICES)}, got {value!r}")
    return W.SelectionSlider(options=list(NFE_CHOICES), value=value, description=description, continuous_update=False)


def seed_slider(value: int = 0, max: int = 99, description: str = "seed") -> W.IntSlider:
    """Slider for the random seed, 0 ... max."""
    if isinstance(max, bool) or not isinstance(max, int) or max < 1:
        raise ValueError(f"max must be an integer >= 1, got {max!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer in [0, {max}], got {value!r}")
    _check_range("seed", value, 0, max)
    return W.IntSlider(value=value, min=0, max=max, step=1, description=description, continuous_update=False)


def sigma_min_slider(
    value: float = 0.0, max: float = 0.5, step: float = 0.01, description: str = "sigma_min"
) -> W.FloatSlider:
    """Slider for sigma_min in [0, max]: the width of p_1(x|x_1) = N(x_1, sigma_min^2 I), FM paper Eq. (20)."""
    _check_range("max", max, 0.0, 1.0)
    _check_range("sigma_min", value, 0.0, max)
    return W.FloatSlider(
        value=value,
        min=0.0,
        max=max,
        step=step,
        description=description,
        style=_STYLE,
        continuous_update=False,
        readout_format=".2f",
    )


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")


def interactive_figure(draw_fn: Callable[..., object], **controls: W.ValueWidget) -> W.VBox:
    """Controls above an Output that re-runs draw_fn(**values) whenever a control changes (drawn once now).

    draw_fn draws a matplotlib figure (plt.subplots(...), plotting, no return needed). With the inline backend the
    figure is shown in the Output; with a non-interactive backend (Agg) figures it opens are closed after each draw.
    """
    if not callable(draw_fn):
        raise TypeError(
            f"draw_fn must be a callable taking the controls as keyword arguments, got {type(draw_fn).__name__}"
        )
    if not controls:
        raise ValueError("interactive_figure needs at least one control, e.g. t=t_slider()")
    bad = [name for name, w in controls.items() if not isinstance(w, W.ValueWidget)]
    if bad:
        raise TypeError(f"controls must be ipywidgets value widgets (sliders, dropdowns, ...); not: {bad}")

    seconds: list[float] = []  # every redraw's duration, the first (drawn now) included

    def draw(**values) -> None:
        import matplotlib
        import matplotlib.pyplot as plt

        before, start = set(plt.get_fignums()), time.perf_counter()
        _REDRAWING[0] += 1
        try:
            with follow_policy():
                draw_fn(**values)
        finally:
            _REDRAWING[0] -= 1
        if matplotlib.get_backend().lower() == "agg":
            for num in set(plt.get_fignums()) - before:  # nothing shows them: don't leak figures
                plt.close(num)
        seconds.append(time.perf_counter() - start)

    output = W.interactive_output(draw, controls)
    box = W.VBox([W.HBox(list(controls.values())), output])
    box.fmtoy_controls, box.fmtoy_redraws = controls, seconds
    _LIVE.append(weakref.ref(box))
    return box


def redrawing() -> bool:
    """True while a live widget redraws (inside interactive_figure's draw): e.g. train(..., progress=redrawing()) shows
    a progress bar under a control that trains, and none in the static page."""
    return _REDRAWING[0] > 0


def next_value(control: W.ValueWidget):
    """The value one step on from the control's current one (wrapping at the end): the next option of a selection
    (dropdown, selection slider), value + step of a numeric slider, the other state of a checkbox."""
    if hasattr(control, "options"):
        values = [o[1] if isinstance(o, tuple) else o for o in control.options]
        return values[(values.index(control.value) + 1) % len(values)]
    if isinstance(control, W.Checkbox | W.ToggleButton):
        return not control.value
    if hasattr(control, "step") and hasattr(control, "max"):
        value = control.value + control.step
        return control.min if value > control.max + 1e-12 else value
    raise TypeError(f"cannot step a {type(control).__name__}; give redraw_times a selection, slider or checkbox")


def redraw_times(changes: int = 5, revisit: bool = True, every_control: bool = True) -> list[dict[str, object]]:
    """Time the redraws of every live interactive_figure of this process (a chapter's, after running it): each control
    (or only the first, every_control=False) moved `changes` steps on (next_value), each redraw timed, then back to
    the value it had, which is left set. revisit: the time of one redraw at a value already drawn (the way back, or,
    when the steps wrapped round to the start, the first value stepped to), which a widget that caches its training
    draws without training. One dict per figure and control: control, seconds (the changes), median, revisit."""
    changes, report = check_positive_int("changes", changes), []
    for ref in list(_LIVE):
        box = ref()
        if box is None:
            continue
        items = list(box.fmtoy_controls.items())
        for name, control in items if every_control else items[:1]:
            first, seconds = control.value, []
            for _ in range(changes):
                control.value = next_value(control)
                seconds.append(box.fmtoy_redraws[-1])
            back, start = None, len(box.fmtoy_redraws)
            if control.value != first:
                control.value = first  # a value drawn before, and where the control was
            elif revisit:
                control.value = next_value(control)  # back where it began: the first value it stepped to instead
                control.value = first
            if revisit and len(box.fmtoy_redraws) > start:
                back = box.fmtoy_redraws[start]
            report.append({"control": name, "seconds": seconds, "median": statistics.median(seconds), "revisit": back})
    return report


def static_sweep(
    draw_fn: Callable[..., object],
    name: str,
    values: Sequence[object],
    *,
    dpi: int = 80,
    interval: int = 700,
    **fixed: object,
):
    """The kernel-free counterpart of interactive_figure: draw_fn(**fixed, name=value) for each value, as the frames
    of a JS player (play, step, scrub) that works in the static page. Show it with fmtoy.viz.show."""
    import io

    import matplotlib.pyplot as plt
    from matplotlib import animation

    if not callable(draw_fn):
        raise TypeError(
            f"draw_fn must be a callable taking the controls as keyword arguments, got {type(draw_fn).__name__}"
        )
    values = list(values)
    if not 2 <= len(values) <= 40:
        raise ValueError(f"values must hold between 2 and 40 settings of {name!r} (one frame each), got {len(values)}")
    if name in fixed:
        raise ValueError(f"{name!r} is the swept control; do not also pass it as a fixed value")
    frames = []
    show = plt.show
    for value in values:
        before = set(plt.get_fignums())
        plt.show = lambda *args, **kwargs: None  # draw_fn may call plt.show(), which would close the figure
        try:
            with follow_policy():
                draw_fn(**fixed, **{name: value})
        finally:
            plt.show = show
        new = sorted(set(plt.get_fignums()) - before)
        if len(new) != 1:
            for num in new:
                plt.close(num)
            raise ValueError(f"draw_fn must open exactly one matplotlib figure per call, it opened {len(new)}")
        buf = io.BytesIO()
        plt.figure(new[0]).savefig(buf, format="png", dpi=dpi)
        plt.close(new[0])
        buf.seek(0)
        frames.append(plt.imread(buf))
    h, w = frames[0].shape[:2]
    label_px = 26
    fig = plt.figure(figsize=(w / dpi, (h + label_px) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + label_px)))
    ax.set_axis_off()
    image = ax.imshow(frames[0], interpolation="none")
    label = fig.text(0.01, 1 - 0.5 * label_px / (h + label_px), "", va="center", fontsize=11)

    def update(k: int):
        frame = frames[k]
        if frame.shape[:2] != (h, w):
            raise ValueError("draw_fn must draw figures of the same size for every value")
        image.set_data(frame)
        label.set_text(f"{name} = {values[k]}")
        return (image, label)

    update(0)
    return animation.FuncAnimation(fig, update, frames=len(values), interval=interval, repeat=True, blit=False)
