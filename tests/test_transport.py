"""Same-host transport: shards and workers over ipc:// sockets, and ZeroMQ I/O threads."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import stop_process

from dcasgd import Client
from dcasgd.env import IPC_PATH_MAX, JobConfigError

N = 10_007


def script(endpoints: list[str], **kw) -> torch.Tensor:
    """A fixed run of one worker: init, then push_pull steps whose gradients depend on the weights."""
    with Client(endpoints, worker_id=0, timeout=20.0, **kw) as c:
        w = torch.randn(N, generator=torch.Generator().manual_seed(7))
        c.init(w)
        w = c.pull()
        for step in range(5):
            g = 0.5 * w + torch.randn(N, generator=torch.Generator().manual_seed(step))
            w = c.push_pull(g, lr=0.05)
        return w


def server(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcasgd", "server", "--num-workers", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_ipc_cluster_trains_bit_for_bit_like_tcp_and_leaves_no_socket_file(cluster_factory, monkeypatch):
    with cluster_factory(2, 1, "dcasgd-a") as tcp:
        expected = script(tcp.endpoints)
    with cluster_factory(2, 1, "dcasgd-a", "--io-threads", "2", transport="ipc") as ipc:
        assert ipc.endpoints == [f"ipc://{ipc.ipc_dir}/shard0", f"ipc://{ipc.ipc_dir}/shard1"]
        files = [ipc.ipc_dir / "shard0", ipc.ipc_dir / "shard1"]
        assert all(stat.S_ISSOCK(f.stat().st_mode) for f in files)
        monkeypatch.setenv("DCASGD_SERVERS", ",".join(ipc.endpoints))  # as a launcher passes them
        got = script(None, io_threads=1)
        assert torch.equal(got, expected)
        for p in ipc.procs:
            assert stop_process(p) == 0
        # ZeroMQ leaves the socket file of a bound path behind; the shard removes it when it stops.
        assert not any(f.exists() for f in files)


@pytest.mark.timeout(60)
def test_ipc_path_that_another_shard_listens_on_is_refused_and_a_stale_one_reused(cluster_factory):
    with cluster_factory(1, 1, "async", transport="ipc") as cl:
        done = server("--bind", cl.endpoints[0])
        assert done.returncode == 2, done.stderr
        assert "another process is listening on" in done.stderr and "Traceback" not in done.stderr
        # A shard killed without a chance to clean up leaves its file; the next one takes the path.
        os.kill(cl.procs[0].pid, signal.SIGKILL)
        cl.procs[0].wait(10)
        assert Path(cl.endpoints[0][len("ipc://") :]).exists()
        p = subprocess.Popen(
            [sys.executable, "-m", "dcasgd", "server", "--num-workers", "1", "--bind", cl.endpoints[0]],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout.readline().strip().endswith(f"listening on {cl.endpoints[0]}")
            with Client(cl.endpoints, worker_id=0, timeout=20.0) as c:
                assert c.hello()[0]["num_workers"] == 1
        finally:
            assert stop_process(p) == 0
        not_a_socket = cl.ipc_dir / "plain-file"
        not_a_socket.write_text("mine")
        done = server("--bind", f"ipc://{not_a_socket}")
        assert done.returncode == 2 and "is not a socket" in done.stderr
        assert not_a_socket.read_text() == "mine"  # ZeroMQ would have unlinked it


@pytest.mark.timeout(60)
def test_ipc_path_too_long_or_wildcard_is_a_clear_error():
    with tempfile.TemporaryDirectory(prefix="dcasgd-") as d:
        endpoint = "ipc://" + os.path.join(d, "x" * (IPC_PATH_MAX + 1 - len(d) - 1))
        assert len(endpoint) - len("ipc://") == IPC_PATH_MAX + 1
        done = server("--bind", endpoint)
        assert done.returncode == 2
        assert f"at most {IPC_PATH_MAX} bytes" in done.stderr and "Traceback" not in done.stderr
        with pytest.raises(JobConfigError, match=f"at most {IPC_PATH_MAX} bytes"):
            Client([endpoint], worker_id=0)
    done = server("--bind", "ipc://*")  # libzmq would make a directory relative to the current one
    assert done.returncode == 2 and "give the socket a path" in done.stderr


@pytest.mark.timeout(60)
def test_io_threads_must_be_positive():
    done = server("--io-threads", "0")
    assert done.returncode == 2 and "--io-threads must be >= 1" in done.stderr
    with pytest.raises(ValueError, match="io_threads"):
        Client(["tcp://127.0.0.1:9"], worker_id=0, io_threads=0)
