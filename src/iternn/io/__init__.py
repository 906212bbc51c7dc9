"""Saving and loading models: tensors in safetensors, structure in JSON, no pickle.

``save(module, path)`` writes ONE ``.safetensors`` file:

* the tensors are the module's ``state_dict()`` (parameters and persistent buffers),
  each stored once: keys that name the same tensor (tied weights, a module used in two
  places) are written under their first key and recorded as aliases;
* the file's safetensors metadata holds, under the key ``"iternn"``, a JSON document
  that describes how to rebuild the module (see *File format* below).

``load(path)`` trusts nothing in the file: it checks the safetensors header against the
file, parses the JSON with bounded nesting, rebuilds the module on the ``meta`` device
(no memory, no random initialisation), checks that its ``state_dict`` has exactly the
file's tensors (keys, shapes, dtypes), and only then reads each tensor once into its own
memory and puts it in place; then it restores the tying. Every refusal is a
:class:`FormatError` whose message starts with the path and names the key, module or
tensor at fault (a missing file is a :class:`~iternn.errors.MissingFileError`, also a
``FileNotFoundError``).

The structure is described by *codecs*, one per module class, kept in a public
registry (:func:`register_codec`). A codec has a ``name`` (written in the file), an
``encode(module, enc) -> dict`` that returns a JSON-able config, and a
``decode(config, dec) -> module`` that builds a module with parameters of the right
shapes and dtypes (decode runs with torch's default device set to ``meta``; their
values come from the file). Children are encoded with ``enc.child(submodule,
attribute_path)`` and decoded with ``dec.child(ref)``; a module reached twice is written
once, so shared submodules stay shared. Codecs are looked up by *exact* type: a
subclass needs its own codec, since its ``forward`` may differ. Example, for a module
``Scale(n, dtype)`` with one parameter ``weight`` and a child ``act``::

    from iternn import io

    def encode(m, enc):
        return {"n": m.weight.shape[0], "dtype": io.dtype_name(m.weight.dtype),
                "act": enc.child(m.act, "act")}

    def decode(cfg, dec):
        return Scale(cfg["n"], dtype=io.dtype_from_name(cfg["dtype"]), act=dec.child(cfg["act"]))

    io.register_codec(Scale, "mypkg.Scale", encode, decode)

A codec that meets a module it cannot represent raises ``enc.unsupported("why")``
(a :class:`~iternn.MapTypeError` naming the module's path). ``save`` checks every
codec's work before writing: it decodes the structure (on the meta device) and compares
the rebuilt module with the original (submodule paths and types, ``state_dict`` keys,
order, shapes and dtypes), so a file that ``save`` writes is one that ``load`` reads
back. Non-tensor attributes the codec leaves out (a dropout probability, an epsilon)
cannot be checked this way: a codec must record every constructor option and refuse
(``enc.unsupported``) a module whose attributes no constructor call would produce.

Codecs ship (:mod:`iternn.io.codecs`) for the torch modules iternn's converters use, for
:class:`~iternn.BlockMap` and :class:`~iternn.MapModule`, for every converter result
(``RNNMap``, ``LiftedRNN`` -- its blocks tied over the time steps stay tied --,
``TransformerMap``, ``EncoderLayerBlock``) and for the sparse and structured blocks. A
converter result is written as its constructor options plus its map; its codec refuses a
map edited by hand into one that no constructor call builds.

Besides the structure the file records the training mode of every submodule and which
parameters have ``requires_grad=False``. Hooks, devices and attributes set by hand are
not saved; ``load`` builds on the CPU (``device=`` moves the result).

File format (version 1), the JSON under metadata key ``"iternn"``::

    {"format": "iternn", "version": 1, "writer": "iternn 0.1.0",
     "root": 0,                                  # index into "modules"
     "modules": [{"codec": NAME, "path": "map.blocks.h<-x", "config": {...}}, ...],
     "aliases": {KEY: CANONICAL_KEY, ...},       # same tensor object: stored once
     "views": {KEY: CANONICAL_KEY, ...},         # distinct parameters, same memory
     "frozen": [KEY, ...],                       # parameters with requires_grad=False
     "training": true, "mode_flips": [PATH, ...]}  # submodules in the other mode

Children in a config are references: indices into ``"modules"``.

The package: :mod:`.registry` (codecs and their lookup, dtype names),
:mod:`.structure` (:class:`Encoder`, :class:`Decoder`: module trees to and from the
document), :mod:`.format` (the file: header reading with its checks, the document's
fields, atomic writing), :mod:`.codecs` (the built-in codecs), :mod:`.saveload`
(:func:`save`, :func:`load`).
"""

from ..errors import FormatError
from . import codecs as _codecs  # noqa: F401  (registers the built-in codecs)
from .format import FORMAT_VERSION, MAX_HEADER_BYTES, MAX_JSON_DEPTH, METADATA_KEY
from .registry import (
    Codec,
    dtype_from_name,
    dtype_name,
    register_codec,
    registered_codecs,
    unregister_codec,
)
from .saveload import load, save
from .structure import MAX_MODULE_DEPTH, Decoder, Encoder

__all__ = [
    "save",
    "load",
    "register_codec",
    "unregister_codec",
    "registered_codecs",
    "Codec",
    "Encoder",
    "Decoder",
    "FormatError",
    "dtype_name",
    "dtype_from_name",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MODULE_DEPTH",
]
