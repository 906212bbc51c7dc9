"""Memory across inputs: a sequence of inputs written into a map, one after another.

A map ``m`` reads a sequence ``x_0 … x_{T-1}`` through its input slot ``x``: each input
is written into ``x`` and followed by ``k`` applications of the map (``k =
applications``); ``y_t`` is the output slot after the ``k`` applications of input ``t``.
Between inputs the state is either **carried** (input ``t + 1`` starts from the state
input ``t`` left) or **reset** to the initial vector ``z0`` (``carry=False``). How the
input is written:

* **forced** (``held=False``, eq. 11): ``x`` is overwritten with ``x_t`` before *each*
  of the ``k`` applications of input ``t``, so it reads ``x_t`` throughout and the
  blocks that write into ``x`` never take effect (they are not evaluated);
* **held** (``held=True``, eq. 50): ``x`` is written with ``x_t`` *once*, before the
  first of those applications, and is then updated by the map like any other slot. The
  map keeps it with its identity block ``F[x, x] = I`` (required), and any other block
  into ``x`` (feedback into the input) adds to it at every application:
  ``x ← x + Σ_s F[x, s](z_s)``. Without other blocks into ``x``, held and forced are
  the same iteration.

:func:`feed_inputs` runs this; :func:`input_memory` measures how far back the outputs
reach: the mean norm of ``∂y_t/∂x_{t-j}`` for each lag ``j``.

Where the memory of a feed-forward map sits
-------------------------------------------
Take an MLP map (:func:`iternn.from_mlp`) with ``L`` weight layers: slots ``x, h1 …
h_{L-1}, y`` on one chain, Jacobi update. Number the applications of the whole run
``n = 1, 2, …``; input ``t`` owns applications ``n = t k + 1 … (t + 1) k`` and ``x``
holds ``x_{t(n)}``, ``t(n) = ⌊(n - 1) / k⌋``, during application ``n``. Slot ``h_l``
after application ``n`` is ``h_l^n = σ(W_l h_{l-1}^{n-1} + b_l)``: one layer per
application, so along the chain ``y^n`` depends on ``x`` only through the value ``x``
held during application ``n - L + 1`` (a path of ``L`` blocks takes ``L``
applications), and on nothing else but the initial state (when ``n - L + 1 < 1``).

* ``y_t = y^{(t+1)k}`` reads the ``x`` of application ``n' = (t + 1)k - L + 1``, which
  belongs to input ``t(n') = t + 1 - ⌈L / k⌉``. So with the state carried, **the memory
  sits at exactly one lag, j* = ⌈L / k⌉ - 1**: the ``j`` with ``j k < L <= (j + 1) k``,
  i.e. ``L = j* k + r`` where ``1 <= r <= k`` is the number of applications of input
  ``t - j*`` from the one that read ``x`` to the end of that input (an output ``t <
  j*`` has no input that far back: it is a function of the initial state). The two ends
  and what lies between:

  - ``k = 1``: ``j* = L - 1``, ``y_t = MLP(x_{t-L+1})``: a pure delay line (a
    finite-memory recurrent network);
  - ``k >= L``: ``j* = 0``, ``y_t = MLP(x_t)``: no memory (the MLP end); the old inputs'
    influence is flushed because the map is nilpotent (with a feedback block it would
    not be);
  - ``1 < k < L``: one lag in between, e.g. ``L = 3`` or ``4`` with ``k = 2``: ``j* =
    1``.
* Reset between inputs (``carry=False``): ``y_t`` sees ``x_t`` after ``k``
  applications from ``z0``: memory at lag 0 when ``k >= L``, none at all (``y_t`` is a
  function of ``z0`` only) when ``k < L``.

A general acyclic map has one such lag per path length ``p`` from ``x`` to ``y``
(``⌈p / k⌉ - 1``; skip connections give several). A cycle of length ``c`` on a path
from ``x`` to ``y`` (a feedback block, a recurrent block) adds the walks of lengths
``p + n c`` for every ``n``: the memory never ends (infinite impulse response) and
decays geometrically for a contraction. Consecutive walks are ``c`` applications
apart, so with ``k >= c`` it is non-zero at every lag from ``⌈p / k⌉ - 1`` on, and
with ``k < c`` it skips lags (a cycle through two slots at ``k = 1``: every other lag).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..core.block_map import BlockMap, source_slots
from ..core.memory import check_bytes
from ..engine.iterate import iterate
from ..errors import DynamicsError
from .functional import NO_SEQUENCES, mixing_blocks, refuse_mixing
from .validate import as_block_map, check_finite, check_int, shape_text

__all__ = ["feed_inputs", "input_memory", "MEMORY_MODES"]

#: ``mode=`` values of :func:`input_memory`.
MEMORY_MODES = ("reverse", "forward")


def _check_slot(m: BlockMap, slot: object, role: str) -> str:
    if not isinstance(slot, str) or slot not in m.slots:
        raise DynamicsError(f"{role} slot {slot!r} is not a slot of the map; slots are "
                            f"{list(m.slots)}")
    return slot


def _has_block(m: BlockMap, dst: str, src: str) -> bool:
    return any(d == dst and src in source_slots(s) for d, s in m.edges)


def _check_inputs(m: BlockMap, inputs: object, input: str) -> tuple[int, tuple[int, ...]]:
    """``(T, batch)`` of ``inputs``: ``(T, *batch, *shape of the input slot)``, T >= 1."""
    shape = m.shapes[input]
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise DynamicsError(f"inputs must be a floating tensor (T, *batch, *shape of slot "
                            f"{input!r}), got {got}")
    k = len(shape)
    if inputs.dim() < k + 1 or tuple(inputs.shape[inputs.dim() - k:]) != shape:
        raise DynamicsError(
            f"inputs must have shape {shape_text(shape, ('T', '*batch'))} (time first, then "
            f"the batch, then the shape of the input slot {input!r}), got {tuple(inputs.shape)}"
        )
    if inputs.shape[0] < 1:
        raise DynamicsError("inputs holds no input (T = 0): give at least one")
    check_finite(input, inputs, "inputs of slot {!r}")
    return int(inputs.shape[0]), tuple(inputs.shape[1: inputs.dim() - k])


def _initial(m: BlockMap, state: object, input: str, batch: tuple[int, ...],
             ref: Tensor) -> dict[str, Tensor]:
    """The initial vector of every slot but the input: ``state``'s values (each the slot's
    shape, or the batch shape then the slot's shape), zeros for the slots it leaves out."""
    if state is None:
        state = {}
    if not isinstance(state, Mapping):
        raise DynamicsError(f"state must be a dict slot -> tensor, got {type(state).__name__}")
    out = {}
    for s, v in state.items():
        if not isinstance(s, str) or s not in m.slots:
            raise DynamicsError(f"state names unknown slot {s!r}; slots are {list(m.slots)}")
        if s == input:
            raise DynamicsError(f"state gives the input slot {input!r}, whose values come "
                                "from inputs: leave it out")
        shape = m.shapes[s]
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise DynamicsError(f"slot {s!r} of the state must be a floating tensor")
        if tuple(v.shape) not in (shape, (*batch, *shape)):
            raise DynamicsError(
                f"slot {s!r} of the state must have shape {shape_text(shape)} or "
                f"{shape_text(shape, batch)}, got {tuple(v.shape)}")
        check_finite(s, v)
        out[s] = v.to(dtype=ref.dtype, device=ref.device).expand(*batch, *shape)
    for s, shape in m.shapes.items():
        if s != input and s not in out:
            out[s] = ref.new_zeros(*batch, *shape)
    return out


def _check_carry(m: BlockMap, carry: object, input: str) -> bool:
    if not isinstance(carry, bool):
        raise DynamicsError(f"carry must be True or False, got {carry!r}")
    if carry:
        read = {s for _, src in m.edges for s in source_slots(src)} - {input}
        if not read:
            raise DynamicsError(
                f"carry=True, but no block reads a slot other than the input {input!r}: the "
                "map has no state to carry from one input to the next; use carry=False")
    return carry


def _check_held(m: BlockMap, held: object, input: str) -> bool:
    if not isinstance(held, bool):
        raise DynamicsError(f"held must be True or False, got {held!r}")
    if held and not _has_block(m, input, input):
        raise DynamicsError(
            f"held=True needs a block {input!r} <- {input!r} (the identity block of eq. 50 "
            f"that keeps the input between writes), and the map has none: add it with "
            f"m.connect({input!r}, {input!r}, nn.Identity()), or use held=False (forced)")
    return held


def _feed(m: BlockMap, inputs: Tensor, k: int, carry: bool, held: bool, input: str,
          init: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checked run of :func:`feed_inputs`: slot -> ``(T, *batch, *shape)``."""
    T = inputs.shape[0]
    hold = () if held else (input,)
    if not carry and mixing_blocks(m, [s for s in m.slots if s not in hold]):
        # every input starts from z0, one input at a time: side by side as a batch, the
        # inputs' sequences would be read as positions of one sequence
        runs = [iterate(m, {**init, input: inputs[t]}, k, hold=hold) for t in range(T)]
        return {s: torch.stack([r[s] for r in runs]) for s in m.slots}
    if not carry:  # every input starts from z0: all T inputs at once, as a batch
        start = {s: v.unsqueeze(0).expand(T, *v.shape) for s, v in init.items()}
        return iterate(m, {**start, input: inputs}, k, hold=hold)
    if not held:  # forced: the engine's forcing, k inner applications per input
        return iterate(m, init, T, force={input: inputs}, inner=k, trajectory=True)
    cur, states = dict(init), []
    for t in range(T):
        cur = iterate(m, {**cur, input: inputs[t]}, k)
        states.append(cur)
    return {s: torch.stack([c[s] for c in states]) for s in m.slots}


def feed_inputs(
    m: BlockMap,
    inputs: Tensor,
    /,
    *,
    applications: int,
    carry: bool = True,
    held: bool = False,
    input: str = "x",
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Write ``inputs`` into the input slot one after another, ``applications`` each.

    Args:
        m: the block map (or a module holding one as ``.map``).
        inputs: ``(T, *batch, *shape)``, time first; ``shape`` is the input slot's.
        applications: ``k >= 1`` applications of the map per input.
        carry: carry the state from one input to the next (``True``) or reset it to
            the initial vector before every input (``False``).
        held: write each input once and let the map's identity block on the input slot
            keep it (``True``, eq. 50), or force it before every application
            (``False``, eq. 11); see the module docstring.
        input: the input slot.
        state: the initial vector ``z0`` of the other slots: each tensor the slot's shape
            (shared by the batch) or ``(*batch, *shape)``; slots left out start at zero.

    Returns:
        ``slot -> (T, *batch, *shape)``: every slot after the ``k`` applications of each
        input.

    Raises:
        DynamicsError: an unknown input slot or ``state`` slot, ``inputs`` of the wrong
            shape or with NaN/inf, ``applications < 1``, ``carry=True`` for a map with
            no state to carry (no block reads a slot other than the input),
            ``held=True`` for a map without a block ``x <- x``.
    """
    bm = as_block_map(m)
    input = _check_slot(bm, input, "input")
    k = check_int(applications, "applications", 1)
    carry = _check_carry(bm, carry, input)
    held = _check_held(bm, held, input)
    _, batch = _check_inputs(bm, inputs, input)
    init = _initial(bm, state, input, batch, inputs)
    try:
        return _feed(bm, inputs, k, carry, held, input, init)
    except (TypeError, ValueError) as exc:  # the engine's checks (dtype, device)
        if isinstance(exc, DynamicsError):
            raise
        raise DynamicsError(str(exc)) from exc


def input_memory(
    m: BlockMap,
    inputs: Tensor,
    /,
    *,
    applications: int,
    carry: bool = True,
    input: str = "x",
    output: str = "y",
    lags: int | None = None,
    held: bool = False,
    state: Mapping[str, Tensor] | None = None,
    mode: str = "reverse",
) -> Tensor:
    """How strongly each output depends on the inputs before it: the memory profile.

    With ``inputs`` fed as in :func:`feed_inputs` (same options), ``memory[j]`` is the
    mean, over the batch and over the outputs ``y_t`` with ``t >= j``, of the Frobenius
    norm of the Jacobian ``∂y_t/∂x_{t-j}`` (``|y| x |x|``: every output unit against every
    input unit). The module docstring derives where it is non-zero: for an MLP map of
    ``L`` layers only at lag ``⌈L / k⌉ - 1`` with the state carried, only at lag ``0``
    (``k >= L``) or nowhere (``k < L``) with it reset; a cycle on the way from the input
    to the output spreads it over every lag.

    The Jacobians are exact: automatic differentiation through :func:`iternn.iterate`,
    every ``∂y_t/∂x_s`` of the run at once. The batch is widened by one copy of the
    inputs per output unit and time (reverse mode: ``T |y|`` copies, one backward pass)
    or per input unit and time (forward mode: ``T |x|`` copies, one forward pass with
    tangents); a ``∂y_t/∂x_s`` that the structure makes zero is exactly ``0``. The map
    is used as it is (train/eval mode included), its batch elements independent; its
    parameters' ``.grad`` are left alone.

    Args:
        m: the block map (or a module holding one as ``.map``).
        inputs: ``(T, *batch, *shape)``, time first; ``shape`` is the input slot's.
        applications, carry, held, input, state: as in :func:`feed_inputs`.
        output: the output slot (not the input slot).
        lags: the lags ``j = 0 … lags - 1`` to report, ``1 <= lags <= T``; default ``T``.
        mode: ``"reverse"`` (default) or ``"forward"``. Both give the same numbers;
            forward mode needs fewer copies when ``|x| < |y|``, but torch's forward-mode
            kernels cost far more per operation on the CPU, so reverse is usually faster.

    Returns:
        ``(lags,)`` float64: the memory profile.

    Raises:
        SizeError: (a ``MemoryError``) the widened batch would not fit in memory; checked
            before it is built.
        DynamicsError: an input or output slot that is not a slot of the map, the same
            slot for both, ``lags`` or ``applications`` below 1, ``lags`` above ``T``,
            bad ``inputs`` or ``state``, ``carry=True`` for a map with no state to
            carry, ``held=True`` for a map without a block ``x <- x``, an unknown
            ``mode``, or ``mode="forward"`` through a block that forward-mode autograd
            does not support; a map with a block that mixes positions (attention,
            named: the batch is widened with copies side by side, see
            :func:`~iternn.dynamics.functional.refuse_mixing`).
    """
    bm = as_block_map(m)
    input = _check_slot(bm, input, "input")
    output = _check_slot(bm, output, "output")
    if output == input:
        raise DynamicsError(f"output slot {output!r} is the input slot: they must differ")
    k = check_int(applications, "applications", 1)
    carry = _check_carry(bm, carry, input)
    held = _check_held(bm, held, input)
    if mode not in MEMORY_MODES:
        raise DynamicsError(f"mode must be one of {MEMORY_MODES}, got {mode!r}")
    T, batch = _check_inputs(bm, inputs, input)
    lags = T if lags is None else check_int(lags, "lags", 1)
    if lags > T:
        raise DynamicsError(f"lags must be <= the number of inputs T = {T}, got {lags}")
    init = _initial(bm, state, input, batch, inputs)
    refuse_mixing(bm, () if held else (input,), "input_memory",
                  NO_SEQUENCES.format("input_memory"))
    n_x, n_y = bm.slots[input], bm.slots[output]
    B = math.prod(batch)
    copies = T * (n_x if mode == "forward" else n_y)
    n_state = sum(n for s, n in bm.slots.items() if s != input)
    per = input if mode == "forward" else output
    check_bytes(copies * B * (T * n_x + n_state) * inputs.element_size(),
                f"input_memory's widened batch ({copies} copies, T = {T} times the size of "
                f"slot {per!r}, of the inputs {tuple(inputs.shape)} and the state, {inputs.dtype})",
                device=inputs.device)
    x = inputs.detach().reshape(T, B, *bm.shapes[input])
    z0 = {s: v.reshape(B, *bm.shapes[s]) for s, v in init.items()}

    def widened(copies: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The inputs and z0 repeated ``copies`` times along the batch: ``(T, copies B,
        ...)``, copy-major."""
        xs = x.unsqueeze(1).expand(T, copies, *x.shape[1:]).reshape(T, copies * B, *x.shape[2:])
        zs = {s: v.unsqueeze(0).expand(copies, *v.shape).reshape(copies * B, *v.shape[1:])
              for s, v in z0.items()}
        return xs, zs

    def outputs(xs: Tensor, zs: dict[str, Tensor]) -> Tensor:
        return _feed(bm, xs, k, carry, held, input, zs)[output]

    def reverse() -> Tensor:
        # copy (t', i) of the batch carries the cotangent e_i on y_{t'}: its gradient is
        # row i of dy_{t'}/dx_s for every s.
        xs, zs = widened(T * n_y)
        xs.requires_grad_(True)
        with torch.enable_grad():
            ys = outputs(xs, zs).reshape(T, T, n_y, B, n_y)
            eye_t = torch.eye(T, dtype=ys.dtype, device=ys.device)
            eye_y = torch.eye(n_y, dtype=ys.dtype, device=ys.device)
            cot = (eye_t[:, :, None, None, None] * eye_y[None, None, :, None, :]).expand_as(ys)
            g = None
            if ys.requires_grad:  # else no output depends on any input
                (g,) = torch.autograd.grad(ys, xs, grad_outputs=cot, allow_unused=True)
        if g is None:
            g = torch.zeros_like(xs)
        # g[s, (t, i), b, u] = dy_t[i] / dx_s[u]  ->  (s, t, b)
        g = g.reshape(T, T, n_y, B, n_x).to(torch.float64)
        return torch.linalg.vector_norm(g, dim=(2, 4))

    def forward() -> Tensor:
        # copy (s', u) of the batch carries the tangent e_u on x_{s'}: its output
        # tangent is column u of dy_t/dx_{s'} for every t.
        xs, zs = widened(T * n_x)
        eye_t = torch.eye(T, dtype=xs.dtype, device=xs.device)
        eye_x = torch.eye(n_x, dtype=xs.dtype, device=xs.device)
        tangent = (eye_t[:, :, None, None, None] * eye_x[None, None, :, None, :])
        tangent = tangent.expand(T, T, n_x, B, n_x).reshape(xs.shape)
        with torch.enable_grad():
            _, dy = torch.func.jvp(lambda v: outputs(v, zs), (xs,), (tangent,))
        # dy[t, (s, u), b, i] = dy_t[i] / dx_s[u]  ->  (s, t, b)
        dy = dy.detach().reshape(T, T, n_x, B, n_y).to(torch.float64)
        return torch.linalg.vector_norm(dy, dim=(2, 4)).transpose(0, 1)

    try:
        if mode == "forward":
            try:
                norms = forward()
            except (RuntimeError, NotImplementedError) as exc:
                raise DynamicsError(
                    "mode='forward' needs forward-mode autograd through every block, and "
                    f"this map has one that does not support it ({exc}); use "
                    "mode='reverse'") from exc
        else:
            norms = reverse()
    except (TypeError, ValueError) as exc:  # the engine's checks (dtype, device)
        if isinstance(exc, DynamicsError):
            raise
        raise DynamicsError(str(exc)) from exc
    # norms[s, t, b]; lag j: the entries with t - s = j (its j-th diagonal), mean over t, b
    return torch.stack([torch.diagonal(norms, offset=j, dim1=0, dim2=1).mean()
                        for j in range(lags)])
