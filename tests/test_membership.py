"""Worker ids by name (claim) and workers that finished (done): Membership, ShardState, a real shard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import zmq
from conftest import ShardDriver
from torch import Tensor

from dcasgd import Client, ServerError, checkpoint
from dcasgd import protocol as P
from dcasgd.client import claim_worker_id, fetch_stats
from dcasgd.membership import Forbidden, Membership, NoFreeWorkerId
from dcasgd.protocol import ProtocolError, Request
from dcasgd.rules import RuleConfig
from dcasgd.server import ShardServer
from dcasgd.shard import ShardConfig, ShardState

N = 64
LR = 0.5

# --- Membership alone ------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_claim_gives_the_lowest_free_id_and_the_same_name_the_same_id():
    m = Membership(3)
    assert [m.claim("a"), m.claim("b"), m.claim("c")] == [0, 1, 2]
    assert m.claim("b") == 1 and m.claim("a") == 0 and m.claim("c") == 2, "a known name keeps its id"
    assert m.names == {"a": 0, "b": 1, "c": 2}
    # A restored membership with a hole in it: a new name fills the hole, not the next id.
    holed = Membership.from_state(4, {"names": [["x", 0], ["z", 2]], "finished": []})
    assert holed.claim("y") == 1
    assert holed.claim("w") == 3
    assert holed.claim("z") == 2


@pytest.mark.timeout(10)
def test_no_free_id_names_the_job_size_and_changes_nothing():
    m = Membership(2)
    m.claim("alpha")
    m.claim("beta")
    with pytest.raises(NoFreeWorkerId) as err:
        m.claim("gamma")
    msg = str(err.value)
    assert "all 2 worker ids are taken" in msg and "started for 2 workers" in msg
    assert "alpha" in msg and "beta" in msg, "the message says who holds the ids"
    assert m.names == {"alpha": 0, "beta": 1}, "a refused name is not recorded"
    with pytest.raises(NoFreeWorkerId):
        m.claim("gamma")  # still refused: it did not take an id the first time
    assert m.claim("beta") == 1


@pytest.mark.timeout(10)
def test_finish_resume_all_done_and_failed():
    m = Membership(3)
    assert not m.all_done and m.failed == {}
    m.finish(2, 0)
    m.finish(0, 3)
    assert not m.all_done and m.finished == {2: 0, 0: 3}
    assert m.failed == {0: 3}
    m.finish(1, 137)
    assert m.all_done
    assert m.failed == {0: 3, 1: 137}
    assert list(m.failed) == [0, 1], "failed workers in id order"
    m.resume(1)  # restarted after it reported
    assert not m.all_done and m.failed == {0: 3}
    m.resume(1)  # resuming a worker that is not finished is a no-op
    assert m.finished == {2: 0, 0: 3}
    m.finish(1, 0)
    m.finish(0, 0)  # a later report replaces the earlier status
    assert m.all_done and m.failed == {}
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        Membership(0)


@pytest.mark.timeout(10)
def test_membership_export_and_from_state_round_trip():
    m = Membership(3)
    m.claim("host-b")
    m.claim("host-a")
    m.finish(1, 2)
    s = m.export_state()
    assert s == {"names": [["host-b", 0], ["host-a", 1]], "unnamed": [], "finished": [(1, 2)], "owners": []}
    r = Membership.from_state(3, s)
    assert r.num_workers == 3 and r.names == m.names and r.finished == m.finished
    assert list(r.names) == ["host-b", "host-a"], "claim order is kept"
    assert r.claim("host-a") == 1 and r.claim("host-c") == 2
    fresh = Membership.from_state(3, None)
    assert fresh.names == {} and fresh.finished == {} and fresh.num_workers == 3
    # Ids outside a smaller job are left out.
    small = Membership.from_state(1, s)
    assert small.names == {"host-b": 0} and small.finished == {}


@pytest.mark.timeout(10)
def test_an_id_in_use_without_a_name_is_never_claimed():
    m = Membership(3)
    m.seen(0)  # a worker that DCASGD_WORKER_ID (or RANK) told it is 0
    assert m.claim("a") == 1, "id 0 is in use: a claim gets the next free one"
    m.seen(1)  # a request from a claimed id: its name holds it already
    assert m.unnamed == {0}
    assert m.claim("b") == 2
    m.seen(2)
    with pytest.raises(NoFreeWorkerId) as err:
        m.claim("c")
    msg = str(err.value)
    assert "a, b; id 0 given by DCASGD_WORKER_ID, RANK or SLURM_PROCID" in msg, msg
    assert "-1" not in msg
    # Kept in a checkpoint; a checkpoint written before ids were recorded this way has none.
    r = Membership.from_state(3, m.export_state())
    assert r.unnamed == {0} and r.names == {"a": 1, "b": 2}
    assert Membership.from_state(3, {"names": [["a", 1]], "finished": []}).claim("new") == 0
    only_given = Membership(2)
    only_given.seen(1)
    only_given.seen(0)
    with pytest.raises(NoFreeWorkerId, match=r"by ids 0, 1 given by DCASGD_WORKER_ID"):
        only_given.claim("late")


KEY_A, KEY_B = "A" * 40, "B" * 40  # CURVE public keys as the authenticator reports them (Z85)


@pytest.mark.timeout(10)
def test_an_id_belongs_to_the_key_that_first_used_it_and_a_checkpoint_keeps_it(tmp_path):
    m = Membership(3)
    m.check_owner(0, KEY_B)  # nobody used id 0 yet
    m.seen(0, KEY_A)
    m.check_owner(0, KEY_A)
    m.check_owner(0, None)  # without CURVE there are no keys to tell apart
    with pytest.raises(Forbidden, match="worker id 0 belongs to another client key"):
        m.check_owner(0, KEY_B)
    assert m.claim("b-host", KEY_B) == 1 and m.owners == {0: KEY_A, 1: KEY_B}
    with pytest.raises(Forbidden):
        m.claim("b-host", KEY_A)  # a name does not move its id to another key
    assert m.claim("b-host", KEY_B) == 1
    m.seen(1, KEY_A)  # only called after check_owner let a request through: the first key stays
    assert m.owners[1] == KEY_B
    # The shard: every op on an id refused for another key, before anything else is looked at.
    st = ShardState(sync_config(3))
    st.members = Membership.from_state(3, m.export_state())
    assert st.members.owners == {0: KEY_A, 1: KEY_B}
    for op, fields in [("hello", {}), ("pull", {"fp": "x"}), ("done", {"status": 0}), ("push", {"seq": 1})]:
        with pytest.raises(ProtocolError) as err:
            st.check(Request(op=op, rid=1, worker=0, **fields), KEY_B)
        assert err.value.code == P.FORBIDDEN, op
    st.check(Request(op="stats", rid=1, worker=0), KEY_B)  # stats are for anyone
    with pytest.raises(ProtocolError) as err:
        st.claim("b-host", KEY_A)
    assert err.value.code == P.FORBIDDEN and "'b-host'" in err.value.message
    # On disk; a checkpoint from before keys were kept has no owners: the next key takes an id.
    d, _ = sync_job(3)
    d.state.members = st.members
    r = checkpoint.read(checkpoint.save(d.state, tmp_path), d.state.config)
    assert r.members.owners == {0: KEY_A, 1: KEY_B}
    old = {k: v for k, v in m.export_state().items() if k != "owners"}
    assert Membership.from_state(3, old).owners == {}
    # A new run (every worker had finished) hands ids out afresh, to any key.
    for w in range(3):
        r.members.finish(w, 0)
    assert r.restart_if_finished() and r.members.owners == {}


# --- ShardState: claim and done as the server calls them --------------------------------------------------


def sync_config(m: int = 3, shard: int = 0, num_shards: int = 1) -> ShardConfig:
    return ShardConfig(shard=shard, num_shards=num_shards, num_workers=m, rules=RuleConfig(mode="sync", lr=LR))


def g(worker: int, step: int) -> Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(10 * worker + step))


def done(d: ShardDriver, worker: int, status: int = 0):
    """A done request through ``check``, then ShardState.done, as ShardServer._dispatch feeds it."""
    d.rid += 1
    d.state.check(Request(op="done", rid=d.rid, worker=worker, status=status))
    return d.state.done(worker, status, now=0.0)


def claim(d: ShardDriver, name: str) -> dict:
    d.rid += 1
    d.state.check(Request(op="claim", rid=d.rid, worker=None, name=name))
    return d.state.claim(name)


def sync_job(m: int = 3) -> tuple[ShardDriver, Tensor]:
    d = ShardDriver(ShardState(sync_config(m)))
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(1))
    d.call("init", 0, w0, n=N, lo=0, hi=N)
    for w in range(m):
        d.call("pull", w)
    return d, w0


@pytest.mark.timeout(10)
def test_done_closes_a_sync_round_that_waited_for_the_finished_worker():
    d, w0 = sync_job(3)
    s = d.state
    assert d.call("push", 0, g(0, 0), seq=1) == []
    assert d.call("push", 1, g(1, 0), seq=1) == []  # waits for worker 2
    assert s.version == 0
    replies = done(d, 2)
    assert [r.worker for r in replies] == [2, 0, 1], "the finished worker's answer first, then the round's"
    assert replies[0].fields == {"finished": 1, "num_workers": 3}
    for r in replies[1:]:
        assert r.fields["round_size"] == 2 and r.fields["version"] == 1
    assert s.version == 1 and s.rounds == 1
    torch.testing.assert_close(s.w, w0 - LR * (g(0, 0) + g(1, 0)) / 2, rtol=0, atol=1e-6)
    st = s.stats()
    assert st["live"] == [0, 1] and st["finished"] == [(2, 0)] and st["left_out"] == 0
    # The next round closes with workers 0 and 1 alone, without waiting for a timeout.
    w1 = s.w.clone()
    assert d.call("push", 0, g(0, 1), seq=2) == []
    replies = d.call("push", 1, g(1, 1), seq=2)
    assert sorted(r.worker for r in replies) == [0, 1] and all(r.fields["round_size"] == 2 for r in replies)
    assert s.version == 2 and s.rounds == 2
    torch.testing.assert_close(s.w, w1 - LR * (g(0, 1) + g(1, 1)) / 2, rtol=0, atol=1e-6)
    # Worker 2 comes back (a restarted container): its push un-finishes it and the round waits for it again.
    assert d.call("push", 2, g(2, 0), seq=1) == []
    assert s.stats()["finished"] == [] and s.stats()["live"] == [0, 1, 2]
    assert d.call("push", 0, g(0, 2), seq=3) == []
    assert len(d.call("push", 1, g(1, 2), seq=3)) == 3 and s.version == 3


@pytest.mark.timeout(10)
def test_done_without_a_pending_round_only_answers_and_records_the_status():
    d, w0 = sync_job(2)
    replies = done(d, 1, status=7)
    assert len(replies) == 1 and replies[0].worker == 1 and replies[0].fields == {"finished": 1, "num_workers": 2}
    assert d.state.version == 0 and d.state.members.failed == {1: 7} and not d.state.members.all_done
    # Worker 0 alone now closes each round at once.
    [reply] = d.call("push", 0, g(0, 0), seq=1)
    assert reply.fields["round_size"] == 1 and d.state.version == 1
    [last] = done(d, 0)
    assert last.fields == {"finished": 2, "num_workers": 2} and d.state.members.all_done


@pytest.mark.timeout(10)
def test_done_and_claim_need_no_weights_and_claim_is_for_shard_0_only():
    d = ShardDriver(ShardState(sync_config(2)))  # not initialized
    assert claim(d, "node-a") == {"worker": 0, "name": "node-a", "num_workers": 2}
    assert claim(d, "node-b")["worker"] == 1
    assert claim(d, "node-a")["worker"] == 0
    with pytest.raises(ProtocolError) as err:
        claim(d, "node-c")
    assert err.value.code == P.NO_WORKER_ID and "2 workers" in err.value.message
    assert d.state.members.names == {"node-a": 0, "node-b": 1}
    assert done(d, 0)[0].fields["finished"] == 1
    other = ShardState(sync_config(2, shard=1, num_shards=2))
    with pytest.raises(ProtocolError) as err:
        other.check(Request(op="claim", rid=1, worker=None, name="node-a"))
    assert err.value.code == P.BAD_OP and "shard 0" in err.value.message
    other.check(Request(op="done", rid=2, worker=1, status=0))  # done goes to every shard


@pytest.mark.timeout(10)
def test_export_and_from_state_keep_names_and_finished(tmp_path):
    d, _ = sync_job(3)
    claim(d, "c-one")
    claim(d, "c-two")
    done(d, 1, status=4)
    cfg = d.state.config
    direct = ShardState.from_state(cfg, d.state.export_state())
    on_disk = checkpoint.read(checkpoint.save(d.state, tmp_path), cfg)  # through the file's msgpack header too
    for r in (direct, on_disk):
        assert r.members.names == {"c-one": 0, "c-two": 1}
        assert r.members.finished == {1: 4}
        assert r.live == {0, 2}
        assert r.members.claim("c-two") == 1 and r.members.claim("c-three") == 2
    # An uninitialized shard keeps its membership too.
    u = ShardDriver(ShardState(sync_config(2)))
    claim(u, "early")
    assert ShardState.from_state(u.state.config, u.state.export_state()).members.names == {"early": 0}


@pytest.mark.timeout(10)
def test_restart_if_finished_resets_only_when_every_worker_finished():
    d, _ = sync_job(2)
    claim(d, "a")
    claim(d, "b")
    done(d, 0)
    assert d.state.restart_if_finished() is False
    assert d.state.members.names == {"a": 0, "b": 1} and d.state.members.finished == {0: 0}
    assert d.state.live == {1}
    done(d, 1, status=1)
    assert d.state.restart_if_finished() is True
    m = d.state.members
    assert m.names == {} and m.finished == {} and not m.all_done and m.num_workers == 2
    assert d.state.live == {0, 1}
    assert m.claim("new-container") == 0, "ids are handed out afresh"
    assert d.state.restart_if_finished() is False


@pytest.mark.timeout(30)
def test_resumed_server_starts_a_new_run_only_after_a_finished_job(tmp_path):
    ctx = zmq.Context()
    try:
        for finish, fresh in (([0], False), ([0, 1], True)):
            d, _ = sync_job(2)
            claim(d, "a")
            claim(d, "b")
            for w in finish:
                done(d, w)
            directory = tmp_path / str(len(finish))
            checkpoint.save(d.state, directory)
            server = ShardServer(
                "tcp://127.0.0.1:0", d.state.config, checkpoint_dir=directory, resume=True, context=ctx
            )
            try:
                m = server.shard.members
                if fresh:
                    assert m.names == {} and m.finished == {} and server.shard.live == {0, 1}
                else:
                    assert m.names == {"a": 0, "b": 1} and m.finished == {0: 0} and server.shard.live == {1}
            finally:
                server.close()
    finally:
        ctx.term()


# --- a real shard process: ids by name, then --exit-when-done ------------------------------------------------


@pytest.mark.timeout(60)
def test_claim_then_done_by_every_worker_ends_an_exit_when_done_shard(cluster_factory):
    with cluster_factory(1, 2, "async", "--exit-when-done") as cl:
        ep = cl.endpoints[0]
        first = claim_worker_id(ep, "worker-a", timeout=10)
        second = claim_worker_id(ep, "worker-b", timeout=10)
        assert {first["worker"], second["worker"]} == {0, 1}
        assert first["num_workers"] == 2 and first["name"] == "worker-a"
        with pytest.raises(ServerError) as err:
            claim_worker_id(ep, "worker-c", timeout=10)
        assert err.value.code == P.NO_WORKER_ID and "2 workers" in err.value.message
        assert claim_worker_id(ep, "worker-a", timeout=10)["worker"] == first["worker"]
        clients = [Client(cl.endpoints, worker_id=i, timeout=10.0, retries=0) for i in range(2)]
        try:
            [r0] = clients[0].done(0)
            assert r0["ok"] and r0["finished"] == 1 and r0["num_workers"] == 2
            st = fetch_stats(ep, timeout=10)  # one of two finished: still serving
            assert st["finished"] == [[0, 0]]
            assert cl.procs[0].poll() is None
            [r1] = clients[1].done(0)
            assert r1["finished"] == 2
            assert cl.procs[0].wait(timeout=30) == 0, "the shard exits by itself, with code 0"
        finally:
            for c in clients:
                c.close()
        log = cl.log(0)
        assert "all 2 workers finished" in log and "all with status 0" in log


@pytest.mark.timeout(90)
def test_a_claim_never_hands_out_an_id_that_a_worker_uses_unclaimed(cluster_factory):
    """A worker given id 0 by the environment trains; a claim and ``dcasgd worker`` then get other ids."""
    with cluster_factory(2, 3, "async") as cl:
        with Client(cl.endpoints, worker_id=0, timeout=10.0) as given:
            given.init(torch.zeros(N))
            given.pull()
            given.push(torch.ones(N), lr=0.1)
        assert claim_worker_id(cl.endpoints[0], "claimed-one", timeout=10)["worker"] == 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCASGD_")}
        env |= {"DCASGD_SERVERS": ",".join(cl.endpoints), "DCASGD_WORKER_NAME": "wrapped"}
        printer = "import os; print(os.environ['DCASGD_WORKER_ID'])"
        out = subprocess.run(
            [sys.executable, "-m", "dcasgd", "worker", "--", sys.executable, "-c", printer],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and out.stdout == "2\n", out
        assert "worker id 2 (claimed as 'wrapped')" in out.stderr, out.stderr
        with pytest.raises(ServerError) as err:
            claim_worker_id(cl.endpoints[0], "one-too-many", timeout=10)
        assert err.value.code == P.NO_WORKER_ID
        assert "claimed-one, wrapped; id 0 given by DCASGD_WORKER_ID" in err.value.message, err.value.message
        assert str(err.value).startswith(f"shard 0 ({cl.endpoints[0]}) refused"), "error replies name their shard"
        with pytest.raises(ServerError) as err:
            claim_worker_id(cl.endpoints[1], "wrong-shard", timeout=10)
        assert err.value.code == P.BAD_OP and err.value.shard == 1, err.value
