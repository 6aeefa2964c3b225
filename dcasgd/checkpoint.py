"""Shard checkpoints: the whole state of one shard in one file, written atomically.

A file ``shard{S}-v{version}.ckpt`` is::

    b"DCASGDCK"  uint32 format  uint64 header_len  sha256(header + payload)  header  payload

(integers little-endian). The header is msgpack of plain values: the job's identity
(shard, num_shards, num_workers, mode, compensation, rule hyperparameters, layout
fingerprint, n, lo, hi), the counters (version, per-worker seq and updates, staleness,
duplicates, ...) and the list of arrays; the payload is those arrays as raw float32
(w, ms, momentum, the per-parameter previous weights, and each distinct backup once,
with a per-worker index). Nothing is unpickled on load; a file whose checksum does not
match is refused, so is one from another job.

:func:`save` writes ``<name>.tmp``, fsyncs it, renames it over the final name and fsyncs
the directory, so a crash leaves the previous checkpoint intact; it keeps the newest
``keep`` files of the shard. :func:`load` reads the newest complete one.

Not kept: a sync round in progress (its pushes are rolled back; the workers' retries
apply them again) and the remembered answers (after a restart a retried request is
answered with the current state, like a request that arrives for the first time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import sys
import time
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
_RULES = ("lr", "lam", "lam0", "ms_decay", "eps", "momentum")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from another job."""


def path_for(directory: str | os.PathLike, shard: int, version: int) -> Path:
    return Path(directory) / f"shard{shard}-v{version}.ckpt"


def checkpoints(directory: str | os.PathLike, shard: int) -> list[Path]:
    """The complete checkpoint files of ``shard`` in ``directory``, oldest first (``.tmp`` files ignored)."""
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
    """The newest complete checkpoint of ``shard`` (highest version), or None."""
    found = checkpoints(directory, shard)
    return found[-1] if found else None


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


def save(state: ShardState, directory: str | os.PathLike, keep: int = 3) -> Path:
    """Write ``state`` to ``directory`` atomically; returns the file. Keeps the newest ``keep`` files."""
    if not state.initialized:
        raise CheckpointError(f"shard {state.config.shard} has no weights yet: nothing to checkpoint")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    s = state.export_state()
    arrays: list[tuple[str, Tensor]] = [("w", s["w"])]
    arrays += [(k, s[k]) for k in ("ms", "momentum", "w_prev") if s[k] is not None]
    arrays += [(f"snapshot{i}", t) for i, (_, t) in enumerate(s["snapshots"])]
    plain = {k: v for k, v in s.items() if k not in ("w", "ms", "momentum", "w_prev", "snapshots")}
    plain["snapshots"] = [v for v, _ in s["snapshots"]]
    header = msgpack.packb(
        {
            "identity": {**_identity(state.config), "fp": s["fp"], "n": s["n"], "lo": s["lo"], "hi": s["hi"]},
            "state": plain,
            "arrays": [[name, t.numel(), str(t.dtype).removeprefix("torch.")] for name, t in arrays],
            "byteorder": sys.byteorder,
            "created": time.time(),
        }
    )
    views = [memoryview(t.detach().contiguous().view(torch.uint8).numpy()) for _, t in arrays]
    pad = bytes(_pad(len(header)))
    digest = hashlib.sha256(header)
    digest.update(pad)
    for v in views:
        digest.update(v)
    final = path_for(d, state.config.shard, s["version"])
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(_PREFIX.pack(FORMAT, len(header)))
        f.write(digest.digest())
        f.write(header)
        f.write(pad)
        for v in views:
            f.write(v)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(d)
    _prune(d, state.config.shard, keep, final)
    return final


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


def _prune(d: Path, shard: int, keep: int, current: Path) -> None:
    old = [p for p in checkpoints(d, shard) if p != current][: -(keep - 1) or None] if keep > 0 else []
    stale_tmp = [p for p in d.glob(f"shard{shard}-v*.ckpt.tmp")]  # left by a crash mid-write
    for p in old + stale_tmp:
        try:
            p.unlink()
        except OSError as exc:
            log.warning("could not remove old checkpoint %s: %s", p, exc)


def load(directory: str | os.PathLike, config: ShardConfig, fingerprint: str | None = None) -> ShardState:
    """The shard state in the newest complete checkpoint of ``config.shard`` in ``directory``.

    Raises :class:`CheckpointError` if there is none, or if it is damaged or from another job
    (another shard index, shard count, worker count, mode or compensation; another layout
    ``fingerprint`` if one is given). Differing rule hyperparameters are logged and the new ones used.
    """
    path = newest(directory, config.shard)
    if path is None:
        raise CheckpointError(
            f"no checkpoint of shard {config.shard} in {directory} (files shard{config.shard}-v<version>.ckpt); "
            "start without --resume for a new job"
        )
    older = checkpoints(directory, config.shard)[:-1]
    try:
        return read(path, config, fingerprint)
    except CheckpointError as exc:
        if older:
            raise CheckpointError(f"{exc} (move it away to resume from the previous one, {older[-1].name})") from None
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
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            if len(head) < _HEAD or head[: len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{path} is not a dcasgd checkpoint (or is truncated)")
            fmt, hlen = _PREFIX.unpack_from(head, len(MAGIC))
            if fmt != FORMAT:
                raise CheckpointError(f"{path} has checkpoint format {fmt}; this dcasgd reads format {FORMAT}")
            raw = f.read(hlen)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
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
