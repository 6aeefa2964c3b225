"""A virtual cluster in one process: M stale workers against the real shard code.

``simulate(SimConfig(...))`` trains a small model (``model="mlp"``, an MLP, or ``"cnn"``, two
conv layers and a linear one, see :class:`CnnModel`) on scikit-learn's digits with ``workers``
virtual workers and a virtual clock. Each worker holds the weights it last received,
computes a real gradient on its own minibatch (torch, on a flat parameter vector), and
finishes after a compute time drawn from ``compute``:

- ``"equal"``: every batch takes 1.0 time unit, so in steady state every push is M-1 stale;
- ``"jitter"``: lognormal times with mean 1 and log-spread ``jitter``;
- ``"straggler"``: jittered times, and the last ``stragglers`` workers are ``straggler_k``
  times slower.

The server side is :class:`dcasgd.shard.ShardState`, one per shard of the
:func:`dcasgd.layout.shard_ranges` split, fed :class:`dcasgd.protocol.Request` objects the way
``ShardServer._dispatch`` feeds it (``check`` first, then ``init`` / ``pull`` / ``push`` with
op ``push_pull``, a request id and a sequence number per worker). The rules run nowhere else,
so the simulator measures the library's own math, including the per-parameter ablation
(``compensation="per-parameter"``, a :class:`~dcasgd.shard.ShardConfig` option).

Modes are the server's: ``async`` with one worker is sequential SGD; ``sync`` (SSGD) closes a
round when every worker pushed, the replies come then, and every worker starts its next batch
at that moment (the slowest worker sets the round's time).

Data: the split of ``examples/train_digits.py`` (``load_digits``, pixels / 16, seeded 75/25
split, ``data_seed`` 0 by default, the same for every ``seed``). Every worker samples from the
*whole* training set, each with its own seeded shuffle (passes without replacement): with up
to 64 workers a per-worker share (21 samples) would be smaller than a batch, and sampling the
same distribution everywhere keeps data partitioning out of a study of staleness.

Overlap (``overlap=True``, async modes only) is what ``DistributedOptimizer(overlap=True)``
does: the reply of a push is loaded only at the worker's next step, after that step's gradient
was computed, so every gradient is computed on the weights of the reply before last (at first,
twice on the pulled weights) and its push names their version (``base``, per shard) and asks the
shard to keep two (``keep=2``), so delay compensation is against exactly those weights. The
simulator has no communication time, so overlap hides nothing here and changes only which
weights a gradient sees: one round of the worker older, so with ``equal`` compute every push is
2M-1 versions stale in steady state (as without overlap at 2M workers). Sync mode refuses it
(as the optimizer does: a gradient one step old would join the wrong round).

Budget: ``epochs`` counts gradients, not updates: the run ends after
``round(epochs * len(train) / batch_size)`` gradients have been pushed (in sync mode, rounded
down to whole rounds of M), whatever M is. Gradients still being computed then are dropped.

Divergence: a gradient that is not finite (or, in DC modes, beyond
:data:`dcasgd.kernels.GRADIENT_LIMIT`) is refused by the shard as it would be on a server; the
simulator then ends the run there (``diverged=True``, the final accuracy measured on the last
weights) instead of raising.

Determinism: the same config gives bitwise the same weights, history and staleness in the same
environment (torch build, thread count). The virtual clock breaks ties by worker index; compute
times, minibatches and initial weights come from generators seeded by ``seed`` and the worker.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import FlatLayout, shard_ranges
from .protocol import ITEMSIZE, NON_FINITE, ProtocolError, Request
from .rules import MODES, RuleConfig
from .shard import ShardConfig, ShardState

COMPUTE_MODELS = ("equal", "jitter", "straggler")
COMPENSATIONS = ("per-worker", "per-parameter")
MODELS = ("mlp", "cnn")
MAX_WORKERS = 64
NUM_FEATURES = 64  # 8x8 pixels
IMAGE = (1, 8, 8)  # channels, height, width
NUM_CLASSES = 10

__all__ = ["SimConfig", "SimResult", "simulate", "digits", "MlpModel", "CnnModel", "TorchModel", "make_model"]


@dataclass(frozen=True)
class SimConfig:
    """One simulated job. Times are in units of one mean batch compute time.

    ``workers``: 1 to 64. ``mode``: a server mode (``sync``, ``async``, ``dcasgd``,
    ``dcasgd-a``). ``epochs``: passes over the training set, counted in gradients (see the
    module doc). ``model``: ``"mlp"`` or ``"cnn"`` (:class:`CnnModel`; ``hidden`` is then
    unused). ``hidden``: MLP hidden units (0: softmax regression). ``lam``, ``lam0``,
    ``ms_decay``, ``momentum``, ``staleness_power``, ``clip``, ``curvature``, ``fisher_rank``,
    ``fisher_centered``, ``fisher_lam0``, ``fisher_cap``: as :class:`dcasgd.rules.RuleConfig`. ``compensation``:
    ``"per-worker"`` (the paper) or ``"per-parameter"`` (the ablation; DC modes only).
    ``eval_every``: virtual time between test-accuracy records in ``history`` (0: only the
    start and the end). ``weight_decay`` is added to the gradient on the worker, as
    ``torch.optim.SGD`` does. ``overlap``: overlapped workers (see the module doc; not in
    sync mode).
    """

    workers: int = 4
    mode: str = "async"
    lr: float = 0.1
    batch_size: int = 32
    epochs: float = 10.0
    compute: str = "equal"
    jitter: float = 0.3
    straggler_k: float = 4.0
    stragglers: int = 1
    compensation: str = "per-worker"
    seed: int = 0
    hidden: int = 32
    lam: float = 0.04
    lam0: float = 2.0
    ms_decay: float = 0.95
    momentum: float = 0.0
    staleness_power: float = 0.5
    clip: float = 1.0
    curvature: str = "diag"
    fisher_rank: int = 128
    fisher_centered: bool = True
    fisher_lam0: float = 12.0
    fisher_cap: float = 1.0
    shards: int = 1
    eval_every: float = 0.0
    weight_decay: float = 0.0
    data_seed: int = 0
    overlap: bool = False
    model: str = "mlp"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}], got {self.workers}")
        if self.mode not in MODES:
            raise ValueError(f"Invalid mode: {self.mode!r} (choose from {', '.join(MODES)})")
        if self.compute not in COMPUTE_MODELS:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODELS)}, got {self.compute!r}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        if not self.straggler_k > 0:
            raise ValueError(f"straggler_k must be > 0, got {self.straggler_k}")
        if self.compute == "straggler" and not 0 <= self.stragglers <= self.workers:
            raise ValueError(f"stragglers must be in [0, workers={self.workers}], got {self.stragglers}")
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {self.hidden}")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if not self.eval_every >= 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.overlap and self.mode == "sync":
            raise ValueError(
                "overlap=True needs an asynchronous mode (async, dcasgd, dcasgd-a): in sync mode every worker "
                "waits for the round anyway, and a gradient one step old would join the wrong round"
            )
        _ = self.rules  # RuleConfig validates lr, lam, lam0, ms_decay and momentum

    @property
    def rules(self) -> RuleConfig:
        return RuleConfig(
            mode=self.mode,
            lr=self.lr,
            lam=self.lam,
            lam0=self.lam0,
            ms_decay=self.ms_decay,
            momentum=self.momentum,
            staleness_power=self.staleness_power,
            clip=self.clip,
            curvature=self.curvature,
            fisher_rank=self.fisher_rank,
            fisher_centered=self.fisher_centered,
            fisher_lam0=self.fisher_lam0,
            fisher_cap=self.fisher_cap,
        )

    def total_gradients(self, train_size: int) -> int:
        """Gradients pushed in the whole run, for a training set of ``train_size`` samples."""
        total = max(1, round(self.epochs * train_size / self.batch_size))
        if self.mode == "sync":
            total = max(1, total // self.workers) * self.workers
        return total


@dataclass
class SimResult:
    """What a simulated run measured.

    ``history``: ``(virtual_time, updates, test_accuracy)`` records, where ``updates`` is the
    shards' version (weight updates applied; in sync mode one per round of M gradients).
    ``staleness``: how many pushes were how stale (versions between the weights a gradient was
    computed at and the weights it was applied to; shard 0's count). ``weights``: the final
    flat weight vector (not in :meth:`to_dict`). ``wall_seconds`` is the only field that is not
    deterministic. ``diverged``: the run ended early on a refused (non-finite or too large)
    gradient; ``gradients`` then counts those pushed before it.
    """

    config: SimConfig
    history: list[tuple[float, int, float]]
    final_accuracy: float
    staleness: dict[int, int]
    gradients: int
    updates: int
    virtual_time: float
    wall_seconds: float
    weights: Tensor = field(repr=False)
    diverged: bool = False

    @property
    def max_staleness(self) -> int:
        return max(self.staleness, default=0)

    @property
    def mean_staleness(self) -> float:
        count = sum(self.staleness.values())
        return sum(k * v for k, v in self.staleness.items()) / count if count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-ready values."""
        return {
            "config": asdict(self.config),
            "final_accuracy": self.final_accuracy,
            "gradients": self.gradients,
            "updates": self.updates,
            "virtual_time": self.virtual_time,
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "max_staleness": self.max_staleness,
            "mean_staleness": self.mean_staleness,
            "history": [list(h) for h in self.history],
            "wall_seconds": self.wall_seconds,
            "diverged": self.diverged,
        }


# --- data and model ------------------------------------------------------------------------


@lru_cache(maxsize=4)
def digits(data_seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: the split of ``examples/train_digits.py``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
    cut = len(y) * 3 // 4
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


class MlpModel:
    """``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)`` (or one Linear when hidden = 0)
    on a flat float32 vector, with a hand-written backward pass (no autograd per step).

    Parameter names and order are those of ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)``.
    """

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        if hidden > 0:
            entries = [
                ("0.weight", (hidden, NUM_FEATURES)),
                ("0.bias", (hidden,)),
                ("2.weight", (NUM_CLASSES, hidden)),
                ("2.bias", (NUM_CLASSES,)),
            ]
        else:
            entries = [("weight", (NUM_CLASSES, NUM_FEATURES)), ("bias", (NUM_CLASSES,))]
        self.layout = FlatLayout.from_shapes(entries)

    @property
    def numel(self) -> int:
        return self.layout.numel

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat``, in layout order."""
        return _views(self.layout, flat)

    def init(self, gen: torch.Generator) -> Tensor:
        """Weights as ``nn.Linear`` draws them: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        return _init(self, gen)

    def logits(self, w: Tensor, x: Tensor) -> Tensor:
        if self.hidden > 0:
            w1, b1, w2, b2 = self.views(w)
            return torch.addmm(b2, torch.relu(torch.addmm(b1, x, w1.t())), w2.t())
        w1, b1 = self.views(w)
        return torch.addmm(b1, x, w1.t())

    def accuracy(self, w: Tensor, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            return (self.logits(w, x).argmax(1) == y).double().mean().item()

    def grad(self, w: Tensor, x: Tensor, y: Tensor, out: Tensor) -> None:
        """The gradient of the mean cross-entropy of batch ``(x, y)`` at ``w``, into ``out``."""
        rows = torch.arange(len(y))
        if self.hidden > 0:
            w1, b1, w2, b2 = self.views(w)
            g1, gb1, g2, gb2 = self.views(out)
            h = torch.addmm(b1, x, w1.t())
            a = torch.relu(h)
            dz = torch.softmax(torch.addmm(b2, a, w2.t()), 1)
            dz[rows, y] -= 1.0
            dz.div_(len(y))
            torch.mm(dz.t(), a, out=g2)
            torch.sum(dz, 0, out=gb2)
            dh = torch.mm(dz, w2).masked_fill_(h <= 0, 0.0)
            torch.mm(dh.t(), x, out=g1)
            torch.sum(dh, 0, out=gb1)
        else:
            w1, b1 = self.views(w)
            g1, gb1 = self.views(out)
            dz = torch.softmax(torch.addmm(b1, x, w1.t()), 1)
            dz[rows, y] -= 1.0
            dz.div_(len(y))
            torch.mm(dz.t(), x, out=g1)
            torch.sum(dz, 0, out=gb1)


def _views(layout: FlatLayout, flat: Tensor) -> list[Tensor]:
    out = []
    for shape, off in zip(layout.shapes, layout.offsets, strict=True):
        out.append(flat[off : off + math.prod(shape)].view(shape))
    return out


def _init(model: MlpModel | CnnModel, gen: torch.Generator) -> Tensor:
    """Weights as ``nn.Linear`` and ``nn.Conv2d`` draw them by default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    fan_in = the weight's elements per output (in features, or in channels x kernel); a bias shares the
    fan-in of the weight before it."""
    w = torch.empty(model.numel)
    fan_in = NUM_FEATURES
    for p, shape in zip(model.views(w), model.layout.shapes, strict=True):
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        p.uniform_(-bound, bound, generator=gen)
    return w


class CnnModel:
    """A small CNN on the 1x8x8 digit images, on a flat float32 vector:
    ``Conv2d(1, c1, 3, padding=1) -> ReLU -> Conv2d(c1, c2, 3, stride=2, padding=1) -> ReLU ->
    Flatten -> Linear(c2*4*4, 10)`` (c1 = 8, c2 = 16: 3,818 parameters, against 2,442 for the
    MLP with 32 hidden units). Its gradient is torch autograd's, on views of the flat vector.

    Parameter names and order are those of the same ``nn.Sequential`` (``0.weight``, ...,
    ``5.bias``). Inputs are the flat 64-pixel rows the MLP takes.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16)) -> None:
        c1, c2 = channels
        self.channels = channels
        entries = [
            ("0.weight", (c1, IMAGE[0], 3, 3)),
            ("0.bias", (c1,)),
            ("2.weight", (c2, c1, 3, 3)),
            ("2.bias", (c2,)),
            ("5.weight", (NUM_CLASSES, c2 * 4 * 4)),
            ("5.bias", (NUM_CLASSES,)),
        ]
        self.layout = FlatLayout.from_shapes(entries)

    @property
    def numel(self) -> int:
        return self.layout.numel

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat``, in layout order."""
        return _views(self.layout, flat)

    def init(self, gen: torch.Generator) -> Tensor:
        """Weights as ``nn.Conv2d`` and ``nn.Linear`` draw them by default."""
        return _init(self, gen)

    def logits(self, w: Tensor, x: Tensor) -> Tensor:
        """``x``: (batch, 64) pixels; returns (batch, 10)."""
        k1, b1, k2, b2, w3, b3 = self.views(w)
        h = torch.relu(F.conv2d(x.view(-1, *IMAGE), k1, b1, padding=1))
        h = torch.relu(F.conv2d(h, k2, b2, stride=2, padding=1))
        return torch.addmm(b3, h.flatten(1), w3.t())

    def accuracy(self, w: Tensor, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            return (self.logits(w, x).argmax(1) == y).double().mean().item()

    def grad(self, w: Tensor, x: Tensor, y: Tensor, out: Tensor) -> None:
        """The gradient of the mean cross-entropy of batch ``(x, y)`` at ``w``, into ``out``."""
        leaf = w.detach().requires_grad_(True)
        loss = F.cross_entropy(self.logits(leaf, x), y)
        (g,) = torch.autograd.grad(loss, leaf)
        out.copy_(g)


class TorchModel:
    """Any ``nn.Module`` classifier as a simulator model (e.g. ResNet-20 for CIFAR-10, see
    ``benchmarks/staleness.py --data-dir``): its parameters as views of the flat vector, through
    ``torch.func.functional_call``; the gradient is autograd's, in train mode.

    ``make``: builds the module (called once per :meth:`init`, under the seed of its generator, so
    the initial weights are the module's own initialization for that seed). ``transform``: applied
    to a batch of inputs before the module (e.g. uint8 images to normalized floats). Buffers
    (BatchNorm's running statistics) are not parameters and never reach the shards: one set, in the
    module, is updated by every worker's gradient computation and used for test accuracy (eval
    mode). ``eval_batch``: test inputs per forward pass.
    """

    def __init__(
        self, make: Callable[[], nn.Module], transform: Callable[[Tensor], Tensor] | None = None, eval_batch: int = 1000
    ) -> None:
        self.make, self.transform, self.eval_batch = make, transform, eval_batch
        self.module = make()
        self.layout = FlatLayout.from_shapes([(n, tuple(p.shape)) for n, p in self.module.named_parameters()])

    @property
    def numel(self) -> int:
        return self.layout.numel

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat``, in layout order."""
        return _views(self.layout, flat)

    def init(self, gen: torch.Generator) -> Tensor:
        """A fresh module's parameters, built under ``gen``'s seed, as one flat vector."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen.initial_seed())
            self.module = self.make()
        return torch.cat([p.detach().flatten() for p in self.module.parameters()])

    def _forward(self, w: Tensor, x: Tensor) -> Tensor:
        params = dict(zip(self.layout.names, self.views(w), strict=True))
        return torch.func.functional_call(self.module, params, (self.transform(x) if self.transform else x,))

    def accuracy(self, w: Tensor, x: Tensor, y: Tensor) -> float:
        self.module.eval()
        with torch.no_grad():
            hits = sum(int((self._forward(w, xb).argmax(1) == yb).sum()) for xb, yb in
                       zip(x.split(self.eval_batch), y.split(self.eval_batch), strict=True))  # fmt: skip
        return hits / max(1, len(y))

    def grad(self, w: Tensor, x: Tensor, y: Tensor, out: Tensor) -> None:
        """The gradient of the mean cross-entropy of batch ``(x, y)`` at ``w``, into ``out``."""
        self.module.train()
        leaf = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(self._forward(leaf, x), y), leaf)
        out.copy_(g)


Model = MlpModel | CnnModel | TorchModel


def make_model(config: SimConfig) -> MlpModel | CnnModel:
    """The model ``config.model`` names."""
    return CnnModel() if config.model == "cnn" else MlpModel(config.hidden)


# --- the virtual cluster ---------------------------------------------------------------------


class _Shards:
    """The job's ShardStates, fed Request objects as ``ShardServer._dispatch`` feeds them."""

    def __init__(self, config: SimConfig, layout: FlatLayout) -> None:
        self.n = layout.numel
        self.ranges = shard_ranges(self.n, config.shards)
        self.fp = layout.fingerprint
        self.layout = [[name, list(shape)] for name, shape in zip(layout.names, layout.shapes, strict=True)]
        self.states = [
            ShardState(
                ShardConfig(
                    shard=s,
                    num_shards=config.shards,
                    num_workers=config.workers,
                    rules=config.rules,
                    compensation=config.compensation,
                )
            )
            for s in range(config.shards)
        ]
        self.rid = [0] * config.workers
        self.seq = [0] * config.workers
        self.received = [0] * config.workers  # shards that answered the worker's pending push
        # per worker, the version each shard sent with its last reply to that worker
        self.versions = [[0] * config.shards for _ in range(config.workers)]

    def _next_rid(self, worker: int) -> int:
        self.rid[worker] += 1
        return self.rid[worker]

    def init(self, worker: int, w: Tensor) -> None:
        rid = self._next_rid(worker)
        for state, (lo, hi) in zip(self.states, self.ranges, strict=True):
            req = Request(
                op="init",
                rid=rid,
                worker=worker,
                fp=self.fp,
                n=self.n,
                lo=lo,
                hi=hi,
                nbytes=(hi - lo) * ITEMSIZE,
                layout=self.layout,
            )
            state.check(req)
            state.init(req, w[lo:hi])

    def pull(self, worker: int, out: Tensor) -> None:
        """The shards' current weights into ``out`` (the worker's own copy)."""
        rid = self._next_rid(worker)
        for state, (lo, hi) in zip(self.states, self.ranges, strict=True):
            req = Request(op="pull", rid=rid, worker=worker, fp=self.fp)
            state.check(req)
            reply = state.pull(worker, req.rid)
            out[lo:hi].copy_(reply.snapshot.tensor)
            self.versions[worker][state.config.shard] = reply.snapshot.version

    def push_pull(
        self,
        worker: int,
        grad: Tensor,
        lr: float,
        now: float,
        weights: list[Tensor],
        base: list[int] | None = None,
        keep: int = 1,
    ) -> list[int]:
        """Push ``grad`` to every shard; copy replies into ``weights[m]`` of whoever they answer.

        ``base``: per shard, the version the gradient was computed on (None: the newest sent);
        ``keep``: as :attr:`dcasgd.protocol.Request.keep` (2 for an overlapped worker).

        Returns the workers that now have an answer from every shard (async: ``worker``; sync:
        every member of a round that this push completed; or nobody while a round waits).
        """
        self.seq[worker] += 1
        rid = self._next_rid(worker)
        ready = []
        for state, (lo, hi) in zip(self.states, self.ranges, strict=True):
            req = Request(
                op="push_pull",
                rid=rid,
                worker=worker,
                seq=self.seq[worker],
                fp=self.fp,
                nbytes=(hi - lo) * ITEMSIZE,
                lr=lr,
                base=None if base is None else base[state.config.shard],
                keep=keep,
            )
            state.check(req)
            for reply in state.push(req, grad[lo:hi], now):
                m = reply.worker
                weights[m][lo:hi].copy_(reply.snapshot.tensor)
                self.versions[m][state.config.shard] = reply.snapshot.version
                self.received[m] += 1
                if self.received[m] == len(self.states):
                    self.received[m] = 0
                    ready.append(m)
        return ready

    def weights(self) -> Tensor:
        return torch.cat([s.w for s in self.states])

    @property
    def version(self) -> int:
        return self.states[0].version

    @property
    def staleness(self) -> dict[int, int]:
        return dict(sorted(self.states[0].staleness.items()))


class _Clock:
    """Per-worker compute times, each worker with its own seeded stream."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rngs = [random.Random(f"dcasgd.sim:{config.seed}:time:{m}") for m in range(config.workers)]
        first_straggler = config.workers - config.stragglers

        def scale(m: int) -> float:
            return config.straggler_k if config.compute == "straggler" and m >= first_straggler else 1.0

        self.scale = [scale(m) for m in range(config.workers)]

    def draw(self, worker: int) -> float:
        c = self.config
        if c.compute == "equal":
            return 1.0
        s = c.jitter  # lognormal with mean 1: exp(s*z - s^2/2)
        return self.scale[worker] * math.exp(s * self.rngs[worker].gauss(0.0, 1.0) - 0.5 * s * s)


class _Batches:
    """One worker's minibatches: shuffled passes over the training set, without replacement."""

    def __init__(self, size: int, batch_size: int, seed: int, worker: int) -> None:
        self.size = size
        self.batch_size = min(batch_size, size)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + worker)
        self.chunks: list[Tensor] = []

    def next(self) -> Tensor:
        if not self.chunks:
            perm = torch.randperm(self.size, generator=self.gen)
            usable = self.size // self.batch_size * self.batch_size
            self.chunks = list(reversed(perm[:usable].split(self.batch_size)))
        return self.chunks.pop()


def simulate(
    config: SimConfig, *, model: Model | None = None, data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
) -> SimResult:
    """Run one simulated job to the end of its gradient budget; see the module doc.

    ``model`` and ``data`` replace ``config.model`` and the digits (``(x_train, y_train, x_test,
    y_test)``, rows of inputs and int64 labels), e.g. a :class:`TorchModel` on CIFAR-10.
    """
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = data if data is not None else digits(config.data_seed)
    model = model if model is not None else make_model(config)
    shards = _Shards(config, model.layout)
    workers = config.workers
    total = config.total_gradients(len(y_train))
    clock = _Clock(config)
    batches = [_Batches(len(y_train), config.batch_size, config.seed, m) for m in range(workers)]

    shards.init(0, model.init(torch.Generator().manual_seed(config.seed)))
    weights = [torch.empty(model.numel) for _ in range(workers)]  # what each worker computes on
    # Overlap: the reply in flight lands in incoming[m]; the next step swaps it in after computing.
    incoming = [torch.empty(model.numel) for _ in range(workers)] if config.overlap else weights
    in_flight = [False] * workers
    grad = torch.empty(model.numel)  # the shards read it during push and keep no reference
    events: list[tuple[float, int]] = []  # (time the worker's batch is done, worker)
    for m in range(workers):
        shards.pull(m, weights[m])
        heapq.heappush(events, (clock.draw(m), m))

    held = [list(shards.versions[m]) for m in range(workers)]  # versions of weights[m], per shard
    history = [(0.0, 0, model.accuracy(shards.weights(), x_test, y_test))]
    next_eval = config.eval_every if config.eval_every > 0 else math.inf
    now = 0.0
    pushed, diverged = 0, False
    for _ in range(total):
        now, m = heapq.heappop(events)
        while next_eval < now:  # the state at a record time includes every event up to it
            history.append((next_eval, shards.version, model.accuracy(shards.weights(), x_test, y_test)))
            next_eval += config.eval_every
        batch = batches[m].next()
        model.grad(weights[m], x_train[batch], y_train[batch], grad)
        if config.weight_decay > 0:
            grad.add_(weights[m], alpha=config.weight_decay)
        base, keep = None, 1
        if config.overlap:
            base, keep = held[m], 2
            if in_flight[m]:  # load the reply of the previous push; the next gradient uses it
                weights[m], incoming[m] = incoming[m], weights[m]
                held[m] = list(shards.versions[m])
            in_flight[m] = True
        try:
            ready = shards.push_pull(m, grad, config.lr, now, incoming, base, keep)
        except ProtocolError as exc:
            if exc.code != NON_FINITE:
                raise
            diverged = True
            break
        pushed += 1
        for r in ready:
            heapq.heappush(events, (now + clock.draw(r), r))

    final_w = shards.weights().clone()
    final = model.accuracy(final_w, x_test, y_test)
    if history[-1][0] != now or len(history) == 1:
        history.append((now, shards.version, final))
    return SimResult(
        config=config,
        history=history,
        final_accuracy=final,
        staleness=shards.staleness,
        gradients=pushed,
        updates=shards.version,
        virtual_time=now,
        wall_seconds=time.perf_counter() - started,
        weights=final_w,
        diverged=diverged,
    )
