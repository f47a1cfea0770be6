"""fmtoy.cli: list, train -> sample -> animate end to end, seeded reproducibility, one-line errors with exit 2."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import sample_run  # noqa: E402
from PIL import Image  # noqa: E402

import fmtoy.threads  # noqa: E402
from fmtoy.checkpoints import load_checkpoint  # noqa: E402
from fmtoy.cli import main
from fmtoy.data import StandardNormal, list_datasets  # noqa: E402
from fmtoy.device import make_generator  # noqa: E402
from fmtoy.paths import list_paths  # noqa: E402
from fmtoy.solvers import SOLVERS, integrate  # noqa: E402
from fmtoy.train import build_model  # noqa: E402

TINY = ["--steps", "50", "--hidden", "32", "--depth", "2", "--batch-size", "64", "--device", "cpu", "--quiet"]


def train_run(out, seed: int = 3) -> None:
    assert (
        main(["train", "--data", "eight_gaussians", "--path", "ot", "--seed", str(seed), "--out", str(out)] + TINY) == 0
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "x"
    train_run(out)
    return out


def parse_list(text: str) -> dict[str, list[str]]:
    return {
        k.strip(): [v.strip() for v in vals.split(",")]
        for k, vals in (line.split(":", 1) for line in text.strip().splitlines())
    }


def test_list_names_every_dataset_path_and_solver(capsys):
    assert main(["list"]) == 0
    listed = parse_list(capsys.readouterr().out)
    assert listed["datasets"] == list_datasets()
    assert listed["paths"] == list_paths()
    assert listed["solvers"] == list(SOLVERS)


def test_python_dash_m_fmtoy(capsys):
    proc = subprocess.run([sys.executable, "-m", "fmtoy", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert main(["list"]) == 0
    assert proc.stdout == capsys.readouterr().out


def test_train_writes_checkpoint_config_and_losses(run, capsys):
    model, config = load_checkpoint(run / "model.pt")
    assert (config.data, config.path, config.steps, config.hidden, config.depth, config.seed) == (
        "eight_gaussians",
        "ot",
        50,
        32,
        2,
        3,
    )
    assert json.loads((run / "config.json").read_text()) == {**dataclasses.asdict(config), "device": "cpu"}
    with open(run / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 51))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    init = build_model(config)  # training moved the weights away from the seeded initialisation
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), model.state_dict().values()))


def test_train_prints_time_and_final_loss(tmp_path, capsys):
    train_run(tmp_path / "a", seed=5)
    out = capsys.readouterr().out
    assert re.search(r"50 steps in [\d.]+ s on cpu", out)
    final = float(re.search(r"final loss ([\d.]+)", out).group(1))
    with open(tmp_path / "a" / "losses.csv") as f:
        last = float(list(csv.DictReader(f))[-1]["loss"])
    assert final == pytest.approx(last, abs=5e-5)
    train_run(tmp_path / "b", seed=5)  # same seed: bit-identical weights
    a, _ = load_checkpoint(tmp_path / "a" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (tmp_path / "a" / "losses.csv").read_text() == (tmp_path / "b" / "losses.csv").read_text()


def test_sample_is_the_seeded_flow_of_the_run(run, tmp_path):
    sample_run(str(run), str(tmp_path / "s.npy"), "--n", "300", "--steps", "4", "--solver", "midpoint", "--seed", "7")
    got = np.load(tmp_path / "s.npy")
    model, _ = load_checkpoint(run / "model.pt")
    x0 = StandardNormal(2).sample(300, generator=make_generator(7, "cpu"))
    expected = integrate(model, x0, 4, "midpoint").double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    sample_run(str(run), str(tmp_path / "s.csv"), "--n", "300", "--steps", "4", "--solver", "midpoint", "--seed", "7")
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1), got)
    sample_run(str(run), str(tmp_path / "plots" / "s.png"), "--n", "300", "--seed", "8")
    with Image.open(tmp_path / "plots" / "s.png") as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert min(pixels.shape) > 200 and pixels.std() > 5  # a real picture, not a blank canvas


@pytest.mark.parametrize("steps, max_frames, frames", [(10, 30, 11), (60, 8, 8)])
def test_animate_gif_has_the_subsampled_frames(run, tmp_path, steps, max_frames, frames):
    out = tmp_path / "a.gif"
    assert (
        main(
            [
                "animate",
                "--run",
                str(run),
                "--n",
                "100",
                "--steps",
                str(steps),
                "--max-frames",
                str(max_frames),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as gif:
        assert gif.n_frames == frames


def test_animate_html_player(run, tmp_path):
    out = tmp_path / "a.html"
    assert main(["animate", "--run", str(run), "--n", "100", "--steps", "6", "--device", "cpu", "--out", str(out)]) == 0
    html = out.read_text()
    assert "anim-slider" in html and len(re.findall(r'frames\[\d+\] = "data:image/png', html)) == 7


def _bad_cases():
    """At least 100 bad command lines: every numeric option out of range or not a number, every unknown name, every
    kind of damaged run file, sizes that cannot fit; (argv, a text the one-line error must contain)."""
    cases = []
    ints = {
        "train": {"--steps": "0", "--batch-size": "0", "--hidden": "0", "--depth": "0", "--seed": "-1"},
        "sample": {"--n": "0", "--steps": "0", "--seed": "-1"},
        "animate": {"--n": "0", "--steps": "0", "--seed": "-1", "--max-frames": "0"},
    }
    for cmd, options in ints.items():
        base = (
            [cmd]
            if cmd == "train"
            else [cmd, "--run", "{run}", "--out", "{tmp}/s." + ("npy" if cmd == "sample" else "gif")]
        )
        for option, low in options.items():
            for value in (low, "-7", "abc", "1.5", "1e400", "99999999999999999999999", ""):
                cases.append(([*base, option, value], f"{option} must be an integer in ["))
    floats = {
        ("train", "--lr"): ("0", "-1", "11"),
        ("train", "--sigma-min"): ("-0.1", "1.5"),
        ("train", "--ema"): ("0", "1", "-0.5"),
        ("animate", "--fps"): ("0", "1e-9", "1e9"),
    }
    for (cmd, option), lows in floats.items():
        base = ["train"] if cmd == "train" else [cmd, "--run", "{run}", "--out", "{tmp}/s.gif"]
        for value in (*lows, "nan", "inf", "abc", "1e400"):
            cases.append(([*base, option, value], f"{option} must be a number in "))
        cases.append(([*base, option, "-inf"], f"argument {option}: expected one argument"))  # argparse: a flag?
    for value in ("2.5", "0", "nan", "inf", "abc"):
        cases.append((["grade", "{tmp}/student.ipynb", "--timeout", value], "--timeout must be an integer in ["))
    cases += [
        (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
        (["train", "--path", "linear"], "unknown path 'linear'"),
        (["train", "--coupling", "sinkhorn"], "unknown coupling"),
        (["train", "--method", "gan"], "unknown method 'gan'"),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "--threads", "lots"], "threads must be 'auto' or a positive integer"),
        (["train", "--path", "vp", "--sigma-min", "0.1"], "sigma_min"),
        (["train", "--method", "shortcut", "--path", "vp"], "--path applies to --method cfm only"),
        (["train", "--method", "vrfm", "--data", "eight_gaussians_3d"], "unknown"),
        (["sample", "--run", "{missing}", "--out", "{tmp}/s.npy"], "not found"),
        (["sample", "--run", "{run}", "--out", "{tmp}/s.txt"], "unsupported extension"),
        (["sample", "--run", "{run}", "--out", "{tmp}/s.npy", "--solver", "heun"], "unknown solver 'heun'"),
        (["animate", "--run", "{run}", "--out", "{tmp}/s.gif", "--solver", "heun"], "unknown solver 'heun'"),
        (["sample", "--run", "{run}", "--out", "{tmp}/s.npy", "--device", "tpu"], "unknown device 'tpu'"),
        (["sample", "--out", "{tmp}/s.npy"], "required: --run"),
        (["animate", "--run", "{run}", "--out", "{tmp}/a.avi"], ".gif, .html, .mp4"),
        (
            ["animate", "--run", "{run}", "--out", "{tmp}/s.gif", "--n", "10000000", "--steps", "100000"],
            "GiB of trajectory",
        ),
        (["assign", "--book", "{missing}", "--out", "{tmp}/s"], "does not exist"),
        (["assign", "--book", "{run}/model.pt", "--out", "{tmp}/s"], "is not a folder"),
        (["assign", "--book", "{tmp}", "--out", "{tmp}/s"], "holds no chapter"),
        (["bogus"], "invalid choice"),
        ([], "required"),
    ]
    cases += [(["sample", "--run", "{tmp}/" + kind, "--out", "{tmp}/s.npy"], text) for kind, text in DAMAGED.items()]
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda"], "CUDA is not available"))
    return cases


# Damaged run folders: kind -> what the one-line error says (each is written by _damage from a good run).
DAMAGED = {
    "truncated": "the file is damaged",
    "empty": "the file is damaged",
    "text": "the file is damaged",
    "random": "the file is damaged",
    "a_list": "is not an fmtoy checkpoint",
    "wrong_format": "is not an fmtoy checkpoint",
    "missing_keys": "missing the entries",
    "unknown_method": "unknown method 'gan'",
    "wrong_shapes": "inconsistent fmtoy checkpoint",
    "nan_weights": "are not finite",
    "dim_3": "network is 3-dimensional but its data (eight_gaussians) are 2D",
    "huge_weights": "gives non-finite samples",
    "no_model": "has no model.pt",
}


def _damage(run, folder, kind: str) -> None:
    """Write run folder `folder` holding the kind of damage `kind` done to the good run's model.pt."""
    import os

    folder.mkdir()
    good = (run / "model.pt").read_bytes()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    file = folder / "model.pt"
    first = next(iter(ckpt["state_dict"]))
    state = lambda f: {**ckpt, "state_dict": {k: f(k, v) for k, v in ckpt["state_dict"].items()}}  # noqa: E731
    payload = {
        "a_list": [1, 2, 3],
        "wrong_format": {**ckpt, "format": "something-else"},
        "missing_keys": {k: v for k, v in ckpt.items() if k != "state_dict"},
        "unknown_method": {**ckpt, "method": "gan"},
        "wrong_shapes": state(lambda k, v: v[:1] if k == first else v),
        "nan_weights": state(lambda k, v: v * math.nan if k == first else v),
        "dim_3": {**ckpt, "dim": 3},
        "huge_weights": state(lambda k, v: v * 1e30 if v.ndim == 2 else v),
    }.get(kind)
    if payload is not None:
        torch.save(payload, file)
    elif kind != "no_model":
        file.write_bytes(
            {"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello\n", "random": os.urandom(999)}[kind]
        )


@pytest.mark.parametrize("argv, message", _bad_cases())
def test_bad_inputs_exit_2_with_one_line(run, tmp_path, capsys, argv, message):
    if "{tmp}/" in " ".join(argv) and "--run" in argv and argv[argv.index("--run") + 1][6:] in DAMAGED:
        _damage(run, tmp_path / argv[argv.index("--run") + 1][6:], argv[argv.index("--run") + 1][6:])
    argv = [a.format(run=run, tmp=tmp_path, missing=tmp_path / "nope") for a in argv]
    argv += ["--out", str(tmp_path / "out")] if argv[:1] == ["train"] else []
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmtoy: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even a temporary file


def test_at_least_a_hundred_bad_command_lines_are_checked():
    assert len(_bad_cases()) >= 100


def _cli(args, env_threads=None, tmp_path=None):
    """`python -m fmtoy` in a fresh process (no thread setting inherited from the test session)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("FMTOY_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if env_threads is not None:
        env["FMTOY_THREADS"] = env_threads
    return subprocess.run(
        [sys.executable, "-m", "fmtoy", *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


def test_cli_training_applies_the_thread_policy_and_an_explicit_setting_wins(tmp_path):
    args = ["train", "--out", str(tmp_path / "r"), *TINY]
    fixed = _cli(args + ["--threads", "1"], env_threads="2", tmp_path=tmp_path)  # the option beats the variable
    assert fixed.returncode == 0, fixed.stderr
    assert "steps/s; 1 thread)" in fixed.stdout
    env = _cli(args, env_threads="2", tmp_path=tmp_path)
    assert env.returncode == 0 and "steps/s; 2 threads)" in env.stdout, env.stdout + env.stderr
    auto = _cli(args, tmp_path=tmp_path)
    assert auto.returncode == 0, auto.stderr
    if fmtoy.threads._IMPORT_THREADS > 1:  # torch's default here
        assert re.search(r"1 thread for \d+ steps, \d+ threads for \d+ steps\)", auto.stdout), auto.stdout
    bad = _cli(args + ["--threads", "lots"], tmp_path=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "fmtoy: error: threads must be 'auto' or a positive integer number of CPU threads, got 'lots'"
    )


def test_sampling_starts_from_the_paths_own_source(tmp_path):
    """A VE run starts from the data blurred by N(0, sigma_max^2 I), not N(0, I): one Euler step of a barely trained
    model moves points little, so the samples keep the source's spread (std ~ 10, not ~ 1)."""
    out = tmp_path / "ve"
    assert (
        main(["train", "--data", "eight_gaussians", "--path", "ve", "--out", str(out), *TINY[:1], "5", *TINY[2:]]) == 0
    )
    sample_run(str(out), str(tmp_path / "x.npy"), "--n", "4000", "--steps", "1", "--solver", "euler")
    x = np.load(tmp_path / "x.npy")
    assert 8.0 < x.std(0).min() < 13.0, x.std(0)


def test_the_default_sampler_is_the_better_one_for_its_cost(capsys):
    """Default `fmtoy sample`: midpoint with 4 steps, 8 network evaluations like Euler-8 but without its
    discretisation error (measured on the exact field of eight Gaussians, where the model plays no part)."""
    from fmtoy.cli import _build_parser
    from fmtoy.data import get_dataset
    from fmtoy.marginal import ExactField
    from fmtoy.metrics import energy_distance
    from fmtoy.paths import get_path
    from fmtoy.solvers import nfe

    args = _build_parser().parse_args(["sample", "--run", "r", "--out", "o.npy"])
    assert (args.solver, args.steps) == ("midpoint", 4) and nfe("midpoint", 4) == nfe("euler", 8) == 8
    q = get_dataset("eight_gaussians")
    exact, x0 = ExactField(get_path("ot"), q), torch.randn(3000, 2, generator=make_generator(0), dtype=torch.float64)
    ref = q.sample(3000, generator=make_generator(1)).double()
    ed = {s: energy_distance(integrate(exact, x0, n, s), ref) for s, n in (("midpoint", 4), ("euler", 8))}
    assert ed["midpoint"] < ed["euler"] / 3, ed
    assert main(["sample", "--help"]) == 0
    assert "default 4: with midpoint, 8 network evaluations (NFE)" in " ".join(capsys.readouterr().out.split())


def test_sample_writes_exactly_the_named_file_with_a_header_per_dimension(run, tmp_path, capsys):
    sample_run(run, tmp_path / "UP.NPY", "--n", "10")
    assert [p.name for p in tmp_path.iterdir()] == ["UP.NPY"] and np.load(tmp_path / "UP.NPY").shape == (10, 2)
    assert str(tmp_path / "UP.NPY") in capsys.readouterr().out
    one_d = tmp_path / "vrfm1d"
    assert main(["train", "--method", "vrfm", "--data", "two_modes_1d", "--steps", "5", "--out", str(one_d)]) == 0
    sample_run(one_d, tmp_path / "s.csv", "--n", "7")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "x" and len(lines) == 8 and all(len(x.split(",")) == 1 for x in lines[1:])


def test_an_unwritable_out_fails_before_training(capsys):
    import time

    start = time.perf_counter()
    assert main(["train", "--steps", "10000000", "--out", "/proc/fmtoy-run", "--quiet"]) == 2
    assert time.perf_counter() - start < 10  # ten million steps would take hours: it stopped before training
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmtoy: error: --out: cannot write the run folder '/proc/fmtoy-run'") and "\n" not in err


def test_a_failed_save_says_where_the_weights_are(run, tmp_path, monkeypatch, capsys):
    import errno
    import os

    import fmtoy.checkpoints as C

    out = tmp_path / "r"
    train_run(out, seed=1)
    before = (out / "model.pt").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "replace_folder", full)
    capsys.readouterr()
    assert main(["train", "--seed", "2", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"could not write the run folder '{out}': No space left on device" in err
    rescued = re.search(r"kept in (\S+\.pt) ", err).group(1)
    assert load_checkpoint(rescued)[1].seed == 2 and (out / "model.pt").read_bytes() == before
    os.unlink(rescued)


def test_a_diverging_run_is_reported_in_one_line(tmp_path, capsys):
    args = ["train", "--lr", "3", "--steps", "200", "--batch-size", "256", "--quiet", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "diverging" in line]
    assert len(lines) == 1 and lines[0].startswith("fmtoy: warning: train: the training loss grew from ")
    assert main(["train", "--out", str(tmp_path / "ok"), *TINY]) == 0 and "warning" not in capsys.readouterr().err


def test_ctrl_c_saves_the_run_so_far_marked_interrupted(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "r"
    env = {k: v for k, v in os.environ.items() if k != "FMTOY_RUN_CACHE"}
    args = [sys.executable, "-m", "fmtoy", "train", "--steps", "10000000", "--hidden", "16", "--depth", "1"]
    proc = subprocess.Popen(  # Ctrl-C's default action in the child, also when this run inherited SIGINT ignored (a
        args + ["--out", str(out)],  # background job of a script, nohup): otherwise the signal is lost, and it hangs
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    while "train:" not in seen:  # the progress bar: training has begun
        seen += proc.stderr.read(1)
        assert seen or proc.poll() is None
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    m = re.search(r"fmtoy: interrupted after step (\d+) of 10000000; saved the run so far to (\S+) \(marked", err)
    assert m and m.group(2) == str(out), err[-500:]
    step = int(m.group(1))
    assert (out / "INTERRUPTED").read_text().startswith(f"training was interrupted after step {step} of 10000000")
    with open(out / "losses.csv") as f:
        assert sum(1 for _ in f) == step + 1
    sampled = _cli(["sample", "--run", str(out), "--n", "10", "--out", str(tmp_path / "s.npy")], tmp_path=tmp_path)
    assert sampled.returncode == 0 and np.load(tmp_path / "s.npy").shape == (10, 2)
    assert f"fmtoy: note: run {out} was interrupted after step {step} of 10000000" in sampled.stderr


KILLER = r"""
import json, os, signal, shutil, sys
import fmtoy._files as F, fmtoy.checkpoints as C, fmtoy.cli, fmtoy.train  # everything imported before forking,
import torch._dynamo  # noqa (what torch.optim imports on first use: 1.3 s in every fork otherwise)
folder, snapshots, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
# The save's moments: it is cut into events, the entry to and the return from each file-system call it makes (and from
# the swap itself). A child told to die at event e SIGKILLs itself there, so a kill lands at the same point of the
# save on a busy machine as on an idle one (a kill timed by a clock landed all before the swap on a loaded CI).
events, kill_at, saving = [0], [None], [False]
def event():
    events[0] += 1
    if events[0] == kill_at[0]:
        os.kill(os.getpid(), signal.SIGKILL)
def counted(module, name):
    call = getattr(module, name)
    def wrapper(*a, **k):
        if saving[0]:
            event()
            try:
                return call(*a, **k)
            finally:
                event()
        return call(*a, **k)
    setattr(module, name, wrapper)
for name in ("fsync", "rename", "replace", "link", "open", "close", "scandir", "unlink", "rmdir"):
    counted(os, name)
counted(F, "_exchange")
write = C.RunWriter.write
def announced(self, *a, **k):  # the save begins: event 1 (a kill here is before any file is written)
    saving[0] = True
    event()
    try:
        return write(self, *a, **k)
    finally:
        saving[0] = False
C.RunWriter.write = announced
def train(seed, steps, at):  # `fmtoy train` in a child process told to die at event `at` (None: never); its pid, pipe
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        events[0], kill_at[0] = 0, at
        code = fmtoy.cli.main(["train", "--seed", str(seed), "--steps", str(steps), "--hidden", "16", "--depth", "1",
                               "--batch-size", "64", "--threads", "1", "--quiet", "--out", folder])
        os.write(w, str(events[0]).encode())
        os._exit(code)
    os.close(w)
    return pid, r
def finish(pid, r):
    told = os.read(r, 64)
    os.close(r)
    return os.waitpid(pid, 0)[1], told
status, told = finish(*train(0, 20, None))  # the good run the folder holds at first; it also counts the save's events
assert status == 0 and int(told) > 10, (status, told)
total, trials = int(told), []
for i in range(n):  # the kills spread evenly from the save's first event to its last
    seed, steps, at = i + 1, 21 + i, 1 + round(i * (total - 1) / (n - 1))
    status, told = finish(*train(seed, steps, at))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and told == b"", (at, status, told)
    shutil.copytree(folder, os.path.join(snapshots, str(i)))
    trials.append({"seed": seed, "steps": steps, "event": at})
status, told = finish(*train(99, 30, None))  # a run after the killed ones: it tidies what they left
assert status == 0
print(json.dumps({"events": total, "trials": trials}))
"""


def test_sigkill_around_the_save_always_leaves_one_whole_run(tmp_path):
    """The issue's test: a run folder holding a good run is re-trained into and `fmtoy train` is killed (SIGKILL) at
    20 moments spread over its save; the folder must always hold a loadable run whose three files are one run, the
    old or the new. The `fmtoy train` processes are forks of one process that imported fmtoy once (a fresh
    interpreter per kill would cost 80 s), each running fmtoy.cli.main as the console script does; the moments are
    counted file-system calls of the save, not clock times, so they land in the same places however busy the machine."""
    folder, snaps, n = tmp_path / "runs" / "r", tmp_path / "snapshots", 20
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(folder), str(snaps), str(n)], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    outcomes, previous = [], (0, 20)
    for i, trial in enumerate(report["trials"]):
        snap = snaps / str(i)
        model, config = load_checkpoint(snap / "model.pt")
        saved = json.loads((snap / "config.json").read_text())
        with open(snap / "losses.csv") as f:
            rows = list(csv.reader(f))
        assert (saved["seed"], saved["steps"]) == (config.seed, config.steps)  # model.pt and config.json agree
        assert len(rows) - 1 == config.steps  # ... and losses.csv
        got = (config.seed, config.steps)
        assert got in (previous, (trial["seed"], trial["steps"])), (i, got, previous)  # the old run or the new one
        outcomes.append("new" if got != previous else "old")
        previous = got
    assert outcomes.count("old") >= 3 and outcomes.count("new") >= 3, outcomes  # the kills did land on both sides
    assert sorted(p.name for p in folder.parent.iterdir()) == ["r"]  # the next save tidied the killed ones' leftovers
    assert load_checkpoint(folder / "model.pt")[1].seed == 99
