"""The benchmark's logic: the peers compute the same CFM step and likelihood as fmtoy, the targets are judged right,
and the under-load section measures both thread policies and always ends its competing process."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import peers, run  # noqa: E402
from fmtoy import threads as fmthreads  # noqa: E402
from fmtoy.data import StandardNormal  # noqa: E402
from fmtoy.losses import cfm_loss  # noqa: E402
from fmtoy.models import VelocityMLP  # noqa: E402
from fmtoy.paths import CondOTPath  # noqa: E402
from fmtoy.solvers import log_likelihood  # noqa: E402

INSTALLED = [p for p, v in peers.available().items() if v is not None]
need_meta = pytest.mark.skipif(
    peers.available()["flow_matching"] is None, reason="flow_matching not installed (pip install -e '.[bench]')"
)


def _peer_params():
    return [
        pytest.param(
            p,
            marks=pytest.mark.skipif(
                p not in INSTALLED, reason=f"{p} not installed (pip install -e '.[bench]', see bench/README.md)"
            ),
        )
        for p in peers.PEERS
    ]


def _batch(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = 3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x0, x1, torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("peer", _peer_params())
def test_peer_path_sample_matches_fmtoy_condot(peer):
    x0, x1, t = _batch()
    path = CondOTPath()
    xt, target = peers.target_fn(peer)(x0, x1, t)
    torch.testing.assert_close(xt, path.sample_xt(x0, x1, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(target, path.target_velocity(x0, x1, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("peer", _peer_params())
def test_peer_loss_equals_fmtoy_cfm_loss(peer):
    x0, x1, t = _batch()
    torch.manual_seed(0)
    model = VelocityMLP(hidden=32, depth=2).double()
    ours, theirs = cfm_loss(model, x0, x1, t, CondOTPath()), peers.peer_loss(model, x0, x1, t, peer)
    assert abs(ours.detach().item() - theirs.item()) <= 1e-12 * ours.item()
    g1 = torch.autograd.grad(ours, list(model.parameters()))
    g2 = torch.autograd.grad(theirs, list(model.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@need_meta
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_meta_likelihood_matches_fmtoy_on_linear_field(method):
    """v(x, t) = A x: x_1 = e^A x_0, so log p_1(x) = log N(e^{-A} x; 0, I) - tr A exactly. Same grid and
    method: the two implementations agree to rounding; both approach the closed form at rate h (euler) or h^2."""
    a = torch.tensor([[0.3, -0.8], [0.5, -0.4]], dtype=torch.float64)
    field = lambda x, t: x @ a.T  # noqa: E731
    x1 = _batch(200)[1]
    src = StandardNormal(2)
    exact = src.log_prob(x1 @ torch.linalg.matrix_exp(-a).T) - torch.trace(a)
    steps = 40
    ours = log_likelihood(field, x1, src, steps=steps, method=method)
    theirs = peers.meta_log_likelihood(field, x1, src.log_prob, steps=steps, method=method)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    err = float((ours - exact).abs().max())
    bound = 5 * (1 / steps if method == "euler" else 1 / steps**2) * float(x1.square().sum(1).max())
    assert 0 < err < bound


@pytest.mark.parametrize(
    "bad, match", [(dict(peer="jax"), "unknown peer"), (dict(lr_schedule="step"), "unknown lr_schedule")]
)
def test_bad_inputs_raise(bad, match):
    kw = dict(peer=INSTALLED[0] if INSTALLED else "torchcfm", lr_schedule="cosine") | bad
    with pytest.raises(ValueError, match=match):
        if "peer" in bad:
            peers.target_fn(kw["peer"])
        else:
            if not INSTALLED:
                pytest.skip("no peer installed")
            peers.train_peer(
                kw["peer"],
                VelocityMLP(hidden=8, depth=1),
                StandardNormal(2),
                steps=1,
                batch_size=4,
                lr=1e-3,
                lr_schedule=kw["lr_schedule"],
            )


def _fake(fm_its: float, peer_its: float, fm_ll: float, peer_ll: float, gap: float, learned8: float) -> dict:
    q = {
        "data": "eight_gaussians",
        "train_seconds": 12.0,
        "nll": {"gap": gap, "gap_stderr": 0.002},
        "energy_distance": {"learned": {8: learned8}, "exact": {8: 0.01}},
    }
    tp = {
        "fmtoy": {"it_per_s_median": fm_its},
        "flow_matching": {"it_per_s_median": peer_its},
        "torchcfm": {"it_per_s_median": peer_its},
    }
    return {
        "quality": [q],
        "throughput": {"results": tp},
        "likelihood": {"seconds": {"fmtoy": fm_ll, "flow_matching": peer_ll}},
    }


def test_judge_applies_targets_without_loosening():
    flags = lambda res: [r["ok"] for r in run.judge(res)]  # noqa: E731
    on = run.ON_PAR
    # all met, exactly at each boundary
    assert flags(_fake(on * 100, 100, 1.0 / on, 1.0, 0.03, run.TARGETS["nfe8_ratio"] * 0.01)) == [True] * 6
    # each target just missed fails on its own row
    assert flags(_fake(100, 100, 1.0, 1.0, 0.0301, 0.012)) == [True, True, False, True, True, True]
    assert flags(_fake(100, 100, 1.0, 1.0, 0.01, 0.01201)) == [True, False, True, True, True, True]
    assert flags(_fake(0.949 * 100, 100, 1.0, 1.0, 0.01, 0.01)) == [True, True, True, False, False, True]
    assert flags(_fake(100, 100, 1.06, 1.0, 0.01, 0.01)) == [True, True, True, True, True, False]
    res = _fake(100, 100, 1.0, 1.0, 0.01, 0.01)
    del res["throughput"]["results"]["torchcfm"], res["likelihood"]["seconds"]["flow_matching"]
    assert flags(res)[3:] == [True, None, None]  # a missing peer is "n/a", never a pass


def test_quick_run_writes_consistent_report(tmp_path, monkeypatch):
    tiny = dict(
        tp_steps=3,
        tp_warmup=1,
        tp_repeats=1,
        ll_points=50,
        ll_steps=3,
        ll_repeats=1,
        nll_points=50,
        nll_steps=2,
        ed_points=40,
        empirical_points=30,
        train_steps=5,
    )
    monkeypatch.setattr(run, "QUICK", tiny)
    monkeypatch.setattr(run, "UNDER_LOAD_QUICK", dict(TINY_UNDER_LOAD, repeats=1))
    res = run.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "latest.json").read_text())
    md = (tmp_path / "latest.md").read_text()
    n_targets = 2 * 2 + 1 + 2 + 1 + 2 * len(run.UL_ITEMS) + 2  # + the playground widget's two
    assert [r["chapter"] for r in saved["widgets"]["rows"]] == ["playground"]
    assert saved["quick"] and len(saved["targets"]) == len(res["targets"]) == n_targets
    assert all(r["target"] in md for r in saved["targets"])
    assert set(saved["throughput"]["results"]) == {"fmtoy", *INSTALLED}
    if "flow_matching" in INSTALLED:  # same grid, same method: the two likelihoods agree to float32 rounding
        assert saved["likelihood"]["max_abs_diff"] < 1e-3
    for q in saved["quality"]:
        assert set(map(int, q["energy_distance"]["exact"])) == set(run.NFES)
        assert math.isfinite(q["nll"]["gap"])
    # --only under-load re-runs that section and keeps the others of the report in the same folder
    again = run.main(["--quick", "--only", "under-load", "--out", str(tmp_path)])
    merged = json.loads((tmp_path / "latest.json").read_text())
    assert merged["quality"] == saved["quality"] and merged["throughput"] == saved["throughput"]
    assert (
        merged["under_load"]["competitor_pids"]
        == again["under_load"]["competitor_pids"]
        != saved["under_load"]["competitor_pids"]
    )
    assert len(merged["targets"]) == n_targets and "## Quality: two_moons" in (tmp_path / "latest.md").read_text()


def test_widget_targets_are_judged_from_the_redraw_times():
    def row(seconds, revisit=None):
        return {"chapter": "ch", "control": "c", "seconds": seconds, "median": statistics.median(seconds),
                "revisit": revisit}  # fmt: skip

    flags = lambda r: [t["ok"] for t in run.judge_widgets({"rows": [r]})]  # noqa: E731
    assert flags(row([0.1, 0.5, 0.2])) == [True, True]  # at the 0.5 s boundary
    assert flags(row([0.6, 0.7, 0.2])) == [False, True]  # slow, and no cached revisit: it does not train
    assert flags(row([0.6, 0.7, 0.2], revisit=0.1)) == [True, True] and run.widget_trains(row([0.6, 0.7], 0.1))
    assert flags(row([0.6, 0.7, 0.2], revisit=0.6)) == [False, True]  # the revisit trains again: no cache
    assert flags(row([0.1, 5.01, 0.2])) == [True, False]  # one redraw blocked the kernel for over 5 s
    with pytest.raises(ValueError, match="no widget chapter"):
        run.widget_chapters(("ch99_none",))
    assert [p.stem for p in run.widget_chapters()][:2] == ["playground", "ch1_continuity"]


# ------------------------------------------------------------------------------------------------ under load
TINY_UNDER_LOAD = dict(
    train_steps=12,
    train_warmup=2,
    ll_points=50,
    ll_steps=2,
    widget_train_steps=12,
    widget_points=50,
    widget_nfe=2,
    repeats=2,
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_competitor_is_ended_even_when_the_block_fails():
    with pytest.raises(KeyError):
        with run.competitor() as proc:
            pid = proc.pid
            assert proc.poll() is None  # it is running its busy loop
            raise KeyError("the block fails")
    assert _gone(pid)


def test_under_load_quick_measures_both_policies_idle_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "UNDER_LOAD_QUICK", TINY_UNDER_LOAD)
    threads, env = torch.get_num_threads(), os.environ.get(fmthreads.ENV)
    res = run.main(["--quick", "--only", "under-load", "--out", str(tmp_path)])
    ul, reps = res["under_load"], TINY_UNDER_LOAD["repeats"]
    assert set(ul["items"]) == set(run.UL_ITEMS) and ul["old_threads"] == fmthreads._IMPORT_THREADS
    for item in ul["items"].values():
        for pol in ("old", "new"):
            for cond in ("idle", "loaded"):
                stats = item[pol][cond]
                assert len(stats["values"]) == reps and all(v > 0 and math.isfinite(v) for v in stats["values"])
                assert stats["median"] == statistics.median(stats["values"])
    steps = TINY_UNDER_LOAD["train_steps"] * reps  # old: the fixed count throughout; new: the policy's counts
    assert ul["items"]["training"]["old"]["loaded"]["threads"] == {fmthreads._IMPORT_THREADS: steps}
    assert sum(ul["items"]["training"]["new"]["idle"]["threads"].values()) == steps
    # one competitor per repeat, each ended; nothing of the section's settings leaks into the caller
    assert len(ul["competitor_pids"]) == reps and all(_gone(pid) for pid in ul["competitor_pids"])
    assert torch.get_num_threads() == threads and os.environ.get(fmthreads.ENV) == env
    saved, md = json.loads((tmp_path / "latest.json").read_text()), (tmp_path / "latest.md").read_text()
    assert "throughput" not in saved and set(saved["under_load"]["items"]) == set(run.UL_ITEMS)
    assert len(saved["targets"]) == 2 * len(run.UL_ITEMS) and all(r["target"] in md for r in saved["targets"])
    assert set(ul["other_cores"]) == {"idle", "loaded"}
    assert "## Under load" in md and not list(tmp_path.glob(".*.tmp"))


def _ul_fake(old_idle: float, old_loaded: float, new_idle: float, new_loaded: float) -> dict:
    stats = lambda v: {"median": v, "best": v, "values": [v], "threads": {}, "verdicts": [0]}  # noqa: E731
    item = {
        "label": "training",
        "unit": "steps/s",
        "old": {"idle": stats(old_idle), "loaded": stats(old_loaded)},
        "new": {"idle": stats(new_idle), "loaded": stats(new_loaded)},
        "loaded_over_idle": {"old": 1.0, "new": 1.0},
        "new_idle_over_old_idle": 1.0,
    }  # stale: not trusted
    return {"old_threads": 2, "items": {"training": item}}


def test_under_load_targets_are_judged_from_the_numbers():
    flags = lambda *n: [r["ok"] for r in run.judge_under_load(_ul_fake(*n))]  # noqa: E731
    lo, idle = run.UNDER_LOAD_TARGETS["loaded_over_idle"], run.UNDER_LOAD_TARGETS["new_idle_over_old_idle"]
    assert (lo, idle) == (0.4, 0.9)  # never loosened
    assert flags(100, 20, 90, 36) == [True, True]  # exactly at both boundaries (90/100, 36/90)
    assert flags(100, 20, 100, 39.9) == [False, True]  # auto stalls under load
    assert flags(100, 20, 89.9, 80) == [True, False]  # auto slower than the old count idle
    assert flags(100, 5, 50, 10) == [False, False]
    assert flags(100, 1, 100, 100) == [True, True]  # the old policy's stall is reported, not judged
    res = {"under_load": _ul_fake(100, 20, 100, 39.9)}  # judge() with only the under-load section
    assert [r["ok"] for r in run.judge(res)] == [False, True]
