"""A whole job on one machine: shards and workers as child processes, like ``torchrun``.

:class:`LocalCluster` starts ``dcasgd server`` processes on ipc sockets in a
private temporary directory (mode 0700, removed at the end; ``transport="tcp"``:
free 127.0.0.1 ports instead), then the worker command once per worker with the job in its environment
(``DCASGD_SERVERS``, ``DCASGD_WORKER_ID``, ``DCASGD_NUM_WORKERS``; see
:mod:`dcasgd.env`), and prefixes every line a child prints with its role
(``[shard0] ...``, ``[worker3] ...``). :func:`launch` is the ``dcasgd launch``
command: start, wait, stop, and return the first non-zero exit code.

Usage::

    with LocalCluster([sys.executable, "train.py"], shards=2, workers=4, mode="dcasgd-a") as cluster:
        cluster.start_servers()     # ["ipc:///tmp/dcasgd-k3j2/shard0", "ipc:///tmp/dcasgd-k3j2/shard1"]
        cluster.start_workers()
        code = cluster.wait()       # stops the shards when every worker exited 0

How nothing is left behind (POSIX only):

- Each child runs in its own session and process group (``start_new_session``),
  and is stopped with ``os.killpg``: SIGTERM to the group, ``grace`` seconds,
  then SIGKILL. Whatever the child started in its group (DataLoader workers, a
  shell's children) goes with it. Its own session also keeps the terminal's
  Ctrl-C away from the children: the launcher alone decides how they stop.
- When a child exits, whatever is still left in its process group is killed at
  once (SIGKILL). The group is signalled while the exited child is still a
  zombie, so its id cannot have been reused by an unrelated process.
- On Linux each child asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so the shards and workers go even when the
  launcher itself is SIGKILLed. The kernel sends it when the *thread* that
  started the child ends, so start children from a thread that outlives them
  (the main thread does). Their own children are not covered by this one case.

Children read stdin from /dev/null; their stdout and stderr are merged into one
pipe that a thread per child reads line by line.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from . import env as job_env
from . import security
from .processes import describe_exit, die_with_parent, exit_code, killpg_quietly
from .rules import MODES

_LISTENING = re.compile(r"^dcasgd shard (\d+)/(\d+) listening on (\S+)")
_MAX_LINE = 64 * 1024  # a longer line is passed on in pieces, each with the prefix
_TAIL_LINES = 40  # lines of a child's output kept for error messages
_KILL_WAIT = 10.0  # seconds to wait for a SIGKILLed process to be reaped
_PUMP_WAIT = 2.0  # seconds to wait for a child's pipe to close once every child has exited
# ipc echoes 40 MB in 0.53-0.71x the time of tcp on 127.0.0.1, push_pull of 10M floats takes 0.80-0.96x
# (docs/benchmarks.md, "Transport"); tcp stays for a job that wants it (metrics are HTTP on tcp either way).
TRANSPORTS = ("ipc", "tcp")
# ``dcasgd server`` options that a local cluster does not pass on to its shards, and why.
# ``dcasgd launch`` refuses them with these words; every other server option passes on.
NOT_PASSED_ON: dict[str, str] = {
    "--bind": "launch binds every shard to an ipc socket in a private directory (--transport tcp: a free "
    "127.0.0.1 port); to bind another address, start each shard with dcasgd server",
    "--shard": "launch numbers its shards itself; --shards N sets how many",
    "--num-shards": "launch sets it; use --shards N",
    "--num-workers": "launch sets it; use --workers M",
    "--curve-secret-key": "launch's shards listen on this host only (ipc or 127.0.0.1) and run without CURVE "
    "(its workers get no DCASGD_CURVE_* variables); for CURVE, start each shard with dcasgd server",
    "--curve-clients": "launch's shards listen on this host only (ipc or 127.0.0.1) and run without CURVE "
    "(its workers get no DCASGD_CURVE_* variables); for CURVE, start each shard with dcasgd server",
    "--exit-when-done": "launch stops its shards itself (SIGTERM, which writes a last checkpoint) "
    "once every worker has exited 0",
}
# Options LocalCluster takes as its own arguments rather than in server_args.
_OWN_ARGUMENTS = {"--mode": "use mode=", "--metrics-port": "use metrics_port= (shard s gets metrics_port + s)"}


class LaunchError(RuntimeError):
    """A child could not be started, or a shard did not report its endpoint in time."""


class _Child:
    """One child process, the thread that pumps its output and the one that reaps it."""

    def __init__(self, kind: str, index: int, proc: subprocess.Popen) -> None:
        self.kind = kind  # "shard" or "worker"
        self.index = index
        self.role = f"{kind}{index}"
        self.proc = proc
        self.endpoint: str | None = None  # a shard's, once it printed its "listening on" line
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.returncode: int | None = None
        self.exited = threading.Event()
        # Held while the group is signalled and while the child is reaped: a group is only
        # signalled while its leader is alive or a zombie, so its id is still ours.
        self.lock = threading.Lock()
        self.pump: threading.Thread | None = None
        self.reaper: threading.Thread | None = None


class LocalCluster:
    """Shards and workers of one job as child processes of this one.

    ``command``: the worker command, run once per worker (e.g. ``["python", "train.py"]``).
    ``shards``, ``workers``: how many of each. ``mode``: the shards' update rule.
    ``server_args``: more ``dcasgd server`` options (``--lr``, ``--momentum``,
    ``--checkpoint-dir``, ...), the same for every shard (one checkpoint directory serves
    all: the files are named by shard); none of :data:`NOT_PASSED_ON`. Shards get
    ``--threads 1`` unless these set ``--threads``. ``metrics_port``: when > 0, shard
    ``s`` serves Prometheus metrics on port ``metrics_port + s`` (``--metrics-host`` in
    ``server_args`` picks the address; default 127.0.0.1). ``env``: variables
    added to this process's environment for every child. Workers also get
    ``OMP_NUM_THREADS=1`` unless it is set (as ``torchrun`` does: many processes
    share few cores) and ``PYTHONUNBUFFERED=1``. ``output``: where the prefixed
    lines go (default ``sys.stdout``); ``quiet=True`` drops them. ``start_timeout``:
    seconds for all shards to report their endpoints. ``grace``: seconds between
    SIGTERM and SIGKILL when the job is stopped. ``transport``: ``"ipc"`` (default, measured
    faster on one host) binds shard ``s`` to ``ipc://DIR/shardS`` in a fresh private directory
    (mode 0700) that :meth:`stop` removes; ``"tcp"`` to a free 127.0.0.1 port. Either way the
    workers get the endpoints in ``DCASGD_SERVERS``.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        shards: int = 1,
        workers: int = 1,
        mode: str = "dcasgd-a",
        server_args: Sequence[str] = (),
        metrics_port: int = 0,
        env: Mapping[str, str] | None = None,
        output: TextIO | None = None,
        quiet: bool = False,
        start_timeout: float = 30.0,
        grace: float = 5.0,
        transport: str = "ipc",
    ) -> None:
        if not command:
            raise ValueError("no worker command given")
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}: one of {', '.join(TRANSPORTS)}")
        for arg in server_args:
            opt = arg.split("=", 1)[0]
            why = NOT_PASSED_ON.get(opt) or _OWN_ARGUMENTS.get(opt)
            if why is not None:
                raise ValueError(f"server_args must not set {opt}: {why}")
        if not 0 <= metrics_port <= 65535 - (shards - 1):
            raise ValueError(
                f"metrics_port must be 0 (off) or a port with room for {shards} shards, got {metrics_port}"
            )
        self.command = list(command)
        self.num_shards = shards
        self.num_workers = workers
        self.mode = mode
        self.server_args = list(server_args)
        self.metrics_port = metrics_port
        self.transport = transport
        self._ipc_dir: str | None = None  # the shards' socket files, with transport="ipc"
        if not any(a.split("=", 1)[0] == "--threads" for a in server_args):
            self.server_args += ["--threads", "1"]
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.grace = grace
        self._output: TextIO | None = None if quiet else (output if output is not None else sys.stdout)
        self._output_lock = threading.Lock()
        self._cond = threading.Condition()  # notified when a shard reports its endpoint or a pipe closes
        self._exits: queue.Queue[_Child] = queue.Queue()  # children in the order they exited
        self._shards: list[_Child] = []
        self._workers: list[_Child] = []
        self._workers_done = 0  # workers whose exit wait() has seen
        self._stopping = False
        self._stopped = False
        self._result: int | None = None

    # --- public API ------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The shards' endpoints in shard order (empty before :meth:`start_servers`)."""
        return [c.endpoint for c in self._shards if c.endpoint is not None]

    @property
    def pids(self) -> dict[str, int]:
        """The pid of every child started so far, by role (``shard0``, ``worker3``, ...)."""
        return {c.role: c.proc.pid for c in self._shards + self._workers}

    def start_servers(self) -> list[str]:
        """Start the shards and wait until each reports its endpoint; returns them in shard order.

        Raises :class:`LaunchError`, naming the shard and showing its output, if a shard
        exits or does not report within ``start_timeout`` seconds; everything started is
        stopped first.
        """
        if self._shards:
            raise RuntimeError("start_servers() was already called")
        base = {**os.environ, **self.env}
        base.setdefault("PYTHONUNBUFFERED", "1")
        binds = self._binds()
        for s in range(self.num_shards):
            cmd = [
                sys.executable, "-m", "dcasgd", "server", "--bind", binds[s], "--shard", str(s),
                "--num-shards", str(self.num_shards), "--num-workers", str(self.num_workers), "--mode", self.mode,
                *self.server_args,
            ]  # fmt: skip
            if self.metrics_port > 0:
                cmd += ["--metrics-port", str(self.metrics_port + s)]
            self._shards.append(self._spawn("shard", s, cmd, base))
        deadline = time.monotonic() + self.start_timeout
        failed: tuple[_Child, str] | None = None
        with self._cond:
            while failed is None:
                pending = [c for c in self._shards if c.endpoint is None]
                if not pending:
                    break
                dead = [c for c in pending if c.exited.is_set() or (c.pump is not None and not c.pump.is_alive())]
                remaining = deadline - time.monotonic()
                if dead:
                    failed = (dead[0], "exited before reporting its endpoint")
                elif remaining <= 0:
                    failed = (pending[0], f"did not report its endpoint within {self.start_timeout:.1f} s")
                else:
                    self._cond.wait(remaining)
        if failed is not None:
            child, what = failed
            self.stop(grace=1.0)  # also reads the rest of its output
            code = f" (exit code {exit_code(child.returncode)})" if child.returncode is not None else ""
            out = "\n".join("  " + line for line in child.tail) or "  (no output)"
            raise LaunchError(f"shard {child.index} {what}{code}; its output:\n{out}")
        for c in self._shards:
            self._say(f"shard {c.index} pid {c.proc.pid} {c.endpoint}")
        return self.endpoints

    def _binds(self) -> list[str]:
        """Each shard's --bind: an ipc path in a new private directory, or a free 127.0.0.1 port."""
        tcp = ["tcp://127.0.0.1:0"] * self.num_shards
        if self.transport == "tcp":
            return tcp
        self._ipc_dir = tempfile.mkdtemp(prefix="dcasgd-")  # mode 0700: only this user reaches the shards
        binds = [f"ipc://{self._ipc_dir}/shard{s}" for s in range(self.num_shards)]
        if any(len(os.fsencode(b)) - len("ipc://") > job_env.IPC_PATH_MAX for b in binds):
            self._say(f"the temporary directory {self._ipc_dir} is too long for an ipc socket path; using tcp")
            self._remove_ipc_dir()
            return tcp
        return binds

    def _remove_ipc_dir(self) -> None:
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def start_workers(self) -> None:
        """Start the worker command once per worker, with the job in its environment."""
        if len(self.endpoints) != self.num_shards:
            raise RuntimeError("start_servers() first")
        if self._workers:
            raise RuntimeError("start_workers() was already called")
        base = {**os.environ, **self.env}
        # The local shards run without CURVE: keys meant for a remote job would make every request unanswered.
        for name in (security.ENV_KEY, security.ENV_SERVER_KEY):
            if name not in self.env:
                base.pop(name, None)
        base.setdefault("OMP_NUM_THREADS", "1")
        base.setdefault("PYTHONUNBUFFERED", "1")
        base[job_env.SERVERS] = ",".join(self.endpoints)
        base[job_env.NUM_WORKERS[0]] = str(self.num_workers)
        for i in range(self.num_workers):
            child = self._spawn("worker", i, self.command, {**base, job_env.WORKER_ID[0]: str(i)})
            self._workers.append(child)
            self._say(f"worker {i} pid {child.proc.pid}")

    def wait(self, timeout: float | None = None) -> int:
        """Wait until every worker has exited; returns the job's exit code.

        The moment a worker exits with a non-zero code (a signal counts as 128 + its
        number), everything else is stopped and that code returned. A shard that exits
        while workers run stops the job too (its code, or 1). When all workers exit 0
        the shards are stopped (SIGTERM) and 0 returned. Raises :class:`TimeoutError`
        if ``timeout`` seconds pass first; the processes keep running then.
        """
        if self._result is not None:
            return self._result
        if not self._workers:
            raise RuntimeError("start_workers() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._workers_done < self.num_workers:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                child = self._exits.get(timeout=remaining)
            except queue.Empty:
                running = [c.role for c in self._workers if not c.exited.is_set()]
                raise TimeoutError(f"workers still running after {timeout} s: {', '.join(running)}") from None
            code = exit_code(child.returncode)
            if child.kind == "worker":
                self._workers_done += 1
            if child.kind == "worker" and code != 0:
                self._say(f"worker {child.index} {describe_exit(child.returncode)}; stopping the job")
                return self._finish(code)
            if child.kind == "shard" and not self._stopping:
                self._say(f"shard {child.index} {describe_exit(child.returncode)} while workers ran; stopping the job")
                return self._finish(code or 1)
        self._say(f"all {self.num_workers} workers exited with code 0; stopping the shards")
        return self._finish(0)

    def stop(self, grace: float | None = None) -> None:
        """Stop every child: SIGTERM to its process group, up to ``grace`` s, then SIGKILL.

        ``grace`` defaults to the cluster's. Idempotent; also waits for the output
        threads to pass on the children's last lines.
        """
        if self._stopped:
            return
        if grace is None:
            grace = self.grace
        self._stopping = True
        children = self._shards + self._workers
        for c in children:
            _signal_if_running(c, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in children:
            c.exited.wait(max(0.0, deadline - time.monotonic()))
        for c in children:
            if _signal_if_running(c, signal.SIGKILL):
                self._say(f"{c.kind} {c.index} still ran {grace:.1f} s after SIGTERM; sent SIGKILL")
        deadline = time.monotonic() + _KILL_WAIT
        for c in children:
            if not c.exited.wait(max(0.0, deadline - time.monotonic())):
                self._say(f"{c.kind} {c.index} (pid {c.proc.pid}) did not exit after SIGKILL")
        deadline = time.monotonic() + _PUMP_WAIT
        for c in children:
            if c.pump is not None:
                c.pump.join(max(0.0, deadline - time.monotonic()))
                if c.pump.is_alive():  # a process that left the group holds the pipe
                    self._say(f"{c.kind} {c.index}'s output is still open; not waiting for it")
        self._remove_ipc_dir()  # a shard removes its own socket file, but not when it was SIGKILLed
        self._stopped = True

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- children --------------------------------------------------------------------

    def _spawn(self, kind: str, index: int, cmd: Sequence[str], env: Mapping[str, str]) -> _Child:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            self.stop()
            raise LaunchError(f"cannot start {kind} {index} ({' '.join(cmd)}): {exc}") from exc
        child = _Child(kind, index, proc)
        child.pump = threading.Thread(target=self._pump, args=(child,), name=f"dcasgd-{child.role}-output", daemon=True)
        child.reaper = threading.Thread(target=self._reap, args=(child,), name=f"dcasgd-{child.role}-wait", daemon=True)
        child.pump.start()
        child.reaper.start()
        return child

    def _pump(self, child: _Child) -> None:
        """Pass on the child's lines with its prefix; note a shard's endpoint."""
        assert child.proc.stdout is not None
        with child.proc.stdout as pipe:
            for raw in iter(lambda: pipe.readline(_MAX_LINE), b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                child.tail.append(line)
                if child.kind == "shard" and child.endpoint is None:
                    m = _LISTENING.match(line)
                    if m is not None and int(m.group(1)) == child.index:
                        with self._cond:
                            child.endpoint = m.group(3)
                            self._cond.notify_all()
                self._write(f"[{child.role}] {line}\n")
        with self._cond:
            self._cond.notify_all()

    def _reap(self, child: _Child) -> None:
        """Wait for the child to exit, kill what is left of its group, reap it, report the exit."""
        pid = child.proc.pid
        if hasattr(os, "waitid"):
            try:  # wait without reaping: the zombie keeps the group's id ours while we signal it
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        with child.lock:
            killpg_quietly(pid, signal.SIGKILL)
            child.returncode = child.proc.wait()
            child.exited.set()
        self._exits.put(child)
        with self._cond:
            self._cond.notify_all()

    def _finish(self, code: int) -> int:
        self.stop()
        self._result = code
        return code

    # --- output ----------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self._write(f"[launch] {message}\n")

    def _write(self, text: str) -> None:
        with self._output_lock:
            if self._output is None:
                return
            try:
                self._output.write(text)
                self._output.flush()
            except (OSError, ValueError):  # closed, or a broken pipe: keep draining the children, silently
                self._output = None


def launch(command: Sequence[str], **kwargs: Any) -> int:
    """Run one job to its end: start the shards, then the workers, wait; returns the exit code.

    ``kwargs`` are :class:`LocalCluster`'s. Ctrl-C (SIGINT) stops everything and returns
    130; SIGTERM, when this runs in the main thread, returns 143 the same way. A second
    Ctrl-C while stopping skips the grace period.
    """
    cluster = LocalCluster(command, **kwargs)
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        cluster.start_servers()
        cluster.start_workers()
        return cluster.wait()
    except KeyboardInterrupt:
        cluster._say("interrupted (SIGINT); stopping all processes")
        return 128 + signal.SIGINT
    except _Terminated:
        cluster._say("terminated (SIGTERM); stopping all processes")
        return 128 + signal.SIGTERM
    finally:
        try:
            cluster.stop()
        except (KeyboardInterrupt, _Terminated):
            cluster.stop(grace=0.0)
        if in_main:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


class _Terminated(Exception):
    """SIGTERM arrived while :func:`launch` ran in the main thread."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise _Terminated


def _signal_if_running(child: _Child, sig: int) -> bool:
    """Signal the child's process group if the child has not been reaped; True if it was signalled."""
    with child.lock:
        if child.exited.is_set():
            return False
        killpg_quietly(child.proc.pid, sig)
        return True
