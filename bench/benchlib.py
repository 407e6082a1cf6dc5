"""What every benchmark script shares: reading the machine's load and writing its section of RESULTS.md.

The machine is shared with other jobs, so a benchmark waits for idle CPUs before timing, counts the CPU time
other processes used during each timed run (busy CPU-seconds of the whole machine minus its own), and reports
medians. Each script owns one `## ...` section of bench/RESULTS.md and rewrites only that.
"""

from __future__ import annotations

import os
import re
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmarks

Machine: AMD EPYC Zen 4 (Genoa), 2 vCPU KVM guest, avx512_bf16, no AMX, 24 GiB RAM, torch 2.13.0+cpu; no GPU.
The machine is shared with other jobs, so every section states its load and uses medians; each section says how
it was run, and ratios are against a peer measured in the same run.
"""


def busy_seconds() -> float:
    """CPU-seconds all processes have been busy since boot (from /proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """CPU-seconds used by this process (RUSAGE_SELF) or its waited-for children (RUSAGE_CHILDREN)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def busy_share(dt: float = 3.0) -> float:
    """Share of all CPUs busy over the next dt seconds."""
    b0 = busy_seconds()
    time.sleep(dt)
    return (busy_seconds() - b0) / (dt * (os.cpu_count() or 1))


def wait_quiet(max_wait: float, dt: float = 3.0, threshold: float = 0.08) -> float:
    """Wait (up to max_wait s) until the CPUs are idle (< threshold busy over dt, twice in a row); returns the last
    busy share measured."""
    t0, ok, share = time.time(), 0, 0.0
    while time.time() - t0 < max_wait and ok < 2:
        share = busy_share(dt)
        ok = ok + 1 if share < threshold else 0
    return share


def memory_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (now) or VmHWM (peak)."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.M)
    return int(m[1]) if m else 0


def write_section(title: str, text: str, results: Path = RESULTS) -> None:
    """Replace the `## title` section of RESULTS.md with text (append it when missing); the rest stays as is."""
    doc = results.read_text() if results.exists() else HEADER
    heading = f"## {title}"
    section = heading + "\n\n" + text.strip() + "\n"
    m = re.search(rf"^{re.escape(heading)}\n", doc, flags=re.M)
    if m is None:
        doc = doc.rstrip() + "\n\n" + section
    else:
        nxt = re.search(r"^## ", doc[m.end():], flags=re.M)
        rest = doc[m.end() + nxt.start():] if nxt else ""
        doc = doc[:m.start()] + section + ("\n" + rest if rest else "")
    results.write_text(doc)
