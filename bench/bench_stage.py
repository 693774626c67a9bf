"""Benchmark: `packds stage` against `cp -r` and `rsync -a` of the same shards, cold cache.

    python bench/bench_stage.py [--gb 2] [--repeat 3] [--work DIR] [--dest DIR]

Packs a generated dataset of about --gb GiB (incompressible data, 512 MiB shards) under
--work (on a real disk, not tmpfs, so that a cold read is a disk read), then copies it to
--dest by each method, --repeat rounds, interleaved (the order rotates every round). Before
every copy: the previous copy is removed, `sync`, and `echo 3 > /proc/sys/vm/drop_caches`
(needs root; without it the numbers are warm-cache and say so).

`packds stage` reads, hashes (XXH3-128, checked against the manifest) and writes in one pass
and fsyncs every file; `cp` and `rsync` verify nothing. They are timed twice: alone, and
followed by `sync` (the same durability as stage). Prints medians and ratios (throughput of
stage / throughput of the other; >= 1 means stage is at least as fast).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import packds


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_dataset(work: str, gib: float) -> str:
    src = os.path.join(work, "bench.pds")
    if os.path.exists(os.path.join(src, "manifest.json")):
        return src
    tree = os.path.join(work, "tree")
    os.makedirs(tree, exist_ok=True)
    n = max(1, int(gib * 1024 / 32))
    block = os.urandom(32 << 20)
    for i in range(n):  # 32 MiB files, each different (a counter in front), incompressible
        with open(os.path.join(tree, f"f{i:05d}.bin"), "wb") as f:
            f.write(i.to_bytes(8, "little") + block[8:])
    packds.pack(tree, src, shard_size=512 << 20, force=True)
    shutil.rmtree(tree)
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="dataset size in GiB (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/packds-bench-stage", help="where the source dataset is generated (a disk)")
    ap.add_argument("--dest", default=None, help="destination directory (default WORK/dest)")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset")
    a = ap.parse_args()
    for tool in ("cp", "rsync"):
        if shutil.which(tool) is None:
            print(f"bench_stage: {tool} is missing (apt-get install -y {tool})", file=sys.stderr)
            return 1
    os.makedirs(a.work, exist_ok=True)
    dest = a.dest or os.path.join(a.work, "dest")
    os.makedirs(dest, exist_ok=True)
    src = make_dataset(a.work, a.gb)
    m = packds.open(src).manifest
    nbytes = sum(s["size"] for s in m["shards"]) + m["index"]["size"]
    target = os.path.join(dest, "bench.pds")
    py = sys.executable

    stage = [py, "-m", "packds", "stage", src, "--to", dest, "--policy", "local", "-q"]
    job_env = dict(os.environ, SLURM_TMPDIR=dest)  # dest as the job's $SLURM_TMPDIR: no fsync
    methods = {
        "packds stage": [stage],
        "stage (job tmp)": [(stage, job_env)],
        "stage memory (job tmp)": [([*stage[:-3], "--policy", "memory", "-q"], job_env)],
        "cp -r": [["cp", "-r", src, target]],
        "cp -r + sync": [["cp", "-r", src, target], ["sync"]],
        "rsync -a": [["rsync", "-a", src + "/", target + "/"]],
        "rsync -a + sync": [["rsync", "-a", src + "/", target + "/"], ["sync"]],
    }
    names = list(methods)
    times: dict[str, list[float]] = {k: [] for k in names}
    cold = True
    print(f"bench_stage: {nbytes / 1e9:.2f} GB in {len(m['shards'])} shards, {src} -> {dest}, {a.repeat} rounds", file=sys.stderr)
    for r in range(a.repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            shutil.rmtree(target, ignore_errors=True)
            cold = drop_caches() and cold
            t = time.perf_counter()
            for cmd in methods[name]:
                cmd, env = cmd if isinstance(cmd, tuple) else (cmd, None)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            dt = time.perf_counter() - t
            times[name].append(dt)
            print(f"  round {r + 1}: {name:<22} {dt:7.2f} s  {nbytes / dt / 1e6:8.0f} MB/s", file=sys.stderr)
    shutil.rmtree(target, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    st = med["packds stage"]
    print(f"\nmedians of {a.repeat} ({'cold' if cold else 'WARM (drop_caches needs root)'} cache), {nbytes / 1e9:.2f} GB:")
    print(f"  {'method':<22} {'seconds':>8} {'MB/s':>8}  stage throughput / this")
    for k in names:
        print(f"  {k:<22} {med[k]:8.2f} {nbytes / med[k] / 1e6:8.0f}  {med[k] / st:6.2f}x")
    for a_, b_ in (("stage (job tmp)", "cp -r"), ("stage memory (job tmp)", "cp -r"), ("packds stage", "cp -r + sync")):
        print(f"  {a_} vs {b_}: {med[b_] / med[a_]:.2f}x the throughput")
    print("  (packds stage verifies every file's XXH3-128; it fsyncs every file before the rename,")
    print("   except into the job's $SLURM_TMPDIR, which does not outlive the node: 'stage (job tmp)';")
    print("   'stage memory' also pulls the copy into the page cache: --policy memory, what auto picks")
    print("   for a dataset within the memory limit)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
