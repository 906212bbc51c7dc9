"""``iternn.dynamics.as_matrix``: the block matrix F of a map whose blocks are linear, as one
sparse tensor — exact against torch (float64), refusals that name the block, the size guard."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import iternn
from iternn import MapTypeError, NotLinearError, SizeError
from iternn.core import memory
from iternn.dynamics import as_matrix
from iternn.dynamics import matrix as matrix_mod
from iternn.dynamics.matrix import block_matrix, linear_reason, module_matrix
from iternn.sparse import (
    BlockDiagonalLinear,
    DiagonalLinear,
    LowRankLinear,
    MaskedLinear,
    SparseLinear,
)

F64 = torch.float64


def dense(w):
    return w.to_dense()


def jacobian_of(module, in_shapes, out_shape):
    """Reference: the Jacobian of ``module`` at zero over all sources (float64), as
    torch.autograd computes it, ``(prod(out_shape), sum prod(in_shapes))``."""
    sizes = [torch.Size(s).numel() for s in in_shapes]

    def fn(flat):
        parts = torch.split(flat, sizes)
        return module(*(p.view(1, *s) for p, s in zip(parts, in_shapes))).reshape(-1)

    return torch.autograd.functional.jacobian(fn, torch.zeros(sum(sizes), dtype=F64))


def one_application(m, z):
    """``pack(m(z))`` and ``act(b + W pack(z))`` from as_matrix, for comparison."""
    w, b = as_matrix(m, bias=True)
    packed = m.pack(z)
    lin = (w @ packed.reshape(-1, m.size).t().to(F64)).t() + b
    parts = m.unpack(lin.reshape(packed.shape))
    out = {}
    for s, v in parts.items():
        v = v.to(packed.dtype)
        act = m.activation(s)
        out[s] = v if act is None else act(v.reshape(-1, *m.shapes[s])).reshape(v.shape)
    return m.pack(m(z)), m.pack(out)


def random_state(m, batch=(3,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(*batch, *shape, generator=g, dtype=F64) for s, shape in m.shapes.items()}


class Placement(nn.Module):
    """A declared-linear two-source block: ``conv(a) + upsample(b)`` (a concatenation-like
    placement of two slots into one)."""

    linear = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, a, b):
        return self.conv(a) + self.up(b)


class Product(nn.Module):
    rowwise = True

    def forward(self, a, b):
        return a * b


class Opaque(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return torch.sin(self.lin(x))


class DeclaredDense(nn.Module):
    """A custom block that declares itself linear (probed on the identity basis)."""

    linear = True

    def __init__(self, n_in, n_out):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.w = nn.Parameter(torch.randn(n_out, n_in, dtype=F64))
        self.b = nn.Parameter(torch.randn(n_out, dtype=F64))

    def forward(self, x):
        return x @ self.w.t() + self.b


# ---------------------------------------------------------------------------- exactness
SLOTS = {"x": (2, 4, 4), "h": (3, 4, 4), "p": (3, 2, 2), "v": 6, "w": 4}


def _candidates(draw):
    """One module per chosen block, drawn from a menu that fits the slots above."""
    pick = lambda options: draw(st.sampled_from(options))  # noqa: E731
    bias = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    mode = pick(["zeros", "reflect", "replicate", "circular"])
    menu = {
        ("h", "x"): lambda: nn.Conv2d(2, 3, pick([1, 3]), padding="same", bias=bias,
                                      dilation=pick([1, 2]) if mode == "zeros" else 1),
        ("h", "h"): lambda: nn.Conv2d(3, 3, 3, padding=1, groups=pick([1, 3]), bias=bias,
                                      padding_mode=mode),
        ("p", "h"): lambda: pick([
            lambda: nn.AvgPool2d(2),
            lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
            lambda: nn.AdaptiveAvgPool2d(2),
            lambda: nn.Conv2d(3, 3, 2, stride=2, bias=bias),
            lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=bias), nn.AvgPool2d(2)),
        ])(),
        ("h", "p"): lambda: pick([
            lambda: nn.ConvTranspose2d(3, 3, 2, stride=2, bias=bias),
            lambda: nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1, output_padding=1,
                                       groups=pick([1, 3]), bias=bias),
            lambda: nn.Upsample(scale_factor=2, mode=pick(["nearest", "bilinear"])),
        ])(),
        ("v", "p"): lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=bias)),
        ("v", "v"): lambda: pick([
            lambda: SparseLinear(6, 6, density=0.3, bias=bias, generator=g, backend="dense"),
            lambda: MaskedLinear(6, 6, mask=torch.rand(6, 6, generator=g) < 0.5, bias=bias,
                                 generator=g),
            lambda: DiagonalLinear(6, bias=bias),
            lambda: nn.Linear(6, 6, bias=bias),
        ])(),
        ("w", "v"): lambda: pick([
            lambda: LowRankLinear(6, 4, rank=2, bias=bias, generator=g),
            lambda: BlockDiagonalLinear(6, 4, blocks=2, bias=bias, generator=g),
        ])(),
        ("x", "w"): lambda: nn.Sequential(nn.Linear(4, 32, bias=bias), nn.Unflatten(1, (2, 4, 4))),
        ("h", ("x", "p")): Placement,
    }
    chosen = draw(st.lists(st.sampled_from(list(menu)), min_size=1, max_size=len(menu),
                           unique=True))
    return [(d, s, menu[(d, s)]()) for d, s in chosen]


@st.composite
def linear_maps(draw):
    blocks = _candidates(draw)
    torch.manual_seed(draw(st.integers(0, 10_000)))
    m = iternn.BlockMap(SLOTS)
    for d, s, module in blocks:
        m.connect(d, s, module)
    with torch.no_grad():  # random, non-trivial weights everywhere (DiagonalLinear starts at 1)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape))
    return m.double().eval()


@given(linear_maps())
def test_one_application_is_w_times_the_packed_state(m):
    """Without biases and activations: ``pack(m(z)) == W @ pack(z)`` per sample."""
    for key in list(m.blocks):  # strip every block's own bias: F is the linear part alone
        for sub in m.blocks[key].modules():
            if getattr(sub, "bias", None) is not None and isinstance(sub.bias, nn.Parameter):
                sub.bias = None
    z = random_state(m)
    w = as_matrix(m)
    assert w.layout == torch.sparse_coo and w.is_coalesced() and w.dtype == F64
    assert w.shape == (m.size, m.size)
    got = (w @ m.pack(z).t()).t()
    torch.testing.assert_close(got, m.pack(m(z)), rtol=1e-12, atol=1e-12)


@given(linear_maps(), st.booleans())
def test_with_biases_and_activations_one_application_is_act_of_b_plus_w_z(m, act):
    m.set_bias("h", torch.randn(3, 4, 4, dtype=F64))
    m.set_bias("v", torch.randn(6, dtype=F64))
    if act:
        m.set_activation("h", nn.Tanh())
        m.set_activation("w", nn.ReLU())
    got, ref = one_application(m, random_state(m, batch=(2, 2)))
    torch.testing.assert_close(ref, got, rtol=1e-12, atol=1e-12)


@given(linear_maps())
def test_each_block_matrix_is_torchs_jacobian(m):
    """The matrix of every block is the Jacobian torch.autograd computes for the module
    alone, and W is their sum placed at (rows of dst, columns of each source)."""
    starts, at = {}, 0
    for s, n in m.slots.items():
        starts[s] = at
        at += n
    expected = torch.zeros(m.size, m.size, dtype=F64)
    for dst, src in m.edges:
        srcs = (src,) if isinstance(src, str) else src
        jac = jacobian_of(m.block(dst, src), [m.shapes[s] for s in srcs], m.shapes[dst])
        torch.testing.assert_close(dense(block_matrix(m, dst, src)), jac, rtol=1e-13, atol=1e-14)
        r0, col = starts[dst], 0
        for s in srcs:
            expected[r0:r0 + m.slots[dst], starts[s]:starts[s] + m.slots[s]] += \
                jac[:, col:col + m.slots[s]]
            col += m.slots[s]
    torch.testing.assert_close(dense(as_matrix(m)), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("make, in_shape", [
    (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2), (2, 9)),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2), (4, 7, 5)),
    (lambda: nn.Conv2d(2, 3, (3, 4), padding="same", dilation=(1, 2), padding_mode="reflect"),
     (2, 6, 7)),
    (lambda: nn.Conv2d(2, 2, 3, padding=2, padding_mode="circular"), (2, 4, 5)),
    (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate"), (2, 4, 5)),
    (lambda: nn.Conv3d(2, 2, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)), (2, 3, 5, 4)),
    (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2),
     (4, 5)),
    (lambda: nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 3), dilation=(2, 1), groups=2),
     (2, 3, 3)),
    (lambda: nn.ConvTranspose3d(2, 1, 2, stride=2), (2, 2, 2, 3)),
    (lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
     (3, 6, 5)),
    (lambda: nn.AvgPool1d(2), (3, 7)),
    (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7)),
    (lambda: nn.AdaptiveAvgPool3d(2), (1, 3, 4, 5)),
    (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), (2, 3, 3)),
    (lambda: nn.ReflectionPad2d((1, 2, 0, 1)), (2, 4, 4)),
    (lambda: nn.ConstantPad1d(2, 3.5), (2, 4)),
    (lambda: nn.PixelShuffle(2), (8, 2, 3)),
    (lambda: nn.Unfold(2), (2, 3, 4)),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout(0.5), nn.AvgPool2d(2), nn.Flatten(),
                           nn.Linear(3, 2)), (2, 4, 4)),
    (lambda: nn.Linear(5, 3), (4, 5)),  # a linear layer on the last dim of a shaped slot
    (lambda: nn.Identity(), (2, 3)),
])
def test_module_matrix_is_the_jacobian(make, in_shape, monkeypatch):
    torch.manual_seed(0)
    module = make().double().eval()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                           nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # built from the index geometry (and checked), never probed column by column
        monkeypatch.setattr(matrix_mod, "_probe", lambda *a: pytest.fail("probed"))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape))
        out_shape = tuple(module(torch.zeros(1, *in_shape, dtype=F64)).shape[1:])
    w = module_matrix(module, [in_shape], out_shape)
    assert w.dtype == F64 and w.is_coalesced()
    torch.testing.assert_close(dense(w), jacobian_of(module, [in_shape], out_shape),
                               rtol=1e-13, atol=1e-15)


def test_batch_norm_in_eval_mode_is_a_per_channel_scale_and_its_shift_the_bias():
    m = iternn.BlockMap({"x": (3, 2, 2), "h": (3, 2, 2)})
    bn = m.connect("h", "x", nn.BatchNorm2d(3))
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, 3.0, -1.0]))
        bn.bias.copy_(torch.tensor([1.0, 0.0, 0.5]))
    m.double().eval()
    w, b = as_matrix(m, bias=True)
    scale = torch.tensor([2.0, 3.0, -1.0], dtype=F64) / torch.sqrt(
        torch.tensor([4.0, 0.25, 1.0], dtype=F64) + bn.eps)
    expected = torch.zeros(24, 24, dtype=F64)
    expected[12:, :12] = torch.diag(scale.repeat_interleave(4))
    torch.testing.assert_close(dense(w), expected, rtol=1e-15, atol=0)
    shift = torch.tensor([1.0, 0.0, 0.5], dtype=F64) - torch.tensor([0.5, -1.0, 2.0],
                                                                    dtype=F64) * scale
    torch.testing.assert_close(b[12:], shift.repeat_interleave(4), rtol=1e-14, atol=1e-15)
    assert not bool(b[:12].any())


def test_a_conv_block_is_block_toeplitz():
    """Conv2d (padding 1) from C_in to C_out channels on H x W: the sub-block of every
    channel pair is constant along each offset (di, dj) — block-Toeplitz with Toeplitz
    blocks — and holds the kernel entry for that offset; every other entry is zero."""
    c_in, c_out, h, wd = 2, 3, 5, 6
    m = iternn.BlockMap({"x": (c_in, h, wd), "y": (c_out, h, wd)})
    conv = m.connect("y", "x", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)).double()
    m.double()
    w = dense(block_matrix(m, "y", "x")).reshape(c_out, h, wd, c_in, h, wd)
    i = torch.arange(h)
    j = torch.arange(wd)
    di = i.view(h, 1, 1, 1) - i.view(1, 1, h, 1)  # (i_out, ., i_in, .)
    dj = j.view(1, wd, 1, 1) - j.view(1, 1, 1, wd)
    for o in range(c_out):
        for c in range(c_in):
            sub = w[o, :, :, c]  # (h, wd, h, wd)
            for a in range(-h + 1, h):
                for b in range(-wd + 1, wd):
                    entries = sub[(di == a).expand_as(sub) & (dj == b).expand_as(sub)]
                    if abs(a) <= 1 and abs(b) <= 1:
                        # output (i, j) reads input (i - a, j - b): kernel tap (1 - a, 1 - b)
                        tap = float(conv.weight.detach()[o, c, 1 - a, 1 - b])
                        assert torch.equal(entries, torch.full_like(entries, tap))
                    else:
                        assert not bool(entries.any())


def test_flatten_is_the_identity_in_pack_order_and_a_shaped_linear_is_a_kronecker():
    m = iternn.BlockMap({"x": (2, 3), "f": 6, "y": (2, 4)})
    m.connect("f", "x", nn.Flatten())
    lin = m.connect("y", "x", nn.Linear(3, 4, bias=False))
    m.double()
    w = dense(as_matrix(m))
    assert torch.equal(w[6:12, 0:6], torch.eye(6, dtype=F64))
    assert torch.equal(w[12:20, 0:6], torch.block_diag(lin.weight, lin.weight).detach())


def test_a_declared_multi_source_block_spans_all_its_sources():
    torch.manual_seed(1)
    m = iternn.BlockMap({"a": (2, 4, 4), "b": (3, 2, 2), "y": (3, 4, 4)})
    blk = m.connect("y", ("a", "b"), Placement())
    m.double()
    w = dense(as_matrix(m))
    ref = jacobian_of(blk, [(2, 4, 4), (3, 2, 2)], (3, 4, 4))
    torch.testing.assert_close(w[44:, :44], ref, rtol=1e-14, atol=0)
    assert bool(w[44:, :32].any()) and bool(w[44:, 32:44].any())
    # the same slot read twice: its two column blocks add up
    m2 = iternn.BlockMap({"a": (2, 4, 4), "y": (2, 4, 4)})

    class Twice(nn.Module):
        linear = True

        def forward(self, u, v):
            return 2 * u - 0.5 * v

    m2.connect("y", ("a", "a"), Twice())
    w2 = dense(as_matrix(m2))
    assert torch.equal(w2[32:, :32], 1.5 * torch.eye(32, dtype=F64))


def test_declared_custom_block_is_probed_and_its_offset_is_the_bias():
    torch.manual_seed(2)
    m = iternn.BlockMap({"x": 5, "y": 3})
    blk = m.connect("y", "x", DeclaredDense(5, 3))
    w, b = as_matrix(m, bias=True)
    torch.testing.assert_close(dense(w)[5:, :5], blk.w.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(b[5:], blk.b.detach(), rtol=0, atol=0)


def test_a_wrong_shortcut_falls_back_to_probing(monkeypatch):
    """Every structural shortcut is checked on a random input: a wrong one is not used."""
    def wrong(module, in_shape, out_shape, where):
        n_out, n_in = torch.Size(out_shape).numel(), torch.Size(in_shape).numel()
        r = torch.arange(min(n_out, n_in))
        return matrix_mod._Part(r, r, torch.ones(r.numel(), dtype=F64), (n_out, n_in))

    monkeypatch.setattr(matrix_mod, "_conv", wrong)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    w = module_matrix(conv, [(2, 4, 4)], (3, 4, 4))
    torch.testing.assert_close(dense(w), jacobian_of(conv, [(2, 4, 4)], (3, 4, 4)),
                               rtol=1e-14, atol=0)


def test_a_float32_map_gives_its_weights_exactly_in_float64():
    torch.manual_seed(3)
    m = iternn.BlockMap({"x": (2, 5, 5), "h": (3, 5, 5)})
    conv = m.connect("h", "x", nn.Conv2d(2, 3, 3, padding=1))
    w = dense(block_matrix(m, "h", "x")).reshape(3, 5, 5, 2, 5, 5)
    assert w.dtype == F64
    # the centre output (2, 2) reads the 3x3 window around it: the kernel itself, exactly
    assert torch.equal(w[:, 2, 2, :, 1:4, 1:4], conv.weight.detach().double())
    z = random_state(m)
    z32 = {s: v.float() for s, v in z.items()}
    got, ref = one_application(m, z32)
    torch.testing.assert_close(ref, got, rtol=1e-5, atol=1e-5)  # float32 rounding


def test_map_without_blocks_and_the_map_module_wrapper():
    m = iternn.BlockMap({"x": 2, "y": (1, 3)})
    w, b = as_matrix(m, bias=True)
    assert w.shape == (5, 5) and w._nnz() == 0 and not bool(b.any())
    net = iternn.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).double()
    w = dense(as_matrix(net))  # a MapModule: its map; the tanh is the slot's, not in F
    torch.testing.assert_close(w[3:7, 0:3], net.map.block("h1", "x").weight.detach())
    with pytest.raises(MapTypeError, match="bias must be a bool"):
        as_matrix(m, bias=1)
    with pytest.raises(MapTypeError):
        as_matrix(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- refusals
def _bn_train():
    return nn.BatchNorm2d(2)


REFUSED = [
    ("activation in a Sequential", lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()),
     r"layer 1 of its nn.Sequential: nn.ReLU is not linear"),
    ("batch norm in train mode", _bn_train, r"nn.BatchNorm2d in train mode"),
    ("batch norm without running stats",
     lambda: nn.BatchNorm2d(2, track_running_stats=False).eval(),
     r"nn.BatchNorm2d without running statistics.*\(track_running_stats=False\)"),
    ("max pooling", lambda: nn.Sequential(nn.MaxPool2d(3, 1, 1)),
     r"layer 0 of its nn.Sequential: nn.MaxPool2d is not linear"),
    ("layer norm", lambda: nn.LayerNorm([2, 4, 4]), r"nn.LayerNorm is not linear"),
    ("dropout in train mode", lambda: nn.Dropout(0.3),
     r"nn.Dropout in train mode drops random entries"),
    ("opaque module", lambda: nn.Sequential(nn.Flatten(), Opaque(32), nn.Unflatten(1, (2, 4, 4))),
     r"layer 1 of its nn.Sequential: Opaque is not a known linear layer.*linear = True"),
]


@pytest.mark.parametrize("what, make, reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_non_linear_block_is_refused_naming_it(what, make, reason):
    m = iternn.BlockMap({"x": (2, 4, 4), "h": (2, 4, 4)})
    m.connect("h", "h", nn.Conv2d(2, 2, 3, padding=1))  # linear: fine
    m.connect("h", "x", make())
    with pytest.raises(NotLinearError, match=r"block 'h' <- 'x' is not linear: " + reason) as info:
        as_matrix(m)
    assert isinstance(info.value, MapTypeError) and isinstance(info.value, TypeError)
    assert info.value.block == ("h", "x")
    with pytest.raises(NotLinearError, match=r"block 'h' <- 'x'"):
        block_matrix(m, "h", "x")
    err = pickle.loads(pickle.dumps(info.value))
    assert str(err) == str(info.value) and err.block == ("h", "x")


def test_a_product_of_two_sources_a_nested_map_and_hooks_are_refused():
    m = iternn.BlockMap({"a": 3, "b": 3, "c": 3})
    m.connect("c", ("a", "b"), Product())
    with pytest.raises(NotLinearError, match=r"block 'c' <- \('a', 'b'\) is not linear: Product "
                                             r"reads 2 slots.*linear = True"):
        as_matrix(m)
    inner = iternn.BlockMap({"x": 3, "y": 3})
    inner.connect("y", "x", nn.Linear(3, 3))
    m = iternn.BlockMap({"a": 3, "c": 3})
    m.connect("c", "a", iternn.MapModule(inner, input="x", output="y", steps=1))
    with pytest.raises(NotLinearError, match=r"block 'c' <- 'a' is not linear: MapModule is a "
                                             r"nested block map"):
        as_matrix(m)
    m = iternn.BlockMap({"a": 3, "c": 3})
    lin = m.connect("c", "a", nn.Linear(3, 3))
    lin.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(NotLinearError, match=r"block 'c' <- 'a' is not linear: nn.Linear has "
                                             r"forward hooks"):
        as_matrix(m)
    assert linear_reason(nn.Linear(2, 2)) is None
    assert "not linear" in linear_reason(nn.Tanh())


def test_every_block_is_checked_before_anything_is_computed(monkeypatch):
    m = iternn.BlockMap({"x": (2, 4, 4), "h": (2, 4, 4)})
    m.connect("h", "x", nn.Conv2d(2, 2, 3, padding=1))
    m.connect("h", "h", nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()))
    monkeypatch.setattr(matrix_mod, "_linear_part", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(NotLinearError, match="block 'h' <- 'h'"):
        as_matrix(m)


def test_eval_mode_batch_norm_and_dropout_are_accepted():
    m = iternn.BlockMap({"x": (2, 3, 3), "h": (2, 3, 3)})
    m.connect("h", "x", nn.Sequential(_bn_train(), nn.Dropout(0.5)))
    with pytest.raises(NotLinearError):
        as_matrix(m)
    m.double().eval()
    got, ref = one_application(m, random_state(m))
    torch.testing.assert_close(ref, got, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------- size guard
def test_the_size_guard_refuses_before_building(monkeypatch):
    """A conv on an 8x64x64 feature map has about 2.4 million entries (about 113 MB while
    built): refused on a machine with 100 MB available, before any block is computed."""
    m = iternn.BlockMap({"x": (8, 64, 64), "y": (8, 64, 64)})
    m.connect("y", "x", nn.Conv2d(8, 8, 3, padding=1))
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 100 * 10**6)
    monkeypatch.setattr(matrix_mod, "_linear_part", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(SizeError, match=r"as_matrix of the 65536x65536 map: about 2359296 "
                                        r"entries.*more than the 100.0 MB available"):
        as_matrix(m)


def test_the_size_guard_checks_a_probed_block_as_it_goes(monkeypatch):
    """A declared-linear custom block has no structure to estimate from: its probe projects
    the entries from the first chunk of columns and stops there."""
    m = iternn.BlockMap({"x": 3000, "y": 3000})
    m.connect("y", "x", DeclaredDense(3000, 3000))
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 100 * 10**6)
    calls = []
    original = matrix_mod._probe

    def counting(fn, *args):
        calls.append(1)
        return original(lambda *xs: (calls.append(1), fn(*xs))[1], *args)

    monkeypatch.setattr(matrix_mod, "_probe", counting)
    with pytest.raises(SizeError, match=r"block 'y' <- 'x': about 9000000 entries \(projected "
                                        r"from \d+ in the first \d+ of 3000 columns\)"):
        as_matrix(m)
    assert len(calls) <= 3  # the zero response and one chunk: refused after the first chunk


def test_converted_concatenating_net_is_one_matrix():
    """from_module's shape and placement blocks (flatten, cat) declare themselves linear."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.b = nn.Conv2d(5, 2, 1, bias=False)
            self.out = nn.Linear(2 * 16, 3, bias=False)

        def forward(self, x):
            h = torch.cat([x, self.a(x)], dim=1)
            return self.out(torch.flatten(self.b(h), 1))

    torch.manual_seed(0)
    net = iternn.from_module(Dense().double(), torch.randn(2, 2, 4, 4, dtype=torch.float64))
    m = net.map
    w = as_matrix(m)
    g = torch.Generator().manual_seed(1)
    z = {s: torch.randn(3, *shape, generator=g, dtype=torch.float64) for s, shape in m.shapes.items()}
    one = m(z)
    torch.testing.assert_close(m.pack(z) @ w.to_dense().t(), m.pack(one), rtol=0, atol=1e-12)
    assert any(type(b).__name__ == "Place" for b in m.blocks.values())
