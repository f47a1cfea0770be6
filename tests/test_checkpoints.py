"""fmtoy.checkpoints: one format for every method, written atomically, read back by load_checkpoint and the CLI."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import sample_run

from fmtoy.checkpoints import FORMAT, load_checkpoint, save_checkpoint, save_run
from fmtoy.cli import main
from fmtoy.methods.consistency import ConsistencyConfig, train_consistency
from fmtoy.methods.meanflow import MeanFlowConfig, train_meanflow
from fmtoy.methods.reflow import ReflowConfig, train_reflow
from fmtoy.methods.shortcut import ShortcutConfig, train_shortcut
from fmtoy.methods.vrfm import VRFMConfig, train_vrfm
from fmtoy.train import TrainConfig, train_flow

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
SMALL = dict(steps=4, hidden=8, depth=1, device="cpu")
RUNS = {
    "cfm": lambda: train_flow(TrainConfig(batch_size=16, ema_decay=0.9, **SMALL), progress=False),
    "shortcut": lambda: train_shortcut(ShortcutConfig(batch_size=32, max_steps=4, teacher="ema", **SMALL)),
    "meanflow": lambda: train_meanflow(MeanFlowConfig(batch_size=16, **SMALL)),
    "vrfm": lambda: train_vrfm(VRFMConfig(batch_size=16, **SMALL)),
    "reflow": lambda: train_reflow(ReflowConfig(batch_size=16, pairs=64, teacher_steps=2, **SMALL)),
    "consistency": lambda: train_consistency(ConsistencyConfig(batch_size=16, intervals=4, **SMALL)),
}


def _outputs(model, dim=2):
    x, t = torch.linspace(-2, 2, 6 * dim).reshape(6, dim), torch.linspace(0, 1, 6)
    extra = () if getattr(model, "cond_dim", 0) == 0 else (torch.zeros(6, model.cond_dim),)
    with torch.no_grad():
        return model(x, t, *extra)


@pytest.mark.parametrize("method", RUNS)
def test_every_method_round_trips(method, tmp_path):
    res = RUNS[method]()
    save_checkpoint(tmp_path / "m.pt", res)  # the config comes with the FitResult
    model, config = load_checkpoint(tmp_path / "m.pt")
    assert config == dataclasses.replace(res.config, device="cpu") and type(model) is type(res.model)
    want = res.ema_model if res.ema_model is not None else res.model
    assert torch.equal(_outputs(model), _outputs(want))
    online, _ = load_checkpoint(tmp_path / "m.pt", use_ema=False)
    assert torch.equal(_outputs(online), _outputs(res.model))
    assert torch.load(tmp_path / "m.pt", weights_only=True)["format"] == FORMAT


def test_a_failed_save_leaves_the_previous_run_intact(tmp_path, monkeypatch):
    good, res = tmp_path / "model.pt", RUNS["cfm"]()
    save_checkpoint(good, res)
    before = good.read_bytes()

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(good, res)
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp left
    monkeypatch.undo()
    load_checkpoint(good)


def test_version_1_cfm_checkpoints_still_load(tmp_path):
    res = RUNS["cfm"]()
    m = res.model
    v1 = {
        "format": "fmtoy-checkpoint-v1",
        "fmtoy_version": "0.1.0",
        "config": dataclasses.asdict(res.config),
        "model_kwargs": {
            "dim": 2,
            "hidden": m.hidden,
            "depth": m.depth,
            "time_features": m.time_features,
            "cond_dim": 0,
        },
        "state_dict": m.state_dict(),
        "ema_state_dict": None,
    }
    torch.save(v1, tmp_path / "old.pt")
    model, config = load_checkpoint(tmp_path / "old.pt")
    assert torch.equal(_outputs(model), _outputs(m)) and config.hidden == m.hidden


@pytest.mark.parametrize(
    "method, steps", [("shortcut", "2"), ("meanflow", "2"), ("vrfm", "3"), ("reflow", "2"), ("consistency", "2")]
)
def test_the_cli_trains_and_samples_every_method(method, steps, tmp_path, capsys):
    run = tmp_path / method
    assert (
        main(
            [
                "train",
                "--method",
                method,
                "--steps",
                "4",
                "--hidden",
                "8",
                "--depth",
                "1",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert f"/ {method}: 4 steps" in capsys.readouterr().out
    sample_run(str(run), str(tmp_path / "x.npy"), "--n", "50", "--steps", steps)
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all()
    own = method in ("shortcut", "meanflow", "consistency")  # one network call a step; else the midpoint solver's 2
    want = f"{method} sampler, {steps} steps, NFE={steps}" if own else f"midpoint, {steps} steps, NFE={2 * int(steps)}"
    assert want in capsys.readouterr().out


def test_cfm_only_options_are_refused_for_other_methods(capsys):
    assert main(["train", "--method", "shortcut", "--path", "ve"]) == 2
    assert "--path applies to --method cfm only" in capsys.readouterr().err
    assert main(["train", "--method", "diffusion"]) == 2
    assert (
        "unknown method 'diffusion'; allowed: cfm, consistency, meanflow, reflow, shortcut, vrfm"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("method", RUNS)
def test_non_finite_weights_are_refused(method, tmp_path):
    result = RUNS[method]()
    with torch.no_grad():
        next(result.model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="are not finite"):
        save_checkpoint(tmp_path / "m.pt", result)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_a_network_of_another_dimension_than_its_data_is_refused(tmp_path):
    result = RUNS["vrfm"]()  # hexagon_2d: a 2D network
    config = dataclasses.replace(result.config, setting="two_modes_1d")
    with pytest.raises(ValueError, match="network is 2-dimensional but its data .two_modes_1d. are 1D"):
        save_checkpoint(tmp_path / "m.pt", result.model, config)
    assert not list(tmp_path.iterdir())


def _run(seed: int, steps: int = 6):
    return train_flow(TrainConfig(batch_size=16, seed=seed, **{**SMALL, "steps": steps}), progress=False)


def _folder_run(folder):
    """(seed, steps) of a run folder, after checking that its three files are one run."""
    import csv
    import json

    model, config = load_checkpoint(folder / "model.pt")
    saved = json.loads((folder / "config.json").read_text())
    rows = list(csv.reader(open(folder / "losses.csv")))
    assert saved == dataclasses.asdict(dataclasses.replace(config, device=saved["device"]))
    assert rows[0] == ["step", "loss"] and len(rows) - 1 == config.steps
    return config.seed, config.steps


def test_save_run_replaces_a_run_folder_and_keeps_the_users_other_files(tmp_path):
    import os
    import stat

    from fmtoy.checkpoints import save_run

    folder = tmp_path / "runs" / "r"
    save_run(folder, _run(1))
    assert _folder_run(folder) == (1, 6)
    (folder / "notes.txt").write_text("mine")
    (folder / "anim").mkdir()
    (folder / "anim" / "a.gif").write_bytes(b"GIF")
    save_run(folder, _run(2, steps=7))
    assert _folder_run(folder) == (2, 7)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "anim" / "a.gif").read_bytes() == b"GIF"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["r"]  # no staging folder left
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0700
    assert stat.S_IMODE((folder / "model.pt").stat().st_mode) == 0o666 & ~umask


def test_save_run_without_an_atomic_swap_still_ends_with_one_run(tmp_path, monkeypatch):
    import fmtoy._files as F
    from fmtoy.checkpoints import save_run

    monkeypatch.setattr(F, "_exchange", lambda a, b: False)  # a platform or file system without renameat2
    save_run(tmp_path / "r", _run(1))
    save_run(tmp_path / "r", _run(2))
    assert _folder_run(tmp_path / "r") == (2, 6) and [p.name for p in tmp_path.iterdir()] == ["r"]


def test_an_unwritable_run_folder_is_an_error_before_training():
    from fmtoy.checkpoints import RunWriter

    with pytest.raises(OSError, match=r"^cannot write the run folder '/proc/fmtoy-run'"):
        RunWriter("/proc/fmtoy-run")


def test_a_failed_save_keeps_the_old_run_and_the_new_weights_and_says_where(tmp_path, monkeypatch):
    import errno
    import re

    import fmtoy.checkpoints as C

    folder = tmp_path / "r"
    C.save_run(folder, _run(1))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "replace_folder", full)
    new = _run(2)
    with pytest.raises(OSError) as caught:
        C.save_run(folder, new)
    message = str(caught.value)
    assert message.startswith(f"could not write the run folder '{folder}': No space left on device; ")
    rescued = re.search(r"kept in (\S+\.pt) ", message).group(1)
    model, config = load_checkpoint(rescued)
    assert config.seed == 2 and torch.equal(_outputs(model), _outputs(new.model))
    assert _folder_run(folder) == (1, 6) and [p.name for p in tmp_path.iterdir()] == ["r"]
    import os

    os.unlink(rescued)


def test_what_a_killed_writer_left_is_tidied_and_a_moved_old_run_put_back(tmp_path):
    import subprocess

    from fmtoy.checkpoints import RunWriter, save_run

    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "r"
    save_run(folder, _run(1))
    stale = tmp_path / f".r.new-{dead.pid}-abc"
    stale.mkdir()
    RunWriter(folder).discard()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    folder.rename(tmp_path / f".r.old-{dead.pid}-abc")  # killed between the two renames of the fallback swap
    RunWriter(folder).discard()
    assert _folder_run(folder) == (1, 6) and [p.name for p in tmp_path.iterdir()] == ["r"]


def test_an_interrupted_run_is_marked(tmp_path):
    from fmtoy.checkpoints import interrupted_at, save_run

    r = _run(1)
    r.interrupted_at = 4
    save_run(tmp_path / "r", r)
    assert interrupted_at(tmp_path / "r") == 4 and interrupted_at(tmp_path / "r" / "model.pt") == 4
    save_run(tmp_path / "r", _run(2))  # a complete run in its place: no mark
    assert interrupted_at(tmp_path / "r") is None


def test_a_consistency_run_has_no_trajectory_to_animate(tmp_path, capsys):
    run = tmp_path / "cm"
    save_run(run, RUNS["consistency"]())
    out = tmp_path / "a.html"
    assert main(["animate", "--run", str(run), "--n", "20", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 2
    assert "has no trajectory to animate" in capsys.readouterr().err and not out.exists()
