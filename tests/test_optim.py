"""DistributedOptimizer against torch.optim.SGD, through real shard processes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dcasgd import DcasgdError, DistributedOptimizer
from dcasgd.env import JobConfigError


def small_model(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, scheduler=None) -> None:
    for x, y in batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shards", [1, 2])
def test_one_async_worker_matches_torch_sgd(cluster_factory, shards):
    ours, ref = small_model(), small_model()
    with cluster_factory(shards, 1, "async") as cl:
        opt = DistributedOptimizer(ours.parameters(), lr=0.1, weight_decay=5e-3, servers=cl.endpoints,
                                   worker_id=0, num_workers=1)  # fmt: skip
        sgd = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=5e-3)
        sched_ours = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        sched_ref = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
        train(ours, opt, 12, sched_ours)
        train(ref, sgd, 12, sched_ref)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
        assert isinstance(opt, torch.optim.Optimizer)
        assert sum(s["version"] for s in opt.client.stats()) == 12 * shards
        opt.close()


@pytest.mark.timeout(60)
def test_environment_configures_the_workers_and_worker_0_initializes(cluster_factory, monkeypatch):
    with cluster_factory(2, 2, "dcasgd-a") as cl:
        monkeypatch.setenv("DCASGD_SERVERS", ",".join(cl.endpoints))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        a = small_model(seed=1)
        opt_a = DistributedOptimizer(a.parameters(), lr=0.05)
        monkeypatch.setenv("RANK", "1")
        b = small_model(seed=2)  # other initial weights: worker 0's win
        opt_b = DistributedOptimizer(b.parameters(), lr=0.05)
        assert (opt_a.worker_id, opt_b.worker_id, opt_b.num_workers) == (0, 1, 2)
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
        train(b, opt_b, 3)
        opt_a.pull()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
        opt_a.close()
        opt_b.close()


def test_missing_settings_name_the_variable(monkeypatch):
    for name in ("DCASGD_SERVERS", "DCASGD_WORKER_ID", "RANK", "SLURM_PROCID", "DCASGD_NUM_WORKERS", "WORLD_SIZE",
                 "SLURM_NTASKS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    params = small_model().parameters()
    with pytest.raises(JobConfigError, match="DCASGD_SERVERS"):
        DistributedOptimizer(params, lr=0.1)
    monkeypatch.setenv("DCASGD_SERVERS", "tcp://127.0.0.1:1")
    with pytest.raises(JobConfigError, match="DCASGD_WORKER_ID, RANK or SLURM_PROCID"):
        DistributedOptimizer(small_model().parameters(), lr=0.1)
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(JobConfigError, match="DCASGD_NUM_WORKERS, WORLD_SIZE or SLURM_NTASKS"):
        DistributedOptimizer(small_model().parameters(), lr=0.1)
    monkeypatch.setenv("SLURM_NTASKS", "x")
    with pytest.raises(JobConfigError, match="SLURM_NTASKS='x' is not an integer"):
        DistributedOptimizer(small_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        DistributedOptimizer(small_model().parameters(), lr=-0.1)


@pytest.mark.timeout(60)
def test_a_worker_with_another_model_is_told_how_it_differs(cluster_factory):
    with cluster_factory(1, 2, "async") as cl:
        job = dict(servers=cl.endpoints, num_workers=2)
        opt0 = DistributedOptimizer(small_model().named_parameters(), lr=0.1, worker_id=0, **job)
        with pytest.raises(DcasgdError, match=r"parameter '0.weight' has shape \[32, 8\] instead of \[16, 8\]"):
            DistributedOptimizer(small_model(hidden=32).named_parameters(), lr=0.1, worker_id=1, **job)
        opt0.close()


@pytest.mark.timeout(60)
def test_parameters_without_gradient_count_as_zero_and_state_dict_round_trips(cluster_factory):
    with cluster_factory(1, 1, "async") as cl:
        model = small_model()
        frozen_before = model[2].bias.detach().clone()
        opt = DistributedOptimizer(model.parameters(), lr=0.1, servers=cl.endpoints, worker_id=0, num_workers=1)
        x, y = next(batches(1))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model[:2](x) @ model[2].weight.T, y).backward()  # bias gets no gradient
        assert model[2].bias.grad is None
        opt.step()
        assert torch.equal(model[2].bias.detach(), frozen_before)
        state = copy.deepcopy(opt.state_dict())
        opt.param_groups[0]["lr"] = 0.5
        opt.load_state_dict(state)
        assert opt.param_groups[0]["lr"] == 0.1
        opt.close()
