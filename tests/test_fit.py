"""fmtoy.train.fit is the one loop under every training entry point: the same NaN error, thread policy, lr schedule
and result type for CFM, shortcut, MeanFlow, VRFM/RFM and chapter 3's logged training."""

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fmtoy import threads as TH
from fmtoy.data import Distribution, StandardNormal, eight_gaussians
from fmtoy.methods.meanflow import MeanFlowMLP, fit_meanflow
from fmtoy.methods.shortcut import ShortcutMLP, fit_shortcut
from fmtoy.methods.vrfm import PosteriorEncoder, fit_vrfm
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath
from fmtoy.teaching.objectives import train_logged
from fmtoy.train import FitConfig, FitResult, fit, fit_cfm

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class InfTarget(Distribution):
    """Samples are inf: every method's loss is inf or nan from the first step."""

    name, dim = "inf", 2

    def _sample(self, n, g, dev):
        return torch.full((n, 2), float("inf"), device=dev)


def _cfm(target, **kw):
    return fit_cfm(
        VelocityMLP(hidden=16, depth=1),
        CondOTPath(),
        target,
        batch_size=32,
        lr=1e-2,
        device="cpu",
        progress=False,
        **kw,
    )


def _shortcut(target, **kw):
    return fit_shortcut(
        ShortcutMLP(hidden=16, depth=1, max_steps=4),
        target,
        batch_size=32,
        lr=1e-2,
        device="cpu",
        teacher="online",
        **kw,
    )


def _meanflow(target, **kw):
    return fit_meanflow(MeanFlowMLP(hidden=16, depth=1), target, batch_size=32, lr=1e-2, device="cpu", **kw)


def _vrfm(target, **kw):
    model, enc = VelocityMLP(hidden=16, depth=1, cond_dim=2), PosteriorEncoder(2, 2, hidden=16, depth=1)
    return fit_vrfm(model, enc, target, StandardNormal(2), batch_size=32, lr=1e-2, kl_weight=0.1, device="cpu", **kw)


def _logged(target, **kw):
    return train_logged(VelocityMLP(hidden=16, depth=1), CondOTPath(), target, batch_size=32, lr=1e-2, **kw)


METHODS = {"cfm": _cfm, "shortcut": _shortcut, "meanflow": _meanflow, "vrfm": _vrfm, "train_logged": _logged}


@pytest.mark.parametrize("method", METHODS)
def test_a_nan_loss_raises_the_same_clear_error_in_every_method(method):
    with pytest.raises(
        FloatingPointError,
        match=r"the training loss became (inf|nan) at step 1 of 5 \(lr=0\.01\); "
        r"try a lower learning rate \(e\.g\. lr=0\.001\)",
    ):
        METHODS[method](InfTarget(), steps=5)


@pytest.fixture
def observed(monkeypatch):
    """Thread count at every optimiser step and the learning rate it used, for whichever loop runs."""
    seen = {"threads": [], "lr": []}

    def hook(opt, args, kwargs):
        seen["threads"].append(torch.get_num_threads())
        seen["lr"].append(opt.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_honours_the_lr_schedule(method, schedule, observed):
    METHODS[method](eight_gaussians(), steps=6, lr_schedule=schedule)
    factor = {
        "constant": lambda k: 1.0,
        "cosine": lambda k: 0.5 * (1 + math.cos(math.pi * k / 6)),
        "linear": lambda k: 1 - k / 6,
    }[schedule]
    assert observed["lr"] == pytest.approx([1e-2 * factor(k) for k in range(6)])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_honours_the_thread_policy(method, observed, monkeypatch):
    assert torch.get_num_threads() == 1  # the session fixture: an explicit user setting ...
    METHODS[method](eight_gaussians(), steps=3)
    assert set(observed["threads"]) == {1}  # ... which fmtoy keeps
    observed["threads"].clear()
    METHODS[method](eight_gaussians(), steps=3, threads=3)  # the argument wins over the user's torch setting
    assert set(observed["threads"]) == {3} and torch.get_num_threads() == 1  # and the user's count is restored
    observed["threads"].clear()
    monkeypatch.setenv(TH.ENV, "2")  # so does FMTOY_THREADS
    METHODS[method](eight_gaussians(), steps=3)
    assert set(observed["threads"]) == {2} and torch.get_num_threads() == 1


def test_auto_measures_both_counts_and_keeps_the_faster(observed, monkeypatch):
    monkeypatch.setattr(TH, "_VERDICT", {"threads": 0, "until": 0.0})
    most = max(TH._IMPORT_THREADS, 2)
    monkeypatch.setattr(TH, "_IMPORT_THREADS", most)  # as on a machine with >= 2 cores
    res = _cfm(eight_gaussians(), steps=40, threads="auto")
    assert set(res.threads) == {1, most} and sum(res.threads.values()) == 40
    assert TH._VERDICT["threads"] in (1, most) and TH._VERDICT["until"] > 0
    seen = observed["threads"]
    probe = seen.index(most)  # one warm-up and PROBE timed steps on 1 thread (2 when they last PROBE_SECONDS) ...
    assert 3 <= probe <= TH.PROBE + 1 and seen[:probe] == [1] * probe  # ... then the other count:
    if TH._VERDICT["threads"] == most:  # it won: kept until the next measurement
        assert set(seen[probe:]) == {most}
    else:  # its warm-up and timed steps, or fewer when a step stalled (cut short: its warm-up step alone when
        second = seen.index(1, probe) - probe  # that one took WARM_ABORT times the 1-thread step); then 1 thread
        assert 1 <= second <= TH.PROBE + 1 and set(seen[probe + second :]) == {1}
    assert torch.get_num_threads() == 1


@pytest.fixture
def clock(monkeypatch) -> dict:
    """A fake perf_counter for ThreadTuner ({"now": seconds}, advanced by the test), no verdict yet, and
    torch.set_num_threads a no-op: the tuner's decisions on made-up step times."""
    now = {"now": 0.0}
    monkeypatch.setattr(TH.time, "perf_counter", lambda: now["now"])
    monkeypatch.setattr(TH, "_VERDICT", {"threads": 0, "until": 0.0, "interval": TH.RECHECK})
    monkeypatch.setattr(TH.torch, "set_num_threads", lambda n: None)
    return now


def test_the_tuner_picks_the_candidate_with_the_shorter_steps(clock):
    tuner = TH.ThreadTuner("auto", (1, 2))
    step_time = {1: 0.010, 2: 0.004}  # idle machine: 2 threads faster
    for _ in range(12):
        tuner.tick()
        clock["now"] += step_time[tuner.current]
    assert TH._VERDICT["threads"] == 2 and tuner.current == 2
    clock["now"] += TH.RECHECK  # later, another program holds a core
    step_time = {1: 0.010, 2: 0.080}
    for _ in range(12):
        tuner.tick()
        clock["now"] += step_time[tuner.current]
    assert TH._VERDICT["threads"] == 1 and tuner.current == 1


def test_the_tuner_backs_off_while_the_verdict_holds_and_cuts_a_stalling_probe_short(clock):
    tuner = TH.ThreadTuner("auto", (1, 2))
    step_time = {1: 0.010, 2: 0.200}  # under load: the 2-thread step stalls 20x
    seen, intervals = [], []
    for _ in range(20000):  # 200 s of 1-thread steps
        tuner.tick()
        seen.append(tuner.current)
        if TH._VERDICT["interval"] not in intervals[-1:]:
            intervals.append(TH._VERDICT["interval"])
        clock["now"] += step_time[tuner.current]
    assert TH._VERDICT["threads"] == 1
    assert intervals[-1] == TH.RECHECK_MAX and intervals == sorted(intervals)  # 2, 4, ..., 64 s
    probes = sum(1 for a, b in zip([1] + seen, seen) if (a, b) == (1, 2))
    stalled = seen.count(2)
    assert probes <= 8  # each probe of 2 threads: one warm-up and one timed step, then cut short
    assert stalled <= 2 * probes
    step_time = {1: 0.010, 2: 0.004}  # the load ends: 2 threads win again at the next measurement ...
    clock["now"] += TH.RECHECK_MAX
    for _ in range(20):
        tuner.tick()
        clock["now"] += step_time[tuner.current]
    assert TH._VERDICT["threads"] == 2 and TH._VERDICT["interval"] == TH.RECHECK  # ... and the interval resets


@pytest.mark.parametrize("stall", [12.0, 60.0])  # a 2-thread step of an exact likelihood beside a busy process
def test_probing_long_stalling_steps_costs_at_most_a_few_percent(clock, stall):
    step_time = {1: 0.3, 2: 0.3 * stall}
    wasted, seen = 0.0, []
    while clock["now"] < 600.0:  # ten minutes of one-thread work in loops of 50 steps (one ODE solve each)
        tuner = TH.ThreadTuner("auto", (1, 2))
        for _ in range(50):
            tuner.tick()
            seen.append(tuner.current)
            wasted += step_time[tuner.current] - step_time[1]
            clock["now"] += step_time[tuner.current]
    assert TH._VERDICT["threads"] == 1
    first = 0.3 * (stall - 1)  # the first probe of 2 threads: its warm-up step alone (10x slower: cut short there)
    assert seen.count(2) <= 1 + clock["now"] * TH.PROBE_SHARE / first
    assert wasted <= first + TH.PROBE_SHARE * clock["now"]  # without the bound: one probe every 64 s, ~30-90 s each


@pytest.mark.parametrize("step,timed", [(0.002, (4, 4)), (0.004, (3, 4)), (0.015, (2, 2))])
def test_long_steps_end_a_probe_sooner(clock, step, timed):
    """Each count's probe: a warm-up step, then timed ones until PROBE of them or PROBE_SECONDS in all (at least 2):
    an ODE step of an exact likelihood lasts ~15-25 ms, a training step ~2-5 ms."""
    tuner, seen = TH.ThreadTuner("auto", (1, 2)), []
    for _ in range(20):
        tuner.tick()
        seen.append(tuner.current)
        clock["now"] += step * (1.8 if tuner.current == 1 else 1.0)  # idle: 2 threads 1.8x faster
    ones, twos = 1 + timed[0], 1 + timed[1]
    assert seen == [1] * ones + [2] * (20 - ones) and TH._VERDICT["threads"] == 2
    assert TH._VERDICT["until"] == pytest.approx(ones * 1.8 * step + twos * step + TH.RECHECK)


def test_a_probe_that_stalls_in_its_warm_up_step_stops_there(clock):
    tuner = TH.ThreadTuner("auto", (1, 2))
    step_time, seen = {1: 0.004, 2: 0.004 * (TH.WARM_ABORT + 1)}, []  # short steps: PROBE timed ones
    for _ in range(20):
        tuner.tick()
        seen.append(tuner.current)
        clock["now"] += step_time[tuner.current]
    assert seen[: TH.PROBE + 2] == [1] * (TH.PROBE + 1) + [2] and set(seen[TH.PROBE + 2 :]) == {1}
    assert TH._VERDICT["threads"] == 1
    step_time[2] = 0.004 * (TH.WARM_ABORT - 1)  # slower but not past the warm-up bound: its timed step decides
    clock["now"] = TH._VERDICT["until"]
    seen.clear()
    for _ in range(20):
        tuner.tick()
        seen.append(tuner.current)
        clock["now"] += step_time[tuner.current]
    assert seen.count(2) == 2 and TH._VERDICT["threads"] == 1  # warm-up, one timed step (ABORT times slower)


def test_resolution_order_and_bad_values(monkeypatch):
    monkeypatch.delenv(TH.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert TH.resolve_threads(4) == ("fixed", (4,))
    assert TH.resolve_threads(None) == ("keep", (1,))  # the session fixture's torch.set_num_threads(1)
    monkeypatch.setattr(TH, "_IMPORT_THREADS", 1)  # now 1 is torch's own default: nothing to measure
    assert TH.resolve_threads(None) == ("keep", (1,))
    monkeypatch.setattr(TH, "_IMPORT_THREADS", 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert TH.resolve_threads(None)[0] == "keep" and "OMP_NUM_THREADS=1" in TH.describe()
    monkeypatch.setenv(TH.ENV, "auto")
    assert TH.resolve_threads(None) == ("auto", (1, 2))
    for bad in ("two", "0", "-1"):
        monkeypatch.setenv(TH.ENV, bad)
        with pytest.raises(ValueError, match=f"the environment variable {TH.ENV} must be 'auto' or a positive"):
            TH.resolve_threads(None)
    for bad in (0, 1.5, True, "many"):
        with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
            FitConfig(steps=1, batch_size=1, lr=1.0, threads=bad)


def test_fit_result_is_common_and_names_parts_and_modules():
    res = _vrfm(eight_gaussians(), steps=4)
    assert isinstance(res, FitResult) and set(res.parts) == {"mse", "kl"} and res.encoder is res.modules["encoder"]
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(res.mse) + 0.1 * torch.tensor(res.kl))
    sc = _shortcut(eight_gaussians(), steps=4)
    assert isinstance(sc, FitResult) and len(sc.parts["fm"]) == len(sc.parts["sc"]) == 4
    with pytest.raises(AttributeError, match="no attribute, loss part or module 'nope'"):
        _ = sc.nope
    with pytest.raises(TypeError, match="modules must be a torch.nn.Module"):
        fit([1, 2], lambda ctx: torch.zeros(()), FitConfig(steps=1, batch_size=1, lr=1.0))
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        fit(VelocityMLP(hidden=4, depth=1), lambda ctx: "x", FitConfig(steps=1, batch_size=1, lr=1.0))


def test_no_chapter_or_test_module_pins_threads_by_hand():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {root / "tests" / "conftest.py", Path(__file__).resolve()}
    pinned = [
        str(p.relative_to(root))
        for p in [*root.glob("book/*.md"), *root.glob("tests/*.py")]
        if p.resolve() not in allowed and "set_num_threads(" in p.read_text()
    ]
    assert not pinned, f"thread counts are fmtoy's policy (fmtoy.threads), not pinned by hand: {pinned}"


def test_every_method_has_one_entry_shape_taking_its_config():
    from fmtoy.methods.meanflow import MeanFlowConfig, train_meanflow
    from fmtoy.methods.shortcut import ShortcutConfig, train_shortcut
    from fmtoy.methods.vrfm import VRFMConfig, train_vrfm
    from fmtoy.train import TrainConfig, train_flow

    small = dict(steps=3, hidden=8, depth=1, device="cpu")
    runs = [
        (train_flow, TrainConfig(batch_size=16, **small)),
        (train_shortcut, ShortcutConfig(batch_size=32, max_steps=4, **small)),
        (train_meanflow, MeanFlowConfig(batch_size=16, **small)),
        (train_vrfm, VRFMConfig(setting="two_modes_1d", batch_size=16, **small)),
    ]
    for entry, config in runs:
        res = entry(config, progress=False)
        assert isinstance(res, FitResult) and len(res.losses) == 3 and res.config == config, entry.__name__
        with pytest.raises(TypeError, match=f"config must be a {type(config).__name__}"):
            entry({"steps": 3})
    with pytest.raises(ValueError, match="unknown teacher 'bad'; allowed: ema, online"):
        ShortcutConfig(teacher="bad")
    with pytest.raises(ValueError, match="fewer than the 7 step levels"):
        ShortcutConfig(batch_size=16)
    with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
        MeanFlowConfig(threads=0)


def test_final_is_the_mean_of_the_last_steps():
    res = _vrfm(eight_gaussians(), steps=6)
    assert res.final() == pytest.approx(sum(res.losses[-6:]) / 6)
    assert res.final("kl", 2) == pytest.approx(sum(res.kl[-2:]) / 2)
    with pytest.raises(ValueError, match="no loss part 'nll'; this run has: loss, mse, kl"):
        res.final("nll")


def test_one_shot_computations_follow_the_latest_measured_verdict(monkeypatch):
    """energy_distance, the exact marginal, gradient_agreement and widget frames have no steps to time: under "auto"
    they run on the count the latest loop measured, a fixed choice wins, and inside a loop they change nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmtoy import marginal, metrics, widgets
    from fmtoy.teaching import objectives

    seen = []
    real = metrics._mean_pairwise
    monkeypatch.setattr(metrics, "_mean_pairwise", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    monkeypatch.setattr(TH, "_IMPORT_THREADS", 2)  # as on a machine with 2 cores
    monkeypatch.setenv(TH.ENV, "auto")
    x = torch.randn(50, 2)
    for verdict, want in ((0, 1), (2, 2), (1, 1)):  # no loop yet: 1 thread, which cannot stall on a busy core
        monkeypatch.setattr(TH, "_VERDICT", {"threads": verdict, "until": 0.0})
        seen.clear()
        metrics.energy_distance(x, x + 1)
        assert set(seen) == {want} and torch.get_num_threads() == 1, (verdict, seen)
    torch.set_num_threads(2)  # torch's own count 2, as on a 2-core machine: still 1 thread before any loop
    try:
        monkeypatch.setattr(TH, "_VERDICT", {"threads": 0, "until": 0.0})
        seen.clear()
        metrics.energy_distance(x, x + 1)
        assert set(seen) == {1} and torch.get_num_threads() == 2, seen
    finally:
        torch.set_num_threads(1)
    monkeypatch.setattr(TH, "_VERDICT", {"threads": 2, "until": 0.0})
    frames = []

    def draw(t):
        frames.append(torch.get_num_threads())
        plt.subplots(figsize=(1, 1))

    widgets.static_sweep(draw, "t", [0.1, 0.2])
    assert frames == [2, 2] and torch.get_num_threads() == 1
    with TH.thread_policy(1):  # inside an fmtoy loop: the loop's count
        seen.clear()
        metrics.energy_distance(x, x + 1)
        assert set(seen) == {1}
    monkeypatch.setenv(TH.ENV, "3")  # a fixed choice wins over the verdict
    seen.clear()
    metrics.energy_distance(x, x + 1)
    assert set(seen) == {3} and torch.get_num_threads() == 1
    from fmtoy.teaching import continuity

    one_shot = (
        marginal._evaluate,
        objectives.gradient_agreement,
        continuity.relative_residual,
        continuity.continuity_terms,
    )
    assert all(hasattr(f, "__wrapped__") for f in one_shot)


def _sigint_at(steps: set[int], times: int = 1):
    """A fit callback that sends this process SIGINT `times` times before each step in `steps` (a user's Ctrl-C)."""
    import os
    import signal

    def callback(step: int) -> None:
        if step in steps:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    return callback


def test_ctrl_c_stops_between_two_steps_with_the_run_so_far():
    import signal

    from fmtoy.train import TrainingInterrupted

    config = FitConfig(40, 32, 1e-2, device="cpu", seed=5)
    snap = {}

    def loss_fn_for(model):
        path, x = CondOTPath(), eight_gaussians()

        def loss(ctx):
            from fmtoy.losses import cfm_loss

            x1 = x.sample(ctx.batch_size, generator=ctx.generator)
            x0 = torch.randn(ctx.batch_size, 2, generator=ctx.generator)
            return cfm_loss(model, x0, x1, torch.rand(ctx.batch_size, generator=ctx.generator), path)

        return loss

    ref = VelocityMLP(hidden=16, depth=1)
    copy = VelocityMLP(hidden=16, depth=1)
    copy.load_state_dict(ref.state_dict())

    def keep(step):
        if step == 8:
            snap.update({k: v.clone() for k, v in ref.state_dict().items()})

    fit(ref, loss_fn_for(ref), config, callback=keep)  # the uninterrupted run, weights after 8 whole steps kept
    with pytest.raises(TrainingInterrupted) as caught:
        fit(copy, loss_fn_for(copy), config, callback=_sigint_at({7}))  # Ctrl-C during step 8 (index 7)
    r = caught.value.result
    assert isinstance(caught.value, KeyboardInterrupt) and r.interrupted_at == 8 and len(r.losses) == 8
    assert all(torch.equal(snap[k], v) for k, v in r.model.state_dict().items())  # exactly 8 whole steps
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    assert torch.get_num_threads() == 1


def test_a_second_ctrl_c_interrupts_at_once():
    import signal

    from fmtoy.train import TrainingInterrupted

    model = VelocityMLP(hidden=16, depth=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        fit(
            model,
            lambda ctx: model(torch.ones(4, 2), torch.ones(4)).square().mean(),
            FitConfig(30, 4, 1e-2, device="cpu"),
            callback=_sigint_at({3}, times=2),
        )
    assert not isinstance(caught.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupted_recipe_carries_its_config_and_is_never_cached(tmp_path, monkeypatch):
    import fmtoy.train as T
    from fmtoy.train import TrainConfig, TrainingInterrupted, train_flow

    monkeypatch.setenv("FMTOY_RUN_CACHE", str(tmp_path / "cache"))
    fit_real = T.fit
    monkeypatch.setattr(T, "fit", lambda *a, **k: fit_real(*a, **k, callback=_sigint_at({4})))
    config = TrainConfig(steps=20, batch_size=32, hidden=16, depth=1, device="cpu")
    with pytest.raises(TrainingInterrupted) as caught:
        train_flow(config, progress=False)
    assert caught.value.result.config == config and caught.value.result.interrupted_at == 5
    assert not any((tmp_path / "cache").glob("**/*.pt"))  # a half run is not the run of this config


def test_a_loss_that_grows_by_orders_of_magnitude_is_reported():
    import warnings

    from fmtoy.train import GROWTH, TrainConfig, TrainingDiverging, train_flow

    with pytest.warns(TrainingDiverging, match=r"grew from .* the run is diverging; try a lower learning rate"):
        r = train_flow(TrainConfig(steps=200, lr=3.0, lr_schedule="constant", device="cpu"), progress=False)
    assert max(sum(r.losses[i : i + 100]) / 100 for i in (0, 100)) > GROWTH * r.losses[0]  # it did grow
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingDiverging)  # a healthy run: no report
        train_flow(TrainConfig(steps=200, device="cpu"), progress=False)
