import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from dcasgd.sim import SimConfig, simulate


def one(a):
    f, m, s = a
    torch.set_num_threads(1)
    r = simulate(SimConfig(workers=m, batch_size=8, hidden=32, epochs=20.0, lr=0.1, seed=s, **f))
    return r.final_accuracy, r.diverged


if __name__ == "__main__":
    f = json.loads(sys.argv[1])
    ms = [int(x) for x in sys.argv[2:]]
    seeds = f.pop("seeds", 5)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as p:
        res = list(p.map(one, [(f, m, s) for m in ms for s in range(seeds)]))
    for i, m in enumerate(ms):
        acc = [a for a, _ in res[i * seeds : (i + 1) * seeds]]
        print(
            m,
            f"{statistics.fmean(acc):.3f}",
            [round(a, 3) for a in acc],
            sum(d for _, d in res[i * seeds : (i + 1) * seeds]),
        )
