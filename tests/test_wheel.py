"""A newcomer's path: the wheel, installed into a fresh virtual environment with the README's
constraints, runs ``dcasgd demo`` from an empty directory, far from any source checkout.

The demo here is a short one (2 workers, 2 shards, 5 epochs: about half the default's time, most
of which is starting processes): this test proves that the installed wheel runs a distributed job;
``tests/test_demo.py`` checks that the default demo reaches 95%.

Slow (a fresh environment gets torch from the local CPU wheel and the other dependencies from the
index: 15-25 s without byte-compiling, 52-60 s with it, on the 2-core development VM; then the demo,
about 15 s, most of it starting processes); everything it creates lives in one temporary directory
that is removed at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _clean_env(venv: Path) -> dict[str, str]:
    """This environment minus anything that would let the source tree's dcasgd in (PYTHONPATH) or
    point at the project's own virtual environment; the fresh one's bin first on PATH.

    Also without PYTHONDONTWRITEBYTECODE, as on a newcomer's machine: the install skips byte-compiling
    (--no-compile), so the first import writes the bytecode the demo's processes then share.
    """
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list, *, timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.timeout(600)
def test_demo_runs_from_an_installed_wheel():
    with tempfile.TemporaryDirectory(prefix="dcasgd-wheel-") as tmp:
        tmp = Path(tmp)
        venv, empty = tmp / "venv", tmp / "empty"
        empty.mkdir()
        _run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", tmp / "dist"], timeout=240)
        (wheel,) = (tmp / "dist").glob("dcasgd-*.whl")
        # The base interpreter, not this (project) environment's: venv makes a bare one either way.
        _run([sys.executable, "-m", "venv", venv], timeout=120)
        env = _clean_env(venv)
        # --no-compile: pip would byte-compile every installed file (all of torch: about half of the
        # install's time here); Python compiles what is imported, on first import, instead.
        _run([venv / "bin" / "pip", "install", "-q", "--no-compile", "-c", ROOT / "constraints-cpu.txt", wheel],
             timeout=400, env=env, cwd=empty)  # fmt: skip

        where = _run([venv / "bin" / "python", "-c", "import dcasgd.train_digits as t; print(t.__file__)"],
                     timeout=60, env=env, cwd=empty)  # fmt: skip
        site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        assert Path(where.stdout.strip()) == site / "dcasgd" / "train_digits.py", where.stdout

        demo = _run([venv / "bin" / "dcasgd", "demo", "--workers", "2", "--shards", "2", "--epochs", "5"], timeout=300,
                    env=env, cwd=empty)  # fmt: skip
        line = re.search(r"^mode dcasgd-a\s+workers 2\s+shards 2\s+wall\s+[\d.]+ s\s+test accuracy ([\d.]+)$",
                         demo.stdout, re.M)  # fmt: skip
        assert line, demo.stdout + demo.stderr
        assert float(line.group(1)) >= 0.8, demo.stdout  # 0.90-0.93 after 5 epochs here; chance is 0.1
        assert list(empty.iterdir()) == []  # the demo leaves nothing in the directory it ran from
