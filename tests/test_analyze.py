"""``iternn.dynamics.report.analyze`` and the ``iternn analyze`` command."""

import re
import sys

import pytest
import torch
from maps import GatedConv
from torch import nn

import iternn
from iternn.cli import main
from iternn.dynamics import DynamicsError, fixed_point, spectral_radius
from iternn.dynamics import report as report_mod
from iternn.dynamics.propagation import propagation
from iternn.dynamics.report import PICTURES, REPORT_NAME, analyze
from iternn.io import FormatError

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


#: The pictures of a map without attention: all but the propagation across positions.
DRAWN = [name for name in PICTURES if name != "propagation.png"]


def assert_pictures(folder, names=DRAWN):
    from matplotlib.image import imread

    for name in names:
        path = folder / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        img = torch.from_numpy(imread(path))
        assert torch.unique(img.reshape(-1, img.shape[-1]), dim=0).shape[0] > 1, name


def number(text, label):
    """The number after ``label`` in the report (``inf``/``-inf`` included)."""
    found = re.search(re.escape(label) + r"\s*(-?(?:inf|[0-9.]+(?:e[-+]?[0-9]+)?))", text)
    assert found, f"{label!r} not in the report"
    return float(found.group(1))


def tanh_mlp():
    torch.manual_seed(0)
    return iternn.from_mlp(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                                         nn.Linear(4, 2)))


def cyclic_map():
    """x (input) -> h (tanh, contractive recurrence): one stable fixed point."""
    g = torch.Generator().manual_seed(1)
    m = iternn.BlockMap({"x": 2, "h": 4})
    hx = m.connect("h", "x", nn.Linear(2, 4, bias=False))
    hh = m.connect("h", "h", nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        hx.weight.copy_(torch.randn(4, 2, generator=g))
        hh.weight.copy_(0.4 * torch.randn(4, 4, generator=g) / 2)
    m.set_activation("h", nn.Tanh())
    m.set_bias("h", torch.zeros(4))
    return m


def default_state(m, seed=0):
    """The state analyze picks: standard normal per slot, in slot order, from the seed."""
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(1, n, generator=g, dtype=torch.float64) for s, n in m.slots.items()}


@pytest.fixture(scope="module")
def cyclic_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("cyclic")
    iternn.save(cyclic_map(), root / "cyc.safetensors")
    out = analyze(root / "cyc.safetensors", root / "report", quick=True)
    return root, out, (out / REPORT_NAME).read_text()


def test_analyze_a_saved_mlp(tmp_path):
    iternn.save(tanh_mlp(), tmp_path / "mlp.safetensors")
    out = analyze(tmp_path / "mlp.safetensors", tmp_path / "r", quick=True)
    assert out == tmp_path / "r"
    text = (out / REPORT_NAME).read_text()
    # Structural lengths: 3 layers without the hold, infinite with the input held.
    assert "| nothing held | 3 |" in text and "| x held | inf |" in text
    # The empirical response vanishes exactly after the structural length (tanh: not before).
    assert "| initial state perturbed, nothing held | 3 | 3 | 0 |" in text
    assert number(text, "Spectral radius (Krylov, Jacobian-vector products):") == 0.0
    assert "| 1 | fixed | stable | 0 |" in text  # the MLP's output: one stable fixed point
    assert "1 distinct point found (1 stable fixed point)" in text
    assert number(text, "Largest Lyapunov exponent:") == float("-inf")
    assert "| **total** |  |  |  | **54** |" in text  # 15+5 + 20+4 + 8+2 parameters
    # every block is linear: F is one matrix of the 15 + 20 + 8 weights (biases are b)
    assert ("every block is linear, so `F` is one 14x14 matrix over the packed state with 43 "
            "non-zeros (density 0.219)") in text
    for name in DRAWN:
        assert f"]({name})" in text
    assert_pictures(out)
    # No block mixes positions: no propagation section, no picture of it.
    assert "Propagation across positions" not in text and "propagation.png" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors", "r"]
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT_NAME, *DRAWN])


def test_analyze_a_recurrent_map_reports_the_right_numbers(cyclic_report):
    root, out, text = cyclic_report
    m = iternn.load(root / "cyc.safetensors").double()
    st = default_state(m)
    assert "| nothing held | inf |" in text and "| x held | inf |" in text
    radius = float(spectral_radius(m, st, hold=("x",))[0])
    assert 0 < radius < 1
    assert number(text, "Spectral radius (Krylov, Jacobian-vector products):") == pytest.approx(
        radius, rel=1e-5)
    star, info = fixed_point(m, st, hold=("x",))
    assert info.converged
    assert "Solve from the state (Anderson): converged yes" in text
    assert "1 distinct point found (1 stable fixed point)" in text
    row = re.search(r"\| 1 \| fixed \| stable \| [^|]+ \| [^|]+ \| ([^|]+) \|", text)
    norm = float(torch.linalg.vector_norm(star["h"]))
    assert float(row.group(1)) == pytest.approx(norm, rel=1e-5)
    largest = number(text, "Largest Lyapunov exponent:")
    assert -10 < largest < 0
    assert re.search(r"\| 1 \| -?[0-9.]+", text.split("## Lyapunov exponents")[1])
    assert "Every analysis completed." in text
    assert_pictures(out)


def test_analyze_a_saved_rnn_uses_its_ordered_update(tmp_path):
    torch.manual_seed(0)
    iternn.save(iternn.from_rnn(nn.RNN(2, 4)), tmp_path / "rnn.safetensors")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "structure.png").write_bytes(b"an old picture")
    (tmp_path / "r" / "notes.txt").write_text("the user's own file")
    out = analyze(tmp_path / "rnn.safetensors", tmp_path / "r", quick=True, steps=40,
                  pictures=False)
    text = (out / REPORT_NAME).read_text()
    assert "(RNNMap)" in text and "- Update: `ordered`" in text
    assert "| x held | inf |" in text
    assert number(text, "Largest Lyapunov exponent:") < 0
    assert "pictures: not drawn (pictures=False)" in text
    # Numbers only: the old picture is gone (the report does not show it), the rest stays.
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", REPORT_NAME]


def test_analyze_a_module_leaves_it_untouched_and_takes_a_state(tmp_path):
    m = cyclic_map().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = {"x": torch.tensor([0.5, -1.0]), "h": torch.zeros(4)}
    out = analyze(m, tmp_path / "r", state=st, quick=True, steps=30, pictures=False)
    text = (out / REPORT_NAME).read_text()
    assert "state: given" in text and "in-memory BlockMap" in text
    assert m.training and all(p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # The given state is the one analysed: the fixed point is that of x = (0.5, -1).
    star, _ = fixed_point(m.double(), {k: v.double().unsqueeze(0) for k, v in st.items()},
                          hold=("x",))
    norm = float(torch.linalg.vector_norm(star["h"]))
    row = re.search(r"\| 1 \| fixed \| stable \| [^|]+ \| [^|]+ \| ([^|]+) \|", text)
    assert float(row.group(1)) == pytest.approx(norm, rel=1e-5)


def test_a_failing_analysis_is_recorded_not_raised(tmp_path):
    m = iternn.BlockMap({"h": 2})  # z -> 1e10 z: the trajectory overflows
    lin = m.connect("h", "h", nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        lin.weight.copy_(1e10 * torch.eye(2))
    out = analyze(m, tmp_path / "r", quick=True, steps=60)  # pictures of what worked
    text = (out / REPORT_NAME).read_text()
    assert "- Lyapunov spectrum: not available: DynamicsError:" in text  # in the notes
    assert "Largest Lyapunov exponent: not available: DynamicsError:" in text
    assert number(text, "Spectral radius (Krylov, Jacobian-vector products):") == pytest.approx(
        1e10)
    assert (out / "structure.png").is_file()


def test_bad_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        analyze(tmp_path / "missing.safetensors", tmp_path / "r")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(FormatError):
        analyze(junk, tmp_path / "r")
    iternn.save(nn.Linear(2, 2), tmp_path / "lin.safetensors")
    with pytest.raises(TypeError, match="not a block map"):
        analyze(tmp_path / "lin.safetensors", tmp_path / "r")
    with pytest.raises(ValueError, match="analyze takes one state"):
        analyze(cyclic_map(), tmp_path / "r", state={"h": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="unknown slot"):
        analyze(cyclic_map(), tmp_path / "r", hold=("nope",))
    assert not (tmp_path / "r").exists()  # nothing written on bad input


def test_non_finite_weights_are_an_error_naming_the_block(tmp_path):
    m = cyclic_map()
    with torch.no_grad():
        m.block("h", "h").weight[2, 0] = float("nan")
    with pytest.raises(DynamicsError, match=r"block 'h' <- 'h' holds NaN in 'weight'"):
        analyze(m, tmp_path / "r", quick=True, pictures=False)
    assert not (tmp_path / "r").exists()  # refused before anything is written
    iternn.save(m, tmp_path / "nan.safetensors")  # the command line: exit 1, one line
    assert main(["analyze", str(tmp_path / "nan.safetensors"), "--out",
                 str(tmp_path / "r"), "--quick"]) == 1
    assert not (tmp_path / "r").exists()


def test_ctrl_c_stops_the_analysis(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "impulse_response", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not recorded as "not available"
        analyze(cyclic_map(), tmp_path / "r", quick=True, pictures=False)
    assert not (tmp_path / "r" / REPORT_NAME).exists()


def test_progress_is_one_step_per_section_on_stderr(tmp_path, capsys):
    m = iternn.BlockMap({"x": 1, "h": 2})  # small: the sections are quick
    m.connect("h", "x", nn.Linear(1, 2))
    m.connect("h", "h", nn.Linear(2, 2))
    analyze(m, tmp_path / "quiet", quick=True, pictures=False, steps=8)
    assert capsys.readouterr().err == ""  # progress=False: nothing
    analyze(m, tmp_path / "loud", quick=True, pictures=False, steps=8, progress=True)
    err = capsys.readouterr().err
    total = len(report_mod._Analysis.SECTIONS)
    assert f"{total}/{total}" in err and "analyze" in err, err
    assert (tmp_path / "loud" / REPORT_NAME).read_text() == (
        tmp_path / "quiet" / REPORT_NAME).read_text().replace("quiet", "loud")


def test_progress_without_tqdm_is_one_line_per_section(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with report_mod._Progress("m", 2, enabled=True) as progress:
        for section in ("first", "second"):
            progress.start(section)
            progress.done()
    assert capsys.readouterr().err.splitlines() == ["analyze m: first (1/2)",
                                                    "analyze m: second (2/2)"]


# ---------------------------------------------------------------------------- CLI
def test_cli_analyze_writes_the_folder_and_prints_it(cyclic_report, tmp_path, capsys):
    root, _, text = cyclic_report
    out = tmp_path / "cli-report"
    assert main(["analyze", str(root / "cyc.safetensors"), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr()
    total = len(report_mod._Analysis.SECTIONS)
    assert str(out) in printed.out and f"{total}/{total}" in printed.err  # progress
    assert "error" not in printed.err
    # Deterministic: the same map and seed give the same report, byte for byte.
    assert (out / REPORT_NAME).read_text() == text


def test_cli_analyze_default_folder_is_in_the_current_directory(cyclic_report, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root, _, text = cyclic_report
    assert main(["analyze", str(root / "cyc.safetensors"), "--quick", "--seed", "1",
                 "--no-pictures"]) == 0
    assert "iternn-report-cyc" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["iternn-report-cyc"]
    other = (tmp_path / "iternn-report-cyc" / REPORT_NAME).read_text()
    assert "Seed: 1;" in other and other != text  # the seed sets the state


def test_cli_analyze_bad_files_are_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["analyze", str(missing), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iternn: error:") and err.count("\n") == 1 and "missing" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert main(["analyze", str(junk), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iternn: error:") and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself
        main(["analyze", str(missing), "--debug"])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["analyze"], ["analyze", "m.safetensors", "--steps", "0"],
                                  ["analyze", "m.safetensors", "--seed", "x"],
                                  ["analyze", "m.safetensors", "--bogus"]])
def test_cli_analyze_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def conv_map():
    """x (1, 4, 4) -conv-> h (2, 4, 4, tanh, recurrent conv) -gate(h, h)-> g -> pool, linear -> y."""
    torch.manual_seed(0)
    m = iternn.BlockMap({"x": (1, 4, 4), "h": (2, 4, 4), "g": (2, 4, 4), "y": 3})
    m.connect("h", "x", nn.Conv2d(1, 2, 3, padding=1))
    hh = m.connect("h", "h", nn.Conv2d(2, 2, 3, padding=1, bias=False))
    with torch.no_grad():
        hh.weight.mul_(0.5)
    m.connect("g", ("h", "h"), GatedConv(2))
    m.connect("y", "g", nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)))
    m.set_activation("h", nn.Tanh())
    m.set_bias("g", torch.zeros(2, 4, 4))
    return m


def test_analyze_a_map_with_shaped_slots_and_a_multi_source_block(tmp_path):
    m = conv_map()
    out = analyze(m, tmp_path / "r", quick=True, steps=40)
    text = (out / REPORT_NAME).read_text()
    assert "4 slots, 4 blocks, state size 83 (67 free)" in text
    assert "| `x` | 16 = 1x4x4 | identity | held | no |" in text
    assert "| `h` | 32 = 2x4x4 | Tanh | free | no |" in text
    assert "| `g <- h, h` | GatedConv | 32x64 |" in text  # the parameter table
    # Which blocks are linear, and their matrices. A 3x3 conv (padding 1) on 4x4 has, per
    # dim, 2 + 3 + 3 + 2 = 10 (output, tap) pairs inside: 100 non-zeros per channel pair.
    assert "3 of 4 blocks are linear maps with a matrix, so `F` is not one matrix" in text
    assert "| `h <- x` | Conv2d | 32x16 | yes | 200 | 0.391 |" in text
    assert "| `h <- h` | Conv2d | 32x32 | yes | 400 | 0.391 |" in text
    assert "| `g <- h, h` | GatedConv | 32x64 | no: GatedConv reads 2 slots;" in text
    assert "| `y <- g` | Sequential | 3x32 | yes | 96 | 1 |" in text
    # Every analysis ran on the shaped state (flattened where a vector is needed).
    assert "- Every analysis completed." in text
    assert "not available" not in text
    assert number(text, "Spectral radius (Krylov, Jacobian-vector products):") < 1
    assert "Parameter: scale on block h <- h" in text
    assert_pictures(out)
    # A given state takes each slot's shape (or a batch of one); missing slots are zero.
    st = {"x": torch.ones(1, 4, 4), "h": torch.full((1, 2, 4, 4), 0.5)}
    start = report_mod._state(m, st, 0, torch.float64, torch.device("cpu"))
    assert {s: tuple(v.shape) for s, v in start.items()} == {
        "x": (1, 1, 4, 4), "h": (1, 2, 4, 4), "g": (1, 2, 4, 4), "y": (1, 3)}
    assert float(start["h"].sum()) == 16 and float(start["g"].abs().sum()) == 0
    with pytest.raises(ValueError, match=r"slot 'x' of the state must have shape \(1, 4, 4\) "
                                         r"or \(1, 1, 4, 4\)"):
        analyze(m, tmp_path / "r3", state={"x": torch.ones(16)})


def test_analyze_a_transformer_map_shows_the_propagation_across_positions(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # sequence-first, non-causal
    net = iternn.from_transformer(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    out = analyze(net, tmp_path / "r", quick=True, pictures=True)
    text = (out / REPORT_NAME).read_text()
    assert "## Propagation across positions" in text
    assert "A random sequence of 8 positions" in text and "nothing held" in text
    # One layer, nothing held: x -> l1, so only k = 1 (the structural length) is shown,
    # and non-causal attention reaches every position from every position at once.
    row = re.search(r"\| 1 \| ([0-9.e+-]+) \| 64 of 64 \| no \| yes \|", text)
    assert row and "| 2 |" not in text.split("## Propagation across positions")[1].split("##")[0]
    # The number is propagation's on the sequence drawn from the seed (slot by slot).
    g = torch.Generator().manual_seed(6)  # seed 0: the propagation's own generator
    seq = {s: torch.randn(8, 8, generator=g, dtype=torch.float64) for s in net.map.slots}
    prop = propagation(net.map.double(), seq, 1)
    assert float(row.group(1)) == pytest.approx(float(prop.max()), rel=1e-5)
    assert "](propagation.png)" in text
    assert_pictures(out, [*DRAWN, "propagation.png"])
