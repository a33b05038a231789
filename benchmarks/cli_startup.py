"""Start-up time of the command line: ``python -m igkd --version`` and ``igkd distill --help``.

The reference way is what the command did before it imported torch lazily: import the whole
library (torch, scipy) first. Both are measured in this run, as fresh processes, median of
--repeats. Issue 17 asks for --help and --version under 1 s.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def seconds(code: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(code, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    rows = [
        ("python -m igkd --version", [py, "-m", "igkd", "--version"]),
        ("igkd distill --help", [py, "-m", "igkd", "distill", "--help"]),
        ("reference: import torch, scipy.stats and the API first", [py, "-c", "import igkd; igkd.distill; igkd.run_montecarlo"]),
    ]
    results = {name: seconds(cmd, args.repeats) for name, cmd in rows}
    ref = results[rows[-1][0]]
    for name, t in results.items():
        print(f"{name:58s} {t:6.2f} s  ({ref / t:4.1f}x faster than the reference)")
    worst = max(results[rows[0][0]], results[rows[1][0]])
    print(f"--version and --help under 1 s: {'yes' if worst < 1 else 'NO'} ({worst:.2f} s)")
    sys.exit(0 if worst < 1 else 1)


if __name__ == "__main__":
    main()
