"""How long the CLI takes to answer without doing work: `surgery --help`, `surgery zoo list`, and
for contrast a command that loads a model (`surgery inspect zoo:mnist-mlp`).

Each command runs ``--repeats`` times in a fresh process; the median wall time is printed with
the CPU model. The first two should stay under a second: they import neither torch nor
torchattacks (the package's names load on first use; the zoo list is read from
model_zoo/catalog.json).

    python benchmarks/cli_startup.py [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu() -> dict:
    from robust_surgery.nn.backends.c import cpu_features

    return cpu_features()


COMMANDS = {
    "surgery --help": ["--help"],
    "surgery zoo list": ["zoo", "list"],
    "surgery inspect zoo:mnist-mlp (loads torch)": ["inspect", "zoo:mnist-mlp"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    exe = shutil.which("surgery")
    base = [exe] if exe else [sys.executable, "-m", "robust_surgery.cli.app"]
    rows = {}
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(base + argv, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    info = cpu()
    print(f"CPU: {info['model']} ({info['isa']}); {args.repeats} runs each, fresh processes")
    for name, r in rows.items():
        print(f"  {name:45s} median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": info, "repeats": args.repeats, "commands": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
