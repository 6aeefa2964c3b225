"""A model's parameters as one flat float32 vector, and its split into shards.

The whole model travels as one contiguous vector; shard ``s`` of ``S`` owns the
slice ``[lo_s, hi_s)``. The split is a pure function of the vector length and the
shard count, so every worker and every shard compute the same ranges without
talking to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def shard_ranges(numel: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``num_shards`` contiguous, balanced slices.

    The first ``numel % num_shards`` shards get one element more than the rest;
    a shard may be empty when ``numel < num_shards``.

    Returns a list of ``(lo, hi)`` pairs, half-open, in element units.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(numel, num_shards)
    ranges = []
    lo = 0
    for s in range(num_shards):
        hi = lo + base + (1 if s < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def fingerprint(entries: Iterable[tuple[str, Sequence[int]]]) -> str:
    """A short hex digest of parameter names and shapes, in order.

    Two models get the same fingerprint exactly when they have the same
    parameters, with the same shapes, in the same order.
    """
    h = hashlib.sha256()
    for name, shape in entries:
        h.update(name.encode("utf-8"))
        h.update(b"\x00")
        h.update(",".join(str(int(d)) for d in shape).encode("ascii"))
        h.update(b"\x01")
    return h.hexdigest()[:16]


def flat_fingerprint(numel: int) -> str:
    """The fingerprint of a bare flat vector of ``numel`` floats (no names)."""
    return fingerprint([("flat", (numel,))])


@dataclass(frozen=True)
class FlatLayout:
    """Where each named parameter lives in the flat vector.

    ``offsets[i]`` is the element offset of ``names[i]``; ``numel`` the total
    length in float32 elements.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def from_shapes(cls, entries: Iterable[tuple[str, Sequence[int]]]) -> FlatLayout:
        names, shapes, offsets = [], [], []
        off = 0
        for name, shape in entries:
            shape = tuple(int(d) for d in shape)
            size = 1
            for d in shape:
                size *= d
            names.append(name)
            shapes.append(shape)
            offsets.append(off)
            off += size
        return cls(tuple(names), tuple(shapes), tuple(offsets), off)

    @property
    def fingerprint(self) -> str:
        return fingerprint(zip(self.names, self.shapes, strict=True))

    def describe_difference(self, other: FlatLayout) -> str:
        """A one-line account of how ``other`` differs from this layout, or ``""``."""
        if self.fingerprint == other.fingerprint:
            return ""
        if len(self.names) != len(other.names):
            return f"{len(other.names)} parameters instead of {len(self.names)}"
        for a, sa, b, sb in zip(self.names, self.shapes, other.names, other.shapes, strict=True):
            if a != b:
                return f"parameter {b!r} where {a!r} was expected"
            if sa != sb:
                return f"parameter {a!r} has shape {list(sb)} instead of {list(sa)}"
        return "parameters differ"
