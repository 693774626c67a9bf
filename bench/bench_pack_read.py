#!/usr/bin/env python3
"""packds benchmark: pack and random-read side by side with GNU tar, tarfile, loose files and
the raw-mmap floor, on one machine in one run. Reports ratios; absolute times are for context.

    python3 bench/bench_pack_read.py                       # default: 100k x 8 KiB files, ~1-3 min
    python3 bench/bench_pack_read.py --scale-files 1000000 # + index scale: open time, RSS/sample

All data (source tree, packds dataset, tar file) lives on tmpfs (/dev/shm by default), so every
figure is a warm-cache figure; in addition each read method re-reads exactly the samples it is
about to time right before timing them (a warm pass), because this machine's DAMON pageout
scheme can unmap pages left untouched for a few seconds. Minor page faults per read are
reported so that a method that did fault during its timing shows it.

Nothing here asserts on timings: this is a measurement, not a test. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import mmap
import os
import platform
import random
import resource
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# --------------------------------------------------------------------------------------------
# small helpers


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sh(cmd: list[str], cwd: str | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q: float):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def fmt(x: float, nd: int = 2) -> str:
    if x is None or x != x:
        return "—"
    return f"{x:,.{nd}f}"


def rss_rollup() -> dict:
    """Resident memory of this process in bytes, from /proc/self/smaps_rollup (falls back to
    VmRSS from /proc/self/status)."""
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                    out[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["Rss"] = int(line.split()[1]) * 1024
    return out


def rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        # rm -rf is much faster than shutil.rmtree on a million files
        if subprocess.run(["rm", "-rf", "--", path]).returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_child(cmd: list[str], capture: bool = False) -> dict:
    """Runs cmd; returns wall seconds (measured here, so it includes process start), peak RSS
    in KiB, exit code and stdout. Peak RSS comes from GNU time's %M when /usr/bin/time exists
    (the child is forked from that small process); otherwise from wait4's rusage, which on
    Linux also counts the RSS of this Python process at (v)fork, so it is only an upper bound."""
    tfile = None
    run = cmd
    if GNU_TIME:
        fd, tfile = tempfile.mkstemp(prefix="packds-bench-time-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        run = [GNU_TIME, "-f", "%M", "-o", tfile] + cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(run, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = p.stdout.read() if capture else b""
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    t1 = time.perf_counter()
    p.returncode = os.waitstatus_to_exitcode(status)
    maxrss, how = ru.ru_maxrss, "wait4 (upper bound)"
    if tfile:
        try:
            with open(tfile) as f:
                maxrss, how = int(f.read().strip().splitlines()[-1]), "GNU time %M"
        except (OSError, ValueError, IndexError):
            pass
        os.unlink(tfile)
    return {"seconds": t1 - t0, "maxrss_kib": maxrss, "rss_from": how, "rc": p.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}


# --------------------------------------------------------------------------------------------
# environment


def machine_info(args, argv: list[str]) -> dict:
    import packds

    so = getattr(packds._core, "__file__", "")
    try:
        so_mtime = _dt.datetime.fromtimestamp(os.stat(so).st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except OSError:
        so_mtime = "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dirty = sh(["git", "status", "--porcelain", "--", "src", "python", "Cargo.toml", "pyproject.toml"], cwd=REPO)
    tar = shutil.which(args.tar)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": sh(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
        "worktree_dirty_src": bool(dirty and dirty != "?"),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "packds": packds.__version__,
        "packds_core": so,
        "packds_core_built": so_mtime,
        "tar": (sh([tar, "--version"]).splitlines() or ["?"])[0] if tar else "not installed",
        "command": shlex.join([sys.executable] + argv),
    }


def fs_type(path: str) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------------------------
# data


def make_tree(root: str, files: int, size: int, seed: int, dirs: int = 100) -> dict:
    """ImageNet-like tree: ``dirs`` class directories ``n0xxxxxxx/`` holding files
    ``n0xxxxxxx_NNNNNN.JPEG`` of exactly ``size`` random (incompressible) bytes each; every file
    is a different slice of a 64 MiB random blob."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    ndirs = max(1, min(dirs, files))
    names = sorted({f"n{rng.randrange(10**7, 10**8):08d}" for _ in range(ndirs * 3)})[:ndirs]
    blob = os.urandom(max(64 << 20, 2 * size))
    span = len(blob) - size
    for d in names:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(files):
        d = names[i % ndirs]
        off = (i * 4093 + rng.randrange(4096)) % (span + 1)
        fd = os.open(f"{root}/{d}/{d}_{i:07d}.JPEG", flags, 0o644)
        try:
            os.write(fd, blob[off : off + size])
        finally:
            os.close(fd)
    return {"files": files, "bytes": files * size, "dirs": ndirs, "seconds": time.perf_counter() - t0}


def make_tiny_tree(root: str, files: int, size: int, per_dir: int = 1000) -> dict:
    """``files`` files of ``size`` bytes, ``per_dir`` per directory (fast to create on tmpfs)."""
    t0 = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    ndirs = -(-files // per_dir)
    for d in range(ndirs):
        dpath = f"{root}/d{d:05d}"
        os.makedirs(dpath, exist_ok=True)
        for j in range(d * per_dir, min(files, (d + 1) * per_dir)):
            body = (f"{j:0{max(1, size - 1)}d}\n".encode() * (1 + size // 8))[:size]
            fd = os.open(f"{dpath}/f{j:07d}.bin", flags, 0o644)
            os.write(fd, body)
            os.close(fd)
    return {"files": files, "bytes": files * size, "dirs": ndirs, "seconds": time.perf_counter() - t0}


def scan_tree(root: str) -> dict:
    n = b = nd = 0
    for dp, _, fs in os.walk(root):
        nd += 1
        for f in fs:
            st = os.lstat(os.path.join(dp, f))
            if stat.S_ISREG(st.st_mode):
                n += 1
                b += st.st_size
    return {"files": n, "bytes": b, "dirs": nd, "seconds": 0.0}


# --------------------------------------------------------------------------------------------
# pack


def packds_cmd(src: str, out: str, threads: int | None) -> list[str]:
    # The console script next to this interpreter (not a version-manager shim found on PATH,
    # whose own start-up would be charged to packds).
    exe = os.path.join(os.path.dirname(sys.executable), "packds")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("packds")
    base = [exe] if exe else [sys.executable, "-m", "packds"]
    cmd = base + ["pack", src, "-o", out, "-q", "--force", "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def bench_pack(src: str, work: str, tree: dict, args) -> tuple[dict, str, str | None]:
    out = os.path.join(work, "tree.pds")
    tarpath = os.path.join(work, "tree.tar")
    scratch = os.path.join(work, "sweep.pds")
    tar = shutil.which(args.tar)
    # name -> (command, output it writes); the first two are the comparison, the rest the
    # optional --threads-sweep
    tools = {"packds pack": (packds_cmd(src, out, args.threads), out)}
    tools["GNU tar -cf"] = ([tar, "-cf", tarpath, "-C", src, "."], tarpath) if tar else None
    for t in args.threads_sweep:
        tools[f"packds pack --threads {t}"] = (packds_cmd(src, scratch, t), scratch)
    runs = {name: [] for name in tools}
    names = list(tools)
    for r in range(args.repeat):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: nobody always goes first
        for tool in order:
            if tools[tool] is None:
                continue
            cmd, target = tools[tool]
            rm(target)  # not timed: every tool writes into an empty place
            res = run_child(cmd, capture=True)
            if res["rc"] != 0:
                raise SystemExit(f"{shlex.join(cmd)} failed ({res['rc']}): {res['stderr'][-2000:]}")
            if tool.startswith("packds"):
                try:
                    res["internal_seconds"] = json.loads(res["stdout"].strip().splitlines()[-1])["seconds"]
                except Exception:  # noqa: BLE001
                    res["internal_seconds"] = None
            res["cmd"] = shlex.join(cmd)
            del res["stdout"], res["stderr"]
            runs[tool].append(res)
            if target == scratch:
                rm(scratch)
            say(f"  pack round {r + 1}/{args.repeat}: {tool:12s} {res['seconds']:.3f} s, peak RSS {res['maxrss_kib'] / 1024:.0f} MiB")
    rows = {}
    for tool, rs in runs.items():
        if not rs:
            rows[tool] = {"installed": False}
            continue
        secs = [x["seconds"] for x in rs]
        med = median(secs)
        rows[tool] = {
            "installed": True,
            "cmd": rs[0]["cmd"],
            "seconds": secs,
            "median_s": med,
            "min_s": min(secs),
            "max_s": max(secs),
            "files_per_s": tree["files"] / med,
            "mb_per_s": tree["bytes"] / med / 1e6,
            "peak_rss_mib": max(x["maxrss_kib"] for x in rs) / 1024,
            "peak_rss_from": rs[0]["rss_from"],
            "internal_seconds": [x.get("internal_seconds") for x in rs] if tool.startswith("packds") else None,
        }
    base = rows["packds pack"]["median_s"]
    for row in rows.values():
        if row.get("installed"):
            row["time_vs_packds"] = row["median_s"] / base
    out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    rows["packds pack"]["output_bytes"] = out_bytes
    if tar and os.path.exists(tarpath):
        rows["GNU tar -cf"]["output_bytes"] = os.path.getsize(tarpath)
    return rows, out, (tarpath if tar else None)


# --------------------------------------------------------------------------------------------
# open → first sample


def bench_open(out: str, tarpath: str | None, args) -> dict:
    import packds

    t_pds, t_pop, t_tar = [], [], []
    ntar = 0
    for r in range(args.repeat):
        for _ in range(5):
            t0 = time.perf_counter()
            ds = packds.open(out)
            ds[0]
            t_pds.append(time.perf_counter() - t0)
            del ds
        t0 = time.perf_counter()
        ds = packds.open(out, populate=True)
        ds[0]
        t_pop.append(time.perf_counter() - t0)
        del ds
        if tarpath:
            t0 = time.perf_counter()
            tf = tarfile.open(tarpath)
            members = {m.name: m for m in tf}
            first = next(m for m in members.values() if m.isfile())
            f = tf.fileobj
            f.seek(first.offset_data)
            f.read(first.size)
            t_tar.append(time.perf_counter() - t0)
            ntar = len(members)
            tf.close()
            del members, tf
        say(f"  open round {r + 1}/{args.repeat}: packds {t_pds[-1] * 1e3:.3f} ms, populate=True {t_pop[-1] * 1e3:.1f} ms" + (f", tarfile {t_tar[-1]:.2f} s" if t_tar else ""))
    rows = {
        "packds.open + ds[0]": {"installed": True, "seconds": t_pds},
        "packds.open(populate=True) + ds[0]": {"installed": True, "seconds": t_pop},
        "tarfile.open + {name: TarInfo} of all members + first read": {"installed": bool(tarpath), "seconds": t_tar, "members": ntar},
    }
    base = median(t_pds)
    for row in rows.values():
        if row["seconds"]:
            row["median_ms"] = median(row["seconds"]) * 1e3
            row["min_ms"] = min(row["seconds"]) * 1e3
            row["max_ms"] = max(row["seconds"]) * 1e3
            row["time_vs_packds"] = median(row["seconds"]) / base
    return rows


# --------------------------------------------------------------------------------------------
# random reads


def bench_reads(out: str, tarpath: str | None, src: str, args) -> dict:
    import packds

    ds = packds.open(out, populate=False)
    ds_pop = packds.open(out, populate=True)
    n = len(ds)
    B = args.batch
    nb = args.batches
    rng = random.Random(args.seed)  # the one generator behind every draw
    draws = [rng.randrange(n) for _ in range(nb * B)]
    batches = [draws[k * B : (k + 1) * B] for k in range(nb)]

    # per-sample metadata, computed once, untimed
    shard_paths: list[str] = []
    shard_of: dict[str, int] = {}
    sh_idx, offs, sizes, keys = [], [], [], []
    for i in range(n):
        p, o, s = ds.locate(i)
        p = os.fspath(p)
        if p not in shard_of:
            shard_of[p] = len(shard_paths)
            shard_paths.append(p)
        sh_idx.append(shard_of[p])
        offs.append(o)
        sizes.append(s)
        keys.append(ds.key(i))
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in shard_paths]
    maps = [mmap.mmap(fd, 0, access=mmap.ACCESS_READ) for fd in fds]
    paths = [os.path.join(src, k) for k in keys]

    members = tf = tfile = None
    if tarpath:
        tf = tarfile.open(tarpath)
        members = {}
        for m in tf:
            members[m.name[2:] if m.name.startswith("./") else m.name] = m
        tfile = tf.fileobj
        missing = [k for k in keys[:100] if k not in members]
        if missing:
            raise SystemExit(f"tar member names do not match packds keys, e.g. {missing[:3]}")

    G = args.get_many

    # Each method: (name, prepare(batch) -> arg, run(arg)). prepare is untimed; run is timed.
    def run_ds(arg, ds=ds):
        for i in arg:
            ds[i]

    def run_ds_pop(arg, ds=ds_pop):
        for i in arg:
            ds[i]

    def run_view(arg, ds=ds):
        for i in arg:
            ds.view(i)

    def run_get_many(arg, gm=ds.get_many):
        for chunk in arg:
            gm(chunk)

    def run_comp(arg, ds=ds):
        for chunk in arg:
            [ds[i] for i in chunk]

    def run_mmap(arg):
        for m, a, b in arg:
            m[a:b]

    def run_pread(arg, pread=os.pread):
        for fd, s, o in arg:
            pread(fd, s, o)

    def run_tarfile(arg, members=members, f=tfile):
        seek, read = (f.seek, f.read) if f else (None, None)
        for k in arg:
            m = members[k]
            seek(m.offset_data)
            read(m.size)

    def run_files(arg):
        for p in arg:
            open(p, "rb").read()

    ident = lambda b: b  # noqa: E731
    methods = [
        ("ds[i] (populate=False)", ident, run_ds, True),
        ("ds[i] (populate=True)", ident, run_ds_pop, True),
        ("ds.view(i) (memoryview only)", ident, run_view, True),
        (f"ds.get_many({G}) per sample", lambda b: [b[j : j + G] for j in range(0, len(b), G)], run_get_many, True),
        (f"[ds[i] for i in chunk] ({G} kept alive, as get_many)", lambda b: [b[j : j + G] for j in range(0, len(b), G)], run_comp, True),
        ("floor: mmap slice m[off:off+size]", lambda b: [(maps[sh_idx[i]], offs[i], offs[i] + sizes[i]) for i in b], run_mmap, True),
        ("os.pread(fd, size, off) of the shard", lambda b: [(fds[sh_idx[i]], sizes[i], offs[i]) for i in b], run_pread, True),
        ("tarfile: members[key] + seek + read", lambda b: [keys[i] for i in b], run_tarfile, bool(tarpath)),
        ("loose files: open(path,'rb').read()", lambda b: [paths[i] for i in b], run_files, True),
    ]
    names = [m[0] for m in methods]
    per_batch = {name: [] for name in names}
    faults = {name: 0 for name in names}
    first_touch = []
    first_touch_faults = 0
    R = args.read_rounds
    for r in range(R):
        mine = batches[r::R]
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for name, prep, run, ok in order:
            if not ok:
                continue
            argsb = [prep(b) for b in mine]
            for a in argsb:  # warm pass: re-read exactly what is about to be timed
                run(a)
            gc.collect()
            gc.disable()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res = per_batch[name]
            for a in argsb:
                t0 = time.perf_counter_ns()
                run(a)
                res.append((time.perf_counter_ns() - t0) / B / 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            gc.enable()
        # extra: a freshly opened dataset, populate=False, no warm pass (first touch of pages)
        fresh = packds.open(out, populate=False)
        gc.disable()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for b in mine:
            t0 = time.perf_counter_ns()
            run_ds(b, fresh)
            first_touch.append((time.perf_counter_ns() - t0) / B / 1e3)
        first_touch_faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        gc.enable()
        del fresh
        say(f"  read round {r + 1}/{R} (µs/read): " + ", ".join(f"{k + 1}) {median(per_batch[nm][-len(mine):]):.2f}" for k, nm in enumerate(names) if per_batch[nm]) + f", first-touch {median(first_touch[-len(mine):]):.2f}")

    rows = {}
    for name, _, _, ok in methods:
        xs = per_batch[name]
        if not ok or not xs:
            rows[name] = {"installed": False}
            continue
        rows[name] = {"installed": True, "median_us": median(xs), "p99_us": pct(xs, 99), "min_us": min(xs), "max_us": max(xs), "batches": len(xs), "minflt_per_1k_reads": faults[name] / (len(xs) * B) * 1e3}
    rows["ds[i] fresh open, no warm pass (first touch)"] = {
        "installed": True,
        "median_us": median(first_touch),
        "p99_us": pct(first_touch, 99),
        "min_us": min(first_touch),
        "max_us": max(first_touch),
        "batches": len(first_touch),
        "minflt_per_1k_reads": first_touch_faults / (len(first_touch) * B) * 1e3,
    }
    base = rows["ds[i] (populate=False)"]["median_us"]
    for row in rows.values():
        if row.get("installed"):
            row["samples_per_s"] = 1e6 / row["median_us"]
            row["time_vs_ds"] = row["median_us"] / base
    for m in maps:
        m.close()
    for fd in fds:
        os.close(fd)
    if tf:
        tf.close()
    return {"samples": n, "draws": len(draws), "batch": B, "rounds": R, "get_many": G, "seed": args.seed, "rows": rows}


# --------------------------------------------------------------------------------------------
# index scale


PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import packds
t1 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
from bench_pack_read import rss_rollup
path = sys.argv[1]
r0 = rss_rollup()
t2 = time.perf_counter()
ds = packds.open(path)
t3 = time.perf_counter()
ds[0]
t4 = time.perf_counter()
r1 = rss_rollup()
n = len(ds)
size = ds.size
for i in range(n):
    size(i)
t5 = time.perf_counter()
r2 = rss_rollup()
key = ds.key
for i in range(n):
    key(i)
t6 = time.perf_counter()
r3 = rss_rollup()
print(json.dumps({"n": n, "import_s": t1 - t0, "open_s": t3 - t2, "open_first_s": t4 - t2,
                  "size_all_s": t5 - t4, "key_all_s": t6 - t5, "rss": [r0, r1, r2, r3]}))
"""


def bench_scale(work: str, args) -> dict:
    src = os.path.join(work, "scale_src")
    out = os.path.join(work, "scale.pds")
    tarpath = os.path.join(work, "scale.tar")
    rm(src)
    os.makedirs(src)
    say(f"scale: generating {args.scale_files:,} files of {args.scale_size} B in {src} ...")
    gen = make_tiny_tree(src, args.scale_files, args.scale_size)
    say(f"  generated in {gen['seconds']:.1f} s ({gen['files'] / gen['seconds']:,.0f} files/s)")
    res = {"files": args.scale_files, "file_size": args.scale_size, "generate_s": gen["seconds"], "dirs": gen["dirs"]}
    p = run_child(packds_cmd(src, out, args.threads), capture=True)
    if p["rc"] != 0:
        raise SystemExit(f"packds pack (scale) failed: {p['stderr'][-2000:]}")
    res["pack_packds"] = {"seconds": p["seconds"], "files_per_s": args.scale_files / p["seconds"], "peak_rss_mib": p["maxrss_kib"] / 1024}
    say(f"  packds pack: {p['seconds']:.2f} s, peak RSS {p['maxrss_kib'] / 1024:.0f} MiB")
    tar = shutil.which(args.tar)
    if tar:
        t = run_child([tar, "-cf", tarpath, "-C", src, "."])
        res["pack_tar"] = {"seconds": t["seconds"], "files_per_s": args.scale_files / t["seconds"], "peak_rss_mib": t["maxrss_kib"] / 1024}
        say(f"  GNU tar -cf: {t['seconds']:.2f} s, peak RSS {t['maxrss_kib'] / 1024:.0f} MiB")
        rm(tarpath)
    else:
        res["pack_tar"] = None
    if not args.keep:
        rm(src)  # frees several GiB of tmpfs before the measurements
    res["index_bytes"] = os.path.getsize(os.path.join(out, "index.pdsi"))
    res["dataset_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    probes = []
    for _ in range(args.scale_opens):
        q = subprocess.run([sys.executable, "-c", PROBE, out, HERE], capture_output=True, text=True)
        if q.returncode != 0:
            raise SystemExit(f"scale probe failed: {q.stderr[-2000:]}")
        probes.append(json.loads(q.stdout.strip().splitlines()[-1]))
    n = probes[0]["n"]

    def per_sample(a: int, b: int, field: str) -> list[float]:
        return [(pr["rss"][b].get(field, 0) - pr["rss"][a].get(field, 0)) / n for pr in probes]

    res["probes"] = probes
    res["open_ms"] = [pr["open_s"] * 1e3 for pr in probes]
    res["open_ms_median"] = median(res["open_ms"])
    res["open_first_ms_median"] = median([pr["open_first_s"] * 1e3 for pr in probes])
    res["import_ms_median"] = median([pr["import_s"] * 1e3 for pr in probes])
    res["size_all_ns_per_sample"] = median([pr["size_all_s"] / n * 1e9 for pr in probes])
    res["key_all_ns_per_sample"] = median([pr["key_all_s"] / n * 1e9 for pr in probes])
    res["rss_open_bytes"] = median([pr["rss"][1]["Rss"] - pr["rss"][0]["Rss"] for pr in probes])
    res["rss_per_sample_size_all"] = median(per_sample(1, 2, "Rss"))
    res["anon_per_sample_size_all"] = median(per_sample(1, 2, "Anonymous")) if "Anonymous" in probes[0]["rss"][0] else None
    res["rss_per_sample_size_and_key_all"] = median(per_sample(1, 3, "Rss"))
    res["n"] = n
    return res


# --------------------------------------------------------------------------------------------
# output


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(res: dict) -> str:
    m = res["machine"]
    t = res["tree"]
    o = []
    o.append(f"# packds benchmark — {m['date']}, commit {m['commit']}{' (work tree has uncommitted changes in src/ or python/: the packds used may differ from it)' if m['worktree_dirty_src'] else ''}")
    o.append("")
    o.append(f"- machine: {m['nproc']} CPUs ({m['affinity_cpus']} usable), {m['cpu']}, {m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, Python {m['python']}, packds {m['packds']} ({m['packds_core']}, built {m['packds_core_built']}), {m['tar']}")
    o.append(f"- data: {res['where']} — all warm page cache (tmpfs cannot be evicted); reads re-read their samples right before timing")
    o.append(f"- tree: {t['files']:,} files × {t['bytes'] / max(1, t['files']):,.0f} B = {t['bytes'] / 2**20:,.0f} MiB in {t['dirs']} directories" + (f" (generated in {t['seconds']:.1f} s)" if t['seconds'] else ""))
    if res["args"].get("label"):
        o.append(f"- packds under test: {res['args']['label']}")
    o.append(f"- command: `{m['command']}`")
    o.append("- ratios: **time ÷ packds time** (> 1: packds is that many times faster); MB = 10^6 bytes")
    o.append("")

    p = res["pack"]
    o.append(f"## pack ({res['args']['repeat']} interleaved runs each, wall clock incl. process start; median [min–max])")
    o.append("")
    rows = []
    for name, r in p.items():
        if not r.get("installed"):
            rows.append([name, "not installed", "", "", "", "", ""])
            continue
        extra = ""
        if r.get("internal_seconds") and all(x is not None for x in r["internal_seconds"]):
            extra = f" (in-process {median(r['internal_seconds']):.3f} s)"
        rows.append([f"`{name}`", f"{r['median_s']:.3f} [{r['min_s']:.3f}–{r['max_s']:.3f}]{extra}", f"{r['files_per_s']:,.0f}", f"{r['mb_per_s']:,.0f}", f"{r['peak_rss_mib']:,.1f}", (f"{r['output_bytes'] / 2**20:,.0f}" if r.get("output_bytes") else "—"), f"**{r['time_vs_packds']:.2f}×**"])
    o.append(table(["tool", "seconds", "files/s", "MB/s", "peak RSS MiB", "output MiB", "time ÷ packds"], rows))
    o.append("")
    o.append(f"Peak RSS: {p['packds pack'].get('peak_rss_from', '?')}, max over runs (packds's includes its Python interpreter). packds ran with its default thread count unless `--threads` is given.")
    if p.get("GNU tar -cf", {}).get("installed"):
        o.append("")
        o.append(f"packds files/s ÷ GNU tar files/s = **{p['GNU tar -cf']['median_s'] / p['packds pack']['median_s']:.2f}×**")
    o.append("")

    op = res["open"]
    o.append(f"## open → first sample (in-process, warm; median [min–max] of {len(op['packds.open + ds[0]']['seconds'])} / {res['args']['repeat']} / {res['args']['repeat']} runs)")
    o.append("")
    rows = []
    for name, r in op.items():
        if not r.get("installed"):
            rows.append([name, "not installed", ""])
            continue
        rows.append([name + (f" ({r['members']:,} members)" if r.get("members") else ""), f"{r['median_ms']:,.3f} [{r['min_ms']:,.3f}–{r['max_ms']:,.3f}]", f"**{r['time_vs_packds']:,.0f}×**" if r["time_vs_packds"] >= 10 else f"**{r['time_vs_packds']:.2f}×**"])
    o.append(table(["method", "ms", "time ÷ packds"], rows))
    o.append("")

    rd = res["reads"]
    o.append(f"## random single-sample reads from Python ({rd['draws']:,} draws of one random.Random({rd['seed']}) over {rd['samples']:,} samples; same indices for every method)")
    o.append("")
    o.append(f"Per-read latency = time of a loop of {rd['batch']:,} reads (perf_counter_ns) ÷ {rd['batch']:,}; median and p99 are taken over the per-batch means ({rd['draws'] // rd['batch']} batches per method, run in {rd['rounds']} rounds with the methods interleaved and rotated; each method re-reads its round's samples untimed right before timing them; gc off while timing). samples/s = 1 / median, one thread.")
    o.append("")
    rows = []
    for name, r in rd["rows"].items():
        if not r.get("installed"):
            rows.append([name, "not installed", "", "", "", ""])
            continue
        rows.append([name, f"{r['median_us']:.3f}", f"{r['p99_us']:.3f}", f"{r['samples_per_s']:,.0f}", f"{r['minflt_per_1k_reads']:.1f}", f"**{r['time_vs_ds']:.2f}×**"])
    o.append(table(["method", "µs/read median", "µs/read p99", "samples/s", "minor faults /1k reads", "time ÷ ds[i]"], rows))
    o.append("")
    s = res["summary"]
    o.append(f"- `ds[i]` ÷ mmap-slice floor = **{s['ds_vs_floor']:.2f}×** (time); `ds[i]` median {s['ds_median_us']:.3f} µs")
    if s.get("tarfile_vs_ds"):
        o.append(f"- `ds[i]` is **{s['tarfile_vs_ds']:.2f}×** faster than tarfile seek+read, **{s['files_vs_ds']:.2f}×** faster than loose files, **{s['pread_vs_ds']:.2f}×** vs os.pread")
    else:
        o.append(f"- `ds[i]` is **{s['files_vs_ds']:.2f}×** faster than loose files, **{s['pread_vs_ds']:.2f}×** vs os.pread (tarfile: not installed)")
    o.append("")

    sc = res.get("scale")
    if sc:
        o.append(f"## index scale ({sc['n']:,} samples of {sc['file_size']} B; {len(sc['probes'])} fresh processes)")
        o.append("")
        o.append(f"- tree generated in {sc['generate_s']:.1f} s ({sc['files'] / sc['generate_s']:,.0f} files/s, {sc['dirs']:,} dirs); index.pdsi {sc['index_bytes'] / 2**20:,.1f} MiB ({sc['index_bytes'] / sc['n']:.1f} B/sample), dataset {sc['dataset_bytes'] / 2**20:,.0f} MiB")
        pk = sc["pack_packds"]
        line = f"- pack (1 run each): packds {pk['seconds']:.2f} s ({pk['files_per_s']:,.0f} files/s, peak RSS {pk['peak_rss_mib']:.0f} MiB)"
        if sc.get("pack_tar"):
            tt = sc["pack_tar"]
            line += f"; GNU tar {tt['seconds']:.2f} s ({tt['files_per_s']:,.0f} files/s, peak RSS {tt['peak_rss_mib']:.0f} MiB); tar time ÷ packds time = **{tt['seconds'] / pk['seconds']:.2f}×**"
        o.append(line)
        o.append("")
        rows = [
            ["`packds.open` (after `import packds`)", f"{sc['open_ms_median']:.3f} ms", "< 20 ms"],
            ["`packds.open` + `ds[0]`", f"{sc['open_first_ms_median']:.3f} ms", ""],
            ["`import packds` (context)", f"{sc['import_ms_median']:.1f} ms", ""],
            ["RSS growth at open", f"{sc['rss_open_bytes'] / 1024:,.0f} KiB", ""],
            ["RSS growth after `ds.size(i)` for all i, per sample", f"{sc['rss_per_sample_size_all']:.1f} B", "< 64 B"],
            ["  of which anonymous (heap), per sample", "—" if sc["anon_per_sample_size_all"] is None else f"{sc['anon_per_sample_size_all']:.2f} B", ""],
            ["RSS growth after `ds.size(i)` + `ds.key(i)` for all i, per sample", f"{sc['rss_per_sample_size_and_key_all']:.1f} B", ""],
            ["`ds.size(i)` loop cost per sample", f"{sc['size_all_ns_per_sample']:.0f} ns", ""],
            ["`ds.key(i)` loop cost per sample", f"{sc['key_all_ns_per_sample']:.0f} ns", ""],
        ]
        o.append(table(["measure (median over processes)", "value", "target"], rows))
        o.append("")
        o.append("RSS from /proc/self/smaps_rollup `Rss` (includes the mapped index pages, which are shared page cache on tmpfs).")
        o.append("")
    return "\n".join(o)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000, help="files in the generated tree (default 100000)")
    ap.add_argument("--size", type=int, default=8192, help="bytes per generated file (default 8192)")
    ap.add_argument("--src", help="benchmark this existing tree instead of generating one")
    ap.add_argument("--dir", help="work directory (default: a fresh directory under /dev/shm)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pack and open method (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="packds pack --threads (default: packds's own default)")
    ap.add_argument("--threads-sweep", default="", help="also pack with these --threads values, e.g. 1,2,4,8 (extra rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1024, help="reads per timed batch (default 1024)")
    ap.add_argument("--batches", type=int, default=200, help="timed batches per read method (default 200)")
    ap.add_argument("--read-rounds", type=int, default=5, help="rounds the read methods are interleaved over (default 5)")
    ap.add_argument("--get-many", type=int, default=256, help="indices per ds.get_many call (default 256)")
    ap.add_argument("--scale-files", type=int, default=0, help="index-scale test with this many tiny files (default 0 = off)")
    ap.add_argument("--scale-size", type=int, default=16, help="bytes per index-scale file (default 16)")
    ap.add_argument("--scale-opens", type=int, default=7, help="fresh processes for the index-scale open (default 7)")
    ap.add_argument("--tar", default="tar", help="GNU tar executable (default: tar on PATH)")
    ap.add_argument("--label", default="", help="free text for the header, e.g. how the packds under test was built")
    ap.add_argument("--json", default=os.path.join(HERE, "out", "results.json"), help="write results here (default bench/out/results.json)")
    args = ap.parse_args(argv[1:])
    args.threads_sweep = [int(x) for x in args.threads_sweep.split(",") if x.strip()]
    if args.batch % args.get_many:
        ap.error("--batch must be a multiple of --get-many")

    import packds  # noqa: F401  (fail early if missing)

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if args.dir:
        work = os.path.abspath(args.dir)
        os.makedirs(work, exist_ok=True)
    else:
        work = tempfile.mkdtemp(prefix="packds-bench-", dir=base)
    res: dict = {"args": vars(args)}
    res["machine"] = machine_info(args, argv)
    try:
        if args.src:
            src = os.path.abspath(args.src)
            say(f"scanning {src} ...")
            res["tree"] = scan_tree(src)
        else:
            src = os.path.join(work, "tree")
            rm(src)
            os.makedirs(src)
            say(f"generating {args.files:,} files of {args.size} B in {src} ...")
            res["tree"] = make_tree(src, args.files, args.size, args.seed)
            say(f"  done in {res['tree']['seconds']:.1f} s")
        res["where"] = f"source {src} ({fs_type(src)}), outputs in {work} ({fs_type(work)})"

        say("pack ...")
        res["pack"], out, tarpath = bench_pack(src, work, res["tree"], args)
        say("open ...")
        res["open"] = bench_open(out, tarpath, args)
        say("random reads ...")
        res["reads"] = bench_reads(out, tarpath, src, args)
        rr = res["reads"]["rows"]
        ds_us = rr["ds[i] (populate=False)"]["median_us"]
        tf_row = rr["tarfile: members[key] + seek + read"]
        res["summary"] = {
            "ds_median_us": ds_us,
            "ds_vs_floor": ds_us / rr["floor: mmap slice m[off:off+size]"]["median_us"],
            "tarfile_vs_ds": tf_row["median_us"] / ds_us if tf_row.get("installed") else None,
            "files_vs_ds": rr["loose files: open(path,'rb').read()"]["median_us"] / ds_us,
            "pread_vs_ds": rr["os.pread(fd, size, off) of the shard"]["median_us"] / ds_us,
            "pack_tar_vs_packds_files_per_s": (res["pack"]["GNU tar -cf"]["median_s"] / res["pack"]["packds pack"]["median_s"]) if res["pack"]["GNU tar -cf"].get("installed") else None,
        }
        if args.scale_files > 0:
            res["scale"] = bench_scale(work, args)
    finally:
        if not args.keep:
            for name in ("tree", "tree.pds", "tree.tar", "sweep.pds", "scale_src", "scale.pds", "scale.tar"):
                if name == "tree" and args.src:
                    continue
                rm(os.path.join(work, name))
            if not args.dir:
                shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")

    md = render(res)
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    res["markdown"] = md
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=str)
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
