"""Memory across inputs: input_memory against autograd on a hand-written loop, the
derived lags of the feed-forward map, recurrent memory, held versus forced input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import iternn
from iternn.dynamics.memory import feed_inputs, input_memory
from iternn.errors import DynamicsError

F64 = torch.float64


def mlp(layers: int, n_x: int = 3, width: int = 4, n_y: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [n_x] + [width] * (layers - 1) + [n_y]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < layers - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).double()


def inputs(T: int, batch=(2,), n_x: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, *batch, n_x, generator=g, dtype=F64)


def loop_outputs(seq: nn.Sequential, xs: torch.Tensor, k: int, carry: bool) -> torch.Tensor:
    """The reference: y_t of the MLP's layers updated Jacobi-style (every layer reads the
    previous application's state), written with plain torch ops, not the engine."""
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    T, B = xs.shape[0], xs.shape[1]
    zeros = [xs.new_zeros(B, lin.out_features) for lin in linears]
    state, ys = list(zeros), []
    for t in range(T):
        if not carry:
            state = list(zeros)
        for _ in range(k):
            prev = [xs[t], *state]
            state = [lin(prev[i]) for i, lin in enumerate(linears)]
            state = [torch.tanh(s) if i < len(linears) - 1 else s for i, s in enumerate(state)]
        ys.append(state[-1])
    return torch.stack(ys)


def reference_memory(fn, xs: torch.Tensor) -> torch.Tensor:
    """Mean over t >= j and the batch of ||dy_t/dx_{t-j}||_F, from the full Jacobian."""
    T, B = xs.shape[0], xs.shape[1]
    jac = torch.autograd.functional.jacobian(fn, xs)  # (T, B, n_y, T, B, n_x)
    out = []
    for j in range(T):
        norms = [torch.linalg.norm(jac[t, b, :, t - j, b, :]) for t in range(j, T) for b in range(B)]
        out.append(torch.stack(norms).mean())
    return torch.stack(out)


@pytest.mark.parametrize("layers,k", [(3, 2), (4, 2), (3, 1), (4, 1), (3, 3), (2, 5)])
@pytest.mark.parametrize("carry", [True, False])
def test_memory_equals_autograd_of_a_hand_written_loop(layers, k, carry):
    seq = mlp(layers)
    xs = inputs(6)
    got = input_memory(iternn.from_mlp(seq), xs, applications=k, carry=carry)
    want = reference_memory(lambda v: loop_outputs(seq, v, k, carry), xs)
    assert got.dtype == F64 and got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # and the values the memory is taken of are the loop's
    ys = feed_inputs(iternn.from_mlp(seq), xs, applications=k, carry=carry)["y"]
    torch.testing.assert_close(ys, loop_outputs(seq, xs, k, carry), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layers", [3, 4])
def test_k_below_depth_puts_the_memory_at_the_derived_lag(layers):
    # L = j k + r with 1 <= r <= k: L = 3 and 4 with k = 2 both give j* = 1
    net = iternn.from_mlp(mlp(layers))
    mem = input_memory(net, inputs(6), applications=2)
    assert torch.nonzero(mem).flatten().tolist() == [math.ceil(layers / 2) - 1] == [1]


@given(layers=st.integers(1, 4), k=st.integers(1, 5), carry=st.booleans(), extra=st.integers(0, 2))
def test_feed_forward_memory_sits_exactly_where_derived(layers, k, carry, extra):
    carry = carry and layers > 1  # a one-layer map has nothing to carry
    T = layers + extra
    mem = input_memory(iternn.from_mlp(mlp(layers)), inputs(T), applications=k, carry=carry)
    if carry:
        want = [math.ceil(layers / k) - 1]  # k = 1: L - 1 (delay line); k >= L: 0 (MLP)
    else:
        want = [0] if k >= layers else []  # reset: y_t sees x_t only, and only after L
    assert torch.nonzero(mem).flatten().tolist() == want
    assert torch.all(mem[want] > 0)


def test_delay_line_output_is_the_mlp_of_an_older_input():
    layers = 3
    seq = mlp(layers)
    xs = inputs(7)
    ys = feed_inputs(iternn.from_mlp(seq), xs, applications=1)["y"]
    with torch.no_grad():
        torch.testing.assert_close(ys[layers - 1:], seq(xs[: 7 - layers + 1]), rtol=1e-12, atol=1e-14)


def linear_rnn_map(c: float) -> iternn.BlockMap:
    """x(3) -> h(4) with h <- c I h, y(2) <- h; identity activations."""
    torch.manual_seed(3)
    m = iternn.BlockMap({"x": 3, "h": 4, "y": 2}).double()
    m.connect("h", "x", nn.Linear(3, 4, bias=False, dtype=F64))
    hh = nn.Linear(4, 4, bias=False, dtype=F64)
    hh.weight.data.copy_(c * torch.eye(4, dtype=F64))
    m.connect("h", "h", hh)
    m.connect("y", "h", nn.Linear(4, 2, bias=False, dtype=F64))
    return m


def test_recurrent_memory_at_every_lag_decays_as_derived():
    # y_t = C h^{2t+1}, h^n = c h^{n-1} + A x(n): with k = 2, dy_t/dx_{t-j} = C A for j = 0
    # and C A (c^{2j-1} + c^{2j}) for j >= 1 (x_{t-j} is read at applications 2(t-j)+1, +2)
    c = 0.5
    m = linear_rnn_map(c)
    xs = inputs(6)
    mem = input_memory(m, xs, applications=2)
    ca = torch.linalg.norm(m.block("y", "h").weight @ m.block("h", "x").weight)
    want = torch.stack([ca] + [ca * (c ** (2 * j - 1) + c ** (2 * j)) for j in range(1, 6)])
    torch.testing.assert_close(mem, want, rtol=1e-12, atol=0)
    assert torch.all(mem > 0) and torch.all(mem[1:] < mem[:-1])


def test_nonlinear_contraction_has_decaying_memory_at_every_lag():
    m = linear_rnn_map(0.5)
    m.set_activation("h", nn.Tanh())
    mem = input_memory(m, inputs(7), applications=2)
    assert torch.all(mem > 0) and torch.all(mem[1:] < mem[:-1])
    assert mem[-1] < 1e-3 * mem[0]


def test_forward_and_reverse_mode_agree():
    net = iternn.from_mlp(mlp(2, n_x=2, n_y=5))  # |x| < |y|
    xs = inputs(4, n_x=2)
    fwd = input_memory(net, xs, applications=1, mode="forward")
    rev = input_memory(net, xs, applications=1, mode="reverse")
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=0)
    assert fwd[1] > 0 and fwd[0] == 0 and torch.all(fwd[2:] == 0)


def test_batched_memory_is_the_mean_over_batch_elements():
    net = iternn.from_mlp(mlp(3))
    xs = inputs(5, batch=(2, 3))
    whole = input_memory(net, xs, applications=1, carry=True, state={"h1": torch.ones(4, dtype=F64)})
    each = torch.stack([input_memory(net, xs[:, i, j], applications=1, carry=True,
                                     state={"h1": torch.ones(4, dtype=F64)})
                        for i in range(2) for j in range(3)])
    torch.testing.assert_close(whole, each.mean(0), rtol=1e-12, atol=0)


def test_input_memory_leaves_parameter_gradients_alone():
    net = iternn.from_mlp(mlp(2))
    input_memory(net, inputs(3), applications=1)
    assert all(p.grad is None for p in net.parameters())


def test_lags_truncates_the_profile():
    net = iternn.from_mlp(mlp(3))
    xs = inputs(6)
    full = input_memory(net, xs, applications=1)
    torch.testing.assert_close(input_memory(net, xs, applications=1, lags=3), full[:3],
                               rtol=0, atol=0)


# ---------------------------------------------------------------------- held vs forced


def held_map(feedback: float) -> iternn.BlockMap:
    m = iternn.from_mlp(mlp(2)).map
    m.connect("x", "x", nn.Identity())
    if feedback:
        back = nn.Linear(4, 3, bias=False, dtype=F64)
        back.weight.data.mul_(feedback)
        m.connect("x", "h1", back)
    return m


@pytest.mark.parametrize("carry", [True, False])
def test_held_equals_forced_without_feedback_into_the_input(carry):
    m = held_map(0.0)
    xs = inputs(5)
    held = feed_inputs(m, xs, applications=3, carry=carry, held=True)
    forced = feed_inputs(m, xs, applications=3, carry=carry, held=False)
    for s in m.slots:
        torch.testing.assert_close(held[s], forced[s], rtol=0, atol=0)


def test_held_input_accumulates_its_feedback_as_the_loop_says():
    m = held_map(0.7)
    xs = inputs(4)
    k = 3
    w1, b1 = m.block("h1", "x").weight, m.bias("h1")
    w2, b2 = m.block("y", "h1").weight, m.bias("y")
    v = m.block("x", "h1").weight
    x, h, y, want = xs[0] * 0, xs.new_zeros(2, 4), xs.new_zeros(2, 2), []
    for t in range(4):
        x = xs[t]  # written once per input
        for _ in range(k):  # x <- x + V h1 (identity block plus feedback), Jacobi
            x, h, y = x + h @ v.T, torch.tanh(x @ w1.T + b1), h @ w2.T + b2
        want.append(y)
    got = feed_inputs(m, xs, applications=k, held=True)["y"]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-14)
    forced = feed_inputs(m, xs, applications=k, held=False)["y"]
    assert not torch.allclose(got, forced)  # forcing discards the feedback into x
    mem = input_memory(m, xs, applications=k, held=True)
    assert torch.all(mem > 0)  # the feedback through x reaches every older input


# ---------------------------------------------------------------------- bad input


@pytest.fixture
def net():
    return iternn.from_mlp(mlp(2))


@pytest.mark.parametrize("lags", [0, -1])
def test_lags_below_one(net, lags):
    with pytest.raises(DynamicsError, match="lags must be an int >= 1"):
        input_memory(net, inputs(3), applications=1, lags=lags)


def test_lags_beyond_the_inputs(net):
    with pytest.raises(DynamicsError, match="lags must be <= the number of inputs T = 3"):
        input_memory(net, inputs(3), applications=1, lags=4)


@pytest.mark.parametrize("applications", [0, 1.5, True])
def test_applications_not_a_positive_int(net, applications):
    with pytest.raises(DynamicsError, match="applications must be an int >= 1"):
        input_memory(net, inputs(3), applications=applications)


def test_unknown_input_slot(net):
    with pytest.raises(DynamicsError, match="input slot 'u' is not a slot of the map"):
        input_memory(net, inputs(3), applications=1, input="u")


def test_unknown_output_slot(net):
    with pytest.raises(DynamicsError, match="output slot 'z' is not a slot of the map"):
        input_memory(net, inputs(3), applications=1, output="z")


def test_output_is_the_input(net):
    with pytest.raises(DynamicsError, match="output slot 'x' is the input slot"):
        input_memory(net, inputs(3), applications=1, output="x")


def test_nothing_to_carry():
    one_layer = iternn.from_mlp(mlp(1))  # y <- x only: no slot but x is ever read
    with pytest.raises(DynamicsError, match="no state to carry"):
        input_memory(one_layer, inputs(3), applications=1, carry=True)
    assert input_memory(one_layer, inputs(3), applications=1, carry=False)[0] > 0


def test_carry_not_a_bool(net):
    with pytest.raises(DynamicsError, match="carry must be True or False"):
        input_memory(net, inputs(3), applications=1, carry=1)


def test_held_without_the_identity_block(net):
    with pytest.raises(DynamicsError, match=r"held=True needs a block 'x' <- 'x'"):
        input_memory(net, inputs(3), applications=1, held=True)


def test_inputs_of_the_wrong_shape(net):
    with pytest.raises(DynamicsError, match=r"inputs must have shape \(T, \*batch, 3\)"):
        input_memory(net, torch.zeros(3, 2, 4, dtype=F64), applications=1)


def test_inputs_not_floating(net):
    with pytest.raises(DynamicsError, match="inputs must be a floating tensor"):
        input_memory(net, torch.zeros(3, 2, 3, dtype=torch.int64), applications=1)


def test_no_inputs(net):
    with pytest.raises(DynamicsError, match="T = 0"):
        input_memory(net, torch.zeros(0, 2, 3, dtype=F64), applications=1)


def test_inputs_with_nan(net):
    xs = inputs(3)
    xs[1, 0, 2] = float("nan")
    with pytest.raises(DynamicsError, match="inputs of slot 'x' contains NaN"):
        input_memory(net, xs, applications=1)


def test_state_naming_an_unknown_slot(net):
    with pytest.raises(DynamicsError, match="state names unknown slot 'q'"):
        input_memory(net, inputs(3), applications=1, state={"q": torch.zeros(4, dtype=F64)})


def test_state_giving_the_input_slot(net):
    with pytest.raises(DynamicsError, match="state gives the input slot 'x'"):
        input_memory(net, inputs(3), applications=1, state={"x": torch.zeros(3, dtype=F64)})


def test_state_of_the_wrong_shape(net):
    with pytest.raises(DynamicsError, match=r"slot 'h1' of the state must have shape \(4,\)"):
        input_memory(net, inputs(3), applications=1, state={"h1": torch.zeros(5, dtype=F64)})


def test_unknown_mode(net):
    with pytest.raises(DynamicsError, match="mode must be one of"):
        input_memory(net, inputs(3), applications=1, mode="auto")


def test_a_widened_batch_too_large_for_memory(net, monkeypatch):
    monkeypatch.setattr("iternn.core.memory.available_bytes", lambda device=None: 1 << 20)
    xs = torch.zeros(20, 800, 3, dtype=F64)  # 40 copies of 800 sequences: about 18 MB
    with pytest.raises(iternn.SizeError, match="input_memory's widened batch \\(40 copies"):
        input_memory(net, xs, applications=1)


def test_inputs_of_another_dtype_than_the_map(net):
    with pytest.raises(DynamicsError, match="dtype"):
        input_memory(net, inputs(3).float(), applications=1)
