"""``dcasgd demo``, the README's main job, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dcasgd.rules import MODES

LINE = re.compile(r"mode (\S+)\s+workers (\d+)\s+shards (\d+)\s+wall\s+([\d.]+) s\s+test accuracy ([\d.]+)$")


# `python -m dcasgd` with matplotlib made unimportable, as on a machine without it.
NO_MATPLOTLIB = """
import sys

class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoMatplotlib())
from dcasgd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def demo(*args: str, timeout: float, python: list[str] | None = None, **kw) -> tuple[list[re.Match], str]:
    """Run ``dcasgd demo ARGS``; assert it exits 0; return its result lines and its whole stdout."""
    command = [*(python or [sys.executable, "-m", "dcasgd"]), "demo", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return [m for m in map(LINE.match, out.stdout.splitlines()) if m], out.stdout


@pytest.mark.timeout(180)
def test_default_demo_reaches_95_percent():
    (run,), _ = demo(timeout=170)
    mode, workers, shards, _seconds, accuracy = run.groups()
    assert (mode, workers, shards) == ("dcasgd-a", "4", "2")
    assert float(accuracy) >= 0.95  # wall time is a benchmark figure (README), not a test


@pytest.mark.timeout(240)
def test_compare_runs_every_mode_and_plots_them(tmp_path):
    png = tmp_path / "compare.png"
    runs, stdout = demo("--compare", "--workers", "1", "--shards", "1", "--epochs", "3", "--plot", str(png),
                        timeout=230)  # fmt: skip
    assert [r.group(1) for r in runs] == list(MODES)
    assert all(float(r.group(5)) > 0.5 for r in runs)
    assert f"plot: {png}  (test accuracy against wall time)" in stdout.splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.timeout(180)
def test_compare_without_matplotlib_says_how_to_get_it_and_prints_the_table(tmp_path):
    cmd = [sys.executable, "-c", NO_MATPLOTLIB]
    chosen = ["dcasgd-f", "async"]  # --modes: these only, in this order (the other test runs them all)
    runs, stdout = demo("--compare", "--modes", *chosen, "--workers", "1", "--shards", "1", "--epochs", "1",
                        timeout=170, python=cmd, cwd=tmp_path)  # fmt: skip
    assert [r.group(1) for r in runs] == chosen
    table = stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["mode", "workers", "wall", "s", "test", "acc"]
    assert [row.split()[0] for row in table[1 : 1 + len(chosen)]] == chosen
    assert "matplotlib is not installed (pip install matplotlib" in table[1 + len(chosen)]
    assert list(tmp_path.iterdir()) == []  # no plot, no leftovers in the current directory


def test_demo_epochs_match_the_training_module():
    from dcasgd import demo as demo_module
    from dcasgd import train_digits

    assert demo_module.EPOCHS == train_digits.EPOCHS == train_digits.parser().parse_args([]).epochs


@pytest.mark.timeout(120)
def test_low_level_quickstart_example_runs():
    out = subprocess.run([sys.executable, "examples/quickstart.py", "--workers", "2", "--shards", "2", "--epochs", "4"],
                         capture_output=True, text=True, timeout=110)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    accuracy = float(re.search(r"test accuracy ([\d.]+)", out.stdout).group(1))
    assert accuracy > 0.8


def test_modes_without_compare_is_a_usage_error(capsys):
    from dcasgd.cli import main

    assert main(["demo", "--modes", "async"]) == 2
    assert "--modes chooses the modes of --compare" in capsys.readouterr().err
