"""Maps whose blocks mix positions (attention) in the tools that take every leading index
of the state as a state of its own.

Such a tool refuses a map with a block into a free slot that is known to mix positions
(it holds a module with a ``batch_first`` flag), before the map is called, naming the
block and pointing to ``positions=True``. Tools that run the map on the caller's state as
it is (the impulse response) keep working. The positions=True numbers themselves are
checked against brute-force Jacobians in tests/test_propagation.py.
"""

import pytest
import torch
from test_propagation import (
    Attend,
    D,
    encoder_layer,
    encoder_map,
    recurrent_map,
    reference_jacobian,
    sequence,
)
from torch import nn

import iternn
from iternn.convert.transformer import EncoderLayerBlock
from iternn.dynamics import (
    DEQ,
    DynamicsError,
    analyze,
    eigenvalues,
    feed_inputs,
    find_fixed_points,
    fixed_point,
    impulse_response,
    input_memory,
    jacobian,
    largest_lyapunov,
    lyapunov_spectrum,
    singular_values,
    spectral_radius,
)
from iternn.dynamics.report import REPORT_NAME

# vmap runs torch's attention backward sample by sample (the reference's vectorize=True).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

F64 = torch.float64
T = 3


class FlaggedAttend(Attend):
    """The multi-source attention block, saying where its positions are: ``(B, T, d)``."""

    batch_first = True


def flagged_map():
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": D, "h": D})
    m.connect("h", "x", nn.Linear(D, D))
    m.connect("h", ("h", "h"), FlaggedAttend(D))
    m.set_activation("h", nn.Tanh())
    return m.double().eval()


#: name -> (map, held slots, leading dims of the state, the blocks the refusal names).
MAPS = {
    "transformer layer, batch-first": (lambda: recurrent_map(True), ("x",), (2, T),
                                       ["block 'h' <- 'h'"]),
    "transformer layer, sequence-first": (lambda: recurrent_map(False), ("x",), (T, 2),
                                          ["block 'h' <- 'h'"]),
    "converted encoder, nothing held": (lambda: encoder_map(False).map, (), (T, 2),
                                        ["block 'l1' <- 'x'", "block 'l2' <- 'l1'"]),
    "custom attention with batch_first": (flagged_map, ("x",), (2, T),
                                          ["block 'h' <- ('h', 'h')"]),
    "one unbatched sequence": (lambda: recurrent_map(True), ("x",), (T,), ["block 'h' <- 'h'"]),
    "one position, no leading dim": (lambda: recurrent_map(True), ("x",), (),
                                     ["block 'h' <- 'h'"]),
}


def _starts(m, state):
    return {s: v.reshape(-1, *m.shapes[s]) for s, v in state.items()}


def _inputs(state):
    return state["x"].unsqueeze(0).expand(2, *state["x"].shape)


def _last(m):
    return list(m.slots)[-1]


#: name -> a call of the tool on (map, state, held slots).
TOOLS = {
    "jacobian": lambda m, s, h: jacobian(m, s, hold=h),
    "eigenvalues": lambda m, s, h: eigenvalues(m, s, hold=h),
    "singular_values": lambda m, s, h: singular_values(m, s, hold=h),
    "spectral_radius": lambda m, s, h: spectral_radius(m, s, hold=h),
    "lyapunov_spectrum": lambda m, s, h: lyapunov_spectrum(m, s, steps=2, hold=h),
    "largest_lyapunov": lambda m, s, h: largest_lyapunov(m, s, steps=2, hold=h),
    "fixed_point": lambda m, s, h: fixed_point(m, s, hold=h),
    "find_fixed_points": lambda m, s, h: find_fixed_points(m, _starts(m, s), hold=h),
    "DEQ": lambda m, s, h: DEQ(m, input="x", output=_last(m)),
    "input_memory": lambda m, s, h: input_memory(m, _inputs(s), applications=1,
                                                 output=_last(m)),
}

#: What each tool's message says it would do with the state, and what to do instead.
SAYS = {
    "jacobian": ("jacobian with positions=False", "pass positions=True"),
    "eigenvalues": ("eigenvalues with positions=False", "pass positions=True"),
    "singular_values": ("singular_values with positions=False", "pass positions=True"),
    "spectral_radius": ("spectral_radius with positions=False", "pass positions=True"),
    "lyapunov_spectrum": ("the Lyapunov exponents with positions=False", "pass positions=True"),
    "largest_lyapunov": ("the Lyapunov exponents with positions=False", "pass positions=True"),
    "fixed_point": ("fixed_point", "fixed_point has no positions=True"),
    "find_fixed_points": ("find_fixed_points", "find_fixed_points has no positions=True"),
    "DEQ": ("DEQ", "DEQ has no positions=True"),
    "input_memory": ("input_memory", "input_memory has no positions=True"),
}


@pytest.mark.parametrize("case", list(MAPS))
@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_map_that_mixes_positions_is_refused_before_it_is_called(tool, case):
    make, hold, lead, blocks = MAPS[case]
    m = make()
    state = sequence(m, lead)
    calls = []
    for module in m.modules():
        module.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
    with pytest.raises(DynamicsError) as err:
        TOOLS[tool](m, state, hold)
    msg = str(err.value)
    what, remedy = SAYS[tool]
    assert msg.startswith(f"{what} treats every leading index of the state as a state of "
                          "its own, but ")
    for block in blocks:  # every block into a free slot that mixes positions, by name
        assert block in msg
    assert "mixes the positions" in msg if len(blocks) == 1 else " mix the positions" in msg
    assert remedy in msg and "positions=True" in msg
    assert calls == []  # refused before the map ran


@pytest.mark.parametrize("case", ["transformer layer, batch-first",
                                  "transformer layer, sequence-first", "one unbatched sequence"])
@pytest.mark.parametrize("held", [False, True])
def test_feed_inputs_without_carry_runs_an_attention_map_one_input_at_a_time(case, held):
    """Reset before every input, each input's sequence is a run of its own: the same as
    iterate from z0 with that input, whatever the layout (side by side as a batch, the
    sequences would be read as positions of one)."""
    make, _, lead, _ = MAPS[case]
    m = make()
    if held:
        m.connect("x", "x", nn.Identity())
    state = sequence(m, lead, seed=3)
    inputs = torch.stack([state["x"], sequence(m, lead, seed=4)["x"]])
    z0 = {"h": state["h"]}
    got = feed_inputs(m, inputs, applications=2, carry=False, held=held, state=z0)
    for t in range(2):
        want = iternn.iterate(m, {**z0, "x": inputs[t]}, 2, hold=() if held else ("x",))
        for s in m.slots:
            torch.testing.assert_close(got[s][t], want[s], rtol=1e-12, atol=1e-14)


def test_only_the_blocks_into_free_slots_count():
    """Attention into a held (or forced) slot is never evaluated: positions=False is each
    position's own Jacobian, by autograd through one application at that position."""
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": D, "a": D, "h": D})
    m.connect("a", "x", EncoderLayerBlock(encoder_layer(True)))
    m.connect("h", "a", nn.Linear(D, D))
    m.connect("h", "h", nn.Linear(D, D))
    m.set_activation("h", nn.Tanh())
    m = m.double().eval()
    state = sequence(m, (2, T))
    jac = jacobian(m, state, hold=("x", "a"))
    assert jac.shape == (2, T, D, D)
    for b in range(2):
        for t in range(T):
            one = {s: v[b, t] for s, v in state.items()}
            want = torch.autograd.functional.jacobian(
                lambda h, one=one: iternn.iterate(m, {**one, "h": h}, 1, hold=("x", "a"))["h"],
                one["h"])
            torch.testing.assert_close(jac[b, t], want, rtol=1e-12, atol=1e-14)
    # Forced, too: all D exponents of a position sum to the mean log |det J_t| along its
    # trajectory, J_t its own Jacobian (a held at its forced value for that application).
    steps = 2
    forced = sequence(m, (steps, 2, T), seed=7)["a"]  # (steps, B, T, d)
    spec = lyapunov_spectrum(m, {"x": state["x"], "h": state["h"]}, steps=steps, hold="x",
                             force={"a": forced})
    assert spec.shape == (2, T, D)
    for b in range(2):
        for t in range(T):
            h, logdet = state["h"][b, t], 0.0
            for k in range(steps):
                one = {"x": state["x"][b, t], "a": forced[k, b, t]}

                def step(h, one=one):
                    return iternn.iterate(m, {**one, "h": h}, 1, hold=("x", "a"))["h"]

                logdet += float(torch.linalg.slogdet(
                    torch.autograd.functional.jacobian(step, h)).logabsdet)
                h = step(h).detach()
            torch.testing.assert_close(float(spec[b, t].sum()), logdet / steps, rtol=1e-9,
                                       atol=1e-9)
    # Free, the attention block is refused, and it is the only one named.
    with pytest.raises(DynamicsError, match=r"but block 'a' <- 'x' mixes the positions") as err:
        jacobian(m, state, hold="x")
    assert "'h' <-" not in str(err.value)


def test_the_impulse_response_of_an_attention_map_is_the_whole_sequences_response():
    """impulse_response runs the map on the state as given: the response of every batch
    element's whole sequence, ||J^(t) δ|| with the cross-position terms (the reference:
    brute-force Jacobians of t applications, one sequence at a time)."""
    m = recurrent_map(True, seed=2)
    state = sequence(m, (2, T), seed=3)
    g = torch.Generator().manual_seed(4)
    direction = {"h": torch.randn(2, T, D, generator=g, dtype=F64)}
    eps, steps = 1e-7, 3
    res = impulse_response(m, state, steps=steps, hold="x", mode="difference",
                           direction=direction, eps=eps)
    for t in range(1, steps + 1):
        moved = [reference_jacobian(m, state, t, hold=("x",), element=b)
                 @ (eps * direction["h"][b].reshape(-1)) for b in range(2)]
        want = torch.linalg.vector_norm(torch.cat(moved))
        torch.testing.assert_close(res.norm[t], want, rtol=1e-5, atol=0)


def test_analyze_takes_the_state_of_an_attention_map_as_one_sequence(tmp_path):
    """The report's spectra and exponents are positions=True's at its one-position state;
    the fixed point is solved there, and the search says why it is skipped."""
    m = recurrent_map(True, seed=5)
    state = {s: v.unsqueeze(0) for s, v in sequence(m, (), seed=6).items()}  # (1, d)
    out = analyze(m, tmp_path / "r", state=state, quick=True, pictures=False)
    text = (out / REPORT_NAME).read_text()
    radius = float(spectral_radius(m, state, hold="x", positions=True,
                                   generator=torch.Generator().manual_seed(2)))
    eig = eigenvalues(m, state, hold="x", positions=True)
    assert f"Spectral radius (Krylov, Jacobian-vector products): {radius:.6g}" in text
    assert f"Largest |eigenvalue| (dense): {float(eig.abs()[0]):.6g}" in text
    spec = lyapunov_spectrum(m, state, steps=100, warmup=25, k=3, hold="x", positions=True,
                             generator=torch.Generator().manual_seed(5))
    assert f"Largest Lyapunov exponent: {float(spec[0]):.6g} — " in text
    assert "Solve from the state (Anderson): converged yes" in text
    assert ("Search from several starts: skipped (the map's blocks into the free slots mix "
            "positions") in text
    assert "DynamicsError" not in text and "positions=True" not in text  # nothing to pass


def test_fixed_point_solves_one_position_of_an_attention_map():
    """A state of one position, (1, d): one problem for the solver, nothing to mix."""
    m = recurrent_map(True, seed=5)
    state = {s: v.unsqueeze(0) for s, v in sequence(m, (), seed=6).items()}
    star, info = fixed_point(m, state, hold="x", tol=1e-12)
    assert info.converged and star["h"].shape == (1, D)
    again = iternn.iterate(m, star, 1, hold="x")
    torch.testing.assert_close(again["h"], star["h"], rtol=0, atol=1e-11)
    with torch.no_grad():  # the trajectory from the state goes there
        far = iternn.iterate(m, state, 400, hold="x")
    torch.testing.assert_close(far["h"], star["h"], rtol=0, atol=1e-9)
