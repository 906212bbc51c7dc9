"""Jacobians, spectra and Lyapunov exponents of block maps, on known answers."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import iternn
from iternn.dynamics import DEQ, find_fixed_points, fixed_point, impulse_response
from iternn.dynamics.functional import DynamicsError
from iternn.dynamics.jacobian import eigenvalues, jacobian, singular_values, spectral_radius
from iternn.dynamics.lyapunov import largest_lyapunov, lyapunov_spectrum
from iternn.dynamics.validate import check_matrix_finite
from iternn.sparse import linear as linear_mod
from iternn.sparse import structured

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


class Logistic(nn.Module):
    """The logistic map ``z -> r z (1 - z)`` as a block."""

    def __init__(self, r: float) -> None:
        super().__init__()
        self.r = r

    def forward(self, z):
        return self.r * z * (1 - z)


def logistic_map(r: float) -> iternn.BlockMap:
    m = iternn.BlockMap({"z": 1})
    m.connect("z", "z", Logistic(r))
    return m


def linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def known_matrix(lams, seed=0):
    """``A = P diag(lams) P^-1`` with a well-conditioned random ``P``."""
    g = torch.Generator().manual_seed(seed)
    n = len(lams)
    p = torch.randn(n, n, generator=g, dtype=F64) * 0.3 + torch.eye(n, dtype=F64)
    return p @ torch.diag(torch.tensor(lams, dtype=F64)) @ torch.linalg.inv(p)


def linear_map(a: torch.Tensor) -> iternn.BlockMap:
    m = iternn.BlockMap({"z": a.shape[0]})
    m.connect("z", "z", linear(a))
    return m


REAL_EIGS = [0.9, -0.7, 0.5, 0.3, -0.1]
RHO, THETA = 0.95, 0.7


def rotation_map() -> tuple[iternn.BlockMap, torch.Tensor]:
    """Slots a (2, a rotation by THETA scaled by RHO) and b (3, diagonal), b <- a coupling.

    Block lower triangular: eigenvalues RHO e^{±i THETA}, -0.8, 0.5, 0.2; the dominant
    pair rotates, so plain power iteration would not converge.
    """
    c, s = math.cos(THETA), math.sin(THETA)
    rot = RHO * torch.tensor([[c, -s], [s, c]], dtype=F64)
    g = torch.Generator().manual_seed(3)
    m = iternn.BlockMap({"a": 2, "b": 3})
    m.connect("a", "a", linear(rot))
    m.connect("b", "b", linear(torch.diag(torch.tensor([-0.8, 0.5, 0.2], dtype=F64))))
    m.connect("b", "a", linear(torch.randn(3, 2, generator=g, dtype=F64)))
    eigs = torch.tensor(
        [RHO * complex(c, s), RHO * complex(c, -s), -0.8, 0.5, 0.2], dtype=torch.complex128
    )
    return m, eigs


def tanh_map(seed=0, scale=0.8):
    """Two slots a (3), b (4): a <- a, a <- b, b <- a, biases, tanh on a, sigmoid on b."""
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(*shape, generator=g, dtype=F64) * scale
         for k, shape in {"aa": (3, 3), "ab": (3, 4), "ba": (4, 3)}.items()}
    ba, bb = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    m = iternn.BlockMap({"a": 3, "b": 4})
    m.connect("a", "a", linear(w["aa"]))
    m.connect("a", "b", linear(w["ab"]))
    m.connect("b", "a", linear(w["ba"]))
    m.set_bias("a", ba)
    m.set_bias("b", bb)
    m.set_activation("a", nn.Tanh())
    m.set_activation("b", nn.Sigmoid())

    def reference(z):  # hand-written G on the packed (a, b)
        za, zb = z[..., :3], z[..., 3:]
        a = torch.tanh(za @ w["aa"].T + zb @ w["ab"].T + ba)
        b = torch.sigmoid(za @ w["ba"].T + bb)
        return torch.cat([a, b], dim=-1)

    return m.double(), reference


def random_linear_map(seed, acts, hold_x=False):
    """Three slots x (2), h (4), y (3) with random dense blocks, including a cycle."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"x": 2, "h": 4, "y": 3}
    m = iternn.BlockMap(sizes)
    for d, s in [("h", "x"), ("h", "h"), ("y", "h"), ("h", "y"), ("y", "y"), ("x", "y")]:
        m.connect(d, s, linear(torch.randn(sizes[d], sizes[s], generator=g, dtype=F64) * 0.6))
    for slot, act in zip(sizes, acts):
        m.set_activation(slot, act)
        m.set_bias(slot, torch.randn(sizes[slot], generator=g, dtype=F64))
    state = {s: torch.randn(n, generator=g, dtype=F64) for s, n in sizes.items()}
    return m, state


# ----------------------------------------------------------------------------- Lyapunov


def test_logistic_r4_largest_lyapunov_is_ln2():
    g = torch.Generator().manual_seed(0)
    z0 = 0.05 + 0.9 * torch.rand(64, 1, generator=g, dtype=F64)  # away from 0, 1/2, 3/4
    lam = largest_lyapunov(logistic_map(4.0), {"z": z0}, steps=3000, warmup=50)
    assert lam.shape == (64,)
    assert torch.isfinite(lam).all()
    assert abs(float(lam.mean()) - math.log(2)) < 0.01


def test_logistic_r32_is_negative_and_matches_the_period_two_orbit():
    lam = largest_lyapunov(logistic_map(3.2), {"z": torch.tensor([0.3], dtype=F64)},
                           steps=2000, warmup=500)
    assert lam.shape == ()
    assert float(lam) < 0
    # On the 2-cycle, f'(p1) f'(p2) = -r^2 + 2r + 4 = 0.16: lambda = ln(0.16) / 2 = ln 0.4.
    assert abs(float(lam) - math.log(0.4)) < 1e-6


def test_lyapunov_spectrum_of_linear_map_is_log_abs_eigenvalues():
    a = known_matrix(REAL_EIGS)
    m = linear_map(a)
    state = {"z": torch.ones(5, dtype=F64)}
    want = torch.sort(torch.log(torch.tensor(REAL_EIGS, dtype=F64).abs()), descending=True).values
    got = lyapunov_spectrum(m, state, steps=3000)
    assert got.shape == (5,) and got.dtype == F64
    assert torch.all(got[:-1] >= got[1:])  # largest first
    assert torch.allclose(got, want, atol=1e-3, rtol=0)
    # Warm-up aligns the basis: the transient leaves the average and the error shrinks.
    warm = lyapunov_spectrum(m, state, steps=3000, warmup=200)
    assert torch.allclose(warm, want, atol=1e-6, rtol=0)
    top2 = lyapunov_spectrum(m, state, steps=3000, warmup=200, k=2)
    assert torch.allclose(top2, want[:2], atol=1e-6, rtol=0)
    assert abs(float(largest_lyapunov(m, state, steps=3000, warmup=200)) - float(want[0])) < 1e-6


def test_lyapunov_spectrum_with_a_rotating_pair():
    m, eigs = rotation_map()
    state = {"a": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64)}
    got = lyapunov_spectrum(m, state, steps=3000, warmup=200)
    want = torch.sort(torch.log(eigs.abs()), descending=True).values
    assert torch.allclose(got, want, atol=1e-3, rtol=0)
    # The rotating pair has one modulus: its two exponents agree.
    assert abs(float(got[0] - got[1])) < 1e-3


def test_lyapunov_batched_state_gives_one_spectrum_per_element():
    a = known_matrix(REAL_EIGS)
    g = torch.Generator().manual_seed(1)
    state = {"z": torch.randn(2, 3, 5, generator=g, dtype=F64)}
    got = lyapunov_spectrum(linear_map(a), state, steps=1500, warmup=200, k=3)
    assert got.shape == (2, 3, 3)
    want = torch.sort(torch.log(torch.tensor(REAL_EIGS, dtype=F64).abs()), descending=True).values
    assert torch.allclose(got, want[:3].expand(2, 3, 3), atol=1e-5, rtol=0)


def test_lyapunov_with_force_matches_a_hand_written_qr_reference():
    g = torch.Generator().manual_seed(4)
    w_hh = torch.randn(3, 3, generator=g, dtype=F64) * 0.9
    w_hx = torch.randn(3, 2, generator=g, dtype=F64)
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", linear(w_hx))
    m.connect("h", "h", linear(w_hh))
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(40, 2, generator=g, dtype=F64)
    h0 = torch.randn(3, generator=g, dtype=F64)
    got = lyapunov_spectrum(m, {"h": h0}, steps=30, warmup=10, force={"x": xs})

    # Reference: dense Jacobians by autograd, the same initial basis, QR each step.
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                    dtype=F64)).Q
    h, total = h0, torch.zeros(3, dtype=F64)
    for t in range(40):
        def step(hh, x=xs[t]):
            return torch.tanh(hh @ w_hh.T + x @ w_hx.T)
        jac = torch.autograd.functional.jacobian(step, h)
        h = step(h)
        q, r = torch.linalg.qr(jac @ q)
        if t >= 10:
            total += torch.log(torch.diagonal(r).abs())
    want = torch.sort(total / 30, descending=True).values
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("forced", [False, True])
def test_lyapunov_paths_agree(monkeypatch, forced):
    """Dense Jacobians per chunk, several chunks, and k JVPs per application: one answer."""
    import iternn.dynamics.lyapunov as lyap

    g = torch.Generator().manual_seed(8)
    m = iternn.BlockMap({"x": 2, "h": 6, "c": 1})
    m.connect("h", "x", linear(torch.randn(6, 2, generator=g, dtype=F64)))
    m.connect("h", "h", linear(torch.randn(6, 6, generator=g, dtype=F64) * 0.8))
    m.set_bias("h", torch.randn(6, generator=g, dtype=F64))
    m.set_activation("h", nn.Tanh())
    xs = torch.randn(60, 3, 2, generator=g, dtype=F64)
    state = {"h": torch.randn(3, 6, generator=g, dtype=F64)}
    if forced:  # x forced, and a held slot c as well
        m.connect("h", "c", linear(torch.randn(6, 1, generator=g, dtype=F64)))
        state["c"] = torch.randn(3, 1, generator=g, dtype=F64)
        kw = dict(force={"x": xs}, hold="c")
    else:
        state["x"] = xs[0]
        kw = dict(hold="x")
    one = lyapunov_spectrum(m, state, steps=50, warmup=10, k=1, **kw)
    monkeypatch.setattr(lyap, "_DENSE_BUDGET", 3 * 36 * 7)  # chunks of 7 applications
    chunked = lyapunov_spectrum(m, state, steps=50, warmup=10, k=1, **kw)
    monkeypatch.setattr(lyap, "_DENSE_N", 0)  # k = 1 < N/4: Jacobian-vector products
    jvps = lyapunov_spectrum(m, state, steps=50, warmup=10, k=1, **kw)
    assert one.shape == (3, 1)
    torch.testing.assert_close(chunked, one, atol=1e-12, rtol=0)
    torch.testing.assert_close(jvps, one, atol=1e-12, rtol=0)


def test_lyapunov_of_nilpotent_map_collapses():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    net = iternn.from_mlp(mlp)
    lam = lyapunov_spectrum(net, {"x": torch.ones(3, dtype=F64)}, steps=5, hold="x")
    assert lam.shape == (6,)
    assert torch.isneginf(lam).all()  # the tangent volume is exactly 0 after 2 steps
    # A cycle anywhere among the free slots: computed, finite.
    m = net.map
    m.connect("h1", "y", linear(torch.full((4, 2), 0.1, dtype=F64)))
    lam = lyapunov_spectrum(m, {"x": torch.ones(3, dtype=F64)}, steps=50, hold="x")
    assert torch.isfinite(lam[:2]).all()


# ----------------------------------------------------------------------------- Jacobian


@pytest.mark.parametrize("method", ["autograd", "structured", "auto"])
def test_jacobian_of_linear_map_is_exactly_a(method):
    a = known_matrix(REAL_EIGS)
    jac = jacobian(linear_map(a), {"z": torch.randn(5, dtype=F64)}, method=method)
    assert jac.shape == (5, 5)
    assert torch.equal(jac, a)


def test_jacobian_of_tanh_map_matches_autograd_reference():
    m, reference = tanh_map()
    g = torch.Generator().manual_seed(5)
    state = {"a": torch.randn(3, generator=g, dtype=F64),
             "b": torch.randn(4, generator=g, dtype=F64)}
    z = torch.cat([state["a"], state["b"]])
    want = torch.autograd.functional.jacobian(reference, z)
    for method in ("autograd", "structured"):
        got = jacobian(m, state, method=method)
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
    # Holding b: rows and columns of a only, b fixed at its value.
    got = jacobian(m, state, hold="b")
    torch.testing.assert_close(got, want[:3, :3], atol=1e-14, rtol=0)


def test_batched_jacobian_is_per_element():
    m, reference = tanh_map(seed=2)
    g = torch.Generator().manual_seed(6)
    state = {"a": torch.randn(2, 3, 3, generator=g, dtype=F64),
             "b": torch.randn(2, 3, 4, generator=g, dtype=F64)}
    for method in ("autograd", "structured"):
        got = jacobian(m, state, method=method)
        assert got.shape == (2, 3, 7, 7)
        for i in range(2):
            for j in range(3):
                z = torch.cat([state["a"][i, j], state["b"][i, j]])
                want = torch.autograd.functional.jacobian(reference, z)
                torch.testing.assert_close(got[i, j], want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hold", [(), ("x",)])
def test_structured_path_equals_autograd_path(seed, hold):
    acts = [[nn.ReLU(), nn.GELU(), None], [nn.ELU(), nn.SiLU(), nn.Tanh()],
            [None, nn.Sequential(nn.Tanh(), nn.LeakyReLU(0.1)), nn.Sigmoid()],
            [nn.Tanh(), nn.Tanh(), nn.Tanh()]][seed]
    m, state = random_linear_map(seed, acts)
    fast = jacobian(m, state, hold=hold, method="structured")
    slow = jacobian(m, state, hold=hold, method="autograd")
    assert fast.shape == slow.shape == ((7, 7) if hold else (9, 9))
    torch.testing.assert_close(fast, slow, atol=1e-13, rtol=0)
    # Sparse output carries the same matrix.
    sp = jacobian(m, state, hold=hold, sparse=True)
    assert sp.layout == torch.sparse_coo
    torch.testing.assert_close(sp.to_dense(), slow, atol=1e-13, rtol=0)


def test_structured_method_refuses_non_affine_blocks():
    m = iternn.BlockMap({"z": 3})
    m.connect("z", "z", nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double())
    with pytest.raises(DynamicsError, match="'z' <- 'z'"):
        jacobian(m, {"z": torch.zeros(3, dtype=F64)}, method="structured")
    # auto falls back to autograd and still gives the right answer
    jac = jacobian(m, {"z": torch.zeros(3, dtype=F64)})
    lin = m.block("z", "z")[0]
    want = torch.diag(1 - torch.tanh(lin.bias.detach()) ** 2) @ lin.weight.detach()
    torch.testing.assert_close(jac, want, atol=1e-14, rtol=0)


def test_sparse_jacobian_keeps_the_block_pattern():
    m = iternn.BlockMap({"a": 4, "b": 4})
    diag = structured.DiagonalLinear(4, dtype=F64)
    with torch.no_grad():
        diag.diagonal.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64))
    m.connect("a", "b", diag)
    m.connect("b", "a", nn.Identity())
    m.set_activation("a", nn.Tanh())
    state = {"a": torch.linspace(-1, 1, 4, dtype=F64), "b": torch.linspace(0, 1, 4, dtype=F64)}
    sp = jacobian(m, state, sparse=True)
    assert sp.layout == torch.sparse_coo and sp.shape == (8, 8)
    assert sp._nnz() == 8  # two diagonals, nothing else stored
    torch.testing.assert_close(sp.to_dense(), jacobian(m, state, method="autograd"),
                               atol=1e-15, rtol=0)


@pytest.mark.parametrize("cls", ["SparseLinear", "MaskedLinear"])
def test_sparse_jacobian_of_sparse_blocks(cls):
    g = torch.Generator().manual_seed(7)
    if cls == "SparseLinear":
        block = linear_mod.SparseLinear(6, 6, density=0.25, bias=False, generator=g, dtype=F64)
    else:
        mask = torch.rand(6, 6, generator=g) < 0.25
        block = linear_mod.MaskedLinear(6, 6, mask=mask, bias=False, dtype=F64)
    m = iternn.BlockMap({"z": 6})
    m.connect("z", "z", block)
    m.set_activation("z", nn.Tanh())
    state = {"z": torch.randn(6, generator=g, dtype=F64)}
    sp = jacobian(m, state, sparse=True)
    assert sp._nnz() == block.indices().shape[1]
    torch.testing.assert_close(sp.to_dense(), jacobian(m, state, method="autograd"),
                               atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- spectra


def test_known_real_eigenvalues_and_spectral_radius():
    m = linear_map(known_matrix(REAL_EIGS))
    state = {"z": torch.zeros(5, dtype=F64)}
    want = torch.tensor(REAL_EIGS, dtype=torch.complex128)  # already by descending modulus
    got = eigenvalues(m, state)
    assert got.is_complex()
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    rho = spectral_radius(m, state)
    assert rho.shape == () and abs(float(rho) - 0.9) < 1e-6
    # With restarts (a Krylov space smaller than the map):
    assert abs(float(spectral_radius(m, state, krylov=3)) - 0.9) < 1e-6


@pytest.mark.parametrize("krylov", [32, 4, 3])
def test_rotating_dominant_pair(krylov):
    m, eigs = rotation_map()
    state = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    got = eigenvalues(m, state)
    assert torch.allclose(got, eigs, atol=1e-6, rtol=0)
    assert abs(float(spectral_radius(m, state, krylov=krylov)) - RHO) < 1e-6


def test_too_small_budget_raises_unless_not_strict():
    m, _ = rotation_map()
    state = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    with pytest.raises(DynamicsError, match="did not converge"):
        spectral_radius(m, state, krylov=3, iters=4)
    est = spectral_radius(m, state, krylov=3, iters=4, strict=False)
    assert 0 < float(est) < 2
    with pytest.raises(DynamicsError, match="krylov must be an int >= 3"):
        spectral_radius(m, state, krylov=2)


@pytest.mark.parametrize("seed", range(3))
def test_spectral_radius_matches_eigvals_on_random_tanh_maps(seed):
    m, _ = tanh_map(seed=seed, scale=1.2)
    g = torch.Generator().manual_seed(seed + 10)
    state = {"a": torch.randn(3, generator=g, dtype=F64),
             "b": torch.randn(4, generator=g, dtype=F64)}
    want = torch.linalg.eigvals(jacobian(m, state)).abs().max()
    # 32: one Krylov space spans everything (exact); 6: restarts. (Seed 2 has a pair
    # of modulus 0.48632 next to a real 0.48744: a space of 6 holds all three.)
    for krylov in (32, 6):
        got = spectral_radius(m, state, krylov=krylov, generator=torch.Generator().manual_seed(1))
        assert abs(float(got) - float(want)) < 1e-8


def test_spectral_radius_of_a_larger_map_with_restarts():
    g = torch.Generator().manual_seed(11)
    n = 60
    m = iternn.BlockMap({"z": n})
    m.connect("z", "z", linear(torch.randn(n, n, generator=g, dtype=F64) * 1.5 / math.sqrt(n)))
    m.set_activation("z", nn.Tanh())
    state = {"z": torch.randn(n, generator=g, dtype=F64) * 0.5}
    want = torch.linalg.eigvals(jacobian(m, state)).abs().max()
    got = spectral_radius(m, state, krylov=20)
    assert abs(float(got) - float(want)) < 1e-8


def test_batched_spectral_radius_and_singular_values():
    a = known_matrix(REAL_EIGS)
    m = linear_map(a)
    state = {"z": torch.zeros(3, 5, dtype=F64)}
    rho = spectral_radius(m, state)
    assert rho.shape == (3,)
    assert torch.allclose(rho, torch.full((3,), 0.9, dtype=F64), atol=1e-6, rtol=0)
    sv = singular_values(m, state)
    assert sv.shape == (3, 5)
    torch.testing.assert_close(sv, torch.linalg.svdvals(a).expand(3, 5), atol=1e-12, rtol=0)


def test_mlp_map_jacobian_is_nilpotent_with_zero_spectrum():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Tanh(),
                        nn.Linear(5, 2)).double()
    net = iternn.from_mlp(mlp)
    x = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=F64)
    state = {"x": x}
    jac = jacobian(net, state, hold="x")
    assert jac.shape == (11, 11) and jac.abs().sum() > 0
    # Free slots h1 -> h2 -> y: a chain of two blocks, so J^3 = 0 exactly.
    assert torch.count_nonzero(torch.linalg.matrix_power(jac, 2)) > 0
    assert torch.count_nonzero(torch.linalg.matrix_power(jac, 3)) == 0
    assert float(spectral_radius(net, state, hold="x")) == 0.0
    assert torch.count_nonzero(eigenvalues(net, state, hold="x")) == 0


class _ReverseOnly(torch.autograd.Function):
    """``x W^T`` with a backward but no forward-mode formula (like a custom kernel)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))


class ReverseOnlyLinear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return _ReverseOnly.apply(x, self.w)


def test_blocks_without_forward_mode_fall_back_to_reverse_mode(monkeypatch):
    import iternn.dynamics.lyapunov as lyap

    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 6, generator=g, dtype=F64) * 0.5
    m = iternn.BlockMap({"z": 6})
    m.connect("z", "z", ReverseOnlyLinear(w))
    m.set_activation("z", nn.Tanh())
    ref = iternn.BlockMap({"z": 6})  # the same map with a plain nn.Linear
    ref.connect("z", "z", linear(w))
    ref.set_activation("z", nn.Tanh())
    state = {"z": torch.randn(6, generator=g, dtype=F64)}
    with pytest.raises((RuntimeError, NotImplementedError)):  # forward mode really fails
        torch.func.jvp(lambda z: m({"z": z})["z"], (state["z"],), (state["z"],))
    want = jacobian(ref, state)
    torch.testing.assert_close(jacobian(m, state), want, atol=1e-15, rtol=0)
    rho = torch.linalg.eigvals(want).abs().max()
    assert abs(float(spectral_radius(m, state)) - float(rho)) < 1e-10
    lam = lyapunov_spectrum(ref, state, steps=40, k=1)
    torch.testing.assert_close(lyapunov_spectrum(m, state, steps=40, k=1), lam,
                               atol=1e-12, rtol=0)
    monkeypatch.setattr(lyap, "_DENSE_N", 0)  # the JVP path, falling back
    torch.testing.assert_close(lyapunov_spectrum(m, state, steps=40, k=1), lam,
                               atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- bad input


def _rnn():
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", nn.Linear(2, 3).double())
    m.connect("h", "h", nn.Linear(3, 3).double())
    m.set_activation("h", nn.Tanh())
    return m


GOOD = {"x": torch.zeros(2, dtype=F64), "h": torch.zeros(3, dtype=F64)}


@pytest.mark.parametrize("fn", [
    lambda st: jacobian(_rnn(), st, hold="x"),
    lambda st: spectral_radius(_rnn(), st, hold="x"),
    lambda st: eigenvalues(_rnn(), st, hold="x"),
    lambda st: lyapunov_spectrum(_rnn(), st, steps=3, hold="x"),
])
def test_nan_in_the_state_is_named(fn):
    bad = {**GOOD, "h": torch.tensor([0.0, float("nan"), 0.0], dtype=F64)}
    with pytest.raises(DynamicsError, match="'h'.*NaN"):
        fn(bad)


def test_unknown_slot_is_named():
    with pytest.raises(DynamicsError, match="unknown slot 'q'"):
        jacobian(_rnn(), {**GOOD, "q": torch.zeros(1, dtype=F64)})
    with pytest.raises(DynamicsError, match="hold names unknown slot 'q'"):
        lyapunov_spectrum(_rnn(), GOOD, steps=3, hold="q")
    with pytest.raises(DynamicsError, match="force names unknown slot 'q'"):
        lyapunov_spectrum(_rnn(), GOOD, steps=3, force={"q": torch.zeros(3, 1, dtype=F64)})


def test_steps_below_one_is_refused():
    with pytest.raises(DynamicsError, match="steps must be an int >= 1, got 0"):
        lyapunov_spectrum(_rnn(), GOOD, steps=0, hold="x")


@pytest.mark.parametrize("k", [0, 4, 2.0])
def test_bad_k_is_refused(k):
    with pytest.raises(DynamicsError, match=r"k must be an int with 1 <= k <= 3"):
        lyapunov_spectrum(_rnn(), GOOD, steps=3, hold="x", k=k)


def test_empty_free_part_is_refused():
    with pytest.raises(DynamicsError, match="every slot is held"):
        jacobian(_rnn(), GOOD, hold=("x", "h"))
    with pytest.raises(DynamicsError, match="every slot is held or forced"):
        lyapunov_spectrum(_rnn(), {"x": GOOD["x"]}, steps=2, hold="x",
                          force={"h": torch.zeros(2, 3, dtype=F64)})


def test_bad_options_are_named():
    with pytest.raises(DynamicsError, match="method must be one of"):
        jacobian(_rnn(), GOOD, method="newton")
    with pytest.raises(DynamicsError, match="update must be one of"):
        spectral_radius(_rnn(), GOOD, update="gauss")
    with pytest.raises(DynamicsError, match="sparse=True needs a state without batch dims"):
        jacobian(_rnn(), {s: v.expand(2, -1) for s, v in GOOD.items()}, sparse=True)
    with pytest.raises(DynamicsError, match="forced slot 'x' needs shape"):
        lyapunov_spectrum(_rnn(), {"h": GOOD["h"]}, steps=3,
                          force={"x": torch.zeros(2, 2, dtype=F64)})
    with pytest.raises(DynamicsError, match="held slot 'x' needs a value"):
        jacobian(_rnn(), {"h": GOOD["h"]}, hold="x")
    with pytest.raises(DynamicsError, match="dtype"):
        jacobian(_rnn(), {"h": torch.zeros(3)})  # float32 state, float64 map


BAD_BLOCK_KWARGS = {
    "not a dict": ([("h<-h", {})], r"block_kwargs must be a dict block key \('dst<-src'\) -> "
                   r"dict of keyword arguments, got list"),
    "unknown block": ({"h<-y": {}}, r"block_kwargs names unknown block 'h<-y'; blocks are "
                      r"\['h<-x', 'h<-h'\]"),
    "not keyword arguments": ({"h<-h": 3}, r"block_kwargs\['h<-h'\] must be a dict of keyword "
                              r"arguments for block 'h' <- 'h', got int"),
    "a keyword the block does not take": (
        {"h<-h": {"mask": None}},
        r"block_kwargs\['h<-h'\]: block 'h' <- 'h' \(Linear\) does not take them: got an "
        r"unexpected keyword argument 'mask'"),
}

TAKE_BLOCK_KWARGS = {
    "jacobian": lambda kw: jacobian(_rnn(), GOOD, hold="x", block_kwargs=kw),
    "spectral_radius": lambda kw: spectral_radius(_rnn(), GOOD, hold="x", block_kwargs=kw),
    "lyapunov_spectrum": lambda kw: lyapunov_spectrum(_rnn(), GOOD, steps=2, hold="x",
                                                      block_kwargs=kw),
    "fixed_point": lambda kw: fixed_point(_rnn(), GOOD, hold="x", block_kwargs=kw),
    "find_fixed_points": lambda kw: find_fixed_points(
        _rnn(), {"x": GOOD["x"], "h": torch.zeros(2, 3, dtype=F64)}, hold="x",
        block_kwargs=kw),
    "impulse_response": lambda kw: impulse_response(_rnn(), GOOD, steps=2, hold="x",
                                                    block_kwargs=kw),
}


@pytest.mark.parametrize("case", list(BAD_BLOCK_KWARGS))
@pytest.mark.parametrize("tool", list(TAKE_BLOCK_KWARGS))
def test_bad_block_kwargs_are_named_before_the_map_runs(tool, case):
    kwargs, message = BAD_BLOCK_KWARGS[case]
    with pytest.raises(DynamicsError, match=message):
        TAKE_BLOCK_KWARGS[tool](kwargs)


class Scaled(nn.Module):
    """A linear block with a keyword argument: ``scale · W z``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = linear(w)

    def forward(self, z, scale=1.0):
        return scale * self.lin(z)


def test_block_kwargs_a_block_takes_reach_it():
    a = known_matrix([0.5, -0.3, 0.2])
    m = iternn.BlockMap({"z": 3})
    m.connect("z", "z", Scaled(a))
    z = {"z": torch.ones(3, dtype=F64)}
    torch.testing.assert_close(jacobian(m, z, block_kwargs={"z<-z": {"scale": 2.0}}), 2 * a,
                               rtol=1e-14, atol=1e-15)


def test_fixed_point_needs_the_held_values():
    with pytest.raises(DynamicsError, match=r"held slot 'x' needs a value in state"):
        fixed_point(_rnn(), {"h": GOOD["h"]}, hold="x")


def test_find_fixed_points_from_no_starts_finds_nothing():
    found = find_fixed_points(_rnn(), {"x": torch.zeros(0, 2, dtype=F64),
                                       "h": torch.zeros(0, 3, dtype=F64)}, hold="x")
    assert found.n_starts == 0 and len(found) == 0 and found.eigenvalues.shape == (0, 3)
    assert found.states["h"].shape == (0, 3) and found.points.shape == (0, 3)


def test_deq_start_in_another_dtype_is_named():
    deq = DEQ(_rnn(), output="h")
    with pytest.raises(DynamicsError, match=r"z0 is torch.float32 on cpu, the input 'x' is "
                                            r"torch.float64 on cpu"):
        deq(torch.zeros(2, 2, dtype=F64), z0=torch.zeros(2, 3))


# ----------------------------------------------------------------------------- non-finite maps


def _nan_rnn(dtype=F64):
    m = _rnn().to(dtype)
    with torch.no_grad():
        m.block("h", "h").weight[1, 2] = float("nan")
    return m


@pytest.mark.parametrize("fn", [
    lambda m, st: jacobian(m, st, hold="x"),
    lambda m, st: eigenvalues(m, st, hold="x"),
    lambda m, st: singular_values(m, st, hold="x"),
    lambda m, st: spectral_radius(m, st, hold="x"),
    lambda m, st: lyapunov_spectrum(m, st, steps=3, hold="x"),
])
def test_non_finite_weights_are_named_by_block(fn):
    with pytest.raises(DynamicsError, match=r"block 'h' <- 'h' holds NaN in 'weight'"):
        fn(_nan_rnn(), GOOD)
    m = _rnn()
    with torch.no_grad():
        m.block("h", "x").bias[0] = float("inf")
    with pytest.raises(DynamicsError, match=r"block 'h' <- 'x' holds inf in 'bias'"):
        fn(m, GOOD)


def test_nan_float32_eigenvalues_raise_and_the_process_survives():
    # torch.linalg.eigvals on a NaN float32 matrix crashes the process on some builds:
    # run it in a child so that a regression fails this test instead of killing pytest.
    code = (
        "import torch, iternn\n"
        "from torch import nn\n"
        "from iternn.dynamics import eigenvalues, DynamicsError\n"
        "m = iternn.BlockMap({'x': 2, 'h': 8})\n"
        "m.connect('h', 'x', nn.Linear(2, 8))\n"
        "m.connect('h', 'h', nn.Linear(8, 8))\n"
        "m.set_activation('h', nn.Tanh())\n"
        "with torch.no_grad():\n"
        "    m.block('h', 'h').weight.fill_(float('nan'))\n"
        "try:\n"
        "    eigenvalues(m, {'x': torch.ones(2), 'h': torch.ones(8)}, hold='x')\n"
        "except DynamicsError as e:\n"
        "    print('named:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "named: block 'h' <- 'h' holds NaN in 'weight'" in out.stdout


def test_non_finite_jacobian_is_named_by_its_block():
    jac = torch.zeros(2, 5, 5, dtype=F64)
    check_matrix_finite(jac, "J", ("a", "b"), (2, 3))  # finite: nothing raised
    jac[1, 3, 1] = float("inf")  # row 3 is in b (rows 2..4), column 1 in a
    with pytest.raises(DynamicsError, match=r"J holds inf \(first at the block 'b' <- 'a'\)"):
        check_matrix_finite(jac, "J", ("a", "b"), (2, 3))


# ----------------------------------------------------------------------------- sizes
def _wide_map(n=10**7):
    """x and a 10**7-unit h fed back through an identity: dense n x n matrices of it
    (400 TB in float32) fit no machine; the state itself is 40 MB."""
    m = iternn.BlockMap({"x": 2, "h": n})
    m.connect("h", "h", nn.Identity())
    m.set_activation("h", nn.Tanh())
    return m, {"x": torch.zeros(2), "h": torch.zeros(n)}


@pytest.mark.parametrize("fn, named", [
    (lambda m, s: jacobian(m, s, hold="x"), r"the Jacobian over 10000000 free units"),
    (lambda m, s: eigenvalues(m, s, hold="x"), r"the Jacobian over 10000000 free units"),
    (lambda m, s: singular_values(m, s, hold="x"), r"the Jacobian over 10000000 free units"),
    (lambda m, s: jacobian(m, s, hold="x", sparse=True),
     r"the dense weight of block 'h' <- 'h' \(Identity, 10000000 x 10000000"),
    (lambda m, s: lyapunov_spectrum(m, s, steps=2, hold="x"),
     r"the tangent basis \(k=10000000 exponents over 10000000 free units"),
    (lambda m, s: iternn.dynamics.find_fixed_points(m, {"x": s["x"], "h": s["h"][None]}, hold="x",
                                                    opt_steps=0),
     r"the Newton polish \(polish_steps\) of 1 point\(s\) over 10000000 free units"),
])
def test_dense_matrices_are_sized_before_they_are_allocated(fn, named):
    from iternn.errors import SizeError

    m, s = _wide_map()
    with pytest.raises(SizeError, match=named + r".* needs .* TB of memory"):
        fn(m, s)
