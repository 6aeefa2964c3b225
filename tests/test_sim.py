"""The virtual cluster (dcasgd.sim): deterministic, driven through ShardState, staleness as designed,
and the staleness study's script end to end on a tiny setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcasgd import rules, sim
from dcasgd.shard import ShardState
from dcasgd.sim import CnnModel, MlpModel, SimConfig, simulate

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"epochs": 0.5, "batch_size": 16, "lr": 0.1}  # 42 gradients: a fraction of a second


def run(**fields) -> sim.SimResult:
    return simulate(SimConfig(**{**SHORT, **fields}))


def test_same_config_gives_bitwise_the_same_run():
    config = SimConfig(
        **SHORT, workers=5, mode="dcasgd-a", compute="straggler", shards=2, seed=3, eval_every=1.0, weight_decay=1e-4
    )
    a, b = simulate(config), simulate(config)
    assert torch.equal(a.weights, b.weights)
    assert a.history == b.history and len(a.history) > 3
    assert a.staleness == b.staleness
    assert {k: v for k, v in a.to_dict().items() if k != "wall_seconds"} == {
        k: v for k, v in b.to_dict().items() if k != "wall_seconds"
    }
    other_seed = simulate(SimConfig(**{**config.__dict__, "seed": 4}))
    assert not torch.equal(a.weights, other_seed.weights)


def test_the_server_side_is_shard_state(monkeypatch):
    calls = {"check": 0, "push": 0}
    check, push = ShardState.check, ShardState.push

    def counting_check(self, req):
        calls["check"] += 1
        return check(self, req)

    def counting_push(self, req, grad, now):
        calls["push"] += 1
        assert req.op == "push_pull" and req.seq == self.last_seq[req.worker] + 1 and req.lr == SHORT["lr"]
        return push(self, req, grad, now)

    monkeypatch.setattr(ShardState, "check", counting_check)
    monkeypatch.setattr(ShardState, "push", counting_push)
    result = run(workers=3, mode="dcasgd", shards=2)
    assert calls["push"] == result.gradients * 2
    # every op is checked first: per shard one init, one pull per worker, every push
    assert calls["check"] == 2 * (1 + 3 + result.gradients)


def test_one_worker_is_never_stale():
    result = run(workers=1, mode="async")
    assert result.staleness == {0: result.gradients}
    assert result.updates == result.gradients


def test_equal_compute_times_give_staleness_m_minus_1_in_steady_state():
    m = 4
    result = run(workers=m, mode="dcasgd-a")
    # the first round pushes at staleness 0, 1, ..., M-1, then every push is M-1 stale
    assert result.staleness == {**{k: 1 for k in range(m - 1)}, m - 1: result.gradients - (m - 1)}
    assert result.max_staleness == m - 1


def test_sync_mode_is_never_stale_and_steps_once_per_round():
    m = 4
    result = run(workers=m, mode="sync", compute="jitter")
    assert result.staleness == {0: result.gradients}
    assert result.gradients % m == 0
    assert result.updates == result.gradients // m


def test_a_straggler_makes_pushes_staler():
    equal = run(workers=4, mode="async", epochs=2.0)
    straggler = run(workers=4, mode="async", epochs=2.0, compute="straggler", straggler_k=4.0, stragglers=1)
    assert straggler.max_staleness > equal.max_staleness
    assert straggler.max_staleness >= 8  # about k*(M-1) - 1 updates by the others per slow batch


@pytest.mark.parametrize("workers", [3, 8])
def test_per_parameter_ablation_differs_from_per_worker(workers):
    per_worker = run(workers=workers, mode="dcasgd-a")
    per_parameter = run(workers=workers, mode="dcasgd-a", compensation="per-parameter")
    gap = (per_worker.weights - per_parameter.weights).abs().max().item()
    assert gap > 1e-4
    asgd = run(workers=workers, mode="async")
    assert (per_worker.weights - asgd.weights).abs().max().item() > 1e-4, "compensation had no effect"


def test_one_worker_async_is_sequential_sgd():
    """M=1 through the shard is plain SGD on the same minibatches: w -= lr * g."""
    result = run(workers=1, mode="async", epochs=0.1)
    model = MlpModel(32)
    x, y, _, _ = sim.digits()
    w = model.init(torch.Generator().manual_seed(0))
    batches = sim._Batches(len(y), SHORT["batch_size"], 0, 0)
    g = torch.empty_like(w)
    for _ in range(result.gradients):
        b = batches.next()
        model.grad(w, x[b], y[b], g)
        w.add_(g, alpha=-SHORT["lr"])
    assert torch.equal(result.weights, w)


def test_sharding_does_not_change_the_math():
    one = run(workers=4, mode="dcasgd-a", shards=1, compute="jitter")
    three = run(workers=4, mode="dcasgd-a", shards=3, compute="jitter")
    torch.testing.assert_close(one.weights, three.weights, rtol=1e-5, atol=1e-6)
    assert one.staleness == three.staleness


@pytest.mark.parametrize("hidden", [0, 16])
def test_hand_written_gradient_matches_autograd(hidden):
    model = MlpModel(hidden)
    x, y, _, _ = sim.digits()
    w = model.init(torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)) if hidden else nn.Linear(64, 10)
    names = [name for name, _ in net.named_parameters()]
    assert tuple(names) == model.layout.names
    with torch.no_grad():
        for p, v in zip(net.parameters(), model.views(w), strict=True):
            p.copy_(v)
    F.cross_entropy(net(x[:40]), y[:40]).backward()
    expected = torch.cat([p.grad.flatten() for p in net.parameters()])
    got = torch.empty_like(w)
    model.grad(w, x[:40], y[:40], got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cnn_is_the_same_network_as_torch_modules():
    """CnnModel's layout, initialisation rule, logits and gradient against an nn.Sequential with its weights."""
    model = CnnModel()
    x, y, _, _ = sim.digits()
    w = model.init(torch.Generator().manual_seed(1))
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    assert tuple(name for name, _ in net.named_parameters()) == model.layout.names
    for p, v in zip(net.parameters(), model.views(w), strict=True):
        bound = 1.0 / p[0].numel() ** 0.5 if p.dim() > 1 else None  # nn's default: U(-1/sqrt(fan_in), ...)
        if bound is not None:
            assert 0.9 * bound < v.abs().max().item() <= bound
        with torch.no_grad():
            p.copy_(v)
    logits = net(x[:40].view(-1, 1, 8, 8))
    torch.testing.assert_close(model.logits(w, x[:40]), logits, rtol=1e-5, atol=1e-6)
    F.cross_entropy(logits, y[:40]).backward()
    expected = torch.cat([p.grad.flatten() for p in net.parameters()])
    got = torch.empty_like(w)
    model.grad(w, x[:40], y[:40], got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not w.requires_grad


def test_cnn_runs_are_deterministic_and_learn():
    config = SimConfig(**SHORT, workers=4, mode="dcasgd-s", model="cnn", compute="jitter", shards=2)
    a, b = simulate(config), simulate(config)
    assert torch.equal(a.weights, b.weights) and a.weights.numel() == CnnModel().numel
    assert a.to_dict()["config"]["model"] == "cnn"
    assert a.final_accuracy > a.history[0][2] + 0.2


def test_history_records_test_accuracy_on_the_virtual_clock():
    result = run(workers=4, mode="async", eval_every=2.0)
    times = [t for t, _, _ in result.history]
    assert times[0] == 0.0 and times == sorted(times)
    assert times[1:4] == [2.0, 4.0, 6.0]
    assert result.history[-1] == (result.virtual_time, result.updates, result.final_accuracy)
    assert all(0.0 <= acc <= 1.0 for _, _, acc in result.history)
    assert result.final_accuracy > result.history[0][2] + 0.1  # it learns something within half an epoch


def _one_worker_overlap_reference(mode: str, steps: int, **rule) -> tuple[torch.Tensor, torch.Tensor]:
    """M=1 with overlap by hand, in the shard's float32 arithmetic: gradient k is computed on the
    weights before the last update (w_{k-2}; the first two on w_0) and compensated against them.
    Returns (weights, the weights had the compensation used the newest weights sent instead)."""
    model = MlpModel(32)
    x, y, _, _ = sim.digits()
    w0 = model.init(torch.Generator().manual_seed(0))
    results = []
    for wrong in (False, True):
        batches = sim._Batches(len(y), SHORT["batch_size"], 0, 0)
        versions = [w0.clone()]  # versions[v]: the weights after v updates
        w, ms = w0.clone(), torch.zeros_like(w0)
        g = torch.empty_like(w0)
        for k in range(steps):
            base = max(k - 1, 0)  # push k+1 (1-based) was computed on version k-1
            b = batches.next()
            model.grad(versions[base], x[b], y[b], g)
            bak = versions[k] if wrong else versions[base]
            if mode == "async":
                rules.asgd_step(w, g, lr=SHORT["lr"])
            elif mode == "dcasgd":
                rules.dcasgd_step(w, g, bak, lr=SHORT["lr"], **rule)
            else:
                rules.dcasgd_adaptive_step(w, g, bak, ms, lr=SHORT["lr"], **rule)
            versions.append(w.clone())
        results.append(w)
    return results[0], results[1]


@pytest.mark.parametrize("mode", ["async", "dcasgd", "dcasgd-a"])
def test_one_worker_with_overlap_is_sgd_one_step_delayed_compensated_against_the_named_version(mode):
    """M=1 with overlap: w_{k+1} = w_k - lr * d(g(w_{k-1})), the compensation against w_{k-1} (the
    version the push names), not w_k (the newest the shard sent). The shard runs the fused kernel,
    the reference the torch rules: equal to float32 rounding, and far from the wrong backup."""
    rule = {"lam": 1.0} if mode == "dcasgd" else {}  # a large lambda makes a wrong backup visible
    result = run(workers=1, mode=mode, epochs=0.1, overlap=True, **rule)
    expected, wrong_backup = _one_worker_overlap_reference(mode, result.gradients, **rule)
    torch.testing.assert_close(result.weights, expected, rtol=1e-5, atol=1e-6)
    assert result.staleness == {0: 1, **({1: result.gradients - 1} if result.gradients > 1 else {})}
    if mode != "async":
        gap = float((expected - wrong_backup).abs().max())
        assert gap > 1e-5, f"the reference does not tell the two backups apart ({gap})"  # 10x the tolerance
    assert not torch.equal(result.weights, run(workers=1, mode=mode, epochs=0.1, **rule).weights)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_overlap_makes_every_push_one_round_staler_with_equal_compute(m):
    # Without overlap a push is M-1 versions stale in steady state; with overlap its gradient is one
    # reply older, and the M pushes in between (its own included) make it 2M-1: the histogram of
    # 2M workers without overlap.
    plain = run(workers=m, mode="async")
    overlapped = run(workers=m, mode="async", overlap=True)
    assert plain.gradients == overlapped.gradients
    assert plain.staleness == {**{k: 1 for k in range(m - 1)}, m - 1: plain.gradients - (m - 1)}
    assert overlapped.staleness == {**{k: 1 for k in range(2 * m - 1)}, 2 * m - 1: plain.gradients - (2 * m - 1)}
    if 2 * m <= sim.MAX_WORKERS:
        assert overlapped.staleness == run(workers=2 * m, mode="async").staleness


@pytest.mark.parametrize("mode", ["dcasgd", "dcasgd-a"])
def test_overlapped_pushes_name_the_weights_before_the_newest_and_dc_uses_them(monkeypatch, mode):
    # From its second push on, an overlapped worker computes on the weights sent before the newest:
    # every push names that version with keep=2, the shard keeps it (check() raises bad_base
    # otherwise), and the backup the shard compensates against is bit for bit that version.
    m, shards = 3, 2
    seen = {"pushes": 0, "previous": 0}
    push = ShardState.push
    versions: dict[tuple[int, int], torch.Tensor] = {}  # (shard, version) -> its weights

    def spying_push(self, req, grad, now):
        seen["pushes"] += 1
        versions.setdefault((self.config.shard, 0), self.w.clone())  # the initial weights
        assert req.keep == 2 and req.base is not None
        newest = req.base == self.received_version[req.worker]
        seen["previous"] += not newest
        held = (self.backup if newest else self.previous)[req.worker]
        assert held.version == req.base
        assert torch.equal(held.tensor, versions[(self.config.shard, req.base)])
        replies = push(self, req, grad, now)
        versions[(self.config.shard, self.version)] = self.w.clone()
        return replies

    monkeypatch.setattr(ShardState, "push", spying_push)
    result = run(workers=m, mode=mode, shards=shards, overlap=True, compute="jitter")
    assert seen["pushes"] == shards * result.gradients
    # every push but each worker's first names the weights sent before the newest (the second
    # names the pulled weights, which the first push's reply made the previous ones)
    assert seen["previous"] == shards * (result.gradients - m)
    assert result.final_accuracy > 0.2


def test_overlap_is_deterministic_and_differs_from_no_overlap():
    config = SimConfig(**SHORT, workers=4, mode="dcasgd-a", compute="straggler", shards=2, overlap=True)
    a, b = simulate(config), simulate(config)
    assert torch.equal(a.weights, b.weights) and a.staleness == b.staleness
    plain = simulate(SimConfig(**{**config.__dict__, "overlap": False}))
    assert not torch.equal(a.weights, plain.weights)
    assert a.mean_staleness > plain.mean_staleness


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workers": 0}, "workers must be in"),
        ({"workers": 65}, "workers must be in"),
        ({"mode": "adam"}, "Invalid mode"),
        ({"compute": "fast"}, "compute must be one of"),
        ({"compensation": "none"}, "compensation must be one of"),
        ({"lr": 0.0}, "Invalid learning rate"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"compute": "straggler", "workers": 2, "stragglers": 3}, "stragglers must be in"),
        ({"mode": "sync", "overlap": True}, "overlap=True needs an asynchronous mode"),
        ({"model": "resnet"}, "model must be one of"),
    ],
)
def test_config_refuses_invalid_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(**fields)


@pytest.mark.timeout(120)
def test_staleness_study_writes_json_and_png(tmp_path):
    out = tmp_path / "staleness"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "staleness.py")]
    cmd += ["--workers", "1", "4", "--seeds", "1", "--epochs", "0.3", "--jobs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "DC-ASGD-a per-parameter" in proc.stdout
    doc = json.loads((out / "staleness.json").read_text())
    methods = {(r["method"], r["workers"]) for r in doc["summary"]}
    assert ("SGD", 1) in methods and ("DC-ASGD-a", 4) in methods and ("SSGD", 4) in methods
    names = {r["method"] for r in doc["runs"]} - {"SGD"}
    assert len(names) >= 14 and len(doc["runs"]) == 1 + 2 * len(names)  # SGD, then every method at M = 1 and 4
    assert {(r["method"], r["workers"]) for r in doc["runs"]} == {("SGD", 1)} | {(m, w) for m in names for w in (1, 4)}
    assert ("DC-ASGD-f", 4) in methods and doc["goal"]["method"] == "DC-ASGD-f"  # the winner
    assert all(0.0 <= r["result"]["final_accuracy"] <= 1.0 for r in doc["runs"])
    for name in ("staleness.png", "staleness_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dcasgd_s_runs_sharded_with_momentum_and_overlap():
    """The staleness-scaled mode through the simulator: several shards give the same math as one."""
    base = dict(workers=4, mode="dcasgd-s", epochs=0.5, momentum=0.5, overlap=True)
    one, three = simulate(SimConfig(**base)), simulate(SimConfig(**base, shards=3))
    torch.testing.assert_close(one.weights, three.weights, rtol=1e-5, atol=1e-6)
    assert not one.diverged and one.max_staleness == 7


def test_a_refused_gradient_ends_the_run_as_diverged():
    """A DC run that blows up (a huge lr) ends on the shard's refusal, marked diverged, instead of raising."""
    res = simulate(SimConfig(workers=4, mode="dcasgd-a", lr=1e6, epochs=2.0))
    assert res.diverged and res.gradients < SimConfig(epochs=2.0).total_gradients(len(sim.digits()[1]))
    assert res.to_dict()["diverged"] is True and 0.0 <= res.final_accuracy <= 1.0


@pytest.mark.timeout(120)
def test_staleness_study_on_cifar10_resnet20_from_a_data_dir(tmp_path):
    """--data-dir: ResNet-20 (examples/resnet.py) on CIFAR-10 in its python-pickle format (a tiny
    random set written by examples/make_cifar_fixture.py; no network), end to end."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_cifar_fixture import write_cifar10
    finally:
        sys.path.remove(str(ROOT / "examples"))
    write_cifar10(tmp_path / "data", train_batches=2, per_batch=16, test=24)
    out = tmp_path / "staleness"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "staleness.py"), "--data-dir", str(tmp_path / "data")]
    cmd += ["--workers", "2", "--seeds", "1", "--methods", "DC-ASGD-s", "--batch-size", "8", "--epochs", "0.5"]
    proc = subprocess.run(cmd + ["--jobs", "1", "--out", str(out)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "model resnet20 (CIFAR-10)" in proc.stdout
    doc = json.loads((out / "staleness.json").read_text())
    assert doc["settings"]["data_dir"] == str(tmp_path / "data") and doc["settings"]["batch_size"] == 8
    assert [(r["method"], r["workers"], r["result"]["gradients"]) for r in doc["runs"]] == [
        ("SGD", 1, 2),
        ("DC-ASGD-s", 2, 2),
    ]  # 32 images, batch 8, half an epoch
    for r in doc["runs"]:
        acc = r["result"]["final_accuracy"]
        assert acc * 24 == round(acc * 24)  # a fraction of the 24 test images


def test_resnet20_through_the_simulator_model():
    """TorchModel: ResNet-20's parameters as one flat vector, autograd's gradient, the module's own init."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import staleness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = staleness.resnet20_model()
    w = model.init(torch.Generator().manual_seed(5))
    assert w.numel() == model.numel == sum(p.numel() for p in model.module.parameters())
    assert torch.equal(w, model.init(torch.Generator().manual_seed(5)))
    assert not torch.equal(w, model.init(torch.Generator().manual_seed(6)))
    model.init(torch.Generator().manual_seed(5))
    x, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 3, 9, 3])
    got = torch.empty_like(w)
    model.grad(w, x, y, got)
    net = model.make()
    with torch.no_grad():
        for p, v in zip(net.parameters(), model.views(w), strict=True):
            p.copy_(v)
    net.train()
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from cifar10_data import normalize
    finally:
        sys.path.remove(str(ROOT / "examples"))
    F.cross_entropy(net(normalize(x)), y).backward()
    torch.testing.assert_close(got, torch.cat([p.grad.flatten() for p in net.parameters()]), rtol=1e-4, atol=1e-6)
    assert 0.0 <= model.accuracy(w, x, y) <= 1.0
