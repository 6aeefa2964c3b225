"""``dcasgd launch`` and ``LocalCluster`` through real processes: exit codes, output, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_all_gone

from dcasgd import cli
from dcasgd.launch import LaunchError, LocalCluster, launch

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="checks for leftover processes with pidfd_open (Linux)"),
]

# A real worker: worker 0 offers the weights, all pull and push through the shards.
TRAIN = """
import os, torch, dcasgd
from dcasgd.env import resolve

job = resolve()
c = dcasgd.Client(job.servers, job.worker_id, timeout=20.0)
n = 1000
if job.worker_id == 0:
    c.init(torch.zeros(n))
c.wait_initialized(20.0)
w = c.pull()
for _ in range(3):
    w = c.push_pull(torch.ones(n), out=w)  # no lr: the shards' --lr applies
# async with --lr 0.5: every push moved every weight by -0.5, and this worker made 3 of them. Each
# shard answers at its own version (others' pushes reach the shards in their own order), so the
# weights are uniform per shard slice, not across shards.
assert c.mode == "async"
for lo, hi in c.ranges:
    part = w[lo:hi]
    assert (part == part[0]).all() and part[0] <= -1.5 and (part[0] / -0.5).item().is_integer(), (lo, part[0])
print(f"worker {job.worker_id}/{job.num_workers} shards {c.num_shards} OMP {os.environ['OMP_NUM_THREADS']} done")
c.close()
"""

# One worker of a resumable job: prints the shards' versions before and after 3 pushes (async, --lr 0.5).
RESUMABLE = """
import torch, dcasgd
from dcasgd.env import resolve

job = resolve()
c = dcasgd.Client(job.servers, job.worker_id, timeout=20.0)
c.init(torch.zeros(1000))  # after --resume the shards keep their weights: the first init wins
resumed = [info["resumed_from_version"] for info in c.shard_info]
before = [s["version"] for s in c.stats()]
w = c.pull()
for _ in range(3):
    w = c.push_pull(torch.ones(1000), out=w)
print(f"resumed {resumed} versions {before} -> {[s['version'] for s in c.stats()]} w {w[0].item()}")
c.close()
"""

# A worker that pushes once and then scrapes every shard's metrics while the job runs.
SCRAPER = """
import os, urllib.request, torch, dcasgd
from dcasgd.env import resolve

job = resolve()
c = dcasgd.Client(job.servers, job.worker_id, timeout=20.0)
c.init(torch.zeros(1000))
c.push_pull(torch.ones(1000), lr=0.1, out=c.pull())
for s in range(c.num_shards):
    url = f"http://127.0.0.1:{int(os.environ['METRICS_PORT']) + s}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    print(url, *[line for line in text.splitlines() if line.startswith("dcasgd_version")])
c.close()
"""

# A worker that runs until it is killed, with a grandchild unless NO_GRANDCHILD is set; worker FAIL_ID
# exits with FAIL_CODE at once, a worker in STUBBORN ignores SIGTERM.
LINGER = """
import os, signal, subprocess, sys

wid = os.environ["DCASGD_WORKER_ID"]
if wid == os.environ.get("FAIL_ID"):
    sys.exit(int(os.environ["FAIL_CODE"]))
if wid in os.environ.get("STUBBORN", "").split(","):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("NO_GRANDCHILD"):
    print("ready", flush=True)
else:
    child = subprocess.Popen(["sleep", "300"])
    print(f"ready grandchild {child.pid}", flush=True)
while True:
    signal.pause()
"""


class Lines:
    """A text stream the launcher writes into and a test waits on."""

    def __init__(self) -> None:
        self._text = ""
        self._cond = threading.Condition()

    def write(self, s: str) -> int:
        with self._cond:
            self._text += s
            self._cond.notify_all()
        return len(s)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    @classmethod
    def of_process(cls, cmd: list[str], **popen: Any) -> tuple[subprocess.Popen, Lines, threading.Thread]:
        """Start ``cmd`` with its output (stdout and stderr) read into a new Lines by a thread."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        lines = cls()
        reader = threading.Thread(target=lambda: [lines.write(line) for line in proc.stdout], daemon=True)
        reader.start()
        return proc, lines, reader

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until ``pattern`` (a regex, per line) matched ``count`` lines; returns the first group of each."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(found := re.findall(pattern, self._text, re.M)) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{count} lines like {pattern!r} not seen in {timeout} s; output:\n{self._text}"
                self._cond.wait(remaining)
            return found


def script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


def launched_pids(output: str) -> list[int]:
    """Every pid the launcher and the workers reported: shards, workers, grandchildren."""
    pids = re.findall(r"^\[launch\] (?:shard|worker) \d+ pid (\d+)", output, re.M)
    pids += re.findall(r"^\[worker\d+\] ready grandchild (\d+)", output, re.M)
    return [int(p) for p in pids]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_happy_path_through_the_cli(tmp_path, capsys, monkeypatch, transport):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cmd = script(tmp_path, "train.py", TRAIN)
    args = ["launch", "--shards", "2", "--workers", "3", "--mode", "async", "--lr", "0.5"]
    args += [] if transport == "ipc" else ["--transport", transport]  # ipc is the default
    code = cli.main([*args, "--", *cmd])
    out = capsys.readouterr().out
    assert code == 0, out
    for i in range(3):
        assert re.search(rf"^\[worker{i}\] worker {i}/3 shards 2 OMP 1 done$", out, re.M), out
    endpoint = {"ipc": r"ipc://(/\S+)/shard1", "tcp": r"tcp://127\.0\.0\.1:\d+"}[transport]
    m = re.search(rf"^\[launch\] shard 1 pid \d+ {endpoint}$", out, re.M)
    assert m, out
    if transport == "ipc":
        assert not Path(m.group(1)).exists()  # the private directory of the socket files is gone
    assert re.search(r"^\[shard1\] dcasgd shard 1/2 listening on ", out, re.M), out
    assert re.search(r"^\[shard0\] .*shard 0: signal 15, stopping$", out, re.M), out  # stopped by SIGTERM
    assert "[launch] all 3 workers exited with code 0; stopping the shards" in out
    assert len(launched_pids(out)) == 5
    assert_all_gone(launched_pids(out))


def test_a_failing_worker_stops_the_job(tmp_path):
    lines = Lines()
    started = time.monotonic()
    code = launch(
        script(tmp_path, "linger.py", LINGER), workers=3, env={"FAIL_ID": "0", "FAIL_CODE": "3"}, output=lines
    )
    assert code == 3, lines.text
    assert "[launch] worker 0 exited with code 3; stopping the job" in lines.text
    assert time.monotonic() - started < 15.0  # the others went at SIGTERM, not after a timeout of their own
    assert "sent SIGKILL" not in lines.text
    assert_all_gone(launched_pids(lines.text))


def test_a_killed_worker_stops_the_job_and_its_grandchildren(tmp_path):
    lines = Lines()
    cluster = LocalCluster(
        script(tmp_path, "linger.py", LINGER), workers=2, env={"STUBBORN": "0"}, output=lines, grace=0.5
    )
    with cluster:
        cluster.start_servers()
        cluster.start_workers()
        grandchildren = [int(p) for p in lines.wait_for(r"^\[worker\d\] ready grandchild (\d+)$", count=2)]
        os.kill(cluster.pids["worker1"], signal.SIGKILL)
        assert cluster.wait(timeout=30.0) == 137, lines.text
    assert "[launch] worker 1 was killed by SIGKILL (exit code 137); stopping the job" in lines.text
    assert "[launch] worker 0 still ran 0.5 s after SIGTERM; sent SIGKILL" in lines.text  # it ignores SIGTERM
    assert_all_gone([*cluster.pids.values(), *grandchildren])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_the_launcher_stops_everything(tmp_path, sig, code):
    cmd = [sys.executable, "-m", "dcasgd", "launch", "--workers", "2", "--", *script(tmp_path, "linger.py", LINGER)]

    def default_sigint() -> None:  # a runner started in the background may hand us SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc, lines, reader = Lines.of_process(cmd, preexec_fn=default_sigint)
    try:
        lines.wait_for(r"^\[worker\d\] ready grandchild (\d+)$", count=2)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code, lines.text
    finally:
        if proc.poll() is None:
            proc.kill()  # its children get SIGKILL from the kernel (PR_SET_PDEATHSIG)
            proc.wait()
    reader.join(10)
    assert "stopping all processes" in lines.text
    assert len(launched_pids(lines.text)) == 5
    assert_all_gone(launched_pids(lines.text))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "dcasgd", "launch", "--workers", "2", "--", *script(tmp_path, "linger.py", LINGER)]
    env = {**os.environ, "NO_GRANDCHILD": "1"}  # the kernel's parent-death signal reaches children only
    env["TMPDIR"] = str(tmp_path)  # a SIGKILLed launcher leaves its ipc directory: let it be pytest's to remove
    proc, lines, reader = Lines.of_process(cmd, env=env)
    try:
        lines.wait_for(r"^\[worker\d\] (ready)$", count=2)
    finally:
        proc.kill()  # no chance to clean up: SIGKILL
        proc.wait()
    reader.join(10)
    assert len(launched_pids(lines.text)) == 3
    assert_all_gone(launched_pids(lines.text))


@pytest.mark.parametrize("argv", [["launch", "--workers", "2", "--"], ["launch", "--workers", "2"]])
def test_launch_without_a_command_is_a_usage_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: dcasgd launch" in err and "no command: give it after --" in err


def test_ipc_sockets_are_in_a_private_directory_removed_at_stop():
    cluster = LocalCluster(["true"], shards=2, quiet=True)
    with cluster:
        endpoints = cluster.start_servers()
        d = Path(endpoints[0][len("ipc://") :]).parent
        assert endpoints == [f"ipc://{d}/shard0", f"ipc://{d}/shard1"]
        assert (d.stat().st_mode & 0o777) == 0o700 and sorted(os.listdir(d)) == ["shard0", "shard1"]
        os.kill(cluster.pids["shard1"], signal.SIGKILL)  # leaves its socket file behind
    assert not d.exists()
    with pytest.raises(ValueError, match="unknown transport 'udp'"):
        LocalCluster(["true"], transport="udp")


def test_server_options_the_launcher_sets_are_refused():
    with pytest.raises(ValueError, match="must not set --bind"):
        LocalCluster(["true"], server_args=["--bind", "tcp://127.0.0.1:5555"])


def test_a_shard_that_fails_to_start_is_named_with_its_output(tmp_path):
    lines = Lines()
    with LocalCluster(["true"], shards=2, server_args=["--lr", "fast"], output=lines) as cluster:
        with pytest.raises(LaunchError, match=r"shard \d exited before reporting its endpoint \(exit code 2\)") as e:
            cluster.start_servers()
    assert "invalid float value: 'fast'" in str(e.value)
    assert_all_gone(list(cluster.pids.values()))


def test_server_options_pass_through_to_each_shard(tmp_path):
    """Every server option launch takes reaches the shards' own parser with the value given to launch."""
    given = {
        "--lr": "0.5", "--lam": "0.1", "--lam0": "3.0", "--ms-decay": "0.9", "--eps": "1e-06", "--momentum": "0.8",
        "--staleness-power": "0.25", "--clip": "2.0",
        "--sync-timeout": "9.0", "--compensation": "per-parameter", "--non-finite": "apply", "--threads": "2",
        "--log-level": "DEBUG", "--io-threads": "2", "--max-message-bytes": "8000", "--max-header-bytes": "4096",
        "--checkpoint-dir": str(tmp_path), "--checkpoint-every": "7.0", "--metrics-host": "0.0.0.0",
    }  # fmt: skip
    parser = cli.build_parser()
    a = parser.parse_args(["launch", *[x for kv in given.items() for x in kv], "--resume", "--", "true"])
    server_args = cli.launch_server_args(a)
    assert "--resume" in server_args and "--metrics-port" not in server_args  # the port is per shard
    server = parser.parse_args(["server", "--num-workers", "1", *server_args])
    for opt, value in given.items():
        assert str(getattr(server, opt[2:].replace("-", "_"))) == value, opt
    assert server.resume
    # Options not given on the command line are left out, so the server's own defaults apply.
    assert cli.launch_server_args(parser.parse_args(["launch", "--", "true"]))[-2:] == ["--metrics-host", "127.0.0.1"]
    assert "--checkpoint-dir" not in cli.launch_server_args(parser.parse_args(["launch", "--", "true"]))


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--curve-clients", "keys/clients"], "listen on this host only (ipc or 127.0.0.1) and run without CURVE"),
        (["--curve-secret-key", "shard.key_secret"], "listen on this host only (ipc or 127.0.0.1) and run without"),
        (["--exit-when-done"], "launch stops its shards itself"),
        (["--bind", "tcp://0.0.0.0:5555"], "launch binds every shard to an ipc socket in a private directory"),
        (["--shard", "1"], "--shards N sets how many"),  # not taken as an abbreviation of --shards
        (["--num-workers", "3"], "use --workers M"),
    ],
)
def test_server_options_launch_does_not_take_are_usage_errors(capsys, argv, why):
    with pytest.raises(SystemExit) as e:
        cli.main(["launch", *argv, "--", "true"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"dcasgd launch: error: {argv[0]} is not for dcasgd launch: " in err and why in err, err


def test_checkpoints_and_resume_through_launch(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    cmd = script(tmp_path, "resumable.py", RESUMABLE)
    job = ["launch", "--shards", "2", "--mode", "async", "--lr", "0.5", "--checkpoint-dir", str(ckpt)]
    assert cli.main([*job, "--", *cmd]) == 0
    first = capsys.readouterr().out
    assert "[worker0] resumed [None, None] versions [0, 0] -> [3, 3] w -1.5" in first, first
    # One directory serves both shards: each wrote its last checkpoint when launch stopped it (SIGTERM).
    assert sorted(p.name for p in ckpt.iterdir()) == ["shard0-v3.ckpt", "shard1-v3.ckpt"]

    assert cli.main([*job, "--resume", "--", *cmd]) == 0
    second = capsys.readouterr().out
    assert "[worker0] resumed [3, 3] versions [3, 3] -> [6, 6] w -3.0" in second, second
    assert sorted(p.name for p in ckpt.iterdir()) == [f"shard{s}-v{v}.ckpt" for s in (0, 1) for v in (3, 6)]
    assert_all_gone(launched_pids(first) + launched_pids(second))


def test_resume_without_a_checkpoint_names_the_shard(tmp_path, capsys):
    argv = ["launch", "--checkpoint-dir", str(tmp_path / "empty"), "--resume", "--", "true"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "dcasgd launch: shard 0 exited before reporting its endpoint (exit code 2)" in captured.err, captured
    assert "no checkpoint of shard 0" in captured.err, captured


def free_port_pair() -> int:
    """A port P such that P and P+1 were both free on 127.0.0.1 a moment ago."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two adjacent free ports on 127.0.0.1")


def test_each_shard_serves_metrics_on_its_own_port(tmp_path, capsys, monkeypatch):
    port = free_port_pair()
    monkeypatch.setenv("METRICS_PORT", str(port))  # the scraping worker reads it
    argv = ["launch", "--shards", "2", "--metrics-port", str(port), "--", *script(tmp_path, "scrape.py", SCRAPER)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for s in (0, 1):
        assert f'[worker0] http://127.0.0.1:{port + s}/metrics dcasgd_version{{shard="{s}"}} 1.0' in out, out
    assert_all_gone(launched_pids(out))


def test_metrics_port_is_per_shard_in_local_cluster():
    with pytest.raises(ValueError, match=r"must not set --metrics-port: use metrics_port= \(shard s gets"):
        LocalCluster(["true"], server_args=["--metrics-port", "9100"])
    with pytest.raises(ValueError, match="room for 2 shards"):
        LocalCluster(["true"], shards=2, metrics_port=65535)


def test_grace_is_the_time_between_sigterm_and_sigkill(tmp_path, capsys, monkeypatch):
    # Worker 0 ignores SIGTERM; worker 1 fails once it has (a FIFO's open returns when both ends are open).
    staged = """
import os, signal, sys
if os.environ["DCASGD_WORKER_ID"] == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.environ["FIFO"], "w").close()
    while True:
        signal.pause()
open(os.environ["FIFO"]).close()
sys.exit(3)
"""
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setenv("FIFO", str(tmp_path / "fifo"))
    argv = ["launch", "--workers", "2", "--grace", "0.5", "--", *script(tmp_path, "staged.py", staged)]
    assert cli.main(argv) == 3
    out = capsys.readouterr().out
    assert "[launch] worker 0 still ran 0.5 s after SIGTERM; sent SIGKILL" in out, out
    assert_all_gone(launched_pids(out))
