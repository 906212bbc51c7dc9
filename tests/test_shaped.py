"""Shaped slots and blocks that read several slots: the core and the engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from maps import GatedConv, reference_iterate
from torch import nn

import iternn
from iternn import MapError, MapTypeError


class Product(nn.Module):
    """``a * b``: a two-source block (a gate)."""

    rowwise = True

    def forward(self, a, b):
        return a * b


def _conv_map(seed=0, bias=True):
    torch.manual_seed(seed)
    m = iternn.BlockMap({"x": (2, 5, 5), "h": (3, 5, 5), "g": (3, 5, 5), "y": 4})
    m.connect("h", "x", nn.Conv2d(2, 3, 3, padding=1))
    m.connect("h", "h", nn.Conv2d(3, 3, 3, padding=1))
    m.connect("g", ("h", "h"), GatedConv(3))
    m.connect("y", "g", nn.Sequential(nn.Flatten(), nn.Linear(75, 4)))
    m.set_activation("h", nn.Tanh())
    if bias:
        m.set_bias("g", torch.randn(3, 5, 5))
    return m.double()


def test_shapes_and_sizes():
    m = iternn.BlockMap({"x": (3, 4, 5), "v": 6, "w": (7,)})
    assert dict(m.shapes) == {"x": (3, 4, 5), "v": (6,), "w": (7,)}
    assert dict(m.slots) == {"x": 60, "v": 6, "w": 7}
    assert m.size == 73
    assert "x=(3, 4, 5)" in repr(m) and "v=6" in repr(m)


@pytest.mark.parametrize("shape, err", [((), MapError), ((3, 0), MapError), ((3, -1), MapError),
                                        ((3, 2.0), MapTypeError), ((True, 2), MapTypeError),
                                        ("3", MapTypeError)])
def test_bad_shape_names_the_slot(shape, err):
    with pytest.raises(err, match="slot 'h'"):
        iternn.BlockMap({"x": 2, "h": shape})


def test_conv_block_with_wrong_output_shape_names_the_block():
    m = iternn.BlockMap({"x": (2, 5, 5), "h": (3, 5, 5)})
    with pytest.raises(MapError, match=r"block 'h' <- 'x'.*\(2, 3, 3, 3\)"):
        m.connect("h", "x", nn.Conv2d(2, 3, 3))  # no padding: 3x3 out


def test_multi_source_block_with_wrong_arity_names_the_block():
    m = iternn.BlockMap({"a": 3, "b": 3, "c": 3})
    with pytest.raises(MapError, match=r"block 'c' <- \('a', 'b'\).*module failed"):
        m.connect("c", ("a", "b"), nn.Linear(3, 3))


def test_multi_source_names_unknown_slot():
    m = iternn.BlockMap({"a": 3, "c": 3})
    with pytest.raises(MapError, match="unknown source slot 'zz'"):
        m.connect("c", ("a", "zz"), Product())
    with pytest.raises(MapError, match="at least one source"):
        m.connect("c", (), Product())


def test_bias_must_have_the_slot_shape():
    m = iternn.BlockMap({"h": (2, 3)})
    with pytest.raises(MapError, match=r"bias of slot 'h' must have shape \(2, 3\)"):
        m.set_bias("h", torch.zeros(6))
    m.set_bias("h", True)
    assert m.bias("h").shape == (2, 3)


def test_structure_counts_every_source():
    m = _conv_map()
    assert m.sources("g") == ("h",)
    assert m.edges[2] == ("g", ("h", "h"))
    assert "g<-h,h" in dict(m.named_children())["blocks"]
    m2 = iternn.BlockMap({"x": 2, "a": 2, "b": 2, "y": 2})
    m2.connect("a", "x", nn.Linear(2, 2))
    m2.connect("b", "a", nn.Linear(2, 2))
    m2.connect("y", ("x", "b"), Product())
    assert m2.sources("y") == ("x", "b")
    assert m2.graph().sources("y") == ("x", "b")
    assert m2.impulse_response_length() == 3  # x -> a -> b -> y
    assert m2.impulse_response_length(hold=("x",)) == float("inf")
    assert m2.block("y", ("x", "b")) is m2.blocks["y<-x,b"]
    m2.disconnect("y", ["x", "b"])
    assert m2.impulse_response_length() == 2


def test_pack_is_row_major_and_unpack_inverts_it():
    m = iternn.BlockMap({"a": (2, 3), "b": 4})
    a = torch.arange(2 * 2 * 3.0).reshape(2, 2, 3)
    b = torch.arange(8.0).reshape(2, 4) + 100
    flat = m.pack({"a": a, "b": b})
    assert flat.shape == (2, 10)
    assert torch.equal(flat[:, :6], a.reshape(2, 6))
    back = m.unpack(flat)
    assert back["a"].shape == (2, 2, 3) and torch.equal(back["a"], a) and torch.equal(back["b"], b)


def test_state_with_wrong_trailing_shape_names_the_slot():
    m = _conv_map()
    with pytest.raises(MapError, match=r"slot 'x' must have shape \(\*batch, 2, 5, 5\)"):
        iternn.iterate(m, {"x": torch.zeros(4, 2, 5, 4, dtype=torch.float64)}, 1)
    with pytest.raises(MapError, match="slot 'h' has batch shape"):
        iternn.iterate(m, {"x": torch.zeros(4, 2, 5, 5, dtype=torch.float64),
                           "h": torch.zeros(3, 3, 5, 5, dtype=torch.float64)}, 1)


def _state(m, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(*batch, *shape, generator=g, dtype=torch.float64)
            for s, shape in m.shapes.items()}


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("batch", [(3,), (2, 3), ()])
@pytest.mark.parametrize("update", ["jacobi", "ordered"])
@pytest.mark.parametrize("trajectory", [False, True])
def test_shaped_map_iterates_like_the_reference(batch, update, trajectory):
    m = _conv_map()
    state = _state(m, batch, 1)
    got = iternn.iterate(m, state, 4, hold=["x"], trajectory=trajectory, update=update)
    want = reference_iterate(m, state, 4, hold=["x"], trajectory=trajectory, update=update)
    _assert_close(got, want)


@pytest.mark.parametrize("batch", [(3,), (2, 3)])
@pytest.mark.parametrize("update", ["jacobi", "ordered"])
@pytest.mark.parametrize("inner", [1, 2])
def test_forced_shaped_map_matches_the_reference(batch, update, inner):
    m = _conv_map()
    g = torch.Generator().manual_seed(2)
    force = {"x": torch.randn(5, *batch, 2, 5, 5, generator=g, dtype=torch.float64)}
    state = _state(m, batch, 3)
    got = iternn.iterate(m, state, 5, force=force, inner=inner, trajectory=True, update=update)
    want = reference_iterate(m, state, 5, force=force, inner=inner, trajectory=True, update=update)
    _assert_close(got, want)


def test_forced_conv_is_batched_over_time_in_one_call():
    m = _conv_map()
    calls = []
    m.block("h", "x").register_forward_hook(lambda mod, i, o: calls.append(i[0].shape))
    hooked = iternn.iterate(m, {}, 5, force={"x": torch.randn(5, 3, 2, 5, 5, dtype=torch.float64)})
    assert len(calls) == 5  # a hooked module is called step by step
    m2 = _conv_map()
    conv = m2.block("h", "x")
    seen = []
    m2.disconnect("h", "x")

    class Spy(nn.Conv2d):
        samplewise = True

        def forward(self, z):
            seen.append(tuple(z.shape))
            return super().forward(z)

    spy = Spy(2, 3, 3, padding=1).double()
    spy.load_state_dict(conv.state_dict())
    m2.connect("h", "x", spy)
    m2.connect("y", "x", nn.Sequential(nn.Flatten(), nn.Linear(50, 4)).double())
    seen.clear()
    x = torch.randn(5, 3, 2, 5, 5, dtype=torch.float64)
    out = iternn.iterate(m2, {}, 5, force={"x": x}, trajectory=True)
    assert seen == [(15, 2, 5, 5)]  # (T * B, C, H, W): one call for the whole sequence
    assert out["h"].shape == (5, 3, 3, 5, 5)
    assert set(hooked) == set(m.slots)


def test_gradients_through_shaped_and_multi_source_blocks():
    m = _conv_map()
    state = _state(m, (2,), 4)
    state = {k: v.requires_grad_() for k, v in state.items()}
    leaves = list(state.values()) + list(m.parameters())
    got = iternn.iterate(m, state, 3, hold=["x"], update="ordered")
    want = reference_iterate(m, state, 3, hold=["x"], update="ordered")
    g1 = torch.autograd.grad(sum((v ** 2).sum() for v in got.values()), leaves, allow_unused=True)
    g2 = torch.autograd.grad(sum((v ** 2).sum() for v in want.values()), leaves, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_map_module_on_a_shaped_input():
    m = _conv_map()
    m.disconnect("h", "h")
    net = iternn.MapModule(m, input="x", output="y")
    assert net.steps == 3 and not hasattr(net, "in_features")
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    zeros = {s: torch.zeros(4, *shape, dtype=torch.float64) for s, shape in m.shapes.items()}
    want = reference_iterate(m, {**zeros, "x": x}, 3, hold=["x"])["y"]
    torch.testing.assert_close(net(x), want, atol=1e-12, rtol=0)
    with pytest.raises(MapError, match=r"input slot 'x' needs shape \(\*batch, 2, 5, 5\)"):
        net(torch.zeros(4, 50, dtype=torch.float64))


def test_wavefront_follows_slot_order_for_random_draws():
    """Two dropout branches: the wavefront draws in slot order, as the source does."""
    m = iternn.BlockMap({"x": 6, "a": 6, "b": 6, "c": 6, "y": 6})
    m.connect("a", "x", nn.Identity())
    m.connect("b", "a", nn.Identity())
    m.connect("c", "x", nn.Identity())
    m.connect("y", "b", nn.Identity())
    m.connect("y", "c", nn.Identity())
    for s in ("a", "b", "c"):
        m.set_activation(s, nn.Dropout(0.5))
    m.train()
    x = torch.ones(3, 6)
    torch.manual_seed(7)
    got = iternn.iterate(m, {"x": x}, 3, hold=["x"])["y"]
    torch.manual_seed(7)
    a = nn.functional.dropout(x, 0.5)
    b = nn.functional.dropout(a, 0.5)  # b comes before c in slot order
    c = nn.functional.dropout(x, 0.5)
    assert torch.equal(got, b + c)


def test_save_load_round_trip_of_a_shaped_multi_source_map(tmp_path):
    m = _conv_map()
    m.block("g", ("h", "h"))
    path = tmp_path / "m.safetensors"
    iternn.io.register_codec(GatedConv, "tests.GatedConv",
                             lambda mod, enc: {"c": mod.conv.in_channels},
                             lambda cfg, dec: GatedConv(cfg["c"]).double(), replace=True)
    try:
        iternn.save(m, path)
        back = iternn.load(path)
    finally:
        iternn.io.unregister_codec(GatedConv)
    assert dict(back.shapes) == dict(m.shapes) and back.edges == m.edges
    state = _state(m, (2,), 5)
    _assert_close(iternn.iterate(back, state, 3, hold=["x"]), iternn.iterate(m, state, 3, hold=["x"]))


def test_summary_of_a_shaped_map():
    m = _conv_map()
    s = m.summary()
    assert s.block("g", ("h", "h")).shape == (75, 150)
    assert dict(s.shapes)["x"] == (2, 5, 5)
    text = str(s)
    assert "2x5x5" in text and "g <- h,h" in text


@st.composite
def _shaped_maps(draw):
    """Random maps over (C, L) slots: Conv1d blocks, product blocks, any cycles."""
    n = draw(st.integers(2, 4))
    chans = [draw(st.integers(1, 3)) for _ in range(n)]
    length = draw(st.integers(2, 5))
    names = [f"s{i}" for i in range(n)]
    m = iternn.BlockMap({s: (c, length) for s, c in zip(names, chans)})
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pairs = [(d, s) for d in range(n) for s in range(n)]
    for d, s in draw(st.lists(st.sampled_from(pairs), unique=True, max_size=6)):
        conv = nn.Conv1d(chans[s], chans[d], 3, padding=1, bias=draw(st.booleans()))
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        m.connect(names[d], names[s], conv)
    for d in range(n):
        same = [s for s in range(n) if chans[s] == chans[d]]
        if len(same) >= 2 and draw(st.booleans()):
            a, b = draw(st.sampled_from(same)), draw(st.sampled_from(same))
            if (names[d], (names[a], names[b])) not in m.edges:
                m.connect(names[d], (names[a], names[b]), Product())
        if draw(st.booleans()):
            m.set_activation(names[d], nn.Tanh())
    return m.double()


@settings(max_examples=40, deadline=None)
@given(m=_shaped_maps(), steps=st.integers(1, 4), forced=st.booleans(),
       update=st.sampled_from(["jacobi", "ordered"]), trajectory=st.booleans(),
       batch=st.sampled_from([(2,), (2, 2)]))
def test_random_shaped_maps_match_the_reference(m, steps, forced, update, trajectory, batch):
    names = list(m.slots)
    state = _state(m, batch, 6)
    force = None
    if forced:
        g = torch.Generator().manual_seed(8)
        force = {names[0]: torch.randn(steps, *batch, *m.shapes[names[0]], generator=g,
                                       dtype=torch.float64)}
    hold = [] if forced else [names[0]]
    got = iternn.iterate(m, state, steps, hold=hold, force=force, trajectory=trajectory,
                         update=update)
    want = reference_iterate(m, state, steps, hold=hold, force=force, trajectory=trajectory,
                             update=update)
    _assert_close(got, want)


_LAYERS = [
    ((2, 6, 6), (3, 6, 6), lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect")),
    ((2, 6, 6), (3, 3, 3), lambda: nn.Conv2d(2, 3, (2, 2), stride=2, bias=False)),
    ((2, 7), (4, 7), lambda: nn.Conv1d(2, 4, 3, padding=2, dilation=2, groups=2)),
    ((2, 3, 3), (3, 7, 7), lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=0)),
    ((2, 5), (2, 12), lambda: nn.ConvTranspose1d(2, 2, 3, stride=2, output_padding=1)),
    ((3, 4, 4), (3, 4, 4), lambda: nn.BatchNorm2d(3, momentum=None)),
    ((3, 5), (3, 5), lambda: nn.BatchNorm1d(3, affine=False, eps=1e-3)),
    ((4, 3, 3), (4, 3, 3), lambda: nn.GroupNorm(2, 4)),
    ((2, 6, 6), (2, 3, 3), lambda: nn.MaxPool2d(2)),
    ((2, 7), (2, 3), lambda: nn.MaxPool1d(3, stride=2, ceil_mode=False)),
    ((2, 6, 6), (2, 3, 3), lambda: nn.AvgPool2d(2, divisor_override=3)),
    ((2, 7), (2, 4), lambda: nn.AvgPool1d(2, stride=2, padding=1, count_include_pad=False)),
    ((2, 6, 6), (2, 1, 1), lambda: nn.AdaptiveAvgPool2d(1)),
    ((2, 6), (2, 3), lambda: nn.AdaptiveMaxPool1d(3)),
    ((2, 3, 3), (18,), lambda: nn.Flatten()),
    ((18,), (2, 3, 3), lambda: nn.Unflatten(1, (2, 3, 3))),
    ((2, 4, 4), (2, 4, 4), lambda: nn.Dropout2d(0.3)),
    ((2, 4), (2, 4), lambda: nn.Softmax(dim=-1)),
]


@pytest.mark.parametrize("src, dst, make", _LAYERS)
def test_torch_layer_blocks_save_and_load(src, dst, make, tmp_path):
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": src, "y": dst})
    m.connect("y", "x", make())
    m = m.double().eval()
    back = iternn.load(iternn.save(m, tmp_path / "m.safetensors") or tmp_path / "m.safetensors")
    a, b = m.block("y", "x"), back.block("y", "x")
    assert type(a) is type(b) and a.extra_repr() == b.extra_repr()
    x = torch.randn(2, *src, dtype=torch.float64)
    torch.testing.assert_close(iternn.iterate(back, {"x": x}, 1, hold=["x"])["y"],
                               iternn.iterate(m, {"x": x}, 1, hold=["x"])["y"], atol=0, rtol=0)
