"""Checkpoints carry a job id: a shard never reads or prunes another job's files, and a new job refuses a
directory that holds another job's checkpoints (issue 12 item 6)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import zmq
from conftest import ShardDriver
from test_checkpoint import assert_same, config, g, trained

from dcasgd import checkpoint
from dcasgd.checkpoint import CheckpointError
from dcasgd.server import ShardServer


def files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def advance(state, step: int) -> None:
    ShardDriver(state).call("push", 1, g(1, 500 + step), seq=state.last_seq[1] + 1)


@pytest.mark.timeout(30)
def test_pruning_keeps_the_files_of_other_jobs(tmp_path):
    other = trained(config())
    for step in range(10):  # an earlier job, and a file from before job ids, at higher versions
        advance(other, step)
    checkpoint.save(other, tmp_path, job="earlier")
    advance(other, 1)
    checkpoint.save(other, tmp_path)  # no job id
    theirs = files(tmp_path)

    mine = trained(config())
    for step in range(5):
        advance(mine, step)
        checkpoint.save(mine, tmp_path, job="mine")
    kept = [p for p in checkpoint.checkpoints(tmp_path, 0) if p.name not in theirs]
    assert [p.name for p in kept] == [f"shard0-v{mine.version - k}.ckpt" for k in (2, 1, 0)]
    assert {n: b for n, b in files(tmp_path).items() if n in theirs} == theirs, "other jobs' files untouched"
    assert {checkpoint.job_of(p) for p in kept} == {"mine"}
    assert checkpoint.by_job(tmp_path, 0).keys() == {"earlier", None, "mine"}


@pytest.mark.timeout(30)
def test_a_file_of_another_job_under_the_same_name_is_not_overwritten(tmp_path):
    a = trained(config())
    path = checkpoint.save(a, tmp_path, job="theirs")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not a checkpoint of job mine"):
        checkpoint.save(a, tmp_path, job="mine")
    assert path.read_bytes() == before and files(tmp_path) == {path.name: before}


@pytest.mark.timeout(30)
def test_resume_reads_its_own_job_and_refuses_a_directory_of_two(tmp_path, caplog):
    cfg = config()
    mine = trained(cfg)
    checkpoint.save(mine, tmp_path, job="mine")
    legacy = trained(cfg)
    for step in range(3):
        advance(legacy, step)
    checkpoint.save(legacy, tmp_path)  # from before job ids, at a higher version
    with caplog.at_level(logging.WARNING, "dcasgd.checkpoint"):
        state, job = checkpoint.resume(tmp_path, cfg)
    assert job == "mine" and state.version == mine.version < legacy.version
    assert_same(state, mine)
    assert "files from before job ids are left alone" in caplog.text

    other = trained(cfg)
    advance(other, 9)
    checkpoint.save(other, tmp_path, job="other")
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match="of 2 jobs") as err:
        checkpoint.resume(tmp_path, cfg)
    for part in ("job mine: shard0-v", "job other: shard0-v", "files from before job ids", "move the files"):
        assert part in str(err.value), err.value
    assert files(tmp_path) == before


@pytest.mark.timeout(30)
def test_only_files_from_before_job_ids_are_resumed_as_a_new_job_id(tmp_path, caplog):
    cfg = config()
    a = trained(cfg)
    legacy = checkpoint.save(a, tmp_path)
    ctx = zmq.Context()
    try:
        with caplog.at_level(logging.WARNING, "dcasgd.server"):
            server = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path, resume=True, context=ctx)
        try:
            assert "from before job ids; continuing it as job " + server.job in caplog.text
            assert server.resumed_from_version == a.version and len(server.job) == 16
            for step in range(4):  # its own checkpoints: pruned among themselves, the old file stays
                advance(server.shard, step)
                server._checkpoint("test")
        finally:
            server.close()
        assert legacy.exists()
        assert {p.name: checkpoint.job_of(p) for p in checkpoint.checkpoints(tmp_path, 0)} == {
            legacy.name: None,
            **{f"shard0-v{a.version + k}.ckpt": server.job for k in (2, 3, 4)},
        }
        again = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path, resume=True, context=ctx)
        try:
            assert again.job == server.job and again.shard.version == a.version + 4
        finally:
            again.close()
    finally:
        ctx.term()


def run_server(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", "tcp://127.0.0.1:0", "--num-workers", "3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ})


@pytest.mark.timeout(60)
def test_a_new_job_refuses_a_directory_with_another_jobs_checkpoint(tmp_path):
    a = trained(config())
    for step in range(3):
        advance(a, step)
    path = checkpoint.save(a, tmp_path, job="earlier")
    path = path.rename(tmp_path / "shard0-v1000.ckpt")  # the case: a high version of an earlier job
    before = files(tmp_path)
    r = run_server("--checkpoint-dir", str(tmp_path), "--checkpoint-every", "0.1")
    assert r.returncode == 2, r
    assert f"{tmp_path} already holds checkpoints of shard 0 of another job (job earlier: shard0-v1000.ckpt)" in (
        r.stderr
    )
    assert "start with --resume to continue that job, or give another (or an empty) --checkpoint-dir" in r.stderr
    assert files(tmp_path) == before


@pytest.mark.timeout(60)
def test_job_id_is_in_hello_stats_and_every_checkpoint_and_survives_a_resume(tmp_path):
    cfg = config()
    ctx = zmq.Context()
    try:
        server = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path, context=ctx)
        try:
            job = server.job
            assert server.stats()["job"] == job and server._restart_info()["job"] == job
            server.shard = trained(cfg)
            server._checkpoint("test")
        finally:
            server.close()
        other = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path / "other", context=ctx)
        assert other.job != job, "each fresh start makes its own"
        other.close()
        resumed = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=tmp_path, resume=True, context=ctx)
        try:
            assert resumed.job == job and resumed.stats()["job"] == job
            advance(resumed.shard, 0)
            resumed._checkpoint("test")
        finally:
            resumed.close()
        assert [checkpoint.job_of(p) for p in checkpoint.checkpoints(tmp_path, 0)] == [job, job]
    finally:
        ctx.term()
