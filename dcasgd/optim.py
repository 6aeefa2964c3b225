"""``DistributedOptimizer``: the drop-in ``torch.optim.Optimizer`` for DC-ASGD workers.

Change one line of a training script::

    opt = dcasgd.DistributedOptimizer(model.parameters(), lr=0.1, weight_decay=5e-4)

and ``opt.step()`` pushes this worker's gradient to the shards and loads the fresh
weights they send back, in one round trip. The update rule (sync, async, DC-ASGD)
runs on the shards; the worker only adds weight decay, as ``torch.optim.SGD`` does.

The model's parameters map to one flat float32 vector (in parameter order); the
gradient is gathered into a reused host buffer (pinned when parameters live on a
GPU), and the weights come back into another one, so a step allocates nothing of
the model's size. CPU parameters are views into the weight buffer itself: the
reply lands in them with no further copy.

Buffers (BatchNorm running statistics) are not parameters: each worker keeps its
own. To evaluate, call :meth:`DistributedOptimizer.pull` for the servers' current
weights and use this worker's buffers, or re-estimate them on training data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .client import Client, DcasgdError
from .env import resolve
from .layout import FlatLayout
from .protocol import DEFAULT_MAX_HEADER_BYTES

_LAYOUT_HEADER_BUDGET = DEFAULT_MAX_HEADER_BYTES // 2  # names and shapes ride in the init header when they fit


class DistributedOptimizer(torch.optim.Optimizer):
    """SGD whose update runs on dcasgd shards.

    ``params``: the model's parameters (or ``model.named_parameters()``, for
    clearer messages when models differ), or param groups as for any optimizer;
    every group must use the same ``lr`` (one learning rate travels per push);
    ``weight_decay`` may differ per group. ``lr`` (> 0) is read from the param
    groups at every step, so ``torch.optim.lr_scheduler`` works.

    ``servers``, ``worker_id``, ``num_workers``: taken from the environment when
    not given (``DCASGD_SERVERS``; ``DCASGD_WORKER_ID``, ``RANK`` or
    ``SLURM_PROCID``; ``DCASGD_NUM_WORKERS``, ``WORLD_SIZE`` or ``SLURM_NTASKS``).
    ``timeout``: seconds to wait for a shard's answer (per try);
    ``init_timeout``: seconds a worker other than 0 waits for worker 0 to
    initialize the shards.

    At construction, worker 0 offers its weights as the job's initial weights
    (the first offer wins), every worker waits until the shards have weights, and
    then loads them, so all workers start from the same point.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        *,
        servers: str | Sequence[str] | None = None,
        worker_id: int | None = None,
        num_workers: int | None = None,
        timeout: float = 30.0,
        init_timeout: float = 120.0,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        params, names = _split_names(params)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        job = resolve(servers, worker_id, num_workers)
        self.worker_id, self.num_workers = job.worker_id, job.num_workers
        self._params = [p for group in self.param_groups for p in group["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("a parameter appears more than once in the param groups")
        names = names or [f"param{i}" for i in range(len(self._params))]
        self.layout = FlatLayout.from_shapes((n, p.shape) for n, p in zip(names, self._params, strict=True))
        self.client = Client(job.servers, self.worker_id, timeout=timeout, fingerprint=self.layout.fingerprint)
        try:
            self._check_job(job.num_workers)
            self._on_gpu = any(p.device.type == "cuda" for p in self._params)
            self._weights = torch.empty(self.layout.numel, pin_memory=self._on_gpu)
            self._grads = torch.empty(self.layout.numel, pin_memory=self._on_gpu)
            self._views = [self._slice(self._weights, i) for i in range(len(self._params))]
            if self.worker_id == 0:
                self._gather(self._weights, lambda p: p.detach())
                self.client.init(self._weights, layout=self._layout_for_header())
            self.client.wait_initialized(init_timeout)
            self._check_job(job.num_workers)  # the model that initialized the job may be another one
            for p, view in zip(self._params, self._views, strict=True):
                if p.device.type == "cpu" and p.dtype == torch.float32:
                    p.data = view  # the reply lands in the parameter itself
            self.pull()
        except BaseException:
            self.client.close()
            raise

    # --- the optimizer -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Push this worker's gradient (plus weight decay) and load the weights the shards return.

        Parameters without a gradient this step contribute zeros.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self._lr()
        self._gather(self._grads, lambda p: p.grad)
        offset = 0
        for group in self.param_groups:
            size = sum(p.numel() for p in group["params"])
            wd = group["weight_decay"]
            if wd != 0.0:
                # The weights this worker holds are in _weights (what the shards last sent).
                self._grads[offset : offset + size].add_(self._weights[offset : offset + size], alpha=wd)
            offset += size
        self.client.push_pull(self._grads, lr=lr, out=self._weights)
        self._scatter()
        return loss

    def pull(self) -> None:
        """Load the shards' current weights into the parameters (e.g. before evaluating)."""
        if self._on_gpu:
            torch.cuda.synchronize()  # the last copies out of _weights must be done before it is overwritten
        self.client.pull(out=self._weights)
        self._scatter()

    def close(self) -> None:
        """Release the sockets. The optimizer cannot step afterwards."""
        self.client.close()

    # --- internals ---------------------------------------------------------------------

    def _lr(self) -> float:
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"all param groups must share one lr (one travels per push), got {sorted(lrs)}")
        lr = lrs.pop()
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        return float(lr)

    def _slice(self, flat: Tensor, i: int) -> Tensor:
        lo = self.layout.offsets[i]
        return flat[lo : lo + self._params[i].numel()].view(self.layout.shapes[i])

    def _gather(self, flat: Tensor, source: Callable[[Tensor], Tensor | None]) -> None:
        """Copy ``source(p)`` of every parameter into ``flat`` (zeros where it is None)."""
        for i, p in enumerate(self._params):
            dst = self._slice(flat, i)
            src = source(p)
            if src is None:
                dst.zero_()  # no gradient this step: we still owe the shards a full vector
            elif src.data_ptr() != dst.data_ptr():
                dst.copy_(src, non_blocking=True)
        if self._on_gpu:
            # The copies into pinned memory must land before the send, and the earlier
            # non-blocking copies out of _weights must finish before the reply overwrites it.
            torch.cuda.synchronize()

    def _scatter(self) -> None:
        for p, view in zip(self._params, self._views, strict=True):
            if p.data_ptr() != view.data_ptr():
                p.copy_(view, non_blocking=True)

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


def _split_names(params: Iterable[Any]) -> tuple[list[Any], list[str] | None]:
    """Accept ``model.named_parameters()`` as well as plain parameters or param groups."""
    params = list(params)
    if params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        return [p for _, p in params], [n for n, _ in params]
    return params, None
