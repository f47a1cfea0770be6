"""fmtoy.viz: plots draw exactly the values they are given; animations have the right frames, HTML and GIF."""

from __future__ import annotations

import base64
import gc
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import animation  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from PIL import Image  # noqa: E402

from fmtoy import viz  # noqa: E402
from fmtoy.data import GaussianMixture  # noqa: E402
from fmtoy.device import make_generator

FRAME_RE = re.compile(r'frames\[(\d+)\] = "data:image/png;base64,([^"]*)"')


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def rotation(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v_t(x) = (1 + t) (-y, x): a rigid rotation whose speed depends on t."""
    return (1 + t)[:, None] * torch.stack([-x[:, 1], x[:, 0]], dim=1)


def spread_log_prob(x: torch.Tensor, t: float) -> torch.Tensor:
    """log N(x; 0, (1 + t)^2 I): a density that changes with t."""
    s2 = (1 + t) ** 2
    return -0.5 * (x**2).sum(1) / s2 - np.log(2 * np.pi * s2)


def random_traj(steps: int = 100, n: int = 7, seed: int = 0) -> torch.Tensor:
    g = make_generator(seed)
    return torch.randn(steps + 1, n, 2, generator=g).cumsum(0) * 0.1


# ----------------------------------------------------------------------------------------------- static plots
def test_plot_density_draws_log_prob_on_the_grid_and_integrates_to_one():
    mix = GaussianMixture([0.6, 0.4], [[1.3, -2.1], [-2.0, 1.0]], [np.eye(2) * 0.25, np.eye(2) * 0.5])
    lim, grid = 5.0, 200
    ax = viz.plot_density(mix.log_prob, lim=lim, grid=grid)
    image = ax.images[0]
    points, centres = viz.grid_points(lim, grid)
    expected = mix.log_prob(points).exp().reshape(grid, grid).double().numpy()
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, rtol=1e-6, atol=1e-12)
    assert tuple(image.get_extent()) == (-lim, lim, -lim, lim)
    # orientation: the brightest pixel sits at the grid cell of the stronger (narrower-peaked) mode
    i, j = np.unravel_index(np.argmax(expected), expected.shape)
    assert abs(centres[j] - 1.3) <= 2 * lim / grid and abs(centres[i] + 2.1) <= 2 * lim / grid
    # midpoint rule on [-5, 5]^2: error O(h^2) ~ 1e-5 here, mass outside the square < 1e-4
    assert abs(expected.sum() * (2 * lim / grid) ** 2 - 1) < 1e-3
    log_ax = viz.plot_density(mix.log_prob, lim=lim, grid=grid, log=True)
    np.testing.assert_allclose(np.asarray(log_ax.images[0].get_array()), np.log(expected), rtol=1e-6)


def test_grid_points_are_cell_centres():
    points, centres = viz.grid_points(2.0, 4)
    np.testing.assert_allclose(centres, [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(points[:4].numpy(), [[-1.5, -1.5], [-0.5, -1.5], [0.5, -1.5], [1.5, -1.5]])


def test_plot_field_quiver_shows_the_velocity_at_t():
    ax = viz.plot_field(rotation, 0.3, lim=3.0, grid=9)
    (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
    xy = np.stack([q.X, q.Y], axis=1)
    v = rotation(torch.as_tensor(xy, dtype=torch.float32), torch.full((len(xy),), 0.3)).numpy()
    np.testing.assert_allclose(np.stack([q.U, q.V], axis=1), v, rtol=1e-6)
    np.testing.assert_allclose(np.unique(q.X), viz.grid_points(3.0, 9)[1], rtol=1e-6)


def test_plot_field_streamlines_are_tangent_to_the_field():
    ax = viz.plot_field(rotation, 0.5, lim=3.0, grid=30, kind="stream")
    segs = np.concatenate(
        [np.asarray(s) for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    )
    segs = segs.reshape(-1, 2, 2)
    mid, d = segs.mean(1), segs[:, 1] - segs[:, 0]
    keep = (np.linalg.norm(mid, axis=1) > 0.5) & (np.linalg.norm(d, axis=1) > 0)
    cos = np.abs((mid * d).sum(1))[keep] / (np.linalg.norm(mid, axis=1) * np.linalg.norm(d, axis=1))[keep]
    assert keep.sum() > 100 and np.median(cos) < 0.05  # circles around 0: direction orthogonal to position


def test_plot_samples_and_trajectories_draw_the_given_points():
    traj = random_traj(20, 30)
    ax = viz.plot_samples(traj[-1])
    np.testing.assert_allclose(ax.collections[0].get_offsets(), traj[-1].numpy(), rtol=1e-6)
    lo, hi = ax.get_xlim()
    assert lo == -hi and hi >= traj[-1].abs().max().item()
    ax = viz.plot_trajectories(traj, max_lines=12)
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segs = lines.get_segments()
    assert len(segs) == 12
    for i, seg in enumerate(segs):
        np.testing.assert_allclose(seg, traj[:, i].numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- animations
@pytest.mark.parametrize("n_times, max_frames", [(101, 12), (101, 40), (5, 40), (40, 40), (41, 40), (2, 2)])
def test_frame_indices(n_times, max_frames):
    idx = viz.frame_indices(n_times, max_frames)
    assert len(idx) == min(n_times, max_frames)
    assert idx[0] == 0 and idx[-1] == n_times - 1 and (np.diff(idx) > 0).all()
    gap = (n_times - 1) / (len(idx) - 1)
    assert np.abs(np.diff(idx) - gap).max() <= 1  # evenly spaced up to rounding


def test_animation_frames_show_the_trajectory_at_the_subsampled_times():
    traj = random_traj(100)
    anim = viz.animate_trajectories(
        traj, field=rotation, density=spread_log_prob, max_frames=12, grid=10, field_grid=10
    )
    idx, times = anim.frame_indices, np.linspace(0, 1, 101)
    assert len(idx) == 12 and len(list(anim.new_frame_seq())) == 12
    ax = anim.fig.axes[0]
    (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
    points = viz.grid_points(ax.get_xlim()[1], 10)[0]
    for k in [0, 5, 11]:
        anim.draw_frame(k)
        t = times[idx[k]]
        np.testing.assert_allclose(anim.particles.get_offsets(), traj[idx[k]].numpy(), rtol=1e-6)
        assert ax.get_title() == f"t = {t:.2f}" and anim.times[k] == pytest.approx(t)
        v = rotation(points, torch.full((len(points),), float(t)))
        np.testing.assert_allclose(np.stack([q.U, q.V], 1), v.numpy(), rtol=1e-5)
        dens = spread_log_prob(points, float(t)).exp().reshape(10, 10).numpy()
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), dens, rtol=1e-5)


def test_to_html_is_a_js_player_with_every_frame_under_budget():
    traj = random_traj(100, n=500)
    anim = viz.animate_trajectories(traj, field=rotation)  # the defaults: 30 frames, 4x4 in at 72 dpi
    html = viz.to_html(anim)
    for control in ("anim-slider", "play_animation", "pause_animation", "next_frame", "previous_frame"):
        assert control in html
    frames = FRAME_RE.findall(html)
    assert [int(i) for i, _ in frames] == list(range(30))
    first = Image.open(io.BytesIO(base64.b64decode(frames[0][1])))
    assert first.size == (288, 288)
    assert frames[0][1] != frames[-1][1]  # particles moved
    assert len(html) < 2_000_000


def test_show_returns_html_and_closes_the_figure():
    anim = viz.animate_trajectories(random_traj(10), max_frames=5)
    shown = viz.show(anim)
    assert len(FRAME_RE.findall(shown.data)) == 5
    assert not plt.fignum_exists(anim.fig.number)


def test_gif_has_one_frame_per_animation_frame(tmp_path):
    anim = viz.animate_trajectories(random_traj(30), max_frames=8, interval=50)
    path = viz.save_animation(anim, tmp_path / "a.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 8 and gif.size == (288, 288)
        assert gif.info["duration"] == 50
    html_path = viz.save_animation(anim, tmp_path / "a.html")
    assert len(FRAME_RE.findall(html_path.read_text())) == 8


def test_mp4_without_ffmpeg_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(animation.writers, "is_available", lambda name: False)
    anim = viz.animate_trajectories(random_traj(5), max_frames=3)
    with pytest.raises(RuntimeError, match=r"install ffmpeg.*\.gif"):
        viz.save_animation(anim, tmp_path / "a.mp4")


# ----------------------------------------------------------------------------------------------- bad inputs
def _anim():
    return viz.animate_trajectories(random_traj(5), max_frames=3)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: viz.plot_samples(torch.zeros(5, 3)), ValueError, r"shape \(n, 2\)"),
        (lambda: viz.plot_samples([[0.0, 1.0]]), TypeError, "torch.Tensor or numpy array"),
        (lambda: viz.plot_samples(torch.zeros(5, 2), lim=-1.0), ValueError, "lim must be"),
        (lambda: viz.plot_trajectories(torch.full((3, 4, 2), float("nan"))), ValueError, "NaN"),
        (lambda: viz.plot_trajectories(torch.zeros(4, 2)), ValueError, r"\(steps \+ 1, n, 2\)"),
        (lambda: viz.plot_density("not a function"), TypeError, "callable"),
        (lambda: viz.plot_density(lambda x: x), ValueError, r"shape \(n,\)"),
        (lambda: viz.plot_density(spread_log_prob, grid=0), ValueError, "grid must be"),
        (lambda: viz.plot_field(rotation, 1.5), ValueError, r"\[0, 1\]"),
        (lambda: viz.plot_field(rotation, 0.5, kind="arrows"), ValueError, "quiver, stream"),
        (lambda: viz.plot_field(lambda x, t: x[:, :1], 0.5), ValueError, "shaped like x"),
        (lambda: viz.frame_indices(10, 1), ValueError, "max_frames"),
        (lambda: viz.animate_trajectories(random_traj(5), times=[0.0, 1.0]), ValueError, "one entry per"),
        (lambda: viz.animate_trajectories(random_traj(5), field=3), TypeError, "field must be"),
        (lambda: viz.to_html("anim"), TypeError, "matplotlib Animation"),
        (lambda: viz.save_animation(_anim(), "a.avi"), ValueError, r"\.gif.*\.mp4"),
        (lambda: viz.save_animation(_anim(), "noextension"), ValueError, "unsupported extension"),
    ],
)
@pytest.mark.filterwarnings("ignore:Animation was deleted without rendering")
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
    gc.collect()  # an animation that was never rendered warns when collected


def test_player_html_is_offline():
    """The JS player must not load its icon font (or anything else) from the network."""
    import re as _re

    from fmtoy.viz import PLAYER_ICONS, animate_trajectories, to_html

    html = to_html(animate_trajectories(torch.randn(4, 6, 2), max_frames=4))
    assert not _re.search(r"(src|href)=\"https?://", html)
    assert 'class="fa ' not in html
    assert all(ch in html for ch in PLAYER_ICONS.values())


def test_plot_over_reference_and_square_axes():
    from fmtoy.viz import plot_over_reference, square_axes

    ref, x = np.random.default_rng(0).normal(size=(50, 2)) * 3, np.zeros((10, 2))
    ax = plot_over_reference(x, ref, title="t")
    assert ax.get_xlim() == ax.get_ylim() and ax.get_xlim()[1] == pytest.approx(1.05 * np.abs(ref).max())
    assert len(ax.collections) == 2 and ax.get_title() == "t"  # reference first, then the samples
    assert square_axes(ax, 2.0).get_xlim() == (-2.0, 2.0) and ax.get_aspect() == 1.0
    with pytest.raises(ValueError, match="lim must be a finite number > 0"):
        square_axes(ax, 0)
    plt.close("all")


def test_markdown_table_formats_numbers_and_refuses_ragged_rows():
    from fmtoy.viz import markdown_table

    text = markdown_table(["model", "ED"], [["FM", 0.12345], ["a|b", 2]], fmt=".2f")
    assert text.splitlines() == ["| model | ED |", "| --- | ---: |", "| FM | 0.12 |", "| a\\|b | 2 |"]
    assert markdown_table(["E|x|", "b"], [[1, 2]]).splitlines()[0] == "| E\\|x\\| | b |"  # a header's bars too
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="align must have one of l, r, c per column"):
        markdown_table(["a", "b"], [[1, 2]], align="x")


def test_plot_vs_nfe_draws_the_means_the_spreads_and_the_floor_band():
    from fmtoy.metrics import Spread
    from fmtoy.viz import plot_vs_nfe

    rows = {"a": {4: Spread([1.0, 3.0]), 8: Spread([0.5, 0.7]), "xent": 3.5}, "b": {4: 0.2, 8: 0.1}}
    ax = plot_vs_nfe(rows, floor=(0.0, 0.01))
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar container per row
    assert list(lines["a"].get_xdata()) == [4, 8] and list(lines["a"].get_ydata()) == [2.0, 0.6]  # "xent" skipped
    assert list(lines["b"].get_ydata()) == [0.2, 0.1] and ax.get_xscale() == "log"
    band = [p for p in ax.patches if p.get_label() == "noise floor ± 3 sd"]
    assert len(band) == 1
    with pytest.raises(ValueError, match="no integer NFE keys"):
        plot_vs_nfe({"c": {"xent": 1.0}})


# ----------------------------------------------------------------------------------------------- grids (chapter 11)
def test_plot_grid_distribution_puts_cell_a_b_at_x_a_y_b():
    p = torch.zeros(4, 4, dtype=torch.float64)
    p[3, 0] = 1.0  # the cell at the largest x and the smallest y
    ax = viz.plot_grid_distribution(p, lim=2.0, title="one cell")
    img = ax.images[0]
    arr = np.asarray(img.get_array())
    assert arr[0, 3] == 1.0 and arr.sum() == 1.0  # row = y (origin lower), column = x
    assert img.origin == "lower" and tuple(img.get_extent()) == (-2.0, 2.0, -2.0, 2.0)
    assert ax.get_title() == "one cell"
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="square"):
        viz.plot_grid_distribution(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="Tensor or numpy array"):
        viz.plot_grid_distribution([[0.0]])


def test_animate_chain_shows_each_step_and_checks_its_inputs():
    dists = [torch.rand(5, 5, generator=make_generator(k), dtype=torch.float64) for k in range(3)]
    points = torch.randn(3, 7, 2, generator=make_generator(9))
    anim = viz.animate_chain(dists, points, lim=2.0)
    anim.draw_frame(2)
    left, right = anim.fig.axes
    assert np.allclose(np.asarray(left.images[0].get_array()), dists[2].numpy().T)
    assert np.allclose(anim.particles.get_offsets(), points[2].numpy())
    assert "step 2 of 2" in right.get_title() and "t = 1.00" in left.get_title()
    assert len(list(anim.new_frame_seq())) == 3  # one frame per step
    plt.close(anim.fig)
    with pytest.raises(ValueError, match="one distribution per time"):
        viz.animate_chain(dists[:2], points)
    with pytest.raises(ValueError, match=r"points must have shape \(steps \+ 1, n, 2\)"):
        viz.animate_chain(dists, torch.zeros(3, 7))


def test_plot_vs_time_draws_spreads_over_t_on_a_log_axis():
    from fmtoy.metrics import Spread
    from fmtoy.viz import plot_vs_time

    ax = plot_vs_time({"cd": {0.0: Spread([1.0, 3.0]), 0.5: Spread([0.2, 0.4]), 1: 9.0}})
    line = ax.containers[0].lines[0]
    assert list(line.get_xdata()) == [0.0, 0.5] and list(line.get_ydata()) == pytest.approx([2.0, 0.3])  # int: skipped
    assert ax.get_yscale() == "log" and ax.get_xlim() == (0.0, 1.0)
    with pytest.raises(ValueError, match="no float time keys"):
        plot_vs_time({"c": {1: 0.1}})
    plt.close("all")


def test_plot_grid_values_draws_one_cell_per_grid_point():
    from fmtoy.viz import grid_points, plot_grid_values

    points, _ = grid_points(3.0, 10)
    image = plot_grid_values(points[:, 0], 3.0, title="x")  # the x coordinate: columns increase left to right
    arr = image.get_array()
    assert arr.shape == (10, 10) and (arr[:, 1:] > arr[:, :-1]).all() and image.get_extent() == [-3, 3, -3, 3]
    with pytest.raises(ValueError, match="grid \\* grid"):
        plot_grid_values(torch.zeros(10), 3.0)
    with pytest.raises(TypeError, match="values must be"):
        plot_grid_values([0.0] * 4, 3.0)
    plt.close("all")
