"""The wire format between workers and shards: one msgpack header frame plus raw payloads.

A request is ``[header, payload?]`` on a DEALER socket (the shard's ROUTER adds
the peer identity in front). The header is a msgpack map with string keys; a
payload is a raw frame of little-endian float32 values, never pickled and never
msgpack-encoded. Every field of a header is checked here, before the shard or the
server touches a payload. ``docs/protocol.md`` documents each field.

Two kinds of bad input:

- not a message at all (no header frame, a header that is too large, not msgpack,
  not a map): :class:`MalformedMessage`; the server drops it and counts it.
- a message with a readable header that is wrong (unknown op, worker out of range,
  wrong size, wrong dtype, wrong fingerprint, seq < 1, wrong frame count, a worker id
  that belongs to another CURVE key):
  :class:`ProtocolError` with a ``code``; the server answers with an error reply.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 2  # 2: weights replies come in frames of at most REPLY_FRAME_BYTES
DTYPE = "float32"  # init payloads, and the shard's weights and state
ITEMSIZE = 4
# What gradients and weights may travel as (the job's wire type), with their sizes in bytes.
# A half-size type halves the bytes; the shard still keeps float32 weights and state.
WIRE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_KEEP = 2  # backups a worker may ask a shard to keep (two with overlapped steps)
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# A weights reply is split into frames of at most this many bytes, under glibc's 32 MiB ceiling for
# serving a block from reused heap memory rather than a fresh mmap (see ShardServer._send_reply_now).
REPLY_FRAME_BYTES = 8 << 20

OPS = ("hello", "init", "pull", "push", "push_pull", "stats", "claim", "done", "weights")
NO_WORKER_OPS = frozenset({"stats", "claim", "weights"})  # asked by a peer that has no worker id (yet)
PAYLOAD_OPS = frozenset({"init", "push", "push_pull"})
PUSH_OPS = frozenset({"push", "push_pull"})
WEIGHT_REPLY_OPS = frozenset({"pull", "push_pull"})
SHM_OPS = frozenset({"pull", "push", "push_pull"})  # may name a shared-memory region instead of frames

# Error codes carried in error replies (``code`` field).
BAD_HEADER = "bad_header"
BAD_VERSION = "bad_version"
BAD_OP = "bad_op"
BAD_WORKER = "bad_worker"
BAD_SEQ = "bad_seq"
BAD_DTYPE = "bad_dtype"
BAD_SIZE = "bad_size"
BAD_FRAMES = "bad_frames"
BAD_FINGERPRINT = "bad_fingerprint"
BAD_RANGE = "bad_range"
BAD_LR = "bad_lr"
BAD_BASE = "bad_base"
NOT_INITIALIZED = "not_initialized"
NO_WEIGHTS = "no_weights"
ALREADY_PUSHED = "already_pushed"
NON_FINITE = "non_finite"
RESTARTED = "restarted"
NO_WORKER_ID = "no_worker_id"
FORBIDDEN = "forbidden"  # CURVE: the worker id belongs to another client key in this run
SHM_REFUSED = "shm_refused"  # the shard cannot use the shared-memory region the request names (dcasgd/shm.py)
MAX_NAME_CHARS = 256

if sys.byteorder != "little":  # payloads are little-endian float32, read in place
    raise ImportError("dcasgd needs a little-endian host")


class MalformedMessage(Exception):
    """Frames that are not a message at all; dropped and counted, never answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolError(Exception):
    """A readable request that is wrong; answered with ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Region:
    """A request's ``shm`` field: the worker's region for this shard (``dcasgd/shm.py``)."""

    pid: int
    fd: int
    size: int  # bytes
    token: bytes


@dataclass(frozen=True)
class Request:
    """A validated request header. Sizes are in bytes (``nbytes``) or elements (n, lo, hi)."""

    op: str
    rid: int
    worker: int | None
    seq: int | None = None
    fp: str | None = None
    n: int | None = None
    lo: int | None = None
    hi: int | None = None
    nbytes: int | None = None
    lr: float | None = None
    layout: list[list[Any]] | None = None
    instance: str | None = None
    name: str | None = None  # claim: the worker's name (its host name in a container)
    status: int | None = None  # done: the worker command's exit status, 0..255
    dtype: str | None = DTYPE  # the payload's element type (payload ops)
    base: int | None = None  # push: the version of this shard's weights the gradient was computed on
    base_instance: str | None = None  # push: the shard instance that sent those weights
    keep: int = 1  # pull, push_pull: how many of the newest weights sent to this worker the shard keeps
    shm: Region | None = None  # pull, push ops: the worker's shared-memory region the payloads are in


def pack(header: dict[str, Any]) -> bytes:
    """Encode a header map as msgpack bytes."""
    return msgpack.packb(header, use_bin_type=True)


def unpack(
    data: bytes | memoryview, max_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_items: int = 4096
) -> dict[str, Any]:
    """Decode a header frame, refusing anything that is not a small msgpack map.

    ``max_items``: the longest array a header may hold (a request's: 4096; a reply's lists
    have one entry per worker or per parameter, so a client passes ``max_bytes``, the bound
    the frame's size already sets).

    Raises :class:`MalformedMessage`. No pickle and no ext hook: nothing runs
    on receive, and any msgpack ext value with a body makes the header malformed.
    """
    if len(data) > max_bytes:
        raise MalformedMessage(f"header of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_items,
            max_map_len=256,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for garbage
        raise MalformedMessage(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"header is a {type(obj).__name__}, not a map")
    return obj


def _int(h: dict[str, Any], key: str, *, lo: int = 0, hi: int | None = None, required: bool = True) -> int | None:
    if key not in h:
        if required:
            raise ProtocolError(BAD_HEADER, f"missing field {key!r}")
        return None
    v = h[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(BAD_HEADER, f"field {key!r} must be an integer")
    if v < lo or (hi is not None and v >= hi):
        code = BAD_WORKER if key == "worker" else (BAD_SEQ if key == "seq" else BAD_HEADER)
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ProtocolError(code, f"field {key!r} = {v} is out of range {bound}")
    return v


def validate_request(h: dict[str, Any], num_workers: int, payload_frames: int) -> Request:
    """Check every field of a request header and the number of payload frames.

    ``payload_frames`` is how many frames followed the header. Raises
    :class:`ProtocolError`; the payload itself is not read here.
    """
    rid = _int(h, "rid")
    v = h.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {v!r}, this server speaks {PROTOCOL_VERSION}")
    op = h.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(BAD_OP, f"unknown op {op!r} (known: {', '.join(OPS)})")
    worker = _int(h, "worker", hi=num_workers, required=op not in NO_WORKER_OPS)
    shm = _region(h.get("shm")) if op in SHM_OPS else None
    want_frames = 1 if op in PAYLOAD_OPS and shm is None else 0  # a region holds the payload instead
    if payload_frames != want_frames:
        raise ProtocolError(BAD_FRAMES, f"{op} takes {want_frames} payload frame(s), got {payload_frames}")
    fp = None
    if op in ("init", "pull", "push", "push_pull"):
        fp = h.get("fp")
        if not isinstance(fp, str) or not 0 < len(fp) <= 64:
            raise ProtocolError(BAD_HEADER, "field 'fp' (layout fingerprint) must be a short string")
    nbytes = dtype = None
    if op in PAYLOAD_OPS:
        dtype = h.get("dtype")
        allowed = (DTYPE,) if op == "init" else tuple(WIRE_DTYPES)
        if dtype not in allowed:
            raise ProtocolError(BAD_DTYPE, f"dtype {dtype!r}, expected one of {', '.join(allowed)} (little endian)")
        nbytes = _int(h, "nbytes")
        if nbytes % WIRE_DTYPES[dtype]:
            raise ProtocolError(BAD_SIZE, f"nbytes = {nbytes} is not a multiple of {WIRE_DTYPES[dtype]} ({dtype})")
    base = _int(h, "base", required=False) if op in PUSH_OPS else None
    keep = 1
    if op in WEIGHT_REPLY_OPS and "keep" in h:
        keep = _int(h, "keep", lo=1, hi=MAX_KEEP + 1)
    seq = _int(h, "seq", lo=1) if op in PUSH_OPS else None
    lr = None
    if op in PUSH_OPS and h.get("lr") is not None:
        lr = h["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ProtocolError(BAD_LR, f"lr must be a finite number >= 0, got {lr!r}")
        lr = float(lr)
    instance = h.get("instance")
    if instance is not None and (not isinstance(instance, str) or len(instance) > 64):
        raise ProtocolError(BAD_HEADER, "field 'instance' must be a short string")
    base_instance = h.get("base_instance") if op in PUSH_OPS else None
    if base_instance is not None and (not isinstance(base_instance, str) or len(base_instance) > 64):
        raise ProtocolError(BAD_HEADER, "field 'base_instance' must be a short string")
    name = status = None
    if op == "claim":
        name = h.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise ProtocolError(BAD_HEADER, f"field 'name' must be a printable string of 1 to {MAX_NAME_CHARS} chars")
    if op == "done":
        status = _int(h, "status", hi=256)
    n = lo_ = hi_ = layout = None
    if op == "init":
        n = _int(h, "n")
        lo_ = _int(h, "lo")
        hi_ = _int(h, "hi")
        layout = _layout(h.get("layout"))
    return Request(
        op=op,
        rid=rid,
        worker=worker,
        seq=seq,
        fp=fp,
        n=n,
        lo=lo_,
        hi=hi_,
        nbytes=nbytes,
        lr=lr,
        layout=layout,
        instance=instance,
        name=name,
        status=status,
        dtype=dtype,
        base=base,
        base_instance=base_instance,
        keep=keep,
        shm=shm,
    )


def _region(value: Any) -> Region | None:
    """The optional ``shm`` field: ``{"pid", "fd", "size", "token"}`` naming the worker's region."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(BAD_HEADER, "field 'shm' must be a map of pid, fd, size and token")
    pid, fd, size = (_int(value, key, lo=lo, hi=2**63) for key, lo in (("pid", 1), ("fd", 0), ("size", 1)))
    token = value.get("token")
    if not isinstance(token, str) or len(token) != 32:
        raise ProtocolError(BAD_HEADER, "field 'shm.token' must be 32 hex digits")
    try:
        raw = bytes.fromhex(token)
    except ValueError:
        raise ProtocolError(BAD_HEADER, "field 'shm.token' must be 32 hex digits") from None
    return Region(pid, fd, size, raw)


def _layout(value: Any) -> list[list[Any]] | None:
    """The optional ``layout`` of an init: ``[[name, [dim, ...]], ...]``, kept to explain mismatches."""
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(e, list)
        and len(e) == 2
        and isinstance(e[0], str)
        and isinstance(e[1], list)
        and all(type(d) is int and d >= 0 for d in e[1])
        for e in value
    )
    if not ok:
        raise ProtocolError(BAD_HEADER, "field 'layout' must be a list of [name, [dims...]] pairs")
    return value


def error_header(rid: int | None, code: str, message: str, *, shard: int) -> dict[str, Any]:
    """The header of an error reply from shard ``shard`` (named, so a peer without a shard list can say which)."""
    return {"v": PROTOCOL_VERSION, "rid": rid, "ok": False, "shard": shard, "code": code, "msg": message}


def ok_header(rid: int, op: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The header of a successful reply; ``fields`` depend on the op (docs/protocol.md)."""
    return {"v": PROTOCOL_VERSION, "rid": rid, "ok": True, "op": op, **fields}
