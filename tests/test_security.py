"""CURVE: key files, who a secured shard answers, and that the bytes on the wire are encrypted."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

from dcasgd import Client, protocol
from dcasgd.cli import main as cli_main
from dcasgd.client import HandshakeError, claim_worker_id, fetch_stats
from dcasgd.security import ENV_KEY, ENV_SERVER_KEY, SecurityError, generate_keypair
from dcasgd.server import ShardServer
from dcasgd.shard import ShardConfig

N = 4_099
LR = 0.1


@pytest.fixture(autouse=True)
def _no_curve_env(monkeypatch):
    """Tests set the CURVE variables themselves; none leaks in from the caller's shell."""
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_SERVER_KEY, raising=False)


class Keys:
    """A shard's pair, an allowed worker's pair (its public key in ``clients``) and a stranger's pair."""

    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = generate_keypair(root / "server", "shard")
        self.allowed_public, self.allowed_secret = generate_keypair(root / "worker", "worker0")
        self.stranger_public, self.stranger_secret = generate_keypair(root / "stranger", "worker0")
        self.clients = root / "clients"
        self.clients.mkdir()
        (self.clients / "worker0.key").write_bytes(self.allowed_public.read_bytes())

    @property
    def server_args(self) -> tuple[str, ...]:
        return ("--curve-secret-key", str(self.server_secret), "--curve-clients", str(self.clients))

    def allowed(self, endpoints: list[str], worker_id: int = 0, **kw) -> Client:
        kw.setdefault("timeout", 20.0)
        return Client(endpoints, worker_id, curve_key=self.allowed_secret, server_key=self.server_public, **kw)


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "keys")


def weights(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(3))


def gradient(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(4))


def curve_dealer(ctx: zmq.Context, endpoint: str, secret_file: Path | None, server_public: Path | None) -> zmq.Socket:
    """A raw DEALER, with a CURVE key pair when ``secret_file`` is given."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if secret_file is not None:
        pub, sec = zmq.auth.load_certificate(secret_file)
        s.curve_publickey, s.curve_secretkey = pub, sec
        s.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
    s.connect(endpoint)
    return s


def try_send(sock: zmq.Socket, op: str, rid: int, payload: torch.Tensor, **fields) -> None:
    """Send a request without blocking; a refused peer may have nowhere to queue it (EAGAIN)."""
    h = {"v": protocol.PROTOCOL_VERSION, "op": op, "rid": rid, "worker": 0, **fields}
    try:
        sock.send_multipart([protocol.pack(h), payload.numpy()], flags=zmq.NOBLOCK)
    except zmq.Again:
        pass


# --- keygen ------------------------------------------------------------------------------


def test_keygen_writes_a_key_pair(tmp_path, capsys):
    d = tmp_path / "keys"
    assert cli_main(["keygen", str(d), "--name", "shard0"]) == 0
    public, secret = d / "shard0.key", d / "shard0.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    pub, sec = zmq.auth.load_certificate(secret)
    assert len(pub) == 40 and sec is not None and len(sec) == 40
    assert zmq.auth.load_certificate(public) == (pub, None), "the public file holds no secret"
    assert zmq.curve_public(sec) == pub, "the two halves belong together"
    assert str(public) in capsys.readouterr().out
    assert not [p for p in d.iterdir() if p.name not in ("shard0.key", "shard0.key_secret")], "no temporary left"

    assert cli_main(["keygen", str(d), "--name", "shard0"]) == 1, "an existing pair is never overwritten"
    assert "already exists" in capsys.readouterr().err
    assert zmq.auth.load_certificate(secret) == (pub, sec)
    assert cli_main(["keygen", str(d)]) == 0 and (d / "dcasgd.key_secret").is_file()  # default name


def test_server_options_are_both_or_neither(keys, capsys):
    cfg = ShardConfig(shard=0, num_shards=1, num_workers=1)
    with pytest.raises(SecurityError, match="only one was given"):
        ShardServer("tcp://127.0.0.1:0", cfg, curve_secret_key=keys.server_secret)
    with pytest.raises(SecurityError, match="only one was given"):
        ShardServer("tcp://127.0.0.1:0", cfg, curve_clients=keys.clients)
    with pytest.raises(SecurityError, match="only a public key"):
        ShardServer("tcp://127.0.0.1:0", cfg, curve_secret_key=keys.server_public, curve_clients=keys.clients)
    code = cli_main(["server", "--num-workers", "1", "--curve-clients", str(keys.clients)])
    assert code == 2 and "--curve-secret-key" in capsys.readouterr().err
    with pytest.raises(SecurityError, match="both keys"):
        Client(["tcp://127.0.0.1:1"], 0, server_key=keys.server_public)


# --- who gets an answer ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_allowed_worker_trains_normally(cluster_factory, keys, monkeypatch):
    with cluster_factory(2, 2, "async", *keys.server_args) as cl:
        w0, g = weights(), gradient()
        c0 = keys.allowed(cl.endpoints, 0)
        c0.init(w0)
        torch.testing.assert_close(c0.pull(), w0, rtol=0, atol=0)
        # The second worker takes its keys from the environment, as under a launcher.
        monkeypatch.setenv(ENV_KEY, str(keys.allowed_secret))
        monkeypatch.setenv(ENV_SERVER_KEY, str(keys.server_public))
        c1 = Client(cl.endpoints, 1, timeout=20.0)
        torch.testing.assert_close(c1.pull(), w0, rtol=0, atol=0)
        w1 = c1.push_pull(g, lr=LR)
        torch.testing.assert_close(w1, w0 - LR * g, rtol=0, atol=1e-6)
        torch.testing.assert_close(c0.pull(), w1, rtol=0, atol=0)
        assert [s["version"] for s in c0.stats()] == [1, 1]
        c0.close()
        c1.close()
    assert "CURVE on: 1 allowed client key(s)" in cl.log(0)


@pytest.mark.timeout(90)
def test_stranger_gets_no_reply_and_changes_nothing(cluster_factory, keys):
    with cluster_factory(1, 1, "async", *keys.server_args) as cl:
        ep = cl.endpoints[0]
        # A key that is not in the clients directory, the right key without the shard's public
        # key, and no CURVE at all: the handshake fails, the shard never sees a message.
        # Each fails within timeout x (retries + 1), sends included (a send used to block for good
        # once the handshake had failed), and the error says what to check.
        for curve_key, server_key, cause in [
            (keys.stranger_secret, keys.server_public, "not in the shard's --curve-clients directory"),
            (keys.allowed_secret, keys.stranger_public, "is probably not the shard's public key"),
            (None, None, "runs with CURVE and this worker has no keys: set DCASGD_CURVE_KEY"),
        ]:
            started = time.monotonic()
            with pytest.raises(HandshakeError, match=cause):
                Client([ep], 0, timeout=1.0, retries=1, curve_key=curve_key, server_key=server_key)
            assert time.monotonic() - started < 2 * 1.0 + 1.5, "the error came after its deadline"
        with pytest.raises(HandshakeError, match="has no keys"):
            fetch_stats(ep, timeout=1.0)

        # A stranger speaking the wire format by hand: it would win the first init if it got through.
        ctx = zmq.Context()
        try:
            evil = torch.full((N,), 666.0)
            init = dict(fp="x", n=N, lo=0, hi=N, dtype=protocol.DTYPE, nbytes=4 * N)
            peers = [
                curve_dealer(ctx, ep, keys.stranger_secret, keys.server_public),
                curve_dealer(ctx, ep, None, None),
            ]
            for p in peers:
                try_send(p, "init", 1, evil, **init)
            assert not any(p.poll(1000) for p in peers), "a stranger got a reply"

            c = keys.allowed([ep])
            assert not c.shard_info[0]["initialized"], "the stranger's init was applied"
            w0 = weights()
            c.init(w0)
            before = c.stats()[0]
            push = dict(fp=c.fingerprint, seq=before["updates"][0] + 1000, lr=1.0, dtype=protocol.DTYPE, nbytes=4 * N)
            for p in peers:
                try_send(p, "push_pull", 2, evil, **push)
            assert not any(p.poll(1000) for p in peers), "a stranger got a reply"

            after = c.stats()[0]
            torch.testing.assert_close(c.pull(), w0, rtol=0, atol=0)
            assert after["version"] == before["version"] == 0
            assert after["server"]["messages"] == before["server"]["messages"] + 1, "only our stats request arrived"
            assert after["server"].get("dropped", 0) == 0 and after["server"].get("errors", 0) == 0
            c.close()
        finally:
            ctx.destroy(linger=0)


# --- dcasgd status ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_status_with_keys(cluster_factory, keys):
    with cluster_factory(1, 1, "async", *keys.server_args) as cl:
        ep = cl.endpoints[0]
        env = {k: v for k, v in os.environ.items() if k not in (ENV_KEY, ENV_SERVER_KEY)}
        status = [sys.executable, "-m", "dcasgd", "status", ep, "--timeout"]

        def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*status, *args], capture_output=True, text=True, timeout=60, env={**env, **extra_env}
            )

        r = run("10", "--curve-key", str(keys.allowed_secret), "--curve-server-key", str(keys.server_public))
        assert r.returncode == 0, r.stderr
        assert "version" in r.stdout and "async" in r.stdout
        r = run("10", **{ENV_KEY: str(keys.allowed_secret), ENV_SERVER_KEY: str(keys.server_public)})
        assert r.returncode == 0, r.stderr
        r = run("1")
        assert r.returncode == 1 and "did not answer" in r.stderr
        r = run("1", "--curve-key", str(keys.stranger_secret), "--curve-server-key", str(keys.server_public))
        assert r.returncode == 1 and "did not answer" in r.stderr


# --- the bytes on the wire ---------------------------------------------------------------


class Tap:
    """A TCP relay in front of a shard that records every byte going each way."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.to_server = bytearray()
        self.to_client = bytearray()
        self._socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream, timeout=10)
            up.settimeout(None)
            self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, self.to_server), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, self.to_client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(1 << 16):
                record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._socks:
            s.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secured", [False, True])
def test_traffic_is_encrypted(cluster_factory, keys, secured):
    """Weights and headers are readable on the wire without CURVE (the control) and not with it."""
    w0 = torch.arange(N, dtype=torch.float32) * 0.25  # an easily recognized byte pattern
    with cluster_factory(1, 1, "async", *(keys.server_args if secured else ())) as cl:
        tap = Tap(cl.endpoints[0])
        try:
            # Frames: on one host a worker would hand its payloads over in shared memory, off the wire.
            kw = {"timeout": 20.0, "shared_memory": False}
            c = keys.allowed([tap.endpoint], **kw) if secured else Client([tap.endpoint], 0, **kw)
            c.init(w0)
            c.pull()
            w1 = c.push_pull(torch.ones(N), lr=LR)
            torch.testing.assert_close(w1, w0 - LR, rtol=0, atol=1e-6)
            c.close()
        finally:
            tap.close()
    sent, received = bytes(tap.to_server), bytes(tap.to_client)
    # ZMTP 3 greeting: 10 bytes of signature, 2 of version, then the 20-byte mechanism name.
    assert received[12:32].rstrip(b"\0") == (b"CURVE" if secured else b"NULL")
    plaintext = [w0.numpy().tobytes()[4000:4064], b"push_pull", b"hello"]
    reply_plaintext = w1.numpy().tobytes()[4000:4064]
    visible = [p in sent for p in plaintext] + [reply_plaintext in received]
    assert visible == [not secured] * 4, visible


@pytest.mark.timeout(90)
def test_curve_over_ipc(cluster_factory, keys):
    """CURVE works the same over an ipc socket: the allowed worker trains, a plain socket gets nothing."""
    with cluster_factory(1, 1, "async", *keys.server_args, transport="ipc") as cl:
        assert cl.endpoints[0].startswith("ipc://")
        w0, g = weights(), gradient()
        with keys.allowed(cl.endpoints) as c:
            c.init(w0)
            torch.testing.assert_close(c.pull(), w0, rtol=0, atol=0)
            torch.testing.assert_close(c.push_pull(g, lr=LR), w0 - LR * g, rtol=0, atol=1e-6)
        with pytest.raises(HandshakeError):
            fetch_stats(cl.endpoints[0], timeout=2.0, curve_key=keys.stranger_secret, server_key=keys.server_public)
    assert "CURVE on: 1 allowed client key(s)" in cl.log(0)


@pytest.mark.timeout(90)
def test_curve_holds_across_the_rebind_at_the_first_init(cluster_factory, keys, monkeypatch):
    """A fresh shard binds its endpoint again after the first init (to tighten its message limit): CURVE is
    a socket option, so the new listener is as secure; the workers reconnect with their keys and train on,
    a stranger is still refused."""
    monkeypatch.setenv("DCASGD_FUSED", "0")  # the plain-torch update: no kernel compile in the shard
    with cluster_factory(1, 2, "async", *keys.server_args) as cl:
        w0, g = weights(), gradient()
        with keys.allowed(cl.endpoints, 0) as c0, keys.allowed(cl.endpoints, 1) as c1:
            assert c0.stats()[0]["max_message_bytes"] > 1 << 30
            c0.init(w0)
            torch.testing.assert_close(c1.pull(), w0, rtol=0, atol=0)
            torch.testing.assert_close(c1.push_pull(g, lr=LR), w0 - LR * g, rtol=0, atol=1e-6)
            torch.testing.assert_close(c0.pull(), w0 - LR * g, rtol=0, atol=1e-6)
            st = c0.stats()[0]
            assert st["version"] == 1
            assert st["max_message_bytes"] == max(protocol.DEFAULT_MAX_HEADER_BYTES, 4 * N) + 4096
            for c in (c0, c1):  # both connected before the init, and again after it
                assert c._handshakes[c._socks[0]].succeeded == 2
        with pytest.raises(HandshakeError):
            fetch_stats(cl.endpoints[0], timeout=1.0, curve_key=keys.stranger_secret, server_key=keys.server_public)
    assert "message limit tightened" in cl.log(0)


# --- a worker id belongs to the key that first used it ------------------------------------------


def ask(sock: zmq.Socket, op: str, worker: int | None = 0, payload: torch.Tensor | None = None, **fields) -> dict:
    """One request on a raw (CURVE) DEALER; the reply header. Waits up to 20 s for it."""
    h = {"v": protocol.PROTOCOL_VERSION, "op": op, "rid": next(_rids), **fields}
    if worker is not None:
        h["worker"] = worker
    sock.send_multipart([protocol.pack(h)] + ([payload.numpy()] if payload is not None else []))
    assert sock.poll(20_000), f"no reply to {op}"
    frames = sock.recv_multipart()
    return protocol.unpack(frames[0], max_bytes=1 << 24)


_rids = iter(range(10_000, 10**9))


@pytest.mark.timeout(120)
def test_a_worker_id_belongs_to_the_key_that_first_used_it(cluster_factory, keys, tmp_path):
    """Another allowed key gets `forbidden` for every op on that id (claim and done too), and that
    survives a restart from a checkpoint; stats stay open to every allowed key."""
    other_public, other_secret = generate_keypair(tmp_path / "other", "worker1")
    (keys.clients / "worker1.key").write_bytes(other_public.read_bytes())
    ckpt = tmp_path / "ckpt"
    opts = (*keys.server_args, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", "--exit-when-done")
    g = gradient()
    with cluster_factory(1, 3, "dcasgd", *opts) as cl:
        ep = cl.endpoints[0]
        kw = {"curve_key": keys.allowed_secret, "server_key": keys.server_public}
        assert claim_worker_id(ep, "alpha", timeout=20.0, **kw)["worker"] == 0
        c0 = keys.allowed(cl.endpoints, 0)
        c0.init(weights())
        c0.pull()
        w1 = c0.push_pull(g, lr=LR)
        ctx = zmq.Context()
        try:
            intruder = curve_dealer(ctx, ep, other_secret, keys.server_public)
            fp = c0.fingerprint
            push = dict(fp=fp, lr=1.0, dtype=protocol.DTYPE, nbytes=4 * N)
            refused = [
                ask(intruder, "push_pull", 0, g, seq=2**64 - 1, **push),
                ask(intruder, "push", 0, g, seq=2, **push),
                ask(intruder, "pull", 0, fp=fp),
                ask(intruder, "hello", 0),
                ask(intruder, "done", 0, status=0),
                ask(intruder, "claim", None, name="alpha"),
            ]
            for reply in refused:
                assert reply["ok"] is False and reply["code"] == protocol.FORBIDDEN, reply
            assert "belongs to another client key" in refused[0]["msg"]
            # Free ids are the intruder's once it uses them (first use), never the one in use.
            assert ask(intruder, "claim", None, name="x")["worker"] == 1
            assert ask(intruder, "done", 1, status=0)["ok"] is True
            assert ask(intruder, "claim", None, name="y")["worker"] == 2
            assert ask(intruder, "done", 2, status=0)["ok"] is True
            assert ask(intruder, "stats", None)["ok"] is True
            st = c0.stats()[0]
            assert st["last_seq"][0] == 1 and st["version"] == 1 and st["finished"] == [[1, 0], [2, 0]]
            assert st["server"]["error:forbidden"] == 6
            # The real worker 0 goes on: its next push is applied, not a duplicate.
            w2 = c0.push_pull(g, lr=LR)
            assert not torch.equal(w2, w1) and c0.stats()[0]["last_seq"][0] == 2
            c0.close()
            intruder.close()
        finally:
            ctx.destroy(linger=0)
    assert cl.procs[0].returncode == 0
    # Resumed from the checkpoint written on stop: the ids still belong to the same keys.
    with cluster_factory(1, 3, "dcasgd", *opts, "--resume") as cl:
        ctx = zmq.Context()
        try:
            intruder = curve_dealer(ctx, cl.endpoints[0], other_secret, keys.server_public)
            assert ask(intruder, "hello", 0)["code"] == protocol.FORBIDDEN
            assert ask(intruder, "hello", 1)["ok"] is True
            c0 = keys.allowed(cl.endpoints, 0)
            assert c0.shard_info[0]["last_seq"] == 2
            assert ask(intruder, "done", 0, status=0)["code"] == protocol.FORBIDDEN
            c0.done(0)
            intruder.close()
        finally:
            ctx.destroy(linger=0)
