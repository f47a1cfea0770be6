"""Tests for fmtoy.models: time/cond conventions, batch independence, dtype handling, parameter count, errors."""

from __future__ import annotations

import pytest
import torch

from fmtoy.models import VelocityMLP, count_parameters


def make(**kwargs) -> VelocityMLP:
    torch.manual_seed(0)
    return VelocityMLP(hidden=32, depth=2, **kwargs)


def test_time_conventions_agree():
    model, x = make(), torch.randn(5, 2)
    ref = model(x, torch.full((5,), 0.3))
    for t in (0.3, torch.tensor(0.3), torch.full((5, 1), 0.3), torch.tensor([0.3])):
        assert torch.equal(model(x, t), ref)
    assert ref.shape == (5, 2)


def test_rows_are_independent():
    """Row i of a batched call equals the call on row i alone (up to float32 matmul reassociation)."""
    model, x, t = make(), torch.randn(7, 2), torch.rand(7)
    batched = model(x, t)
    single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(7)])
    assert torch.allclose(batched, single, atol=1e-6)
    assert not torch.allclose(model(x, t), model(x, t.flip(0)), atol=1e-3)  # t really enters


def test_float64_inputs_give_float64_outputs_with_gradients():
    model = make()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    out = model(x, torch.rand(4, dtype=torch.float64))
    assert out.dtype == torch.float64
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g.dtype == torch.float64 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_float64_matches_float32_values():
    model, x, t = make(), torch.randn(6, 2), torch.rand(6)
    assert torch.allclose(model(x.double(), t.double()).float(), model(x, t), atol=1e-6)


def test_time_embedding_is_sin_cos_pairs():
    model = make()
    t = torch.rand(10, 1)
    emb = model.time_embedding(t)
    half = model.time_features // 2
    assert emb.shape == (10, 1 + model.time_features)
    assert torch.equal(emb[:, :1], t)
    assert torch.allclose(emb[:, 1 : 1 + half] ** 2 + emb[:, 1 + half :] ** 2, torch.ones(10, half), atol=1e-6)


def test_conditioning_enters_and_broadcasts():
    model, x, t = make(cond_dim=1), torch.randn(5, 2), torch.rand(5)
    a, b = model(x, t, torch.full((5, 1), 0.25)), model(x, t, torch.full((5, 1), 0.5))
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(model(x, t, 0.25), a) and torch.equal(model(x, t, torch.full((5,), 0.25)), a)
    model3 = make(cond_dim=3)
    assert model3(x, t, torch.randn(5, 3)).shape == (5, 2)


def test_count_parameters_matches_formula():
    d, h, depth, tf = 2, 32, 3, 16
    model = VelocityMLP(dim=d, hidden=h, depth=depth, time_features=tf)
    expected = (d + 1 + tf) * h + h + (depth - 1) * (h * h + h) + h * d + d
    assert count_parameters(model) == expected
    with_cond = VelocityMLP(dim=d, hidden=h, depth=depth, time_features=tf, cond_dim=3)
    cond_mlp = 3 * tf + tf + tf * tf + tf
    assert count_parameters(with_cond) == expected + tf * h + cond_mlp  # first layer also sees the cond embedding


def test_general_dimension():
    model = VelocityMLP(dim=5, hidden=16, depth=1)
    assert model(torch.randn(3, 5), 0.5).shape == (3, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim"),
        ({"hidden": 0}, "hidden"),
        ({"depth": 0}, "depth"),
        ({"hidden": 2.5}, "hidden"),
        ({"time_features": 7}, "even"),
        ({"time_features": 0}, "time_features"),
        ({"cond_dim": -1}, "cond_dim"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VelocityMLP(**kwargs)


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(4, 3), 0.5), ValueError, r"shape \(n, 2\)"),
        ((torch.randn(4), 0.5), ValueError, "shape"),
        ((torch.randn(4, 2), torch.rand(3)), ValueError, "3 entries but x has 4 rows"),
        ((torch.randn(4, 2), torch.rand(4, 2)), ValueError, r"t must be a scalar or have shape"),
        ((torch.randn(4, 2), "0.5"), TypeError, "t must be a float or a tensor"),
        ((torch.randn(4, 2).tolist(), 0.5), TypeError, "torch.Tensor"),
        ((torch.randn(4, 2), 0.5, torch.rand(4, 1)), ValueError, "cond_dim=0"),
    ],
)
def test_bad_forward_arguments(args, err, match):
    with pytest.raises(err, match=match):
        make()(*args)


@pytest.mark.parametrize(
    "cond, err, match",
    [
        (None, ValueError, "needs cond"),
        (torch.rand(4, 2), ValueError, r"shape \(n, 1\)"),
        (torch.rand(3, 1), ValueError, r"shape \(n, 1\)"),
        ("d", TypeError, "cond must be"),
    ],
)
def test_bad_cond(cond, err, match):
    with pytest.raises(err, match=match):
        make(cond_dim=1)(torch.randn(4, 2), 0.5, cond)


def test_count_parameters_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters(lambda x: x)
