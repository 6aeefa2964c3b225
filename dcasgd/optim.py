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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
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

    ``overlap=True`` (async modes only): :meth:`step` gathers the gradient, hands the
    round trip to a background sender and returns at once; the next forward and
    backward run on the weights this worker holds while it is in flight, and the
    next :meth:`step` loads the reply before it sends. Each gradient is then one
    reply staler; the push names the weights it was computed on, so delay
    compensation stays exact. An error of the background round trip is raised by
    the next :meth:`step`, :meth:`pull`, :meth:`state_dict` or :meth:`close`;
    :meth:`close` delivers the last push and loads its reply.

    ``wire_dtype``: what gradients and weights travel as; None (default) takes the
    job's (``dcasgd server --wire-dtype``), a value that differs from it is refused.
    Over a ``"bfloat16"`` or ``"float16"`` wire the weights arrive rounded to that
    type and the shards compensate against exactly those rounded weights.
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
        overlap: bool = False,
        wire_dtype: str | None = None,
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
            self.client = Client(
                job.servers, self.worker_id, timeout=timeout, fingerprint=self.layout.fingerprint, wire_dtype=wire_dtype
            )
        except BaseException:
            _release(self._key, self)
            raise
        self._closed = False
        self.overlap = bool(overlap)
        self._sender: ThreadPoolExecutor | None = None
        self._pending: Future[tuple[list[int], list[str | None]]] | None = None  # the round trip in flight
        self._reply: tuple[list[int], list[str | None]] | None = None  # a reply that arrived, not loaded yet
        try:
            self._check_job(job.num_workers)
            if self.overlap and self.client.mode == "sync":
                raise ValueError(
                    "overlap=True needs an asynchronous mode (async, dcasgd, dcasgd-a): in sync mode every worker "
                    "waits for the round anyway, and a gradient one step old would join the wrong round"
                )
            self._on_gpu = any(p.device.type == "cuda" for p in self._params)
            n = self.layout.numel
            # Two weight buffers: the one the parameters hold, and (with overlap) the one the
            # reply in flight lands in; they swap at each step, so nothing is copied on the host.
            self._bufs = [torch.empty(n, pin_memory=self._on_gpu), torch.empty(n, pin_memory=self._on_gpu)]
            self._held = 0  # index of the buffer the parameters hold
            # The gradient is gathered straight into the wire type (half the bytes over bfloat16).
            self._grads = torch.empty(n, dtype=getattr(torch, self.client.wire_dtype), pin_memory=self._on_gpu)
            self._views = [[self._slice(b, i) for i in range(len(self._params))] for b in self._bufs]
            self._versions: list[int] = []  # per shard, the version of the weights the parameters hold
            self._from: list[str | None] = []  # per shard, the shard instance that sent them
            self._stream = self._d2h = self._h2d = None
            if self._on_gpu:
                # Copies between the GPU and the pinned buffers run on a side stream, ordered with
                # events: the device never waits for the host, the host only for its own copies.
                self._stream = torch.cuda.Stream()
                self._d2h, self._h2d = torch.cuda.Event(), torch.cuda.Event()
            self._has_grad = [False] * len(self._params)
            # (data_ptr, _version) of each parameter after this optimizer last wrote it: a write
            # by anyone else bumps the version (autograd's in-place counter), a conversion the pointer.
            self._stamps: list[tuple[int, int]] = [(0, -1)] * len(self._params)
            if self.worker_id == 0:
                self._gather_weights()
                self.client.init(self._weights, layout=self._layout_for_header())
            self.client.wait_initialized(init_timeout)
            self._check_job(job.num_workers)  # the model that initialized the job may be another one
            self._is_view = [
                p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in self._params
            ]  # the reply lands in the parameter itself
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
        if not self.overlap:
            self._gather_grads()
            self._round_trip(self._held, lr, keep=1)
            self._scatter()
            return loss
        self._wait(reraise=True)  # the reply in flight (normally there already); _grads is free again
        self._gather_grads()
        base = (self._versions, self._from)  # the weights this gradient was computed on
        if self._reply is not None:
            self._load(1 - self._held, self._reply)
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcasgd-sender")
        # The reply lands in the buffer the parameters no longer hold.
        self._pending = self._sender.submit(self._round_trip, 1 - self._held, lr, 2, base)
        return loss

    def _round_trip(
        self,
        into: int,
        lr: float,
        keep: int,
        base: tuple[list[int], list[str | None]] | None = None,
    ) -> tuple[list[int], list[str | None]]:
        """Push ``_grads`` and pull: the reply lands in buffer ``into``. Returns its versions per shard.

        Runs on the sender thread with overlap: it reads ``_grads`` and writes buffer ``into``
        only, which the caller's thread leaves alone until the round trip is over.
        """
        if self._d2h is not None:
            self._d2h.synchronize()  # the gradient's copies to the host are done
            self._h2d.synchronize()  # and the copies out of the buffer the reply will overwrite
        versions, froms = base if base is not None else (None, None)
        self.client.push_pull(self._grads, lr=lr, out=self._bufs[into], base=versions, base_from=froms, keep=keep)
        return list(self.client.versions), list(self.client.received_from)

    def _wait(self, reraise: bool) -> None:
        """Wait for the round trip in flight, keeping its reply's versions for :meth:`_load`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self._reply = pending.result()
        except BaseException:
            self._reply = None  # the buffer it was to land in holds nothing usable
            if reraise:
                raise

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, as for any optimizer (after the round trip in flight, with overlap)."""
        self._wait(reraise=True)
        return super().state_dict()

    def pull(self) -> None:
        """Load the shards' current weights into the parameters (e.g. before evaluating).

        Also the way to drop changes made to the parameters since the last step.
        """
        self._check_open()
        self._wait(reraise=True)
        self._reply = None  # superseded by what we pull now
        if any(p.device.type == "cuda" for p in self._params) and self._stream is None:  # moved since?
            self._on_gpu = True
            self._stream, self._d2h, self._h2d = torch.cuda.Stream(), torch.cuda.Event(), torch.cuda.Event()
        if self._h2d is not None:
            self._h2d.synchronize()  # the last copies out of the buffer must be done before it is overwritten
        self.client.pull(out=self._weights)
        self._versions, self._from = list(self.client.versions), list(self.client.received_from)
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
        """Deliver the push in flight (overlap) and load its reply, then release the sockets.

        The optimizer cannot step or pull afterwards; closing twice is a no-op. An error of
        the last round trip is raised after the sockets are released.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._wait(reraise=True)
            if self._reply is not None:
                self._load(1 - self._held, self._reply)
        finally:
            if self._sender is not None:
                self._sender.shutdown(wait=True)
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

    @property
    def _weights(self) -> Tensor:
        """The flat float32 weights the parameters hold (what the shards last sent that was loaded)."""
        return self._bufs[self._held]

    def _on_side_stream(self) -> Any:
        """A context that runs copies on the side stream after what the current stream queued so far."""
        if self._stream is None:
            return nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self._stream)

    def _gather_weights(self) -> None:
        """Copy every parameter into ``_weights`` (cast to float32)."""
        with self._on_side_stream():
            for i, p in enumerate(self._params):
                dst = self._slice(self._weights, i)
                if p.data_ptr() != dst.data_ptr():
                    dst.copy_(p.detach(), non_blocking=True)
        if self._stream is not None:
            self._d2h.record(self._stream)
            self._d2h.synchronize()  # the copies into pinned memory must land before the send

    def _gather_grads(self) -> None:
        """Write every gradient plus weight decay into ``_grads``, in the wire type; zeros where there is none.

        One pass per parameter: ``grad + wd * w`` is computed and rounded to the wire type once
        (float32, or bfloat16/float16: then no float32 copy is staged and narrowed later). ``w`` is
        the float32 weights the shards sent (on a GPU: the parameter, which holds them cast to its
        dtype). A sparse gradient without weight decay is added into the zeroed buffer (its rows only
        cross to the host); other non-strided gradients are densified first.

        On a GPU the copies are queued on the side stream (``_d2h`` says when they are done),
        and the current stream waits for them before it runs anything queued later, so the
        caller may zero or overwrite ``.grad`` as soon as this returns.
        """
        decay = [0.0] * len(self._params)
        for group, (first, end) in zip(self.param_groups, self._groups, strict=True):
            decay[first:end] = [group["weight_decay"]] * (end - first)
        with self._on_side_stream():
            for i, p in enumerate(self._params):
                dst = self._slice(self._grads, i)
                g = p.grad
                self._has_grad[i] = g is not None
                if g is None:
                    dst.zero_()  # no gradient this step: we still owe the shards a full vector
                    continue
                if self._stream is not None and g.is_cuda:
                    g.record_stream(self._stream)  # its memory is not reused before the copy ran
                if g.layout == torch.sparse_coo and not decay[i]:
                    # Densified into the buffer itself: only the gradient's rows travel to the host.
                    dst.zero_()
                    dst.add_(g.to(dst.device))
                    continue
                if g.layout != torch.strided:
                    g = g.to_dense()
                if g.is_cuda:
                    if decay[i]:
                        g = torch.add(g, p.detach(), alpha=decay[i])
                    # Narrowed on the device (free there), so only wire-type bytes cross to the host.
                    dst.copy_(g.to(dst.dtype), non_blocking=True)
                elif decay[i]:
                    w = self._slice(self._weights, i)
                    torch.add(g.to(w.dtype), w, alpha=decay[i], out=dst)
                else:
                    dst.copy_(g)
        if self._stream is not None:
            self._d2h.record(self._stream)
            torch.cuda.current_stream().wait_event(self._d2h)
            if not self.overlap:
                self._d2h.synchronize()

    def _load(self, buffer: int, reply: tuple[list[int], list[str | None]]) -> None:
        """Make buffer ``buffer`` (a reply: its versions and the instances that sent them) the weights held."""
        self._held = buffer
        self._versions, self._from = reply
        self._reply = None
        self._scatter()

    def _scatter(self) -> None:
        """Load ``_weights`` into the parameters (views of it are pointed at it), and stamp them all.

        On a GPU the copies run on the side stream and the current stream waits for them (``_h2d``).
        """
        views = self._views[self._held]
        with torch.no_grad(), self._on_side_stream():  # parameters are leaves that require grad
            for i, (p, view) in enumerate(zip(self._params, views, strict=True)):
                if self._is_view[i] and p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                    if p.data_ptr() != view.data_ptr():
                        p.data = view  # a swap of buffers: the parameter is the reply itself
                elif p.data_ptr() != view.data_ptr():
                    p.copy_(view, non_blocking=True)  # casts to p's dtype, moves to p's device
                self._stamps[i] = (p.data_ptr(), p._version)
        if self._stream is not None:
            self._h2d.record(self._stream)
            torch.cuda.current_stream().wait_event(self._h2d)

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
                    same = torch.equal(p, self._views[self._held][i].to(p.device, p.dtype))
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
