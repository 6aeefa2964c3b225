"""The deployment files: Dockerfiles, docker-compose.yml (+ overrides) and k8s/ manifests.

No Docker here: the files are parsed and checked, and then the compose services' own commands run as
local processes, through the images' entry scripts, with the compose file's environment (``${VAR:-default}``
resolved to its default), the service names mapped to 127.0.0.1 and the volumes to ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ShardDriver, _read_endpoint, stop_process
from test_checkpoint import trained

from dcasgd import checkpoint
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ["shard0", "shard1"]
MONITORING = ["prometheus", "grafana"]  # the `monitoring` profile's services
METRICS_PORT = "9100"
HYPER = {  # compose variable -> (server option, default)
    "DCASGD_MODE": ("--mode", "dcasgd-a"),
    "DCASGD_NUM_WORKERS": ("--num-workers", "4"),
    "DCASGD_LR": ("--lr", "0.1"),
    "DCASGD_LAM": ("--lam", "0.04"),
    "DCASGD_LAM0": ("--lam0", "2.0"),
    "DCASGD_MS_DECAY": ("--ms-decay", "0.95"),
    "DCASGD_MOMENTUM": ("--momentum", "0.0"),
    "DCASGD_SYNC_TIMEOUT": ("--sync-timeout", "60"),
    "DCASGD_CHECKPOINT_EVERY": ("--checkpoint-every", "60"),
}
_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ``${VAR:-default}``, ``${VAR}``, ``$VAR``, ``$$``; recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        return env.get(name) or (m.group(2) or "")

    return _VAR.sub(sub, value)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_services_commands_and_environment():
    raw = load("docker-compose.yml")
    c = interpolate(raw, {})
    assert set(c["services"]) == {*SHARDS, "worker", *MONITORING}
    assert c["networks"]["dcasgd"]["internal"] is True
    assert set(c["volumes"]) == {"checkpoints", "results"}
    for i, name in enumerate(SHARDS):
        s = c["services"][name]
        cmd = s["command"]
        assert cmd[:2] == ["dcasgd", "server"]
        assert option(cmd, "--bind") == "tcp://0.0.0.0:5555"
        assert (option(cmd, "--shard"), option(cmd, "--num-shards")) == (str(i), "2")
        assert option(cmd, "--checkpoint-dir") == f"/checkpoints/shard{i}"
        assert "--exit-when-done" in cmd  # the job, and `docker compose up`, end when the workers have
        # Prometheus (--profile monitoring) scrapes this port on the job's network; no port is published.
        assert (option(cmd, "--metrics-port"), option(cmd, "--metrics-host")) == (METRICS_PORT, "0.0.0.0")
        assert "--resume" not in cmd  # the entry script adds it when a checkpoint exists
        for var, (opt, default) in HYPER.items():
            assert option(cmd, opt) == default, opt
            assert option(raw["services"][name]["command"], opt) == f"${{{var}:-{default}}}", opt
        assert s["build"]["dockerfile"] == "server/Dockerfile"
        assert s["restart"] == "on-failure"  # a crash: restarted, resumes; the end of the job (exit 0): not
        assert "checkpoints:/checkpoints" in s["volumes"]
        assert s["networks"] == ["dcasgd"] and "ports" not in s
        assert s["healthcheck"]["test"][0] == "CMD-SHELL"
        assert "dcasgd status tcp://127.0.0.1:5555" in s["healthcheck"]["test"][1]

    w = c["services"]["worker"]
    assert w["deploy"]["replicas"] == "4"  # compose casts the interpolated value to an int
    assert raw["services"]["worker"]["deploy"]["replicas"] == "${DCASGD_NUM_WORKERS:-4}"
    assert w["build"]["dockerfile"] == "worker/Dockerfile"
    assert w["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert raw["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"].startswith("${TORCH_INDEX_URL:-")
    assert w["command"][:2] == ["python", "examples/train_digits.py"]
    assert option(w["command"], "--result-file") == "/results/worker{worker}.json"
    # No id in the service: every replica claims its own from shard 0 (worker/entrypoint.sh).
    assert w["environment"] == {"DCASGD_SERVERS": "tcp://shard0:5555,tcp://shard1:5555", "DCASGD_NUM_WORKERS": "4"}
    assert w["depends_on"] == {s: {"condition": "service_healthy"} for s in SHARDS}
    assert w["networks"] == ["dcasgd"] and "results:/results" in w["volumes"]
    assert w["init"] is True and w["restart"] == "no"

    # One variable sizes the job: the replicas and the shards' --num-workers move together.
    env = {"DCASGD_MODE": "sync", "DCASGD_NUM_WORKERS": "3", "DCASGD_LR": "0.5"}
    o = interpolate(raw, env)["services"]
    assert option(o["shard1"]["command"], "--mode") == "sync"
    assert option(o["shard1"]["command"], "--num-workers") == "3"
    assert o["worker"]["deploy"]["replicas"] == "3"
    assert o["worker"]["environment"]["DCASGD_NUM_WORKERS"] == "3"


def test_compose_monitoring_profile():
    """`docker compose --profile monitoring up`: Prometheus on the job's network scrapes every shard's
    metrics port; Grafana, provisioned from monitoring/grafana, reaches Prometheus but not the shards,
    and is published on this host only. Without the profile, compose starts neither."""
    c = interpolate(load("docker-compose.yml"), {})
    services = c["services"]
    for name, s in services.items():
        assert s.get("profiles") == (["monitoring"] if name in MONITORING else None), name

    prom = services["prometheus"]
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert set(prom["networks"]) == {"dcasgd", "monitoring"} and "ports" not in prom
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = scrape
    (static,) = job["static_configs"]
    assert static["targets"] == [f"{name}:{METRICS_PORT}" for name in SHARDS]  # every shard of the job

    graf = services["grafana"]
    assert graf["ports"] == ["127.0.0.1:3000:3000"]
    assert set(graf["networks"]) == {"monitoring", "grafana-ui"}  # not dcasgd: the shards stay out of reach
    assert c["networks"]["monitoring"]["internal"] is True and not c["networks"]["grafana-ui"]
    assert graf["depends_on"] == ["prometheus"]
    mounts = dict(v.removesuffix(":ro").split(":") for v in graf["volumes"])
    for source in mounts:
        assert (ROOT / source).is_dir(), source
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "monitoring/grafana/provisioning"
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dcasgd.yml").read_text())["providers"]
    dashboards = provider["options"]["path"]
    assert mounts["./monitoring/grafana/dashboards"] == dashboards
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/")
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards" / Path(home).name).read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}


def test_compose_overrides_curve_and_gpu():
    curve = interpolate(load("docker-compose.curve.yml"), {})["services"]
    assert set(curve) == {*SHARDS, "worker"}
    for s in SHARDS:
        env = curve[s]["environment"]
        assert env["DCASGD_CURVE_SECRET_KEY"].endswith(".key_secret") and env["DCASGD_CURVE_CLIENTS"]
        assert env["DCASGD_CURVE_SERVER_KEY"].endswith(".key")  # for the health check
        assert "./keys:/keys:ro" in curve[s]["volumes"]
    env = curve["worker"]["environment"]
    assert set(env) == {"DCASGD_CURVE_KEY", "DCASGD_CURVE_SERVER_KEY"}
    assert "./keys:/keys:ro" in curve["worker"]["volumes"]

    gpu = interpolate(load("docker-compose.gpu.yml"), {})["services"]
    assert set(gpu) == {"worker"}
    assert gpu["worker"]["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu126"
    (device,) = gpu["worker"]["deploy"]["resources"]["reservations"]["devices"]
    # count: all, not 1: Docker would give every replica the same first GPU; scripts pick one by worker id.
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "all"
    assert "worker_id % gpus" in (ROOT / "examples" / "train_cifar10.py").read_text()


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfiles(role):
    text = (ROOT / role / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    assert '--index-url "${TORCH_INDEX_URL}"' in text and "-c constraints-cpu.txt" in text
    assert f"COPY {role}/entrypoint.sh /usr/local/bin/dcasgd-entrypoint" in lines
    assert 'ENTRYPOINT ["/usr/local/bin/dcasgd-entrypoint"]' in lines
    assert "USER dcasgd" in lines
    assert "key_secret" not in text and not re.search(r"^(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN)", text, re.M | re.I)
    if role == "server":
        assert re.search(r"^HEALTHCHECK .*\n\s+CMD dcasgd status tcp://127\.0\.0\.1:\$\{PORT\}", text, re.M)
        assert "PORT=5555" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "results", ".git", "__pycache__", "keys", "**/*.key_secret"} <= set(ignored)


def test_k8s_manifests_match_compose():
    docs = [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    config = by_kind[("ConfigMap", "dcasgd-job")]["data"]
    assert {k: config[k] for k in HYPER} == {k: d for k, (_, d) in HYPER.items()}
    assert config["DCASGD_SERVERS"] == "tcp://shard-0.shard:5555,tcp://shard-1.shard:5555"

    svc = by_kind[("Service", "shard")]
    assert svc["spec"]["clusterIP"] == "None"
    sts = by_kind[("StatefulSet", "shard")]["spec"]
    assert sts["serviceName"] == "shard" and sts["replicas"] == 2
    assert sts["template"]["metadata"]["labels"] == svc["spec"]["selector"]
    (shard,) = sts["template"]["spec"]["containers"]
    assert "command" not in shard  # args keep the image's entry point (which adds --resume)
    args = shard["args"]
    compose = load("docker-compose.yml")["services"]["shard0"]["command"]
    assert args[:2] == compose[:2] and option(args, "--bind") == option(compose, "--bind")
    for var, (opt, _) in HYPER.items():
        assert option(args, opt) == f"$({var})", opt
    assert option(args, "--checkpoint-dir") == "/checkpoints/shard$(DCASGD_SHARD)"
    assert [e["name"] for e in shard["env"]] == ["DCASGD_SHARD"]
    assert "dcasgd status tcp://127.0.0.1:5555" in " ".join(shard["readinessProbe"]["exec"]["command"])
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"

    job = by_kind[("Job", "dcasgd-workers")]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == int(config["DCASGD_NUM_WORKERS"])
    (worker,) = job["template"]["spec"]["containers"]
    assert "command" not in worker
    compose_worker = load("docker-compose.yml")["services"]["worker"]["command"]
    assert worker["args"][:2] == compose_worker[:2]
    assert option(worker["args"], "--result-file") == option(compose_worker, "--result-file")
    assert worker["envFrom"] == [{"configMapRef": {"name": "dcasgd-job"}}]
    assert "JOB_COMPLETION_INDEX" in (ROOT / "worker" / "entrypoint.sh").read_text()


def _local(value: str, endpoints: dict[str, str], tmp_path: Path) -> str:
    """A compose value on this machine: service host names -> their endpoints, volumes -> tmp_path."""
    for name, ep in endpoints.items():
        value = value.replace(f"tcp://{name}:5555", ep)
    value = value.replace("tcp://0.0.0.0:5555", "tcp://127.0.0.1:0")
    return value.replace("/checkpoints", str(tmp_path / "checkpoints")).replace("/results", str(tmp_path / "results"))


def _env(service: dict, endpoints: dict[str, str], tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DCASGD_", "JOB_COMPLETION"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"  # dcasgd, python
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **{k: _local(str(v), endpoints, tmp_path) for k, v in service.get("environment", {}).items()}}


def _entry(service: dict) -> list[str]:
    return ["sh", str(ROOT / Path(service["build"]["dockerfile"]).parent / "entrypoint.sh")]


def _start_shard(name, service, endpoints, tmp_path, log: Path):
    cmd = [*_entry(service), *(_local(a, endpoints, tmp_path) for a in service["command"])]
    if "--metrics-port" in cmd:  # each container has its own; here all share one host: any free port
        cmd[cmd.index("--metrics-port") + 1] = "0"
        cmd[cmd.index("--metrics-host") + 1] = "127.0.0.1"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(service, {}, tmp_path)
        )
    return proc, _read_endpoint(proc, log)


def _start_worker(service, endpoints, tmp_path, host: str, out: Path, command=None, **popen):
    """One replica of the worker service. ``host`` stands for its container's host name, which the
    entry script uses as the worker's name: every container has its own (here, one host for all)."""
    cmd = [*_entry(service), *(_local(a, endpoints, tmp_path) for a in command or service["command"])]
    env = {**_env(service, endpoints, tmp_path), "DCASGD_WORKER_NAME": host}
    with open(out, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=popen.pop("stdout", f), stderr=f, env=env, **popen)


def wait_like_compose_up(procs: dict[str, subprocess.Popen], timeout: float) -> tuple[int, dict[str, int]]:
    """What `docker compose up --abort-on-container-failure` does with these containers: wait until all
    have exited; the first to exit non-zero stops the others and its code is up's. Returns (up's code,
    each one's exit code). Fails if they do not all exit within ``timeout`` s (a job that never ends)."""
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs.values()):
        assert time.monotonic() < deadline, (
            f"still running after {timeout} s: {[n for n, p in procs.items() if p.poll() is None]}"
        )
        for name, p in procs.items():
            if failed is None and p.poll() not in (None, 0):
                failed = name
                for other in procs.values():
                    if other.poll() is None:
                        other.terminate()
        try:
            next(p for p in procs.values() if p.poll() is None).wait(timeout=0.2)
        except (subprocess.TimeoutExpired, StopIteration):
            pass
    codes = {name: p.returncode for name, p in procs.items()}
    return (codes[failed] if failed else 0), codes


@pytest.mark.timeout(240)
def test_compose_up_trains_digits_and_ends_with_the_workers(tmp_path):
    """`docker compose up --abort-on-container-failure`, as local processes: 2 shards and the worker
    service's 4 replicas, which claim ids 0..3; the job ends by itself (exit 0) at the demo's accuracy."""
    services = interpolate(load("docker-compose.yml"), {"DCASGD_EPOCHS": "30"})["services"]  # half the default: time
    replicas = int(services["worker"]["deploy"]["replicas"])
    (tmp_path / "results").mkdir()
    procs, endpoints = {}, {}
    try:
        for name in SHARDS:
            procs[name], endpoints[name] = _start_shard(
                name, services[name], endpoints, tmp_path, tmp_path / f"{name}.log"
            )
        for name in SHARDS:  # the health check that the workers' depends_on waits for
            check = services[name]["healthcheck"]["test"][1].replace("tcp://127.0.0.1:5555", endpoints[name])
            assert subprocess.run(check, shell=True, env=_env({}, {}, tmp_path), timeout=60).returncode == 0
        for i in range(replicas):
            procs[f"worker-{i + 1}"] = _start_worker(
                services["worker"], endpoints, tmp_path, f"c0ffee{i:06d}", tmp_path / f"worker-{i + 1}.out"
            )
        code, codes = wait_like_compose_up(procs, timeout=200)
    finally:
        for proc in procs.values():
            stop_process(proc)
    logs = {n: (tmp_path / f"{n}.out").read_text() for n in procs if n.startswith("worker")}
    assert code == 0 and set(codes.values()) == {0}, (codes, logs)
    for name in SHARDS:
        assert "all 4 workers finished (all with status 0); exiting" in (tmp_path / f"{name}.log").read_text()

    results = [json.loads((tmp_path / "results" / f"worker{i}.json").read_text()) for i in range(replicas)]
    assert [r["worker"] for r in results] == [0, 1, 2, 3]  # each id once
    assert min(r["test_accuracy"] for r in results) >= 0.95, results
    claimed = sorted(int(re.search(r"worker id (\d+) \(claimed as 'c0ffee", log).group(1)) for log in logs.values())
    assert claimed == [0, 1, 2, 3], logs

    # A restarted shard (same command, checkpoint on the volume) resumes: the entry script adds --resume.
    # The job it resumes had finished, so this is a new run: ids are handed out afresh.
    for i, name in enumerate(SHARDS):
        assert list((tmp_path / "checkpoints" / name).glob(f"shard{i}-v*.ckpt")), name
    log = tmp_path / "shard0-restart.log"
    proc, _ = _start_shard("shard0", services["shard0"], {}, tmp_path, log)
    try:
        assert stop_process(proc) == 0
    finally:
        stop_process(proc)
    assert "resuming" in log.read_text() and "a new run" in log.read_text()


@pytest.mark.timeout(120)
def test_scaled_workers_get_unique_ids_and_extra_ones_are_told(tmp_path):
    """`DCASGD_NUM_WORKERS=2` with 3 containers (as `--scale worker=3` would start): 2 get ids 0 and 1,
    the third exits 2 saying the job has 2 workers; a restarted container gets its own id back; a worker
    that fails is reported, and the shards still end the job instead of waiting for it."""
    services = interpolate(load("docker-compose.yml"), {"DCASGD_NUM_WORKERS": "2"})["services"]
    assert services["worker"]["deploy"]["replicas"] == "2"
    # Instead of training, each worker prints its id and waits for a line on stdin (our go-ahead).
    command = ["sh", "-c", 'echo "id=$DCASGD_WORKER_ID of $DCASGD_NUM_WORKERS"; read line; exit "$line"']
    procs, endpoints, workers = {}, {}, {}
    try:
        for name in SHARDS:
            procs[name], endpoints[name] = _start_shard(
                name, services[name], endpoints, tmp_path, tmp_path / f"{name}.log"
            )

        def start(host: str) -> subprocess.Popen:
            workers[f"{host}-{len(workers)}"] = proc = _start_worker(
                services["worker"], endpoints, tmp_path, host, tmp_path / f"{host}-{len(workers)}.err",
                command=command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            return proc

        a, b = start("container-a"), start("container-b")
        ids = {}
        for host, proc in (("a", a), ("b", b)):
            line = proc.stdout.readline()  # blocks until the command runs, i.e. the id was claimed
            ids[host] = re.fullmatch(r"id=(\d) of 2\n", line).group(1)
        assert sorted(ids.values()) == ["0", "1"]

        extra = start("container-c")
        assert extra.wait(timeout=60) == 2
        err = (tmp_path / "container-c-2.err").read_text()
        assert "all 2 worker ids are taken" in err and "started for 2 workers" in err, err

        restarted = start("container-a")  # the same host name: the container came back
        assert restarted.stdout.readline() == f"id={ids['a']} of 2\n"
        restarted.communicate("0\n", timeout=60)
        a.communicate("0\n", timeout=60)
        b.communicate("3\n", timeout=60)  # fails with status 3
        codes = {name: procs[name].wait(timeout=60) for name in SHARDS}  # they end by themselves
    finally:
        for proc in [*workers.values(), *procs.values()]:
            stop_process(proc)
    assert (a.returncode, b.returncode, restarted.returncode) == (0, 3, 0)
    assert codes == {"shard0": 0, "shard1": 0}
    for name in SHARDS:
        log = (tmp_path / f"{name}.log").read_text()
        assert f"all 2 workers finished (failed: {{{ids['b']}: 3}}); exiting" in log, log
    assert "exited with status 3; reported to 2 shards" in (tmp_path / "container-b-1.err").read_text()


@pytest.mark.timeout(60)
def test_server_entrypoint_adds_resume_only_with_a_checkpoint(tmp_path):
    service = interpolate(load("docker-compose.yml"), {})["services"]["shard1"]
    log = tmp_path / "fresh.log"
    proc, endpoint = _start_shard("shard1", service, {}, tmp_path, log)  # no checkpoint: starts, no --resume
    stop_process(proc)
    assert endpoint.startswith("tcp://127.0.0.1:") and "resuming" not in log.read_text()

    (tmp_path / "checkpoints" / "shard1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "checkpoints" / "shard1" / "shard1-v7.ckpt").write_bytes(b"not a checkpoint")
    cmd = [*_entry(service), *(_local(a, {}, tmp_path) for a in service["command"])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(service, {}, tmp_path), timeout=50)
    assert out.returncode == 2 and "resuming" in out.stderr, out  # --resume was added; the file is refused

    # The server's rule holds through the entry script: it resumes one job, never picks among two.
    (tmp_path / "checkpoints" / "shard1" / "shard1-v7.ckpt").unlink()
    state = trained(ShardConfig(num_workers=4, rules=RuleConfig(mode="dcasgd-a")))
    for job in ("earlier", "later"):  # files of shard 0 by another name: the job is in the header
        path = checkpoint.save(state, tmp_path / job, job=job)
        path.rename(tmp_path / "checkpoints" / "shard1" / path.name.replace("shard0", "shard1"))
        ShardDriver(state).call("push", 0, torch.ones(1_003), seq=state.last_seq[0] + 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "shard1").iterdir()}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(service, {}, tmp_path), timeout=50)
    assert out.returncode == 2 and "resuming" in out.stderr and "of 2 jobs (job earlier: " in out.stderr, out
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "shard1").iterdir()} == before

    env = {**_env(service, {}, tmp_path), "DCASGD_CURVE_SECRET_KEY": "/nowhere.key_secret"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=50)
    assert out.returncode == 2 and "DCASGD_CURVE_CLIENTS" in out.stderr, out


@pytest.mark.timeout(60)
def test_worker_entrypoint_takes_the_id_from_job_completion_index(cluster_factory):
    """Kubernetes: an Indexed Job's JOB_COMPLETION_INDEX is the id (no claim); DCASGD_WORKER_ID wins."""
    with cluster_factory(1, 4, "async") as cluster:
        base = _env({"environment": {"DCASGD_SERVERS": cluster.endpoints[0]}}, {}, Path("/"))
        entry = ["sh", str(ROOT / "worker" / "entrypoint.sh"), "sh", "-c", 'echo "$DCASGD_WORKER_ID"']
        out = subprocess.run(
            entry, env={**base, "JOB_COMPLETION_INDEX": "3"}, capture_output=True, text=True, timeout=50
        )
        assert out.returncode == 0 and out.stdout.strip() == "3", out
        assert "worker id 3 (from the environment)" in out.stderr and "reported to 1 shards" in out.stderr
        both = {**base, "JOB_COMPLETION_INDEX": "3", "DCASGD_WORKER_ID": "1"}
        out = subprocess.run(entry, env=both, capture_output=True, text=True, timeout=50)
        assert out.stdout.strip() == "1", out
