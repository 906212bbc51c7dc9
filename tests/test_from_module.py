"""from_module: feed-forward torch models converted exactly into block maps (torch.fx).

Float64 throughout: outputs, input gradients and every parameter gradient agree with the
source within 1e-6, in train and eval mode, for the zoo (tests/zoo.py) and for random
DAGs drawn by hypothesis; so do parameters after Adam steps and batch-norm running
statistics; dropout draws the same masks from the same seed. Every refusal is a named
error whose message names the traced node and the model's source line.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conversion import leaves, source_line
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from zoo import ZOO

import iternn
from iternn.convert import ops
from iternn.convert.module import ModuleMap, from_module

TOL = 1e-6




# ============================================================================ helpers
def _state(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _pairs(model: nn.Module, net: ModuleMap) -> list[tuple[str, Tensor, Tensor]]:
    """(source name, source tensor, converted tensor) for every parameter and buffer; each
    of the source's has a copy and every converted tensor is one of those copies."""
    src, dst = _state(model), _state(net)
    pairs = [(s, src[s], dst[k]) for k, s in net.source_names.items()]
    assert {id(p) for _, p, _ in pairs} == {id(t) for t in src.values()}, "a source tensor has no copy"
    assert set(net.source_names) == set(dst), "a converted tensor is not a copy"
    return pairs


def _close(a, b, tol: float = TOL) -> bool:
    if isinstance(a, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a - b).abs().max() <= tol) \
            if a.numel() else a.shape == b.shape
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return a == b




def _loss(out, weights: list[Tensor]) -> Tensor:
    return sum((y * w).sum() for y, w in zip(leaves(out), weights) if y.is_floating_point())


def check_equivalent(model: nn.Module, net: ModuleMap, args: tuple, kwargs: dict | None = None,
                     *, seed: int = 7) -> None:
    """Outputs, input gradients and parameter gradients of ``net`` equal ``model``'s."""
    kwargs = kwargs or {}
    pairs = [(n, p, q) for n, p, q in _pairs(model, net) if isinstance(p, nn.Parameter)]
    inputs = [a for a in leaves((args, kwargs)) if a.is_floating_point()]
    for a in inputs:
        a.requires_grad_(True)
    torch.manual_seed(seed)
    y_t = model(*args, **kwargs)
    torch.manual_seed(seed)
    y_m = net(*args, **kwargs)
    assert _close(y_t, y_m), "outputs differ"
    weights = [torch.randn_like(y) if y.is_floating_point() else None for y in leaves(y_t)]
    src = [p for _, p, _ in pairs if p.requires_grad]
    dst = [q for _, p, q in pairs if p.requires_grad]
    if not any(y.requires_grad for y in leaves(y_t)):
        return
    g_t = torch.autograd.grad(_loss(y_t, weights), inputs + src, allow_unused=True)
    g_m = torch.autograd.grad(_loss(y_m, weights), inputs + dst, allow_unused=True)
    names = [f"input {i}" for i in range(len(inputs))] + [n for n, p, _ in pairs if p.requires_grad]
    for name, a, b in zip(names, g_t, g_m):
        assert (a is None) == (b is None) or (a if a is not None else b).abs().max() == 0, name
        if a is not None and b is not None:
            assert (a - b).abs().max() <= TOL, f"gradient of {name} differs"


def adam_steps(model: nn.Module, net: ModuleMap, make_args, steps: int = 3) -> None:
    """The same Adam steps on both (same data, same dropout masks): equal parameters and
    buffers (running statistics) afterwards."""
    if not any(True for _ in model.parameters()):
        return
    opt_t = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_m = torch.optim.Adam(net.parameters(), lr=1e-2)
    for k in range(steps):
        args = make_args(k)
        for mod, opt in ((model, opt_t), (net, opt_m)):
            opt.zero_grad()
            torch.manual_seed(100 + k)
            out = mod(*args)
            loss = sum((y.double() ** 2).mean() for y in leaves(out) if y.requires_grad)
            if isinstance(loss, Tensor):
                loss.backward()
            opt.step()
    for name, p, q in _pairs(model, net):
        assert p.shape == q.shape and (p.double() - q.double()).abs().max() <= TOL, name


# ============================================================================ the zoo
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_outputs_gradients_and_training_equal_the_source(name, mode):
    case = ZOO[name]
    model = case.model().train(mode == "train")
    net = from_module(model, *case.inputs(4))
    assert isinstance(net, ModuleMap) and net.training == (mode == "train")
    check_equivalent(model, net, case.inputs(5, seed=1))
    adam_steps(model, net, lambda k: case.inputs(6, seed=10 + k))
    # running statistics moved in train mode, and equally (checked by adam_steps)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns and mode == "train":
        assert all(int(m.num_batches_tracked) == 4 for m in bns)
    check_equivalent(model, net, case.inputs(3, seed=2))


@pytest.mark.parametrize("name", [n for n, c in ZOO.items() if c.dropout])
def test_zoo_dropout_draws_the_same_masks(name):
    case = ZOO[name]
    model = case.model().train()
    net = from_module(model, *case.inputs(4))
    x = case.inputs(8, seed=3)
    torch.manual_seed(11)
    a = model(*x)
    torch.manual_seed(11)
    b = net(*x)
    assert torch.equal(a, b)
    torch.manual_seed(12)
    assert not torch.equal(net(*x), b)  # another seed, other masks: dropout is active
    net.eval()
    model.eval()
    assert torch.equal(model(*x), net(*x))


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_save_load_round_trip(name, tmp_path):
    case = ZOO[name]
    model = case.model().eval()
    net = from_module(model, *case.inputs(2))
    iternn.save(net, tmp_path / "net.safetensors")
    back = iternn.load(tmp_path / "net.safetensors")
    assert type(back) is ModuleMap and not back.training
    assert back.source_names == net.source_names
    x = case.inputs(3, seed=4)
    assert torch.equal(back(*x), net(*x))
    assert torch.equal(back(*x), model(*x))


def test_conversion_leaves_the_source_alone():
    """No random numbers drawn, running statistics untouched, modes kept; the copies
    train apart from the source."""
    case = ZOO["resnet"]
    model = case.model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    net = from_module(model, *case.inputs(4))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_eval_switch_and_mixed_modes():
    case = ZOO["resnet"]
    model = case.model().train()
    model.layer1.bn1.eval()  # a mixed-mode model: one batch norm in eval
    net = from_module(model, *case.inputs(4))
    x = case.inputs(5, seed=6)
    check_equivalent(model, net, x)
    frozen = net.map.block("layer1_relu", "layer1_conv1")
    assert isinstance(frozen, nn.BatchNorm2d) and not frozen.training
    assert sum(isinstance(m, nn.BatchNorm2d) and m.training for m in net.modules()) == 5
    model.eval()
    net.eval()
    assert not any(m.training for m in net.modules())
    check_equivalent(model, net, x)
    model.train()
    net.train()
    check_equivalent(model, net, x)


def test_requires_grad_dtype_and_device_are_copied():
    model = ZOO["glu"].model(dtype=torch.float32)
    model.proj.weight.requires_grad_(False)
    net = from_module(model, *ZOO["glu"].inputs(3, dtype=torch.float32))
    for name, p, q in _pairs(model, net):
        assert q.dtype == torch.float32 and q.device == p.device
        assert q.requires_grad == p.requires_grad, name
    x = ZOO["glu"].inputs(2, dtype=torch.float32)
    assert torch.allclose(model(*x), net(*x), atol=1e-6)
    with pytest.raises(iternn.MapTypeError, match="float64"):
        net(x[0].double())


# ============================================================================ structure
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = x + self.fc2(torch.relu(self.fc1(x)))
        g = torch.tanh(h)  # h is read twice: tanh cannot fold into h's slot
        return self.head(g) * 2.0, torch.cat([h, g], dim=1)


def test_structure_skip_fold_cat_and_product():
    torch.manual_seed(0)
    model = Residual().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    net = from_module(model, x)
    m = net.map
    # x + f(x): one slot, an identity block from x and f's last block (fc2)
    assert set(m.sources("add")) == {"x", "relu"}
    assert type(m.block("add", "x")) is nn.Identity and type(m.block("add", "relu")) is nn.Linear
    assert isinstance(m.activation("relu"), nn.ReLU)  # folded: relu(fc1(x)) is one slot
    # h is read twice: tanh gets its own slot fed by an identity block
    assert type(m.block("tanh", "add")) is nn.Identity and isinstance(m.activation("tanh"), nn.Tanh)
    # the scalar product folds into the head's slot; cat is two placement blocks
    assert isinstance(m.activation("mul"), ops.ScalarOp)
    assert {type(m.block("cat", s)) for s in ("add", "tanh")} == {ops.Place}
    assert list(m.slots) == ["x", "relu", "add", "tanh", "mul", "cat"]  # fx order
    check_equivalent(model, net, (torch.randn(5, 4, dtype=torch.float64),))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x)) + x.sum(dim=1, keepdim=True)


def test_product_is_a_multi_source_block_and_broadcast_sum():
    torch.manual_seed(1)
    model = Gated().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    net = from_module(model, x)
    m = net.map
    (key,) = [src for dst, src in m.edges if isinstance(src, tuple)]
    assert isinstance(m.block("add", key), ops.BinaryOp) and key == ("a", "sigmoid")
    assert isinstance(m.block("add", "sum_1"), ops.Broadcast)
    check_equivalent(model, net, (torch.randn(6, 3, dtype=torch.float64),))


class Ordered(nn.Module):
    """Dropouts whose order a careless schedule would change: level order would run the
    shallow branch first, and folding ``drop(first)`` into ``first``'s slot would draw its
    mask before the others."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(6, 6) for _ in range(4))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        first = self.l0(x)
        deep = self.drop(self.l2(torch.relu(self.l1(x))))
        shallow = F.dropout(self.l3(x), 0.5, self.training)
        late = self.drop(first)
        return deep + shallow + late + self.drop(x)


def test_random_draws_keep_the_source_order():
    torch.manual_seed(2)
    model = Ordered().double().train()
    x = torch.randn(16, 6, dtype=torch.float64)
    net = from_module(model, x)
    # drop(first) has a slot of its own (drawn last), not an activation of first's slot
    assert type(net.map.block("drop_1", "l0")) is nn.Identity and net.map.activation("l0") is None
    assert isinstance(net.map.activation("drop_1"), nn.Dropout)
    for seed in range(3):
        torch.manual_seed(seed)
        a = model(x)
        torch.manual_seed(seed)
        assert torch.equal(a, net(x))
    model.eval()
    net.eval()
    assert torch.equal(model(x), net(x))


class Shared(nn.Module):
    """A module used twice and a weight tied between two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 5)
        self.out.weight = self.fc.weight

    def forward(self, x):
        a = self.bn(self.fc(x))
        b = self.bn(self.fc(torch.tanh(a)))  # the same batch norm twice: stats move twice
        return self.out(a + b)


def test_shared_modules_and_tied_weights_stay_shared():
    torch.manual_seed(3)
    model = Shared().double().train()
    x = torch.randn(7, 5, dtype=torch.float64)
    net = from_module(model, x)
    fcs = [b for b in net.map.blocks.values() if isinstance(b, nn.Linear)]
    assert len(fcs) == 3 and fcs[0] is fcs[1] and fcs[2].weight is fcs[0].weight
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())
    check_equivalent(model, net, (x,))
    adam_steps(model, net, lambda k: (torch.randn(7, 5, dtype=torch.float64),))
    assert int(model.bn.num_batches_tracked) == 8  # 4 forwards, 2 calls each


# ============================================================================ signatures
class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x, pair, *, extra, scale=2.0, flag=True):
        a, b = pair
        h = self.enc(x) + self.emb(extra["ids"]).sum(dim=1) * scale
        if flag:  # a Python bool: fixed at conversion
            h = h + a * b
        return {"h": h, "parts": (torch.relu(h), h.sum(dim=1)), "n": 3, "ids": extra["ids"]}


def test_several_inputs_outputs_keywords_and_embedding():
    torch.manual_seed(4)
    model = MultiIO().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    pair = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    ids = torch.randint(0, 10, (3, 2))
    net = from_module(model, x, pair, extra={"ids": ids})
    assert str(net.signature) == str(inspect.signature(model.forward))
    assert net.inputs == ("x", "pair_0", "pair_1", "extra_ids")
    assert isinstance(next(b for b in net.map.blocks.values() if isinstance(b, ops.IndexEmbedding)),
                      ops.IndexEmbedding)
    ids2 = torch.randint(0, 10, (6, 2))
    x2 = torch.randn(6, 3, dtype=torch.float64)
    pair2 = (torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64))
    out = net(x2, pair2, extra={"ids": ids2}, scale=2.0)
    assert out["n"] == 3 and out["ids"].dtype == torch.int64 and torch.equal(out["ids"], ids2)
    assert out["parts"][1].shape == (6,)
    check_equivalent(model, net, (x2, pair2), {"extra": {"ids": ids2}})
    with pytest.raises(iternn.MapError, match="converted for 2.0"):
        net(x2, pair2, extra={"ids": ids2}, scale=3.0)
    with pytest.raises(iternn.MapTypeError, match="integer"):
        net(x2, pair2, extra={"ids": ids2.double()})
    with pytest.raises(iternn.MapTypeError, match="pair"):
        net(x2, list(pair2), extra={"ids": ids2})
    with pytest.raises(iternn.MapError, match=r"pair\[1\] has batch size 5"):
        net(x2, (pair2[0], pair2[1][:5]), extra={"ids": ids2})
    with pytest.raises(iternn.MapTypeError, match="extra"):
        net(x2, pair2)


def test_embedding_indices_must_be_exact_in_the_slot_dtype():
    model = nn.Sequential(nn.Embedding(100, 3), nn.Flatten())
    net = from_module(model, torch.randint(0, 100, (2, 4)))
    assert net.map.shapes["input"] == (4,) and next(net.parameters()).dtype == torch.float32
    with pytest.raises(iternn.MapError, match="beyond 2\\*\\*24"):
        net(torch.full((1, 4), 2**24 + 1))
    with pytest.raises(IndexError):  # out of range for the embedding, as in the source
        net(torch.full((1, 4), 100))
    big = nn.Embedding(2**11 + 2, 1, dtype=torch.float16)  # float16 is exact up to 2**11
    with pytest.raises(iternn.ConversionError, match="not be exact"):
        from_module(nn.Sequential(big), torch.zeros(2, 1, dtype=torch.long))


class Shapes(nn.Module):
    """Shape operations, functional layers and operations with the model's tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.scale = nn.Parameter(torch.randn(3, 1, 1))
        self.mix = nn.Parameter(torch.randn(3, 3))
        self.register_buffer("shift", torch.randn(4))
        self.ln_w = nn.Parameter(torch.randn(4))
        self.ln_b = nn.Parameter(torch.randn(4))
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.sm = nn.Softmax(dim=1)

    def forward(self, img):
        x = self.conv(img) * self.scale - 0.5  # (B, 3, 4, 4)
        p = x.permute(0, 2, 3, 1).reshape(img.shape[0], 16, 3)  # (B, 16, 3)
        a, b, c = p.unbind(dim=2)  # (B, 16) each
        s = torch.stack([a, b.clamp(min=-1.0), c], dim=1).unsqueeze(-1).squeeze(3)  # (B, 3, 16)
        v = s.view(-1, 48)[:, ::2]  # (B, 24)
        v = F.linear(v[..., :6].exp().neg(), self.w) + self.shift  # (B, 4)
        y = F.layer_norm(v, (4,), self.ln_w, self.ln_b).expand(-1, -1).transpose(1, 1)
        parts = torch.split(x.flatten(2), [6, 10], dim=2)
        z = torch.cat([parts[1], parts[0], parts[1]], dim=-1).narrow(2, 1, 8)
        m = F.avg_pool2d(x, 2).amax(dim=(2, 3)) + z.mean(-1) @ self.mix
        q = self.sm(x.mean(dim=(2, 3), keepdim=True).squeeze(-1).squeeze(-1)) ** 2
        return y, m.abs().sqrt(), q, v.sum(1), (y[:, None, 1:3] / 3).square()


def test_shape_operations_functional_layers_and_model_tensors():
    torch.manual_seed(5)
    model = Shapes().double()
    img = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    net = from_module(model, img)
    kinds = {type(b) for b in net.map.blocks.values()}
    assert {ops.Permute, ops.Reshape, ops.Index, ops.Place, ops.TensorOp, ops.Reduce,
            nn.Linear, nn.LayerNorm, nn.AvgPool2d, nn.Softmax} <= kinds
    check_equivalent(model, net, (torch.randn(5, 3, 4, 4, dtype=torch.float64),))
    adam_steps(model, net, lambda k: (torch.randn(4, 3, 4, 4, dtype=torch.float64),))


class Layers(nn.Module):
    """The other supported layers, and every element-wise layer, in train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.gn = nn.GroupNorm(1, 3)
        self.drop2d = nn.Dropout2d(0.3)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.unflat = nn.Unflatten(1, (3, 4))
        self.conv1d = nn.Conv1d(3, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.up1d = nn.ConvTranspose1d(4, 2, 3)
        self.mp1d = nn.MaxPool1d(2)
        self.ap1d = nn.AvgPool1d(3)
        self.amp1d = nn.AdaptiveAvgPool1d(2)
        self.acts = nn.Sequential(nn.Softplus(2.0), nn.Mish(), nn.Hardswish(), nn.Hardsigmoid(),
                                  nn.ReLU6(), nn.SELU(), nn.CELU(0.5), nn.Softsign(), nn.LogSigmoid(),
                                  nn.LeakyReLU(0.2), nn.ELU(), nn.SiLU())
        self.lsm = nn.LogSoftmax(dim=-1)

    def forward(self, img):
        h = self.drop2d(self.gn(self.up(img)))  # (B, 3, 4, 4)
        f = self.unflat(self.pool(h).flatten(1))  # (B, 3, 4)
        g = self.up1d(self.bn1d(self.conv1d(f)))  # (B, 2, 6)
        a = self.ap1d(g) + self.amp1d(g) + self.mp1d(g)[..., :2]  # (B, 2, 2)
        return self.lsm(self.acts(a.flatten(1))), F.relu6(F.selu(g)).amin(-1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_layers_and_activations(mode, tmp_path):
    torch.manual_seed(8)
    model = Layers().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm1d)):
                m.weight.normal_()
                m.bias.normal_()
    model.train(mode == "train")
    img = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    net = from_module(model, img)
    check_equivalent(model, net, (torch.randn(6, 2, 2, 2, dtype=torch.float64),))
    adam_steps(model, net, lambda k: (torch.randn(5, 2, 2, 2, dtype=torch.float64),))
    iternn.save(net, tmp_path / "net.safetensors")
    back = iternn.load(tmp_path / "net.safetensors")
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    torch.manual_seed(1)
    want = net(x)
    torch.manual_seed(1)
    assert _close(back(x), want, 0.0)


def test_hardtanh_converts_but_is_not_saved_yet(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Hardtanh(-0.5, 0.5)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    net = from_module(model, x)
    check_equivalent(model, net, (x,))
    with pytest.raises(iternn.MapTypeError, match="Hardtanh"):
        iternn.save(net, tmp_path / "net.safetensors")


# ============================================================================ random DAGs
_ACTS = {
    "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu,
    "silu": F.silu, "elu": F.elu, "leaky": lambda h: F.leaky_relu(h, 0.1),
    "softplus": F.softplus, "neg": torch.neg, "affine": lambda h: 1.5 - h * 0.5,
    "mod_relu": None, "mod_tanh": None, "mod_gelu": None,  # modules of the model
}


class Dag(nn.Module):
    """A random feed-forward program over vectors: linear layers, element-wise functions,
    dropout, sums (skips), products, concatenations; several outputs."""

    def __init__(self, program: list, d_in: int) -> None:
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList()
        self.drop = nn.Dropout(0.3)
        self.acts = nn.ModuleDict({"mod_relu": nn.ReLU(), "mod_tanh": nn.Tanh(), "mod_gelu": nn.GELU()})
        widths = [d_in]
        for step in program:
            kind = step[0]
            if kind == "linear":
                self.layers.append(nn.Linear(widths[step[1]], step[2]))
                widths.append(step[2])
            elif kind == "cat":
                widths.append(sum(widths[i] for i in step[1]))
            else:
                widths.append(widths[step[1]])
        self.widths = widths

    def forward(self, x):
        vals, k = [x], 0
        for step in self.program:
            kind = step[0]
            if kind == "linear":
                vals.append(self.layers[k](vals[step[1]]))
                k += 1
            elif kind == "act":
                fn = _ACTS[step[2]] or self.acts[step[2]]
                vals.append(fn(vals[step[1]]))
            elif kind == "drop":
                v = vals[step[1]]
                vals.append(self.drop(v) if step[2] else F.dropout(v, 0.25, self.training))
            elif kind == "add":
                vals.append(vals[step[1]] + vals[step[2]])
            elif kind == "sub":
                vals.append(vals[step[1]] - vals[step[2]])
            elif kind == "mul":
                vals.append(vals[step[1]] * vals[step[2]])
            elif kind == "cat":
                vals.append(torch.cat([vals[i] for i in step[1]], dim=1))
        return vals[-1], vals[len(vals) // 2]


@st.composite
def dags(draw):
    d_in = draw(st.integers(1, 5))
    widths = [d_in]
    program = []
    for _ in range(draw(st.integers(1, 9))):
        kind = draw(st.sampled_from(["linear", "linear", "act", "drop", "add", "sub", "mul", "cat"]))
        i = draw(st.integers(0, len(widths) - 1))
        same = [j for j, w in enumerate(widths) if w == widths[i]]
        if kind in ("add", "sub", "mul"):
            program.append((kind, i, same[draw(st.integers(0, len(same) - 1))]))
        elif kind == "cat":
            more = draw(st.lists(st.integers(0, len(widths) - 1), min_size=1, max_size=3))
            program.append(("cat", [i, *more]))
        elif kind == "act":
            program.append(("act", i, draw(st.sampled_from(sorted(_ACTS)))))
        elif kind == "drop":
            program.append(("drop", i, draw(st.booleans())))
        else:
            program.append(("linear", i, draw(st.integers(1, 6))))
        step = program[-1]
        widths.append(step[2] if kind == "linear" else sum(widths[j] for j in step[1])
                      if kind == "cat" else widths[i])
    seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dag(program, d_in).double()
    return model, seed


@settings(max_examples=30)
@given(dags(), st.sampled_from(["train", "eval"]))
def test_random_dags_equal_the_source(arch, mode):
    model, seed = arch
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, model.widths[0], dtype=torch.float64, generator=g)
    net = from_module(model, x)
    assert list(net.map.slots)[0] == "x"
    check_equivalent(model, net, (torch.randn(6, model.widths[0], dtype=torch.float64, generator=g),))
    adam_steps(model, net, lambda k: (torch.randn(5, model.widths[0], dtype=torch.float64,
                                                  generator=g),))


@settings(max_examples=10)
@given(arch=dags())
def test_random_dags_save_load(tmp_path_factory, arch):
    model, seed = arch
    x = torch.randn(3, model.widths[0], dtype=torch.float64)
    net = from_module(model.eval(), x)
    path = tmp_path_factory.mktemp("dag") / "net.safetensors"
    iternn.save(net, path)
    back = iternn.load(path)
    assert _close(back(x), net(x), 0.0)


# ============================================================================ refusals
class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.lstm = nn.LSTM(3, 3, batch_first=True)

    def forward(self, x):
        h = self.fc(x)
        return self.lstm(h.unsqueeze(1))[0]


def test_unsupported_module_names_node_andsource_line():
    with pytest.raises(iternn.ConversionError) as err:
        from_module(WithLSTM(), torch.randn(2, 3))
    msg = str(err.value)
    assert "node 'model_lstm'" in msg and "LSTM" in msg and source_line(WithLSTM.forward, "self.lstm(") in msg


class Subclassed(nn.Module):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = Subclassed.MyLinear(3, 3)

    def forward(self, x):
        return self.fc(x)


def test_subclass_of_a_supported_module_is_traced_through():
    """A user subclass is not a torch.nn leaf: fx traces its forward (F.linear, *2)."""
    model = Subclassed().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    check_equivalent(model, from_module(model, x), (x,))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            return h
        return -h


def test_data_dependent_control_flow_names_node_andsource_line():
    with pytest.raises(iternn.ConversionError, match="data-dependent control flow") as err:
        from_module(Branchy(), torch.randn(2, 3))
    assert "'gt'" in str(err.value) and source_line(Branchy.forward, "if h.sum()") in str(err.value)


class Mutates(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if self.how == "method":
            x.add_(1.0)
        elif self.how == "augmented":
            x += 1.0
        elif self.how == "setitem":
            x[:, 0] = 0.0
        elif self.how == "relu":
            x = F.relu(x, inplace=True)
        return self.fc(x)


@pytest.mark.parametrize("how, text", [("method", "x.add_(1.0)"), ("augmented", "x += 1.0"),
                                        ("setitem", "x[:, 0] = 0.0"),
                                        ("relu", "x = F.relu(x, inplace=True)")])
def test_in_place_change_of_an_input_is_refused(how, text):
    x = torch.randn(2, 3)
    keep = x.clone()
    with pytest.raises(iternn.ConversionError, match="in place") as err:
        from_module(Mutates(how), x)
    assert source_line(Mutates.forward, text) in str(err.value) and "'x'" in str(err.value)
    assert torch.equal(x, keep)  # the example itself was not changed


class SharedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        g = h * 2
        h += 1.0  # g was read before: fine in torch, but h is also returned
        return g, h.relu_(), h


def test_in_place_change_of_a_shared_tensor_names_node_andsource_line():
    with pytest.raises(iternn.ConversionError, match="also read elsewhere") as err:
        from_module(SharedInPlace(), torch.randn(2, 3))
    assert "'add'" in str(err.value) and source_line(SharedInPlace.forward, "h += 1.0") in str(err.value)


class InPlaceFine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        h = self.bn(self.fc(x))
        h += x
        h = h.mul_(0.5)
        g = self.fc(h).add_(1.0)
        return F.relu(g, inplace=True) - 1


def test_in_place_on_fresh_tensors_converts():
    torch.manual_seed(6)
    model = InPlaceFine().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    net = from_module(model, x)
    check_equivalent(model, net, (torch.randn(5, 3, dtype=torch.float64),))


class Unsupported(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        if self.what == "sort":
            return torch.sort(x, dim=1).values
        if self.what == "cumsum":
            return x.cumsum(1)
        if self.what == "view":
            return x.view(-1)
        if self.what == "sum0":
            return x.sum(0)
        if self.what == "transpose":
            return x.transpose(0, 1)
        if self.what == "index":
            return x[0]
        if self.what == "param":
            return x @ self.w.t()
        if self.what == "fixed":
            return x.view(4, 3)
        if self.what == "squeeze":
            return x.unsqueeze(1).squeeze()
        if self.what == "zeros":
            return x + torch.zeros(x.shape[1])
        return x


@pytest.mark.parametrize("what, node, text, pattern", [
    ("sort", "sort", "torch.sort(x", "torch.sort is not supported"),
    ("cumsum", "cumsum", "x.cumsum(1)", "cumsum.*not supported"),
    ("view", "view", "x.view(-1)", "mixes the batch dim"),
    ("sum0", "sum_1", "x.sum(0)", "batch dim"),
    ("transpose", "transpose", "x.transpose(0, 1)", "batch dim"),
    ("index", "getitem", "x[0]", "batch dim"),
    ("param", "t", "self.w.t()", "alone"),
    ("fixed", "view", "x.view(4, 3)", "batch one larger"),
    ("squeeze", "squeeze", ".squeeze()", "name the dims"),
    ("zeros", "zeros", "torch.zeros(x.shape[1])", "constants alone"),
])
def test_unconvertible_operations_name_node_andsource_line(what, node, text, pattern):
    with pytest.raises(iternn.ConversionError, match=pattern) as err:
        from_module(Unsupported(what), torch.randn(4, 3))
    assert f"node {node!r}" in str(err.value) or node in str(err.value)
    assert source_line(Unsupported.forward, text) in str(err.value)


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * 2
        return h


def test_code_that_depends_on_the_mode_is_refused():
    with pytest.raises(iternn.ConversionError, match="train/eval") as err:
        from_module(ModeDependent(), torch.randn(2, 3))
    assert source_line(ModeDependent.forward, "return h") in str(err.value) or "mul" in str(err.value)


class NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        with torch.no_grad():
            target = self.fc(x)
        return self.fc(x) - target


def test_autograd_switches_inside_forward_are_refused():
    """torch.fx drops ``with torch.no_grad()``: the gradients would differ silently."""
    with pytest.raises(iternn.ConversionError, match="switches autograd") as err:
        from_module(NoGrad(), torch.randn(2, 3))
    assert source_line(NoGrad.forward, "with torch.no_grad()") in str(err.value)


class FrozenNorm(Residual):
    def train(self, mode: bool = True):
        super().train(mode)
        self.fc1.eval()
        return self


def test_a_train_override_is_refused():
    with pytest.raises(iternn.ConversionError, match="overrides train"):
        from_module(FrozenNorm(), torch.randn(2, 4))


def test_hooks_on_traced_modules_are_refused():
    model = ZOO["resnet"].model()
    model.layer1.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(iternn.ConversionError, match="layer1 .*hooks"):
        from_module(model, *ZOO["resnet"].inputs(2))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, y=None):
        return self.fc(x) if y is None else self.fc(x) + y


@pytest.mark.parametrize("args, kwargs, error, pattern", [
    ((), {}, iternn.MapTypeError, "do not fit"),
    (("text",), {}, iternn.MapTypeError, "tensor"),
    ((torch.tensor(1.0),), {}, iternn.MapError, "0-dim"),
    ((torch.randn(2, 3), torch.randn(3, 2)), {}, iternn.MapError, "batch size 3"),
    ((torch.randn(2, 4),), {}, iternn.MapError, "fails on the example arguments"),
    ((torch.randn(2, 3),), {"z": 1}, iternn.MapTypeError, "do not fit"),
    ((torch.randn(2, 3) > 0,), {}, iternn.MapTypeError, "bool"),
    (({1, 2},), {}, iternn.MapTypeError, "set"),
])
def test_bad_example_arguments(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        from_module(Plain(), *args, **kwargs)


def test_not_a_module():
    with pytest.raises(iternn.MapTypeError, match="nn.Module"):
        from_module(lambda x: x, torch.randn(2, 3))


def test_call_checks_its_arguments():
    model = Plain().double()
    net = from_module(model, torch.randn(2, 3, dtype=torch.float64))
    assert net(torch.randn(5, 3, dtype=torch.float64)).shape == (5, 2)
    with pytest.raises(iternn.MapError, match=r"shape \(batch, 3\)"):
        net(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(iternn.MapTypeError, match="float64"):
        net(torch.randn(5, 3))
    with pytest.raises(iternn.MapError, match="converted for None"):
        net(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(iternn.MapTypeError, match="takes"):
        net(torch.randn(5, 3, dtype=torch.float64), 1, 2)
    y = torch.randn(2, 2, dtype=torch.float64)
    both = from_module(model, torch.randn(2, 3, dtype=torch.float64), y)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    assert torch.allclose(both(x, y), model(x, y), atol=TOL, rtol=0)


def test_save_refuses_constants_json_cannot_hold(tmp_path):
    model = Plain().double()
    net = from_module(model, torch.randn(2, 3, dtype=torch.float64), float("nan"))
    with pytest.raises(iternn.MapTypeError, match="JSON"):
        iternn.save(net, tmp_path / "net.safetensors")


def test_module_map_constructor_refuses_bad_templates():
    m = iternn.BlockMap({"x": 2, "y": 2})
    m.connect("y", "x", nn.Linear(2, 2))
    good = [["x", "positional_or_keyword", None, {"input": "x", "shape": [2], "integer": False}]]
    out = {"output": "y", "shape": [2], "dtype": None}
    net = ModuleMap(m, good, out)
    assert net(torch.ones(3, 2)).shape == (3, 2)
    with pytest.raises(iternn.MapError, match="not a slot"):
        ModuleMap(m, good, {"output": "z", "shape": [2], "dtype": None})
    with pytest.raises(iternn.MapError, match="has incoming blocks"):
        ModuleMap(m, [["x", "positional_or_keyword", None,
                       {"input": "y", "shape": [2], "integer": False}]], out)
    with pytest.raises(iternn.MapError, match="kind"):
        ModuleMap(m, [["x", "varargs", None, good[0][3]]], out)
    with pytest.raises(iternn.MapError, match="shape"):
        ModuleMap(m, good, {"output": "y", "shape": [3], "dtype": None})
    with pytest.raises(iternn.MapError, match="sources"):
        ModuleMap(m, good, out, sources={"nope": "fc.weight"})


def test_ops_blocks_refuse_bad_arguments():
    with pytest.raises(iternn.MapError):
        ops.Reshape((2, 3), (4,))
    with pytest.raises(iternn.MapError):
        ops.Permute((0, 0))
    with pytest.raises(iternn.MapError):
        ops.Place((2,), (4,), 0, [[0, 2], [1, 3]])
    with pytest.raises(iternn.MapError):
        ops.UnaryOp("cube")
    with pytest.raises(iternn.MapTypeError):
        ops.ScalarOp("add", "1")
    with pytest.raises(iternn.MapError):
        ops.Reduce("mean", (2, 3), (2,))
    z = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(ops.Place((3,), (2, 3), 0, [[1, 2]])(z[:, 0]),
                       torch.tensor([[[0.0, 0, 0], [0, 1, 2]]]))
    assert torch.equal(ops.Place((2, 3), (2, 9), 1, [[0, 3], [6, 9]])(z)[..., 6:], z)
    assert torch.equal(ops.Index((2, 3), [1, [None, None, 2]])(z), z[:, 1, ::2])
    assert math.isclose(float(ops.Reduce("sum", (2, 3), (0, 1))(z)), 15.0)
