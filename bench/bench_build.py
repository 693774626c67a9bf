#!/usr/bin/env python3
"""Writing datasets from Python, side by side in one run: packds.build against LitData's
`optimize` and MosaicML's `MDSWriter` on the same function, inputs and worker count; and a
`pack --append` of 10 % new files against packing everything again.

    python bench/bench_build.py [--inputs 20000] [--workers 2] [--size 16384] [--rounds 3]

Each method runs in a child process of its own (wall time, and peak RSS of that process tree's
largest member from wait4), rounds interleaved; medians [min–max]. Ratios are packds's
advantage (> 1: packds faster / smaller). A peer that is not installed is reported with the
reason (`pip install litdata mosaicml-streaming` adds them). No timing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def make_sample(i: int, size: int = 16384) -> bytes:
    """The `fn` every writer runs: a cheap, deterministic byte transform (a stand-in for
    re-encoding an image): `size` pseudo-random bytes from BLAKE2b in counter mode."""
    out = bytearray()
    k = 0
    while len(out) < size:
        out += hashlib.blake2b(b"%d:%d" % (i, k), digest_size=64).digest()
        k += 1
    return bytes(out[:size])


# --- the children ---------------------------------------------------------------------------


def _packds_fn(i):
    return f"s{i:08}.bin", make_sample(i, int(os.environ.get("BENCH_SIZE", "16384")))


def _litdata_fn(i):
    return {"key": f"s{i:08}.bin", "data": make_sample(i, int(os.environ.get("BENCH_SIZE", "16384")))}


def child_packds(out: str, n: int, workers: int) -> None:
    import packds

    packds.build(_packds_fn, range(n), out, workers=workers, chunksize=64, progress=False, shard_size="256M")


def child_litdata(out: str, n: int, workers: int) -> None:
    import litdata

    litdata.optimize(fn=_litdata_fn, inputs=list(range(n)), output_dir=out, num_workers=workers, chunk_bytes="256MB", mode="overwrite")


def child_mds(out: str, n: int, workers: int) -> None:
    import multiprocessing as mp

    sys.path.insert(0, HERE)
    import peers

    peers.stub_torchvision()
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"key": "str", "data": "bytes"}, size_limit="256mb") as w, mp.Pool(workers) as pool:
        for s in pool.imap(_litdata_fn, range(n), chunksize=64):
            w.write(s)


CHILDREN = {"packds.build": child_packds, "litdata.optimize": child_litdata, "MDSWriter + Pool": child_mds}


def have(name: str) -> str | None:
    code = {"litdata.optimize": "import litdata", "MDSWriter + Pool": "import sys; sys.path.insert(0, %r); import peers; peers.stub_torchvision(); import streaming" % HERE}
    if name not in code:
        return None
    r = subprocess.run([sys.executable, "-c", code[name]], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]


def run_child(args: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child."""
    t = time.perf_counter()
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args[3:5]} failed:\n{err[-2000:]}")
    return dt, ru.ru_maxrss * 1024


def fmt(xs, nd=2) -> str:
    return f"{statistics.median(xs):.{nd}f} [{min(xs):.{nd}f}–{max(xs):.{nd}f}]"


def bench_build(work: str, n: int, workers: int, size: int, rounds: int) -> None:
    print(f"\n## Writing from Python: {n:,} samples of {size:,} bytes made by one function, {workers} workers\n")
    times: dict[str, list[float]] = {k: [] for k in CHILDREN}
    rss: dict[str, list[int]] = {k: [] for k in CHILDREN}
    missing = {k: have(k) for k in CHILDREN}
    env = {**os.environ, "BENCH_SIZE": str(size)}
    for _ in range(rounds):
        for name, fn in CHILDREN.items():
            if missing[name]:
                continue
            out = os.path.join(work, name.replace(" ", "_").replace("+", ""))
            shutil.rmtree(out, ignore_errors=True)
            dt, peak = run_child([sys.executable, __file__, "--child", fn.__name__, out, str(n), str(workers)], env)
            times[name].append(dt)
            rss[name].append(peak)
            shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["packds.build"])
    base_rss = statistics.median(rss["packds.build"])
    print("| writer | samples/s | time / packds | peak RSS of the main process (MiB) | RSS / packds |")
    print("|---|---:|---:|---:|---:|")
    for name in CHILDREN:
        if missing[name]:
            print(f"| {name} | not installed: {missing[name]} | | | |")
            continue
        sps = [n / t for t in times[name]]
        print(f"| {name} | {fmt(sps, 0)} | {statistics.median(times[name]) / base:.2f}× | {statistics.median(rss[name]) / 2**20:.0f} | "
              f"{statistics.median(rss[name]) / base_rss:.2f}× |")


def bench_append(work: str, n: int, size: int, rounds: int) -> None:
    import packds

    print(f"\n## Growing a dataset by 10 %: `pack --append` vs packing everything again ({n:,} files of {size:,} bytes)\n")
    src = os.path.join(work, "tree")
    for i in range(n):
        d = os.path.join(src, f"d{i % 100:03}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:08}.bin"), "wb") as f:
            f.write(make_sample(i, size))
    extra = n // 10
    t_app, t_full = [], []
    for r in range(rounds):
        ds = os.path.join(work, "grow.pds")
        shutil.rmtree(ds, ignore_errors=True)
        packds.pack(src, ds, shard_size=64 << 20)
        for i in range(n, n + extra):
            d = os.path.join(src, f"new{r}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i:08}.bin"), "wb") as f:
                f.write(make_sample(i, size))
        t = time.perf_counter()
        s = packds.pack(src, ds, append=True, shard_size=64 << 20)
        t_app.append(time.perf_counter() - t)
        assert s["added"] == extra, s
        full = os.path.join(work, "full.pds")
        t = time.perf_counter()
        packds.pack(src, full, shard_size=64 << 20, force=True)
        t_full.append(time.perf_counter() - t)
        shutil.rmtree(os.path.join(src, f"new{r}"))
    print("| method | seconds | time / append |")
    print("|---|---:|---:|")
    print(f"| pack --append (10 % new files) | {fmt(t_app)} | 1.00× |")
    print(f"| pack everything again | {fmt(t_full)} | {statistics.median(t_full) / statistics.median(t_app):.2f}× |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, fn, out, n, workers = sys.argv
        globals()[fn](out, int(n), int(workers))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--append-files", type=int, default=50_000)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="packds-bench-build-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; data on {work}")
        bench_build(work, a.inputs, a.workers, a.size, a.rounds)
        bench_append(work, a.append_files, 4096, a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
