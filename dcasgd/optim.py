"""``DistributedOptimizer``: the drop-in ``torch.optim.Optimizer`` for DC-ASGD workers.

Change one line of a training script::

    opt = dcasgd.DistributedOptimizer(model.parameters(), lr=0.1, weight_decay=5e-4)

and ``opt.step()`` pushes this worker's gradient to the shards and loads the fresh
weights they send back, in one round trip. The update rule (sync, async, DC-ASGD)
runs on the shards; the worker only adds weight decay, as ``torch.optim.SGD`` does.

The model's parameters map to one flat float32 vector (in parameter order); the
gradient is gathered into a reused host buffer (pinned when parameters live on a
GPU), and the weights come back into another one, so a step allocates nothing of
the model's size. Contiguous float32 CPU parameters are views into the weight
buffer itself: the reply lands in them with no further copy. Every other parameter
(another dtype, another device, another memory format) gets a copy of its slice,
cast by ``copy_``, after each reply.

Buffers (BatchNorm running statistics) are not parameters: each worker keeps its
own. To evaluate, call :meth:`DistributedOptimizer.pull` for the servers' current
weights and use this worker's buffers, or re-estimate them on training data.
"""

from __future__ import annotations

import gc
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .client import Client, DcasgdError
from .env import resolve
from .layout import FlatLayout
from .protocol import DEFAULT_MAX_HEADER_BYTES

_LAYOUT_HEADER_BUDGET = DEFAULT_MAX_HEADER_BYTES // 2  # names and shapes ride in the init header when they fit

_MOMENTUM_HELP = (
    "momentum runs on the shards, not in the optimizer: start them with `dcasgd server --momentum MU` "
    "(or `dcasgd launch --momentum MU`); with OneCycleLR or CyclicLR pass cycle_momentum=False"
)

# Live optimizers of this process by (servers, worker id): two that share an id would push
# under one sequence counter each, and the shards would drop half the pushes as duplicates.
_live: dict[tuple[tuple[str, ...], int], weakref.ReferenceType[DistributedOptimizer]] = {}
_live_lock = threading.Lock()


class DistributedOptimizer(torch.optim.Optimizer):
    """SGD whose update runs on dcasgd shards.

    ``params``: the model's parameters (or ``model.named_parameters()``, for
    clearer messages when models differ), or param groups as for any optimizer.
    The layout is fixed here: pass every parameter now, frozen ones included
    (``add_param_group`` later raises). Every group must use the same ``lr``
    (one learning rate travels per push; groups with different lrs are refused
    here, before anything reaches the shards); ``weight_decay`` may differ per
    group. ``lr`` (>= 0; 0 applies a zero step) is read from the param groups at
    every step, so ``torch.optim.lr_scheduler`` works.

    ``momentum``/``nesterov``: only the defaults (0, False) are accepted. Momentum
    runs on the shards (``dcasgd server --momentum MU``); with ``OneCycleLR`` or
    ``CyclicLR`` pass ``cycle_momentum=False``.

    ``servers``, ``worker_id``, ``num_workers``: taken from the environment when
    not given (``DCASGD_SERVERS``; ``DCASGD_WORKER_ID``, ``RANK`` or
    ``SLURM_PROCID``; ``DCASGD_NUM_WORKERS``, ``WORLD_SIZE`` or ``SLURM_NTASKS``).
    One live optimizer per worker id and servers in a process: a second one is
    refused until the first is closed. ``timeout``: seconds to wait for a shard's
    answer (per try); ``init_timeout``: seconds a worker other than 0 waits for
    worker 0 to initialize the shards.

    At construction, worker 0 offers its weights as the job's initial weights
    (the first offer wins), every worker waits until the shards have weights, and
    then loads them, so all workers start from the same point. To resume from a
    model checkpoint, load it into the model *before* building the optimizer (on
    worker 0, into a fresh job), or restart the shards with ``--resume``. Writing
    into the parameters afterwards (``model.load_state_dict``, ``p.copy_``) is
    refused at the next :meth:`step`, before anything is pushed: the step would
    replace those values with the shards'. Converting the model (``.to(dtype)``,
    ``.to(memory_format=...)``) keeps the values and is fine.

    Precision: the shards and the wire hold float32 whatever the parameters'
    dtype. A float64 parameter receives the float32 weights exactly and pushes its
    gradient rounded to float32; a bfloat16 or float16 parameter receives the
    shards' float32 weights rounded to its dtype at every step, while the shards
    keep the float32 master copy (so small updates are not lost). Delay
    compensation measures drift from the float32 weights sent, not from that
    rounded copy. Parameters on a GPU go through pinned host buffers; that path
    has the same shape as the float64 one but has not been run on a GPU yet.

    A parameter whose ``grad`` is None in a step (frozen, or unused) pushes a zero
    gradient and gets no weight decay, so it does not move in ``async``,
    ``dcasgd``, ``dcasgd-a`` or ``sync`` mode, as with ``torch.optim.SGD``; with
    server-side momentum it still drifts by the momentum the shards hold. Sparse
    gradients (``nn.Embedding(sparse=True)``) are densified on the worker.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        servers: str | Sequence[str] | None = None,
        worker_id: int | None = None,
        num_workers: int | None = None,
        timeout: float = 30.0,
        init_timeout: float = 120.0,
    ) -> None:
        _check_lr(lr)
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if momentum != 0.0 or nesterov:
            raise ValueError(f"momentum={momentum}, nesterov={nesterov}: {_MOMENTUM_HELP}")
        self._closed = True  # until the client exists: close() and the registry have nothing to release
        params, names = _split_names(params)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._layout_fixed = True
        for group in self.param_groups:
            if group.get("momentum") or group.get("nesterov"):
                raise ValueError(f"a param group sets momentum: {_MOMENTUM_HELP}")
        self._lr(when="at construction")  # before anything reaches the shards
        job = resolve(servers, worker_id, num_workers)
        self.worker_id, self.num_workers = job.worker_id, job.num_workers
        self._params = [p for group in self.param_groups for p in group["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("a parameter appears more than once in the param groups")
        self._groups = []  # (first, end) parameter indices of each group, for per-group weight decay
        first = 0
        for group in self.param_groups:
            self._groups.append((first, first + len(group["params"])))
            first += len(group["params"])
        names = names or [""] * len(self._params)
        self.layout = FlatLayout.from_shapes((n, p.shape) for n, p in zip(names, self._params, strict=True))
        self._key = (tuple(job.servers), self.worker_id)
        _claim(self._key, self)
        try:
            self.client = Client(job.servers, self.worker_id, timeout=timeout, fingerprint=self.layout.fingerprint)
        except BaseException:
            _release(self._key, self)
            raise
        self._closed = False
        try:
            self._check_job(job.num_workers)
            self._on_gpu = any(p.device.type == "cuda" for p in self._params)
            self._weights = torch.empty(self.layout.numel, pin_memory=self._on_gpu)
            self._grads = torch.empty(self.layout.numel, pin_memory=self._on_gpu)
            self._views = [self._slice(self._weights, i) for i in range(len(self._params))]
            self._has_grad = [False] * len(self._params)
            # (data_ptr, _version) of each parameter after this optimizer last wrote it: a write
            # by anyone else bumps the version (autograd's in-place counter), a conversion the pointer.
            self._stamps: list[tuple[int, int]] = [(0, -1)] * len(self._params)
            if self.worker_id == 0:
                self._gather_weights()
                self.client.init(self._weights, layout=self._layout_for_header())
            self.client.wait_initialized(init_timeout)
            self._check_job(job.num_workers)  # the model that initialized the job may be another one
            for p, view in zip(self._params, self._views, strict=True):
                if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                    p.data = view  # the reply lands in the parameter itself
            self.pull()
        except BaseException:
            self.close()
            raise

    # --- the optimizer -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Push this worker's gradient (plus weight decay) and load the weights the shards return.

        Parameters without a gradient this step push zeros and get no weight decay.
        Raises :class:`DcasgdError`, before pushing, when a parameter was written
        since this optimizer last loaded it (see the class docstring), and when
        the optimizer is closed.
        """
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self._lr(when="at this step (a scheduler set them?)")
        self._check_unchanged()
        self._gather_grads()
        for group, (first, end) in zip(self.param_groups, self._groups, strict=True):
            wd = group["weight_decay"]
            if wd == 0.0:
                continue
            # One add per run of consecutive parameters that have a gradient (usually the whole group).
            # The weights this worker holds are in _weights (what the shards last sent).
            i = first
            while i < end:
                if not self._has_grad[i]:
                    i += 1
                    continue
                j = i
                while j < end and self._has_grad[j]:
                    j += 1
                lo, hi = self.layout.offsets[i], self._end(j - 1)
                self._grads[lo:hi].add_(self._weights[lo:hi], alpha=wd)
                i = j
        self.client.push_pull(self._grads, lr=lr, out=self._weights)
        self._scatter()
        return loss

    def pull(self) -> None:
        """Load the shards' current weights into the parameters (e.g. before evaluating).

        Also the way to drop changes made to the parameters since the last step.
        """
        self._check_open()
        self._on_gpu = self._on_gpu or any(p.device.type == "cuda" for p in self._params)  # moved since?
        if self._on_gpu:
            torch.cuda.synchronize()  # the last copies out of _weights must be done before it is overwritten
        self.client.pull(out=self._weights)
        self._scatter()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the flat layout the shards hold is fixed then."""
        if getattr(self, "_layout_fixed", False):
            raise ValueError(
                "add_param_group after construction: the flat layout the shards hold is fixed when the optimizer "
                "is built. Pass every parameter at construction and freeze the ones that wait with "
                "requires_grad=False; a frozen parameter starts training once it has a gradient"
            )
        super().add_param_group(param_group)

    def close(self) -> None:
        """Release the sockets. The optimizer cannot step or pull afterwards; closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        _release(self._key, self)

    # --- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DcasgdError("this DistributedOptimizer is closed (close() was called): build a new one to go on")

    def _lr(self, when: str) -> float:
        lrs = {float(group["lr"]) for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"all param groups must share one lr (one travels per push), got {sorted(lrs)} {when}; "
                "weight_decay may differ per group"
            )
        lr = lrs.pop()
        _check_lr(lr)
        return lr

    def _slice(self, flat: Tensor, i: int) -> Tensor:
        lo = self.layout.offsets[i]
        return flat[lo : lo + self._params[i].numel()].view(self.layout.shapes[i])

    def _end(self, i: int) -> int:
        """The element offset just past parameter ``i``."""
        return self.layout.offsets[i] + self._params[i].numel()

    def _label(self, i: int) -> str:
        name = self.layout.names[i]
        return f"parameter {name!r}" if name else f"parameter #{i} (shape {list(self.layout.shapes[i])})"

    def _gather_weights(self) -> None:
        """Copy every parameter into ``_weights`` (cast to float32)."""
        for i, p in enumerate(self._params):
            dst = self._slice(self._weights, i)
            if p.data_ptr() != dst.data_ptr():
                dst.copy_(p.detach(), non_blocking=True)
        if self._on_gpu:
            torch.cuda.synchronize()  # the copies into pinned memory must land before the send

    def _gather_grads(self) -> None:
        """Copy every gradient into ``_grads`` (cast to float32, densified); zeros where there is none."""
        for i, p in enumerate(self._params):
            dst = self._slice(self._grads, i)
            g = p.grad
            self._has_grad[i] = g is not None
            if g is None:
                dst.zero_()  # no gradient this step: we still owe the shards a full vector
            elif g.layout == torch.sparse_coo:
                # Densified into the flat buffer itself (only the gradient's rows travel to the host).
                dst.zero_()
                dst.add_(g.to(dst.device))
            elif g.layout != torch.strided:
                dst.copy_(g.to_dense())
            else:
                dst.copy_(g, non_blocking=True)
        if self._on_gpu:
            # The copies into pinned memory must land before the send, and the earlier
            # non-blocking copies out of _weights must finish before the reply overwrites it.
            torch.cuda.synchronize()

    def _scatter(self) -> None:
        """Load ``_weights`` into every parameter that is not a view of it, and stamp them all."""
        with torch.no_grad():  # parameters are leaves that require grad: copy_ is an in-place op on them
            for i, (p, view) in enumerate(zip(self._params, self._views, strict=True)):
                if p.data_ptr() != view.data_ptr():
                    p.copy_(view, non_blocking=True)  # casts to p's dtype, moves to p's device
                self._stamps[i] = (p.data_ptr(), p._version)

    def _check_unchanged(self) -> None:
        """Refuse to step when a parameter was written since :meth:`_scatter` (a model checkpoint loaded?)."""
        for i, p in enumerate(self._params):
            stamp = (p.data_ptr(), p._version)
            if stamp == self._stamps[i]:
                continue
            if stamp[0] != self._stamps[i][0]:
                # New storage: a conversion (dtype, device, memory format) keeps the values we wrote;
                # compared in p's dtype, so that the rounding of a narrower dtype does not count.
                with torch.no_grad():
                    same = torch.equal(p, self._views[i].to(p.device, p.dtype))
                if same:
                    self._stamps[i] = stamp
                    self._on_gpu = self._on_gpu or p.device.type == "cuda"
                    continue
            raise DcasgdError(
                f"{self._label(i)} was written after the optimizer last loaded it (model.load_state_dict or "
                "another in-place write after building the optimizer?): the shards hold the job's weights, and this "
                "step would replace yours with theirs. To resume from a model checkpoint, load it into the model "
                "before building the optimizer (worker 0's weights initialize a fresh job), or restart the shards "
                "with --resume from their own checkpoints. To drop the change and take the shards' weights, call "
                "opt.pull()"
            )

    def _layout_for_header(self) -> list[tuple[str, Sequence[int]]] | None:
        entries = list(zip(self.layout.names, self.layout.shapes, strict=True))
        approx = sum(len(n) + 8 * len(s) + 8 for n, s in entries)
        return entries if approx < _LAYOUT_HEADER_BUDGET else None

    def _check_job(self, num_workers: int) -> None:
        """Refuse to join a job of another size, or one whose model differs from ours."""
        info = self.client.shard_info[0]
        if info["num_workers"] != num_workers:
            raise DcasgdError(
                f"this worker was told the job has {num_workers} workers, the shards say {info['num_workers']}"
            )
        if not info["initialized"] or info["fp"] == self.layout.fingerprint:
            return
        how = "its parameters differ"
        if info.get("layout") is not None:
            job = FlatLayout.from_shapes((name, shape) for name, shape in info["layout"])
            how = job.describe_difference(self.layout)
        raise DcasgdError(f"this worker's model does not match the job's: {how}")


def _check_lr(lr: float) -> None:
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr}")


def _claim(key: tuple[tuple[str, ...], int], opt: DistributedOptimizer) -> None:
    """Register ``opt`` as the live optimizer of ``key`` (servers, worker id), or refuse."""
    with _live_lock:
        for attempt in range(2):
            ref = _live.get(key)
            other = ref() if ref is not None else None
            if other is None or other._closed:
                _live[key] = weakref.ref(opt)
                return
            if attempt == 0:
                other = None
                gc.collect()  # an optimizer nobody holds any more (a re-run notebook cell) is no rival
    raise DcasgdError(
        f"worker {key[1]} of these servers already has a live DistributedOptimizer in this process: close() it "
        "first, or give each worker its own id (two optimizers with one id lose pushes as duplicates)"
    )


def _release(key: tuple[tuple[str, ...], int], opt: DistributedOptimizer) -> None:
    with _live_lock:
        ref = _live.get(key)
        if ref is not None and (ref() is None or ref() is opt):
            del _live[key]


def _split_names(params: Iterable[Any]) -> tuple[list[Any], list[str] | None]:
    """Accept ``model.named_parameters()`` as well as plain parameters or param groups."""
    params = list(params)
    if params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        return [p for _, p in params], [n for n, _ in params]
    return params, None
