"""MapFunction: a map as a function on its packed free slots."""

import pytest
import torch
from maps import reference_iterate
from torch import nn

import iternn
from iternn.dynamics import DynamicsError, MapFunction


def _map():
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 3, "h": 2, "y": 1})
    m.connect("h", "x", nn.Linear(3, 2))
    m.connect("h", "h", nn.Linear(2, 2))
    m.connect("y", "h", nn.Linear(2, 1))
    m.set_activation("h", nn.Tanh())
    return m.double()


def test_one_call_is_one_application_with_held_slots():
    m = _map()
    x = torch.randn(4, 3, dtype=torch.float64)
    G = MapFunction(m, {"x": x}, hold=["x"])
    assert G.free == ("h", "y") and G.size == 3
    z = torch.randn(4, 3, dtype=torch.float64)
    state = G.unpack(z)
    want = reference_iterate(m, state, 1, hold=["x"])
    assert torch.allclose(G(z), torch.cat([want["h"], want["y"]], -1), atol=1e-12)
    assert torch.equal(G.pack(state), z)


def test_held_batch_that_does_not_broadcast():
    m = _map()
    G = MapFunction(m, {"x": torch.zeros(10, 3, dtype=torch.float64)}, hold=["x"])
    with pytest.raises(DynamicsError, match="'x'"):
        G(torch.zeros(3, 3, dtype=torch.float64))


def test_inf_in_state():
    with pytest.raises(DynamicsError, match="'x'"):
        MapFunction(_map(), {"x": torch.full((1, 3), float("inf"), dtype=torch.float64)}, hold=["x"])


def test_held_slot_without_value():
    with pytest.raises(DynamicsError, match="'x'"):
        MapFunction(_map(), {}, hold=["x"])


def test_everything_held():
    m = iternn.BlockMap({"x": 1})
    with pytest.raises(DynamicsError, match="nothing to iterate"):
        MapFunction(m, {"x": torch.zeros(1, 1)}, hold=["x"])


@pytest.mark.parametrize("call", [
    lambda m, s: MapFunction(m, s),
    lambda m, s: iternn.dynamics.fixed_point(m, s, hold=["x"]),
    lambda m, s: iternn.dynamics.jacobian(m, s, hold=["x"]),
    lambda m, s: iternn.dynamics.eigenvalues(m, s, hold=["x"]),
    lambda m, s: iternn.dynamics.spectral_radius(m, s, hold=["x"]),
    lambda m, s: iternn.dynamics.lyapunov_spectrum(m, s, hold=["x"], steps=3),
    lambda m, s: iternn.dynamics.impulse_response(m, s, steps=3),
    lambda m, s: iternn.dynamics.DEQ(m, input="x", output="h"),
], ids=["MapFunction", "fixed_point", "jacobian", "eigenvalues", "spectral_radius",
        "lyapunov_spectrum", "impulse_response", "DEQ"])
def test_a_module_that_is_not_a_map_is_the_same_type_error_everywhere(call):
    state = {"x": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(iternn.MapTypeError, match="Linear"):
        call(nn.Linear(3, 3), state)
