"""Start-up time of the ``dynaseg`` command: what a user waits before anything happens.

Times whole processes (interpreter start, imports, argument parsing, the command's own
work), interleaved, and prints the median and the spread of each command:

* ``dynaseg --help``, ``dynaseg config dynaseg_scf``, ``dynaseg sample``: commands that
  never train, so they must not import jax or scikit-learn, nor restart themselves with
  huge pages (goal: under 1 s each);
* ``dynaseg segment`` on a folder whose image is already done: a resume with nothing
  to do (it reads the output folder and stops before building the engine).

Usage::

    python benchmarks/bench_startup.py [--repeats 7] [--json runs/startup.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--set", "model.channels=8", "--set", "model.max_clusters=8", "--set", "stop.max_iters=2"]


def dynaseg(*args: str) -> list[str]:
    """The installed console script, as a user runs it (falls back to ``python -m``)."""
    exe = shutil.which("dynaseg")
    return [exe, *args] if exe else [sys.executable, "-m", "dynaseg_jax.cli", *args]


def time_command(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the timings here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        subprocess.run(dynaseg("sample", "in/a.png"), cwd=work, check=True, stdout=subprocess.DEVNULL)
        # Segment once so that the timed segment run finds everything done.
        subprocess.run(dynaseg("segment", "in", "--out", "out", "--no-progress", *TINY), cwd=work,
                       check=True, stdout=subprocess.DEVNULL)
        commands = {
            "dynaseg --help": dynaseg("--help"),
            "dynaseg config dynaseg_scf": dynaseg("config", "dynaseg_scf"),
            "dynaseg sample": dynaseg("sample", "s.png"),
            "dynaseg segment (all done)": dynaseg("segment", "in", "--out", "out", "--no-progress", *TINY),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved: machine noise hits every command alike
            for name, cmd in commands.items():
                times[name].append(time_command(cmd, work))
    print(f"{'command':<30} {'median s':>9} {'min s':>7} {'max s':>7}  (n = {args.repeats})")
    for name, ts in times.items():
        print(f"{name:<30} {statistics.median(ts):>9.3f} {min(ts):>7.3f} {max(ts):>7.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"python": sys.version.split()[0], "repeats": args.repeats, "seconds": times}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
