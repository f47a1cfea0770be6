"""Command line: `fmtoy train | sample | animate | list | assign | grade | notebooks | student-book`. Errors print one
line `fmtoy: error: ...` and exit 2.

    fmtoy train --data eight_gaussians --path ot --steps 5000 --out runs/x
    fmtoy sample --run runs/x --n 2000 --out samples.png    # midpoint, 4 steps (NFE 8)
    fmtoy animate --run runs/x --out anim.gif
    fmtoy assign --out assignments                      # student + instructor notebooks of every chapter
    fmtoy grade assignments/release/ch5_paths/ch5_paths.ipynb --json grade.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ._checks import check_positive_int
from ._files import write_atomically
from ._version import __version__

SAMPLE_FORMATS = (".csv", ".npy", ".png")


class UsageError(Exception):
    """A bad command line (argparse's complaint), reported as one line."""


# Ranges of the numeric options: wide enough for any toy run, narrow enough that a typo fails before any work.
MAX_STEPS, MAX_N, MAX_BATCH, MAX_HIDDEN, MAX_DEPTH, MAX_SEED = 10**7, 10**7, 10**6, 8192, 64, 2**63 - 1
MAX_SOLVER_STEPS, MAX_TRAJECTORY_BYTES = 10**5, 2 * 1024**3  # animate keeps every particle at every step


def _int_in(option: str, lo: int, hi: int):
    """An argparse type: an integer in [lo, hi], else one line naming the option and the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise UsageError(f"{option} must be an integer in [{lo}, {hi}], got {text!r}")
        return value

    return parse


def _float_in(option: str, lo: float, hi: float, low_open: bool = True):
    """An argparse type: a finite number in (lo, hi] (or [lo, hi]), else one line naming the option and the range."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (lo < value if low_open else lo <= value) and value <= hi
        if not ok:
            bracket = "(" if low_open else "["
            raise UsageError(f"{option} must be a number in {bracket}{lo:g}, {hi:g}], got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit; we want one line
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    p = _Parser(prog="fmtoy", description="Flow matching playground on 2D toy data (see `fmtoy list`).")
    p.add_argument("--version", action="version", version=f"fmtoy {__version__}")
    sub = p.add_subparsers(
        dest="command", metavar="{train,sample,animate,list,assign,grade,notebooks,student-book}", required=True
    )

    t = sub.add_parser(
        "train",
        help="train a model: conditional flow matching (default), shortcut, meanflow, vrfm, reflow, consistency",
    )
    t.add_argument(
        "--method",
        default="cfm",
        help="cfm (default), shortcut, meanflow or vrfm (chapters 6-7), reflow or consistency (chapter 10)",
    )
    t.add_argument("--data", default=None, help=f"data set (default {d.data}; vrfm: a setting, default hexagon_2d)")
    t.add_argument("--path", default=None, help=f"cfm only: probability path ot, ve, vp (default {d.path})")
    t.add_argument(
        "--steps",
        type=_int_in("--steps", 1, MAX_STEPS),
        default=None,
        help=f"training steps (default: the method's, cfm {d.steps})",
    )
    t.add_argument(
        "--batch-size",
        type=_int_in("--batch-size", 1, MAX_BATCH),
        default=None,
        help=f"default: the method's, cfm {d.batch_size}",
    )
    t.add_argument(
        "--lr", type=_float_in("--lr", 0, 10), default=None, help=f"learning rate (default: the method's, cfm {d.lr})"
    )
    t.add_argument("--seed", type=_int_in("--seed", 0, MAX_SEED), default=d.seed, help=f"default {d.seed}")
    t.add_argument(
        "--sigma-min",
        type=_float_in("--sigma-min", 0, 1, low_open=False),
        default=None,
        help=f"cfm only (default {d.sigma_min})",
    )
    t.add_argument(
        "--ema",
        type=_float_in("--ema", 0, 0.999999),
        default=None,
        help="cfm only: EMA decay, e.g. 0.999 (default: no EMA)",
    )
    t.add_argument("--coupling", default=None, help=f"cfm only: independent or ot (default {d.coupling})")
    t.add_argument(
        "--hidden", type=_int_in("--hidden", 1, MAX_HIDDEN), default=None, help=f"default: the method's, cfm {d.hidden}"
    )
    t.add_argument(
        "--depth", type=_int_in("--depth", 1, MAX_DEPTH), default=None, help=f"default: the method's, cfm {d.depth}"
    )
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--threads", default=None, help=THREADS_HELP)
    t.add_argument("--out", default=None, help="run folder (default runs/<data>_<path>)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, helptext in (
        ("sample", "draw samples x_1 from a trained run"),
        ("animate", "animate particles flowing from noise to data"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--run", required=True, help="run folder written by `fmtoy train`")
        s.add_argument(
            "--out",
            required=True,
            help="output file: " + (".npy, .csv or .png" if name == "sample" else ".gif, .mp4 (needs ffmpeg) or .html"),
        )
        n, steps, solver = (2000, 4, "midpoint") if name == "sample" else (500, 40, "midpoint")
        s.add_argument("--n", type=_int_in("--n", 1, MAX_N), default=n, help=f"number of particles (default {n})")
        s.add_argument(
            "--steps",
            type=_int_in("--steps", 1, MAX_SOLVER_STEPS),
            default=steps,
            help=f"solver steps (default {steps}: with midpoint, {2 * steps} network evaluations (NFE); euler costs 1 "
            "NFE a step, midpoint 2, rk4 4; shortcut and MeanFlow runs take `steps` network evaluations)",
        )
        s.add_argument("--solver", default=solver, help=f"euler, midpoint or rk4 (default {solver}; CFM and VRFM runs)")
        s.add_argument("--seed", type=_int_in("--seed", 0, MAX_SEED), default=0, help="default 0")
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        s.add_argument("--threads", default=None, help=THREADS_HELP)
    a = sub.choices["animate"]
    a.add_argument("--max-frames", type=_int_in("--max-frames", 1, 1000), default=30, help="frames (default 30)")
    a.add_argument(
        "--fps", type=_float_in("--fps", 0.1, 100, low_open=False), default=10.0, help="frames per second (default 10)"
    )

    sub.add_parser("list", help="list the data sets, paths, solvers and couplings")

    book = str(Path(__file__).resolve().parents[1] / "book")
    g = sub.add_parser("assign", help="write student (release/) and instructor (source/) notebooks of every chapter")
    g.add_argument("--book", default=book, help="folder of the chapter .md files (default: this checkout's book/)")
    g.add_argument("--out", default="assignments", help="output folder (default assignments)")
    r = sub.add_parser("grade", help="grade a filled-in student notebook; prints a score table")
    r.add_argument("notebook", help="the student's .ipynb")
    r.add_argument(
        "--source",
        default=None,
        help="instructor notebook (.ipynb) or chapter (.md); default: the book chapter whose exercises it holds",
    )
    r.add_argument("--chapter", default=None, help="grade against this book chapter (a name, e.g. ch2_marginal)")
    r.add_argument("--json", default=None, help="also write the result as JSON to this file (for an LMS)")
    r.add_argument("--timeout", type=_int_in("--timeout", 1, 86400), default=60, help="seconds per cell (default 60)")
    r.add_argument(
        "--memory", type=_int_in("--memory", 256, 1 << 20), default=4096, help="MiB per student process (default 4096)"
    )
    r.add_argument(
        "--sandbox",
        choices=("auto", "require", "off"),
        default="auto",
        help="bubblewrap: auto (if installed), require (fail without it), off (separate process only)",
    )
    n = sub.add_parser("notebooks", help="write every chapter as .ipynb, each opening with a cell that installs fmtoy")
    n.add_argument("--root", default=str(Path(book).parent), help="book root with _config.yml and _toc.yml")
    n.add_argument("--out", default="_build/notebooks", help="output folder (default _build/notebooks)")
    n.add_argument("--url", default=None, help="git URL the setup cell installs from (default: repository.url)")
    n.add_argument("--branch", default=None, help="its branch (default: repository.branch, else main)")
    n.add_argument("--only", default=None, help="comma-separated chapters to write (default: every chapter)")
    n.add_argument("--execute", action="store_true", help="then run each in a fresh kernel, in OUT/<chapter>/ "
                   "with its outputs; OUT/executed.json reports times and errors")  # fmt: skip
    b = sub.add_parser("student-book", help="write the student edition's book sources (solutions removed)")
    b.add_argument("--root", default=str(Path(book).parent), help="book root with _config.yml and _toc.yml")
    b.add_argument("--out", default="_build/student_src", help="output folder (default _build/student_src)")
    return p


def _use_agg() -> None:
    """A fresh command-line process plots off-screen; never switch the backend of a session that already has pyplot."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


THREADS_HELP = "CPU threads: auto (measure 1 vs torch's default) or N (default: $FMTOY_THREADS, else auto)"


def _threads(value: str | None) -> str | int | None:
    """--threads as the `threads` option of fmtoy (None: FMTOY_THREADS or the user's torch setting, else auto)."""
    from .threads import check_threads

    return check_threads(int(value) if value is not None and value.isdigit() else value)


def _threads_used(counts: dict[int, int]) -> str:
    """'2 threads' or '1 thread for 290 steps, 2 threads for 10 steps' from a FitResult's threads."""
    word = lambda n: f"{n} thread" + ("s" if n != 1 else "")  # noqa: E731
    if len(counts) == 1:
        return word(next(iter(counts)))
    return ", ".join(f"{word(n)} for {k} steps" for n, k in sorted(counts.items()))


# ----------------------------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    """Print the registries."""
    from .data import list_datasets
    from .losses import COUPLINGS
    from .paths import list_paths
    from .solvers import SOLVERS

    print("datasets: " + ", ".join(list_datasets()))
    print("paths:    " + ", ".join(list_paths()))
    print("solvers:  " + ", ".join(SOLVERS))
    print("couplings: " + ", ".join(sorted(COUPLINGS)))
    return 0


def _train_config(args: argparse.Namespace):
    """The config of `fmtoy train`: the method's own config class, its defaults where an option is not given."""
    from ._checks import check_choice
    from .checkpoints import METHODS

    method = check_choice("method", args.method, METHODS)
    cfm_only = {"path": args.path, "sigma_min": args.sigma_min, "ema_decay": args.ema, "coupling": args.coupling}
    given = [k for k, v in cfm_only.items() if v is not None]
    if method != "cfm" and given:
        raise UsageError(f"--{given[0].replace('_', '-').replace('ema-decay', 'ema')} applies to --method cfm only")
    common = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "hidden": args.hidden,
        "depth": args.depth,
        "seed": args.seed,
        "device": args.device,
        "threads": _threads(args.threads),
    }
    fields = {k: v for k, v in {**common, **cfm_only}.items() if v is not None}
    if args.data is not None:
        fields["setting" if method == "vrfm" else "data"] = args.data
    return METHODS[method][0](**fields)


def cmd_train(args: argparse.Namespace) -> int:
    """Train with args.method (CFM loss, FM paper Eq. 14, by default) on args.data; write model.pt, config.json,
    losses.csv as one unit (the folder holds the old run until the new one is complete). Ctrl-C saves the run so far,
    marked INTERRUPTED."""
    import warnings

    from .checkpoints import RunWriter, method_of
    from .methods.consistency import train_consistency
    from .methods.meanflow import train_meanflow
    from .methods.reflow import train_reflow
    from .methods.shortcut import train_shortcut
    from .methods.vrfm import train_vrfm
    from .train import TrainingDiverging, TrainingInterrupted, train_flow

    config = _train_config(args)
    method = method_of(config)
    name = config.setting if method == "vrfm" else config.data
    out = Path(args.out or f"runs/{name}_{config.path if method == 'cfm' else method}".replace("/", "-"))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    entry = {
        "cfm": train_flow,
        "shortcut": train_shortcut,
        "meanflow": train_meanflow,
        "vrfm": train_vrfm,
        "reflow": train_reflow,
        "consistency": train_consistency,
    }[method]
    try:
        writer = RunWriter(out)  # before training: an unwritable --out fails now, not after the run
    except OSError as e:
        raise OSError(f"--out: {e}") from None
    with writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingDiverging)
        try:
            result = entry(config, progress=not args.quiet)
        except TrainingInterrupted as e:
            writer.write(e.result, config)
            print(
                f"fmtoy: interrupted after step {e.result.interrupted_at} of {config.steps}; saved the run so far to "
                f"{out} (marked INTERRUPTED)",
                file=sys.stderr,
            )
            return 130
        finally:
            for w in caught:
                print(f"fmtoy: warning: {w.message}", file=sys.stderr)
        writer.write(result, config)
    tail, kind = result.losses[-100:], config.path if method == "cfm" else method
    print(
        f"trained {name} / {kind}: {config.steps} steps in {result.seconds:.1f} s on "
        f"{result.device} ({result.steps_per_second:.0f} steps/s; {_threads_used(result.threads)})"
    )
    print(f"final loss {result.losses[-1]:.4f} (mean of the last {len(tail)} steps: {sum(tail) / len(tail):.4f})")
    print(f"wrote {out / 'model.pt'}, config.json, losses.csv")
    return 0


def _load_run(run: str, device: str):
    """(model, config) of a run folder (or its model.pt), with a clear error when it is missing."""
    from .checkpoints import interrupted_at, load_checkpoint
    from .device import resolve_device

    dev = resolve_device(device)
    path = Path(run)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"run folder {run!r} not found or has no model.pt; make one with `fmtoy train --out {run}`"
        )
    model, config = load_checkpoint(file, device=dev)
    stopped = interrupted_at(file)
    if stopped is not None:
        print(f"fmtoy: note: run {run} was interrupted after step {stopped} of {config.steps}", file=sys.stderr)
    return model, config, dev


def _run_data(config):
    """(name, target, source) of a run: its data set and the p_0 its sampler starts from (the path's own source)."""
    from .checkpoints import method_of
    from .data import StandardNormal, get_dataset
    from .methods.vrfm import get_setting
    from .train import build_path

    method = method_of(config)
    if method == "vrfm":
        setting = get_setting(config.setting)
        return config.setting, setting.target, setting.source
    target = get_dataset(config.data)
    source = build_path(config).source(target) if method == "cfm" else StandardNormal(target.dim)  # VE: not N(0, I)
    return config.data, target, source


def _flow(args: argparse.Namespace, trajectory: bool):
    """x_0 ~ p_0 of the run (seeded) pushed through the learned flow with args.steps steps: the ODE solver for CFM
    and VRFM (z drawn once per particle) and reflow, the N-step sampler for shortcut and MeanFlow models, multistep
    consistency sampling (fresh noise from the run's seed) for consistency models."""
    import torch

    from .checkpoints import method_of
    from .device import make_generator
    from .methods.consistency import sample_consistency
    from .methods.meanflow import sample_meanflow
    from .methods.shortcut import sample_shortcut
    from .methods.vrfm import sample_vrfm
    from .solvers import integrate, nfe

    n, steps = check_positive_int("--n", args.n), check_positive_int("--steps", args.steps)
    nfe(args.solver, steps)  # validates the solver name before any work
    model, config, dev = _load_run(args.run, args.device)
    _, _, source = _run_data(config)
    size = n * (steps + 1) * source.dim * 4
    if trajectory and size > MAX_TRAJECTORY_BYTES:
        raise ValueError(
            f"--n {n} particles x --steps {steps} would keep {size / 1024**3:.1f} GiB of trajectory; "
            f"allowed: at most {MAX_TRAJECTORY_BYTES // 1024**3} GiB (fewer --n or --steps)"
        )
    threads, method = _threads(args.threads), method_of(config)
    if method == "consistency" and trajectory:
        raise ValueError("a consistency model jumps to the data and has no trajectory to animate; use `fmtoy sample`")
    gen = make_generator(args.seed, dev)
    x0 = source.sample(n, generator=gen, device=dev)
    start = time.perf_counter()
    if method == "shortcut":
        x = sample_shortcut(model, x0, steps, return_trajectory=trajectory)
    elif method == "meanflow":
        x = sample_meanflow(model, x0, steps, return_trajectory=trajectory)
    elif method == "vrfm":
        x = sample_vrfm(model, x0, steps, args.solver, generator=gen, return_trajectory=trajectory)
    elif method == "consistency":
        x = sample_consistency(model, x0, steps, generator=gen, intervals=config.intervals)
    else:
        x = integrate(model, x0, steps, args.solver, return_trajectory=trajectory, threads=threads)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"the model of {args.run!r} gives non-finite samples (NaN or inf): its weights are damaged or its training "
            "diverged; train it again (e.g. with a lower --lr)"
        )
    return x.cpu(), config, model, time.perf_counter() - start


def _sampler_label(config, args: argparse.Namespace) -> str:
    """How a run was sampled: the ODE solver with its NFE, or the method's own N-step sampler (one call a step)."""
    from .checkpoints import method_of
    from .solvers import nfe

    method = method_of(config)
    if method in ("shortcut", "meanflow", "consistency"):
        return f"{method} sampler, {args.steps} steps, NFE={args.steps}"
    return f"{args.solver}, {args.steps} steps, NFE={nfe(args.solver, args.steps)}"


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample x_1 = psi_1(x_0) from a run and write it as .npy, .csv or .png."""
    import numpy as np

    out = Path(args.out)
    if out.suffix.lower() not in SAMPLE_FORMATS:
        raise ValueError(f"--out {args.out!r}: unsupported extension; use one of {', '.join(SAMPLE_FORMATS)}")
    x, config, _, seconds = _flow(args, trajectory=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = x.double().numpy()
    if out.suffix.lower() == ".npy":
        write_atomically(out, lambda f: np.save(f, arr))  # exactly `out` (np.save(name) would append .npy)
    elif out.suffix.lower() == ".csv":
        header = ",".join(
            ("x", "y")[: arr.shape[1]] if arr.shape[1] <= 2 else [f"x{i + 1}" for i in range(arr.shape[1])]
        )
        write_atomically(out, lambda f: np.savetxt(f, arr, delimiter=",", header=header, comments=""))
    else:
        _use_agg()
        import matplotlib.pyplot as plt

        from .viz import plot_density, plot_samples

        name, target, _ = _run_data(config)
        if arr.shape[1] != 2:
            raise ValueError(f"--out {args.out!r}: a .png shows 2D samples, this run's data are {arr.shape[1]}D")
        fig, ax = plt.subplots(figsize=(5, 5))
        lim = max(5.0, float(np.abs(arr).max()) * 1.05)
        plot_density(target.log_prob, ax, lim=lim, grid=150, cmap="Greys")
        plot_samples(
            arr,
            ax,
            lim=lim,
            color="C1",
            s=3,
            title=f"{name}: {len(arr)} samples, {_sampler_label(config, args)}",
        )
        write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
        plt.close(fig)
    print(f"sampled {len(arr)} points ({_sampler_label(config, args)}) in {seconds:.2f} s; wrote {out}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    """Animate particles along the learned flow (field in the background) and write .gif, .mp4 or .html."""
    _use_agg()
    import matplotlib.pyplot as plt

    from .viz import _check_animation_path, animate_trajectories, save_animation

    out = _check_animation_path(args.out)
    check_positive_int("--max-frames", args.max_frames)
    traj, config, model, _ = _flow(args, trajectory=True)
    field = model if getattr(model, "cond_dim", 0) == 0 and hasattr(model, "time_features") else None  # v(x, t)
    anim = animate_trajectories(traj, field=field, max_frames=args.max_frames, interval=max(1, round(1000 / args.fps)))
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_animation(anim, out, fps=args.fps)
    plt.close(anim.fig)
    print(
        f"animated {traj.shape[1]} particles of {_run_data(config)[0]} ({len(anim.frame_indices)} frames) "
        f"in {time.perf_counter() - start:.1f} s; wrote {out}"
    )
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from .course.assignments import write_assignments

    summary = write_assignments(args.book, args.out)
    for chapter, info in summary.items():
        print(f"{chapter}: {len(info['exercises'])} graded exercise(s), {info['points']} points")
    print(f"student notebooks: {Path(args.out) / 'release'}  instructor (nbgrader source): {Path(args.out) / 'source'}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from .course.grade import grade
    from .course.sandbox import Limits

    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--json: folder {str(out.parent)!r} does not exist")
    limits = Limits.for_timeout(args.timeout, memory_mb=args.memory)
    # grade() returns once every student process is dead: nothing of theirs can write after this point
    report = grade(args.notebook, args.source, chapter=args.chapter, timeout=args.timeout, limits=limits,
                   sandbox=args.sandbox)  # fmt: skip
    if out is not None:
        if out.is_symlink():  # a rename replaces the link itself; its target is never written
            print(f"fmtoy: note: {out} was a symbolic link; replaced by the grade file", file=sys.stderr)
        write_atomically(out, lambda f: f.write((report.to_json() + "\n").encode("utf-8")))
    print(report.table())
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    from .course.notebooks import write_notebooks

    only = None if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    written = write_notebooks(args.root, args.out, args.url, args.branch, only=only)
    print(f"{len(written)} notebooks: {Path(args.out)}")
    if not args.execute:
        return 0
    from .course.notebooks import execute_notebooks

    report = execute_notebooks(written)
    text = json.dumps(report, indent=1) + "\n"
    write_atomically(Path(args.out) / "executed.json", lambda f: f.write(text.encode("utf-8")))
    for name, r in report.items():
        print(f"{name}: {r['seconds']:.1f} s" + (f", {r['error']}" if r["error"] else ""))
    failed = [name for name, r in report.items() if r["error"] or r["unexecuted"]]
    if failed:
        raise RuntimeError(f"{len(failed)} notebook(s) did not run top to bottom: {', '.join(failed)}")
    return 0


def cmd_student_book(args: argparse.Namespace) -> int:
    from .course.assignments import write_student_book

    out = write_student_book(args.root, args.out)
    print(f"student edition sources: {out}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "animate": cmd_animate,
    "list": cmd_list,
    "assign": cmd_assign,
    "grade": cmd_grade,
    "notebooks": cmd_notebooks,
    "student-book": cmd_student_book,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fmtoy` console script and `python -m fmtoy`; returns the exit status."""
    try:
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, OSError, RuntimeError, FloatingPointError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fmtoy: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmtoy: interrupted", file=sys.stderr)
        return 130
