"""``dcasgd export``: the trained model out of live shards or their checkpoints, into a file that loads anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dcasgd import DistributedOptimizer, RuleConfig
from dcasgd.cli import main
from dcasgd.client import fetch_stats
from dcasgd.export import Export, ExportError, tensors
from dcasgd.layout import fingerprint, flat_fingerprint
from dcasgd.protocol import BAD_FRAMES, NOT_INITIALIZED, PROTOCOL_VERSION, ProtocolError, Request, validate_request
from dcasgd.shard import ShardConfig, ShardState


class Net(nn.Module):
    """A small CNN with several named parameters of different shapes (no buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def trained_job(endpoints: list[str], named: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a Net for a few steps on the shards; the weights ``opt.pull()`` gives, by name."""
    torch.manual_seed(seed)
    model = Net()
    params = model.named_parameters() if named else model.parameters()
    opt = DistributedOptimizer(params, lr=0.1, servers=endpoints, worker_id=0, num_workers=1)
    try:
        train(model, opt)
        assert set(opt.state_dict()) == {"state", "param_groups"}  # the optimizer's, not the model
        opt.pull()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        opt.close()


def export(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_loads_exactly(path, expected: dict[str, torch.Tensor]) -> None:
    fresh = Net()
    state = load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    fresh.load_state_dict(state)  # strict: every name and shape
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.timeout(180)  # shard processes start slowly on a loaded machine
def test_export_from_live_shards_and_from_checkpoints_gives_the_pulled_weights(
    cluster_factory, tmp_path, capsys, monkeypatch
):
    ckpt = tmp_path / "ckpt"
    with cluster_factory(2, 1, "dcasgd-a", "--checkpoint-dir", str(ckpt)) as cl:
        expected = trained_job(cl.endpoints)
        versions = [fetch_stats(ep)["version"] for ep in cl.endpoints]
        code, out, err = export(*cl.endpoints, "-o", str(tmp_path / "live.safetensors"), capsys=capsys)
        assert (code, err) == (0, ""), err
        assert f"at versions {versions}" in out and "live shards" in out
        assert_loads_exactly(tmp_path / "live.safetensors", expected)
        with safe_open(str(tmp_path / "live.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["mode"] == "dcasgd-a" and meta["source"] == "shards" and meta["format"] == "pt"
        assert json.loads(meta["versions"]) == versions and meta["num_shards"] == "2"
        shapes = [p.shape for p in Net().parameters()]
        assert meta["fingerprint"] == fingerprint(shapes) and meta["n"] == str(sum(s.numel() for s in shapes))
        code, _, err = export(*cl.endpoints, "-o", str(tmp_path / "live.pt"), capsys=capsys)
        assert code == 0, err
        assert_loads_exactly(tmp_path / "live.pt", expected)
        monkeypatch.setenv("DCASGD_SERVERS", ",".join(cl.endpoints))  # no endpoints: the job's environment
        code, _, err = export("-o", str(tmp_path / "env.safetensors"), capsys=capsys)
        assert code == 0, err
        assert_loads_exactly(tmp_path / "env.safetensors", expected)
        assert [fetch_stats(ep)["version"] for ep in cl.endpoints] == versions  # reading moved nothing
    # Stopped (SIGTERM): each shard wrote a last checkpoint.
    code, out, err = export("--checkpoint-dir", str(ckpt), "-o", str(tmp_path / "ckpt.safetensors"), capsys=capsys)
    assert (code, err) == (0, ""), err
    assert f"at versions {versions}" in out and "checkpoints" in out
    assert_loads_exactly(tmp_path / "ckpt.safetensors", expected)
    with safe_open(str(tmp_path / "ckpt.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["source"] == "checkpoints" and json.loads(meta["versions"]) == versions
    assert len(json.loads(meta["created"])) == 2

    # A set written at different moments is refused, naming the files; --max-skew takes it.
    code, out, err = export(
        "--checkpoint-dir", str(ckpt), "--max-skew", "0", "-o", str(tmp_path / "x.safetensors"), capsys=capsys
    )
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "written" in err and "apart" in err and "shard0-v" in err and "shard1-v" in err and "--max-skew" in err
    assert not (tmp_path / "x.safetensors").exists()
    # A missing shard's file.
    for p in ckpt.glob("shard1-*.ckpt"):
        p.unlink()
    code, _, err = export("--checkpoint-dir", str(ckpt), "-o", str(tmp_path / "x.safetensors"), capsys=capsys)
    assert code == 2 and "missing shards" in err and "shard1-v<version>.ckpt" in err, err


@pytest.mark.timeout(180)  # shard processes start slowly on a loaded machine
def test_shards_of_different_jobs_missing_shards_and_no_names_are_refused(cluster_factory, tmp_path, capsys):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    with (
        cluster_factory(2, 1, "dcasgd-a", "--checkpoint-dir", str(a_dir)) as a,
        cluster_factory(2, 1, "async", "--checkpoint-dir", str(b_dir)) as b,
    ):
        trained_job(a.endpoints)
        unnamed = trained_job(b.endpoints, named=False, seed=1)
        out = str(tmp_path / "m.safetensors")
        code, _, err = export(a.endpoints[0], b.endpoints[1], "-o", out, capsys=capsys)
        assert code == 2 and "shards of different jobs" in err and "mode dcasgd-a" in err and "mode async" in err, err
        code, _, err = export(a.endpoints[0], "-o", out, capsys=capsys)
        assert code == 2 and "missing shards: the job has 2 shards, 1 given" in err, err
        code, _, err = export(a.endpoints[1], a.endpoints[0], "-o", out, capsys=capsys)
        assert code == 2 and "listed as shard 0" in err, err
        # The workers of job b passed model.parameters(): no names.
        code, _, err = export(*b.endpoints, "-o", out, capsys=capsys)
        assert code == 2 and "no layout names" in err and "named_parameters()" in err and "--unnamed" in err, err
        assert not os.path.exists(out)
        code, _, err = export(*b.endpoints, "--unnamed", "-o", out, capsys=capsys)
        assert code == 0 and "warning" in err and "param0" in err, err
        by_position = load_file(out)
        assert set(by_position) == {f"param{i}" for i in range(6)}
        for i, (name, value) in enumerate(unnamed.items()):
            assert torch.equal(by_position[f"param{i}"], value), name
        # A suffix that names no format, or a missing directory, is a usage error.
        code, _, err = export(*a.endpoints, "-o", str(tmp_path / "m.bin"), capsys=capsys)
        assert code == 2 and ".safetensors" in err and err.count("\n") == 1, err
        code, _, err = export(*a.endpoints, "-o", str(tmp_path / "no" / "m.pt"), capsys=capsys)
        assert code == 2 and "there is no directory" in err and err.count("\n") == 1, err
    # A checkpoint of another job among the files.
    for p in a_dir.glob("shard1-*.ckpt"):
        p.unlink()
    for p in b_dir.glob("shard1-*.ckpt"):
        (a_dir / p.name).write_bytes(p.read_bytes())
    code, _, err = export("--checkpoint-dir", str(a_dir), "-o", str(tmp_path / "m.safetensors"), capsys=capsys)
    assert code == 2 and "shards of different jobs" in err and "mode" in err, err


@pytest.mark.timeout(60)
def test_the_command_line_refuses_in_one_line_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCASGD_")}
    run = [sys.executable, "-m", "dcasgd", "export"]
    r = subprocess.run(
        [*run, "--checkpoint-dir", str(tmp_path), "-o", "m.safetensors"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == f"dcasgd export: error: no checkpoint files (shard<S>-v<version>.ckpt) in {tmp_path}\n"
    r = subprocess.run([*run, "-o", "m.safetensors"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("dcasgd export: error: no servers") and r.stderr.count("\n") == 1


def test_the_weights_op_sends_float32_master_weights_and_moves_no_worker_state():
    """Over a bfloat16 wire the snapshots are rounded; an export gets the float32 weights, and no backup moves."""
    state = ShardState(ShardConfig(num_workers=2, rules=RuleConfig(mode="dcasgd"), wire_dtype="bfloat16"))
    # no worker id
    ask = validate_request({"v": PROTOCOL_VERSION, "rid": 3, "op": "weights"}, num_workers=2, payload_frames=0)
    with pytest.raises(ProtocolError, match="no weights yet") as refused:
        state.check(ask)
    assert refused.value.code == NOT_INITIALIZED
    with pytest.raises(ProtocolError) as refused:
        validate_request({"v": PROTOCOL_VERSION, "rid": 3, "op": "weights"}, num_workers=2, payload_frames=1)
    assert refused.value.code == BAD_FRAMES
    n = 5
    w = torch.tensor([1.0 + 2**-20, 2.0, 3.0, 4.0, 5.0 + 2**-18])
    fp = flat_fingerprint(n)
    req = Request(op="init", rid=1, worker=0, fp=fp, n=n, lo=0, hi=n, nbytes=4 * n, layout=[["w", [n]]])
    state.check(req)
    state.init(req, w)
    pulled = state.pull(0, rid=2)
    before = (state.backup[0], state.received_version[:], state.previous[:], state._answered[:], pulled.snapshot.refs)
    state.check(ask)
    reply = state.weights(None)
    assert torch.equal(reply.snapshot.tensor, w) and reply.snapshot.tensor.dtype == torch.float32
    assert not torch.equal(pulled.snapshot.tensor.float(), w)  # what a worker got was rounded
    assert reply.snapshot.tensor.data_ptr() != state.w.data_ptr()  # a copy: later updates do not reach it
    assert reply.fields["layout"] == [["w", [n]]] and reply.fields["fp"] == fp and reply.fields["version"] == 0
    after = (state.backup[0], state.received_version[:], state.previous[:], state._answered[:], pulled.snapshot.refs)
    assert after == before


def test_without_a_layout_unnamed_writes_one_flat_tensor():
    model = Export(
        flat=torch.arange(6.0),
        layout=None,
        identity={"n": 6, "fp": flat_fingerprint(6), "mode": "async", "num_shards": 1},
        versions=[3],
        source="shards",
        sources=["tcp://x"],
    )
    with pytest.raises(ExportError, match="no layout names"):
        tensors(model)
    named, warning = tensors(model, unnamed=True)
    assert list(named) == ["flat"] and torch.equal(named["flat"], torch.arange(6.0)) and "flat" in warning
