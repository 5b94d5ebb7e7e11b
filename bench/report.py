"""Render bench/crossings.py and bench/request.py JSON output as BENCHMARKS.md-ready markdown.

    python bench/report.py CROSSINGS.json REQUEST.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crossings
import request

TARGETS = [  # (label, limit µs, how to get the measured value)
    ("Python→Wasm call (`GuestFunction.call`, `(i32,i32,i32)->i32`)", 1.0,
     lambda c, r: c["ours_shared_engine"]["guest"]["add3"]),
    ("Host call with memory access (`RawHostFunction`, read 16 B + write 4 B)", 1.5,
     lambda c, r: c["ours_shared_engine"]["host"]["memory"]),
    ("One request through the Go `transformer` in the Emulator (req + resp headers)", 40.0,
     lambda c, r: r["results"][0]["us_per_request"]),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        "| | |", "|---|---|",
        f"| date | {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC |",
        f"| CPU | {cpu_model()} |",
        f"| nproc | {os.cpu_count()} |",
        f"| load average at report time (1/5/15 min) | {load} |",
        f"| Python | {platform.python_version()} ({platform.python_implementation()}) |",
        f"| wasmtime-py | {version('wasmtime')} |",
        f"| OS | {platform.system()} {platform.release()} |",
    ])


def targets(c: dict, r: dict) -> str:
    lines = ["| target | limit | measured | result |", "|---|---:|---:|---|"]
    for label, limit, get in TARGETS:
        value = get(c, r)
        if value <= limit:
            verdict = f"**met** ({(limit - value) / limit * 100:.0f}% under)"
        else:
            verdict = (f"**missed** by {value - limit:.2f} µs ({value / limit:.2f}× the limit)")
        lines.append(f"| {label} | ≤ {limit:g} µs | {value:.2f} µs | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    with open(sys.argv[1]) as f:
        c = json.load(f)
    with open(sys.argv[2]) as f:
        r = json.load(f)
    print("## Machine\n")
    print(machine())
    print("\n## Targets\n")
    print(targets(c, r))
    print("\n## Crossings (`bench/crossings.py`)\n")
    print(crossings.table(c))
    print("\n## Requests (`bench/request.py`)\n")
    print(request.table(r["results"], r["calibration"]))


if __name__ == "__main__":
    main()
