"""A shard restarted from its checkpoint compensates against the backup the checkpoint recorded,
and workers with overlapped steps ride through restarts and repeated answers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ShardDriver, _read_endpoint, stop_process

import dcasgd
from dcasgd import Client
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

N = 5_003
LR, LAM = 0.1, 1.0


class Shard:
    """One `dcasgd server` process with checkpoints, restartable at the same endpoint."""

    def __init__(self, tmp: Path, mode: str, workers: int) -> None:
        self.tmp, self.mode, self.workers = tmp, mode, workers
        self.proc: subprocess.Popen | None = None

    def start(self, bind: str = "tcp://127.0.0.1:0", *extra: str) -> str:
        log = self.tmp / f"shard-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", bind, "--num-workers", str(self.workers),
               "--mode", self.mode, "--lam", str(LAM), "--checkpoint-dir", str(self.tmp / "ckpt"), *extra]  # fmt: skip
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        return _read_endpoint(self.proc, log)

    def restart(self, endpoint: str) -> None:
        """SIGTERM (a last checkpoint is written), then start again with --resume at the same endpoint."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0
        self.start(endpoint, "--resume")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def shard_process(tmp_path):
    shards: list[Shard] = []

    def make(mode: str, workers: int) -> Shard:
        shards.append(Shard(tmp_path, mode, workers))
        return shards[-1]

    yield make
    for s in shards:
        s.stop()


@pytest.mark.timeout(90)
def test_after_a_restart_the_backup_is_what_the_checkpoint_recorded(shard_process):
    # A holds version 0; B pushes 5 times; the shard restarts from its checkpoint. A's next push is
    # 5 versions stale and compensated against version 0, the weights A holds: not against
    # weights a recovery pull would have moved its backup to.
    shard = shard_process("dcasgd", 2)
    ep = shard.start()
    a, b = Client([ep], 0, timeout=10.0), Client([ep], 1, timeout=10.0)
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(1))
    a.init(w0)
    held_a, held_b = a.pull(), b.pull()
    w = w0.double()
    for step in range(5):
        g = torch.randn(N, generator=torch.Generator().manual_seed(10 + step))
        w = w - LR * (g.double() + LAM * g.double() ** 2 * (w - held_b.double()))
        held_b = b.push_pull(g, lr=LR)
    shard.restart(ep)
    g = torch.randn(N, generator=torch.Generator().manual_seed(99))
    w = w - LR * (g.double() + LAM * g.double() ** 2 * (w - held_a.double()))
    got = a.push_pull(g, lr=LR)  # refused as `restarted`, then sent again with the same seq and base
    torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-5)
    stats = a.stats()[0]
    assert stats["resumed_from_version"] == 5 and stats["version"] == 6
    assert dict(stats["staleness"])[5] == 1, stats["staleness"]
    a.close()
    b.close()


@pytest.mark.timeout(120)
def test_an_overlapped_worker_rides_through_a_shard_restart(shard_process):
    shard = shard_process("dcasgd-a", 1)
    ep = shard.start()
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    y = x @ torch.randn(20, 3)
    model = torch.nn.Linear(20, 3)
    opt = dcasgd.DistributedOptimizer(model.parameters(), lr=0.05, servers=[ep], worker_id=0, num_workers=1,
                                      overlap=True)  # fmt: skip
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        if step in (10, 20):
            shard.restart(ep)  # with a push in flight or about to be
    opt.close()
    assert losses[-1] < 0.5 * losses[0], losses
    with Client([ep], 0, timeout=10.0) as c:
        stats = c.stats()[0]
    assert stats["version"] >= 28, stats["version"]  # at most one gradient per restart dropped
    assert stats["updates"][0] <= stats["last_seq"][0]


def test_a_repeated_answer_keeps_the_weights_an_overlapped_worker_computes_on():
    # Push 1 (computed on version 0) is applied, its answer is lost and no longer remembered
    # (hello), the push is sent again: the repeated answer replaces the lost one, and version 0,
    # which the worker still computes on, stays kept for its next push.
    state = ShardState(ShardConfig(num_workers=2, rules=RuleConfig(mode="dcasgd-a")))
    shard = ShardDriver(state)
    shard.call("init", 0, torch.zeros(8), n=8, lo=0, hi=8)
    shard.call("pull", 0)
    shard.call("pull", 1)
    shard.call("push_pull", 0, torch.ones(8), seq=1, base=0, keep=2)
    shard.call("push", 1, torch.ones(8), seq=1)  # another worker moves the shard on
    state.hello(0)
    (again,) = shard.call("push_pull", 0, torch.ones(8), seq=1, base=0, keep=2)
    assert again.fields["duplicate"] and again.fields["version"] == 2
    assert (state.received_version[0], state.previous_version[0]) == (2, 0)
    (nxt,) = shard.call("push_pull", 0, torch.ones(8), seq=2, base=0, keep=2)
    assert nxt.fields["staleness"] == 2


@pytest.mark.timeout(120)
def test_a_base_from_before_a_crash_is_not_compensated_against_reused_version_numbers(shard_process, tmp_path):
    # A crash loses what came after the last checkpoint; the resumed shard numbers new weights from
    # the checkpoint's version on. A gradient computed on weights of the lost timeline names a
    # version that now means other weights: the client drops it and pulls, never pushes it.
    shard = shard_process("dcasgd", 2)
    ep = shard.start()
    a, b = Client([ep], 0, timeout=10.0), Client([ep], 1, timeout=10.0)
    a.init(torch.randn(N, generator=torch.Generator().manual_seed(1)))
    a.pull(keep=2)
    b.pull()
    shard.restart(ep)  # a checkpoint at version 0 (on SIGTERM)
    kept = tmp_path / "ckpt-v0"
    shutil.copytree(tmp_path / "ckpt", kept)
    g = torch.ones(N)
    a.push_pull(g, lr=LR, base=a.versions, keep=2)  # a now holds version 1 of this timeline
    lost = (a.versions, a.received_from)
    shard.proc.kill()  # a crash: version 1 was never checkpointed
    shard.proc.wait(10)
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(kept, tmp_path / "ckpt")
    shard.start(ep, "--resume")  # back at version 0
    b.push(torch.full((N,), -1.0), lr=LR)  # version 1 again, other weights
    a.pull(keep=2)  # an overlapped worker's reply in flight: the new version 1, while it computes on the old
    assert a.versions == lost[0] and a.received_from != lost[1]
    fresh = a.push_pull(g, lr=LR, base=lost[0], base_from=lost[1], keep=2)  # computed on the lost version 1
    stats = a.stats()[0]
    assert stats["version"] == 1 and stats["updates"][0] == 0, "the gradient was applied against other weights"
    torch.testing.assert_close(fresh, b.pull(), rtol=0, atol=0)  # it got the shard's weights instead
    a.close()
    b.close()
