"""What a new engine pays before its first training step: ours (engines/optim.py) against torch.optim.

Each sample is a fresh interpreter that imports what an engine imports (ipyparallel's engine, torch, our
training code), builds the default recipe's optimizer and schedule on the paper's CNN and takes one
step. It reports its CPU seconds (user + system, so other load on the machine moves it less than wall
time) and its peak resident memory. The baseline is the same with torch.optim's Adam and OneCycleLR,
which is what plain PyTorch does; its first optimizer imports torch._dynamo. The two alternate round
by round in the same run; printed: each round, the medians, and the median of the paired ratios.

    python benchmarks/first_step.py
    python benchmarks/first_step.py --rounds 7 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import REPO

SAMPLE = """
import resource, sys, time
import ipyparallel.engine.app, torch
from engines.workloads.cnn import MnistCNN
import engines.loop
model = MnistCNN()
if sys.argv[1] == "torch.optim":
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=391, pct_start=0.25)
else:
    from engines import optim
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    schedule = optim.OneCycle(optimizer, max_lr=0.01, total_steps=391, pct_start=0.25, cycle_momentum=False)
model(torch.randn(8, 1, 28, 28)).sum().backward()
optimizer.step()
schedule.step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, "torch._dynamo" in sys.modules)
"""
KINDS = ("engines/optim.py", "torch.optim")


def sample(kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SAMPLE, kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    cpu, rss, dynamo = out.stdout.split()
    return {"cpu_s": float(cpu), "rss_mib": float(rss), "dynamo": dynamo == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sample(KINDS[0])  # the first interpreter of a run also fills the page cache: not counted
    rounds = []
    for number in range(1, args.rounds + 1):
        ours, theirs = (sample(kind) for kind in KINDS)
        rounds.append((ours, theirs))
        if not args.json:
            print(
                f"round {number}: ours {ours['cpu_s']:.2f} CPU s {ours['rss_mib']:.0f} MiB   "
                f"torch.optim {theirs['cpu_s']:.2f} CPU s {theirs['rss_mib']:.0f} MiB",
                flush=True,
            )
    result = {}
    for key in ("cpu_s", "rss_mib"):
        result[key] = {
            "ours": statistics.median(o[key] for o, _ in rounds),
            "torch.optim": statistics.median(t[key] for _, t in rounds),
            "ratio": round(statistics.median(o[key] / t[key] for o, t in rounds), 3),
        }
    result["torch._dynamo imported"] = {
        "ours": any(o["dynamo"] for o, _ in rounds),
        "torch.optim": all(t["dynamo"] for _, t in rounds),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"\na new engine up to its first step, median of {args.rounds} rounds (ratio: median of the paired rounds)")
    print(f"  {'':24} {'ours':>10} {'torch.optim':>12} {'ours/torch.optim':>17}")
    for key, label in (("cpu_s", "CPU seconds"), ("rss_mib", "peak memory, MiB")):
        row = result[key]
        print(f"  {label:24} {row['ours']:>10.2f} {row['torch.optim']:>12.2f} {row['ratio']:>16.2f}x")
    flags = result["torch._dynamo imported"]
    print(f"  {'torch._dynamo imported':24} {str(flags['ours']):>10} {str(flags['torch.optim']):>12}")


if __name__ == "__main__":
    main()
