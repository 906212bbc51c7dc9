"""from_rnn: an nn.RNN as a forced block map, equal to torch in values, gradients and training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from rnn_cases import F64, make_inputs, make_rnn, maxdiff, rnn_cases, run
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import iternn
from iternn.convert.rnn import RNNMap, from_rnn

TOL = 1e-6


# --------------------------------------------------------------------------- equivalence
@given(case=rnn_cases())
def test_matches_torch_values_and_gradients(case):
    cfg, batch, T, with_h0, seed = case
    rnn = make_rnn(cfg, seed)
    net = from_rnn(rnn)
    g = torch.Generator().manual_seed(seed)
    x, h0 = make_inputs(cfg, batch, T, with_h0, g)
    with torch.no_grad():
        ref_out, ref_h = rnn(x, h0)
    g_out = torch.randn(ref_out.shape, generator=g, dtype=F64)
    g_h = torch.randn(ref_h.shape, generator=g, dtype=F64)

    a = run(rnn, x, h0, g_out, g_h)
    b = run(net, x, h0, g_out, g_h)
    assert b[0].dtype == F64 and b[1].dtype == F64
    for got, want in zip(b, a):
        if want is None:
            assert got is None
        else:
            assert maxdiff(got, want) <= TOL
    params = net.torch_parameters()
    assert set(params) == {name for name, _ in rnn.named_parameters()}
    for name, p in rnn.named_parameters():
        assert p.grad is not None and params[name].grad is not None, name
        assert maxdiff(params[name].grad, p.grad) <= TOL, name


@given(case=rnn_cases(max_T=5))
def test_three_sgd_steps_match_torch(case):
    cfg, batch, T, with_h0, seed = case
    rnn = make_rnn(cfg, seed)
    net = from_rnn(rnn)
    opt_a = torch.optim.SGD(rnn.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_b = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    start = {k: v.detach().clone() for k, v in rnn.named_parameters()}
    for step in range(3):
        x, h0 = make_inputs(cfg, batch, T, with_h0, g)
        for module, opt in ((rnn, opt_a), (net, opt_b)):
            opt.zero_grad()
            torch.manual_seed(step)  # same dropout masks for both
            out, h_n = module(x, h0)
            (out.square().mean() + h_n.sum()).backward()
            opt.step()
    params = net.torch_parameters()
    moved = 0.0
    for name, p in rnn.named_parameters():
        assert maxdiff(params[name].detach(), p.detach()) <= TOL, name
        moved = max(moved, maxdiff(p.detach(), start[name]))
    assert moved > 0  # the steps did something (weight decay moves even dead relu units)


# --------------------------------------------------------------------------- structure
def test_map_structure():
    rnn = make_rnn(dict(input_size=3, hidden_size=4, num_layers=3, nonlinearity="relu"), 0)
    net = from_rnn(rnn)
    m = net.map
    assert isinstance(m, iternn.BlockMap)
    assert dict(m.slots) == {"x": 3, "h1": 4, "h2": 4, "h3": 4}
    assert set(m.edges) == {
        ("h1", "x"), ("h1", "h1"), ("h2", "h1"), ("h2", "h2"), ("h3", "h2"), ("h3", "h3"),
    }
    expected = {
        ("h1", "x"): "l0_ih", ("h1", "h1"): "l0_hh", ("h2", "h1"): "l1_ih",
        ("h2", "h2"): "l1_hh", ("h3", "h2"): "l2_ih", ("h3", "h3"): "l2_hh",
    }
    for (dst, src), suffix in expected.items():
        block = m.block(dst, src)
        assert type(block) is nn.Linear  # the engine fuses plain Linears
        layer, kind = suffix.split("_")
        assert torch.equal(block.weight, getattr(rnn, f"weight_{kind}_{layer}"))
        assert torch.equal(block.bias, getattr(rnn, f"bias_{kind}_{layer}"))
    assert len(m.biases) == 0  # the torch biases live in the blocks
    assert all(isinstance(m.activation(s), nn.ReLU) for s in ("h1", "h2", "h3"))
    assert m.activation("x") is None
    assert m.impulse_response_length() == math.inf  # the self-loops are cycles
    assert not m.graph().is_acyclic()
    assert m.graph().components() == [("x",), ("h1",), ("h2",), ("h3",)]


def test_tanh_activation_and_no_bias():
    net = from_rnn(nn.RNN(2, 3, bias=False))
    assert isinstance(net.map.activation("h1"), nn.Tanh)
    assert net.map.block("h1", "x").bias is None and net.map.block("h1", "h1").bias is None
    assert set(net.torch_parameters()) == {"weight_ih_l0", "weight_hh_l0"}


def test_parameters_are_copies():
    rnn = make_rnn(dict(input_size=2, hidden_size=3, num_layers=2), 1)
    before = {k: v.detach().clone() for k, v in rnn.named_parameters()}
    net = from_rnn(rnn)
    assert len(list(net.parameters())) == len(list(rnn.parameters())) == 8
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in rnn.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    out, h_n = net(torch.randn(4, 2, 2, dtype=F64))
    (out.sum() + h_n.sum()).backward()
    opt.step()
    for k, v in rnn.named_parameters():
        assert torch.equal(v, before[k]), k  # the source is untouched
        assert not torch.equal(net.torch_parameters()[k], v), k  # the copy moved
    with torch.no_grad():
        rnn.weight_hh_l0.add_(1.0)
    assert not torch.equal(net.torch_parameters()["weight_hh_l0"], rnn.weight_hh_l0)


def test_mode_dtype_device_and_requires_grad_are_copied():
    rnn = nn.RNN(2, 3, 2).eval()
    rnn.weight_hh_l1.requires_grad_(False)
    net = from_rnn(rnn)
    assert not net.training and not net.map.training
    device = rnn.weight_ih_l0.device
    assert all(p.dtype == torch.float32 and p.device == device for p in net.parameters())
    assert not net.torch_parameters()["weight_hh_l1"].requires_grad
    assert net.torch_parameters()["weight_hh_l0"].requires_grad
    assert from_rnn(rnn.train()).training
    assert from_rnn(rnn.double()).torch_parameters()["weight_ih_l0"].dtype == F64


def test_float32_works_and_dtype_follows():
    torch.manual_seed(2)
    rnn = nn.RNN(4, 8, 2, nonlinearity="relu", batch_first=True)
    net = from_rnn(rnn)
    x, h0 = torch.randn(3, 6, 4), torch.randn(2, 3, 8)
    out, h_n = net(x, h0)
    ref_out, ref_h = rnn(x, h0)
    assert out.dtype == h_n.dtype == torch.float32
    assert maxdiff(out, ref_out) <= 1e-5 and maxdiff(h_n, ref_h) <= 1e-5
    net64 = net.double()
    out64, _ = net64(x.double(), h0.double())
    assert out64.dtype == F64


def test_callers_tensors_are_not_mutated():
    torch.manual_seed(3)
    rnn = nn.RNN(3, 4, 2).double()
    net = from_rnn(rnn)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=F64, requires_grad=True)
    x0, h00 = x.detach().clone(), h0.detach().clone()
    out, h_n = net(x, h0)
    (out.sum() + h_n.sum()).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(h0.detach(), h00)
    assert x.grad is not None and h0.grad is not None


def test_unbatched_output_shapes():
    rnn = nn.RNN(3, 4, 2, batch_first=True).double()
    net = from_rnn(rnn)
    x = torch.randn(5, 3, dtype=F64)  # (T, n_in) whatever batch_first says
    out, h_n = net(x)
    assert out.shape == (5, 4) and h_n.shape == (2, 4)
    ref_out, ref_h = rnn(x)
    assert maxdiff(out, ref_out) <= TOL and maxdiff(h_n, ref_h) <= TOL


def test_forward_reads_the_map():
    """Editing a block of ``net.map`` changes the output the way the math says."""
    torch.manual_seed(4)
    rnn = nn.RNN(3, 4).double()
    net = from_rnn(rnn)
    with torch.no_grad():
        net.map.block("h1", "x").weight.zero_()
        rnn.weight_ih_l0.zero_()
    x = torch.randn(6, 2, 3, dtype=F64)
    out, _ = net(x)
    assert maxdiff(out, rnn(x)[0]) <= TOL
    assert maxdiff(out, out[:, :1].expand_as(out)) <= TOL  # input no longer matters


def test_jacobi_update_pipelines_layers_with_one_step_lag():
    """Under the paper's Jacobi update, layer 2 reads layer 1's *previous* step."""
    torch.manual_seed(5)
    rnn = nn.RNN(3, 4, 2).double()
    net = from_rnn(rnn)
    x = torch.randn(6, 2, 3, dtype=F64)
    h0 = torch.randn(2, 2, 4, dtype=F64)
    init = {"h1": h0[0], "h2": h0[1]}
    jac = iternn.iterate(net.map, init, 6, force={"x": x}, trajectory=True, update="jacobi")
    out, _ = rnn(x, h0)
    layer1 = nn.RNN(3, 4).double()
    layer2 = nn.RNN(4, 4).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer1, name + "_l0").copy_(getattr(rnn, name + "_l0"))
            getattr(layer2, name + "_l0").copy_(getattr(rnn, name + "_l1"))
    h1_traj, _ = layer1(x, h0[:1])
    assert maxdiff(jac["h1"], h1_traj) <= TOL  # the first layer has no lag
    assert maxdiff(jac["h2"], out) > 1e-3  # so Jacobi is not torch's stack ...
    delayed = torch.cat([h0[:1], h1_traj[:-1]])  # ... it is layer 2 fed one step late
    lagged, _ = layer2(delayed, h0[1:])
    assert maxdiff(jac["h2"], lagged) <= TOL


def test_dropout_in_train_mode_matches_torch_on_cpu():
    torch.manual_seed(6)
    rnn = nn.RNN(3, 5, 3, dropout=0.5).double().train()
    net = from_rnn(rnn)
    block = net.map.block("h2", "h1")
    assert isinstance(block, nn.Sequential) and isinstance(block[0], nn.Dropout)
    x = torch.randn(6, 4, 3, dtype=F64)
    torch.manual_seed(7)
    ref = rnn(x)
    torch.manual_seed(7)
    got = net(x)
    assert maxdiff(got[0], ref[0]) <= TOL and maxdiff(got[1], ref[1]) <= TOL
    net.eval()
    rnn.eval()
    assert maxdiff(net(x)[0], rnn(x)[0]) <= TOL
    assert maxdiff(net(x)[0], got[0]) > 1e-3  # dropout was active in train mode


def test_to_rnn_round_trip_and_constructor():
    torch.manual_seed(8)
    net = RNNMap(3, 4, 2, nonlinearity="relu", bias=False, batch_first=True, dtype=F64)
    bound = 1 / math.sqrt(4)
    assert all(p.abs().max() <= bound for p in net.parameters())
    back = net.to_rnn()
    assert isinstance(back, nn.RNN) and back.nonlinearity == "relu" and back.batch_first
    x = torch.randn(2, 5, 3, dtype=F64)
    assert maxdiff(back(x)[0], net(x)[0]) <= TOL
    shapes = {k: v.shape for k, v in back.named_parameters()}
    assert {k: v.shape for k, v in net.torch_parameters().items()} == shapes


def test_deepcopy_and_state_dict_round_trip():
    torch.manual_seed(9)
    net = from_rnn(nn.RNN(3, 4, 2).double())
    clone = copy.deepcopy(net)
    other = from_rnn(nn.RNN(3, 4, 2).double())
    other.load_state_dict(net.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    assert maxdiff(clone(x)[0], net(x)[0]) == 0.0
    assert maxdiff(other(x)[0], net(x)[0]) == 0.0


def test_extra_repr():
    text = repr(from_rnn(nn.RNN(3, 4, 2, nonlinearity="relu", bias=False, batch_first=True)))
    for piece in ("RNNMap(", "3, 4", "num_layers=2", "nonlinearity='relu'", "bias=False",
                  "batch_first=True", "update='ordered'"):
        assert piece in text, piece


def test_conversion_draws_no_random_numbers():
    rnn = nn.RNN(3, 4, 2, dropout=0.3)
    state = torch.get_rng_state()
    net = from_rnn(rnn)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.device.type == "cpu" for p in net.parameters())


# --------------------------------------------------------------------------- bad input
def _net(**kw) -> RNNMap:
    return from_rnn(nn.RNN(**{"input_size": 3, "hidden_size": 4, "num_layers": 2, **kw}).double())


def test_rejects_bidirectional():
    with pytest.raises(iternn.ConversionError, match="bidirectional"):
        from_rnn(nn.RNN(3, 4, bidirectional=True))


def test_rejects_proj_size():
    rnn = nn.RNN(3, 4)
    rnn.proj_size = 2  # nn.RNN refuses it at construction; the attribute still exists
    with pytest.raises(iternn.ConversionError, match="proj_size"):
        from_rnn(rnn)


@pytest.mark.parametrize("module", [nn.LSTM(3, 4), nn.GRU(3, 4), nn.Linear(3, 4)])
def test_rejects_non_rnn_modules(module):
    with pytest.raises(iternn.MapTypeError, match=type(module).__name__):
        from_rnn(module)


def test_rejects_subclass_overriding_forward():
    class Odd(nn.RNN):
        def forward(self, x, h0=None):
            return super().forward(2 * x, h0)

    with pytest.raises(iternn.MapTypeError, match="forward"):
        from_rnn(Odd(3, 4))


def test_rejects_wrong_input_size():
    with pytest.raises(iternn.MapError, match="'x'.*input_size=3"):
        _net()(torch.randn(5, 2, 4, dtype=F64))


@pytest.mark.parametrize("shape", [(5,), (1, 5, 2, 3)])
def test_rejects_wrong_input_dims(shape):
    with pytest.raises(iternn.MapError, match="'x'"):
        _net()(torch.randn(shape, dtype=F64))


def test_rejects_empty_sequence():
    with pytest.raises(iternn.MapError, match="length 0"):
        _net()(torch.randn(0, 2, 3, dtype=F64))


@pytest.mark.parametrize(
    "h_shape", [(2, 2, 5), (3, 2, 4), (2, 3, 4), (2, 4)], ids=["hidden", "layers", "batch", "dims"]
)
def test_rejects_wrong_h0_shape(h_shape):
    with pytest.raises(iternn.MapError, match=r"h0 must have shape .*slot 'h2'"):
        _net()(torch.randn(5, 2, 3, dtype=F64), torch.randn(h_shape, dtype=F64))


def test_rejects_batched_h0_for_unbatched_input():
    with pytest.raises(iternn.MapError, match="unbatched"):
        _net()(torch.randn(5, 3, dtype=F64), torch.randn(2, 1, 4, dtype=F64))


def test_rejects_wrong_input_dtype():
    with pytest.raises(iternn.MapTypeError, match="'x'.*float32"):
        _net()(torch.randn(5, 2, 3))


def test_rejects_integer_input():
    with pytest.raises(iternn.MapTypeError, match="floating point"):
        _net()(torch.ones(5, 2, 3, dtype=torch.long))


def test_rejects_h0_dtype_mismatch():
    with pytest.raises(iternn.MapTypeError, match="h0"):
        _net()(torch.randn(5, 2, 3, dtype=F64), torch.randn(2, 2, 4))


def test_rejects_packed_sequence():
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=F64), [5, 3])
    with pytest.raises(iternn.MapTypeError, match="PackedSequence"):
        _net()(packed)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(iternn.MapError, match="nonlinearity"):
        RNNMap(3, 4, nonlinearity="sigmoid")
    with pytest.raises(iternn.MapError, match="num_layers"):
        RNNMap(3, 4, num_layers=0)
    with pytest.raises(iternn.MapTypeError, match="hidden_size"):
        RNNMap(3, 4.0)


# --------------------------------------------------------------------------- benchmark
def _benchmark_module(monkeypatch):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("iternn_benchmark_run", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_the_rnn_benchmark_fails_with_a_broken_converter(monkeypatch, capsys):
    bench = _benchmark_module(monkeypatch)
    _, checks = bench.rnn_case("rnn", n_in=3, H=4, batch=2, T=3)
    assert [ok for _, _, ok in checks] == [True, True]

    def wrong(rnn):  # converts another RNN: a converter that disagrees with nn.RNN
        return from_rnn(nn.RNN(rnn.input_size, rnn.hidden_size))

    monkeypatch.setattr(iternn, "from_rnn", wrong)
    _, checks = bench.rnn_case("rnn", n_in=3, H=4, batch=2, T=3)
    assert [ok for _, _, ok in checks] == [False, False]

    def broken(rnn):
        raise iternn.ConversionError("broken")

    monkeypatch.setattr(iternn, "from_rnn", broken)
    with pytest.raises(iternn.ConversionError, match="broken"):
        bench.rnn_case("rnn", n_in=3, H=4, batch=2, T=3)
