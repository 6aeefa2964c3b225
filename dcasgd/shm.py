"""Same-host shared memory: a worker's gradient and weights in a region its shard maps.

On one host a payload need not cross a socket. A worker (``Client``) makes one region per
shard: a memfd, sealed so that it can never shrink or grow, holding a header, a gradient
area and a weights area of the shard's slice in the job's wire type. A request names the
region (``pid``, ``fd``, ``size``, ``token``); the shard opens ``/proc/<pid>/fd/<fd>`` once,
checks it, maps it and keeps it for that worker. Then the worker copies its gradient in
and sends a header-only message; the shard copies the gradient out (so a worker that
writes the region meanwhile cannot get an unchecked value applied), applies it, copies the
new weights into the weights area, and answers with a header only. The worker reads the
weights after the answer: the shard wrote them before it sent it.

What the shard checks before it writes a byte (:meth:`Region.open`): that the file is a
memfd named by dcasgd, sealed against shrinking (a shrunk file would kill the shard with
SIGBUS on its next write), growing and further seals, of exactly the size its slice needs,
and that its header holds the token the request named. Opening another process's fd needs
the kernel's ptrace read access (the same user, on the same host and in the same pid
namespace): a shard that cannot, because the worker is in another container, answers
``shm_refused`` and the worker sends frames instead. The token means a request can name
only a region whose contents its sender already knows, so naming a region gives nothing
its sender did not already have.
"""

from __future__ import annotations

import hmac
import mmap
import os
import secrets
import stat
import sys

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # not a POSIX system: no regions, every payload goes in frames
    fcntl = None  # type: ignore[assignment]

ENV = "DCASGD_SHARED_MEMORY"  # 0: a worker never uses shared memory, 1: with every shard that offers it
MAGIC = b"dcasgd-shm-v1\0\0\0"  # 16 bytes at the start of a region
TOKEN_BYTES = 16
HEADER_BYTES = 4096  # magic, token; the areas after it start on page boundaries
NAME = "dcasgd-region"  # the memfd's name; /proc shows it as "/memfd:dcasgd-region (deleted)"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL if sys.platform == "linux" and fcntl else 0
_PAGE = 4096


class RegionRefused(Exception):
    """A shard cannot use the region a request names; the message says why."""


def available() -> bool:
    """Whether this platform has sealed memfds (Linux 3.17+) and a ``/proc`` to open them through."""
    return bool(SEALS) and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def area_bytes(numel: int, itemsize: int) -> int:
    """Bytes of one area (gradient or weights) for ``numel`` values, rounded up to whole pages."""
    return -(-numel * itemsize // _PAGE) * _PAGE


def region_bytes(numel: int, dtype: torch.dtype) -> int:
    """Size in bytes of the region for a slice of ``numel`` values of ``dtype``."""
    return HEADER_BYTES + 2 * area_bytes(numel, dtype.itemsize)


class Region:
    """One worker's region for one shard: ``grad`` and ``weights``, 1-D tensors of ``numel`` values.

    Made by the worker with :meth:`create` (it owns the fd), mapped by the shard with
    :meth:`open`. The mapping lives as long as any tensor view of it: dropping the last
    reference unmaps it, so a reply being written keeps its region mapped.
    """

    def __init__(self, mm: mmap.mmap, numel: int, dtype: torch.dtype, token: bytes, fd: int | None) -> None:
        self.numel = numel
        self.dtype = dtype
        self.size = len(mm)
        self.token = token
        self.fd = fd  # the worker's own fd (None in the shard, which closes its fd once mapped)
        area = area_bytes(numel, dtype.itemsize)
        self.grad = torch.frombuffer(mm, dtype=dtype, count=numel, offset=HEADER_BYTES) if numel else _empty(dtype)
        self.weights = (
            torch.frombuffer(mm, dtype=dtype, count=numel, offset=HEADER_BYTES + area) if numel else _empty(dtype)
        )

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype) -> Region:
        """A new region for ``numel`` values of ``dtype`` in this process, its memory allocated up front.

        Raises OSError when the system cannot make one (no memfd, no memory).
        """
        size = region_bytes(numel, dtype)
        fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Allocated now, charged to this process: the shard's writes never fault in new pages.
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mm = mmap.mmap(fd, size)
            token = secrets.token_bytes(TOKEN_BYTES)
            mm[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, numel, dtype, token, fd)

    @classmethod
    def open(cls, pid: int, fd: int, size: int, token: bytes, numel: int, dtype: torch.dtype) -> Region:
        """Map the region that process ``pid`` holds as ``fd``, after checking that it is one.

        ``size``: what the request says; ``numel``, ``dtype``: the shard's slice and wire type.
        Raises :class:`RegionRefused` with the reason when it cannot be used.
        """
        want = region_bytes(numel, dtype)
        if size != want:
            raise RegionRefused(f"region of {size} bytes, this shard's slice needs {want}")
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:  # another pid namespace (a container), another user, or gone
            raise RegionRefused(f"cannot open fd {fd} of process {pid}: {exc.strerror}") from None
        try:
            name = os.readlink(f"/proc/self/fd/{own}")  # of what was opened, not of what the path named before
            if not name.startswith(f"/memfd:{NAME}"):
                raise RegionRefused(f"fd {fd} of process {pid} is {name!r}, not a dcasgd region")
            st = os.fstat(own)
            if not stat.S_ISREG(st.st_mode) or st.st_size != want:
                raise RegionRefused(f"fd {fd} of process {pid} holds {st.st_size} bytes, expected {want}")
            seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
            if seals & SEALS != SEALS:
                raise RegionRefused(f"fd {fd} of process {pid} is not sealed against shrinking and growing")
            mm = mmap.mmap(own, want)
        except OSError as exc:
            raise RegionRefused(f"cannot map fd {fd} of process {pid}: {exc.strerror}") from None
        finally:
            os.close(own)  # the mapping keeps the memory
        if not hmac.compare_digest(mm[: len(MAGIC) + TOKEN_BYTES], MAGIC + token):
            mm.close()
            raise RegionRefused(f"fd {fd} of process {pid} does not hold the token the request named")
        return cls(mm, numel, dtype, token, None)

    def describe(self) -> dict[str, int | str]:
        """What a request says to name this region (the worker's side): pid, fd, size, token (hex)."""
        return {"pid": os.getpid(), "fd": self.fd, "size": self.size, "token": self.token.hex()}

    def close(self) -> None:
        """Close the worker's fd; the mapping goes with the last view (a shard may still map the memory)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _empty(dtype: torch.dtype) -> Tensor:
    return torch.empty(0, dtype=dtype)
