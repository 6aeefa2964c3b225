"""The whole core through real shard processes and real sockets on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from conftest import in_parallel

from dcasgd import Client, DcasgdError, ServerError, ShardTimeout
from dcasgd.protocol import PROTOCOL_VERSION

N = 10_007  # not a multiple of the shard counts: slices differ in size


def grad(worker: int, step: int, w: torch.Tensor) -> torch.Tensor:
    """A deterministic gradient that depends on the weights, the worker and the step."""
    gen = torch.Generator().manual_seed(1000 * worker + step)
    return (0.5 * w + torch.randn(w.numel(), generator=gen)).float()


def start_weights(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7))


def clients(endpoints: list[str], m: int, **kw) -> list[Client]:
    """``m`` workers; worker 1 sends its payloads in frames, the others in shared memory (the default on one
    host), so that every test here runs both paths side by side."""
    return [Client(endpoints, worker_id=i, timeout=20.0, shared_memory=None if i != 1 else False, **kw)
            for i in range(m)]  # fmt: skip


def close_all(cs: list[Client]) -> None:
    for c in cs:
        c.close()


class Reference:
    """The paper's rules in float64, one backup per worker."""

    def __init__(self, w0: torch.Tensor, mode: str, m: int, lr: float, lam=0.04, lam0=2.0, decay=0.95, eps=1e-7,
                 per_parameter: bool = False):  # fmt: skip
        self.w = w0.double().clone()
        self.per_parameter = per_parameter  # the ablation: one previous weight, refreshed at every update
        self.prev = self.w.clone()
        self.mode, self.lr, self.lam, self.lam0, self.decay, self.eps = mode, lr, lam, lam0, decay, eps
        self.bak = [None] * m
        self.ms = torch.zeros_like(self.w)

    def pull(self, worker: int) -> torch.Tensor:
        self.bak[worker] = self.w.clone()
        return self.w

    def push(self, worker: int, g: torch.Tensor) -> None:
        g = g.double()
        bak = self.prev if self.per_parameter else self.bak[worker]
        self.prev = self.w.clone()
        if self.mode == "async":
            d = g
        elif self.mode == "dcasgd":
            d = g + self.lam * g * g * (self.w - bak)
        else:
            self.ms = self.decay * self.ms + (1 - self.decay) * g * g
            d = g + self.lam0 / torch.sqrt(self.ms + self.eps) * g * g * (self.w - bak)
        self.w = self.w - self.lr * d


@pytest.mark.timeout(90)
def test_sync_matches_sequential_sgd_on_averaged_gradients(cluster_factory):
    m, lr, steps = 3, 0.05, 6
    with cluster_factory(2, m, "sync") as cl:
        cs = clients(cl.endpoints, m)
        w0 = start_weights()
        cs[0].init(w0)
        local = [c.pull() for c in cs]
        expected = w0.double()
        for step in range(steps):
            gs = [grad(i, step, local[i]) for i in range(m)]
            out = in_parallel(*[lambda c=c, g=g: c.push_pull(g, lr=lr) for c, g in zip(cs, gs, strict=True)])
            expected = expected - lr * torch.stack([g.double() for g in gs]).mean(0)
            for i in range(m):
                assert out[i] is not None, f"worker {i} got no reply in round {step}"
                torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-6)
            assert all(torch.equal(out[0], o) for o in out), "replies of one round carry the same version"
            local = out
        st = cs[0].stats()
        assert [s["version"] for s in st] == [steps, steps]
        assert all(s["rounds"] == steps for s in st)
        close_all(cs)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "mode, compensation",
    [("async", "per-worker"), ("dcasgd", "per-worker"), ("dcasgd-a", "per-worker"), ("dcasgd-a", "per-parameter")],
)
def test_scripted_interleaving_matches_float64_reference(cluster_factory, mode, compensation):
    m, lr = 3, 0.1
    # (worker, op): the workers' pulls and pushes interleave so that gradients are stale.
    script = [(0, "pull"), (1, "pull"), (2, "pull"), (0, "push_pull"), (1, "push_pull"), (2, "push_pull"),
              (1, "push_pull"), (0, "push_pull"), (1, "push"), (2, "push_pull"), (1, "pull"), (0, "push_pull"),
              (1, "push_pull"), (2, "push_pull")]  # fmt: skip
    with cluster_factory(2, m, mode, "--compensation", compensation) as cl:
        cs = clients(cl.endpoints, m)
        w0 = start_weights()
        cs[0].init(w0)
        ref = Reference(w0, mode, m, lr, per_parameter=compensation == "per-parameter")
        local: list[torch.Tensor | None] = [None] * m
        for step, (i, op) in enumerate(script):
            if op == "pull":
                local[i] = cs[i].pull()
                ref.pull(i)
            else:
                g = grad(i, step, local[i])
                ref.push(i, g)
                if op == "push":
                    cs[i].push(g, lr=lr)
                    continue
                local[i] = cs[i].push_pull(g, lr=lr)
                ref.pull(i)
            torch.testing.assert_close(local[i].double(), ref.w, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        assert ref.w.sub(w0.double()).abs().max() > 0.01
        stale = dict(cs[0].stats()[0]["staleness"])
        assert max(stale) >= 2, f"the script should produce stale gradients, got {stale}"
        assert [c.shared_memory for c in cs] == [[True, True], [False, False], [True, True]]
        close_all(cs)


@pytest.mark.timeout(90)
def test_one_shard_and_three_shards_give_identical_weights(cluster_factory):
    results = []
    for shards in (1, 3):
        with cluster_factory(shards, 2, "dcasgd-a", "--momentum", "0.9") as cl:
            a, b = clients(cl.endpoints, 2)
            a.init(start_weights())
            wa, wb = a.pull(), b.pull()
            for step in range(5):
                wa = a.push_pull(grad(0, step, wa), lr=0.05)
                wb = b.push_pull(grad(1, step, wb), lr=0.05)
            results.append(a.pull())
            close_all([a, b])
    assert torch.equal(results[0], results[1])


@pytest.mark.timeout(120)
def test_reader_never_sees_a_torn_vector(cluster_factory):
    """Each push adds exactly 1 to every weight, so a consistent slice is constant."""
    n, pushes = 1_000_000, 40
    with cluster_factory(2, 3, "async") as cl:
        reader, *writers = clients(cl.endpoints, 3)
        reader.init(torch.zeros(n))
        minus_one = torch.full((n,), -1.0)
        errors: list[BaseException] = []

        def write(c: Client) -> None:
            try:
                c.pull()
                for _ in range(pushes):
                    c.push(minus_one, lr=1.0)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(c,)) for c in writers]
        for t in threads:
            t.start()
        seen = set()
        out = torch.empty(n)
        while any(t.is_alive() for t in threads):
            reader.pull(out=out)
            for lo, hi in reader.ranges:
                part = out[lo:hi]
                assert torch.all(part == part[0]), "a pulled slice mixes two versions"
                seen.add(float(part[0]))
        for t in threads:
            t.join(60)
        assert not errors, errors
        final = reader.pull()
        assert torch.all(final == 2 * pushes)
        assert len(seen) > 2, "the reader should have seen intermediate versions"
        close_all([reader, *writers])


@pytest.mark.timeout(60)
def test_retried_push_with_same_seq_is_applied_once(cluster_factory, raw_peer):
    with cluster_factory(1, 2, "async") as cl:
        (c,) = clients(cl.endpoints, 1)
        c.init(torch.zeros(100))
        c.pull()
        peer = raw_peer(cl.endpoints[0])
        head = {"v": PROTOCOL_VERSION, "op": "push_pull", "rid": 1, "worker": 1, "fp": c.fingerprint,
                "dtype": "float32", "nbytes": 400, "seq": 1, "lr": 1.0}  # fmt: skip
        g = torch.ones(100).numpy().tobytes()
        assert peer.request({"v": PROTOCOL_VERSION, "op": "pull", "rid": 0, "worker": 1, "fp": c.fingerprint})[0]["ok"]
        first, [w1] = peer.request(head, g)
        again, [w2] = peer.request(head, g)
        assert first["ok"] and again["ok"] and again["duplicate"] is True
        assert w1 == w2 == torch.full((100,), -1.0).numpy().tobytes()
        st = c.stats()[0]
        assert st["version"] == 1 and st["updates"] == [0, 1] and st["duplicates"] == 1
        # The next seq is applied again.
        nxt, [w3] = peer.request({**head, "seq": 2, "rid": 2}, g)
        assert nxt["ok"] and "duplicate" not in nxt and w3 == torch.full((100,), -2.0).numpy().tobytes()
        c.close()


@pytest.mark.timeout(60)
def test_init_first_wins_and_layout_mismatch_is_refused(cluster_factory):
    with cluster_factory(2, 2, "dcasgd") as cl:
        a, b = clients(cl.endpoints, 2)
        with pytest.raises(DcasgdError, match="no weights yet"):
            a.pull()
        a.init(torch.ones(50))
        b.init(torch.zeros(50))  # a no-op
        assert torch.equal(b.pull(), torch.ones(50))
        c = Client(cl.endpoints, worker_id=1, timeout=5.0)
        with pytest.raises(ServerError, match="bad_fingerprint"):
            c.init(torch.zeros(51))
        close_all([a, b, c])


@pytest.mark.timeout(60)
def test_sync_round_leaves_out_a_silent_worker_who_may_rejoin(cluster_factory):
    with cluster_factory(1, 3, "sync", "--sync-timeout", "1.0") as cl:
        cs = clients(cl.endpoints, 3)
        cs[0].init(torch.zeros(10))
        for c in cs:
            c.pull()

        def push(i: int, value: float):
            return lambda: cs[i].push(torch.full((10,), value), lr=1.0)[0]

        replies = in_parallel(push(0, -1.0), push(1, -1.0))
        assert replies[0]["round_size"] == 2 and replies[1]["version"] == 1
        st = cs[0].stats()[0]
        assert st["left_out"] == 1 and st["live"] == [0, 1]
        assert "without workers [2]" in cl.log(0)
        # Worker 2 comes back (a pull, or a push, makes it live again): the next round waits for all three.
        cs[2].pull()
        replies = in_parallel(push(0, -3.0), push(1, -3.0), push(2, -3.0))
        assert [r["round_size"] for r in replies] == [3, 3, 3]
        assert torch.equal(cs[0].pull(), torch.full((10,), 4.0))
        close_all(cs)


@pytest.mark.timeout(30)
def test_timeout_names_the_shard():
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(ShardTimeout, match=rf"shard 0 \(tcp://127.0.0.1:{port}\).*hello.*2 tries"):
            Client([f"tcp://127.0.0.1:{port}"], worker_id=0, timeout=0.3, retries=1)
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_status_prints_a_table_and_sigterm_exits_zero(cluster_factory):
    with cluster_factory(1, 1, "dcasgd-a") as cl:
        c = Client(cl.endpoints, 0)
        c.init(torch.zeros(8))
        c.push_pull(torch.ones(8) * 0 + c.pull(), lr=0.1)
        out = subprocess.run([sys.executable, "-m", "dcasgd", "status", cl.endpoints[0]],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "dcasgd-a" in out.stdout and "version" in out.stdout and "0:1" in out.stdout
        c.close()
        proc = cl.procs[0]
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.timeout(60)
def test_sigint_stops_a_shard_cleanly(cluster_factory):
    import signal

    with cluster_factory(1, 1, "sync") as cl:
        proc = cl.procs[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "signal 2, stopping" in cl.log(0)
