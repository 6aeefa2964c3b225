"""Shard checkpoints: the whole state of one shard in one file, written atomically.

A file ``shard{S}-v{version}.ckpt`` is::

    b"DCASGDCK"  uint32 format  uint64 header_len  sha256(header + payload)  header  payload

(integers little-endian). The header is msgpack of plain values: the job id (``job``, a random
hex string made when a job starts fresh and kept across ``--resume``; nil in files from before
job ids), the job's identity (shard, num_shards, num_workers, mode, compensation, rule
hyperparameters, layout fingerprint, n, lo, hi), the counters (version, per-worker seq and
updates, staleness, duplicates, ...) and the list of arrays; the payload is those arrays as raw
float32 (w, ms, momentum, the per-parameter previous weights, and each distinct backup once, in
the wire type, with a per-worker index). Nothing is unpickled on load; a file whose checksum does
not match is refused, so is one from another job.

:func:`save` writes ``<name>.<job>.tmp``, fsyncs it, renames it over the final name and fsyncs
the directory, so a crash leaves the previous checkpoint intact; it keeps the newest ``keep``
files of its own job and never removes a file of another job (or of an unknown one).
:class:`Writer` does the same in a background thread from a consistent copy, so that the serve
loop goes on meanwhile. :func:`resume` reads the newest complete checkpoint of the one job whose
files are in the directory.

Not kept: a sync round in progress (its pushes are rolled back; the workers' retries
apply them again) and the remembered answers (after a restart a retried request is
answered with the current state, like a request that arrives for the first time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
from torch import Tensor

from .protocol import WIRE_DTYPES
from .shard import ShardConfig, ShardState

log = logging.getLogger("dcasgd.checkpoint")

MAGIC = b"DCASGDCK"
FORMAT = 1
_PREFIX = struct.Struct("<IQ")
_DIGEST = 32
_HEAD = len(MAGIC) + _PREFIX.size + _DIGEST
_NAME = re.compile(r"^shard(\d+)-v(\d+)\.ckpt$")
_RULES = (
    "lr",
    "lam",
    "lam0",
    "ms_decay",
    "eps",
    "momentum",
    "staleness_power",
    "clip",
    "fisher_lam0",
    "fisher_cap",
    "fisher_rank",
)
_MUTABLE = ("w", "ms", "momentum", "w_prev")  # changed in place by every update; snapshots are not
_ATTRS = {"w": "w", "ms": "_ms", "momentum": "_momentum", "w_prev": "_w_prev"}  # ShardState's names of them
_MAX_HEADER = 64 << 20  # a header this large is not one this module wrote
_CHUNK = 16 << 20  # bytes hashed and written at a time


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from another job."""


def new_job_id() -> str:
    """A random id for a job started fresh (16 hex digits)."""
    return secrets.token_hex(8)


def path_for(directory: str | os.PathLike, shard: int, version: int) -> Path:
    return Path(directory) / f"shard{shard}-v{version}.ckpt"


def checkpoints(directory: str | os.PathLike, shard: int) -> list[Path]:
    """The complete checkpoint files of ``shard`` in ``directory``, of any job, oldest first (``.tmp`` ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and int(m.group(1)) == shard and p.is_file():
            found.append((int(m.group(2)), p.stat().st_mtime_ns, p))
    return [p for _, _, p in sorted(found)]


def newest(directory: str | os.PathLike, shard: int) -> Path | None:
    """The newest complete checkpoint of ``shard`` (highest version, any job), or None."""
    found = checkpoints(directory, shard)
    return found[-1] if found else None


def job_of(path: str | os.PathLike) -> str | None:
    """The job id in the header of checkpoint ``path`` (None: written before job ids).

    Reads only the header (the checksum is checked by :func:`read`). Raises :class:`CheckpointError`
    if the file has no readable header.
    """
    path = Path(path)
    _, raw = _header_bytes(path)
    try:
        job = msgpack.unpackb(raw, raw=False).get("job")
    except (ValueError, AttributeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({exc})") from None
    if job is not None and not isinstance(job, str):
        raise CheckpointError(f"{path} is corrupt: job id {job!r}")
    return job


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """The format number and the raw msgpack header of checkpoint ``path``, without reading the arrays."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            if len(head) < _HEAD or head[: len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{path} is not a dcasgd checkpoint (or is truncated)")
            fmt, hlen = _PREFIX.unpack_from(head, len(MAGIC))
            if hlen > _MAX_HEADER:
                raise CheckpointError(f"{path} is corrupt: a header of {hlen} bytes")
            return fmt, f.read(hlen)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def by_job(directory: str | os.PathLike, shard: int) -> dict[str | None, list[Path]]:
    """The checkpoint files of ``shard`` in ``directory`` by job id (None: from before job ids), oldest first.

    Raises :class:`CheckpointError` naming a file whose job cannot be told (no readable header).
    """
    found: dict[str | None, list[Path]] = {}
    for p in checkpoints(directory, shard):
        found.setdefault(job_of(p), []).append(p)
    return found


def describe(jobs: dict[str | None, list[Path]]) -> str:
    """``job 1f2e...: shard0-v3.ckpt, shard0-v5.ckpt; files from before job ids: ...`` (for messages)."""

    def names(ps: list[Path]) -> str:
        shown = [p.name for p in ps[-3:]]
        return ", ".join(([f"{len(ps) - 3} more"] if len(ps) > 3 else []) + shown)

    return "; ".join(
        f"{'files from before job ids' if j is None else 'job ' + j}: {names(ps)}"
        for j, ps in sorted(jobs.items(), key=lambda kv: int(_NAME.match(kv[1][-1].name).group(2)))
    )


def check_fresh_start(directory: str | os.PathLike, shard: int) -> None:
    """Refuse (:class:`CheckpointError`) a new job in a directory that holds checkpoints of ``shard``.

    A new job would otherwise write next to another job's files, and a later ``--resume`` could not
    tell whose weights it continues. Files that cannot be read count too.
    """
    found = checkpoints(directory, shard)
    if not found:
        return
    try:
        what = describe(by_job(directory, shard))
    except CheckpointError as exc:
        what = f"{', '.join(p.name for p in found[-3:])} ({exc})"
    raise CheckpointError(
        f"{directory} already holds checkpoints of shard {shard} of another job ({what}); "
        "start with --resume to continue that job, or give another (or an empty) --checkpoint-dir for a new one"
    )


def _identity(config: ShardConfig) -> dict[str, Any]:
    r = config.rules
    return {
        "shard": config.shard,
        "num_shards": config.num_shards,
        "num_workers": config.num_workers,
        "mode": r.mode,
        "compensation": config.compensation,
        "wire_dtype": config.wire_dtype,
        "rules": {k: getattr(r, k) for k in _RULES},
    }


@dataclass
class _Capture:
    """A shard's state at one instant, ready to write: the packed header and the arrays' bytes."""

    shard: int
    version: int
    job: str | None
    header: bytes
    views: list[memoryview]

    @property
    def nbytes(self) -> int:
        return _HEAD + len(self.header) + _pad(len(self.header)) + sum(v.nbytes for v in self.views)


def _capture(
    state: ShardState, job: str | None, copies: dict[str, Tensor] | None = None, w: Tensor | None = None
) -> _Capture:
    """Pack ``state``'s header now; with ``copies``, copy the arrays the loop changes in place into it.

    Without ``copies`` the arrays are the live tensors: write them before the state changes.
    ``w``: a tensor equal to the weights now, written instead of a copy of them.
    """
    if not state.initialized:
        raise CheckpointError(f"shard {state.config.shard} has no weights yet: nothing to checkpoint")
    s = state.export_state()
    arrays: list[tuple[str, Tensor]] = [("w", s["w"])]
    arrays += [(k, s[k]) for k in ("ms", "momentum", "w_prev") if s[k] is not None]
    if copies is not None:
        for i, (name, t) in enumerate(arrays):
            if name == "w" and w is not None:
                arrays[i] = ("w", w)
                continue
            buf = copies.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = copies[name] = torch.empty_like(t)  # kept for the next checkpoint: no page faults then
            buf.copy_(t)
            arrays[i] = (name, buf)
    arrays += [(f"snapshot{i}", t) for i, (_, t) in enumerate(s["snapshots"])]
    plain = {k: v for k, v in s.items() if k not in (*_MUTABLE, "snapshots")}
    plain["snapshots"] = [v for v, _ in s["snapshots"]]
    header = msgpack.packb(
        {
            "job": job,
            "identity": {**_identity(state.config), "fp": s["fp"], "n": s["n"], "lo": s["lo"], "hi": s["hi"]},
            "state": plain,
            "arrays": [[name, t.numel(), str(t.dtype).removeprefix("torch.")] for name, t in arrays],
            "byteorder": sys.byteorder,
            "created": time.time(),
        }
    )
    views = [memoryview(t.detach().contiguous().view(torch.uint8).numpy()) for _, t in arrays]
    return _Capture(state.config.shard, s["version"], job, header, views)


def save(state: ShardState, directory: str | os.PathLike, keep: int = 3, *, job: str | None = None) -> Path:
    """Write ``state`` to ``directory`` now, atomically; returns the file.

    ``job``: the job id written into the header. Keeps the newest ``keep`` files of that job and
    removes no other file (``job=None`` prunes only files without a job id, as written before them).
    """
    return _write(_capture(state, job), Path(directory), keep)


def _write(cap: _Capture, d: Path, keep: int) -> Path:
    """The file of ``cap``: ``.tmp`` (checksummed while written), fsync, rename, fsync of the directory, prune."""
    d.mkdir(parents=True, exist_ok=True)
    final = path_for(d, cap.shard, cap.version)
    if final.exists() and _job_or_error(final) != cap.job:  # another job's file under the same name
        raise CheckpointError(f"{final} exists and is not a checkpoint of job {cap.job}: left as it is")
    tmp = final.with_name(f"{final.name}.{cap.job}.tmp" if cap.job else f"{final.name}.tmp")
    pad = bytes(_pad(len(cap.header)))
    digest = hashlib.sha256(cap.header)
    digest.update(pad)
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(_PREFIX.pack(FORMAT, len(cap.header)))
            f.write(bytes(_DIGEST))  # filled in below: the payload is read once, hashed and written together
            f.write(cap.header)
            f.write(pad)
            for v in cap.views:
                for i in range(0, v.nbytes, _CHUNK):
                    part = v[i : i + _CHUNK]
                    digest.update(part)
                    f.write(part)
            f.seek(len(MAGIC) + _PREFIX.size)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(d)
    _prune(d, cap.shard, keep, final, cap.job)
    return final


def _job_or_error(path: Path) -> str | None | CheckpointError:
    try:
        return job_of(path)
    except CheckpointError as exc:
        return exc


class Writer:
    """Checkpoints of one shard written in a background thread, one at a time.

    :meth:`start` takes a consistent copy of the state, in the caller's thread and before the
    state changes again: the arrays every update changes in place (w, ms, momentum, w_prev) are
    copied into buffers kept for the next checkpoint (one memcpy each; w is not copied when a
    float32 snapshot of the current version exists, as after a push_pull); the backups are not copied
    but held (:meth:`Snapshot.hold`): the shard does not reuse their buffers until the file is
    written. A thread then checksums and writes the file exactly as :func:`save` does. :meth:`poll`
    says how it ended. The copies cost memory: one more of each in-place array, for as long as the
    writer lives.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, job: str | None = None) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.job = job
        self._copies: dict[str, Tensor] = {}
        self._thread: threading.Thread | None = None
        self._written = threading.Event()
        self._outcome: Outcome | None = None

    @property
    def busy(self) -> bool:
        """A checkpoint is being written, or its outcome was not collected with :meth:`poll` yet."""
        return self._thread is not None

    @property
    def writing(self) -> int | None:
        """The version of the checkpoint being written (until :meth:`poll` collects it), or None."""
        out = self._outcome
        return None if self._thread is None or out is None or out.error is not None else out.version

    @property
    def done(self) -> bool:  # the Completion that holds the snapshots being written
        return self._written.is_set()

    def start(self, state: ShardState) -> Outcome | None:
        """Copy ``state`` now and write it in the background; the outcome so far (``pause``: the copy, seconds).

        None if the buffers for the copy are not there yet (the first time, or after the shard's
        arrays changed): they are made and touched in the background, and a later call starts.
        """
        if self.busy:
            raise CheckpointError("a checkpoint is still being written")
        wanted = {k: t for k in _MUTABLE if (t := getattr(state, _ATTRS[k])) is not None}
        if any(
            (b := self._copies.get(k)) is None or b.shape != t.shape or b.dtype != t.dtype for k, t in wanted.items()
        ):
            # Fresh pages fault in as they are first written: that costs more than the copy itself.
            shapes = {k: (t.shape, t.dtype) for k, t in wanted.items()}
            args = (shapes, state.version)
            self._thread = threading.Thread(target=self._prepare, args=args, name="dcasgd-checkpoint", daemon=True)
            self._thread.start()
            return None
        t0 = time.perf_counter()
        held = {id(s): s for s in (*state.backup, *state.previous) if s is not None}.values()
        # A float32 snapshot of the current version is the weights bit for bit: written, not copied.
        w = next((s.tensor for s in held if s.version == state.version and s.tensor.dtype == torch.float32), None)
        cap = _capture(state, self.job, self._copies, w)
        self._written.clear()
        for snap in held:
            snap.hold(self)  # every snapshot in the file is one of these (ShardState.export_state)
        pause = time.perf_counter() - t0
        outcome = Outcome(cap.version, cap.nbytes, pause)
        self._outcome = outcome
        self._thread = threading.Thread(target=self._run, args=(cap, outcome), name="dcasgd-checkpoint", daemon=True)
        self._thread.start()
        return outcome

    def _prepare(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], version: int) -> None:
        _lower_priority()
        self._copies = {}
        try:
            self._copies = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
        except Exception as exc:  # out of memory, say: reported by poll() as a failed checkpoint
            self._outcome = Outcome(version, 0, 0.0, error=exc)

    def _run(self, cap: _Capture, outcome: Outcome) -> None:
        _lower_priority()
        t0 = time.perf_counter()
        try:
            outcome.path = _write(cap, self.directory, self.keep)
        except Exception as exc:  # reported by poll(); the loop goes on
            outcome.error = exc
        finally:
            outcome.seconds = time.perf_counter() - t0
            self._written.set()

    def poll(self) -> Outcome | None:
        """The outcome of the checkpoint written in the background, once it is written (then not again)."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self._collect()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait for the checkpoint being written, if any; its outcome (None if none, or not within ``timeout``)."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self._collect()

    def _collect(self) -> Outcome | None:
        self._thread = None
        outcome, self._outcome = self._outcome, None
        return outcome


@dataclass
class Outcome:
    """How one checkpoint went: ``pause`` (seconds the caller spent copying), ``seconds`` (writing), ``nbytes``."""

    version: int
    nbytes: int
    pause: float
    seconds: float = 0.0
    path: Path | None = None
    error: Exception | None = None


def _lower_priority() -> None:
    """Let the serve loop's thread go first when both want a core (Linux: a nice value per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _pad(header_len: int) -> int:
    """Zero bytes after the header, so that the arrays start 64-byte aligned."""
    return -(_HEAD + header_len) % 64


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(d: Path, shard: int, keep: int, current: Path, job: str | None) -> None:
    """Remove the files of job ``job`` but the newest ``keep`` (``current`` among them) and its leftover ``.tmp``."""
    mine = [p for p in checkpoints(d, shard) if p != current and _job_or_error(p) == job]
    old = mine[: -(keep - 1) or None] if keep > 0 else []
    stale_tmp = list(d.glob(f"shard{shard}-v*.ckpt.{job}.tmp" if job else f"shard{shard}-v*.ckpt.tmp"))  # a crash
    for p in old + stale_tmp:
        try:
            p.unlink()
        except OSError as exc:
            log.warning("could not remove old checkpoint %s: %s", p, exc)


def load(directory: str | os.PathLike, config: ShardConfig, fingerprint: str | None = None) -> ShardState:
    """The shard state that :func:`resume` reads (without the job id)."""
    return resume(directory, config, fingerprint)[0]


def resume(
    directory: str | os.PathLike, config: ShardConfig, fingerprint: str | None = None
) -> tuple[ShardState, str | None]:
    """The state in the newest complete checkpoint of ``config.shard`` in ``directory``, and its job id.

    The directory must hold the files of one job for this shard: files of two or more job ids are
    refused, with a list of them (move away those of the jobs not to resume). Files from before job
    ids (job id None) are read only if there are no others, and are otherwise left alone.
    Raises :class:`CheckpointError` if there is none, or if it is damaged or from another job
    (another shard index, shard count, worker count, mode or compensation; another layout
    ``fingerprint`` if one is given). Differing rule hyperparameters are logged and the new ones used.
    """
    shard = config.shard
    jobs = by_job(directory, shard)
    if not jobs:
        raise CheckpointError(
            f"no checkpoint of shard {shard} in {directory} (files shard{shard}-v<version>.ckpt); "
            "start without --resume for a new job"
        )
    known = [j for j in jobs if j is not None]
    if len(known) > 1:
        raise CheckpointError(
            f"{directory} holds checkpoints of shard {shard} of {len(known)} jobs ({describe(jobs)}): "
            "a resume continues one; move the files of the others away"
        )
    job = known[0] if known else None
    if known and None in jobs:
        log.warning(
            "shard %d: resuming job %s; the files from before job ids are left alone (%s)",
            shard,
            job,
            ", ".join(p.name for p in jobs[None]),
        )
    files = jobs[job]
    try:
        return read(files[-1], config, fingerprint), job
    except CheckpointError as exc:
        if len(files) > 1:
            raise CheckpointError(f"{exc} (move it away to resume from the previous one, {files[-2].name})") from None
        raise


def read(path: str | os.PathLike, config: ShardConfig, fingerprint: str | None = None) -> ShardState:
    """The shard state in checkpoint file ``path``; see :func:`load`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            got = f.readinto(buf)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if got != size or size < _HEAD or buf[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a dcasgd checkpoint (or is truncated: {size} bytes)")
    fmt, hlen = _PREFIX.unpack_from(buf, len(MAGIC))
    if fmt != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {fmt}; this dcasgd reads format {FORMAT}")
    body = memoryview(buf)[_HEAD:]
    if hashlib.sha256(body).digest() != bytes(buf[_HEAD - _DIGEST : _HEAD]):
        raise CheckpointError(f"{path} is corrupt: checksum mismatch (truncated or damaged, {size} bytes)")
    if hlen > len(body):
        raise CheckpointError(f"{path} is corrupt: header of {hlen} bytes in a body of {len(body)}")
    try:
        h = msgpack.unpackb(body[:hlen], raw=False)
        ident, plain, arrays = h["identity"], h["state"], h["arrays"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({exc})") from None
    _check_identity(path, ident, config, fingerprint)
    if h.get("byteorder") != sys.byteorder:
        raise CheckpointError(f"{path} was written on a {h.get('byteorder')}-endian machine, this is {sys.byteorder}")
    size_each = ident["hi"] - ident["lo"]
    tensors: dict[str, Tensor] = {}
    if "w" not in {entry[0] for entry in arrays}:
        raise CheckpointError(f"{path} is corrupt: no weights in it")
    offset = _HEAD + hlen + _pad(hlen)
    for name, count, *kind in arrays:
        dtype = kind[0] if kind else "float32"  # snapshots are in the wire type
        if dtype not in WIRE_DTYPES:
            raise CheckpointError(f"{path} is corrupt: array {name} has unknown type {dtype!r}")
        itemsize = WIRE_DTYPES[dtype]
        if count != size_each or offset + itemsize * count > size:
            raise CheckpointError(f"{path} is corrupt: array {name} of {count} floats, the shard has {size_each}")
        tensors[name] = torch.frombuffer(buf, dtype=getattr(torch, dtype), offset=offset, count=count).clone()
        offset += itemsize * count
    if offset != size:
        raise CheckpointError(f"{path} is corrupt: {size - offset} bytes after the last array")
    state = {
        **plain,
        **{k: tensors.get(k) for k in ("w", "ms", "momentum", "w_prev")},
        "snapshots": [(v, tensors[f"snapshot{i}"]) for i, v in enumerate(plain["snapshots"])],
    }
    shard = ShardState.from_state(config, state)
    log.info("shard %d: read checkpoint %s (version %d)", config.shard, path, shard.version)
    return shard


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of checkpoint file ``path`` (``identity``, ``state``, ``arrays``, ``created``), for tools.

    Read-only and cheap: the arrays are neither read nor checksummed (:func:`read` does both). Raises
    :class:`CheckpointError` for a file that is not a dcasgd checkpoint or whose header is unreadable.
    """
    path = Path(path)
    fmt, raw = _header_bytes(path)
    if fmt != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {fmt}; this dcasgd reads format {FORMAT}")
    try:
        h = msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({exc})") from None
    if not isinstance(h, dict) or not isinstance(h.get("identity"), dict) or not isinstance(h.get("state"), dict):
        raise CheckpointError(f"{path} is corrupt: its header has no identity or state")
    return h


def _check_identity(path: Path, ident: dict[str, Any], config: ShardConfig, fingerprint: str | None) -> None:
    want = _identity(config)
    ident = {"wire_dtype": "float32", **ident}  # files from before the wire type was a choice
    for key in ("shard", "num_shards", "num_workers", "mode", "compensation", "wire_dtype"):
        if ident.get(key) != want[key]:
            raise CheckpointError(
                f"{path} is from another job: the checkpoint is for {key} {ident.get(key)}, "
                f"this server has {key} {want[key]}"
            )
    if fingerprint is not None and ident.get("fp") != fingerprint:
        raise CheckpointError(
            f"{path} is from another job: layout fingerprint {ident.get('fp')}, expected {fingerprint}"
        )
    changed = {k: (v, want["rules"][k]) for k, v in ident.get("rules", {}).items() if want["rules"].get(k) != v}
    if changed:
        log.warning(
            "shard %d: %s was written with other rule settings; using the new ones: %s",
            config.shard,
            path.name,
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changed.items())),
        )
