"""What a shell user sees when something goes wrong: one line that says what, no traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dcasgd import Client
from dcasgd.client import ShardTimeout, fetch_stats


def _dcasgd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCASGD_")}
    return subprocess.run([sys.executable, "-m", "dcasgd", *args], env=env, text=True, timeout=60, **kwargs)


@pytest.mark.timeout(60)
def test_a_bind_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _dcasgd("server", "--bind", f"tcp://127.0.0.1:{port}", "--num-workers", "1", capture_output=True)
    assert out.returncode == 2, out
    assert out.stderr == f"dcasgd server: cannot bind tcp://127.0.0.1:{port}: Address already in use\n", out.stderr
    assert out.stdout == ""


@pytest.mark.timeout(60)
def test_status_into_a_closed_pipe_ends_quietly(cluster_factory):
    """``dcasgd status EP | head -1``: the reader is gone before the table is written."""
    with cluster_factory(1, 1, "async") as cl:
        read, write = os.pipe()
        os.close(read)  # closed before the command writes: every write fails with EPIPE, deterministically
        try:
            out = _dcasgd("status", cl.endpoints[0], stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
    assert out.returncode == 128 + signal.SIGPIPE, out
    assert out.stderr == "", out.stderr


@pytest.mark.timeout(60)
def test_a_message_over_max_message_bytes_is_logged_and_counted(cluster_factory):
    limit = 4096
    with cluster_factory(1, 1, "async", "--max-message-bytes", str(limit)) as cl:
        with Client(cl.endpoints, worker_id=0, timeout=1.0, retries=0) as client:
            with pytest.raises(ShardTimeout):  # ZeroMQ drops the frame and the connection: no answer comes
                client.init(torch.zeros(4 * limit))
        deadline = time.monotonic() + 20.0
        while fetch_stats(cl.endpoints[0])["server"].get("disconnects", 0) == 0:
            assert time.monotonic() < deadline, "the shard did not count the dropped connection"
        log = cl.log(0)
        assert f"over --max-message-bytes {limit}" in log and "start the shards with --max-message-bytes" in log, log
