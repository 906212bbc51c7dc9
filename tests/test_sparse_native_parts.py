"""The compiled kernels' multi-part products and fused backward (sparse.native):
spmm_parts, sdd_parts, spmm through a permutation and linear_backward, checked in float64
against dense references over part counts, widths, operand and output layouts, empty
rows and parts, and batches on both sides of the tile and small-batch paths; float32 at
tolerance; thread-count independence; and one named error per bad operand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse_native import operand

from iternn.errors import MapError, MapTypeError, PatternError
from iternn.sparse import native
from iternn.sparse.kernels import csr_pattern, sparse_linear
from iternn.sparse.linear import SparseLinear
from iternn.sparse.sampling import random_indices

pytestmark = pytest.mark.skipif(not native.available(), reason="native CSR kernels unavailable")

LAYOUTS = ["contiguous", "transposed", "sliced", "broadcast"]
#: batches around the small-batch path (1, 2), the tiles (16 doubles, 32 floats) and more
BATCHES = [1, 2, 3, 33, 100]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def output(batch: int, rows: int, layout: str, dtype) -> torch.Tensor | None:
    """An ``out`` tensor of the given layout (None: the kernels' own)."""
    if layout == "new":
        return None
    if layout == "transposed":
        return torch.full((rows, batch), float("nan"), dtype=dtype).t()
    return torch.full((2 * batch, rows + 3), float("nan"), dtype=dtype)[::2, 2:-1]  # sliced


class Part:
    """A random (rows x srcs) CSR block with nnz entries, its dense weight and an operand."""

    def __init__(self, rows: int, srcs: int, nnz: int, batch: int, layout: str, dtype,
                 g: torch.Generator) -> None:
        self.idx = random_indices(rows, srcs, nnz, generator=g)
        self.pattern = csr_pattern(self.idx, (rows, srcs))
        self.values = torch.randn(nnz, dtype=dtype, generator=g)
        self.x = operand(batch, srcs, layout, dtype, g)
        self.w = torch.zeros(rows, srcs, dtype=torch.float64)
        self.w[self.idx[0], self.idx[1]] = self.values.double()

    def spmm_part(self):
        return self.pattern.crow, self.pattern.col, self.values, self.x

    def sdd_part(self):
        return self.pattern.crow, self.pattern.col, self.x

    def dv(self, gy: torch.Tensor) -> torch.Tensor:
        return (gy.double().t() @ self.x.double())[self.idx[0], self.idx[1]]


EXACT = dict(rtol=1e-12, atol=1e-12)


@st.composite
def parts_case(draw):
    rows = draw(st.integers(1, 40))
    count = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 40)) for _ in range(count)]
    # nnz from none to every position, so that empty parts and empty rows both occur
    nnzs = [draw(st.sampled_from([0, 1, w * rows // 7, w * rows // 2, w * rows])) for w in widths]
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(count)]
    batch = draw(st.sampled_from(BATCHES))
    return (rows, widths, nnzs, layouts, batch, draw(st.booleans()), draw(st.sampled_from(LAYOUTS)),
            draw(st.sampled_from(["new", "transposed", "sliced"])), draw(st.integers(0, 2**31)))


@given(case=parts_case())
@settings(max_examples=40)
def test_parts_match_a_dense_reference(case):
    rows, widths, nnzs, layouts, batch, with_bias, g_layout, out_layout, seed = case
    g = gen(seed)
    dt = torch.float64
    parts = [Part(rows, w, k, batch, lay, dt, g) for w, k, lay in zip(widths, nnzs, layouts)]
    bias = torch.randn(rows, dtype=dt, generator=g) if with_bias else None
    gy = operand(batch, rows, g_layout, dt, g)
    names = [f"block{i}" for i in range(len(parts))]
    lib = native.library()

    out = output(batch, rows, out_layout, dt)
    y = native.spmm_parts(lib, [p.spmm_part() for p in parts], rows, bias, names=names, out=out)
    ref = sum(p.x @ p.w.t() for p in parts) + (0 if bias is None else bias)
    torch.testing.assert_close(y, ref, **EXACT)
    if out is not None:
        assert y is out
    else:
        assert y.is_contiguous()

    dvs = native.sdd_parts(lib, [p.sdd_part() for p in parts], gy, names=names)
    assert len(dvs) == len(parts)
    for p, dv in zip(parts, dvs):
        torch.testing.assert_close(dv, p.dv(gy), **EXACT)


@st.composite
def backward_case(draw):
    rows, srcs = draw(st.integers(1, 50)), draw(st.integers(1, 50))
    nnz = draw(st.sampled_from([0, 1, rows * srcs // 9, rows * srcs // 2, rows * srcs]))
    return (rows, srcs, nnz, draw(st.sampled_from(BATCHES)), draw(st.sampled_from(LAYOUTS)),
            draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(["new", "transposed", "sliced"])),
            draw(st.integers(0, 2**31)))


@given(case=backward_case())
@settings(max_examples=40)
def test_permuted_product_and_fused_backward_match_a_dense_reference(case):
    rows, srcs, nnz, batch, x_layout, g_layout, out_layout, seed = case
    g = gen(seed)
    p = Part(rows, srcs, nnz, batch, x_layout, torch.float64, g)
    pat = p.pattern
    gy = operand(batch, rows, g_layout, torch.float64, g)
    lib = native.library()
    ref_dx = gy @ p.w

    # dx = g W: the transposed pattern reads W's values through the permutation
    out = output(batch, srcs, out_layout, torch.float64)
    dx = native.spmm(lib, pat.crow_t, pat.col_t, p.values, gy, srcs, perm=pat.perm, out=out)
    torch.testing.assert_close(dx, ref_dx, **EXACT)

    out = output(batch, srcs, out_layout, torch.float64)
    dx, dv = native.linear_backward(lib, pat.crow_t, pat.col_t, pat.perm, p.values, gy, p.x, out=out)
    torch.testing.assert_close(dx, ref_dx, **EXACT)
    torch.testing.assert_close(dv, p.dv(gy), **EXACT)
    if out is None:  # dx in x's layout where x has one (what a leaf's .grad keeps)
        assert dx.stride() == torch.empty_like(p.x).stride()


@pytest.mark.parametrize("batch", BATCHES)
def test_float32_within_rounding_of_the_float64_reference(batch):
    g = gen(batch)
    parts = [Part(70, w, k, batch, lay, torch.float32, g)
             for w, k, lay in ((90, 900, "contiguous"), (45, 300, "transposed"), (8, 0, "sliced"))]
    bias = torch.randn(70, generator=g)
    gy = torch.randn(batch, 70, generator=g)
    lib = native.library()
    tol = dict(rtol=2e-5, atol=2e-5)
    y = native.spmm_parts(lib, [p.spmm_part() for p in parts], 70, bias)
    ref = sum(p.x.double() @ p.w.t() for p in parts) + bias.double()
    torch.testing.assert_close(y.double(), ref, **tol)
    for p, dv in zip(parts, native.sdd_parts(lib, [p.sdd_part() for p in parts], gy)):
        torch.testing.assert_close(dv.double(), p.dv(gy), **tol)
    p, pat = parts[0], parts[0].pattern
    dx, dv = native.linear_backward(lib, pat.crow_t, pat.col_t, pat.perm, p.values, gy, p.x)
    torch.testing.assert_close(dx.double(), gy.double() @ p.w, **tol)
    torch.testing.assert_close(dv.double(), p.dv(gy), **tol)


def test_rows_without_entries_get_the_bias_and_empty_parts_add_nothing():
    # rows 3..199 have no entry in any part; the second part has none at all
    lib = native.library()
    x1 = torch.randn(40, 170, dtype=torch.float64, generator=gen(0))
    x2 = torch.randn(40, 30, dtype=torch.float64, generator=gen(1))
    p1 = csr_pattern(torch.tensor([[0, 2, 2, 200], [5, 0, 150, 7]]), (260, 170))
    p2 = csr_pattern(torch.zeros(2, 0, dtype=torch.long), (260, 30))
    v1 = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.float64)
    bias = torch.randn(260, dtype=torch.float64, generator=gen(2))
    y = native.spmm_parts(lib, [(p1.crow, p1.col, v1, x1), (p2.crow, p2.col, v1[:0], x2)], 260, bias)
    assert torch.equal(y[:, 3:200], bias[3:200].expand(40, 197))
    torch.testing.assert_close(y[:, 2], bias[2] - 2.0 * x1[:, 0] + 0.25 * x1[:, 150], **EXACT)
    dv1, dv2 = native.sdd_parts(lib, [(p1.crow, p1.col, x1), (p2.crow, p2.col, x2)], torch.ones(40, 260,
                                                                                               dtype=torch.float64))
    assert dv2.shape == (0,)
    torch.testing.assert_close(dv1, x1[:, [5, 0, 150, 7]].sum(0), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(dtype):
    g = gen(5)
    parts = [Part(300, w, k, 100, lay, dtype, g)
             for w, k, lay in ((280, 8000, "contiguous"), (90, 2000, "transposed"), (33, 500, "sliced"))]
    gy = torch.randn(100, 300, dtype=dtype, generator=g)
    bias = torch.randn(300, dtype=dtype, generator=g)
    pat = parts[0].pattern
    lib = native.library()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((
                native.spmm_parts(lib, [p.spmm_part() for p in parts], 300, bias),
                *native.sdd_parts(lib, [p.sdd_part() for p in parts], gy),
                *native.linear_backward(lib, pat.crow_t, pat.col_t, pat.perm, parts[0].values, gy,
                                        parts[0].x),
                native.spmm(lib, pat.crow_t, pat.col_t, parts[0].values, gy, 280, perm=pat.perm),
            ))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("wanted", ["x", "values", "both"])
def test_linear_function_gradients_in_every_combination(wanted):
    # the backward takes one of three routes (fused; dx through the permutation; dv alone)
    sp = SparseLinear(60, 50, density=0.2, backend="csr", generator=gen(6), dtype=torch.float64)
    x = torch.randn(40, 60, dtype=torch.float64, generator=gen(7)).t().contiguous().t()
    x.requires_grad_(wanted in ("x", "both"))
    values = sp.values.detach().clone().requires_grad_(wanted in ("values", "both"))
    gy = torch.randn(40, 50, dtype=torch.float64, generator=gen(8))
    sparse_linear(x, values, None, sp.pattern, kernel="native").backward(gy)
    w = sp.dense_weight().detach()
    if wanted in ("x", "both"):
        torch.testing.assert_close(x.grad, gy @ w, **EXACT)
        assert x.grad.stride() == x.stride()  # in x's (transposed) layout
    if wanted in ("values", "both"):
        idx = sp.indices()
        torch.testing.assert_close(values.grad, (gy.t() @ x.detach())[idx[0], idx[1]], **EXACT)


def test_out_is_written_in_place_and_its_version_bumped():
    p = Part(20, 30, 100, 5, "contiguous", torch.float64, gen(9))
    out = torch.empty(20, 5, dtype=torch.float64).t()
    version = out._version
    y = native.spmm_parts(native.library(), [p.spmm_part()], 20, out=out)
    assert y is out and out._version > version
    torch.testing.assert_close(out, p.x @ p.w.t(), **EXACT)


# ============================================================================ bad operands
def _setup():
    p = csr_pattern(torch.tensor([[0, 0, 1, 2, 2], [0, 2, 1, 0, 3]]), (3, 4))
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(10))
    v = torch.randn(5, dtype=torch.float64, generator=gen(11))
    return p, x, v


def _bad_spmm_parts(case: str):
    """The call of spmm_parts with one bad operand: part 'b' (the second) is at fault
    where a part is."""
    p, x, v = _setup()
    good = (p.crow, p.col, v, x)
    lib = native.library()
    names = ["a", "b"]

    def call(second=good, *, parts=None, rows=3, bias=None, out=None, names=names):
        return native.spmm_parts(lib, [good, second] if parts is None else parts, rows, bias,
                                 names=names, out=out)

    return {
        "parts not a sequence": lambda: call(parts=x),
        "no parts": lambda: call(parts=[]),
        "part not a 4-tuple": lambda: call((p.crow, p.col, v)),
        "names of another length": lambda: call(names=["a"]),
        "x not a tensor": lambda: call(parts=[(p.crow, p.col, v, [[1.0]])], names=["a"]),
        "x of an integer dtype": lambda: call(parts=[(p.crow, p.col, v.long(), x.long())], names=["a"]),
        "crow int64": lambda: call((p.crow.long(), p.col, v, x)),
        "col not contiguous": lambda: call((p.crow, torch.stack([p.col, p.col], 1)[:, 0], v, x)),
        "x of another dtype": lambda: call((p.crow, p.col, v, x.float())),
        "x not 2-D": lambda: call((p.crow, p.col, v, x[0])),
        "x not on the CPU": lambda: call((p.crow, p.col, v, x.to("meta"))),
        "values of another dtype": lambda: call((p.crow, p.col, v.float(), x)),
        "values of another length": lambda: call((p.crow, p.col, v[:4], x)),
        "crow of another length": lambda: call((p.crow[:3], p.col, v, x)),
        "another batch": lambda: call((p.crow, p.col, v, x[:4])),
        "bias of another length": lambda: call(bias=torch.zeros(4, dtype=torch.float64)),
        "bias of another dtype": lambda: call(bias=torch.zeros(3)),
        "out of another shape": lambda: call(out=torch.empty(5, 4, dtype=torch.float64)),
        "out of another dtype": lambda: call(out=torch.empty(5, 3)),
        "out overlapping itself": lambda: call(out=torch.empty(1, 3, dtype=torch.float64).expand(5, 3)),
        "out overlapping an input": lambda: call(out=x[:, :3]),
        "column out of range": lambda: call((p.crow, torch.tensor([0, 2, 1, 0, 9], dtype=torch.int32),
                                             v, x)),
    }[case]


SPMM_PARTS_ERRORS = {
    "parts not a sequence": (MapTypeError, r"'parts' must be a list or tuple"),
    "no parts": (MapError, r"'parts' is empty"),
    "part not a 4-tuple": (MapTypeError, r"part 1 must be a tuple of 4 tensors"),
    "names of another length": (MapTypeError, r"'names' must be a list or tuple of 2 str"),
    "x not a tensor": (MapTypeError, r"part 'a': 'x' must be a tensor, got list"),
    "x of an integer dtype": (MapTypeError, r"dtype torch.int64 is not float32/float64"),
    "crow int64": (MapTypeError, r"part 'b': 'crow' must be a contiguous 1-D int32"),
    "col not contiguous": (MapTypeError, r"part 'b': 'col' must be a contiguous 1-D int32"),
    "x of another dtype": (MapTypeError, r"part 'b': 'x' must be a 2-D torch.float64 CPU tensor"),
    "x not 2-D": (MapTypeError, r"part 'b': 'x' must be a 2-D"),
    "x not on the CPU": (MapTypeError, r"part 'b': 'x' must be a 2-D torch.float64 CPU tensor"),
    "values of another dtype": (MapTypeError, r"part 'b': 'values' must be a contiguous torch.float64"),
    "values of another length": (MapError, r"part 'b': 'values' must have 5 entries, got 4"),
    "crow of another length": (MapError, r"part 'b': 3 rows need crow of 4 entries, got 3"),
    "another batch": (MapError, r"part 'b': 'x' has batch 4 but the first part's has 5"),
    "bias of another length": (MapError, r"'bias' must have 3 entries"),
    "bias of another dtype": (MapTypeError, r"'bias' must be a contiguous torch.float64"),
    "out of another shape": (MapError, r"'out' must have shape \(5, 3\)"),
    "out of another dtype": (MapTypeError, r"'out' must be a 2-D torch.float64"),
    "out overlapping itself": (MapError, r"'out' has overlapping entries"),
    "out overlapping an input": (MapError, r"'out' overlaps the memory of an input"),
    "column out of range": (PatternError, r"bad token 'b.col_indices'.*col_indices\[4\] = 9 is outside"),
}


@pytest.mark.parametrize("case", list(SPMM_PARTS_ERRORS))
def test_spmm_parts_names_each_bad_operand(case):
    error, message = SPMM_PARTS_ERRORS[case]
    with pytest.raises(error, match=message):
        _bad_spmm_parts(case)()


@pytest.mark.parametrize("product", ["spmm_parts", "sdd_parts"])
def test_an_index_changed_behind_the_checks_is_named_by_part(product):
    # checked=True: the caller vouches for the pattern, which holds a bad column all the
    # same (a write that bypassed the memo); the kernel finds it and the error names the
    # part and the entry
    p, x, v = _setup()
    bad = p.col.clone()
    bad[3] = -4
    lib = native.library()
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen(12))
    with pytest.raises(PatternError, match=r"bad token 'h2.col_indices'.*col_indices\[3\] = -4"):
        if product == "spmm_parts":
            native.spmm_parts(lib, [(p.crow, p.col, v, x), (p.crow, bad, v, x)], 3, checked=True,
                              names=["h1", "h2"])
        else:
            native.sdd_parts(lib, [(p.crow, p.col, x), (p.crow, bad, x)], g, checked=True,
                             names=["h1", "h2"])


SDD_PARTS_ERRORS = {
    "g not 2-D": (lambda p, x, g: [(p.crow, p.col, x)], lambda g: g[0], MapTypeError,
                  r"'g' must be a 2-D torch.float64"),
    "part not a 3-tuple": (lambda p, x, g: [(p.crow, p.col)], lambda g: g, MapTypeError,
                           r"part 0 must be a tuple of 3 tensors"),
    "another batch": (lambda p, x, g: [(p.crow, p.col, x[:2])], lambda g: g, MapError,
                      r"part 'part 0': g \(5, 3\) and x \(2, 4\) need the same batch"),
    "crow of another length": (lambda p, x, g: [(p.crow[:2], p.col, x)], lambda g: g, MapError,
                               r"crow of g.shape\[1\] \+ 1 = 4 entries \(got 2\)"),
    "x of another dtype": (lambda p, x, g: [(p.crow, p.col, x.float())], lambda g: g, MapTypeError,
                           r"part 'part 0': 'x' must be a 2-D torch.float64"),
}


@pytest.mark.parametrize("case", list(SDD_PARTS_ERRORS))
def test_sdd_parts_names_each_bad_operand(case):
    parts, g_of, error, message = SDD_PARTS_ERRORS[case]
    p, x, _ = _setup()
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen(13))
    with pytest.raises(error, match=message):
        native.sdd_parts(native.library(), parts(p, x, g), g_of(g))


def _bad_backward(case: str):
    p, x, v = _setup()
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen(14))
    lib = native.library()
    bad_perm = p.perm.clone()
    bad_perm[2] = 5
    shared = torch.randn(5, 7, dtype=torch.float64, generator=gen(16))  # g and out in one buffer

    def call(crow_t=p.crow_t, col_t=p.col_t, perm=p.perm, values=v, g=g, x=x, out=None, checked=False):
        return native.linear_backward(lib, crow_t, col_t, perm, values, g, x, out=out, checked=checked,
                                      name="blk")

    return {
        "perm int64": lambda: call(perm=p.perm.long()),
        "perm of another length": lambda: call(perm=p.perm[:4]),
        "values of another dtype": lambda: call(values=v.float()),
        "crow_t of another length": lambda: call(crow_t=p.crow_t[:4]),
        "g of another batch": lambda: call(g=g[:3]),
        "out overlapping g": lambda: call(g=shared[:, :3], out=shared[:, 2:6]),
        "perm entry out of range": lambda: call(perm=bad_perm, checked=True),
        "transposed column out of range": lambda: call(
            col_t=torch.tensor([0, 2, 1, 0, 7], dtype=torch.int32), checked=True),
    }[case]


BACKWARD_ERRORS = {
    "perm int64": (MapTypeError, r"'perm' must be a contiguous torch.int32"),
    "perm of another length": (MapError, r"'perm' must have 5 entries, got 4"),
    "values of another dtype": (MapTypeError, r"'values' must be a contiguous torch.float64"),
    "crow_t of another length": (MapError, r"crow_t of x.shape\[1\] \+ 1 = 5 entries \(got 4\)"),
    "g of another batch": (MapError, r"g \(3, 3\) and x \(5, 4\) need the same batch"),
    "out overlapping g": (MapError, r"'out' overlaps the memory of an input"),
    "perm entry out of range": (PatternError, r"bad token 'blk.perm_t'.*perm_t\[2\] = 5 is outside \[0, 5\)"),
    "transposed column out of range": (PatternError,
                                       r"bad token 'blk.col_indices_t'.*col_indices_t\[4\] = 7 is outside"),
}


@pytest.mark.parametrize("case", list(BACKWARD_ERRORS))
def test_linear_backward_names_each_bad_operand(case):
    error, message = BACKWARD_ERRORS[case]
    with pytest.raises(error, match=message):
        _bad_backward(case)()


def test_permuted_product_names_a_bad_permutation():
    p, x, v = _setup()
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen(15))
    bad = p.perm.clone()
    bad[0] = -1
    with pytest.raises(PatternError, match=r"bad token 'W.perm_t'.*perm_t\[0\] = -1 is outside \[0, 5\)"):
        native.spmm(native.library(), p.crow_t, p.col_t, v, g, 4, perm=bad, checked=True, name="W",
                    buffers=("crow_indices_t", "col_indices_t", "perm_t"))
