"""Pictures of block maps (iternn.dynamics.plots): valid, non-blank PNGs and the data behind
them (structure matrix, bifurcation diagram)."""

import math
import sys

import pytest
import torch
from maps import GatedConv
from torch import nn

import iternn
from iternn.dynamics import (
    DynamicsError,
    eigenvalues,
    impulse_response,
    lyapunov_spectrum,
    singular_values,
)
from iternn.dynamics.plots import (
    OPAQUE,
    WEIGHT,
    bifurcation_data,
    plot_bifurcation,
    plot_eigenvalues,
    plot_impulse_response,
    plot_lyapunov,
    plot_singular_values,
    plot_structure,
    plot_trajectories,
    structure_matrix,
)

matplotlib = pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """A PNG file whose image has more than one colour (not blank)."""
    from matplotlib.image import imread

    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = torch.from_numpy(imread(path))
    assert img.dim() == 3 and img.shape[0] > 100 and img.shape[1] > 100
    colours = torch.unique(img.reshape(-1, img.shape[-1]), dim=0)
    assert colours.shape[0] > 1


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return iternn.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


def recurrent_map(gain=0.5, seed=0):
    """x (input) -> h (tanh, recurrent) -> y: a cycle on h."""
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap({"x": 2, "h": 3, "y": 1})
    hx = m.connect("h", "x", nn.Linear(2, 3, bias=False))
    hh = m.connect("h", "h", nn.Linear(3, 3, bias=False))
    yh = m.connect("y", "h", nn.Linear(3, 1))
    with torch.no_grad():
        for lin in (hx, hh, yh):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        hh.weight.mul_(gain / 3**0.5)
    m.set_activation("h", nn.Tanh())
    return m.double()


def state_of(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(1, n, generator=g, dtype=torch.float64) for s, n in m.slots.items()}


# ---------------------------------------------------------------------------- structure
class IndexedBlock(nn.Module):
    """A duck-typed sparse block: a weight restricted to given positions, with indices()."""

    def __init__(self, n_in, n_out, positions):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.register_buffer("idx", torch.tensor(positions, dtype=torch.long).t())
        self.values = nn.Parameter(torch.ones(len(positions)))

    def indices(self):
        return self.idx

    def dense_weight(self):
        w = torch.zeros(self.out_features, self.in_features)
        return w.index_put((self.idx[0], self.idx[1]), self.values)

    def forward(self, x):
        return x @ self.dense_weight().t()


class DenseWeightOnly(nn.Module):
    """A structured block that only has dense_weight() (like a diagonal block)."""

    def __init__(self, diag):
        super().__init__()
        self.diag = nn.Parameter(torch.tensor(diag))
        self.in_features = self.out_features = len(diag)

    def dense_weight(self):
        return torch.diag(self.diag)

    def forward(self, x):
        return x * self.diag


class Opaque(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.sin(self.lin(x))


def test_structure_matrix_of_an_mlp_is_its_layers_at_row_destination_column_source():
    net = tanh_mlp()
    m = net.map
    mask, bounds = structure_matrix(net)  # a MapModule is unwrapped
    slots = list(m.slots)
    assert slots == ["x", "h1", "y"]
    assert bounds == (0, 3, 7, 9)
    expected = torch.zeros(9, 9)
    expected[3:7, 0:3] = WEIGHT  # h1 <- x
    expected[7:9, 3:7] = WEIGHT  # y <- h1
    assert torch.equal(mask, expected)


def test_structure_matrix_reads_sparse_structured_sequential_and_opaque_blocks():
    m = iternn.BlockMap({"a": 3, "b": 4, "c": 2})
    positions = [(0, 1), (2, 0), (3, 2)]  # (row in b, column in a)
    m.connect("b", "a", IndexedBlock(3, 4, positions))
    m.connect("a", "a", DenseWeightOnly([1.0, 0.0, 2.0]))  # zero on the diagonal: no entry
    m.connect("c", "c", nn.Identity())
    m.connect("c", "b", nn.Sequential(IndexedBlock(4, 2, [(1, 3)]), nn.Tanh()))
    m.connect("a", "c", Opaque(2, 3))
    mask, bounds = structure_matrix(m)
    assert bounds == (0, 3, 7, 9)
    expected = torch.zeros(9, 9)
    for r, c in positions:
        expected[3 + r, 0 + c] = WEIGHT
    expected[0, 0] = expected[2, 2] = WEIGHT
    expected[7, 7] = expected[8, 8] = WEIGHT
    expected[7 + 1, 3 + 3] = WEIGHT
    expected[0:3, 7:9] = OPAQUE
    assert torch.equal(mask, expected)
    # The non-zero pattern of each block sits at row = destination, column = source.
    nz = mask != 0
    for dst, src in m.edges:
        i, j = list(m.slots).index(dst), list(m.slots).index(src)
        assert bool(nz[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]].any())
    assert not bool(nz[3:7, 3:9].any())  # b reads only a


def test_plot_structure_writes_a_png_and_returns_the_path(tmp_path):
    out = plot_structure(tanh_mlp(), tmp_path / "s.png", hold=("x",))
    assert out == tmp_path / "s.png"
    assert_png(out)


def test_plot_structure_of_a_large_map_is_pooled_not_huge(tmp_path):
    m = iternn.BlockMap({"x": 1500, "h": 1200})
    m.connect("h", "x", nn.Linear(1500, 1200, bias=False))
    m.connect("h", "h", nn.Identity())
    fig = plot_structure(m)
    image = fig.axes[0].images[0].get_array()
    assert max(image.shape) <= 1024
    assert "entries per pixel" in fig.axes[0].get_title()


def test_without_path_a_figure_is_returned_and_pyplot_is_not_imported():
    from matplotlib.figure import Figure

    had_pyplot = "matplotlib.pyplot" in sys.modules
    fig = plot_eigenvalues(torch.tensor([0.5 + 0.5j, 0.5 - 0.5j, 1.2]))
    assert isinstance(fig, Figure)
    assert fig.canvas.__class__.__name__ == "FigureCanvasAgg"
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules



class Placement(nn.Module):
    """``conv(a) + b``: a two-source block that declares itself linear."""

    linear = True

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, a, b):
        return self.conv(a) + b


def cnn_map(seed=0):
    """x (2, 6, 6) -conv-> h (3, 6, 6, recurrent conv) -pool-> p (3, 3, 3) -linear-> y."""
    torch.manual_seed(seed)
    m = iternn.BlockMap({"x": (2, 6, 6), "h": (3, 6, 6), "p": (3, 3, 3), "y": 4})
    m.connect("h", "x", nn.Conv2d(2, 3, 3, padding=1))
    m.connect("h", "h", nn.Conv2d(3, 3, 3, padding=1, groups=3))
    m.connect("p", "h", nn.AvgPool2d(2))
    m.connect("y", "p", nn.Sequential(nn.Flatten(), nn.Linear(27, 4)))
    m.set_activation("h", nn.ReLU())
    return m


def test_structure_matrix_of_a_cnn_map_is_the_pattern_of_as_matrix():
    m = cnn_map()
    mask, bounds = structure_matrix(m)
    assert bounds == (0, 72, 180, 207, 211)
    w = iternn.dynamics.as_matrix(m).coalesce()
    expected = torch.zeros(m.size, m.size)
    expected[w.indices()[0], w.indices()[1]] = WEIGHT
    assert torch.equal(mask, expected)
    # the conv blocks are banded (Toeplitz), not filled: 3x3 taps of 2 channels per row
    assert int(mask[72:180, 0:72].sum()) == w.to_dense()[72:180, 0:72].count_nonzero() < 108 * 18


def test_structure_of_shaped_maps_shows_multi_source_and_composed_blocks():
    torch.manual_seed(1)
    m = iternn.BlockMap({"a": (2, 3, 3), "b": (2, 3, 3), "g": (2, 3, 3), "c": (2, 3, 3)})
    m.connect("g", ("a", "b"), GatedConv(2))  # not linear: a module over both sources
    place = m.connect("c", ("a", "g"), Placement(2))  # linear: its matrix over both
    seq = m.connect("b", "a", nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()))
    bn = m.connect("a", "a", nn.BatchNorm2d(2))  # train mode: drawn as in eval mode
    assert bn.training
    mask, bounds = structure_matrix(m)
    assert bn.training and m.training  # modes restored
    a, b, g, c = (slice(bounds[i], bounds[i + 1]) for i in range(4))
    assert bool((mask[g, a] == OPAQUE).all()) and bool((mask[g, b] == OPAQUE).all())
    assert not bool(mask[g, g].any()) and not bool(mask[g, c].any())
    from iternn.dynamics.matrix import module_matrix

    w = module_matrix(place, [(2, 3, 3), (2, 3, 3)], (2, 3, 3)).to_dense()
    assert torch.equal(mask[c, a], (w[:, :18] != 0).float())
    assert torch.equal(mask[c, g], torch.eye(18))
    conv = module_matrix(seq[0], [(2, 3, 3)], (2, 3, 3)).to_dense()
    assert torch.equal(mask[b, a], (conv != 0).float())  # ReLU keeps the conv's pattern
    assert torch.equal(mask[a, a], torch.eye(18))  # per-channel scale: the diagonal


def test_plot_structure_of_a_cnn_map(tmp_path):
    out = plot_structure(cnn_map(), tmp_path / "cnn.png", hold=("x",))
    assert_png(out)


def test_bifurcation_on_a_shaped_map_scales_a_multi_source_block():
    torch.manual_seed(2)
    m = iternn.BlockMap({"x": (1, 3, 3), "h": (2, 3, 3)})
    m.connect("h", "x", nn.Conv2d(1, 2, 3, padding=1))
    m.connect("h", ("h", "x"), GatedMix())
    m.set_activation("h", nn.Tanh())
    m.double()
    st = {s: torch.randn(1, *sh, dtype=torch.float64) for s, sh in m.shapes.items()}
    data = bifurcation_data(m, st, param_values=[0.0, 1.0], hold=("x",), steps=20, keep=3,
                            index=10)
    assert data.parameter == "scale on block h <- ('h', 'x')" and data.slot == "h"
    traj = iternn.iterate(m, st, 20, hold=("x",), trajectory=True)["h"]
    assert torch.equal(data.values[1], traj[-3:, 0].reshape(3, -1)[:, 10])
    data = bifurcation_data(m, st, param_values=[0.5], hold=("x",), steps=4, keep=2,
                            scale_block=("h", ["h", "x"]))
    assert data.values.shape == (1, 2)


class GatedMix(nn.Module):
    """``conv(h) * sigmoid(x)``, broadcast over the channels of h."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, h, x):
        return self.conv(h) * torch.sigmoid(x)


# ---------------------------------------------------------------------------- pictures
def test_spectra_and_lyapunov_pictures(tmp_path):
    m = recurrent_map()
    st = state_of(m)
    ev = eigenvalues(m, st, hold=("x",))[0]
    sv = singular_values(m, st, hold=("x",))[0]
    spec = lyapunov_spectrum(m, st, steps=50, hold=("x",), k=3)[0]
    for fn, data, name in [(plot_eigenvalues, ev, "e.png"), (plot_singular_values, sv, "s.png"),
                           (plot_lyapunov, spec, "l.png")]:
        out = fn(data, tmp_path / name)
        assert out == tmp_path / name
        assert_png(out)
    # Nilpotent maps: exact zeros and -inf exponents are drawn, not dropped or crashed on.
    assert_png(plot_singular_values(torch.tensor([1.0, 0.1, 0.0, 0.0]), tmp_path / "z.png"))
    assert_png(plot_lyapunov(torch.full((3,), -math.inf), tmp_path / "ninf.png"))
    fig = plot_lyapunov(torch.full((3,), -math.inf))
    assert len(fig.axes[0].lines[1].get_xdata()) == 3  # three "-inf" markers


def test_impulse_response_picture_marks_zeros_and_structural_length(tmp_path):
    net = tanh_mlp()
    m = net.map.double()
    st = state_of(m)
    free = impulse_response(m, st, steps=6)
    held = impulse_response(m, st, steps=6, slot="x", hold=("x",))
    assert free.structural_length == 2 and bool((free.norm[3:] == 0).all())
    out = plot_impulse_response({"free": free, "held x": held}, tmp_path / "ir.png")
    assert_png(out)
    fig = plot_impulse_response(free)
    ax = fig.axes[0]
    assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines)  # the structural line
    assert ax.get_yscale() == "log"
    assert_png(plot_impulse_response([1.0, 0.5, 0.25, 0.0], tmp_path / "plain.png"))


def test_trajectory_pictures(tmp_path):
    m = recurrent_map(gain=1.5)
    st = state_of(m)
    traj = iternn.iterate(m, st, 60, hold=("x",), trajectory=True)
    assert_png(plot_trajectories({"h": traj["h"]}, tmp_path / "t.png"))
    # A plain tensor with a batch of trajectories, and a 1-D state (its return map).
    batch = torch.randn(40, 3, 5, dtype=torch.float64).cumsum(0)
    assert_png(plot_trajectories(batch, tmp_path / "b.png"))
    assert_png(plot_trajectories(torch.linspace(0, 1, 30) ** 2, tmp_path / "r.png"))
    with pytest.raises(DynamicsError, match="not in the trajectory"):
        plot_trajectories({"h": traj["h"]}, slots=["nope"])


# ---------------------------------------------------------------------------- bifurcation
def pitchfork():
    """h -> tanh(a h): one stable fixed point 0 for a < 1, two (±z*) for a > 1."""
    m = iternn.BlockMap({"h": 1})
    lin = m.connect("h", "h", nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        lin.weight.fill_(1.0)
    m.set_activation("h", nn.Tanh())
    return m.double()


def test_bifurcation_diagram_of_the_pitchfork_matches_the_fixed_points():
    m = pitchfork()
    st = {"h": torch.tensor([[0.3], [-0.3]], dtype=torch.float64)}  # two starts
    data = bifurcation_data(m, st, param_values=[0.5, 2.0], steps=300, keep=5)
    assert data.parameter == "scale on block h <- h" and data.slot == "h"
    assert data.values.shape == (2, 10)
    assert float(data.values[0].abs().max()) < 1e-12  # a = 0.5: only 0
    z = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(200):
        z = torch.tanh(2 * z)
    top = data.values[1]
    assert torch.allclose(top.abs(), z.expand_as(top), atol=1e-10)  # a = 2: ±z*
    assert float(top.max()) > 0 > float(top.min())


def test_bifurcation_leaves_the_users_map_unchanged(tmp_path):
    m = recurrent_map()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    edges = m.edges
    blocks = {k: id(v) for k, v in m.blocks.items()}
    st = state_of(m)
    ref = iternn.iterate(m, st, 20, hold=("x",))
    out = plot_bifurcation(m, st, param_values=torch.linspace(0, 3, 12), hold=("x",),
                           steps=40, keep=10, path=tmp_path / "bif.png")
    assert_png(out)

    def setter(mc, p):  # a callable: gets a fresh copy for every value
        with torch.no_grad():
            mc.block("h", "x").weight.mul_(p)

    data = bifurcation_data(m, st, param_values=[0.0, 1.0], scale_block=setter, hold=("x",),
                            steps=30, keep=3, slot="y")
    assert data.parameter == "setter"
    # p = 1 is the map itself: its tail is the map's own trajectory.
    traj = iternn.iterate(m, st, 30, hold=("x",), trajectory=True)["y"][-3:, 0, 0]
    assert torch.equal(data.values[1], traj)
    assert m.edges == edges
    assert {k: id(v) for k, v in m.blocks.items()} == blocks
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = iternn.iterate(m, st, 20, hold=("x",))
    assert all(torch.equal(ref[s], again[s]) for s in m.slots)


def test_bifurcation_bad_input_raises_named_errors():
    m = recurrent_map()
    st = state_of(m)
    with pytest.raises(DynamicsError, match="no block 'x' <- 'y'"):
        bifurcation_data(m, st, param_values=[1.0], scale_block=("x", "y"))
    with pytest.raises(DynamicsError, match="keep"):
        bifurcation_data(m, st, param_values=[1.0], steps=5, keep=6)
    with pytest.raises(DynamicsError, match="param_values"):
        bifurcation_data(m, st, param_values=[float("nan")])
    with pytest.raises(DynamicsError, match="index"):
        bifurcation_data(m, st, param_values=[1.0], slot="y", index=1)


def test_trajectory_of_shaped_slots_is_flattened_by_the_map(tmp_path):
    from iternn.dynamics.plots import _trajectory_points

    torch.manual_seed(0)
    m = iternn.BlockMap({"x": (2, 4, 4), "h": (3, 4, 4)})
    m.connect("h", "x", nn.Conv2d(2, 3, 3, padding=1))
    m.connect("h", "h", nn.Conv2d(3, 3, 3, padding=1))
    m.set_activation("h", nn.Tanh())
    traj = iternn.iterate(m, {"x": torch.randn(5, 2, 4, 4)}, 6, hold=["x"], trajectory=True)
    points, _ = _trajectory_points(traj, None, m)
    assert points.shape == (6, 5, 32 + 48)
    assert torch.equal(points[:, :, 32:], traj["h"].reshape(6, 5, 48).double())
    assert plot_trajectories(traj, tmp_path / "t.png", map=m).exists()
    with pytest.raises(iternn.DynamicsError, match=r"slot 'h' must be \(T, \*batch, 3, 4, 4\)"):
        _trajectory_points({"h": torch.zeros(6, 5, 48)}, None, m)
