"""Random nn.RNN architectures and inputs, and a forward+backward runner, for the RNN
converter tests (test_rnn: from_rnn; test_lift: lift_rnn)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

F64 = torch.float64


@st.composite
def rnn_cases(draw, max_T: int = 6):
    """A random nn.RNN architecture and input layout (batch None = unbatched input)."""
    cfg = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(1, 6)),
        num_layers=draw(st.integers(1, 3)),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.4])),  # inter-layer
    )
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    T = draw(st.integers(1, max_T))
    with_h0 = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return cfg, batch, T, with_h0, seed


def make_rnn(cfg: dict, seed: int, dtype=F64, *, eval_with_dropout: bool = False) -> nn.RNN:
    """The RNN (seeded); ``eval_with_dropout``: in eval mode when it has dropout."""
    torch.manual_seed(seed)
    if cfg.get("dropout") and cfg["num_layers"] == 1:
        cfg = {**cfg, "dropout": 0.0}  # torch warns: dropout acts between layers only
    rnn = nn.RNN(**cfg).to(dtype)
    return rnn.eval() if eval_with_dropout and rnn.dropout else rnn


def make_inputs(cfg: dict, batch, T: int, with_h0: bool, g: torch.Generator, dtype=F64):
    n, H, L = cfg["input_size"], cfg["hidden_size"], cfg["num_layers"]
    if batch is None:
        xs, hs = (T, n), (L, H)
    else:
        xs = (batch, T, n) if cfg["batch_first"] else (T, batch, n)
        hs = (L, batch, H)
    x = torch.randn(xs, generator=g, dtype=dtype)
    h0 = torch.randn(hs, generator=g, dtype=dtype) if with_h0 else None
    return x, h0


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def run(module, x, h0, g_out, g_h, seed=0):
    """Forward + backward with fixed cotangents; returns outputs and input gradients.

    The global RNG is seeded right before the forward: with dropout in train mode,
    torch and the map then draw the same masks (on CPU).
    """
    x = x.clone().requires_grad_(True)
    h0 = None if h0 is None else h0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, h_n = module(x, h0)
    ((out * g_out).sum() + (h_n * g_h).sum()).backward()
    return out, h_n, x.grad, None if h0 is None else h0.grad
