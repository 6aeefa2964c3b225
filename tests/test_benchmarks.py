"""The benchmarks (speedup, throughput, shard_load, step_overhead, ...) run small: real shards, the JSON and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(90)
def test_speedup_tiny_run_writes_json_and_plots(tmp_path):
    # One mode, two worker counts: the time is starting processes (about 6 s a run; 2 epochs train in
    # 0.1 s), so the real run is sync alone, the lockstep mode, which needs both workers to finish.
    # What compares modes (vs sync@1, the straggler check, both plots) is tested on given runs below.
    out = tmp_path / "speedup"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speedup.py"), "--workers", "1", "2", "--modes", "sync",
           "--epochs", "2", "--compute-ms", "0", "--target", "0.5", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=80, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads((out / "speedup.json").read_text())
    assert {"argv", "args", "machine", "summary", "straggler_check", "runs", "simulation"} <= report.keys()
    assert report["args"]["workers"] == [1, 2] and report["args"]["epochs"] == 2
    assert [(r["mode"], r["workers"], r["lr"]) for r in report["runs"]] == [("sync", 1, 0.1), ("sync", 2, 0.2)]
    for run in report["runs"]:
        assert run["exit_code"] == 0 and run["error"] is None
        assert len(run["per_worker"]) == run["workers"]
        assert run["curve"] and all(len(row) == 3 for row in run["curve"])
        assert run["final_accuracy"] > 0.5  # two epochs of digits
    for row in report["summary"]:
        assert {"time_to_target", "speedup", "speedup_vs_sync1", "final_accuracy"} <= row.keys()
        assert row["time_to_target"] is not None  # 0.5 is reached within two epochs
        assert row["speedup"] == pytest.approx(row["speedup_vs_sync1"])  # sync's own baseline is sync@1
    assert report["summary"][0]["speedup"] == pytest.approx(1.0)  # M=1 is its own baseline
    assert report["straggler_check"] is None  # no async mode to compare sync with
    for name in ("speedup.png", "accuracy_vs_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "speedup" in done.stdout and "final acc" in done.stdout


@pytest.mark.timeout(30)
def test_speedup_summary_straggler_check_and_plots_from_given_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speedup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def run(mode: str, m: int, t: float | None, train: float) -> dict:
        curve = [[0.0, 0.1, 0], [train, 0.9, 100 * m]] if t is None else [[0.0, 0.1, 0], [t, 0.9, 50 * m]]
        return {"mode": mode, "workers": m, "lr": 0.1, "time_to_target": t, "final_accuracy": 0.9,
                "train_seconds": train, "wall_seconds": train + 3, "curve": curve}  # fmt: skip

    a = speedup.parse_args(["--workers", "1", "2", "--modes", "async", "sync", "--straggler", "4", "--target", "0.8"])
    runs = [run("async", 1, 4.0, 5.0), run("async", 2, 2.0, 3.0), run("sync", 1, 5.0, 6.0), run("sync", 2, 10.0, 12.0)]
    rows = speedup.summarize(runs)
    assert [(r["mode"], r["workers"], r["speedup"], r["speedup_vs_sync1"]) for r in rows] == [
        ("async", 1, 1.0, 1.25), ("async", 2, 2.0, 2.5), ("sync", 1, 1.0, 1.0), ("sync", 2, 0.5, 0.5)
    ]  # fmt: skip
    check = speedup.straggler_check(rows, a)
    assert check["workers"] == 2 and check["sync_time_to_target"] == 10.0
    assert check["ratios"]["async"]["sync_over_mode"] == 5.0 and check["async_at_least_2x_sooner"] is True
    # sync never reached the target: its whole run over async's time is a lower bound (under 2x: no verdict)
    never = speedup.straggler_check(speedup.summarize([*runs[:3], run("sync", 2, None, 6.0)]), a)
    assert never["ratios"]["async"] == {"time_to_target": 2.0, "sync_over_mode": None, "sync_over_mode_at_least": 3.0}
    assert never["async_at_least_2x_sooner"] is True
    short = speedup.straggler_check(speedup.summarize([*runs[:3], run("sync", 2, None, 3.0)]), a)
    assert short["ratios"]["async"]["sync_over_mode_at_least"] == 1.5 and short["async_at_least_2x_sooner"] is None
    # async never reached it, sync did: the expectation fails
    slow = speedup.straggler_check(speedup.summarize([runs[0], run("async", 2, None, 9.0), *runs[2:]]), a)
    assert slow["ratios"]["async"]["time_to_target"] is None and slow["async_at_least_2x_sooner"] is False
    # without a straggler there is no verdict, only the ratios
    calm = speedup.straggler_check(rows, speedup.parse_args(["--workers", "1", "2", "--modes", "async", "sync"]))
    assert calm["ratios"]["async"]["sync_over_mode"] == 5.0 and calm["async_at_least_2x_sooner"] is None
    paths = speedup.plot(rows, runs, [], a, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "accuracy_vs_time.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


@pytest.mark.timeout(30)
def test_speedup_time_to_target_and_sync_lr():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speedup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    curve = [[0.0, 0.1, 0], [0.5, 0.94, 10], [1.0, 0.96, 20], [1.5, 0.90, 30], [2.0, 0.97, 40]]
    assert speedup.time_to_target(curve, 0.95) == 1.0
    assert speedup.time_to_target(curve, 0.99) is None
    a = speedup.parse_args(["--lr", "0.1"])
    assert a.workers == [1, 2, 4, 8] and a.target == 0.95
    assert speedup.lr_for("async", 8, a) == 0.1
    assert speedup.lr_for("sync", 4, a) == pytest.approx(0.4)
    assert speedup.lr_for("sync", 64, a) == pytest.approx(0.8)  # capped
    assert speedup.parse_args(["--quick"]).workers == [1, 2, 4]


@pytest.mark.timeout(150)
def test_throughput_quick_writes_every_row(tmp_path):
    out = tmp_path / "throughput.json"
    # --quick, with smaller messages than its 1M floats to keep the test short
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--sizes", "100000"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    runs = report["runs"]
    whats = ["bare zmq echo", "bare zmq echo (tuned)", "torch rpc sgd", "torch rpc sgd tcp",
             "push_pull async x1", "push_pull dcasgd-a x1", "push_pull dcasgd-a x1 (default client)",
             "push_pull dcasgd-a x1 ipc", "push_pull dcasgd-a x1 frames",
             "push_pull dcasgd-a x1 ipc frames"]  # fmt: skip
    assert [r["what"] for r in runs] == whats
    for r in runs:
        assert r["numel"] == 100_000 and len(r["seconds"]) == 10 and all(t > 0 for t in r["seconds"])
        assert r["what"] in done.stdout
    assert runs[0]["ratio_to_echo"] == pytest.approx(1.0)
    for r in runs[4:]:  # the shard's own counters, per update: every phase, the rule and the loop's included
        phases = r["phase_seconds_per_update"]
        assert list(phases) == ["receive", "check", "rule", "snapshot", "send"]
        assert phases["receive"] > 0 and phases["rule"] > 0 and phases["send"] > 0
        # Shared memory where the row says so (the client checks it is in use), frames elsewhere.
        shm_in = [st["server"].get("shm_bytes_in", 0) for st in r["stats"][-1]]
        assert all(b > 0 for b in shm_in) != r["what"].endswith(" frames"), (r["what"], shm_in)
    (bounds,) = report["bounds"]
    assert set(bounds["modes"]) == {"async", "dcasgd-a"}
    for mode, b in bounds["modes"].items():
        assert b["bytes"] == {"async": 16, "dcasgd-a": 28}[mode] * 100_000  # benchmarks/kernels.py's accounting
        assert b["bound_s"] > 0 and b["rule_over_bound"] > 0
    (target,) = report["targets"]
    assert {"vs_echo", "vs_rpc", "rule_over_bound", "tcp_vs_rpc", "shm_vs_rpc", "shm_vs_frames"} <= target.keys()
    assert "shared memory: push_pull dcasgd-a x1 ipc = " in done.stdout
    assert "targets: push_pull dcasgd-a x1" in done.stdout and ("PASS" in done.stdout or "MISS" in done.stdout)


@pytest.mark.timeout(120)
def test_shard_load_quick_writes_every_point(tmp_path):
    out = tmp_path / "shard_load.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shard_load.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert [(p["numel"], p["workers"]) for p in report["points"]] == [(100_000, 1), (100_000, 2)]
    for p in report["points"]:
        assert p["updates"] > 0 and p["rate"] > 0 and 0 < p["busy"] <= 1.05
        assert set(p["phase_seconds_per_update"]) == {"receive", "check", "rule", "snapshot", "send"}
    assert report["skipped"] == [] and "updates/s" in done.stdout


def test_shard_load_options_and_memory_cap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import shard_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    full = shard_load.parse_args([])
    assert full.sizes == [1_000_000, 10_000_000, 25_000_000] and full.workers == [1, 2, 4, 8, 16, 32, 64]
    assert full.mode == "dcasgd-a" and full.seconds == 3.0
    quick = shard_load.parse_args(["--quick", "--workers", "4"])
    assert quick.sizes == [100_000] and quick.workers == [4]
    assert shard_load.need_bytes(25_000_000, 64) > 8e9 > shard_load.need_bytes(10_000_000, 64)


@pytest.mark.timeout(30)
def test_throughput_quick_keeps_what_is_given():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    full = throughput.parse_args([])
    assert full.sizes == [1_000_000, 10_000_000] and full.shards == [1, 2] and full.repeats == 30
    quick = throughput.parse_args(["--quick"])
    assert (quick.sizes, quick.modes, quick.shards, quick.repeats) == ([1_000_000], ["async", "dcasgd-a"], [1], 10)
    assert throughput.parse_args(["--quick", "--modes", "sync", "--repeats", "3"]).modes == ["sync"]
    assert throughput.parse_args(["--quick", "--repeats", "3"]).repeats == 3


@pytest.mark.timeout(120)
def test_staleness_overlap_runs_each_async_method_with_and_without_overlap(tmp_path):
    out = tmp_path / "staleness"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "staleness.py"), "--overlap"]
    cmd += ["--methods", "SSGD", "ASGD", "DC-ASGD-a", "--workers", "2", "--seeds", "1", "--epochs", "0.3"]
    cmd += ["--jobs", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "staleness.json").read_text())
    # SGD, then SSGD once (sync refuses overlap), ASGD and DC-ASGD-a each without and with overlap
    assert [r["method"] for r in doc["runs"]] == [
        "SGD", "SSGD", "ASGD", "ASGD + overlap", "DC-ASGD-a", "DC-ASGD-a + overlap"
    ]  # fmt: skip
    for r in doc["runs"]:
        assert r["result"]["config"]["overlap"] == r["method"].endswith(" + overlap")
        assert r["result"]["config"]["mode"] == {"SGD": "async", "SSGD": "sync", "ASGD": "async"}.get(
            r["method"].removesuffix(" + overlap"), "dcasgd-a"
        )
    stale = {r["method"]: r["result"]["max_staleness"] for r in doc["runs"]}
    assert stale["ASGD"] == stale["DC-ASGD-a"] == 1 and stale["ASGD + overlap"] == stale["DC-ASGD-a + overlap"] == 3
    cost = {c["method"]: c for c in doc["overlap_cost"]}
    assert set(cost) == {"ASGD", "DC-ASGD-a"} and all(c["workers"] == 2 for c in cost.values())
    assert cost["ASGD"]["cost"] == pytest.approx(cost["ASGD"]["without"] - cost["ASGD"]["with"])
    assert "overlap costs ASGD at M=2" in done.stdout and "DC-ASGD-a + overlap" in done.stdout
    assert (out / "staleness.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(30)
def test_staleness_methods_and_overlap_options():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import staleness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert staleness.parse_args([]).methods == list(staleness.METHODS) and not staleness.parse_args([]).overlap
    args = staleness.parse_args(["--overlap", "--methods", "DC-ASGD-a", "ASGD", "ASGD"])
    assert args.methods == ["ASGD", "DC-ASGD-a"]  # table order, once each
    assert list(staleness.methods_for(args)) == ["ASGD", "ASGD + overlap", "DC-ASGD-a", "DC-ASGD-a + overlap"]
    assert staleness.methods_for(args)["DC-ASGD-a + overlap"] == {"mode": "dcasgd-a", "overlap": True}
    assert list(staleness.methods_for(staleness.parse_args(["--methods", "SSGD", "--overlap"]))) == ["SSGD"]
    with pytest.raises(SystemExit):
        staleness.parse_args(["--methods", "Adam"])


@pytest.mark.timeout(150)
def test_transport_quick_writes_every_row(tmp_path):
    out = tmp_path / "transport"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "transport.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "transport.json").read_text())
    whats = ["memcpy"]
    whats += [f"echo {t} io{io}" for t in ("tcp", "ipc") for io in (1, 2)]
    whats += ["echo tcp io2 x2", "echo ipc io2 x2"]
    whats += [f"push_pull {t} io{io}" for t in ("tcp", "ipc") for io in (1, 2)]
    assert [r["what"] for r in report["runs"]] == whats
    for r in report["runs"]:
        assert r["numel"] == 20_000 and len(r["seconds"]) == 3 and all(t > 0 for t in r["seconds"])
        assert r["what"] in done.stdout
    assert report["runs"][1]["ratio_to_tcp_io1"] == pytest.approx(1.0)  # echo tcp io1 is the echo baseline
    assert report["args"]["quick"] is True


@pytest.mark.timeout(300)
def test_step_overhead_quick_writes_every_row(tmp_path):
    out = tmp_path / "step"
    # Two of the four shards x workers (the full set is the default; its parsing is tested below):
    # 1x1, and 2x2, which has both several shards and several workers.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--quick", "--steps", "4",
           "--configs", "1x1", "2x2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=290, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads((out / "step_overhead.json").read_text())
    assert {"argv", "args", "machine", "summary", "checks", "runs"} <= report.keys()
    numel = report["args"]["numel"]
    assert report["args"]["model"] == "tiny" and 900_000 < numel < 1_100_000
    assert report["args"]["configs"] == [[1, 1], [2, 2]]
    configs = {(s, m, wire) for s, m in ((1, 1), (2, 2)) for wire in ("float32", "bfloat16")}
    assert {(r["shards"], r["workers"], r["wire"]) for r in report["runs"]} == configs
    for run in report["runs"]:
        for phase in ("calibration", "blocking", "overlap"):
            assert [w["worker"] for w in run[phase]] == list(range(run["workers"]))
            assert all(len(w["step_seconds"]) == report["args"]["steps"] for w in run[phase])
        assert run["compute_ms"] == pytest.approx(1.5 * run["R"] * 1e3)
    rows = report["summary"]
    assert {(r["shards"], r["workers"], r["wire"], r["worker"]) for r in rows} == {
        (s, m, wire, w) for s, m, wire in configs for w in range(m)
    }
    for r in rows:
        assert r["R_ms"]["median"] > 0 and r["period_blocking_ms"]["median"] > r["compute_ms"]["median"]
        for key in ("busy_blocking", "busy_overlap"):
            assert 0 < r[key]["min"] <= r[key]["max"] <= 1.05  # a period is never shorter than its sleep
        per_float = 8 if r["wire"] == "float32" else 4  # in and out, 4 or 2 bytes each
        assert r["bytes_per_step"]["median"] == pytest.approx(per_float * numel, rel=0.01)
    checks = report["checks"]
    assert len(checks["busy"]) == len(rows) == 6 and len(checks["wire"]) == 2
    for w in checks["wire"]:
        assert w["bytes_ratio"] == pytest.approx(0.5, abs=0.01) and w["bytes_pass"]
    data = (out / "step_overhead.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "overlapped busy" in done.stdout and ("PASS" in done.stdout or "MISS" in done.stdout)


@pytest.mark.timeout(30)
def test_step_overhead_resnet50_shapes_and_quick_options():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shapes = step_overhead.resnet50_shapes()
    assert len(shapes) == 161  # torchvision's resnet50() has 161 parameter tensors
    assert sum(torch.Size(s).numel() for _, s in shapes) == step_overhead.RESNET50_NUMEL == 25_557_032
    assert shapes[0] == ("conv1.weight", (64, 3, 7, 7)) and shapes[-2] == ("fc.weight", (1000, 2048))
    assert ("layer4.0.downsample.0.weight", (2048, 1024, 1, 1)) in shapes
    full = step_overhead.parse_args([])
    assert (full.model, full.repeats, full.ratio) == ("resnet50", 3, 1.5)
    assert full.configs == [(1, 1), (1, 2), (2, 1), (2, 2)]  # every configuration by default
    assert step_overhead.configurations(full) == [
        (s, m, wire) for s in (1, 2) for m in (1, 2) for wire in ("float32", "bfloat16")
    ]
    quick = step_overhead.parse_args(["--quick", "--steps", "5"])
    assert (quick.model, quick.repeats, quick.steps) == ("tiny", 1, 5)
    assert step_overhead.parse_args(["--configs", "2x2", "1x1", "2X2"]).configs == [(2, 2), (1, 1)]
    for bad in ("2", "0x1", "1x-1", "axb", "1x2x3"):
        with pytest.raises(SystemExit):
            step_overhead.parse_args(["--configs", bad])


@pytest.mark.timeout(120)
def test_checkpoint_stall_quick_prints_both_rows_and_writes_json(tmp_path):
    out = tmp_path / "stall.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_stall.py"), "--quick", "--floats", "200000"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["checkpoint", "stall", "ms"], done.stdout
    assert lines[2].startswith("in the loop ") and lines[3].startswith("background "), done.stdout
    report = json.loads(out.read_text())
    assert report["args"] == {"floats": 200_000, "workers": 2, "repeats": 2, "quick": True, "last_op": "push_pull"}
    for name in ("in the loop", "background"):
        runs = report[name]
        assert len(runs) == 2 and all(r["stall_s"] > 0 and r["nbytes"] > 4 * 200_000 * 4 for r in runs)
        assert all(r["no_checkpoint_gap_s"] > 0 for r in runs)
    assert all(r["push_pull_during_write_s"] is None for r in report["in the loop"])


@pytest.mark.timeout(300)
def test_staleness_quick_winner_beats_asgd_at_32_workers(tmp_path):
    """Issue 13's CI check: the quick study's winner (DC-ASGD-f) ends above ASGD at M=32."""
    out = tmp_path / "staleness"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "staleness.py"), "--quick", "--methods", "ASGD"]
    cmd += ["DC-ASGD-f"]
    cmd += ["--workers", "32", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "staleness.json").read_text())
    assert doc["goal"]["beats_asgd"] == {"32": True}
    mean = {(r["method"], r["workers"]): r["mean"] for r in doc["summary"]}
    assert mean[("DC-ASGD-f", 32)] > mean[("ASGD", 32)] + 0.2


@pytest.mark.timeout(150)
def test_gpu_check_runs_its_device_parts_on_the_cpu(tmp_path):
    # The script a session lent a GPU runs first; here its plumbing runs with --device cpu.
    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--parts", "1", "2"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    cases = [(r["wire"], r["overlap"]) for r in report["bit_for_bit"]]
    assert cases == [("float32", False), ("bfloat16", True)]
    assert all(r["equal"] and r["moved"] and r["pass"] for r in report["bit_for_bit"])
    assert [r["wire"] for r in report["overlap"]] == ["float32", "bfloat16"]
    for r in report["overlap"]:
        assert r["R_s"] > 0 and r["compute_s"] == pytest.approx(1.5 * r["R_s"])
        assert 0 < r["blocking_busy"] <= 1.05 and 0 < r["overlap_busy"] <= 1.05
    assert "PASS  float32  overlap=False" in done.stdout and "cifar" not in report


@pytest.mark.timeout(60)
def test_gpu_check_says_when_there_is_no_cuda_device(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, also on a machine that has one
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=50, cwd=ROOT, env=env)
    assert done.returncode == 2 and "sees no CUDA device; use --device cpu" in done.stderr, done.stderr
