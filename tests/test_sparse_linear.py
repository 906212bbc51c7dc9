"""SparseLinear and MaskedLinear: equivalence, training, persistence, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from iternn import BlockMap
from iternn.sparse import kernels
from iternn.sparse.linear import MaskedLinear, SparseLinear


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def block_case(draw, max_side=24):
    in_f = draw(st.integers(1, max_side))
    out_f = draw(st.integers(1, max_side))
    density = draw(st.floats(0.01, 1.0))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    seed = draw(st.integers(0, 2**31))
    return in_f, out_f, density, batch, seed


def triple(in_f, out_f, density, seed, backend, dtype=torch.float64):
    """A SparseLinear, a MaskedLinear with the same pattern and values, and the pattern."""
    sp = SparseLinear(in_f, out_f, density=density, generator=gen(seed), backend=backend, dtype=dtype)
    idx = sp.indices()
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    mask[idx[0], idx[1]] = True
    mk = MaskedLinear(in_f, out_f, mask=mask, generator=gen(seed + 1), dtype=dtype)
    with torch.no_grad():
        mk.weight.zero_()
        mk.weight[idx[0], idx[1]] = sp.values
        mk.bias.copy_(sp.bias)
    return sp, mk, idx


# ============================================================================ equivalence
@pytest.mark.parametrize("backend", ["csr", "dense"])
@given(case=block_case())
def test_sparse_equals_masked_equals_dense_reference(backend, case):
    in_f, out_f, density, batch, seed = case
    sp, mk, idx = triple(in_f, out_f, density, seed, backend)
    assert sp.backend == backend
    x = torch.randn(*batch, in_f, dtype=torch.float64, generator=gen(seed + 2))
    gy = torch.randn(*batch, out_f, dtype=torch.float64, generator=gen(seed + 3))
    w_dense = sp.dense_weight().detach().clone().requires_grad_()
    b_ref = sp.bias.detach().clone().requires_grad_()
    outs = {}
    for name, fn, _ in (
        ("sparse", sp, None),
        ("masked", mk, None),
        ("ref", lambda x: F.linear(x, w_dense, b_ref), None),
    ):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(gy)
        outs[name] = (y.detach(), xx.grad)
    for name in ("sparse", "masked"):
        torch.testing.assert_close(outs[name][0], outs["ref"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outs[name][1], outs["ref"][1], rtol=1e-12, atol=1e-12)
    assert outs["sparse"][0].shape == (*batch, out_f)
    # value gradient = the dense weight gradient gathered at the stored entries
    torch.testing.assert_close(sp.values.grad, w_dense.grad[idx[0], idx[1]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mk.weight.grad[idx[0], idx[1]], sp.values.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(mk.weight.grad[~mk.mask], torch.zeros(int((~mk.mask).sum()), dtype=torch.float64))
    torch.testing.assert_close(sp.bias.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mk.bias.grad, b_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["csr", "dense"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    ],
    ids=["sgd-momentum", "adam"],
)
@given(case=block_case(max_side=16))
@settings(max_examples=10)
def test_same_parameters_after_optimizer_steps(backend, make_opt, case):
    in_f, out_f, density, batch, seed = case
    sp, mk, idx = triple(in_f, out_f, density, seed, backend)
    opt_s, opt_m = make_opt(sp.parameters()), make_opt(mk.parameters())
    g = gen(seed + 5)
    for _ in range(4):
        x = torch.randn(*batch, in_f, dtype=torch.float64, generator=g)
        target = torch.randn(*batch, out_f, dtype=torch.float64, generator=g)
        for m, opt in ((sp, opt_s), (mk, opt_m)):
            opt.zero_grad()
            F.mse_loss(torch.tanh(m(x)), target).backward()
            opt.step()
    torch.testing.assert_close(mk.weight.detach()[idx[0], idx[1]], sp.values.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mk.bias.detach(), sp.bias.detach(), rtol=1e-10, atol=1e-12)
    # masked-out entries stay exactly zero (zero gradient, zero weight decay on zero)
    assert not mk.weight.detach()[~mk.mask].any()
    # training did move the parameters (the comparison above is not vacuous)
    fresh = triple(in_f, out_f, density, seed, backend)[0]
    assert not torch.equal(sp.bias.detach(), fresh.bias.detach())
    assert sp.nnz == 0 or not torch.equal(sp.values.detach(), fresh.values.detach())


def test_backends_agree_in_float32_on_a_larger_block():
    torch.manual_seed(0)
    a = SparseLinear(300, 200, density=0.05, generator=gen(0), backend="csr")
    b = SparseLinear(300, 200, indices=a.indices(), backend="dense")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5, 300, generator=gen(1))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert a(x).dtype == torch.float32


# ============================================================================ construction
@given(in_f=st.integers(1, 60), out_f=st.integers(1, 60), density=st.floats(0.001, 1.0),
       seed=st.integers(0, 2**31))
def test_exact_density_and_reproducible(in_f, out_f, density, seed):
    m = SparseLinear(in_f, out_f, density=density, generator=gen(seed))
    assert m.nnz == round(density * in_f * out_f)
    assert m.density == m.nnz / (in_f * out_f)
    idx = m.indices()
    flat = idx[0] * in_f + idx[1]
    assert bool((flat.diff() > 0).all())  # distinct, row-major
    m2 = SparseLinear(in_f, out_f, density=density, generator=gen(seed))
    assert torch.equal(m.indices(), m2.indices())
    assert torch.equal(m.values, m2.values) and torch.equal(m.bias, m2.bias)


def test_different_seeds_give_different_patterns():
    a = SparseLinear(40, 30, density=0.2, generator=gen(1))
    b = SparseLinear(40, 30, density=0.2, generator=gen(2))
    assert a.nnz == b.nnz == 240
    assert not torch.equal(a.indices(), b.indices())


def test_init_uses_effective_fan_in():
    # Row i's entries and bias lie in +-1/sqrt(f_i), f_i = stored entries in row i.
    idx = torch.tensor([[0, 0, 0, 0, 2], [0, 1, 2, 3, 4]])  # row 0: 4 entries, row 1: none, row 2: 1
    m = SparseLinear(5, 3, indices=idx, generator=gen(0), dtype=torch.float64)
    v = m.values.detach()
    assert v[:4].abs().max() <= 0.5 and v[4].abs() <= 1.0
    b = m.bias.detach()
    assert float(b[1]) == 0 and abs(float(b[0])) <= 0.5
    # and the bounds are actually used (a wide spread, not tiny values)
    big = SparseLinear(400, 50, density=0.25, generator=gen(1))
    rows = big.indices()[0]
    counts = torch.bincount(rows, minlength=50).float()
    scaled = big.values.detach() * counts[rows].sqrt()
    assert scaled.abs().max() <= 1.0 + 1e-6 and scaled.abs().max() > 0.95
    mk = MaskedLinear(400, 50, mask=big.dense_weight() != 0, generator=gen(1))
    scaled_m = mk.weight.detach() * mk.mask.sum(1, keepdim=True).float().sqrt()
    assert scaled_m.abs().max() <= 1.0 + 1e-6 and scaled_m.abs().max() > 0.95


def test_indices_any_order_sorted_and_values_follow_indices():
    idx = torch.tensor([[2, 0, 1], [0, 3, 1]])
    m = SparseLinear(4, 3, indices=idx, bias=False, dtype=torch.float64)
    assert torch.equal(m.indices(), torch.tensor([[0, 1, 2], [3, 1, 0]]))
    w = m.dense_weight().detach()
    assert torch.equal(w[m.indices()[0], m.indices()[1]], m.values.detach())
    assert int((w != 0).sum()) <= 3 and m.bias is None


def test_auto_backend_follows_choose_backend():
    lo = SparseLinear(200, 200, density=0.02, generator=gen(0))
    hi = SparseLinear(200, 200, density=0.6, generator=gen(0))
    tiny = SparseLinear(100, 100, density=0.1, generator=gen(0))
    assert lo.backend == kernels.choose_backend(200, 200, lo.nnz) == "csr"
    assert hi.backend == "dense" and tiny.backend == "dense"
    lo.backend = "dense"
    assert lo.backend == "dense"
    lo.backend = "auto"
    assert lo.backend == "csr"
    assert "backend='csr'" in repr(lo) and "nnz=800" in repr(lo)


def test_trainable_counts():
    m = SparseLinear(30, 20, density=0.1, generator=gen(0))
    assert m.trainable_counts() == {"values": 60, "bias": 20}
    assert SparseLinear(30, 20, density=0.1, bias=False).trainable_counts() == {"values": 60}
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[::2, ::3] = True
    mk = MaskedLinear(30, 20, mask=mask)
    assert mk.trainable_counts() == {"weight": int(mask.sum()), "bias": 20} == {"weight": 100, "bias": 20}
    assert isinstance(mk.trainable_counts()["weight"], int)


# ============================================================================ persistence
@pytest.mark.parametrize("cls", ["sparse", "masked"])
def test_state_dict_round_trip(cls):
    sp, mk, idx = triple(30, 20, 0.15, 0, "csr")
    m = sp if cls == "sparse" else mk
    sd = m.state_dict()
    keys = ({"crow_indices", "col_indices", "values", "bias"} if cls == "sparse"
            else {"mask", "weight", "bias"})
    assert set(sd) == keys
    clone = SparseLinear(30, 20, indices=idx, dtype=torch.float64, backend="csr") if cls == "sparse" else \
        MaskedLinear(30, 20, mask=mk.mask, dtype=torch.float64)
    assert not torch.equal(clone.bias, m.bias)
    clone.load_state_dict(sd)
    x = torch.randn(3, 30, dtype=torch.float64, generator=gen(1))
    assert torch.equal(clone(x), m(x))


@pytest.mark.parametrize("other_nnz", [False, True])
def test_loading_a_different_pattern_raises(other_nnz):
    a = SparseLinear(30, 20, density=0.1, generator=gen(0))
    b = SparseLinear(30, 20, density=0.2 if other_nnz else 0.1, generator=gen(1))
    before = b.values.detach().clone()
    with pytest.raises(ValueError, match="(crow|col)_indices"):
        b.load_state_dict(a.state_dict())
    assert torch.equal(b.values, before)  # nothing was loaded
    # the same holds for the masked block's mask
    m1 = MaskedLinear(5, 4, mask=torch.eye(4, 5, dtype=torch.bool))
    m2 = MaskedLinear(5, 4, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        m2.load_state_dict(m1.state_dict())


def test_double_and_to():
    m = SparseLinear(30, 20, density=0.1, generator=gen(0))
    x = torch.randn(2, 30, generator=gen(1))
    y32 = m(x)
    m.double()
    assert m.values.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert m.crow_indices.dtype == m.col_indices.dtype == torch.int32  # indices untouched
    y64 = m(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-6)
    m.to(torch.float32)
    assert m(x).dtype == torch.float32
    m.to("cpu")
    assert m.col_indices_t.device.type == "cpu"
    mk = MaskedLinear(30, 20, mask=m.dense_weight() != 0).double()
    assert mk(x.double()).dtype == torch.float64 and mk.mask.dtype == torch.bool


@pytest.mark.parametrize("backend", ["csr", "dense"])
def test_torch_save_load(tmp_path, backend):
    m = SparseLinear(30, 20, density=0.1, generator=gen(0), backend=backend)
    mk = MaskedLinear(30, 20, mask=m.dense_weight() != 0)
    path = tmp_path / "m.pt"
    torch.save({"sparse": m, "masked": mk}, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(3, 30, generator=gen(1))
    assert torch.equal(loaded["sparse"](x), m(x)) and loaded["sparse"].backend == backend
    assert torch.equal(loaded["masked"](x), mk(x))


# ============================================================================ engine
def test_usable_as_block_in_a_block_map():
    m = BlockMap({"x": 12, "h": 9})
    sp, mk, _ = triple(12, 9, 0.3, 0, "csr")
    m.connect("h", "x", sp)
    m.set_activation("h", nn.Tanh())
    ref = BlockMap({"x": 12, "h": 9})
    ref.connect("h", "x", mk)
    ref.set_activation("h", nn.Tanh())
    state = {"x": torch.randn(4, 12, dtype=torch.float64, generator=gen(1)),
             "h": torch.zeros(4, 9, dtype=torch.float64)}
    torch.testing.assert_close(m(state)["h"], ref(state)["h"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="in_features"):
        BlockMap({"x": 11, "h": 9}).connect("h", "x", SparseLinear(12, 9, density=0.5))


# ============================================================================ bad input
@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, math.nan, math.inf])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        SparseLinear(4, 4, density=density)


def test_density_wrong_type():
    with pytest.raises(TypeError, match="density"):
        SparseLinear(4, 4, density="0.5")


@pytest.mark.parametrize("both", [True, False])
def test_both_or_neither_density_and_indices(both):
    kwargs = {"density": 0.5, "indices": torch.tensor([[0], [0]])} if both else {}
    with pytest.raises(ValueError, match="density and indices"):
        SparseLinear(4, 4, **kwargs)


def test_duplicate_indices():
    with pytest.raises(ValueError, match="indices contain 1 duplicate.*\\(1, 2\\)"):
        SparseLinear(4, 3, indices=torch.tensor([[1, 0, 1], [2, 0, 2]]))


@pytest.mark.parametrize("idx, word", [([[0, 3], [0, 0]], "row index 3"),
                                       ([[0, 1], [0, 4]], "column index 4"),
                                       ([[-1], [0]], "row index -1")])
def test_indices_out_of_range(idx, word):
    with pytest.raises(ValueError, match=f"indices: {word}"):
        SparseLinear(4, 3, indices=torch.tensor(idx))


def test_sizes_are_checked_before_the_pattern_is_built():
    from iternn.errors import SizeError

    # One entry, but the transposed pattern needs a row pointer per input: 8 TB.
    for kwargs in ({"density": 1e-15}, {"indices": torch.tensor([[0], [0]])}):
        with pytest.raises(SizeError, match=r"SparseLinear\(in_features=1000000000000, out_features=4\)"):
            SparseLinear(10**12, 4, **kwargs)
    # int32 columns against a bound beyond int32: no wrap-around in the range check
    from iternn.sparse import check_csr_pattern

    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    check_csr_pattern(crow, col, (1, 10**12), name="wide")


def test_indices_wrong_shape_and_dtype():
    with pytest.raises(ValueError, match="indices must have shape"):
        SparseLinear(4, 3, indices=torch.tensor([[0, 1, 2]]))
    with pytest.raises(TypeError, match="indices must be an integer"):
        SparseLinear(4, 3, indices=torch.tensor([[0.0], [1.0]]))


def test_mask_wrong_shape():
    with pytest.raises(ValueError, match="mask must have shape"):
        MaskedLinear(4, 3, mask=torch.ones(4, 3, dtype=torch.bool))


def test_mask_wrong_dtype():
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        MaskedLinear(4, 3, mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        MaskedLinear(4, 3, mask=[[True] * 4] * 3)


def test_bad_backend_and_features():
    with pytest.raises(ValueError, match="backend"):
        SparseLinear(4, 4, density=0.5, backend="bsr")
    m = SparseLinear(4, 4, density=0.5)
    with pytest.raises(ValueError, match="backend"):
        m.backend = "coo"
    with pytest.raises(ValueError, match="in_features"):
        SparseLinear(0, 4, density=0.5)
    with pytest.raises(TypeError, match="out_features"):
        SparseLinear(4, 2.0, density=0.5)


@pytest.mark.parametrize("cls", ["sparse", "masked"])
def test_input_dtype_mismatch_names_parameter(cls):
    m = (SparseLinear(4, 3, density=0.5) if cls == "sparse"
         else MaskedLinear(4, 3, mask=torch.ones(3, 4, dtype=torch.bool)))
    name = "SparseLinear.values" if cls == "sparse" else "MaskedLinear.weight"
    with pytest.raises(TypeError, match=name):
        m(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="in_features=4"):
        m(torch.zeros(2, 5))


def test_csr_backend_rejects_unsupported_dtype():
    m = SparseLinear(40, 30, density=0.05, backend="csr").to(torch.bfloat16)
    with pytest.raises(TypeError, match="backend='dense'"):
        m(torch.zeros(2, 40, dtype=torch.bfloat16))
    m.backend = "dense"
    assert m(torch.zeros(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ============================================================================ file codecs
def test_iternn_save_load_round_trip(tmp_path):
    import iternn

    m = BlockMap({"x": 12, "h": 9})
    sp, mk, _ = triple(12, 9, 0.3, 0, "csr")
    m.connect("h", "x", sp)
    m.connect("h", "h", MaskedLinear(9, 9, mask=torch.rand(9, 9, generator=gen(3)) < 0.4,
                                      generator=gen(4), dtype=torch.float64))
    path = tmp_path / "m.safetensors"
    iternn.save(m, path)
    back = iternn.load(path)
    state = {"x": torch.randn(4, 12, dtype=torch.float64, generator=gen(1)),
             "h": torch.randn(4, 9, dtype=torch.float64, generator=gen(2))}
    assert torch.equal(back(state)["h"], m(state)["h"])
    got = back.block("h", "x")
    assert torch.equal(got.indices(), sp.indices()) and got.backend == "csr"
    assert torch.equal(back.block("h", "h").mask, m.block("h", "h").mask)
    # the loaded pattern is checked from then on
    with pytest.raises(ValueError, match="col_indices|crow_indices"):
        other = SparseLinear(12, 9, density=0.3, generator=gen(9), dtype=torch.float64)
        got.load_state_dict(other.state_dict())


# ============================================================================ pattern edits
def _eight_by_64(backend: str = "csr") -> SparseLinear:
    """8 x 64 block, row r stores columns r, r+10, r+20, r+30 (32 entries, 4 per row)."""
    rows = torch.arange(8).repeat_interleave(4)
    cols = rows + torch.tensor([0, 10, 20, 30]).repeat(8)
    return SparseLinear(64, 8, indices=torch.stack((rows, cols)), backend=backend,
                        generator=gen(0), dtype=torch.float64)


def _set(name, index, value):
    def edit(m):
        with torch.no_grad():
            getattr(m, name)[index] = value
    return edit


def _assign(name, make):
    def edit(m):
        setattr(m, name, make(getattr(m, name)))
    return edit


def _swap_row_1(m):
    with torch.no_grad():
        m.col_indices[4], m.col_indices[5] = m.col_indices[5].clone(), m.col_indices[4].clone()


def _shorten_data(m):
    m.col_indices.data = m.col_indices.data[:20]


BAD_EDITS = {
    "col out of range": (_set("col_indices", -1, 100000), r"col_indices\[31\] = 100000 is outside \[0, 64\)"),
    "negative col": (_set("col_indices", 5, -1), r"col_indices\[5\] = -1 is outside \[0, 64\)"),
    "crow not monotone": (_set("crow_indices", 3, 17),
                          r"crow_indices\[4\] = 16 is less than crow_indices\[3\] = 17"),
    "crow[-1] != nnz": (_set("crow_indices", -1, 31), r"crow_indices\[8\] = 31 must equal .* = 32"),
    "crow[0] != 0": (_set("crow_indices", 0, 1), r"crow_indices\[0\] = 1, must be 0"),
    "col too short": (_assign("col_indices", lambda t: t[:-1].clone()), r"crow_indices\[8\] = 32 must equal"),
    "crow too long": (_assign("crow_indices", lambda t: torch.cat((t, t[-1:]))),
                      r"crow_indices has 10 entries; a block of 8 rows needs 9"),
    "unsorted row": (_swap_row_1, r"col_indices\[5\] = 1 is less than col_indices\[4\] = 11 in row 1"),
    "duplicate in row": (_set("col_indices", 5, 1),
                         r"col_indices\[5\] = 1 repeats col_indices\[4\] = 1 in row 1"),
    "float dtype": (_assign("col_indices", lambda t: t.float()), r"col_indices has dtype torch.float32"),
    "mixed index dtypes": (_assign("col_indices", lambda t: t.long()),
                           r"col_indices has dtype torch.int64 but crow_indices has torch.int32"),
    ".data to a prefix": (_shorten_data, r"crow_indices\[8\] = 32 must equal .* = 20"),
}


@pytest.mark.parametrize("backend", ["csr", "dense"])
@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_every_bad_pattern_edit_is_refused_before_a_kernel_reads_it(case, backend):
    from iternn.errors import PatternError

    m = _eight_by_64(backend)
    x = torch.randn(5, 64, dtype=torch.float64, generator=gen(1))
    m(x)  # checked and remembered: the edit below must be noticed anyway
    edit, message = BAD_EDITS[case]
    edit(m)
    for use in (lambda: m(x), m.indices, m.dense_weight):
        with pytest.raises(PatternError, match=message) as info:
            use()
        assert "SparseLinear." in info.value.token  # names the block's buffer


def test_bad_edit_between_forward_and_backward_is_refused():
    from iternn.errors import PatternError

    m = _eight_by_64("csr")
    x = torch.randn(5, 64, dtype=torch.float64, generator=gen(1), requires_grad=True)
    y = m(x)
    with torch.no_grad():
        m.col_indices[-1] = 100000
    with pytest.raises(PatternError, match="100000 is outside"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["csr", "dense"])
def test_valid_edit_rederives_the_transposed_pattern(backend):
    """Moving an entry to another column is a valid edit: the output and every gradient
    then follow the edited pattern (the transposed buffers the input gradient uses are
    derived again; stale ones would give a wrong dx)."""
    m = _eight_by_64(backend)
    x = torch.randn(5, 64, dtype=torch.float64, generator=gen(1), requires_grad=True)
    m(x).sum().backward()
    with torch.no_grad():
        m.col_indices[3] = 63  # row 0: columns 0, 10, 20, 63 (still sorted)
        m.crow_indices_t.zero_()  # edits of derived buffers are overwritten by the derivation
    x.grad = None
    y = m(x)
    y.sum().backward()
    w = torch.zeros(8, 64, dtype=torch.float64)
    w[m.indices()[0], m.indices()[1]] = m.values.detach()
    assert w[0, 63] != 0 and w[0, 30] == 0
    torch.testing.assert_close(y, x.detach() @ w.T + m.bias.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.ones(5, 8, dtype=torch.float64) @ w, rtol=0, atol=1e-12)


def test_pattern_is_checked_once_per_change(monkeypatch):
    from iternn.sparse import linear

    m = _eight_by_64("csr")
    calls = []
    real = linear.check_csr_pattern
    monkeypatch.setattr(linear, "check_csr_pattern", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 64, dtype=torch.float64, generator=gen(1))
    for _ in range(3):
        m(x)
    assert calls == []
    with torch.no_grad():
        m.values.mul_(2)  # values are not the pattern
    m(x)
    assert calls == []
    with torch.no_grad():
        m.col_indices[0] = 0  # same value, but an in-place write: checked again, once
    m(x)
    m(x)
    assert calls == [1]
    m.load_state_dict(m.state_dict())  # a load writes the buffers: checked again, once
    m(x)
    m(x)
    assert calls == [1, 1]


def test_loaded_state_dict_with_a_bad_pattern_is_refused():
    from iternn.errors import PatternError

    m = _eight_by_64("csr")
    sd = m.state_dict()
    sd["col_indices"] = sd["col_indices"].clone()
    sd["col_indices"][-1] = 100000
    with pytest.raises(PatternError, match="'col_indices'"):
        m.load_state_dict(sd)
    assert int(m.col_indices[-1]) == 37  # unchanged


def test_inference_mode_module_is_checked_on_every_call():
    from iternn.errors import PatternError

    with torch.inference_mode():
        m = _eight_by_64("csr")
        x = torch.randn(3, 64, dtype=torch.float64, generator=gen(1))
        ref = m(x)
        assert torch.equal(m(x), ref)
        m.col_indices[-1] = 100000  # inference tensors have no version counter
        with pytest.raises(PatternError, match="100000"):
            m(x)


def test_masked_linear_refuses_a_bad_mask():
    from iternn.errors import PatternError

    mask = torch.rand(6, 5, generator=gen(0)) < 0.5
    x = torch.randn(2, 5, generator=gen(1))
    for bad, message in ((mask.float(), "torch.float32"),  # would scale entries by the mask
                         (mask[:1], r"shape \(6, 5\), got torch.bool, shape \(1, 5\)")):  # would broadcast
        m = MaskedLinear(5, 6, mask=mask, generator=gen(2))
        m.mask = bad
        for use in (lambda m=m: m(x), m.dense_weight, m.indices, m.trainable_counts):
            with pytest.raises(PatternError, match=message):
                use()
    m = MaskedLinear(5, 6, mask=mask, generator=gen(2))
    m.weight = nn.Parameter(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"MaskedLinear.weight must have shape \(6, 5\)"):
        m(x)


def test_sparse_product_never_mixes_dtypes():
    from iternn.errors import MapTypeError

    m = _eight_by_64("csr")
    m.bias.data = m.bias.data.float()  # float32 bias next to float64 values and input
    x = torch.randn(3, 64, dtype=torch.float64, generator=gen(1))
    with pytest.raises(MapTypeError, match="bias"):
        m(x)
    with pytest.raises(MapTypeError, match="bias"):
        kernels.sparse_linear(x[:0], m.values, m.bias, m.pattern)  # the empty-batch path too
