"""iterate() equals step-by-step application, for every plan the engine picks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from maps import random_maps, random_state, reference_iterate
from torch import nn

import iternn


def _assert_close(a: dict, b: dict, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@given(
    m=random_maps(),
    steps=st.integers(0, 6),
    hold_mask=st.integers(0, 15),
    trajectory=st.booleans(),
    update=st.sampled_from(["jacobi", "ordered"]),
    partial=st.booleans(),
)
def test_unforced_matches_reference(m, steps, hold_mask, trajectory, update, partial):
    names = list(m.slots)
    hold = [s for i, s in enumerate(names) if hold_mask >> i & 1]
    state = random_state(m, seed=steps)
    if partial:  # slots left out start at zero
        state = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    full = {s: state.get(s, torch.zeros(3, n, dtype=torch.float64)) for s, n in m.slots.items()}
    got = iternn.iterate(m, state, steps, hold=hold, trajectory=trajectory, update=update)
    if steps == 0 and trajectory:
        assert all(v.shape[0] == 0 for v in got.values())
        return
    want = reference_iterate(m, full, steps, hold=hold, trajectory=trajectory, update=update)
    _assert_close(got, want)


@given(
    m=random_maps(),
    steps=st.integers(1, 5),
    n_forced=st.integers(1, 2),
    inner=st.integers(1, 3),
    trajectory=st.booleans(),
    update=st.sampled_from(["jacobi", "ordered"]),
    hold_last=st.booleans(),
)
def test_forced_matches_reference(m, steps, n_forced, inner, trajectory, update, hold_last):
    names = list(m.slots)
    forced = names[:n_forced]
    hold = [names[-1]] if hold_last and names[-1] not in forced else []
    g = torch.Generator().manual_seed(steps * 7 + inner)
    force = {s: torch.randn(steps, 2, m.slots[s], generator=g, dtype=torch.float64) for s in forced}
    state = random_state(m, batch=(2,), seed=3)
    got = iternn.iterate(m, state, steps, hold=hold, force=force, inner=inner,
                         trajectory=trajectory, update=update)
    want = reference_iterate(m, state, steps, hold=hold, force=force, inner=inner,
                             trajectory=trajectory, update=update)
    _assert_close(got, want)


@settings(max_examples=15)
@given(m=random_maps(), steps=st.integers(1, 5), forced=st.booleans())
def test_gradients_match_reference(m, steps, forced):
    names = list(m.slots)
    state = random_state(m, seed=1, requires_grad=True)
    force = None
    if forced:
        g = torch.Generator().manual_seed(5)
        force = {names[0]: torch.randn(steps, 3, m.slots[names[0]], generator=g,
                                       dtype=torch.float64, requires_grad=True)}
    leaves = list(state.values()) + list(force.values() if force else []) + list(m.parameters())

    def loss(out):
        return sum((v * (i + 1)).sin().sum() for i, v in enumerate(out.values()))

    got_loss = loss(iternn.iterate(m, state, steps, force=force))
    want_loss = loss(reference_iterate(m, state, steps, force=force))
    assert torch.allclose(got_loss, want_loss, atol=1e-10, rtol=0)
    if not want_loss.requires_grad:  # the final state depends on nothing trainable
        assert not got_loss.requires_grad
        return
    got = torch.autograd.grad(got_loss, leaves, allow_unused=True)
    want = torch.autograd.grad(want_loss, leaves, allow_unused=True)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_gradcheck_through_all_plans():
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 2, "h": 3, "y": 2})
    m.connect("h", "x", nn.Linear(2, 3))
    m.connect("h", "h", nn.Linear(3, 3, bias=False))
    m.connect("y", "h", nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    m.connect("y", "x", nn.Linear(2, 2, bias=False))
    m.set_activation("h", nn.Tanh())
    m.set_bias("y")
    m.double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def forced(x, h0):
        return iternn.iterate(m, {"h": h0}, 4, force={"x": x}, trajectory=True)["y"]

    def stepped(x, h0):
        return iternn.iterate(m, {"x": x[0], "h": h0}, 4, hold=["x"])["y"]

    assert torch.autograd.gradcheck(forced, (x, h0))
    assert torch.autograd.gradcheck(stepped, (x, h0))


def test_acyclic_wavefront_is_fixed_point_after_depth():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    m = iternn.from_mlp(seq.double()).map
    x = torch.randn(6, 3, dtype=torch.float64)
    assert iternn.depth(m, ["x"]) == 3
    at_depth = iternn.iterate(m, {"x": x}, 3, hold=["x"])
    for extra in (4, 7):
        _assert_close(iternn.iterate(m, {"x": x}, extra, hold=["x"]), at_depth, tol=0)
    # one more application by hand changes nothing either: a fixed point
    again = m(at_depth)
    again["x"] = x
    _assert_close(again, at_depth, tol=0)


def test_ordered_update_finishes_acyclic_map_in_one_application():
    torch.manual_seed(1)
    net = iternn.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
    x = torch.randn(2, 3, dtype=torch.float64)
    one = iternn.iterate(net.map, {"x": x}, 1, hold=["x"], update="ordered")
    assert torch.allclose(one["y"], net(x), atol=0)
    jac = iternn.iterate(net.map, {"x": x}, 1, hold=["x"])
    assert not torch.allclose(jac["y"], net(x))


def test_batch_dims_any_rank():
    torch.manual_seed(2)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", nn.Linear(2, 3))
    m.connect("h", "h", nn.Linear(3, 3))
    m.set_activation("h", nn.Tanh())
    m.double()
    xs = torch.randn(5, 2, 4, 2, dtype=torch.float64)  # time, batch (2, 4), features
    got = iternn.iterate(m, {}, 5, force={"x": xs}, trajectory=True)
    want = reference_iterate(m, {"x": xs[0], "h": torch.zeros(2, 4, 3, dtype=torch.float64)},
                             5, force={"x": xs}, trajectory=True)
    _assert_close(got, want)
    assert got["h"].shape == (5, 2, 4, 3)


def test_block_kwargs_reach_the_block():
    class Scale(nn.Module):
        in_features = out_features = 2

        def forward(self, z, factor=1.0):
            return z * factor

    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", Scale())
    x = torch.ones(1, 2)
    out = iternn.iterate(m, {"x": x}, 1, hold=["x"], block_kwargs={"y<-x": {"factor": 3.0}})
    assert torch.equal(out["y"], 3 * x)


def test_caller_tensors_not_mutated():
    torch.manual_seed(3)
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    m.connect("h", "h", nn.Linear(2, 2))
    m.set_activation("h", nn.ReLU())
    state = {"x": torch.randn(3, 2), "h": torch.randn(3, 2)}
    xs = torch.randn(4, 3, 2)
    copies = {k: v.clone() for k, v in state.items()}
    versions = {k: v._version for k, v in state.items()}
    xs_copy = xs.clone()
    for kwargs in ({}, {"force": {"x": xs}}, {"hold": ["x"]}):
        iternn.iterate(m, state, 4, trajectory=True, **kwargs)
        iternn.iterate(m, state, 4, **kwargs)
    for k in state:
        assert torch.equal(state[k], copies[k]) and state[k]._version == versions[k]
    assert torch.equal(xs, xs_copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_dtype_follows_input(dtype):
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    m.connect("h", "h", nn.Linear(2, 2))
    m.to(dtype)
    out = iternn.iterate(m, {"x": torch.ones(1, 2, dtype=dtype)}, 3)
    assert all(v.dtype == dtype for v in out.values())
    traj = iternn.iterate(m, {}, 3, force={"x": torch.ones(3, 1, 2, dtype=dtype)}, trajectory=True)
    assert all(v.dtype == dtype for v in traj.values())


def test_depth_is_infinite_with_cycle():
    m = iternn.BlockMap({"a": 1})
    m.connect("a", "a", nn.Linear(1, 1))
    assert math.isinf(iternn.depth(m))
    assert iternn.depth(m, ["a"]) == 0


def test_trajectory_of_sequence_first_opaque_blocks_is_not_folded():
    """Opaque blocks may read leading dims as more than a batch (a seq-first transformer
    layer does): the sequence plan must call them per application, with the real batch."""
    from iternn.convert.transformer import from_transformer

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval().double()
    net = from_transformer(enc)
    src = torch.randn(3, 4, 8, dtype=torch.float64)  # (seq, batch, d): seq-first
    pad = torch.zeros(4, 3, dtype=torch.bool)
    pad[1, 2] = True
    kw = {k: {"src_key_padding_mask": pad} for k in net.map.blocks}
    final = iternn.iterate(net.map, {"x": src}, 2, hold=["x"], block_kwargs=kw)
    traj = iternn.iterate(net.map, {"x": src}, 2, hold=["x"], block_kwargs=kw, trajectory=True)
    assert torch.allclose(traj["l2"][-1], final["l2"], atol=1e-12)
    assert torch.allclose(final["l2"], enc(src, src_key_padding_mask=pad), atol=1e-10)


def test_dtype_check_follows_map_conversion():
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    iternn.iterate(m, {"x": torch.ones(1, 2)}, 1)
    m.double()
    out = iternn.iterate(m, {"x": torch.ones(1, 2, dtype=torch.float64)}, 1)
    assert out["h"].dtype == torch.float64
    with pytest.raises(iternn.MapTypeError, match="float32"):
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 1)


@pytest.mark.parametrize("act", [None, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.ELU])
def test_inference_recurrence_equals_autograd_path(act):
    """Under no_grad the recurrent loop writes in place into its own buffer; it must give
    the same numbers as the autograd path and leave the caller's tensors alone."""
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 3, "h": 5, "y": 2})
    m.connect("h", "x", nn.Linear(3, 5))
    m.connect("h", "h", nn.Linear(5, 5))
    m.connect("y", "h", nn.Linear(5, 2))
    m.set_activation("h", act() if act else None)
    m.double()
    xs = torch.randn(6, 4, 3, dtype=torch.float64)
    h0 = torch.randn(4, 5, dtype=torch.float64)
    x_copy, h_copy = xs.clone(), h0.clone()
    want = iternn.iterate(m, {"h": h0}, 6, force={"x": xs}, trajectory=True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got = iternn.iterate(m, {"h": h0}, 6, force={"x": xs}, trajectory=True)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-12, rtol=0), k
    assert torch.equal(xs, x_copy) and torch.equal(h0, h_copy)


# ------------------------------------------------------------------ review regressions
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("update", ["jacobi", "ordered"])
def test_identity_fed_recurrence_leaves_caller_and_other_slots_alone(grad, update):
    """An identity block hands the caller's tensor on: the no-grad recurrence must not
    write into it (nor into another slot's trajectory)."""
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 3, "u": 3, "h": 3})
    m.connect("u", "x", nn.Identity())
    m.connect("h", "u", nn.Identity())
    m.connect("h", "h", nn.Linear(3, 3, bias=False))
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(5, 2, 3)
    xs_copy = xs.clone()
    want = reference_iterate(m, {s: torch.zeros(2, 3) for s in m.slots}, 5,
                             force={"x": xs}, trajectory=True, update=update)
    with torch.set_grad_enabled(grad):
        got = iternn.iterate(m, {}, 5, force={"x": xs}, trajectory=True, update=update)
    assert torch.equal(xs, xs_copy)
    _assert_close(got, want, tol=1e-6)


def test_bias_only_source_feeding_a_recurrence_under_no_grad():
    m = iternn.BlockMap({"x": 2, "u": 2, "h": 2})
    m.set_bias("u", torch.tensor([0.5, -0.5]))
    m.connect("h", "u", nn.Identity())
    m.connect("h", "h", nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        got = iternn.iterate(m, {}, 3, force={"x": torch.zeros(3, 1, 2)}, trajectory=True,
                             update="ordered")
    want = reference_iterate(m, {s: torch.zeros(1, 2) for s in m.slots}, 3,
                             force={"x": torch.zeros(3, 1, 2)}, trajectory=True, update="ordered")
    _assert_close(got, want, tol=1e-6)
    assert torch.equal(m.bias("u"), torch.tensor([0.5, -0.5]))


def test_in_place_activation_and_block_do_not_touch_caller_or_bias():
    m = iternn.BlockMap({"x": 3, "y": 3, "b": 3})
    m.connect("y", "x", nn.ReLU(inplace=True))  # stored out of place
    m.set_activation("y", nn.ReLU(inplace=True))
    m.set_bias("b", torch.tensor([-1.0, 2.0, -3.0]))
    m.set_activation("b", nn.ReLU(inplace=True))
    x = torch.tensor([[-1.0, 2.0, -3.0]])
    full = {"x": x, "y": torch.zeros(1, 3), "b": torch.zeros(1, 3)}
    with torch.no_grad():
        one = m(full)
        out = iternn.iterate(m, {"x": x}, 2, hold=["x"])
    assert torch.equal(x, torch.tensor([[-1.0, 2.0, -3.0]]))
    assert torch.equal(m.bias("b"), torch.tensor([-1.0, 2.0, -3.0]))
    assert torch.equal(one["y"], torch.tensor([[0.0, 2.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([[0.0, 2.0, 0.0]]))


def test_ordered_update_on_slots_declared_out_of_dependency_order():
    torch.manual_seed(0)
    m = iternn.BlockMap({"y": 2, "h": 3, "x": 2})
    m.connect("h", "x", nn.Linear(2, 3))
    m.connect("y", "h", nn.Linear(3, 2))
    m.set_activation("h", nn.Tanh())
    x = torch.randn(4, 2)
    got = iternn.iterate(m, {"x": x}, 1, hold=["x"], update="ordered")
    want = m.block("y", "h")(torch.tanh(m.block("h", "x")(x)))
    assert torch.allclose(got["y"], want, atol=1e-6)
    traj = iternn.iterate(m, {"x": x}, 1, hold=["x"], update="ordered", trajectory=True)
    assert torch.equal(traj["y"][-1], got["y"])
    assert list(traj) == ["y", "h", "x"]  # slot order


def test_pruned_linear_block_is_called_with_its_hooks():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = iternn.from_mlp(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)))
    x = torch.randn(3, 4)
    net(x)  # the plan is built before pruning
    block = net.map.block("h1", "x")
    prune.random_unstructured(block, "weight", amount=0.5)
    want = nn.functional.linear(torch.tanh(nn.functional.linear(x, block.weight) + net.map.bias("h1")),
                                net.map.block("y", "h1").weight, net.map.bias("y"))
    assert torch.allclose(net(x), want, atol=1e-6)
    m = iternn.BlockMap({"h": 3})
    lin = m.connect("h", "h", nn.Linear(3, 3))
    prune.l1_unstructured(lin, "weight", amount=0.4)
    h0 = torch.randn(2, 3)
    _assert_close(iternn.iterate(m, {"h": h0}, 3), reference_iterate(m, {"h": h0}, 3), tol=1e-6)


def test_steps_zero_with_empty_forced_sequence():
    m = iternn.BlockMap({"x": 2, "h": 2})
    out = iternn.iterate(m, {}, 0, force={"x": torch.zeros(0, 3, 2)})
    assert out["h"].shape == (3, 2) and torch.equal(out["h"], torch.zeros(3, 2))


def test_inner_with_empty_force_is_an_error():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="inner"):
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 2, inner=3, force={})


def test_block_kwargs_reach_a_linear_block_and_forward_checks_keys():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    with pytest.raises(TypeError):  # nn.Linear takes no keyword arguments: not dropped
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 1, hold=["x"], block_kwargs={"y<-x": {"a": 1}})
    with pytest.raises(iternn.MapError, match="y<-q"):
        m({"x": torch.ones(1, 2), "y": torch.ones(1, 2)}, **{"y<-q": {}})


def test_forward_mode_through_the_inference_recurrence():
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", nn.Linear(2, 3))
    m.connect("h", "h", nn.Linear(3, 3))
    m.set_activation("h", nn.Tanh())
    xs, h0 = torch.randn(5, 4, 2), torch.zeros(4, 3)

    def f(h):
        return iternn.iterate(m, {"h": h}, 5, force={"x": xs}, trajectory=True)["h"]

    _, want = torch.func.jvp(f, (h0,), (torch.ones_like(h0),))
    with torch.no_grad():
        _, got = torch.func.jvp(f, (h0,), (torch.ones_like(h0),))
    assert torch.allclose(got, want, atol=1e-6)


def test_sparse_blocks_are_batched_over_a_forced_sequence():
    from iternn.core.rowwise import is_rowwise
    from iternn.sparse import DiagonalLinear

    g = torch.Generator().manual_seed(0)
    m = iternn.BlockMap({"x": 5, "h": 4})
    m.connect("h", "x", iternn.SparseLinear(5, 4, density=0.5, generator=g))
    m.connect("h", "h", DiagonalLinear(4))
    m.set_activation("h", nn.Tanh())
    m.double()
    assert is_rowwise(m.block("h", "x")) and is_rowwise(m.block("h", "h"))
    xs = torch.randn(6, 3, 5, dtype=torch.float64)
    got = iternn.iterate(m, {}, 6, force={"x": xs}, trajectory=True)
    want = reference_iterate(m, {"x": xs[0], "h": torch.zeros(3, 4, dtype=torch.float64)}, 6,
                             force={"x": xs}, trajectory=True)
    _assert_close(got, want)


# ---------------------------------------------------------------- sizes checked first
def _rnn_like(n_h: int) -> iternn.BlockMap:
    m = iternn.BlockMap({"x": 3, "h": n_h})
    m.connect("h", "x", nn.Linear(3, n_h))
    m.connect("h", "h", nn.Linear(n_h, n_h))
    m.set_activation("h", nn.Tanh())
    return m


def test_zero_fill_of_a_huge_slot_is_refused_before_allocating():
    m = iternn.BlockMap({"x": 3, "h": 10**12})  # 16 TB of zeros for a batch of 4
    with pytest.raises(iternn.SizeError, match=r"state: slot 'h' \(shape \(4, 1000000000000\)\)"):
        iternn.iterate(m, {"x": torch.zeros(4, 3)}, 1)
    with pytest.raises(MemoryError):  # a SizeError is a MemoryError
        iternn.iterate(m, {"x": torch.zeros(4, 3)}, 1, hold=["x"])


@pytest.fixture
def machine_of_16_gb(monkeypatch):
    """What is available, fixed: the refusals below hold on any machine."""
    import iternn.core.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 16 * 10**9)


@pytest.mark.parametrize("cyclic", [False, True])
def test_a_billion_step_trajectory_is_refused_before_anything_is_built(cyclic, machine_of_16_gb):
    # 10**9 x batch 2 x 50 float32 = 400 GB; the cyclic map used to build a 10**9-element
    # tuple of its constant drive before failing.
    m = iternn.BlockMap({"x": 3, "h": 50})
    m.connect("h", "x", nn.Linear(3, 50))
    if cyclic:
        m.connect("h", "h", nn.Linear(50, 50))
    with pytest.raises(iternn.SizeError, match=r"steps=1000000000 .*\['h'\].*\(1000000000, 2, 50\)"):
        iternn.iterate(m, {"x": torch.zeros(2, 3)}, 10**9, hold=["x"], trajectory=True)


def test_a_forced_billion_step_run_is_refused_before_anything_is_built(machine_of_16_gb):
    m = _rnn_like(50)
    xs = torch.zeros(1, 2, 3).expand(10**9, 2, 3)  # a view: no memory behind it
    with pytest.raises(iternn.SizeError, match="steps=1000000000"):
        iternn.iterate(m, {}, 10**9, force={"x": xs})


def test_the_estimate_is_exact_at_the_boundary(monkeypatch):
    # The state's new slot 'h' (batch 4 x 100, float64): 3200 bytes; a trajectory of 5
    # steps of it: 16000 bytes. Allowed at exactly that much, refused one byte less.
    import iternn.core.memory as memory

    m = _rnn_like(100).double()
    x = torch.zeros(4, 3, dtype=torch.float64)
    monkeypatch.setattr(memory, "ALWAYS_AVAILABLE", 0)  # check even these small sizes
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 3199)
    with pytest.raises(iternn.SizeError, match="slot 'h'.*3.2 KB.*3.2 KB"):
        iternn.iterate(m, {"x": x}, 1, hold=["x"])
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 3200)
    assert iternn.iterate(m, {"x": x}, 1, hold=["x"])["h"].shape == (4, 100)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 15999)
    with pytest.raises(iternn.SizeError, match=r"steps=5 .*\(5, 4, 100\)"):
        iternn.iterate(m, {"x": x}, 5, hold=["x"], trajectory=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 16000)
    assert iternn.iterate(m, {"x": x}, 5, hold=["x"], trajectory=True)["h"].shape == (5, 4, 100)


def test_plans_are_reached_through_the_public_plan_functions_only():
    # The engine's cache key layout (_plan) stays private: other layers use
    # wavefront_plan / sequence_plan / step_plan.
    import pathlib
    import re

    src = pathlib.Path(iternn.__file__).parent
    private = re.compile(r"\b_plan\b")
    users = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
             if p.name != "iterate.py" and private.search(p.read_text())]
    assert users == []
    m = _rnn_like(4)
    assert iternn.engine.step_plan(m) is iternn.engine.step_plan(m)  # cached
    assert iternn.engine.wavefront_plan(m) is None  # the self-loop is a cycle


def test_small_requests_do_not_read_the_machine(monkeypatch):
    # Reading what is available costs ~0.1 ms; an ordinary iteration must not pay it.
    import iternn.core.memory as memory

    def unavailable(device=None):
        raise AssertionError("available_bytes was read for a small request")

    monkeypatch.setattr(memory, "available_bytes", unavailable)
    m = _rnn_like(8)
    xs = torch.zeros(5, 2, 3)
    assert iternn.iterate(m, {}, 5, force={"x": xs}, trajectory=True)["h"].shape == (5, 2, 8)
    assert iternn.iterate(m, {"x": xs[0]}, 3, hold=["x"])["h"].shape == (2, 8)


@pytest.mark.parametrize("forced", [False, True])
def test_ordered_update_is_gauss_seidel_inside_a_cycle(forced):
    """Inside a cycle the ordered sweep goes slot by slot in slot order: ``b`` reads the
    ``a`` of the same application (an LSTM's cell reads the gates of the same step)."""
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 2, "a": 3, "b": 3}).double()
    m.connect("a", "x", nn.Linear(2, 3).double())
    m.connect("a", "b", nn.Linear(3, 3).double())
    m.connect("b", "a", nn.Linear(3, 3).double())
    m.set_activation("a", nn.Tanh())
    xs = torch.randn(4, 5, 2, dtype=torch.float64)
    b0 = torch.randn(5, 3, dtype=torch.float64)
    a_in, a_rec, b_in = m.block("a", "x"), m.block("a", "b"), m.block("b", "a")
    b, want_a, want_b = b0, [], []
    for x in xs:
        a = torch.tanh(a_in(x) + a_rec(b))
        b = b_in(a)  # the new a, not the old one
        want_a.append(a)
        want_b.append(b)
    if forced:
        got = iternn.iterate(m, {"b": b0}, 4, force={"x": xs}, trajectory=True, update="ordered")
    else:
        steps = [iternn.iterate(m, {"x": xs[0], "b": b0}, 1, hold=["x"], update="ordered")]
        for x in xs[1:]:
            steps.append(iternn.iterate(m, {**steps[-1], "x": x}, 1, hold=["x"], update="ordered"))
        got = {s: torch.stack([st_[s] for st_ in steps]) for s in ("a", "b")}
    assert torch.allclose(got["a"], torch.stack(want_a), atol=1e-12, rtol=0)
    assert torch.allclose(got["b"], torch.stack(want_b), atol=1e-12, rtol=0)


def test_wavefront_with_keep_drops_what_nobody_reads_afterwards():
    import gc
    import weakref

    torch.manual_seed(0)
    m = iternn.BlockMap({"x": 3, "a": 4, "b": 4, "c": 4, "y": 2})
    m.connect("a", "x", nn.Linear(3, 4))
    m.connect("b", "a", nn.Linear(4, 4))
    m.connect("c", "b", nn.Linear(4, 4))
    m.connect("y", "c", nn.Linear(4, 2))
    m.connect("y", "b", nn.Linear(4, 2))  # b is read twice: it lives until y is computed
    m.set_activation("b", nn.Tanh())
    wave = iternn.engine.wavefront_plan(m, frozen=frozenset({"x"}))
    x = torch.randn(5, 3)
    refs, alive = {}, {}
    m.block("b", "a").register_forward_pre_hook(lambda mod, args: refs.update(a=weakref.ref(args[0])))

    def check(mod, args):
        gc.collect()
        alive["a"] = refs["a"]() is not None

    m.block("y", "b").register_forward_pre_hook(check)
    with torch.no_grad():
        full = wave({"x": x}, None, x, (5,))
        assert alive == {"a": True}  # the full state keeps every slot
        out = wave({"x": x}, None, x, (5,), keep=frozenset({"y"}))
    assert alive == {"a": False}  # a's last reader (b) had run: its value was gone
    assert set(out) == {"x", "y"}
    assert torch.equal(out["y"], full["y"])


def test_linear_drives_reading_one_sequence_are_one_product():
    """Plain-linear blocks from one forced slot into several slots of a cycle are
    evaluated as one matmul over the sequence (weights and biases stacked), with the same
    values and gradients as the step-by-step reference, in both updates."""
    from torch.overrides import TorchFunctionMode

    g = torch.Generator().manual_seed(3)
    m = iternn.BlockMap({"x": 3, "u": 2, "a": 4, "b": 2, "c": 5})
    for dst, bias in (("a", True), ("b", False), ("c", True)):
        m.connect(dst, "x", nn.Linear(3, m.slots[dst], bias=bias))
    for dst in ("a", "b"):  # a second shared source: these slots are in a product already
        m.connect(dst, "u", nn.Linear(2, m.slots[dst]))
    m.connect("b", "a", nn.Linear(4, 2))
    m.connect("c", "b", nn.Linear(2, 5, bias=False))
    m.connect("a", "c", nn.Linear(5, 4))
    m.set_bias("b", torch.randn(2, generator=g))
    m.set_activation("a", nn.Tanh())
    m.set_activation("c", nn.Sigmoid())
    m = m.double()
    xs = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    us = torch.randn(6, 2, 2, generator=g, dtype=torch.float64)

    class Linears(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.widths = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear and args[0].dim() == 3:
                self.widths.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    for update in ("jacobi", "ordered"):
        state = random_state(m, batch=(2,), seed=1)
        with Linears() as seen:
            got = iternn.iterate(m, state, 6, force={"x": xs, "u": us}, trajectory=True,
                                 update=update)
        # one product for the three drives from x; u's blocks are added to their parts
        assert seen.widths == [4 + 2 + 5, 4, 2]
        want = reference_iterate(m, state, 6, force={"x": xs, "u": us}, trajectory=True,
                                 update=update)
        for s in "abc":
            torch.testing.assert_close(got[s], want[s], rtol=1e-12, atol=1e-12)
        params = list(m.parameters())
        gg = torch.autograd.grad(sum(got[s].square().sum() for s in "abc"), params)
        gw = torch.autograd.grad(sum(want[s].square().sum() for s in "abc"), params)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
