"""What every benchmark shares: a description of the machine and the BENCHMARKS.md row it appends."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery figure with the command that produced it, the machine and the date. Rows are "
          "appended by the scripts in `benchmarks/`; rerun a command to add a row.\n\n"
          "| date | benchmark | figure | command | machine |\n|---|---|---|---|---|\n")


def pin_threads(n: int) -> list[int]:
    """Pins the process to its first `n` CPUs when it may use more; returns the CPUs it runs on. Call it before JAX
    starts: XLA:CPU sizes its thread pool from the CPUs the process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > n:
        os.sched_setaffinity(0, cpus[:n])
    return sorted(os.sched_getaffinity(0))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {len(os.sched_getaffinity(0))} CPU threads"
    try:
        import jax
        dev = jax.devices()[0]
        if dev.platform != "cpu":
            desc = f"{dev.device_kind} x{jax.device_count()}; host {desc}"
    except Exception:  # a benchmark that never started JAX
        pass
    return desc


def command() -> str:
    return "python -m " + Path(sys.argv[0]).with_suffix("").relative_to(REPO).as_posix().replace("/", ".") + (
        " " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "") if Path(sys.argv[0]).is_absolute() \
        else " ".join(["python"] + sys.argv)


def record(name: str, figure: str, result: dict, cmd: str | None = None) -> None:
    """Prints `result` as one JSON object and appends a row to BENCHMARKS.md."""
    result = dict(result, benchmark=name, machine=machine(), date=datetime.date.today().isoformat())
    print(json.dumps(result))
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as f:
        f.write(f"| {result['date']} | {name} | {figure} | `{cmd or command()}` | {result['machine']} |\n")
