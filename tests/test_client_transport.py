"""The client's connection handling: one request per call, settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dcasgd import Client
from dcasgd.env import JobConfigError

N = 1_000


@pytest.mark.timeout(60)
def test_each_call_sends_one_request(cluster_factory):
    # The connection monitor used to take the first connect for a reconnection and send the
    # first request (hello) twice; only a real reconnection may resend. (A limit given: the shards do
    # not bind again at the first init, which is a real reconnection.)
    with cluster_factory(2, 1, "async", "--max-message-bytes", str(1 << 20)) as cl:
        with Client(cl.endpoints, 0, timeout=10.0) as c:
            c.init(torch.zeros(N))
            c.pull()
            for _ in range(3):
                c.push_pull(torch.ones(N), lr=0.1)
            # hello, init, pull, 3 x push_pull, and the stats request itself, on every shard
            assert [s["server"]["messages"] for s in c.stats()] == [7, 7]
            assert [s["version"] for s in c.stats()] == [3, 3]


@pytest.mark.timeout(60)
def test_servers_and_worker_id_from_the_environment(cluster_factory, monkeypatch):
    for name in ("DCASGD_WORKER_ID", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with cluster_factory(2, 2, "async") as cl:
        monkeypatch.setenv("DCASGD_SERVERS", ",".join(cl.endpoints))
        with Client(worker_id=1, timeout=10.0) as c:
            assert c.servers == cl.endpoints and c.worker_id == 1
        with pytest.raises(JobConfigError, match="DCASGD_WORKER_ID, RANK, SLURM_PROCID"):
            Client()
        monkeypatch.setenv("RANK", "1")
        with Client(timeout=10.0) as c:
            assert c.worker_id == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setting, tuned", [(None, False), ("1", True), ("0", False)])
def test_a_client_changes_malloc_only_when_asked(cluster_factory, setting, tuned):
    with cluster_factory(1, 1, "async") as cl:
        env = {k: v for k, v in os.environ.items() if k != "DCASGD_MALLOC_TUNING"}
        if setting is not None:
            env["DCASGD_MALLOC_TUNING"] = setting
        code = f"import dcasgd, dcasgd.memory as m; dcasgd.Client({cl.endpoints!r}, 0).close(); print(m._done)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(tuned)
