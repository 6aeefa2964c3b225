"""``dcasgd worker -- COMMAND``: signals reach the command, its end reaches the shards, nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import assert_all_gone

from dcasgd.client import fetch_stats

# Prints its pid, then waits for a signal (SIGTERM's default action ends it: status 128 + 15).
WAITER = "import os, signal; print(os.getpid(), flush=True); signal.pause()"


def _worker(endpoints: list[str], *command: str, **env: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DCASGD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "dcasgd", "worker", "--", *command],
        env={**base, "DCASGD_SERVERS": ",".join(endpoints), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="checks that the command is gone with pidfd_open (Linux)")
@pytest.mark.timeout(60)
def test_sigterm_reaches_the_command_and_its_status_reaches_the_shards(cluster_factory):
    with cluster_factory(2, 2, "async") as cluster:
        proc = _worker(cluster.endpoints, sys.executable, "-c", WAITER, DCASGD_WORKER_NAME="host-a")
        child = int(proc.stdout.readline())  # the command runs: its id was claimed
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert_all_gone([child])
        assert "worker id 0 (claimed as 'host-a')" in err
        assert "exited with status 143; reported to 2 shards (1 of 2 finished)" in err
        for ep in cluster.endpoints:
            assert fetch_stats(ep)["finished"] == [[0, 143]]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="PR_SET_PDEATHSIG and pidfd_open (Linux)")
@pytest.mark.timeout(60)
def test_a_killed_wrapper_takes_its_command_along(cluster_factory):
    with cluster_factory(1, 1, "async") as cluster:
        proc = _worker(cluster.endpoints, sys.executable, "-c", WAITER, DCASGD_WORKER_ID="0")
        child = int(proc.stdout.readline())
        proc.kill()
        proc.communicate(timeout=30)
        assert_all_gone([child])


@pytest.mark.timeout(60)
def test_errors_are_named(cluster_factory):
    """No servers, a command that cannot start, and an id the environment sets out of range."""
    out = subprocess.run(
        [sys.executable, "-m", "dcasgd", "worker", "--", "true"],
        env={k: v for k, v in os.environ.items() if not k.startswith("DCASGD_")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "no servers: set DCASGD_SERVERS to the shards' endpoints" in out.stderr, out
    assert "servers=[" not in out.stderr, "a shell user is not told about a Python argument"
    with cluster_factory(1, 2, "async") as cluster:
        proc = _worker(cluster.endpoints, "/nonexistent/train", DCASGD_WORKER_ID="1")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 127 and "cannot start '/nonexistent/train'" in err, err
        assert fetch_stats(cluster.endpoints[0])["finished"] == [[1, 127]]  # its end is still reported

        proc = _worker(cluster.endpoints, "echo", "ran", DCASGD_WORKER_ID="5")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2 and out == "", (out, err)  # refused before the command runs
        assert "worker id 5 (from DCASGD_WORKER_ID) is not in [0, 2)" in err, err
        proc = _worker(cluster.endpoints, "true", DCASGD_NUM_WORKERS="3", DCASGD_WORKER_NAME="h")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2 and "DCASGD_NUM_WORKERS=3, but the shards run a job of 2 workers" in err, err
