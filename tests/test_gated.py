"""from_lstm / from_gru: nn.LSTM and nn.GRU as forced block maps, equal to torch in values,
gradients, dropout masks and training; the map's structure; the layer kernel; errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import iternn
from iternn.convert import gated
from iternn.convert.gated import (
    CellUpdate,
    GatedMix,
    GRUMap,
    LSTMMap,
    OutputGate,
    ResetLinear,
    from_gru,
    from_lstm,
)
from iternn.engine import plan

F64 = torch.float64
TOL = 1e-6
SOURCES = {"lstm": nn.LSTM, "gru": nn.GRU}
CONVERT = {"lstm": from_lstm, "gru": from_gru}


# --------------------------------------------------------------------------- cases
@st.composite
def cases(draw, kinds=("lstm", "gru"), max_T: int = 6):
    """A random nn.LSTM / nn.GRU architecture and input layout (batch None = unbatched)."""
    kind = draw(st.sampled_from(kinds))
    hidden = draw(st.integers(1, 6))
    cfg = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.4])),  # inter-layer
    )
    if cfg["num_layers"] == 1:
        cfg["dropout"] = 0.0  # torch warns: dropout acts between layers only
    if kind == "lstm" and hidden > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, hidden - 1))
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    T = draw(st.integers(1, max_T))
    with_state = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, cfg, batch, T, with_state, seed


def make(kind: str, cfg: dict, seed: int, dtype=F64) -> nn.Module:
    torch.manual_seed(seed)
    return SOURCES[kind](**cfg).to(dtype)


def inputs(kind: str, cfg: dict, batch, T: int, with_state: bool, g: torch.Generator):
    """``x`` and the initial state (``h0``, or ``(h0, c0)``) for the layout."""
    n, H, L = cfg["input_size"], cfg["hidden_size"], cfg["num_layers"]
    P = cfg.get("proj_size", 0) or H
    lead = () if batch is None else (batch,)
    xs = (T, n) if batch is None else ((batch, T, n) if cfg["batch_first"] else (T, batch, n))
    x = torch.randn(xs, generator=g, dtype=F64)
    if not with_state:
        return x, None
    h0 = torch.randn(L, *lead, P, generator=g, dtype=F64)
    if kind == "gru":
        return x, h0
    return x, (h0, torch.randn(L, *lead, H, generator=g, dtype=F64))


def flat_outputs(kind: str, out) -> list[torch.Tensor]:
    y, state = out
    return [y, state] if kind == "gru" else [y, *state]


def leaves(state) -> list[torch.Tensor]:
    if state is None:
        return []
    return [state] if isinstance(state, torch.Tensor) else list(state)


def forward_backward(kind, module, x, state, cotangents, seed=0):
    """Outputs and the gradients of the inputs after one backward with fixed cotangents.

    The global RNG is seeded right before the forward: with dropout in train mode,
    torch and the map then draw the same masks (on CPU)."""
    x = x.clone().requires_grad_(True)
    if state is not None:
        state = tuple(s.clone().requires_grad_(True) for s in leaves(state))
        state = state[0] if kind == "gru" else state
    torch.manual_seed(seed)
    outs = flat_outputs(kind, module(x, state))
    sum(((o * g).sum() for o, g in zip(outs, cotangents))).backward()
    return outs, [x.grad] + [s.grad for s in leaves(state)]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def part_grads(net) -> dict[str, torch.Tensor]:
    """Gradients of the torch parameters, assembled from the blocks."""
    return {name: torch.cat([p.grad for p in parts])
            for name, parts in net.parameter_parts().items()}


def assert_matches_torch(kind, src, net, x, state, seed):
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = flat_outputs(kind, src(x, state))
    cot = [torch.randn(r.shape, generator=g, dtype=F64) for r in ref]
    want, want_in = forward_backward(kind, src, x, state, cot)
    got, got_in = forward_backward(kind, net, x, state, cot)
    for a, b in zip(got + got_in, want + want_in):
        assert a.dtype == F64
        assert maxdiff(a, b) <= TOL
    grads = part_grads(net)
    assert list(grads) == [name for name, _ in src.named_parameters()]
    for name, p in src.named_parameters():
        assert maxdiff(grads[name], p.grad) <= TOL, name


# --------------------------------------------------------------------------- equivalence
@given(case=cases())
def test_matches_torch_values_and_gradients(case):
    """Outputs, final states, input gradients and every parameter gradient (train mode:
    inter-layer dropout draws the same masks)."""
    kind, cfg, batch, T, with_state, seed = case
    src = make(kind, cfg, seed)
    net = CONVERT[kind](src)
    x, state = inputs(kind, cfg, batch, T, with_state, torch.Generator().manual_seed(seed))
    assert_matches_torch(kind, src, net, x, state, seed)


@settings(max_examples=12)
@given(case=cases(max_T=4))
def test_generic_step_loop_matches_torch(case):
    """With the layer kernel declined (a hook on the cell block), the engine's generic
    Gauss-Seidel loop computes the same thing: the map itself is exact."""
    kind, cfg, batch, T, with_state, seed = case
    src = make(kind, cfg, seed)
    net = CONVERT[kind](src)
    for l in range(1, cfg["num_layers"] + 1):
        block = (net.map.block(f"c{l}", (f"f{l}", f"c{l}", f"i{l}", f"g{l}")) if kind == "lstm"
                 else net.map.block(f"h{l}", (f"z{l}", f"n{l}", f"h{l}")))
        block.register_forward_hook(lambda *args: None)
    x, state = inputs(kind, cfg, batch, T, with_state, torch.Generator().manual_seed(seed))
    with kernel_spy() as spy:
        assert_matches_torch(kind, src, net, x, state, seed)
    assert spy.calls > 0 and spy.hits == 0


@settings(max_examples=15)
@given(case=cases(max_T=5))
def test_three_adam_steps_match_torch(case):
    kind, cfg, batch, T, with_state, seed = case
    src = make(kind, cfg, seed)
    net = CONVERT[kind](src)
    opt_a = torch.optim.Adam(src.parameters(), lr=0.05, weight_decay=0.01)
    opt_b = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    start = {k: v.detach().clone() for k, v in src.named_parameters()}
    for step in range(3):
        x, state = inputs(kind, cfg, batch, T, with_state, g)
        for module, opt in ((src, opt_a), (net, opt_b)):
            opt.zero_grad()
            torch.manual_seed(step)  # same dropout masks for both
            outs = flat_outputs(kind, module(x, state))
            (outs[0].square().mean() + sum(o.sum() for o in outs[1:])).backward()
            opt.step()
    after = net.torch_state()
    for name, p in src.named_parameters():
        assert maxdiff(after[name], p.detach()) <= TOL, name
        assert maxdiff(p.detach(), start[name]) > 0, name  # Adam moved every parameter


@pytest.mark.parametrize("kind, extra", [("lstm", {"proj_size": 2}), ("lstm", {}), ("gru", {})])
def test_batch_first_with_every_option(kind, extra):
    """batch_first hands the kernels transposed output gradients; with a projection,
    dropout, initial states and no bias at once."""
    cfg = dict(input_size=3, hidden_size=4, num_layers=3, bias=False, batch_first=True,
               dropout=0.3, **extra)
    src = make(kind, cfg, 19)
    net = CONVERT[kind](src)
    x, state = inputs(kind, cfg, 2, 5, True, torch.Generator().manual_seed(19))
    assert_matches_torch(kind, src, net, x, state, 19)
    # the output alone: its gradient reaches the kernel as a transposed view
    cot = torch.randn(2, 5, extra.get("proj_size", 4), dtype=F64)
    for p in (*src.parameters(), *net.parameters()):
        p.grad = None
    grads = []
    for module in (src, net):
        xs = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        (module(xs, state)[0] * cot).sum().backward()
        grads.append(xs.grad)
    assert maxdiff(grads[0], grads[1]) <= TOL
    for name, p in src.named_parameters():
        assert maxdiff(torch.cat([q.grad for q in net.parameter_parts()[name]]), p.grad) <= TOL


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_in_train_mode_matches_torch_on_cpu(kind):
    torch.manual_seed(6)
    src = SOURCES[kind](3, 5, 3, dropout=0.5).double().train()
    net = CONVERT[kind](src)
    for l in (2, 3):
        assert isinstance(net.map.block(f"d{l}", f"h{l - 1}"), nn.Dropout)
    x = torch.randn(6, 4, 3, dtype=F64)
    torch.manual_seed(7)
    ref = flat_outputs(kind, src(x))
    torch.manual_seed(7)
    got = flat_outputs(kind, net(x))
    for a, b in zip(got, ref):
        assert maxdiff(a, b) <= TOL
    net.eval()
    src.eval()
    evaluated = flat_outputs(kind, net(x))
    assert maxdiff(evaluated[0], flat_outputs(kind, src(x))[0]) <= TOL
    assert maxdiff(evaluated[0], got[0]) > 1e-3  # dropout was active in train mode


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_matches_torch(kind):
    """float32 (torch's LSTM then runs oneDNN's kernel): equal to rounding, also with
    dropout masks in train mode."""
    torch.manual_seed(2)
    src = SOURCES[kind](4, 8, 2, batch_first=True, dropout=0.3)
    net = CONVERT[kind](src)
    x = torch.randn(3, 6, 4)
    torch.manual_seed(3)
    ref = flat_outputs(kind, src(x))
    torch.manual_seed(3)
    got = flat_outputs(kind, net(x))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and maxdiff(a, b) <= 1e-5


# --------------------------------------------------------------------------- the layer kernel
class kernel_spy:
    """Counts calls of the registered gated kernel and how many it took."""

    def __enter__(self):
        self.calls = self.hits = 0
        self.saved = list(plan._COMPONENT_KERNELS)

        def spy(*args):
            self.calls += 1
            out = gated.gated_component_kernel(*args)
            self.hits += out is not None
            return out

        plan._COMPONENT_KERNELS[:] = [spy]
        return self

    def __exit__(self, *exc):
        plan._COMPONENT_KERNELS[:] = self.saved


@pytest.mark.parametrize("proj", [0, 2])
def test_lstm_sequence_function_gradcheck(proj):
    torch.manual_seed(0)
    T, B, H = 4, 2, 3
    P = proj or H
    args = [torch.randn(T, B, H, dtype=F64) for _ in range(4)]
    args += [0.5 * torch.randn(4 * H, P, dtype=F64), torch.randn(B, P, dtype=F64),
             torch.randn(B, H, dtype=F64)]
    args += [0.5 * torch.randn(P, H, dtype=F64) if proj else None]
    args = [a.requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(gated._LSTMSequence.apply, args)
    assert torch.autograd.gradgradcheck(gated._LSTMSequence.apply, args)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_sequence_function_gradcheck(bias):
    torch.manual_seed(1)
    T, B, H = 4, 2, 3
    args = [torch.randn(T, B, H, dtype=F64) for _ in range(3)]
    args += [0.5 * torch.randn(3 * H, H, dtype=F64),
             torch.randn(H, dtype=F64) if bias else None, torch.randn(B, H, dtype=F64)]
    args = [a.requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(gated._GRUSequence.apply, args)
    assert torch.autograd.gradgradcheck(gated._GRUSequence.apply, args)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kernel_runs_every_layer_and_declines_the_jacobi_update(kind):
    torch.manual_seed(4)
    src = SOURCES[kind](3, 4, 2).double()
    net = CONVERT[kind](src)
    x = torch.randn(5, 2, 3, dtype=F64)
    with kernel_spy() as spy:
        net(x)
        with torch.no_grad():
            net(x)
    assert (spy.calls, spy.hits) == (4, 4)
    with kernel_spy() as spy:
        iternn.iterate(net.map, {}, 5, force={"x": x}, trajectory=True, update="jacobi")
    assert spy.calls == 0  # only ordered plans ask the kernels


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_second_derivatives_match_torch(kind):
    """Double backward through the layer kernel (hand-written, differentiable BPTT)."""
    torch.manual_seed(5)
    src = SOURCES[kind](3, 4, 2).double()
    net = CONVERT[kind](src)
    x0 = torch.randn(4, 2, 3, dtype=F64)
    v = torch.randn_like(x0)

    def hvp(module):
        x = x0.clone().requires_grad_(True)
        y = module(x)[0]
        (g,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x)
        return hv

    with kernel_spy() as spy:
        got = hvp(net)
    assert spy.hits == 2
    assert maxdiff(got, hvp(src)) <= TOL


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_func_jvp_runs_the_generic_loop(kind):
    torch.manual_seed(6)
    src = SOURCES[kind](3, 4, 2).double()
    net = CONVERT[kind](src)
    x, v = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    with kernel_spy() as spy:
        _, got = torch.func.jvp(lambda u: net(u)[0], (x,), (v,))
    assert spy.calls == 2 and spy.hits == 0
    _, want = torch.func.jvp(lambda u: src(u)[0], (x,), (v,))
    assert maxdiff(got, want) <= TOL


def test_frozen_parameters_and_inference_mode():
    torch.manual_seed(7)
    src = nn.LSTM(3, 4, 2, proj_size=2).double()
    for p in src.parameters():
        p.requires_grad_(False)
    net = from_lstm(src)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    y = net(x)[0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(src(x2)[0].sum(), x2)
    assert maxdiff(gx, want) <= TOL
    with torch.inference_mode():
        assert maxdiff(net(x)[0], src(x)[0]) <= TOL


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_callers_tensors_are_not_mutated(kind):
    torch.manual_seed(8)
    src = SOURCES[kind](3, 4, 2).double()
    net = CONVERT[kind](src)
    x = torch.randn(5, 2, 3, dtype=F64)
    state = inputs(kind, dict(input_size=3, hidden_size=4, num_layers=2, batch_first=False),
                   2, 5, True, torch.Generator().manual_seed(0))[1]
    before = [x.clone()] + [s.clone() for s in leaves(state)]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            net(x, state)
    for a, b in zip([x] + leaves(state), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind, extra", [("lstm", {}), ("lstm", {"proj_size": 2}), ("gru", {})])
@pytest.mark.parametrize("held", [False, True], ids=["forced", "held"])
def test_kernel_and_generic_loop_agree_on_every_slot(kind, extra, held):
    """Every slot's trajectory (gates included) and the gradients of a loss reading all
    of them: the kernel against the generic loop (declined by a hook on a copy)."""
    torch.manual_seed(18)
    net = CONVERT[kind](SOURCES[kind](3, 4, 2, **extra).double())
    other = copy.deepcopy(net)
    for block in other.map.blocks.values():
        if type(block) in (CellUpdate, GatedMix):
            block.register_forward_hook(lambda *args: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, generator=g, dtype=F64)
    init = {s: torch.randn(2, n, generator=g, dtype=F64) for s, n in net.map.slots.items()
            if s[0] in "ch"}
    weights = {s: torch.randn(5, 2, n, generator=g, dtype=F64) for s, n in net.map.slots.items()}

    def run(module, spy_hits):
        xs = x.clone().requires_grad_(True)
        state = {s: v.clone().requires_grad_(True) for s, v in init.items()}
        with kernel_spy() as spy:
            if held:
                traj = iternn.iterate(module.map, {**state, "x": xs[0]}, 5, hold=["x"],
                                      trajectory=True, update="ordered")
            else:
                traj = iternn.iterate(module.map, state, 5, force={"x": xs}, trajectory=True,
                                      update="ordered")
        assert spy.hits == spy_hits
        loss = sum((traj[s] * w).sum() for s, w in weights.items())
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, [xs, *state.values(), *params], allow_unused=True)
        return traj, [gr if gr is not None else torch.zeros_like(p)
                      for gr, p in zip(grads, [xs, *state.values(), *params])]

    fast, fast_grads = run(net, 2)
    slow, slow_grads = run(other, 0)
    for s in net.map.slots:
        assert maxdiff(fast[s], slow[s]) <= 1e-12, s
    for a, b in zip(fast_grads, slow_grads):
        assert maxdiff(a, b) <= 1e-12


def test_extra_batch_dims_through_iterate():
    """The kernel flattens any batch shape: the map iterated by hand on a (2, 3) batch."""
    torch.manual_seed(9)
    src = nn.LSTM(3, 4).double()
    net = from_lstm(src)
    x = torch.randn(5, 2, 3, 3, dtype=F64)
    traj = iternn.iterate(net.map, {}, 5, force={"x": x}, trajectory=True, update="ordered")
    want, _ = src(x.reshape(5, 6, 3))
    assert maxdiff(traj["h1"].reshape(5, 6, 4), want) <= TOL
    assert traj["i1"].shape == (5, 2, 3, 4)


# --------------------------------------------------------------------------- structure
def test_lstm_map_structure():
    torch.manual_seed(10)
    src = nn.LSTM(3, 4, 2).double()
    net = from_lstm(src)
    m = net.map
    assert isinstance(m, iternn.BlockMap)
    layer = lambda l, P: {f"i{l}": 4, f"f{l}": 4, f"g{l}": 4, f"o{l}": 4, f"c{l}": 4, f"h{l}": P}  # noqa: E731
    assert dict(m.slots) == {"x": 3, **layer(1, 4), **layer(2, 4)}
    expected = []
    for l, below in ((1, "x"), (2, "h1")):
        for gate in "ifgo":
            expected += [(f"{gate}{l}", below), (f"{gate}{l}", f"h{l}")]
        expected += [(f"c{l}", (f"f{l}", f"c{l}", f"i{l}", f"g{l}")), (f"h{l}", (f"o{l}", f"c{l}"))]
    assert list(m.edges) == expected
    for k, gate in enumerate("ifgo"):
        rows = slice(4 * k, 4 * k + 4)
        for l, kind, below in ((1, "ih", "x"), (1, "hh", "h1"), (2, "ih", "h1"), (2, "hh", "h2")):
            block = m.block(f"{gate}{l}", below)
            assert type(block) is nn.Linear  # plain: batched over time by the plan
            assert torch.equal(block.weight, getattr(src, f"weight_{kind}_l{l - 1}")[rows])
            assert torch.equal(block.bias, getattr(src, f"bias_{kind}_l{l - 1}")[rows])
        assert type(m.activation(f"{gate}1")) is (nn.Tanh if gate == "g" else nn.Sigmoid)
    assert type(m.block("c1", ("f1", "c1", "i1", "g1"))) is CellUpdate
    assert type(m.block("h2", ("o2", "c2"))) is OutputGate
    assert m.activation("c1") is None and m.activation("h1") is None and len(m.biases) == 0
    assert m.impulse_response_length() == math.inf
    assert not m.graph().is_acyclic()
    assert m.graph().components() == [("x",), tuple(layer(1, 4)), tuple(layer(2, 4))]


def test_lstm_projection_structure():
    torch.manual_seed(11)
    src = nn.LSTM(3, 5, 2, proj_size=2).double()
    net = from_lstm(src)
    m = net.map
    assert [(s, m.slots[s]) for s in ("c1", "m1", "h1", "i2")] == [
        ("c1", 5), ("m1", 5), ("h1", 2), ("i2", 5)]
    assert type(m.block("m1", ("o1", "c1"))) is OutputGate
    proj = m.block("h1", "m1")
    assert type(proj) is nn.Linear and proj.bias is None
    assert torch.equal(proj.weight, src.weight_hr_l0)
    assert m.block("i2", "h1").in_features == 2 and m.block("i2", "h2").in_features == 2
    assert list(net.parameter_parts()) == [name for name, _ in src.named_parameters()]
    assert m.impulse_response_length() == math.inf


def test_gru_map_structure():
    torch.manual_seed(12)
    src = nn.GRU(3, 4, 2, dropout=0.2).double()
    net = from_gru(src)
    m = net.map
    assert dict(m.slots) == {"x": 3, "r1": 4, "z1": 4, "n1": 4, "h1": 4,
                             "d2": 4, "r2": 4, "z2": 4, "n2": 4, "h2": 4}
    assert list(m.edges) == [
        ("r1", "x"), ("r1", "h1"), ("z1", "x"), ("z1", "h1"), ("n1", "x"),
        ("n1", ("r1", "h1")), ("h1", ("z1", "n1", "h1")),
        ("d2", "h1"),
        ("r2", "d2"), ("r2", "h2"), ("z2", "d2"), ("z2", "h2"), ("n2", "d2"),
        ("n2", ("r2", "h2")), ("h2", ("z2", "n2", "h2")),
    ]
    reset = m.block("n1", ("r1", "h1"))
    assert type(reset) is ResetLinear
    assert torch.equal(reset.weight, src.weight_hh_l0[8:]) and torch.equal(reset.bias, src.bias_hh_l0[8:])
    assert torch.equal(m.block("z2", "d2").weight, src.weight_ih_l1[4:8])
    assert type(m.block("h2", ("z2", "n2", "h2"))) is GatedMix
    assert isinstance(m.block("d2", "h1"), nn.Dropout) and m.block("d2", "h1").p == 0.2
    assert [type(m.activation(s)) for s in ("r1", "z1", "n1")] == [nn.Sigmoid, nn.Sigmoid, nn.Tanh]
    assert m.activation("h1") is None and m.activation("d2") is None
    assert m.impulse_response_length() == math.inf
    assert m.graph().components() == [("x",), ("r1", "z1", "n1", "h1"), ("d2",),
                                      ("r2", "z2", "n2", "h2")]


def test_blocks_compute_their_formulas():
    g = torch.Generator().manual_seed(13)
    f, c, i, gg, o = (torch.randn(2, 3, generator=g, dtype=F64) for _ in range(5))
    assert maxdiff(CellUpdate()(f, c, i, gg), f * c + i * gg) <= 1e-15
    assert maxdiff(OutputGate()(o, c), o * torch.tanh(c)) <= 1e-15
    assert maxdiff(GatedMix()(f, c, i), (1 - f) * c + f * i) <= 1e-15
    reset = ResetLinear(3, 2, dtype=F64)
    nn.init.normal_(reset.weight)
    nn.init.normal_(reset.bias)
    r = torch.randn(2, 2, generator=g, dtype=F64)
    assert maxdiff(reset(r, c), r * (c @ reset.weight.T + reset.bias)) <= 1e-15
    assert "in_features=3, out_features=2, bias=True" in repr(reset)


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_constructor_draws_what_torch_draws(kind):
    cls = LSTMMap if kind == "lstm" else GRUMap
    extra = {"proj_size": 2} if kind == "lstm" else {}
    torch.manual_seed(14)
    net = cls(3, 4, 2, bias=True, batch_first=True, dtype=F64, **extra)
    torch.manual_seed(14)
    src = SOURCES[kind](3, 4, 2, batch_first=True, dtype=F64, **extra)
    state = net.torch_state()
    for name, p in src.named_parameters():
        assert torch.equal(state[name], p.detach()), name
    back = net.to_lstm() if kind == "lstm" else net.to_gru()
    assert type(back) is SOURCES[kind] and back.batch_first
    x = torch.randn(2, 5, 3, dtype=F64)
    assert maxdiff(back(x)[0], net(x)[0]) <= TOL


def test_conversion_copies_mode_dtype_device_and_requires_grad():
    src = nn.LSTM(2, 3, 2, dropout=0.3).eval()
    src.weight_hh_l1.requires_grad_(False)
    state = torch.get_rng_state()
    net = from_lstm(src)
    assert torch.equal(torch.get_rng_state(), state)  # no random numbers drawn
    assert not net.training and not net.map.training
    assert all(p.dtype == torch.float32 for p in net.parameters())
    parts = net.parameter_parts()
    assert not any(p.requires_grad for p in parts["weight_hh_l1"])
    assert all(p.requires_grad for p in parts["weight_hh_l0"])
    assert from_gru(nn.GRU(2, 3).double().train()).training
    assert from_gru(nn.GRU(2, 3).double()).torch_state()["weight_ih_l0"].dtype == F64


def test_parameters_are_copies():
    torch.manual_seed(15)
    src = nn.GRU(2, 3, 2).double()
    before = {k: v.detach().clone() for k, v in src.named_parameters()}
    net = from_gru(src)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in src.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    out, h_n = net(torch.randn(4, 2, 2, dtype=F64))
    (out.sum() + h_n.sum()).backward()
    opt.step()
    after = net.torch_state()
    for k, v in src.named_parameters():
        assert torch.equal(v, before[k]), k
        assert not torch.equal(after[k], v), k


def test_deepcopy_and_state_dict_round_trip():
    torch.manual_seed(16)
    net = from_lstm(nn.LSTM(3, 4, 2, proj_size=3).double())
    clone = copy.deepcopy(net)
    other = from_lstm(nn.LSTM(3, 4, 2, proj_size=3).double())
    other.load_state_dict(net.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    assert maxdiff(clone(x)[0], net(x)[0]) == 0.0
    assert maxdiff(other(x)[0], net(x)[0]) == 0.0


def test_extra_repr():
    text = repr(from_lstm(nn.LSTM(3, 4, 2, bias=False, batch_first=True, dropout=0.5,
                                  proj_size=2)))
    for piece in ("LSTMMap(", "3, 4", "num_layers=2", "bias=False", "batch_first=True",
                  "dropout=0.5", "proj_size=2", "update='ordered'"):
        assert piece in text, piece
    assert repr(from_gru(nn.GRU(3, 4))).startswith("GRUMap(\n  3, 4, update='ordered'")


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(17)
    extra = {"proj_size": 2} if kind == "lstm" else {}
    net = CONVERT[kind](SOURCES[kind](3, 4, 2, dropout=0.4, batch_first=True, **extra).double())
    next(iter(net.parameter_parts().values()))[0].requires_grad_(False)
    path = tmp_path / "net.safetensors"
    iternn.save(net, path)
    loaded = iternn.load(path)
    assert type(loaded) is type(net) and loaded.map.edges == net.map.edges
    sa, sb = net.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 5, 3, dtype=F64)
    torch.manual_seed(0)
    a = flat_outputs(kind, net(x))
    torch.manual_seed(0)
    b = flat_outputs(kind, loaded(x))
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # train mode: the same masks


def test_save_refuses_a_hand_edited_map(tmp_path):
    net = from_gru(nn.GRU(3, 4, 2))
    net.map.set_activation("n2", nn.Sigmoid())
    with pytest.raises(iternn.MapTypeError, match=r"map\.activations\.n2 is a Sigmoid"):
        iternn.save(net, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- bad input
def _lstm(**kw) -> LSTMMap:
    return from_lstm(nn.LSTM(**{"input_size": 3, "hidden_size": 4, "num_layers": 2, **kw}).double())


def test_rejects_wrong_input_size():
    with pytest.raises(iternn.MapError, match="'x'.*input_size=3"):
        _lstm()(torch.randn(5, 2, 4, dtype=F64))


def test_rejects_wrong_h0_shape():
    h0, c0 = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 2, 4, dtype=F64)
    with pytest.raises(iternn.MapError, match=r"h0 must have shape .*slot 'h2'"):
        _lstm()(torch.randn(5, 2, 3, dtype=F64), (h0, c0))
    with pytest.raises(iternn.MapError, match=r"h0 must have shape .*slot 'h1'"):
        from_gru(nn.GRU(3, 4).double())(torch.randn(5, 2, 3, dtype=F64), h0)


def test_rejects_wrong_c0_shape():
    h0, c0 = torch.randn(2, 2, 2, dtype=F64), torch.randn(2, 2, 2, dtype=F64)
    with pytest.raises(iternn.MapError, match=r"c0 must have shape \(L, B, n\) = \(2, 2, 4\).*slot 'c2'"):
        _lstm(proj_size=2)(torch.randn(5, 2, 3, dtype=F64), (h0, c0))


def test_rejects_hx_that_is_not_a_pair():
    with pytest.raises(iternn.MapTypeError, match=r"hx must be a tuple \(h0, c0\)"):
        _lstm()(torch.randn(5, 2, 3, dtype=F64), torch.zeros(2, 2, 4, dtype=F64))


def test_rejects_dtype_mismatch():
    with pytest.raises(iternn.MapTypeError, match="'x'.*float32"):
        _lstm()(torch.randn(5, 2, 3))
    h0 = torch.zeros(2, 2, 4)
    with pytest.raises(iternn.MapTypeError, match="h0.*float32"):
        from_gru(nn.GRU(3, 4, 2).double())(torch.randn(5, 2, 3, dtype=F64), h0)


def test_rejects_packed_sequence():
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=F64), [5, 3])
    with pytest.raises(iternn.MapTypeError, match="PackedSequence"):
        _lstm()(packed)


@pytest.mark.parametrize("convert, module", [
    (from_lstm, nn.GRU(3, 4)), (from_lstm, nn.RNN(3, 4)), (from_gru, nn.LSTM(3, 4)),
    (from_gru, nn.Linear(3, 4)),
], ids=["lstm<-GRU", "lstm<-RNN", "gru<-LSTM", "gru<-Linear"])
def test_rejects_wrong_module_type(convert, module):
    with pytest.raises(iternn.MapTypeError, match=type(module).__name__):
        convert(module)


def test_rejects_subclass_overriding_forward():
    class Odd(nn.GRU):
        def forward(self, x, h0=None):
            return super().forward(2 * x, h0)

    with pytest.raises(iternn.MapTypeError, match="forward"):
        from_gru(Odd(3, 4))


def test_rejects_bidirectional():
    with pytest.raises(iternn.ConversionError, match="bidirectional"):
        from_lstm(nn.LSTM(3, 4, bidirectional=True))
    with pytest.raises(iternn.ConversionError, match="bidirectional"):
        from_gru(nn.GRU(3, 4, bidirectional=True))


def test_load_torch_refuses_a_module_of_other_sizes():
    net = LSTMMap(3, 4, 2)
    with pytest.raises(iternn.MapError, match=r"'weight_ih_l0' of the source is \(20, 3\).*needs \(16, 3\)"):
        net.load_torch(nn.LSTM(3, 5, 2))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(iternn.MapError, match="proj_size must be smaller"):
        LSTMMap(3, 4, proj_size=4)
    with pytest.raises(iternn.MapError, match="dropout"):
        GRUMap(3, 4, 2, dropout=1.5)
    with pytest.raises(iternn.MapError, match="num_layers"):
        GRUMap(3, 4, num_layers=0)
    with pytest.raises(iternn.MapTypeError, match="hidden_size"):
        LSTMMap(3, 4.0)


# --------------------------------------------------------------------------- native cell
from iternn.convert import lstm_native  # noqa: E402

needs_native = pytest.mark.skipif(not lstm_native.available(),
                                  reason="native LSTM cell kernel unavailable")


def _cell_reference(g4: torch.Tensor, c_prev: torch.Tensor):
    i, f, o = (x.sigmoid() for x in g4[:3])
    g = g4[3].tanh()
    c = f * c_prev + i * g
    return torch.stack([i, f, o, g]), c, o * c.tanh()


def _native_layer(d4: torch.Tensor, r: torch.Tensor, c0: torch.Tensor):
    """Run the native layer kernel over drives ``d4`` ``(T, 4, B, H)`` (gate order i, f,
    o, g) with the same recurrent part ``r`` every step; returns ``(a, c, h)``."""
    T, _, B, H = d4.shape
    a, c, h = torch.empty(T, 4, B, H), torch.empty(T, B, H), torch.empty(T, B, H)
    kernel = lstm_native.LayerKernel(d4.unbind(1), r, c0, a, c, h)
    for t in range(T):
        kernel.step(t)
    return a, c, h


@needs_native
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (2, 8), (32, 128), (7, 13)])
def test_native_cell_matches_torch_ops_to_float_rounding(B, H):
    g = torch.Generator().manual_seed(B * 100 + H)
    d4 = torch.randn(3, 4, B, H, generator=g) * 4
    special = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 0.6249, 0.6251, 90.0, -90.0])
    k = min(special.numel(), d4[0].numel())
    d4[0].reshape(-1)[:k] = special[:k]
    r = torch.randn(4, B, H, generator=g)
    r.view(-1)[:k] = 0.0
    c0 = torch.randn(B, H, generator=g) * 3
    a, c, h = _native_layer(d4, r, c0)
    c_prev = c0.double()
    for t in range(3):  # the reference, step by step, from the kernel's previous cell state
        want_a, want_c, want_h = _cell_reference(d4[t].double() + r.double(), c_prev)
        def rel(x, y):  # error relative to max(1, |value|): float32 rounding is ~6e-8
            return ((x.double() - y).abs() / y.abs().clamp_min(1)).max().item()

        assert rel(a[t], want_a) <= 3e-7 and rel(c[t], want_c) <= 4e-7 and rel(h[t], want_h) <= 4e-7
        c_prev = c[t].double()
    assert torch.isfinite(a).all() and torch.isfinite(h).all()


@needs_native
def test_native_cell_reads_strided_and_broadcast_drives():
    """Column slices of one fused projection and a drive expanded over time are read in
    place, with the same results as contiguous copies."""
    g = torch.Generator().manual_seed(5)
    T, B, H = 4, 3, 10
    fused = torch.randn(T, B, 4 * H, generator=g)
    drives = [fused[..., k * H:(k + 1) * H] for k in range(3)]
    drives.append(torch.randn(B, H, generator=g).expand(T, B, H))
    r, c0 = torch.randn(4, B, H, generator=g), torch.randn(B, H, generator=g)
    got = [torch.empty(T, 4, B, H), torch.empty(T, B, H), torch.empty(T, B, H)]
    kernel = lstm_native.LayerKernel(drives, r, c0, *got)
    for t in range(T):
        kernel.step(t)
    want = _native_layer(torch.stack([d.contiguous() for d in drives], 1), r, c0)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@needs_native
def test_native_cell_propagates_nan_and_saturates_at_infinity():
    d4 = torch.tensor([[math.nan, math.inf, -math.inf, 0.0]]).expand(4, 4).reshape(1, 4, 1, 4)
    c0 = torch.tensor([[0.5, 0.5, 0.5, math.nan]])
    a, c, h = _native_layer(d4.clone(), torch.zeros(4, 1, 4), c0)
    want_a, want_c, want_h = _cell_reference(d4[0], c0)
    for x, y in ((a[0], want_a), (c[0], want_c), (h[0], want_h)):
        assert torch.equal(x.isnan(), y.isnan())
        assert torch.allclose(x.nan_to_num(), y.nan_to_num(), atol=1e-6)


@needs_native
def test_native_cell_rejects_bad_operands():
    T, B, H = 2, 2, 3
    d = [torch.zeros(T, B, H) for _ in range(4)]
    r, c0 = torch.zeros(4, B, H), torch.zeros(B, H)
    a, c, h = torch.empty(T, 4, B, H), torch.empty(T, B, H), torch.empty(T, B, H)
    K = lstm_native.LayerKernel
    with pytest.raises(iternn.MapTypeError, match="float32"):
        K(d, r.double(), c0, a, c, h)
    with pytest.raises(iternn.MapTypeError, match="c0"):
        K(d, r, [0.0], a, c, h)
    with pytest.raises(iternn.MapTypeError, match="4 tensors"):
        K(d[:3], r, c0, a, c, h)
    with pytest.raises(iternn.MapError, match="contiguous"):
        K(d, r, torch.zeros(H, B).t(), a, c, h)
    with pytest.raises(iternn.MapError, match="unit stride"):
        K([*d[:3], torch.zeros(T, H, B).transpose(1, 2)], r, c0, a, c, h)
    with pytest.raises(iternn.MapError, match="sizes"):
        K(d, torch.zeros(3, B, H), c0, a, c, h)
    with pytest.raises(iternn.MapError, match="sizes"):
        K(d, r, c0, a, c, torch.empty(T, B, H + 1))
    with pytest.raises(iternn.MapError, match="overlap"):
        K(d, r, c0, a, c, c)
    with pytest.raises(iternn.MapError, match="drives.2. and a overlap"):
        K([*d[:2], a[:, 0], d[3]], r, c0, a, c, h)
    with pytest.raises(iternn.MapError, match="no empty"):
        K([torch.zeros(0, B, H)] * 4, r, c0, torch.empty(0, 4, B, H), torch.empty(0, B, H),
          torch.empty(0, B, H))
    kernel = K(d, r, c0, a, c, h)
    for t in (-1, T):
        with pytest.raises(iternn.MapError, match="out of range"):
            kernel.step(t)


@needs_native
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("shape", [(5, 4, 6), (3, 1, 16), (4, 7)])
def test_native_inference_path_matches_the_torch_op_path(monkeypatch, proj, shape):
    """float32 no-grad forward: the native cell path equals the torch-op kernel path
    (and nn.LSTM) to float rounding; the autograd path does not use it."""
    torch.manual_seed(1)
    src = nn.LSTM(shape[-1], 6, num_layers=2, proj_size=proj)
    net = from_lstm(src)
    x = torch.randn(*shape)
    calls = []
    real = lstm_native.LayerKernel
    monkeypatch.setattr(lstm_native, "LayerKernel", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out, (h, c) = net(x)
        want, (wh, wc) = src(x)
    assert len(calls) == 2
    monkeypatch.setattr(lstm_native, "library", lambda: None)
    with torch.no_grad():
        ref, (rh, rc) = net(x)
    assert len(calls) == 2  # the torch-op path
    for a, b, w in ((out, ref, want), (h, rh, wh), (c, rc, wc)):
        assert maxdiff(a, b) <= 1e-6 and maxdiff(a, w) <= 1e-5
    calls.clear()
    monkeypatch.undo()
    monkeypatch.setattr(lstm_native, "LayerKernel", lambda *a: calls.append(1) or real(*a))
    y, _ = net(x)  # autograd: the unchanged differentiable kernel
    assert not calls and y.requires_grad and maxdiff(y.detach(), ref) <= 1e-6


def test_native_off_by_environment(monkeypatch):
    monkeypatch.setenv("ITERNN_NATIVE", "0")
    lstm_native._reset()
    try:
        assert not lstm_native.available()
        assert "ITERNN_NATIVE=0" in lstm_native.status().reason
        with pytest.raises(iternn.NativeBuildError, match="unavailable"):
            lstm_native.LayerKernel([torch.zeros(1, 1, 1)] * 4, torch.zeros(4, 1, 1),
                                    torch.zeros(1, 1), torch.empty(1, 4, 1, 1),
                                    torch.empty(1, 1, 1), torch.empty(1, 1, 1))
        torch.manual_seed(0)
        src = nn.LSTM(3, 4)
        x = torch.randn(2, 3)
        with torch.no_grad():  # the torch-op path
            assert maxdiff(from_lstm(src)(x)[0], src(x)[0]) <= 1e-5
    finally:
        monkeypatch.undo()
        lstm_native._reset()
