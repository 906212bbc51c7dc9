"""from_module on adversarial models: each converts exactly or is refused by name.

Every case is small and float64. An exact case checks outputs, the gradients of the
inputs and of every source parameter (against each of its copies: parameters tied in
the source must stay tied), two Adam steps (parameters and running statistics after),
then the same again after switching train/eval on both. A refusal checks the named
error (:class:`~iternn.ConversionError` ...), the traced node and the model's source
line. Cases cover operand order of non-commutative operations, broadcasting between
slots of different shapes, shared layers, tensors with many readers, in-place
operations on intermediate tensors, indexing, chunk/split/cat, shape operations,
reductions, softmax dims, dropout flags, signatures and outputs, the model's own
tensors, hooks, tensor constants and random numbers drawn outside the trace, and that
conversion leaves the source alone.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conversion import leaves, source_line
from torch import Tensor, nn
from torch.nn.utils import prune

import iternn
from iternn.convert.module import ModuleMap, from_module

TOL = 1e-6
D = torch.float64




def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


# ============================================================================ checking


def _same(a, b) -> bool:
    """Equal structure, constants, dtypes and shapes; tensors within TOL."""
    if isinstance(a, Tensor):
        return (isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and (a.numel() == 0 or bool((a.double() - b.double()).abs().max() <= TOL)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _copies(model: nn.Module, net: ModuleMap) -> list[tuple[str, Tensor, Tensor]]:
    """(source name, source tensor, converted copy) for every copy the net holds."""
    src = {**dict(model.named_parameters(remove_duplicate=False)),
           **dict(model.named_buffers(remove_duplicate=False))}
    dst = {**dict(net.named_parameters(remove_duplicate=False)),
           **dict(net.named_buffers(remove_duplicate=False))}
    return [(s, src[s], dst[k]) for k, s in net.source_names.items()]


def _forward_same(model, net, args, kwargs, seed) -> None:
    floats = [a for a in leaves((args, kwargs)) if a.is_floating_point()]
    for a in floats:
        a.grad = None
        a.requires_grad_(True)
    torch.manual_seed(seed)
    y_src = model(*args, **kwargs)
    torch.manual_seed(seed)
    y_net = net(*args, **kwargs)
    assert _same(y_src, y_net), "outputs differ"
    outs = [(a, b) for a, b in zip(leaves(y_src), leaves(y_net)) if a.requires_grad]
    if not outs:
        return
    params = [(n, p, q) for n, p, q in _copies(model, net)
              if isinstance(p, nn.Parameter) and p.requires_grad]
    weights = [_randn(*a.shape, seed=seed + i) for i, (a, _) in enumerate(outs)]
    loss_src = sum((a * w).sum() for (a, _), w in zip(outs, weights))
    loss_net = sum((b * w).sum() for (_, b), w in zip(outs, weights))
    g_src = torch.autograd.grad(loss_src, floats + [p for _, p, _ in params], allow_unused=True)
    g_net = torch.autograd.grad(loss_net, floats + [q for _, _, q in params], allow_unused=True)
    names = [f"input {i}" for i in range(len(floats))] + [n for n, _, _ in params]
    for name, a, b in zip(names, g_src, g_net):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        assert float((a - b).abs().max()) <= TOL, f"gradient of {name} differs"


def check_exact(model: nn.Module, net: ModuleMap, args: tuple, kwargs: dict | None = None) -> None:
    """Outputs and gradients, Adam steps (parameters, buffers), then the other mode."""
    kwargs = kwargs or {}
    _forward_same(model, net, args, kwargs, seed=1)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (model, net)]
    for step in range(2):
        for m, opt in zip((model, net), opts):
            opt.zero_grad()
            torch.manual_seed(10 + step)
            floats = [y for y in leaves(m(*args, **kwargs)) if y.requires_grad]
            if floats:
                sum((y ** 2).mean() for y in floats).backward()
                opt.step()
    for name, p, q in _copies(model, net):
        assert p.shape == q.shape and float((p - q).detach().abs().max()) <= TOL, name
    copied = set(net.source_names.values())
    for k, b in model.named_buffers():  # a buffer without a copy must not have moved
        assert k in copied or torch.equal(b, buffers[k]), f"{k} moved in the source only"
    model.train(not model.training)
    net.train(not net.training)
    _forward_same(model, net, args, kwargs, seed=2)


# ============================================================================ the models
class Vec(nn.Module):
    """Operations on (batch, 3) inputs; ``kind`` picks the forward."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
        self.c = nn.Linear(3, 1)
        self.seven = nn.Linear(3, 7)
        self.W = nn.Parameter(torch.randn(4, 5))
        self.Wl = nn.Parameter(torch.randn(5, 4))
        self.v = nn.Parameter(torch.randn(4))
        self.p = nn.Parameter(torch.randn(4))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("buf", torch.randn(4))
        self.register_buffer("nb", torch.randn(1, 4), persistent=False)
        self.bn = nn.BatchNorm1d(4)
        self.norm, self.norm2 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.same = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.tied = nn.Linear(3, 4)
        self.tied.bias = self.p  # a parameter tied between a layer and an operation

    def forward(self, x):
        k = self.kind
        a, b = self.a(x), self.b(x)
        # operand order of non-commutative operations
        if k == "sub":
            return a - b, b - a
        if k == "div":
            return b / (a.exp() + 1), (a.exp() + 1) / b
        if k == "pow":
            return a.exp() ** b, b.exp() ** a
        if k == "scalar_left":
            return 1 - a, 2 / a.exp(), 2.0 ** a, a.__rsub__(1.5), a.exp().__rtruediv__(3.0)
        if k == "alpha":
            return torch.sub(a, b, alpha=2.5), torch.add(a, 2.0, alpha=3), torch.sub(a, 2.0, alpha=3)
        if k == "param_sides":
            return a @ self.W, self.Wl @ a.view(-1, 4, 1), a @ self.v, self.p - a, self.p / a.exp()
        if k == "matmul_slots":
            ma, mb = a.view(-1, 2, 2), b.view(-1, 2, 2)
            return ma @ mb, mb @ ma, torch.bmm(mb, ma.mT)
        if k == "max_min":
            return torch.maximum(a, b) - torch.minimum(b, a)
        if k == "self_ops":
            return a * a, a - a, a + a, torch.maximum(a, a), torch.cat([a, a, a], 1), torch.stack([a, a], -1)
        # broadcasting between slots of different shapes
        if k == "b1_bn":
            c = self.c(x)
            return (c - a, a - c, c / a.exp(), c.exp() ** a, a * c, c + a + c, c - torch.relu(a),
                    torch.add(a, c, alpha=-0.5), torch.sub(c, a, alpha=2))
        if k == "scalar_samples":
            return (a.sum(1) * x.mean(1))[:, None] + a, a.sum(-1) - b.mean(-1)
        # shared layers, many readers, folding
        if k == "shared_bn":
            return self.bn(a) + self.bn(b * 2), self.bn(self.bn(a) * 3 + 1)
        if k == "many_readers":
            return a * 2, a + 1, torch.tanh(a), a.relu(), a - self.b(torch.sigmoid(a)[:, :3])
        if k == "fold_read":
            g = torch.sigmoid(a)
            return g * a + g
        if k == "shape_only":  # a batch norm read only for its shape, one not read at all
            h = self.norm(a)
            self.same(self.norm2(b))
            return x[:, : h.shape[1] - 1] * 2
        if k == "dropout_shared":
            u = self.bn(a)
            v = self.drop(b)
            return self.drop(self.drop(u) + self.bn(v)) + u
        # in-place operations on intermediate tensors
        if k == "inplace_fresh":  # no in-place change of a tensor autograd saved
            h = a
            h += b
            h = h.mul_(2.0)
            h = h.add_(self.p)
            h = h.sub_(b, alpha=0.5)
            g = self.c(x).clamp_(min=-0.5)
            return self.relu(h), F.relu(g, inplace=True), self.b(x).div_(3.0).relu_()
        if k == "iadd_expr":  # only the augmented operation of each line is in place
            h = a
            h += x.sum(1, keepdim=True) * 0.5
            h -= b * 2.0
            return h, b
        if k == "inplace_after_clone":
            g = a.clone()
            g = self.relu(g)
            return a, g
        if k == "inplace_act_tied":
            return self.relu(a) * self.p + self.tied(x)
        # indexing, pieces, joins, shapes, reductions
        if k == "index":
            return a[:, -1:], a[:, None, ::2], a[..., None], a[:, -100:2], a[0:], a[:, -1], a[..., 1:3]
        if k == "pieces":
            p, q, r = self.seven(x).chunk(3, dim=1)
            parts = self.seven(x).split([1, 4, 2], dim=-1)
            return p.sum(-1, keepdim=True) * r - q.mean(-1, keepdim=True), parts[-1] * parts[0], parts[1]
        if k == "joins":
            s = torch.stack([a.sum(1), x.mean(1)], dim=-1)
            return torch.cat([a, x, a.relu()], dim=-1), torch.stack([a, b], dim=-1).flatten(1), s
        if k == "shapes":
            g = a.view(a.size(0), 2, 2)
            return g.transpose(1, 2).reshape(x.shape[0], -1), g.permute(0, -1, -2).flatten(1), g.mT @ g
        if k == "reduce":
            g = a.view(-1, 2, 2)
            return g - g.mean(-1, keepdim=True) + g.mean((1, 2), keepdim=True), g.sum(-2, keepdim=True) * g
        if k == "softmax":
            return F.softmax(a, dim=-1), a.view(-1, 2, 2).log_softmax(1), torch.softmax(a.view(-1, 2, 2), -2)
        if k == "dropout_flags":
            return F.dropout(a, 0.5, training=False), F.dropout(b, 0.3, self.training)
        # the model's own tensors
        if k == "own_tensors":
            return a * self.buf + self.nb - self.frozen, a * self.v + self.p
        if k == "constants":
            return a * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D) + torch.tensor(0.5)
        # element-wise on a tensor read by others
        if k == "detach":
            return a.detach() * a, torch.relu(a.detach())
        # refused
        if k == "detach_inplace":
            d = a.detach()
            d.add_(1.0)
            return a + b
        if k == "inplace_view":
            v = a[:, :2]
            v += 1.0
            return a
        if k == "inplace_read_elsewhere":
            r = a * 1.0
            a.add_(b)
            return r, a
        if k == "bn_buffer":
            y = self.bn(a)
            return y * 2 + x[:, :1] - self.bn.running_mean
        if k == "mode_constant":
            return a * torch.tensor(2.0 if self.training else 3.0, dtype=D)
        if k == "random_constant":
            return a * torch.rand(4, dtype=D)
        if k == "softmax0":
            return F.softmax(a, dim=0)
        if k == "flatten0":
            return a.flatten(0)
        if k == "mean_all":
            return a - a.mean()
        if k == "batch_index":
            return a[1:]
        if k == "chunk0":
            return a.chunk(2, 0)[0]
        if k == "cat0":
            return torch.cat([a, b], dim=0)
        if k == "permute_batch":
            return a.view(-1, 2, 2).permute(1, 0, 2)
        if k == "zeros_like":
            return a + torch.zeros_like(a)
        if k == "rank_broadcast":
            return a.sum(1) - a
        raise AssertionError(k)


EXACT = ["sub", "div", "pow", "scalar_left", "alpha", "param_sides", "matmul_slots", "max_min",
         "self_ops", "b1_bn", "scalar_samples", "shared_bn", "shape_only", "many_readers", "fold_read",
         "dropout_shared", "inplace_fresh", "iadd_expr", "inplace_after_clone", "inplace_act_tied", "index",
         "pieces", "joins", "shapes", "reduce", "softmax", "dropout_flags", "own_tensors",
         "constants", "detach"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", EXACT)
def test_exact(kind, mode):
    torch.manual_seed(0)
    model = Vec(kind).double().train(mode == "train")
    x = _randn(4, 3)
    net = from_module(model, x)
    check_exact(model, net, (_randn(6, 3, seed=1),))


REFUSED = [  # kind, error, text of the line at fault, what the message says
    ("detach_inplace", iternn.ConversionError, "d.add_(1.0)", "in place"),
    ("inplace_view", iternn.ConversionError, "v += 1.0", "in place"),
    ("inplace_read_elsewhere", iternn.ConversionError, "a.add_(b)", "in place"),
    ("bn_buffer", iternn.ConversionError, "self.bn.running_mean", "buffer of the layer 'bn'"),
    ("mode_constant", iternn.ConversionError, "2.0 if self.training", "train/eval"),
    ("random_constant", iternn.ConversionError, "torch.rand(4", "random numbers"),
    ("softmax0", iternn.ConversionError, "F.softmax(a, dim=0)", "batch dim"),
    ("flatten0", iternn.ConversionError, "a.flatten(0)", "mixes the batch"),
    ("mean_all", iternn.ConversionError, "a.mean()", "mixes the batch"),
    ("batch_index", iternn.ConversionError, "a[1:]", "mixes the batch"),
    ("chunk0", iternn.ConversionError, "a.chunk(2, 0)", "batch dim"),
    ("cat0", iternn.ConversionError, "torch.cat([a, b], dim=0)", "mixes the batch"),
    ("permute_batch", iternn.ConversionError, "permute(1, 0, 2)", "batch"),
    ("zeros_like", iternn.ConversionError, "torch.zeros_like", "not supported"),
    ("rank_broadcast", iternn.ConversionError, "a.sum(1) - a", "batch"),
]


@pytest.mark.parametrize("kind, error, text, says", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_node_andsource_line(kind, error, text, says):
    model = Vec(kind).double().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=says) as err:
        from_module(model, _randn(4, 3))
    msg = str(err.value)
    assert source_line(Vec.forward, text) in msg, msg
    assert "node '" in msg or kind == "random_constant", msg  # a constant has no node of its own
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Img(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, img):
        h = self.conv(img)
        if self.kind == "broadcast":
            return h + h.mean((2, 3), keepdim=True), h.amax((2, 3), keepdim=True) - h
        if self.kind == "bn_twice":
            return self.bn(h) - self.bn(h.relu()), F.dropout2d(h, 0.3, self.training)
        if self.kind == "channels":
            return h.permute(0, 3, 1, 2).flatten(1), torch.cat([h, img], dim=-3).log_softmax(1)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["broadcast", "bn_twice", "channels"])
def test_exact_images(kind):
    torch.manual_seed(1)
    model = Img(kind).double().train()
    net = from_module(model, _randn(4, 2, 5, 5))
    check_exact(model, net, (_randn(6, 2, 5, 5, seed=3),))


# ============================================================================ signatures, outputs
class Signature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.emb = nn.Embedding(5, 3)

    def forward(self, x, /, ys, ids, *, d=None, scale: float = 1.5):
        h = self.a(x) * scale + ys[0] - ys[1] + self.emb(ids).sum(1)
        if d is not None:
            h = h + d["u"]
        halves = ids.chunk(2, dim=1)
        return {"h": (h, [h * 2, {"z": torch.tanh(h)}]), "none": None, "s": "text",
                "ids": (ids, ids[:, 0], halves, ids.unbind(1)), "x": x}


def test_signature_nested_outputs_and_integer_pieces():
    torch.manual_seed(2)
    model = Signature().double()
    ids = torch.randint(0, 5, (4, 4))
    net = from_module(model, _randn(4, 3), (_randn(4, 3, seed=1), _randn(4, 3, seed=2)), ids,
                      d={"u": _randn(4, 3, seed=3)})
    args = (_randn(6, 3, seed=4), (_randn(6, 3, seed=5), _randn(6, 3, seed=6)), torch.randint(0, 5, (6, 4)))
    kwargs = {"d": {"u": _randn(6, 3, seed=7)}}
    out = net(*args, **kwargs)
    assert out["ids"][2][1].dtype == torch.int64 and out["ids"][3][0].dtype == torch.int64
    assert out["x"] is args[0]  # the input returned unchanged
    check_exact(model, net, args, kwargs)
    with pytest.raises(iternn.MapError, match="converted for 1.5"):
        net(*args, **kwargs, scale=2.0)


@pytest.mark.parametrize("batch", [1, 7])
def test_other_batch_sizes_and_unbatched(batch):
    torch.manual_seed(3)
    model = Vec("b1_bn").double()
    net = from_module(model, _randn(4, 3))
    check_exact(model, net, (_randn(batch, 3, seed=batch),))
    with pytest.raises(iternn.MapError, match=r"shape \(batch, 3\)"):
        net(_randn(3))


def test_embedding_out_of_range_fails_as_in_the_source():
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten()).double()
    net = from_module(model, torch.randint(0, 10, (4, 2)))
    for bad in (10, -11):
        ids = torch.full((2, 2), bad)
        with pytest.raises(IndexError):
            model(ids)
        with pytest.raises(IndexError):
            net(ids)


def test_float32_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    net = from_module(model, torch.randn(4, 3))
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), net(x), atol=1e-6, rtol=0)
    with pytest.raises(iternn.MapTypeError, match="float32"):
        net(x.double())


# ============================================================================ hooks and copies
def _double(module, args, out):
    return out * 2


@pytest.mark.parametrize("layer, how", [
    (nn.Softmax(-1), "forward"), (nn.Flatten(), "forward"), (nn.Identity(), "forward"),
    (nn.ReLU(), "forward"), (nn.Tanh(), "forward"), (nn.Dropout(0.0), "forward"),
    (nn.Softmax(-1), "pre"), (nn.Linear(4, 4), "backward"),
], ids=["softmax", "flatten", "identity", "relu", "tanh", "dropout", "softmax-pre", "linear-backward"])
def test_hooks_the_converted_model_would_not_call_are_refused(layer, how):
    layer = copy.deepcopy(layer)
    if how == "forward":
        layer.register_forward_hook(_double)
    elif how == "pre":
        layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        layer.register_full_backward_hook(lambda m, gin, gout: (gin[0] * 3,))
    model = nn.Sequential(nn.Linear(3, 4), layer).double()
    with pytest.raises(iternn.ConversionError, match="has hooks") as err:
        from_module(model, _randn(4, 3))
    assert "node 'model_1'" in str(err.value)


def test_forward_hooks_of_blocks_are_kept():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].register_forward_hook(_double)
    model[2].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    net = from_module(model, _randn(4, 3))
    check_exact(model, net, (_randn(5, 3, seed=1),))


class Holds(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        if what == "pruned":
            prune.l1_unstructured(self.fc, "weight", amount=0.5)  # weight: a non-leaf attribute
        else:
            self.lock = threading.Lock()

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("what, says", [("pruned", "computed by autograd"), ("lock", "cannot copy")])
def test_what_cannot_be_copied_is_refused(what, says):
    with pytest.raises(iternn.ConversionError, match=says):
        from_module(Holds(what).double(), _randn(2, 3))


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.calls = 0

    def forward(self, x):
        h = self.bn(self.fc(x))
        self.last = h  # tracing would leave an fx proxy here
        self.calls += 1
        return F.dropout(h, 0.5, self.training)


def test_conversion_leaves_the_source_alone():
    model = Stateful().double().train()
    x = _randn(4, 3)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(9)
    rng = torch.get_rng_state()
    net = from_module(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not hasattr(model, "last") and model.calls == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    check_exact(model, net, (_randn(5, 3, seed=1),))


class Carries(nn.Module):
    """State kept between calls in attributes: the converted model would fix it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 3)
        self.step = 0
        self.prev = torch.zeros(3, dtype=D)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "counter":
            self.step += 1
            return h * self.step
        out = h + self.prev
        self.prev = out.detach().mean(0)
        return out


@pytest.mark.parametrize("kind, text", [("counter", "h * self.step"), ("previous", "h + self.prev")])
def test_state_kept_between_calls_is_refused(kind, text):
    model = Carries(kind).double()
    with pytest.raises(iternn.ConversionError, match="between calls") as err:
        from_module(model, _randn(2, 3))
    assert source_line(Carries.forward, text) in str(err.value)
    assert model.step == 0 and torch.equal(model.prev, torch.zeros(3, dtype=D))


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.seen = torch.zeros(3, dtype=D)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        self.seen.add_(1.0)
        return self.fc(x) + self.seen


def test_in_place_change_of_a_tensor_attribute_is_refused():
    model = Counter().double()
    with pytest.raises(iternn.ConversionError, match="'seen' in place") as err:
        from_module(model, _randn(2, 3))
    assert source_line(Counter.forward, "self.seen.add_(1.0)") in str(err.value)
    assert torch.equal(model.seen, torch.zeros(3, dtype=D))


# ============================================================================ save / load
@pytest.mark.parametrize("kind", ["param_sides", "inplace_act_tied", "pieces", "own_tensors", "constants"])
def test_save_load_round_trip(kind, tmp_path):
    torch.manual_seed(6)
    model = Vec(kind).double().eval()
    net = from_module(model, _randn(4, 3))
    iternn.save(net, tmp_path / "net.safetensors")
    back = iternn.load(tmp_path / "net.safetensors")
    assert type(back) is ModuleMap and back.source_names == net.source_names
    x = _randn(5, 3, seed=2)
    assert _same(back(x), model(x))
    assert len(list(back.parameters())) == len(list(net.parameters()))  # ties kept


def test_integer_pieces_round_trip(tmp_path):
    model = Signature().double().eval()
    ids = torch.randint(0, 5, (4, 4))
    args = (_randn(4, 3), (_randn(4, 3, seed=1), _randn(4, 3, seed=2)), ids)
    net = from_module(model, *args)
    iternn.save(net, tmp_path / "net.safetensors")
    back = iternn.load(tmp_path / "net.safetensors")
    assert _same(back(*args), model(*args))
