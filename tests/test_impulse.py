"""Impulse response: exactly finite for nilpotent maps, infinite with the input held."""

import math

import pytest
import torch
from torch import nn

import iternn
from iternn.dynamics.functional import DynamicsError
from iternn.dynamics.impulse import ImpulseResponse, impulse_response
from iternn.dynamics.jacobian import jacobian

F64 = torch.float64


def mlp_map(layers: int, seed: int = 0):
    torch.manual_seed(seed)
    sizes = [3, 5, 4, 6, 2, 3][: layers + 1]
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < layers - 1:
            mods.append(nn.Tanh())
    return iternn.from_mlp(nn.Sequential(*mods).double())


def x_state(batch=(2,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(*batch, 3, generator=g, dtype=F64)}


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["linear", "difference"])
def test_mlp_response_is_exactly_zero_after_L_applications_without_hold(layers, mode):
    net = mlp_map(layers)
    res = impulse_response(net, x_state(), steps=layers + 4, mode=mode)
    assert isinstance(res, ImpulseResponse)
    assert res.norm.shape == (layers + 5,) and res.norm.dtype == F64
    assert res.structural_length == layers  # the core's analysis, reused
    assert torch.all(res.norm[: layers + 1] > 0)  # t = 0 (the perturbation) ... L
    assert torch.all(res.norm[layers + 1 :] == 0)  # exactly, not approximately
    assert res.last_nonzero == layers and res.vanished
    assert res.perturbed == tuple(net.map.slots)  # default: every free slot
    # The output slot carries the perturbation of x exactly at t = L (y = MLP(x0)).
    assert res.per_slot["y"][layers] > 0


def test_mlp_response_to_held_input_never_vanishes():
    layers = 3
    net = mlp_map(layers)
    res = impulse_response(net, x_state(), steps=12, hold="x", slot="x")
    assert res.structural_length == math.inf
    assert res.perturbed == ("x",) and res.hold == ("x",)
    assert float(res.norm[0]) == 0.0  # the free slots are not perturbed at t = 0
    assert torch.all(res.norm[1:] > 0)
    assert not res.vanished and res.last_nonzero == 12
    # y responds from t = L on, and then keeps the derivative of MLP(x) forever.
    y = res.per_slot["y"]
    assert torch.all(y[:layers] == 0) and torch.all(y[layers:] > 0)
    torch.testing.assert_close(y[layers:], y[layers].expand(13 - layers), atol=0, rtol=1e-12)
    # The held slot keeps its perturbation (eps, unit direction per batch element).
    torch.testing.assert_close(res.per_slot["x"], torch.full((13,), 1e-6 * math.sqrt(2), dtype=F64))


def test_response_of_hidden_slots_with_input_held_is_finite():
    net = mlp_map(3)
    # Perturbing the free slots only: the chain h1 -> h2 -> y forgets it after 2 more.
    res = impulse_response(net, x_state(), steps=6, hold="x")
    assert res.perturbed == ("h1", "h2", "y")
    assert res.last_nonzero == 2
    assert torch.all(res.norm[3:] == 0)


def test_linear_and_difference_modes_agree_to_first_order():
    net = mlp_map(3)
    lin = impulse_response(net, x_state(), steps=6, hold="x", slot="x", eps=1e-6)
    dif = impulse_response(net, x_state(), steps=6, hold="x", slot="x", eps=1e-6,
                           mode="difference")
    torch.testing.assert_close(dif.norm[1:], lin.norm[1:], rtol=1e-4, atol=0)
    # The linear response is linear in eps (bit-exact zeros stay zero).
    big = impulse_response(net, x_state(), steps=6, hold="x", slot="x", eps=1e-2)
    torch.testing.assert_close(big.norm, lin.norm * 1e4, rtol=1e-12, atol=0)


def test_linear_response_is_jacobian_powers_on_a_linear_recurrent_map():
    g = torch.Generator().manual_seed(2)
    m = iternn.BlockMap({"a": 3, "b": 2})
    for d, s in [("a", "a"), ("a", "b"), ("b", "a")]:
        lin = nn.Linear(m.slots[s], m.slots[d], bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=F64) * 0.5)
        m.connect(d, s, lin)
    state = {"a": torch.randn(3, generator=g, dtype=F64),
             "b": torch.randn(2, generator=g, dtype=F64)}
    direction = {"a": torch.tensor([1.0, 0.0, -1.0], dtype=F64)}
    res = impulse_response(m, state, steps=5, direction=direction, eps=0.5)
    assert res.structural_length == math.inf  # a cycle
    assert res.perturbed == ("a",)
    a = jacobian(m, state)
    delta = torch.cat([0.5 * direction["a"], torch.zeros(2, dtype=F64)])
    for t in range(6):
        want = torch.linalg.matrix_power(a, t) @ delta
        got = torch.cat([res.response["a"][t], res.response["b"][t]])
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)


def test_forced_recurrent_map_and_batched_shapes():
    g = torch.Generator().manual_seed(3)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", nn.Linear(2, 3).double())
    m.connect("h", "h", nn.Linear(3, 3).double())
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(7, 4, 2, generator=g, dtype=F64)
    state = {"h": torch.zeros(4, 3, dtype=F64)}
    res = impulse_response(m, state, steps=7, force={"x": xs})
    assert res.perturbed == ("h",)  # forced slots are not free
    assert res.response["h"].shape == (8, 4, 3)
    assert torch.all(res.per_slot["x"] == 0)
    assert torch.all(res.norm > 0)  # a cycle: never exactly zero
    with pytest.raises(DynamicsError, match="slot 'x' is forced"):
        impulse_response(m, state, steps=7, force={"x": xs}, slot="x")


def test_default_direction_is_seeded_and_unit_norm():
    net = mlp_map(2)
    a = impulse_response(net, x_state(batch=(3,)), steps=3, eps=1.0)
    b = impulse_response(net, x_state(batch=(3,)), steps=3, eps=1.0)
    c = impulse_response(net, x_state(batch=(3,)), steps=3, eps=1.0,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.norm, b.norm)
    assert not torch.equal(a.norm, c.norm)
    # Unit norm per batch element: three elements give sqrt(3) at t = 0.
    assert abs(float(a.norm[0]) - math.sqrt(3)) < 1e-12


class _ReverseOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Doubler(nn.Module):
    def forward(self, x):
        return _ReverseOnly.apply(x)


def test_linear_mode_needs_forward_mode_and_says_so():
    m = iternn.BlockMap({"a": 2, "b": 2})
    m.connect("b", "a", Doubler())
    state = {"a": torch.ones(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    with pytest.raises(DynamicsError, match="mode='difference'"):
        impulse_response(m, state, steps=3)
    res = impulse_response(m, state, steps=3, mode="difference")
    assert res.last_nonzero == 1 == res.structural_length


# ----------------------------------------------------------------------------- bad input


def test_nan_in_the_state_is_named():
    net = mlp_map(2)
    with pytest.raises(DynamicsError, match="slot 'x'.*NaN"):
        impulse_response(net, {"x": torch.tensor([0.0, float("nan"), 1.0], dtype=F64)}, steps=3)


def test_unknown_slot_is_named():
    net = mlp_map(2)
    with pytest.raises(DynamicsError, match="slot names unknown slot 'q'"):
        impulse_response(net, x_state(), steps=3, slot="q")
    with pytest.raises(DynamicsError, match="state names unknown slot 'q'"):
        impulse_response(net, {**x_state(), "q": torch.zeros(2, 1, dtype=F64)}, steps=3)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_steps_must_be_positive_int(steps):
    with pytest.raises(DynamicsError, match="steps must be an int >= 1"):
        impulse_response(mlp_map(2), x_state(), steps=steps)


def test_bad_options_are_named():
    net = mlp_map(2)
    with pytest.raises(DynamicsError, match="mode must be one of"):
        impulse_response(net, x_state(), steps=3, mode="exact")
    with pytest.raises(DynamicsError, match="eps must be a positive"):
        impulse_response(net, x_state(), steps=3, eps=0.0)
    with pytest.raises(DynamicsError, match="direction is zero"):
        impulse_response(net, x_state(), steps=3, direction={"x": torch.zeros(3, dtype=F64)})
    with pytest.raises(DynamicsError, match="direction has slots"):
        impulse_response(net, x_state(), steps=3, slot="h1",
                         direction={"x": torch.ones(3, dtype=F64)})
    with pytest.raises(DynamicsError, match="held slot 'x' needs a value"):
        impulse_response(net, {"h1": torch.zeros(5, dtype=F64)}, steps=3, hold="x")
