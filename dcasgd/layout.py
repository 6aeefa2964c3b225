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


def fingerprint(shapes: Iterable[Sequence[int]]) -> str:
    """A short hex digest of parameter shapes, in order: the identity of a job's model.

    Two models get the same fingerprint exactly when they have as many parameters,
    with the same shapes, in the same order. Names and dtypes are not part of it:
    a worker passing ``model.named_parameters()`` and one passing
    ``model.parameters()`` join the same job, and so do a float64 and a float32
    copy of one model, since the wire and the shards hold float32 whatever the
    worker's dtype (names only make a mismatch easier to explain).
    """
    h = hashlib.sha256()
    for shape in shapes:
        h.update(",".join(str(int(d)) for d in shape).encode("ascii"))
        h.update(b"\x01")
    return h.hexdigest()[:16]


def flat_fingerprint(numel: int) -> str:
    """The fingerprint of a bare flat vector of ``numel`` floats (one 1-D parameter)."""
    return fingerprint([(numel,)])


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter lives in the flat vector.

    ``offsets[i]`` is the element offset of parameter ``i``; ``numel`` the total
    length in float32 elements. ``names[i]`` is its name, or ``""`` when the
    worker gave none; names only label parameters in messages.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def from_shapes(cls, entries: Iterable[tuple[str, Sequence[int]]]) -> FlatLayout:
        """The layout of ``(name, shape)`` pairs in order (``name`` may be ``""``)."""
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
        """:func:`fingerprint` of the shapes (names do not count)."""
        return fingerprint(self.shapes)

    def describe_difference(self, other: FlatLayout) -> str:
        """A one-line account of how ``other`` (a worker's model) differs from this one (the job's), or ``""``.

        A parameter is labelled with ``other``'s name, else this layout's, else its index.
        """
        if self.fingerprint == other.fingerprint:
            return ""
        first = ""
        for i, (sa, sb) in enumerate(zip(self.shapes, other.shapes, strict=False)):  # lengths may differ
            if sa != sb:
                name = other.names[i] or self.names[i]
                label = f"parameter {name!r}" if name else f"parameter #{i}"
                first = f"{label} has shape {list(sb)} instead of {list(sa)}"
                break
        if len(self.shapes) != len(other.shapes):
            count = f"{len(other.shapes)} parameters instead of {len(self.shapes)}"
            return f"{count}; the first that differs: {first}" if first else count
        return first or "parameters differ"
