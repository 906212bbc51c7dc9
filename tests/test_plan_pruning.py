"""Plans skip what is zero and what nobody reads, take product kernels and label the
profiler: the values and gradients stay those of applying the map step by step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from maps import random_maps, reference_iterate
from torch import nn

import iternn
from iternn.engine import plan

F64 = torch.float64


class Counted(nn.Module):
    """A linear block without bias (``linear = True``: it maps zero to zero) that counts
    its calls; several sources are concatenated. Row-wise: batched over sequences."""

    linear = True
    rowwise = True

    def __init__(self, n_in: int, n_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=g, dtype=F64) * 0.6)
        self.calls = 0

    def forward(self, *zs):
        self.calls += 1
        return torch.cat(zs, -1) @ self.weight.t()


class Gate(nn.Module):
    """``(a W) * sigmoid(b V)``: two sources, not declared linear (never skipped)."""

    def __init__(self, n_a: int, n_b: int, n_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_a, generator=g, dtype=F64))
        self.v = nn.Parameter(torch.randn(n_out, n_b, generator=g, dtype=F64))

    def forward(self, a, b):
        return (a @ self.w.t()) * torch.sigmoid(b @ self.v.t())


def _linear(n_in: int, n_out: int, g: torch.Generator, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=bias, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.7)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


BLOCKS = ["linear", "linear", "counted", "bias", "tanh", "sigmoid"]
ACTS = [None, nn.ReLU, nn.Tanh, nn.Sigmoid]


@st.composite
def cyclic_maps(draw, max_slots: int = 4):
    """A random float64 map with a cycle through its last slot: blocks that keep zero (Linear without bias,
    Linear + Tanh, declared-linear ones, a two-source linear block) and blocks that do not
    (a bias, Linear + Sigmoid, a gate), activations that keep zero and Sigmoid, biases."""
    n = draw(st.integers(2, max_slots))
    names = [f"s{i}" for i in range(n)]
    sizes = [draw(st.integers(1, 3)) for _ in names]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    m = iternn.BlockMap(dict(zip(names, sizes)))
    pairs = [(d, s) for d in range(n) for s in range(n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, min_size=1, max_size=2 * n))
    last = n - 1  # a self-loop on the last slot, or a cycle through the last two
    loop = draw(st.sampled_from([(last, last), (last, last - 1)]))
    for pair in (loop, (loop[1], loop[0])):
        if pair not in chosen:
            chosen.append(pair)
    for d, s in chosen:
        kind = draw(st.sampled_from(BLOCKS))
        if kind == "counted":
            m.connect(names[d], names[s], Counted(sizes[s], sizes[d], g))
            continue
        lin = _linear(sizes[s], sizes[d], g, bias=kind == "bias")
        block = {"tanh": nn.Sequential(lin, nn.Tanh()),
                 "sigmoid": nn.Sequential(lin, nn.Sigmoid())}.get(kind, lin)
        m.connect(names[d], names[s], block)
    if draw(st.booleans()):  # a block reading two slots
        d, a, b = (draw(st.integers(0, n - 1)) for _ in range(3))
        if a != b:
            if draw(st.booleans()):
                m.connect(names[d], (names[a], names[b]), Counted(sizes[a] + sizes[b], sizes[d], g))
            else:
                m.connect(names[d], (names[a], names[b]), Gate(sizes[a], sizes[b], sizes[d], g))
    for i, name in enumerate(names):
        act = draw(st.sampled_from(ACTS))
        m.set_activation(name, act() if act else None)
        if draw(st.integers(0, 2)) == 0:
            m.set_bias(name, torch.randn(sizes[i], generator=g, dtype=F64))
    return m.double()


def _subset(names, mask: int):
    return [s for i, s in enumerate(names) if mask >> i & 1]


def _loss(out: dict) -> torch.Tensor:
    return sum(((v * (i + 1)).sin().sum() for i, v in enumerate(out.values())),
               torch.zeros((), dtype=F64))


def _assert_same(got: dict, want: dict, leaves: list) -> None:
    """Equal values, and equal gradients of a loss of them (a missing gradient counts as
    zeros: then the other must be zero)."""
    assert list(got) == list(want)
    for s in got:
        assert got[s].shape == want[s].shape, s
        assert torch.allclose(got[s], want[s], atol=1e-10, rtol=0), (s, got[s], want[s])

    def grads(loss):
        if not loss.requires_grad:
            return [None] * len(leaves)
        return torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)

    for a, b in zip(grads(_loss(got)), grads(_loss(want))):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            assert torch.allclose(a, b, atol=1e-10, rtol=0)


def _state(m, mask: int, batch=(3,), seed=0):
    """Random values of the slots in ``mask`` (the others are left out), leaves."""
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(*batch, n, generator=g, dtype=F64).requires_grad_()
            for i, (s, n) in enumerate(m.slots.items()) if mask >> i & 1}


def _full(m, state, batch=(3,)):
    return {s: state[s] if s in state else torch.zeros(*batch, n, dtype=F64)
            for s, n in m.slots.items()}


# ---------------------------------------------------------------------------- equivalence
@settings(max_examples=120)
@given(
    m=cyclic_maps(),
    steps=st.integers(1, 4),
    given_mask=st.integers(0, 15),
    hold_mask=st.integers(0, 7),
    out_mask=st.integers(-1, 15),
    update=st.sampled_from(["jacobi", "ordered"]),
)
def test_unforced_iteration_equals_step_by_step(m, steps, given_mask, hold_mask, out_mask, update):
    names = list(m.slots)
    state = _state(m, given_mask % (1 << len(names)) or 1)  # at least one slot given
    hold = _subset(names[:-1], hold_mask)  # never the last slot: its cycle stays
    outputs = None if out_mask < 0 else _subset(names, out_mask)
    got = iternn.iterate(m, state, steps, hold=hold, update=update, outputs=outputs)
    want = reference_iterate(m, _full(m, state), steps, hold=hold, update=update)
    if outputs is not None:
        want = {s: want[s] for s in names if s in outputs}
    _assert_same(got, want, [*state.values(), *m.parameters()])


@settings(max_examples=80)
@given(
    m=cyclic_maps(),
    steps=st.integers(1, 4),
    given_mask=st.integers(0, 15),
    hold_second=st.booleans(),
    out_mask=st.integers(-1, 15),
    inner=st.integers(1, 2),
    trajectory=st.booleans(),
    update=st.sampled_from(["jacobi", "ordered"]),
)
def test_forced_iteration_equals_step_by_step(m, steps, given_mask, hold_second, out_mask, inner,
                                              trajectory, update):
    names = list(m.slots)
    g = torch.Generator().manual_seed(steps)
    force = {names[0]: torch.randn(steps, 2, m.slots[names[0]], generator=g, dtype=F64,
                                   requires_grad=True)}
    state = {s: v for s, v in _state(m, given_mask, batch=(2,)).items() if s != names[0]}
    hold = [names[1]] if hold_second and len(names) > 2 else []
    outputs = None if out_mask < 0 else _subset(names, out_mask)
    got = iternn.iterate(m, state, steps, hold=hold, force=force, inner=inner,
                         trajectory=trajectory, update=update, outputs=outputs)
    full = _full(m, state, batch=(2,))
    want = reference_iterate(m, full, steps, hold=hold, force=force, inner=inner,
                             trajectory=trajectory, update=update)
    if outputs is not None:
        want = {s: want[s] for s in names if s in outputs}
    _assert_same(got, want, [*state.values(), *force.values(), *m.parameters()])


# ---------------------------------------------------------------------------- skipping
def _six_block_map(act=nn.ReLU, biases=("h", "y")):
    """A small (x, h, y) map with the six blocks of the matched sparse map, counted."""
    g = torch.Generator().manual_seed(0)
    sizes = {"x": 3, "h": 5, "y": 2}
    m = iternn.BlockMap(sizes)
    for d, s in (("h", "x"), ("h", "h"), ("h", "y"), ("y", "x"), ("y", "h"), ("y", "y")):
        m.connect(d, s, Counted(sizes[s], sizes[d], g))
    for slot in biases:
        m.set_bias(slot, torch.randn(sizes[slot], generator=g, dtype=F64))
    m.set_activation("h", act() if act else None)
    return m.double()


def _calls(m) -> dict[str, int]:
    """Calls of each Counted block since the last look."""
    out = {k: b.calls for k, b in m.blocks.items() if isinstance(b, Counted)}
    for b in m.blocks.values():
        b.calls = 0
    return out


@pytest.mark.parametrize("update", ["jacobi", "ordered"])
def test_matched_map_skips_zero_blocks_and_what_the_output_does_not_need(update):
    m = _six_block_map()
    x = torch.randn(4, 3, dtype=F64)
    want = reference_iterate(m, _full(m, {"x": x}, batch=(4,)), 3, hold=["x"], update=update)
    _calls(m)
    got = iternn.iterate(m, {"x": x}, 3, hold=["x"], outputs={"y"}, update=update)
    calls = _calls(m)
    assert set(got) == {"y"}
    assert torch.allclose(got["y"], want["y"], atol=1e-12, rtol=0)
    if update == "jacobi":
        # application 1 reads the zero h and y: only the blocks from x run; application
        # 3 computes only y
        assert calls == {"h<-x": 2, "h<-h": 1, "h<-y": 1, "y<-x": 3, "y<-h": 2, "y<-y": 2}
    else:  # y reads the h of its own sweep: h is non-zero for y in application 1, and
        # application 3 computes h for y
        assert calls == {"h<-x": 3, "h<-h": 2, "h<-y": 2, "y<-x": 3, "y<-h": 3, "y<-y": 2}
    got = iternn.iterate(m, {"x": x}, 3, hold=["x"], update=update)
    calls = _calls(m)
    assert calls["h<-h"] == 2 and calls["h<-x"] == 3
    for s in m.slots:
        assert torch.allclose(got[s], want[s], atol=1e-12, rtol=0)


@pytest.mark.parametrize("act, hh_calls, yh_calls", [(nn.Tanh, 0, 0), (nn.ReLU, 0, 0),
                                                     (None, 0, 0), (nn.Sigmoid, 2, 1)])
def test_a_slot_stays_zero_only_when_its_activation_keeps_zero(act, hh_calls, yh_calls):
    # h reads only itself and starts at zero: it stays zero for an activation with
    # act(0) = 0; sigmoid(0) = 0.5 makes it non-zero after application 1. (Nothing reads
    # y: it is computed in the last application only.)
    g = torch.Generator().manual_seed(1)
    m = iternn.BlockMap({"x": 2, "h": 3, "y": 2})
    m.connect("h", "h", Counted(3, 3, g))
    m.connect("y", "h", Counted(3, 2, g))
    m.connect("y", "x", Counted(2, 2, g))
    m.set_activation("h", act() if act else None)
    m = m.double()
    x = torch.randn(4, 2, dtype=F64)
    want = reference_iterate(m, _full(m, {"x": x}, batch=(4,)), 3, hold=["x"])
    _calls(m)
    got = iternn.iterate(m, {"x": x}, 3, hold=["x"])
    calls = _calls(m)
    assert calls["h<-h"] == hh_calls and calls["y<-h"] == yh_calls
    for s in m.slots:
        assert torch.allclose(got[s], want[s], atol=1e-12, rtol=0)
    m.set_bias("h", torch.ones(3, dtype=F64))  # a bias makes h non-zero in any case
    iternn.iterate(m, {"x": x}, 3, hold=["x"])
    assert _calls(m)["h<-h"] == 2


@pytest.mark.parametrize("update, counts", [("jacobi", {"a<-x": 2, "a<-b": 0, "b<-a": 1}),
                                            ("ordered", {"a<-x": 2, "a<-b": 1, "b<-a": 2})])
def test_an_ordered_sweep_reads_the_slots_it_has_just_computed(update, counts):
    # a <-> b is a cycle; both start at zero. Jacobi: b reads the old (zero) a in
    # application 1, so b stays zero and a<-b is skipped in both applications; the
    # ordered sweep computes a first and b reads it.
    g = torch.Generator().manual_seed(2)
    m = iternn.BlockMap({"x": 2, "a": 3, "b": 3})
    m.connect("a", "x", Counted(2, 3, g))
    m.connect("a", "b", Counted(3, 3, g))
    m.connect("b", "a", Counted(3, 3, g))
    m = m.double()
    x = torch.randn(4, 2, dtype=F64)
    want = reference_iterate(m, _full(m, {"x": x}, batch=(4,)), 2, hold=["x"], update=update)
    _calls(m)
    got = iternn.iterate(m, {"x": x}, 2, hold=["x"], update=update)
    assert _calls(m) == counts
    for s in m.slots:
        assert torch.allclose(got[s], want[s], atol=1e-12, rtol=0)


def test_the_zeros_of_a_slot_nobody_reads_are_not_made():
    from torch.overrides import TorchFunctionMode

    class Zeros(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.Tensor.new_zeros, torch.zeros, torch.zeros_like):
                self.shapes.append(tuple(out.shape))
            return out

    m = _six_block_map()
    x = torch.randn(4, 3, dtype=F64)
    with Zeros() as made:
        got = iternn.iterate(m, {"x": x}, 3, hold=["x"], outputs={"y"})
    assert made.shapes == []
    with Zeros() as made:  # a slot left out and returned comes back as zeros
        out = iternn.iterate(m, {"x": x}, 0, outputs={"h"})
    assert made.shapes == [(4, 5)]
    assert out["h"].dtype == F64 and not out["h"].any()
    assert got["y"].shape == (4, 2)


def test_a_held_slot_left_out_is_zero_in_the_wavefront():
    g = torch.Generator().manual_seed(3)
    m = iternn.BlockMap({"x": 2, "u": 2, "h": 3, "v": 2, "y": 2})
    m.connect("h", "x", Counted(2, 3, g))
    m.connect("h", "u", Counted(2, 3, g))
    m.connect("v", "u", Counted(2, 2, g))  # reads only zeros, but sigmoid(0) != 0
    m.connect("y", ("h", "u"), Counted(5, 2, g))  # reads u and a non-zero slot: evaluated
    m.connect("y", "v", Counted(2, 2, g))
    m.set_activation("h", nn.Tanh())
    m.set_activation("v", nn.Sigmoid())
    x = torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True)
    want = reference_iterate(m, _full(m, {"x": x}, batch=(4,)), 2, hold=["x", "u"])
    _calls(m)
    got = iternn.iterate(m, {"x": x}, 2, hold=["x", "u"])
    assert _calls(m) == {"h<-x": 1, "h<-u": 0, "v<-u": 0, "y<-h,u": 1, "y<-v": 1}
    _assert_same(got, want, [x, *m.parameters()])


@settings(max_examples=60)
@given(m=random_maps(acyclic=True), hold_mask=st.integers(1, 15), given_mask=st.integers(0, 15),
       extra=st.integers(0, 1))
def test_wavefront_with_held_slots_left_out_equals_step_by_step(m, hold_mask, given_mask, extra):
    names = list(m.slots)
    hold = _subset(names, hold_mask) or names[:1]
    state = _state(m, given_mask % (1 << len(names)) or 1)
    steps = iternn.depth(m, hold) + extra
    got = iternn.iterate(m, state, steps, hold=hold)
    want = reference_iterate(m, _full(m, state), steps, hold=hold)
    _assert_same(got, want, [*state.values(), *m.parameters()])


def test_sequence_plan_skips_zero_terms_and_unneeded_components():
    g = torch.Generator().manual_seed(4)
    m = iternn.BlockMap({"x": 2, "u": 2, "a": 2, "b": 2, "h": 3, "k": 3})
    m.connect("a", "x", Counted(2, 2, g))
    m.connect("b", "a", Counted(2, 2, g))
    m.connect("h", "b", Counted(2, 3, g))
    m.connect("h", "h", Counted(3, 3, g))
    m.connect("h", "u", Counted(2, 3, g))  # u: held and left out, zero at every step
    m.connect("k", "x", Counted(2, 3, g))
    m.connect("k", "k", Counted(3, 3, g))
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(5, 4, 2, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    for update in ("jacobi", "ordered"):
        want = reference_iterate(m, _full(m, {"x": xs[0]}, batch=(4,)), 5, hold=["u"],
                                 force={"x": xs}, trajectory=True, update=update)
        _calls(m)
        got = iternn.iterate(m, {}, 5, hold=["u"], force={"x": xs}, trajectory=True,
                             update=update, outputs=["h"])
        # h starts at zero: h<-h is skipped at t = 0; h needs b and a, nothing asked for
        # reads k
        assert _calls(m) == {"a<-x": 1, "b<-a": 1, "h<-b": 1, "h<-h": 4, "h<-u": 0,
                             "k<-x": 0, "k<-k": 0}
        _assert_same(got, {"h": want["h"]}, [xs, *m.parameters()])
        want = reference_iterate(m, _full(m, {"x": xs[0], "h": h0}, batch=(4,)), 5, hold=["u"],
                                 force={"x": xs}, trajectory=True, update=update)
        _calls(m)
        got = iternn.iterate(m, {"h": h0}, 5, hold=["u"], force={"x": xs}, trajectory=True,
                             update=update)
        assert _calls(m)["h<-h"] == 5  # h given: read at t = 0
        _assert_same(got, want, [xs, h0, *m.parameters()])


@pytest.mark.parametrize("grad", [True, False])
def test_recurrence_from_a_zero_state_starts_with_the_drive(grad):
    # The fused RNN loop: with h left out, its first step is act(drive_0), no matmul.
    from torch.overrides import TorchFunctionMode

    class Addmms(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.addmm
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(5)
    m = iternn.BlockMap({"x": 2, "h": 4})
    m.connect("h", "x", _linear(2, 4, g))
    m.connect("h", "h", _linear(4, 4, g))
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(6, 3, 2, generator=g, dtype=F64)
    want = reference_iterate(m, {"x": xs[0], "h": torch.zeros(3, 4, dtype=F64)}, 6,
                             force={"x": xs}, trajectory=True)
    with torch.set_grad_enabled(grad), Addmms() as seen:
        got = iternn.iterate(m, {}, 6, force={"x": xs}, trajectory=True)
    assert seen.count == 5  # one per step after the first
    assert torch.allclose(got["h"], want["h"], atol=1e-12, rtol=0)


def test_blocks_skipped_in_every_application_get_zero_gradients():
    # One application from a zero h: h<-h never runs, and its weight gets the zero
    # gradient that applying the map to zeros gives (as torch's RNN does), not None.
    g = torch.Generator().manual_seed(6)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", _linear(2, 3, g, bias=False))
    m.connect("h", "h", Counted(3, 3, g))
    m.set_activation("h", nn.Tanh())
    x = torch.randn(4, 2, generator=g, dtype=F64)
    w = m.block("h", "h").weight
    runs = [  # (iteration, whether h<-h runs in it)
        (lambda: iternn.iterate(m, {"x": x}, 1, hold=["x"]), False),
        (lambda: iternn.iterate(m, {}, 1, force={"x": x[None]}, trajectory=True), False),
        (lambda: iternn.iterate(m, {"x": x}, 2, hold=["x"]), True),
        (lambda: iternn.iterate(m, {}, 1, force={"x": x[None]}, inner=2), True),
    ]
    for run, runs_hh in runs:
        w.grad = None
        _calls(m)
        run()["h"].sum().backward()
        assert _calls(m)["h<-h"] == runs_hh
        assert w.grad is not None and w.grad.shape == (3, 3)
        assert bool(w.grad.any()) == runs_hh


def test_pruned_plans_are_built_once(toy_kernel):
    m = _six_block_map()
    x = torch.randn(4, 3, dtype=F64)
    iternn.iterate(m, {"x": x}, 3, hold=["x"], outputs={"y"})
    plans = dict(m._plans)
    (step,) = [p for k, p in plans.items() if k[0] == "step"]
    schedules = dict(step._schedules)
    offered = len(toy_kernel["offered"])
    assert offered > 0
    for _ in range(2):
        iternn.iterate(m, {"x": x}, 3, hold=["x"], outputs={"y"})
    assert len(toy_kernel["offered"]) == offered  # the kernel is asked when a plan is built
    assert m._plans == plans and step._schedules == schedules
    assert all(m._plans[k] is p for k, p in plans.items())


# ---------------------------------------------------------------------------- products
class ToyProduct:
    """Bias plus its (Counted) terms from their weights, without calling the blocks (so
    the blocks' counts show what the engine called); logs its calls."""

    def __init__(self, terms, state: dict) -> None:
        self.terms = terms
        self.state = state

    def __call__(self, values, bias, batch):
        self.state["log"].append(tuple(t.key for t in self.terms))
        if self.state["decline"]:
            return None
        out = bias
        for t in self.terms:
            y = torch.cat([values[s] for s in t.srcs], -1) @ t.module.weight.t()
            out = y if out is None else out + y
        return out


@pytest.fixture
def toy_kernel():
    """A product kernel claiming every Counted term, registered for one test."""
    saved = list(plan._PRODUCT_KERNELS)
    state = {"decline": False, "log": [], "offered": []}

    def kernel(terms):
        state["offered"].append(tuple(t.key for t in terms))
        claimed = tuple(t for t in terms if isinstance(t.module, Counted))
        return ToyProduct(claimed, state) if claimed else None

    plan.register_product_kernel(kernel)
    state["kernel"] = kernel
    yield state
    plan._PRODUCT_KERNELS[:] = saved


def _product_map():
    """A cycle (h, y) with slot biases, Counted blocks, plain Linear blocks (never offered
    to a kernel) and a block reading two slots."""
    g = torch.Generator().manual_seed(7)
    m = iternn.BlockMap({"x": 2, "h": 3, "y": 2})
    m.connect("h", "x", Counted(2, 3, g))
    m.connect("h", "h", Counted(3, 3, g))
    m.connect("h", "y", _linear(2, 3, g))
    m.connect("y", ("h", "x"), Counted(5, 2, g))
    m.connect("y", "h", _linear(3, 2, g, bias=False))
    m.set_bias("h", torch.randn(3, generator=g, dtype=F64))
    m.set_bias("y", torch.randn(2, generator=g, dtype=F64))
    m.set_activation("h", nn.Tanh())
    return m


CASES = {  # one iteration per plan: step plan, wavefront, sequence plan, inner applications
    "step": dict(given=("x",), steps=3, hold=["x"]),
    "wave": dict(given=("x", "h"), steps=2, hold=["x", "h"]),
    "seq": dict(given=(), steps=4, force=True, trajectory=True),
    "inner": dict(given=(), steps=4, force=True, inner=2),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_product_kernel_computes_the_terms_it_claims(toy_kernel, kind):
    m = _product_map()
    g = torch.Generator().manual_seed(9)
    values = {"x": torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True),
              "h": torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)}
    xs = torch.randn(4, 4, 2, generator=g, dtype=F64, requires_grad=True)
    case = CASES[kind]
    state = {s: values[s] for s in case["given"]}
    force = {"x": xs} if case.get("force") else None
    options = dict(hold=case.get("hold", ()), force=force, inner=case.get("inner", 1),
                   trajectory=case.get("trajectory", False))
    want = reference_iterate(m, {**_full(m, state, batch=(4,)), **({"x": xs[0]} if force else {})},
                             case["steps"], **options)
    leaves = [*values.values(), xs, *m.parameters()]
    _calls(m)
    got = iternn.iterate(m, state, case["steps"], **options)
    assert toy_kernel["log"] and _calls(m) == dict.fromkeys(["h<-x", "h<-h", "y<-h,x"], 0)
    assert all("h<-y" not in keys and "y<-h" not in keys for keys in toy_kernel["offered"])
    _assert_same(got, want, leaves)  # the slot bias added once, the Linear blocks added
    toy_kernel["decline"] = True  # a product that declines: the engine computes its terms
    got = iternn.iterate(m, state, case["steps"], **options)
    assert _calls(m)["y<-h,x"] > 0
    _assert_same(got, want, leaves)


def test_block_kwargs_bypass_the_product_of_that_term(toy_kernel):
    class Scaled(Counted):
        def forward(self, *zs, factor=1.0):
            return factor * super().forward(*zs)

    g = torch.Generator().manual_seed(8)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", Counted(2, 3, g))
    m.connect("h", "h", Scaled(3, 3, g))
    x, h0 = torch.randn(4, 2, dtype=F64), torch.randn(4, 3, dtype=F64)
    kwargs = {"h<-h": {"factor": 0.5}}
    got = iternn.iterate(m, {"x": x, "h": h0}, 2, hold=["x"], block_kwargs=kwargs)
    assert toy_kernel["log"] == []  # the destination's product names h<-h: not used
    want = reference_iterate(m, {"x": x, "h": h0}, 2, hold=["x"])
    assert not torch.allclose(got["h"], want["h"])  # the factor was applied ...
    h = h0
    for _ in range(2):
        h = m.block("h", "x")(x) + m.block("h", "h")(h, factor=0.5)
    assert torch.allclose(got["h"], h, atol=1e-12, rtol=0)  # ... by the block itself
    iternn.iterate(m, {"x": x, "h": h0}, 2, hold=["x"])
    assert toy_kernel["log"] == [("h<-x", "h<-h")] * 2


def test_a_kernel_registered_twice_is_kept_once(toy_kernel):
    n = len(plan._PRODUCT_KERNELS)
    plan.register_product_kernel(toy_kernel["kernel"])
    assert len(plan._PRODUCT_KERNELS) == n
    assert plan._PRODUCT_KERNELS.count(toy_kernel["kernel"]) == 1


def test_a_product_of_terms_not_offered_is_refused():
    saved = list(plan._PRODUCT_KERNELS)

    class Stray:
        terms = ()

    def bad(terms):
        return Stray()

    plan.register_product_kernel(bad)
    try:
        with pytest.raises(iternn.MapError, match=r"product kernel .*bad.* terms \[\] are not"):
            iternn.iterate(_product_map(), {"x": torch.randn(4, 2, dtype=F64)}, 2, hold=["x"])
    finally:
        plan._PRODUCT_KERNELS[:] = saved


# ---------------------------------------------------------------------------- bad input
def test_outputs_naming_an_unknown_slot_is_an_error():
    m = _six_block_map()
    with pytest.raises(iternn.MapError, match="outputs names unknown slot 'z'"):
        iternn.iterate(m, {"x": torch.zeros(1, 3, dtype=F64)}, 2, hold=["x"], outputs=["y", "z"])


def test_outputs_with_a_slot_that_is_not_a_string_is_an_error():
    m = _six_block_map()
    with pytest.raises(iternn.MapTypeError, match="outputs must name slots by str, got int 3"):
        iternn.iterate(m, {"x": torch.zeros(1, 3, dtype=F64)}, 2, hold=["x"], outputs=["y", 3])


def test_outputs_that_is_not_a_collection_is_an_error():
    m = _six_block_map()
    with pytest.raises(iternn.MapTypeError, match="outputs must be a collection of slot names"):
        iternn.iterate(m, {"x": torch.zeros(1, 3, dtype=F64)}, 2, hold=["x"], outputs=5)


def test_a_sequence_plan_given_sequences_for_other_slots_is_an_error():
    m = _six_block_map()
    seq = iternn.engine.sequence_plan(m, frozen={"x"}, forced={"x"})
    x = torch.zeros(1, 3, dtype=F64)
    with pytest.raises(iternn.MapError, match=r"forces the slots \['x'\], got sequences for \[\]"):
        seq({"x": x}, {}, None, x, (1,), 2)


# ---------------------------------------------------------------------------- profiler
def test_profiler_labels(toy_kernel):
    from torch.profiler import ProfilerActivity, profile

    m = _product_map()
    x = torch.randn(4, 2, dtype=F64)
    xs = torch.randn(3, 4, 2, dtype=F64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        iternn.iterate(m, {"x": x}, 2, hold=["x"])
        iternn.iterate(m, {}, 3, force={"x": xs})
        iternn.from_mlp(nn.Sequential(nn.Linear(2, 3)))(x.float())
    names = {e.name for e in prof.events() if e.name.startswith("iternn.")}
    assert {"iternn.application 1", "iternn.application 2", "iternn.slot h", "iternn.slot y",
            "iternn.product h<-x", "iternn.product h<-x,h", "iternn.product y<-h,x",
            "iternn.block h<-y", "iternn.block y<-h", "iternn.wavefront", "iternn.block y<-x",
            "iternn.component h,y"} <= names, sorted(names)
    assert "iternn.application 3" not in names
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # labels only while profiling
        pass
    iternn.iterate(m, {"x": x}, 2, hold=["x"])
    assert not [e for e in prof.events() if e.name.startswith("iternn.")]


def test_zero_gradient_function_passes_gradcheck():
    """The node that gives never-evaluated blocks' parameters zero gradients: reverse and
    forward mode agree with finite differences (a zero scalar of its inputs)."""
    g = torch.Generator().manual_seed(3)
    params = (torch.randn(3, 2, dtype=F64, generator=g, requires_grad=True),
              torch.randn(4, dtype=F64, generator=g, requires_grad=True))
    assert torch.autograd.gradcheck(plan._ZeroGradient.apply, params, check_forward_ad=True)
    out = plan._ZeroGradient.apply(*params)
    grads = torch.autograd.grad(out, params)
    assert [t.shape for t in grads] == [p.shape for p in params]
    assert all(bool((t == 0).all()) for t in grads)


@pytest.mark.parametrize("change", ["bias", "hook"])
def test_a_block_that_stops_mapping_zero_to_zero_is_no_longer_skipped(change):
    """The cached plans skip h<-h in the first application (h starts at zero); a bias
    given to that block afterwards, or a hook, makes the plans be built again (the
    result is the step-by-step one, not the stale skip)."""
    g = torch.Generator().manual_seed(5)
    m = iternn.BlockMap({"x": 3, "h": 4, "y": 2})
    m.connect("h", "x", nn.Linear(3, 4, bias=False))
    m.connect("h", "h", nn.Linear(4, 4, bias=False))
    m.connect("y", "h", nn.Linear(4, 2, bias=False))
    m.double()
    x = torch.randn(5, 3, dtype=F64, generator=g)
    iternn.iterate(m, {"x": x}, 2, hold=("x",))  # builds and caches the pruned plans
    block = m.blocks["h<-h"]
    if change == "bias":
        block.bias = nn.Parameter(torch.ones(4, dtype=F64))
    else:
        block.register_forward_hook(lambda mod, args, out: out + 1)
    got = iternn.iterate(m, {"x": x}, 2, hold=("x",))
    want = reference_iterate(m, {"x": x, "h": torch.zeros(5, 4, dtype=F64),
                                 "y": torch.zeros(5, 2, dtype=F64)}, 2, hold=("x",))
    for s in ("h", "y"):
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=1e-12)
