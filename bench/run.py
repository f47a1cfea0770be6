"""fmtoy benchmark: training throughput and exact likelihood against Meta's flow_matching and TorchCFM (CPU),
and sample / likelihood quality against the exact marginal field; and "under load": fmtoy's CPU thread policy
(fmtoy.threads, "auto") against a fixed torch-default thread count, idle and beside a competing CPU-bound process.
Writes bench/results/latest.{md,json}.

And "widgets": every chapter widget's redraw time, the chapter run by nbclient, then its first control moved.

Usage: python bench/run.py [--quick] [--only compare|under-load|widgets] [--threads N] [--out DIR]
       (peers: pip install -e '.[bench]', see bench/README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from fmtoy import threads as fmthreads  # noqa: E402
from fmtoy.data import GaussianMixture, StandardNormal, get_dataset  # noqa: E402
from fmtoy.marginal import ExactField  # noqa: E402
from fmtoy.metrics import energy_distance, nll_gap  # noqa: E402
from fmtoy.paths import get_path  # noqa: E402
from fmtoy.solvers import integrate, log_likelihood  # noqa: E402
from fmtoy.train import TrainConfig, build_model, fit_cfm, train_flow  # noqa: E402

SECTIONS = ("compare", "under-load", "widgets")  # --only: one of them (the report keeps the others)

NFES = (1, 2, 4, 8, 32)
DATASETS = ("eight_gaussians", "two_moons")
ON_PAR = 0.95  # "at least on par": fmtoy's speed >= 95% of the peer's (5% = run-to-run timing noise here)
TARGETS = {"train_seconds": 30.0, "nll_gap_eight_gaussians": 0.03, "nfe8_ratio": 1.2}

FULL = dict(
    tp_steps=400,
    tp_warmup=40,
    tp_repeats=5,
    ll_points=2000,
    ll_steps=32,
    ll_repeats=3,
    nll_points=2000,
    nll_steps=32,
    ed_points=4000,
    empirical_points=4000,
    train_steps=None,
)
QUICK = dict(
    tp_steps=20,
    tp_warmup=5,
    tp_repeats=1,
    ll_points=200,
    ll_steps=4,
    ll_repeats=1,
    nll_points=200,
    nll_steps=4,
    ed_points=300,
    empirical_points=300,
    train_steps=100,
)
# under load: training steps (after a warm-up of train_warmup), likelihood points and rk4 steps, the widget redraw's
# tiny training run, points and Euler steps; every measurement repeated `repeats` times (median reported)
UNDER_LOAD = dict(
    train_steps=400,
    train_warmup=40,
    ll_points=2000,
    ll_steps=32,
    widget_train_steps=300,
    widget_points=1000,
    widget_nfe=8,
    widget_redraws=3,
    repeats=3,
)
UNDER_LOAD_QUICK = dict(
    train_steps=12,
    train_warmup=2,
    ll_points=100,
    ll_steps=3,
    widget_train_steps=12,
    widget_points=100,
    widget_nfe=4,
    widget_redraws=1,
    repeats=1,
)
UNDER_LOAD_TARGETS = {"loaded_over_idle": 0.4, "new_idle_over_old_idle": 0.9}
UL_ITEMS = {
    "training": "training, default TrainConfig",
    "likelihood": "exact likelihood, rk4",
    "widget": "widget redraw",
}
UL_UNITS = {"training": "steps/s", "likelihood": "1/s", "widget": "1/s"}
UL_CONDITIONS = ("idle", "loaded")
# widgets: each chapter's first control moved `changes` steps, every redraw timed (fmtoy.widgets.redraw_times)
WIDGETS = dict(changes=5, chapters=None)  # None: every chapter with an interactive_figure, in toc order
WIDGETS_QUICK = dict(changes=2, chapters=("playground",))
WIDGET_TARGETS = {"redraw_seconds": 0.5, "block_seconds": 5.0}  # issue 20: redraw <= 0.5 s unless it trains
WIDGET_PROBE = (
    "import json\nfrom fmtoy.widgets import redraw_times\nprint('FMTOY-REDRAWS ' + json.dumps(redraw_times({changes})))"
)
OTHER_LOAD_WARN = 0.2  # cores used by other processes while measuring above which the report warns
UL_POLICIES = ("old", "new")


def machine_info() -> dict:
    """CPU count, threads, versions: what the timings depend on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "peers": peers.available(),
    }


def _timed(fn):
    """(fn(), wall seconds, process CPU seconds); CPU time is robust to other load when running 1 thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------------------ throughput
def throughput(cfg: TrainConfig, steps: int, warmup: int, repeats: int) -> dict:
    """Training it/s of fmtoy.train.train vs the same loop on each peer's path sampler: same MLP, batch, data,
    Adam and lr schedule. Implementations alternate inside each repeat so that load drift hits all of them."""
    target, path = get_dataset(cfg.data), get_path(cfg.path)
    names = ["fmtoy"] + [p for p, v in peers.available().items() if v is not None]
    kw = dict(batch_size=cfg.batch_size, lr=cfg.lr)

    def run(name: str, n: int, seed: int) -> tuple[float, float]:
        model = build_model(cfg)
        if name == "fmtoy":
            fn = lambda: fit_cfm(
                model,
                path,
                target,
                steps=n,
                device="cpu",
                seed=seed,
                progress=False,  # noqa: E731
                lr_schedule=cfg.lr_schedule,
                **kw,
            )
        else:
            fn = lambda: peers.train_peer(
                name,
                model,
                target,
                steps=n,
                seed=seed,  # noqa: E731
                lr_schedule=cfg.lr_schedule,
                **kw,
            )
        return _timed(fn)[1:]

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in names:
        run(name, warmup, 0)
    for r in range(repeats):
        for name in names:
            times[name].append(run(name, steps, r))
    out = {}
    for name, ts in times.items():
        wall, cpu = [w for w, _ in ts], [c for _, c in ts]
        out[name] = {
            "it_per_s_median": steps / statistics.median(wall),
            "it_per_s_best": steps / min(wall),
            "it_per_cpu_s_median": steps / statistics.median(cpu),
            "seconds": wall,
            "cpu_seconds": cpu,
        }
    return {
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "batch_size": cfg.batch_size,
        "hidden": cfg.hidden,
        "depth": cfg.depth,
        "results": out,
    }


# ------------------------------------------------------------------------------------------------ likelihood
def likelihood(model, target, n: int, steps: int, repeats: int, method: str = "midpoint") -> dict:
    """fmtoy.solvers.log_likelihood vs flow_matching ODESolver.compute_likelihood: exact divergence, the same
    fixed grid of `steps` explicit-midpoint steps from t=1 to t=0 on both sides; time and agreement of log p."""
    source = StandardNormal(target.dim)
    x = target.sample(n, generator=torch.Generator().manual_seed(123))
    runs = {"fmtoy": lambda: log_likelihood(model, x, source, steps=steps, method=method, divergence="exact")}
    if peers.available()["flow_matching"] is not None:
        runs["flow_matching"] = lambda: peers.meta_log_likelihood(model, x, source.log_prob, steps=steps, method=method)
    values, times = {}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            values[name], *wall_cpu = _timed(fn)
            times[name].append(wall_cpu)
    out = {
        "points": n,
        "steps": steps,
        "method": method,
        "divergence": "exact",
        "seconds": {k: statistics.median(w for w, _ in v) for k, v in times.items()},
        "cpu_seconds": {k: statistics.median(c for _, c in v) for k, v in times.items()},
        "mean_log_p": {k: float(v.detach().mean()) for k, v in values.items()},
        "true_mean_log_q": float(target.log_prob(x).mean()),
    }
    if "flow_matching" in values:
        diff = (values["fmtoy"].detach().double() - values["flow_matching"].double()).abs()
        out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    return out


# ------------------------------------------------------------------------------------------------ quality
def _chunked(field, rows: int = 500):
    """v(x, t) evaluated on row blocks: bounds the (rows x components) posterior of a large empirical mixture."""
    return lambda x, t: torch.cat([field(xb, tb) for xb, tb in zip(x.split(rows), t.split(rows), strict=True)])


def quality(name: str, p: dict) -> dict:
    """Default-config training on `name`: time, NLL gap to the entropy, energy distance of Euler samples at
    several NFE for the learned field and for the exact marginal field of the same path."""
    cfg = (
        TrainConfig(data=name, device="cpu")
        if p["train_steps"] is None
        else TrainConfig(data=name, device="cpu", steps=p["train_steps"])
    )
    target = get_dataset(name)
    result, wall, cpu = _timed(lambda: train_flow(cfg, progress=False))
    model = (result.ema_model if result.ema_model is not None else result.model).eval()
    gap = nll_gap(
        model, target, n=p["nll_points"], generator=torch.Generator().manual_seed(1), steps=p["nll_steps"], method="rk4"
    )
    if isinstance(target, GaussianMixture):
        exact_target, exact_kind = target, "closed form (the data set is a Gaussian mixture)"
    else:
        pts = target.sample(p["empirical_points"], generator=torch.Generator().manual_seed(2))
        exact_target = GaussianMixture.from_points(pts)
        exact_kind = (
            f"exact field of an empirical sample of {p['empirical_points']} points "
            "(GaussianMixture.from_points), not of the continuous density"
        )
    exact = _chunked(ExactField(get_path(cfg.path), exact_target))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(p["ed_points"], target.dim, generator=g)
    ref = target.sample(p["ed_points"], generator=g)
    dist = {"learned": {}, "exact": {}}
    for k in NFES:  # same x0 and reference set for both fields: common random numbers sharpen the ratio
        dist["learned"][k] = energy_distance(integrate(model, x0, k, "euler"), ref)
        dist["exact"][k] = energy_distance(integrate(exact, x0, k, "euler"), ref)
    return {
        "data": name,
        "config": {
            k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "hidden", "depth", "lr_schedule", "ema_decay")
        },
        "train_seconds": result.seconds,
        "train_wall_seconds": wall,
        "train_cpu_seconds": cpu,
        "final_loss": result.losses[-1],
        "nll": gap,
        "nll_method": f"rk4, {p['nll_steps']} steps, exact divergence, {p['nll_points']} points",
        "energy_distance": dist,
        "ed_points": p["ed_points"],
        "exact_field": exact_kind,
        "_model": model,
    }


# ------------------------------------------------------------------------------------------------ under load
# a pure-Python busy loop (`while True: pass`) that also ends itself should the bench die without its finally blocks
COMPETITOR = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**6): pass\n"


@contextmanager
def competitor() -> Iterator[subprocess.Popen]:
    """One CPU-bound busy loop in a child process for the duration of the block; always ended afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPETITOR],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)  # interpreter start-up: let it reach its loop before anything is timed
        yield proc
        if proc.poll() is not None:
            raise RuntimeError(
                f"the competing process ended early (exit status {proc.returncode}): "
                "the 'loaded' timings were not taken under load"
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds used so far by the whole machine (busy time in /proc/stat) or by process `pid` (Linux; else None)."""
    try:
        if pid is None:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            ticks = sum(f) - f[3] - f[4]  # all but idle and iowait (guest time is inside user)
        else:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(f[11]) + int(f[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@contextmanager
def _policy(threads: str | int, default: int) -> Iterator[None]:
    """One measurement under `threads` (an int: fixed, "auto": fmtoy's policy): torch back at its default count, the
    policy's shared verdict cleared (auto measures afresh), and FMTOY_THREADS set for the calls that take no
    threads= argument (log_likelihood); the environment variable is restored afterwards."""
    torch.set_num_threads(default)
    if threads == "auto":
        fmthreads._VERDICT.update(threads=0, until=0.0)
    saved = os.environ.get(fmthreads.ENV)
    os.environ[fmthreads.ENV] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(fmthreads.ENV, None)
        else:
            os.environ[fmthreads.ENV] = saved


def _ul_items(u: dict) -> dict[str, Callable[[str | int], tuple[float, dict]]]:
    """item -> measure(threads) returning (throughput per second, {thread count: steps} where fmtoy reports it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    target = get_dataset("eight_gaussians")
    g = torch.Generator().manual_seed(7)
    x_ll = target.sample(u["ll_points"], generator=g)
    model_ll = build_model(TrainConfig(device="cpu")).eval()  # default size (hidden 128, depth 3), untrained
    x0_w, ref_w = torch.randn(u["widget_points"], 2, generator=g), target.sample(u["widget_points"], generator=g)

    def training(threads):
        train_flow(TrainConfig(device="cpu", steps=u["train_warmup"], threads=threads), progress=False)
        with _policy(threads, fmthreads._IMPORT_THREADS):  # the warm-up's verdict must not carry over
            r = train_flow(TrainConfig(device="cpu", steps=u["train_steps"], threads=threads), progress=False)
        return u["train_steps"] / r.seconds, dict(r.threads)

    def likelihood(threads):
        start = time.perf_counter()
        log_likelihood(model_ll, x_ll, StandardNormal(2), steps=u["ll_steps"], method="rk4", divergence="exact")
        return 1.0 / (time.perf_counter() - start), {}

    def widget(threads):
        """A chapter widget's redraws (ch6's draw on its first call, ch5's sampling), widget_redraws of them as a
        student moving a slider: each trains a tiny model for a few hundred steps, samples it with Euler and
        scatters the samples over the data with the energy distance as title. Redraws per second."""
        start, counts, redraws = time.perf_counter(), {}, u.get("widget_redraws", 1)
        for seed in range(redraws):
            for n, k in redraw(threads, seed).items():
                counts[n] = counts.get(n, 0) + k
        return redraws / (time.perf_counter() - start), counts

    def redraw(threads, seed):
        r = train_flow(
            TrainConfig(
                device="cpu",
                hidden=64,
                depth=2,
                batch_size=128,
                steps=u["widget_train_steps"],
                threads=threads,
                seed=seed,
            ),
            progress=False,
        )
        out = integrate(r.model, x0_w, u["widget_nfe"], "euler", threads=threads)
        fig = Figure(figsize=(4, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.scatter(ref_w[:, 0], ref_w[:, 1], s=1, c="0.8")
        ax.scatter(out[:, 0], out[:, 1], s=1)
        ax.set(xlim=(-6, 6), ylim=(-6, 6), aspect="equal")
        ax.set_title(f"{u['widget_nfe']} Euler steps: energy distance {energy_distance(out, ref_w):.3f}", fontsize=9)
        fig.canvas.draw()
        return dict(r.threads)

    return {"training": training, "likelihood": likelihood, "widget": widget}


def _ul_ratios(item: dict) -> dict:
    """loaded/idle of each policy and new idle / old idle, from the median throughputs."""
    med = {pol: {cond: item[pol][cond]["median"] for cond in UL_CONDITIONS} for pol in UL_POLICIES}
    return {
        "loaded_over_idle": {pol: med[pol]["loaded"] / med[pol]["idle"] for pol in UL_POLICIES},
        "new_idle_over_old_idle": med["new"]["idle"] / med["old"]["idle"],
    }


def under_load(u: dict) -> dict:
    """Each item idle and beside one competing CPU-bound process (started and ended here), with the old behaviour
    (torch's default thread count, fixed) and the new policy (threads="auto"); repeats alternate the policy order and
    restart the competitor. Throughput per second, median and best of the repeats."""
    default = fmthreads._IMPORT_THREADS
    policies = {"old": default, "new": "auto"}
    saved = torch.get_num_threads()
    start, load_start = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs: dict = {item: {pol: {cond: [] for cond in UL_CONDITIONS} for pol in UL_POLICIES} for item in UL_ITEMS}
    pids: list[int] = []
    other: dict[str, list[float]] = {cond: [] for cond in UL_CONDITIONS}  # other processes' cores, per block
    try:
        measure = _ul_items(u)
        for fn in measure.values():  # warm-up of every code path, idle, under both policies
            for threads in policies.values():
                with _policy(threads, default):
                    fn(threads)
        for r in range(u["repeats"]):
            for cond in UL_CONDITIONS:
                with competitor() if cond == "loaded" else nullcontext() as proc:
                    if proc is not None:
                        pids.append(proc.pid)
                    wall0, own0, busy0 = time.perf_counter(), time.process_time(), _cpu_seconds()
                    comp0 = _cpu_seconds(proc.pid) if proc is not None else 0.0
                    for item, fn in measure.items():
                        for pol in UL_POLICIES if r % 2 == 0 else UL_POLICIES[::-1]:
                            t0 = time.perf_counter()
                            with _policy(policies[pol], default):
                                value, counts = fn(policies[pol])
                                verdict = int(fmthreads._VERDICT["threads"]) if pol == "new" else default
                            runs[item][pol][cond].append({"per_s": value, "threads": counts, "verdict": verdict})
                            print(
                                f"under load: repeat {r + 1}/{u['repeats']} {cond:6} {item:10} {pol}: "
                                f"{value:8.3g} {UL_UNITS[item]} ({time.perf_counter() - t0:.1f} s)",
                                file=sys.stderr,
                                flush=True,
                            )
                    comp1, busy1 = _cpu_seconds(proc.pid) if proc is not None else 0.0, _cpu_seconds()
                    if None not in (busy0, busy1, comp0, comp1):
                        used = (busy1 - busy0) - (time.process_time() - own0) - (comp1 - comp0)
                        other[cond].append(max(0.0, used) / (time.perf_counter() - wall0))
    finally:
        torch.set_num_threads(saved)
    items = {}
    for item, by_pol in runs.items():
        items[item] = {"label": UL_ITEMS[item], "unit": UL_UNITS[item]}
        for pol, by_cond in by_pol.items():
            items[item][pol] = {}
            for cond, rs in by_cond.items():
                vals = [x["per_s"] for x in rs]
                counts: dict[int, int] = {}
                for x in rs:
                    for n, k in x["threads"].items():
                        counts[n] = counts.get(n, 0) + k
                items[item][pol][cond] = {
                    "median": statistics.median(vals),
                    "best": max(vals),
                    "values": vals,
                    "threads": counts,
                    "verdicts": [x["verdict"] for x in rs],
                }
        items[item].update(_ul_ratios(items[item]))
    return {
        "params": u,
        "policies": {
            "old": f"{default} threads (torch's default count, fixed)",
            "new": "threads='auto' (fmtoy.threads)",
        },
        "old_threads": default,
        "cpu_count": os.cpu_count(),
        "load_avg_1min_start": load_start,
        "competitor": COMPETITOR,
        "competitor_pids": pids,
        "other_cores": {cond: statistics.mean(v) if v else None for cond, v in other.items()},
        "seconds": time.perf_counter() - start,
        "items": items,
    }


def judge_under_load(ul: dict) -> list[dict]:
    """The two under-load targets of each item, from its median throughputs: loaded >= 0.4x idle for the new policy,
    and the new policy's idle throughput >= 0.9x the old fixed count's."""
    t, rows = UNDER_LOAD_TARGETS, []
    for item in ul["items"].values():
        ratio = _ul_ratios(item)
        x, y = ratio["loaded_over_idle"]["new"], ratio["new_idle_over_old_idle"]
        rows.append(
            dict(
                target=f"under load, auto keeps >= {t['loaded_over_idle']}x its idle throughput ({item['label']})",
                value=f"{x:.2f}x (old {ul['old_threads']} threads: {ratio['loaded_over_idle']['old']:.2f}x)",
                ok=x >= t["loaded_over_idle"],
            )
        )
        rows.append(
            dict(
                target=f"idle, auto >= {t['new_idle_over_old_idle']}x old {ul['old_threads']}-thread "
                f"throughput ({item['label']})",
                value=f"{y:.2f}x",
                ok=y >= t["new_idle_over_old_idle"],
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------ widgets
def widget_chapters(names=None) -> list[Path]:
    """The chapters whose code builds an interactive_figure, in toc order (or the named ones)."""
    from fmtoy.course import notebooks

    found = notebooks.widget_chapters(ROOT)
    if names is not None:
        found = [p for p in found if p.stem in names]
        if len(found) != len(names):
            raise ValueError(f"no widget chapter among {sorted(set(names) - {p.stem for p in found})}")
    return found


def widget_redraws(w: dict) -> dict:
    """Each widget chapter run top to bottom by nbclient in a fresh kernel (book/ as its folder, trainings through a
    run cache of this section), then, in the same kernel, redraw_times(changes): the first control of every widget
    moved one step at a time, each redraw timed in the kernel (draw and figure, not the browser's rendering)."""
    import tempfile

    import nbformat

    from fmtoy import runcache
    from fmtoy.course.assignments import read_chapter
    from fmtoy.course.notebooks import execute

    start, rows, runs = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory(prefix="fmtoy-bench-runs-") as cache:
        env = {**os.environ, runcache.ENV: cache}
        for path in widget_chapters(w["chapters"]):
            nb = read_chapter(path)
            nb.cells.append(nbformat.v4.new_code_cell(WIDGET_PROBE.format(changes=w["changes"])))
            t0 = time.perf_counter()
            execute(nb, path.parent, env, timeout=900)
            runs[path.stem] = time.perf_counter() - t0
            text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
            line = next(x for x in text.splitlines() if x.startswith("FMTOY-REDRAWS "))
            rows += [{"chapter": path.stem, **r} for r in json.loads(line.split(" ", 1)[1])]
    return {"params": w, "rows": rows, "chapter_seconds": runs, "seconds": time.perf_counter() - start}


def widget_trains(row: dict) -> bool:
    """A widget that trains on a change: its median redraw is over the budget and its revisit of a setting it had
    drawn (cached) is within it."""
    budget = WIDGET_TARGETS["redraw_seconds"]
    return row["median"] > budget and row["revisit"] is not None and row["revisit"] <= budget


def judge_widgets(wd: dict) -> list[dict]:
    """Per widget: median redraw <= 0.5 s unless it trains (then its cached revisit must be), and no redraw > 5 s."""
    t, rows = WIDGET_TARGETS, []
    for r in wd["rows"]:
        name, trains = f"{r['chapter']}: {r['control']}", widget_trains(r)
        value = f"median {r['median']:.2f} s" + (f", trains; cached revisit {r['revisit']:.2f} s" if trains else "")
        rows.append(
            dict(
                target=f"widget redraw <= {t['redraw_seconds']} s unless it trains ({name})",
                value=value,
                ok=r["median"] <= t["redraw_seconds"] or trains,
            )
        )
        rows.append(
            dict(
                target=f"no redraw blocks the kernel > {t['block_seconds']:.0f} s ({name})",
                value=f"longest {max(r['seconds']):.2f} s",
                ok=max(r["seconds"]) <= t["block_seconds"],
            )
        )
    return rows


def _markdown_widgets(wd: dict) -> list[str]:
    """The widgets section of the report."""
    lines = [
        "",
        "## Widgets: redraw times",
        "",
        f"Each chapter with a widget run top to bottom by nbclient (section time {wd['seconds']:.0f} s), then in the "
        f"same kernel every control of each widget moved {wd['params']['changes']} steps (the next option or "
        "value, wrapping) and each redraw timed in the kernel: the draw function and its figure, not the browser. "
        "Revisit: one redraw at a value already drawn, which a widget that caches its training draws again "
        "without training.",
        "",
        "| chapter | control | median (s) | longest (s) | revisit (s) | trains |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in wd["rows"]:
        back = f"{r['revisit']:.2f}" if r["revisit"] is not None else "-"
        lines.append(
            f"| {r['chapter']} | {r['control']} | {r['median']:.3f} | {max(r['seconds']):.3f} | {back} | "
            f"{'yes' if widget_trains(r) else 'no'} |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ report
def judge(results: dict) -> list[dict]:
    """Pass/fail of each target (None where it could not be measured, e.g. a peer is not installed)."""
    rows = []
    for q in results.get("quality", []):
        rows.append(
            dict(
                target=f"default training <= {TARGETS['train_seconds']:.0f} s ({q['data']})",
                value=f"{q['train_seconds']:.1f} s",
                ok=q["train_seconds"] <= TARGETS["train_seconds"],
            )
        )
        lrn, ext = q["energy_distance"]["learned"][8], q["energy_distance"]["exact"][8]
        rows.append(
            dict(
                target=f"energy distance at NFE 8 <= {TARGETS['nfe8_ratio']}x exact field's ({q['data']})",
                value=f"{lrn:.4f} vs {ext:.4f} ({lrn / ext:.2f}x)" if ext > 0 else f"{lrn:.4f} vs {ext:.4f}",
                ok=lrn <= TARGETS["nfe8_ratio"] * ext,
            )
        )
        if q["data"] == "eight_gaussians":
            g = q["nll"]
            rows.append(
                dict(
                    target=f"NLL gap <= {TARGETS['nll_gap_eight_gaussians']} nats (eight_gaussians)",
                    value=f"{g['gap']:.4f} +- {g['gap_stderr']:.4f}",
                    ok=g["gap"] <= TARGETS["nll_gap_eight_gaussians"],
                )
            )
    if "throughput" in results:
        tp = results["throughput"]["results"]
        for peer in peers.PEERS:
            ok, value = None, "peer not installed"
            if peer in tp:
                a, b = tp["fmtoy"]["it_per_s_median"], tp[peer]["it_per_s_median"]
                ok, value = a >= ON_PAR * b, f"{a:.0f} vs {b:.0f} it/s ({a / b:.2f}x)"
            rows.append(dict(target=f"training it/s on par with {peer} (>= {ON_PAR:.0%})", value=value, ok=ok))
    if "likelihood" in results:
        ll = results["likelihood"]["seconds"]
        ok, value = None, "peer not installed"
        if "flow_matching" in ll:
            ok = ll["fmtoy"] <= ll["flow_matching"] / ON_PAR
            value = (
                f"{ll['fmtoy']:.2f} vs {ll['flow_matching']:.2f} s ({ll['flow_matching'] / ll['fmtoy']:.2f}x faster)"
            )
        rows.append(dict(target="likelihood time on par with flow_matching", value=value, ok=ok))
    if "under_load" in results:
        rows += judge_under_load(results["under_load"])
    if "widgets" in results:
        rows += judge_widgets(results["widgets"])
    return rows


def markdown(res: dict) -> str:
    """The human-readable report."""
    m = res["machine"]
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = [
        f"# fmtoy benchmark{' (QUICK smoke run: numbers not meaningful)' if res['quick'] else ''}",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch']} with {m['torch_threads']} "
        f"threads, Python {m['python']}, 1-min load {m['load_avg_1min']:.1f} at start; peers: "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in m["peers"].items())
        + ".",
        f"Total bench time {res['total_seconds']:.0f} s.",
    ]
    if res.get("sections"):
        lines += [
            "Sections (finished at): "
            + ", ".join(f"{k} ({v})" for k, v in res["sections"].items())
            + "; a section run alone (--only) keeps the others from the earlier report in the same folder."
        ]
    if "throughput" in res and m["load_avg_1min"] is not None and m["load_avg_1min"] > 0.5 * m["cpu_count"]:
        lines += [
            "",
            f"**Warning: the machine was busy (1-min load {m['load_avg_1min']:.1f} on {m['cpu_count']} "
            "CPUs): wall-clock timings are unreliable; compare the CPU-second columns (1 thread).**",
        ]
    lines += ["", "## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {r['target']} | {r['value']} | {mark[r['ok']]} |" for r in res["targets"]]
    if "throughput" in res:
        lines += _markdown_compare(res)
    if "under_load" in res:
        lines += _markdown_under_load(res["under_load"])
    if "widgets" in res:
        lines += _markdown_widgets(res["widgets"])
    return "\n".join(lines) + "\n"


def _markdown_compare(res: dict) -> list[str]:
    """The peer comparison and quality sections of the report."""
    tp, ll = res["throughput"], res["likelihood"]
    lines = [
        "",
        "## Training throughput (CPU)",
        "",
        f"VelocityMLP(hidden={tp['hidden']}, depth={tp['depth']}), batch {tp['batch_size']}, eight_gaussians, "
        f"fused Adam, same lr and schedule; {tp['steps']} steps after {tp['warmup']} warm-up, "
        f"{tp['repeats']} repeats (implementations interleaved).",
        "",
        "| implementation | it/s (median) | it/s (best) | it per CPU-second (median) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {k} | {v['it_per_s_median']:.0f} | {v['it_per_s_best']:.0f} | {v['it_per_cpu_s_median']:.0f} |"
        for k, v in tp["results"].items()
    ]
    lines += [
        "",
        "## Exact likelihood",
        "",
        f"{ll['points']} eight_gaussians points, trained default model, exact divergence, {ll['steps']} "
        f"explicit {ll['method']} steps from t=1 to t=0 on the same uniform grid in both "
        f"(flow_matching through torchdiffeq's fixed-grid '{ll['method']}' with time_grid = that grid).",
        "",
        "| implementation | seconds (median) | CPU seconds (median) | mean log p |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {k} | {v:.2f} | {ll['cpu_seconds'][k]:.2f} | {ll['mean_log_p'][k]:.4f} |" for k, v in ll["seconds"].items()
    ]
    lines += [f"| true log q (data density) | | | {ll['true_mean_log_q']:.4f} |"]
    if "max_abs_diff" in ll:
        lines += [
            "",
            f"Agreement of log p: max |diff| = {ll['max_abs_diff']:.2e}, mean |diff| = {ll['mean_abs_diff']:.2e} nats.",
        ]
    for q in res["quality"]:
        c, g = q["config"], q["nll"]
        lines += [
            "",
            f"## Quality: {q['data']}",
            "",
            f"Default TrainConfig ({c['steps']} steps, batch {c['batch_size']}, lr {c['lr']}, "
            f"hidden {c['hidden']}, depth {c['depth']}, {c['lr_schedule']} schedule, EMA {c['ema_decay']}): "
            "trained in "
            f"{q['train_seconds']:.1f} s ({q['train_cpu_seconds']:.1f} CPU-s), final loss {q['final_loss']:.3f}.",
            f"NLL {g['nll']:.4f} vs entropy {g['entropy']:.4f}: gap {g['gap']:.4f} +- {g['gap_stderr']:.4f} "
            f"nats ({q['nll_method']}).",
            f"Energy distance to {q['ed_points']} fresh data points, Euler, {q['ed_points']} samples from the "
            f"same x0; exact field: {q['exact_field']}.",
            "",
            "| NFE | " + " | ".join(str(k) for k in NFES) + " |",
            "| --- |" + " --- |" * len(NFES),
        ]
        for kind in ("learned", "exact"):
            lines.append(f"| {kind} | " + " | ".join(f"{q['energy_distance'][kind][k]:.4f}" for k in NFES) + " |")
    return lines


def _threads_used(stats: dict) -> str:
    """'1: 380, 2: 20 steps; verdicts 1, 1, 1' from one policy/condition's summed thread counts and verdicts."""
    used = ", ".join(f"{n}: {k}" for n, k in sorted(stats["threads"].items(), key=lambda kv: int(kv[0])))
    return (f"{used} steps; " if used else "") + "verdicts " + ", ".join(str(v) for v in stats["verdicts"])


def _markdown_under_load(ul: dict) -> list[str]:
    """The under-load section of the report."""
    u, load = ul["params"], ul["load_avg_1min_start"]
    lines = [
        "",
        "## Under load: CPU thread policy",
        "",
        f"Each item idle and beside one competing CPU-bound process (a pure-Python busy loop, started and "
        f"ended by the bench), for the old behaviour, {ul['policies']['old']}, OpenMP's default wait policy, and "
        f"the new one, {ul['policies']['new']}; each starts with torch at {ul['old_threads']} threads and the "
        f"policy's verdict cleared. Median of {u['repeats']} repeats (policy order alternating, the competitor "
        f"restarted each repeat); section time {ul['seconds']:.0f} s on {ul['cpu_count']} CPUs, 1-min load "
        + (f"{load:.1f}" if load is not None else "n/a")
        + " at its start.",
        "",
        f"- training: default `TrainConfig` (eight_gaussians, batch 1024, hidden 128, depth 3), "
        f"{u['train_steps']} steps after {u['train_warmup']} warm-up steps; steps/s of the loop.",
        f"- exact likelihood: `log_likelihood` of {u['ll_points']} points under an untrained default-size "
        f"VelocityMLP, {u['ll_steps']} rk4 steps, exact divergence; calls per second (1 / time).",
        f"- widget redraw (a chapter widget's draw: ch6's first redraw, ch5's sampling), "
        f"{u.get('widget_redraws', 1)} in a row as a student moving a slider (seeds 0, 1, ...): each trains a tiny "
        f"VelocityMLP (hidden 64, depth 2, batch 128) for {u['widget_train_steps']} steps, integrates "
        f"{u['widget_points']} points with {u['widget_nfe']} Euler steps, scatters them over the data with the "
        "energy distance as title and renders the figure (Agg); redraws per second.",
        "",
    ]
    oc = ul.get("other_cores", {})
    if oc.get("idle") is not None:
        lines += [
            f"CPU used by other processes while measuring (from /proc/stat, less this process and the "
            f"competitor): {oc['idle']:.2f} cores in the idle blocks, {oc['loaded']:.2f} in the loaded ones "
            f"(0 on a quiet machine).",
            "",
        ]
    measured = [v for v in oc.values() if v is not None]  # direct; the load average lags by minutes
    if (max(measured) > OTHER_LOAD_WARN) if measured else (load is not None and load > 0.5 * ul["cpu_count"]):
        lines += [
            "**Warning: the machine was busy ("
            + (
                f"other processes used up to {max(measured):.2f} cores"
                if measured
                else f"1-min load {load:.1f} at the start"
            )
            + f" on {ul['cpu_count']} CPUs): they "
            "distort the 'idle' and 'loaded' conditions.**",
            "",
        ]
    lines += [
        "| item | unit | old idle | old loaded | old loaded/idle | new idle | new loaded | new loaded/idle "
        "| new idle / old idle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for item in ul["items"].values():
        r = _ul_ratios(item)
        cells = [f"{item[pol][cond]['median']:.3g}" for pol in UL_POLICIES for cond in UL_CONDITIONS]
        lo = r["loaded_over_idle"]
        lines.append(
            f"| {item['label']} | {item['unit']} | {cells[0]} | {cells[1]} | {lo['old']:.2f} | {cells[2]} | "
            f"{cells[3]} | {lo['new']:.2f} | {r['new_idle_over_old_idle']:.2f} |"
        )
    lines += [
        "",
        "Threads the new policy used (training steps per thread count, summed over repeats; the "
        "likelihood reports no steps) and its verdict at the end of each repeat (0: still measuring):",
        "",
        "| item | idle | loaded |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {item['label']} | {_threads_used(item['new']['idle'])} | {_threads_used(item['new']['loaded'])} |"
        for item in ul["items"].values()
    ]
    return lines


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and os.replace: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _previous(out: Path, quick: bool) -> dict:
    """The earlier report in `out` (--only keeps its other sections), if it exists and is of the same mode."""
    try:
        prev = json.loads((out / "latest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(prev, dict) and prev.get("quick") == quick and "machine" in prev):
        return {}
    for q in prev.get("quality", []):  # JSON made the NFE keys strings
        q["energy_distance"] = {kind: {int(k): v for k, v in d.items()} for kind, d in q["energy_distance"].items()}
    return prev


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, numbers not meaningful")
    ap.add_argument(
        "--only",
        choices=SECTIONS,
        default=None,
        help="run one section alone: 'compare' (peers, likelihood, quality), 'under-load' (thread "
        "policy idle and beside a competing process) or 'widgets' (every chapter widget's redraw time); the "
        "other sections of the report in --out are kept",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder (latest.md, latest.json)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice; the under-load section sets its own counts)",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    p = QUICK if args.quick else FULL
    sections = SECTIONS if args.only is None else (args.only,)
    out = Path(args.out)
    start = time.perf_counter()
    res: dict = {"quick": args.quick, "machine": machine_info(), "params": p}
    if args.only is not None:
        prev = _previous(out, args.quick)
        if "compare" not in sections and "throughput" in prev:  # keep the earlier run's header with its sections
            res = {k: v for k, v in prev.items() if k not in ("targets", "under_load", "widgets")}
        for section, key in (("under-load", "under_load"), ("widgets", "widgets")):
            if section not in sections and key in prev:
                res[key] = prev[key]
        res["sections"] = {k: v for k, v in prev.get("sections", {}).items() if k not in sections}
    else:
        res["sections"] = {}
    if "compare" in sections:
        res["quality"] = [quality(name, p) for name in DATASETS]
        res["likelihood"] = likelihood(
            res["quality"][0]["_model"], get_dataset(DATASETS[0]), p["ll_points"], p["ll_steps"], p["ll_repeats"]
        )
        res["throughput"] = throughput(TrainConfig(device="cpu"), p["tp_steps"], p["tp_warmup"], p["tp_repeats"])
        for q in res["quality"]:
            q.pop("_model")
        res["sections"]["compare"] = time.strftime("%Y-%m-%d %H:%M")
        res["total_seconds"] = time.perf_counter() - start
    if "under-load" in sections:
        res["under_load"] = under_load(UNDER_LOAD_QUICK if args.quick else UNDER_LOAD)
        res["sections"]["under-load"] = time.strftime("%Y-%m-%d %H:%M")
        if "compare" in sections or "total_seconds" not in res:
            res["total_seconds"] = time.perf_counter() - start
    if "widgets" in sections:
        res["widgets"] = widget_redraws(WIDGETS_QUICK if args.quick else WIDGETS)
        res["sections"]["widgets"] = time.strftime("%Y-%m-%d %H:%M")
        if len(sections) > 1 or "total_seconds" not in res:
            res["total_seconds"] = time.perf_counter() - start
    res["targets"] = judge(res)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "latest.json", json.dumps(res, indent=1, default=str))
    text = markdown(res)
    _write_atomic(out / "latest.md", text)
    print(text)
    return res


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks run: the competitor is ended
    main()
