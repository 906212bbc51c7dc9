"""Fixed points: the solver registry, fixed_point on block maps, find_fixed_points."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import iternn
from iternn.dynamics.fixed_points import FixedPoints, find_fixed_points, fixed_point
from iternn.dynamics.functional import DynamicsError
from iternn.dynamics.linalg import verified_solve
from iternn.dynamics.solvers import (
    SOLVERS,
    Anderson,
    Broyden,
    ConvergenceError,
    Picard,
    SolverInfo,
    StopReason,
    register_solver,
    solve,
)

F64 = torch.float64


def _linear(weight) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=F64)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def tanh_map(n_x=3, n_h=6, radius=0.95, seed=0):
    """x (held) and h: h <- tanh(W h + U x + b), W = radius * an orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_h, n_h, generator=g, dtype=F64))
    w = radius * q
    u = torch.randn(n_h, n_x, generator=g, dtype=F64)
    b = 0.5 * torch.randn(n_h, generator=g, dtype=F64)
    m = iternn.BlockMap({"x": n_x, "h": n_h})
    m.connect("h", "h", _linear(w))
    m.connect("h", "x", _linear(u))
    m.set_bias("h", b)
    m.set_activation("h", nn.Tanh())
    return m.double(), (w, u, b)


def scipy_fixed_point(w, u, b, x):
    """The fixed point of h = tanh(W h + U x + b) per row of x, with scipy.optimize.root."""
    sp = pytest.importorskip("scipy.optimize")
    np_w, np_u, np_b = w.numpy(), u.numpy(), b.numpy()
    out = []
    for xi in x.numpy():
        import numpy as np

        def fun(h, xi=xi):
            return h - np.tanh(np_w @ h + np_u @ xi + np_b)

        sol = sp.root(fun, np.zeros(np_w.shape[0]), method="hybr", tol=1e-13)
        assert np.abs(fun(sol.x)).max() < 1e-13
        out.append(sol.x)
    return torch.tensor(np.stack(out), dtype=F64)


# ------------------------------------------------------------------ contractive map
@pytest.fixture(scope="module")
def contractive():
    m, (w, u, b) = tanh_map()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return m, w, u, b, x, scipy_fixed_point(w, u, b, x)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_agrees_with_scipy(contractive, solver):
    m, w, u, b, x, want = contractive
    star, info = fixed_point(m, {"x": x}, hold=["x"], solver=solver, tol=1e-12, max_steps=2000)
    assert isinstance(info, SolverInfo) and info.solver == solver
    assert info.converged and info.reason == "converged"
    assert info.converged_each.shape == (5,) and bool(info.converged_each.all())
    assert torch.allclose(star["h"], want, atol=1e-8, rtol=0), (star["h"] - want).abs().max()
    assert torch.equal(star["x"], x)
    # The reported residual is the residual of the returned point.
    res = (m({"x": x, "h": star["h"]})["h"] - star["h"]).norm(dim=-1)
    assert torch.allclose(info.residual, res, atol=1e-15, rtol=1e-6)
    assert info.residual_trace.shape == (info.steps + 1,)
    assert info.residual_trace[-1] <= 1e-12 < info.residual_trace[0]


def test_anderson_needs_fewer_steps_than_picard(contractive):
    m, *_, x, _ = contractive
    _, picard = fixed_point(m, {"x": x}, hold=["x"], solver="picard", tol=1e-12, max_steps=2000)
    _, anderson = fixed_point(m, {"x": x}, hold=["x"], solver="anderson", tol=1e-12, max_steps=2000)
    _, broyden = fixed_point(m, {"x": x}, hold=["x"], solver="broyden", tol=1e-12, max_steps=2000)
    assert picard.converged and anderson.converged and broyden.converged
    assert anderson.steps < picard.steps / 2, (anderson.steps, picard.steps)
    assert broyden.steps < picard.steps, (broyden.steps, picard.steps)


def test_damped_picard_converges(contractive):
    m, *_, x, want = contractive
    star, full = fixed_point(m, {"x": x}, hold=["x"], solver="picard", tol=1e-11, max_steps=3000)
    star_d, damped = fixed_point(m, {"x": x}, hold=["x"], solver=Picard(damping=0.5),
                                 tol=1e-11, max_steps=3000)
    # W has eigenvalues all round the circle |λ| = 0.95: damping changes the path.
    assert damped.converged and full.converged and damped.steps != full.steps
    assert torch.allclose(star_d["h"], want, atol=1e-9, rtol=0)


def test_batched_elements_converge_independently(contractive):
    m, *_, x, _ = contractive
    batch, info = fixed_point(m, {"x": x}, hold=["x"], tol=1e-12)
    for i in range(x.shape[0]):
        one, _ = fixed_point(m, {"x": x[i:i + 1]}, hold=["x"], tol=1e-12)
        assert torch.allclose(batch["h"][i], one["h"][0], atol=1e-11, rtol=0)
    # Unbatched states work too: batch shape ().
    single, info1 = fixed_point(m, {"x": x[0]}, hold=["x"], tol=1e-12)
    assert single["h"].shape == (6,) and info1.converged_each.shape == ()
    assert torch.allclose(single["h"], batch["h"][0], atol=1e-11, rtol=0)


def test_mixed_batch_reports_per_element():
    # Element 0 contracts (a = 0.5), element 1 oscillates forever under Picard (a = -1).
    a = torch.tensor([[0.5], [-1.0]], dtype=F64)
    c = torch.tensor([[1.0], [1.0]], dtype=F64)
    z, info = solve(lambda z: a * z + c, torch.zeros(2, 1, dtype=F64), solver="picard",
                    tol=1e-12, max_steps=100)
    assert info.converged_each.tolist() == [True, False]
    assert not info.converged and info.reason == "max_steps" and info.steps == 100
    assert abs(float(z[0, 0]) - 2.0) < 1e-11
    # Anderson solves the linear problem for both elements.
    z, info = solve(lambda z: a * z + c, torch.zeros(2, 1, dtype=F64), solver="anderson", tol=1e-12)
    assert info.converged and torch.allclose(z, c / (1 - a), atol=1e-11, rtol=0)


def test_non_convergence_reported_and_raised(contractive):
    m, *_, x, _ = contractive
    star, info = fixed_point(m, {"x": x}, hold=["x"], max_steps=2, tol=1e-12)
    assert not info.converged and info.steps == 2 and info.reason == "max_steps"
    assert not bool(info.converged_each.any())
    assert torch.isfinite(star["h"]).all()
    with pytest.raises(ConvergenceError) as err:
        fixed_point(m, {"x": x}, hold=["x"], max_steps=2, tol=1e-12, raise_on_failure=True)
    assert isinstance(err.value, RuntimeError) and not err.value.info.converged
    assert "did not converge" in str(err.value)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_non_finite_iterates_stop_without_crash(solver):
    def f(z):  # row 0 contracts to 2; row 1 walks up by 1 per step and is NaN past 3.5
        walk = torch.where(z[1:] > 3.5, torch.nan, z[1:] + 1.0)
        return torch.cat([0.5 * z[:1] + 1.0, walk])

    z, info = solve(f, torch.zeros(2, 1, dtype=F64), solver=solver, tol=1e-10, max_steps=500)
    assert info.converged_each.tolist() == [True, False]
    assert not info.converged and info.reason == "non-finite" and info.steps < 500
    assert abs(float(z[0, 0]) - 2.0) < 1e-9
    assert torch.isfinite(z).all() and torch.isfinite(info.residual).all()
    assert torch.isinf(info.residual_trace).any()
    # z <- z^2 + 2 has no real fixed point; Picard overflows.
    z, info = solve(lambda z: z * z + 2.0, torch.zeros(3, 1, dtype=F64), solver="picard")
    assert info.reason == "non-finite" and torch.isfinite(z).all()


@dataclasses.dataclass(frozen=True)
class Halving:
    """A user-defined solver: options in the object, the built-in solvers' call shape."""

    scale: float = 0.5

    def __call__(self, f, z0, *, tol, max_steps, stop_mode):
        z = z0
        for _ in range(max_steps):
            z = (1 - self.scale) * z + self.scale * f(z)
        r = (f(z) - z).norm(dim=-1)
        return z, SolverInfo("halving", bool((r <= tol).all()), r <= tol, max_steps,
                             r.max()[None], r, tol, stop_mode, StopReason.MAX_STEPS)


def test_registry_custom_solver():
    assert {"picard", "anderson", "broyden"} <= set(SOLVERS)
    assert SOLVERS["anderson"] == Anderson() and SOLVERS["picard"] == Picard()
    register_solver("test-halving", Halving(scale=0.25))
    try:
        z, info = solve(lambda z: 0.5 * z + 1, torch.zeros(4, 2, dtype=F64),
                        solver="test-halving", max_steps=300)
        assert info.solver == "test-halving" and info.converged
        assert torch.allclose(z, torch.full((4, 2), 2.0, dtype=F64), atol=1e-10)
        # The same object passed directly: one call shape for every solver.
        _, direct = solve(lambda z: 0.5 * z + 1, torch.zeros(4, 2, dtype=F64),
                          solver=Halving(scale=0.25), max_steps=300)
        assert direct.converged and torch.equal(direct.residual, info.residual)
        # Options no longer pass through solve (they live in the object).
        with pytest.raises(TypeError, match="scale"):
            solve(lambda z: z, torch.zeros(1, 1), solver="test-halving", scale=3)
    finally:
        del SOLVERS["test-halving"]


def test_fixed_point_takes_solver_objects(contractive):
    # The map argument is positional-only: Anderson's memory m cannot clash with it.
    m, w, u, b, x, want = contractive
    for solver in (Anderson(m=2), Anderson(m=8, lam=1e-6, beta=0.9), Broyden(memory=4),
                   Picard(damping=0.8)):
        star, info = fixed_point(m, {"x": x}, hold=["x"], solver=solver, tol=1e-12,
                                 max_steps=3000)
        assert info.converged and info.solver == solver.name, solver
        assert torch.allclose(star["h"], want, atol=1e-9, rtol=0), solver
    _, short = fixed_point(m, {"x": x}, hold=["x"], solver=Anderson(m=1), tol=1e-12)
    _, long = fixed_point(m, {"x": x}, hold=["x"], solver=Anderson(m=6), tol=1e-12)
    assert short.steps != long.steps  # the option reached the solver
    with pytest.raises(TypeError):
        fixed_point(m=m, state={"x": x})  # type: ignore[call-arg]


def test_solver_info_is_frozen_and_reasons_carry_messages(contractive):
    m, *_, x, _ = contractive
    _, info = fixed_point(m, {"x": x}, hold=["x"], max_steps=2, tol=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.converged = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.residual = torch.zeros(5, dtype=F64)  # type: ignore[misc]
    assert info.reason is StopReason.MAX_STEPS and info.reason == "max_steps"
    assert "max_steps" in info.reason.message and f"{info.reason}" == "max_steps"
    assert {r.value for r in StopReason} == {"converged", "max_steps", "non-finite"}
    assert all(r.message for r in StopReason)
    with pytest.raises(ConvergenceError, match=StopReason.MAX_STEPS.message):
        fixed_point(m, {"x": x}, hold=["x"], max_steps=2, tol=1e-12, raise_on_failure=True)


@pytest.mark.parametrize(("make", "name"), [
    (lambda: Picard(damping=1.5), "Picard damping"),
    (lambda: Picard(damping=0), "Picard damping"),
    (lambda: Anderson(m=0), "Anderson m"),
    (lambda: Anderson(m=2.0), "Anderson m"),
    (lambda: Anderson(lam=-1.0), "Anderson lam"),
    (lambda: Anderson(beta=float("nan")), "Anderson beta"),
    (lambda: Broyden(memory=0), "Broyden memory"),
])
def test_bad_solver_options_are_named_when_made(make, name):
    with pytest.raises(DynamicsError, match=name):
        make()


def test_solver_objects_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Anderson().m = 3  # type: ignore[misc]
    with pytest.raises(DynamicsError, match="solver must be a solver object"):
        solve(lambda z: z, torch.zeros(1, 2), solver=Anderson)  # the class, not an object


# ------------------------------------------------------------------ MLP map
def test_mlp_fixed_point_is_the_forward_pass():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                        nn.Linear(4, 2)).double()
    net = iternn.from_mlp(mlp)
    x = torch.randn(7, 3, dtype=F64)
    h1 = mlp[1](mlp[0](x))
    h2 = mlp[3](mlp[2](h1))
    y = mlp[4](h2)
    for solver in ("picard", "anderson", "broyden"):
        star, info = fixed_point(net.map, {"x": x}, hold=["x"], solver=solver, tol=1e-12)
        assert info.converged, solver
        for slot, want in (("x", x), ("h1", h1), ("h2", h2), ("y", y)):
            assert torch.allclose(star[slot], want, atol=1e-10, rtol=0), (solver, slot)
    # Picard reaches it exactly in L = 3 applications (the map is nilpotent).
    _, info = fixed_point(net.map, {"x": x}, hold=["x"], solver="picard", tol=1e-12)
    assert info.steps == 3 and float(info.residual.max()) == 0.0


# ------------------------------------------------------------------ finding fixed points
def bistable_1d(w=2.0, c=0.0):
    m = iternn.BlockMap({"z": 1})
    m.connect("z", "z", _linear([[w]]))
    if c:
        m.set_bias("z", torch.tensor([c], dtype=F64))
    m.set_activation("z", nn.Tanh())
    return m.double()


def test_find_fixed_points_1d_bistable():
    sp = pytest.importorskip("scipy.optimize")
    zstar = sp.brentq(lambda z: z - math.tanh(2 * z), 0.5, 1.5)
    m = bistable_1d()
    starts = torch.linspace(-2.05, 2.05, 16, dtype=F64)[:, None]  # no start on a fixed point
    res = find_fixed_points(m, {"z": starts}, opt_steps=300)
    assert isinstance(res, FixedPoints) and len(res) == 3 and res.n_starts == 16
    order = torch.argsort(res.points[:, 0])
    pts = res.points[order, 0]
    assert torch.allclose(pts, torch.tensor([-zstar, 0.0, zstar], dtype=F64), atol=1e-10, rtol=0)
    labels = [res.stability[i] for i in order.tolist()]
    assert labels == ["stable", "unstable", "stable"]
    assert all(k == "fixed" for k in res.kind) and bool((res.q <= 1e-12).all())
    lam = res.eigenvalues[order, 0].real
    want = torch.tensor([2 * (1 - zstar**2), 2.0, 2 * (1 - zstar**2)], dtype=F64)
    assert torch.allclose(lam, want, atol=1e-8, rtol=0)
    assert res.states["z"].shape == (3, 1)


def _bistable_2d():
    th = 0.6
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
    w = rot @ torch.diag(torch.tensor([2.0, 0.5], dtype=F64)) @ rot.T
    m = iternn.BlockMap({"u": 1, "v": 1})
    for i, d in enumerate("uv"):
        for j, s in enumerate("uv"):
            m.connect(d, s, _linear(w[i:i + 1, j:j + 1]))
        m.set_activation(d, nn.Tanh())
    return m.double(), w


@pytest.mark.parametrize("method", ["adam", "lbfgs"])
def test_find_fixed_points_2d_two_stable_one_saddle(method):
    sp = pytest.importorskip("scipy.optimize")
    import numpy as np

    m, w = _bistable_2d()
    wn = w.numpy()
    want = []
    for guess in ([1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]):
        sol = sp.root(lambda z: z - np.tanh(wn @ z), guess, tol=1e-13)
        assert np.abs(sol.x - np.tanh(wn @ sol.x)).max() < 1e-13
        want.append(sol.x)
    want = torch.tensor(np.array(want), dtype=F64)
    assert (want[0] - want[1]).norm() > 0.5  # three distinct points
    grid = torch.linspace(-1.6, 1.6, 6, dtype=F64)  # 36 starts, none on a fixed point
    uu, vv = torch.meshgrid(grid, grid, indexing="ij")
    steps = 400 if method == "adam" else 100
    res = find_fixed_points(m, {"u": uu.reshape(-1, 1), "v": vv.reshape(-1, 1)},
                            method=method, opt_steps=steps)
    assert len(res) == 3, res
    assert res.free == ("u", "v") and res.points.shape == (3, 2)
    for i, p in enumerate(want):
        d = (res.points - p).norm(dim=-1)
        j = int(d.argmin())
        assert float(d[j]) < 1e-9
        assert res.kind[j] == "fixed"
        assert res.stability[j] == ("saddle" if i == 1 else "stable")
    saddle = int((res.points.norm(dim=-1)).argmin())
    assert torch.allclose(res.eigenvalues[saddle].real, torch.tensor([2.0, 0.5], dtype=F64), atol=1e-9)


def test_find_slow_point_past_a_saddle_node():
    # z <- tanh(2 z + 0.6): past the saddle-node bifurcation (at bias ~0.533) the left
    # stable point and the saddle have vanished; a slow point (a local minimum of
    # q = 1/2 (z - G(z))^2 > 0, where G'(z) = 1) is left behind.
    sp = pytest.importorskip("scipy.optimize")
    c = 0.6
    ghost = sp.minimize_scalar(lambda z: 0.5 * (z - math.tanh(2 * z + c)) ** 2,
                               bounds=(-1.2, -0.2), method="bounded", options={"xatol": 1e-12})
    m = bistable_1d(c=c)
    starts = torch.linspace(-1.5, 1.5, 12, dtype=F64)[:, None]
    res = find_fixed_points(m, {"z": starts}, slow_tol=1e-2, unique_tol=1e-3, opt_steps=400)
    assert res.kind == ("fixed", "slow"), res
    assert res.stability[0] == "stable" and float(res.points[0, 0]) > 0.9
    assert abs(float(res.points[1, 0]) - ghost.x) < 1e-4
    assert abs(float(res.q[1]) - ghost.fun) < 1e-6 * ghost.fun
    assert abs(float(res.spectral_radius[1]) - 1.0) < 1e-3
    # With a stricter slow threshold the ghost is discarded, not reported.
    strict = find_fixed_points(m, {"z": starts}, slow_tol=1e-4, opt_steps=300)
    assert strict.kind == ("fixed",) and strict.n_discarded > 0


def test_find_fixed_points_with_held_input():
    m, *_ = tanh_map(radius=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, generator=g, dtype=F64)
    starts = torch.randn(10, 6, generator=g, dtype=F64)
    res = find_fixed_points(m, {"x": x, "h": starts}, hold=["x"], opt_steps=200)
    assert len(res) == 1 and res.stability == ("stable",) and res.kind == ("fixed",)
    star, _ = fixed_point(m, {"x": x}, hold=["x"], tol=1e-13)
    assert torch.allclose(res.states["h"][0], star["h"], atol=1e-10, rtol=0)
    assert torch.equal(res.states["x"][0], x)
    assert float(res.spectral_radius[0]) < 0.5


# ------------------------------------------------------------------ bad input
def test_unknown_solver_is_named():
    m, *_ = tanh_map()
    with pytest.raises(DynamicsError, match=r"unknown solver 'newton-raphson'.*anderson"):
        fixed_point(m, {"x": torch.zeros(1, 3, dtype=F64)}, hold=["x"], solver="newton-raphson")
    with pytest.raises(DynamicsError, match="unknown solver 'nope'"):
        solve(lambda z: z, torch.zeros(1, 2), solver="nope")


def test_nan_in_state_is_named():
    m, *_ = tanh_map()
    h = torch.zeros(2, 6, dtype=F64)
    h[1, 3] = float("nan")
    with pytest.raises(DynamicsError, match="'h'.*NaN"):
        fixed_point(m, {"x": torch.zeros(2, 3, dtype=F64), "h": h}, hold=["x"])
    with pytest.raises(DynamicsError, match="NaN"):
        solve(lambda z: z, torch.tensor([[float("nan")]]))


def test_nothing_free_to_solve():
    m, *_ = tanh_map()
    state = {"x": torch.zeros(2, 3, dtype=F64), "h": torch.zeros(2, 6, dtype=F64)}
    with pytest.raises(DynamicsError, match="nothing to iterate"):
        fixed_point(m, state, hold=["x", "h"])
    with pytest.raises(DynamicsError, match="free slot"):
        find_fixed_points(m, {"x": state["x"]}, hold=["x"])


@pytest.mark.parametrize("tol", [0, -1e-3, float("nan"), float("inf"), True, "small"])
def test_bad_tol_is_named(tol):
    m, *_ = tanh_map()
    with pytest.raises(DynamicsError, match="tol"):
        fixed_point(m, {"x": torch.zeros(1, 3, dtype=F64)}, hold=["x"], tol=tol)


@pytest.mark.parametrize("max_steps", [-1, 2.5, None])
def test_bad_max_steps_is_named(max_steps):
    with pytest.raises(DynamicsError, match="max_steps"):
        solve(lambda z: z, torch.zeros(1, 2), max_steps=max_steps)


def test_bad_solve_arguments_are_named():
    with pytest.raises(DynamicsError, match="stop_mode"):
        solve(lambda z: z, torch.zeros(1, 2), stop_mode="max")
    with pytest.raises(DynamicsError, match="same shape"):
        solve(lambda z: z[..., :1], torch.zeros(1, 2))


# ------------------------------------------------------------------ verified linear solves
@pytest.fixture
def two_threads():
    """torch.set_num_threads(2) explicitly (the setting under which some builds' batched
    float64 LU solve fails from ~192 unknowns on), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_verified_solve_large_batched_float64(two_threads):
    g = torch.Generator().manual_seed(5)
    n = 256
    a = torch.randn(3, n, n, generator=g, dtype=F64) + 16 * torch.eye(n, dtype=F64)
    b = torch.randn(3, n, 2, generator=g, dtype=F64)
    x, ok = verified_solve(a, b, what="test")
    assert ok.shape == (3,) and bool(ok.all())
    want = torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(3)])
    assert torch.allclose(x, want, atol=1e-12, rtol=0)
    assert float((a @ x - b).abs().max()) < 1e-11


def test_verified_solve_catches_a_wrong_answer_with_info_zero(monkeypatch):
    # The failure mode that raises nothing: a batched LU solve that returns garbage with
    # info == 0. The residual check must catch it and solve those systems again.
    real = torch.linalg.solve_ex

    def wrong_when_batched(a, b):
        x, info = real(a, b)
        return (x + 1.0, info) if a.dim() == 3 else (x, info)

    monkeypatch.setattr(torch.linalg, "solve_ex", wrong_when_batched)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 5, 5, generator=g, dtype=F64) + 5 * torch.eye(5, dtype=F64)
    b = torch.randn(4, 5, 1, generator=g, dtype=F64)
    x, ok = verified_solve(a, b, what="test")
    assert bool(ok.all())
    assert float((a @ x - b).abs().max()) < 1e-13


def test_verified_solve_reports_singular_systems():
    a = torch.eye(3, dtype=F64).repeat(2, 1, 1)
    a[1, 2, 2] = 0.0  # singular, right-hand side outside its range
    b = torch.ones(2, 3, 1, dtype=F64)
    x, ok = verified_solve(a, b, what="test", allow_failure=True)
    assert ok.tolist() == [True, False]
    assert torch.equal(x[0], b[0]) and torch.equal(x[1], torch.zeros(3, 1, dtype=F64))
    a_nan = a.clone()
    a_nan[0, 0, 1] = float("nan")  # never handed to LAPACK: it fails
    _, ok = verified_solve(a_nan, b, what="test", allow_failure=True)
    assert ok.tolist() == [False, False]
    with pytest.raises(ConvergenceError, match=r"Newton step: .*element\(s\) \[1\]"):
        verified_solve(a, b, what="Newton step")


def test_find_fixed_points_newton_polish_on_256_dims(two_threads):
    # A batch of 256-dimensional Newton systems: the batched float64 LU solve of this
    # size fails on some builds after set_num_threads(2); the polish must still converge.
    m, _ = tanh_map(n_x=2, n_h=256, radius=0.5, seed=4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, generator=g, dtype=F64)
    starts = 0.3 * torch.randn(2, 256, generator=g, dtype=F64)
    res = find_fixed_points(m, {"x": x, "h": starts}, hold=["x"], opt_steps=0,
                            polish_steps=4, polish_radius=100.0)
    assert len(res) == 1 and res.kind == ("fixed",) and res.n_discarded == 0
    assert float(res.q[0]) < 1e-20
    star, info = fixed_point(m, {"x": x}, hold=["x"], tol=1e-13)
    assert info.converged
    assert torch.allclose(res.states["h"][0], star["h"], atol=1e-10, rtol=0)


def test_a_custom_solver_must_report_a_known_reason():
    def lazy(f, z0, *, tol, max_steps, stop_mode):
        r = (f(z0) - z0).norm(dim=-1)
        return z0, SolverInfo("lazy", False, r <= tol, 0, r.max()[None], r, tol, stop_mode, why)

    why = "max_steps"  # a plain string that names a reason becomes the StopReason
    _, info = solve(lambda z: z + 1, torch.zeros(2, 1, dtype=F64), solver=lazy)
    assert info.reason is StopReason.MAX_STEPS and info.solver == "lazy"
    why = "tired"
    with pytest.raises(DynamicsError, match="solver 'lazy' returned reason 'tired'"):
        solve(lambda z: z + 1, torch.zeros(2, 1, dtype=F64), solver=lazy)


@pytest.mark.parametrize("make", [lambda k: Anderson(m=k), lambda k: Broyden(memory=k)])
def test_solver_memory_is_bounded_by_max_steps_and_checked_before_allocating(make):
    from iternn.errors import SizeError

    m, _ = tanh_map()
    x = {"x": torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))}
    # a memory longer than max_steps keeps nothing more: same answer, no 10**12 buffers
    z_long, info_long = fixed_point(m, x, hold=["x"], solver=make(10**12), max_steps=40)
    z_short, info_short = fixed_point(m, x, hold=["x"], solver=make(40), max_steps=40)
    assert torch.equal(z_long["h"], z_short["h"]) and info_long.steps == info_short.steps
    assert float(info_long.residual.max()) < 1e-3  # it did iterate towards the fixed point
    # where max_steps allows it all, the history is refused by its size, named
    name = type(make(1)).__name__
    with pytest.raises(SizeError, match=rf"{name}\((m|memory)=1000000000000\) .* needs .* TB"):
        fixed_point(m, x, hold=["x"], solver=make(10**12), max_steps=10**12)


# ------------------------------------------------------------------ a trained flip-flop RNN
def flip_flop(batch, steps, p, gen):
    """The 3-bit flip-flop task: 3 channels of sparse +1/-1 pulses (probability ``p`` per
    channel and step); each target channel holds the last pulse on its channel."""
    pulse = torch.rand(batch, steps, 3, generator=gen) < p
    sign = torch.where(torch.rand(batch, steps, 3, generator=gen) < 0.5, -1.0, 1.0)
    inputs = torch.where(pulse, sign, 0.0).to(F64)
    targets = torch.empty_like(inputs)
    last = torch.zeros(batch, 3, dtype=F64)
    for t in range(steps):
        last = torch.where(pulse[:, t], inputs[:, t], last)
        targets[:, t] = last
    return inputs, targets


@pytest.fixture(scope="module")
def flip_flop_rnn():
    """A tanh nn.RNN(3, 8) with a linear readout, trained on the flip-flop task (float64,
    200 Adam steps, every draw from one generator), and 384 starting states: hidden
    states it visits on flip-flop inputs plus noise."""
    gen = torch.Generator().manual_seed(1)
    rnn = nn.RNN(3, 8, batch_first=True).double()
    readout = nn.Linear(8, 3).double()
    params = [*rnn.parameters(), *readout.parameters()]
    with torch.no_grad():
        for p in params:
            p.uniform_(-(8**-0.5), 8**-0.5, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(200):
        x, y = flip_flop(128, 32, 0.1, gen)
        loss = (readout(rnn(x)[0]) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    assert loss.item() < 0.06  # it has learnt the task (an untrained net scores ~0.5)
    x, _ = flip_flop(32, 64, 0.05, gen)
    with torch.no_grad():
        visited = rnn(x)[0].reshape(-1, 8)
    pick = torch.randint(visited.shape[0], (384,), generator=gen)
    starts = visited[pick] + 0.2 * torch.randn(384, 8, generator=gen, dtype=F64)
    return rnn.requires_grad_(False), starts


def test_trained_flip_flop_rnn_has_8_stable_points_and_19_saddles(flip_flop_rnn):
    rnn, starts = flip_flop_rnn
    m = iternn.from_rnn(rnn).map
    res = find_fixed_points(m, {"x": torch.zeros(3, dtype=F64), "h1": starts}, hold=["x"])
    assert res.kind == ("fixed",) * 27 and bool((res.q <= 1e-20).all())
    assert sorted(res.stability) == ["saddle"] * 19 + ["stable"] * 8
    # The cube of a 3-bit memory: a saddle has 1 (edge), 2 (face) or 3 (centre) unstable
    # directions, 12, 6 and 1 of them; the readout of a stable point is a corner.
    unstable = [int((e.abs() > 1).sum()) for e, s in zip(res.eigenvalues, res.stability)
                if s == "saddle"]
    assert sorted(unstable) == [1] * 12 + [2] * 6 + [3]
    w, b = rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    h = res.states["h1"]
    assert float((torch.tanh(h @ w.T + b) - h).abs().max()) < 1e-12  # fixed points of the RNN


def reference_search(w, c, starts, *, opt_steps, lr=1e-2, polish_steps=20, radius=0.1,
                     slow_tol=1e-4, unique_tol=1e-4, marginal_tol=1e-6):
    """The search without shortcuts, written out for h <- tanh(W h + c_i) (c_i per start):
    Adam on q = |h - G(h)|^2 / 2 from every start for all steps (torch.optim.Adam, the
    learning rate decaying to lr / 100; the best iterate kept), Newton from every start
    (Jacobians by torch.func, steps capped at radius and halved until q decreases), then
    the points with q <= slow_tol, lowest q first, none within unique_tol of a kept one."""
    def g(h, ci):
        return torch.tanh(h @ w.T + ci)

    def speed(h):
        return 0.5 * (h - g(h, c)).pow(2).sum(-1)

    z = starts.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.01 ** (1 / opt_steps))
    best, best_q = starts.clone(), speed(starts)
    for _ in range(opt_steps):
        q = speed(z)
        better = q.detach() < best_q
        best = torch.where(better[:, None], z.detach(), best)
        best_q = torch.where(better, q.detach(), best_q)
        opt.zero_grad()
        q.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        q = speed(z)
        z = torch.where((q < best_q)[:, None], z, best)
        q = speed(z)
        jacobian = torch.func.vmap(torch.func.jacrev(g))
        eye = torch.eye(w.shape[0], dtype=F64)
        for _ in range(polish_steps):
            step = torch.linalg.solve(jacobian(z, c) - eye, -(g(z, c) - z))
            step = step * torch.clamp(radius / step.norm(dim=-1, keepdim=True), max=1.0)
            moved = torch.zeros(len(z), dtype=torch.bool)
            for t in 0.5 ** torch.arange(12.0):
                trial = z + t * step
                accept = ~moved & (speed(trial) < q)
                z = torch.where(accept[:, None], trial, z)
                q = torch.where(accept, speed(trial), q)
                moved |= accept
        kept = []
        for i in torch.argsort(q).tolist():
            far = all(float(torch.cat([z[i] - z[j], c[i] - c[j]]).norm()) > unique_tol for j in kept)
            if q[i] <= slow_tol and far:
                kept.append(i)
        mod = torch.linalg.eigvals(jacobian(z[kept], c[kept])).abs()
    above, below = (mod > 1 + marginal_tol).any(-1), (mod < 1 - marginal_tol).any(-1)
    stability = ["saddle" if a and b else "unstable" if a else "stable"
                 if bool((m < 1 - marginal_tol).all()) else "marginal"
                 for a, b, m in zip(above.tolist(), below.tolist(), mod)]
    return z[kept], q[kept], c[kept], stability


@pytest.mark.parametrize(("check_after", "n_starts", "pulse", "opt_steps"), [
    (50, 384, 0.0, 1000),  # the defaults: every point is reached from several starts
    (None, 128, 0.3, 600),  # no checks: the same result start by start
])
def test_fast_search_finds_the_points_of_the_plain_search(flip_flop_rnn, check_after, n_starts,
                                                         pulse, opt_steps):
    # With a pulse, the second half of the starts hold the input at that constant pulse
    # on channel 0: the fixed points of two maps, told apart by the held slot.
    rnn, starts = flip_flop_rnn
    starts = starts[:n_starts]
    x = torch.zeros(n_starts, 3, dtype=F64)
    x[n_starts // 2:, 0] = pulse
    c = x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0
    want, want_q, want_c, want_stability = reference_search(rnn.weight_hh_l0, c, starts,
                                                            opt_steps=opt_steps)
    res = find_fixed_points(iternn.from_rnn(rnn).map, {"x": x, "h1": starts}, hold=["x"],
                            opt_steps=opt_steps, check_after=check_after)
    got_c = res.states["x"] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0
    assert len(res) == len(want) >= 27
    got, ref = torch.cat([res.points, got_c], -1), torch.cat([want, want_c], -1)
    dist = (got[:, None] - ref[None]).norm(dim=-1)
    match = dist.argmin(-1)
    assert float(dist.min(-1).values.max()) < 1e-9
    assert sorted(match.tolist()) == list(range(len(want)))  # one to one
    assert list(res.stability) == [want_stability[j] for j in match.tolist()]
    assert list(res.kind) == ["fixed" if float(want_q[j]) <= 1e-12 else "slow"
                              for j in match.tolist()]
    if pulse:
        assert "slow" in res.kind  # the pulse leaves slow points: compared as well


def test_converged_starts_stop_costing_work(flip_flop_rnn, monkeypatch):
    """The map is evaluated on far fewer rows when converged starts leave the
    optimisation, and Newton's method (one Jacobian per row) runs on fewer rows than
    there are starts: duplicates of a point found are not polished."""
    from iternn.dynamics import fixed_points as module

    rows = {"map": 0, "jacobian": 0}

    class Counting(module.MapFunction):
        def __call__(self, z):
            rows["map"] += z.shape[0]
            return super().__call__(z)

    jacobians = module._jacobians

    def counting_jacobians(g, z):
        rows["jacobian"] += z.shape[0]
        return jacobians(g, z)

    monkeypatch.setattr(module, "MapFunction", Counting)
    monkeypatch.setattr(module, "_jacobians", counting_jacobians)
    rnn, starts = flip_flop_rnn
    m = iternn.from_rnn(rnn).map
    state = {"x": torch.zeros(3, dtype=F64), "h1": starts}
    results = {}
    for check_after in (50, None):
        rows.update(map=0, jacobian=0)
        results[check_after] = find_fixed_points(m, state, hold=["x"], check_after=check_after)
        results[check_after, "rows"] = dict(rows)
    fast, slow = results[50, "rows"], results[None, "rows"]
    n, steps, polish_steps = starts.shape[0], 1000, 20
    assert slow["map"] >= n * steps  # every start takes every optimiser step
    assert fast["map"] < 0.25 * slow["map"], (fast, slow)
    # Polishing every start would take at least 2 Newton steps (Jacobians) per start, and
    # up to polish_steps: 20 n when a step still decreases q somewhere.
    assert slow["jacobian"] < 2 * n, slow
    assert fast["jacobian"] < n * polish_steps / 4, fast
    same = (results[50].points[:, None] - results[None].points[None]).norm(dim=-1).min(-1)
    assert len(results[50]) == len(results[None]) == 27 and float(same.values.max()) < 1e-9


@pytest.mark.parametrize("check_after", [0, -5, 2.5, True, "50"])
def test_bad_check_after_is_named(check_after):
    m, *_ = tanh_map()
    with pytest.raises(DynamicsError, match="check_after"):
        find_fixed_points(m, {"x": torch.zeros(3, dtype=F64), "h": torch.zeros(4, 6, dtype=F64)},
                          hold=["x"], check_after=check_after)
