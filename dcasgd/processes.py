"""Child processes that end cleanly: exit codes as a shell reports them, process groups, parent death.

Shared by :mod:`dcasgd.launch` (a whole job on one machine) and :mod:`dcasgd.worker`
(one worker command inside a container).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_code(returncode: int | None) -> int:
    """A shell's exit code: a death by signal N is 128 + N (None, still running: 0)."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int | None) -> str:
    """How a child ended, for messages: exited with code N, or was killed by SIGNAME (exit code 128+N)."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit code {exit_code(returncode)})"
    return f"exited with code {returncode}"


def killpg_quietly(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; nothing if the group is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty (or holds only what we may not signal)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:  # runs in the child between fork and exec: keep it tiny
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sigkill)

    return preexec
