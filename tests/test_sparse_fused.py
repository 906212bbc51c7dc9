"""Fused sparse products (sparse.fused): one CSR product for the SparseLinear blocks of a
destination, checked in float64 against a per-block dense reference (values, reverse-mode
gradients, forward-mode jvp), its declines, and its use by the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from iternn import BlockMap, iterate
from iternn.engine.plan import compile_destinations
from iternn.errors import MapTypeError
from iternn.sparse import MaskedLinear, SparseLinear, matched_map, native, six_block_map
from iternn.sparse.fused import FusedSparseProduct, fused_sparse_product

pytestmark = pytest.mark.skipif(not native.available(), reason="native CSR kernels unavailable")

SRC = ("a", "b", "c", "e")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sparse_block(n_in: int, n_out: int, density: float, seed: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float64) -> SparseLinear:
    """A csr SparseLinear whose positions are kept with probability ``density`` (0: no
    entries; low densities leave rows empty)."""
    mask = torch.rand(n_out, n_in, generator=gen(seed)) < density
    return SparseLinear(n_in, n_out, indices=mask.nonzero().t(), bias=bias, generator=gen(seed + 1),
                        backend="csr", dtype=dtype)


def destination(widths, n_d, blocks, *, dtype=torch.float64):
    """A map whose slot ``d`` reads ``blocks[i]`` from slot ``SRC[i]`` (width
    ``widths[i]``); returns the map and the engine's terms of ``d``."""
    m = BlockMap({"d": n_d, **{s: w for s, w in zip(SRC, widths)}})
    for s, blk in zip(SRC, blocks):
        m.connect("d", s, blk)
    return m, compile_destinations(m)["d"].terms


def reference(blocks, xs, bias):
    """``bias + sum_p x_p W_p^T + b_p`` with every W_p dense (torch autograd throughout)."""
    out = sum(F.linear(x, blk.dense_weight(), blk.bias) for blk, x in zip(blocks, xs))
    return out if bias is None else out + bias


class Blocks(nn.Module):
    """The blocks as one module, so that torch.func.functional_call can swap their
    parameters for tensors of the caller's (forward-mode tangents, gradcheck inputs)."""

    def __init__(self, blocks, run) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.run = run

    def forward(self, xs, bias):
        return self.run(xs, bias)


def params_of(blocks):
    return {f"blocks.{i}.{name}": p for i, blk in enumerate(blocks)
            for name, p in blk.named_parameters()}


@st.composite
def fused_case(draw):
    parts = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 12)) for _ in range(parts)]
    densities = [draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])) for _ in range(parts)]
    own_bias = [draw(st.booleans()) for _ in range(parts)]
    n_d = draw(st.integers(1, 12))
    batch = draw(st.sampled_from([(1,), (2,), (3,), (40,), (3, 2), (2, 40)]))
    slot_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**20))
    return widths, densities, own_bias, n_d, batch, slot_bias, seed


# ============================================================================ equivalence
@given(case=fused_case())
def test_fused_product_equals_per_block_dense_sum(case):
    widths, densities, own_bias, n_d, batch, slot_bias, seed = case
    blocks = [sparse_block(w, n_d, p, seed + 10 * i, bias=b)
              for i, (w, p, b) in enumerate(zip(widths, densities, own_bias))]
    _, terms = destination(widths, n_d, blocks)
    product = fused_sparse_product(terms)
    assert isinstance(product, FusedSparseProduct) and product.terms == terms
    g = gen(seed + 99)
    xs = [torch.randn(*batch, w, generator=g, dtype=torch.float64, requires_grad=True) for w in widths]
    bias = torch.randn(n_d, generator=g, dtype=torch.float64, requires_grad=True) if slot_bias else None
    values = dict(zip(SRC, xs))

    y = product(values, bias, batch)
    ref = reference(blocks, xs, bias)
    assert y.shape == (*batch, n_d)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    # reverse mode: every gradient the destination has
    wrt = [*xs, *(p for blk in blocks for p in blk.parameters()), *([bias] if slot_bias else [])]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, wrt, gy)
    want = torch.autograd.grad(ref, wrt, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # forward mode (torch.func.jvp, as the dynamics tools call it), tangents for every input
    fused = Blocks(blocks, lambda xs, b: product(dict(zip(SRC, xs)), b, batch))
    dense = Blocks(blocks, lambda xs, b: reference(fused.blocks, xs, b))
    params = {k: p.detach() for k, p in params_of(blocks).items()}
    primals = ([x.detach() for x in xs], params, *([bias.detach()] if slot_bias else []))
    tangents = ([torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs],
                {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()},
                *([torch.randn(n_d, generator=g, dtype=torch.float64)] if slot_bias else []))
    outs = [torch.func.jvp(lambda x, p, *b, mod=mod: functional_call(mod, p, (x, b[0] if b else None)),
                           primals, tangents)
            for mod in (fused, dense)]
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)


def test_one_fused_node_for_all_blocks():
    blocks = [sparse_block(6, 5, 0.4, 1, bias=True), sparse_block(4, 5, 0.4, 2)]
    _, terms = destination([6, 4], 5, blocks)
    x = {"a": torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
         "b": torch.randn(3, 4, dtype=torch.float64, requires_grad=True)}
    y = fused_sparse_product(terms)(x, torch.zeros(5, dtype=torch.float64, requires_grad=True), (3,))
    # the bias sums feed the product, nothing follows it
    assert type(y.grad_fn).__name__ == "FusedSparseFunctionBackward"


def test_same_tensor_read_by_two_parts_gets_both_gradients():
    blocks = [sparse_block(5, 4, 0.5, 3), sparse_block(5, 4, 0.5, 4, bias=True)]
    _, terms = destination([5, 5], 4, blocks)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = fused_sparse_product(terms)({"a": x, "b": x}, None, (7,))
    ref = reference(blocks, [x, x], None)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(7, 4, generator=gen(5), dtype=torch.float64)
    wrt = [x, blocks[0].values, blocks[1].values]
    for a, b in zip(torch.autograd.grad(y, wrt, gy), torch.autograd.grad(ref, wrt, gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    t = torch.randn(7, 5, generator=gen(6), dtype=torch.float64)
    _, got = torch.func.jvp(lambda z: fused_sparse_product(terms)({"a": z, "b": z}, None, (7,)),
                            (x.detach(),), (t,))
    torch.testing.assert_close(got, F.linear(t, blocks[0].dense_weight() + blocks[1].dense_weight()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wants", [(True, False, True), (False, True, True), (True, True, False),
                                   (False, False, True)])
def test_only_the_gradients_asked_for(wants):
    # per part: its source needs a gradient, its values do (or not): every backward path
    blocks = [sparse_block(5, 6, 0.4, 40 + i, bias=i == 0) for i in range(3)]
    _, terms = destination([5, 5, 5], 6, blocks)
    g = gen(41)
    xs = [torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=w) for w in wants]
    frozen = [not w for w in wants[::-1]]  # values of part i need a gradient unless frozen[i]
    for blk, f in zip(blocks, frozen):
        blk.values.requires_grad_(not f)
    wrt = [x for x in xs if x.requires_grad] + [b.values for b in blocks if b.values.requires_grad]
    y = fused_sparse_product(terms)(dict(zip(SRC, xs)), None, (4,))
    ref = reference(blocks, xs, None)
    gy = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, wrt, gy), torch.autograd.grad(ref, wrt, gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (bias_grad,) = torch.autograd.grad(fused_sparse_product(terms)(dict(zip(SRC, xs)), None, (4,)),
                                       [blocks[0].bias], gy)
    torch.testing.assert_close(bias_grad, gy.sum(0), rtol=1e-12, atol=1e-12)

def test_gradcheck_reverse_and_forward_mode():
    blocks = [sparse_block(4, 3, 0.5, 7, bias=True), sparse_block(3, 3, 0.6, 8), sparse_block(2, 3, 0.0, 9)]
    _, terms = destination([4, 3, 2], 3, blocks)
    product = fused_sparse_product(terms)
    fused = Blocks(blocks, lambda xs, b: product(dict(zip(SRC, xs)), b, (2, 2)))
    names = list(params_of(blocks))
    g = gen(10)
    xs = [torch.randn(2, 2, w, generator=g, dtype=torch.float64, requires_grad=True) for w in (4, 3, 2)]
    params = [p.detach().clone().requires_grad_() for p in params_of(blocks).values()]
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(*args):
        return functional_call(fused, dict(zip(names, args[3:-1])), (list(args[:3]), args[-1]))

    assert torch.autograd.gradcheck(f, (*xs, *params, bias), check_forward_ad=True)


# ============================================================================ claims
def test_claims_csr_sparse_linear_terms_only():
    class Sub(SparseLinear):
        pass

    mask = torch.ones(4, 3, dtype=torch.bool)
    blocks = [sparse_block(3, 4, 0.5, 11), MaskedLinear(3, 4, mask=mask, dtype=torch.float64),
              sparse_block(3, 4, 0.5, 12), nn.Linear(3, 4, dtype=torch.float64)]
    blocks[2].backend = "dense"
    sub = Sub(3, 4, density=0.5, backend="csr", dtype=torch.float64)
    _, terms = destination([3, 3, 3, 3], 4, blocks)
    assert fused_sparse_product(terms).terms == terms[:1]
    assert fused_sparse_product(terms[1:]) is None
    _, sub_terms = destination([3], 4, [sub])
    assert fused_sparse_product(sub_terms) is None


def test_not_claimed_with_hooks():
    hooked = sparse_block(3, 4, 0.5, 13)
    hooked.register_forward_hook(lambda mod, args, out: out * 2)
    pre = sparse_block(3, 4, 0.5, 14)
    pre.register_forward_pre_hook(lambda mod, args: None)
    plain = sparse_block(3, 4, 0.5, 15)
    _, terms = destination([3, 3, 3], 4, [hooked, pre, plain])
    assert fused_sparse_product(terms).terms == terms[2:]


def test_terms_between_shaped_slots_not_claimed():
    # called on (B, 2, 2) tensors, acting on the last dim: not a product of vector slots
    m = BlockMap({"d": (2, 2), "a": (2, 2)})
    m.connect("d", "a", SparseLinear(2, 2, density=0.5, backend="csr", dtype=torch.float64))
    (term,) = compile_destinations(m)["d"].terms
    assert term.out_shape == (2, 2)
    assert fused_sparse_product((term,)) is None


# ============================================================================ declines
def claimed(dtype=torch.float64):
    blocks = [sparse_block(3, 4, 0.5, 20, bias=True, dtype=dtype), sparse_block(2, 4, 0.5, 21)]
    _, terms = destination([3, 2], 4, blocks)
    product = fused_sparse_product(terms)
    assert product is not None and len(product.terms) == 2
    x = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(5, 2, dtype=torch.float64)}
    return blocks, product, x


def test_declines_a_float32_part_with_float64_input():
    blocks, product, x = claimed()
    blocks[1].float()
    assert product(x, None, (5,)) is None
    with pytest.raises(MapTypeError, match="dtype"):  # what the per-block path says
        blocks[1](x["b"])


def test_declines_float32_parts_with_float64_input():
    blocks, product, x = claimed(torch.float32)
    blocks[1].float()
    assert product(x, None, (5,)) is None


def test_declines_a_slot_bias_of_another_dtype():
    _, product, x = claimed()
    assert product(x, torch.zeros(4, dtype=torch.float32), (5,)) is None
    assert product(x, torch.zeros(4, dtype=torch.float64), (5,)) is not None


def test_declines_an_input_on_another_device():
    _, product, x = claimed()
    x["b"] = x["b"].to("meta")
    assert product(x, None, (5,)) is None


def test_declines_a_part_on_another_device():
    blocks, product, x = claimed()
    blocks[0].to("meta")
    assert product(x, None, (5,)) is None


def test_declines_after_backend_change():
    blocks, product, x = claimed()
    blocks[1].backend = "dense"
    assert product(x, None, (5,)) is None


def test_declines_after_a_hook_is_added():
    blocks, product, x = claimed()
    handle = blocks[0].register_forward_pre_hook(lambda mod, args: None)
    assert product(x, None, (5,)) is None
    handle.remove()
    assert product(x, None, (5,)) is not None


def test_declines_under_a_global_hook():
    _, product, x = claimed()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert product(x, None, (5,)) is None
    finally:
        handle.remove()


def test_declines_without_the_native_kernels(monkeypatch):
    _, product, x = claimed()
    monkeypatch.setattr(native, "library", lambda: None)
    assert product(x, None, (5,)) is None


def test_declines_an_empty_batch():
    _, product, _ = claimed()
    x = {"a": torch.randn(0, 3, dtype=torch.float64), "b": torch.randn(0, 2, dtype=torch.float64)}
    assert product(x, None, (0,)) is None



# ============================================================================ engine
def graph_names(y: torch.Tensor) -> set[str]:
    """The names of every node of ``y``'s autograd graph."""
    names, todo, seen = set(), [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


def dense_twin(module: nn.Module) -> nn.Module:
    """A copy whose SparseLinear blocks run on the dense backend (the reference)."""
    twin = copy.deepcopy(module)
    for blk in twin.modules():
        if isinstance(blk, SparseLinear):
            blk.backend = "dense"
    return twin


def test_engine_matched_map_equals_dense_backend_and_trains_alike():
    mlp = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))
    fused = matched_map(mlp, density=0.4, seed=0, backend="csr").double()
    dense = dense_twin(fused)
    blocks = [b for b in fused.modules() if isinstance(b, SparseLinear)]
    assert len(blocks) == 6 and all(b.backend == "csr" for b in blocks)
    g = gen(30)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    target = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = fused(x)
    assert "FusedSparseFunctionBackward" in graph_names(y)
    assert "FusedSparseFunctionBackward" not in graph_names(dense(x))
    torch.testing.assert_close(y, dense(x), rtol=1e-12, atol=1e-12)
    opts = [torch.optim.SGD(mod.parameters(), lr=0.1) for mod in (fused, dense)]
    for _ in range(3):
        for mod, opt in zip((fused, dense), opts):
            opt.zero_grad()
            F.mse_loss(mod(x), target).backward()
            opt.step()
    torch.testing.assert_close(fused(x), dense(x), rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(fused.named_parameters(), dense.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_engine_forced_sequence_and_jvp_equal_dense_backend():
    # x forced over (T, B): h's drive from x is one product over the whole sequence
    m = six_block_map(4, 9, 3, 0.5, activation=nn.Tanh(), seed=1, backend="csr").double()
    dense = dense_twin(m)
    g = gen(31)
    xs = torch.randn(6, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    outs = [iterate(mod, {}, 6, force={"x": xs}, trajectory=True)["y"] for mod in (m, dense)]
    assert "FusedSparseFunctionBackward" in graph_names(outs[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    gy = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    got, want = (torch.autograd.grad(o, [xs, *mod.parameters()], gy) for o, mod in zip(outs, (m, dense)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    h0 = torch.randn(2, 9, generator=g, dtype=torch.float64)
    t0 = torch.randn(2, 9, generator=g, dtype=torch.float64)
    x0 = xs[0].detach()
    tangents = [torch.func.jvp(lambda h, mod=mod: iterate(mod, {"x": x0, "h": h}, 3, hold=("x",))["y"],
                               (h0,), (t0,))[1] for mod in (m, dense)]
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-12, atol=1e-12)
