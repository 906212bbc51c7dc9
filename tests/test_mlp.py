"""from_mlp / to_mlp: exact, drop-in conversion over random architectures (float64)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iternn

ACTS = [
    nn.ReLU, lambda: nn.LeakyReLU(0.2), nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.GELU("tanh"),
    nn.ELU, nn.SiLU, nn.Identity,
]


@st.composite
def mlps(draw, dropout: bool = False):
    widths = draw(st.lists(st.integers(1, 12), min_size=2, max_size=6))
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        for _ in range(draw(st.integers(0, 2))):
            layers.append(draw(st.sampled_from(ACTS))())
        if dropout and draw(st.booleans()):
            layers.append(nn.Dropout(draw(st.floats(0.1, 0.6))))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    seq = nn.Sequential(*layers)
    for mod in seq:
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.8)
            if mod.bias is not None:
                nn.init.normal_(mod.bias)
    return seq.double(), widths


def _pairs(seq: nn.Sequential, net: iternn.MapModule):
    """(torch parameter, map parameter) pairs: W_k <-> F[h_k, h_{k-1}], b_k <-> b_{h_k}."""
    m = net.map
    names = list(m.slots)
    linears = [mod for mod in seq if isinstance(mod, nn.Linear)]
    out = []
    for k, lin in enumerate(linears):
        out.append((lin.weight, m.block(names[k + 1], names[k]).weight))
        if lin.bias is not None:
            out.append((lin.bias, m.bias(names[k + 1])))
    return out


@given(mlps(), st.lists(st.integers(1, 4), max_size=2))
def test_forward_and_gradients_equal_torch(arch, batch):
    seq, widths = arch
    net = iternn.from_mlp(seq)
    x = torch.randn(*batch, widths[0], dtype=torch.float64, requires_grad=True)
    y_t, y_m = seq(x), net(x)
    assert y_m.shape == y_t.shape and y_m.dtype == torch.float64
    assert (y_m - y_t).abs().max() <= 1e-6
    pairs = _pairs(seq, net)
    w = torch.randn_like(y_t)
    g_t = torch.autograd.grad((y_t * w).sum(), [x] + [p for p, _ in pairs])
    g_m = torch.autograd.grad((y_m * w).sum(), [x] + [q for _, q in pairs])
    for a, b in zip(g_t, g_m):
        assert (a - b).abs().max() <= 1e-6
    # every trainable map parameter is one of the MLP's: nothing extra, nothing missing
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in seq.parameters())


@settings(max_examples=15)
@given(mlps(), st.sampled_from(["sgd", "adam"]))
def test_parameters_equal_after_optimizer_steps(arch, opt_name):
    seq, widths = arch
    net = iternn.from_mlp(seq)
    # small steps: deep random nets with std-0.8 weights would diverge under big ones
    make = (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)) if opt_name == "sgd" else (
        lambda p: torch.optim.Adam(p, lr=1e-3))
    opt_t, opt_m = make(seq.parameters()), make(net.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, widths[0], dtype=torch.float64, generator=g)
        target = torch.randn(8, widths[-1], dtype=torch.float64, generator=g)
        for model, opt in ((seq, opt_t), (net, opt_m)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    moved = False
    for p, q in _pairs(seq, net):
        assert torch.isfinite(p).all() and (p - q).abs().max() <= 1e-6
        moved |= bool(p.grad is not None and p.grad.abs().max() > 0)
    assert moved or all(p.grad is None or p.grad.abs().max() == 0 for p in seq.parameters())
    x = torch.randn(4, widths[0], dtype=torch.float64, generator=g)
    assert (seq(x) - net(x)).abs().max() <= 1e-6


@settings(max_examples=15)
@given(mlps(dropout=True))
def test_dropout_in_train_mode_uses_the_same_rng_stream(arch):
    seq, widths = arch
    seq.train()
    net = iternn.from_mlp(seq)
    assert net.training
    x = torch.randn(6, widths[0], dtype=torch.float64)
    torch.manual_seed(123)
    y_t = seq(x)
    torch.manual_seed(123)
    y_m = net(x)
    assert (y_t - y_m).abs().max() <= 1e-6
    seq.eval()
    net.eval()
    assert (seq(x) - net(x)).abs().max() <= 1e-6


@given(mlps())
def test_to_mlp_round_trip(arch):
    seq, widths = arch
    back = iternn.to_mlp(iternn.from_mlp(seq))
    x = torch.randn(3, widths[0], dtype=torch.float64)
    assert (back(x) - seq(x)).abs().max() <= 1e-12
    assert sum(isinstance(m, nn.Linear) for m in back) == len(widths) - 1


@given(mlps())
def test_structure_fixed_point_and_finite_impulse_response(arch):
    """The paper's two facts (§4.3.1): with x held, applications beyond L change
    nothing; without the hold, after L+1 applications nothing depends on x."""
    seq, widths = arch
    net = iternn.from_mlp(seq)
    m, L = net.map, len(widths) - 1
    assert m.impulse_response_length() == L
    assert math.isinf(m.impulse_response_length(hold=["x"]))
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, widths[0], dtype=torch.float64, generator=g)
    x2 = torch.randn(5, widths[0], dtype=torch.float64, generator=g)
    rest = {s: torch.randn(5, n, dtype=torch.float64, generator=g)
            for s, n in m.slots.items() if s != "x"}
    held = iternn.iterate(m, {"x": x1, **rest}, L, hold=["x"])
    assert torch.equal(held["y"], net(x1))
    for extra in (L + 1, L + 3):
        later = iternn.iterate(m, {"x": x1, **rest}, extra, hold=["x"])
        assert all(torch.equal(later[s], held[s]) for s in m.slots)
    # step-by-step (no plan), without the hold: forgets x after L+1 applications
    s1, s2 = {"x": x1, **rest}, {"x": x2, **rest}
    for k in range(1, L + 2):
        s1, s2 = m(s1), m(s2)
        if k == L:  # the input's last trace: y after L applications is MLP(x0)
            assert (s1["y"] - net(x1)).abs().max() <= 1e-12
    assert all(torch.equal(s1[s], s2[s]) for s in m.slots)


def test_conversion_copies_parameters_and_mode():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).eval()
    net = iternn.from_mlp(seq)
    assert not net.training
    with torch.no_grad():
        net.map.block("h1", "x").weight.add_(1.0)
    assert not torch.equal(net.map.block("h1", "x").weight, seq[0].weight)


def test_float32_default_and_nesting_as_block():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    net = iternn.from_mlp(seq)
    assert (net.in_features, net.out_features) == (4, 4)
    outer = iternn.BlockMap({"u": 4, "v": 4})
    outer.connect("v", "u", net)  # a converted MLP is a block of another map
    u = torch.randn(2, 4)
    out = iternn.iterate(outer, {"u": u}, 1, hold=["u"])
    assert out["v"].dtype == torch.float32
    assert torch.allclose(out["v"], seq(u), atol=1e-6)


def test_input_wrong_size():
    net = iternn.from_mlp(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(iternn.MapError, match="'x'"):
        net(torch.ones(2, 4))


def test_input_wrong_dtype():
    net = iternn.from_mlp(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(iternn.MapTypeError, match="float64"):
        net(torch.ones(2, 3, dtype=torch.float64))


def test_unsupported_layer_named_with_index():
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 1, 1))
    with pytest.raises(iternn.MapTypeError, match="layer 2 \\(Conv1d\\)"):
        iternn.from_mlp(seq)


def test_activation_before_first_linear():
    with pytest.raises(iternn.ConversionError, match="layer 0 \\(ReLU\\)"):
        iternn.from_mlp(nn.Sequential(nn.ReLU(), nn.Linear(3, 4)))


def test_linear_sizes_do_not_chain():
    with pytest.raises(iternn.ConversionError, match="layer 2 \\(Linear\\)"):
        iternn.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)))


def test_not_a_sequential():
    with pytest.raises(iternn.MapTypeError, match="Linear"):
        iternn.from_mlp(nn.Linear(3, 4))


def test_no_linear_layer():
    with pytest.raises(iternn.ConversionError, match="at least one Linear"):
        iternn.from_mlp(nn.Sequential())


def test_to_mlp_rejects_non_chain():
    m = iternn.BlockMap({"x": 2, "h": 2, "y": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    m.connect("y", "h", nn.Linear(2, 2))
    m.connect("y", "x", nn.Linear(2, 2))
    with pytest.raises(iternn.ConversionError, match="'x' feeds 2 blocks"):
        iternn.to_mlp(m)


def test_to_mlp_rejects_non_linear_block():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(iternn.MapTypeError, match="'y' <- 'x'"):
        iternn.to_mlp(m)


def test_tied_linear_is_refused():
    lin = nn.Linear(3, 3)
    with pytest.raises(iternn.ConversionError, match="layer 2 \\(Linear\\) is the same module as layer 0"):
        iternn.from_mlp(nn.Sequential(lin, nn.Tanh(), lin))


def test_to_mlp_refuses_too_few_steps():
    net = iternn.from_mlp(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    short = iternn.MapModule(net.map, steps=1)
    with pytest.raises(iternn.ConversionError, match="fewer than its chain's depth 2"):
        iternn.to_mlp(short)
