"""Transformer encoder stacks as block maps (paper §2, "Transformers"): ``from_transformer``.

An ``nn.TransformerEncoder`` with ``N`` layers becomes slots ``x, l1 ... lN`` (and ``y``
when the encoder has a final ``norm``), every slot of size ``d_model``, with one block
per layer on the block sub-diagonal (row = destination, column = source)::

    F[l1, x] = layer 1,  F[l2, l1] = layer 2,  ...,  F[lN, l(N-1)] = layer N,
    F[y, lN] = norm                                   (only with a final norm)

No slot biases, identity slot activations. A slot tensor is ``(batch, seq, d_model)``
(``batch_first``) or ``(seq, batch, d_model)``, or ``(seq, d_model)`` unbatched: the
block map treats the last dim as the slot size and every leading dim as batch; only
the layer blocks look across the sequence (attention). With ``x`` held, ``N`` (+1)
applications give the encoder's output and further applications change nothing (a
fixed point); the engine's wavefront evaluates each block once, in layer order.

A layer needs the call-time masks, which a block receives through the engine's
``block_kwargs`` (``"dst<-src" -> kwargs``); :class:`EncoderLayerBlock` is the small
module that takes them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from ..core.block_map import BlockMap, block_key
from ..engine.iterate import iterate
from ..errors import ConversionError, MapError, MapTypeError

__all__ = ["from_transformer", "TransformerMap", "EncoderLayerBlock"]


class EncoderLayerBlock(nn.Module):
    """One ``nn.TransformerEncoderLayer`` as a block ``F[l(k+1), lk]`` of a block map.

    Maps ``(*batch, d_model) -> (*batch, d_model)`` (the leading dims are the layer's
    ``(batch, seq)`` or ``(seq, batch)``); ``in_features``/``out_features`` declare
    ``d_model`` so :meth:`BlockMap.connect` needs no probe call.

    Args:
        layer: the encoder layer (used as is, not copied).
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise MapTypeError(
                f"EncoderLayerBlock needs an nn.TransformerEncoderLayer, got {type(layer).__name__}"
            )
        self.layer = layer
        self.in_features: int = layer.self_attn.embed_dim
        self.out_features: int = layer.self_attn.embed_dim

    def forward(
        self,
        z: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        padded: Tensor | None = None,
    ) -> Tensor:
        """``layer(z, src_mask=mask, src_key_padding_mask=..., is_causal=...)``.

        ``padded``, a boolean ``(dim0, dim1)`` mask over ``z``'s first two dims, marks
        positions that do not exist (torch's nested-tensor "sparsity fast path"): the
        output there is 0, which is what torch's nested tensor reads as once padded.
        """
        out = self.layer(
            z, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal
        )
        if padded is not None:
            out = out.masked_fill(padded.unsqueeze(-1), 0.0)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TransformerMap(nn.Module):
    """An ``nn.TransformerEncoder`` run as an iterated block map.

    ``net.map`` is the :class:`~iternn.BlockMap` (see the module docstring for its
    slots and blocks). ``net(src, mask, src_key_padding_mask, is_causal)`` holds
    ``x = src``, iterates the map ``steps`` times (number of layers, +1 with a final
    norm) and returns the last slot: exactly what ``TransformerEncoder.forward`` returns
    for the same arguments, including its mask canonicalisation, causal-mask detection
    and its nested-tensor "sparsity fast path" (zeros at padded positions, before the
    final norm). Build one with :func:`from_transformer`. The preamble follows
    ``TransformerEncoder.forward`` of torch 2.13 line by line (its private helpers
    ``F._canonical_mask`` and ``_detect_is_causal_mask`` are called, not re-implemented).
    One deliberate difference: when the nested path is taken and *every* sequence is
    fully padded, torch raises (an empty nested tensor cannot be padded); the map
    returns the padded value, ``norm(0)`` or 0, at every position.

    ``in_features``/``out_features`` are ``d_model``, so a ``TransformerMap`` can itself
    be a block of another map (the masks then go through that map's ``block_kwargs``).
    """

    def __init__(
        self,
        map: BlockMap,
        layer_keys: tuple[str, ...],
        output: str,
        *,
        batch_first: bool,
        enable_nested_tensor: bool,
        use_nested_tensor: bool | None,
        mask_check: bool,
    ) -> None:
        super().__init__()
        self.map = map
        self.layer_keys = layer_keys
        self.output = output
        self.steps = len(map.edges)
        self.d_model: int = map.slots["x"]
        self.in_features: int = self.d_model
        self.out_features: int = self.d_model
        self.batch_first = batch_first
        self.enable_nested_tensor = enable_nested_tensor
        # ``None`` mirrors an encoder without the attribute (torch then never nests).
        self.use_nested_tensor = use_nested_tensor
        self.mask_check = mask_check

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        """Number of encoder layers ``N`` (blocks ``F[l1, x] ... F[lN, l(N-1)]``)."""
        return len(self.layer_keys)

    @property
    def has_norm(self) -> bool:
        """Whether the encoder had a final norm (slot ``y``, block ``F[y, lN]``)."""
        return self.output == "y"

    @property
    def layers(self) -> tuple[nn.TransformerEncoderLayer, ...]:
        """The encoder layers, in order (the modules inside the layer blocks)."""
        return tuple(self.map.blocks[key].layer for key in self.layer_keys)

    # ------------------------------------------------------------------ checks
    def _check_src(self, src: object) -> Tensor:
        if not isinstance(src, Tensor):
            raise MapTypeError(f"input slot 'x' must be a tensor, got {type(src).__name__}")
        if src.is_nested:
            raise MapError("input slot 'x' does not take nested tensors; pass a padded tensor")
        if not src.is_floating_point():
            raise MapTypeError(f"input slot 'x' must be floating point, got {src.dtype}")
        layout = "(batch, seq, d_model)" if self.batch_first else "(seq, batch, d_model)"
        if src.dim() not in (2, 3) or src.shape[-1] != self.d_model:
            raise MapError(
                f"input slot 'x' needs shape {layout} or (seq, d_model) with "
                f"d_model={self.d_model}, got {tuple(src.shape)}"
            )
        return src

    def _check_masks(self, src: Tensor, mask: object, key_padding: object) -> None:
        """Shapes and dtypes of the masks, as ``nn.MultiheadAttention`` needs them."""
        batched = src.dim() == 3
        seq = src.shape[1 if self.batch_first else 0] if batched else src.shape[0]
        batch = src.shape[0 if self.batch_first else 1] if batched else None
        for name, value in (("mask", mask), ("src_key_padding_mask", key_padding)):
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise MapTypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
            if value.dtype != torch.bool and not value.is_floating_point():
                raise MapTypeError(f"{name} must be bool or floating point, got {value.dtype}")
        if mask is not None:
            heads = sorted({layer.self_attn.num_heads for layer in self.layers})
            lead = [(batch if batched else 1) * h for h in heads]
            ok = tuple(mask.shape) == (seq, seq) or (
                mask.dim() == 3 and mask.shape[1:] == (seq, seq) and all(mask.shape[0] == n for n in lead)
            )
            if not ok:
                want = " or ".join(f"({n}, {seq}, {seq})" for n in lead)
                raise MapError(
                    f"mask must have shape ({seq}, {seq}) or {want} "
                    f"(batch * nhead, seq, seq) for an input of shape {tuple(src.shape)}, "
                    f"got {tuple(mask.shape)}"
                )
        if key_padding is not None:
            want = (batch, seq) if batched else (seq,)
            if tuple(key_padding.shape) != want:
                raise MapError(
                    f"src_key_padding_mask must have shape {want} (batch, seq) for an input "
                    f"of shape {tuple(src.shape)}, got {tuple(key_padding.shape)}"
                )

    def _sparsity_fast_path(self, src: Tensor, mask: Tensor | None, key_padding: Tensor | None) -> bool:
        """Whether ``TransformerEncoder.forward`` would convert ``src`` to a nested tensor.

        The same conditions, in the same order, as torch (masks already canonical),
        evaluated on this map's own first layer (a copy of the encoder's, with the same
        training flag and ``requires_grad``).
        """
        first = self.map.blocks[self.layer_keys[0]].layer
        if not torch.backends.mha.get_fastpath_enabled():
            return False
        if not self.use_nested_tensor or first.training or src.dim() != 3 or key_padding is None:
            return False
        if self.mask_check and torch.compiler.is_compiling():
            return False
        if self.mask_check and not torch._nested_tensor_from_mask_left_aligned(
            src, key_padding.logical_not()
        ):
            return False
        if src.is_nested or mask is not None or torch.is_autocast_enabled():
            return False
        tensor_args = (
            src,
            first.self_attn.in_proj_weight,
            first.self_attn.in_proj_bias,
            first.self_attn.out_proj.weight,
            first.self_attn.out_proj.bias,
            first.norm1.weight,
            first.norm1.bias,
            first.norm2.weight,
            first.norm2.bias,
            first.linear1.weight,
            first.linear1.bias,
            first.linear2.weight,
            first.linear2.bias,
        )
        supported = ["cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name]
        if torch.overrides.has_torch_function(tensor_args):
            return False
        if src.device.type not in supported:
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensor_args):
            return False
        return True

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """``TransformerEncoder.forward(src, mask, src_key_padding_mask, is_causal)``.

        Raises:
            MapTypeError: (a ``TypeError``) ``src`` or a mask is not a tensor, ``src`` is
                not floating point, a mask is neither bool nor floating point.
            MapError: (a ``ValueError``) ``src`` (slot ``'x'``) is not ``(.., .., d_model)`` /
                ``(seq, d_model)``, or a mask's shape does not fit ``src`` (the message
                names the mask).
        """
        self._check_src(src)
        self._check_masks(src, mask, src_key_padding_mask)
        # TransformerEncoder.forward's preamble, step by step.
        key_padding = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask),
            other_name="mask",
            target_type=src.dtype,
        )
        mask = F._canonical_mask(
            mask=mask,
            mask_name="mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x, layer_key_padding, padded = src, key_padding, None
        if self._sparsity_fast_path(src, mask, key_padding):
            # torch keeps only the positions where ``key_padding.logical_not()`` holds (a
            # nested tensor) and pads the result with zeros. The same on the dense
            # tensor: absent positions are zero in x, masked as keys, and every layer
            # writes zeros there. (A float mask marks *any* non-zero entry as absent.)
            padded = key_padding.logical_not().logical_not()
            x = src.masked_fill(padded.unsqueeze(-1), 0.0)
            layer_key_padding = padded
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.batch_first))
        kwargs = {
            "mask": mask,
            "src_key_padding_mask": layer_key_padding,
            "is_causal": is_causal,
            "padded": padded,
        }
        state = iterate(
            self.map,
            {"x": x},
            self.steps,
            hold=("x",),
            block_kwargs={key: kwargs for key in self.layer_keys},
        )
        return state[self.output]

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_layers={self.num_layers}, norm={self.has_norm}, "
            f"batch_first={self.batch_first}, steps={self.steps}, "
            f"enable_nested_tensor={self.enable_nested_tensor}, mask_check={self.mask_check}"
        )


def _copy_modes(copied: nn.Module, original: nn.Module) -> None:
    """Give every submodule of ``copied`` the train/eval flag of its twin in ``original``."""
    for c, o in zip(copied.modules(), original.modules()):
        c.training = o.training


def from_transformer(encoder: nn.TransformerEncoder) -> TransformerMap:
    """Convert an ``nn.TransformerEncoder`` into an equivalent iterated block map.

    Slots ``x, l1 ... lN`` (+ ``y`` with a final norm), all of size ``d_model``; blocks
    ``F[l1, x] = layer 1, ..., F[lN, l(N-1)] = layer N`` (each an
    :class:`EncoderLayerBlock`) and ``F[y, lN] = norm``, all on the block sub-diagonal.
    Parameters are copies (training one does not change the other); the train/eval
    flag of every submodule is copied too. ``net(src, mask=..., src_key_padding_mask=...,
    is_causal=...)`` equals ``encoder(src, ...)``, with the same gradients.

    Raises:
        MapTypeError: (a ``TypeError``) ``encoder`` is not an ``nn.TransformerEncoder``,
            or one of its layers is not an ``nn.TransformerEncoderLayer`` (the message
            names its index).
        ConversionError: (a ``ValueError``) the encoder has no layers, or its layers
            disagree on ``d_model``.
    """
    if not isinstance(encoder, nn.TransformerEncoder):
        raise MapTypeError(f"from_transformer needs an nn.TransformerEncoder, got {type(encoder).__name__}")
    layers = list(encoder.layers)
    if not layers:
        raise ConversionError("from_transformer needs an encoder with at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise MapTypeError(
                f"encoder layer {i} is {type(layer).__name__}; from_transformer needs "
                "nn.TransformerEncoderLayer"
            )
    d_model = layers[0].self_attn.embed_dim
    for i, layer in enumerate(layers):
        if layer.self_attn.embed_dim != d_model:
            raise ConversionError(
                f"encoder layer {i} has d_model={layer.self_attn.embed_dim} but layer 0 has {d_model}"
            )
    n = len(layers)
    names = ["x"] + [f"l{k}" for k in range(1, n + 1)]
    norm = encoder.norm
    if norm is not None:
        names.append("y")
    m = BlockMap({name: d_model for name in names})
    keys = []
    for k, layer in enumerate(layers):
        block = EncoderLayerBlock(copy.deepcopy(layer))
        m.connect(names[k + 1], names[k], block)
        keys.append(block_key(names[k + 1], names[k]))
    if norm is not None:
        m.connect("y", names[n], copy.deepcopy(norm))
    net = TransformerMap(
        m,
        tuple(keys),
        names[-1],
        batch_first=bool(layers[0].self_attn.batch_first),
        enable_nested_tensor=bool(getattr(encoder, "enable_nested_tensor", False)),
        use_nested_tensor=getattr(encoder, "use_nested_tensor", None),
        mask_check=bool(getattr(encoder, "mask_check", True)),
    )
    net.train(encoder.training)
    for k, layer in enumerate(layers):
        _copy_modes(m.blocks[keys[k]].layer, layer)
    if norm is not None:
        _copy_modes(m.block("y", names[n]), norm)
    return net
