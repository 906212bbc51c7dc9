"""iternn.io: save/load round trips (bit for bit, sharing kept), no pickle, named errors."""

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import iternn
from iternn import io
from iternn.io import FormatError, load, save

BlockMap = iternn.BlockMap

# tmp_path is shared by the examples of one hypothesis test; each example overwrites
# the same file, which also exercises replacing an existing file.
many = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------- helpers
def roundtrip(model, tmp_path, name="model.safetensors"):
    path = tmp_path / name
    save(model, path)
    return load(path)


def sharing(model):
    """Which parameter keys / module paths name the same object, as a partition."""
    def groups(items):
        first = {}
        return [first.setdefault(id(obj), key) for key, obj in items]
    return (
        groups(model.named_parameters(remove_duplicate=False)),
        groups(model.named_modules(remove_duplicate=False)),
    )


def assert_same_model(a, b):
    assert type(b) is type(a)
    assert [(p, type(m)) for p, m in b.named_modules(remove_duplicate=False)] == [
        (p, type(m)) for p, m in a.named_modules(remove_duplicate=False)
    ]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sb) == list(sa)  # same keys, same order (optimizer states line up)
    for k in sa:
        assert sb[k].dtype == sa[k].dtype, k
        assert torch.equal(sb[k], sa[k]), k
    assert [m.training for m in b.modules()] == [m.training for m in a.modules()]
    assert [p.requires_grad for p in b.parameters()] == [p.requires_grad for p in a.parameters()]
    assert sharing(b) == sharing(a)
    assert len(list(b.parameters())) == len(list(a.parameters()))


def same_output(a, b, *args, seed=0):
    torch.manual_seed(seed)
    ya = a(*args)
    torch.manual_seed(seed)
    yb = b(*args)
    return ya, yb


def tensors_and_doc(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["iternn"]), meta


def write_bad(path, tensors, doc, meta=None):
    meta = dict(meta or {})
    meta["iternn"] = doc if isinstance(doc, str) else json.dumps(doc)
    save_file(tensors, str(path), metadata=meta)


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    return iternn.from_mlp(mlp)


# ---------------------------------------------------------------------------- round trips
ACTS = [
    nn.ReLU, lambda: nn.LeakyReLU(0.2), nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.GELU("tanh"),
    lambda: nn.ELU(0.5), nn.SiLU, nn.Identity, lambda: nn.Dropout(0.3),
]


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 7), min_size=2, max_size=5))
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        for _ in range(draw(st.integers(0, 2))):
            layers.append(draw(st.sampled_from(ACTS))())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    seq = nn.Sequential(*layers).to(dtype)
    seq.train(draw(st.booleans()))
    return seq, widths, dtype


@many
@given(mlps(), st.integers(1, 3))
def test_mlp_roundtrip_bit_for_bit(tmp_path, arch, batch):
    seq, widths, dtype = arch
    net = iternn.from_mlp(seq)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    assert loaded.map.slots == net.map.slots and loaded.steps == net.steps
    assert all(p.dtype == dtype for p in loaded.parameters())
    x = torch.randn(batch, widths[0], dtype=dtype)
    ya, yb = same_output(net, loaded, x)  # same RNG stream: dropout masks agree in train mode
    assert yb.dtype == dtype and torch.equal(ya, yb)
    net.eval(), loaded.eval()
    assert torch.equal(net(x), loaded(x))


def test_activation_options_survive(tmp_path):
    seq = nn.Sequential(
        nn.Linear(2, 3), nn.LeakyReLU(0.2), nn.Linear(3, 3), nn.GELU("tanh"), nn.Linear(3, 3),
        nn.ELU(0.5), nn.Dropout(0.25), nn.Linear(3, 1), nn.SiLU(),
    )
    loaded = roundtrip(iternn.from_mlp(seq), tmp_path)
    acts = loaded.map.activations
    assert acts["h1"].negative_slope == 0.2
    assert acts["h2"].approximate == "tanh"
    assert acts["h3"][0].alpha == 0.5 and acts["h3"][1].p == 0.25
    assert type(acts["y"]) is nn.SiLU


def test_sequential_names_and_inplace_flags(tmp_path):
    from collections import OrderedDict

    seq = nn.Sequential(OrderedDict([
        ("proj", nn.Linear(3, 4)), ("act", nn.ReLU(inplace=True)),
        ("drop", nn.Dropout(0.1, inplace=True)), ("norm", nn.LayerNorm(4, eps=1e-3, bias=False)),
        ("elu", nn.ELU(0.5, inplace=True)),
    ]))
    loaded = roundtrip(seq, tmp_path)
    assert_same_model(seq, loaded)
    assert list(loaded._modules) == ["proj", "act", "drop", "norm", "elu"]
    assert loaded.act.inplace and loaded.drop.inplace and loaded.elu.inplace
    assert loaded.norm.eps == 1e-3 and loaded.norm.bias is None
    seq.eval(), loaded.eval()
    x = torch.randn(2, 3)
    assert torch.equal(seq(x), loaded(x))


def cyclic_map(dtype):
    torch.manual_seed(1)
    m = BlockMap({"x": 3, "h": 4, "g": 4, "y": 2})
    m.connect("h", "x", nn.Linear(3, 4, bias=False, dtype=dtype))
    m.connect("h", "h", nn.Linear(4, 4, bias=True, dtype=dtype))  # a cycle
    m.connect("g", "h", nn.Sequential(nn.Linear(4, 4, dtype=dtype), nn.Tanh()))
    m.connect("h", "g", nn.Linear(4, 4, bias=False, dtype=dtype))  # a longer cycle
    m.connect("y", "h", nn.Linear(4, 2, bias=False, dtype=dtype))
    m.connect("y", "x", nn.Linear(3, 2, bias=False, dtype=dtype))  # shared destination
    m.set_bias("h", torch.randn(4, dtype=dtype))
    m.set_bias("y", torch.randn(2, dtype=dtype))
    m.set_activation("h", nn.Tanh())
    m.set_activation("g", nn.Sigmoid())
    return m



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_built_map_with_cycles_and_shared_destination(tmp_path, dtype):
    m = cyclic_map(dtype)
    loaded = roundtrip(m, tmp_path)
    assert_same_model(m, loaded)
    assert loaded.edges == m.edges
    assert loaded.impulse_response_length() == m.impulse_response_length()
    state = {s: torch.randn(5, n, dtype=dtype) for s, n in m.slots.items()}
    a, b = m(state), loaded(state)
    assert all(torch.equal(a[s], b[s]) and b[s].dtype == dtype for s in m.slots)
    run_a = iternn.iterate(m, state, 6, hold=("x",))
    run_b = iternn.iterate(loaded, state, 6, hold=("x",))
    assert all(torch.equal(run_a[s], run_b[s]) for s in m.slots)
    net = iternn.MapModule(m, steps=5)
    net_b = roundtrip(net, tmp_path, "net.safetensors")
    assert net_b.steps == 5 and torch.equal(net(state["x"]), net_b(state["x"]))


def test_nested_map_module_as_block(tmp_path):
    inner = small_net()
    outer = BlockMap({"x": 3, "h": 2, "y": 2})
    outer.connect("h", "x", inner)
    outer.connect("y", "h", nn.Linear(2, 2, dtype=torch.float64))
    outer.set_activation("y", nn.ReLU())
    net = iternn.MapModule(outer)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    assert type(loaded.map.block("h", "x")) is iternn.MapModule
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(net(x), loaded(x))


def test_module_used_twice_stays_one_module(tmp_path):
    m = BlockMap({"x": 3, "h": 3, "y": 3})
    lin = nn.Linear(3, 3, dtype=torch.float64)
    m.connect("h", "x", lin)
    m.connect("y", "h", lin)  # the same block twice: tied weights
    m.set_activation("h", nn.Tanh())
    net = iternn.MapModule(m)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    a, b = loaded.map.block("h", "x"), loaded.map.block("y", "h")
    assert a is b and len(list(loaded.parameters())) == 2
    tensors, doc, _ = tensors_and_doc(tmp_path / "model.safetensors")
    assert set(tensors) == {"map.blocks.h<-x.weight", "map.blocks.h<-x.bias"}  # stored once
    assert doc["aliases"] == {"map.blocks.y<-h.weight": "map.blocks.h<-x.weight",
                              "map.blocks.y<-h.bias": "map.blocks.h<-x.bias"}
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(net(x), loaded(x))
    with torch.no_grad():  # one parameter, used in two places
        a.weight.add_(1.0)
        lin.weight.add_(1.0)
    assert torch.equal(net(x), loaded(x))


def test_parameter_tied_across_two_modules(tmp_path):
    m = BlockMap({"x": 3, "h": 3, "y": 3})
    first = m.connect("h", "x", nn.Linear(3, 3, bias=False, dtype=torch.float64))
    second = m.connect("y", "h", nn.Linear(3, 3, bias=False, dtype=torch.float64))
    second.weight = first.weight  # two modules, one parameter
    m.set_bias("h", torch.randn(3, dtype=torch.float64))
    m.biases["y"] = m.bias("h")  # one bias for two slots
    net = iternn.MapModule(m)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    lm = loaded.map
    assert lm.block("h", "x") is not lm.block("y", "h")
    assert lm.block("h", "x").weight is lm.block("y", "h").weight
    assert lm.bias("h") is lm.bias("y")
    assert len(list(loaded.parameters())) == 2
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(net(x), loaded(x))  # the engine's plans see the tied bias
    with torch.no_grad():
        lm.bias("h").add_(1.0)
        m.bias("h").add_(1.0)
    assert torch.equal(net(x), loaded(x))
    # The same map inside a block without in_features: connecting it while loading runs
    # it once (a probe), which makes the engine cache a plan before the tying is restored.
    outer = BlockMap({"x": 3, "y": 3})
    outer.connect("y", "x", nn.Sequential(net, nn.Tanh()))
    loaded = roundtrip(outer, tmp_path, "outer.safetensors")
    inner = loaded.block("y", "x")[0].map
    assert inner.bias("h") is inner.bias("y")
    state = {"x": x, "y": torch.zeros(2, 3, dtype=torch.float64)}
    assert torch.equal(outer(state)["y"], loaded(state)["y"])


def test_same_memory_distinct_parameters(tmp_path):
    lin = nn.Linear(3, 3, bias=False)
    other = nn.Linear(3, 3, bias=False)
    other.weight = nn.Parameter(lin.weight.data)  # two parameters over one memory
    seq = nn.Sequential(lin, other)
    loaded = roundtrip(seq, tmp_path)
    assert loaded[0].weight is not loaded[1].weight
    assert loaded[0].weight.data_ptr() == loaded[1].weight.data_ptr()
    assert torch.equal(loaded[0].weight, lin.weight)


def test_partially_overlapping_tensors_are_refused(tmp_path):
    lin = nn.Linear(4, 2, bias=False)
    other = nn.Linear(2, 2, bias=False)
    other.weight = nn.Parameter(lin.weight.data[:, :2])  # a view of part of lin.weight
    with pytest.raises(ValueError, match="share memory"):
        save(nn.Sequential(lin, other), tmp_path / "m.safetensors")
    assert not os.listdir(tmp_path)


TRANSFORMER_CONFIGS = [
    dict(activation="gelu", batch_first=True, norm_first=True),
    dict(activation="relu", batch_first=False, norm_first=False, bias=False, layer_norm_eps=1e-6),
    dict(activation=nn.GELU("tanh"), batch_first=True, dropout=0.2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", TRANSFORMER_CONFIGS)
def test_transformer_layer_block(tmp_path, options, dtype):
    torch.manual_seed(0)
    opts = {"dropout": 0.0, **options}
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dtype=dtype, **opts)
    m = BlockMap({"x": 8, "h": 8, "y": 3})
    m.connect("h", "x", layer)
    m.connect("y", "h", nn.Linear(8, 3, dtype=dtype))
    net = iternn.MapModule(m)
    net.eval()
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    got = loaded.map.block("h", "x")
    assert got.self_attn.batch_first == layer.self_attn.batch_first
    assert got.norm_first == layer.norm_first and got.norm1.eps == layer.norm1.eps
    assert got.dropout.p == layer.dropout.p and got.self_attn.dropout == layer.self_attn.dropout
    assert got.activation_relu_or_gelu == layer.activation_relu_or_gelu
    if isinstance(options["activation"], str):
        assert got.activation is {"relu": F.relu, "gelu": F.gelu}[options["activation"]]
    else:
        assert type(got.activation) is nn.GELU and got.activation.approximate == "tanh"
    x = torch.randn(2, 5, 8, dtype=dtype)
    assert torch.equal(net(x), loaded(x))
    net.train(), loaded.train()
    ya, yb = same_output(net, loaded, x)
    assert torch.equal(ya, yb)


def test_transformer_encoder_stack(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    enc.eval()
    loaded = roundtrip(enc, tmp_path)
    assert_same_model(enc, loaded)
    assert loaded.num_layers == 3 and not loaded.enable_nested_tensor and loaded.mask_check
    assert len({id(layer) for layer in loaded.layers}) == 3
    x = torch.randn(2, 5, 8)
    assert torch.equal(enc(x), loaded(x))
    # enable_nested_tensor=True that the constructor had to turn off (with a warning)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    with pytest.warns(UserWarning, match="use_nested_tensor is False"):
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True, mask_check=False)
    loaded = roundtrip(enc, tmp_path, "b.safetensors")
    assert loaded.enable_nested_tensor and not loaded.use_nested_tensor
    assert not loaded.mask_check and loaded.norm is None
    # use_nested_tensor switched off by hand on a layer that could use it
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    assert enc.use_nested_tensor
    enc.use_nested_tensor = False
    loaded = roundtrip(enc, tmp_path, "c.safetensors")
    assert loaded.enable_nested_tensor and not loaded.use_nested_tensor


def test_training_mode_and_frozen_parameters(tmp_path):
    net = small_net()
    net.train()
    net.map.activations["h1"].eval()  # one submodule in the other mode
    net.map.block("h1", "x").weight.requires_grad_(False)
    loaded = roundtrip(net, tmp_path)
    assert loaded.training and loaded.map.training and not loaded.map.activations["h1"].training
    assert not loaded.map.block("h1", "x").weight.requires_grad
    assert loaded.map.block("y", "h1").weight.requires_grad
    net.eval()
    assert not roundtrip(net, tmp_path, "eval.safetensors").map.training


def test_load_leaves_global_rng_alone(tmp_path):
    path = tmp_path / "m.safetensors"
    save(small_net(), path)
    state = torch.get_rng_state()
    load(path)
    assert torch.equal(torch.get_rng_state(), state)


def test_device_argument(tmp_path):
    path = tmp_path / "m.safetensors"
    save(small_net(), path)
    assert all(p.device.type == "cpu" for p in load(path, device="cpu").parameters())


# ---------------------------------------------------------------------------- the file
def test_file_is_plain_safetensors(tmp_path):
    net = small_net(torch.float32)
    path = tmp_path / "m.safetensors"
    save(net, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    assert os.stat(path).st_mode & 0o777 == os.stat(probe).st_mode & 0o777  # ordinary mode
    probe.unlink()
    tensors, doc, meta = tensors_and_doc(path)
    assert meta["format"] == "pt"
    assert doc["format"] == "iternn" and doc["version"] == io.FORMAT_VERSION
    assert doc["modules"][doc["root"]]["codec"] == "iternn.MapModule"
    sd = net.state_dict()
    assert set(tensors) == set(sd)
    assert all(torch.equal(tensors[k], sd[k]) and tensors[k].dtype == torch.float32 for k in sd)


def test_load_executes_no_pickle(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    net = small_net()
    save(net, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    with pytest.raises(AssertionError):  # the patches are live
        pickle.loads(pickle.dumps(1))
    loaded = load(path)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), net(x))


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save(small_net(), path)
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt  # a crash in the middle of writing

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = iternn.from_mlp(nn.Sequential(nn.Linear(5, 5)))
    with pytest.raises(KeyboardInterrupt):
        save(other, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    monkeypatch.undo()
    save(other, path)  # a complete save replaces the file
    assert load(path).in_features == 5


# ---------------------------------------------------------------------------- save errors
def test_unregistered_module_names_type_and_path(tmp_path):
    m = BlockMap({"x": 3, "h": 3})
    m.connect("h", "x", nn.Hardtanh())
    net = iternn.MapModule(m, input="x", output="h")
    with pytest.raises(TypeError, match=r"map\.blocks\.h<-x: Hardtanh"):
        save(net, tmp_path / "m.safetensors")
    assert not os.listdir(tmp_path)


def test_subclass_of_registered_type_is_refused(tmp_path):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match=r"1: MyLinear.*subclasses Linear"):
        save(nn.Sequential(nn.ReLU(), MyLinear(2, 2)), tmp_path / "m.safetensors")


def test_transformer_layer_codec_refuses_what_it_cannot_rebuild(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    layer.dropout1.p = 0.5  # no constructor call builds this
    with pytest.raises(TypeError, match=r"<root>: TransformerEncoderLayer has differing dropout"):
        save(layer, tmp_path / "a.safetensors")
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    layer.linear2 = nn.Linear(16, 8, bias=False)  # keys the codec would not rebuild
    with pytest.raises(ValueError, match="linear2.bias"):
        save(layer, tmp_path / "b.safetensors")
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    layer.norm2 = nn.Identity()  # a submodule type the codec would not rebuild
    with pytest.raises(TypeError, match=r"norm2: Identity"):
        save(layer, tmp_path / "c.safetensors")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------- load errors
@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save(small_net(), path)
    return tensors_and_doc(path)


def test_not_an_iternn_file(tmp_path, good):
    tensors, _, _ = good
    path = tmp_path / "plain.safetensors"
    save_file(tensors, str(path))  # no metadata at all
    with pytest.raises(FormatError, match="not an iternn file"):
        load(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FormatError, match="not a safetensors file"):
        load(junk)


def test_corrupted_metadata_json(tmp_path, good):
    tensors, doc, meta = good
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, json.dumps(doc)[:-7], meta)
    with pytest.raises(FormatError, match="not valid JSON"):
        load(path)


def test_wrong_format_version(tmp_path, good):
    tensors, doc, meta = good
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, {**doc, "version": io.FORMAT_VERSION + 1}, meta)
    with pytest.raises(FormatError, match="version 2 is not supported"):
        load(path)
    write_bad(path, tensors, {**doc, "format": "something-else"}, meta)
    with pytest.raises(FormatError, match="format"):
        load(path)


def test_unknown_codec_name(tmp_path, good):
    tensors, doc, meta = good
    doc["modules"][2]["codec"] = "no.such.Codec"
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"unknown codec 'no.such.Codec' for module map\.blocks"):
        load(path)


def test_bad_config_names_the_module(tmp_path, good):
    tensors, doc, meta = good
    del doc["modules"][2]["config"]["in_features"]
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"map\.blocks\.h1<-x.*in_features"):
        load(path)


def test_missing_tensor(tmp_path, good):
    tensors, doc, meta = good
    del tensors["map.blocks.y<-h1.weight"]
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"missing tensor\(s\) \['map\.blocks\.y<-h1\.weight'\]"):
        load(path)


def test_extra_tensor(tmp_path, good):
    tensors, doc, meta = good
    tensors["map.blocks.y<-h1.extra"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['map\.blocks\.y<-h1\.extra'\]"):
        load(path)


def test_wrong_shape(tmp_path, good):
    tensors, doc, meta = good
    tensors["map.biases.h1"] = torch.zeros(5, dtype=torch.float64)
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"'map\.biases\.h1' has shape \[5\].*needs \[4\]"):
        load(path)


def test_wrong_dtype(tmp_path, good):
    tensors, doc, meta = good
    tensors["map.biases.h1"] = tensors["map.biases.h1"].float()
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"'map\.biases\.h1' has dtype float32.*needs float64"):
        load(path)


def test_missing_file_is_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.safetensors")
    with pytest.raises(OSError):
        save(small_net(), tmp_path / "no_folder" / "m.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- registry
class Scale(nn.Module):
    def __init__(self, n, act=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype))
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(x * self.weight)


def test_register_a_codec(tmp_path):
    def encode(m, enc):
        return {"n": m.weight.shape[0], "dtype": io.dtype_name(m.weight.dtype),
                "act": enc.child(m.act, "act")}

    def decode(cfg, dec):
        return Scale(cfg["n"], act=dec.child(cfg["act"]), dtype=io.dtype_from_name(cfg["dtype"]))

    with pytest.raises(TypeError, match="Scale"):
        save(Scale(3), tmp_path / "m.safetensors")
    io.register_codec(Scale, "test.Scale", encode, decode)
    try:
        assert io.registered_codecs()["test.Scale"].cls is Scale
        with pytest.raises(ValueError, match="already"):
            io.register_codec(Scale, "test.Scale2", encode, decode)
        model = Scale(3, act=nn.Tanh(), dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
        loaded = roundtrip(model, tmp_path)
        assert type(loaded) is Scale and type(loaded.act) is nn.Tanh
        x = torch.randn(4, 3, dtype=torch.float64)
        assert torch.equal(model(x), loaded(x))
    finally:
        io.unregister_codec(Scale)
    assert "test.Scale" not in io.registered_codecs()
    with pytest.raises(FormatError, match="unknown codec 'test.Scale'"):
        load(tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------- converters
from iternn.convert import EncoderLayerBlock, LiftedRNN, RNNMap, TransformerMap  # noqa: E402

RNN_OPTIONS = ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias",
               "batch_first", "dropout")


def rnn_inputs(net, batch=3, T=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, T, net.input_size) if net.batch_first else (T, batch, net.input_size)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    h0 = torch.randn(net.num_layers, batch, net.hidden_size, generator=g, dtype=torch.float64)
    return x, h0


def assert_same_options(a, b, names):
    for k in names:
        va, vb = getattr(a, k), getattr(b, k)
        assert type(vb) is type(va) and vb == va, k


RNN_CONFIGS = [
    dict(num_layers=2, dropout=0.4, bias=False),
    dict(num_layers=2, dropout=0.0, bias=True, nonlinearity="relu"),
    dict(num_layers=1, bias=False),
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("options", RNN_CONFIGS)
def test_rnn_map_roundtrip(tmp_path, options, batch_first):
    torch.manual_seed(0)
    rnn = nn.RNN(3, 5, batch_first=batch_first, **options).double()
    net = iternn.from_rnn(rnn)
    assert net.training
    net.map.block("h1", "x").weight.requires_grad_(False)  # a frozen flag, kept too
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)  # class, modules, state_dict keys and values, modes
    assert type(loaded) is RNNMap and type(loaded.map) is BlockMap
    assert_same_options(net, loaded, (*RNN_OPTIONS, "layer_slots"))
    assert loaded.map.edges == net.map.edges and dict(loaded.map.slots) == dict(net.map.slots)
    x, h0 = rnn_inputs(net)
    (ya, ha), (yb, hb) = same_output(net, loaded, x, h0)  # train mode: same dropout masks
    assert yb.dtype == torch.float64 and torch.equal(ya, yb) and torch.equal(ha, hb)
    net.eval()
    (y_eval, _), _ = same_output(net, net, x, h0)
    if net.dropout and net.num_layers > 1:  # the dropout really acted in train mode
        assert not torch.equal(y_eval, ya)
        assert loaded.map.block("h2", "h1")[0].p == options["dropout"]
    net_eval = roundtrip(net, tmp_path, "eval.safetensors")
    assert not net_eval.training and not any(m.training for m in net_eval.modules())
    (ya, ha), (yb, hb) = same_output(net, net_eval, x, h0)
    assert torch.equal(ya, yb) and torch.equal(ha, hb)
    assert torch.equal(ya, y_eval)
    # still what torch computes, via the converter's own inverse
    ref = loaded.to_rnn().eval()
    yr, hr = ref(x, h0)
    loaded.eval()
    yl, hl = loaded(x, h0)
    assert torch.allclose(yl, yr, atol=1e-12) and torch.allclose(hl, hr, atol=1e-12)


LIFT_CONFIGS = [
    dict(num_layers=1, batch_first=False),
    dict(num_layers=2, dropout=0.3, bias=False, batch_first=True, nonlinearity="relu"),
]


@pytest.mark.parametrize("options", LIFT_CONFIGS)
def test_lifted_rnn_roundtrip_keeps_weight_tying(tmp_path, options):
    torch.manual_seed(1)
    T = 4
    rnn = nn.RNN(3, 5, **options).double().eval()  # eval: compared with nn.RNN below
    net = iternn.lift_rnn(rnn, T)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)  # includes the sharing partition of modules/params
    assert type(loaded) is LiftedRNN and not loaded.training
    assert_same_options(net, loaded, (*RNN_OPTIONS, "T", "steps", "initial_slots", "held_slots"))
    n_params = len(list(rnn.parameters()))
    assert len(list(loaded.parameters())) == len(list(net.parameters())) == n_params
    m = loaded.map
    for l in range(1, loaded.num_layers + 1):
        first_in = m.block(loaded.state_slot(1, l),
                           loaded.input_slot(1) if l == 1 else loaded.state_slot(1, l - 1))
        first_hh = m.block(loaded.state_slot(1, l), loaded.state_slot(0, l))
        for t in range(2, T + 1):
            below = loaded.input_slot(t) if l == 1 else loaded.state_slot(t, l - 1)
            assert m.block(loaded.state_slot(t, l), below) is first_in
            assert m.block(loaded.state_slot(t, l), loaded.state_slot(t - 1, l)) is first_hh
        assert m.activations[loaded.state_slot(T, l)] is m.activations[loaded.state_slot(1, l)]
    x, h0 = rnn_inputs(net, T=T)
    (ya, ha), (yb, hb) = same_output(net, loaded, x, h0)
    assert torch.equal(ya, yb) and torch.equal(ha, hb)
    # gradients: one tensor per tied parameter, summed over all steps, as before saving
    for model in (net, loaded, rnn):
        y, h = model(x, h0)
        (y.square().sum() + h.sum()).backward()
    for name, p in loaded.torch_parameters().items():
        q = net.torch_parameters()[name]
        assert torch.equal(p.grad, q.grad), name
        assert torch.allclose(p.grad, getattr(rnn, name).grad, atol=1e-10), name
    # a change to the tied weight through the LAST step's block reaches every step
    last = loaded.state_slot(T, loaded.num_layers)
    with torch.no_grad():
        m.block(last, loaded.state_slot(T - 1, loaded.num_layers)).weight.mul_(1.5)
        net.map.block(last, net.state_slot(T - 1, net.num_layers)).weight.mul_(1.5)
    assert torch.equal(first_hh.weight, m.block(last, loaded.state_slot(T - 1, loaded.num_layers)).weight)
    yc, hc = loaded(x, h0)
    step1 = (lambda y: y[:, 0]) if loaded.batch_first else (lambda y: y[0])
    assert not torch.equal(step1(yc), step1(ya))  # step 1 uses the same W_hh
    yn, hn = net(x, h0)
    assert torch.equal(yc, yn) and torch.equal(hc, hn)


TRANSFORMER_MAP_CONFIGS = [
    dict(norm=True, norm_first=True, activation="gelu", batch_first=True),
    dict(norm=False, norm_first=False, activation="relu", batch_first=False, dropout=0.2),
    dict(norm=True, norm_first=False, activation="relu", batch_first=True, nested=True),
    dict(norm=False, norm_first=True, activation="gelu", batch_first=False, layer_norm_eps=1e-6),
]


@pytest.mark.parametrize("options", TRANSFORMER_MAP_CONFIGS)
def test_transformer_map_roundtrip(tmp_path, options):
    opts = dict(options)
    norm, nested = opts.pop("norm"), opts.pop("nested", False)
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, **{"dropout": 0.0, **opts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor switched off for some layers
        enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if norm else None,
                                    enable_nested_tensor=nested)
    enc = enc.double()
    net = iternn.from_transformer(enc)
    loaded = roundtrip(net, tmp_path)
    assert_same_model(net, loaded)
    assert type(loaded) is TransformerMap
    assert_same_options(net, loaded, ("layer_keys", "output", "steps", "d_model", "batch_first",
                                      "enable_nested_tensor", "use_nested_tensor", "mask_check"))
    assert loaded.has_norm == norm and loaded.use_nested_tensor == nested
    blocks = [loaded.map.blocks[k] for k in loaded.layer_keys]
    assert all(type(b) is EncoderLayerBlock and b.in_features == 8 for b in blocks)
    got = loaded.layers[0]
    assert got.norm_first == opts["norm_first"] and got.self_attn.batch_first == opts["batch_first"]
    assert got.activation is {"relu": F.relu, "gelu": F.gelu}[opts["activation"]]
    assert got.norm1.eps == opts.get("layer_norm_eps", 1e-5)
    g = torch.Generator().manual_seed(3)
    shape = (3, 5, 8) if opts["batch_first"] else (5, 3, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    padding[2, 1:] = True
    ya, yb = same_output(net, loaded, x, causal)  # train mode, dropout masks by seed
    assert torch.equal(ya, yb)
    net.eval(), loaded.eval()
    assert torch.equal(net(x, causal), loaded(x, causal))
    dense = loaded(x, src_key_padding_mask=padding)  # grad enabled: no fast path
    assert torch.equal(net(x, src_key_padding_mask=padding), dense)
    with torch.no_grad():  # the sparsity fast path (where use_nested_tensor allows it)
        a, b = net(x, src_key_padding_mask=padding), loaded(x, src_key_padding_mask=padding)
    assert torch.equal(a, b)
    where = padding if opts["batch_first"] else padding.T
    if nested:  # the fast path ran: padded positions hold norm(0)
        norm_of_zero = loaded.map.block("y", "l2")(torch.zeros(8, dtype=torch.float64))
        assert torch.equal(b[where], norm_of_zero.detach().expand_as(b[where]))
        assert not torch.equal(dense[where], b[where])
    eval_file = roundtrip(net, tmp_path, "eval.safetensors")
    assert not any(m.training for m in eval_file.modules())
    with torch.no_grad():
        assert torch.equal(eval_file(x, src_key_padding_mask=padding), a)
    assert torch.allclose(enc.eval()(x, causal), eval_file(x, causal), atol=1e-12)


def test_converter_codecs_refuse_hand_edited_models(tmp_path):
    torch.manual_seed(0)
    net = iternn.from_rnn(nn.RNN(3, 4, 2).double())
    net.map.set_activation("h2", nn.Sigmoid())  # no RNNMap(...) builds this
    with pytest.raises(TypeError, match=r"<root>: RNNMap .*map\.activations\.h2 is a Sigmoid"):
        save(net, tmp_path / "a.safetensors")
    net = iternn.from_rnn(nn.RNN(3, 4, 2, dropout=0.5).double())
    net.map.block("h2", "h1")[0].p = 0.25  # differs from net.dropout
    with pytest.raises(TypeError, match=r"map\.blocks\.h2<-h1\.0\.p is 0\.25, the constructor gives 0\.5"):
        save(net, tmp_path / "b.safetensors")
    lifted = iternn.lift_rnn(nn.RNN(3, 4).double(), 3)
    key = "h3<-x3"
    lifted.map.blocks[key] = copy.deepcopy(lifted.map.blocks[key])  # untied by hand
    with pytest.raises(TypeError, match=r"map\.blocks\.h3<-x3 is not the same object as map\.blocks\.h1<-x1"):
        save(lifted, tmp_path / "c.safetensors")
    tm = iternn.from_transformer(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False))
    tm.steps = 1  # not what the constructor derives from the map
    with pytest.raises(TypeError, match="steps is 1, the constructor gives 2"):
        save(tm, tmp_path / "d.safetensors")
    assert not os.listdir(tmp_path)


def test_rnn_map_file_whose_options_do_not_fit_its_map(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save(iternn.from_rnn(nn.RNN(3, 4, 2).double()), path)
    tensors, doc, meta = tensors_and_doc(path)
    root = doc["modules"][doc["root"]]
    assert root["codec"] == "iternn.RNNMap" and root["config"]["num_layers"] == 2
    root["config"]["hidden_size"] = 6
    write_bad(path, tensors, doc, meta)
    with pytest.raises(FormatError, match=r"<root>.*'iternn\.RNNMap'.*does not fit the options"):
        load(path)


def test_sparse_and_structured_blocks_round_trip(tmp_path):
    from iternn.sparse import BlockDiagonalLinear, DiagonalLinear, LowRankLinear, MaskedLinear

    g = torch.Generator().manual_seed(0)
    m = iternn.BlockMap({"x": 6, "h": 6, "y": 4})
    m.connect("h", "x", iternn.SparseLinear(6, 6, density=0.4, generator=g))
    m.connect("h", "h", DiagonalLinear(6))
    m.connect("y", "h", LowRankLinear(6, 4, rank=2, generator=g))
    m.connect("y", "y", BlockDiagonalLinear(4, 4, blocks=2, generator=g))
    m.connect("y", "x", MaskedLinear(6, 4, mask=torch.rand(4, 6, generator=g) > 0.5))
    m.set_activation("h", nn.Tanh())
    m.double()
    path = tmp_path / "sparse.safetensors"
    iternn.save(m, path)
    back = iternn.load(path)
    x = torch.randn(3, 6, dtype=torch.float64)
    a = iternn.iterate(m, {"x": x}, 4, hold=["x"])
    b = iternn.iterate(back, {"x": x}, 4, hold=["x"])
    assert all(torch.equal(a[s], b[s]) for s in a)
    assert torch.equal(back.block("h", "x").indices(), m.block("h", "x").indices())
    assert iternn.count_trainable(back) == iternn.count_trainable(m)


# ---------------------------------------------------------------------------- hostile files
# Loading trusts nothing in the file: every case below is refused with a FormatError whose
# message starts with the path and names the key or tensor at fault, before any memory of
# the declared sizes is touched.
import resource  # noqa: E402
import struct  # noqa: E402

from iternn.sparse import LowRankLinear, MaskedLinear  # noqa: E402


def write_raw(path, header, data=b"", *, length=None):
    """A safetensors-shaped file from a header dict (or raw bytes) and a data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KB


def assert_load_refused(path, *patterns):
    """The FormatError ``load(path)`` raises; its message names the path and ``patterns``."""
    with pytest.raises(FormatError) as info:
        load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    for p in patterns:
        assert p in text, (p, text)
    return text


def test_declared_sizes_beyond_the_stored_tensors_allocate_nothing(tmp_path, good):
    # A 30000 x 30000 float32 Linear declared (3.6 GB), a 4 x 3 tensor stored.
    tensors, doc, meta = good
    doc["modules"][1]["config"]["slots"] = [["x", 30000], ["h1", 30000], ["y", 2]]
    doc["modules"][2]["config"].update(in_features=30000, out_features=30000, dtype="float32")
    doc["modules"][3]["config"]["in_features"] = 30000
    path = tmp_path / "huge.safetensors"
    write_bad(path, tensors, doc, meta)
    before = peak_rss_bytes()
    assert_load_refused(
        path, "'map.blocks.h1<-x.weight' has shape [4, 3], the structure needs [30000, 30000]")
    assert peak_rss_bytes() - before < 200e6


@pytest.mark.parametrize("block, key, want", [
    (lambda: iternn.SparseLinear(6, 4, density=0.5, generator=torch.Generator().manual_seed(0)),
     "crow_indices", {"in_features": 10**9, "out_features": 10**9, "nnz": 10**12}),
    (lambda: MaskedLinear(6, 4, mask=torch.ones(4, 6, dtype=torch.bool)),
     "mask", {"in_features": 10**6, "out_features": 10**6}),
    (lambda: LowRankLinear(6, 4, rank=2), "u", {"in_features": 10**6, "out_features": 10**6,
                                                "rank": 10**6}),
])
def test_sparse_and_structured_blocks_check_sizes_before_building(tmp_path, block, key, want):
    m = nn.Sequential(block())
    path = tmp_path / "m.safetensors"
    save(m, path)
    tensors, doc, meta = tensors_and_doc(path)
    doc["modules"][1]["config"].update(want)
    write_bad(path, tensors, doc, meta)
    before = peak_rss_bytes()
    assert_load_refused(path, f"'0.{key}'")
    assert peak_rss_bytes() - before < 200e6


def test_a_sparse_block_declaring_a_huge_input_is_refused_before_its_pattern_is_built(tmp_path):
    # in_features is not bound by any stored tensor (the columns only need to be below
    # it), yet the transposed pattern needs a row pointer per input: 8 TB here.
    m = nn.Sequential(iternn.SparseLinear(6, 4, density=0.5, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "m.safetensors"
    save(m, path)
    tensors, doc, meta = tensors_and_doc(path)
    doc["modules"][1]["config"]["in_features"] = 10**12
    write_bad(path, tensors, doc, meta)
    before = peak_rss_bytes()
    assert_load_refused(path, "bad config for 0 (codec 'iternn.SparseLinear')", "SizeError",
            "SparseLinear(in_features=1000000000000, out_features=4)")
    assert peak_rss_bytes() - before < 200e6


def test_deeply_nested_json_is_a_format_error(tmp_path, good):
    tensors, doc, meta = good
    deep = "[" * 10000 + "]" * 10000
    path = tmp_path / "deep.safetensors"
    write_bad(path, tensors, deep, meta)
    assert_load_refused(path, "nested deeper than 64")
    doc["modules"][2]["config"]["extra"] = json.loads("[" * 70 + "]" * 70)
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, "'iternn' metadata is nested deeper than 64")
    write_raw(path, ("{\"a\":" * 10000 + "1" + "}" * 10000).encode())
    assert_load_refused(path, "not a safetensors file", "nested deeper")


def test_modules_nested_too_deep_are_a_format_error(tmp_path):
    m = nn.Identity()
    for _ in range(io.MAX_MODULE_DEPTH + 1):
        m = nn.Sequential(m)
    with pytest.raises(ValueError, match=f"nested deeper than {io.MAX_MODULE_DEPTH}"):
        save(m, tmp_path / "m.safetensors")
    assert not os.listdir(tmp_path)


def test_what_is_not_a_file_is_a_format_error(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    assert_load_refused(folder, "is a folder")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert_load_refused(fifo, "not a regular file")  # and does not block waiting for a writer
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load(tmp_path / "nothing.safetensors")


def test_truncated_and_malformed_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save(small_net(), path)
    whole = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[:-5])
    assert_load_refused(cut, "'map.blocks.y<-h1.weight' has data_offsets [144, 208]", "203 bytes of data")
    cut.write_bytes(whole[:100])
    assert_load_refused(cut, "not a safetensors file", "header declares")
    cut.write_bytes(whole[:5])
    assert_load_refused(cut, "not a safetensors file", "too short")
    write_raw(cut, b"{}", length=2**62)
    assert_load_refused(cut, f"more than the {io.MAX_HEADER_BYTES} read")
    cut.write_text("just some text, long enough to have a length field\n")
    assert_load_refused(cut, "not a safetensors file")


F64 = torch.float64


@pytest.mark.parametrize("entry, data, patterns", [
    ({"dtype": "X99", "shape": [2], "data_offsets": [0, 16]}, 16, ["'t'", "dtype 'X99'"]),
    ({"dtype": "F64", "shape": [-2], "data_offsets": [0, 16]}, 16, ["'t'", "shape [-2]"]),
    ({"dtype": "F64", "shape": [2.0], "data_offsets": [0, 16]}, 16, ["'t'", "shape [2.0]"]),
    ({"dtype": "F64", "shape": [2], "data_offsets": [0, 17]}, 16, ["'t'", "data_offsets"]),
    ({"dtype": "F64", "shape": [10**9, 10**9], "data_offsets": [0, 16]}, 16, ["'t'", "stores 16 bytes"]),
    ({"dtype": "F64", "shape": [2]}, 16, ["'t'", "exactly"]),
    ({"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}, 24, ["cover 16 bytes", "holds 24"]),
])
def test_bad_header_entries(tmp_path, entry, data, patterns):
    path = tmp_path / "m.safetensors"
    write_raw(path, {"t": entry}, bytes(data))
    assert_load_refused(path, *patterns)


def test_overlapping_tensors_and_repeated_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    a = {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}
    b = {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}
    write_raw(path, {"a": a, "b": b}, bytes(16))
    assert_load_refused(path, "'b' starts at byte 8", "expected 16")
    write_raw(path, b'{"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}, "a": '
                    b'{"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}', bytes(8))
    assert_load_refused(path, "key 'a' appears twice")


BAD_CONFIGS = [
    (2, "in_features", -3, "'in_features' must be an int >= 0"),
    (2, "in_features", 3.5, "'in_features' must be an int"),
    (2, "in_features", "3", "'in_features' must be an int"),
    (2, "in_features", True, "'in_features' must be an int"),
    (2, "bias", "no", "'bias' must be true or false"),
    (2, "dtype", "int64", "'dtype' must name a floating-point dtype"),
    (2, "dtype", "os.system", "'dtype' must name a floating-point dtype"),
    (2, "surprise", 1, "unexpected ['surprise']"),
    (1, "slots", {"x": 3}, "'slots' must be a list of 2-element lists"),
    (1, "blocks", [["h1", "x", "2"], ["y", "h1", 3]], "bad module reference '2'"),
    (1, "blocks", [["h1", "x", 99], ["y", "h1", 3]], "bad module reference 99"),
    (1, "blocks", [["h1", "x", 1], ["y", "h1", 3]], "module 1 contains itself"),
    (1, "activations", [[4, 4]], "'activations': [4, 4] does not start with a name"),
    (0, "steps", -1, "steps"),
]


@pytest.mark.parametrize("index, field, value, pattern", BAD_CONFIGS)
def test_wrong_config_values_name_module_and_field(tmp_path, good, index, field, value, pattern):
    tensors, doc, meta = good
    doc["modules"][index]["config"][field] = value
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, pattern, show_path(doc["modules"][index]["path"]))


def show_path(p):
    return p if p else "<root>"


@pytest.mark.parametrize("field, value", [
    ("modules", {"0": 1}), ("root", "0"), ("aliases", {"a": 1}), ("frozen", [1]),
    ("training", 1), ("mode_flips", "map"),
])
def test_wrong_document_field_types(tmp_path, good, field, value):
    tensors, doc, meta = good
    doc[field] = value
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, field)


def test_nan_in_metadata_is_refused(tmp_path, good):
    tensors, doc, meta = good
    path = tmp_path / "bad.safetensors"
    write_bad(path, tensors, json.dumps(doc).replace('"steps":2', '"steps":NaN')
              .replace('"steps": 2', '"steps": NaN'), meta)
    assert_load_refused(path, "NaN is not a JSON number")


def sparse_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(iternn.SparseLinear(6, 4, indices=torch.tensor([[0, 0, 1, 3], [1, 4, 2, 5]]),
                                          generator=g, dtype=F64))
    path = tmp_path / "sparse.safetensors"
    save(m, path)
    return path, *tensors_and_doc(path)


@pytest.mark.parametrize("name, values, pattern", [
    ("col_indices", [1, 4, 2, 10**6], "col_indices[3] = 1000000 is outside [0, 6)"),
    ("col_indices", [4, 1, 2, 5], "col_indices[1] = 1 is less than col_indices[0] = 4"),
    ("col_indices", [1, 1, 2, 5], "repeats"),
    ("crow_indices", [0, 2, 1, 3, 4], "row pointers must not decrease"),
    ("crow_indices", [1, 2, 3, 3, 4], "crow_indices[0] = 1, must be 0"),
])
def test_bad_sparsity_pattern_in_a_file(tmp_path, name, values, pattern):
    path, tensors, doc, meta = sparse_file(tmp_path)
    tensors[f"0.{name}"] = torch.tensor(values, dtype=tensors[f"0.{name}"].dtype)
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, f"0.{name}", pattern)


def test_sparse_pattern_of_the_wrong_dtype_or_length(tmp_path):
    path, tensors, doc, meta = sparse_file(tmp_path)
    good_col = tensors["0.col_indices"]
    tensors["0.col_indices"] = good_col.double()
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, "'0.col_indices' has dtype float64, expected int32, int64")
    tensors["0.col_indices"] = torch.cat([good_col, good_col[:1]])
    write_bad(path, tensors, doc, meta)
    assert_load_refused(path, "'0.col_indices' has shape [5], the structure needs [4]")


def test_bool_tensor_bytes_other_than_0_and_1(tmp_path):
    m = nn.Sequential(MaskedLinear(3, 2, mask=torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)))
    path = tmp_path / "masked.safetensors"
    save(m, path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin = 8 + n + json.loads(raw[8:8 + n])["0.mask"]["data_offsets"][0]
    raw[begin] = 7
    path.write_bytes(bytes(raw))
    assert_load_refused(path, "'0.mask' (bool) holds bytes other than 0 and 1")


def test_load_reads_each_tensor_once_into_the_parameter(tmp_path, monkeypatch):
    # No random initialisation is materialised (the tree is built on the meta device) and
    # the parameters are the tensors read from the file, not copies of them.
    from iternn.io import format as fmt

    model = small_net()
    path = tmp_path / "m.safetensors"
    save(model, path)
    inits, reads = [], []
    real_init, real_read = nn.init.kaiming_uniform_, fmt.Header.read

    def init(*args, **kwargs):
        t = args[0] if args else kwargs["tensor"]
        inits.append(t.device.type)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", init)

    def read(self, name):
        t = real_read(self, name)
        reads.append(t)
        return t

    monkeypatch.setattr(fmt.Header, "read", read)
    back = load(path)
    assert inits and set(inits) == {"meta"}
    ptrs = {t.untyped_storage().data_ptr() for t in reads}
    assert all(p.untyped_storage().data_ptr() in ptrs for p in back.parameters())
    assert_same_model(model, back)
