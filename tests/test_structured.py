"""Structured blocks: DiagonalLinear, LowRankLinear, BlockDiagonalLinear."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iternn import BlockMap
from iternn.core.summary import count_entries, count_trainable
from iternn.sparse.structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def explicit_dense(block):
    """The matrix a block applies, built entry by entry (independent of dense_weight)."""
    w = torch.zeros(block.out_features, block.in_features, dtype=f64)
    if isinstance(block, DiagonalLinear):
        for i in range(block.in_features):
            w[i, i] = block.diagonal[i]
    elif isinstance(block, LowRankLinear):
        for k in range(block.rank):
            w += torch.outer(block.u[:, k], block.v[k, :]).detach()
    else:
        k = block.blocks
        ro, ci = block.out_features // k, block.in_features // k
        for r in range(k):
            for a in range(ro):
                for b in range(ci):
                    w[r * ro + a, r * ci + b] = block.weight[r, a, b]
    return w


@st.composite
def blocks(draw):
    kind = draw(st.sampled_from(["diag", "lowrank", "blockdiag"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    if kind == "diag":
        n = draw(st.integers(1, 9))
        b = DiagonalLinear(n, bias=bias, dtype=f64)
        with torch.no_grad():  # non-trivial values (the default is the identity)
            b.diagonal.copy_(torch.randn(n, generator=gen(seed), dtype=f64))
            if bias:
                b.bias.copy_(torch.randn(n, generator=gen(seed + 1), dtype=f64))
        return b
    if kind == "lowrank":
        n_in, n_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        r = draw(st.integers(1, min(n_in, n_out)))
        return LowRankLinear(n_in, n_out, rank=r, bias=bias, generator=gen(seed), dtype=f64)
    k = draw(st.integers(1, 4))
    n_in, n_out = k * draw(st.integers(1, 4)), k * draw(st.integers(1, 4))
    return BlockDiagonalLinear(n_in, n_out, blocks=k, bias=bias, generator=gen(seed), dtype=f64)


@given(block=blocks(), batch=st.lists(st.integers(1, 3), max_size=3), seed=st.integers(0, 999))
def test_forward_and_gradients_match_dense_reference(block, batch, seed):
    assert torch.equal(block.dense_weight().detach(), explicit_dense(block))
    x = torch.randn(*batch, block.in_features, generator=gen(seed), dtype=f64, requires_grad=True)
    y = block(x)
    assert y.shape == (*batch, block.out_features)
    ref = F.linear(x, block.dense_weight(), block.bias)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    g = torch.randn(y.shape, generator=gen(seed + 1), dtype=f64)
    params = [x, *block.parameters()]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_each_block():
    for block in (
        DiagonalLinear(3, bias=True, dtype=f64),
        LowRankLinear(4, 3, rank=2, generator=gen(0), dtype=f64),
        BlockDiagonalLinear(4, 6, blocks=2, generator=gen(1), dtype=f64),
    ):
        x = torch.randn(2, block.in_features, dtype=f64, generator=gen(2), requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, *p, block=block: torch.func.functional_call(
            block, dict(zip([n for n, _ in block.named_parameters()], p)), (x,)),
            (x, *[p.detach().clone().requires_grad_() for p in block.parameters()]))


def test_trainable_counts_hand_computed():
    assert DiagonalLinear(5).trainable_counts() == {"diagonal": 5}
    assert DiagonalLinear(5, bias=True).trainable_counts() == {"diagonal": 5, "bias": 5}
    lr = LowRankLinear(7, 4, rank=2)
    assert lr.trainable_counts() == {"u": 8, "v": 14, "bias": 4}
    assert count_trainable(lr) == 26
    assert LowRankLinear(7, 4, rank=3, bias=False).trainable_counts() == {"u": 12, "v": 21}
    bd = BlockDiagonalLinear(6, 9, blocks=3)  # three 3x2 blocks
    assert bd.trainable_counts() == {"weight": 18, "bias": 9}
    assert count_trainable(bd) == 27
    # Frozen parameters move from trainable to fixed; stored counts all storage.
    bd.weight.requires_grad_(False)
    assert count_entries(bd) == (9, 18, 27)
    assert all(type(v) is int for v in bd.trainable_counts().values())


def test_default_inits():
    d = DiagonalLinear(4, bias=True)
    assert torch.equal(d.dense_weight(), torch.eye(4)) and torch.equal(d.bias, torch.zeros(4))
    lr = LowRankLinear(400, 300, rank=16, generator=gen(0))
    for t, bound in ((lr.v, 1 / math.sqrt(400)), (lr.u, 1 / math.sqrt(16)),
                     (lr.bias, 1 / math.sqrt(400))):
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.95 * bound  # really uses the whole range
    bd = BlockDiagonalLinear(400, 200, blocks=4, generator=gen(0))
    bound = 1 / math.sqrt(100)
    assert bd.weight.abs().max() <= bound and bd.weight.abs().max() > 0.95 * bound
    assert bd.bias.abs().max() <= bound


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = LowRankLinear(6, 5, rank=2, generator=gen(3))
    b = LowRankLinear(6, 5, rank=2, generator=gen(3))
    c = LowRankLinear(6, 5, rank=2, generator=gen(4))
    e = BlockDiagonalLinear(6, 4, blocks=2, generator=gen(3))
    f = BlockDiagonalLinear(6, 4, blocks=2, generator=gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert not torch.equal(a.u, c.u)
    assert torch.equal(e.weight, f.weight)
    # skip_init (meta construction) draws nothing from any generator.
    torch.nn.utils.skip_init(LowRankLinear, 6, 5, rank=2)
    torch.nn.utils.skip_init(BlockDiagonalLinear, 6, 4, blocks=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_device_state_dict_and_save():
    for make in (lambda: DiagonalLinear(4, bias=True),
                 lambda: LowRankLinear(4, 6, rank=2, generator=gen(0)),
                 lambda: BlockDiagonalLinear(4, 6, blocks=2, generator=gen(0))):
        m = make()
        x = torch.randn(3, 4, generator=gen(1))
        m64 = copy.deepcopy(m).double()
        assert all(p.dtype == f64 for p in m64.parameters())
        assert m64(x.double()).dtype == f64
        torch.testing.assert_close(m64(x.double()).float(), m(x))
        assert m.to(torch.device("cpu"), torch.float64).dense_weight().dtype == f64
        m = make()
        other = make()
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)
        other.load_state_dict(m.state_dict())
        assert torch.equal(other(x), m(x))
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), m(x))
        made = type(m)(**_kwargs(m), dtype=f64)
        assert all(p.dtype == f64 for p in made.parameters())


def _kwargs(m):
    if isinstance(m, DiagonalLinear):
        return {"n": m.in_features}
    if isinstance(m, LowRankLinear):
        return {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank}
    return {"in_features": m.in_features, "out_features": m.out_features, "blocks": m.blocks}


def test_usable_as_block_map_blocks():
    m = BlockMap({"x": 4, "h": 6, "y": 6})
    m.connect("h", "x", LowRankLinear(4, 6, rank=2, bias=False))
    m.connect("y", "h", BlockDiagonalLinear(6, 6, blocks=3, bias=False))
    m.connect("y", "y", DiagonalLinear(6))
    out = m({"x": torch.ones(2, 4), "h": torch.ones(2, 6), "y": torch.ones(2, 6)})
    assert out["y"].shape == (2, 6) and out["h"].shape == (2, 6)


def test_extra_repr():
    assert "rank=2" in repr(LowRankLinear(4, 6, rank=2))
    assert "blocks=3" in repr(BlockDiagonalLinear(6, 3, blocks=3))
    assert "n=5" in repr(DiagonalLinear(5))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        LowRankLinear(3, 5, rank=4)
    with pytest.raises(ValueError, match="rank must be positive"):
        LowRankLinear(3, 5, rank=0)
    with pytest.raises(ValueError, match="blocks=4 must divide"):
        BlockDiagonalLinear(8, 6, blocks=4)
    with pytest.raises(TypeError):
        DiagonalLinear(True)
    with pytest.raises(TypeError):
        LowRankLinear(3, 5, 2)  # options are keyword-only
    # A wrong feature size fails loudly (x * diagonal would otherwise broadcast).
    for block in (DiagonalLinear(3), LowRankLinear(3, 2, rank=1), BlockDiagonalLinear(3, 3, blocks=3)):
        with pytest.raises(ValueError, match=r"\(\*batch, 3\)"):
            block(torch.ones(2, 1))


def test_replaced_parameters_of_another_shape_or_dtype_are_refused():
    from iternn.errors import MapError, MapTypeError

    x = torch.randn(2, 4, dtype=torch.float64)
    d = DiagonalLinear(4, dtype=torch.float64)
    d.diagonal = torch.nn.Parameter(torch.full((1,), 2.0, dtype=torch.float64))  # would broadcast
    with pytest.raises(MapError, match=r"DiagonalLinear.diagonal must have shape \(4,\)"):
        d(x)
    lr = LowRankLinear(4, 3, rank=2, dtype=torch.float64)
    lr.bias = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    with pytest.raises(MapError, match=r"LowRankLinear.bias must have shape \(3,\)"):
        lr(x)
    bd = BlockDiagonalLinear(4, 4, blocks=2, dtype=torch.float64)
    bd.bias.data = bd.bias.data.float()  # a float32 bias would promote silently
    with pytest.raises(MapTypeError, match="BlockDiagonalLinear.bias is torch.float32"):
        bd(x)


def test_blocks_satisfy_the_core_protocols():
    from iternn.core.protocols import CountsTrainable, RowwiseBlock
    from iternn.sparse import MaskedLinear, SparseLinear

    blocks = (DiagonalLinear(3), LowRankLinear(4, 3, rank=2), BlockDiagonalLinear(4, 6, blocks=2),
              SparseLinear(4, 3, density=0.5), MaskedLinear(4, 3, mask=torch.ones(3, 4, dtype=torch.bool)))
    for block in blocks:
        assert isinstance(block, CountsTrainable) and isinstance(block, RowwiseBlock), block
        assert type(block).rowwise is True
        assert sum(block.trainable_counts().values()) == count_trainable(block)
