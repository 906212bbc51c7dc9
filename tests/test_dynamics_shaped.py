"""Dynamics tools on maps with shaped slots and blocks that read several slots.

Every Jacobian here is over the flattened state (each slot row-major, slots in slot
order: the layout of ``BlockMap.pack``). Known answers come from outside the dynamics
package: ``torch.autograd.functional.jacobian`` of ``BlockMap.forward`` on a packed
state, the dense matrix of a linear conv map assembled column by column, a direct
``numpy.linalg.solve`` of ``(I - W) z = c``, ``nn.LSTMCell`` / ``nn.GRUCell`` for the maps
built here by hand, ``nn.LSTM`` / ``nn.GRU`` and the source model for converted ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import iternn
from iternn.dynamics import (
    DEQ,
    DynamicsError,
    MapFunction,
    eigenvalues,
    find_fixed_points,
    fixed_point,
    impulse_response,
    jacobian,
    largest_lyapunov,
    lyapunov_spectrum,
    singular_values,
    spectral_radius,
)
from iternn.dynamics.validate import check_matrix_finite

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _conv(c_in, c_out, *, positive=False, scale=1.0, bias=False, gen=None):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias, dtype=F64)
    with torch.no_grad():
        w = torch.randn(conv.weight.shape, generator=gen, dtype=F64)
        conv.weight.copy_(scale * (w.abs() if positive else w))
        if bias:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=F64))
    return conv


def linear_conv_map(seed=0, *, radius=0.9, channels=2):
    """A linear recurrent conv map: x (1, 4, 4) held, h (C, 4, 4) <- conv(x) + conv(h) + b,
    y (3,) <- Linear(flatten(h)) + b. The recurrent kernel is positive (a Perron root:
    real, simple, dominant) and scaled so that the spectral radius of W_hh is ``radius``."""
    g = torch.Generator().manual_seed(seed)
    c = channels
    m = iternn.BlockMap({"x": (1, 4, 4), "h": (c, 4, 4), "y": 3})
    m.connect("h", "x", _conv(1, c, gen=g))
    rec = m.connect("h", "h", _conv(c, c, positive=True, gen=g))
    lin = nn.Linear(16 * c, 3, dtype=F64)
    m.connect("y", "h", nn.Sequential(nn.Flatten(), lin))
    m.set_bias("h", torch.randn(c, 4, 4, generator=g, dtype=F64))
    m.set_bias("y", torch.randn(3, generator=g, dtype=F64))
    with torch.no_grad():  # rescale W_hh to the wanted spectral radius
        rho = torch.linalg.eigvals(block_matrix(rec, (c, 4, 4), (c, 4, 4))).abs().max()
        rec.weight.mul_(radius / rho)
    return m


def block_matrix(module, src_shape, dst_shape):
    """The dense matrix of a linear (bias-free) block over the flattened slots, column by
    column: ``W[:, j] = module(e_j)`` (the block called batch-flattened)."""
    n_in = math.prod(src_shape)
    eye = torch.eye(n_in, dtype=F64).reshape(n_in, *src_shape)
    with torch.no_grad():
        return module(eye).reshape(n_in, -1).t()


def packed_forward(m, held, free, update_state=None):
    """``z -> pack(BlockMap.forward(unpack(z)))`` over the ``free`` slots, written out by
    hand (row-major reshape per slot), independent of MapFunction."""
    sizes = [m.slots[s] for s in free]

    def f(z):
        batch = z.shape[:-1]
        parts = torch.split(z, sizes, dim=-1)
        state = {s: p.reshape(*batch, *m.shapes[s]) for s, p in zip(free, parts)}
        state.update(held)
        out = m(state) if update_state is None else update_state(state)
        return torch.cat([out[s].reshape(*batch, -1) for s in free], dim=-1)

    return f


def rand_state(m, batch=(), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {s: scale * torch.randn(*batch, *shape, generator=g, dtype=F64)
            for s, shape in m.shapes.items()}


class Gate(nn.Module):
    """``act(W x + U h + b)``: a gate reading two vector slots (a multi-source block),
    rows ``rows`` of a torch cell's weights (``b = b_ih + b_hh``)."""

    rowwise = True

    def __init__(self, cell, rows, act):
        super().__init__()
        self.wx = nn.Linear(cell.input_size, rows.stop - rows.start, dtype=F64)
        self.wh = nn.Linear(cell.hidden_size, rows.stop - rows.start, bias=False, dtype=F64)
        with torch.no_grad():
            self.wx.weight.copy_(cell.weight_ih[rows])
            self.wx.bias.copy_(cell.bias_ih[rows] + cell.bias_hh[rows])
            self.wh.weight.copy_(cell.weight_hh[rows])
        self.act = act

    def forward(self, x, h):
        return self.act(self.wx(x) + self.wh(h))


class CellUpdate(nn.Module):
    """``c' = f * c + i * g``: reads four slots."""

    rowwise = True

    def forward(self, f, c, i, g):
        return f * c + i * g


class Output(nn.Module):
    """``h' = o * tanh(c)``."""

    rowwise = True

    def forward(self, o, c):
        return o * torch.tanh(c)


def lstm_map(cell: nn.LSTMCell) -> iternn.BlockMap:
    """An LSTM cell as a block map with multi-source gate blocks (torch's gate order
    i, f, g, o); with ``update="ordered"`` one application is one time step."""
    n_in, hid = cell.input_size, cell.hidden_size
    m = iternn.BlockMap({"x": n_in, "i": hid, "f": hid, "g": hid, "o": hid, "c": hid, "h": hid})
    for k, (name, act) in enumerate([("i", torch.sigmoid), ("f", torch.sigmoid),
                                     ("g", torch.tanh), ("o", torch.sigmoid)]):
        m.connect(name, ("x", "h"), Gate(cell, slice(k * hid, (k + 1) * hid), act))
    m.connect("c", ("f", "c", "i", "g"), CellUpdate())
    m.connect("h", ("o", "c"), Output())
    return m


def small_lstm(seed=0, n_in=3, hid=4, scale=0.5):
    torch.manual_seed(seed)
    cell = nn.LSTMCell(n_in, hid, dtype=F64)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(scale)
    return cell


class GRUCandidate(nn.Module):
    """``n = tanh(W x + b + r * (U h + c))`` reading (x, h, r)."""

    rowwise = True

    def __init__(self, cell):
        super().__init__()
        hid = cell.hidden_size
        rows = slice(2 * hid, 3 * hid)
        self.wx = nn.Linear(cell.input_size, hid, dtype=F64)
        self.wh = nn.Linear(hid, hid, dtype=F64)
        with torch.no_grad():
            self.wx.weight.copy_(cell.weight_ih[rows])
            self.wx.bias.copy_(cell.bias_ih[rows])
            self.wh.weight.copy_(cell.weight_hh[rows])
            self.wh.bias.copy_(cell.bias_hh[rows])

    def forward(self, x, h, r):
        return torch.tanh(self.wx(x) + r * self.wh(h))


class GRUBlend(nn.Module):
    """``h' = (1 - z) * n + z * h``."""

    rowwise = True

    def forward(self, z, n, h):
        return (1 - z) * n + z * h


def gru_map(cell: nn.GRUCell) -> iternn.BlockMap:
    """A GRU cell as a block map (torch's gate order r, z, n); ordered: one step per
    application."""
    hid = cell.hidden_size
    m = iternn.BlockMap({"x": cell.input_size, "r": hid, "z": hid, "n": hid, "h": hid})
    m.connect("r", ("x", "h"), Gate(cell, slice(0, hid), torch.sigmoid))
    m.connect("z", ("x", "h"), Gate(cell, slice(hid, 2 * hid), torch.sigmoid))
    m.connect("n", ("x", "h", "r"), GRUCandidate(cell))
    m.connect("h", ("z", "n", "h"), GRUBlend())
    return m


def residual_conv_map(skip: str, seed=0):
    """x -> h1 -> h2 -> y (3x3 convs, tanh) plus an identity skip ``skip -> y``; every
    slot (2, 5, 5)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 5, 5)
    m = iternn.BlockMap({"x": shape, "h1": shape, "h2": shape, "y": shape})
    m.connect("h1", "x", _conv(2, 2, bias=True, gen=g))
    m.connect("h2", "h1", _conv(2, 2, bias=True, gen=g))
    m.connect("y", "h2", _conv(2, 2, gen=g))
    m.connect("y", skip, nn.Identity())
    m.set_activation("h1", nn.Tanh())
    m.set_activation("h2", nn.Tanh())
    return m


def cnn_map(seed=0):
    """A feed-forward CNN as a map: x (1, 6, 6) -> c1 (3, 6, 6) conv+tanh -> p (3, 3, 3)
    avg-pool -> y (4,) flatten+linear: longest input-to-output path 3."""
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap({"x": (1, 6, 6), "c1": (3, 6, 6), "p": (3, 3, 3), "y": 4})
    m.connect("c1", "x", _conv(1, 3, bias=True, gen=g))
    m.connect("p", "c1", nn.AvgPool2d(2))
    m.connect("y", "p", nn.Sequential(nn.Flatten(), nn.Linear(27, 4, dtype=F64)))
    m.set_activation("c1", nn.Tanh())
    return m


def nonzero_lags(norms: torch.Tensor) -> list[int]:
    return torch.nonzero(norms).flatten().tolist()


# ----------------------------------------------------------------------------- MapFunction
def test_map_function_packs_shaped_slots_row_major_and_is_one_application():
    m = linear_conv_map()
    s = rand_state(m, batch=(2, 3))
    g = MapFunction(m, s, hold=["x"])
    assert g.free == ("h", "y") and g.size == 32 + 3
    z = g.pack(s)
    assert z.shape == (2, 3, 35)
    assert torch.equal(z, torch.cat([s["h"].reshape(2, 3, 32), s["y"]], -1))
    back = g.unpack(z)
    assert back["h"].shape == (2, 3, 2, 4, 4) and torch.equal(back["h"], s["h"])
    assert torch.equal(back["x"], s["x"])
    want = packed_forward(m, {"x": s["x"]}, ("h", "y"))(z)
    assert torch.allclose(g(z), want, rtol=0, atol=1e-13)
    # A held shaped slot without batch dims broadcasts over the batch of z.
    g1 = MapFunction(m, {"x": s["x"][0, 0]}, hold=["x"])
    assert torch.allclose(g1(z)[0, 0], g(z)[0, 0], rtol=0, atol=1e-13)


def test_map_function_errors_name_the_slot_and_its_shape():
    m = linear_conv_map()
    g = MapFunction(m, {"x": torch.zeros(5, 1, 4, 4, dtype=F64)}, hold=["x"])
    with pytest.raises(DynamicsError, match=r"held slot 'x' \(shape \(1, 4, 4\)\)"):
        g(torch.zeros(3, 35, dtype=F64))
    with pytest.raises(DynamicsError, match=r"slot 'h' must have shape \(\*batch, 2, 4, 4\)"):
        g.pack({"h": torch.zeros(5, 32, dtype=F64), "y": torch.zeros(5, 3, dtype=F64)})
    with pytest.raises(DynamicsError, match=r"slot 'h'.*\(\*batch, 2, 4, 4\)"):
        jacobian(m, {"x": torch.zeros(1, 4, 4, dtype=F64), "h": torch.zeros(2, 16, dtype=F64)},
                 hold=["x"])


# ----------------------------------------------------------------------------- Jacobians
def test_jacobian_of_a_linear_conv_map_is_its_dense_block_matrix():
    m = linear_conv_map()
    s = rand_state(m)
    w_hh = block_matrix(m.block("h", "h"), (2, 4, 4), (2, 4, 4))
    w_yh = m.block("y", "h")[1].weight.detach()
    want = torch.zeros(35, 35, dtype=F64)
    want[:32, :32] = w_hh
    want[32:, :32] = w_yh
    jac = jacobian(m, s, hold=["x"])
    assert jac.shape == (35, 35)
    assert torch.allclose(jac, want, rtol=0, atol=1e-13)
    # Without the hold, x's columns appear too (x has no incoming block: a zero row).
    full = jacobian(m, s)
    assert full.shape == (51, 51) and torch.equal(full[:16], torch.zeros(16, 51, dtype=F64))
    assert torch.allclose(full[16:48, :16], block_matrix(m.block("h", "x"), (1, 4, 4), (2, 4, 4)),
                          rtol=0, atol=1e-13)


def test_spectra_of_a_linear_conv_map_match_eigvals_of_the_autograd_jacobian():
    m = linear_conv_map(radius=0.9)
    s = rand_state(m)
    dense = torch.autograd.functional.jacobian(
        packed_forward(m, {"x": s["x"]}, ("h", "y")), MapFunction(m, s, hold=["x"]).pack(s))
    want = torch.linalg.eigvals(dense)
    rho = want.abs().max()
    assert abs(float(rho) - 0.9) < 1e-12
    eig = eigenvalues(m, s, hold=["x"])
    assert torch.allclose(eig.abs(), want.abs().sort(descending=True).values, atol=1e-10)
    assert abs(float(spectral_radius(m, s, hold=["x"])) - float(rho)) < 1e-9
    sv = singular_values(m, s, hold=["x"])
    assert torch.allclose(sv, torch.linalg.svdvals(dense), atol=1e-12)


@pytest.mark.parametrize("update", ["jacobi", "ordered"])
def test_jacobian_of_a_nonlinear_shaped_map_equals_autograd_on_the_packed_state(update):
    g = torch.Generator().manual_seed(3)
    m = iternn.BlockMap({"x": (2, 3, 3), "h": (2, 3, 3), "v": 5, "y": (2, 3, 3)})
    m.connect("h", "x", _conv(2, 2, bias=True, gen=g))
    m.connect("h", "h", _conv(2, 2, scale=0.3, gen=g))
    m.connect("v", "h", nn.Sequential(nn.Flatten(), nn.Linear(18, 5, dtype=F64)))
    m.connect("y", ("h", "v"), VectorGatedConv())
    m.connect("h", "y", nn.Identity())
    m.set_activation("h", nn.Tanh())
    m.set_activation("v", nn.Sigmoid())
    m.set_bias("y", torch.randn(2, 3, 3, generator=g, dtype=F64))
    s = rand_state(m, batch=(3,), seed=1)
    free = ("h", "v", "y")
    step = None
    if update == "ordered":
        def step(state):
            return iternn.iterate(m, state, 1, hold=["x"], update="ordered")
    f = packed_forward(m, {"x": s["x"]}, free, step)
    z = MapFunction(m, s, hold=["x"]).pack(s)
    jac = jacobian(m, s, hold=["x"], update=update)
    assert jac.shape == (3, 41, 41)
    for b in range(3):
        want = torch.autograd.functional.jacobian(
            packed_forward(m, {"x": s["x"][b]}, free, step), z[b])
        assert torch.allclose(jac[b], want, rtol=0, atol=1e-12)
    assert torch.allclose(f(z), MapFunction(m, s, hold=["x"], update=update)(z), atol=1e-13)


class VectorGatedConv(nn.Module):
    """``conv(a) * sigmoid(v)`` per channel: reads a feature map and a vector slot."""

    samplewise = True

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = _conv(2, 2, scale=0.4, gen=g)

    def forward(self, a, v):
        return self.conv(a) * torch.sigmoid(v[:, :2, None, None])


def test_structured_path_on_shaped_slots_only_for_identity_blocks():
    g = torch.Generator().manual_seed(0)
    m = iternn.BlockMap({"a": (2, 3), "b": (2, 3), "v": 4})
    m.connect("b", "a", nn.Identity())
    m.connect("a", "b", nn.Identity())
    m.connect("v", "v", nn.Linear(4, 4, dtype=F64))
    m.set_activation("a", nn.Tanh())
    m.set_bias("a", torch.randn(2, 3, generator=g, dtype=F64))
    s = rand_state(m, seed=2)
    structured = jacobian(m, s, method="structured")
    auto = jacobian(m, s, method="autograd")
    assert torch.allclose(structured, auto, rtol=0, atol=1e-14)
    sp = jacobian(m, s, sparse=True)
    assert torch.allclose(sp.to_dense(), auto, rtol=0, atol=1e-14)
    # An nn.Linear on a shaped slot acts on its last dim: its weight (3 x 3) is not the
    # (6 x 6) block of the Jacobian, so the structured path must not take it.
    m.connect("b", "b", nn.Linear(3, 3, dtype=F64))
    with pytest.raises(DynamicsError, match=r"block 'b' <- 'b' \(Linear\).*shaped slots"):
        jacobian(m, s, method="structured")
    want = torch.autograd.functional.jacobian(packed_forward(m, {}, ("a", "b", "v")),
                                              m.pack(s))
    assert torch.allclose(jacobian(m, s), want, rtol=0, atol=1e-13)
    assert torch.allclose(jacobian(m, s, sparse=True).to_dense(), want, rtol=0, atol=1e-13)


@settings(max_examples=10)
@given(c=st.integers(1, 2), hw=st.integers(1, 3), n=st.integers(1, 3), batch=st.sampled_from(
    [(), (2,), (2, 1)]), seed=st.integers(0, 2**16))
def test_jacobian_equals_autograd_for_random_shapes(c, hw, n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap({"x": (c, hw, hw), "h": (c, hw, hw), "v": n})
    m.connect("h", "x", _conv(c, c, gen=g))
    m.connect("h", "h", _conv(c, c, scale=0.5, bias=True, gen=g))
    m.connect("v", ("h", "v"), FlatMix(c * hw * hw, n))
    m.set_activation("h", nn.Tanh())
    s = rand_state(m, batch=batch, seed=seed)
    jac = jacobian(m, s, hold=["x"])
    z = MapFunction(m, s, hold=["x"]).pack(s)
    flat_z = z.reshape(-1, z.shape[-1])
    flat_x = s["x"].reshape(-1, c, hw, hw)
    flat_j = jac.reshape(-1, *jac.shape[-2:])
    for b in range(flat_z.shape[0]):
        want = torch.autograd.functional.jacobian(
            packed_forward(m, {"x": flat_x[b]}, ("h", "v")), flat_z[b])
        assert torch.allclose(flat_j[b], want, rtol=0, atol=1e-12)


class FlatMix(nn.Module):
    """``tanh(A flatten(h) + B v)``: a two-source block between a feature map and a vector."""

    samplewise = True

    def __init__(self, n_h, n):
        super().__init__()
        self.a = nn.Linear(n_h, n, dtype=F64)
        self.b = nn.Linear(n, n, bias=False, dtype=F64)

    def forward(self, h, v):
        return torch.tanh(self.a(h.flatten(1)) + self.b(v))


def test_batched_spectral_radius_is_per_element():
    m = iternn.BlockMap({"x": (1, 3, 3), "h": (2, 3, 3)})
    g = torch.Generator().manual_seed(4)
    m.connect("h", "x", _conv(1, 2, gen=g))
    m.connect("h", "h", _conv(2, 2, scale=0.5, gen=g))
    m.set_activation("h", nn.Tanh())
    s = rand_state(m, batch=(3,), seed=5)
    both = spectral_radius(m, s, hold=["x"])
    eig = eigenvalues(m, s, hold=["x"])
    for b in range(3):
        one = spectral_radius(m, {k: v[b] for k, v in s.items()}, hold=["x"])
        assert abs(float(both[b]) - float(one)) < 1e-10
        assert abs(float(one) - float(eig[b].abs().max())) < 1e-9


class Sqrt(nn.Module):
    """``sqrt(z)``: its derivative at 0 is infinite."""

    def forward(self, z):
        return torch.sqrt(z)


def test_a_non_finite_jacobian_names_the_block_and_the_units_in_shaped_slots():
    m = iternn.BlockMap({"h": (2, 2, 2), "v": 2})
    m.connect("h", "h", Sqrt())
    m.connect("v", "v", nn.Identity())
    h = torch.ones(2, 2, 2, dtype=F64)
    h[1, 0, 1] = 0.0  # unit 5 of the flattened slot
    # (forward mode gives 0 * inf = NaN across the whole row of that unit)
    with pytest.raises(DynamicsError, match=r"holds NaN \(first at the block 'h' <- 'h', "
                                            r"row 'h'\[1, 0, 1\], column 'h'\[0, 0, 0\]"):
        eigenvalues(m, {"h": h, "v": torch.zeros(2, dtype=F64)})
    jac = torch.zeros(10, 10, dtype=F64)
    jac[9, 3] = float("inf")
    with pytest.raises(DynamicsError, match=r"holds inf \(first at the block 'v' <- 'h', "
                                            r"row 'v'\[1\], column 'h'\[0, 1, 1\]\)"):
        check_matrix_finite(jac, "J", ("h", "v"), (8, 2), ((2, 2, 2), (2,)))


# ----------------------------------------------------------------------------- fixed points
def test_fixed_point_of_a_contractive_conv_map_matches_a_direct_solve():
    m = linear_conv_map(radius=0.8)
    s = rand_state(m)
    w_hh = block_matrix(m.block("h", "h"), (2, 4, 4), (2, 4, 4)).numpy()
    w_hx = block_matrix(m.block("h", "x"), (1, 4, 4), (2, 4, 4)).numpy()
    w_yh = m.block("y", "h")[1].weight.detach().numpy()
    b_y = (m.block("y", "h")[1].bias + m.bias("y")).detach().numpy()
    x = s["x"].reshape(-1).numpy()
    w = np.zeros((35, 35))
    w[:32, :32], w[32:, :32] = w_hh, w_yh
    c = np.concatenate([w_hx @ x + m.bias("h").detach().reshape(-1).numpy(), b_y])
    want = np.linalg.solve(np.eye(35) - w, c)
    star, info = fixed_point(m, s, hold=["x"], tol=1e-12, max_steps=500)
    assert info.converged
    assert star["h"].shape == (2, 4, 4) and torch.equal(star["x"], s["x"])
    got = torch.cat([star["h"].reshape(-1), star["y"]]).numpy()
    assert np.allclose(got, want, rtol=0, atol=1e-10)
    # find_fixed_points from several starts: one stable fixed point, the same one.
    starts = {"x": s["x"], "h": torch.randn(6, 2, 4, 4, dtype=F64), "y": torch.zeros(6, 3, dtype=F64)}
    # A linear map: one Newton step (uncapped) lands on the fixed point.
    fps = find_fixed_points(m, starts, hold=["x"], opt_steps=20, lr=0.05, polish_radius=1e3)
    assert len(fps) == 1 and fps.kind == ("fixed",) and fps.stability == ("stable",)
    assert fps.states["h"].shape == (1, 2, 4, 4) and fps.states["x"].shape == (1, 1, 4, 4)
    assert np.allclose(fps.points[0].numpy(), want, rtol=0, atol=1e-9)
    assert abs(float(fps.spectral_radius[0]) - 0.8) < 1e-9


def test_find_fixed_points_on_a_nonlinear_cnn_map_with_newton_polish():
    g = torch.Generator().manual_seed(1)
    m = iternn.BlockMap({"x": (1, 4, 4), "h": (2, 4, 4)})
    m.connect("h", "x", _conv(1, 2, bias=True, gen=g))
    m.connect("h", "h", _conv(2, 2, scale=0.25, gen=g))
    m.set_activation("h", nn.Tanh())
    x = torch.randn(1, 4, 4, generator=g, dtype=F64)
    starts = {"x": x, "h": 2 * torch.randn(5, 2, 4, 4, generator=g, dtype=F64)}
    fps = find_fixed_points(m, starts, hold=["x"], opt_steps=50, lr=0.05, polish_steps=30,
                            polish_radius=1.0)
    assert len(fps) == 1 and fps.kind == ("fixed",) and fps.stability == ("stable",)
    star, info = fixed_point(m, {"x": x}, hold=["x"], tol=1e-13)
    assert info.converged
    assert torch.allclose(fps.states["h"][0], star["h"], rtol=0, atol=1e-10)
    # The classification uses the Jacobian there: autograd on the packed state.
    dense = torch.autograd.functional.jacobian(packed_forward(m, {"x": x}, ("h",)),
                                               star["h"].reshape(-1))
    want = torch.linalg.eigvals(dense).abs().max()
    assert abs(float(fps.spectral_radius[0]) - float(want)) < 1e-10
    with pytest.raises(DynamicsError, match=r"slot 'h' needs \(N, 2, 4, 4\)"):
        find_fixed_points(m, {"x": x, "h": torch.zeros(5, 32, dtype=F64)}, hold=["x"])


# ----------------------------------------------------------------------------- LSTM / GRU maps
def test_lstm_map_with_multi_source_blocks_is_one_lstm_step_per_ordered_application():
    cell = small_lstm(scale=1.0)
    m = lstm_map(cell)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g, dtype=F64)
    h = torch.randn(2, 4, generator=g, dtype=F64)
    c = torch.randn(2, 4, generator=g, dtype=F64)
    out = iternn.iterate(m, {"x": x, "h": h, "c": c}, 1, hold=["x"], update="ordered")
    h1, c1 = cell(x, (h, c))
    assert torch.allclose(out["h"], h1, atol=1e-14) and torch.allclose(out["c"], c1, atol=1e-14)


def _cell_fixed_point(cell, x, steps=400):
    h = torch.zeros(1, cell.hidden_size, dtype=F64)
    c = torch.zeros_like(h)
    with torch.no_grad():
        for _ in range(steps):
            h, c = cell(x, (h, c))
    return h[0], c[0]


def _cell_jacobian(cell, x, h, c):
    hid = cell.hidden_size

    def step(hc):
        h1, c1 = cell(x, (hc[None, :hid], hc[None, hid:]))
        return torch.cat([h1[0], c1[0]])

    return torch.autograd.functional.jacobian(step, torch.cat([h, c]))


def test_lstm_map_fixed_point_spectrum_and_lyapunov_match_the_lstm_cell():
    cell = small_lstm()
    m = lstm_map(cell)
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    h_star, c_star = _cell_fixed_point(cell, x)
    # Fixed and slow points from several starts (ordered update: the LSTM step).
    g = torch.Generator().manual_seed(2)
    starts = {"x": x[0], "h": torch.randn(4, 4, generator=g, dtype=F64),
              "c": torch.randn(4, 4, generator=g, dtype=F64)}
    fps = find_fixed_points(m, starts, hold=["x"], update="ordered", opt_steps=200, lr=0.05)
    assert len(fps) == 1 and fps.kind == ("fixed",) and fps.stability == ("stable",)
    assert torch.allclose(fps.states["h"][0], h_star, atol=1e-10)
    assert torch.allclose(fps.states["c"][0], c_star, atol=1e-10)
    # Known spectrum: the ordered step reads only (h, c), so its non-zero eigenvalues are
    # those of the cell's (h, c) -> (h', c') Jacobian; the gate columns are zero.
    want = torch.linalg.eigvals(_cell_jacobian(cell, x, h_star, c_star)).abs()
    want = want.sort(descending=True).values
    state = {s: v[0] for s, v in fps.states.items()}
    eig = eigenvalues(m, state, hold=["x"], update="ordered").abs()
    assert torch.allclose(eig[:8], want, atol=1e-10)
    assert torch.equal(eig[8:], torch.zeros(16, dtype=F64)) or float(eig[8:].max()) < 1e-12
    rho = spectral_radius(m, state, hold=["x"], update="ordered")
    assert abs(float(rho) - float(want[0])) < 1e-9
    # Lyapunov exponents at a stable fixed point: log-moduli of the eigenvalues there (the
    # cycle h -> gates -> c -> h runs through multi-source blocks: not nilpotent). The
    # dominant pair is complex (a slow rotation), so each exponent's time average
    # oscillates, but the pair's sum, the growth of a 2-d volume, is exact every step.
    lam = lyapunov_spectrum(m, state, hold=["x"], update="ordered", steps=100, warmup=100, k=2)
    assert abs(float(lam.sum()) - 2 * math.log(float(want[0]))) < 1e-10
    lam1 = largest_lyapunov(m, state, hold=["x"], update="ordered", steps=400, warmup=100)
    assert abs(float(lam1) - math.log(float(want[0]))) < 2e-3
    # The Jacobi map pipelines the stages with a lag: still exact against autograd.
    z = MapFunction(m, state, hold=["x"]).pack(state)
    free = ("i", "f", "g", "o", "c", "h")
    auto = torch.autograd.functional.jacobian(packed_forward(m, {"x": x[0]}, free), z)
    assert torch.allclose(jacobian(m, state, hold=["x"]), auto, rtol=0, atol=1e-13)


def test_multi_source_blocks_are_never_structured_and_named():
    m = lstm_map(small_lstm())
    s = rand_state(m)
    with pytest.raises(DynamicsError, match=r"block 'i' <- \('x', 'h'\) reads several slots"):
        jacobian(m, s, hold=["x"], method="structured")
    assert isinstance(m.block("c", ("f", "c", "i", "g")), CellUpdate)
    with torch.no_grad():
        m.block("i", ("x", "h")).wx.weight[0, 0] = float("nan")
    with pytest.raises(DynamicsError, match=r"block 'i' <- \('x', 'h'\) holds NaN in 'wx.weight'"):
        eigenvalues(m, s, hold=["x"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_maps_have_infinite_impulse_response(kind):
    if kind == "lstm":
        m = lstm_map(small_lstm())
    else:
        torch.manual_seed(0)
        cell = nn.GRUCell(3, 4, dtype=F64)
        m = gru_map(cell)
        x = torch.randn(2, 3, dtype=F64)
        h = torch.randn(2, 4, dtype=F64)
        out = iternn.iterate(m, {"x": x, "h": h}, 1, hold=["x"], update="ordered")
        assert torch.allclose(out["h"], cell(x, h), atol=1e-14)
    assert m.impulse_response_length() == math.inf
    assert m.impulse_response_length(hold=["x"]) == math.inf
    s = rand_state(m, seed=3)
    resp = impulse_response(m, s, steps=12, slot="h", hold=["x"])
    assert resp.structural_length == math.inf
    assert bool((resp.norm[1:] > 0).all())
    # The cycle through multi-source blocks: the Lyapunov exponents are finite (the
    # structural nilpotency bound must see the edges from every source of a block).
    lam = lyapunov_spectrum(m, s, hold=["x"], steps=20, k=2)
    assert bool(torch.isfinite(lam).all())


# ----------------------------------------------------------------------------- impulse response
def test_feed_forward_cnn_impulse_response_length_is_its_longest_path():
    m = cnn_map()
    assert m.impulse_response_length() == 3
    assert m.impulse_response_length(hold=["x"]) == math.inf
    s = rand_state(m, batch=(2,))
    resp = impulse_response(m, s, steps=6, slot="x")
    assert resp.structural_length == 3
    assert resp.response["c1"].shape == (7, 2, 3, 6, 6)
    assert nonzero_lags(resp.per_slot["y"]) == [3]
    assert nonzero_lags(resp.per_slot["c1"]) == [1]
    assert nonzero_lags(resp.per_slot["p"]) == [2]
    assert resp.last_nonzero == 3 and resp.vanished
    # Perturbing every slot: the response dies after the longest path as well.
    every = impulse_response(m, s, steps=6)
    assert every.last_nonzero == 3
    # Held input: the map is nilpotent among the free slots, spectra and exponents exact.
    n_free = 108 + 27 + 4
    assert torch.equal(eigenvalues(m, s, hold=["x"]),
                       torch.zeros(2, n_free, dtype=torch.complex128))
    assert torch.equal(spectral_radius(m, s, hold=["x"]), torch.zeros(2, dtype=F64))
    assert bool((lyapunov_spectrum(m, s, hold=["x"], steps=3, k=2) == -math.inf).all())


@pytest.mark.parametrize("skip, lags", [("x", [1, 3]), ("h1", [2, 3])])
def test_residual_conv_map_responds_at_every_path_length(skip, lags):
    m = residual_conv_map(skip)
    assert m.impulse_response_length() == 3
    s = rand_state(m)
    for mode in ("linear", "difference"):
        resp = impulse_response(m, s, steps=7, slot="x", mode=mode)
        assert nonzero_lags(resp.per_slot["y"]) == lags, mode
        assert resp.last_nonzero == 3
    # The skip alone: the lag-`lags[0]` response is the perturbation carried by identities.
    d = torch.randn(2, 5, 5, dtype=F64)
    resp = impulse_response(m, s, steps=4, slot="x", direction={"x": d}, eps=1.0)
    if skip == "x":
        assert torch.allclose(resp.response["y"][1], d, rtol=0, atol=1e-14)


def test_impulse_direction_has_the_slot_shape_and_bad_shapes_are_named():
    m = residual_conv_map("x")
    s = rand_state(m, batch=(3,))
    d = torch.randn(2, 5, 5, dtype=F64)
    shared = impulse_response(m, s, steps=2, direction={"x": d}, eps=1.0)
    per = impulse_response(m, s, steps=2, direction={"x": d.expand(3, 2, 5, 5)}, eps=1.0)
    assert torch.equal(shared.norm, per.norm)
    assert torch.equal(shared.response["x"][0], d.expand(3, 2, 5, 5))
    with pytest.raises(DynamicsError, match=r"direction of slot 'x' .*\(2, 5, 5\).*\(3, 2, 5, 5\)"):
        impulse_response(m, s, steps=2, direction={"x": torch.ones(50, dtype=F64)})
    # The default random direction: unit norm over every perturbed unit, per element.
    resp = impulse_response(m, s, steps=1, slot=("x", "h1"), eps=1.0)
    norms = (resp.response["x"][0].pow(2).sum((1, 2, 3)) + resp.response["h1"][0].pow(2).sum((1, 2, 3)))
    assert torch.allclose(norms, torch.ones(3, dtype=F64), atol=1e-14)


# ----------------------------------------------------------------------------- Lyapunov
def test_lyapunov_exponent_of_a_linear_conv_map_is_log_spectral_radius():
    m = linear_conv_map(radius=0.9)
    s = rand_state(m)
    lam = largest_lyapunov(m, s, hold=["x"], steps=60, warmup=60)
    assert abs(float(lam) - math.log(0.9)) < 1e-10
    # Batched: one exponent per element, each the same for a linear map.
    sb = rand_state(m, batch=(2,), seed=1)
    lamb = largest_lyapunov(m, sb, hold=["x"], steps=60, warmup=60)
    assert lamb.shape == (2,) and torch.allclose(lamb, torch.full((2,), math.log(0.9), dtype=F64),
                                                  rtol=0, atol=1e-10)
    # Forcing the shaped input slot changes nothing in the Jacobian of a linear map.
    force = {"x": torch.randn(120, 2, 1, 4, 4, dtype=F64)}
    forced = largest_lyapunov(m, {"h": sb["h"], "y": sb["y"]}, force=force, steps=60, warmup=60)
    assert torch.allclose(forced, lamb, rtol=0, atol=1e-10)
    with pytest.raises(DynamicsError, match=r"forced slot 'x' needs shape \(120, 2, 1, 4, 4\)"):
        largest_lyapunov(m, {"h": sb["h"], "y": sb["y"]},
                         force={"x": torch.zeros(120, 2, 16, dtype=F64)}, steps=60, warmup=60)


def test_lyapunov_by_jacobian_vector_products_on_a_larger_conv_map():
    # 4 * 16 + 3 = 67 free units > 64: J q by forward-mode products, no dense Jacobian.
    m = linear_conv_map(radius=0.7, channels=4)
    s = rand_state(m, batch=(2,))
    lam = largest_lyapunov(m, s, hold=["x"], steps=40, warmup=80)
    assert torch.allclose(lam, torch.full((2,), math.log(0.7), dtype=F64), rtol=0, atol=1e-10)
    assert abs(float(spectral_radius(m, {k: v[0] for k, v in s.items()}, hold=["x"])) - 0.7) < 1e-9


def test_lyapunov_spectrum_of_a_linear_conv_map_is_log_moduli():
    m = linear_conv_map(radius=0.9)
    s = rand_state(m)
    w_hh = block_matrix(m.block("h", "h"), (2, 4, 4), (2, 4, 4))
    want = torch.linalg.eigvals(w_hh).abs().log().sort(descending=True).values[:2]
    got = lyapunov_spectrum(m, s, hold=["x"], steps=150, warmup=150, k=2)
    assert torch.allclose(got, want, rtol=0, atol=5e-3)


# ----------------------------------------------------------------------------- DEQ
def _deq_map(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap({"x": (1, 4, 4), "h": (2, 4, 4), "y": 3})
    m.connect("h", "x", _conv(1, 2, bias=True, gen=g))
    m.connect("h", "h", _conv(2, 2, scale=0.2, gen=g))
    m.connect("y", "h", nn.Sequential(nn.Flatten(), nn.Linear(32, 3, dtype=F64)))
    m.set_activation("h", nn.Tanh())
    return m


def test_deq_with_a_shaped_input_matches_the_fixed_point_and_unrolled_gradients():
    m = _deq_map()
    x = torch.randn(2, 1, 4, 4, dtype=F64, requires_grad=True)
    deq = DEQ(m, input="x", output="y", tol=1e-12, max_steps=200)
    assert deq.in_shape == (1, 4, 4) and deq.in_features is None and deq.out_features == 3
    y = deq(x)
    star, _ = fixed_point(m, {"x": x.detach()}, hold=["x"], tol=1e-12)
    assert y.shape == (2, 3) and torch.allclose(y, star["y"], atol=1e-10)
    (y ** 2).sum().backward()
    gx, gw = x.grad.clone(), m.block("h", "h").weight.grad.clone()
    x.grad = None
    m.zero_grad()
    unrolled = iternn.iterate(m, {"x": x}, 80, hold=["x"])
    (unrolled["y"] ** 2).sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-9)
    assert torch.allclose(gw, m.block("h", "h").weight.grad, atol=1e-9)
    whole = DEQ(m, input="x", output="h")(x.detach())
    assert whole.shape == (2, 2, 4, 4) and torch.allclose(whole, star["h"], atol=1e-8)
    with pytest.raises(DynamicsError, match=r"input slot 'x' needs shape \(\*batch, 1, 4, 4\)"):
        deq(torch.zeros(2, 16, dtype=F64))


# ----------------------------------------------------------------------------- converted models
def _torch_step_jacobian(net: nn.Module, x: Tensor, state: dict, layers: int, cell: bool):
    """The Jacobian of one step of a torch ``nn.LSTM``/``nn.GRU`` on its state
    ``(h1, [c1,] h2, [c2,] ...)`` with input ``x`` (no iternn involved)."""
    hid = net.hidden_size
    per = 2 if cell else 1

    def step(v):
        parts = v.reshape(layers, per, hid)
        h = parts[:, 0, None]
        if cell:
            _, (h1, c1) = net(x[None, None], (h, parts[:, 1, None]))
            return torch.stack([h1[:, 0], c1[:, 0]], 1).reshape(-1)
        _, h1 = net(x[None, None], h)
        return h1[:, 0].reshape(-1)

    names = [f"{k}{l}" for l in range(1, layers + 1) for k in (("h", "c") if cell else ("h",))]
    v = torch.cat([state[k].detach() for k in names])
    return torch.autograd.functional.jacobian(step, v)


def test_converted_lstm_fixed_point_spectrum_and_lyapunov_match_torch():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dtype=F64)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(0.7)
    net = iternn.from_lstm(lstm)
    assert net.map.impulse_response_length() == math.inf
    x = torch.randn(3, dtype=F64)
    with torch.no_grad():  # the torch LSTM run long on a constant input: its fixed point
        _, (h, c) = lstm(x.expand(300, 1, 3))
    star, info = fixed_point(net, {"x": x}, hold=["x"], update="ordered", tol=1e-13)
    assert info.converged
    for l in (1, 2):
        assert torch.allclose(star[f"h{l}"], h[l - 1, 0], rtol=0, atol=1e-11)
        assert torch.allclose(star[f"c{l}"], c[l - 1, 0], rtol=0, atol=1e-11)
    # One ordered application is one step of the stack: its non-zero eigenvalues are
    # those of torch's step Jacobian on (h1, c1, h2, c2); the gate columns are zero.
    want = torch.linalg.eigvals(_torch_step_jacobian(lstm, x, star, 2, cell=True)).abs()
    want = want.sort(descending=True).values
    eig = eigenvalues(net, star, hold=["x"], update="ordered").abs()
    assert torch.allclose(eig[:16], want, rtol=0, atol=1e-10)
    assert float(eig[16:].max()) < 1e-12
    rho = spectral_radius(net, star, hold=["x"], update="ordered")
    assert abs(float(rho) - float(want[0])) < 1e-9
    # The four leading eigenvalues are two complex pairs of close moduli; the volume
    # they span grows exactly by |l1 l2 l3 l4| per step once aligned.
    lam = lyapunov_spectrum(net, star, hold=["x"], update="ordered", k=4, steps=50, warmup=200)
    assert abs(float(lam.sum()) - float(want[:4].log().sum())) < 1e-9
    resp = impulse_response(net, star, steps=15, slot="h1", hold=["x"], update="ordered")
    assert resp.structural_length == math.inf and bool((resp.norm > 0).all())


def _torch_lyapunov(net, seq, k, warmup, layers, cell):
    """The QR method on torch's own step Jacobians along torch's trajectory."""
    hid = net.hidden_size
    h = torch.zeros(layers, 1, hid, dtype=F64)
    c = torch.zeros_like(h)
    n = layers * hid * (2 if cell else 1)
    q = torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=torch.Generator().manual_seed(0))).Q
    total = torch.zeros(k, dtype=F64)
    for t, xt in enumerate(seq):
        state = {f"h{l}": h[l - 1, 0] for l in range(1, layers + 1)}
        state.update({f"c{l}": c[l - 1, 0] for l in range(1, layers + 1)})
        q, r = torch.linalg.qr(_torch_step_jacobian(net, xt, state, layers, cell) @ q)
        if t >= warmup:
            total += r.diagonal().abs().log()
        with torch.no_grad():
            if cell:
                _, (h, c) = net(xt[None, None], (h, c))
            else:
                _, h = net(xt[None, None], h)
    return total / (len(seq) - warmup)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_converted_gated_maps_driven_lyapunov_agrees_with_torch(kind):
    torch.manual_seed(1)
    net = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 4, dtype=F64)
    conv = iternn.from_lstm(net) if kind == "lstm" else iternn.from_gru(net)
    seq = torch.randn(120, 3, dtype=F64)
    want = _torch_lyapunov(net, seq, 2, 60, 1, kind == "lstm")
    got = lyapunov_spectrum(conv, {"h1": torch.zeros(4, dtype=F64)}, force={"x": seq},
                            steps=60, warmup=60, update="ordered", k=2)
    # The map's tangent space also holds the gate slots (their columns are zero, their
    # rows bounded): the same exponents, with finite-time terms of order 1 / steps.
    assert torch.allclose(got, want, rtol=0, atol=1e-2)
    # Jacobi update: the map's Jacobian is exactly autograd on the packed state.
    state = rand_state(conv.map, seed=2, scale=0.5)
    free = tuple(k for k in conv.map.slots if k != "x")
    z = MapFunction(conv.map, state, hold=["x"]).pack(state)
    auto = torch.autograd.functional.jacobian(
        packed_forward(conv.map, {"x": state["x"]}, free), z)
    assert torch.allclose(jacobian(conv, state, hold=["x"]), auto, rtol=0, atol=1e-13)
    resp = impulse_response(conv, {"h1": torch.zeros(4, dtype=F64)}, force={"x": seq[:20]},
                            steps=20, slot="h1", update="ordered")
    assert resp.structural_length == math.inf and not resp.vanished


class _SmallCNN(nn.Module):
    """conv -> batch norm -> relu -> max pool -> flatten -> linear (relu folds into the
    batch norm's slot as its activation)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(27, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


class _Residual(nn.Module):
    """``y = c3(tanh(c2(h))) + skip``, ``h = tanh(c1(x))``, ``skip`` = x or h."""

    def __init__(self, skip):
        super().__init__()
        self.skip = skip
        self.c1, self.c2, self.c3 = (nn.Conv2d(2, 2, 3, padding=1) for _ in range(3))

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        y = self.c3(torch.tanh(self.c2(h)))
        return y + (x if self.skip == "x" else h)


def test_converted_cnn_impulse_length_fixed_point_and_jacobian():
    torch.manual_seed(0)
    cnn = _SmallCNN().double().eval()
    with torch.no_grad():  # non-trivial running statistics
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 6, 6, dtype=F64)
    net = iternn.from_module(cnn, x)
    m = net.map
    (inp,) = net.inputs
    out = net.outputs["output"]
    # The longest input-to-output path, in applications: conv, bn (+relu), pool,
    # flatten, linear.
    depth = m.impulse_response_length()
    assert depth == 5 and m.impulse_response_length(hold=[inp]) == math.inf
    s = rand_state(m, batch=(2,), seed=1)
    resp = impulse_response(net, s, steps=depth + 3, slot=inp)
    assert nonzero_lags(resp.per_slot[out]) == [depth]
    assert resp.last_nonzero == depth and resp.structural_length == depth
    # With the input held the map is nilpotent: its fixed point is the forward pass.
    star, info = fixed_point(net, {inp: x}, hold=[inp], solver="picard", max_steps=20)
    assert info.converged and info.steps <= depth + 1
    with torch.no_grad():
        assert torch.allclose(star[out], cnn(x), rtol=0, atol=1e-12)
    free = tuple(k for k in m.slots if k != inp)
    n = sum(m.slots[k] for k in free)
    assert torch.equal(eigenvalues(net, star, hold=[inp]),
                       torch.zeros(2, n, dtype=torch.complex128))
    assert bool((largest_lyapunov(net, star, hold=[inp], steps=depth) == -math.inf).all())
    # The Jacobian at the fixed point: autograd on the packed state (per element).
    jac = jacobian(net, star, hold=[inp])
    z = MapFunction(m, star, hold=[inp]).pack(star)
    for b in range(2):
        want = torch.autograd.functional.jacobian(
            packed_forward(m, {inp: x[b]}, free), z[b])
        assert torch.allclose(jac[b], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip, lags", [("x", [1, 3]), ("h", [2, 3])])
def test_converted_residual_network_responds_at_each_path_length(skip, lags):
    torch.manual_seed(0)
    model = _Residual(skip).double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    net = iternn.from_module(model, x)
    m = net.map
    (inp,) = net.inputs
    out = net.outputs["output"]
    assert m.impulse_response_length() == 3
    s = rand_state(m, batch=(2,), seed=2)
    for mode in ("linear", "difference"):
        resp = impulse_response(net, s, steps=6, slot=inp, mode=mode)
        assert nonzero_lags(resp.per_slot[out]) == lags, mode
