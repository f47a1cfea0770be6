"""Tests for fmtoy.train: reproducibility, NaN detection, EMA, checkpoints, learning progress, validation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import small_model

from fmtoy.checkpoints import load_checkpoint, save_checkpoint
from fmtoy.data import Distribution, eight_gaussians
from fmtoy.device import make_generator
from fmtoy.losses import cfm_loss
from fmtoy.marginal import ExactField
from fmtoy.metrics import energy_distance
from fmtoy.models import VelocityMLP
from fmtoy.paths import CondOTPath
from fmtoy.solvers import integrate
from fmtoy.train import FitResult, TrainConfig, train_flow
from fmtoy.train import fit_cfm as train

SMALL = dict(steps=30, batch_size=64, hidden=32, depth=2, device="cpu")
X = torch.randn(16, 2, generator=make_generator(5))


@pytest.fixture(scope="module")
def ema_run() -> tuple[FitResult, TrainConfig]:
    config = TrainConfig(**SMALL, ema_decay=0.9)
    return train_flow(config, progress=False), config


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X, torch.linspace(0, 1, 16))


# ----------------------------------------------------------------------------------------------- reproducibility
def test_seeded_runs_are_bit_identical_and_seeds_differ():
    state = torch.get_rng_state()
    a, b = train_flow(TrainConfig(**SMALL), progress=False), train_flow(TrainConfig(**SMALL), progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # train_flow seeds locally, the global RNG is untouched
    assert a.losses == b.losses and len(a.losses) == SMALL["steps"]
    assert torch.equal(outputs(a.model), outputs(b.model))
    assert torch.equal(integrate(a.model, X, 8), integrate(b.model, X, 8))
    c = train_flow(TrainConfig(**SMALL, seed=1), progress=False)
    assert c.losses != a.losses and not torch.allclose(outputs(c.model), outputs(a.model), atol=1e-3)


def test_result_fields():
    res = train(
        small_model(),
        CondOTPath(),
        eight_gaussians(),
        steps=7,
        batch_size=8,
        lr=1e-3,
        device="cpu",
        progress=False,
        log_every=3,
    )
    assert len(res.losses) == 7 and all(isinstance(v, float) for v in res.losses)
    assert res.ema_model is None and res.device == "cpu"
    assert res.seconds > 0 and res.steps_per_second == pytest.approx(7 / res.seconds)


# ----------------------------------------------------------------------------------------------- NaN detection
class InfTarget(Distribution):
    """A broken data set whose samples are inf: the loss is inf from the first step."""

    name, dim = "inf", 2

    def _sample(self, n, g, dev):
        return torch.full((n, 2), float("inf"), device=dev)


def test_infinite_target_raises_floating_point_error():
    with pytest.raises(FloatingPointError, match=r"loss became (inf|nan) at step 1 of 5 .*lower learning rate"):
        train(small_model(), CondOTPath(), InfTarget(), steps=5, batch_size=8, lr=1e-3, device="cpu", progress=False)


def test_huge_learning_rate_raises_floating_point_error():
    with pytest.raises(FloatingPointError, match=r"at step \d+ of 200 \(lr=1e\+12\); try a lower learning rate"):
        train(
            small_model(),
            CondOTPath(),
            eight_gaussians(),
            steps=200,
            batch_size=32,
            lr=1e12,
            device="cpu",
            lr_schedule="constant",
            progress=False,
            log_every=50,
        )


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_equals_hand_computed_average_of_iterates():
    """Two steps with decay d: ema = d^2 theta_0 + d (1 - d) theta_1 + (1 - d) theta_2 (iterates of the same run)."""
    d, base = 0.7, small_model(3)
    kw = dict(steps=1, batch_size=16, lr=1e-2, device="cpu", seed=4, lr_schedule="constant", progress=False)
    one = train(copy.deepcopy(base), CondOTPath(), eight_gaussians(), **kw)
    two = train(copy.deepcopy(base), CondOTPath(), eight_gaussians(), **{**kw, "steps": 2}, ema_decay=d)
    assert one.losses[0] == two.losses[0]  # the 1-step run is the first step of the 2-step run
    for name, p0 in base.named_parameters():
        p1, p2 = one.model.get_parameter(name), two.model.get_parameter(name)
        expected = d * d * p0 + d * (1 - d) * p1 + (1 - d) * p2
        assert torch.allclose(two.ema_model.get_parameter(name), expected, atol=1e-7, rtol=1e-6)
        assert not two.ema_model.get_parameter(name).requires_grad
    assert not torch.allclose(outputs(two.ema_model), outputs(two.model), atol=1e-5)


def test_ema_differs_from_online(ema_run):
    res, _ = ema_run
    assert res.ema_model is not None and res.ema_model is not res.model
    assert not torch.allclose(outputs(res.ema_model), outputs(res.model), atol=1e-4)


# ----------------------------------------------------------------------------------------------- learning
def test_short_training_learns_eight_gaussians():
    """~1 s of training removes most of the reducible loss (above the floor L(u) of the exact field) and
    beats the untrained model by far in energy distance (MC noise of the distances here: ~0.005)."""
    target, path = eight_gaussians(), CondOTPath()
    untrained = small_model(0, hidden=64)
    res = train(
        copy.deepcopy(untrained), path, target, steps=400, batch_size=256, lr=3e-3, device="cpu", progress=False
    )
    g = make_generator(11)
    x0, x1, t = torch.randn(20000, 2, generator=g), target.sample(20000, g), torch.rand(20000, generator=g)
    floor = cfm_loss(ExactField(path, target), x0.double(), x1.double(), t.double() * path.t_max, path).item()
    start, end = sum(res.losses[:10]) / 10, sum(res.losses[-50:]) / 50
    assert end - floor < 0.15 * (start - floor)
    z, ref = torch.randn(2000, 2, generator=g), target.sample(2000, g)
    ed_trained = energy_distance(integrate(res.model, z, 8), ref)
    ed_untrained = energy_distance(integrate(untrained, z, 8), ref)
    assert ed_trained < 0.2 * ed_untrained


def test_ot_coupling_lowers_the_loss():
    """Minibatch-OT pairs cross less, so the CFM loss (its irreducible part) is much lower than with independent
    pairs."""
    kw = dict(steps=150, batch_size=128, lr=3e-3, device="cpu", progress=False)
    ind = train(small_model(), CondOTPath(), eight_gaussians(), **kw)
    ot = train(small_model(), CondOTPath(), eight_gaussians(), coupling="ot", **kw)
    assert sum(ot.losses[-50:]) < 0.5 * sum(ind.losses[-50:])


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(ema_run, tmp_path):
    res, config = ema_run
    save_checkpoint(tmp_path / "run.pt", res, config)
    model, loaded = load_checkpoint(tmp_path / "run.pt")
    assert loaded == dataclasses.replace(config, device="cpu")
    assert torch.equal(outputs(model), outputs(res.ema_model))
    online, _ = load_checkpoint(str(tmp_path / "run.pt"), use_ema=False)
    assert torch.equal(outputs(online), outputs(res.model))
    save_checkpoint(tmp_path / "plain.pt", res.model, config)
    assert torch.equal(outputs(load_checkpoint(tmp_path / "plain.pt")[0]), outputs(res.model))


def _edit(ckpt: dict, what: str) -> dict:
    ckpt = copy.deepcopy(ckpt)
    if what == "format":
        ckpt["format"] = "something-else"
    elif what == "missing":
        del ckpt["state_dict"]
    elif what == "config_hidden":
        ckpt["config"]["hidden"] = 64
    elif what == "method":
        ckpt["method"] = "diffusion"
    elif what == "missing_weight":
        ckpt["state_dict"].pop("net.0.bias")
        ckpt["ema_state_dict"].pop("net.0.bias")
    elif what == "bad_config":
        ckpt["config"]["steps"] = 0
    elif what == "unknown_key":
        ckpt["config"]["colour"] = "red"
    return ckpt


@pytest.mark.parametrize(
    "what, match",
    [
        ("format", "not an fmtoy checkpoint"),
        ("missing", "missing the entries"),
        ("config_hidden", "size mismatch"),
        ("method", "unknown method 'diffusion'"),
        ("missing_weight", "Missing key"),
        ("bad_config", "steps"),
        ("unknown_key", "colour"),
    ],
)
def test_inconsistent_checkpoints_raise_value_error(ema_run, tmp_path, what, match):
    res, config = ema_run
    save_checkpoint(tmp_path / "ok.pt", res, config)
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    torch.save(_edit(ckpt, what), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickled_object"])
def test_damaged_files_raise_value_error(ema_run, tmp_path, damage):
    res, config = ema_run
    good = tmp_path / "ok.pt"
    save_checkpoint(good, res, config)
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # an arbitrary pickled object is refused by weights_only loading
        torch.save({"format": "fmtoy-checkpoint-v2", "config": config}, bad)
    with pytest.raises(ValueError, match="not a readable fmtoy checkpoint"):
        load_checkpoint(bad)


def test_checkpoint_argument_errors(ema_run, tmp_path):
    res, config = ema_run
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="does not match the config"):
        save_checkpoint(tmp_path / "x.pt", res, dataclasses.replace(config, hidden=64))
    with pytest.raises(TypeError, match="config must be one of TrainConfig, ShortcutConfig"):
        save_checkpoint(tmp_path / "x.pt", res, {"hidden": 32})


# ----------------------------------------------------------------------------------------------- validation
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": 0.0}, "ema_decay"),
        ({"coupling": "sinkhorn"}, "unknown coupling 'sinkhorn'; allowed: independent, ot"),
        ({"lr_schedule": "step"}, "unknown lr_schedule"),
        ({"log_every": 0}, "log_every"),
        pytest.param({"device": "cuda"}, "CUDA is not available", marks=NO_CUDA),
        ({"device": "tpu"}, "device"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, match):
    args = {**dict(steps=3, batch_size=8, lr=1e-3, device="cpu", progress=False), **kwargs}
    with pytest.raises(ValueError, match=match):
        train(small_model(), CondOTPath(), eight_gaussians(), **args)


def test_train_rejects_bad_objects():
    kw = dict(steps=1, batch_size=4, lr=1e-3, device="cpu", progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        train(lambda x, t: x, CondOTPath(), eight_gaussians(), **kw)
    with pytest.raises(TypeError, match="GaussianPath"):
        train(small_model(), "ot", eight_gaussians(), **kw)
    with pytest.raises(TypeError, match="target must be a fmtoy.data.Distribution"):
        train(small_model(), CondOTPath(), torch.randn(10, 2), **kw)
    with pytest.raises(ValueError, match="dimensions disagree"):
        train(VelocityMLP(dim=3, hidden=8, depth=1), CondOTPath(), eight_gaussians(), **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": "mnist"}, "unknown dataset 'mnist'; allowed: .*eight_gaussians"),
        ({"path": "cosine"}, "unknown path 'cosine'; allowed: ot, ve, vp"),
        ({"coupling": "greedy"}, "unknown coupling"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"hidden": 0}, "hidden"),
        ({"depth": -1}, "depth"),
        ({"sigma_min": -0.1}, "sigma_min"),
        ({"path": "vp", "sigma_min": 0.1}, "sigma_min applies to the 'ot' and 've' paths"),
        ({"seed": 1.5}, "seed"),
        ({"ema_decay": 2.0}, "ema_decay"),
        ({"lr_schedule": "exp"}, "lr_schedule"),
        pytest.param({"device": "cuda"}, "CUDA is not available", marks=NO_CUDA),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_flow_rejects_non_config():
    with pytest.raises(TypeError, match="TrainConfig"):
        train_flow({"steps": 10})
