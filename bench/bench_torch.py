#!/usr/bin/env python3
"""packds.torch inside a torch DataLoader, against an ImageFolder-like loose-file dataset and
h5py, in one run; ratios, never a lone absolute time.

    python bench/bench_torch.py [--files 20000] [--rounds 3] [--slowfs-files 3000]
                                [--mem-samples 1000000] [--skip slowfs,pattern,mem] [--json OUT]

Sections:
  warm     samples/s through a DataLoader (batch 64, list collate, shuffled), 0 and 2 workers:
           packds PackedDataset (map-style, __getitems__ → get_many; and as_tensor=True:
           get_batch, samples as uint8 views of one buffer) and StreamingDataset vs
           loose files (ImageFolder-like: a list of (path, class) tuples, open+read per sample)
           vs h5py (one file, a vlen uint8 dataset plus a label array, opened per worker).
           Data on tmpfs, warm; persistent workers; one untimed epoch, then one timed epoch per
           round; rounds interleaved, order rotated.
  slowfs   the same behind slowfs (Lustre-like latency: ../shared/tools/slowfs.c, defaults),
           one cold epoch per method on a fresh mount each.
  pattern  what the filesystem sees: slowfs run under strace, every pread64 the daemon issues
           on behalf of each method (count, mean size, bytes vs sample bytes) and its metadata
           calls, 0 workers.
  mem      8 forked workers, one epoch over >= 1M tiny samples: summed USS / private-dirty /
           PSS growth of the workers (from after the first batch to the end of the epoch),
           packds PackedDataset and StreamingDataset vs a list-of-paths dataset over the same
           files.
Markdown on stdout, JSON in --json. Nothing is asserted; exit status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_pack_read as bpr  # noqa: E402

say, median = bpr.say, bpr.median
SLOWFS_C = os.path.join(REPO, "..", "shared", "tools", "slowfs.c")


# ---------------------------------------------------------------------------------------------
# datasets (module level: picklable for workers)


def collate_list(batch):
    return batch


class LooseFiles:
    """What torchvision's ImageFolder does, minus image decoding: ``samples`` is a list of
    (path, class index) tuples; each item opens and reads one file."""

    def __init__(self, root: str):
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            d = os.path.join(root, c)
            for name in sorted(os.listdir(d)):
                self.samples.append((os.path.join(d, name), self.class_to_idx[c]))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        with open(path, "rb") as f:
            return f.read(), y


class H5Vlen:
    """One HDF5 file as a typical user writes it: ``data`` (vlen uint8, one row per sample) and
    ``label`` (int64). Opened lazily in each worker (h5py handles do not survive fork)."""

    def __init__(self, path: str):
        import h5py

        self.path, self.f = path, None
        with h5py.File(path, "r") as f:
            self.labels = f["label"][:]
            self.n = len(self.labels)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.f is None:
            import h5py

            self.f = h5py.File(self.path, "r")["data"]
        return self.f[i].tobytes(), int(self.labels[i])

    def __getstate__(self):
        return {**self.__dict__, "f": None}


def write_h5(tree_root: str, out: str) -> None:
    import h5py
    import numpy as np

    ds = LooseFiles(tree_root)
    with h5py.File(out, "w") as f:
        data = f.create_dataset("data", (len(ds),), dtype=h5py.vlen_dtype(np.uint8))
        step = 1024
        for a in range(0, len(ds), step):
            rows = np.empty(min(step, len(ds) - a), dtype=object)
            for j in range(len(rows)):
                with open(ds.samples[a + j][0], "rb") as g:
                    rows[j] = np.frombuffer(g.read(), dtype=np.uint8)
            data[a : a + len(rows)] = rows
        f.create_dataset("label", data=np.array([y for _, y in ds.samples], dtype=np.int64))


def make_tree(root: str, files: int, classes: int, median_size: int, sigma: float, seed: int) -> dict:
    """``classes`` class directories of log-normal sized random files (ImageNet-like)."""
    rng = random.Random(seed)
    blob = os.urandom(64 << 20)
    total = 0
    names = [f"n{rng.randrange(10**7, 10**8):08d}" for _ in range(classes)]
    for d in names:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(files):
        size = max(1, min(len(blob) // 2, int(rng.lognormvariate(math.log(median_size), sigma))))
        off = rng.randrange(len(blob) - size)
        d = names[i % classes]
        with open(os.path.join(root, d, f"{d}_{i:07d}.JPEG"), "wb") as f:
            f.write(blob[off : off + size])
        total += size
    return {"files": files, "bytes": total, "classes": classes}


def build_methods(root: str, pds: str, h5: str | None, block_size: int) -> dict:
    import packds.torch as pt

    m = {
        "packds map-style": lambda: pt.PackedDataset(pds, target="parent"),
        "packds map-style, as_tensor + collate_packed": lambda: pt.PackedDataset(pds, target="parent", as_tensor=True),
        "packds streaming": lambda: pt.StreamingDataset(pds, seed=0, target="parent", block_size=block_size),
        "loose files (ImageFolder-like)": lambda: LooseFiles(root),
    }
    if h5:
        m["h5py (vlen)"] = lambda: H5Vlen(h5)
    return m


def loader(ds, workers: int, persistent: bool, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    import packds.torch as pt

    collate = pt.collate_packed if getattr(ds, "as_tensor", False) else collate_list
    kw = dict(batch_size=64, num_workers=workers, collate_fn=collate, persistent_workers=persistent and workers > 0)
    if workers:
        kw["multiprocessing_context"] = "fork"
    if not isinstance(ds, IterableDataset):
        kw.update(shuffle=True, generator=torch.Generator().manual_seed(seed))
    return DataLoader(ds, **kw)


def epoch(dl, ds, e: int) -> int:
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(e)
    return sum(len(b) for b in dl)


# ---------------------------------------------------------------------------------------------
# warm throughput


def bench_warm(root, pds, h5, args) -> dict:
    methods = build_methods(root, pds, h5, args.block_size)
    res = {f"{k}|{w}": [] for k in methods for w in (0, 2)}
    keys = list(res)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            name, w = key.rsplit("|", 1)
            ds = methods[name]()
            dl = loader(ds, int(w), persistent=True, seed=r)
            n0 = epoch(dl, ds, 0)  # untimed: warms the page cache and starts the workers
            gc.collect()
            t = time.perf_counter()
            n = epoch(dl, ds, 1)
            dt = time.perf_counter() - t
            assert n == n0 == len(ds), (name, n, n0)
            res[key].append(n / dt)
            say(f"  warm round {r + 1}: {name:<32} {w} workers {n / dt:10,.0f} samples/s")
            del dl, ds
    return res


# ---------------------------------------------------------------------------------------------
# slowfs


def build_slowfs(work: str) -> tuple[str | None, str]:
    """slowfs with direct_io off (a copy of the source, one line changed): packds maps its
    index and shards, and the kernel refuses shared mmap of a direct_io FUSE file (ENODEV)
    unless the server opts in, which Debian's libfuse 3.14 cannot. Real Lustre/GPFS allow
    mmap. With direct_io off the kernel page cache works as on a real client, so every method
    runs on a fresh mount (cold)."""
    if not os.path.exists(SLOWFS_C):
        return None, f"not run ({SLOWFS_C} missing)"
    if shutil.which("pkg-config") is None or subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return None, "not run (apt-get install -y fuse3 libfuse3-dev pkg-config)"
    with open(SLOWFS_C) as f:
        code = f.read()
    if "cfg->direct_io = 1;" not in code:
        return None, "not run (slowfs.c changed: no direct_io line)"
    src = os.path.join(work, "slowfs.c")
    with open(src, "w") as f:
        f.write(code.replace("cfg->direct_io = 1;", "cfg->direct_io = 0;"))
    exe = os.path.join(work, "slowfs")
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True).stdout.split()
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", exe, src] + flags, capture_output=True, text=True)
    if r.returncode:
        return None, f"not run (slowfs build failed: {r.stderr[-300:]})"
    return exe, "ok"


class Mount:
    def __init__(self, exe, src, mnt, strace_log=None):
        self.exe, self.src, self.mnt, self.log, self.tracer = exe, src, mnt, strace_log, None

    def __enter__(self):
        cmd = [self.exe, self.src, self.mnt]
        if self.log:
            cmd = ["strace", "-f", "-qq", "-e", "trace=pread64,openat,newfstatat,lstat,statx", "-o", self.log] + cmd
            self.tracer = subprocess.Popen(cmd)
            for _ in range(200):
                if os.path.ismount(self.mnt):
                    break
                time.sleep(0.05)
        else:
            subprocess.run(cmd, check=True)
        if not os.path.ismount(self.mnt):
            raise RuntimeError("slowfs did not mount")
        return self

    def __exit__(self, *exc):
        for _ in range(50):
            if subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        if self.tracer:
            self.tracer.wait(timeout=60)


def mounted_paths(mnt: str) -> tuple[str, str, str]:
    return os.path.join(mnt, "tree"), os.path.join(mnt, "ds.pds"), os.path.join(mnt, "data.h5")


def bench_slowfs(exe, src, mnt, args) -> dict:
    root, pds, h5 = mounted_paths(mnt)
    names = list(build_methods(root, pds, h5, args.block_size))
    res = {f"{k}|{w}": [] for k in names for w in (0, 2)}
    for r in range(args.slowfs_rounds):
        keys = list(res)
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            name, w = key.rsplit("|", 1)
            with Mount(exe, src, mnt):
                t = time.perf_counter()  # from construction: listing / index open count too
                ds = build_methods(root, pds, h5, args.block_size)[name]()
                n = epoch(loader(ds, int(w), persistent=False, seed=r), ds, 0)
                dt = time.perf_counter() - t
                del ds
                gc.collect()
            res[key].append(n / dt)
            say(f"  slowfs round {r + 1}: {name:<32} {w} workers {n / dt:10,.0f} samples/s (cold, fresh mount)")
    return res


def parse_strace(log: str) -> dict:
    """Counts from an ``strace -f`` log; a call interrupted by another thread's shows up as an
    ``<unfinished ...>`` line and a ``<... NAME resumed>`` line carrying the result."""
    reads = nbytes = meta = 0
    sizes = []
    with open(log, errors="replace") as f:
        for line in f:
            if "unfinished ..." in line or " = " not in line:
                continue
            if "pread64" in line:
                try:
                    got = int(line.rsplit(" = ", 1)[1].split()[0])
                except (ValueError, IndexError):
                    continue
                if got > 0:
                    reads += 1
                    nbytes += got
                    sizes.append(got)
            elif any(c in line for c in ("openat", "newfstatat", "lstat", "statx")):
                meta += 1
    sizes.sort()
    return {"reads": reads, "bytes": nbytes, "meta": meta, "p50_read": sizes[len(sizes) // 2] if sizes else 0}


def bench_pattern(exe, src, mnt, work, sample_bytes: int, args) -> dict:
    """Daemon side (strace on slowfs) and application side (this process's read syscalls and
    major page faults) of one cold epoch per method, 0 workers. The extra row reads a random
    5 % of the samples map-style: random access on a dataset much larger than what is read."""
    import resource

    import psutil
    from torch.utils.data import Subset

    root, pds, h5 = mounted_paths(mnt)
    out = {}
    names = list(build_methods(root, pds, h5, args.block_size)) + ["packds map-style, random 5 %"]
    me = psutil.Process()
    for name in names:
        log = os.path.join(work, "strace.log")
        with Mount(exe, src, mnt, strace_log=log):
            ds = build_methods(root, pds, h5, args.block_size)[name.split(",")[0]]()
            if name.endswith("5 %"):
                idx = random.Random(args.seed).sample(range(len(ds)), max(1, len(ds) // 20))
                ds = Subset(ds, idx)
            io0, f0 = me.io_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            n = epoch(loader(ds, 0, persistent=False), ds, 0)
            io1, f1 = me.io_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            del ds
            gc.collect()
        p = parse_strace(log)
        os.unlink(log)
        p.update(samples=n, sample_bytes=sample_bytes * n // args.slowfs_files, app_reads=io1.read_count - io0.read_count,
                 app_bytes=io1.read_chars - io0.read_chars, app_majflt=f1 - f0)
        out[name] = p
        say(f"  pattern: {name:<32} {p['reads']:8,} reads, mean {p['bytes'] / max(1, p['reads']) / 1024:8.1f} KiB, "
            f"{p['meta']:7,} metadata calls for {n:,} samples; app: {p['app_reads']:,} read calls, "
            f"{p['app_bytes'] / max(1, p['app_reads']) / 1024:,.1f} KiB mean, {p['app_majflt']:,} major faults")
    return out


# ---------------------------------------------------------------------------------------------
# memory


def smaps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


class PathList:
    """The usual hand-written dataset: a Python list of 1M path strings and a list of labels."""

    def __init__(self, root: str, keys: list[str], classes: dict):
        self.paths = [os.path.join(root, k) for k in keys]
        self.labels = [classes[k.split("/", 1)[0]] for k in keys]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read(), self.labels[i]


def mem_child(kind: str, root: str, pds: str, workers: int) -> dict:
    """Runs in a fresh process: one epoch with ``workers`` forked workers; the workers' memory
    after the first batch and after the last."""
    import packds
    import packds.torch as pt

    if kind == "packds map-style":
        ds = pt.PackedDataset(pds, target="parent")
    elif kind == "packds streaming":
        ds = pt.StreamingDataset(pds, seed=0, target="parent")
    else:
        p = pt.PackedDataset(pds, target="parent")
        keys = list(packds.open(pds).keys())  # the same files, in the same order
        ds = PathList(root, keys, p.class_to_idx)
        del p
    gc.collect()
    dl = loader(ds, workers, persistent=True)
    it = iter(dl)
    n = len(next(it))
    pids = [w.pid for w in it._workers]
    time.sleep(0.5)
    before = {pid: smaps(pid) for pid in pids}
    fields = ("USS", "Private_Dirty", "Private_Clean", "Pss", "Rss", "Pss_Anon", "Pss_File")
    peak = {k: 0 for k in fields}  # the largest summed growth seen while the epoch runs
    t = time.perf_counter()
    for j, b in enumerate(it):
        n += len(b)
        if j % 200 == 199:
            now = {pid: smaps(pid) for pid in pids}
            for k in fields:
                peak[k] = max(peak[k], sum(now[p].get(k, 0) - before[p].get(k, 0) for p in pids))
    dt = time.perf_counter() - t
    after = {pid: smaps(pid) for pid in pids}
    grow = {k: sum(after[p].get(k, 0) - before[p].get(k, 0) for p in pids) for k in fields}
    peak = {k: max(peak[k], grow[k]) for k in fields}
    total_after = {k: sum(after[p].get(k, 0) for p in pids) for k in fields}
    del it, dl
    return {"kind": kind, "samples": n, "workers": len(pids), "growth": grow, "peak": peak, "after": total_after, "seconds": dt}


def bench_mem(args, work: str, keep: bool) -> dict:
    """The 1M-file tree and its pack live in ``work``; with ``keep`` (an explicit --mem-root)
    they are reused when already there and left in place (removing a million files takes
    minutes)."""
    import packds

    root = os.path.join(work, "mem-tree")
    pds = os.path.join(work, "mem.pds")
    n, classes = args.mem_samples, 1000
    ready = os.path.join(work, f"mem-ready-{n}")
    if not (keep and os.path.exists(ready)):
        bpr.rm(root)
        bpr.rm(pds)
        t = time.perf_counter()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        for c in range(classes):
            os.makedirs(os.path.join(root, f"c{c:04d}"), exist_ok=True)
        for i in range(n):
            fd = os.open(f"{root}/c{i % classes:04d}/{i:07d}.bin", flags, 0o644)
            os.write(fd, b"%07d" % i)
            os.close(fd)
        say(f"  mem: {n:,} files in {time.perf_counter() - t:.0f} s")
        s = packds.pack(root, pds, shard_size=256 << 20)
        say(f"  mem: packed into {s['shards']} shards")
        open(ready, "w").close()
    out = {"samples": n, "classes": classes, "tree_on": bpr.fs_type(os.path.abspath(root)), "runs": {}}
    for kind in ("packds map-style", "packds streaming", "list of paths"):
        r = subprocess.run([sys.executable, __file__, "--mem-child", kind, "--mem-root", work],
                           capture_output=True, text=True)
        if r.returncode:
            out["runs"][kind] = {"status": "failed: " + r.stderr[-500:]}
            say(f"  mem: {kind} failed: {r.stderr[-500:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out["runs"][kind] = res
        g = res["growth"]
        say(f"  mem: {kind:<20} {res['workers']} workers, {res['samples']:,} samples: growth USS {g['USS'] / 2**20:8.1f} MiB, "
            f"private dirty {g['Private_Dirty'] / 2**20:8.1f} MiB, PSS {g['Pss'] / 2**20:8.1f} MiB")
    return out


# ---------------------------------------------------------------------------------------------
# report


def render(res: dict) -> str:
    m = res["machine"]
    L = [f"# packds.torch in a DataLoader — {m['date']}, commit {m['commit']}", "",
         f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_total_gib']} GiB, kernel {m['kernel']}, Python {m['python']}, "
         f"packds {m['packds']}, torch {res['torch']}, h5py {res.get('h5py', '—')}",
         f"- command: `{m['command']}`"]
    t = res.get("tree") or {"files": 0, "bytes": 0, "classes": 0}
    L.append(f"- tree: {t['files']:,} files, {t['bytes'] / 1e6:,.0f} MB, {t['classes']} class dirs (log-normal sizes, median "
             f"{res['args']['median_size']} B, sigma {res['args']['sigma']}) on {res['work_fs']}; batch 64, list collate, "
             f"labels from the class directory; streaming block {res['args']['block_size'] >> 20} MiB, shuffle buffer 4096")

    def tput(sec: dict, title: str, note: str) -> None:
        L.extend(["", f"## {title}", "", note, ""])
        ref = {w: median(sec[f"loose files (ImageFolder-like)|{w}"]) for w in (0, 2)}
        h5 = {w: median(sec.get(f"h5py (vlen)|{w}", [])) for w in (0, 2)}
        rows = []
        for key, xs in sec.items():
            name, w = key.rsplit("|", 1)
            v = median(xs)
            rows.append([name, w, f"{v:,.0f}", f"**{v / ref[int(w)]:,.2f}×**", f"**{v / h5[int(w)]:,.2f}×**" if h5[int(w)] == h5[int(w)] else "—"])
        L.append(bpr.table(["dataset", "workers", "samples/s (median)", "÷ loose files", "÷ h5py"], rows))

    if "warm" in res:
        tput(res["warm"], "Warm local copy (tmpfs)", f"{res['args']['rounds']} interleaved rounds; persistent workers; "
             "the second epoch of each round is timed (the first warms the page cache and starts the workers).")
    if isinstance(res.get("slowfs"), dict):
        s = res["slowfs_tree"]
        tput(res["slowfs"], "Behind slowfs (Lustre-like latency, cold)",
             f"{s['files']:,} files, {s['bytes'] / 1e6:,.0f} MB; slowfs defaults (300 µs per metadata call, 100 µs per "
             f"read) with direct_io off (see docs/TORCH.md); a fresh mount per run, so every epoch is cold; timed from "
             f"building the dataset (listing / opening) to the end of one epoch; {res['args']['slowfs_rounds']} round(s).")
    elif "slowfs" in res:
        L += ["", f"## Behind slowfs: {res['slowfs']}"]
    if isinstance(res.get("pattern"), dict):
        L += ["", "## Read pattern: what the filesystem sees (slowfs under strace, cold, 0 workers)", "",
              "Filesystem side: every data read the FUSE daemon issues (pread64 on the backing files; the kernel caps one "
              "FUSE read at 128 KiB and adds its readahead) and its metadata calls (open/stat). Application side: read "
              "syscalls of the training process (io_counters) and major page faults (packds map-style reads through "
              "mmap: a fault per cold page, which the kernel widens to a 128 KiB read-around). "
              "reads/s = FUSE reads per sample × the 0-worker slowfs samples/s above.", ""]
        rows = []
        for name, p in res["pattern"].items():
            base = name.split(",")[0]
            sps = median(res["slowfs"].get(f"{base}|0", [])) if isinstance(res.get("slowfs"), dict) and "," not in name else float("nan")
            rps = p["reads"] / max(1, p["samples"])
            rows.append([name, f"{p['samples']:,}", f"{p['reads']:,}", f"{rps:,.3f}", f"{p['bytes'] / max(1, p['reads']) / 1024:,.1f}",
                         f"{p['bytes'] / max(1, p['sample_bytes']):,.2f}", f"{p['meta'] / max(1, p['samples']):,.2f}",
                         f"{rps * sps:,.0f}" if sps == sps else "—",
                         f"{p.get('app_reads', 0) / max(1, p['samples']):,.3f}", f"{p.get('app_bytes', 0) / max(1, p.get('app_reads', 0)) / 1024:,.1f}",
                         f"{p.get('app_majflt', 0) / max(1, p['samples']):,.3f}"])
        L.append(bpr.table(["dataset", "samples", "FUSE reads", "reads/sample", "mean read KiB", "bytes read ÷ sample bytes",
                            "metadata calls/sample", "reads/s", "app read calls/sample", "app mean read KiB", "app major faults/sample"], rows))
    elif "pattern" in res:
        L += ["", f"## Read pattern: {res['pattern']}"]
    if "mem" in res:
        mm = res["mem"]
        L += ["", f"## Memory: 8 forked workers, one epoch over {mm['samples']:,} samples ({mm['classes']} classes, tree on {mm['tree_on']})", "",
              "Summed over the 8 workers, growth from after the first batch to the end of the epoch (MiB); peak = the "
              "largest summed growth seen while the epoch ran (sampled every 200 batches). "
              "USS = private clean + private dirty; private dirty = pages the worker wrote or copied (copy-on-write of "
              "inherited Python objects lands here); private clean includes shard pages that only this worker has mapped "
              "(page cache, dropped under pressure).", ""]
        rows = []
        for kind, r in mm["runs"].items():
            if "growth" not in r:
                rows.append([kind, r.get("status", "?"), "", "", "", ""])
                continue
            g, a = r["growth"], r["after"]
            pk = r.get("peak", g)
            rows.append([kind, f"{g['USS'] / 2**20:,.1f}", f"{pk['USS'] / 2**20:,.1f}", f"{g['Private_Dirty'] / 2**20:,.1f}",
                         f"{pk['Private_Dirty'] / 2**20:,.1f}", f"{g['Pss'] / 2**20:,.1f}", f"{g.get('Pss_Anon', 0) / 2**20:,.1f}",
                         f"{a['USS'] / 2**20:,.1f}", f"{r['samples'] / r['seconds']:,.0f}"])
        L.append(bpr.table(["dataset", "USS growth", "USS peak growth", "private dirty growth", "private dirty peak growth",
                            "PSS growth", "PSS anon growth", "USS after (sum)", "samples/s"], rows))
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--median-size", type=int, default=8192)
    ap.add_argument("--sigma", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=4 << 20)
    ap.add_argument("--slowfs-files", type=int, default=3000)
    ap.add_argument("--slowfs-rounds", type=int, default=1)
    ap.add_argument("--mem-samples", type=int, default=1_000_000)
    ap.add_argument("--mem-root", default=None, help="keep the memory section's tree and pack here, reused by later runs "
                    "(default: a temp dir on disk, removed at the end)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: warm,slowfs,pattern,mem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        r = mem_child(args.mem_child, os.path.join(args.mem_root, "mem-tree"), os.path.join(args.mem_root, "mem.pds"), 8)
        print(json.dumps(r))
        return 0
    import torch

    import packds

    skip = set(filter(None, args.skip.split(",")))
    args.tar = "tar"
    res: dict = {"machine": bpr.machine_info(args, sys.argv if argv is None else argv), "torch": torch.__version__, "args": vars(args)}
    try:
        import h5py

        res["h5py"] = h5py.__version__
    except ImportError:
        h5py = None
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix="packds-bench-torch-", dir=base)
    res["work_fs"] = bpr.fs_type(work)
    try:
        if not {"warm", "slowfs", "pattern"} <= skip:
            src = os.path.join(work, "src")
            root, pds, h5 = os.path.join(src, "tree"), os.path.join(src, "ds.pds"), os.path.join(src, "data.h5")
            if "warm" not in skip:
                say(f"tree: {args.files:,} files ...")
                res["tree"] = make_tree(root, args.files, args.classes, args.median_size, args.sigma, args.seed)
                packds.pack(root, pds)
                if h5py:
                    write_h5(root, h5)
                say("warm ...")
                res["warm"] = bench_warm(root, pds, h5 if h5py else None, args)
                for p in (root, pds, h5):
                    bpr.rm(p)
            say(f"slowfs tree: {args.slowfs_files:,} files ...")
            res["slowfs_tree"] = make_tree(root, args.slowfs_files, args.classes, args.median_size, args.sigma, args.seed + 1)
            res.setdefault("tree", res["slowfs_tree"])
            packds.pack(root, pds)
            if h5py:
                write_h5(root, h5)
            exe, why = build_slowfs(work)
            mnt = os.path.join(work, "mnt")
            os.makedirs(mnt)
            if exe is None:
                res["slowfs"] = res["pattern"] = why
            else:
                if "slowfs" not in skip:
                    say("slowfs ...")
                    res["slowfs"] = bench_slowfs(exe, src, mnt, args)
                if "pattern" not in skip:
                    if shutil.which("strace") is None:
                        res["pattern"] = "not run (apt-get install -y strace)"
                    else:
                        say("read pattern ...")
                        res["pattern"] = bench_pattern(exe, src, mnt, work, res["slowfs_tree"]["bytes"], args)
        if "mem" not in skip:
            say("memory ...")
            keep = args.mem_root is not None
            mem_work = args.mem_root if keep else tempfile.mkdtemp(prefix="packds-bench-torch-mem-")
            os.makedirs(mem_work, exist_ok=True)
            try:
                res["mem"] = bench_mem(args, mem_work, keep)
            finally:
                if not keep:
                    say("  mem: removing the tree (a million files: minutes) ...")
                    bpr.rm(mem_work)
    finally:
        bpr.rm(work)
    text = render(res)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
