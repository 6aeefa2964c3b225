"""Shard checkpoints: the file round trip on ShardState, refusals, and real servers that write and resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ShardDriver, stop_process
from torch import Tensor

from dcasgd import Client, checkpoint
from dcasgd.checkpoint import CheckpointError
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

FP = "test-layout"
N = 1_003


def config(mode: str = "dcasgd-a", m: int = 3, momentum: float = 0.9, **kw) -> ShardConfig:
    return ShardConfig(num_workers=m, rules=RuleConfig(mode=mode, lr=0.1, momentum=momentum), **kw)


def g(worker: int, step: int) -> Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 * worker + step))


def trained(cfg: ShardConfig) -> ShardState:
    """A shard after interleaved pulls, push_pulls and plain pushes from its workers."""
    d = ShardDriver(ShardState(cfg))
    d.call("init", 0, torch.randn(N, generator=torch.Generator().manual_seed(1)), n=N, lo=0, hi=N)
    m = cfg.num_workers
    for w in range(m):
        d.call("pull", w)
    seq = [0] * m
    for step in range(4):
        for w in range(m):
            seq[w] += 1
            op = "push" if (w == 2 and step % 2) else "push_pull"  # worker 2 keeps an older backup now and then
            d.call(op, w, g(w, step), seq=seq[w])
    d.call("pull", 0)
    d.call("pull", 1)  # workers 0 and 1 now share one snapshot
    return d.state


def assert_same(a: ShardState, b: ShardState) -> None:
    assert (a.version, a.last_seq, a.updates) == (b.version, b.last_seq, b.updates)
    assert (a.received_version, a.staleness, a.duplicates) == (b.received_version, b.staleness, b.duplicates)
    assert (a.fp, a.n, a.lo, a.hi) == (b.fp, b.n, b.lo, b.hi)
    assert torch.equal(a.w, b.w)
    for x, y in ((a._ms, b._ms), (a._momentum, b._momentum), (a._w_prev, b._w_prev)):
        assert (x is None) == (y is None)
        assert x is None or torch.equal(x, y)
    for wa, wb in zip(a.backup, b.backup, strict=True):
        assert (wa is None) == (wb is None)
        assert wa is None or (wa.version == wb.version and torch.equal(wa.tensor, wb.tensor))


@pytest.mark.timeout(30)
def test_round_trip_then_the_next_push_is_bitwise_the_same(tmp_path):
    cfg = config()
    a = trained(cfg)
    path = checkpoint.save(a, tmp_path)
    assert path.name == f"shard0-v{a.version}.ckpt"
    b = checkpoint.load(tmp_path, cfg)
    assert_same(a, b)
    assert b.backup[0] is b.backup[1], "a snapshot shared by two workers is stored once and shared again"
    assert b.backup[2].version < b.version
    assert b.backup[2].tensor is not b.w and b.backup[0].tensor is not b.w
    for state in (a, b):  # the same next steps on both
        d = ShardDriver(state)
        d.call("push_pull", 2, g(2, 99), seq=state.last_seq[2] + 1)
        d.call("push", 0, g(0, 99), seq=state.last_seq[0] + 1)
    assert_same(a, b)


@pytest.mark.timeout(30)
def test_round_trip_per_parameter_and_async(tmp_path):
    for cfg in (config("dcasgd", compensation="per-parameter"), config("async", momentum=0.0)):
        a = trained(cfg)
        b = checkpoint.read(checkpoint.save(a, tmp_path / cfg.rules.mode), cfg)
        assert_same(a, b)


@pytest.mark.timeout(30)
def test_sync_round_in_progress_is_rolled_back_so_its_retry_applies(tmp_path):
    cfg = config("sync", m=2, momentum=0.0)
    d = ShardDriver(ShardState(cfg))
    d.call("init", 0, torch.zeros(N), n=N, lo=0, hi=N)
    d.call("pull", 0)
    d.call("pull", 1)
    assert d.call("push", 0, g(0, 0), seq=1) == []  # waits for worker 1
    b = ShardDriver(checkpoint.read(checkpoint.save(d.state, tmp_path), cfg))
    assert b.state.last_seq == [0, 0] and b.state.updates == [0, 0] and b.state.version == 0
    assert b.call("push", 0, g(0, 0), seq=1) == [], "the retried push joins the round again"
    replies = b.call("push", 1, g(1, 0), seq=1)
    assert len(replies) == 2 and b.state.version == 1


@pytest.mark.timeout(30)
def test_leftover_tmp_is_ignored_and_old_files_are_pruned(tmp_path):
    cfg = config()
    a = trained(cfg)
    (tmp_path / "shard0-v999.ckpt.tmp").write_bytes(b"half a file")
    first = checkpoint.save(a, tmp_path)
    assert not (tmp_path / "shard0-v999.ckpt.tmp").exists(), "a crash's leftover .tmp is cleaned up"
    (tmp_path / "shard0-v999.ckpt.tmp").write_bytes(b"half a file")
    assert checkpoint.newest(tmp_path, 0) == first
    assert_same(a, checkpoint.load(tmp_path, cfg))
    d = ShardDriver(a)
    for i in range(4):
        d.call("push", 1, g(1, 50 + i), seq=a.last_seq[1] + 1)
        checkpoint.save(a, tmp_path)
    names = [p.name for p in checkpoint.checkpoints(tmp_path, 0)]
    assert names == [f"shard0-v{a.version - k}.ckpt" for k in (2, 1, 0)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_file_is_refused_naming_the_older_one(tmp_path, damage):
    cfg = config()
    a = trained(cfg)
    older = checkpoint.save(a, tmp_path)
    ShardDriver(a).call("push", 0, g(0, 77), seq=a.last_seq[0] + 1)
    path = checkpoint.save(a, tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch") as err:
        checkpoint.load(tmp_path, cfg)
    assert path.name in str(err.value) and older.name in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a dcasgd checkpoint"):
        checkpoint.read(path, cfg)


@pytest.mark.timeout(30)
def test_checkpoint_of_another_job_is_refused(tmp_path):
    path = checkpoint.save(trained(config()), tmp_path)
    with pytest.raises(CheckpointError, match="shard 0, this server has shard 1"):
        checkpoint.read(path, ShardConfig(shard=1, num_shards=2, num_workers=3, rules=config().rules))
    with pytest.raises(CheckpointError, match="mode dcasgd-a, this server has mode dcasgd$"):
        checkpoint.read(path, config("dcasgd"))
    with pytest.raises(CheckpointError, match="num_workers 3, this server has num_workers 4"):
        checkpoint.read(path, config(m=4))
    with pytest.raises(CheckpointError, match="layout fingerprint test-layout, expected other"):
        checkpoint.read(path, config(), fingerprint="other")
    with pytest.raises(CheckpointError, match="no checkpoint of shard 1"):
        checkpoint.load(tmp_path, ShardConfig(shard=1, num_shards=2, num_workers=3))
    checkpoint.read(path, config(momentum=0.5))  # other hyperparameters: used, with a warning


# --- real servers -------------------------------------------------------------------------------


def wait_for_checkpoint(d: Path, client: Client, deadline_s: float = 20.0) -> Path:
    """Push until the server has written a checkpoint to ``d``."""
    deadline = time.monotonic() + deadline_s
    step = 0
    while (found := checkpoint.newest(d, 0)) is None:
        assert time.monotonic() < deadline, f"no checkpoint in {d} after {deadline_s} s of pushes"
        client.push_pull(g(client.worker_id, step) * 0.01, lr=0.1)
        step += 1
    return found


@pytest.mark.timeout(60)
def test_server_checkpoints_stops_with_a_final_one_and_resumes(cluster_factory, tmp_path):
    d = tmp_path / "ckpt"
    opts = ("--checkpoint-dir", str(d), "--momentum", "0.5")
    with cluster_factory(1, 2, "dcasgd-a", *opts, "--checkpoint-every", "0.2") as cl:
        c0, c1 = (Client(cl.endpoints, worker_id=i, timeout=20.0) for i in range(2))
        assert c0.shard_info[0]["resumed_from_version"] is None
        instance, job = c0.shard_info[0]["instance"], c0.shard_info[0]["job"]
        c0.init(torch.randn(N, generator=torch.Generator().manual_seed(3)))
        c0.pull()
        c1.pull()
        wait_for_checkpoint(d, c0)
        for step in range(3):
            c1.push_pull(g(1, step) * 0.01)
        c0.push(g(0, 1000) * 0.01)
        weights = c0.pull()
        stats = c0.stats()[0]
        c0.close()
        c1.close()
        assert stop_process(cl.procs[0]) == 0
        final = checkpoint.newest(d, 0)
        assert final.name == f"shard0-v{stats['version']}.ckpt"
        assert "on stop checkpoint at version" in cl.log(0)
        assert "periodic checkpoint at version" in cl.log(0)
        assert {checkpoint.job_of(p) for p in checkpoint.checkpoints(d, 0)} == {job}

    with cluster_factory(1, 2, "dcasgd-a", *opts, "--resume") as cl:
        c0 = Client(cl.endpoints, worker_id=0, timeout=20.0)
        info = c0.shard_info[0]
        assert info["resumed_from_version"] == stats["version"] and info["instance"] != instance
        assert info["job"] == job and c0.stats()[0]["job"] == job, "a resume continues the job"
        assert info["version"] == stats["version"] and info["initialized"]
        assert torch.equal(c0.pull(), weights)
        again = c0.stats()[0]
        assert again["last_seq"] == stats["last_seq"] and again["updates"] == stats["updates"]
        assert again["staleness"] == stats["staleness"]
        c0._seq = stats["last_seq"][0] - 1  # resend the last push: a duplicate, not applied again
        (reply,) = c0.push(g(0, 1000) * 0.01)
        assert reply["duplicate"] and c0.stats()[0]["version"] == stats["version"]
        c0.push(g(0, 1001) * 0.01)
        assert c0.stats()[0]["version"] == stats["version"] + 1
        c0.close()


def run_server(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", "tcp://127.0.0.1:0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ})


@pytest.mark.timeout(60)
def test_server_refuses_to_resume_without_a_matching_checkpoint(tmp_path):
    r = run_server("--num-workers", "3", "--checkpoint-dir", str(tmp_path), "--resume")
    assert r.returncode == 2 and "no checkpoint of shard 0" in r.stderr, r.stderr
    checkpoint.save(trained(config()), tmp_path)
    r = run_server("--num-workers", "3", "--mode", "dcasgd", "--checkpoint-dir", str(tmp_path), "--resume")
    assert r.returncode == 2 and "mode dcasgd-a, this server has mode dcasgd" in r.stderr, r.stderr
    r = run_server("--num-workers", "3", "--resume")
    assert r.returncode == 2 and "need --checkpoint-dir" in r.stderr, r.stderr
