"""Periodic checkpoints are written in the background: the serve loop answers requests, pushes included,
while the file is written, and the file holds the state at the moment the checkpoint started (issue 12
item 10)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from dcasgd import Client, checkpoint
from dcasgd.rules import RuleConfig
from dcasgd.server import ShardServer
from dcasgd.shard import ShardConfig

N = 5_000_000  # 20 MB of weights: a copy that is not instant


class Gate:
    """Stands in for ``checkpoint._write``: tells when a write began and holds it until opened."""

    def __init__(self, write, fail: bool = False) -> None:
        self._write, self.fail = write, fail
        self.started = threading.Event()
        self.opened = threading.Event()
        self.versions: list[int] = []

    def __call__(self, cap, d, keep):
        self.versions.append(cap.version)
        self.started.set()
        assert self.opened.wait(30), "the test never opened the gate"
        if self.fail:
            raise OSError(28, "No space left on device (test)")
        return self._write(cap, d, keep)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """``served(gate)``: a dcasgd-a shard with 2 workers, served in a thread (periodic checkpoints: set
    ``checkpoint_every``)."""
    ctx = zmq.Context()
    running: list[tuple[ShardServer, threading.Thread]] = []

    def start(gate: Gate) -> ShardServer:
        monkeypatch.setattr(checkpoint, "_write", gate)
        cfg = ShardConfig(num_workers=2, rules=RuleConfig(mode="dcasgd-a", lr=0.1))
        server = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path, checkpoint_every=3600, context=ctx)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.stop()
        thread.join(30)
        server.close()
    ctx.term()


def grad(step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(step)) * 1e-3


@pytest.mark.timeout(120)
def test_the_loop_serves_while_a_checkpoint_is_written_and_the_file_is_the_state_when_it_began(served, tmp_path):
    gate = Gate(checkpoint._write)
    server = served(gate)
    c0, c1 = (Client([server.endpoint], worker_id=i, timeout=10.0) for i in range(2))
    try:
        c0.init(torch.randn(N, generator=torch.Generator().manual_seed(1)))
        c0.pull()
        held = c1.pull()  # worker 1's backup: version 0, not copied but held while the file is written
        at_start = c0.push_pull(grad(0))  # version 1
        server.checkpoint_every = 0.05  # now: one starts once the writer has its buffers
        assert gate.started.wait(30), "no checkpoint started"
        assert gate.versions == [1]
        # The write is held at the gate: the loop goes on answering, pushes included.
        assert c0.stats()[0]["checkpoint"]["writing"] == 1
        later = [c0.push_pull(grad(1 + k)) for k in range(2)]  # versions 2 and 3
        stats = c0.stats()[0]
        assert stats["version"] == 3 and stats["checkpoint"]["writing"] == 1
        assert checkpoint.checkpoints(tmp_path, 0) == [], "nothing written yet"
        gate.opened.set()
        deadline = time.monotonic() + 30
        while not checkpoint.checkpoints(tmp_path, 0):
            assert time.monotonic() < deadline, "the checkpoint was never written"
            time.sleep(0.01)
        path = checkpoint.checkpoints(tmp_path, 0)[0]
        assert path.name == "shard0-v1.ckpt" and checkpoint.job_of(path) == server.job
        state = checkpoint.read(path, server.config)
        assert state.version == 1 and state.updates == [1, 0]
        assert torch.equal(state.w, at_start), "the weights when the checkpoint began, not the pushes after it"
        assert not torch.equal(state.w, later[-1])
        assert state.backup[0].version == 1 and torch.equal(state.backup[0].tensor, at_start)
        assert state.backup[1].version == 0 and torch.equal(state.backup[1].tensor, held)
        deadline = time.monotonic() + 30
        while c0.stats()[0]["server"].get("checkpoints", 0) < 1:  # the loop collects how it went
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        gate.opened.set()
        c0.close()
        c1.close()


@pytest.mark.timeout(120)
def test_a_failed_background_write_is_counted_and_the_loop_goes_on(served, tmp_path, caplog):
    gate = Gate(checkpoint._write, fail=True)
    server = served(gate)
    c0 = Client([server.endpoint], worker_id=0, timeout=10.0)
    try:
        c0.init(torch.zeros(N))
        c0.pull()
        c0.push_pull(grad(0))
        server.checkpoint_every = 0.05
        assert gate.started.wait(30)
        gate.opened.set()
        deadline = time.monotonic() + 30
        while c0.stats()[0]["server"].get("checkpoint_failures", 0) < 1:
            assert time.monotonic() < deadline, "the failure was not counted"
            time.sleep(0.01)
        c0.push_pull(grad(1))
        assert c0.stats()[0]["version"] == 2
        assert "periodic checkpoint at v1 failed: [Errno 28] No space left on device (test)" in caplog.text
    finally:
        c0.close()
