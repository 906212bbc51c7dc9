"""Equilibrium mode: DEQ forward = fixed point, implicit and phantom gradients, memory."""

import pytest
import torch
from torch import nn

import iternn
from iternn.dynamics.deq import DEQ, Implicit, ImplicitFixedPoint, Phantom
from iternn.dynamics.fixed_points import fixed_point
from iternn.dynamics.functional import DynamicsError
from iternn.dynamics.solvers import Anderson, ConvergenceError, Picard, SolverInfo

F64 = torch.float64


def contractive_map(n_x=3, n_h=5, n_y=2, radius=0.5, seed=1):
    """x (held) -> h (tanh, recurrent, ||W_hh|| = radius) -> y (affine readout)."""
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap({"x": n_x, "h": n_h, "y": n_y})
    for dst, src, bias in (("h", "x", False), ("h", "h", False), ("y", "h", True)):
        lin = nn.Linear(m.slots[src], m.slots[dst], bias=bias).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=F64))
            if bias:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=F64))
        m.connect(dst, src, lin)
    with torch.no_grad():
        w = m.block("h", "h").weight
        w.mul_(radius / torch.linalg.matrix_norm(w, 2))
    m.set_activation("h", nn.Tanh())
    m.set_bias("h", torch.randn(n_h, generator=g, dtype=F64))
    return m.double()


def _loss(y):
    return (y.pow(2) * torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)).sum()


def _grads(m, x, y):
    params = list(m.parameters())
    return torch.autograd.grad(_loss(y), [x, *params])


def _node_names(t: torch.Tensor) -> list[str]:
    """Names of every node of ``t``'s autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return [type(n).__name__ for n in seen]


def test_forward_is_the_fixed_point():
    m = contractive_map()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    deq = DEQ(m, tol=1e-12)
    y = deq(x)
    star, _ = fixed_point(m, {"x": x}, hold=["x"], tol=1e-12)
    assert torch.allclose(y, star["y"], atol=1e-11, rtol=0)
    assert isinstance(deq.info, SolverInfo) and deq.info.converged and deq.info.steps > 2
    whole = DEQ(m, output=None, tol=1e-12)(x)
    assert set(whole) == {"x", "h", "y"} and torch.allclose(whole["h"], star["h"], atol=1e-11)
    with torch.no_grad():
        assert deq(x).grad_fn is None


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_implicit_gradients_match_unrolled(solver):
    m = contractive_map()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    # Reference: differentiate through 200 Jacobi applications (||W|| = 0.5: exact to 1e-60).
    y_ref = iternn.iterate(m, {"x": x}, 200, hold=["x"])["y"]
    want = _grads(m, x, y_ref)
    deq = DEQ(m, solver=solver, tol=1e-12, max_steps=300)
    y = deq(x)
    assert "ImplicitFixedPointBackward" in _node_names(y)
    got = _grads(m, x, y)
    assert torch.allclose(y, y_ref, atol=1e-10, rtol=0)
    for name, a, b in zip(["x", *dict(m.named_parameters())], got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (name, (a - b).abs().max())
        assert (a - b).abs().max() < 1e-9  # much better than asked
    assert deq.backward_info.converged and deq.backward_info.solver == solver


def test_gradients_accumulate_into_parameters():
    m = contractive_map()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    deq = DEQ(m, tol=1e-12)
    _loss(deq(x)).backward()
    implicit = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    _loss(iternn.iterate(m, {"x": x}, 200, hold=["x"])["y"]).backward()
    for k, p in m.named_parameters():
        assert torch.allclose(implicit[k], p.grad, atol=1e-9, rtol=0), k
    # Frozen parameters get no gradient and are not asked for one.
    m.zero_grad()
    m.block("h", "x").weight.requires_grad_(False)
    _loss(deq(x)).backward()
    assert m.block("h", "x").weight.grad is None
    assert m.block("h", "h").weight.grad is not None


def test_phantom_gradients_approximate_implicit():
    m = contractive_map()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    exact = _grads(m, x, DEQ(m, tol=1e-12)(x))
    scale = max(float(g.abs().max()) for g in exact)
    errors = {}
    for k in (1, 3, 10, 25):
        deq = DEQ(m, tol=1e-12, backward=Phantom(steps=k))
        got = _grads(m, x, deq(x))
        errors[k] = max(float((a - b).abs().max()) for a, b in zip(got, exact)) / scale
    assert errors[1] > errors[3] > errors[10] > errors[25]
    assert errors[1] > 1e-3 and errors[10] < 1e-3 and errors[25] < 1e-6, errors
    # Damped phantom steps converge more slowly but still approximate.
    damped = _grads(m, x, DEQ(m, tol=1e-12, backward=Phantom(steps=25, damping=0.7))(x))
    err_d = max(float((a - b).abs().max()) for a, b in zip(damped, exact)) / scale
    assert errors[25] < err_d < 1e-2


def test_gradcheck_implicit_function():
    m = contractive_map(n_x=2, n_h=3, n_y=1, radius=0.3, seed=4)
    deq = DEQ(m, solver=Anderson(m=3), tol=1e-13, max_steps=200)
    params = list(m.parameters())
    x = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(6), requires_grad=True)

    def fn(x, *ps):  # ps are the map's own parameters: gradcheck perturbs them in place
        z0 = x.new_zeros(2, 4)
        return ImplicitFixedPoint.apply(deq, z0, x, *ps)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def _graph_size(t: torch.Tensor) -> int:
    return len(_node_names(t))


def _count_saved(fn) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


def test_memory_does_not_grow_with_solver_steps():
    m = contractive_map(radius=0.9)
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    sizes, saved, steps = [], [], []
    for max_steps in (5, 60):
        # tol far below reach: every forward and adjoint solve runs all max_steps.
        deq = DEQ(m, solver="picard", tol=1e-300, max_steps=max_steps)
        out = {}

        def run(deq=deq, out=out):
            out["y"] = deq(x)
            _loss(out["y"]).backward()

        saved.append(_count_saved(run))
        sizes.append(_graph_size(out["y"]))
        steps.append((deq.info.steps, deq.backward_info.steps))
    assert steps == [(5, 5), (60, 60)]
    assert sizes[0] == sizes[1] and saved[0] == saved[1], (sizes, saved)
    # The same measures do see unrolled differentiation grow (the test can fail).
    unrolled = [_count_saved(lambda k=k: _loss(iternn.iterate(m, {"x": x}, k, hold=["x"])["y"])
                             .backward()) for k in (5, 60)]
    assert unrolled[1] > unrolled[0] + 50 > saved[1]
    # Phantom gradients: memory set by Phantom(steps=...), not max_steps.
    ph = [_count_saved(lambda k=k: _loss(DEQ(m, solver="picard", tol=1e-300, max_steps=k,
                                             backward=Phantom(steps=3))(x)).backward())
          for k in (5, 60)]
    assert ph[0] == ph[1]


def test_non_convergence_reported_and_raised():
    m = contractive_map(radius=0.9)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(8))
    deq = DEQ(m, solver="picard", tol=1e-12, max_steps=2)
    deq(x)
    assert not deq.info.converged and deq.info.steps == 2
    strict = DEQ(m, solver="picard", tol=1e-12, max_steps=2, raise_on_failure=True)
    with pytest.raises(ConvergenceError, match="did not converge"):
        strict(x)


# ------------------------------------------------------------------ bad input
def test_unknown_solver_is_named():
    m = contractive_map()
    with pytest.raises(DynamicsError, match=r"unknown solver 'fast'.*broyden"):
        DEQ(m, solver="fast")
    with pytest.raises(DynamicsError, match=r"unknown Implicit solver 'fast'"):
        DEQ(m, backward=Implicit(solver="fast"))


def test_nan_input_is_named():
    m = contractive_map()
    x = torch.zeros(2, 3, dtype=F64)
    x[0, 1] = float("nan")
    with pytest.raises(DynamicsError, match="'x'.*NaN"):
        DEQ(m)(x)


def test_nothing_free_to_solve():
    m = iternn.BlockMap({"x": 3})
    with pytest.raises(DynamicsError, match="nothing to solve"):
        DEQ(m, output=None)


@pytest.mark.parametrize("option", [{"tol": 0.0}, {"tol": -1.0}, {"tol": float("nan")},
                                    {"max_steps": -1}, {"backward": "adjoint"},
                                    {"update": "gauss"}, {"stop_mode": "max"},
                                    {"solver": Picard}])
def test_bad_options_are_named(option):
    m = contractive_map()
    name = next(iter(option))
    with pytest.raises(DynamicsError, match=name):
        DEQ(m, **option)


@pytest.mark.parametrize(("make", "name"), [
    (lambda: Phantom(steps=0), "Phantom steps"),
    (lambda: Phantom(damping=0.0), "Phantom damping"),
    (lambda: Implicit(tol=float("inf")), "Implicit tol"),
    (lambda: Implicit(max_steps=-2), "Implicit max_steps"),
])
def test_bad_backward_options_are_named_when_made(make, name):
    with pytest.raises(DynamicsError, match=name):
        make()


def test_backward_objects_are_frozen_and_map_is_positional():
    with pytest.raises(AttributeError):
        Phantom().steps = 3  # type: ignore[misc]
    m = contractive_map()
    with pytest.raises(TypeError):
        DEQ(m=m)  # type: ignore[call-arg]
    deq = DEQ(m, backward=Phantom(steps=2, damping=0.5))
    assert "Phantom(steps=2, damping=0.5)" in repr(deq)


def test_implicit_backward_uses_its_own_solver_settings():
    m = contractive_map(radius=0.9)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    deq = DEQ(m, solver=Anderson(m=4), tol=1e-12, max_steps=100,
              backward=Implicit(solver=Picard(damping=0.9), tol=1e-300, max_steps=7))
    _loss(deq(x)).backward()
    assert deq.info.solver == "anderson" and deq.info.converged
    assert deq.backward_info.solver == "picard" and deq.backward_info.steps == 7
    # Default: the adjoint is solved like the forward (same solver, tol, max_steps).
    same = DEQ(m, solver=Picard(), tol=1e-300, max_steps=9)
    _loss(same(x)).backward()
    assert same.backward_info.solver == "picard" and same.backward_info.steps == 9


def test_bad_slots_and_shapes_are_named():
    m = contractive_map()
    with pytest.raises(DynamicsError, match="'u'"):
        DEQ(m, input="u")
    with pytest.raises(DynamicsError, match="shape"):
        DEQ(m)(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(DynamicsError, match="z0"):
        DEQ(m)(torch.zeros(2, 3, dtype=F64), z0=torch.zeros(2, 3, dtype=F64))
