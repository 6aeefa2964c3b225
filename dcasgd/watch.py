"""``dcasgd status --watch``: a live view of a running job, redrawn every second.

Each frame asks every shard for its stats (``fetch_stats``, all shards at once) and shows what
changed since the previous frame:

- per shard: version, updates/s, staleness p50/p99 (over the last interval and over the whole job,
  from the shard's histogram), bytes/s in and out, error replies (per second and in all), and in
  sync mode the last round's time and rounds/s;
- per worker: updates/s, the staleness of its last push (the largest over the shards), its p50/p99
  staleness over the whole job (from the shards' per-worker histograms: 0, 1, then power-of-two
  buckets, shown as ranges), and its state:
  ``live`` (pushed in the last interval), ``idle`` (did not: starting, stuck, or a straggler),
  ``out`` (left out of sync rounds) or ``finished N`` (reported its end with exit status N);
- the error replies by code, summed over the shards.

On a terminal each frame replaces the previous one (ANSI clear and home); into a pipe or a file the
frames follow each other, separated by a blank line. Ctrl-C ends it (exit 0).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from .client import DcasgdError, fetch_stats
from .security import SecurityError
from .shard import EXACT_STALENESS

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


@dataclass
class Sample:
    """One shard's stats (or why there are none) at ``at`` (``time.monotonic()``)."""

    endpoint: str
    at: float
    stats: dict[str, Any] | None
    error: str | None = None


def fetch_all(
    endpoints: list[str], timeout: float, stop: threading.Event | None = None, **keys: Any
) -> list[Sample] | None:
    """Every shard's stats, asked in parallel; a shard that does not answer gets a Sample with its error.

    Returns None as soon as ``stop`` is set (Ctrl-C), without waiting for the shards."""
    samples: list[Sample | None] = [None] * len(endpoints)

    def ask(i: int, ep: str) -> None:
        try:
            samples[i] = Sample(ep, time.monotonic(), fetch_stats(ep, timeout=timeout, **keys))
        except (DcasgdError, SecurityError) as exc:
            samples[i] = Sample(ep, time.monotonic(), None, str(exc))

    # Daemon threads: Ctrl-C during a wait for a silent shard does not wait for its timeout at exit.
    threads = [threading.Thread(target=ask, args=(i, ep), daemon=True) for i, ep in enumerate(endpoints)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.05)
            if stop is not None and stop.is_set():
                return None
    return samples  # type: ignore[return-value]


def quantile(histogram: dict[int, int], q: float) -> int | None:
    """The smallest staleness key with at least ``q`` of the pushes at or below it; None if empty.

    Keys from :data:`EXACT_STALENESS` on are power-of-two buckets named by their lower bound.
    """
    total = sum(histogram.values())
    if total <= 0:
        return None
    seen = 0
    for key in sorted(histogram):
        seen += histogram[key]
        if seen >= q * total:
            return key
    return max(histogram)


def _stale(key: int | None) -> str:
    if key is None:
        return "-"
    return str(key) if key < EXACT_STALENESS else f"{key}+"


def _rate(now: float, before: float | None, dt: float | None) -> str:
    return "-" if before is None or not dt else f"{(now - before) / dt:.1f}"


def _bytes_rate(now: int, before: int | None, dt: float | None) -> str:
    if before is None or not dt:
        return "-"
    rate = (now - before) / dt
    for unit in ("B", "KiB", "MiB", "GiB"):
        if rate < 1024 or unit == "GiB":
            return f"{rate:.0f} {unit}/s" if unit == "B" else f"{rate:.1f} {unit}/s"
        rate /= 1024
    raise AssertionError("unreachable")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in [header, *rows]]  # fmt: skip


def frame(samples: list[Sample], previous: list[Sample] | None) -> str:
    """One frame of the view: ``samples`` now, rates against ``previous`` (the frame before, or None)."""
    prev = {p.endpoint: p for p in previous or [] if p.stats is not None}
    lines = [time.strftime("dcasgd status --watch  %H:%M:%S") + f"  ({len(samples)} shards)", ""]

    shard_rows, answered, errors_by_code = [], [], Counter()
    sync = False
    for smp in samples:
        s = smp.stats
        if s is None:
            shard_rows.append([smp.endpoint, "no answer", *[""] * 8])
            continue
        p = prev.get(smp.endpoint)
        ps = p.stats if p else None
        dt = smp.at - p.at if p else None
        srv, psrv = s.get("server", {}), (ps or {}).get("server", {})
        hist = dict(s["staleness"])
        window = None
        if ps is not None:
            window = {k: v - dict(ps["staleness"]).get(k, 0) for k, v in hist.items()}
        for key, n in srv.items():
            if key.startswith("error:"):
                errors_by_code[key[6:]] += n
        sync = sync or s["mode"] == "sync"
        row = [
            f"{s['shard']} {smp.endpoint}",
            s["mode"],
            str(s["version"]),
            _rate(sum(s["updates"]), sum(ps["updates"]) if ps else None, dt),
            f"{_stale(quantile(window, 0.5))}/{_stale(quantile(window, 0.99))}" if window is not None else "-",
            f"{_stale(quantile(hist, 0.5))}/{_stale(quantile(hist, 0.99))}",
            _bytes_rate(srv.get("bytes_in", 0), psrv.get("bytes_in", 0) if ps else None, dt),
            _bytes_rate(srv.get("bytes_out", 0), psrv.get("bytes_out", 0) if ps else None, dt),
            f"{_rate(srv.get('errors', 0), psrv.get('errors', 0) if ps else None, dt)} ({srv.get('errors', 0)})",
        ]
        if s["mode"] == "sync":
            last = s.get("last_round_seconds")
            rounds = _rate(s["rounds"], ps["rounds"] if ps else None, dt)
            row.append(f"{last * 1000:.1f} ms, {rounds}/s" if last is not None else f"-, {rounds}/s")
        else:
            row.append("")
        shard_rows.append(row)
        answered.append((smp, p))
    header = ["shard", "mode", "version", "updates/s", "stale p50/p99 1s", "all", "in", "out", "errors/s (all)",
              "sync round"]  # fmt: skip
    if not sync:
        header, shard_rows = header[:-1], [r[:-1] for r in shard_rows]
    lines += _table(header, shard_rows)

    if answered:
        lines += ["", *_table(["worker", "updates/s", "last staleness", "p50/p99", "state"], _worker_rows(answered))]
    if errors_by_code:
        lines += ["", "error replies by code: " + "  ".join(f"{c}: {n}" for c, n in sorted(errors_by_code.items()))]
    return "\n".join(lines)


def _bucket(key: int | None) -> str:
    """A per-worker staleness bucket (0, 1, then [2**k, 2**(k+1)-1]) as text."""
    if key is None:
        return "-"
    return str(key) if key < 2 else f"{key}-{2 * key - 1}"


def _worker_rows(answered: list[tuple[Sample, Sample | None]]) -> list[list[str]]:
    """Per worker, over the shards that answered: every push reaches every shard, so a worker's
    updates/s is the mean over shards, and its last staleness the largest."""
    num_workers = max(len(smp.stats["updates"]) for smp, _ in answered)
    rows = []
    for w in range(num_workers):
        rates, stale, finished, pushed, out = [], [], None, False, False
        for smp, p in answered:
            s, ps = smp.stats, p.stats if p else None
            if w >= len(s["updates"]):
                continue
            if ps is not None and w < len(ps["updates"]):
                delta = s["updates"][w] - ps["updates"][w]
                rates.append(delta / (smp.at - p.at))
                pushed = pushed or delta > 0
            last = (s.get("last_staleness") or [None] * (w + 1))[w]
            if last is not None:
                stale.append(last)
            finished = dict(s.get("finished", [])).get(w, finished)
            out = out or (s["mode"] == "sync" and w not in s["live"])
        if finished is not None:
            state = f"finished {finished}"
        elif out:
            state = "out"
        elif pushed:
            state = "live"
        else:
            state = "idle"
        rate = f"{sum(rates) / len(rates):.1f}" if rates else "-"
        hist: dict[int, int] = {}  # the worker's pushes on every shard (each push reaches each)
        for smp, _ in answered:
            per_worker = smp.stats.get("worker_staleness") or []
            for key, n in per_worker[w] if w < len(per_worker) else []:
                hist[key] = hist.get(key, 0) + n
        spread = f"{_bucket(quantile(hist, 0.5))}/{_bucket(quantile(hist, 0.99))}" if hist else "-"
        rows.append([str(w), rate, str(max(stale)) if stale else "-", spread, state])
    return rows


def watch(endpoints: list[str], *, interval: float = 1.0, count: int | None = None, timeout: float = 5.0,
          out: TextIO | None = None, **keys: Any) -> int:  # fmt: skip
    """Draw a frame every ``interval`` s until Ctrl-C, or ``count`` frames. Returns 0, or 1 when a shard
    did not answer for the last frame."""
    out = out or sys.stdout
    tty = out.isatty()
    previous: list[Sample] = []
    drawn = 0
    # Ctrl-C sets a flag that the loop reads, instead of a KeyboardInterrupt raised at any point (in a
    # thread's start or join, where an interrupt can leave the interpreter's shutdown waiting).
    stop = threading.Event()
    installed, previous_handler = False, None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
        installed = True
    try:
        while not stop.is_set():
            started = time.monotonic()
            samples = fetch_all(endpoints, timeout, stop, **keys)
            if samples is None:
                break
            text = frame(samples, previous)
            out.write(CLEAR + text + "\n" if tty else ("\n" if drawn else "") + text + "\n")
            out.flush()
            drawn += 1
            previous = samples
            if count is not None and drawn >= count:
                return 1 if any(s.stats is None for s in previous) else 0
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous_handler is None else previous_handler)
    if tty:
        out.write("\n")
    return 0
