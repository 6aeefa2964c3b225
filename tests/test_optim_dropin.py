"""DistributedOptimizer where real training code puts an optimizer, against torch.optim.SGD.

One worker in ``async`` mode on one shard applies ``w <- w - lr * g`` exactly as SGD
does, so each case here compares weights with an SGD run on a twin model (to 1e-6),
or checks that the optimizer refuses at once, with what to do instead. The README's
"what works with what" table names these tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from dcasgd import DcasgdError, DistributedOptimizer
from dcasgd.client import fetch_stats
from dcasgd.layout import FlatLayout


def mlp(seed: int = 0, hidden: int = 16, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def batches(steps: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(16, 8, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None, dtype=torch.float32) -> None:
    for x, y in batches(steps, dtype):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def shard_version(opt: DistributedOptimizer) -> int:
    return opt.client.stats()[0]["version"]


@pytest.fixture
def one_worker(cluster_factory):
    """``make(params, **kw)``: a DistributedOptimizer, worker 0 of 1, on a fresh 1-shard async job."""
    with cluster_factory(1, 1, "async") as cl:
        opts: list[DistributedOptimizer] = []

        def make(params, lr: float = 0.1, **kw) -> DistributedOptimizer:
            opts.append(DistributedOptimizer(params, lr=lr, servers=cl.endpoints, worker_id=0, num_workers=1, **kw))
            return opts[-1]

        make.endpoints = cl.endpoints
        yield make
        for o in opts:
            o.close()


# --- parameters that are not views of the weight buffer (the path CUDA parameters take) --------


@pytest.mark.timeout(60)
def test_float64_and_bfloat16_parameters(one_worker):
    ours, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = one_worker(ours.parameters(), weight_decay=5e-3)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    train(ours, opt, 15, dtype=torch.float64)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=5e-3), 15, dtype=torch.float64)
    assert_same(ours, ref)  # the shard's float32 rounding stays far below 1e-6 here
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert shard_version(opt) == 15
    opt.close()

    # bfloat16: the same shapes are the same job; it receives the shards' weights rounded to bfloat16
    model = mlp(seed=5, dtype=torch.bfloat16)
    opt = one_worker(model.parameters(), lr=0.05)
    w0 = opt.client.pull()
    x, y = next(batches(1, torch.bfloat16))
    loss_of(model, x, y).backward()
    g = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    opt.step()
    w1 = opt.client.pull()
    torch.testing.assert_close(w1, w0 - 0.05 * g, rtol=0, atol=1e-7)  # the shard keeps float32 master weights
    for p, lo in zip(model.parameters(), opt.layout.offsets, strict=True):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), w1[lo : lo + p.numel()].view(p.shape).to(torch.bfloat16))


@pytest.mark.timeout(60)
def test_converting_the_model_after_construction_keeps_pull_and_step_working(one_worker):
    def convnet() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    ours, ref = convnet(), convnet()
    opt = one_worker(ours.parameters())
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    ours.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    opt.pull()
    assert ours[0].weight.is_contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    for step, (x, y) in enumerate(data):
        if step == 3:  # a dtype change mid-run: same values, new storage
            ours.to(torch.float64)
            ref.to(torch.float64)
            opt.pull()
        for model, o in ((ours, opt), (ref, sgd)):
            o.zero_grad()
            loss_of(model, x.to(model[0].weight.dtype), y).backward()
            o.step()
    assert ours[0].weight.dtype == torch.float64
    assert_same(ours, ref)
    assert shard_version(opt) == 6


# --- learning rates: warm-up from 0, one-cycle, momentum --------------------------------------


@pytest.mark.timeout(60)
def test_lr_schedulers_match_sgd(one_worker):
    """Warm-up from lr = 0, then OneCycleLR and CyclicLR with cycle_momentum=False; momentum refused."""
    for kw in ({"momentum": 0.9}, {"nesterov": True}):
        with pytest.raises(ValueError, match=r"dcasgd server --momentum MU.*cycle_momentum=False"):
            DistributedOptimizer(mlp().parameters(), lr=0.1, servers=one_worker.endpoints, worker_id=0,
                                 num_workers=1, **kw)  # fmt: skip
    ours, ref = mlp(), mlp()
    before = [p.detach().clone() for p in ours.parameters()]
    opt = one_worker(ours.parameters(), lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    pair = ((ours, opt), (ref, sgd))

    def run(scheds: list, steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            for (model, o), sched in zip(pair, scheds, strict=True):
                o.zero_grad()
                loss_of(model, x, y).backward()
                o.step()
                sched.step()

    warmup = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, step / 5)) for _, o in pair]
    assert opt.param_groups[0]["lr"] == 0.0
    run(warmup, 1, seed=1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ours.parameters(), before, strict=True))  # a zero step
    run(warmup, 9, seed=2)
    assert_same(ours, ref)
    assert shard_version(opt) == 10

    for make in (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=30),
                 lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.5)):  # fmt: skip
        with pytest.raises(ValueError, match="optimizer must support momentum"):  # torch's own refusal
            make(opt)
    run([torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=30, cycle_momentum=False) for _, o in pair],
        30, seed=3)  # fmt: skip
    assert_same(ours, ref)
    run([torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=4, cycle_momentum=False)
         for _, o in pair], 10, seed=4)  # fmt: skip
    assert_same(ours, ref)
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        opt.param_groups[0]["lr"] = -0.1
        opt.step()


# --- AMP, clipping, torch.compile ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_grad_scaler_and_clipping_match_sgd(one_worker):
    ours, ref = mlp(), mlp()
    opt = one_worker(ours.parameters(), weight_decay=1e-3)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=1e-3)
    scalers = {id(opt): torch.amp.GradScaler("cpu"), id(sgd): torch.amp.GradScaler("cpu")}
    for step, (x, y) in enumerate(batches(8)):
        for model, o in ((ours, opt), (ref, sgd)):
            scaler = scalers[id(o)]
            o.zero_grad()
            loss = loss_of(model, x, y) * (float("inf") if step == 4 else 1.0)  # the scaler skips this step
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            scaler.step(o)
            scaler.update()
    assert_same(ours, ref)
    assert shard_version(opt) == 7  # 8 steps, the inf one skipped by the scaler, not pushed


@pytest.mark.timeout(90)
def test_torch_compile_matches_sgd(one_worker):
    ours, ref = mlp(), mlp()
    compiled = torch.compile(ours)  # inductor: about 10 s of compiling here with a cold cache
    opt = one_worker(compiled.parameters())
    train(compiled, opt, 5)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), 5)
    assert_same(ours, ref)
    assert shard_version(opt) == 5


# --- which parameters train: frozen, unused, sparse, added later --------------------------------


@pytest.mark.timeout(60)
def test_frozen_parameters_are_untouched_and_train_once_unfrozen(one_worker):
    ours, ref = mlp(), mlp()
    for model in (ours, ref):
        model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in ours[0].parameters()]
    opt = one_worker(ours.parameters(), weight_decay=0.01)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="requires_grad=False"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    train(ours, opt, 20)
    train(ref, sgd, 20)
    assert all(torch.equal(p.detach(), f) for p, f in zip(ours[0].parameters(), frozen, strict=True))
    assert_same(ours, ref)
    opt.zero_grad()
    now = [p.detach().clone() for p in ours.parameters()]
    opt.step()  # no backward: nothing has a gradient, nothing moves (weight decay included)
    assert all(torch.equal(p.detach(), n) for p, n in zip(ours.parameters(), now, strict=True))
    for model in (ours, ref):
        model[0].requires_grad_(True)
    train(ours, opt, 5)
    train(ref, sgd, 5)
    assert not torch.equal(ours[0].weight.detach(), frozen[0])
    assert_same(ours, ref)


@pytest.mark.timeout(60)
def test_sparse_embedding_gradients_match_sgd(one_worker):
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 6, sparse=True), nn.Flatten(), nn.Linear(4 * 6, 3))

    ours, ref = model(), model()
    opt = one_worker(ours.parameters())
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        x, y = torch.randint(0, 50, (8, 4), generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for m, o in ((ours, opt), (ref, sgd)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    assert ours[0].weight.grad.is_sparse
    assert_same(ours, ref)


# --- resuming: what is refused and the recipe that works ----------------------------------------


@pytest.mark.timeout(60)
def test_resume_checkpoint_before_construction_works_and_after_is_refused(one_worker):
    ckpt = {k: v + 0.5 for k, v in mlp(seed=7).state_dict().items()}
    ours, ref = mlp(), mlp()
    ours.load_state_dict(ckpt)
    ref.load_state_dict(ckpt)
    opt = one_worker(ours.parameters())  # worker 0 initializes the fresh job with the checkpoint
    assert torch.equal(ours[0].weight.detach(), ckpt["0.weight"])
    train(ours, opt, 5)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), 5)
    assert_same(ours, ref)

    # Loaded after construction: refused before anything is pushed, for views of the weight
    # buffer (float32) and for copies (float64, the path of parameters on a GPU).
    for dtype in (torch.float32, torch.float64):
        if opt is None:
            ours = mlp(dtype=dtype)
            opt = one_worker(ours.parameters())
        ours.load_state_dict(ckpt)
        x, y = next(batches(1, dtype))
        loss_of(ours, x, y).backward()
        version = shard_version(opt)
        with pytest.raises(DcasgdError, match=r"load it into the model before building the optimizer.*--resume"):
            opt.step()
        assert shard_version(opt) == version  # nothing was pushed
        assert torch.equal(ours[0].weight.detach(), ckpt["0.weight"].to(dtype))  # the loaded weights are still there
        opt.pull()  # the way to drop the change: the shards' weights again, and steps go on
        assert not torch.equal(ours[0].weight.detach(), ckpt["0.weight"].to(dtype))
        opt.step()
        assert shard_version(opt) == version + 1
        opt.close()
        opt = None


# --- misuse refused at once ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_misuse_is_refused_at_once(one_worker):
    model = mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match=r"share one lr.*\[0.01, 0.1\] at construction"):
        one_worker(groups)
    assert not fetch_stats(one_worker.endpoints[0])["initialized"]  # refused before anything reached the shards
    opt = one_worker(model.parameters())
    with pytest.raises(DcasgdError, match="worker 0 of these servers already has a live DistributedOptimizer"):
        one_worker(mlp().parameters())
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt.close()
    opt.close()  # twice is fine
    for call in (opt.step, opt.pull):
        with pytest.raises(DcasgdError, match="closed"):
            call()
    opt2 = one_worker(groups)  # the id is free again once closed
    opt2.param_groups[1]["lr"] = 0.5  # as a scheduler with per-group factors would
    with pytest.raises(ValueError, match=r"share one lr.*at this step \(a scheduler set them\?\)"):
        opt2.step()


@pytest.mark.timeout(60)
def test_named_and_unnamed_workers_and_dtypes_join_one_job(cluster_factory):
    with cluster_factory(1, 2, "async") as cl:
        job = dict(servers=cl.endpoints, num_workers=2)
        a, b = mlp(seed=1), mlp(seed=2, dtype=torch.float64)
        opt_a = DistributedOptimizer(a.named_parameters(), lr=0.1, worker_id=0, **job)
        opt_b = DistributedOptimizer(b.parameters(), lr=0.1, worker_id=1, **job)  # unnamed, float64: same job
        assert all(torch.equal(p.double(), q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
        opt_b.close()
        with pytest.raises(DcasgdError, match=r"parameter '0.weight' has shape \[32, 8\] instead of \[16, 8\]"):
            DistributedOptimizer(mlp(hidden=32).parameters(), lr=0.1, worker_id=1, **job)  # names from the job
        opt_a.close()


def test_layout_identity_is_shapes_and_names_only_label():
    named = FlatLayout.from_shapes([("w", (3, 2)), ("b", (3,))])
    unnamed = FlatLayout.from_shapes([("", (3, 2)), ("", (3,))])
    assert named.fingerprint == unnamed.fingerprint
    wider = FlatLayout.from_shapes([("", (4, 2)), ("", (4,))])
    assert named.describe_difference(wider) == "parameter 'w' has shape [4, 2] instead of [3, 2]"
    assert unnamed.describe_difference(wider) == "parameter #0 has shape [4, 2] instead of [3, 2]"
    longer = FlatLayout.from_shapes([("w", (3, 2)), ("b", (3,)), ("c", (1,))])
    assert named.describe_difference(longer) == "3 parameters instead of 2"
    swapped = FlatLayout.from_shapes([("b", (3,)), ("w", (3, 2))])
    assert named.describe_difference(swapped) == "parameter 'b' has shape [3] instead of [3, 2]"


# --- PyTorch Lightning ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_lightning_trainer_matches_sgd(one_worker):
    lightning = pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[test]')")

    class Module(lightning.LightningModule):
        def __init__(self, make_opt: Callable[..., torch.optim.Optimizer]) -> None:
            super().__init__()
            self.net = mlp()
            self.make_opt = make_opt

        def training_step(self, batch, batch_idx):
            return loss_of(self.net, *batch)

        def configure_optimizers(self):
            return self.make_opt(self.net.parameters())

    data = list(batches(12))
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    module = Module(lambda params: one_worker(params, lr=0.1))
    trainer = lightning.Trainer(max_steps=12, accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    ref = mlp()
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), 12)
    assert_same(module.net, ref)
    assert shard_version(trainer.optimizers[0]) == 12
