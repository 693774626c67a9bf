#!/usr/bin/env python3
"""Where users wait: each waiting point of a packds user next to what they would run instead,
side by side in one run; ratios only (> 1 = packds faster), median [min–max] over rounds.

    python bench/bench_wait.py [--quick] [--rounds 3] [--stage-gb 1] [--only 1,4]
                               [--json bench/out/bench_wait-DATE.json]

Rows (every round runs each method once, the order rotating, so that noise from other work
on the machine falls on both sides; a ratio is taken within a round, then summarised):
  1  `packds stage` (defaults: policy auto) of a ~1 GB dataset into a `$SLURM_TMPDIR`-like
     directory vs `cp -r`; `packds stage --to DIR` vs `cp -r && sync`. Cold cache: `sync` and
     `echo 3 > /proc/sys/vm/drop_caches` before every copy (root). Source and destination on
     the local disk (--disk). Dataset from bench_stage.py (32 MiB random files, 512 MiB shards).
  2  `packds pack` from a Lustre-like FUSE mount (slowfs, ../shared/tools/slowfs.c, built with
     the line in its header, default latencies, a fresh mount for every run) vs a Python walk
     with 64 threads followed by a read of every file with 64 threads, and vs `tar -cf`.
  3  `packds pack` from a warm tree on tmpfs vs `tar -cf`: time to exit, and time to exit plus
     a `sync` after it (packds fsyncs its shards, tar does not), written to tmpfs and to disk.
  4  `ds.get_batch(256 random, out=reused bytearray)` vs `[ds[i] for i in idx]`, GB/s, at
     100 KB and 300 KB samples (tmpfs, warm): 5 batches per timing, best of 3 per round.
  5  torch DataLoader, 2 workers, batch 64, shuffled, no transform, list collate:
     `packds.torch.PackedDataset` vs a list-of-paths Dataset (open + read per sample), over
     the same files on the local disk; warm, and cold (caches dropped before the round). Each
     epoch starts its workers (the default, non-persistent) and the Dataset is built inside
     the timing (the path list from memory, no directory walk). Plus a breakdown of where a
     warm batch's time goes (dataset fetch, pickling through the worker pipe, DataLoader
     overhead with an empty dataset).
  6  `--format h5` pack: bytes the packing process wrote (wchar from its /proc/self/io) ÷ the
     data bytes, and h5 pack time ÷ tar-format pack time (whole process, same tree).

Machine load (load average before/after each row, nproc, kernel) goes into the header.
Markdown on stdout, JSON in --json (default bench/out/). Nothing is asserted; exit status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_pack_read as bpr  # noqa: E402  (run_child, make_tree, machine_info, rm, say)
import bench_stage  # noqa: E402  (make_dataset, drop_caches)
import bench_torch  # noqa: E402  (Mount, loader, collate_list)
import run as brun  # noqa: E402  (make_tree with log-normal sizes, packds_cmd)

say, median, rm = bpr.say, bpr.median, bpr.rm
PY = sys.executable
SLOWFS_C = os.path.normpath(os.path.join(REPO, "..", "shared", "tools", "slowfs.c"))


def packds_base() -> list[str]:
    exe = os.path.join(os.path.dirname(PY), "packds")
    return [exe] if os.access(exe, os.X_OK) else [PY, "-m", "packds"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summary(xs: list[float]) -> dict:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs} if xs else {}


def mmx(s: dict, nd: int = 2) -> str:
    if not s:
        return "—"
    return f"**{s['median']:.{nd}f}×** [{s['min']:.{nd}f}–{s['max']:.{nd}f}]"


def rotate(names: list, r: int) -> list:
    k = r % len(names)
    return names[k:] + names[:k]


def timed(cmds: list, env: dict | None = None, capture: bool = False) -> tuple[float, str]:
    """Wall seconds of running ``cmds`` one after another (each an argv list)."""
    out = ""
    t = time.perf_counter()
    for cmd in cmds:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode:
            raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
        out += p.stdout or ""
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------------------------------
# 1. stage, cold cache


def row_stage(a, disk: str) -> dict:
    src = bench_stage.make_dataset(os.path.join(disk, f"stage-{a.stage_gb:g}gib"), a.stage_gb)
    m = json.load(open(os.path.join(src, "manifest.json")))
    nbytes = sum(s["size"] for s in m["shards"]) + m["index"]["size"]
    dest = os.path.join(disk, "dest")  # the job's $SLURM_TMPDIR, or the --to DIR
    target = os.path.join(dest, os.path.basename(src))
    base = packds_base()
    job_env = dict(os.environ, SLURM_TMPDIR=dest)
    no_job = {k: v for k, v in os.environ.items() if k != "SLURM_TMPDIR"}
    methods = {
        "stage": ([base + ["stage", src, "-q", "--json"]], job_env),
        "cp -r": ([["cp", "-r", src, target]], None),
        "stage --to": ([base + ["stage", src, "--to", dest, "-q", "--json"]], no_job),
        "cp -r && sync": ([["cp", "-r", src, target], ["sync"]], None),
    }
    t = {k: [] for k in methods}
    policy, cold = {}, True
    for r in range(a.stage_rounds):
        for name in rotate(list(methods), r):
            rm(dest)
            os.makedirs(dest)
            cold = bench_stage.drop_caches() and cold
            cmds, env = methods[name]
            dt, out = timed(cmds, env, capture=name.startswith("stage"))
            if out.strip():
                policy[name] = json.loads(out.strip().splitlines()[-1]).get("policy")
            t[name].append(dt)
            say(f"  1 stage round {r + 1}: {name:<14} {dt:6.2f} s")
    rm(dest)
    if not a.keep:
        rm(src)
    rounds = range(a.stage_rounds)
    return {
        "bytes": nbytes, "shards": len(m["shards"]), "cold": cold, "policy": policy, "seconds": t,
        "ratios": {
            "stage into $SLURM_TMPDIR vs cp -r": summary([t["cp -r"][i] / t["stage"][i] for i in rounds]),
            "stage --to DIR vs cp -r && sync": summary([t["cp -r && sync"][i] / t["stage --to"][i] for i in rounds]),
        },
    }


# ---------------------------------------------------------------------------------------------
# 2. pack on slowfs

PYWALK = r"""
import os, sys
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_COMPLETED
root = sys.argv[1]
files = []
def scan(d):
    subdirs = []
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
            elif e.is_file(follow_symlinks=False):
                files.append(e.path)
    return subdirs
def read(p):
    with open(p, "rb") as f:
        os.fstat(f.fileno())
        n = 0
        while True:
            b = f.read(1 << 20)
            if not b:
                return n
            n += len(b)
with ThreadPoolExecutor(64) as ex:
    pending = {ex.submit(scan, root)}
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            pending |= {ex.submit(scan, d) for d in fut.result()}
with ThreadPoolExecutor(64) as ex:
    total = sum(ex.map(read, files, chunksize=16))
print(len(files), total)
"""


def build_slowfs(work: str) -> tuple[str | None, str]:
    if not os.path.exists(SLOWFS_C):
        return None, f"not run ({os.path.relpath(SLOWFS_C, REPO)} missing)"
    if shutil.which("pkg-config") is None or subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return None, "not run (apt-get install -y fuse3 libfuse3-dev pkg-config)"
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True).stdout.split()
    exe = os.path.join(work, "slowfs")
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", exe, SLOWFS_C] + flags, capture_output=True, text=True)
    return (exe, "ok") if r.returncode == 0 else (None, f"not run (slowfs build failed: {r.stderr[-300:]})")


def row_slowfs(a, shm: str) -> dict:
    work = os.path.join(shm, "slowfs")
    os.makedirs(work)
    exe, why = build_slowfs(work)
    if exe is None:
        return {"status": why}
    src, mnt = os.path.join(work, "tree"), os.path.join(work, "mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    tree = brun.make_tree(src, a.slowfs_files, max(1, a.slowfs_files // 100), 8192, 0.7, a.seed)
    pds, tar = os.path.join(work, "o.pds"), os.path.join(work, "o.tar")
    methods = {
        "packds pack": brun.packds_cmd(mnt, pds),
        "python 64-thread walk + read": [PY, "-c", PYWALK, mnt],
        "tar -cf": ["tar", "-cf", tar, "-C", mnt, "."],
    }
    t = {k: [] for k in methods}
    try:
        for r in range(a.rounds):
            for name in rotate(list(methods), r):
                rm(pds)
                rm(tar)
                with bench_torch.Mount(exe, src, mnt):  # fresh mount: no kernel or daemon state
                    dt, _ = timed([methods[name]])
                t[name].append(dt)
                say(f"  2 slowfs round {r + 1}: {name:<30} {dt:6.2f} s")
    finally:
        rm(work)
    rounds = range(a.rounds)
    p = t["packds pack"]
    return {
        "status": "ok", "files": tree["files"], "bytes": tree["bytes"], "dirs": tree["dirs"], "seconds": t,
        "settings": "slowfs defaults (SLOWFS_META_US/READ_US unset), fresh mount per run",
        "ratios": {
            "vs Python 64-thread walk + 64-thread read": summary([t["python 64-thread walk + read"][i] / p[i] for i in rounds]),
            "vs tar -cf": summary([t["tar -cf"][i] / p[i] for i in rounds]),
        },
    }


# ---------------------------------------------------------------------------------------------
# 3. local pack, warm


def row_local_pack(a, shm: str, disk: str) -> dict:
    src = os.path.join(shm, "local-tree")
    os.makedirs(src)
    tree = bpr.make_tree(src, a.local_files, 8192, a.seed, dirs=100)
    outs = {"tmpfs": shm, "disk": disk}
    methods = {}
    for where, d in outs.items():
        methods[f"packds pack → {where}"] = (brun.packds_cmd(src, os.path.join(d, "local.pds")), os.path.join(d, "local.pds"))
        methods[f"tar -cf → {where}"] = (["tar", "-cf", os.path.join(d, "local.tar"), "-C", src, "."], os.path.join(d, "local.tar"))
    ex = {k: [] for k in methods}
    ws = {k: [] for k in methods}
    for r in range(a.local_rounds):
        for name in rotate(list(methods), r):
            cmd, out = methods[name]
            rm(out)
            subprocess.run(["sync"], check=True)  # nobody pays for earlier dirty data
            dt, _ = timed([cmd])
            ds, _ = timed([["sync"]])
            ex[name].append(dt)
            ws[name].append(dt + ds)
            rm(out)
            say(f"  3 local pack round {r + 1}: {name:<22} exit {dt:6.3f} s, + sync {dt + ds:6.3f} s")
    rm(src)
    rounds = range(a.local_rounds)
    ratio = lambda d, w: summary([d[f"tar -cf → {w}"][i] / d[f"packds pack → {w}"][i] for i in rounds])  # noqa: E731
    return {
        "files": tree["files"], "bytes": tree["bytes"], "exit_seconds": ex, "exit_plus_sync_seconds": ws,
        "ratios": {
            "tmpfs → tmpfs, exit": ratio(ex, "tmpfs"),
            "tmpfs → tmpfs, exit + sync": ratio(ws, "tmpfs"),
            "tmpfs → disk, exit": ratio(ex, "disk"),
            "tmpfs → disk, exit + sync": ratio(ws, "disk"),
        },
    }


# ---------------------------------------------------------------------------------------------
# 4. get_batch vs a loop


def batch_methods(ds) -> dict:
    """Each takes a list of index lists and reads them one batch after another, as a training
    loop does: a batch is dropped when the next one has been read (at most two alive)."""
    buf = bytearray()

    def loop(fn):
        def run(sets):
            b = None
            for ix in sets:
                b = fn(ix)
            return b

        return run

    return {
        "get_batch(out=reused)": loop(lambda ix: ds.get_batch(ix, out=buf)),
        "get_batch()": loop(ds.get_batch),
        "[ds[i] for i in idx]": loop(lambda ix: [ds[i] for i in ix]),
    }


def row_get_batch(a, shm: str) -> dict:
    import packds

    res = {}
    for size in (100_000, 300_000):
        src, out = os.path.join(shm, f"gb-tree-{size}"), os.path.join(shm, f"gb-{size}.pds")
        os.makedirs(src)
        bpr.make_tree(src, a.gb_samples, size, a.seed, dirs=10)
        packds.pack(src, out, force=True)
        rm(src)
        ds = packds.open(out)
        n, rng = len(ds), random.Random(a.seed)
        fns = batch_methods(ds)
        t = {k: [] for k in fns}
        gbps = {k: [] for k in fns}
        for r in range(a.gb_rounds):
            sets = [rng.sample(range(n), 256) for _ in range(5)]
            nbytes = 5 * 256 * size
            for name in rotate(list(fns), r):
                fns[name](sets)  # warm pass over exactly these samples (and grows buf once)
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    fns[name](sets)
                    best = min(best, time.perf_counter() - t0)
                t[name].append(best)
                gbps[name].append(nbytes / best / 1e9)
        rounds = range(a.gb_rounds)
        loop = t["[ds[i] for i in idx]"]
        res[size] = {
            "samples": n, "seconds": t, "gb_per_s": {k: median(v) for k, v in gbps.items()},
            "ratios": {
                "get_batch(out=reused) vs loop": summary([loop[i] / t["get_batch(out=reused)"][i] for i in rounds]),
                "get_batch() vs loop": summary([loop[i] / t["get_batch()"][i] for i in rounds]),
            },
        }
        say(f"  4 get_batch {size // 1000} KB: " + ", ".join(f"{k} {median(v):.2f} GB/s" for k, v in gbps.items()))
        ds.close()
        rm(out)
    return res


# ---------------------------------------------------------------------------------------------
# 5. DataLoader, warm and cold


class PathsDS:
    """The usual hand-written Dataset: a list of paths; each item opens and reads one file."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


class NullDS:
    """The DataLoader's own cost: every sample is an empty bytes object."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return b""

    def __getitems__(self, idx):
        return [b""] * len(idx)


def dl_epoch(make, seed: int) -> tuple[float, int]:
    t = time.perf_counter()
    ds = make()
    dl = bench_torch.loader(ds, 2, persistent=False, seed=seed)
    n = sum(len(b) for b in dl)
    dt = time.perf_counter() - t
    del dl, ds
    gc.collect()
    return dt, n


def row_dataloader(a, disk: str) -> dict:
    import packds
    import packds.torch as pt

    src, pds = os.path.join(disk, "dl-tree"), os.path.join(disk, "dl.pds")
    rm(src)
    os.makedirs(src)
    tree = bpr.make_tree(src, a.dl_files, a.dl_size, a.seed, dirs=100)
    packds.pack(src, pds, force=True)
    with packds.open(pds) as d:
        paths = [os.path.join(src, k) for k in d.keys()]
    makers = {"packds PackedDataset": lambda: pt.PackedDataset(pds), "list of paths": lambda: PathsDS(paths)}
    keys = [(m, c) for c in ("warm", "cold") for m in makers]
    sps = {f"{m}, {c}": [] for m, c in keys}
    for r in range(a.rounds):
        for m, c in rotate(keys, r):
            if c == "cold":
                bench_stage.drop_caches()
            else:
                dl_epoch(makers[m], seed=1000 + r)  # untimed: the same files into the page cache
            dt, n = dl_epoch(makers[m], seed=r)
            sps[f"{m}, {c}"].append(n / dt)
            say(f"  5 DataLoader round {r + 1}: {m:<22} {c}  {n / dt:10,.0f} samples/s")
    rounds = range(a.rounds)
    ratios = {c: summary([sps[f"packds PackedDataset, {c}"][i] / sps[f"list of paths, {c}"][i] for i in rounds])
              for c in ("warm", "cold")}
    res = {"files": tree["files"], "bytes": tree["bytes"], "samples_per_s": sps, "ratios": ratios,
           "breakdown": dl_breakdown(pds, paths, a)}
    rm(src)
    rm(pds)
    return res


def _queue_sender(q, batch, n: int) -> None:
    for _ in range(n + 1):
        q.put(batch)
    q.put(None)


def queue_us_per_batch(batch, n: int = 300) -> float:
    """One forked process putting ``batch`` on a multiprocessing Queue (what a DataLoader
    worker does with each batch) and this one getting it: microseconds per batch."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_queue_sender, args=(q, batch, n))
    p.start()
    q.get()  # the first one waits for the start
    t = time.perf_counter()
    k = 0
    while q.get() is not None:
        k += 1
    dt = time.perf_counter() - t
    p.join()
    return dt / k * 1e6


def dl_breakdown(pds: str, paths: list[str], a) -> dict:
    """Warm, microseconds per batch of 64: what a worker does to fetch it, what moving it to
    the main process costs (ForkingPickler dumps + loads, as the worker's queue does), and
    DataLoader epochs with persistent workers, second epoch (0 and 2 workers, and 2 workers
    over an empty dataset: the DataLoader's own overhead per batch), and the time to the first
    batch of a fresh DataLoader (the worker start every default epoch pays)."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import packds.torch as pt

    ds_p, ds_l = pt.PackedDataset(pds), PathsDS(paths)
    n, rng = len(ds_p), random.Random(a.seed)
    batches = [rng.sample(range(n), 64) for _ in range(min(200, n // 64))]

    def per_batch(fn) -> float:
        fn(batches[0])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for b in batches:
                fn(b)
            best = min(best, time.perf_counter() - t)
        return best / len(batches) * 1e6

    [ds_l[i] for i in range(n)]  # warm
    sample = ds_p.__getitems__(batches[0])
    out = {
        "fetch packds __getitems__": per_batch(ds_p.__getitems__),
        "fetch paths [ds[i] for i]": per_batch(lambda b: [ds_l[i] for i in b]),
        "pickle dumps + loads of a batch": per_batch(lambda b: pickle.loads(ForkingPickler.dumps(sample))),
        "a batch through a multiprocessing Queue, 1 sender": min(queue_us_per_batch(sample) for _ in range(3)),
        "an empty batch through the Queue": min(queue_us_per_batch([b""] * 64) for _ in range(3)),
    }
    for name, make, w in (("DataLoader 0 workers, packds", lambda: ds_p, 0),
                          ("DataLoader 0 workers, paths", lambda: ds_l, 0),
                          ("DataLoader 2 workers, packds", lambda: ds_p, 2),
                          ("DataLoader 2 workers, paths", lambda: ds_l, 2),
                          ("DataLoader 2 workers, empty samples", lambda: NullDS(n), 2)):
        best, first = float("inf"), float("inf")
        for s in range(3):
            t = time.perf_counter()
            dl = bench_torch.loader(make(), w, persistent=True, seed=s)
            it = iter(dl)
            next(it)  # starts the workers
            first = min(first, time.perf_counter() - t)
            for _ in it:
                pass
            t = time.perf_counter()  # second epoch: workers running, steady state
            k = sum(1 for _ in dl)
            best = min(best, time.perf_counter() - t)
            del dl, it
            gc.collect()
        out[name] = best / k * 1e6
        if w:
            out[name.replace("DataLoader", "first batch of an epoch (worker start),")] = first * 1e6
    say("  5 breakdown (µs per batch of 64, warm): " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()))
    return {"us_per_batch": out, "batch": 64, "bytes_per_sample": a.dl_size}


# ---------------------------------------------------------------------------------------------
# 6. HDF5 pack

H5CHILD = r"""
import json, sys, time, packds
src, out, fmt = sys.argv[1:4]
t = time.perf_counter()
packds.pack(src, out, format=fmt, force=True)
dt = time.perf_counter() - t
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"pack_seconds": dt, "wchar": int(io["wchar"]), "write_bytes": int(io["write_bytes"])}))
"""


def row_h5(a, shm: str) -> dict:
    src = os.path.join(shm, "h5-tree")
    os.makedirs(src)
    tree = bpr.make_tree(src, a.h5_files, 1 << 20, a.seed, dirs=10)
    fmts = ["tar", "h5"]
    t = {f: [] for f in fmts}
    wchar = {f: [] for f in fmts}
    for r in range(a.rounds + 1):
        for f in rotate(fmts, r):
            out = os.path.join(shm, f"h5test-{f}.pds")
            rm(out)
            dt, o = timed([[PY, "-c", H5CHILD, src, out, f]], capture=True)
            rm(out)
            t[f].append(dt)
            wchar[f].append(json.loads(o.strip().splitlines()[-1])["wchar"])
            say(f"  6 pack --format {f} round {r + 1}: {dt:6.3f} s, wchar {wchar[f][-1] / tree['bytes']:.3f}× the data")
    rm(src)
    rounds = range(a.rounds + 1)
    return {
        "files": tree["files"], "bytes": tree["bytes"], "seconds": t, "wchar": wchar,
        "ratios": {
            "h5: bytes written ÷ data bytes": summary([w / tree["bytes"] for w in wchar["h5"]]),
            "tar format: bytes written ÷ data bytes": summary([w / tree["bytes"] for w in wchar["tar"]]),
            "h5 pack time ÷ tar-format pack time": summary([t["h5"][i] / t["tar"][i] for i in rounds]),
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def render(res: dict) -> str:
    m, a = res["machine"], res["args"]
    loads = [x for row in res["load"].values() for x in row["before"] + row["after"]]
    L = [
        f"`{m['command']}` — {m['date']}, commit {m['commit']}{' (src/python modified)' if m['worktree_dirty_src'] else ''}, "
        f"packds {m['packds']}, {m['nproc']} CPUs, kernel {m['kernel']}, Python {m['python']}; "
        f"load average (1/5/15 min) before {'/'.join(map(str, res['load_start']))}, after {'/'.join(map(str, res['load_end']))}, "
        f"1-min load over the run {min(loads):.2f}–{max(loads):.2f}" if loads else "",
        "",
        "| row | packds ÷ peer | median [min–max] | how |",
        "|---|---|---|---|",
    ]
    R = res["rows"]

    def row(num, what, s, how):
        L.append(f"| {num} | {what} | {mmx(s)} | {how} |")

    if "1" in R:
        x = R["1"]
        pol = ", ".join(sorted(set(v for v in x["policy"].values() if v))) or "?"
        cold = "cold cache (sync + drop_caches before each copy)" if x["cold"] else "WARM (drop_caches needs root)"
        how = f"{x['bytes'] / 1e9:.2f} GB in {x['shards']} shards, local disk → local disk, {cold}, policy {pol}, {len(x['seconds']['stage'])} rounds"
        row("1", "`packds stage` into `$SLURM_TMPDIR` ÷ `cp -r`", x["ratios"]["stage into $SLURM_TMPDIR vs cp -r"], how)
        row("1", "`packds stage --to DIR` ÷ `cp -r && sync`", x["ratios"]["stage --to DIR vs cp -r && sync"], "same; stage fsyncs every file")
    if "2" in R:
        x = R["2"]
        if x.get("status") != "ok":
            L.append(f"| 2 | pack on slowfs | {x.get('status')} | |")
        else:
            how = f"{x['files']:,} files ({x['bytes'] / 1e6:.0f} MB) in {x['dirs']} dirs, slowfs defaults, fresh mount per run, {len(x['seconds']['tar -cf'])} rounds"
            row("2", "`packds pack` on slowfs ÷ Python 64-thread walk + 64-thread read", x["ratios"]["vs Python 64-thread walk + 64-thread read"], how)
            row("2", "`packds pack` on slowfs ÷ `tar -cf`", x["ratios"]["vs tar -cf"], "same")
    if "3" in R:
        x = R["3"]
        n = len(next(iter(x["exit_seconds"].values())))
        how = f"{x['files']:,} files × 8 KiB ({x['bytes'] / 1e6:.0f} MB) on tmpfs, warm, whole process, {n} rounds"
        row("3", "`packds pack` ÷ `tar -cf`, tmpfs → tmpfs, exit time", x["ratios"]["tmpfs → tmpfs, exit"], how)
        row("3", "same, counting a `sync` after each", x["ratios"]["tmpfs → tmpfs, exit + sync"], "`sync` before each run untimed, after it timed")
        row("3", "`packds pack` ÷ `tar -cf`, tmpfs → local disk, exit + `sync`", x["ratios"]["tmpfs → disk, exit + sync"],
            f"exit time alone: {mmx(x['ratios']['tmpfs → disk, exit'])} (packds fsyncs, tar leaves it to the kernel)")
    if "4" in R:
        for size, x in R["4"].items():
            g = x["gb_per_s"]
            how = (f"{x['samples']:,} samples on tmpfs, 5 × 256 random, best of 3, {len(x['seconds']['get_batch()'])} rounds; "
                   f"{g['get_batch(out=reused)']:.1f} vs {g['[ds[i] for i in idx]']:.1f} GB/s")
            kb = int(size) // 1000
            row("4", f"`get_batch(256, out=reused)` ÷ `[ds[i] for i in idx]`, {kb} KB samples", x["ratios"]["get_batch(out=reused) vs loop"], how)
            row("4", f"`get_batch(256)` (fresh buffer) ÷ the loop, {kb} KB samples", x["ratios"]["get_batch() vs loop"], f"{g['get_batch()']:.1f} GB/s")
    if "5" in R:
        x = R["5"]
        n = len(next(iter(x["samples_per_s"].values())))
        how = (f"{x['files']:,} files × {a['dl_size'] // 1024} KiB on the local disk, 2 workers (fork, started per epoch), batch 64, "
               f"shuffled, list collate, {n} rounds")
        row("5", "DataLoader `PackedDataset` ÷ list-of-paths Dataset, warm", x["ratios"]["warm"], how)
        row("5", "same, cold page cache", x["ratios"]["cold"], "drop_caches before each cold epoch")
    if "6" in R:
        x = R["6"]
        how = f"{x['files']} × 1 MiB on tmpfs, `packds.pack` in a child process, {len(x['seconds']['h5'])} rounds"
        row("6", "`--format h5`: bytes written ÷ data bytes (lower is better)", x["ratios"]["h5: bytes written ÷ data bytes"],
            f"wchar of the packing process; tar format: {mmx(x['ratios']['tar format: bytes written ÷ data bytes'])}")
        row("6", "`--format h5` pack time ÷ tar-format pack time (< 1 = h5 faster)", x["ratios"]["h5 pack time ÷ tar-format pack time"], how)
    L += ["", "1-min load average before → after each row: "
          + "; ".join(f"{k}: {v['before'][0]:.1f} → {v['after'][0]:.1f}" for k, v in res["load"].items())
          + "; busiest processes at the start (ps %CPU): " + ", ".join(" ".join(p.split()[::-1]) + " %" for p in m.get("busiest", [])[:3])]
    if "5" in R:
        b = R["5"]["breakdown"]["us_per_batch"]
        L += ["", "DataLoader breakdown, warm, µs per batch of 64 (best of 3): "
              + "; ".join(f"{k} {v:,.0f}" for k, v in b.items())]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke run of a minute or two")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="rows to run (default all)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of rows 2, 5 and 6 (6 runs one more)")
    ap.add_argument("--stage-gb", type=float, default=1.0)
    ap.add_argument("--stage-rounds", type=int, default=5)
    ap.add_argument("--slowfs-files", type=int, default=2000)
    ap.add_argument("--local-files", type=int, default=30_000)
    ap.add_argument("--local-rounds", type=int, default=7)
    ap.add_argument("--gb-samples", type=int, default=1500, help="samples per get_batch dataset")
    ap.add_argument("--gb-rounds", type=int, default=7)
    ap.add_argument("--dl-files", type=int, default=50_000)
    ap.add_argument("--dl-size", type=int, default=8192)
    ap.add_argument("--h5-files", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shm", default="/dev/shm", help="tmpfs for the warm rows")
    ap.add_argument("--disk", default="/var/tmp", help="a local disk for the cold rows and the disk side of row 3")
    ap.add_argument("--keep", action="store_true", help="keep the row-1 dataset (under --disk) for the next run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tar", default="tar")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.stage_rounds, a.local_rounds, a.gb_rounds = 2, 2, 2, 2
        a.stage_gb, a.slowfs_files, a.local_files, a.gb_samples, a.dl_files, a.h5_files = 0.25, 300, 3000, 300, 3000, 80
    only = set(a.only.split(","))
    if shutil.which("tar") is None or shutil.which("cp") is None:
        raise SystemExit("bench_wait: tar and cp are needed")
    t_start = time.perf_counter()
    res = {"machine": bpr.machine_info(a, [os.path.relpath(__file__, os.getcwd())] + argv), "args": vars(a),
           "load_start": load(), "load": {}, "rows": {}}
    res["machine"]["command"] = shlex.join(["python", os.path.relpath(__file__, os.getcwd())] + argv)  # no machine path
    res["machine"]["kernel_full"] = platform.version()
    res["machine"]["busiest"] = bpr.sh(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"]).splitlines()[:5]
    shm = tempfile.mkdtemp(prefix="packds-wait-", dir=a.shm)
    disk_root = os.path.join(a.disk, "packds-bench-wait")  # kept with --keep: the 1 GB dataset
    os.makedirs(disk_root, exist_ok=True)
    disk = tempfile.mkdtemp(prefix="run-", dir=disk_root)
    rows = {
        "1": lambda: row_stage(a, disk_root),
        "2": lambda: row_slowfs(a, shm),
        "3": lambda: row_local_pack(a, shm, disk),
        "4": lambda: row_get_batch(a, shm),
        "5": lambda: row_dataloader(a, disk),
        "6": lambda: row_h5(a, shm),
    }
    try:
        for k, fn in rows.items():
            if k not in only:
                continue
            before, t = load(), time.perf_counter()
            say(f"bench_wait: row {k} (load {before})")
            res["rows"][k] = fn()
            res["load"][k] = {"before": before[:1], "after": load()[:1], "seconds": time.perf_counter() - t}
    finally:
        rm(shm)
        rm(disk)
        if not a.keep:
            rm(disk_root)
    res["load_end"] = load()
    res["seconds"] = time.perf_counter() - t_start
    path = a.json or os.path.join(HERE, "out", time.strftime("bench_wait-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:  # before rendering, so that a rendering error loses nothing
        json.dump(res, f, indent=1, default=str)
    md = render(res)
    print(md)
    with open(path, "w") as f:
        json.dump({**res, "markdown": md}, f, indent=1, default=str)
    say(f"bench_wait: {res['seconds']:.0f} s; JSON in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
