"""The block pattern grammar: parser, exact patterns, inits, reproducibility."""

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from iternn.core.summary import count_entries, count_trainable
from iternn.sparse.linear import SparseLinear
from iternn.sparse.patterns import BlockSpec, PatternError, _row_indices, make_block, parse_spec
from iternn.sparse.structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def positions(block):
    """(2, nnz) stored positions of a sparse block."""
    return block.indices()


def assert_distinct_row_major(idx, rows, cols):
    assert idx.dtype == torch.long and idx.shape[0] == 2
    assert bool((idx[0] >= 0).all() and (idx[0] < rows).all())
    assert bool((idx[1] >= 0).all() and (idx[1] < cols).all())
    flat = idx[0] * cols + idx[1]
    assert bool((flat[1:] > flat[:-1]).all()), "not strictly increasing row-major: duplicates"


# --------------------------------------------------------------------------- parser

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive_int = st.integers(1, 10**6)


@st.composite
def specs(draw):
    pattern = draw(st.sampled_from(["0", "W", "D", "I", "R", "S", "Row", "LR", "BD"]))
    arg = None
    if pattern == "R":
        arg = draw(st.floats(min_value=0, max_value=1, exclude_min=True))
    elif pattern in ("S", "Row", "LR", "BD"):
        arg = draw(positive_int)
    init, args, trainable = None, (), True
    if pattern not in ("0", "I"):
        choices = [None, "G", "U", "C", "kaiming", "xavier"]
        if pattern not in ("R", "S", "Row"):
            choices.append("orthogonal")
        init = draw(st.sampled_from(choices))
        if init == "G":
            args = (draw(finite), draw(st.floats(min_value=0, allow_infinity=False)))
        elif init == "U":
            a, b = sorted((draw(finite), draw(finite)))
            args = (a, b)
        elif init == "C":
            args = (draw(finite),)
        trainable = draw(st.booleans())
    return BlockSpec(pattern, arg, init, args, trainable)


@given(spec=specs(), seps=st.lists(st.sampled_from([" ", ";", "  ", " ; ", "\t", ";;"]),
                                   min_size=3, max_size=3), order_seed=st.integers(0, 99))
def test_canonical_text_round_trips(spec, seps, order_seed):
    text = str(spec)
    assert parse_spec(text) == spec
    assert str(parse_spec(text)) == text
    # Any order of tokens and any separators parse to the same spec.
    tokens = text.split(" ")
    random.Random(order_seed).shuffle(tokens)
    shuffled = tokens[0] + "".join(s + t for s, t in zip(seps, tokens[1:]))
    assert parse_spec(" " + shuffled + ";") == spec


def test_parse_examples():
    s = parse_spec("R=.5;kaiming  fixed")
    assert (s.pattern, s.arg, s.init, s.init_args, s.trainable) == ("R", 0.5, "kaiming", (), False)
    assert str(s) == "R=0.5 kaiming fixed"
    assert str(parse_spec("fixed G=0,1e-2 W")) == "W G=0,0.01 fixed"
    assert str(parse_spec("R=1")) == "R=1" and parse_spec("R=1").arg == 1.0
    assert parse_spec("S=010").arg == 10 and str(parse_spec("S=010")) == "S=10"
    assert parse_spec("W U=-1,1").init_args == (-1.0, 1.0)
    assert parse_spec("W C=-2.5e-3").init_args == (-0.0025,)
    assert str(parse_spec("LR=4 orthogonal")) == "LR=4 orthogonal"
    assert parse_spec("0") == BlockSpec("0")
    assert hash(parse_spec("Row=3")) == hash(BlockSpec("Row", 3))


BAD = [  # (spec, the token the error must quote)
    ("R=1.5", "R=1.5"),
    ("R=0", "R=0"),
    ("R=abc", "R=abc"),
    ("R=-0.5", "R=-0.5"),
    ("R=nan", "R=nan"),
    ("R=inf", "R=inf"),
    ("R=1e999", "R=1e999"),
    ("R=1_0", "R=1_0"),
    ("R", "R"),
    ("Row=0", "Row=0"),
    ("Row=2.5", "Row=2.5"),
    ("S=-1", "S=-1"),
    ("S=0", "S=0"),
    ("S=1e3", "S=1e3"),
    ("S=", "S="),
    ("LR=0", "LR=0"),
    ("BD=x", "BD=x"),
    ("W=3", "W=3"),
    ("G=abc", "G=abc"),
    ("W G=abc", "G=abc"),
    ("W G=1", "G=1"),
    ("W G=0,1,2", "G=0,1,2"),
    ("W G=0,-1", "G=0,-1"),
    ("W U=3,1", "U=3,1"),
    ("W C=", "C="),
    ("W C", "C"),
    ("W kaiming=2", "kaiming=2"),
    ("W W", "W"),
    ("R=0.5 S=3", "S=3"),
    ("W kaiming xavier", "xavier"),
    ("W G=0,1 C=1", "C=1"),
    ("W fixed fixed", "fixed"),
    ("W Kaiming", "Kaiming"),
    ("w", "w"),
    ("dense", "dense"),
    ("W R = 0.5", "R"),
    ("0 kaiming", "kaiming"),
    ("I C=1", "C=1"),
    ("0 fixed", "fixed"),
    ("R=0.5 orthogonal", "orthogonal"),
    ("Row=2 orthogonal", "orthogonal"),
    ("kaiming", "kaiming"),
]


@pytest.mark.parametrize("text,token", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_raises_quoting_the_token(text, token):
    with pytest.raises(PatternError) as info:
        parse_spec(text)
    assert repr(token) in str(info.value)
    assert info.value.token == token
    assert isinstance(info.value, ValueError)


def test_unknown_token_hints_the_right_case():
    with pytest.raises(PatternError, match="did you mean 'W'"):
        parse_spec("w")
    with pytest.raises(PatternError, match="did you mean 'Row'"):
        parse_spec("ROW=3")


def test_empty_and_non_string_specs():
    for text in ("", "  ", ";"):
        with pytest.raises(PatternError, match="empty spec"):
            parse_spec(text)
    with pytest.raises(TypeError):
        parse_spec(0.5)


def test_blockspec_validates_direct_construction():
    with pytest.raises(PatternError, match="'R=1.5'"):
        BlockSpec("R", 1.5)
    with pytest.raises(PatternError, match="'S=0'"):
        BlockSpec("S", 0)
    with pytest.raises(PatternError, match="'U=3,1'"):
        BlockSpec("W", None, "U", (3, 1))
    with pytest.raises(PatternError, match="'orthogonal'"):
        BlockSpec("S", 4, "orthogonal")
    with pytest.raises(PatternError):
        BlockSpec("Q")
    with pytest.raises(PatternError):
        BlockSpec("S", 2.0)
    with pytest.raises(PatternError):
        BlockSpec("W", None, "G", (1.0,))
    assert BlockSpec("R", 1) == BlockSpec("R", 1.0) and isinstance(BlockSpec("R", 1).arg, float)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        BlockSpec("W").pattern = "D"  # frozen


SHAPE_BAD = [  # (spec, rows, cols, token)
    ("S=13", 3, 4, "S=13"),
    ("Row=5", 3, 4, "Row=5"),
    ("D", 3, 4, "D"),
    ("I", 4, 3, "I"),
    ("BD=2", 4, 3, "BD=2"),
    ("BD=4", 8, 6, "BD=4"),
    ("LR=4", 3, 4, "LR=4"),
]


@pytest.mark.parametrize("text,rows,cols,token", SHAPE_BAD, ids=[b[0] for b in SHAPE_BAD])
def test_shape_errors_name_token_and_shape(text, rows, cols, token):
    parse_spec(text)  # fine without a shape
    with pytest.raises(PatternError) as info:
        make_block(text, rows, cols, generator=gen(0))
    msg = str(info.value)
    assert repr(token) in msg and f"{rows}x{cols}" in msg
    assert info.value.token == token


def test_make_block_argument_checks():
    with pytest.raises(TypeError):
        make_block(3, 2, 2)
    with pytest.raises(ValueError, match="rows must be positive"):
        make_block("W", 0, 2)
    with pytest.raises(TypeError):
        make_block("W", 2.0, 2)


# --------------------------------------------------------------------------- patterns

shapes = st.tuples(st.integers(1, 30), st.integers(1, 30))


@given(shape=shapes, n_frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_row_sampler_exact_distinct_sorted(shape, n_frac, seed):
    rows, cols = shape
    n = max(1, round(n_frac * cols))
    idx = _row_indices(rows, cols, n, gen(seed))
    assert idx.shape == (2, rows * n)
    assert_distinct_row_major(idx, rows, cols)
    assert torch.equal(torch.bincount(idx[0], minlength=rows), torch.full((rows,), n))
    assert torch.equal(idx, _row_indices(rows, cols, n, gen(seed)))


@given(shape=shapes, n_frac=st.floats(0, 0.5), seed=st.integers(0, 2**31))
def test_row_sampler_redraws_short_streams(shape, n_frac, seed):
    # Streams of only n draws rarely hold n distinct columns: most rows are redrawn.
    rows, cols = shape
    n = max(1, math.floor(n_frac * cols))
    assume(2 * n < cols)
    idx = _row_indices(rows, cols, n, gen(seed), draws=n)
    assert_distinct_row_major(idx, rows, cols)
    assert torch.equal(torch.bincount(idx[0], minlength=rows), torch.full((rows,), n))


@pytest.mark.parametrize("n,cols,draws", [(2, 7, None), (5, 7, None), (3, 7, 3)])
def test_row_sampler_is_uniform_over_subsets(n, cols, draws):
    # Both code paths (2n < cols: draw streams, also with many redraws; 2n >= cols:
    # permutations), many rows: each n-subset of columns is equally likely (chi-square,
    # fixed seed).
    rows = 21000
    idx = _row_indices(rows, cols, n, gen(1), draws=draws)
    subsets = Counter(map(tuple, idx[1].view(rows, n).tolist()))
    k = math.comb(cols, n)
    assert len(subsets) == k
    expected = rows / k
    chi2 = sum((c - expected) ** 2 / expected for c in subsets.values())
    # k - 1 = 20 or 34 degrees of freedom: P(chi2 > 70) < 3e-4.
    assert chi2 < 70, (n, cols, chi2)


def test_row_sampler_large_sparse_rows():
    idx = _row_indices(2000, 5000, 40, gen(0))
    assert_distinct_row_major(idx, 2000, 5000)
    assert torch.equal(torch.bincount(idx[0]), torch.full((2000,), 40))


@given(shape=shapes, p=st.floats(0.01, 1), seed=st.integers(0, 2**31))
def test_R_has_exactly_round_p_rows_cols_entries(shape, p, seed):
    rows, cols = shape
    k = round(p * cols * rows)  # Python's round (half to even) of the float product
    block = make_block(f"R={p!r}", rows, cols, generator=gen(seed))
    idx = positions(block)
    assert idx.shape == (2, k)
    assert_distinct_row_major(idx, rows, cols)
    assert block.values.shape == (k,)
    assert count_trainable(block) == k
    assert (block.in_features, block.out_features) == (cols, rows)


@given(shape=shapes, frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_S_has_exactly_n_entries(shape, frac, seed):
    rows, cols = shape
    n = max(1, round(frac * rows * cols))
    block = make_block(f"S={n}", rows, cols, generator=gen(seed))
    idx = positions(block)
    assert idx.shape == (2, n)
    assert_distinct_row_major(idx, rows, cols)
    assert count_trainable(block) == n


@given(shape=shapes, frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_Row_has_exactly_n_entries_per_row(shape, frac, seed):
    rows, cols = shape
    n = max(1, round(frac * cols))
    block = make_block(f"Row={n} xavier", rows, cols, generator=gen(seed))
    idx = positions(block)
    assert_distinct_row_major(idx, rows, cols)
    assert torch.equal(torch.bincount(idx[0], minlength=rows), torch.full((rows,), n))
    assert count_trainable(block) == rows * n


def test_R_rounding_is_half_even_and_has_no_minimum():
    assert positions(make_block("R=0.25", 2, 5, generator=gen(0))).shape[1] == 2  # 2.5 -> 2
    assert positions(make_block("R=0.25", 2, 7, generator=gen(0))).shape[1] == 4  # 3.5 -> 4
    assert positions(make_block("R=0.5", 100, 100, generator=gen(0))).shape[1] == 5000
    tiny = make_block("R=0.01", 3, 3, generator=gen(0))  # 0.09 -> 0 entries: an empty block
    assert positions(tiny).shape == (2, 0) and count_trainable(tiny) == 0
    assert torch.equal(tiny(torch.ones(2, 3)), torch.zeros(2, 3))


@given(shape=shapes, seed=st.integers(0, 2**31), data=st.data())
def test_structured_patterns_have_exact_structure(shape, seed, data):
    rows, cols = shape
    w = make_block("W", rows, cols, generator=gen(seed))
    assert type(w) is nn.Linear and w.bias is None and w.weight.shape == (rows, cols)
    r = data.draw(st.integers(1, min(rows, cols)))
    lr = make_block(f"LR={r}", rows, cols, generator=gen(seed))
    assert isinstance(lr, LowRankLinear) and lr.bias is None
    assert int(torch.linalg.matrix_rank(lr.double().dense_weight().detach())) == r
    k = math.gcd(rows, cols)
    k = data.draw(st.sampled_from([d for d in range(1, k + 1) if k % d == 0]))
    bd = make_block(f"BD={k}", rows, cols, generator=gen(seed))
    assert isinstance(bd, BlockDiagonalLinear) and bd.bias is None
    dense = bd.dense_weight()
    mask = torch.block_diag(*[torch.ones(rows // k, cols // k)] * k).bool()
    assert bool((dense[~mask] == 0).all()) and bool((dense[mask] != 0).all())
    assert count_trainable(bd) == rows * cols // k
    d = make_block("D", rows, rows, generator=gen(seed))
    assert isinstance(d, DiagonalLinear) and d.bias is None and torch.equal(d.diagonal, torch.ones(rows))
    i = make_block("I", cols, cols)
    assert type(i) is nn.Identity
    assert make_block("0", rows, cols) is None


# --------------------------------------------------------------------------- inits


def _all_kinds():
    return ["W", "D", "LR=3", "BD=2", "I", "0", "R=0.3", "S=17", "Row=4"]


@pytest.mark.parametrize("init", ["", "G=0.5,2", "U=-1,3", "C=0.25", "kaiming", "xavier",
                                  "orthogonal"])
def test_same_seed_same_block_different_seed_different_and_no_global_rng(init):
    for pattern in _all_kinds():
        if init and pattern in ("I", "0"):
            continue
        if init == "orthogonal" and pattern[0] in "RS":
            continue
        spec = f"{pattern} {init}"
        state = torch.get_rng_state()
        a = make_block(spec, 6, 6, generator=gen(11))
        b = make_block(spec, 6, 6, generator=gen(11))
        c = make_block(spec, 6, 6, generator=gen(12))
        assert torch.equal(torch.get_rng_state(), state), spec
        if a is None:
            assert b is None
            continue
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), spec
        if pattern in ("I", "0") or init == "C=0.25" or (pattern == "D" and init == ""):
            continue  # nothing random
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), spec
        if pattern[0] in "RS":
            assert not torch.equal(a.indices(), c.indices()), spec


def test_R_default_is_sparse_linear_with_density_from_the_same_seed():
    a = make_block("R=0.3", 7, 9, generator=gen(5))
    b = SparseLinear(9, 7, density=0.3, bias=False, generator=gen(5))
    assert torch.equal(a.indices(), b.indices()) and torch.equal(a.values, b.values)


def test_default_init_matches_the_modules_own_default():
    lr = make_block("LR=2", 5, 7, generator=gen(3))
    ref = LowRankLinear(7, 5, rank=2, bias=False, generator=gen(3))
    assert torch.equal(lr.u, ref.u) and torch.equal(lr.v, ref.v)
    bd = make_block("BD=3", 6, 9, generator=gen(3))
    ref = BlockDiagonalLinear(9, 6, blocks=3, bias=False, generator=gen(3))
    assert torch.equal(bd.weight, ref.weight)
    w = make_block("W", 40, 50, generator=gen(0)).weight
    assert w.abs().max() <= 1 / math.sqrt(50) and w.abs().max() > 0.9 / math.sqrt(50)


def test_constant_gaussian_uniform_inits_dense():
    w = make_block("W C=0.25", 4, 5, generator=gen(0)).weight
    assert torch.equal(w, torch.full((4, 5), 0.25))
    w = make_block("W G=0.5,2", 300, 300, generator=gen(0)).weight.double()
    assert abs(w.mean().item() - 0.5) < 0.03 and abs(w.std().item() - 2) < 0.03
    w = make_block("W U=-1,3", 300, 300, generator=gen(0)).weight.double()
    assert w.min() >= -1 and w.max() <= 3
    assert abs(w.mean().item() - 1) < 0.02 and abs(w.var().item() - 16 / 12) < 0.03
    d = make_block("D G=0,1e-3", 50, 50, generator=gen(0))
    assert 0 < d.diagonal.abs().max() < 0.01


def test_kaiming_and_xavier_dense_match_the_standard_formulas():
    rows, cols = 300, 500
    w = make_block("W kaiming", rows, cols, generator=gen(0)).weight.double()
    assert abs(w.std().item() / math.sqrt(2 / cols) - 1) < 0.01
    w = make_block("W xavier", rows, cols, generator=gen(0)).weight.double()
    bound = math.sqrt(6 / (rows + cols))
    assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
    # Low rank: each factor as its own layer (v: fan-in cols, u: fan-in r).
    lr = make_block("LR=50 kaiming", rows, cols, generator=gen(0))
    assert abs(lr.v.double().std().item() / math.sqrt(2 / cols) - 1) < 0.02
    assert abs(lr.u.double().std().item() / math.sqrt(2 / 50) - 1) < 0.02
    # Block diagonal: fan-in of a row is cols/k.
    bd = make_block("BD=5 kaiming", rows, cols, generator=gen(0))
    assert abs(bd.weight.double().std().item() / math.sqrt(2 / 100) - 1) < 0.02


def _fans(block, rows, cols):
    idx = block.indices()
    f = torch.bincount(idx[0], minlength=rows).double()[idx[0]]
    g = torch.bincount(idx[1], minlength=cols).double()[idx[1]]
    return idx, f, g


def test_kaiming_uses_each_rows_effective_fan_in():
    # Row=n: every row has n stored entries, so the std is sqrt(2/n), not sqrt(2/cols).
    for n in (25, 400):
        block = make_block(f"Row={n} kaiming", 30, 1000, generator=gen(n))
        v = block.values.double().view(30, n)
        ratio = v.std(dim=1) / math.sqrt(2 / n)
        tol = 4.5 / math.sqrt(2 * n)  # about 4.5 standard errors of a sample std
        assert bool(((ratio - 1).abs() < tol).all()), (n, ratio)
    # Random S=n pattern on a narrow block: fan-ins vary from 1 to 10 between rows.
    # Within each fan-in group the std is sqrt(2/f) (neither the dense fan-in nor the
    # mean fan-in would pass for small and large f alike).
    rows, cols = 4000, 10
    block = make_block(f"S={rows * cols // 2} kaiming", rows, cols, generator=gen(0))
    _, f, _ = _fans(block, rows, cols)
    v = block.values.double()
    groups = 0
    for fan in range(1, cols + 1):
        sel = v[f == fan]
        if sel.numel() < 400:
            continue
        groups += 1
        ratio = sel.pow(2).mean().sqrt().item() / math.sqrt(2 / fan)
        assert abs(ratio - 1) < 4.5 / math.sqrt(2 * sel.numel()), (fan, ratio)
    assert groups >= 5


def test_xavier_and_default_bounds_per_entry():
    rows, cols = 300, 80
    block = make_block(f"S={rows * cols // 4} xavier", rows, cols, generator=gen(0))
    _, f, g = _fans(block, rows, cols)
    bound = torch.sqrt(6 / (f + g))
    u = block.values.double() / bound  # ~ U(-1, 1) exactly when the formula is per entry
    assert u.abs().max() <= 1 + 1e-6 and u.abs().max() > 0.999
    assert abs(u.var().item() - 1 / 3) < 0.01
    block = make_block(f"S={rows * cols // 4}", rows, cols, generator=gen(1))
    _, f, _ = _fans(block, rows, cols)
    u = block.values.double() * torch.sqrt(f)  # default U(+-1/sqrt(f_i))
    assert u.abs().max() <= 1 + 1e-6 and u.abs().max() > 0.999
    assert abs(u.var().item() - 1 / 3) < 0.01


def test_inits_touch_only_stored_entries():
    block = make_block("R=0.2 C=3", 20, 30, generator=gen(0))
    dense = block.dense_weight()
    assert int((dense != 0).sum()) == 120 and bool((dense[dense != 0] == 3).all())
    g = make_block("Row=5 G=1,0.5", 40, 50, generator=gen(0))
    assert g.values.shape == (200,)


def test_orthogonal():
    eye = torch.eye
    w = make_block("W orthogonal", 20, 30, generator=gen(0)).weight.double()
    torch.testing.assert_close(w @ w.T, eye(20, dtype=f64), atol=1e-5, rtol=0)
    w = make_block("W orthogonal", 30, 20, generator=gen(0)).weight.double()
    torch.testing.assert_close(w.T @ w, eye(20, dtype=f64), atol=1e-5, rtol=0)
    lr = make_block("LR=4 orthogonal", 12, 9, generator=gen(0))
    torch.testing.assert_close(lr.u.T.double() @ lr.u.double(), eye(4, dtype=f64), atol=1e-5, rtol=0)
    torch.testing.assert_close(lr.v.double() @ lr.v.T.double(), eye(4, dtype=f64), atol=1e-5, rtol=0)
    bd = make_block("BD=3 orthogonal", 9, 9, generator=gen(0))
    for b in bd.weight.double():
        torch.testing.assert_close(b @ b.T, eye(3, dtype=f64), atol=1e-5, rtol=0)
    d = make_block("D orthogonal", 200, 200, generator=gen(0)).diagonal
    assert bool((d.abs() == 1).all()) and 50 < int((d < 0).sum()) < 150
    # Haar measure: no sign preference (a bare QR's Q has a negative first entry).
    first = [make_block("W orthogonal", 4, 3, generator=gen(s)).weight[0, 0].item()
             for s in range(200)]
    assert 60 < sum(x < 0 for x in first) < 140


@pytest.mark.parametrize("pattern", ["W", "D", "LR=2", "BD=2", "R=0.5", "S=5", "Row=2"])
def test_fixed_freezes_every_parameter(pattern):
    trained = make_block(pattern, 4, 4, generator=gen(0))
    fixed = make_block(f"{pattern} fixed", 4, 4, generator=gen(0))
    assert all(p.requires_grad for p in trained.parameters())
    assert all(not p.requires_grad for p in fixed.parameters())
    n = count_trainable(trained)
    assert n > 0 and count_trainable(fixed) == 0
    assert count_entries(fixed)[1] == n  # fixed entries count the same entries
    # 'fixed' changes nothing but the flag: same values from the same seed.
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                 fixed.state_dict().values()))


def test_sparse_backend_is_passed_through_and_blocks_compute():
    block = make_block("R=0.5", 8, 6, generator=gen(0), backend="dense")
    assert block.backend == "dense"
    x = torch.randn(3, 6, generator=gen(1))
    torch.testing.assert_close(block(x), x @ block.dense_weight().T)
    assert block.bias is None or count_entries(block)[0] == block.nnz


@pytest.mark.parametrize("spec, rows, cols", [("W", 10**6, 10**6), ("Row=100000", 10**5, 10**5),
                                              ("LR=100000", 10**9, 10**9), ("S=100000000000", 10**6, 10**6)])
def test_oversized_block_is_refused_naming_the_token(spec, rows, cols):
    from iternn.errors import SizeError

    with pytest.raises(SizeError, match=f"block '{spec}' \\({rows} x {cols}"):
        make_block(spec, rows, cols)
