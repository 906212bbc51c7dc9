"""Attention across positions: ``positions=True`` in the dynamics tools and
``iternn.dynamics.propagation`` (how a perturbation at one position reaches the others).

Every exact claim is checked in float64 against a brute-force reference: the Jacobian of
``steps`` applications of ``iternn.iterate`` over one whole sequence, by
``torch.autograd.functional.jacobian``, its position blocks summed by hand.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iternn
from iternn.convert.transformer import EncoderLayerBlock
from iternn.dynamics import (
    DynamicsError,
    eigenvalues,
    jacobian,
    lyapunov_spectrum,
    singular_values,
    spectral_radius,
)
from iternn.dynamics.plots import plot_propagation
from iternn.dynamics.propagation import propagation

pytest.importorskip("matplotlib")

D, HEADS, FF = 8, 2, 16
# vmap runs torch's attention backward sample by sample (the reference's vectorize=True).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


# ---------------------------------------------------------------------------- maps
def encoder_layer(batch_first):
    return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first)


def encoder_map(batch_first, layers=2, seed=0):
    """A converted ``nn.TransformerEncoder``: x -> l1 -> l2 (acyclic, depth ``layers``)."""
    torch.manual_seed(seed)
    enc = nn.TransformerEncoder(encoder_layer(batch_first), layers, enable_nested_tensor=False)
    return iternn.from_transformer(enc).double().eval()


def recurrent_map(batch_first, seed=0):
    """x -linear-> h, h -transformer layer-> h: attention iterated (a cycle)."""
    torch.manual_seed(seed)
    m = iternn.BlockMap({"x": D, "h": D})
    m.connect("h", "x", nn.Linear(D, D))
    m.connect("h", "h", EncoderLayerBlock(encoder_layer(batch_first)))
    return m.double().eval()


class Attend(nn.Module):
    """Single-head attention as a multi-source block: queries from the first slot, keys
    and values from the second, softmax over the positions (dim -2); no ``batch_first``."""

    def __init__(self, d, causal=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.causal = causal

    def forward(self, a, b):
        scores = self.q(a) @ self.k(b).transpose(-1, -2) / math.sqrt(a.shape[-1])
        if self.causal:
            t = scores.shape[-1]
            later = torch.ones(t, t, dtype=torch.bool, device=a.device).triu(1)
            scores = scores.masked_fill(later, -math.inf)
        return torch.softmax(scores, dim=-1) @ self.v(b)


def attend_map(causal=False, seed=0):
    """x -linear-> h, (h, h) -attention-> h, tanh on h: a multi-source attention block."""
    torch.manual_seed(seed)
    m = iternn.BlockMap({"x": D, "h": D})
    m.connect("h", "x", nn.Linear(D, D))
    m.connect("h", ("h", "h"), Attend(D, causal))
    m.set_activation("h", nn.Tanh())
    return m.double().eval()


def causal(keys, length):
    mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    return {k: {"mask": mask, "is_causal": True} for k in keys}


def sequence(m, lead, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(*lead, *shape, generator=g, dtype=torch.float64)
            for s, shape in m.shapes.items()}


# ---------------------------------------------------------------------------- references
def reference_jacobian(m, state, steps, *, hold=(), element=None, first=False, kwargs=None):
    """``d z^(steps) / d z^(0)`` of one sequence (batch ``element``; its positions on dim 0
    with ``first``, else just before the slot's shape) by autograd through ``iterate``:
    rows and columns the free slots in slot order, each ``(T, *shape)`` flattened."""
    free = [s for s in m.slots if s not in hold]

    def take(v):
        return v if element is None else (v[:, element] if first else v[element])

    def put(v, part):
        if element is None:
            return part
        v = v.clone()
        if first:
            v[:, element] = part
        else:
            v[element] = part
        return v

    shapes = [take(state[s]).shape for s in free]

    def f(u):
        parts = torch.split(u, [math.prod(sh) for sh in shapes])
        st = dict(state)
        for s, p, sh in zip(free, parts, shapes):
            st[s] = put(state[s], p.reshape(sh))
        out = iternn.iterate(m, st, steps, hold=hold, block_kwargs=kwargs)
        return torch.cat([take(out[s]).reshape(-1) for s in free])

    u0 = torch.cat([take(state[s]).reshape(-1) for s in free])
    return torch.autograd.functional.jacobian(f, u0, vectorize=True)


def reference_norms(jac, m, free, length):
    """``P[j, i]``: the Frobenius norm of the rows of position ``j`` and the columns of
    position ``i`` over every pair of free slots (a slot's position ``t`` is its units
    ``t·n … (t+1)·n − 1``)."""
    off, spans = 0, {}
    for s in free:
        n = m.slots[s]
        for t in range(length):
            spans[s, t] = slice(off + t * n, off + (t + 1) * n)
        off += n * length
    out = torch.zeros(length, length, dtype=torch.float64)
    for j in range(length):
        for i in range(length):
            out[j, i] = math.sqrt(sum(float(jac[spans[a, j], spans[b, i]].square().sum())
                                      for a in free for b in free))
    return out


# ---------------------------------------------------------------------------- propagation
@pytest.mark.parametrize("case", ["encoder, sequence-first", "recurrent, batch-first",
                                  "multi-source attention, unbatched"])
def test_propagation_equals_the_brute_force_jacobian_blocks(case):
    T, steps = 4, 3
    if case.startswith("encoder"):
        m, hold, first, lead = encoder_map(False).map, (), True, (T, 2)  # (T, B, d)
    elif case.startswith("recurrent"):
        m, hold, first, lead = recurrent_map(True), ("x",), False, (2, T)  # (B, T, d)
    else:
        m, hold, first, lead = attend_map(), ("x",), False, (T,)  # one sequence (T, d)
    state = sequence(m, lead)
    prop = propagation(m, state, steps, hold=hold)
    batch = lead[1:] if first else lead[:-1]
    assert prop.shape == (steps, *batch, T, T) and prop.dtype == torch.float64
    free = [s for s in m.slots if s not in hold]
    for b in range(batch[0]) if batch else [None]:
        got = prop[:, b] if batch else prop
        for k in range(1, steps + 1):
            jac = reference_jacobian(m, state, k, hold=hold, element=b, first=first)
            want = reference_norms(jac, m, free, T)
            torch.testing.assert_close(got[k - 1], want, rtol=1e-10, atol=1e-12)
    if case.startswith("encoder"):  # depth 2 with nothing held: exactly 0 from k = 3
        assert bool((prop[2] == 0).all()) and bool((prop[:2] > 0).any())


@settings(max_examples=8)
@given(length=st.integers(1, 5), batch=st.integers(1, 2), seed=st.integers(0, 2**16),
       causal_mask=st.booleans())
def test_propagation_of_random_attention_maps_equals_the_brute_force(length, batch, seed,
                                                                     causal_mask):
    m = attend_map(causal=causal_mask, seed=seed)
    state = sequence(m, (batch, length), seed=seed + 1)
    prop = propagation(m, state, 2, hold="x")
    for b in range(batch):
        for k in (1, 2):
            jac = reference_jacobian(m, state, k, hold=("x",), element=b)
            torch.testing.assert_close(prop[k - 1, b], reference_norms(jac, m, ["h"], length),
                                       rtol=1e-10, atol=1e-12)
    if causal_mask:
        assert bool((prop[..., torch.ones(length, length, dtype=torch.bool).triu(1)] == 0).all())


@pytest.mark.parametrize("kind", ["encoder", "recurrent", "multi-source"])
def test_a_causal_map_never_reaches_an_earlier_position(kind):
    T, steps = 5, 4
    if kind == "encoder":  # from_transformer of a causal encoder: masks as block kwargs
        net = encoder_map(True)
        m, hold, kwargs = net.map, (), causal(net.layer_keys, T)
        live = 2  # the depth: a perturbation of z^(0) is gone after two applications
    elif kind == "recurrent":
        m, hold, live = recurrent_map(True), ("x",), steps
        kwargs = causal(["h<-h"], T)
    else:
        m, hold, live, kwargs = attend_map(causal=True), ("x",), steps, None
    prop = propagation(m, sequence(m, (2, T)), steps, hold=hold, block_kwargs=kwargs)
    later = torch.ones(T, T, dtype=torch.bool).triu(1)  # i > j: column after row
    assert bool((prop[..., later] == 0).all())  # exactly, at every k
    # ... and everything else is reached: position j feels every i <= j.
    assert bool((prop[:live][..., ~later] > 0).all())
    assert bool((prop[live:] == 0).all())


@pytest.mark.parametrize("kind", ["encoder", "recurrent", "multi-source"])
def test_a_non_causal_map_fills_the_matrix_after_one_application(kind):
    T = 5
    m, hold = {"encoder": (encoder_map(True).map, ()), "recurrent": (recurrent_map(True), ("x",)),
               "multi-source": (attend_map(), ("x",))}[kind]
    prop = propagation(m, sequence(m, (2, T)), 1, hold=hold)
    assert prop.shape == (1, 2, T, T) and bool((prop > 0).all())


def test_sequence_first_and_batch_first_layouts_give_the_same_answers():
    T = 4
    a, b = recurrent_map(True), recurrent_map(False)
    b.load_state_dict(a.state_dict())
    sa = sequence(a, (2, T))  # (B, T, d)
    sb = {s: v.transpose(0, 1) for s, v in sa.items()}  # (T, B, d)
    torch.testing.assert_close(propagation(a, sa, 3, hold="x"), propagation(b, sb, 3, hold="x"),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacobian(a, sa, hold="x", positions=True),
                               jacobian(b, sb, hold="x", positions=True), rtol=1e-12, atol=1e-12)


def test_propagation_of_a_transformer_map_module_takes_its_layer_masks():
    """A TransformerMap (a module with .map) is taken as is; an unbatched sequence."""
    T = 4
    net = encoder_map(False, layers=1)
    x = sequence(net.map, (T,))["x"]
    prop = propagation(net, {"x": x}, 1, block_kwargs=causal(net.layer_keys, T))
    assert prop.shape == (1, T, T)
    later = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert bool((prop[0][later] == 0).all()) and bool((prop[0][~later] > 0).all())


# ---------------------------------------------------------------------------- Jacobian tools
@pytest.mark.parametrize("batch_first", [True, False])
def test_jacobian_over_the_sequence_equals_the_brute_force_jacobian(batch_first):
    T = 4
    m = recurrent_map(batch_first)
    lead = (2, T) if batch_first else (T, 2)
    state = sequence(m, lead)
    jac = jacobian(m, state, hold="x", positions=True)
    assert jac.shape == (2, T * D, T * D)
    for b in range(2):
        want = reference_jacobian(m, state, 1, hold=("x",), element=b, first=not batch_first)
        torch.testing.assert_close(jac[b], want, rtol=1e-10, atol=1e-12)
    # The cross-position blocks are there (attention): not block-diagonal.
    off_diagonal = jac[0].reshape(T, D, T, D).square().sum(dim=(1, 3)).sqrt()
    assert bool((off_diagonal > 0).all())
    # One unbatched sequence: a sparse result holds the same matrix.
    one = {s: v[0] if batch_first else v[:, 0] for s, v in state.items()}
    sparse = jacobian(m, one, hold="x", positions=True, sparse=True)
    torch.testing.assert_close(sparse.to_dense(), jacobian(m, one, hold="x", positions=True),
                               rtol=0, atol=0)
    torch.testing.assert_close(sparse.to_dense(), jac[0], rtol=1e-12, atol=1e-14)


def test_positions_false_on_a_position_wise_map_is_every_positions_own_jacobian():
    """Without positions every leading index is a batch element: on a map whose blocks act
    on each position alone that is each position's own Jacobian (the structured path).
    A map with attention is refused instead (tests/test_dynamics_positions.py)."""
    T = 4
    mlp = iternn.BlockMap({"x": D, "h": D})
    mlp.connect("h", "x", nn.Linear(D, D))
    mlp.connect("h", "h", nn.Linear(D, D))
    mlp.set_activation("h", nn.Tanh())
    mlp = mlp.double()
    st = sequence(mlp, (2, T))
    got = jacobian(mlp, st, hold="x")
    for b in range(2):
        for t in range(T):
            one = {s: v[b, t] for s, v in st.items()}
            want = torch.autograd.functional.jacobian(
                lambda h, one=one: iternn.iterate(mlp, {**one, "h": h}, 1, hold="x")["h"],
                one["h"])
            torch.testing.assert_close(got[b, t], want, rtol=1e-12, atol=1e-14)


def test_spectra_over_the_sequence_equal_the_brute_force_ones():
    T = 4
    m = recurrent_map(True, seed=3)
    state = sequence(m, (2, T), seed=4)
    radius = spectral_radius(m, state, hold="x", positions=True)
    eig = eigenvalues(m, state, hold="x", positions=True)
    sv = singular_values(m, state, hold="x", positions=True)
    assert radius.shape == (2,) and eig.shape == sv.shape == (2, T * D)
    for b in range(2):
        ref = reference_jacobian(m, state, 1, hold=("x",), element=b)
        want = torch.linalg.eigvals(ref)
        torch.testing.assert_close(float(radius[b]), float(want.abs().max()), rtol=1e-8,
                                   atol=0)
        torch.testing.assert_close(eig[b].abs(), want.abs().sort(descending=True).values,
                                   rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(sv[b], torch.linalg.svdvals(ref), rtol=1e-10, atol=1e-12)
    # The cross-position terms change the spectrum: it is not one position's.
    first = {s: v[0, :1] for s, v in state.items()}  # the first position alone, T = 1
    assert abs(float(spectral_radius(m, first, hold="x", positions=True))
               - float(radius[0])) > 1e-3


def test_lyapunov_exponents_over_the_sequence_sum_to_the_mean_log_determinant():
    """With k = N exponents the sum is (1/steps) Σ_t log|det J(z_t)|, whatever the
    tangent basis: J over the whole sequence, cross-position terms included."""
    T, steps = 4, 4
    m = attend_map(seed=2)
    state = sequence(m, (1, T), seed=5)
    spec = lyapunov_spectrum(m, state, steps=steps, hold="x", positions=True)
    assert spec.shape == (1, T * D)
    logdet = []
    for t in range(steps):
        z = iternn.iterate(m, state, t, hold="x") if t else state
        ref = reference_jacobian(m, z, 1, hold=("x",), element=0)
        logdet.append(float(torch.linalg.slogdet(ref).logabsdet))
    torch.testing.assert_close(float(spec.sum()), sum(logdet) / steps, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- bad input
def position_wise_map():
    """Linear and element-wise blocks only: no block mixes positions."""
    m = iternn.BlockMap({"x": D, "h": D})
    m.connect("h", "x", nn.Linear(D, D))
    m.connect("h", "h", nn.Linear(D, D))
    m.set_activation("h", nn.Tanh())
    return m.double()


@pytest.mark.parametrize("tool", [
    lambda m, s: jacobian(m, s, hold="x", positions=True),
    lambda m, s: spectral_radius(m, s, hold="x", positions=True),
    lambda m, s: lyapunov_spectrum(m, s, steps=2, hold="x", positions=True),
    lambda m, s: propagation(m, s, 2, hold="x"),
], ids=["jacobian", "spectral_radius", "lyapunov_spectrum", "propagation"])
def test_positions_on_a_map_without_a_sequence_dimension_is_an_error(tool):
    m = position_wise_map()
    with pytest.raises(DynamicsError, match=r"needs a map with a sequence dimension.*free "
                                            r"slots \['h'\]"):
        tool(m, sequence(m, (2, 4)))


def test_positions_on_a_state_without_a_position_axis_is_an_error_naming_the_slot():
    m = recurrent_map(True)
    with pytest.raises(DynamicsError, match=r"slot 'x' of the state has shape \(8,\).* no "
                                            r"position axis"):
        propagation(m, sequence(m, ()), 1, hold="x")


def test_zero_positions_is_an_error_naming_the_slot():
    m = recurrent_map(True)
    with pytest.raises(DynamicsError, match=r"slot 'x' of the state has 0 positions"):
        jacobian(m, sequence(m, (2, 0)), hold="x", positions=True)


def test_positions_must_be_a_bool():
    m = recurrent_map(True)
    with pytest.raises(DynamicsError, match=r"positions must be a bool, got 1"):
        jacobian(m, sequence(m, (2, 4)), hold="x", positions=1)


def test_blocks_that_disagree_on_the_layout_are_an_error_naming_both():
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": D, "a": D, "b": D})
    m.connect("a", "x", EncoderLayerBlock(encoder_layer(True)))
    m.connect("b", "a", EncoderLayerBlock(encoder_layer(False)))
    m = m.double().eval()
    with pytest.raises(DynamicsError, match=r"disagree.*block 'a' <- 'x' is batch-first.*"
                                            r"block 'b' <- 'a' sequence-first"):
        propagation(m, sequence(m, (2, 4)), 1)


def test_propagation_steps_must_be_positive():
    m = recurrent_map(True)
    with pytest.raises(DynamicsError, match=r"steps must be an int >= 1, got 0"):
        propagation(m, sequence(m, (2, 4)), 0, hold="x")


# ---------------------------------------------------------------------------- picture
def test_plot_propagation_draws_one_panel_per_application_zeros_white(tmp_path):
    T = 5
    m = attend_map(causal=True)
    prop = propagation(m, sequence(m, (T,)), 3, hold="x")
    fig = plot_propagation(prop)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 3
    for k, im in enumerate(images):
        data = im.get_array()
        # row = destination j, column = source i; exact zeros masked (drawn white)
        assert torch.equal(torch.from_numpy(np.ma.getmaskarray(data)), prop[k] == 0)
        torch.testing.assert_close(torch.from_numpy(data.filled(0.0)), prop[k])
    path = plot_propagation(prop[0], tmp_path / "p.png")
    assert path == tmp_path / "p.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    many = plot_propagation(torch.ones(20, 3, 3))
    assert sum(len(ax.get_images()) for ax in many.axes) == 16
    assert "first 16 of 20 applications" in many._suptitle.get_text()


def test_plot_propagation_refuses_a_batch_or_a_non_square_matrix():
    with pytest.raises(DynamicsError, match=r"propagation must be \(steps, T, T\) or \(T, T\).*"
                                            r"got shape \(2, 2, 3, 3\)"):
        plot_propagation(torch.ones(2, 2, 3, 3))
    with pytest.raises(DynamicsError, match=r"got shape \(2, 3, 4\)"):
        plot_propagation(torch.ones(2, 3, 4))


def test_a_sequence_too_long_for_its_jacobians_is_refused_before_they_are_built():
    m = recurrent_map(True)
    with pytest.raises(iternn.SizeError, match=r"the Jacobians over the whole sequence "
                                               r"\(100000 positions x 8 free units"):
        propagation(m, sequence(m, (100_000,)), 1, hold="x")
