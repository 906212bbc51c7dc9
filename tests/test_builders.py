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
    reachable_units,
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


# ------------------------------------------------------------------- degenerate maps
def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))  # 404 trainable


def test_matched_map_without_a_path_is_refused_with_the_smallest_working_density():
    import re

    from iternn.errors import MapError
    from iternn.sparse.builders import _matched_plan, _path_has_entries

    mlp = _small_mlp()
    with pytest.raises(MapError, match="does not depend on the input x within 2 application") as info:
        matched_map(mlp, density=1e-12, seed=0)  # used to return a map with no weight entry at all
    text = str(info.value)
    assert "'hx' has 0" in text and "'yh' has 0" in text and "'yx' has 0" in text
    found = float(re.search(r"a density of at least about ([0-9.e+-]+)", text).group(1))

    def has_path(p):
        d = {b: p for b in SIX_BLOCKS}
        return _path_has_entries(_matched_plan(404, 20, 4, d)[2], 2)

    # the number is the threshold (to its 3 printed digits): above it every block of a
    # path has an entry, below it none does
    assert has_path(found * 1.01) and not has_path(found * 0.99)


def test_matched_map_whose_drawn_entries_do_not_connect_is_refused():
    from iternn.errors import MapError

    # at 4e-4 'hx' gets 3 entries and 'yh' 1, in a hidden slot of 347 units: they miss
    # each other (the output would be a constant)
    with pytest.raises(MapError, match="drawn entries do not connect"):
        matched_map(_small_mlp(), density=4e-4, seed=0)


@pytest.mark.parametrize("seed", [0, 1, "generator"])
def test_a_refused_matched_map_names_a_density_that_connects_with_its_seed(seed):
    import re

    from iternn.errors import MapError

    def make_seed():
        return torch.Generator().manual_seed(7) if seed == "generator" else seed

    # 4e-4 gives the path blocks entries that miss each other; the message names the
    # smallest density (as printed) that connects with this seed, above the one given
    with pytest.raises(MapError, match="drawn entries do not connect") as info:
        matched_map(_small_mlp(), density=4e-4, seed=make_seed())
    found = re.search(r"the smallest density that connects \(.*\) is ([0-9.e+-]+)$", str(info.value))
    p = float(found.group(1))
    assert p > 4e-4
    twin = matched_map(_small_mlp(), density=p, seed=make_seed())
    assert iternn.count_trainable(twin) == 404


def test_matched_map_counts_paths_within_its_applications():
    from iternn.errors import MapError

    # one Linear layer: one application, so x -> h -> y (two) cannot carry the input
    with pytest.raises(MapError, match=r"within 1 application\(s\) \(blocks without entries: 'yx' has 0\)"):
        matched_map(nn.Sequential(nn.Linear(20, 5)), density={"hx": 0.5, "yh": 0.5}, seed=0)


def test_six_block_map_names_the_empty_block_and_its_one_entry_density():
    from iternn.errors import MapError

    with pytest.raises(MapError, match=r"'hx' has 0.*'hx' \(8 x 10\) needs p > 0.00625"):
        six_block_map(10, 8, 3, {"hx": 0.001, "yh": 0.5, "hh": 0.3})
    with pytest.raises(MapError, match="steps"):
        six_block_map(10, 8, 3, 0.5, steps=0)
    m = six_block_map(10, 8, 3, 0.5, steps=2)
    assert 0 < reachable_units(m, "x", "y", steps=2) <= 3


def test_reachable_units_follows_the_stored_entries():
    from iternn import BlockMap
    from iternn.sparse import SparseLinear

    def chain(y_reads):
        m = BlockMap({"x": 3, "h": 2, "y": 2})
        m.connect("h", "x", SparseLinear(3, 2, indices=torch.tensor([[0], [1]])))  # h0 <- x1
        m.connect("y", "h", SparseLinear(2, 2, indices=torch.tensor([[1], [y_reads]])))  # y1 <- h?
        return m

    assert reachable_units(chain(1), "x", "y") == 0  # y1 reads h1, which nothing writes
    assert reachable_units(chain(0), "x", "y") == 1
    assert reachable_units(chain(0), "x", "y", steps=1) == 0
    assert reachable_units(chain(0), "x", "h", steps=1) == 1


def test_reachable_units_through_a_block_reading_two_slots():
    class Product(nn.Module):
        def forward(self, a, b):
            return a * b

    m = iternn.BlockMap({"x": 3, "h": 3, "g": 3, "y": 3})
    m.connect("h", "x", iternn.sparse.DiagonalLinear(3))
    m.connect("y", ("h", "g"), Product())
    assert reachable_units(m, "x", "y", steps=1) == 0
    assert reachable_units(m, "x", "y", steps=2) == 3  # any unit of h may reach any of y
    assert reachable_units(m, "g", "y", steps=1) == 3
