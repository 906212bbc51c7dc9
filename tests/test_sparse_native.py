"""The compiled CSR kernels (sparse.native): build, cache, fallback, and equivalence with
a dense reference over batch tiles, operand layouts, thread counts and forward mode."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from iternn.core import native as core_native
from iternn.sparse import kernels, native
from iternn.sparse.kernels import NativeSparseLinearFunction, csr_kernel_for, csr_pattern, sparse_linear
from iternn.sparse.linear import SparseLinear
from iternn.sparse.sampling import random_indices

needs_native = pytest.mark.skipif(not native.available(), reason="native CSR kernels unavailable")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that re-reads the environment (and an empty cache folder); the
    process-wide state is restored afterwards."""
    saved = dict(native._state)
    native._reset()
    monkeypatch.setenv("ITERNN_CACHE_DIR", str(tmp_path / "cache"))
    yield native
    native._reset()
    native._state.update(saved)


# ============================================================================ build
def test_native_kernels_build_where_a_compiler_exists():
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")) and not os.environ.get("CC"):
        pytest.skip("no C compiler on this machine")
    st_ = native.status()
    assert st_.available, st_.reason
    assert st_.path is not None and st_.path.exists()
    assert st_.path.parent == native.cache_dir()


def test_build_is_cached_and_keyed_by_cpu(fresh_native, monkeypatch):
    if not native.available():
        pytest.skip("native CSR kernels unavailable")
    first = fresh_native.build()
    stamp = first.stat().st_mtime_ns
    assert fresh_native.build() == first and first.stat().st_mtime_ns == stamp  # reused
    # another CPU (as seen by -march=native) gets its own build, never this one
    monkeypatch.setattr(core_native, "cpu_signature", lambda: "x86_64\nflags: something else")
    other = fresh_native.build()
    assert other != first and other.exists()
    assert not any(p.suffix == ".tmp" for p in first.parent.iterdir())  # atomic writes


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("ITERNN_NATIVE", "0")
    assert fresh_native.library() is None
    st_ = fresh_native.status()
    assert not st_.available and "ITERNN_NATIVE=0" in st_.reason
    p = csr_pattern(torch.tensor([[0, 1], [1, 0]]), (2, 2))
    x = torch.randn(3, 2)
    assert csr_kernel_for(x, p) == "torch"
    with pytest.raises(RuntimeError, match="ITERNN_NATIVE=0"):
        csr_kernel_for(x, p, "native")
    # and the layer still works, through torch.sparse
    sp = SparseLinear(2, 2, indices=torch.tensor([[0, 1], [1, 0]]), backend="csr")
    torch.testing.assert_close(sp(x), F.linear(x, sp.dense_weight(), sp.bias))


def test_failed_build_warns_and_falls_back(fresh_native, monkeypatch):
    monkeypatch.delenv("ITERNN_NATIVE", raising=False)
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.warns(RuntimeWarning, match="native CSR kernels are unavailable"):
        assert fresh_native.library() is None
    st_ = fresh_native.status()
    assert not st_.available and "/bin/false" in st_.reason
    with pytest.raises(native.NativeBuildError, match="failed"):
        fresh_native.build()
    assert not any(fresh_native.cache_dir().glob("*"))  # nothing half-written left behind


def test_missing_compiler_is_named(fresh_native, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(native.NativeBuildError, match="no C compiler"):
        fresh_native.build()


def test_unknown_kernel_name():
    p = csr_pattern(torch.tensor([[0], [0]]), (1, 1))
    with pytest.raises(ValueError, match="kernel must be one of"):
        sparse_linear(torch.randn(2, 1), torch.ones(1), None, p, kernel="mkl")


def test_native_refuses_what_it_cannot_run():
    p = csr_pattern(torch.tensor([[0], [0]]), (1, 1))
    with pytest.raises(RuntimeError, match="float32/float64"):
        csr_kernel_for(torch.randn(2, 1, dtype=torch.float16), p, "native")
    big = p._replace(col=p.col.long())
    with pytest.raises(RuntimeError, match="int64"):
        csr_kernel_for(torch.randn(2, 1), big, "native")
    assert csr_kernel_for(torch.randn(2, 1), big) == "torch"


# ============================================================================ equivalence
LAYOUTS = ["contiguous", "transposed", "sliced", "broadcast"]


def operand(batch: int, features: int, layout: str, dtype, g: torch.Generator) -> torch.Tensor:
    """A (batch, features) tensor with the given memory layout (same values either way)."""
    if layout == "contiguous":
        return torch.randn(batch, features, dtype=dtype, generator=g)
    if layout == "transposed":
        return torch.randn(features, batch, dtype=dtype, generator=g).t()
    if layout == "sliced":  # every other row and column of a bigger tensor
        return torch.randn(2 * batch, 2 * features + 1, dtype=dtype, generator=g)[::2, 1::2]
    return torch.randn(1, features, dtype=dtype, generator=g).expand(batch, features)


@st.composite
def native_case(draw):
    out_f = draw(st.integers(1, 70))
    in_f = draw(st.integers(1, 70))
    k = draw(st.integers(0, out_f * in_f))
    # batches around the tile widths (16 doubles, 32 floats) and their multiples
    batch = draw(st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 64, 70]))
    return out_f, in_f, k, batch, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)), \
        draw(st.integers(0, 2**31))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=native_case())
@settings(max_examples=40)
def test_native_matches_dense_reference(dtype, case):
    out_f, in_f, k, batch, x_layout, g_layout, seed = case
    g = gen(seed)
    idx = random_indices(out_f, in_f, k, generator=g)
    p = csr_pattern(idx, (out_f, in_f))
    values = torch.randn(k, dtype=dtype, generator=g).requires_grad_()
    bias = torch.randn(out_f, dtype=dtype, generator=g).requires_grad_()
    x = operand(batch, in_f, x_layout, dtype, g).requires_grad_()
    gy = operand(batch, out_f, g_layout, dtype, g)
    y = sparse_linear(x, values, bias, p, kernel="native")
    assert y.is_contiguous() and y.shape == (batch, out_f)
    dx, dv, db = torch.autograd.grad(y, (x, values, bias), gy)

    w = torch.zeros(out_f, in_f, dtype=torch.float64)
    w[idx[0], idx[1]] = values.detach().double()
    xd = x.detach().double()
    gd = gy.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.detach().double(), xd @ w.t() + bias.detach().double(), **tol)
    torch.testing.assert_close(dx.double(), gd @ w, **tol)
    torch.testing.assert_close(dv.double(), (gd.t() @ xd)[idx[0], idx[1]], **tol)
    torch.testing.assert_close(db.double(), gd.sum(0), **tol)


@needs_native
def test_native_rows_and_columns_without_entries():
    # Many empty rows and columns (and an all-empty tile of rows): every output entry
    # is written, none is left from the uninitialised buffer.
    idx = torch.tensor([[3, 3, 200], [0, 150, 7]])
    p = csr_pattern(idx, (260, 170))
    values = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64, requires_grad=True)
    x = torch.randn(40, 170, dtype=torch.float64, requires_grad=True)
    y = sparse_linear(x, values, None, p, kernel="native")
    w = torch.zeros(260, 170, dtype=torch.float64)
    w[idx[0], idx[1]] = values.detach()
    assert torch.equal(y[:, 4:200], torch.zeros(40, 196, dtype=torch.float64))
    torch.testing.assert_close(y, x.detach() @ w.t(), rtol=0, atol=1e-14)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(40, 260, dtype=torch.float64) @ w, rtol=0, atol=1e-14)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_results_do_not_depend_on_threads(dtype):
    sp = SparseLinear(300, 280, density=0.1, backend="csr", generator=gen(0), dtype=dtype)
    x = torch.randn(100, 300, dtype=dtype, generator=gen(1)).requires_grad_()
    gy = torch.randn(100, 280, dtype=dtype, generator=gen(2))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = sp(x)
            results.append((y.detach(), *torch.autograd.grad(y, (x, sp.values, sp.bias), gy)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_native
def test_native_gradcheck_reverse_and_forward_mode():
    p = csr_pattern(random_indices(11, 13, 40, generator=gen(3)), (11, 13))
    op = kernels._NativeOp(p, native.library())
    x = torch.randn(20, 13, dtype=torch.float64, generator=gen(4), requires_grad=True)
    v = torch.randn(40, dtype=torch.float64, generator=gen(5), requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=gen(6), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: NativeSparseLinearFunction.apply(x, v, b, op),
                                    (x, v, b), check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda x, v: NativeSparseLinearFunction.apply(x, v, None, op),
                                    (x, v), check_forward_ad=True)


@needs_native
def test_native_torch_func_jvp_matches_dense():
    # torch.func.jvp (what the dynamics tools use) through a csr block
    sp = SparseLinear(30, 25, density=0.2, backend="csr", generator=gen(7), dtype=torch.float64)
    x = torch.randn(5, 30, dtype=torch.float64, generator=gen(8))
    t = torch.randn(5, 30, dtype=torch.float64, generator=gen(9))
    y, y_t = torch.func.jvp(sp, (x,), (t,))
    w = sp.dense_weight().detach()
    torch.testing.assert_close(y, x @ w.t() + sp.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_t, t @ w.t(), rtol=1e-12, atol=1e-12)


@needs_native
def test_native_and_torch_kernels_train_alike():
    # Same block, same data: five Adam steps through each kernel give the same values.
    ref = SparseLinear(90, 80, density=0.1, backend="csr", generator=gen(10), dtype=torch.float64)
    x = torch.randn(48, 90, dtype=torch.float64, generator=gen(11))
    target = torch.randn(48, 80, dtype=torch.float64, generator=gen(12))
    finals = {}
    for kernel in ("torch", "native"):
        values = ref.values.detach().clone().requires_grad_()
        bias = ref.bias.detach().clone().requires_grad_()
        opt = torch.optim.Adam([values, bias], lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            y = sparse_linear(x, values, bias, ref.pattern, kernel=kernel)
            F.mse_loss(torch.tanh(y), target).backward()
            opt.step()
        finals[kernel] = (values.detach(), bias.detach())
    for a, b in zip(finals["torch"], finals["native"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_native
def test_exact_impulse_response_through_csr_blocks():
    # Forward mode through the native kernels: the dynamics tools' exact linear impulse
    # response runs on a map of csr blocks (the torch kernel has no forward formula) and
    # vanishes exactly past the chain's structural length.
    import iternn
    from iternn.dynamics import impulse_response

    m = iternn.BlockMap({"x": 40, "h1": 50, "h2": 30})
    m.connect("h1", "x", SparseLinear(40, 50, density=0.1, backend="csr", generator=gen(13),
                                      dtype=torch.float64))
    m.connect("h2", "h1", SparseLinear(50, 30, density=0.1, backend="csr", generator=gen(14),
                                       dtype=torch.float64))
    state = {s: torch.randn(3, n, dtype=torch.float64, generator=gen(15)) for s, n in
             (("x", 40), ("h1", 50), ("h2", 30))}
    res = impulse_response(m, state, steps=6)
    assert res.last_nonzero == res.structural_length == 2


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_native_kernels_work_in_a_forked_child():
    # OpenMP's pool does not survive fork(): a child forked after the kernels ran must
    # still compute (on one thread) instead of hanging, and get the parent's numbers.
    # (torch's own multi-threaded ops hang there too, hence the child's
    # set_num_threads(1) before comparing.)
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, sys, time, torch
        torch.set_num_threads(2)
        from iternn.sparse.linear import SparseLinear
        sp = SparseLinear(600, 500, density=0.05, backend="csr", generator=torch.Generator().manual_seed(0))
        x = torch.randn(100, 600, generator=torch.Generator().manual_seed(1))
        y = sp(x).detach()
        pid = os.fork()
        if pid == 0:
            y2 = sp(x).detach()  # torch's thread setting is still 2 here
            torch.set_num_threads(1)  # torch's own pool does not survive fork() either
            os._exit(0 if torch.equal(y2, y) else 3)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(os.waitstatus_to_exitcode(status))
            time.sleep(0.05)
        os.kill(pid, 9)
        sys.exit(4)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr)


@needs_native
@pytest.mark.parametrize("flags", [("-O3",), ("-O3", "-march=native")])
def test_portable_builds_compute_the_same(tmp_path, flags):
    # The fallbacks of build(): plain -O3 (no AVX, no FMA: the generic vector code, lane
    # sums and transposes of row-major operands) and no OpenMP (one thread). Both must
    # match the dense reference.
    cc = native._compiler()
    target = tmp_path / "k.so"
    native._compile(cc, flags, target)
    lib = native._Library(target, flags)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        sp = SparseLinear(70, 60, density=0.2, backend="csr", generator=gen(20), dtype=dtype)
        x = torch.randn(45, 70, dtype=dtype, generator=gen(21))
        g = torch.randn(45, 60, dtype=dtype, generator=gen(22))
        p = sp.pattern
        w = sp.dense_weight().detach()
        idx = sp.indices()
        v = sp.values.detach()
        y = native.spmm(lib, p.crow, p.col, v, x, 60, sp.bias.detach())
        dv = native.sdd(lib, p.crow, p.col, g, x)
        dx, dv_fused = native.linear_backward(lib, p.crow_t, p.col_t, p.perm, v, g, x)
        dx_alone = native.spmm(lib, p.crow_t, p.col_t, v, g, 70, perm=p.perm)
        torch.testing.assert_close(y, x @ w.t() + sp.bias.detach(), rtol=tol, atol=tol)
        for d in (dv, dv_fused):
            torch.testing.assert_close(d, (g.t() @ x)[idx[0], idx[1]], rtol=tol, atol=tol)
        for d in (dx, dx_alone):
            torch.testing.assert_close(d, g @ w, rtol=tol, atol=tol)


@needs_native
def test_native_calls_refuse_operands_they_would_misread():
    lib = native.library()
    p = csr_pattern(torch.tensor([[0, 1], [1, 0]]), (2, 2))
    x = torch.randn(3, 2)
    v = torch.ones(2)
    with pytest.raises(TypeError, match="'values' must be a contiguous torch.float32"):
        native.spmm(lib, p.crow, p.col, v.double(), x, 2)
    with pytest.raises(TypeError, match="'crow' must be a contiguous 1-D int32"):
        native.spmm(lib, p.crow.long(), p.col, v, x, 2)
    with pytest.raises(TypeError, match="'x' must be a 2-D"):
        native.spmm(lib, p.crow, p.col, v, x[0], 2)
    with pytest.raises(TypeError, match="float32/float64"):
        native.spmm(lib, p.crow, p.col, v.half(), x.half(), 2)
    with pytest.raises(ValueError, match="need crow of 4 entries, got 3"):
        native.spmm(lib, p.crow, p.col, v, x, 3)
    with pytest.raises(TypeError, match="'perm' must be a contiguous torch.int32"):
        native.spmm(lib, p.crow_t, p.col_t, v, x, 2, perm=p.perm.long())
    with pytest.raises(TypeError, match="'x' must be a 2-D torch.float64"):  # g's dtype rules
        native.sdd(lib, p.crow, p.col, x.double(), x)
    with pytest.raises(ValueError, match="same batch"):
        native.sdd(lib, p.crow, p.col, x[:2], x)


@needs_native
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_native_small_batches_every_layout(batch, layout):
    # Batches of one or two take the untiled path; three the tiled one: same answers.
    g = gen(batch)
    sp = SparseLinear(90, 70, density=0.15, backend="csr", generator=g, dtype=torch.float64)
    x = operand(batch, 90, layout, torch.float64, g).requires_grad_()
    gy = operand(batch, 70, layout, torch.float64, g)
    y = sp(x)
    dx, dv = torch.autograd.grad(y, (x, sp.values), gy)
    w = sp.dense_weight().detach()
    idx = sp.indices()
    torch.testing.assert_close(y, x.detach() @ w.t() + sp.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, gy @ w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv, (gy.t() @ x.detach())[idx[0], idx[1]], rtol=1e-12, atol=1e-12)


def test_native_products_refuse_a_bad_pattern_before_reading_it():
    from iternn.errors import PatternError

    lib = native.library()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.status().reason}")
    p = csr_pattern(torch.tensor([[0, 0, 1], [0, 2, 1]]), (2, 3))
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(0))
    g = torch.randn(4, 2, dtype=torch.float64, generator=gen(1))
    values = torch.ones(3, dtype=torch.float64)
    good = native.spmm(lib, p.crow, p.col, values, x, 2)
    bad_col = p.col.clone()
    bad_col[1] = 1 << 30
    bad_crow = p.crow.clone()
    bad_crow[1] = 4  # crow = [0, 4, 3]: row 0 would read col[3], past the end
    for crow, col, message in ((p.crow, bad_col, r"col_indices\[1\] = 1073741824 is outside \[0, 3\)"),
                               (bad_crow, p.col, r"crow_indices\[2\] = 3 is less than .*\[1\] = 4")):
        with pytest.raises(PatternError, match=message):
            native.spmm(lib, crow, col, values, x, 2)
        with pytest.raises(PatternError, match=message):
            native.sdd(lib, crow, col, g, x)
    # columns in range for a wider operand are out of range for this one
    with pytest.raises(PatternError, match=r"col_indices\[1\] = 2 is outside \[0, 2\)"):
        native.spmm(lib, p.crow, p.col, values, x[:, :2], 2)
    # the memo notices an in-place edit of a pattern that passed before
    col = p.col.clone()
    torch.testing.assert_close(native.spmm(lib, p.crow, col, values, x, 2), good)
    col[2] = -7
    with pytest.raises(PatternError, match=r"col_indices\[2\] = -7"):
        native.spmm(lib, p.crow, col, values, x, 2)


# ==================================================== writes that bypass the pattern check
_BYPASS_CHILD = r"""
import os, sys
import torch
torch.set_num_threads(2)
from iternn.errors import PatternError
from iternn.sparse import native
from iternn.sparse.linear import SparseLinear

WRITES = {  # name: (write, buffer the error must name, whether forward already fails)
    "crow .data": ("sl.crow_indices.data[3] = 10**6", "crow_indices", True),
    "crow numpy": ("sl.crow_indices.numpy()[-1] += 1000", "crow_indices", True),
    "col .data": ("sl.col_indices.data[-1] = 10**6", "col_indices", True),
    "col numpy": ("sl.col_indices.numpy()[0] = -5", "col_indices", True),
    "crow_t .data": ("sl.crow_indices_t.data[5] = 10**6", "crow_indices_t", False),
    "col_t .data": ("sl.col_indices_t.data[-1] = 10**6", "col_indices_t", False),
    "col_t numpy": ("sl.col_indices_t.numpy()[7] = -1", "col_indices_t", False),
    "perm_t .data": ("sl.perm_t.data[0] = 10**9", "perm_t", False),
}
failures = []

def run(path, dtype, batch):
    for name, (write, buffer, in_forward) in WRITES.items():
        for between in (False, True):  # the write before the forward, or between it and backward
            sl = SparseLinear(130, 70, density=0.2, backend="csr", dtype=dtype,
                              generator=torch.Generator().manual_seed(0))
            x = torch.randn(batch, 130, dtype=dtype, requires_grad=True)
            sl(x).sum().backward()  # checked and remembered
            where = f"{path} {dtype} batch {batch}: {name}{' between' if between else ''}"
            y = None
            if path == "native" and between and in_forward:
                # the native backward reads only the transposed buffers: W's own, written
                # after the forward read them, are not read again until the next forward,
                # which refuses them; the backward gives the gradient of the forward's W
                reference = torch.ones(batch, 70, dtype=dtype) @ sl.dense_weight().detach()
                y = sl(x)
                exec(write)
                try:
                    dx = torch.autograd.grad(y.sum(), x)[0]
                except Exception as e:
                    failures.append(f"{where}: backward raised {type(e).__name__}: {e}")
                    continue
                if not torch.allclose(dx, reference):
                    failures.append(f"{where}: wrong gradient")
                try:
                    sl(x)
                    failures.append(f"{where}: the next forward did not refuse the pattern")
                except PatternError as e:
                    if e.token != "SparseLinear." + buffer or buffer + "[" not in str(e):
                        failures.append(f"{where}: wrong error {e}")
                print(where, "done", flush=True)
                continue
            try:
                if not between:
                    exec(write)
                y = sl(x)
                if between:
                    exec(write)
                y.sum().backward()
            except PatternError as e:
                named = buffer == "perm_t" or buffer + "[" in str(e)
                if e.token != "SparseLinear." + buffer or not named:
                    failures.append(f"{where}: wrong error {e}")
                elif not between and in_forward and y is not None:
                    failures.append(f"{where}: forward returned")
            except Exception as e:
                failures.append(f"{where}: {type(e).__name__}: {e}")
            else:
                failures.append(f"{where}: no error")
            print(where, "done", flush=True)

for dtype in (torch.float64, torch.float32):
    for batch in (1, 5):  # the small-batch path and the tiled one
        run("native", dtype, batch)

# the kernels themselves, handed a pattern the Python check never saw (checked=True)
sl = SparseLinear(130, 70, density=0.2, backend="csr", generator=torch.Generator().manual_seed(0))
p, lib = sl.pattern, native.library()
x = torch.randn(4, 130)
for crow, col, token in ((p.crow, torch.where(p.col == p.col[9], 130, p.col), "col_indices"),
                         (torch.cat([p.crow[:-1], p.crow[-1:] - 1]), p.col, "crow_indices")):
    for call in (lambda: native.spmm(lib, crow, col, sl.values.detach(), x, 70, checked=True),
                 lambda: native.sdd(lib, crow, col, torch.randn(4, 70), x, checked=True)):
        try:
            call()
            failures.append(f"direct {token}: no error")
        except PatternError as e:
            if not e.token.endswith(token):
                failures.append(f"direct {token}: wrong error {e}")

# the torch.sparse path
os.environ["ITERNN_NATIVE"] = "0"
native._reset()
assert not native.available()
for dtype in (torch.float64, torch.float32):
    for batch in (1, 5):
        run("torch", dtype, batch)
print("FAILURES:", *failures, sep="\n")
sys.exit(1 if failures else 0)
"""


def test_writes_that_bypass_the_pattern_check_raise_instead_of_crashing():
    # A write through .data or a NumPy view bumps no version counter: the pattern memo
    # does not see it, so the kernels (native: their own index checks; torch.sparse: a
    # full check on every CPU call) must refuse the pattern. In a subprocess, so that a
    # crash fails this test instead of killing pytest.
    import subprocess
    import sys

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status().reason}")
    out = subprocess.run([sys.executable, "-c", _BYPASS_CHILD], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-3000:], out.stderr[-3000:])
