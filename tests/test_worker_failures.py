"""Workers that die or restart: nobody waits for a dead worker, a restarted one continues its seq."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from conftest import in_parallel

from dcasgd import Client


@pytest.mark.timeout(60)
def test_a_restarted_worker_continues_its_sequence_numbers(cluster_factory):
    with cluster_factory(2, 2, "dcasgd-a") as cl:
        first = Client(cl.endpoints, worker_id=1)
        first.init(torch.zeros(100))
        w = first.pull()
        for _ in range(3):
            w = first.push_pull(torch.full((100,), 0.01), lr=0.1, out=w)
        first.close()  # the worker "dies"
        again = Client(cl.endpoints, worker_id=1)  # same id, new process state
        again.pull()
        again.push_pull(torch.full((100,), 0.01), lr=0.1)
        for shard in again.stats():
            assert shard["last_seq"][1] == 4 and shard["updates"][1] == 4
            assert shard["duplicates"] == 0, "a new push of the restarted worker was taken for a retry"
        again.close()


@pytest.mark.timeout(60)
def test_in_async_modes_a_dead_worker_blocks_nobody(cluster_factory):
    with cluster_factory(1, 3, "async") as cl:
        alive = Client(cl.endpoints, worker_id=0)
        alive.init(torch.zeros(10))
        dead = Client(cl.endpoints, worker_id=2)
        dead.pull()
        dead.close()  # never pushes again
        w = alive.pull()
        for _ in range(20):
            w = alive.push_pull(torch.ones(10), lr=0.5, out=w)
        assert torch.equal(w, torch.full((10,), -10.0))
        alive.close()


@pytest.mark.timeout(60)
def test_in_sync_mode_a_dead_worker_costs_one_timeout_then_rounds_go_on(cluster_factory):
    with cluster_factory(1, 3, "sync", "--sync-timeout", "1.0") as cl:
        cs = [Client(cl.endpoints, worker_id=i, timeout=10.0) for i in range(2)]
        cs[0].init(torch.zeros(10))
        for c in cs:
            c.pull()
        # Worker 2 never shows up: the first round waits --sync-timeout, the next ones do not.
        for _ in range(3):
            out = in_parallel(*[lambda c=c: c.push(torch.ones(10), lr=1.0) for c in cs])
            assert [o[0]["round_size"] for o in out] == [2, 2]
        st = cs[0].stats()[0]
        assert st["rounds"] == 3 and st["left_out"] == 1 and st["live"] == [0, 1]
        assert torch.equal(cs[0].pull(), torch.full((10,), -3.0))
        for c in cs:
            c.close()


WORKER_1 = """
import sys, torch, dcasgd
c = dcasgd.Client(sys.argv[1].split(","), 1, timeout=30.0)
w = c.pull()
for _ in range(int(sys.argv[2])):
    w = c.push_pull(torch.ones(10), lr=1.0, out=w)
print("rounds done", flush=True)
"""


@pytest.mark.timeout(90)
def test_in_sync_mode_a_worker_killed_mid_round_and_restarted_rejoins(cluster_factory):
    # What `restart: on-failure` does: worker 1 dies while its push waits in the round, and comes
    # back with the same id; its new push joins that round (the old one stands for it) and
    # training goes on.
    with cluster_factory(2, 2, "sync", "--sync-timeout", "60") as cl:
        c0 = Client(cl.endpoints, worker_id=0, timeout=30.0)
        c0.init(torch.zeros(10))
        c0.pull()
        servers = ",".join(cl.endpoints)
        first = subprocess.Popen([sys.executable, "-c", WORKER_1, servers, "5"])
        procs = [first]
        try:
            deadline = time.monotonic() + 30
            while not all(s["updates"][1] == 1 for s in c0.stats()):
                assert time.monotonic() < deadline, "worker 1's push never joined the round"
                time.sleep(0.02)  # polling another process's progress, with a deadline
            first.kill()
            first.wait(10)
            again = subprocess.Popen([sys.executable, "-c", WORKER_1, servers, "3"], stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
            procs.append(again)
            while not all(s["last_seq"][1] == 2 for s in c0.stats()):
                assert time.monotonic() < deadline, "the restarted worker's push never arrived"
                time.sleep(0.02)
            for _ in range(3):
                c0.push(torch.ones(10), lr=1.0)
            out, _ = again.communicate(timeout=30)
            assert again.returncode == 0 and "rounds done" in out
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        stats = c0.stats()
        assert [s["rounds"] for s in stats] == [3, 3]
        assert [s["updates"][1] for s in stats] == [3, 3]  # the first push, then two of the restarted worker
        assert torch.equal(c0.pull(), torch.full((10,), -3.0))
        c0.close()
