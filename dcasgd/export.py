"""The trained model out of the shards, as one file of named tensors (``dcasgd export``).

Two sources give one :class:`Export` (the whole flat float32 vector, the layout the
initializing worker sent, each shard's version, the job's identity):

- :func:`from_shards`: live shards, asked with the read-only ``weights`` op (no worker id;
  no worker's backup moves). Each shard's slice is one consistent version of that shard;
  shards count versions separately, so while workers train the whole is not one global
  version. Each shard's version goes into the file's metadata.
- :func:`from_checkpoints`: a stopped job's newest checkpoint of every shard in a directory,
  checked to be one job (same identity, all shards, slices that cover ``[0, n)``) and one set
  (written within ``max_skew`` seconds of each other).

:func:`tensors` names the parameters with the layout's names and shapes; :func:`write`
writes ``.safetensors`` (with :func:`metadata`) or a torch state_dict (``.pt``, tensors only).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint
from .layout import fingerprint, shard_ranges
from .rules import RuleConfig
from .shard import ShardConfig

DEFAULT_MAX_SKEW = 30.0  # seconds between the oldest and the newest file of a checkpoint set
FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
# What the shards of one job share. Not "job": each shard draws its own job id (it guards that
# shard's checkpoint directory), so the ids of one job's shards differ.
_SAME = ("num_shards", "num_workers", "mode", "compensation", "wire_dtype", "fp", "n")
_FILE = re.compile(r"^shard(\d+)-v\d+\.ckpt$")
NO_NAMES_HINT = (
    "pass model.named_parameters() to DistributedOptimizer to have them sent (a layout too large for an init "
    "header, over 32 KiB, is not sent); --unnamed writes the tensors as param0, param1, ... in the "
    "optimizer's parameter order"
)


class ExportError(ValueError):
    """The shards or files cannot give one model; the message says why and what to do."""


@dataclass
class Export:
    """A whole model gathered from the shards of one job.

    ``flat``: the ``n`` float32 weights; ``layout``: ``[[name, shape], ...]`` as the
    initializing worker sent it (names may be ``""``), or None; ``versions``: each shard's;
    ``sources``: the endpoints or checkpoint files, in shard order.
    """

    flat: Tensor
    layout: list[list[Any]] | None
    identity: dict[str, Any]
    versions: list[int]
    source: str  # "shards" or "checkpoints"
    sources: list[str]
    created: list[float] = field(default_factory=list)  # checkpoints: each file's creation time (Unix seconds)


def from_shards(
    endpoints: Sequence[str],
    *,
    timeout: float = 30.0,
    curve_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> Export:
    """The model on the live shards at ``endpoints`` (every shard of the job, in shard order).

    Raises :class:`ExportError` when they are not every shard of one job,
    :class:`dcasgd.client.DcasgdError` when a shard does not answer or refuses.
    """
    from .client import fetch_weights

    replies = [fetch_weights(ep, timeout, curve_key=curve_key, server_key=server_key) for ep in endpoints]
    idents = [h for h, _ in replies]
    num_shards = idents[0]["num_shards"]
    for ep, h in zip(endpoints[1:], idents[1:], strict=True):
        if h["num_shards"] != num_shards:
            raise ExportError(
                f"shards of different jobs: {endpoints[0]} is one of {num_shards} shards, {ep} one of {h['num_shards']}"
            )
    if num_shards != len(endpoints):
        given = ", ".join(f"{ep} (shard {h['shard']})" for ep, h in zip(endpoints, idents, strict=True))
        what = "missing shards: " if num_shards > len(endpoints) else ""
        raise ExportError(
            f"{what}the job has {num_shards} shards, {len(endpoints)} given: {given}; "
            "give every shard's endpoint, in shard order"
        )
    for s, (ep, h) in enumerate(zip(endpoints, idents, strict=True)):
        if h["shard"] != s:
            raise ExportError(f"{ep} is shard {h['shard']}, listed as shard {s}: give the endpoints in shard order")
    _check_one_job(idents, list(endpoints))
    return Export(
        flat=torch.cat([w for _, w in replies]),
        layout=_one_layout(idents, list(endpoints)),
        identity=_identity(idents[0]),
        versions=[h["version"] for h in idents],
        source="shards",
        sources=list(endpoints),
    )


def from_checkpoints(directory: str | os.PathLike[str], *, max_skew: float = DEFAULT_MAX_SKEW) -> Export:
    """The model in the newest checkpoint of every shard in ``directory``.

    Refuses (:class:`ExportError`) files of different jobs, a shard without a file, and a set
    whose files were written more than ``max_skew`` seconds apart (periodic checkpoints of a job
    that crashed, or a shard that stopped long before the others): their versions come from
    different moments of training. Each file's checksum is checked.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d} is not a directory")
    indices = sorted({int(m.group(1)) for p in d.iterdir() if (m := _FILE.match(p.name))})
    if not indices:
        raise ExportError(f"no checkpoint files (shard<S>-v<version>.ckpt) in {d}")
    paths = {s: checkpoint.newest(d, s) for s in indices}
    try:
        headers = {s: checkpoint.read_header(p) for s, p in paths.items()}
    except checkpoint.CheckpointError as exc:
        raise ExportError(str(exc)) from None
    first = headers[indices[0]]["identity"]
    num_shards = first["num_shards"]
    for s, h in headers.items():
        if h["identity"].get("num_shards") != num_shards or h["identity"].get("shard") != s:
            raise ExportError(
                f"shards of different jobs in {d}: {paths[indices[0]].name} is one of {num_shards} shards, "
                f"{paths[s].name} is shard {h['identity'].get('shard')} of {h['identity'].get('num_shards')}"
            )
    missing = [s for s in range(num_shards) if s not in headers]
    if missing:
        names = ", ".join(f"shard{s}-v<version>.ckpt" for s in missing)
        raise ExportError(f"missing shards: the job has {num_shards} shards and {d} has no checkpoint of {names}")
    files = [paths[s] for s in range(num_shards)]
    idents = [{**headers[s]["identity"], **_state_fields(headers[s]["state"])} for s in range(num_shards)]
    _check_one_job(idents, [p.name for p in files])
    created = [headers[s].get("created") for s in range(num_shards)]
    _check_skew(files, idents, created, max_skew)
    weights = []
    for path, ident in zip(files, idents, strict=True):
        try:
            state = checkpoint.read(path, _config(ident), ident["fp"])  # checks the checksum
        except checkpoint.CheckpointError as exc:
            raise ExportError(str(exc)) from None
        weights.append(state.w)
    return Export(
        flat=torch.cat(weights),
        layout=_one_layout(idents, [p.name for p in files]),
        identity=_identity(idents[0]),
        versions=[i["version"] for i in idents],
        source="checkpoints",
        sources=[str(p) for p in files],
        created=created,
    )


def tensors(model: Export, *, unnamed: bool = False) -> tuple[dict[str, Tensor], str | None]:
    """The parameters as ``{name: tensor}`` (own memory, contiguous), and a warning or None.

    Names and shapes come from the layout. Without names (the workers sent none, or some are
    ``""``) this refuses unless ``unnamed``: then every parameter is ``param{i}`` in the
    optimizer's order; without a layout at all, one 1-D tensor ``flat`` of all ``n`` floats.
    """
    n = model.identity["n"]
    if model.layout is None:
        if not unnamed:
            raise ExportError(f"no layout names: the workers sent no parameter names or shapes; {NO_NAMES_HINT}")
        warning = f"the workers sent no layout: the file holds one 1-D tensor 'flat' of all {n} floats"
        return {"flat": model.flat.clone()}, warning
    names = [name for name, _ in model.layout]
    shapes = [tuple(shape) for _, shape in model.layout]
    if fingerprint(shapes) != model.identity["fp"] or sum(_numel(s) for s in shapes) != n:
        raise ExportError(
            f"the layout's shapes do not match the job's fingerprint {model.identity['fp']} and {n} floats"
        )
    warning = None
    if not all(names):
        if not unnamed:
            raise ExportError(f"no layout names: the workers sent shapes but no parameter names; {NO_NAMES_HINT}")
        names = [f"param{i}" for i in range(len(shapes))]
        warning = f"the workers sent no parameter names: wrote param0 ... param{len(shapes) - 1} in parameter order"
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ExportError(f"the layout names parameters more than once: {', '.join(repeated)}")
    out, off = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        size = _numel(shape)
        out[name] = model.flat[off : off + size].view(shape).clone()
        off += size
    return out, warning


def metadata(model: Export) -> dict[str, str]:
    """The job's identity as the string map a safetensors file carries."""
    ident = model.identity
    meta = {
        "format": "pt",  # safetensors' convention for torch tensors
        "producer": "dcasgd",
        "source": model.source,
        "mode": ident["mode"],
        "fingerprint": ident["fp"],
        "versions": json.dumps(model.versions),
        "num_shards": str(ident["num_shards"]),
        "num_workers": str(ident["num_workers"]),
        "n": str(ident["n"]),
        "wire_dtype": ident["wire_dtype"],
        "compensation": ident["compensation"],
    }
    if model.created:
        meta["created"] = json.dumps(model.created)
    return meta


def write(model: Export, path: str | os.PathLike[str], *, unnamed: bool = False) -> str | None:
    """Write ``model`` to ``path``: ``.safetensors`` (tensors and :func:`metadata`) or ``.pt`` / ``.pth``
    (``torch.save`` of the state_dict, tensors only). Returns :func:`tensors`' warning.

    Written to ``<path>.tmp`` and renamed, so a failed export leaves no partial file.
    """
    path = Path(path)
    kind = check_output(path)
    named, warning = tensors(model, unnamed=unnamed)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            if kind == "safetensors":
                from safetensors.torch import save_file

                save_file(named, str(tmp), metadata=metadata(model))
            else:
                torch.save(named, tmp)
        except OSError:
            raise
        except Exception as exc:  # safetensors' SafetensorError, torch's RuntimeError: an I/O failure all the same
            raise OSError(f"cannot write {path}: {exc}") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return warning


def check_output(path: str | os.PathLike[str]) -> str:
    """The format of output file ``path``, ``"safetensors"`` or ``"torch"``, from its suffix.

    :class:`ExportError` for another suffix, or a directory that does not exist.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ExportError(f"{path}: the output's suffix picks the format: .safetensors, or .pt / .pth for torch")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: there is no directory {path.parent}")
    return kind


def describe(model: Export) -> str:
    """One line about what was exported: size, source, versions, mode, fingerprint."""
    ident = model.identity
    where = "live shards" if model.source == "shards" else "checkpoints"
    return (
        f"{ident['n']} floats from {ident['num_shards']} {where} at versions {model.versions} "
        f"(mode {ident['mode']}, fingerprint {ident['fp']})"
    )


# --- checks ------------------------------------------------------------------------------


def _check_one_job(idents: list[dict[str, Any]], labels: list[str]) -> None:
    """Every shard has the first one's identity, and the slice ``shard_ranges`` gives it."""
    for key in _SAME:
        for label, ident in zip(labels[1:], idents[1:], strict=True):
            if ident.get(key) != idents[0].get(key):
                raise ExportError(
                    f"shards of different jobs: {labels[0]} has {key} {idents[0].get(key)}, "
                    f"{label} has {key} {ident.get(key)}"
                )
    n = idents[0]["n"]
    for (lo, hi), label, ident in zip(shard_ranges(n, len(idents)), labels, idents, strict=True):
        if (ident["lo"], ident["hi"]) != (lo, hi):
            raise ExportError(f"{label} holds [{ident['lo']}, {ident['hi']}) of {n}, but its shard owns [{lo}, {hi})")


def _check_skew(files: list[Path], idents: list[dict[str, Any]], created: list[Any], max_skew: float) -> None:
    """Refuse a set whose files were written more than ``max_skew`` seconds apart."""
    if any(not isinstance(t, (int, float)) for t in created):
        raise ExportError("a checkpoint has no creation time: pass --max-skew inf to take the set as it is")
    if max(created) - min(created) <= max_skew:
        return
    each = ", ".join(
        f"{p.name} (version {i['version']}) at {_when(t)}" for p, i, t in zip(files, idents, created, strict=True)
    )
    raise ExportError(
        f"the newest checkpoints of the shards were written {max(created) - min(created):.1f} s apart, more than "
        f"--max-skew {max_skew:g} s, so they hold the model at different moments: {each}. A job stopped "
        "together writes them within seconds; pass --max-skew SECONDS to take this set anyway"
    )


def _one_layout(idents: list[dict[str, Any]], labels: list[str]) -> list[list[Any]] | None:
    """The layout the shards hold (the first init's, so the same on every shard of one job)."""
    layouts = [i.get("layout") for i in idents]
    for label, layout in zip(labels, layouts, strict=True):
        if layout is not None and layouts[0] is not None and layout != layouts[0]:
            raise ExportError(f"shards of different jobs: {labels[0]} and {label} hold different layouts")
    return next((layout for layout in layouts if layout is not None), None)


def _state_fields(state: dict[str, Any]) -> dict[str, Any]:
    return {"version": state.get("version"), "layout": state.get("layout")}


def _identity(ident: dict[str, Any]) -> dict[str, Any]:
    keep = ("num_shards", "num_workers", "mode", "compensation", "wire_dtype", "fp", "n", "job")
    return {"wire_dtype": "float32", "compensation": "per-worker", **{k: ident[k] for k in keep if k in ident}}


def _config(ident: dict[str, Any]) -> ShardConfig:
    """The shard configuration a checkpoint was written with (for :func:`checkpoint.read`)."""
    try:
        rules = RuleConfig(mode=ident["mode"], **ident.get("rules", {}))
    except (TypeError, ValueError):  # rule settings this version does not take: read() only logs them
        rules = RuleConfig(mode=ident["mode"])
    return ShardConfig(
        shard=ident["shard"],
        num_shards=ident["num_shards"],
        num_workers=ident["num_workers"],
        rules=rules,
        compensation=ident.get("compensation", "per-worker"),
        wire_dtype=ident.get("wire_dtype", "float32"),
    )


def _numel(shape: Sequence[int]) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
