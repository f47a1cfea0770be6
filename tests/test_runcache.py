"""fmtoy.runcache: a cached run is the run training would give (bit for bit), keyed by everything that decides it,
damaged files are trained again, nothing is read or written without FMTOY_RUN_CACHE; the book build sets it."""

import importlib.util
import types
from pathlib import Path

import pytest
import torch

from fmtoy import runcache
from fmtoy.methods.meanflow import MeanFlowConfig, train_meanflow
from fmtoy.methods.shortcut import ShortcutConfig, train_shortcut
from fmtoy.methods.vrfm import VRFMConfig, train_vrfm
from fmtoy.train import TrainConfig, train_flow

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"steps": 30, "batch_size": 64, "hidden": 16, "depth": 1}
RUNS = {
    "cfm": lambda **kw: train_flow(TrainConfig(**{**SMALL, **kw}), progress=False),
    "shortcut": lambda **kw: train_shortcut(ShortcutConfig(**{**SMALL, "max_steps": 8, **kw})),
    "meanflow": lambda **kw: train_meanflow(MeanFlowConfig(**{**SMALL, **kw})),
    "vrfm": lambda **kw: train_vrfm(VRFMConfig(setting="two_modes_1d", steps=30, batch_size=64, **kw)),
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(runcache.ENV, str(tmp_path / "runs"))
    return tmp_path / "runs"


def same_run(a, b) -> bool:
    weights = [(p, q) for name in a.modules for p, q in zip(a.modules[name].parameters(), b.modules[name].parameters())]
    return a.losses == b.losses and all(torch.equal(p, q) for p, q in weights)


@pytest.mark.parametrize("method", RUNS)
def test_a_cached_run_is_the_run_training_gives(method, cache, monkeypatch):
    first = RUNS[method]()
    assert not first.cached and len(list(cache.glob("*.pt"))) == 1
    again = RUNS[method]()
    assert again.cached and same_run(first, again) and again.seconds == first.seconds
    assert again.config == first.config and type(again.model) is type(first.model)
    monkeypatch.delenv(runcache.ENV)
    fresh = RUNS[method]()  # trained again, without the cache: the same weights and losses
    assert not fresh.cached and same_run(first, fresh)


def test_every_field_and_the_source_are_in_the_key(cache, monkeypatch):
    base = RUNS["cfm"]()
    for change in ({"seed": 1}, {"lr": 1e-3}, {"path": "vp"}, {"lr_schedule": "constant"}):
        other = RUNS["cfm"](**change)
        assert not other.cached and not same_run(base, other), change
    assert len(list(cache.glob("*.pt"))) == 5
    key = runcache.run_key("fit", TrainConfig(), "cpu")
    assert key != runcache.run_key("fit", TrainConfig(), "cuda:0") != runcache.run_key("other", TrainConfig(), "cpu")
    monkeypatch.setattr(runcache, "source_digest", lambda: "edited fmtoy")
    assert runcache.run_key("fit", TrainConfig(), "cpu") != key
    assert not RUNS["cfm"]().cached  # edited source: a miss


def test_a_damaged_file_is_reported_and_trained_again(cache, capsys):
    first = RUNS["cfm"]()
    (file,) = cache.glob("*.pt")
    file.write_bytes(file.read_bytes()[:100])
    again = RUNS["cfm"]()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged cached run" in err[0] and str(file) in err[0]
    assert not again.cached and same_run(first, again)
    assert RUNS["cfm"]().cached  # repaired: the next call loads it
    assert not list(cache.glob("*.tmp"))


def test_nothing_is_read_or_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(runcache.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert runcache.folder() is None
    assert not RUNS["cfm"]().cached and not RUNS["cfm"]().cached
    assert not list(tmp_path.rglob("*"))


def test_the_book_build_gives_its_kernels_a_cache_in_the_build_folder(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fmbook", ROOT / "book" / "_ext" / "fmbook.py")
    fmbook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fmbook)
    monkeypatch.setenv(runcache.ENV, "x")  # recorded as it was before the test (unset, normally) ...
    monkeypatch.delenv(runcache.ENV)  # ... so that the variable the hook sets is undone too (it leaked before)
    fmbook.share_trainings_within_the_build(types.SimpleNamespace(outdir=str(tmp_path / "_build" / "html")), None)
    assert runcache.folder() == tmp_path / "_build" / "fmtoy-runs"
    monkeypatch.setenv(runcache.ENV, str(tmp_path / "mine"))  # the user's own setting wins
    fmbook.share_trainings_within_the_build(types.SimpleNamespace(outdir=str(tmp_path / "_build" / "html")), None)
    assert runcache.folder() == tmp_path / "mine"
