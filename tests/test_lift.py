"""lift_rnn: an RNN over T steps is a nilpotent block map with tied weights (eqs. 15–19)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from rnn_cases import F64, make_inputs, maxdiff, rnn_cases, run
from rnn_cases import make_rnn as _make_rnn
from torch import nn

import iternn
from iternn.convert.lift import LiftedRNN, lift_rnn
from iternn.convert.rnn import from_rnn

TOL = 1e-6


# --------------------------------------------------------------------------- helpers
def make_rnn(cfg: dict, seed: int, dtype=F64) -> nn.RNN:
    """The RNN, in eval mode when it has dropout (lifted masks are drawn per step)."""
    return _make_rnn(cfg, seed, dtype, eval_with_dropout=True)


def lifted_state(net: LiftedRNN, x: torch.Tensor, h0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Held slots of a time-first batched input: x1..xT and the initial states."""
    state = {net.input_slot(t + 1): x[t] for t in range(net.T)}
    state.update(zip(net.initial_slots, h0.unbind(0)))
    return state


# --------------------------------------------------------------------------- equivalence
@given(case=rnn_cases())
def test_matches_torch_values_and_gradients(case):
    cfg, batch, T, with_h0, seed = case
    rnn = make_rnn(cfg, seed)
    net = lift_rnn(rnn, T)
    g = torch.Generator().manual_seed(seed)
    x, h0 = make_inputs(cfg, batch, T, with_h0, g)
    ref_out, ref_h = rnn(x, h0)
    g_out = torch.randn(ref_out.shape, generator=g, dtype=F64)
    g_h = torch.randn(ref_h.shape, generator=g, dtype=F64)

    a = run(rnn, x, h0, g_out, g_h)
    b = run(net, x, h0, g_out, g_h)
    assert b[0].dtype == F64
    for got, want in zip(b, a):
        if want is None:
            assert got is None
        else:
            assert maxdiff(got, want) <= TOL
    # Tied weights: each torch parameter is one map parameter whose gradient is the sum
    # over all T steps (BPTT), so it equals torch's.
    params = net.torch_parameters()
    assert len(list(net.parameters())) == len(list(rnn.parameters()))
    for name, p in rnn.named_parameters():
        assert params[name].grad is not None, name
        assert maxdiff(params[name].grad, p.grad) <= TOL, name


@given(case=rnn_cases(max_T=5))
def test_three_adam_steps_match_torch(case):
    cfg, batch, T, with_h0, seed = case
    rnn = make_rnn(cfg, seed)
    net = lift_rnn(rnn, T)
    opt_a = torch.optim.Adam(rnn.parameters(), lr=0.01)
    opt_b = torch.optim.Adam(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    start = {k: v.detach().clone() for k, v in rnn.named_parameters()}
    for _ in range(3):
        x, h0 = make_inputs(cfg, batch, T, with_h0, g)
        for module, opt in ((rnn, opt_a), (net, opt_b)):
            opt.zero_grad()
            out, h_n = module(x, h0)
            loss = out.square().mean() + h_n.sum()
            loss = loss + sum(p.square().sum() for p in module.parameters())  # every p moves
            loss.backward()
            opt.step()
    params = net.torch_parameters()
    for name, p in rnn.named_parameters():
        assert maxdiff(params[name].detach(), p.detach()) <= TOL, name
        assert maxdiff(p.detach(), start[name]) > 0, name


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("T", [1, 2, 5])
def test_one_layer_structure_is_nilpotent_with_length_T(T):
    net = lift_rnn(nn.RNN(3, 4), T)
    m = net.map
    xs = [f"x{t}" for t in range(1, T + 1)]
    hs = [f"h{t}" for t in range(T + 1)]
    assert list(m.slots) == xs + hs
    assert all(s.isidentifier() for s in m.slots)
    assert net.initial_slots == ("h0",)
    assert set(m.edges) == (
        {(f"h{t}", f"x{t}") for t in range(1, T + 1)}
        | {(f"h{t}", f"h{t - 1}") for t in range(1, T + 1)}
    )
    assert m.graph().is_acyclic()
    assert m.impulse_response_length() == T
    assert not math.isinf(m.impulse_response_length())
    assert net.steps == iternn.depth(m, net.held_slots) == T
    # The held slots feed blocks: re-injected forever (eq. 50).
    assert m.impulse_response_length(hold=net.held_slots) == math.inf


@pytest.mark.parametrize("L, T", [(2, 1), (2, 4), (3, 3)])
def test_multi_layer_structure(L, T):
    net = lift_rnn(nn.RNN(3, 4, L), T)
    m = net.map
    assert net.initial_slots == tuple(f"h{l}_0" for l in range(1, L + 1))
    assert net.state_slot(T, L) == f"h{L}_{T}" and net.input_slot(T) == f"x{T}"
    assert len(m.slots) == T + L * (T + 1)
    assert len(m.edges) == 2 * L * T
    assert m.graph().is_acyclic()
    assert m.impulse_response_length() == T + L - 1 == net.steps
    assert ("h2_1", "h1_1") in m.edges and ("h2_1", "h2_0") in m.edges


def test_weights_are_tied_over_time():
    T, L = 4, 2
    rnn = nn.RNN(3, 5, L).double()
    net = lift_rnn(rnn, T)
    m = net.map
    for l in range(1, L + 1):
        below = (lambda t: f"x{t}") if l == 1 else (lambda t, l=l: f"h{l - 1}_{t}")
        ih = {id(m.block(f"h{l}_{t}", below(t))) for t in range(1, T + 1)}
        hh = {id(m.block(f"h{l}_{t}", f"h{l}_{t - 1}")) for t in range(1, T + 1)}
        assert len(ih) == 1 and len(hh) == 1  # one module reused at every step
    # Each tied tensor is counted once.
    assert len(list(net.parameters())) == 4 * L
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in rnn.parameters())
    # A step on the shared tensor moves every time step's block at once.
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    out, h_n = net(torch.randn(T, 2, 3, dtype=F64))
    (out.sum() + h_n.sum()).backward()
    before = m.block("h1_1", "h1_0").weight.detach().clone()
    opt.step()
    after = [m.block(f"h1_{t}", f"h1_{t - 1}").weight for t in range(1, T + 1)]
    assert not torch.equal(after[0], before)
    assert all(torch.equal(w, after[0]) for w in after)


def test_gradient_accumulates_over_steps():
    """The tied W_hh gradient is the sum of per-step gradients of an untied copy."""
    torch.manual_seed(1)
    T = 3
    rnn = nn.RNN(2, 3).double()
    net = lift_rnn(rnn, T)
    x, h0 = torch.randn(T, 2, 2, dtype=F64), torch.randn(1, 2, 3, dtype=F64)
    out, _ = net(x, h0)
    out.square().sum().backward()
    tied = net.torch_parameters()["weight_hh_l0"].grad.clone()
    # Untie: every step gets its own copy of W_hh.
    m = net.map
    copies = []
    for t in range(1, T + 1):
        blk = m.disconnect(f"h{t}", f"h{t - 1}")
        own = nn.Linear(3, 3, dtype=F64)
        with torch.no_grad():
            own.weight.copy_(blk.weight)
            own.bias.copy_(blk.bias)
        m.connect(f"h{t}", f"h{t - 1}", own)
        copies.append(own)
    out2, _ = net(x, h0)
    assert maxdiff(out2, out) == 0.0
    out2.square().sum().backward()
    per_step = [c.weight.grad for c in copies]
    assert all(g.abs().max() > 0 for g in per_step)
    assert maxdiff(sum(per_step), tied) <= 1e-12


def test_fixed_point_after_depth_applications():
    """Applying the map step by step: exact after T applications, unchanged afterwards."""
    torch.manual_seed(2)
    T = 5
    rnn = nn.RNN(3, 4).double()
    net = lift_rnn(rnn, T)
    m = net.map
    x, h0 = torch.randn(T, 2, 3, dtype=F64), torch.randn(1, 2, 4, dtype=F64)
    held = lifted_state(net, x, h0)
    z = {s: held.get(s, torch.zeros(2, n, dtype=F64)) for s, n in m.slots.items()}
    ref_out, _ = rnn(x, h0)
    history = []
    for _ in range(T + 3):
        z = {**m(z), **held}  # one Jacobi application, held slots re-injected
        history.append(torch.stack([z[f"h{t}"] for t in range(1, T + 1)]))
    assert maxdiff(history[T - 2], ref_out) > 1e-3  # not there after T - 1 applications
    assert maxdiff(history[T - 1], ref_out) <= TOL  # exact after T
    for later in history[T:]:
        assert maxdiff(later, history[T - 1]) == 0.0  # a fixed point
    # The engine agrees for any step count >= depth.
    for steps in (T, T + 4):
        res = iternn.iterate(m, held, steps, hold=net.held_slots)
        assert maxdiff(torch.stack([res[f"h{t}"] for t in range(1, T + 1)]), ref_out) <= TOL


def test_lift_from_rnnmap_equals_lift_from_rnn():
    torch.manual_seed(3)
    rnn = nn.RNN(3, 4, 2, nonlinearity="relu", batch_first=True).double()
    a, b = lift_rnn(rnn, 4), lift_rnn(from_rnn(rnn), 4)
    x = torch.randn(2, 4, 3, dtype=F64)
    assert maxdiff(a(x)[0], b(x)[0]) == 0.0 and maxdiff(a(x)[1], b(x)[1]) == 0.0


def test_parameters_are_copies_and_mode_is_copied():
    rnn = nn.RNN(2, 3).double().eval()
    net = lift_rnn(rnn, 3)
    assert not net.training
    with torch.no_grad():
        net.torch_parameters()["weight_hh_l0"].add_(1.0)
    assert not torch.equal(net.torch_parameters()["weight_hh_l0"], rnn.weight_hh_l0)


def test_float32_works_and_dtype_follows():
    torch.manual_seed(4)
    rnn = nn.RNN(4, 8, 2)
    net = lift_rnn(rnn, 6)
    x = torch.randn(6, 3, 4)
    out, h_n = net(x)
    assert out.dtype == h_n.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert maxdiff(out, rnn(x)[0]) <= 1e-5 and maxdiff(h_n, rnn(x)[1]) <= 1e-5
    with pytest.raises(iternn.MapTypeError, match="float64"):
        net(x.double())


def test_callers_tensors_are_not_mutated():
    torch.manual_seed(5)
    net = lift_rnn(nn.RNN(3, 4, 2).double(), 5)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=F64, requires_grad=True)
    x0, h00 = x.detach().clone(), h0.detach().clone()
    out, h_n = net(x, h0)
    (out.sum() + h_n.sum()).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(h0.detach(), h00)


def test_dropout_one_matches_torch_in_train_mode():
    """With p = 1 the masks are all zero, so the lifted map must equal torch exactly."""
    torch.manual_seed(6)
    rnn = nn.RNN(3, 4, 2, dropout=1.0).double().train()
    net = lift_rnn(rnn, 5)
    x = torch.randn(5, 2, 3, dtype=F64)
    assert maxdiff(net(x)[0], rnn(x)[0]) <= TOL
    net.eval()
    rnn.eval()
    assert maxdiff(net(x)[0], rnn(x)[0]) <= TOL
    assert maxdiff(net.train()(x)[0], net.eval()(x)[0]) > 1e-3


def test_extra_repr():
    text = repr(lift_rnn(nn.RNN(3, 4, 2, nonlinearity="relu"), 7)).splitlines()[1]
    for piece in ("3, 4", "T=7", "num_layers=2", "nonlinearity='relu'", "steps=8"):
        assert piece in text, piece


def test_conversion_draws_no_random_numbers():
    rnn = nn.RNN(3, 4, 2, dropout=0.3)
    state = torch.get_rng_state()
    net = lift_rnn(rnn, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.device.type == "cpu" for p in net.parameters())


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("length", [3, 5])
def test_rejects_wrong_sequence_length(length):
    net = lift_rnn(nn.RNN(3, 4).double(), 4)
    with pytest.raises(iternn.MapError, match=f"length {length}.*T=4"):
        net(torch.randn(length, 2, 3, dtype=F64))


def test_rejects_wrong_sequence_length_batch_first():
    net = lift_rnn(nn.RNN(3, 4, batch_first=True).double(), 4)
    with pytest.raises(iternn.MapError, match="length 2"):
        net(torch.randn(4, 2, 3, dtype=F64))  # batch 4, length 2


def test_rejects_bad_T():
    with pytest.raises(iternn.MapError, match="T"):
        lift_rnn(nn.RNN(3, 4), 0)
    with pytest.raises(iternn.MapTypeError, match="T"):
        lift_rnn(nn.RNN(3, 4), 2.0)


def test_refuses_a_length_whose_map_would_not_fit_before_building_it(monkeypatch):
    # 10**8 steps x 2 layers: 2 * 10**8 slots of Python bookkeeping (~300 GB) were built
    # one by one (minutes) before running out of memory; now refused at once, by T.
    import iternn.core.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 16 * 10**9)
    with pytest.raises(iternn.SizeError, match=r"T=100000000: .* 200000000 state slots"):
        lift_rnn(nn.RNN(3, 4, num_layers=2), 10**8)
    assert lift_rnn(nn.RNN(3, 4, num_layers=2), 3).steps == 4  # small T: unaffected


def test_rejects_bidirectional():
    with pytest.raises(iternn.ConversionError, match="bidirectional"):
        lift_rnn(nn.RNN(3, 4, bidirectional=True), 3)


@pytest.mark.parametrize("module", [nn.LSTM(3, 4), nn.GRU(3, 4)])
def test_rejects_non_rnn_modules(module):
    with pytest.raises(iternn.MapTypeError, match=type(module).__name__):
        lift_rnn(module, 3)


def test_rejects_wrong_input_size():
    with pytest.raises(iternn.MapError, match="'x'"):
        lift_rnn(nn.RNN(3, 4).double(), 2)(torch.randn(2, 1, 5, dtype=F64))


def test_rejects_wrong_h0_shape():
    net = lift_rnn(nn.RNN(3, 4, 2).double(), 2)
    with pytest.raises(iternn.MapError, match="h0 must have shape.*'h2_0'"):
        net(torch.randn(2, 1, 3, dtype=F64), torch.randn(2, 1, 5, dtype=F64))


def test_state_dict_round_trip_keeps_weights_tied():
    torch.manual_seed(7)
    a = lift_rnn(nn.RNN(3, 4, 2).double(), 3)
    b = lift_rnn(nn.RNN(3, 4, 2).double(), 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, 3, dtype=F64)
    assert maxdiff(a(x)[0], b(x)[0]) == 0.0
    assert len(list(b.parameters())) == 8
    assert b.map.block("h1_3", "h1_2") is b.map.block("h1_1", "h1_0")
