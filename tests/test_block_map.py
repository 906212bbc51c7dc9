"""The block map: one application, state handling, autograd on every path, bad input."""

import math

import pytest
import torch
from hypothesis import given
from maps import random_state
from torch import nn

import iternn


def _dense_linear_map(g):
    """A map with linear blocks only, and its dense (N x N) matrix + bias + acts."""
    sizes = {"x": 2, "h": 3, "y": 2}
    m = iternn.BlockMap(sizes)
    blocks = [("h", "x"), ("h", "h"), ("y", "h"), ("y", "x"), ("x", "y")]
    for d, s in blocks:
        lin = nn.Linear(sizes[s], sizes[d], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        m.connect(d, s, lin)
    m.set_bias("h", torch.randn(3, generator=g))
    m.set_bias("y", torch.randn(2, generator=g))
    m.set_activation("h", nn.Tanh())
    m.double()
    off = {"x": 0, "h": 2, "y": 5}
    W = torch.zeros(7, 7, dtype=torch.float64)
    for d, s in blocks:  # row = destination, column = source
        w = m.block(d, s).weight.detach()
        W[off[d]:off[d] + sizes[d], off[s]:off[s] + sizes[s]] = w
    b = torch.cat([torch.zeros(2, dtype=torch.float64), m.bias("h").detach(), m.bias("y").detach()])
    return m, W, b


def test_one_application_is_act_of_b_plus_Fz():
    g = torch.Generator().manual_seed(0)
    m, W, b = _dense_linear_map(g)
    z = torch.randn(4, 7, dtype=torch.float64, generator=g)
    pre = z @ W.T + b
    want = torch.cat([pre[:, :2], torch.tanh(pre[:, 2:5]), pre[:, 5:]], dim=-1)
    got = m.pack(m(m.unpack(z)))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_slot_without_blocks_becomes_act_of_bias():
    m = iternn.BlockMap({"a": 2, "b": 2})
    m.set_bias("a", torch.tensor([1.0, -2.0]))
    m.set_activation("a", nn.ReLU())
    m.set_activation("b", nn.Sigmoid())
    out = m({"a": torch.randn(3, 2), "b": torch.randn(3, 2)})
    assert torch.equal(out["a"], torch.tensor([[1.0, 0.0]] * 3))
    assert torch.equal(out["b"], torch.full((3, 2), 0.5))


@given(batch=__import__("hypothesis").strategies.lists(
    __import__("hypothesis").strategies.integers(1, 3), max_size=3))
def test_pack_unpack_round_trip(batch):
    m = iternn.BlockMap({"x": 2, "h": 3, "y": 1})
    state = random_state(m, batch=tuple(batch))
    flat = m.pack(state)
    assert flat.shape == (*batch, m.size)
    back = m.unpack(flat)
    assert list(back) == list(m.slots)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert torch.equal(m.pack(back), flat)


def test_backward_through_shared_destination_identity_and_nested_maps():
    """The paths the authors' code broke on: activation-terminated blocks sharing a
    destination, identity blocks and a nested map as a block."""
    torch.manual_seed(0)
    inner = iternn.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    m = iternn.BlockMap({"x": 3, "h": 3, "y": 3})
    a = m.connect("h", "x", nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    c = m.connect("h", "h", nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()))
    m.connect("y", "h", nn.Identity())
    m.connect("y", "x", inner)
    m.set_activation("y", nn.ELU())
    m.double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def by_hand(x, h):
        h1 = a(x) + c(h)
        y1 = nn.functional.elu(h + inner(x))
        h2 = a(x) + c(h1)
        return nn.functional.elu(h1 + inner(x)), h2, y1

    def by_map(x, h):
        out = iternn.iterate(m, {"x": x, "h": h}, 2, hold=["x"])
        return out["y"], out["h"]

    y_hand, h_hand, _ = by_hand(x, h)
    y_map, h_map = by_map(x, h)
    assert torch.allclose(y_map, y_hand, atol=1e-12) and torch.allclose(h_map, h_hand, atol=1e-12)
    params = list(m.parameters())
    g_map = torch.autograd.grad((y_map.sum() + h_map.square().sum()), [x, h, *params])
    g_hand = torch.autograd.grad((y_hand.sum() + h_hand.square().sum()), [x, h, *params])
    for p, q in zip(g_map, g_hand):
        assert torch.allclose(p, q, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, h: by_map(x, h)[0], (x, h))


def test_impulse_response_length():
    m = iternn.BlockMap({"x": 1, "h1": 1, "h2": 1, "y": 1})
    m.connect("h1", "x", nn.Linear(1, 1))
    m.connect("h2", "h1", nn.Linear(1, 1))
    m.connect("y", "h2", nn.Linear(1, 1))
    m.connect("y", "x", nn.Linear(1, 1))  # a shortcut does not shorten the longest path
    assert m.impulse_response_length() == 3
    assert math.isinf(m.impulse_response_length(hold=["x"]))  # the held x feeds h1
    assert m.impulse_response_length(hold=["y"]) == 2  # y feeds nothing, its inputs are gone
    m.connect("x", "x", nn.Identity())  # the paper's identity block: a real cycle
    assert math.isinf(m.impulse_response_length())


def test_summary_and_repr_name_slots_blocks_and_counts():
    m = iternn.BlockMap({"x": 3, "h": 4})
    m.connect("h", "x", nn.Linear(3, 4, bias=False))
    m.connect("h", "h", nn.Linear(4, 4))
    m.set_bias("h")
    m.set_activation("h", nn.Tanh())
    s = m.summary()
    assert (s.block("h", "x").trainable, s.block("h", "h").trainable) == (12, 20)
    assert s.block("h", "x").shape == (4, 3) and s.block("h", "x").density == 1.0
    assert s.trainable == 36 == iternn.count_trainable(m) and s.fixed == 0
    assert s.hidden_proportion == 20 / 32
    text = str(s)
    assert "h <- x" in text and "h <- h" in text and "Tanh" in text and "36" in text
    assert "slots=(x=3, h=4), blocks=2" in repr(m)


def test_count_trainable_counts_shared_once_and_frozen_as_fixed():
    lin = nn.Linear(2, 2, bias=False)
    m = iternn.BlockMap({"a": 2, "b": 2})
    m.connect("b", "a", lin)
    m.connect("a", "b", lin)  # tied: the same weight used twice
    frozen = m.connect("b", "b", nn.Linear(2, 2, bias=False))
    frozen.weight.requires_grad_(False)
    s = m.summary()
    assert iternn.count_trainable(m) == 4 == s.trainable
    assert s.block("a", "b").trainable == s.block("b", "a").trainable == 4
    assert s.block("b", "b").fixed == 4 and s.block("b", "b").trainable == 0
    assert isinstance(iternn.count_trainable(m), int)


def test_state_dict_and_to_follow_blocks_and_biases():
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    m.set_bias("h")
    keys = set(m.state_dict())
    assert keys == {"blocks.h<-x.weight", "blocks.h<-x.bias", "biases.h"}
    m.double()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    out = iternn.iterate(m, {"x": torch.ones(1, 2, dtype=torch.float64)}, 1)
    assert out["h"].dtype == torch.float64


def test_disconnect_and_reconnect_changes_the_result():
    m = iternn.BlockMap({"x": 1, "y": 1})
    lin = m.connect("y", "x", nn.Linear(1, 1, bias=False))
    nn.init.constant_(lin.weight, 2.0)
    x = torch.ones(1, 1)
    assert iternn.iterate(m, {"x": x}, 1, hold=["x"])["y"].item() == 2.0
    assert m.disconnect("y", "x") is lin
    assert iternn.iterate(m, {"x": x}, 1, hold=["x"])["y"].item() == 0.0


# ---------------------------------------------------------------- bad input, one per case
def test_bad_slot_name():
    with pytest.raises(iternn.MapError, match="'my-slot'"):
        iternn.BlockMap({"my-slot": 2})


def test_reserved_slot_name():
    with pytest.raises(iternn.MapError, match="'training'"):
        iternn.BlockMap({"training": 2})


@pytest.mark.parametrize(
    "size, error",
    [(0, iternn.MapError), (-3, iternn.MapError), (2.0, iternn.MapTypeError),
     (True, iternn.MapTypeError), ("3", iternn.MapTypeError), (None, iternn.MapTypeError)],
)
def test_bad_slot_size(size, error):
    with pytest.raises(error, match="size of slot 'h'"):
        iternn.BlockMap({"x": 2, "h": size})


def test_probe_of_a_huge_source_slot_is_refused_before_allocating():
    # An opaque block is probed on zeros (2, n_src): 8 TB here, refused by name, not
    # attempted (the allocator's error would have been wrapped as "module failed").
    m = iternn.BlockMap({"x": 10**12, "y": 2})
    with pytest.raises(iternn.SizeError, match="block 'y' <- 'x'.*probe input .2, 1000000000000."):
        m.connect("y", "x", nn.Sequential(nn.Tanh()))
    assert m.edges == ()


def test_zero_bias_of_a_huge_slot_is_refused_before_allocating():
    m = iternn.BlockMap({"x": 10**13})
    with pytest.raises(iternn.SizeError, match="bias of slot 'x'"):
        m.set_bias("x", True)
    assert m.bias("x") is None


def test_the_same_mistake_raises_the_same_error_everywhere():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    z = {"x": torch.ones(1, 2)}
    unknown = [
        lambda: m.bias("q"),
        lambda: m.connect("q", "x", nn.Linear(2, 2)),
        lambda: m.forward({"q": torch.ones(1, 2), **z}),
        lambda: iternn.iterate(m, z, 1, hold=["q"]),
        lambda: iternn.iterate(m, z, 1, force={"q": torch.ones(1, 1, 2)}),
        lambda: iternn.MapModule(m, input="q"),
        lambda: iternn.to_mlp(m, input="q"),
    ]
    for call in unknown:
        with pytest.raises(iternn.MapError, match="'q'"):
            call()
    not_a_name = [lambda: m.bias(1), lambda: iternn.iterate(m, z, 1, hold=[1])]
    for call in not_a_name:
        with pytest.raises(iternn.MapTypeError, match="int"):
            call()
    for steps, error in ((1.5, iternn.MapTypeError), (-1, iternn.MapError)):
        with pytest.raises(error, match="steps"):
            iternn.iterate(m, z, steps)
        with pytest.raises(error, match="steps"):
            iternn.MapModule(m, steps=steps)
    with pytest.raises(iternn.MapTypeError, match="inner"):
        iternn.iterate(m, z, 1, inner=2.0, force={"x": torch.ones(1, 1, 2)})


# ---------------------------------------------------------------- protocols of a block
class _Counted(nn.Module):
    """A block whose weight is half fixed by construction: it says so through the
    public ``trainable_counts`` hook."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, n))
        self.in_features = self.out_features = n

    def trainable_counts(self) -> dict[str, int]:
        return {"weight": self.weight.numel() // 2}

    def forward(self, z):
        return z @ self.weight.t()


class _PrivatelyCounted(_Counted):
    trainable_counts = None  # only the old private name: not the protocol

    def _trainable_counts(self) -> dict[str, int]:
        return {"weight": 1}


def test_summary_reads_the_public_trainable_counts_protocol():
    from iternn.core import CountsTrainable

    assert isinstance(_Counted(4), CountsTrainable)
    assert not isinstance(nn.Linear(4, 4), CountsTrainable)
    m = iternn.BlockMap({"x": 4, "y": 4})
    m.connect("y", "x", _Counted(4))
    row = m.summary().block("y", "x")
    assert (row.trainable, row.stored, row.density) == (8, 16, 0.5)
    assert iternn.count_trainable(m) == 8
    m.disconnect("y", "x")
    m.connect("y", "x", _PrivatelyCounted(4))
    assert iternn.count_trainable(m) == 16  # a private hook is not read


def test_rowwise_protocol_decides_whether_a_block_is_called_once_per_sequence():
    from iternn.core import RowwiseBlock
    from iternn.core.rowwise import is_rowwise

    class Row(nn.Module):
        rowwise = True

        def forward(self, z):
            return 2 * z

    class NotRow(Row):
        rowwise = False

    assert isinstance(Row(), RowwiseBlock) and is_rowwise(Row())
    assert isinstance(NotRow(), RowwiseBlock) and not is_rowwise(NotRow())
    assert not isinstance(nn.Tanh(), RowwiseBlock) and is_rowwise(nn.Tanh())


def test_unknown_slot_in_connect():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="'z'"):
        m.connect("z", "x", nn.Linear(2, 2))


def test_duplicate_block():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    with pytest.raises(iternn.MapError, match="'y' <- 'x' already exists"):
        m.connect("y", "x", nn.Linear(2, 2))


def test_block_in_features_mismatch():
    m = iternn.BlockMap({"x": 2, "y": 3})
    with pytest.raises(iternn.MapError, match="in_features=3.*source slot 'x'"):
        m.connect("y", "x", nn.Linear(3, 3))


def test_block_out_features_mismatch():
    m = iternn.BlockMap({"x": 2, "y": 3})
    with pytest.raises(iternn.MapError, match="out_features=2.*destination slot 'y'"):
        m.connect("y", "x", nn.Linear(2, 2))


def test_probed_block_shape_mismatch():
    m = iternn.BlockMap({"x": 2, "y": 3})
    with pytest.raises(iternn.MapError, match="block 'y' <- 'x'"):
        m.connect("y", "x", nn.Sequential(nn.Linear(2, 4), nn.Tanh()))


def test_probe_keeps_rng_and_mode():
    m = iternn.BlockMap({"x": 2, "y": 2})
    block = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    m.connect("y", "x", block)
    assert torch.equal(torch.get_rng_state(), before)
    assert block.training


def test_block_not_a_module():
    m = iternn.BlockMap({"x": 2, "y": 2})
    with pytest.raises(iternn.MapTypeError, match="'y' <- 'x'"):
        m.connect("y", "x", lambda z: z)


def test_state_wrong_slot_size():
    m = iternn.BlockMap({"x": 2, "y": 2})
    with pytest.raises(iternn.MapError, match="'x'"):
        iternn.iterate(m, {"x": torch.ones(1, 3)}, 1)


def test_state_unknown_slot():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="'q'"):
        iternn.iterate(m, {"q": torch.ones(1, 2)}, 1)


def test_state_batch_mismatch():
    m = iternn.BlockMap({"x": 2, "y": 2})
    with pytest.raises(iternn.MapError, match="'y'"):
        iternn.iterate(m, {"x": torch.ones(1, 2), "y": torch.ones(2, 2)}, 1)


def test_state_dtype_mismatch_with_map():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    with pytest.raises(iternn.MapTypeError, match="float64.*float32"):
        iternn.iterate(m, {"x": torch.ones(1, 2, dtype=torch.float64)}, 1)


def test_state_dtype_mismatch_between_slots():
    m = iternn.BlockMap({"x": 2, "y": 2})
    with pytest.raises(iternn.MapTypeError, match="'y'"):
        iternn.iterate(m, {"x": torch.ones(1, 2), "y": torch.ones(1, 2, dtype=torch.float64)}, 1)


def test_state_integer_tensor():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapTypeError, match="'x'"):
        iternn.iterate(m, {"x": torch.ones(1, 2, dtype=torch.long)}, 1)


def test_state_device_mismatch_with_map():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    with pytest.raises(iternn.MapError, match="meta"):
        iternn.iterate(m, {"x": torch.ones(1, 2, device="meta")}, 1)


def test_state_not_a_tensor():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapTypeError, match="'x'"):
        iternn.iterate(m, {"x": [[1.0, 2.0]]}, 1)


def test_state_empty():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="empty"):
        iternn.iterate(m, {}, 1)


def test_forward_needs_full_state():
    m = iternn.BlockMap({"x": 2, "y": 1})
    with pytest.raises(iternn.MapError, match="'y'"):
        m({"x": torch.ones(1, 2)})


def test_unpack_wrong_size():
    m = iternn.BlockMap({"x": 2, "y": 1})
    with pytest.raises(iternn.MapError, match="last dim 3"):
        m.unpack(torch.ones(1, 4))


def test_forced_sequence_wrong_length():
    m = iternn.BlockMap({"x": 2, "h": 2})
    with pytest.raises(iternn.MapError, match="'x'.*\\(3, \\*batch, 2\\)"):
        iternn.iterate(m, {}, 3, force={"x": torch.ones(2, 1, 2)})


def test_forced_sequence_wrong_batch():
    m = iternn.BlockMap({"x": 2, "h": 2})
    with pytest.raises(iternn.MapError, match="'x'"):
        iternn.iterate(m, {"h": torch.ones(4, 2)}, 3, force={"x": torch.ones(3, 1, 2)})


def test_forced_sequence_wrong_features():
    m = iternn.BlockMap({"x": 2, "h": 2})
    with pytest.raises(iternn.MapError, match="'x'"):
        iternn.iterate(m, {}, 3, force={"x": torch.ones(3, 1, 5)})


def test_held_and_forced_same_slot():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="'x'"):
        iternn.iterate(m, {}, 1, hold=["x"], force={"x": torch.ones(1, 1, 2)})


def test_unknown_held_slot():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="'nope'"):
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 1, hold=["nope"])


def test_bad_steps_inner_update():
    m = iternn.BlockMap({"x": 2})
    s = {"x": torch.ones(1, 2)}
    with pytest.raises(iternn.MapError, match="steps"):
        iternn.iterate(m, s, -1)
    with pytest.raises(iternn.MapTypeError, match="steps"):
        iternn.iterate(m, s, 1.5)
    with pytest.raises(iternn.MapError, match="inner"):
        iternn.iterate(m, s, 1, inner=2)
    with pytest.raises(iternn.MapError, match="update"):
        iternn.iterate(m, s, 1, update="gauss")


def test_unknown_block_kwargs_key():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="x<-y"):
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 1, block_kwargs={"x<-y": {}})


def test_bias_wrong_shape():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapError, match="'x'"):
        m.set_bias("x", torch.zeros(3))


def test_activation_not_a_module():
    m = iternn.BlockMap({"x": 2})
    with pytest.raises(iternn.MapTypeError, match="'x'"):
        m.set_activation("x", torch.tanh)


def test_missing_block_lookup():
    m = iternn.BlockMap({"x": 2, "y": 2})
    with pytest.raises(iternn.MapError, match="no block 'y' <- 'x'"):
        m.block("y", "x")


def test_plans_see_parameters_replaced_by_assign():
    torch.manual_seed(0)
    net = iternn.from_mlp(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    x = torch.randn(4, 2)
    net(x)  # build and cache the plan
    other = iternn.from_mlp(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    net.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(net(x), other(x))


# ------------------------------------------------------------------ review regressions
def test_bias_of_another_dtype_is_refused():
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    with pytest.raises(iternn.MapTypeError, match="'h'.*float64"):
        m.set_bias("h", torch.zeros(2, dtype=torch.float64))


def test_mixed_parameter_dtypes_are_refused_at_iterate():
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "x", nn.Linear(2, 2))
    m.connect("h", "h", nn.Linear(2, 2).double())
    with pytest.raises(iternn.MapTypeError, match="mixed dtypes"):
        iternn.iterate(m, {"x": torch.ones(1, 2)}, 1)


def test_probe_restores_every_submodule_mode():
    block = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    block[1].eval()  # a frozen batch norm inside a block in train mode
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", block)
    assert block.training and not block[1].training


def test_activation_must_keep_the_slot_shape():
    m = iternn.BlockMap({"y": 2})
    with pytest.raises(iternn.MapError, match="activation of slot 'y'"):
        m.set_activation("y", nn.Linear(2, 5))


def test_partly_declared_block_is_probed():
    class Half(nn.Module):
        in_features = 3

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 7)

        def forward(self, z):
            return self.lin(z)

    m = iternn.BlockMap({"x": 3, "h": 4})
    with pytest.raises(iternn.MapError, match="'h' <- 'x'"):
        m.connect("h", "x", Half())


def test_summary_density_is_for_weight_matrices_only():
    m = iternn.BlockMap({"x": 2, "h": 2})
    m.connect("h", "h", nn.Linear(2, 2))  # its own bias is not a matrix entry
    m.connect("h", "x", nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)))
    s = m.summary()
    assert s.block("h", "h").density == 1.0
    assert s.block("h", "x").density is None
    assert "-" in str(s)


def test_core_engine_and_converters_raise_only_the_error_family():
    # Every error raised on purpose is an IterNNError (each also the built-in type);
    # a plain `raise ValueError(...)` here would escape `except iternn.IterNNError`.
    import pathlib
    import re

    root = pathlib.Path(iternn.__file__).parent
    plain = re.compile(r"raise (ValueError|TypeError|RuntimeError|KeyError|MemoryError)\(|^\s*assert ",
                       re.M)
    found = [f"{p.relative_to(root)}: {hit.group(0).strip()}"
             for sub in ("core", "engine", "convert") for p in (root / sub).glob("*.py")
             for hit in plain.finditer(p.read_text())]
    assert found == []


def test_in_place_block_copy_shares_its_parameters():
    lin = nn.Linear(3, 3)
    block = nn.Sequential(lin, nn.ReLU(inplace=True))
    m = iternn.BlockMap({"a": 3, "b": 3})
    stored = m.connect("b", "a", block)
    assert stored is not block and stored[1].inplace is False and block[1].inplace is True
    assert stored[0].weight is lin.weight and stored[0].bias is lin.bias  # still tied
