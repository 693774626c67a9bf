#!/usr/bin/env python3
"""packds against its peers, one run, interleaved, repeated; medians [min–max], ratios to packds.

    python bench/run.py [--files 50000] [--repeat 3] [--src TREE] [--json bench/out/run.json]
    python bench/run.py --slowfs [--slowfs-files 2000]     # Lustre-like FUSE mount, pack only

Sections: pack (packds, GNU tar, tar+zstd, mksquashfs, webdataset ShardWriter, MosaicML
MDSWriter, h5py), open → first sample (fresh processes), random single-sample reads from Python,
batch reads, stage (cold cache, via bench_stage.py), DataLoader (if torch is importable).
A peer that cannot be imported or run is printed as "not installed" with the reason.
Data lives on /dev/shm (warm); each read method re-reads its samples right before timing them.
No timing is asserted; exit status 0. Markdown on stdout, JSON in --json.
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
sys.path.insert(0, HERE)
import bench_pack_read as bpr  # noqa: E402  (helpers: run_child, machine_info, packds_cmd, ...)

import peers  # noqa: E402

say, median, fmt, rm = bpr.say, bpr.median, bpr.fmt, bpr.rm
PY = sys.executable
PEERS = os.path.join(HERE, "peers.py")


def mmx(xs, nd=2, scale=1.0):
    if not xs:
        return "—"
    return f"{fmt(median(xs) * scale, nd)} [{fmt(min(xs) * scale, nd)}–{fmt(max(xs) * scale, nd)}]"


def ratio(x, ref):
    return "—" if not x or not ref or x != x or ref != ref else f"**{x / ref:,.2f}×**"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def packds_cmd(src: str, out: str) -> list[str]:
    """The console script next to this interpreter, else `python -m packds` (never a
    version-manager shim from PATH, whose own start-up would be charged to packds)."""
    exe = os.path.join(os.path.dirname(sys.executable), "packds")
    base = [exe] if os.access(exe, os.X_OK) else [PY, "-m", "packds"]
    return base + ["pack", src, "-o", out, "-q", "--force", "--json"]


def du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------
# data


def make_tree(root: str, files: int, dirs: int, median_size: int, sigma: float, seed: int) -> dict:
    """Log-normal file sizes (median ``median_size``, shape ``sigma``, 64 B..4 MiB), ``dirs``
    directories, random (incompressible) bytes: slices of one 64 MiB random blob."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    blob = os.urandom(64 << 20)
    total = 0
    names = [f"n{rng.randrange(10**7, 10**8):08d}" for _ in range(dirs)]
    for d in names:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(files):
        size = int(min(4 << 20, max(64, rng.lognormvariate(math.log(median_size), sigma))))
        off = rng.randrange(len(blob) - size)
        d = names[i % dirs]
        with open(f"{root}/{d}/{d}_{i:07d}.JPEG", "wb") as f:
            f.write(blob[off : off + size])
        total += size
    return {"files": files, "bytes": total, "dirs": dirs, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# pack


def pack_tools(src: str, work: str, avail: dict) -> dict:
    """name -> (argv or None, output path, reason when unavailable)."""
    o = lambda n: os.path.join(work, n)  # noqa: E731
    tools = {
        "packds pack": (packds_cmd(src, o("packds.pds")), o("packds.pds"), None),
        "tar -cf": (["tar", "-cf", o("t.tar"), "-C", src, "."], o("t.tar"), None),
        "tar -I 'zstd -T0' -cf": (["tar", "-I", "zstd -T0", "-cf", o("t.tar.zst"), "-C", src, "."], o("t.tar.zst"), None),
        "mksquashfs": (["mksquashfs", src, o("t.sqfs"), "-processors", "2", "-noappend", "-quiet", "-no-progress"], o("t.sqfs"), None),
        "webdataset ShardWriter": ([PY, PEERS, "write-wds", src, o("wds")], o("wds"), avail["wds"]),
        "MosaicML MDSWriter": ([PY, PEERS, "write-mds", src, o("mds")], o("mds"), avail["mds"]),
        "h5py (one uint8 array + offsets)": ([PY, PEERS, "write-h5", src, o("t.h5")], o("t.h5"), avail["h5"]),
    }
    if shutil.which("zstd") is None:
        tools["tar -I 'zstd -T0' -cf"] = (None, "", "not installed (zstd missing: apt-get install -y zstd)")
    if shutil.which("mksquashfs") is None:
        tools["mksquashfs"] = (None, "", "not installed (apt-get install -y squashfs-tools)")
    return tools


def bench_pack(src, work, tree, args, avail):
    tools = pack_tools(src, work, avail)
    names = list(tools)
    runs = {k: [] for k in names}
    err = {}
    for r in range(args.repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cmd, out, why = tools[name]
            if cmd is None or why or name in err:
                continue
            rm(out)
            res = bpr.run_child(cmd)
            if res["rc"] != 0:
                err[name] = f"failed (rc {res['rc']}): {res['stderr'].strip().splitlines()[-1:] or ''}"
                say(f"  pack {name}: {err[name]}")
                continue
            res["size"] = du(out)
            runs[name].append(res)
            say(f"  round {r + 1}: {name:<34} {res['seconds']:7.2f} s  {res['maxrss_kib'] / 1024:6.1f} MiB")
    rows = {}
    for name in names:
        cmd, out, why = tools[name]
        rs = runs[name]
        if not rs:
            rows[name] = {"status": why or err.get(name) or "not run"}
            continue
        secs = [x["seconds"] for x in rs]
        rows[name] = {
            "seconds": secs, "files_per_s": tree["files"] / median(secs), "mb_per_s": tree["bytes"] / median(secs) / 1e6,
            "output_bytes": rs[-1]["size"], "peak_rss_mib": max(x["maxrss_kib"] for x in rs) / 1024, "path": out,
            "status": "ok" if name not in err else err[name],
        }
    return rows


# ---------------------------------------------------------------------------------------------
# open


def bench_open(paths: dict, args, avail):
    kinds = {
        "packds.open + ds[0]": ("packds", paths.get("packds")),
        "tarfile.open + member scan + first read": ("tarfile", paths.get("tar")),
        "h5py.File + offsets[:] + first slice": ("h5", paths.get("h5")),
        "MDS StreamingDataset(local=) + get_item(0)": ("mds", paths.get("mds")),
        "wids ShardListDataset + ds[0]": ("wids", paths.get("wids")),
    }
    res = {k: [] for k in kinds}
    status = {}
    for name, (kind, p) in kinds.items():
        why = avail.get(kind) if kind not in ("packds", "tarfile") else None
        if why or not p:
            status[name] = why or "no output (its pack failed or was not installed)"
    for _ in range(args.repeat):
        for name, (kind, p) in kinds.items():
            if name in status:
                continue
            c = subprocess.run([PY, PEERS, "open", kind, p], capture_output=True, text=True)
            if c.returncode != 0:
                status[name] = "failed: " + (c.stderr.strip().splitlines() or ["?"])[-1][:200]
                continue
            res[name].append(json.loads(c.stdout.strip().splitlines()[-1])["ms"])
    return {k: {"ms": v, "status": status.get(k, "ok")} for k, v in res.items()}


# ---------------------------------------------------------------------------------------------
# random reads


def bench_reads(paths: dict, src: str, args, avail):
    import packds

    ds = packds.open(paths["packds"])
    n = len(ds)
    rng = random.Random(args.seed)  # the one generator behind every draw
    draws = [rng.randrange(n) for _ in range(args.reads)]
    keys = [ds.key(i) for i in range(n)]
    loose = [os.path.join(src, k) for k in keys]

    methods = {}
    status = {}
    methods["packds ds[i]"] = ds.__getitem__
    methods["packds ds.view(i) (zero-copy)"] = ds.view
    for name, kind, p in (("tarfile seek+read", "tarfile", paths.get("tar")), ("h5py slice", "h5", paths.get("h5")),
                          ("MDS get_item(i)", "mds", paths.get("mds")), ("wids ds[i]", "wids", paths.get("wids"))):
        why = avail.get(kind) if kind != "tarfile" else None
        if why or not p:
            status[name] = why or "no output (its pack failed or was not installed)"
            continue
        try:
            _, get, m = peers.open_reader(kind, p, keys if kind == "tarfile" else None)
            assert m == n, f"{m} samples, packds has {n}"
            for j in (0, n - 1, draws[0]):  # same bytes as packds
                if bytes(get(j)) != ds[j]:
                    raise AssertionError(f"sample {j} differs from packds's")
            methods[name] = get
        except Exception as e:  # noqa: BLE001
            status[name] = f"failed: {type(e).__name__}: {e}"[:200]

    def loose_get(i, loose=loose):
        with open(loose[i], "rb") as f:
            return f.read()

    methods["loose files open().read()"] = loose_get
    names = list(methods)
    lat = {k: [] for k in names}
    wall = {k: 0.0 for k in names}
    per = len(draws) // args.repeat
    ns = time.perf_counter_ns
    for r in range(args.repeat):
        chunk = draws[r * per : (r + 1) * per]
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            get = methods[name]
            for b in range(0, len(chunk), 1024):
                part = chunk[b : b + 1024]
                for i in part:  # warm pass: the same samples, untimed (DAMON pages out idle pages)
                    get(i)
                gc.disable()
                t0 = ns()
                out = lat[name]
                for i in part:
                    a = ns()
                    get(i)
                    out.append(ns() - a)
                wall[name] += (ns() - t0) / 1e9
                gc.enable()
    rows = {}
    for name in names:
        xs = sorted(lat[name])
        rows[name] = {"p50_us": bpr.pct(xs, 50) / 1e3, "p99_us": bpr.pct(xs, 99) / 1e3,
                      "samples_per_s": len(xs) / wall[name], "reads": len(xs), "status": "ok"}
    for name, why in status.items():
        rows[name] = {"status": why}

    # batch: get_many(256) vs a Python loop of ds[i], per sample
    B = 256
    batches = [draws[k : k + B] for k in range(0, len(draws) - B + 1, B)]
    bt = {"packds get_many(256)": [], "[ds[i] for i in batch]": []}
    for r in range(args.repeat):
        for name in (list(bt) if r % 2 == 0 else list(bt)[::-1]):
            t = 0.0
            for b in batches:
                ds.get_many(b)
                gc.disable()
                a = time.perf_counter()
                if name.startswith("packds"):
                    ds.get_many(b)
                else:
                    [ds[i] for i in b]  # noqa: B018
                t += time.perf_counter() - a
                gc.enable()
            bt[name].append(t / (len(batches) * B) * 1e6)
    return {"n": n, "draws": len(draws), "single": rows, "batch_us_per_sample": bt}


# ---------------------------------------------------------------------------------------------
# stage (cold cache), through bench_stage.py


def bench_stage_run(args):
    if shutil.which("rsync") is None:
        return {"status": "not installed (rsync: apt-get install -y rsync)"}
    cmd = [PY, os.path.join(HERE, "bench_stage.py"), "--gb", str(args.stage_gb), "--repeat", str(args.repeat), "--work", args.stage_work]
    c = subprocess.run(cmd, capture_output=True, text=True)
    if c.returncode != 0:
        return {"status": "failed: " + c.stderr[-300:]}
    rows = {}
    head = ""
    for line in c.stdout.splitlines():
        if line.startswith("medians"):
            head = line.strip()
        parts = line.split()
        if len(parts) >= 4 and parts[-1].endswith("x"):
            try:
                sec, mbs = float(parts[-3]), float(parts[-2])
            except ValueError:
                continue
            rows[" ".join(parts[:-3])] = {"seconds": sec, "mb_per_s": mbs}
    rounds = [ln.strip() for ln in c.stderr.splitlines() if "round" in ln]
    return {"status": "ok", "command": " ".join(cmd), "header": head, "rows": rows, "rounds": rounds}


# ---------------------------------------------------------------------------------------------
# DataLoader


class PackdsDS:
    def __init__(self, path):
        import packds

        self.ds = packds.open(path)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


class LooseDS:
    def __init__(self, src):
        import packds

        self.paths = [os.path.join(src, k) for k in packds.open(PATHS["packds"]).keys()]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


class H5DS:
    def __init__(self, path):
        self.path, self.f = path, None
        import h5py

        with h5py.File(path, "r") as f:
            self.offs = f["offsets"][:].tolist()

    def __len__(self):
        return len(self.offs) - 1

    def __getitem__(self, i):
        if self.f is None:  # opened lazily, per worker (h5py handles do not survive fork)
            import h5py

            self.f = h5py.File(self.path, "r")["data"]
        return self.f[self.offs[i] : self.offs[i + 1]].tobytes()


def collate_list(b):
    return b


PATHS: dict = {}


def bench_dataloader(paths, src, args, avail):
    if avail["torch"]:
        return {"status": "torch not installed"}
    import torch
    from torch.utils.data import DataLoader, Subset

    dsets = {"packds": PackdsDS(paths["packds"]), "loose files": LooseDS(src)}
    if paths.get("h5"):
        dsets["h5py"] = H5DS(paths["h5"])
    g = torch.Generator().manual_seed(args.seed)
    n = len(dsets["packds"])
    idx = torch.randperm(n, generator=g)[: min(n, args.dl_samples)].tolist()
    res = {f"{k}, {w} workers": [] for k in dsets for w in (0, 2)}
    for _ in range(args.repeat):
        for name, d in dsets.items():
            for w in (0, 2):
                sub = Subset(d, idx)
                dl = DataLoader(sub, batch_size=64, num_workers=w, collate_fn=collate_list, persistent_workers=w > 0)
                for _ in dl:  # warm pass; with workers, it also starts them (persistent), untimed
                    pass
                t = time.perf_counter()
                c = sum(len(b) for b in dl)
                res[f"{name}, {w} workers"].append(c / (time.perf_counter() - t))
                del dl
    return {"status": "ok", "torch": torch.__version__, "samples": len(idx), "samples_per_s": res}


# ---------------------------------------------------------------------------------------------
# slowfs


def bench_slowfs(args):
    code = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tools", "slowfs.c"))
    if not os.path.exists(code):
        return {"status": f"not installed ({code} missing)"}
    if shutil.which("pkg-config") is None or subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return {"status": "not installed (apt-get install -y fuse3 libfuse3-dev pkg-config)"}
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True).stdout.split()
    work = tempfile.mkdtemp(prefix="packds-run-slowfs-", dir=args.work_root)
    exe = os.path.join(work, "slowfs")  # build line from the top of slowfs.c
    subprocess.run(["cc", "-O2", "-Wall", "-o", exe, code] + flags, check=True)
    src, mnt = os.path.join(work, "tree"), os.path.join(work, "mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    tree = make_tree(src, args.slowfs_files, max(1, args.slowfs_files // 100), args.median_size, args.sigma, args.seed)
    tools = {"packds pack": packds_cmd(mnt, os.path.join(work, "o.pds")),
             "tar -cf": ["tar", "-cf", os.path.join(work, "o.tar"), "-C", mnt, "."]}
    runs = {k: [] for k in tools}
    try:
        for r in range(args.repeat):
            for name in (list(tools) if r % 2 == 0 else list(tools)[::-1]):
                rm(os.path.join(work, "o.pds"))
                rm(os.path.join(work, "o.tar"))
                subprocess.run([exe, src, mnt], check=True)  # fresh mount per tool, defaults
                try:
                    res = bpr.run_child(tools[name])
                finally:
                    subprocess.run(["fusermount3", "-u", mnt])
                if res["rc"] != 0:
                    say(f"  slowfs {name} failed: {res['stderr'][-300:]}")
                    continue
                runs[name].append(res["seconds"])
                say(f"  slowfs round {r + 1}: {name:<12} {res['seconds']:7.2f} s  {tree['files'] / res['seconds']:8.0f} files/s")
    finally:
        rm(work)
    return {"status": "ok", "files": tree["files"], "bytes": tree["bytes"], "seconds": runs,
            "settings": "slowfs defaults (see slowfs.c), fresh mount per tool"}


# ---------------------------------------------------------------------------------------------
# report


def render(res) -> str:
    m, tree = res["machine"], res.get("tree")
    L = [f"# packds vs peers — {m['date']}, commit {m['commit']}", "",
         f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_total_gib']} GiB, kernel {m['kernel']}, Python {m['python']}, packds {m['packds']}",
         f"- command: `{m['command']}`", f"- peers: {res['peer_versions']}"]
    if tree:
        L.append(f"- tree: {tree['files']:,} files, {tree['bytes'] / 1e6:,.0f} MB, {tree['dirs']} dirs "
                 f"(log-normal sizes, median {res['args']['median_size']} B, sigma {res['args']['sigma']}), on {res['work']} ({bpr.fs_type(res['work'])})")
        L.append(f"- {res['args']['repeat']} interleaved rounds; median [min–max]; ratio = packds's advantage (>1: packds better)")
    if "pack" in res:
        L += ["", "## pack (whole process, wall clock)", ""]
        ref = res["pack"]["packds pack"].get("files_per_s")
        rows = []
        for k, v in res["pack"].items():
            if "seconds" not in v:
                rows.append([f"`{k}`", v["status"], "", "", "", "", ""])
                continue
            rows.append([f"`{k}`", mmx(v["seconds"], 2), f"{v['files_per_s']:,.0f}", f"{v['mb_per_s']:,.0f}",
                         f"{v['peak_rss_mib']:,.1f}", f"{v['output_bytes'] / 1e6:,.0f}", ratio(ref, v["files_per_s"])])
        L.append(table(["tool", "seconds", "files/s", "MB/s", "peak RSS MiB", "output MB", "packds files/s ÷ this"], rows))
    if "open" in res:
        L += ["", "## open → first sample (fresh process each; imports not timed)", ""]
        ref = median(res["open"]["packds.open + ds[0]"]["ms"])
        rows = []
        for k, v in res["open"].items():
            rows.append([k, mmx(v["ms"], 3), ratio(median(v["ms"]), ref)] if v["ms"] else [k, v["status"], ""])
        L.append(table(["method", "ms", "this ÷ packds"], rows))
    if "reads" in res:
        rd = res["reads"]
        L += ["", f"## random single-sample reads ({rd['draws']:,} draws of one random.Random({res['args']['seed']}) over {rd['n']:,} samples, "
              "same indices for every method; each read timed alone with perf_counter_ns, warm pass before each 1,024)", ""]
        ref = rd["single"]["packds ds[i]"]
        rows = []
        for k, v in rd["single"].items():
            if v["status"] != "ok":
                rows.append([k, v["status"], "", "", ""])
                continue
            rows.append([k, f"{v['p50_us']:,.2f}", f"{v['p99_us']:,.2f}", f"{v['samples_per_s']:,.0f}", ratio(ref["samples_per_s"], v["samples_per_s"])])
        L.append(table(["method", "p50 µs", "p99 µs", "samples/s", "packds samples/s ÷ this"], rows))
        bt = rd["batch_us_per_sample"]
        L += ["", "Batch reads (µs per sample, 256 per batch): "
              + "; ".join(f"{k}: {mmx(v, 3)}" for k, v in bt.items())
              + f" — loop ÷ get_many = {ratio(median(bt['[ds[i] for i in batch]']), median(bt['packds get_many(256)']))}"]
    if "stage" in res:
        s = res["stage"]
        L += ["", "## stage (cold cache: sync + drop_caches before every copy; bench/bench_stage.py)", ""]
        if s["status"] != "ok":
            L.append(s["status"])
        else:
            ref = s["rows"].get("packds stage", {}).get("seconds")
            L.append(f"`{s['command']}` — {s['header']}")
            L.append("")
            L.append(table(["method", "seconds", "MB/s", "this time ÷ packds stage"],
                           [[k, f"{v['seconds']:.2f}", f"{v['mb_per_s']:,.0f}", ratio(v["seconds"], ref)] for k, v in s["rows"].items()]))
    if "dataloader" in res:
        d = res["dataloader"]
        L += ["", "## DataLoader (batch_size 64, list collate, random subset; second epoch timed, workers persistent)", ""]
        if d["status"] != "ok":
            L.append(d["status"])
        else:
            L.append(f"torch {d['torch']}, {d['samples']:,} samples per epoch")
            L.append("")
            rows = []
            for k, v in d["samples_per_s"].items():
                w = k.split(", ")[1]
                refk = f"packds, {w}"
                rows.append([k, mmx(v, 0), ratio(median(d["samples_per_s"][refk]), median(v))])
            L.append(table(["dataset, workers", "samples/s", "packds ÷ this"], rows))
    if "slowfs" in res:
        s = res["slowfs"]
        L += ["", "## Lustre-like filesystem (slowfs FUSE mirror, defaults, fresh mount per tool)", ""]
        if s["status"] != "ok":
            L.append(s["status"])
        else:
            rows = []
            ref = median(s["seconds"]["packds pack"])
            for k, v in s["seconds"].items():
                rows.append([f"`{k}`", mmx(v, 2), f"{s['files'] / median(v):,.0f}" if v else "—", ratio(median(v), ref)])
            L.append(f"{s['files']:,} files, {s['bytes'] / 1e6:,.1f} MB")
            L.append("")
            L.append(table(["tool", "seconds", "files/s", "packds files/s ÷ this"], rows))
    return "\n".join(L) + "\n"


def versions(avail):
    out = []
    for mod, kind in (("webdataset", "wds"), ("streaming", "mds"), ("h5py", "h5"), ("torch", "torch"), ("wids", "wids")):
        if avail.get(kind):
            out.append(f"{mod}: not installed")
            continue
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version({'streaming': 'mosaicml-streaming'}.get(mod, mod if mod != 'wids' else 'webdataset'))}")
        except Exception:  # noqa: BLE001
            out.append(f"{mod} ?")
    sq = bpr.sh(["mksquashfs", "-version"]).splitlines()
    out.append(sq[0] if sq and sq[0] != "?" else "mksquashfs: not installed")
    return ", ".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--median-size", type=int, default=8192)
    ap.add_argument("--sigma", type=float, default=0.7, help="log-normal shape of file sizes")
    ap.add_argument("--src", help="use this tree instead of generating one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reads", type=int, default=30_720, help="random single-sample draws per method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-root", default="/dev/shm")
    ap.add_argument("--stage-gb", type=float, default=1.0)
    ap.add_argument("--stage-work", default="/var/tmp/packds-run-stage")
    ap.add_argument("--no-stage", action="store_true")
    ap.add_argument("--dl-samples", type=int, default=10_000)
    ap.add_argument("--slowfs", action="store_true", help="only the Lustre-like FUSE scenario")
    ap.add_argument("--slowfs-files", type=int, default=2000)
    ap.add_argument("--json", default=os.path.join(HERE, "out", "run.json"))
    ap.add_argument("--tar", default="tar")
    a = ap.parse_args(argv)
    avail = {k: peers.have(k) for k in ("torch", "wds", "wids", "h5", "mds")}
    for k, v in avail.items():
        if v:
            say(f"bench/run.py: {k}: {v}")
    res = {"machine": bpr.machine_info(a, [os.path.relpath(__file__, os.getcwd())] + argv), "args": vars(a),
           "peer_versions": versions(avail), "available": avail, "work": a.work_root}
    if a.slowfs:
        res["slowfs"] = bench_slowfs(a)
    else:
        work = tempfile.mkdtemp(prefix="packds-run-", dir=a.work_root)
        res["work"] = work
        try:
            if a.src:
                src, tree = a.src, bpr.scan_tree(a.src)
            else:
                src = os.path.join(work, "tree")
                os.makedirs(src)
                tree = make_tree(src, a.files, a.dirs, a.median_size, a.sigma, a.seed)
            res["tree"] = tree
            say(f"tree: {tree['files']:,} files, {tree['bytes'] / 1e6:,.0f} MB")
            res["pack"] = bench_pack(src, work, tree, a, avail)
            p = {k: v.get("path") if "seconds" in v else None for k, v in res["pack"].items()}
            paths = {"packds": p["packds pack"], "tar": p["tar -cf"], "h5": p["h5py (one uint8 array + offsets)"],
                     "mds": p["MosaicML MDSWriter"], "wids": p["webdataset ShardWriter"] and os.path.join(p["webdataset ShardWriter"], "wids.json")}
            PATHS.update(paths)
            for k in ("t.tar.zst", "t.sqfs"):  # not read below; free the tmpfs
                rm(os.path.join(work, k))
            say("open ...")
            res["open"] = bench_open(paths, a, avail)
            say("random reads ...")
            res["reads"] = bench_reads(paths, src, a, avail)
            say("DataLoader ...")
            res["dataloader"] = bench_dataloader(paths, src, a, avail)
        finally:
            rm(work)
        if not a.no_stage:
            say("stage (cold cache) ...")
            res["stage"] = bench_stage_run(a)
    md = render(res)
    print(md)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
