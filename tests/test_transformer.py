"""``from_transformer``: an nn.TransformerEncoder as an iterated block map.

Slots x, l1 ... lN (+ y with a final norm); F[l(k), l(k-1)] = layer k and F[y, lN] =
norm on the block sub-diagonal (row = destination, column = source). Equivalence with
torch is checked over random architectures: outputs, input and parameter gradients,
optimizer steps, the layers' keyword arguments, and torch's nested-tensor fast path.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import iternn
from iternn.convert.transformer import EncoderLayerBlock, TransformerMap, from_transformer

# torch's own prototype notice, raised when its nested fast path runs
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

TOL = 1e-6
MASKS = (None, "causal", "bool", "float", "bool3d")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead (~10x on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Arch:
    num_layers: int
    d_model: int
    nhead: int
    dim_feedforward: int
    activation: str
    norm_first: bool
    batch_first: bool
    eps: float
    final_norm: bool
    bias: bool
    nested: bool  # enable_nested_tensor
    seed: int


@st.composite
def archs(draw, *, fast_path: bool = False) -> Arch:
    """A random tiny encoder; ``fast_path`` draws one torch may run on nested tensors."""
    d_model = draw(st.sampled_from((4, 6, 8, 12, 16)))
    heads = [h for h in range(1, d_model + 1) if d_model % h == 0]
    if fast_path:
        heads = [h for h in heads if h % 2 == 0]
    return Arch(
        num_layers=draw(st.integers(1, 3)),
        d_model=d_model,
        nhead=draw(st.sampled_from(heads)),
        dim_feedforward=draw(st.integers(8, 32)),
        activation=draw(st.sampled_from(("relu", "gelu"))),
        norm_first=False if fast_path else draw(st.booleans()),
        batch_first=True if fast_path else draw(st.booleans()),
        eps=draw(st.sampled_from((1e-5, 1e-6, 1e-3))),
        final_norm=draw(st.booleans()),
        bias=True if fast_path else draw(st.booleans()),
        nested=True if fast_path else draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_encoder(a: Arch, dtype: torch.dtype = torch.float64, dropout: float = 0.1) -> nn.TransformerEncoder:
    """The encoder of ``a`` in eval mode, every parameter perturbed (layers differ)."""
    torch.manual_seed(a.seed)
    layer = nn.TransformerEncoderLayer(
        a.d_model, a.nhead, a.dim_feedforward, dropout=dropout, activation=a.activation,
        layer_norm_eps=a.eps, batch_first=a.batch_first, norm_first=a.norm_first,
        bias=a.bias, dtype=dtype,
    )
    norm = nn.LayerNorm(a.d_model, eps=a.eps, bias=a.bias, dtype=dtype) if a.final_norm else None
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ..." for some archs
        warnings.simplefilter("ignore", UserWarning)
        enc = nn.TransformerEncoder(layer, a.num_layers, norm=norm, enable_nested_tensor=a.nested)
    gen = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return enc.eval()


def make_src(a: Arch, batch: int, seq: int, unbatched: bool, gen: torch.Generator,
             dtype: torch.dtype = torch.float64) -> Tensor:
    if unbatched:
        shape = (seq, a.d_model)
    else:
        shape = (batch, seq, a.d_model) if a.batch_first else (seq, batch, a.d_model)
    return torch.randn(shape, generator=gen, dtype=dtype)


def make_masks(a: Arch, kind: str | None, padding: bool, batch: int, seq: int, unbatched: bool,
               gen: torch.Generator, dtype: torch.dtype = torch.float64):
    """(mask, src_key_padding_mask); key 0 is never masked, so no row is fully masked."""
    mask = None
    if kind == "causal":
        mask = nn.Transformer.generate_square_subsequent_mask(seq, dtype=dtype)
    elif kind in ("bool", "bool3d"):
        lead = () if kind == "bool" else ((1 if unbatched else batch) * a.nhead,)
        mask = torch.rand(*lead, seq, seq, generator=gen) < 0.4
        mask[..., 0] = False
        mask = mask & ~torch.eye(seq, dtype=torch.bool)
    elif kind == "float":
        mask = torch.randn(seq, seq, generator=gen, dtype=dtype)
    kpm = None
    if padding:
        kpm = torch.rand(seq if unbatched else (batch, seq), generator=gen) < 0.4
        kpm[..., 0] = False
        if mask is not None and mask.is_floating_point():  # same mask types: no torch warning
            kpm = torch.zeros(kpm.shape, dtype=dtype).masked_fill(kpm, -math.inf)
    return mask, kpm


def paired_parameters(net: TransformerMap, enc: nn.TransformerEncoder) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, map parameter, encoder parameter)`` for every parameter, a bijection.

    ``map.blocks.l{k}<-*.layer.P`` is ``layers.{k-1}.P``; ``map.blocks.y<-l{N}.P`` is
    ``norm.P``.
    """
    enc_params = dict(enc.named_parameters())
    pairs = []
    for name, p in net.named_parameters():
        parts = name.split(".")
        assert parts[:2] == ["map", "blocks"], name
        dst = parts[2].split("<-")[0]
        if dst == "y":
            other = "norm." + ".".join(parts[3:])
        else:
            assert parts[3] == "layer", name
            other = f"layers.{int(dst[1:]) - 1}." + ".".join(parts[4:])
        pairs.append((name, p, enc_params.pop(other)))
    assert not enc_params, f"encoder parameters without a twin: {sorted(enc_params)}"
    return pairs


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------- equivalence
@given(
    a=archs(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    unbatched=st.booleans(),
    kind=st.sampled_from(MASKS),
    padding=st.booleans(),
)
def test_outputs_and_gradients_match_encoder(a, batch, seq, unbatched, kind, padding):
    enc = make_encoder(a)
    net = from_transformer(enc)
    gen = torch.Generator().manual_seed(a.seed + 2)
    src = make_src(a, batch, seq, unbatched, gen)
    mask, kpm = make_masks(a, kind, padding, batch, seq, unbatched, gen)
    weight = torch.randn(src.shape, generator=gen, dtype=src.dtype)

    x1 = src.clone().requires_grad_(True)
    x2 = src.clone().requires_grad_(True)
    out_net = net(x1, mask=mask, src_key_padding_mask=kpm)
    out_enc = enc(x2, mask=mask, src_key_padding_mask=kpm)
    assert out_net.shape == out_enc.shape == src.shape
    assert torch.isfinite(out_enc).all()
    assert max_diff(out_net, out_enc) <= TOL
    (out_net * weight).sum().backward()
    (out_enc * weight).sum().backward()
    assert max_diff(x1.grad, x2.grad) <= TOL
    for name, p, q in paired_parameters(net, enc):
        assert p.grad is not None and q.grad is not None, name
        assert max_diff(p.grad, q.grad) <= TOL, name


@settings(max_examples=10)
@given(a=archs(), batch=st.integers(1, 3), seq=st.integers(1, 5), adam=st.booleans(),
       kind=st.sampled_from(MASKS), padding=st.booleans())
def test_optimizer_steps_keep_parameters_equal(a, batch, seq, adam, kind, padding):
    enc = make_encoder(a)
    net = from_transformer(enc)
    gen = torch.Generator().manual_seed(a.seed + 3)
    src = make_src(a, batch, seq, False, gen)
    mask, kpm = make_masks(a, kind, padding, batch, seq, False, gen)
    target = torch.randn(src.shape, generator=gen, dtype=src.dtype)
    make = (lambda ps: torch.optim.Adam(ps, lr=1e-2)) if adam else (lambda ps: torch.optim.SGD(ps, lr=0.1))
    opt_net, opt_enc = make(net.parameters()), make(enc.parameters())
    for _ in range(3):
        for model, opt in ((net, opt_net), (enc, opt_enc)):
            opt.zero_grad()
            loss = (model(src, mask=mask, src_key_padding_mask=kpm) - target).pow(2).mean()
            loss.backward()
            opt.step()
    for name, p, q in paired_parameters(net, enc):
        assert max_diff(p, q) <= TOL, name
    # the steps did change something (the comparison is not vacuous)
    fresh = make_encoder(a)
    moved = max(max_diff(p, q) for p, q in zip(enc.parameters(), fresh.parameters()))
    assert moved > 1e-4


@settings(max_examples=10)
@given(a=archs(), batch=st.integers(1, 3), seq=st.integers(1, 5), kind=st.sampled_from(MASKS))
def test_train_mode_dropout_uses_the_same_random_stream(a, batch, seq, kind):
    enc = make_encoder(a, dropout=0.3).train()
    net = from_transformer(enc)
    assert net.training and all(layer.training for layer in net.layers)
    gen = torch.Generator().manual_seed(a.seed + 4)
    src = make_src(a, batch, seq, False, gen)
    mask, _ = make_masks(a, kind, False, batch, seq, False, gen)
    torch.manual_seed(123)
    out_enc = enc(src, mask=mask)
    torch.manual_seed(123)
    out_net = net(src, mask=mask)
    assert max_diff(out_net, out_enc) <= TOL


@pytest.mark.parametrize(
    "kind, is_causal",
    [(None, None), ("causal", None), ("causal", False), ("causal", True), ("bool", None),
     ("float", None)],
)
@pytest.mark.parametrize("padding", [False, True])
def test_layers_receive_the_same_arguments_as_torch(kind, is_causal, padding):
    """Canonical masks and detected ``is_causal``: what each layer of both stacks is called with."""
    a = Arch(2, 8, 2, 16, "relu", False, True, 1e-5, True, True, False, 7)
    enc = make_encoder(a)
    net = from_transformer(enc)
    gen = torch.Generator().manual_seed(0)
    src = make_src(a, 2, 4, False, gen)
    mask, kpm = make_masks(a, kind, padding, 2, 4, False, gen)
    seen: dict[str, list[dict]] = {"enc": [], "net": []}

    def spy(tag):
        def hook(module, args, kwargs):
            seen[tag].append(dict(kwargs))
        return hook

    for layer in enc.layers:
        layer.register_forward_pre_hook(spy("enc"), with_kwargs=True)
    for layer in net.layers:
        layer.register_forward_pre_hook(spy("net"), with_kwargs=True)
    out_enc = enc(src, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    out_net = net(src, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    assert max_diff(out_net, out_enc) <= TOL
    assert len(seen["enc"]) == len(seen["net"]) == 2
    for e, n in zip(seen["enc"], seen["net"]):
        assert n["is_causal"] is e["is_causal"]
        for key in ("src_mask", "src_key_padding_mask"):
            if e[key] is None:
                assert n[key] is None, key
            else:
                assert n[key].dtype == e[key].dtype and torch.equal(n[key], e[key]), key
    assert seen["net"][0]["is_causal"] is (kind == "causal" and is_causal is not False)


# ---------------------------------------------------------------------- nested fast path
def left_aligned_padding(lengths: list[int], seq: int) -> Tensor:
    """``(batch, seq)`` bool, True (padded) from each row's length on."""
    return torch.arange(seq).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


@settings(max_examples=15)
@given(
    a=archs(fast_path=True),
    seq=st.integers(2, 5),
    data=st.data(),
    float_mask=st.booleans(),
    nan_padding=st.booleans(),
)
def test_sparsity_fast_path_matches_encoder_float32(a, seq, data, float_mask, nan_padding):
    """eval + no_grad + padding mask: torch runs nested tensors, padded positions are 0."""
    enc = make_encoder(a, dtype=torch.float32)
    net = from_transformer(enc)
    lengths = data.draw(  # torch fails when *every* row is empty; see the test below
        st.lists(st.integers(0, seq), min_size=1, max_size=3).filter(lambda ls: max(ls) > 0),
        label="lengths",
    )
    padded = left_aligned_padding(lengths, seq)
    gen = torch.Generator().manual_seed(a.seed + 5)
    src = make_src(a, len(lengths), seq, False, gen, torch.float32)
    if nan_padding:  # absent positions of a nested tensor are never read
        src = src.masked_fill(padded.unsqueeze(-1), math.nan)
    kpm = padded
    if float_mask:  # in the nested path *any* non-zero entry marks a position absent
        kpm = torch.zeros(padded.shape).masked_fill(padded, -1.0)
    with torch.no_grad():
        out_enc = enc(src, src_key_padding_mask=kpm)
        out_net = net(src, src_key_padding_mask=kpm)
    # what torch's nested path gives at padded positions: norm(0) (0 without a norm)
    at_pad = enc.norm(torch.zeros(a.d_model)) if a.final_norm else torch.zeros(a.d_model)
    assert torch.equal(out_enc[padded], at_pad.expand(int(padded.sum()), -1))
    assert torch.equal(out_net[padded], out_enc[padded])
    assert torch.isfinite(out_net).all()
    torch.testing.assert_close(out_net, out_enc, atol=1e-5, rtol=0)


def _fast_path_case():
    a = Arch(2, 8, 2, 16, "relu", False, True, 1e-5, False, True, True, 11)
    enc = make_encoder(a, dtype=torch.float32, dropout=0.0)
    src = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    kpm = left_aligned_padding([4, 2, 1], 4)
    return enc, src, kpm


def test_fast_path_case_is_taken_by_torch():
    enc, src, kpm = _fast_path_case()
    net = from_transformer(enc)
    with torch.no_grad():
        out_enc, out_net = enc(src, src_key_padding_mask=kpm), net(src, src_key_padding_mask=kpm)
    assert torch.equal(out_enc[kpm], torch.zeros(int(kpm.sum()), 8))
    assert torch.equal(out_net[kpm], out_enc[kpm])
    torch.testing.assert_close(out_net, out_enc, atol=1e-5, rtol=0)


@pytest.mark.parametrize("float_mask", [False, True])
def test_fast_path_does_not_rely_on_the_layers_own_fast_path(float_mask):
    """A hook on the map's layers turns their fused kernel off; the result stays torch's.

    With a float padding mask the nested path drops every position with a non-zero
    entry (here -1.0), which a plain additive mask would not do.
    """
    enc, src, kpm = _fast_path_case()
    net = from_transformer(enc)
    calls = []
    for layer in net.layers:
        layer.register_forward_hook(lambda module, args, out: calls.append(1))
    if float_mask:
        kpm = torch.zeros(kpm.shape).masked_fill(kpm, -1.0)
    with torch.no_grad():
        out_enc, out_net = enc(src, src_key_padding_mask=kpm), net(src, src_key_padding_mask=kpm)
    assert len(calls) == 2
    torch.testing.assert_close(out_net, out_enc, atol=1e-5, rtol=0)


@pytest.mark.parametrize("final_norm", [False, True])
def test_fast_path_with_every_row_empty(final_norm):
    """torch's nested path raises when no row has a token; the net gives the padded value."""
    a = Arch(1, 8, 2, 16, "relu", False, True, 1e-5, final_norm, True, True, 13)
    enc = make_encoder(a, dtype=torch.float32)
    net = from_transformer(enc)
    src = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    kpm = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="non-zero numel"):
            enc(src, src_key_padding_mask=kpm)
        out = net(src, src_key_padding_mask=kpm)
        at_pad = enc.norm(torch.zeros(8)) if final_norm else torch.zeros(8)
    assert torch.equal(out, at_pad.expand(2, 3, 8))


@pytest.mark.parametrize(
    "why_not", ["grad", "attn_mask", "not_left_aligned", "nested_disabled", "fastpath_off", "train"]
)
def test_without_the_fast_path_padded_positions_are_computed(why_not):
    """Each condition torch checks turns the nested path off; the net follows torch."""
    enc, src, kpm = _fast_path_case()
    mask = None
    if why_not == "attn_mask":
        mask = torch.zeros(4, 4, dtype=torch.bool)
    if why_not == "not_left_aligned":
        kpm = kpm.clone()
        kpm[0, 1] = True  # a hole inside row 0
    if why_not == "nested_disabled":
        enc.use_nested_tensor = False
    if why_not == "train":
        enc.train()  # dropout is 0: train mode changes only the path
    net = from_transformer(enc)
    grad = why_not == "grad"
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        if why_not == "fastpath_off":
            torch.backends.mha.set_fastpath_enabled(False)
        with torch.set_grad_enabled(grad):
            out_enc = enc(src, mask=mask, src_key_padding_mask=kpm)
            out_net = net(src, mask=mask, src_key_padding_mask=kpm)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    assert (out_enc[kpm].abs().sum(-1) > 0).all()  # torch computed the padded positions
    torch.testing.assert_close(out_net, out_enc, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- structure
@settings(max_examples=10)
@given(a=archs())
def test_structure_is_a_sub_diagonal_chain(a):
    enc = make_encoder(a)
    net = from_transformer(enc)
    m = net.map
    n = a.num_layers
    names = ["x"] + [f"l{k}" for k in range(1, n + 1)] + (["y"] if a.final_norm else [])
    assert list(m.slots) == names
    assert all(size == a.d_model for size in m.slots.values())
    assert m.edges == tuple(zip(names[1:], names[:-1]))  # (destination, source)
    assert m.impulse_response_length() == n + a.final_norm
    assert math.isinf(m.impulse_response_length(hold=("x",)))
    assert net.steps == n + a.final_norm and net.num_layers == n
    assert net.has_norm == a.final_norm and net.batch_first == a.batch_first
    for k in range(1, n + 1):
        block = m.block(f"l{k}", names[k - 1])
        assert isinstance(block, EncoderLayerBlock)
        assert block.in_features == block.out_features == a.d_model
        assert block.layer is not enc.layers[k - 1]
    assert not m.biases and not m.activations
    text = repr(net)
    assert f"d_model={a.d_model}" in text and f"num_layers={n}" in text


def test_more_applications_change_nothing():
    """With x held the map's fixed point is the encoder's stack of layer outputs."""
    from iternn.engine.iterate import iterate

    a = Arch(3, 8, 4, 16, "gelu", True, False, 1e-5, True, True, False, 3)
    enc = make_encoder(a)
    net = from_transformer(enc)
    src = make_src(a, 2, 5, False, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = enc(src)
        for steps in (net.steps, net.steps + 3):
            state = iterate(net.map, {"x": src}, steps, hold=("x",))
            assert max_diff(state["y"], ref) <= TOL
        short = iterate(net.map, {"x": src}, net.steps - 1, hold=("x",))
        assert max_diff(short["y"], ref) > 1e-3  # one application short is not there yet
        layer1 = enc.layers[0](src)
        assert max_diff(state["l1"], layer1) <= TOL


def test_a_transformer_map_nests_as_a_block():
    """``in_features``/``out_features`` let a TransformerMap be a block; masks via block_kwargs."""
    from iternn import BlockMap
    from iternn.engine.iterate import iterate

    a = Arch(2, 8, 2, 16, "relu", True, True, 1e-5, True, True, False, 9)
    enc = make_encoder(a)
    outer = BlockMap({"u": 8, "v": 8})
    outer.connect("v", "u", from_transformer(enc))
    src = make_src(a, 2, 4, False, torch.Generator().manual_seed(0))
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    state = iterate(outer, {"u": src}, 1, hold=("u",), block_kwargs={"v<-u": {"mask": mask}})
    assert max_diff(state["v"], enc(src, mask=mask)) <= TOL
    assert max_diff(state["v"], enc(src)) > 1e-3  # the mask did reach the inner map


def test_parameters_are_copies():
    a = Arch(1, 8, 2, 16, "relu", False, True, 1e-5, True, True, False, 5)
    enc = make_encoder(a)
    net = from_transformer(enc)
    before = [p.detach().clone() for p in enc.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(enc.parameters(), before))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_train_eval_mode_is_copied(mode):
    a = Arch(2, 8, 2, 16, "relu", False, True, 1e-5, True, True, False, 5)
    enc = make_encoder(a)
    enc.train(mode != "eval")
    if mode == "mixed":
        enc.layers[0].eval()  # torch's fast path looks at the first layer's own flag
    net = from_transformer(enc)
    assert net.training == enc.training
    pairs = zip(list(net.layers) + [net.map.block("y", "l2")], list(enc.layers) + [enc.norm])
    for mine, theirs in pairs:
        assert [m.training for m in mine.modules()] == [m.training for m in theirs.modules()]


# ---------------------------------------------------------------------- bad inputs
def _small():
    a = Arch(1, 8, 2, 16, "relu", False, True, 1e-5, False, True, False, 0)
    enc = make_encoder(a)
    return enc, from_transformer(enc)


@pytest.mark.parametrize(
    "obj, name",
    [(nn.Linear(4, 4), "Linear"),
     (nn.TransformerEncoderLayer(4, 2, 8), "TransformerEncoderLayer"),
     (nn.Sequential(), "Sequential")],
    ids=["linear", "layer", "sequential"],
)
def test_rejects_non_encoder(obj, name):
    with pytest.raises(iternn.MapTypeError, match=name):
        from_transformer(obj)


def test_rejects_encoder_without_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8), 0)
    with pytest.raises(iternn.ConversionError, match="at least one layer"):
        from_transformer(enc)


def test_rejects_foreign_layer():
    enc, _ = _small()
    enc.layers.append(nn.Identity())
    with pytest.raises(iternn.MapTypeError, match="layer 1 is Identity"):
        from_transformer(enc)


def test_rejects_layers_of_different_width():
    enc, _ = _small()
    enc.layers.append(nn.TransformerEncoderLayer(4, 2, 8, dtype=torch.float64))
    with pytest.raises(iternn.ConversionError, match="layer 1 has d_model=4"):
        from_transformer(enc)


@pytest.mark.parametrize(
    "src, error",
    [(torch.zeros(2, 3, 5, dtype=torch.float64), ValueError),  # d_model mismatch
     (torch.zeros(8, dtype=torch.float64), ValueError),  # 1-D
     (torch.zeros(1, 2, 3, 8, dtype=torch.float64), ValueError),  # 4-D
     (torch.zeros(2, 3, 8, dtype=torch.int64), TypeError),  # not floating
     ([[0.0] * 8], TypeError)],  # not a tensor
    ids=["d_model", "1d", "4d", "int", "list"],
)
def test_rejects_bad_src(src, error):
    _, net = _small()
    with pytest.raises(error, match="'x'"):
        net(src)


def test_rejects_src_dtype_other_than_parameters():
    _, net = _small()
    with pytest.raises(iternn.MapTypeError, match="dtype"):
        net(torch.zeros(2, 3, 8, dtype=torch.float32))


@pytest.mark.parametrize(
    "mask, error",
    [(torch.zeros(4, 4, dtype=torch.bool), ValueError),  # seq is 3
     (torch.zeros(3, 3, 3, dtype=torch.bool), ValueError),  # needs batch * nhead = 4
     (torch.zeros(3, dtype=torch.bool), ValueError),
     (torch.zeros(3, 3, dtype=torch.int64), TypeError),
     ("causal", TypeError)],
    ids=["2d", "3d", "1d", "int", "str"],
)
def test_rejects_bad_mask(mask, error):
    _, net = _small()
    with pytest.raises(error, match="^mask"):
        net(torch.zeros(2, 3, 8, dtype=torch.float64), mask=mask)


@pytest.mark.parametrize(
    "src_shape, kpm, error",
    [((2, 3, 8), torch.zeros(3, 2, dtype=torch.bool), ValueError),  # (seq, batch)
     ((2, 3, 8), torch.zeros(3, dtype=torch.bool), ValueError),
     ((3, 8), torch.zeros(1, 3, dtype=torch.bool), ValueError),  # unbatched needs (seq,)
     ((2, 3, 8), torch.zeros(2, 3, dtype=torch.int32), TypeError)],
    ids=["transposed", "1d-batched", "2d-unbatched", "int"],
)
def test_rejects_bad_padding_mask(src_shape, kpm, error):
    _, net = _small()
    with pytest.raises(error, match="src_key_padding_mask"):
        net(torch.zeros(src_shape, dtype=torch.float64), src_key_padding_mask=kpm)


def test_rejects_nested_src():
    _, net = _small()
    nested = torch.nested.nested_tensor([torch.zeros(2, 8), torch.zeros(3, 8)], dtype=torch.float64)
    with pytest.raises(iternn.MapError, match="'x'.*nested"):
        net(nested)
