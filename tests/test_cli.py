"""The demo behind ``make demo`` and the command line around it."""

import subprocess
import sys

import pytest

from iternn.cli import main
from iternn.demo import run_demo


def test_demo_reports_exact_conversions_and_structure():
    lines: list[str] = []
    res = run_demo(reps=1, calls=1, print_fn=lines.append)
    assert res["mlp_max_diff"] <= 1e-5 and res["rnn_max_diff"] <= 1e-5
    assert res["mlp_impulse_response"] == 3
    assert res["rnn_impulse_response"] == float("inf")
    assert res["mlp_ratio"] > 0 and res["rnn_ratio"] > 0
    text = "\n".join(lines)
    assert "map/torch" in text and "impulse-response length" in text


def test_cli_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_python_dash_m_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "iternn", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout
