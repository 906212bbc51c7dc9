"""Any feed-forward PyTorch model as a block map: :func:`from_module` (via ``torch.fx``).

The model is traced with ``torch.fx`` (``symbolic_trace``'s tracer: ``torch.nn`` layers
stay whole, everything else is traced through; once in the model's modes, once in train
and once in eval mode, which must agree but for dropout's flag) and run on a copy, RNG
forked: once as written, to catch what the trace cannot show (in-place changes of
inputs and shared tensors, autograd switched off), then node by node with batch ``B``
and ``B + 1`` to learn every tensor's shape and to check the batch dim. Then
each traced tensor becomes a slot of a :class:`~iternn.BlockMap`, in trace order
(a topological order, so the wavefront evaluates slots exactly in source order):

* a layer or an operation of one tensor is a block ``F[d, s]`` into a new slot ``d``
  (``Linear``, convolutions, pooling, normalisation, shape operations...);
* an element-wise function of a tensor that nothing else reads is *folded* into the
  activation of that tensor's slot (``act_d``), as :func:`~iternn.from_mlp` does; a
  tensor read by two consumers keeps its value in its slot, and the function gets a
  slot of its own fed by an identity block;
* a sum ``a + f(b)`` is one slot with one block per term (the identity-like block of
  ``a`` and the block of ``f``): a term read only by the sum writes into the sum's slot
  directly, so ``x + f(x)`` is the paper's skip connection;
* ``torch.cat`` is a slot fed by :class:`~iternn.convert.ops.Place` blocks (each writes
  its source into its part of the destination, zeros elsewhere: the block matrix of a
  concatenation), products and other binary operations of two tensors are multi-source
  blocks ``F[d, (a, b)]``.

The first dim of every tensor is the batch; slot shapes are the sample shapes. Whatever
mixes samples (a reshape across the batch dim, a reduction over it...) is refused.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.block_map import BlockMap
from ..engine.iterate import wavefront_plan
from ..errors import ConversionError, MapError, MapTypeError
from . import ops

__all__ = ["from_module", "ModuleMap"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
#: Names a slot cannot have (attributes of the map's ModuleDict / ParameterDict).
_RESERVED = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))
_OWN_FILES = frozenset({os.path.abspath(__file__), os.path.abspath(ops.__file__)})
_KINDS = {
    "positional_only": inspect.Parameter.POSITIONAL_ONLY,
    "positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "keyword_only": inspect.Parameter.KEYWORD_ONLY,
}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
#: Exact integer range of each floating dtype (indices are exact below it).
_EXACT = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24, torch.float64: 2**53}


# ============================================================================ argument templates
# A template describes one argument (or the output) as JSON: {"input": slot, "shape":
# [...], "integer": bool} for a tensor that goes into a held slot, {"output": slot,
# "shape": [...], "dtype": null|"int64"} for a returned slot, {"const": value} for a
# value the conversion is specialised to, {"tuple": [...]}, {"list": [...]} and
# {"dict": [[key, template], ...]} for containers.
def _is_json_scalar(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def _same_const(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a plain bool
        return a is b


def _show_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _slot_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A slot's shape for a sample shape: a per-sample scalar ``()`` is held as ``(1,)``."""
    return shape if shape else (1,)


def _check_template(t: object, path: str, *, role: str) -> None:
    """Refuse a malformed template (``role`` is ``"input"`` or ``"output"``)."""
    if not isinstance(t, dict) or len(t) == 0:
        raise MapTypeError(f"{path}: a template must be a non-empty dict, got {t!r}")
    if "const" in t:
        if set(t) != {"const"}:
            raise MapError(f"{path}: a const template has only 'const', got {sorted(t)}")
        return
    for kind in ("tuple", "list"):
        if kind in t:
            if set(t) != {kind} or not isinstance(t[kind], list):
                raise MapError(f"{path}: a {kind} template is {{{kind!r}: [...]}}, got {t!r}")
            for i, sub in enumerate(t[kind]):
                _check_template(sub, f"{path}[{i}]", role=role)
            return
    if "dict" in t:
        items = t["dict"]
        if set(t) != {"dict"} or not isinstance(items, list) or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) for x in items
        ):
            raise MapError(f"{path}: a dict template is {{'dict': [[key, template], ...]}}, got {t!r}")
        if len({k for k, _ in items}) != len(items):
            raise MapError(f"{path}: a dict template repeats a key")
        for k, sub in items:
            _check_template(sub, f"{path}[{k!r}]", role=role)
        return
    keys = {"input": ("input", "shape", "integer"), "output": ("output", "shape", "dtype")}[role]
    if set(t) != set(keys) or not isinstance(t[role], str):
        raise MapError(f"{path}: an {role} template has exactly {list(keys)}, got {t!r}")
    shape = t["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise MapError(f"{path}: 'shape' must be a list of positive ints, got {shape!r}")
    if role == "input" and not isinstance(t["integer"], bool):
        raise MapError(f"{path}: 'integer' must be true or false, got {t['integer']!r}")
    if role == "output" and t["dtype"] is not None:
        dt = getattr(torch, t["dtype"], None) if isinstance(t["dtype"], str) else None
        if not isinstance(dt, torch.dtype) or dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise MapError(f"{path}: 'dtype' must be null or an integer dtype name, got {t['dtype']!r}")


def _template_slots(t: dict, key: str) -> list[str]:
    if key in t:
        return [t[key]]
    for kind in ("tuple", "list"):
        if kind in t:
            return [s for sub in t[kind] for s in _template_slots(sub, key)]
    if "dict" in t:
        return [s for _, sub in t["dict"] for s in _template_slots(sub, key)]
    return []


# ============================================================================ the result
class ModuleMap(nn.Module):
    """A converted model: its :class:`~iternn.BlockMap` (``.map``) run as a wavefront, with
    the source model's call signature.

    ``net(*args, **kwargs)`` takes what the source's ``forward`` takes: each tensor
    argument (also inside tuples, lists and dicts) is written into its held input slot;
    the non-tensor arguments the conversion saw are fixed (another value is an error,
    the map was traced for that one); the map is evaluated once as a wavefront (each
    block once, in slot order: the source's order) and the outputs are read from their
    slots, in the source's structure. Integer inputs (embedding indices) are held as
    floats in their slot; they must stay in the exact range of the map's dtype.

    ``from_module`` builds one; the constructor (used by ``iternn.load``) takes the map
    and the JSON templates of the signature.

    Args:
        map: the block map.
        params: per parameter of the source's ``forward``: ``[name, kind, default,
            template]``; ``kind`` one of ``"positional_only"``,
            ``"positional_or_keyword"``, ``"keyword_only"``; ``default`` ``None`` (no
            default) or ``{"value": v}``; ``template`` describes the argument.
        outputs: the template of the returned value.
        sources: ``{name: source name}`` for the parameters and buffers that copy one of
            the source model's (names as in ``named_parameters``/``named_buffers``), or
            ``None``; kept as :attr:`source_names`.
    """

    def __init__(self, map: BlockMap, params: list, outputs: dict, *,
                 sources: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if not isinstance(map, BlockMap):
            raise MapTypeError(f"map must be a BlockMap, got {type(map).__name__}")
        if not isinstance(params, (list, tuple)):
            raise MapTypeError(f"params must be a list, got {type(params).__name__}")
        sig_params = []
        checked = []
        for i, item in enumerate(params):
            if not (isinstance(item, (list, tuple)) and len(item) == 4):
                raise MapError(f"params[{i}] must be [name, kind, default, template], got {item!r}")
            name, kind, default, tpl = item
            if not isinstance(name, str) or not name.isidentifier():
                raise MapError(f"params[{i}]: {name!r} is not a parameter name")
            if kind not in _KINDS:
                raise MapError(f"params[{i}]: kind must be one of {sorted(_KINDS)}, got {kind!r}")
            if default is not None and not (isinstance(default, dict) and set(default) == {"value"}):
                raise MapError(f"params[{i}]: default must be null or {{'value': v}}, got {default!r}")
            _check_template(tpl, name, role="input")
            sig_params.append(inspect.Parameter(
                name, _KINDS[kind],
                default=inspect.Parameter.empty if default is None else default["value"]))
            checked.append((name, kind, default, tpl))
        try:
            self._signature = inspect.Signature(sig_params)
        except ValueError as exc:
            raise MapError(f"params do not make a call signature: {exc}") from exc
        _check_template(outputs, "output", role="output")
        inputs = [s for _, _, _, t in checked for s in _template_slots(t, "input")]
        if len(set(inputs)) != len(inputs):
            raise MapError(f"an input slot is given twice in {inputs}")
        for s in inputs + _template_slots(outputs, "output"):
            if s not in map.slots:
                raise MapError(f"slot {s!r} of the signature is not a slot of the map {list(map.slots)}")
        for _, _, _, t in checked:
            self._check_shapes(map, t, "input")
        self._check_shapes(map, outputs, "output")
        for s in inputs:
            if map.sources(s):
                raise MapError(f"input slot {s!r} has incoming blocks; inputs are held slots")
        self.map = map
        names = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in self.named_buffers(remove_duplicate=False)}
        sources = dict(sources or {})
        for k, v in sources.items():
            if k not in names or not isinstance(v, str):
                raise MapError(f"sources: {k!r} -> {v!r} is not a parameter or buffer of the "
                               "converted model named after a source's")
        self.source_names = sources
        self.params = [list(p) for p in checked]
        self.outputs = outputs
        self._held = frozenset(inputs)
        # The wavefront drops every other slot after its last reader (memory is reused).
        self._keep = frozenset(_template_slots(outputs, "output"))
        self._templates = tuple((name, tpl) for name, _, _, tpl in checked)

    def _check_shapes(self, m: BlockMap, t: dict, role: str) -> None:
        if role in t:
            want = _slot_shape(tuple(t["shape"]))
            if m.shapes[t[role]] != want:
                raise MapError(
                    f"{role} slot {t[role]!r} has shape {m.shapes[t[role]]}, the template says {want}"
                )
            return
        for kind in ("tuple", "list"):
            for sub in t.get(kind, ()):
                self._check_shapes(m, sub, role)
        for _, sub in t.get("dict", ()):
            self._check_shapes(m, sub, role)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The held input slots, in argument order."""
        return tuple(s for _, t in self._templates for s in _template_slots(t, "input"))

    @property
    def signature(self) -> inspect.Signature:
        """The call signature (the source's ``forward``'s)."""
        return self._signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise MapTypeError(f"{exc} (the converted model takes {self._signature})") from None
        given = bound.arguments
        wave = wavefront_plan(self.map, frozen=self._held)
        if wave is None:
            raise MapError("the map has a cycle left after holding the inputs: no wavefront")
        read = _Reader(wave.dtype, wave.device)
        for name, tpl in self._templates:
            value = given[name] if name in given else self._signature.parameters[name].default
            read.take(tpl, value, name)
        if read.ref is None:
            raise MapError("the converted model needs at least one tensor argument")
        values = wave(read.state, None, read.ref, (read.batch,), keep=self._keep)
        return _build(self.outputs, values, read.batch)

    def extra_repr(self) -> str:
        return f"signature={self._signature}, inputs={list(self.inputs)}"


class _Reader:
    """Reads call arguments against their templates into the held slots' state."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        self.dtype, self.device = dtype, device
        self.state: dict[str, Tensor] = {}
        self.batch: int | None = None
        self.ref: Tensor | None = None

    def take(self, t: dict, value: object, path: str) -> None:
        if "const" in t:
            if not _same_const(value, t["const"]):
                raise MapError(
                    f"argument {path} is {value!r}, but the model was converted for {t['const']!r} "
                    "(non-tensor arguments are fixed at conversion)"
                )
            return
        for kind, cls in (("tuple", tuple), ("list", list)):
            if kind in t:
                if type(value) is not cls or len(value) != len(t[kind]):
                    got = type(value).__name__
                    if isinstance(value, (tuple, list)):
                        got += f" of {len(value)}"
                    raise MapTypeError(f"argument {path} must be a {kind} of {len(t[kind])} items, "
                                       f"got {got}")
                for i, (sub, v) in enumerate(zip(t[kind], value)):
                    self.take(sub, v, f"{path}[{i}]")
                return
        if "dict" in t:
            keys = [k for k, _ in t["dict"]]
            if not isinstance(value, Mapping) or set(value) != set(keys):
                got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise MapTypeError(f"argument {path} must be a dict with keys {keys}, got {got}")
            for k, sub in t["dict"]:
                self.take(sub, value[k], f"{path}[{k!r}]")
            return
        self._tensor(t, value, path)

    def _tensor(self, t: dict, x: object, path: str) -> None:
        shape = tuple(t["shape"])
        if not isinstance(x, Tensor):
            raise MapTypeError(f"argument {path} must be a tensor, got {type(x).__name__}")
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise MapError(f"argument {path} must have shape {_show_shape(('batch', *shape))} "
                           f"as at conversion, got {tuple(x.shape)}")
        if self.batch is None:
            self.batch = x.shape[0]
        elif x.shape[0] != self.batch:
            raise MapError(f"argument {path} has batch size {x.shape[0]}, other arguments have {self.batch}")
        if self.device is not None and x.device != self.device:
            raise MapError(f"argument {path} is on {x.device}, the model is on {self.device}")
        if t["integer"]:
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise MapTypeError(f"argument {path} must be an integer tensor (indices), got {x.dtype}")
            dtype = self.dtype or torch.get_default_dtype()
            limit = _EXACT.get(dtype)
            if limit is not None and x.numel():
                lo, hi = torch.aminmax(x)
                if int(lo) < -limit or int(hi) > limit:
                    raise MapError(
                        f"argument {path} holds integers up to {max(-int(lo), int(hi))}, beyond "
                        f"2**{int(math.log2(limit))}: they are not exact in a {dtype} slot"
                    )
            x = x.to(dtype)
        else:
            if not x.is_floating_point():
                raise MapTypeError(f"argument {path} must be floating point, got {x.dtype}")
            if self.dtype is not None and x.dtype != self.dtype:
                raise MapTypeError(f"argument {path} has dtype {x.dtype}, the model is {self.dtype}")
        if not shape:
            x = x.reshape(-1, 1)
        self.state[t["input"]] = x
        if self.ref is None:
            self.ref = x


def _build(t: dict, values: Mapping[str, Tensor], batch: int) -> Any:
    if "const" in t:
        return t["const"]
    if "tuple" in t:
        return tuple(_build(s, values, batch) for s in t["tuple"])
    if "list" in t:
        return [_build(s, values, batch) for s in t["list"]]
    if "dict" in t:
        return {k: _build(s, values, batch) for k, s in t["dict"]}
    y = values[t["output"]]
    if not t["shape"]:
        y = y.reshape(batch)
    if t["dtype"] is not None:
        y = y.to(getattr(torch, t["dtype"]))
    return y


# ============================================================================ locations
def _user_frame(frames: list[traceback.FrameSummary]) -> str | None:
    """The innermost frame of the model's own code (not torch's, not iternn's converter)."""
    for f in reversed(frames):
        name = os.path.abspath(f.filename)
        if name.startswith(_TORCH_DIR) or name in _OWN_FILES or f.filename.startswith("<"):
            continue
        line = (f.line or "").strip()
        return f"{f.filename}:{f.lineno}" + (f" `{line}`" if line else "")
    return None


def _here() -> str | None:
    return _user_frame(traceback.extract_stack())


def _line_key(where: str | None) -> str | None:
    """``file:line`` of a location (without the code)."""
    return where.split(" `", 1)[0] if where else None


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, recording the model's source line of every node and
    refusing data-dependent control flow by name."""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["iternn_where"] = _here()
        return node

    def _refuse(self, obj: fx.Proxy, what: str):
        node = obj.node
        where = _here()
        raise ConversionError(
            f"node {node.name!r} ({_describe(node)}) is {what} at {where or 'an unknown line'}: "
            "data-dependent control flow cannot be traced (torch.fx TraceError); from_module "
            "converts models whose structure does not depend on tensor values"
        )

    def to_bool(self, obj: fx.Proxy) -> bool:
        self._refuse(obj, "converted to bool (an if, while, assert or and/or on a tensor)")

    def iter(self, obj: fx.Proxy):
        self._refuse(obj, "iterated over")

    def keys(self, obj: fx.Proxy):
        self._refuse(obj, "unpacked with **")


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or repr(target)
    for prefix, space in (("torch", torch), ("torch.nn.functional", F), ("Tensor", Tensor)):
        if getattr(space, name, None) is target:
            return f"{prefix}.{name}"
    mod = getattr(target, "__module__", None) or ""
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{mod}.{getattr(target, '__qualname__', name)}" if mod else name


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target.removeprefix('model.')}"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2:
            return f"attribute .{node.args[1]}"
        return f"call_function {_target_name(node.target)}"
    if node.op == "get_attr":
        return f"get_attr {str(node.target).removeprefix('model.')}"
    return node.op


# ============================================================================ the traced call
class _Call(nn.Module):
    """The model called with its arguments rebuilt from a flat list of tensors: what is
    traced (one placeholder, indexed per tensor) and probed."""

    def __init__(self, model: nn.Module, params: list) -> None:
        super().__init__()
        self.model = model
        self._params = params

    def forward(self, *flat):
        args, kwargs = [], {}
        for name, kind, _, tpl in self._params:
            value = _rebuild(tpl, flat)
            if kind == "keyword_only":
                kwargs[name] = value
            else:
                args.append(value)
        return self.model(*args, **kwargs)


def _rebuild(t: dict, flat) -> Any:
    if "const" in t:
        return t["const"]
    if "tuple" in t:
        return tuple(_rebuild(s, flat) for s in t["tuple"])
    if "list" in t:
        return [_rebuild(s, flat) for s in t["list"]]
    if "dict" in t:
        return {k: _rebuild(s, flat) for k, s in t["dict"]}
    return flat[t["leaf"]]


def _identifier(text: str) -> str:
    name = re.sub(r"_+", "_", re.sub(r"\W", "_", text)).strip("_") or "x"
    return name if not name[0].isdigit() else f"x_{name}"


class _Names:
    """Unique slot names: identifiers, none an ``nn.Module`` attribute."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, base: str) -> str:
        base = _identifier(base)
        if base in _RESERVED:
            base = f"{base}_"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _example_template(value: object, path: str, leaves: list, names: _Names) -> dict:
    """The template of one example argument; tensor leaves are appended to ``leaves``."""
    if isinstance(value, Tensor):
        if value.dim() < 1:
            raise MapError(f"example argument {path} is a 0-dim tensor: every tensor needs a batch dim")
        if value.dtype == torch.bool or value.is_complex():
            raise MapTypeError(f"example argument {path} has dtype {value.dtype}; tensors must be "
                               "floating point, or integer (embedding indices)")
        integer = not value.is_floating_point()
        t = {"leaf": len(leaves), "input": names(path), "shape": list(value.shape[1:]),
             "integer": integer}
        leaves.append((path, value))
        return t
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        kind = "tuple" if type(value) is tuple else "list"
        return {kind: [_example_template(v, f"{path}[{i}]", leaves, names) for i, v in enumerate(value)]}
    if type(value) is dict:
        if not all(isinstance(k, str) for k in value):
            raise MapTypeError(f"example argument {path} is a dict with non-str keys")
        return {"dict": [[k, _example_template(v, f"{path}[{k!r}]", leaves, names)]
                         for k, v in value.items()]}
    if isinstance(value, (dict, tuple, list)):
        raise MapTypeError(f"example argument {path} is a {type(value).__name__}; containers must "
                           "be plain tuples, lists or dicts")
    if value is not None and not isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        raise MapTypeError(f"example argument {path} is a {type(value).__name__}: arguments are "
                           "tensors, tuples, lists or dicts of them, or constants (None, bool, "
                           "int, float, str, dtype, device)")
    return {"const": value}


def _strip_leaves(t: dict) -> dict:
    """A call template from an example template (no leaf indices)."""
    if "leaf" in t:
        return {k: v for k, v in t.items() if k != "leaf"}
    for kind in ("tuple", "list"):
        if kind in t:
            return {kind: [_strip_leaves(s) for s in t[kind]]}
    if "dict" in t:
        return {"dict": [[k, _strip_leaves(s)] for k, s in t["dict"]]}
    return t


# ============================================================================ probing
class _Mutations(TorchFunctionMode):
    """Records every torch call that changes a tensor in place (its version counter
    moves), with the model's source line and whether the model's code made it directly."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Tensor, str | None, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        tensors += [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, Tensor)]
        before = [t._version for t in tensors]
        out = func(*args, **kwargs)
        changed = [t for t, v in zip(tensors, before) if t._version != v]
        if changed:
            frames = traceback.extract_stack()[:-1]
            direct = False
            for f in reversed(frames):
                name = os.path.abspath(f.filename)
                if name.endswith(os.path.join("torch", "overrides.py")) or name.endswith(
                        os.path.join("torch", "_tensor.py")):
                    continue
                direct = not name.startswith(_TORCH_DIR)
                break
            where = _user_frame(frames)
            fname = getattr(func, "__name__", repr(func))
            for t in changed:
                self.events.append((fname, t, where, direct))
        return out


_CONTEXT_FILES = (os.path.join("torch", "autograd", "grad_mode.py"),
                  os.path.join("torch", "utils", "_contextlib.py"))


def _caller() -> str | None:
    """The model's line that switched the grad mode, when the model's own code did (not
    code inside a torch layer): the first frame outside torch's context managers."""
    frames = traceback.extract_stack()[:-2]
    for f in reversed(frames):
        name = os.path.abspath(f.filename)
        if name.endswith(_CONTEXT_FILES):
            continue
        if name.startswith(_TORCH_DIR) or name in _OWN_FILES:
            return None
        return _user_frame([f])
    return None


def _storages(tensors) -> dict[int, str]:
    out = {}
    for name, t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            out.setdefault(ptr, name)
    return out


@dataclass
class _Info:
    """What a node produced in a probe run."""

    kind: str  # "tensor", "seq" (tuple/list of tensors), "value" (anything else)
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    value: Any = None


def _info(out: object) -> _Info:
    if isinstance(out, Tensor):
        return _Info("tensor", tuple(out.shape), out.dtype, out.device)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out):
        return _Info("seq", None, out[0].dtype, out[0].device, tuple(tuple(t.shape) for t in out))
    if isinstance(out, (tuple, list)) and any(isinstance(t, Tensor) for t in out):
        return _Info("mixed")
    return _Info("value", value=out)


class _Probe(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.info: dict[fx.Node, _Info] = {}
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        self.info[n] = _info(out)
        return out


# ============================================================================ conversion values
class _Value:
    """A batched tensor of the traced model: either a slot already, or a *pending* sum of
    terms ``sum_k F_k(z_srcs)`` that becomes a slot when something needs it as one."""

    __slots__ = ("shape", "true_shape", "pos", "terms", "refs", "fresh", "held", "integer",
                 "is_slot", "acts", "node", "mergeable", "name", "merged")

    def __init__(self, true_shape: tuple[int, ...], pos: int, terms: list, refs: int, node: fx.Node,
                 *, fresh: bool = True, held: bool = False, integer: bool = False,
                 mergeable: bool = True) -> None:
        self.true_shape = true_shape
        self.shape = _slot_shape(true_shape)
        self.pos = pos
        self.terms = terms  # [(tuple of source _Values, module)]
        self.refs = refs  # consumers of this value (fx users, through aliases)
        self.fresh = fresh  # a new tensor in the source (not a view or alias of another)
        self.held = held
        self.integer = integer
        self.is_slot = False
        self.acts: list[nn.Module] = []
        self.node = node  # the node whose value the slot holds (names it)
        self.mergeable = mergeable
        self.merged = False  # its terms were moved into a sum's slot
        self.name: str | None = None


@dataclass
class _Const:
    """A non-tensor value (a size, a dtype...), as seen with batch B and with B + 1."""

    a: Any
    b: Any


@dataclass
class _Param:
    """A parameter, buffer or constant tensor of the model (a copy)."""

    tensor: Tensor
    path: str


@dataclass
class _Seq:
    """The pieces of a ``chunk``/``split``/``unbind`` of a slot: an :class:`ops.Index` each."""

    source: _Value
    pieces: list  # [(index items, true shape)]
    dtype: torch.dtype | None = None  # the pieces' dtype in the source (integer indices keep it)


@dataclass
class _Inputs:
    """The traced call's one placeholder (the flat list of tensor arguments)."""


@dataclass
class _Leaf:
    slot: str
    template: dict
    tensor: Tensor


class _Unbound(Exception):
    """A traced call whose arguments do not fit an op's signature (caught, then reported
    as a ConversionError naming the node)."""


class _Sig:
    """A hand-written argument signature: positional names, then defaults."""

    def __init__(self, *names: str, **defaults: Any) -> None:
        self.names = names + tuple(defaults)
        self.defaults = defaults

    def bind(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.names):
            raise _Unbound(f"takes at most {len(self.names)} arguments ({len(args)} given)")
        out = dict(zip(self.names, args))
        for k, v in kwargs.items():
            if k not in self.names:
                raise _Unbound(f"unsupported argument {k!r}")
            if k in out:
                raise _Unbound(f"argument {k!r} given twice")
            out[k] = v
        for n in self.names:
            if n not in out:
                if n not in self.defaults:
                    raise _Unbound(f"missing argument {n!r}")
                out[n] = self.defaults[n]
        return out


# ---------------------------------------------------------------------------- the op table
# target -> (handler, signature, options). Method targets are their names (str).
_OPS: dict[object, tuple[str, _Sig, dict]] = {}


def _op(targets, handler: str, sig: _Sig, **options) -> None:
    for t in targets:
        _OPS[t] = (handler, sig, options)


def _act(fn_targets, method_names, make, *, sig: _Sig | None = None, inplace_names=()) -> None:
    """Element-wise functions made into activation modules by ``make(bound)``."""
    sig = sig or _Sig("input")
    _op([*fn_targets, *method_names], "elementwise", sig, make=make)
    if inplace_names:
        _op(inplace_names, "elementwise", sig, make=make, inplace=True)


_act([F.relu, torch.relu], ["relu"], lambda b: nn.ReLU(), sig=_Sig("input", inplace=False),
     inplace_names=[F.relu_, torch.relu_, "relu_"])
_act([torch.tanh, F.tanh], ["tanh"], lambda b: nn.Tanh(), inplace_names=["tanh_"])
_act([torch.sigmoid, F.sigmoid], ["sigmoid"], lambda b: nn.Sigmoid(), inplace_names=["sigmoid_"])
_act([F.gelu], [], lambda b: nn.GELU(approximate=b["approximate"]), sig=_Sig("input", approximate="none"))
_act([F.silu], [], lambda b: nn.SiLU(), sig=_Sig("input", inplace=False))
_act([F.mish], [], lambda b: nn.Mish(), sig=_Sig("input", inplace=False))
_act([F.hardswish], [], lambda b: nn.Hardswish(), sig=_Sig("input", inplace=False))
_act([F.hardsigmoid], [], lambda b: nn.Hardsigmoid(), sig=_Sig("input", inplace=False))
_act([F.relu6], [], lambda b: nn.ReLU6(), sig=_Sig("input", inplace=False))
_act([F.selu, torch.selu], [], lambda b: nn.SELU(), sig=_Sig("input", inplace=False))
_act([F.elu], [], lambda b: nn.ELU(alpha=b["alpha"]), sig=_Sig("input", alpha=1.0, inplace=False))
_act([F.celu], [], lambda b: nn.CELU(alpha=b["alpha"]), sig=_Sig("input", alpha=1.0, inplace=False))
_act([F.leaky_relu], [], lambda b: nn.LeakyReLU(b["negative_slope"]),
     sig=_Sig("input", negative_slope=0.01, inplace=False))
_act([F.softplus], [], lambda b: nn.Softplus(b["beta"], b["threshold"]),
     sig=_Sig("input", beta=1.0, threshold=20.0))
_act([F.hardtanh], [], lambda b: nn.Hardtanh(b["min_val"], b["max_val"]),
     sig=_Sig("input", min_val=-1.0, max_val=1.0, inplace=False))
_act([F.softsign], [], lambda b: nn.Softsign())
_act([F.logsigmoid], [], lambda b: nn.LogSigmoid())
for _name, _fn in ops.UNARY.items():
    _targets = [_fn] + ([operator.neg] if _name == "neg" else []) + (
        [operator.abs] if _name == "abs" else []) + ([torch.negative] if _name == "neg" else [])
    _op([*_targets, _name], "unary", _Sig("input"), op=_name)
    if _name != "detach":
        _op([f"{_name}_"], "unary", _Sig("input"), op=_name, inplace=True)
_op([torch.clamp, torch.clip, "clamp", "clip"], "clamp", _Sig("input", min=None, max=None))
_op(["clamp_", "clip_"], "clamp", _Sig("input", min=None, max=None), inplace=True)
_op([F.dropout, F.dropout1d, F.dropout2d], "dropout",
    _Sig("input", p=0.5, training=True, inplace=False))
_op([torch.dropout], "dropout", _Sig("input", "p", "train"))
_op(["contiguous"], "alias", _Sig("input", memory_format=torch.contiguous_format))
_op([operator.pos], "alias", _Sig("input"))
_op([torch.clone, "clone"], "clone", _Sig("input", memory_format=torch.preserve_format))
_op(["to", "type"], "cast", _Sig("input", dtype=None, non_blocking=False, copy=False))
_op(["float"], "cast", _Sig("input"), dtype=torch.float32)
_op(["double"], "cast", _Sig("input"), dtype=torch.float64)
for _name, _targets in {
    "add": [operator.add, torch.add, "add"],
    "sub": [operator.sub, torch.sub, torch.subtract, "sub", "subtract"],
    "mul": [operator.mul, torch.mul, torch.multiply, "mul", "multiply"],
    "div": [operator.truediv, torch.true_divide, "true_divide"],
    "pow": [operator.pow, torch.pow, "pow"],
    "matmul": [operator.matmul, torch.matmul, "matmul"],
    "maximum": [torch.maximum, "maximum"],
    "minimum": [torch.minimum, "minimum"],
}.items():
    _sig = _Sig("input", "other", alpha=1) if _name in ("add", "sub") else _Sig("input", "other")
    _op(_targets, "binary", _sig, op=_name)
    if _name not in ("matmul", "maximum", "minimum"):
        _op([getattr(operator, f"i{_name if _name != 'div' else 'truediv'}"), f"{_name}_"],
            "binary", _sig, op=_name, inplace=True)
_op([torch.div, torch.divide, "div", "divide"], "binary", _Sig("input", "other", rounding_mode=None),
    op="div")
_op(["div_"], "binary", _Sig("input", "other", rounding_mode=None), op="div", inplace=True)
_op([torch.mm, "mm"], "binary", _Sig("input", "mat2"), op="matmul", rank=2)
_op([torch.bmm, "bmm"], "binary", _Sig("input", "mat2"), op="matmul", rank=3)
_op(["view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
     torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze],
    "reshape", _Sig())
_op(["permute", torch.permute], "permute", _Sig())
_op(["transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims],
    "transpose", _Sig("input", "dim0", "dim1"))
_op(["expand", "expand_as", torch.broadcast_to], "expand", _Sig())
_op([operator.getitem], "getitem", _Sig("input", "index"))
_op(["narrow", torch.narrow], "narrow", _Sig("input", "dim", "start", "length"))
_op(["chunk", torch.chunk], "chunk", _Sig("input", "chunks", dim=0))
_op(["split", torch.split], "split", _Sig("input", "split_size_or_sections", dim=0))
_op(["unbind", torch.unbind], "unbind", _Sig("input", dim=0))
_op([torch.cat, torch.concat, torch.concatenate], "cat", _Sig("tensors", dim=0))
_op([torch.stack], "stack", _Sig("tensors", dim=0))
for _name in ("mean", "sum"):
    _op([getattr(torch, _name), _name], "reduce", _Sig("input", dim=None, keepdim=False, dtype=None),
        op=_name)
for _name in ("amax", "amin"):
    _op([getattr(torch, _name), _name], "reduce", _Sig("input", dim=(), keepdim=False), op=_name)
_op([F.softmax, torch.softmax, "softmax"], "softmax",
    _Sig("input", dim=None, _stacklevel=3, dtype=None), cls=nn.Softmax)
_op([F.log_softmax, torch.log_softmax, "log_softmax"], "softmax",
    _Sig("input", dim=None, _stacklevel=3, dtype=None), cls=nn.LogSoftmax)
_op([F.avg_pool1d], "pool", _Sig("input", "kernel_size", stride=None, padding=0, ceil_mode=False,
                                  count_include_pad=True), cls=nn.AvgPool1d)
_op([F.avg_pool2d], "pool", _Sig("input", "kernel_size", stride=None, padding=0, ceil_mode=False,
                                  count_include_pad=True, divisor_override=None), cls=nn.AvgPool2d)
for _fn, _cls in ((F.max_pool1d, nn.MaxPool1d), (F.max_pool2d, nn.MaxPool2d)):
    _op([_fn], "pool", _Sig("input", "kernel_size", stride=None, padding=0, dilation=1,
                            ceil_mode=False, return_indices=False), cls=_cls)
for _fn, _cls in ((F.adaptive_avg_pool1d, nn.AdaptiveAvgPool1d),
                  (F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d)):
    _op([_fn], "pool", _Sig("input", "output_size"), cls=_cls)
for _fn, _cls in ((F.adaptive_max_pool1d, nn.AdaptiveMaxPool1d),
                  (F.adaptive_max_pool2d, nn.AdaptiveMaxPool2d)):
    _op([_fn], "pool", _Sig("input", "output_size", return_indices=False), cls=_cls)
_op([F.linear], "linear", _Sig("input", "weight", bias=None))
_op([F.layer_norm], "layer_norm", _Sig("input", "normalized_shape", weight=None, bias=None, eps=1e-5))
_op(["size", "dim", "ndimension", "numel", "nelement"], "meta", _Sig())
_op([getattr], "getattr", _Sig("input", "name"))

#: Targets computed on non-tensor values (sizes, dtypes) at conversion time.
_PYTHON = frozenset(
    getattr(operator, n) for n in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "getitem",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs", "index",
    )
) | {len, int, float, min, max, math.ceil, math.floor, math.prod, math.sqrt}
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.SELU, nn.CELU, nn.Softsign, nn.LogSigmoid,
    nn.Hardtanh,
)
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_BLOCK_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
_DROPOUT_FUNCTIONS = {F.dropout: nn.Dropout, torch.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d,
                      F.dropout2d: nn.Dropout2d}
#: Python operators whose in-place form (``a += b``) torch.fx records as the plain one,
#: with the name of the in-place torch call that form makes (``a += b`` runs ``add_``).
_AUGMENTABLE = {operator.add: "add_", operator.sub: "sub_", operator.mul: "mul_",
                operator.truediv: "div_", operator.pow: "pow_", operator.matmul: "matmul_",
                operator.floordiv: "floor_divide_", operator.mod: "remainder_"}


def _dropout_flag(node: fx.Node) -> bool | None:
    """The ``training`` argument of a dropout function call (``None``: not one)."""
    if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
        return None
    _, sig, _ = _OPS[node.target]
    try:
        b = sig.bind(node.args, node.kwargs)
    except _Unbound:
        return None
    flag = b.get("training", b.get("train"))
    return flag if isinstance(flag, bool) else None


def _graph_key(node: fx.Node, index: dict) -> tuple:
    """What must agree between the train-mode and eval-mode traces of one node (nodes
    named by position; tensor constants, which each trace stores anew, by kind; a node of
    another trace, which an attribute kept from an earlier trace brings in, by identity)."""
    def norm(a):
        return fx.node.map_arg(a, lambda n: ("node", index[n]) if n in index else ("foreign", id(n)))
    args, kwargs = node.args, dict(node.kwargs)
    if _dropout_flag(node) is not None:  # the training flag may follow the mode
        _, sig, _ = _OPS[node.target]
        b = sig.bind(node.args, node.kwargs)
        b.pop("training", None)
        b.pop("train", None)
        args, kwargs = (), b
    target = node.target
    if node.op == "get_attr" and str(target).startswith("_tensor_constant"):
        target = "_tensor_constant"
    return (node.op, target, repr(norm(args)), repr(norm(kwargs)))


# ============================================================================ from_module
def from_module(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> ModuleMap:
    """Convert a feed-forward PyTorch model into an equivalent :class:`ModuleMap`.

    ``model`` is traced with ``torch.fx`` and run on the example arguments (on a copy,
    with the RNG state forked: conversion draws no random numbers and leaves the
    model's running statistics alone) to learn every tensor's shape. The result keeps the
    model's call signature (several inputs and outputs, tuples, lists and dicts of
    tensors, keyword arguments), holds copies of the parameters (training one does not
    change the other; parameters tied in the model stay tied in the copy), their
    ``requires_grad`` flags, dtype, device and every layer's train/eval mode. Dropout
    draws the same random numbers in the same order as the source (same seed, same
    masks); batch normalisation blocks are copies of the source's, called once per
    forward, so their running statistics move exactly as the source's do. ``.train()``
    and ``.eval()`` on the result switch them like the source's.

    The first dim of every tensor argument is the batch; slot shapes are the sample
    shapes of the example, so the result accepts any batch size but only these sample
    shapes. Non-tensor arguments are fixed at the example's values.

    Supported: ``nn.Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``,
    ``MaxPool``/``AvgPool``/``AdaptiveAvgPool``/``AdaptiveMaxPool`` 1d/2d (modules and
    functions), ``BatchNorm1d/2d/3d``, ``LayerNorm`` (module and ``F.layer_norm``),
    ``GroupNorm``, ``Dropout``/``Dropout1d``/``Dropout2d`` (modules and functions),
    ``Flatten``, ``Unflatten``, ``Embedding`` (integer inputs), ``Softmax``,
    ``LogSoftmax``, ``F.linear``, the element-wise activations (ReLU, LeakyReLU, Tanh,
    Sigmoid, GELU, ELU, SiLU, Softplus, Mish, Hardswish, Hardsigmoid, ReLU6, SELU,
    CELU, Softsign, LogSigmoid, Hardtanh; modules, functions and methods), ``neg``,
    ``exp``, ``log``, ``abs``, ``sqrt``, ``rsqrt``, ``square``, ``sin``, ``cos``,
    ``reciprocal``, ``erf``, ``log1p``, ``expm1``, ``clamp``, ``detach``; ``+ - * / **``,
    ``@``, ``maximum``, ``minimum`` between tensors, with numbers and with parameters
    or buffers; ``view``/``reshape``/``flatten``/``unflatten``/``squeeze(dim)``/
    ``unsqueeze``/``permute``/``transpose``/``expand``, basic indexing and slicing,
    ``narrow``, ``chunk``, ``split``, ``unbind``, ``cat``, ``stack``; ``mean``, ``sum``,
    ``amax``, ``amin`` over sample dims; ``contiguous``, ``clone``; sizes (``x.size(0)``,
    ``x.shape``) wherever a shape operation reads them.

    Raises:
        MapTypeError: (a ``TypeError``) ``model`` is not an ``nn.Module``, or an example
            argument has the wrong type (not a tensor, container or constant; a bool or
            complex tensor; arguments that do not fit ``forward``'s signature).
        MapError: (a ``ValueError``) an example tensor without a batch dim, tensors of
            different batch sizes, or a model that fails on the example arguments.
        ConversionError: (a ``ValueError``) what cannot be converted exactly: an
            unsupported module, function or method, data-dependent control flow, an
            in-place change of an input, parameter or shared tensor, an operation that
            mixes the samples of the batch, code that depends on train/eval mode
            beyond dropout, hooks on traced-through modules. The message names the
            traced node and the model's source line.
    """
    if not isinstance(model, nn.Module):
        raise MapTypeError(f"from_module needs an nn.Module, got {type(model).__name__}")
    params, leaves = _bind_examples(model, example_args, example_kwargs)
    tracer_type = _Tracer
    _check_hooks(model, tracer_type())
    wrapper = _Call(model, params)
    try:
        probe_root = copy.deepcopy(wrapper)
    except Exception as exc:  # a module holding something that cannot be copied
        raise ConversionError(f"cannot copy {type(model).__name__} (conversion runs and keeps "
                              f"copies): {type(exc).__name__}: {exc}") from exc
    inplace_lines = _run_source(probe_root, params, leaves)
    graph, flags = _trace_all_modes(wrapper, model, tracer_type)
    for node in graph.nodes:  # tensor constants fx stored on the traced root
        if node.op == "get_attr" and "." not in str(node.target):
            setattr(probe_root, node.target, copy.deepcopy(getattr(wrapper, node.target)))
    info_a, info_b = _shapes(probe_root, graph, leaves)
    conv = _Converter(wrapper, graph, info_a, info_b, leaves, flags, inplace_lines)
    return conv.build(params)


def _bind_examples(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list, list[_Leaf]]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise MapTypeError(f"cannot read the signature of {type(model).__name__}.forward: {exc}") from exc
    for p in sig.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConversionError(
                f"{type(model).__name__}.forward takes *{p.name}/**{p.name}: from_module needs "
                "named parameters (the result keeps the signature)"
            )
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise MapTypeError(f"the example arguments do not fit {type(model).__name__}.forward{sig}: {exc}") \
            from None
    names = _Names()
    leaves_raw: list = []
    params = []
    for name, p in sig.parameters.items():
        if name in bound.arguments:
            value = bound.arguments[name]
        elif p.default is not inspect.Parameter.empty:
            value = p.default
            if isinstance(value, Tensor):
                raise MapTypeError(f"parameter {name!r} has a tensor default; pass it explicitly")
        else:  # pragma: no cover - bind refuses a missing argument
            raise MapTypeError(f"missing example argument {name!r}")
        tpl = _example_template(value, name, leaves_raw, names)
        default = None if p.default is inspect.Parameter.empty else {"value": p.default}
        params.append([name, _KIND_NAMES[p.kind], default, tpl])
    if not leaves_raw:
        raise MapTypeError("from_module needs at least one example tensor argument")
    batch = leaves_raw[0][1].shape[0]
    for path, t in leaves_raw:
        if t.shape[0] != batch:
            raise MapError(
                f"example argument {path} has batch size {t.shape[0]}, {leaves_raw[0][0]} has {batch}: "
                "the first dim of every tensor argument is the batch"
            )
        if batch == 0:
            raise MapError(f"example argument {path} has an empty batch")
    leaves = []
    for (_, t), tpl in zip(leaves_raw, _leaf_templates(params)):
        leaves.append(_Leaf(tpl["input"], tpl, t))
    return params, leaves


def _leaf_templates(params: list) -> list[dict]:
    out = []

    def walk(t):
        if "leaf" in t:
            out.append(t)
        for kind in ("tuple", "list"):
            for s in t.get(kind, ()):
                walk(s)
        for _, s in t.get("dict", ()):
            walk(s)

    for _, _, _, t in params:
        walk(t)
    return sorted(out, key=lambda t: t["leaf"])


def _check_hooks(model: nn.Module, tracer: fx.Tracer) -> None:
    """Hooks of modules that are traced through would be lost, and a ``train()`` of the
    model's own could not be followed by the converted model's: refuse them. So are
    tensors computed by autograd kept as attributes (not parameters or buffers), which
    cannot be copied."""
    for path, mod in model.named_modules():
        if type(mod).train is not nn.Module.train:
            raise ConversionError(
                f"module {path or '<root>'} ({type(mod).__name__}) overrides train(): the "
                "converted model's train()/eval() could not do what it does"
            )
        for k, t in vars(mod).items():
            if isinstance(t, Tensor) and not t.is_leaf:
                raise ConversionError(
                    f"module {path or '<root>'} ({type(mod).__name__}) keeps {k!r}, a tensor "
                    "computed by autograd (pruning and torch.nn.utils.weight_norm keep their "
                    "weight so), as an attribute: it cannot be copied (make it permanent first, "
                    "e.g. prune.remove)"
                )
        if tracer.is_leaf_module(mod, path or "model"):
            continue
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or getattr(
                mod, "_backward_pre_hooks", None):
            raise ConversionError(
                f"module {path or '<root>'} ({type(mod).__name__}) has hooks; torch.fx traces "
                "through it and would lose them"
            )


def _devices(*tensors: Tensor) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _run_source(root: _Call, params: list, leaves: list[_Leaf]) -> dict[str, frozenset[str]]:
    """Run (a copy of) the source once on copies of the examples, recording in-place
    changes; refuse changes of inputs or of parameters and buffers made by the model's
    own code. Returns the source lines of its other in-place operations, with their
    names (``a += b``, which torch.fx records as ``a + b``, runs ``add_``)."""
    flat = [leaf.tensor.detach().clone() for leaf in leaves]
    inputs = _storages((leaf.template["input"], t) for leaf, t in zip(leaves, flat))
    plain = [(f"{path}.{k}" if path else k, t) for path, mod in root.model.named_modules()
             for k, t in vars(mod).items() if isinstance(t, Tensor)]  # tensors kept as attributes
    state = _storages([*root.model.state_dict(keep_vars=True).items(), *plain])
    rec = _Mutations()
    devices = _devices(*flat, *root.parameters())
    switches: list[str | None] = []
    real_grad, real_inference = torch._C._set_grad_enabled, torch._C._InferenceMode

    def grad_spy(*args):
        switches.append(_caller())
        return real_grad(*args)

    def inference_spy(*args):
        switches.append(_caller())
        return real_inference(*args)

    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), rec:
            torch._C._set_grad_enabled, torch._C._InferenceMode = grad_spy, inference_spy
            try:
                root(*flat)
            finally:
                torch._C._set_grad_enabled, torch._C._InferenceMode = real_grad, real_inference
    except ConversionError:
        raise
    except Exception as exc:
        where = _user_frame(traceback.extract_tb(exc.__traceback__))
        raise MapError(
            f"the model fails on the example arguments{f' at {where}' if where else ''}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    switched = [w for w in switches if w is not None]
    if switched:
        raise ConversionError(
            f"the model switches autograd on or off (torch.no_grad, enable_grad, "
            f"set_grad_enabled or inference_mode) at {switched[0]}: torch.fx does not record "
            "it, so the converted model's gradients would differ"
        )
    lines: dict[str, set[str]] = {}
    for fname, t, where, direct in rec.events:
        ptr = t.untyped_storage().data_ptr()
        if ptr in inputs:
            raise ConversionError(
                f"the model changes its input {inputs[ptr]!r} in place ({fname}) at "
                f"{where or 'an unknown line'}: the converted model could not do the same"
            )
        if direct and ptr in state:
            raise ConversionError(
                f"the model changes {state[ptr]!r} in place ({fname}) at {where or 'an unknown line'}: "
                "state changed by the model's own code cannot be converted"
            )
        if direct and where:
            lines.setdefault(_line_key(where), set()).add(fname)
    return {k: frozenset(v) for k, v in lines.items()}


def _rng_states(devices: list[int]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _trace(wrapper: _Call, model: nn.Module, tracer_type, mode: bool | None) -> fx.Graph:
    """One trace of the model, modes and RNG restored afterwards. Random numbers drawn
    while tracing (``torch.rand(3)``: no traced argument, so fx runs it and keeps the
    result as a constant) are refused: the source draws new ones at every call."""
    modes = [(m, m.training) for m in model.modules()]
    devices = _devices(*model.parameters(), *model.buffers())
    try:
        if mode is not None:
            for m, _ in modes:
                m.training = mode
        with torch.random.fork_rng(devices=devices):
            before = _rng_states(devices)
            graph = tracer_type().trace(wrapper)
            drew = not all(torch.equal(a, b) for a, b in zip(before, _rng_states(devices)))
        if drew:
            consts = [n for n in graph.nodes
                      if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")]
            where = consts[0].meta.get("iternn_where") if consts else None
            raise ConversionError(
                "the model draws random numbers outside the traced operations (torch.rand, "
                "randn, randint, bernoulli... on constant arguments"
                f"{f', used at {where}' if where else ''}): torch.fx keeps the numbers of the "
                "trace as a constant, the source draws new ones at every call")
        return graph
    except ConversionError:
        raise
    except Exception as exc:
        where = _user_frame(traceback.extract_tb(exc.__traceback__))
        raise ConversionError(
            f"torch.fx cannot trace {type(model).__name__}"
            f"{f' at {where}' if where else ''}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for m, flag in modes:
            m.training = flag


def _same_constant(root: _Call, a: fx.Node, b: fx.Node) -> bool:
    """Whether two nodes of the same kind (of two traces), when they read tensor constants
    the tracer stored on ``root`` (``torch.tensor(...)`` in the code), read equal ones."""
    if a.op != "get_attr" or not str(a.target).startswith("_tensor_constant"):
        return True
    x, y = getattr(root, a.target, None), getattr(root, b.target, None)
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        return x is y
    return x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and (
        torch.equal(x, y) or (x.is_floating_point() and bool(torch.isclose(x, y, 0, 0, True).all())))


def _trace_all_modes(wrapper: _Call, model: nn.Module, tracer_type) -> tuple[fx.Graph, dict]:
    """The trace in the model's modes, checked against the traces in train and in eval
    mode: they must agree but for dropout's ``training`` flags. Returns the graph and,
    per dropout call node, its flag in (train, eval, current) mode.

    Tracing runs the model's Python code: state it keeps between calls in attributes
    (``self.calls += 1``, ``self.prev = h``) shows as traces that differ, and is refused;
    every module's attributes are restored afterwards (``self.last = h`` would leave an
    fx proxy behind in the source)."""
    tables = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(vars(m)), {k: dict(vars(m)[k]) for k in tables if k in vars(m)})
             for m in model.modules()]
    try:
        graph = _trace(wrapper, model, tracer_type, None)
        train = list(_trace(wrapper, model, tracer_type, True).nodes)
        evals = list(_trace(wrapper, model, tracer_type, False).nodes)
    finally:
        for m, attrs, kept in saved:
            vars(m).clear()
            vars(m).update(attrs)
            for k, table in kept.items():
                attrs[k].clear()
                attrs[k].update(table)
    nodes = list(graph.nodes)
    indexes = [{n: i for i, n in enumerate(g)} for g in (nodes, train, evals)]
    for i, node in enumerate(nodes):
        keys = {_graph_key(g[i], ix) if i < len(g) else None
                for g, ix in ((train, indexes[1]), (evals, indexes[2]))}
        if keys != {_graph_key(node, indexes[0])} or not all(
                _same_constant(wrapper, node, g[i]) for g in (train, evals)):
            where = node.meta.get("iternn_where") or "an unknown line"
            raise ConversionError(
                f"node {node.name!r} ({_describe(node)}) at {where}"
                " differs between the train-mode and the eval-mode trace: the model's code "
                "depends on train/eval mode (beyond dropout), which train()/eval() on the "
                "converted model could not follow, or on state it keeps between calls (an "
                "attribute its forward changes), which the converted model would fix"
            )
    if len(train) != len(nodes) or len(evals) != len(nodes):
        raise ConversionError(
            "the train-mode and eval-mode traces have different lengths: the model's code "
            "depends on train/eval mode (beyond dropout)"
        )
    flags = {}
    for i, node in enumerate(nodes):
        cur = _dropout_flag(node)
        if cur is not None:
            flags[node] = (_dropout_flag(train[i]), _dropout_flag(evals[i]), cur)
    return graph, flags


def _shapes(root: _Call, graph: fx.Graph, leaves: list[_Leaf]) -> tuple[dict, dict]:
    """Every node's output, with the example batch B and with B + 1 (on the copy)."""
    gm = fx.GraphModule(root, graph)
    flat_a = [leaf.tensor.detach().clone() for leaf in leaves]
    flat_b = [torch.cat([t, t[:1]]) for t in flat_a]
    devices = _devices(*flat_a, *root.parameters())
    out = []
    for flat, label in ((flat_a, "the example batch"), (flat_b, "a batch one larger")):
        probe = _Probe(gm)
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                probe.run(*flat)
        except Exception as exc:
            n = probe.failed
            where = n.meta.get("iternn_where") if n is not None else None
            what = f"node {n.name!r} ({_describe(n)}) at {where or 'an unknown line'}" if n else "the trace"
            hint = (": the first dim is not a batch dim for this model (a size fixed in the code?)"
                    if flat is flat_b else "")
            raise ConversionError(
                f"{what} fails on {label}{hint}: {type(exc).__name__}: {exc}"
            ) from exc
        out.append(probe.info)
    return out[0], out[1]


# ============================================================================ the converter
class _Converter:
    def __init__(self, wrapper: _Call, graph: fx.Graph, info_a: dict, info_b: dict,
                 leaves: list[_Leaf], flags: dict, inplace_lines: dict[str, frozenset[str]]) -> None:
        self.root = wrapper
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.info_a, self.info_b = info_a, info_b
        self.leaves = leaves
        self.flags = flags
        self.inplace_lines = inplace_lines
        self.batch = leaves[0].tensor.shape[0]
        self.env: dict[fx.Node, Any] = {}
        self.slots: list[_Value] = []
        self.memo: dict = {}
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.last_random = -1
        self.outputs: dict | None = None
        self.owned: set[int] = set()  # modules whose train/eval mode comes from the source
        self.values: list[_Value] = []  # every value made by new_value
        uses: dict[int, int] = {}
        self.called_buffers: dict[int, str] = {}  # buffers of called layers (running statistics)
        for n in self.nodes:
            if n.op == "call_module":
                mod = self.root.get_submodule(n.target)
                uses[id(mod)] = uses.get(id(mod), 0) + 1
                for _, buf in mod.named_buffers():
                    self.called_buffers[id(buf)] = str(n.target).removeprefix("model.")
        self.module_uses = uses

    # ------------------------------------------------------------------ errors
    def fail(self, node: fx.Node, why: str, cls: type = ConversionError) -> Exception:
        where = node.meta.get("iternn_where")
        return cls(f"node {node.name!r} ({_describe(node)}) at {where or 'an unknown line'}: {why}")

    # ------------------------------------------------------------------ values
    def value(self, node: fx.Node, arg: object) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg]
        return _Const(arg, arg)

    def const(self, node: fx.Node, arg: object, what: str) -> Any:
        """A batch-independent Python value (sizes read from tensors resolved)."""
        if isinstance(arg, fx.Node):
            v = self.env[arg]
            if not isinstance(v, _Const):
                raise self.fail(node, f"{what} must be a constant, got a tensor ({arg.name!r})")
            if not _same_const(v.a, v.b):
                raise self.fail(node, f"{what} depends on the batch size ({v.a!r} with batch "
                                      f"{self.batch}, {v.b!r} with {self.batch + 1}): it mixes the batch dim")
            return v.a
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.const(node, a, what) for a in arg)
        if isinstance(arg, slice):
            return slice(self.const(node, arg.start, what), self.const(node, arg.stop, what),
                         self.const(node, arg.step, what))
        if isinstance(arg, dict):
            return {k: self.const(node, a, what) for k, a in arg.items()}
        return arg

    def batched(self, node: fx.Node, arg: object, what: str = "its input") -> _Value:
        v = self.value(node, arg)
        if isinstance(v, _Value):
            return v
        if isinstance(v, _Param):
            raise self.fail(node, f"{what} is the tensor {v.path!r} of the model, not one computed "
                                  "from the inputs: only tensors with a batch dim are converted")
        if isinstance(v, _Seq):
            raise self.fail(node, f"{what} is a tuple of tensors (from chunk/split/unbind)")
        raise self.fail(node, f"{what} must be a tensor computed from the inputs, got {v!r}")

    def float_value(self, node: fx.Node, v: _Value, what: str = "its input") -> _Value:
        if v.integer:
            raise self.fail(node, f"{what} holds integer indices; they may only be reshaped, "
                                  "indexed or read by an Embedding")
        return v

    def materialize(self, v: _Value) -> _Value:
        if not v.is_slot:
            v.is_slot = True
            self.slots.append(v)
        return v

    def new_value(self, node: fx.Node, terms: list, *, fresh: bool = True, integer: bool = False,
                  shape: tuple[int, ...] | None = None, pinned: bool = False) -> _Value:
        """A pending sum of ``terms`` holding ``node``'s value; a slot at once when it is
        read more than once or not at all, or when ``pinned`` (a module called at several
        nodes: its calls keep the source's order, which matters for running statistics)."""
        true = self.sample_shape(node) if shape is None else shape
        v = _Value(true, self.pos[node], terms, len(node.users), node, fresh=fresh,
                   integer=integer, mergeable=not pinned)
        self.values.append(v)
        if v.refs != 1 or pinned:
            self.materialize(v)
        return v

    def block(self, node: fx.Node, src: _Value, module: nn.Module, **kw) -> _Value:
        """``node = module(src)``: a one-term pending."""
        return self.new_value(node, [((self.materialize(src),), module)], **kw)

    def alias(self, node: fx.Node, v: _Value, *, fresh: bool | None = None) -> _Value:
        """``node`` has the value of ``v`` (a view, ``contiguous``, an identity); the slot
        keeps the name of the node that made the value."""
        v.refs += len(node.users) - 1
        if fresh is not None:
            v.fresh = v.fresh and fresh
        return v

    def sample_shape(self, node: fx.Node) -> tuple[int, ...]:
        info = self.info_a[node]
        return tuple(info.shape[1:])

    # ------------------------------------------------------------------ checks
    def check_batched(self, node: fx.Node) -> None:
        """A tensor computed from the inputs: first dim the batch in both probe runs, the
        same sample shape, the map's dtype and device."""
        a, b = self.info_a.get(node), self.info_b.get(node)
        if a is None or a.kind != "tensor":
            return
        if (not a.shape or a.shape[0] != self.batch or b is None or b.kind != "tensor" or not b.shape
                or b.shape[0] != self.batch + 1 or a.shape[1:] != b.shape[1:]):
            bshape = b.shape if b is not None else None
            raise self.fail(
                node, f"its result has shape {a.shape} with batch {self.batch} and {bshape} with "
                      f"batch {self.batch + 1}: the operation mixes the batch dim (samples would "
                      "read each other)")
        if 0 in a.shape:
            raise self.fail(node, f"its result is empty {a.shape}: empty tensors have no slot")
        if a.dtype.is_floating_point:
            if self.dtype is None:
                self.dtype = a.dtype
            elif a.dtype != self.dtype:
                raise self.fail(node, f"its result has dtype {a.dtype}, other tensors {self.dtype}: "
                                      "a map's slots share one dtype")
        elif a.dtype == torch.bool or a.dtype.is_complex:
            raise self.fail(node, f"its result has dtype {a.dtype}; slots are floating point")
        if self.device is None:
            self.device = a.device
        elif a.device != self.device:
            raise self.fail(node, f"its result is on {a.device}, other tensors on {self.device}")

    def check_inplace(self, node: fx.Node, arg: object) -> None:
        """``node`` changes ``arg`` in place: exact as a new value only when nothing else
        reads the old one (a fresh tensor with this one consumer)."""
        v = self.value(node, arg)
        if isinstance(v, _Param):
            raise self.fail(node, f"it changes the model's tensor {v.path!r} in place")
        if not isinstance(v, _Value):
            return
        if v.held:
            raise self.fail(node, f"it changes the input {v.name!r} in place: the converted "
                                  "model could not do the same")
        if not v.fresh or v.refs != 1:
            raise self.fail(node, "it changes a tensor in place that is also read elsewhere, or "
                                  "that is a view of another tensor: the traced graph does not "
                                  "show the change to the other readers")

    def sample_dim(self, node: fx.Node, dim: object, rank: int, what: str = "dim") -> int:
        """A dim of a tensor of full rank ``rank`` (batch included) as a sample dim (>= 0)."""
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise self.fail(node, f"{what} must be an int, got {dim!r}")
        d = dim + rank if dim < 0 else dim
        if not 0 <= d < rank:
            raise self.fail(node, f"{what} {dim} is out of range for rank {rank}")
        if d == 0:
            raise self.fail(node, f"{what} {dim} is the batch dim: the operation mixes the samples")
        return d - 1

    # ------------------------------------------------------------------ the pass
    def run(self) -> None:
        for node in self.nodes:
            self.env[node] = self.convert(node)
        # A value nothing computes from (read only for its shape, or through an alias that
        # nothing reads) still gets its slot: the source computes it too, which may move
        # running statistics or call hooks.
        for v in self.values:
            if not v.is_slot and not v.merged:
                self.materialize(v)

    def convert(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            return _Inputs()
        if op == "output":
            self.outputs = self.output_template(node, node.args[0])
            return None
        if op == "get_attr":
            return self.get_attr(node)
        args_values = [self.env[a] for a in node.all_input_nodes]
        if any(isinstance(v, _Inputs) for v in args_values):
            return self.input_slot(node)
        batched = any(isinstance(v, (_Value, _Seq)) for v in args_values)
        if op == "call_module":
            self.check_batched(node)
            return self.call_module(node)
        target = node.target
        if not batched:
            params = [v.path for v in args_values if isinstance(v, _Param)]
            if params:
                raise self.fail(node, f"it computes from the model's tensors {params} alone (no "
                                      "batch dim); from_module converts tensors computed from the inputs")
            return self.python(node)
        entry = _OPS.get(target)
        if entry is None:
            kind = "method" if op == "call_method" else "function"
            raise self.fail(node, f"the {kind} {_target_name(target)} is not supported by from_module")
        handler, sig, options = entry
        if handler not in ("meta", "getattr"):
            self.check_batched(node)
        if handler in ("reshape", "permute", "expand", "meta"):
            bound = {"input": node.args[0] if node.args else node.kwargs.get("input"),
                     "rest": node.args[1:], "kwargs": node.kwargs}
        else:
            try:
                bound = sig.bind(node.args, dict(node.kwargs))
            except _Unbound as exc:
                raise self.fail(node, f"unsupported call: {exc}") from None
        if (node.op == "call_function" and target in _AUGMENTABLE and _AUGMENTABLE[target]
                in self.inplace_lines.get(_line_key(node.meta.get("iternn_where")), ())):
            # `a += b` at this line (or another `+` next to an in-place add): fx shows `a + b`
            options = {**options, "inplace": True}
        return getattr(self, f"op_{handler}")(node, bound, **options)

    # ------------------------------------------------------------------ sources
    def input_slot(self, node: fx.Node) -> _Value:
        if not (node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[1], int)):
            raise self.fail(node, "the traced call's arguments are read in an unexpected way")
        leaf = self.leaves[node.args[1]]
        t = leaf.tensor
        v = _Value(tuple(t.shape[1:]), self.pos[node], [], len(node.users), node, fresh=False,
                   held=True, integer=not t.is_floating_point())
        v.name = leaf.slot
        self.materialize(v)
        if t.is_floating_point():
            self.check_batched(node)
        elif self.device is None:
            self.device = t.device
        return v

    def get_attr(self, node: fx.Node) -> Any:
        target = str(node.target)
        obj: Any = self.root
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise self.fail(node, f"the model has no attribute {target!r}") from None
        path = target.removeprefix("model.")
        if id(obj) in self.called_buffers:
            owner = self.called_buffers[id(obj)]
            raise self.fail(node, f"it reads {path!r}, a buffer of the layer {owner!r}, which the "
                                  "layer updates in place when it is called (running statistics): "
                                  "the converted model could not keep the order of the two")
        if isinstance(obj, Tensor):
            return _Param(copy.deepcopy(obj, self.memo), path)
        raise self.fail(node, f"attribute {path!r} is a {type(obj).__name__}, not a tensor")

    def python(self, node: fx.Node) -> _Const:
        """A value computed from constants only: a size, an index..."""
        a, b = self.info_a.get(node), self.info_b.get(node)
        target = node.target
        ok = (node.op == "call_function" and (target in _PYTHON or target is getattr)) or (
            node.op == "call_method" and a is not None and a.kind == "value"
            and not isinstance(a.value, Tensor))
        if not ok or a is None or a.kind != "value":
            what = "creates a tensor" if a is not None and a.kind != "value" else "computes a value"
            raise self.fail(node, f"it {what} from constants alone ({_target_name(target)}); "
                                  "from_module converts tensors computed from the inputs")
        return _Const(a.value, b.value if b is not None else None)

    # ------------------------------------------------------------------ modules
    def copy_module(self, mod: nn.Module) -> nn.Module:
        """A copy of a layer of the model (one per layer: a layer called twice, and
        parameters tied between layers, stay shared), with ``inplace`` switched off: a
        block or activation must not write into what it reads, and the map would otherwise
        make a copy of its own, untying the parameters of the activation it is part of."""
        out = copy.deepcopy(mod, self.memo)
        for m in out.modules():
            self.owned.add(id(m))
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        return out

    def call_module(self, node: fx.Node) -> Any:
        mod = self.root.get_submodule(node.target)
        path = str(node.target).removeprefix("model.")
        cls = type(mod)
        if len(node.args) != 1 or node.kwargs:
            raise self.fail(node, f"{cls.__name__} {path!r} is called with {len(node.args)} "
                                  f"positional and {len(node.kwargs)} keyword arguments; "
                                  "from_module converts calls on one tensor")
        supported = (*_ELEMENTWISE_MODULES, *_RANDOM_MODULES, *_BLOCK_MODULES, nn.Identity,
                     nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax, nn.Embedding)
        if cls not in supported:
            base = next((c for c in cls.__mro__[1:] if c in supported), None)
            hint = f" (a subclass of {base.__name__}: its forward may differ)" if base else ""
            raise self.fail(node, f"module {path!r} of type {cls.__name__}{hint} is not supported "
                                  "by from_module")
        backward = mod._backward_hooks or getattr(mod, "_backward_pre_hooks", None)
        forward = mod._forward_hooks or mod._forward_pre_hooks
        if backward or (forward and cls not in (*_BLOCK_MODULES, nn.Embedding)):
            kept = "backward hooks are not kept" if backward else (
                "only layers called as blocks (Linear, convolutions, pooling, normalisation, "
                "Embedding) keep their forward hooks")
            raise self.fail(node, f"{cls.__name__} {path!r} has hooks: {kept}; the converted model "
                                  "would not call them")
        src = self.batched(node, node.args[0])
        if cls is nn.Embedding:
            return self.embedding(node, src, mod)
        self.float_value(node, src)
        inplace = getattr(mod, "inplace", False) is True
        if inplace:
            self.check_inplace(node, node.args[0])
        if cls is nn.Identity:
            return self.alias(node, src)
        if cls in _ELEMENTWISE_MODULES:
            return self.elementwise(node, src, self.copy_module(mod))
        if cls in _RANDOM_MODULES:
            return self.elementwise(node, src, self.copy_module(mod), random=True, fresh=False)
        pinned = self.module_uses[id(mod)] > 1
        if not src.true_shape:
            raise self.fail(node, f"{cls.__name__} {path!r} reads a per-sample scalar (shape (batch,))")
        if cls in (nn.Flatten, nn.Unflatten):
            return self.reshape_to(node, src)
        if cls in (nn.Softmax, nn.LogSoftmax):
            if mod.dim is None:
                raise self.fail(node, f"{cls.__name__} {path!r} has dim=None (an implicit dim)")
            rank = len(src.true_shape) + 1
            d = self.sample_dim(node, mod.dim, rank)
            return self.block(node, src, cls(dim=d - len(src.true_shape)), pinned=pinned)
        if cls is nn.LayerNorm and len(mod.normalized_shape) > len(src.true_shape):
            raise self.fail(node, f"LayerNorm {path!r} normalises over the batch dim")
        if cls in (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d) \
                and mod.return_indices:
            raise self.fail(node, f"{cls.__name__} {path!r} returns indices")
        return self.block(node, src, self.copy_module(mod), pinned=pinned)

    def embedding(self, node: fx.Node, src: _Value, mod: nn.Embedding) -> _Value:
        if not src.integer:
            raise self.fail(node, "the Embedding reads a floating tensor; it needs integer indices")
        if mod.max_norm is not None:
            raise self.fail(node, "an Embedding with max_norm renormalises its weight in place "
                                  "during the forward; not supported")
        limit = _EXACT.get(mod.weight.dtype)
        if limit is None or mod.num_embeddings > limit:
            raise self.fail(node, f"an Embedding of {mod.num_embeddings} rows in {mod.weight.dtype}: "
                                  "its indices would not be exact in a slot of that dtype")
        return self.block(node, src, ops.IndexEmbedding(self.copy_module(mod)),
                          pinned=self.module_uses[id(mod)] > 1)

    # ------------------------------------------------------------------ element-wise
    def elementwise(self, node: fx.Node, v: _Value, module: nn.Module, *, random: bool = False,
                    fresh: bool = True) -> _Value:
        """``node = module(v)``, element-wise: folded into the activation of ``v``'s slot
        when nothing else reads ``v`` (and, for a random module, when that keeps the
        order of random draws); else a new slot fed by an identity block."""
        self.float_value(node, v)
        order_ok = not random or v.pos >= self.last_random
        if v.refs == 1 and not v.held and order_ok:
            out = self.materialize(v)
        else:
            out = self.materialize(self.new_value(node, [((self.materialize(v),), nn.Identity())],
                                                  shape=v.true_shape))
        out.acts.append(module)
        out.refs = len(node.users)
        out.fresh = fresh
        out.node = node
        if random:
            self.last_random = out.pos
        return out

    def op_elementwise(self, node: fx.Node, b: dict, *, make, inplace: bool = False) -> _Value:
        v = self.batched(node, b["input"])
        if inplace or b.get("inplace") is True:
            self.check_inplace(node, b["input"])
        bound = {k: self.const(node, a, k) for k, a in b.items() if k != "input"}
        return self.elementwise(node, v, make(bound))

    def op_unary(self, node: fx.Node, b: dict, *, op: str, inplace: bool = False) -> _Value:
        v = self.batched(node, b["input"])
        if inplace:
            self.check_inplace(node, b["input"])
        # detach() shares its input's storage: an in-place change of it changes the input
        return self.elementwise(node, v, ops.UnaryOp(op), fresh=op != "detach")

    def op_clamp(self, node: fx.Node, b: dict, *, inplace: bool = False) -> _Value:
        v = self.batched(node, b["input"])
        if inplace:
            self.check_inplace(node, b["input"])
        lo, hi = (self.const(node, b[k], k) for k in ("min", "max"))
        for k, x in (("min", lo), ("max", hi)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise self.fail(node, f"clamp with a {k} that is not a number ({type(x).__name__})")
        if lo is None and hi is None:
            raise self.fail(node, "clamp needs min or max")
        return self.elementwise(node, v, ops.Clamp(lo, hi))

    def op_dropout(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        if b.get("inplace") is True:
            self.check_inplace(node, b["input"])
        train, evalm, cur = self.flags.get(node, (None, None, None))
        p = self.const(node, b["p"], "p")
        if train is False and evalm is False:
            return self.alias(node, v, fresh=False)  # never active: the identity
        if not (train is True and evalm is False):
            raise self.fail(node, f"a dropout whose training flag is {cur!r} whatever the mode: "
                                  "train()/eval() on the converted model could not follow it")
        module = _DROPOUT_FUNCTIONS[node.target](p)
        module.train(cur)
        self.owned.add(id(module))
        return self.elementwise(node, v, module, random=True, fresh=False)

    def op_alias(self, node: fx.Node, b: dict) -> _Value:
        return self.alias(node, self.batched(node, b["input"]), fresh=False)

    def op_clone(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        return self.block(node, v, nn.Identity(), shape=v.true_shape, integer=v.integer)

    def op_cast(self, node: fx.Node, b: dict, *, dtype: torch.dtype | None = None) -> _Value:
        v = self.batched(node, b["input"])
        info_in = self.info_a[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        out = self.info_a[node]
        if (info_in is None or out.kind != "tensor" or out.dtype != info_in.dtype
                or out.device != info_in.device):
            raise self.fail(node, "a change of dtype or device inside the model: a map's slots "
                                  "share one dtype and device")
        return self.alias(node, v, fresh=False)

    # ------------------------------------------------------------------ binary
    def op_binary(self, node: fx.Node, b: dict, *, op: str, inplace: bool = False,
                  rank: int | None = None) -> _Value:
        a_arg = b["input"]
        o_arg = b["other"] if "other" in b else b["mat2"]
        if b.get("rounding_mode") is not None:
            raise self.fail(node, f"division with rounding_mode={b['rounding_mode']!r}")
        alpha = self.const(node, b.get("alpha", 1), "alpha")
        if inplace:
            self.check_inplace(node, a_arg)
        x, y = self.value(node, a_arg), self.value(node, o_arg)
        if isinstance(x, _Const):
            x = _Const(self.const(node, a_arg, "the operand"), None)
        if isinstance(y, _Const):
            y = _Const(self.const(node, o_arg, "the other operand"), None)
        if alpha != 1:
            if isinstance(y, _Const):
                y = _Const(y.a * alpha, None)
                alpha = 1
            elif not isinstance(y, _Value) or op not in ("add", "sub"):
                raise self.fail(node, "alpha with a tensor of the model")
        for v in (x, y):
            if isinstance(v, _Value):
                self.float_value(node, v)
            elif isinstance(v, _Seq):
                raise self.fail(node, "an operand is a tuple of tensors")
        if isinstance(x, _Value) and isinstance(y, _Value):
            return self.binary_tensors(node, op, x, y, alpha, rank)
        if isinstance(x, _Value) or isinstance(y, _Value):
            v, other, reverse = (x, y, False) if isinstance(x, _Value) else (y, x, True)
            if isinstance(other, _Const):
                if isinstance(other.a, bool) or not isinstance(other.a, (int, float)):
                    raise self.fail(node, f"an operand is a {type(other.a).__name__}, not a number")
                if op in ("matmul", "maximum", "minimum"):
                    raise self.fail(node, f"{op} with a number")
                return self.elementwise(node, v, ops.ScalarOp(op, other.a, reverse=reverse))
            return self.tensor_op(node, op, v, other, reverse, rank)
        raise self.fail(node, "it combines tensors of the model alone (no batch dim)")

    def tensor_op(self, node: fx.Node, op: str, v: _Value, p: _Param, reverse: bool,
                  rank: int | None) -> _Value:
        full = len(v.true_shape) + 1
        t = p.tensor
        if rank is not None or (op == "matmul" and t.dim() < 1):
            raise self.fail(node, f"{op} of a batch with the model's tensor {p.path!r}")
        if t.dim() > full or (op != "matmul" and t.dim() == full and t.shape[0] != 1):
            raise self.fail(node, f"the model's tensor {p.path!r} of shape {tuple(t.shape)} reaches "
                                  "into the batch dim")
        out_true = self.sample_shape(node)
        module = ops.TensorOp(op, t, reverse=reverse)
        if op in ops.ELEMENTWISE_BINARY and out_true == v.true_shape:
            return self.elementwise(node, v, module)
        return self.block(node, v, self.scalar_out(module, out_true))

    def scalar_out(self, module: nn.Module, out_true: tuple[int, ...]) -> nn.Module:
        """``module`` made to give a ``(1,)`` sample where the source gives a scalar."""
        return nn.Sequential(module, ops.Reshape((), (1,))) if not out_true else module

    def binary_tensors(self, node: fx.Node, op: str, x: _Value, y: _Value, alpha, rank) -> _Value:
        rx, ry = len(x.true_shape) + 1, len(y.true_shape) + 1
        if rx != ry:
            raise self.fail(node, f"its operands have ranks {rx} and {ry}: broadcasting them "
                                  "would line the batch dim up with a sample dim")
        if op == "matmul" and (rx < 3 or (rank is not None and rx != rank)):
            raise self.fail(node, f"a matrix product of two batches of rank {rx}: it mixes samples "
                                  "(batched products need rank >= 3)")
        if op in ("add", "sub") and x is not y:
            return self.sum(node, x, y, -alpha if op == "sub" else alpha)
        if alpha != 1:
            raise self.fail(node, f"{op} of a tensor with itself scaled by alpha={alpha!r}")
        return self.new_value(node, [((self.materialize(x), self.materialize(y)), ops.BinaryOp(op))])

    def terms_of(self, v: _Value, out: tuple[int, ...], merge: bool) -> tuple[list, bool]:
        if merge and not v.is_slot and v.refs == 1 and v.mergeable and v.shape == out:
            return list(v.terms), True
        s = self.materialize(v)
        return [((s,), nn.Identity() if s.shape == out else ops.Broadcast(s.shape, out))], False

    def sum(self, node: fx.Node, x: _Value, y: _Value, scale) -> _Value:
        """``x + scale * y`` as one slot with one block per term."""
        out = _slot_shape(self.sample_shape(node))
        tx, merged_x = self.terms_of(x, out, True)
        if scale == 1:
            ty, merged_y = self.terms_of(y, out, len(y.terms) == 1)
        else:
            s = self.materialize(y)
            parts = [] if s.shape == out else [ops.Broadcast(s.shape, out)]
            parts.append(ops.UnaryOp("neg") if scale == -1 else ops.ScalarOp("mul", scale))
            ty, merged_y = [((s,), parts[0] if len(parts) == 1 else nn.Sequential(*parts))], False

        def clash() -> bool:
            keys = [tuple(id(s) for s in srcs) for srcs, _ in tx + ty]
            return len(set(keys)) != len(keys)

        if clash() and merged_y:
            ty, merged_y = self.terms_of(y, out, False)
        if clash() and merged_x:
            tx, merged_x = self.terms_of(x, out, False)
        if clash():  # pragma: no cover - distinct values have distinct slots
            raise self.fail(node, "a sum of one slot with itself")
        x.merged = x.merged or merged_x
        y.merged = y.merged or merged_y
        return self.new_value(node, tx + ty)

    # ------------------------------------------------------------------ shapes
    def reshape_to(self, node: fx.Node, v: _Value) -> _Value:
        out = self.sample_shape(node)
        if _slot_shape(out) == v.shape:
            return self.alias(node, v, fresh=False) if out == v.true_shape else self._reshaped(node, v, out)
        return self.block(node, v, ops.Reshape(v.shape, _slot_shape(out)), fresh=False,
                          integer=v.integer)

    def _reshaped(self, node: fx.Node, v: _Value, out: tuple[int, ...]) -> _Value:
        """The same slot tensor, a different true shape (``(1,)`` vs ``()``)."""
        return self.block(node, v, nn.Identity(), fresh=False, integer=v.integer, shape=out)

    def op_reshape(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        if node.target in ("squeeze", torch.squeeze):
            dims = list(b["rest"]) + [a for k, a in b["kwargs"].items() if k == "dim"]
            if not dims:
                raise self.fail(node, "squeeze() without a dim would squeeze the batch dim of a "
                                      "batch of one; name the dims")
            dims = self.const(node, dims, "dim")
            flat = [d for x in dims for d in (x if isinstance(x, (tuple, list)) else (x,))]
            rank = len(v.true_shape) + 1
            for d in flat:
                self.sample_dim(node, d, rank)
        return self.reshape_to(node, v)

    def op_permute(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        rest = list(b["rest"]) + ([b["kwargs"]["dims"]] if "dims" in b["kwargs"] else [])
        dims = self.const(node, rest, "dims")
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        rank = len(v.true_shape) + 1
        norm = [d + rank if isinstance(d, int) and d < 0 else d for d in dims]
        if sorted(norm) != list(range(rank)):
            raise self.fail(node, f"permute dims {dims} are not a permutation of rank {rank}")
        if norm[0] != 0:
            raise self.fail(node, f"permute {dims} moves the batch dim: it mixes the samples")
        return self.permuted(node, v, tuple(d - 1 for d in norm[1:]))

    def permuted(self, node: fx.Node, v: _Value, perm: tuple[int, ...]) -> _Value:
        if perm == tuple(range(len(perm))):
            return self.alias(node, v, fresh=False)
        return self.block(node, v, ops.Permute(perm), fresh=False, integer=v.integer)

    def op_transpose(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        rank = len(v.true_shape) + 1
        d0 = self.sample_dim(node, self.const(node, b["dim0"], "dim0"), rank, "dim0")
        d1 = self.sample_dim(node, self.const(node, b["dim1"], "dim1"), rank, "dim1")
        perm = list(range(rank - 1))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.permuted(node, v, tuple(perm))

    def op_expand(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        out = _slot_shape(self.sample_shape(node))
        if out == v.shape:
            return self.alias(node, v, fresh=False)
        return self.block(node, v, ops.Broadcast(v.shape, out), fresh=False, integer=v.integer)

    def op_getattr(self, node: fx.Node, b: dict) -> Any:
        name = b["name"]
        v = self.value(node, b["input"])
        if name in _META_ATTRS:
            a, bb = self.info_a[node], self.info_b[node]
            return _Const(a.value, bb.value)
        if isinstance(v, _Value) and name == "mT":
            self.check_batched(node)
            r = len(v.true_shape)
            if r < 2:
                raise self.fail(node, ".mT of a batch of rank < 3 moves the batch dim")
            perm = list(range(r))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            return self.permuted(node, v, tuple(perm))
        raise self.fail(node, f"the attribute .{name} of a tensor is not supported by from_module")

    def op_meta(self, node: fx.Node, b: dict) -> _Const:
        a, bb = self.info_a[node], self.info_b[node]
        return _Const(a.value, bb.value)

    def index_items(self, node: fx.Node, index: Any, rank: int) -> list:
        """A basic index of a full-rank-``rank`` tensor as items over the sample dims."""
        items = list(index) if isinstance(index, tuple) else [index]
        for it in items:
            if not (it is None or it is Ellipsis or isinstance(it, slice)
                    or (isinstance(it, int) and not isinstance(it, bool))):
                raise self.fail(node, f"advanced indexing ({type(it).__name__} {it!r}) is not "
                                      "supported; basic indexing only (ints, slices, None, ...)")
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        if items.count(Ellipsis) > 1:
            raise self.fail(node, "an index with two ellipses")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items[k:k + 1] = [slice(None)] * (rank - consuming)
        if consuming > rank:
            raise self.fail(node, f"too many indices for a tensor of rank {rank}")
        while items and items[0] is None:
            raise self.fail(node, "indexing with None before the batch dim adds a dim in front of it")
        first = items[0] if items else slice(None)
        if not (isinstance(first, slice) and first.start in (None, 0) and first.stop is None
                and first.step in (None, 1)):
            raise self.fail(node, f"the index {first!r} on the batch dim selects samples")
        out = []
        for it in items[1:]:
            if isinstance(it, slice):
                for part in (it.start, it.stop, it.step):
                    if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                        raise self.fail(node, f"a slice bound {part!r} that is not an int")
                out.append([it.start, it.stop, it.step])
            else:
                out.append(it)
        while out and out[-1] == [None, None, None]:
            out.pop()
        return out

    def op_getitem(self, node: fx.Node, b: dict) -> Any:
        v = self.value(node, b["input"])
        if isinstance(v, _Seq):
            i = self.const(node, b["index"], "index")
            if not isinstance(i, int) or isinstance(i, bool):
                raise self.fail(node, f"a tuple of tensors indexed with {i!r}")
            items, true = v.pieces[i]
            return self.piece(node, v.source, items, true)
        if isinstance(v, _Const):
            return self.python(node)
        v = self.batched(node, b["input"])
        index = self.const(node, b["index"], "index")
        rank = len(v.true_shape) + 1
        items = self.index_items(node, index, rank)
        return self.piece(node, v, items, self.sample_shape(node))

    def piece(self, node: fx.Node, v: _Value, items: list, true: tuple[int, ...]) -> _Value:
        """``node`` = basic index ``items`` of ``v``'s samples (true sample shape ``true``)."""
        if not items:
            return self.alias(node, v, fresh=False)
        if all(it is None for it in items) or not v.true_shape:  # only new dims: a reshape
            return self.block(node, v, ops.Reshape(v.shape, _slot_shape(true)), fresh=False,
                              integer=v.integer, shape=true)
        if not true:
            items = [*items, None]
        return self.block(node, v, ops.Index(v.shape, items), fresh=False, integer=v.integer,
                          shape=true)

    def op_narrow(self, node: fx.Node, b: dict) -> _Value:
        v = self.batched(node, b["input"])
        rank = len(v.true_shape) + 1
        d = self.sample_dim(node, self.const(node, b["dim"], "dim"), rank)
        start = self.const(node, b["start"], "start")
        length = self.const(node, b["length"], "length")
        if not isinstance(start, int) or not isinstance(length, int):
            raise self.fail(node, "narrow needs int start and length")
        start = start + v.true_shape[d] if start < 0 else start
        return self.piece(node, v, [[None, None, None]] * d + [[start, start + length, None]],
                          self.sample_shape(node))

    def split_pieces(self, node: fx.Node, v: _Value, dim_arg: object, *, unbind: bool = False) -> _Seq:
        rank = len(v.true_shape) + 1
        d = self.sample_dim(node, self.const(node, dim_arg, "dim"), rank)
        info = self.info_a[node]
        info_b = self.info_b[node]
        if info.kind != "seq" or info_b.kind != "seq" or [s[1:] for s in info.shapes] != [
                s[1:] for s in info_b.shapes]:
            raise self.fail(node, "its pieces depend on the batch size")
        pieces = []
        start = 0
        for i, shape in enumerate(info.shapes):
            if unbind:
                items = [[None, None, None]] * d + [i]
            else:
                width = shape[1 + d]
                items = [[None, None, None]] * d + [[start, start + width, None]]
                start += width
            pieces.append((items, tuple(shape[1:])))
        self.materialize(v)
        return _Seq(v, pieces, info.dtype)

    def op_chunk(self, node: fx.Node, b: dict) -> _Seq:
        return self.split_pieces(node, self.batched(node, b["input"]), b["dim"])

    def op_split(self, node: fx.Node, b: dict) -> _Seq:
        return self.split_pieces(node, self.batched(node, b["input"]), b["dim"])

    def op_unbind(self, node: fx.Node, b: dict) -> _Seq:
        return self.split_pieces(node, self.batched(node, b["input"]), b["dim"], unbind=True)

    def expand_tensors(self, node: fx.Node, arg: object) -> list[_Value]:
        """The tensors of a cat/stack argument (a list of nodes, or a split's tuple)."""
        v = self.value(node, arg)
        if isinstance(v, _Seq):
            raise self.fail(node, "a tuple from chunk/split/unbind passed whole; index its pieces")
        if not isinstance(arg, (list, tuple)):
            raise self.fail(node, "cat/stack needs a list of tensors")
        return [self.batched(node, a, "a concatenated tensor") for a in arg]

    def placed(self, node: fx.Node, parts: list[_Value], dim: int, widths: list[int],
               out: tuple[int, ...]) -> _Value:
        order: list[_Value] = []
        ranges: dict[int, list] = {}
        start = 0
        for v, w in zip(parts, widths):
            s = self.materialize(v)
            if id(s) not in ranges:
                order.append(s)
                ranges[id(s)] = []
            ranges[id(s)].append([start, start + w])
            start += w
        integer = all(v.integer for v in parts)
        if any(v.integer for v in parts) and not integer:
            raise self.fail(node, "it joins integer indices with floating tensors")
        terms = [((s,), ops.Place(s.shape, out, dim, ranges[id(s)])) for s in order]
        return self.new_value(node, terms, integer=integer)

    def op_cat(self, node: fx.Node, b: dict) -> _Value:
        parts = self.expand_tensors(node, b["tensors"])
        out = self.sample_shape(node)
        d = self.sample_dim(node, self.const(node, b["dim"], "dim"), len(out) + 1)
        for v in parts:
            if len(v.true_shape) != len(out):
                raise self.fail(node, "cat of tensors of different ranks")
        widths = [v.true_shape[d] for v in parts]
        return self.placed(node, parts, d, widths, _slot_shape(out))

    def op_stack(self, node: fx.Node, b: dict) -> _Value:
        parts = self.expand_tensors(node, b["tensors"])
        out = self.sample_shape(node)
        d = self.sample_dim(node, self.const(node, b["dim"], "dim"), len(out) + 1)
        return self.placed(node, parts, d, [1] * len(parts), out)

    # ------------------------------------------------------------------ other blocks
    def op_reduce(self, node: fx.Node, b: dict, *, op: str) -> _Value:
        v = self.float_value(node, self.batched(node, b["input"]))
        if b.get("dtype") is not None:
            raise self.fail(node, f"{op} with dtype={b['dtype']!r}")
        dims = self.const(node, b["dim"], "dim")
        if dims is None or dims == () or dims == []:
            raise self.fail(node, f"{op} over every dim reduces over the batch")
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(v.true_shape) + 1
        sample = tuple(self.sample_dim(node, d, rank) for d in dims)
        keep = self.const(node, b["keepdim"], "keepdim")
        out_true = self.sample_shape(node)
        module = ops.Reduce(op, v.shape, sample, keepdim=bool(keep))
        return self.block(node, v, self.scalar_out(module, out_true))

    def op_softmax(self, node: fx.Node, b: dict, *, cls: type) -> _Value:
        v = self.float_value(node, self.batched(node, b["input"]))
        if b.get("dtype") is not None:
            raise self.fail(node, f"softmax with dtype={b['dtype']!r}")
        dim = self.const(node, b["dim"], "dim")
        if dim is None:
            raise self.fail(node, "softmax without a dim (an implicit dim)")
        r = len(v.true_shape)
        d = self.sample_dim(node, dim, r + 1)
        return self.block(node, v, cls(dim=d - r))

    def op_pool(self, node: fx.Node, b: dict, *, cls: type) -> _Value:
        v = self.float_value(node, self.batched(node, b["input"]))
        kwargs = {k: self.const(node, a, k) for k, a in b.items() if k != "input"}
        if kwargs.get("return_indices"):
            raise self.fail(node, "pooling that returns indices")
        try:
            module = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise self.fail(node, f"cannot build {cls.__name__}: {exc}") from None
        return self.block(node, v, module)

    def param(self, node: fx.Node, arg: object, what: str, *, optional: bool = False) -> nn.Parameter | None:
        if arg is None and optional:
            return None
        p = self.value(node, arg)
        if not isinstance(p, _Param) or not isinstance(p.tensor, nn.Parameter):
            raise self.fail(node, f"its {what} must be a parameter of the model")
        return p.tensor

    def op_linear(self, node: fx.Node, b: dict) -> _Value:
        v = self.float_value(node, self.batched(node, b["input"]))
        w = self.param(node, b["weight"], "weight")
        bias = self.param(node, b["bias"], "bias", optional=True)
        if w.dim() != 2:
            raise self.fail(node, f"F.linear with a weight of shape {tuple(w.shape)}")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = w
        if bias is not None:
            lin.bias = bias
        return self.block(node, v, lin)

    def op_layer_norm(self, node: fx.Node, b: dict) -> _Value:
        v = self.float_value(node, self.batched(node, b["input"]))
        shape = self.const(node, b["normalized_shape"], "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) > len(v.true_shape):
            raise self.fail(node, "layer_norm over the batch dim")
        w = self.param(node, b["weight"], "weight", optional=True)
        bias = self.param(node, b["bias"], "bias", optional=True)
        if w is None and bias is not None:
            raise self.fail(node, "layer_norm with a bias and no weight")
        eps = self.const(node, b["eps"], "eps")
        ln = nn.LayerNorm(shape, eps=eps, elementwise_affine=w is not None, bias=bias is not None,
                          device="meta")
        if w is not None:
            ln.weight = w
        if bias is not None:
            ln.bias = bias
        return self.block(node, v, ln)

    # ------------------------------------------------------------------ output
    def output_template(self, node: fx.Node, arg: object) -> dict:
        if isinstance(arg, fx.Node):
            v = self.env[arg]
            if isinstance(v, _Value):
                s = self.materialize(v)
                dtype = str(self.info_a[arg].dtype).removeprefix("torch.") if s.integer else None
                return {"output": s, "shape": list(s.true_shape), "dtype": dtype}
            if isinstance(v, _Seq):
                return {"tuple": [self.output_template(node, _PieceRef(v, i)) for i in range(len(v.pieces))]}
            if isinstance(v, _Const):
                return {"const": self.const(node, arg, "an output")}
            if isinstance(v, _Param):
                raise self.fail(node, f"it returns the model's tensor {v.path!r}, which has no batch dim")
            raise self.fail(node, f"it returns {v!r}")
        if isinstance(arg, _PieceRef):
            items, true = arg.seq.pieces[arg.i]
            v = self.piece(node, arg.seq.source, items, true)
            v.refs = 1
            s = self.materialize(v)
            dtype = str(arg.seq.dtype).removeprefix("torch.") if s.integer else None
            return {"output": s, "shape": list(true), "dtype": dtype}
        if isinstance(arg, tuple):
            return {"tuple": [self.output_template(node, a) for a in arg]}
        if isinstance(arg, list):
            return {"list": [self.output_template(node, a) for a in arg]}
        if isinstance(arg, dict):
            if not all(isinstance(k, str) for k in arg):
                raise self.fail(node, "it returns a dict with non-str keys")
            return {"dict": [[k, self.output_template(node, a)] for k, a in arg.items()]}
        if _is_json_scalar(arg) or not isinstance(arg, Tensor):
            return {"const": arg}
        raise self.fail(node, f"it returns a constant tensor of shape {tuple(arg.shape)}")

    # ------------------------------------------------------------------ the map
    def build(self, params: list) -> ModuleMap:
        self.run()
        mode = self.root.model.training
        slots = sorted(self.slots, key=lambda s: s.pos)
        names = _Names()
        for s in slots:
            if s.name is not None:  # inputs, named after their argument
                names.used.add(s.name)
        for s in slots:
            if s.name is None:
                node = s.node
                base = node.name
                if node.op in ("call_module", "get_attr") and base.startswith("model_"):
                    base = base[len("model_"):]
                s.name = names(base)
        # Modules made here (not copies of the source's) take the model's mode; copies
        # keep their source's (a model may mix modes).
        for s in slots:
            for mod in [m for _, m in s.terms] + s.acts:
                for sub in mod.modules():
                    if id(sub) not in self.owned:
                        sub.training = mode
        m = BlockMap({s.name: s.shape for s in slots})
        for s in slots:
            for srcs, module in s.terms:
                src = srcs[0].name if len(srcs) == 1 else tuple(x.name for x in srcs)
                try:
                    m.connect(s.name, src, module)
                except (MapError, MapTypeError) as exc:  # pragma: no cover - a converter bug
                    raise ConversionError(
                        f"block {s.name!r} <- {src!r} of node {s.node.name!r}: {exc}") from exc
            if s.acts:
                act = s.acts[0] if len(s.acts) == 1 else nn.Sequential(*s.acts)
                if len(s.acts) > 1:
                    act.training = mode
                m.set_activation(s.name, act)
        call_params = [[n, k, d, _strip_leaves(t)] for n, k, d, t in params]
        model = self.root.model
        copies = {}
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:
            copied = self.memo.get(id(t))
            if copied is not None:
                copies.setdefault(id(copied), name)
        own = [*m.named_parameters(prefix="map", remove_duplicate=False),
               *m.named_buffers(prefix="map", remove_duplicate=False)]
        sources = {k: copies[id(t)] for k, t in own if id(t) in copies}
        net = ModuleMap(m, call_params, _finish_outputs(self.outputs), sources=sources)
        inside = {id(x) for b in m.blocks.values() for x in b.modules()}
        inside |= {id(x) for a in m.activations.values() for x in a.modules()}
        for mod in net.modules():
            if id(mod) not in inside:
                mod.training = mode
        return net


@dataclass
class _PieceRef:
    seq: _Seq
    i: int


def _finish_outputs(t: dict) -> dict:
    if "output" in t:
        return {"output": t["output"].name, "shape": t["shape"], "dtype": t["dtype"]}
    for kind in ("tuple", "list"):
        if kind in t:
            return {kind: [_finish_outputs(s) for s in t[kind]]}
    if "dict" in t:
        return {"dict": [[k, _finish_outputs(s)] for k, s in t["dict"]]}
    return t


