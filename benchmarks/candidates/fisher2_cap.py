"""Scratch: the shipped dcasgd-f at other caps, serially (one process, one thread).
Usage: python benchmarks/candidates/fisher2_cap.py CAP MODEL SEEDS M [M ...]"""

import statistics
import sys

import torch

from dcasgd.sim import SimConfig, simulate

torch.set_num_threads(1)
cap, model, seeds, ms = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4:]]
first = int(__import__("os").environ.get("FIRST_SEED", "0"))  # seeds first .. first + SEEDS - 1
out = []
for m in ms:
    rs = [
        simulate(
            SimConfig(
                workers=m,
                mode="dcasgd-f",
                fisher_cap=cap,
                lr=0.1,
                batch_size=8,
                hidden=32,
                epochs=20.0,
                seed=s,
                model=model,
            )
        )  # fmt: skip
        for s in range(first, first + seeds)
    ]
    acc = [r.final_accuracy for r in rs]
    div = sum(r.diverged for r in rs)
    out.append(
        f"M={m}: {statistics.fmean(acc):.3f}+/-{statistics.pstdev(acc):.3f} ({div} div) ["
        + " ".join(f"{a:.3f}" for a in acc)
        + "]"
    )
line = f"dcasgd-f cap {cap:g} {model} seeds {first}-{first + seeds - 1} " + "  ".join(out)
print(line, flush=True)
with open(__file__.replace("fisher2_cap.py", "fisher2_log.txt"), "a") as f:
    f.write(line + "\n")
