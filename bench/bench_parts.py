#!/usr/bin/env python3
"""packds benchmark: a partitioned pack at scale (plan, N parts, merge) against one process.

    python3 bench/bench_parts.py                      # 1,000,000 files of 64 bytes, 4 parts
    python3 bench/bench_parts.py --files 200000       # quicker

Each step runs as its own process (as array tasks would), timed and measured with wait4's
peak RSS. Reports: time of plan, of each part and of merge relative to a single-process
`packds pack` of the same tree; peak RSS per task relative to the single pack's; index bytes
per sample; the time to open the merged dataset and read one sample (fresh process, median of
several) relative to the single pack's; and whether merged and single are byte-identical.
Parts run one after another here (one machine); on a cluster they run at once, so the
wall-clock of the partitioned pack is plan + the slowest part + merge.
Data on tmpfs (/dev/shm). Not a test: nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run(args: list[str]) -> tuple[float, int]:
    """Runs a command; returns (seconds, peak RSS in bytes)."""
    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    err = p.stderr.read().decode() if p.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed ({status}): {err}")
    return dt, ru.ru_maxrss * 1024


OPEN = "import packds,sys,time; t=time.perf_counter(); ds=packds.open(sys.argv[1]); ds[len(ds)//2]; print(time.perf_counter()-t)"


def open_time(path: str, reps: int = 7) -> float:
    return statistics.median(float(subprocess.run([sys.executable, "-c", OPEN, path], capture_output=True, text=True, check=True).stdout) for _ in range(reps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="bytes per file")
    ap.add_argument("--shard-size", default="256M")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="packds-bench-parts-", dir=a.dir)
    py = [sys.executable, "-m", "packds"]
    try:
        src = os.path.join(base, "src")
        say(f"generating {a.files:,} files of {a.size} bytes in {src} ...")
        payload = b"x" * a.size
        per_dir = 1000
        for d in range((a.files + per_dir - 1) // per_dir):
            dd = os.path.join(src, f"d{d:05}")
            os.makedirs(dd)
            for i in range(d * per_dir, min(a.files, (d + 1) * per_dir)):
                with open(os.path.join(dd, f"{i:08}.txt"), "wb") as f:
                    f.write(payload)
        say("single-process pack ...")
        single = os.path.join(base, "single.pds")
        t_single, rss_single = run([*py, "pack", src, "-o", single, "--shard-size", a.shard_size, "-q"])
        say("plan ...")
        plan = os.path.join(base, "plan")
        t_plan, rss_plan = run([*py, "plan", src, "-o", plan, "--shard-size", a.shard_size, "-q"])
        out = os.path.join(base, "merged.pds")
        parts = []
        for p in range(a.parts):
            say(f"part {p}/{a.parts} ...")
            parts.append(run([*py, "pack", "--plan", plan, "--part", f"{p}/{a.parts}", "-o", out, "-q"]))
        say("merge ...")
        t_merge, rss_merge = run([*py, "merge", out, "-q"])
        same = filecmp.cmp(os.path.join(single, "index.pdsi"), os.path.join(out, "index.pdsi"), shallow=False) and all(
            filecmp.cmp(os.path.join(single, n), os.path.join(out, n), shallow=False) for n in os.listdir(single) if n.startswith("shard-")
        )
        ix_bytes = os.path.getsize(os.path.join(out, "index.pdsi"))
        o_single, o_merged = open_time(single), open_time(out)
        t_parts = [t for t, _ in parts]
        r = {
            "files": a.files,
            "parts": a.parts,
            "plan_time_over_single": t_plan / t_single,
            "part_time_over_single": [t / t_single for t in t_parts],
            "merge_time_over_single": t_merge / t_single,
            "array_wallclock_over_single": (t_plan + max(t_parts) + t_merge) / t_single,
            "sum_over_single": (t_plan + sum(t_parts) + t_merge) / t_single,
            "rss_single_mib": rss_single / 2**20,
            "rss_plan_over_single": rss_plan / rss_single,
            "rss_part_over_single": [rss / rss_single for _, rss in parts],
            "rss_merge_over_single": rss_merge / rss_single,
            "rss_part_bytes_per_file": [rss / (a.files / a.parts) for _, rss in parts],
            "index_bytes_per_sample": ix_bytes / a.files,
            "open_merged_over_single": o_merged / o_single,
            "open_merged_ms": o_merged * 1e3,
            "byte_identical": same,
        }
        print("\n| measure | value |\n|---|---|")
        print(f"| files, parts | {a.files:,}, {a.parts} |")
        print(f"| plan time / single pack | {r['plan_time_over_single']:.2f}× |")
        print(f"| each part's time / single pack | {', '.join(f'{x:.2f}×' for x in r['part_time_over_single'])} |")
        print(f"| merge time / single pack | {r['merge_time_over_single']:.3f}× |")
        print(f"| array wall-clock (plan + slowest part + merge) / single pack | {r['array_wallclock_over_single']:.2f}× |")
        print(f"| total CPU-side time (plan + all parts + merge) / single pack | {r['sum_over_single']:.2f}× |")
        print(f"| peak RSS: plan / single, parts / single, merge / single | {r['rss_plan_over_single']:.2f}×, {', '.join(f'{x:.2f}×' for x in r['rss_part_over_single'])}, {r['rss_merge_over_single']:.2f}× (single: {r['rss_single_mib']:.0f} MiB) |")
        print(f"| index bytes per sample | {r['index_bytes_per_sample']:.1f} |")
        print(f"| open + first read, merged / single (fresh process, median of 7) | {r['open_merged_over_single']:.2f}× |")
        print(f"| merged == single, byte for byte | {same} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=2)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
