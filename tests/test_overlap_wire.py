"""Overlapped steps and the half-size wire: the backup is exactly what each gradient was computed on."""

from __future__ import annotations

import pytest
import torch
from conftest import ShardDriver

import dcasgd
from dcasgd import Client, DcasgdError, ServerError
from dcasgd.client import NonFiniteGradient
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

N = 10_007  # not a multiple of the shard count
LR, LAM = 0.1, 1.0  # a large lambda makes a wrong backup visible far above the tolerance


def grad(worker: int, step: int, w: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * worker + step)
    return (0.5 * w + torch.randn(w.numel(), generator=gen)).float()


def start_weights(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7))


class VersionedReference:
    """The rules in float64, with the weights of every version, so a push names its own backup."""

    def __init__(self, w0: torch.Tensor, mode: str, lam: float = LAM, lam0=2.0, decay=0.95, eps=1e-7) -> None:
        self.w = w0.double().clone()
        self.history = {0: self.w.clone()}
        self.mode, self.lam, self.lam0, self.decay, self.eps = mode, lam, lam0, decay, eps
        self.ms = torch.zeros_like(self.w)

    @property
    def version(self) -> int:
        return len(self.history) - 1

    def push(self, g: torch.Tensor, bak: torch.Tensor) -> None:
        g, bak = g.double(), bak.double()
        if self.mode == "dcasgd":
            d = g + self.lam * g * g * (self.w - bak)
        else:
            self.ms = self.decay * self.ms + (1 - self.decay) * g * g
            d = g + self.lam0 / torch.sqrt(self.ms + self.eps) * g * g * (self.w - bak)
        self.w = self.w - LR * d
        self.history[self.version + 1] = self.w.clone()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["dcasgd", "dcasgd-a"])
def test_overlapped_interleaving_matches_a_reference_whose_backup_is_the_gradients_version(cluster_factory, mode):
    # Each worker computes on the weights it holds while its last push is in flight, then
    # loads that reply: every gradient is one reply older than the newest weights it was sent,
    # and names the version it was computed on.
    m = 3
    script = [0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 1, 2, 0, 1, 1, 2, 0]
    with cluster_factory(2, m, mode, "--lam", str(LAM)) as cl:
        cs = [Client(cl.endpoints, i, timeout=20.0) for i in range(m)]
        w0 = start_weights()
        cs[0].init(w0)
        ref = VersionedReference(w0, mode)
        held = [c.pull(keep=2) for c in cs]
        held_version = [c.versions for c in cs]
        incoming: list[tuple[torch.Tensor, list[int]] | None] = [None] * m
        for step, i in enumerate(script):
            g = grad(i, step, held[i])
            base = held_version[i]
            if incoming[i] is not None:
                held[i], held_version[i] = incoming[i]  # load the reply that was in flight
            ref.push(g, ref.history[base[0]])
            reply = cs[i].push_pull(g, lr=LR, base=base, keep=2)
            assert cs[i].versions == [ref.version] * 2
            torch.testing.assert_close(reply.double(), ref.w, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            incoming[i] = (reply, cs[i].versions)
        stale = dict(cs[0].stats()[0]["staleness"])
        assert max(stale) >= 3, f"overlap adds one step of staleness, got {stale}"
        # A base the shard no longer keeps (three replies old) is refused and changes nothing.
        before = cs[0].pull()
        with pytest.raises(ServerError, match="bad_base"):
            cs[1].push(grad(1, 99, held[1]), lr=LR, base=[0, 0])
        torch.testing.assert_close(cs[0].pull(), before, rtol=0, atol=0)
        for c in cs:
            c.close()


def test_backup_over_a_bfloat16_wire_is_the_rounded_weights_bit_for_bit():
    state = ShardState(ShardConfig(num_workers=2, rules=RuleConfig(mode="dcasgd", lam=LAM), wire_dtype="bfloat16"))
    shard = ShardDriver(state)
    w0 = start_weights(1000)
    shard.call("init", 0, w0, n=1000, lo=0, hi=1000)
    sent = [shard.call("pull", i)[0].snapshot.tensor.clone() for i in range(2)]
    assert sent[0].dtype == torch.bfloat16
    assert torch.equal(state.backup[0].tensor, sent[0]) and torch.equal(sent[0], w0.to(torch.bfloat16))
    ref = VersionedReference(w0, "dcasgd")
    for step in range(3):  # worker 1 moves the weights; worker 0 stays behind
        g = grad(1, step, sent[1].float()).to(torch.bfloat16)
        ref.push(g, sent[1])
        sent[1] = shard.call("push_pull", 1, g, seq=step + 1)[0].snapshot.tensor.clone()
    g0 = grad(0, 0, sent[0].float()).to(torch.bfloat16)
    shard.call("push", 0, g0, seq=1)
    ref.push(g0, sent[0])  # compensated against exactly the rounded weights worker 0 received
    torch.testing.assert_close(state.w.double(), ref.w, rtol=1e-6, atol=1e-6)
    wrong = VersionedReference(w0, "dcasgd")
    wrong.w = ref.history[3].clone()
    wrong.push(g0, w0)  # against the unrounded weights: far off
    assert (wrong.w - ref.w).abs().max() > 1e-4


@pytest.mark.timeout(90)
def test_bfloat16_wire_end_to_end_halves_the_bytes(cluster_factory):
    n = 100_000
    with cluster_factory(2, 1, "dcasgd", "--wire-dtype", "bfloat16", "--lam", str(LAM)) as cl:
        with pytest.raises(DcasgdError, match="wire type is bfloat16.*pass wire_dtype='bfloat16'"):
            Client(cl.endpoints, 0, timeout=10.0, wire_dtype="float32")
        with Client(cl.endpoints, 0, timeout=10.0) as c:  # takes the job's wire type
            assert c.wire_dtype == "bfloat16"
            w0 = start_weights(n)
            c.init(w0)
            w = c.pull()
            torch.testing.assert_close(w, w0.to(torch.bfloat16).float(), rtol=0, atol=0)
            ref = VersionedReference(w0, "dcasgd")
            before = [s["server"]["bytes_in"] for s in c.stats()]
            g = grad(0, 0, w).to(torch.bfloat16).float()
            ref.push(g, w)
            w = c.push_pull(g, lr=LR)
            after = [s["server"]["bytes_in"] for s in c.stats()]
            pushed = sum(after) - sum(before)
            assert 2 * n <= pushed < 2 * n + 2_000, f"a bfloat16 push of {n} floats took {pushed} bytes"
            torch.testing.assert_close(w.double(), ref.w, rtol=2**-7, atol=1e-6)  # within bfloat16 rounding
            assert {s["wire_dtype"] for s in c.stats()} == {"bfloat16"}


@pytest.mark.timeout(90)
def test_a_float16_overflow_or_a_nan_is_refused_whole_and_changes_nothing(cluster_factory):
    with cluster_factory(2, 1, "async", "--wire-dtype", "float16") as cl:
        with Client(cl.endpoints, 0, timeout=10.0, wire_dtype="float16") as c:
            c.init(start_weights())
            w = c.pull()
            g = torch.zeros(N)
            g[N - 1] = 1e5  # fits float32, overflows float16; in the last shard's slice only
            with pytest.raises(NonFiniteGradient, match="65504"):
                c.push_pull(g, lr=LR)
            g[N - 1] = float("nan")
            with pytest.raises(NonFiniteGradient, match="flat index 10006"):
                c.push(g, lr=LR)
            torch.testing.assert_close(c.pull(), w, rtol=0, atol=0)
            assert [s["version"] for s in c.stats()] == [0, 0], "no shard applied any part of it"
            c.push_pull(torch.ones(N), lr=LR)  # the next good push goes through
            assert [s["version"] for s in c.stats()] == [1, 1]


# --- DistributedOptimizer(overlap=True) -------------------------------------------------------


def regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 20, generator=gen)
    return x, x @ torch.randn(20, 3, generator=gen) + 0.1 * torch.randn(64, 3, generator=gen)


def reference_grad(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """The gradient of the test's loss in float64, at weights (w, b)."""
    w, b = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    ((x.double() @ w.T + b - y.double()) ** 2).mean().backward()
    return w.grad, b.grad


def test_overlap_in_sync_mode_is_refused(cluster_factory):
    with cluster_factory(1, 1, "sync") as cl:
        model = torch.nn.Linear(20, 3)
        with pytest.raises(ValueError, match="overlap=True needs an asynchronous mode"):
            dcasgd.DistributedOptimizer(model.parameters(), lr=0.1, servers=cl.endpoints, worker_id=0,
                                        num_workers=1, overlap=True)  # fmt: skip
        # The refused optimizer released its id: a plain one can be built.
        dcasgd.DistributedOptimizer(model.parameters(), lr=0.1, servers=cl.endpoints, worker_id=0,
                                    num_workers=1).close()  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("shards", [1, 2])
def test_overlapped_steps_equal_one_step_delayed_sgd(cluster_factory, shards):
    lr, wd, steps = 0.05, 0.01, 12
    x, y = regression()
    with cluster_factory(shards, 1, "async") as cl:
        torch.manual_seed(0)
        model = torch.nn.Linear(20, 3)
        w, b = model.weight.detach().double().clone(), model.bias.detach().double().clone()
        opt = dcasgd.DistributedOptimizer(model.parameters(), lr=lr, weight_decay=wd, servers=cl.endpoints,
                                          worker_id=0, num_workers=1, overlap=True)  # fmt: skip
        held = (w.clone(), b.clone())  # what the worker computes on: one reply behind the shards
        for step in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            torch.testing.assert_close(model.weight.detach().double(), held[0], rtol=0, atol=1e-6, msg=f"{step}")
            gw, gb = reference_grad(*held, x, y)
            gw, gb = gw + wd * held[0], gb + wd * held[1]  # weight decay of the weights it was computed on
            opt.step()
            held = (w.clone(), b.clone())  # step() loaded the reply of the previous push
            w, b = w - lr * gw, b - lr * gb
            for p in model.parameters():
                p.grad.fill_(float("nan"))  # overwriting .grad right after step() must not reach the shards
        opt.close()  # delivers the last push and loads its reply
        torch.testing.assert_close(model.weight.detach().double(), w, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.bias.detach().double(), b, rtol=0, atol=1e-6)
        with Client(cl.endpoints, 0, timeout=10.0) as c:
            assert [s["version"] for s in c.stats()] == [steps] * shards
            assert dict(c.stats()[0]["staleness"]) == {0: 1, 1: steps - 1}


@pytest.mark.timeout(90)
def test_a_background_error_surfaces_at_the_next_call_and_pull_waits(cluster_factory):
    x, y = regression()
    with cluster_factory(1, 1, "dcasgd-a") as cl:
        model = torch.nn.Linear(20, 3)
        opt = dcasgd.DistributedOptimizer(model.parameters(), lr=0.05, servers=cl.endpoints, worker_id=0,
                                          num_workers=1, overlap=True)  # fmt: skip
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.pull()  # waits for the round trip in flight, then loads the shards' weights
        assert opt.client.versions == [1]
        model.weight.grad[0, 0] = float("nan")
        opt.step()  # returns at once: the refusal happens on the sender thread
        with pytest.raises(NonFiniteGradient, match="NaN or Inf"):
            opt.step()
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()  # the optimizer goes on after the error
        assert opt.state_dict()["param_groups"][0]["lr"] == 0.05  # waits for the round trip too
        assert opt.client.stats()[0]["version"] == 2
        opt.close()


@pytest.mark.timeout(90)
def test_a_gradient_whose_square_overflows_is_refused_whole_across_shards(cluster_factory):
    # 3e19 is finite, but DC-ASGD-a squares it: both shards must refuse it together, and the
    # client does before sending anything (one shard alone would apply its part).
    with cluster_factory(2, 1, "dcasgd-a") as cl:
        with Client(cl.endpoints, 0, timeout=10.0) as c:
            c.init(start_weights())
            w = c.pull()
            g = torch.zeros(N)
            g[N - 1] = 3e19
            with pytest.raises(NonFiniteGradient, match="squares the gradient"):
                c.push_pull(g, lr=LR)
            torch.testing.assert_close(c.pull(), w, rtol=0, atol=0)
            assert [s["version"] for s in c.stats()] == [0, 0]


@pytest.mark.timeout(90)
def test_the_optimizer_rounds_grad_plus_weight_decay_to_bfloat16_once(cluster_factory):
    """Over a bfloat16 wire the optimizer writes ``grad + wd * w`` straight into a bfloat16 buffer, rounded once:
    the shard applies exactly ``bf16(g + wd * w)`` (as with a float32 buffer narrowed later), not
    ``bf16(bf16(g) + wd * w)``, which a narrowing before the weight decay would give (it differs here)."""
    lr, wd = 0.5, 0.01
    with cluster_factory(1, 1, "async", "--wire-dtype", "bfloat16") as cl:
        model = torch.nn.Linear(64, 32)
        with torch.no_grad():
            model.weight.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(3)))
        w_init = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()  # the shard keeps float32
        opt = dcasgd.DistributedOptimizer(model.parameters(), lr=lr, weight_decay=wd, servers=cl.endpoints,
                                          worker_id=0, num_workers=1)  # fmt: skip
        w0 = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()  # as received: rounded
        assert not torch.equal(w0, w_init)
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(opt._params)]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        g = torch.cat([g.flatten() for g in grads])
        once = (g + wd * w0).to(torch.bfloat16).double()
        twice = (g.to(torch.bfloat16).float() + wd * w0).to(torch.bfloat16).double()
        assert (once != twice).sum() > 100, "the test must tell the two roundings apart"
        _, w1 = dcasgd.client.fetch_weights(cl.endpoints[0])
        torch.testing.assert_close(w1.double(), w_init.double() - lr * once, rtol=1e-6, atol=1e-7)
        assert opt._grads.dtype == torch.bfloat16  # no float32 gradient buffer is staged
        opt.close()


@pytest.mark.timeout(90)
def test_a_bfloat16_reply_of_several_frames_is_widened_exactly(cluster_factory):
    # The client widens each frame as it comes (no staging buffer): frame edges must not shift a value.
    from dcasgd import protocol

    n = (5 * protocol.REPLY_FRAME_BYTES) // 4 + 3  # 2.5 frames' worth of bfloat16, and a ragged end
    w0 = start_weights(n)
    with cluster_factory(1, 1, "async", "--wire-dtype", "bfloat16") as cl:
        with Client(cl.endpoints, 0, timeout=20.0, shared_memory=False) as c:  # frames, as between hosts
            c.init(w0)
            assert torch.equal(c.pull(), w0.to(torch.bfloat16).float())
            g = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
            w1 = c.push_pull(g, lr=0.5)
            want = (w0 - 0.5 * g.float()).to(torch.bfloat16).float()  # the shard keeps float32 weights
            assert torch.equal(w1, want)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_receive_widened_reads_every_frame_and_refuses_one_that_splits_a_value(wire):
    import zmq

    from dcasgd.client import receive_widened

    values = torch.randn(11, generator=torch.Generator().manual_seed(3)).to(wire)
    raw = values.view(torch.uint8).numpy().tobytes()
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://w")
    b.connect("inproc://w")
    try:
        a.send_multipart([raw[:6], raw[6:6], raw[6:20], raw[20:]])  # 3 values, none, 7, 1
        out = torch.full((11,), -1.0)
        assert receive_widened(b, out, wire, 0) == 22
        assert torch.equal(out, values.float())
        a.send_multipart([raw[:4], raw[4:6]])  # more than the part holds: counted, not written
        out = torch.full((2,), -1.0)
        assert receive_widened(b, out, wire, 0) == 6
        assert torch.equal(out, values[:2].float())
        a.send_multipart([raw[:3], raw[3:10]])
        with pytest.raises(DcasgdError, match="shard 2 sent a weights frame of 3 bytes: not whole"):
            receive_widened(b, torch.zeros(5), wire, 2)
        a.send(b"next")
        assert b.recv() == b"next"  # the bad message was read whole
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
