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


@pytest.mark.timeout(90)
def test_a_large_weights_reply_comes_in_frames_of_at_most_reply_frame_bytes(cluster_factory, raw_peer):
    # One 40 MB frame is a fresh mmap in the worker's receiving thread, its pages faulted in on every
    # reply; frames under glibc's 32 MiB ceiling come from reused heap memory. The client reassembles them.
    from dcasgd import protocol
    from dcasgd.client import fetch_weights

    n = (5 * protocol.REPLY_FRAME_BYTES) // 8 + 3  # 2.5 frames' worth of float32, and a ragged end
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    with cluster_factory(1, 2, "async") as cl:
        with Client(cl.endpoints, 0, timeout=20.0) as c:
            c.init(w0)
            torch.testing.assert_close(c.pull(), w0, rtol=0, atol=0)
            g = torch.randn(n, generator=torch.Generator().manual_seed(1))
            w1 = c.push_pull(g, lr=0.5)
            torch.testing.assert_close(w1, w0 - 0.5 * g, rtol=0, atol=0)
            peer = raw_peer(cl.endpoints[0])
            head = {"v": protocol.PROTOCOL_VERSION, "op": "pull", "rid": 1, "worker": 1, "fp": c.fingerprint}
            reply, frames = peer.request(head)
            assert reply["ok"]
            assert [len(f) for f in frames] == [protocol.REPLY_FRAME_BYTES] * 2 + [
                4 * n - 2 * protocol.REPLY_FRAME_BYTES
            ]
            assert b"".join(frames) == w1.numpy().tobytes()
            _, observed = fetch_weights(cl.endpoints[0])
            torch.testing.assert_close(observed, w1, rtol=0, atol=0)
