"""Parameter counting and the matched builders of the sparsity study."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import iternn
from iternn.sparse.builders import (
    SIX_BLOCKS,
    matched_map,
    random_map,
    six_block_counts,
    six_block_map,
    solve_hidden_width,
)


def test_count_trainable_hand_computed_mlp():
    mlp = nn.Sequential(nn.Linear(2500, 400), nn.ReLU(), nn.Linear(400, 100), nn.ReLU(),
                        nn.Linear(100, 10))
    assert iternn.count_trainable(mlp) == 1_041_510
    assert iternn.count_trainable(iternn.from_mlp(mlp)) == 1_041_510


def test_count_trainable_frozen_and_masked():
    from iternn.sparse.linear import MaskedLinear

    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    block = MaskedLinear(4, 3, mask=mask)
    assert iternn.count_trainable(block) == 2 + 3  # masked entries + bias
    block.bias.requires_grad_(False)
    assert iternn.count_trainable(block) == 2


def _brute_width(budget, n_x, n_y, d):
    best = None
    for h in range(1, 400):
        if sum(six_block_counts(n_x, h, n_y, d).values()) <= budget:
            best = h
    return best


@settings(max_examples=20)
@given(
    n_x=st.integers(1, 20), n_y=st.integers(1, 6),
    d=st.sampled_from([1.0, 0.5, 0.25, 0.1, {"hx": 0.5, "hh": 0.2, "yh": 1.0},
                       {"hx": 1.0, "hh": 0.0, "yh": 0.3, "yx": 0.1}]),
    budget=st.integers(200, 4000),
)
def test_solve_hidden_width_is_the_largest_that_fits(n_x, n_y, d, budget):
    smallest = sum(six_block_counts(n_x, 1, n_y, d).values())
    if budget < smallest:
        with pytest.raises(ValueError, match="budget"):
            solve_hidden_width(budget, n_x, n_y, d)
        return
    h = solve_hidden_width(budget, n_x, n_y, d)
    assert h == _brute_width(budget, n_x, n_y, d)


@settings(max_examples=15)
@given(
    widths=st.lists(st.integers(2, 24), min_size=3, max_size=4),
    density=st.sampled_from([0.5, 0.3, 0.1, {"hx": 0.4, "hh": 0.1, "yh": 0.6, "yy": 0.0}]),
    seed=st.integers(0, 1000),
)
def test_matched_map_has_exactly_the_mlp_trainable_count(widths, density, seed):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    mlp = nn.Sequential(*layers[:-1])
    smallest = sum(six_block_counts(widths[0], 1, widths[-1], density).values())
    assume(iternn.count_trainable(mlp) >= smallest)  # else no six-block map fits the budget
    net = matched_map(mlp, density=density, seed=seed)
    assert iternn.count_trainable(net) == iternn.count_trainable(mlp)
    assert (net.in_features, net.out_features, net.steps) == (widths[0], widths[-1], len(widths) - 1)
    x = torch.randn(5, widths[0])
    y = net(x)
    assert y.shape == (5, widths[-1]) and torch.isfinite(y).all()
    y.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_matched_map_same_seed_same_map_different_seed_different():
    mlp = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    a, b = matched_map(mlp, density=0.2, seed=3), matched_map(mlp, density=0.2, seed=3)
    c = matched_map(mlp, density=0.2, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].shape == sc[k].shape) or (
        sa.keys() != sc.keys())


def test_dense_matched_map_misses_by_less_than_one_hidden_unit():
    mlp = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 7))
    net = matched_map(mlp, density=1.0, seed=0)
    budget = iternn.count_trainable(mlp)
    got = iternn.count_trainable(net)
    h = net.map.slots["h"]
    per_unit = h * 2 + 1 + 30 + 7 + 7 + 1  # one more row of hh/hx/hy, column of hh/yh, bias
    assert got <= budget < got + per_unit
    assert solve_hidden_width(budget, 30, 7, 1.0) == h


def test_six_block_summary_and_hidden_proportion():
    m = six_block_map(6, 10, 3, {"hx": 0.5, "hh": 0.2, "yh": 1.0}, seed=0)
    s = m.summary()
    assert s.block("h", "x").trainable == 30 and s.block("h", "h").trainable == 20
    assert s.block("y", "h").trainable == 30
    assert s.hidden_proportion == pytest.approx(20 / 50)
    assert s.trainable == 30 + 20 + 30 + 10 + 3
    assert all(isinstance(v, int) for r in s.rows for v in (r.trainable, r.fixed, r.stored))


def test_random_map_from_pattern_strings_and_densities():
    m = random_map({"x": 8, "h": 16}, {("h", "x"): "R=0.25", ("h", "h"): 0.5, ("x", "h"): 0},
                   biases=["h"], activations={"h": nn.Tanh()}, seed=1)
    assert m.edges == (("h", "x"), ("h", "h"))
    assert iternn.count_trainable(m) == 32 + 128 + 16


def test_random_map_unknown_slot():
    with pytest.raises(ValueError, match="'z'"):
        random_map({"x": 2}, {("z", "x"): 0.5})


def test_six_block_unknown_block_name():
    with pytest.raises(ValueError, match="'hz'"):
        six_block_counts(2, 2, 2, {"hz": 0.5})


def test_six_block_density_out_of_range():
    with pytest.raises(ValueError, match="'hh'"):
        six_block_counts(2, 2, 2, {"hx": 0.5, "hh": 1.5, "yh": 1.0})


def test_matched_map_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        matched_map(nn.Sequential(nn.Linear(3, 2)), density=0.5, seed=None)


def test_six_blocks_names():
    assert SIX_BLOCKS == ("hx", "hh", "hy", "yx", "yh", "yy")


def test_matched_map_budget_too_small():
    with pytest.raises(ValueError, match="budget"):
        matched_map(nn.Sequential(nn.Linear(3, 2)), density=0.5, seed=0)


def test_entry_counts_match_the_blocks_built():
    m = six_block_map(7, 13, 3, {"hx": 0.37, "hh": 0.11, "hy": 0.5, "yx": 0.2, "yh": 0.9,
                                 "yy": 1.0}, seed=0, biases=False)
    counts = six_block_counts(7, 13, 3, {"hx": 0.37, "hh": 0.11, "hy": 0.5, "yx": 0.2,
                                         "yh": 0.9, "yy": 1.0}, biases=False)
    s = m.summary()
    for b in SIX_BLOCKS:
        assert s.block(b[0], b[1]).trainable == counts[b]
