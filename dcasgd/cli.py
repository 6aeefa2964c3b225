"""The ``dcasgd`` command: ``server``, ``worker``, ``launch``, ``status``, ``export``, ``demo`` and ``keygen``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import rules, security
from .protocol import WIRE_DTYPES
from .server import DEFAULT_BIND, DEFAULT_IO_THREADS, run_server
from .shard import EXACT_STALENESS, ShardConfig


def _add_strength_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The compensation's strength (dcasgd-a/-s lambda_0, dcasgd-s, dcasgd-f): server, launch and demo."""
    d = rules.RuleConfig()
    return [
        p.add_argument(
            "--lam0", type=float, default=d.lam0, help=f"DC-ASGD-a and dcasgd-s lambda_0 (default {d.lam0})"
        ),
        p.add_argument(
            "--staleness-power",
            type=float,
            default=d.staleness_power,
            metavar="P",
            help=f"dcasgd-s: lambda_0 grows as (1 + staleness of the push)**P, P >= 0 (default {d.staleness_power})",
        ),
        p.add_argument(
            "--clip",
            type=float,
            default=d.clip,
            metavar="C",
            help=f"dcasgd-s: the compensation term is clipped to C*|g| element-wise; 0: no clip (default {d.clip})",
        ),
        p.add_argument(
            "--fisher-lam0",
            type=float,
            default=d.fisher_lam0,
            help=f"dcasgd-f: the Fisher compensation's lambda, at every staleness (default {d.fisher_lam0})",
        ),
        p.add_argument(
            "--fisher-cap",
            type=float,
            default=d.fisher_cap,
            help=f"dcasgd-f: lr * lambda_max(F) is capped at this; 0: no cap (default {d.fisher_cap})",
        ),
    ]


def _add_rule_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The update rule's options: ``server`` uses them, ``launch`` passes them on to its shards."""
    d = rules.RuleConfig()
    return [
        p.add_argument("--mode", choices=rules.MODES, default="dcasgd-a", help="update rule (default dcasgd-a)"),
        p.add_argument("--lr", type=float, default=d.lr, help=f"lr when a push carries none (default {d.lr})"),
        p.add_argument("--lam", type=float, default=d.lam, help=f"DC-ASGD-c lambda (default {d.lam})"),
        *_add_strength_options(p),
        p.add_argument("--ms-decay", type=float, default=d.ms_decay, help=f"DC-ASGD-a m (default {d.ms_decay})"),
        p.add_argument("--eps", type=float, default=d.eps, help=f"DC-ASGD-a epsilon (default {d.eps})"),
        p.add_argument(
            "--fisher-rank",
            type=int,
            default=d.fisher_rank,
            metavar="K",
            help=f"dcasgd-f: F is made of the shard's last K gradients, kept in memory (default {d.fisher_rank})",
        ),
        p.add_argument("--momentum", type=float, default=d.momentum, help="server-side momentum mu (default 0)"),
        p.add_argument("--sync-timeout", type=float, default=60.0, help="seconds a sync round waits (default 60)"),
        p.add_argument(
            "--compensation",
            choices=["per-worker", "per-parameter"],
            default="per-worker",
            help="DC backup: per worker (the paper, default) or one per parameter (an ablation, for studies)",
        ),
        p.add_argument(
            "--non-finite",
            choices=["refuse", "apply"],
            default="refuse",
            help="a gradient with NaN or Inf: refused with an error and counted (default), or applied unchecked",
        ),
        p.add_argument(
            "--wire-dtype",
            choices=list(WIRE_DTYPES),
            default="float32",
            help="what gradients and weights travel as (default float32); bfloat16 or float16 halve the bytes, "
            "the shard keeps float32. Every worker must use the same (wire_dtype=)",
        ),
    ]


def _add_shard_options(p: argparse.ArgumentParser, *, launch: bool) -> list[argparse.Action]:
    """The options of one shard, for ``server`` and for ``launch`` (which gives them to every shard).

    Returns the actions that ``launch`` passes on as they are; ``--mode`` (``LocalCluster``'s own
    argument) and ``--metrics-port`` (shard s gets PORT+s) are added but not returned.
    """
    passed_on = [a for a in _add_rule_options(p) if a.dest != "mode"]
    add = p.add_argument
    each = " (each shard)" if launch else ""
    if launch:
        passed_on.append(add("--threads", type=int, default=1, help="torch threads per shard (default 1)"))
    else:
        passed_on.append(
            add("--threads", type=int, default=0, help="torch threads for the rules (default: one per core)")
        )
    passed_on.append(
        add(
            "--io-threads",
            type=int,
            default=DEFAULT_IO_THREADS,
            metavar="N",
            help=f"ZeroMQ I/O threads{each}, which move the bytes between socket and memory "
            f"(default {DEFAULT_IO_THREADS}; see docs/benchmarks.md, Transport)",
        )
    )
    passed_on.append(
        add(
            "--no-shared-memory",
            dest="shared_memory",
            action="store_false",
            help=f"never let workers on this host hand payloads over in shared memory{each}: every payload "
            "crosses the socket (default: workers on the same host use a sealed memfd; docs/protocol.md)",
        )
    )
    passed_on.append(add("--log-level", default="INFO", help=f"logging level{each} (default INFO)"))
    passed_on.append(
        add(
            "--max-message-bytes",
            type=int,
            default=None,
            help="largest frame a peer may send, in bytes; a peer that sends more is disconnected (ZeroMQ "
            "MAXMSGSIZE). Default: the largest legal frame once the model size is known (--resume, or "
            "the first init: the shard then binds again, and workers reconnect once), 1 GiB before (an "
            "init of up to 2**28 floats per shard). An init "
            "holds 4 bytes per float of a shard's slice: for larger slices set at least 4 times the floats "
            "in the largest slice (dcasgd status shows each shard's [lo, hi)); 0: no limit",
        )
    )
    passed_on.append(
        add(
            "--max-header-bytes",
            type=int,
            default=64 * 1024,
            help="a larger header frame is dropped and counted (default 65536)",
        )
    )
    passed_on.append(
        add(
            "--checkpoint-dir",
            metavar="DIR",
            help="write the shard's whole state to DIR (and on SIGTERM)"
            + ("; one DIR serves all shards (files shard{S}-v{version}.ckpt)" if launch else ""),
        )
    )
    passed_on.append(
        add(
            "--checkpoint-every",
            type=float,
            metavar="SECONDS",
            help="seconds between checkpoints when the weights changed (default 60 with --checkpoint-dir; "
            "0: on stop only)",
        )
    )
    passed_on.append(
        add("--resume", action="store_true", help=f"start from the newest checkpoint in --checkpoint-dir{each}")
    )
    add(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics"
        + (", PORT+1 for shard 1, and so on (PORT+s for shard s)" if launch else "")
        + " (default 0: off)",
    )
    passed_on.append(add("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"))
    return passed_on


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run one shard of the parameter server")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"ZeroMQ endpoint to bind (default {DEFAULT_BIND})")
    p.add_argument("--shard", type=int, default=0, help="this shard's index (default 0)")
    p.add_argument("--num-shards", type=int, default=1, help="shards in the job (default 1)")
    p.add_argument("--num-workers", type=int, required=True, help="workers in the job")
    _add_shard_options(p, launch=False)
    p.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="CURVE: this shard's NAME.key_secret (from dcasgd keygen); with --curve-clients all traffic is "
        "encrypted and only the listed workers get in. Workers need the pair's public NAME.key",
    )
    p.add_argument(
        "--curve-clients",
        metavar="DIR",
        help="CURVE: directory of the public keys (*.key) of the workers allowed to connect (read at start)",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit (0, after a last checkpoint) once every worker has reported its end (dcasgd worker does); "
        "for docker compose, where the job ends when every container has",
    )


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a training command as one worker: get an id, run it, report its end to the shards",
        usage="dcasgd worker [--name NAME] [--claim-timeout SECONDS] -- COMMAND [ARGS ...]",
        description="Run COMMAND as a worker of the job in DCASGD_SERVERS. Its id comes from DCASGD_WORKER_ID, "
        "RANK or SLURM_PROCID when set, else from shard 0, which gives each NAME its own id (the same one "
        "again for the same name). When COMMAND ends, every shard is told its exit status, and this command "
        "exits with it.",
    )
    p.add_argument(
        "--name",
        default=None,
        help="this worker's name when it claims an id (default $DCASGD_WORKER_NAME, else HOSTNAME-PID; "
        "the worker image uses the container's host name)",
    )
    p.add_argument(
        "--claim-timeout", type=float, default=120.0, help="seconds to wait for shard 0 to give an id (default 120)"
    )
    p.add_argument("worker_command", nargs=argparse.REMAINDER, help="the training command, after --")


class _NotForLaunch(argparse.Action):
    """A ``dcasgd server`` option that ``launch`` does not pass on: a usage error that says why."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kwargs: object) -> None:
        from .launch import NOT_PASSED_ON

        parser.error(f"{self.option_strings[0]} is not for dcasgd launch: {NOT_PASSED_ON[self.option_strings[0]]}")


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from .launch import NOT_PASSED_ON, TRANSPORTS

    p = sub.add_parser(
        "launch",
        help="run a whole job on this machine: shards and workers as child processes",
        usage="dcasgd launch [--shards N] [--workers M] [--mode MODE] [server options] -- COMMAND [ARGS ...]",
        description="Start the shards on ipc sockets in a private temporary directory (or free 127.0.0.1 "
        "ports: --transport tcp), then COMMAND once per worker with "
        "DCASGD_SERVERS, DCASGD_WORKER_ID and DCASGD_NUM_WORKERS set; prefix each line of output with "
        "its role; exit with the first non-zero exit code (a signal N counts as 128+N) and leave no "
        "process behind.",
        epilog="The dcasgd server options above go to each shard as given, except --metrics-port PORT: "
        "shard s serves on PORT+s. Not for launch (refused): "
        + ", ".join(NOT_PASSED_ON)
        + ". Launch sets the first four itself; its shards run without CURVE, on this host only; and it "
        "stops the shards itself once every worker has exited 0, so --exit-when-done is not needed.",
    )
    p.add_argument("--shards", type=int, default=1, help="shard processes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    passed_on = _add_shard_options(p, launch=True)
    p.add_argument(
        "--transport",
        choices=list(TRANSPORTS),
        default="ipc",
        help="how workers reach the shards: ipc sockets in a private directory (default; faster on one host, "
        "see docs/benchmarks.md) or tcp on 127.0.0.1",
    )
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds for the shards to start (default 30)")
    p.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when the job stops; a shard writes its last checkpoint "
        "in them (default 5)",
    )
    for opt in NOT_PASSED_ON:
        # nargs="?" so that a refused option's value is not taken for the worker command
        flag = opt == "--exit-when-done"
        p.add_argument(opt, action=_NotForLaunch, nargs=0 if flag else "?", help=argparse.SUPPRESS)
    p.add_argument("worker_command", nargs=argparse.REMAINDER, help="the worker command, after --")
    p.set_defaults(server_options=passed_on)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the stats of one or more shards as a table")
    p.add_argument("endpoints", nargs="+", help="shard endpoints, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each shard (default 5)")
    p.add_argument(
        "--watch",
        action="store_true",
        help="a live view of the job (give all its shards): redrawn every second, per shard and per worker "
        "rates, staleness, bytes/s, errors; Ctrl-C ends it",
    )
    p.add_argument("--count", type=int, default=None, metavar="N", help="--watch: stop after N frames")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="--watch: seconds between frames (default 1)"
    )
    _add_observer_keys(p)


def _add_observer_keys(p: argparse.ArgumentParser) -> None:
    """CURVE keys for a command that asks shards as an observer (status, export)."""
    p.add_argument(
        "--curve-key",
        metavar="FILE",
        default=os.environ.get(security.ENV_KEY) or None,
        help=f"CURVE: your NAME.key_secret, for shards run with CURVE (default ${security.ENV_KEY})",
    )
    p.add_argument(
        "--curve-server-key",
        metavar="FILE",
        default=os.environ.get(security.ENV_SERVER_KEY) or None,
        help=f"CURVE: the shards' public NAME.key (default ${security.ENV_SERVER_KEY})",
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .export import DEFAULT_MAX_SKEW

    p = sub.add_parser(
        "export",
        help="write the trained model to a .safetensors (or .pt) file, from live shards or their checkpoints",
        usage="dcasgd export [ENDPOINT ... | --checkpoint-dir DIR] -o FILE [options]",
        description="Gather the whole model from every shard of a job (live shards, asked read-only, or the "
        "newest checkpoint of each shard in DIR) and write it as named tensors with the names and shapes the "
        "workers sent at init: FILE.safetensors (with the job's mode, per-shard versions and fingerprint in "
        "its metadata) or FILE.pt (a torch state_dict). Without ENDPOINT or DIR: the shards in $DCASGD_SERVERS.",
    )
    p.add_argument("endpoints", nargs="*", help="every shard's endpoint, in shard order (default $DCASGD_SERVERS)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="export a stopped job from its newest checkpoints in DIR")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.safetensors, or FILE.pt for torch")
    p.add_argument(
        "--unnamed",
        action="store_true",
        help="the workers sent no parameter names: write param0, param1, ... in parameter order (refused otherwise)",
    )
    p.add_argument(
        "--max-skew",
        type=float,
        default=DEFAULT_MAX_SKEW,
        metavar="SECONDS",
        help="checkpoints: refuse a set whose files were written further apart (default "
        f"{DEFAULT_MAX_SKEW:g}; a job stopped together writes them within seconds)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each shard (default 30)")
    _add_observer_keys(p)


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600)",
        description="Write a CURVE key pair for a shard or a worker. Give the shard its NAME.key_secret "
        "(--curve-secret-key) and each worker the shard's public NAME.key; copy each worker's public "
        "NAME.key into the shard's --curve-clients directory. Never copy a .key_secret file.",
    )
    p.add_argument("dir", help="directory to write the two files to (created if missing)")
    p.add_argument("--name", default=security.DEFAULT_NAME, help=f"file name stem (default {security.DEFAULT_NAME})")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train an MLP on digits (dcasgd.train_digits) on a local cluster and print time and test accuracy",
    )
    p.add_argument("--mode", choices=rules.MODES, default="dcasgd-a", help="update rule (default dcasgd-a)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="run every mode back to back, print a table and plot test accuracy against wall time",
    )
    p.add_argument(
        "--modes", nargs="+", choices=rules.MODES, metavar="MODE", help="with --compare: only these modes (default all)"
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--shards", type=int, default=2, help="shard processes (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per worker (default: the example's)")
    _add_strength_options(p)
    p.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="--compare's PNG (default ./dcasgd-demo-compare.png); its path is printed; needs matplotlib",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcasgd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_server(sub)
    _add_worker(sub)
    _add_launch(sub)
    _add_status(sub)
    _add_export(sub)
    _add_keygen(sub)
    _add_demo(sub)
    return parser


def rule_config(a: argparse.Namespace) -> rules.RuleConfig:
    """The update rule that parsed ``server``, ``launch`` or ``demo`` options give; ValueError names a bad one."""
    return rules.RuleConfig(
        mode=a.mode,
        lr=a.lr,
        lam=a.lam,
        lam0=a.lam0,
        ms_decay=a.ms_decay,
        eps=a.eps,
        momentum=a.momentum,
        staleness_power=a.staleness_power,
        clip=a.clip,
        fisher_lam0=a.fisher_lam0,
        fisher_cap=a.fisher_cap,
        fisher_rank=a.fisher_rank,
    )


def cmd_server(a: argparse.Namespace) -> int:
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = ShardConfig(
            shard=a.shard,
            num_shards=a.num_shards,
            num_workers=a.num_workers,
            rules=rule_config(a),
            sync_timeout=a.sync_timeout,
            compensation=a.compensation,
            non_finite=a.non_finite,
            wire_dtype=a.wire_dtype,
        )
    except ValueError as exc:
        print(f"dcasgd server: {exc}", file=sys.stderr)
        return 2
    try:
        security.check_server_options(a.curve_secret_key, a.curve_clients)
    except security.SecurityError as exc:
        print(f"dcasgd server: error: {exc}", file=sys.stderr)
        return 2
    if a.checkpoint_dir is None and (a.resume or a.checkpoint_every is not None):
        print("dcasgd server: error: --resume and --checkpoint-every need --checkpoint-dir", file=sys.stderr)
        return 2
    every = (60.0 if a.checkpoint_dir else 0.0) if a.checkpoint_every is None else a.checkpoint_every
    if not every >= 0:
        print(f"dcasgd server: error: --checkpoint-every must be >= 0, got {every}", file=sys.stderr)
        return 2
    if a.io_threads < 1:
        print(f"dcasgd server: error: --io-threads must be >= 1, got {a.io_threads}", file=sys.stderr)
        return 2
    ckpt = {"checkpoint_dir": a.checkpoint_dir, "checkpoint_every": every, "resume": a.resume}
    return run_server(
        a.bind,
        cfg,
        threads=a.threads,
        io_threads=a.io_threads,
        curve_secret_key=a.curve_secret_key,
        curve_clients=a.curve_clients,
        max_message_bytes=a.max_message_bytes,
        max_header_bytes=a.max_header_bytes,
        metrics_port=a.metrics_port,
        metrics_host=a.metrics_host,
        exit_when_done=a.exit_when_done,
        shared_memory=a.shared_memory,
        exit_process=True,
        **ckpt,
    )


def _worker_command(a: argparse.Namespace, usage: str) -> list[str] | None:
    """The command after ``--``; None (and a message) when there is none."""
    command = a.worker_command[1:] if a.worker_command[:1] == ["--"] else a.worker_command
    if not command:
        print(f"usage: {usage}", file=sys.stderr)
        print(f"{usage.split(' [')[0]}: error: no command: give it after --, e.g. -- python train.py", file=sys.stderr)
        return None
    return command


def cmd_worker(a: argparse.Namespace) -> int:
    from .worker import run_worker

    command = _worker_command(a, "dcasgd worker [options] -- COMMAND [ARGS ...]")
    if command is None:
        return 2
    return run_worker(command, name=a.name, claim_timeout=a.claim_timeout)


def launch_server_args(a: argparse.Namespace) -> list[str]:
    """The ``dcasgd server`` options that parsed ``launch`` arguments give every shard, as arguments."""
    args: list[str] = []
    for action in a.server_options:
        value = getattr(a, action.dest)
        if action.nargs == 0:  # a flag (--resume, --no-shared-memory): given or not
            args += [action.option_strings[0]] if value != action.default else []
        elif value is not None:  # None: not given, and the server's own default applies
            args += [action.option_strings[0], str(value)]
    return args


def cmd_launch(a: argparse.Namespace) -> int:
    from .launch import LaunchError, launch

    command = _worker_command(a, "dcasgd launch [options] -- COMMAND [ARGS ...]")
    if command is None:
        return 2
    try:
        rule_config(a)  # a bad rule option is a usage error here, before any shard starts
    except ValueError as exc:
        print(f"dcasgd launch: error: {exc}", file=sys.stderr)
        return 2
    server_args = launch_server_args(a)
    try:
        return launch(
            command,
            shards=a.shards,
            workers=a.workers,
            mode=a.mode,
            server_args=server_args,
            metrics_port=a.metrics_port,
            start_timeout=a.start_timeout,
            grace=a.grace,
            transport=a.transport,
        )
    except ValueError as exc:
        print(f"dcasgd launch: error: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"dcasgd launch: {exc}", file=sys.stderr)
        return 1


def format_stats(stats: dict[str, Any]) -> str:
    """A shard's stats as a two-column table."""
    rows = [
        ("shard", f"{stats['shard']} of {stats['num_shards']}"),
        ("mode", stats["mode"]),
        ("initialized", stats["initialized"]),
        ("slice", f"[{stats['lo']}, {stats['hi']}) of {stats['n']}"),
        ("version", stats["version"]),
        ("workers", stats["num_workers"]),
        ("updates per worker", " ".join(str(u) for u in stats["updates"])),
        ("staleness (value:count)", " ".join(f"{_bucket(k)}:{v}" for k, v in stats["staleness"]) or "-"),
        ("duplicate pushes", stats["duplicates"]),
    ]
    finished = stats.get("finished", [])
    rows.append(("finished (worker:status)", " ".join(f"{w}:{s}" for w, s in finished) or "-"))
    if stats["mode"] == "sync":
        rows += [("sync rounds", stats["rounds"]), ("left out of a round", stats["left_out"]), ("live", stats["live"])]
    for k, v in sorted(stats.get("server", {}).items()):
        rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_status(a: argparse.Namespace) -> int:
    from .client import DcasgdError, fetch_stats

    if a.watch:
        from .watch import watch

        if (a.count is not None and a.count < 1) or not a.interval > 0:
            print("dcasgd status: error: --count must be >= 1 and --interval > 0", file=sys.stderr)
            return 2
        keys = {"curve_key": a.curve_key, "server_key": a.curve_server_key}
        return watch(a.endpoints, interval=a.interval, count=a.count, timeout=a.timeout, **keys)
    code = 0
    for ep in a.endpoints:
        try:
            stats = fetch_stats(ep, timeout=a.timeout, curve_key=a.curve_key, server_key=a.curve_server_key)
        except (DcasgdError, security.SecurityError) as exc:
            print(f"dcasgd status: {exc}", file=sys.stderr)
            code = 1
            continue
        print(f"== {ep}")
        print(format_stats(stats))
    return code


def cmd_export(a: argparse.Namespace) -> int:
    """Exit 0: written; 2: a usage error or a refusal (one line says why); 1: a shard did not answer, or I/O."""
    from . import export
    from .client import DcasgdError, ServerError
    from .env import JobConfigError, parse_servers

    def fail(code: int, message: str) -> int:
        print(f"dcasgd export: error: {message}", file=sys.stderr)
        return code

    try:
        export.check_output(a.output)  # before any shard is asked
        if a.checkpoint_dir is not None:
            if a.endpoints:
                return fail(2, "give shard endpoints or --checkpoint-dir, not both")
            if not a.max_skew >= 0:
                return fail(2, f"--max-skew must be >= 0 seconds, got {a.max_skew}")
            model = export.from_checkpoints(a.checkpoint_dir, max_skew=a.max_skew)
        else:
            servers = parse_servers(a.endpoints or None, or_else="give the shards' endpoints, or --checkpoint-dir DIR")
            model = export.from_shards(servers, timeout=a.timeout, curve_key=a.curve_key, server_key=a.curve_server_key)
        warning = export.write(model, a.output, unnamed=a.unnamed)
    except (export.ExportError, JobConfigError, ServerError, security.SecurityError) as exc:
        return fail(2, str(exc))
    except (DcasgdError, OSError) as exc:
        return fail(1, str(exc))
    if warning:
        print(f"dcasgd export: warning: {warning}", file=sys.stderr)
    print(f"wrote {a.output}: {export.describe(model)}")
    return 0


def cmd_keygen(a: argparse.Namespace) -> int:
    try:
        public, secret = security.generate_keypair(a.dir, a.name)
    except (security.SecurityError, OSError) as exc:
        print(f"dcasgd keygen: error: {exc}", file=sys.stderr)
        return 1
    print(f"public key {public}  (copy it: a shard's key to its workers, a worker's key to the shards' clients dir)")
    print(f"secret key {secret}  (keep it on this machine)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from . import demo

    try:
        rules.RuleConfig(
            mode=a.mode,
            lam0=a.lam0,
            staleness_power=a.staleness_power,
            clip=a.clip,
            fisher_lam0=a.fisher_lam0,
            fisher_cap=a.fisher_cap,
        )
    except ValueError as exc:
        print(f"dcasgd demo: error: {exc}", file=sys.stderr)
        return 2
    if a.modes and not a.compare:
        print("dcasgd demo: error: --modes chooses the modes of --compare; one run takes --mode", file=sys.stderr)
        return 2
    server_args = ["--lam0", str(a.lam0), "--staleness-power", str(a.staleness_power), "--clip", str(a.clip)]
    server_args += ["--fisher-lam0", str(a.fisher_lam0), "--fisher-cap", str(a.fisher_cap)]
    return demo.main(a.mode, a.compare, a.workers, a.shards, a.epochs, a.plot or demo.PLOT, server_args=server_args,
                     compare_modes=a.modes)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    commands = {
        "server": cmd_server,
        "worker": cmd_worker,
        "launch": cmd_launch,
        "status": cmd_status,
        "export": cmd_export,
        "demo": cmd_demo,
        "keygen": cmd_keygen,
    }
    try:
        code = commands[a.command](a)
        sys.stdout.flush()  # here, not at exit, so that a reader gone early is handled below
    except BrokenPipeError:
        # The reader of our output left (`dcasgd status ... | head -3`): stop quietly, as a shell tool does
        # on SIGPIPE. Python's exit would flush stdout again and print a traceback: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())


def _bucket(key: int) -> str:
    """A staleness histogram key as text: a value, or from 256 on its power-of-two bucket."""
    return str(key) if key < EXACT_STALENESS else f"{key}-{2 * key - 1}"
