"""dcasgd-s's hyperparameters on the command line: ``--lam0``, ``--staleness-power`` and ``--clip``
through ``dcasgd server``, ``launch``, ``demo`` and ``benchmarks/speedup.py``; bad values are one-line
usage errors (exit 2) before anything starts, and checkpoints record the values."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from dcasgd import checkpoint, cli
from dcasgd.protocol import Request
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
GIVEN = ["--lam0", "3.5", "--staleness-power", "0.25", "--clip", "2.0"]


def test_server_options_make_the_rule():
    a = cli.build_parser().parse_args(["server", "--num-workers", "2", "--mode", "dcasgd-s", *GIVEN])
    assert cli.rule_config(a) == RuleConfig(mode="dcasgd-s", lam0=3.5, staleness_power=0.25, clip=2.0)
    defaults = cli.rule_config(cli.build_parser().parse_args(["server", "--num-workers", "2", "--mode", "dcasgd-s"]))
    assert defaults == RuleConfig(mode="dcasgd-s")  # the CLI's defaults are the mode's


def test_launch_passes_them_to_every_shard():
    parser = cli.build_parser()
    server_args = cli.launch_server_args(parser.parse_args(["launch", "--mode", "dcasgd-s", *GIVEN, "--", "true"]))
    server = parser.parse_args(["server", "--num-workers", "1", "--mode", "dcasgd-s", *server_args])
    assert (server.lam0, server.staleness_power, server.clip) == (3.5, 0.25, 2.0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--clip", "-1", "Invalid clip: -1.0"),
        ("--clip", "nan", "Invalid clip: nan"),
        ("--staleness-power", "-0.5", "Invalid staleness_power: -0.5"),
        ("--staleness-power", "inf", "Invalid staleness_power: inf"),
        ("--lam0", "-2", "Invalid lam0: -2.0"),
    ],
)
@pytest.mark.parametrize("command", ["server", "launch", "demo"])
def test_a_bad_value_is_one_line_and_exit_2(capsys, command, option, value, message):
    """Refused before a socket is bound or a process started (launch: before its shards start)."""
    argv = {
        "server": ["server", "--bind", "tcp://127.0.0.1:0", "--num-workers", "1"],
        "launch": ["launch", "--workers", "1"],
        "demo": ["demo", "--workers", "1"],
    }[command]
    argv = [*argv, "--mode", "dcasgd-s", option, value] + (["--", "true"] if command == "launch" else [])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert cli.main(argv) == 2
    finally:  # cmd_server configures logging: leave the root logger as it was
        root.handlers[:], root.level = handlers, level
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [f"dcasgd {command}: {'' if command == 'server' else 'error: '}{message}"], out.err


def test_demo_gives_them_to_every_shard(monkeypatch):
    from dcasgd import demo

    seen = {}

    def fake_main(*args, server_args=None, **kwargs):
        seen["server_args"] = server_args
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", "--mode", "dcasgd-s", *GIVEN]) == 0
    server = cli.build_parser().parse_args(["server", "--num-workers", "1", *seen["server_args"]])
    assert (server.lam0, server.staleness_power, server.clip) == (3.5, 0.25, 2.0)


def test_speedup_takes_them_for_shards_and_simulator():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speedup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    a = speedup.parse_args(GIVEN)
    server = cli.build_parser().parse_args(["server", "--num-workers", "1", *speedup.rule_args(a)])
    assert (server.lam0, server.staleness_power, server.clip) == (3.5, 0.25, 2.0)
    run = speedup.run_sim("dcasgd-s", 2, speedup.parse_args([*GIVEN, "--epochs", "0.05", "--hidden", "4"]))
    assert {k: run["config"][k] for k in ("lam0", "staleness_power", "clip")} == {
        "lam0": 3.5,
        "staleness_power": 0.25,
        "clip": 2.0,
    }
    with pytest.raises(SystemExit) as e:
        speedup.parse_args(["--clip", "-1"])
    assert e.value.code == 2


def test_a_checkpoint_records_them_and_a_resume_with_others_says_so(tmp_path, caplog):
    n = 10
    parsed = cli.build_parser().parse_args(["server", "--num-workers", "1", "--mode", "dcasgd-s", *GIVEN])
    rules = cli.rule_config(parsed)
    state = ShardState(ShardConfig(num_workers=1, rules=rules))
    state.init(Request(op="init", rid=1, worker=0, fp="fp", n=n, lo=0, hi=n, nbytes=4 * n), torch.zeros(n))
    path = checkpoint.save(state, tmp_path)
    header = checkpoint.read_header(path)
    recorded = header["identity"]["rules"]
    assert (recorded["lam0"], recorded["staleness_power"], recorded["clip"]) == (3.5, 0.25, 2.0)
    other = ShardConfig(num_workers=1, rules=RuleConfig(mode="dcasgd-s", lam0=3.5, staleness_power=0.25, clip=1.0))
    with caplog.at_level(logging.WARNING, logger="dcasgd.checkpoint"):
        resumed = checkpoint.read(path, other)
    assert resumed.config.rules.clip == 1.0
    assert "clip 2.0 -> 1.0" in caplog.text, caplog.text
