"""Exact random patterns (sparse.sampling) and the CSR kernels (sparse.kernels)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from iternn.sparse import kernels, native, sampling
from iternn.sparse.kernels import (
    csr_pattern,
    dense_linear,
    dense_weight_from_values,
    sampled_dense_dense,
    sparse_linear,
    transpose_pattern,
)
from iternn.sparse.sampling import random_indices

# Both implementations of the CSR backend; "native" is skipped only where no C compiler
# exists (test_sparse_native checks that it builds wherever one does).
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="native CSR kernels unavailable"))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================ random_indices
@st.composite
def block_and_k(draw, max_side=40):
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    k = draw(st.integers(0, rows * cols))
    return rows, cols, k


def check_indices(idx: torch.Tensor, rows: int, cols: int, k: int) -> None:
    assert idx.dtype == torch.long and idx.shape == (2, k)
    if k:
        assert int(idx[0].min()) >= 0 and int(idx[0].max()) < rows
        assert int(idx[1].min()) >= 0 and int(idx[1].max()) < cols
    flat = idx[0] * cols + idx[1]
    # strictly increasing flat positions: sorted row-major AND no duplicates
    assert bool((flat.diff() > 0).all())


@pytest.mark.parametrize("permute_max", [sampling._PERMUTE_MAX, 0])
@given(spec=block_and_k(), seed=st.integers(0, 2**31))
def test_random_indices_exact_distinct_sorted(permute_max, spec, seed):
    # permute_max = 0 forces the large-block paths (i.i.d. draws + dedup, and the
    # complement for k > n/2) on small blocks, so every path is checked.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "_PERMUTE_MAX", permute_max)
        mp.setattr(sampling, "_DROP_PERMUTE_MAX", permute_max)
        rows, cols, k = spec
        idx = random_indices(rows, cols, k, generator=gen(seed))
        check_indices(idx, rows, cols, k)
        again = random_indices(rows, cols, k, generator=gen(seed))
        assert torch.equal(idx, again)


@pytest.mark.parametrize("permute_max", [sampling._PERMUTE_MAX, 0])
def test_random_indices_is_uniform(monkeypatch, permute_max):
    # Every one of the C(6, 2) = 15 subsets of a 2x3 block, over 3000 draws: each
    # should appear ~200 times; a chi-square far above its 14 degrees of freedom (the
    # 1e-6 quantile is ~50) means a biased sampler.
    monkeypatch.setattr(sampling, "_PERMUTE_MAX", permute_max)
    monkeypatch.setattr(sampling, "_DROP_PERMUTE_MAX", permute_max)
    g = gen(123)
    counts: dict[tuple, int] = {}
    n = 3000
    for _ in range(n):
        idx = random_indices(2, 3, 2, generator=g)
        key = tuple((idx[0] * 3 + idx[1]).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 15
    expected = n / 15
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 50, counts


def test_random_indices_marginals_uniform_on_large_block():
    # The i.i.d.-draw path (n > 2**22): row and column histograms of 200k entries of a
    # 2500 x 2000 block should be flat (chi-square ~ dof; a bias of a few % per row fails).
    rows, cols, k = 2500, 2000, 200_000
    idx = random_indices(rows, cols, k, generator=gen(7))
    check_indices(idx, rows, cols, k)
    for part, size in ((idx[0], rows), (idx[1], cols)):
        hist = torch.bincount(part, minlength=size).double()
        exp = k / size
        chi2 = float(((hist - exp) ** 2 / exp).sum())
        dof = size - 1
        assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), chi2


def test_random_indices_large_block_fast_and_lean():
    # 20000 x 20000 (4e8 positions) with 4e6 entries, in a fresh process so the peak RSS
    # belongs to this call alone: a few seconds and far less than the 3.2 GB that
    # materialising the positions as int64 would take (the result itself is 64 MB).
    code = textwrap.dedent("""
        import resource, time, torch
        torch.set_num_threads(1)
        from iternn.sparse.sampling import random_indices
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        idx = random_indices(20000, 20000, 4_000_000, generator=torch.Generator().manual_seed(0))
        dt = time.perf_counter() - t0
        flat = idx[0] * 20000 + idx[1]
        ok = idx.shape == (2, 4_000_000) and bool((flat.diff() > 0).all())
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(ok, dt, grew)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, dt, grew = out.stdout.split()
    assert ok == "True"
    assert float(dt) < 5.0, f"took {dt} s"
    assert float(grew) < 600, f"peak RSS grew by {grew} MB"


def test_random_indices_never_touches_all_positions():
    # 4e16 positions: anything proportional to rows * cols could not even be allocated.
    idx = random_indices(200_000_000, 200_000_000, 1000, generator=gen(0))
    check_indices(idx, 200_000_000, 200_000_000, 1000)


def test_random_indices_seeds_differ_and_global_rng():
    a = random_indices(50, 50, 100, generator=gen(1))
    b = random_indices(50, 50, 100, generator=gen(2))
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = random_indices(50, 50, 100)
    torch.manual_seed(5)
    assert torch.equal(c, random_indices(50, 50, 100))


@pytest.mark.parametrize(
    "args, exc, word",
    [
        ((0, 5, 1), ValueError, "rows"),
        ((5, -1, 1), ValueError, "cols"),
        ((5, 5, 26), ValueError, "k"),
        ((5, 5, -1), ValueError, "k"),
        ((5.0, 5, 1), TypeError, "rows"),
        ((5, 5, True), TypeError, "k"),
    ],
)
def test_random_indices_bad_arguments(args, exc, word):
    with pytest.raises(exc, match=word):
        random_indices(*args)


def test_random_indices_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        random_indices(3, 3, 2, generator=0)


# ============================================================================ patterns
def dense_of(idx, values, shape):
    w = torch.zeros(shape, dtype=values.dtype)
    w[idx[0], idx[1]] = values
    return w


@given(spec=block_and_k(30), seed=st.integers(0, 2**31))
def test_csr_pattern_and_transpose(spec, seed):
    rows, cols, k = spec
    idx = random_indices(rows, cols, k, generator=gen(seed))
    p = csr_pattern(idx, (rows, cols))
    values = torch.randn(k, dtype=torch.float64, generator=gen(seed + 1))
    w = dense_of(idx, values, (rows, cols))
    assert p.nnz == k and p.crow.shape == (rows + 1,) and p.crow_t.shape == (cols + 1,)
    w_csr = torch.sparse_csr_tensor(p.crow, p.col, values, (rows, cols), check_invariants=True)
    assert torch.equal(w_csr.to_dense(), w)
    wt = torch.sparse_csr_tensor(p.crow_t, p.col_t, values[p.perm], (cols, rows),
                                 check_invariants=True).to_dense()
    assert torch.equal(wt, w.t())
    assert torch.equal(kernels.pattern_rows(p.crow, k), idx[0])
    again = transpose_pattern(p.crow, p.col, (rows, cols))
    assert all(torch.equal(a, b) for a, b in zip(again, (p.crow_t, p.col_t, p.perm)))
    assert torch.equal(dense_weight_from_values(values, p), w)


# ============================================================================ kernels
@st.composite
def linear_case(draw, max_side=12):
    out_f = draw(st.integers(1, max_side))
    in_f = draw(st.integers(1, max_side))
    k = draw(st.integers(0, out_f * in_f))
    batch = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    seed = draw(st.integers(0, 2**31))
    return out_f, in_f, k, batch, seed


def make_case(out_f, in_f, k, batch, seed, dtype=torch.float64):
    g = gen(seed)
    idx = random_indices(out_f, in_f, k, generator=g)
    p = csr_pattern(idx, (out_f, in_f))
    values = torch.randn(k, dtype=dtype, generator=g)
    bias = torch.randn(out_f, dtype=dtype, generator=g)
    x = torch.randn(*batch, in_f, dtype=dtype, generator=g)
    return idx, p, values, bias, x


@pytest.mark.parametrize("kernel", KERNELS)
@given(case=linear_case())
def test_sparse_linear_matches_dense_reference(kernel, case):
    out_f, in_f, k, batch, seed = case
    idx, p, values, bias, x = make_case(out_f, in_f, k, batch, seed)
    gy = torch.randn(*batch, out_f, dtype=torch.float64, generator=gen(seed + 1))
    for b in (bias, None):
        v1, x1 = values.clone().requires_grad_(), x.clone().requires_grad_()
        b1 = None if b is None else b.clone().requires_grad_()
        y = sparse_linear(x1, v1, b1, p, kernel=kernel)
        y.backward(gy)
        # inputs are never modified (B = 1 once made addmm_ write into the bias)
        assert torch.equal(x1, x) and torch.equal(v1, values)
        assert b is None or torch.equal(b1, b)
        w = dense_of(idx, values, (out_f, in_f)).requires_grad_()
        x2 = x.clone().requires_grad_()
        b2 = None if b is None else b.clone().requires_grad_()
        y2 = F.linear(x2, w, b2)
        y2.backward(gy)
        assert y.shape == y2.shape == (*batch, out_f)
        torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1.grad, w.grad[idx[0], idx[1]], rtol=1e-12, atol=1e-12)
        if b is not None:
            torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@given(case=linear_case(max_side=8))
@settings(max_examples=15)
def test_gradcheck_float64(kernel, case):
    out_f, in_f, k, batch, seed = case
    _, p, values, bias, x = make_case(out_f, in_f, k, batch or (2,), seed)
    x.requires_grad_()
    values.requires_grad_()
    bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, b, p, kernel=kernel),
                                    (x, values, bias))
    assert torch.autograd.gradcheck(lambda x, v: sparse_linear(x, v, None, p, kernel=kernel), (x, values))


def test_gradcheck_autograd_function_directly():
    _, p, values, bias, x = make_case(9, 7, 20, (5,), 3)
    args = (x.requires_grad_(), values.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, v, b: kernels.SparseLinearFunction.apply(x, v, b, p), args)


@given(case=linear_case(max_side=20), method=st.sampled_from(["sampled_addmm", "gather", "auto"]))
def test_sampled_dense_dense(case, method):
    out_f, in_f, k, batch, seed = case
    nb = max(1, math.prod(batch))
    idx, p, *_ = make_case(out_f, in_f, k, (), seed)
    a = torch.randn(out_f, nb, dtype=torch.float64, generator=gen(seed + 2))
    b = torch.randn(in_f, nb, dtype=torch.float64, generator=gen(seed + 3))
    got = sampled_dense_dense(a, b, p.crow, p.col, p.shape, method=method)
    torch.testing.assert_close(got, (a @ b.t())[idx[0], idx[1]], rtol=1e-12, atol=1e-12)


def test_sampled_gather_chunks(monkeypatch):
    # A tiny chunk budget: many chunks, same result.
    monkeypatch.setattr(kernels, "_GATHER_BUDGET", 16)
    idx, p, *_ = make_case(13, 11, 60, (), 0)
    a = torch.randn(13, 4, dtype=torch.float64, generator=gen(1))
    b = torch.randn(11, 4, dtype=torch.float64, generator=gen(2))
    got = sampled_dense_dense(a, b, p.crow, p.col, p.shape, method="gather")
    torch.testing.assert_close(got, (a @ b.t())[idx[0], idx[1]], rtol=1e-12, atol=1e-12)


def test_sampled_dense_dense_bad_method():
    _, p, *_ = make_case(3, 3, 2, (), 0)
    with pytest.raises(ValueError, match="method"):
        sampled_dense_dense(torch.zeros(3, 1), torch.zeros(3, 1), p.crow, p.col, p.shape, method="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uninitialised_output_buffers_are_fully_written(monkeypatch, dtype):
    # The kernels hand MKL an uninitialised buffer with beta = 0; make it NaN to prove
    # every entry is overwritten, including rows and columns without stored entries.
    monkeypatch.setattr(kernels, "_result", lambda r, c, like: like.new_full((r, c), math.nan))
    idx, p, values, bias, x = make_case(60, 50, 40, (7,), 11, dtype=dtype)  # many empty rows
    assert int((p.crow.diff() == 0).sum()) > 10 and int((p.crow_t.diff() == 0).sum()) > 10
    x.requires_grad_()
    y = sparse_linear(x, values, None, p, kernel="torch")
    y.backward(torch.ones_like(y))
    w = dense_of(idx, values, (60, 50))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, x.detach() @ w.t(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, torch.ones(7, 60, dtype=dtype) @ w, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_degenerate_shapes_keep_gradients(kernel):
    # nnz = 0 and an empty batch: zero outputs, zero (not missing) gradients.
    _, p0, v0, b0, x0 = make_case(4, 3, 0, (2,), 0)
    x0.requires_grad_()
    b0.requires_grad_()
    y = sparse_linear(x0, v0.requires_grad_(), b0, p0, kernel=kernel)
    torch.testing.assert_close(y, b0.detach().expand(2, 4))
    y.sum().backward()
    assert torch.equal(x0.grad, torch.zeros_like(x0)) and v0.grad.shape == (0,)
    _, p, v, b, x = make_case(4, 3, 5, (0,), 0)
    v.requires_grad_()
    y = sparse_linear(x.requires_grad_(), v, b, p, kernel=kernel)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(v.grad, torch.zeros(5, dtype=v.dtype))


def test_output_is_transposed_view_and_chains_without_copy():
    # The torch kernel returns y as the transpose of a contiguous (out, B) buffer, so a
    # following sparse layer reads its x^T without a copy.
    _, p, values, bias, x = make_case(6, 5, 12, (4,), 1)
    y = sparse_linear(x, values, bias, p, kernel="torch")
    assert y.t().is_contiguous()
    y.relu_()  # in-place on the output is allowed (the view is made outside the Function)


def test_choose_backend():
    small = kernels.SMALL_BLOCK
    assert kernels.choose_backend(8, 8, 1) == "dense"  # small block
    n = 1000
    assert n * n > small
    c = kernels.crossover_density()
    assert c == (kernels.CROSSOVER_DENSITY if native.available() else kernels.TORCH_CROSSOVER_DENSITY)
    assert kernels.choose_backend(n, n, int(c * n * n)) == "csr"
    assert kernels.choose_backend(n, n, int(c * n * n) + 1) == "dense"
    assert kernels.choose_backend(n, n, n * n) == "dense"
    assert kernels.choose_backend(n, n, 10) == "csr"


# ----------------------------------------------------------------------------- pattern checks
def test_check_csr_pattern_is_public_and_names_buffer_and_entry():
    from iternn.errors import PatternError
    from iternn.sparse import check_csr_pattern

    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([1, 4, 0], dtype=torch.int32)
    check_csr_pattern(crow, col, (2, 5), name="blocks.h.x")  # valid: returns None
    check_csr_pattern(torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long), (2, 5), name="e")
    with pytest.raises(PatternError, match=r"col_indices\[1\] = 4 is outside \[0, 4\)") as info:
        check_csr_pattern(crow, col, (2, 4), name="blocks.h.x")
    assert info.value.token == "blocks.h.x.col_indices" and isinstance(info.value, ValueError)
    with pytest.raises(PatternError, match="must be a tensor"):
        check_csr_pattern([0, 2, 3], col, (2, 5), name="b")
    with pytest.raises(PatternError, match="must be 1-D"):
        check_csr_pattern(crow, col.view(3, 1), (2, 5), name="b")
    with pytest.raises(PatternError, match="shape must be a pair"):
        check_csr_pattern(crow, col, (2, -5), name="b")


def test_torch_kernel_refuses_a_bad_pattern():
    from iternn.errors import PatternError

    p = csr_pattern(torch.tensor([[0, 1], [1, 2]]), (2, 3))
    x = torch.randn(4, 3, dtype=torch.float64)
    values = torch.ones(2, dtype=torch.float64)
    bad = p._replace(col=torch.tensor([1, 3], dtype=p.col.dtype))
    for kernel in ("torch", "auto"):
        with pytest.raises(PatternError, match=r"col_indices\[1\] = 3 is outside \[0, 3\)"):
            sparse_linear(x, values, None, bad, kernel=kernel)
    with pytest.raises(PatternError, match=r"col_indices\[1\] = 3"):
        dense_linear(x, values, None, bad)
    with pytest.raises(ValueError, match=r"values must have shape \(2,\)"):
        sparse_linear(x, torch.ones(3, dtype=torch.float64), None, p, kernel="torch")


def test_oversized_pattern_is_refused_before_allocating():
    from iternn.errors import SizeError
    from iternn.sparse import MaskedLinear, SparseLinear

    with pytest.raises(SizeError, match=r"random_indices: 500000000000 entries of a 1000000 x 1000000"):
        SparseLinear(10**6, 10**6, density=0.5)

    huge_mask = torch.ones(1, 1, dtype=torch.bool).expand(10**6, 10**6)  # no memory behind it
    with pytest.raises(SizeError, match=r"MaskedLinear\(1000000, 1000000\) weight"):
        MaskedLinear(10**6, 10**6, mask=huge_mask)
