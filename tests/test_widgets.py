"""fmtoy.widgets: controls offer exactly the library's registries, and interactive_figure redraws on change."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets as W  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fmtoy import widgets  # noqa: E402
from fmtoy.data import get_dataset, list_datasets  # noqa: E402
from fmtoy.paths import list_paths  # noqa: E402
from fmtoy.solvers import SOLVERS, nfe  # noqa: E402


def test_dataset_dropdown_offers_every_dataset_that_builds_without_arguments():
    dd = widgets.dataset_dropdown()
    options = list(dd.options)
    assert dd.value == "eight_gaussians" and options == sorted(options)
    assert set(options) <= set(list_datasets())
    for name in options:
        x = get_dataset(name).sample(4)
        assert x.shape == (4, 2)
    for name in set(list_datasets()) - set(options):  # only those that need arguments are left out
        with pytest.raises(TypeError):
            get_dataset(name)
    assert len(set(list_datasets()) - set(options)) <= 1  # gaussian_mixture


def test_path_and_solver_dropdowns_equal_the_registries():
    assert list(widgets.path_dropdown().options) == list_paths()
    assert widgets.path_dropdown().value == "ot"
    assert list(widgets.solver_dropdown().options) == list(SOLVERS)
    assert widgets.solver_dropdown("rk4").value == "rk4"


def test_nfe_slider_is_powers_of_two():
    s = widgets.nfe_slider()
    options = list(s.options)
    assert s.value == 8 and options[0] == 1
    assert all(b == 2 * a for a, b in zip(options, options[1:])) and options[-1] >= 128
    for value in options:  # every choice is a valid step count for every solver
        assert all(nfe(m, value) >= value for m in SOLVERS)


def test_slider_ranges():
    t = widgets.t_slider()
    assert (t.min, t.max, t.value) == (0.0, 1.0, 0.5)
    seed = widgets.seed_slider(3)
    assert (seed.min, seed.value) == (0, 3) and seed.max >= 10
    sm = widgets.sigma_min_slider()
    assert sm.min == 0.0 and sm.value == 0.0 and 0.0 < sm.max < 1.0


def test_interactive_figure_redraws_with_the_new_values():
    calls = []

    def draw(t, solver):
        calls.append((t, solver))
        fig, ax = plt.subplots()
        ax.plot([0, t], [0, 1])

    t, solver = widgets.t_slider(), widgets.solver_dropdown()
    open_before = len(plt.get_fignums())
    box = widgets.interactive_figure(draw, t=t, solver=solver)
    assert calls == [(0.5, "euler")]  # drawn once at construction: the default view exists
    t.value = 0.25
    assert calls[-1] == (0.25, "euler")
    solver.value = "rk4"
    assert calls[-1] == (0.25, "rk4") and len(calls) == 3
    assert isinstance(box, W.VBox) and list(box.children[0].children) == [t, solver]
    assert isinstance(box.children[1], W.Output)
    assert len(plt.get_fignums()) == open_before  # Agg: the figures drawn are closed, not leaked


def test_next_value_steps_every_kind_of_control_and_wraps():
    nfe = widgets.nfe_slider(256)
    assert widgets.next_value(nfe) == 1  # the last option wraps to the first
    drop = W.Dropdown(options=[("one", 1), ("two", 2)], value=1)
    assert widgets.next_value(drop) == 2
    slider = W.FloatSlider(value=0.9, min=0.0, max=1.0, step=0.1)
    assert widgets.next_value(slider) == pytest.approx(1.0)
    slider.value = 1.0
    assert widgets.next_value(slider) == 0.0
    assert widgets.next_value(W.Checkbox(value=True)) is False
    with pytest.raises(TypeError, match="cannot step a Text"):
        widgets.next_value(W.Text("x"))


def test_redrawing_is_true_inside_a_live_redraw_only():
    seen = []

    def draw(a=1):
        seen.append(widgets.redrawing())
        plt.subplots()

    slider = W.IntSlider(value=1, min=1, max=3)
    widgets.interactive_figure(draw, a=slider)
    slider.value = 2
    assert seen == [True, True] and not widgets.redrawing()


def test_redraw_times_moves_the_first_control_and_times_each_redraw():
    import time

    seen = []

    def draw(a=1, b="x"):
        seen.append((a, b))
        time.sleep(0.02 * a)
        plt.subplots()

    widgets.interactive_figure(draw, a=W.IntSlider(value=1, min=1, max=3), b=W.Dropdown(options=["x", "y"]))
    del seen[:]
    *_, report, other = widgets.redraw_times(4)
    assert report["control"] == "a" and other["control"] == "b"
    assert seen[:6] == [(2, "x"), (3, "x"), (1, "x"), (2, "x"), (1, "x"), (1, "y")]  # 4 steps (wrapping), back, b
    assert seen[6:] == [(1, "x"), (1, "y"), (1, "x"), (1, "y"), (1, "x")]  # b wraps to x: revisit y, then back
    assert other["revisit"] is not None and len(other["seconds"]) == 4
    assert len(report["seconds"]) == 4 and report["revisit"] is not None
    assert [r["control"] for r in widgets.redraw_times(1, every_control=False)][-1] == "a"
    assert report["seconds"][1] > 0.055 and report["seconds"][2] < report["seconds"][1]  # a = 3 sleeps 60 ms, 1: 20
    assert report["median"] == pytest.approx(
        sorted(report["seconds"])[1:3][0] / 2 + sorted(report["seconds"])[1:3][1] / 2
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: widgets.dataset_dropdown("mnist"), ValueError, "unknown dataset"),
        (lambda: widgets.dataset_dropdown("gaussian_mixture"), ValueError, "unknown dataset"),
        (lambda: widgets.path_dropdown("linear"), ValueError, "unknown path"),
        (lambda: widgets.solver_dropdown("heun"), ValueError, "unknown solver"),
        (lambda: widgets.nfe_slider(6), ValueError, "power of two"),
        (lambda: widgets.t_slider(1.5), ValueError, r"\[0.0, 1.0\]"),
        (lambda: widgets.seed_slider(-1), ValueError, "seed"),
        (lambda: widgets.sigma_min_slider(0.9), ValueError, "sigma_min"),
        (lambda: widgets.interactive_figure("draw", t=widgets.t_slider()), TypeError, "callable"),
        (lambda: widgets.interactive_figure(lambda: None), ValueError, "at least one control"),
        (lambda: widgets.interactive_figure(lambda t: None, t=0.5), TypeError, "value widgets"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------- kernel-free sweep
def _draw_line(t, k=1.0):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, t * k])
    ax.set_ylim(0, 2)
    plt.show()  # must not close the figure before static_sweep captures it


def test_static_sweep_one_frame_per_value_and_frames_differ():
    import matplotlib.pyplot as plt
    import numpy as np

    from fmtoy.viz import to_html
    from fmtoy.widgets import static_sweep

    open_before = len(plt.get_fignums())
    anim = static_sweep(_draw_line, "t", [0.1, 0.5, 0.9], k=2.0)
    frames = []
    for k in range(3):
        anim._func(k)
        anim._fig.canvas.draw()
        frames.append(np.asarray(anim._fig.canvas.buffer_rgba()).copy())
    assert not np.array_equal(frames[0], frames[2])
    html = to_html(anim)
    assert html.count("frames[") >= 3 and "https://" not in html
    plt.close(anim._fig)
    assert len(plt.get_fignums()) == open_before  # the per-value figures were closed


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(draw_fn=3, name="t", values=[0, 1]), TypeError, "callable"),
        (dict(draw_fn=_draw_line, name="t", values=[0.5]), ValueError, "between 2 and 40"),
        (dict(draw_fn=_draw_line, name="t", values=[0.1, 0.2], t=0.3), ValueError, "swept control"),
        (dict(draw_fn=lambda t: None, name="t", values=[0.1, 0.2]), ValueError, "exactly one matplotlib figure"),
    ],
)
def test_static_sweep_bad_input(kwargs, error, match):
    from fmtoy.widgets import static_sweep

    with pytest.raises(error, match=match):
        static_sweep(**kwargs)
