#!/usr/bin/env python3
"""The node-local shard cache of packds.torch.StreamingDataset against no cache, a fully staged
copy and MosaicML Streaming, on data behind slowfs; 2 simulated nodes x 2 ranks, 2 epochs.

    python bench/bench_cache.py [--quick] [--small-mb 200] [--large-mb 600] [--cache-mb 150]
                                [--mosaic-python PATH] [--work DIR] [--json bench/out/cache.json]

Data: two datasets of incompressible samples (~100 KB, log-normal sizes), one SMALLER than the
two nodes' caches together (each node's share fits its cache) and one LARGER (it does not),
packed once with ``packds pack`` (16 MiB shards) and once with ``streaming.MDSWriter``
(columns {'x': 'bytes'}, the same 16 MiB shard limit, the same sample bytes), all behind one
slowfs mount (../shared/tools/slowfs.c, default latencies, direct_io off: see
bench_torch.build_slowfs). Every row gets a fresh mount and fresh node-local directories.

Each row runs 4 rank processes (2 simulated nodes x 2 ranks; each rank a torch DataLoader with
--workers persistent workers, batch --batch, list collate) that wait for the coordinator between
epochs (a barrier). Per epoch: samples/s = all ranks' samples / wall time from "go" to the last
rank's "done"; shared bytes = delta of the slowfs daemon's /proc/PID/io rchar (every read any
client makes reaches the daemon as a pread of the backing file). Before every epoch the FUSE page
cache of every file on the mount is dropped (an open of a FUSE file without keep_cache
invalidates the kernel's cached pages of it), so an epoch never reads shared data out of this
machine's memory, as on a client whose page cache cannot hold the dataset.

Rows:
  packds + cache     StreamingDataset(cache_dir=<node dir>, cache_limit=--cache-mb, prefetch=2,
                     partition "auto" = "node"), nodes=2
  packds, no cache   StreamingDataset(cache_dir=None) (partition "auto" = "global")
  packds, staged     `packds stage --to <local dir>` first (its copy counted as setup bytes),
                     then StreamingDataset on the local copy, no cache, partition="node": the
                     read plan of the cache row, without the cache
  MosaicML           streaming.StreamingDataset(remote=<MDS copy on the mount>, local=<node
                     dir>, cache_limit=--cache-mb, shuffle=True, predownload default), launched
                     with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (it derives 2 nodes);
                     stale shared memory cleaned before and after
--mosaic-python: the interpreter for the MosaicML rows (default: this one); the row reads "not
installed" when it cannot import streaming. Markdown on stdout, JSON in --json; no asserts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MB = 1_000_000
BLOCK = 4 << 20


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the samples (the same bytes for packds and MosaicML)


def samples(total_bytes: int, median: int, seed: int):
    """(index, bytes) of incompressible samples, log-normal sizes around ``median``, until
    ``total_bytes``; deterministic for ``seed``."""
    rng = random.Random(seed)
    blob = rng.randbytes(32 << 20)
    done, i = 0, 0
    while done < total_bytes:
        size = max(1024, min(4 * median, int(rng.lognormvariate(math.log(median), 0.3))))
        off = rng.randrange(len(blob) - size)
        b = i.to_bytes(8, "little") + blob[off + 8 : off + size]
        yield i, b
        done += size
        i += 1


def make_pds(tree: str, out: str, total: int, median: int, seed: int, shard: int) -> None:
    import packds

    for i, b in samples(total, median, seed):
        d = os.path.join(tree, f"c{i % 100:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"s{i:07d}.bin"), "wb") as f:
            f.write(b)
    packds.pack(tree, out, shard_size=shard, force=True)
    shutil.rmtree(tree)


def make_mds(out: str, total: int, median: int, seed: int, shard: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"x": "bytes"}, size_limit=shard) as w:
        for _, b in samples(total, median, seed):
            w.write({"x": b})


# ---------------------------------------------------------------------------------------------
# rank processes: "@@ready", then per "go E" line on stdin one epoch and "@@done N BYTES"


def collate_list(batch):
    return batch


def rank_main(cfg: dict) -> None:
    import torch  # noqa: F401  (before the dataset: MosaicML imports it anyway)
    from torch.utils.data import DataLoader

    r = cfg["rank"]
    if cfg["kind"] == "mosaic":
        from streaming import StreamingDataset

        ds = StreamingDataset(remote=cfg["path"], local=cfg["local"], cache_limit=cfg["cache_limit"], shuffle=True,
                              shuffle_seed=cfg["seed"], batch_size=cfg["batch"])

        def size(s):
            return len(s["x"])
    else:
        import packds.torch as pt

        kw = dict(seed=cfg["seed"], block_size=BLOCK, rank=r, world_size=cfg["world"], nodes=cfg["nodes"],
                  cache_dir=cfg["cache_dir"], partition=cfg["partition"])
        if cfg["cache_dir"]:
            kw.update(cache_limit=cfg["cache_limit"], prefetch=cfg["prefetch"])
        ds = pt.StreamingDataset(cfg["path"], **kw)

        def size(s):
            return len(s)
    w = cfg["workers"]
    dl = DataLoader(ds, batch_size=cfg["batch"], num_workers=w, collate_fn=collate_list, persistent_workers=w > 0,
                    multiprocessing_context="fork" if w else None)
    print("@@ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "go":
            break
        e = int(cmd[1])
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(e)
        n = nbytes = 0
        for b in dl:
            n += len(b)
            nbytes += sum(size(s) for s in b)
        print(f"@@done {n} {nbytes}", flush=True)
    del dl


# ---------------------------------------------------------------------------------------------
# coordinator


def daemon_pid(exe: str, mnt: str) -> int | None:
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode(errors="replace")) == os.path.basename(exe) and mnt.encode() in argv:
            return int(p)
    return None


def rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def drop_fuse_cache(mnt: str) -> None:
    """Opens every file on the mount once: FUSE drops the kernel's cached pages of a file on
    open unless the server asked to keep them (slowfs does not)."""
    for root, _, files in os.walk(mnt):
        for name in files:
            try:
                os.close(os.open(os.path.join(root, name), os.O_RDONLY))
            except OSError:
                pass


def fetch_log(cache_dir: str) -> list:
    import packds._core as core

    if not os.path.isdir(cache_dir):
        return []
    return core.ShardCache(cache_dir, 1).fetch_log()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_mosaic_shm(py: str) -> None:
    subprocess.run([py, "-c", "from streaming.base.util import clean_stale_shared_memory as c; c()"],
                   capture_output=True, timeout=120)


def run_row(name: str, kind: str, path: str, py: str, a, work: str, mnt: str, pid: int, nodes: int, ranks: int,
            extra: dict) -> dict:
    world = nodes * ranks
    port = free_port()
    logdir = os.path.join(work, "logs")
    os.makedirs(logdir, exist_ok=True)
    procs = []
    holders: list = []
    for r in range(world):
        node = r // ranks
        cfg = dict(kind=kind, rank=r, world=world, nodes=nodes, ranks=ranks, path=path, seed=0, batch=a.batch, workers=a.workers,
                   cache_limit=a.cache_mb * MB, prefetch=2, partition="auto", cache_dir=None)
        cfg.update(extra)
        env = dict(os.environ)
        if kind == "mosaic":
            cfg["local"] = os.path.join(work, "mosaic", f"node{node}")
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % ranks), LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        elif cfg.get("cache_dir"):
            cfg["cache_dir"] = os.path.join(cfg["cache_dir"], f"node{node}")
        log = open(os.path.join(logdir, f"{name.replace(' ', '_').replace(',', '')}-{r}.log"), "w")
        cmd = [py, os.path.abspath(__file__), "--rank-cfg", json.dumps(cfg)]
        if kind == "mosaic":
            # MosaicML keys its shared memory (/dev/shm) and file locks (the temp dir) by the
            # machine: two nodes on one machine would share both. Each simulated node gets its
            # own /dev/shm (a mount namespace with a fresh tmpfs there, held by a sleeping
            # process its ranks enter) and its own TMPDIR.
            if node == len(holders):
                holders.append(node_namespace())
            tmp = os.path.join(work, "mosaic", f"tmp{node}")
            os.makedirs(tmp, exist_ok=True)
            env["TMPDIR"] = tmp
            cmd = ["nsenter", f"--mount=/proc/{holders[node].pid}/ns/mnt", "--"] + cmd
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        procs.append((p, log))

    def wait_for(tag: str) -> list[list[str]]:
        out = []
        for p, _ in procs:
            while True:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name}: rank exited (rc {p.wait()}); see {logdir}")
                if line.startswith("@@" + tag):
                    out.append(line.split()[1:])
                    break
        return out

    res: dict = {"epochs": []}
    try:
        r0 = rchar(pid)
        wait_for("ready")
        res["setup_shared_bytes"] = rchar(pid) - r0
        caches = [os.path.join(extra["cache_dir"], f"node{n}") for n in range(nodes)] if extra.get("cache_dir") else []
        seen = [0] * len(caches)
        for e in range(a.epochs):
            drop_fuse_cache(mnt)
            b0 = rchar(pid)
            t = time.perf_counter()
            for p, _ in procs:
                p.stdin.write(f"go {e}\n")
                p.stdin.flush()
            done = wait_for("done")
            dt = time.perf_counter() - t
            got = rchar(pid) - b0
            n = sum(int(d[0]) for d in done)
            ep = {"samples": n, "sample_bytes": sum(int(d[1]) for d in done), "seconds": dt, "samples_per_s": n / dt,
                  "shared_bytes": got}
            if caches:
                logs = [fetch_log(c) for c in caches]
                ep["fetches"] = sum(len(lg) - s for lg, s in zip(logs, seen))
                ep["fetched_bytes"] = sum(sum(x[1] for x in lg[s:]) for lg, s in zip(logs, seen))
                seen = [len(lg) for lg in logs]
            res["epochs"].append(ep)
            say(f"  {name}: epoch {e + 1}: {n:,} samples in {dt:.1f} s = {n / dt:,.0f}/s; shared {got / MB:,.1f} MB"
                + (f"; {ep['fetches']} fetches ({ep['fetched_bytes'] / MB:,.0f} MB)" if caches else ""))
    finally:
        for p, _log in procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p, log in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        for h in holders:
            h.kill()
            h.wait()
    return res


def node_namespace() -> subprocess.Popen:
    """A process in a new mount namespace with its own tmpfs on /dev/shm, sleeping."""
    h = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          "mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm && exec sleep 100000"])
    for _ in range(300):
        try:
            with open(f"/proc/{h.pid}/cmdline", "rb") as f:
                if f.read().startswith(b"sleep"):
                    return h
        except OSError:
            pass
        if h.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("could not make a mount namespace with its own /dev/shm (unshare, root needed)")


def mosaic_ok(py: str) -> tuple[bool, str]:
    r = subprocess.run([py, "-c", "import streaming, torch; print(streaming.__version__)"], capture_output=True, text=True)
    if r.returncode:
        return False, "not installed"
    return True, r.stdout.strip()


def build_data(a, back: str, py_mosaic: str | None) -> dict:
    info = {}
    for name, mb in (("small", a.small_mb), ("large", a.large_mb)):
        pds = os.path.join(back, f"{name}.pds")
        shard = a.shard_mb << 20
        tag = f"{mb}-{a.sample_kb}-{shard}"
        stamp = os.path.join(back, f"{name}.tag")
        ok = os.path.exists(stamp) and open(stamp).read() == tag
        if not ok:
            for p in (pds, os.path.join(back, f"{name}.mds")):
                shutil.rmtree(p, ignore_errors=True)
            say(f"writing {name}: {mb} MB")
            make_pds(os.path.join(back, f"tree-{name}"), pds, mb * MB, a.sample_kb * 1000, len(name), shard)
        mds = os.path.join(back, f"{name}.mds")
        if py_mosaic and not os.path.exists(os.path.join(mds, "index.json")):
            subprocess.run([py_mosaic, os.path.abspath(__file__), "--make-mds", mds, str(mb * MB), str(a.sample_kb * 1000),
                            str(len(name)), str(shard)], check=True)
        with open(stamp, "w") as f:
            f.write(tag)
        import packds

        ds = packds.open(pds)
        m = ds.manifest
        info[name] = {"samples": len(ds), "bytes": sum(s["size"] for s in m["shards"]), "shards": len(m["shards"]),
                      "pds": pds, "mds": mds if py_mosaic else None}
    return info


def fmt_mb(b) -> str:
    return "—" if b is None else f"{b / MB:,.0f}"


def ratio(a, b) -> float | None:
    return None if a is None or b is None or not b else a / b


def fmt_r(x, pct=False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f} %" if pct else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--make-mds", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="60 / 180 MB datasets, 8 MiB shards, cache 45 MB per node")
    ap.add_argument("--small-mb", type=int, default=200)
    ap.add_argument("--large-mb", type=int, default=600)
    ap.add_argument("--cache-mb", type=int, default=150, help="cache limit per node (MB)")
    ap.add_argument("--sample-kb", type=int, default=100)
    ap.add_argument("--shard-mb", type=int, default=16, help="shard size in MiB (packds and MDS)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rows", default="cache,nocache,staged,mosaic")
    ap.add_argument("--datasets", default="small,large")
    ap.add_argument("--mosaic-python", default=sys.executable)
    ap.add_argument("--work", default="/var/tmp/packds-bench-cache")
    ap.add_argument("--json", default=os.path.join(HERE, "out", "cache.json"))
    a = ap.parse_args()
    if a.rank_cfg:
        rank_main(json.loads(a.rank_cfg))
        return 0
    if a.make_mds:
        make_mds(a.make_mds[0], *(int(x) for x in a.make_mds[1:]))
        return 0
    a.mosaic_python = os.path.abspath(a.mosaic_python) if os.sep in a.mosaic_python else a.mosaic_python
    if a.quick:
        a.small_mb, a.large_mb, a.cache_mb, a.shard_mb = 60, 180, 45, 8

    sys.path.insert(0, HERE)
    import bench_pack_read as bpr
    import bench_torch as bt

    load0 = os.getloadavg()
    t_start = time.time()
    os.makedirs(a.work, exist_ok=True)
    exe, why = bt.build_slowfs(a.work)
    if exe is None:
        say(f"slowfs {why}")
        return 1
    m_ok, m_ver = mosaic_ok(a.mosaic_python)
    back = os.path.join(a.work, "backing")
    mnt = os.path.join(a.work, "mnt")
    os.makedirs(back, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    info = build_data(a, back, a.mosaic_python if m_ok else None)
    rows = [r for r in a.rows.split(",") if r]
    names = {"cache": "packds + cache", "nocache": "packds, no cache", "staged": "packds, staged", "mosaic": "MosaicML"}
    results: dict = {}
    for di, dname in enumerate(d for d in a.datasets.split(",") if d):
        d = info[dname]
        order = rows[di % len(rows):] + rows[: di % len(rows)]  # rotated per dataset
        results[dname] = {}
        for row in order:
            name = names[row]
            say(f"{dname} ({d['bytes'] / MB:,.0f} MB, {d['samples']:,} samples, {d['shards']} shards): {name}")
            if row == "mosaic" and not m_ok:
                results[dname][row] = {"status": m_ver}
                continue
            for sub in ("cache", "mosaic", "staged"):
                shutil.rmtree(os.path.join(a.work, sub), ignore_errors=True)
            with bt.Mount(exe, back, mnt):
                pid = daemon_pid(exe, mnt)
                if pid is None:
                    raise RuntimeError("slowfs daemon not found")
                rel = os.path.relpath(d["pds"], back)
                extra: dict = {}
                path, py, kind, setup = os.path.join(mnt, rel), sys.executable, "packds", None
                nodes = 2
                if row == "cache":
                    os.makedirs(os.path.join(a.work, "cache"))
                    extra = {"cache_dir": os.path.join(a.work, "cache")}
                elif row == "staged":
                    dest = os.path.join(a.work, "staged")
                    os.makedirs(dest)
                    drop_fuse_cache(mnt)
                    b0, t0 = rchar(pid), time.perf_counter()
                    out = subprocess.run([sys.executable, "-m", "packds", "stage", path, "--to", dest, "--policy", "local",
                                          "-q"], capture_output=True, text=True, check=True)
                    setup = {"stage_seconds": time.perf_counter() - t0, "stage_shared_bytes": rchar(pid) - b0}
                    path = out.stdout.strip().splitlines()[-1]
                    extra = {"partition": "node"}
                elif row == "mosaic":
                    kind, py = "mosaic", a.mosaic_python
                    path = os.path.join(mnt, os.path.relpath(d["mds"], back))
                    clean_mosaic_shm(py)
                try:
                    res = run_row(name, kind, path, py, a, a.work, mnt, pid, nodes, 2, extra)
                    res["status"] = "ok"
                except RuntimeError as e:
                    res = {"status": f"failed: {e}"}
                    say(f"  {name}: {e}")
                if setup:
                    res.update(setup)
                if row == "mosaic":
                    clean_mosaic_shm(py)
            results[dname][row] = res

    # ------------------------------------------------------------------------ report
    def ep(dn, row, e, key):
        r = results.get(dn, {}).get(row, {})
        eps = r.get("epochs") or []
        return eps[e].get(key) if len(eps) > e else None

    lines = [
        f"{a.workers} DataLoader worker(s) per rank, batch {a.batch}, 2 nodes x 2 ranks, {a.epochs} epochs, "
        f"cache limit {a.cache_mb} MB per node, shards {a.shard_mb} MiB, blocks 4 MiB, samples ~{a.sample_kb} KB",
        "",
        "| dataset | row | epoch 1 shared MB | epoch 2 shared MB | epoch 2 ÷ epoch 1 shared | epoch 1 samples/s | epoch 2 samples/s | "
        "cache fetches e1 / e2 (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dn in results:
        d = info[dn]
        label = f"{dn}: {d['bytes'] / MB:,.0f} MB, {d['shards']} shards"
        for row in rows:
            r = results[dn].get(row, {})
            if r.get("status") != "ok":
                lines.append(f"| {label} | {names[row]} | {r.get('status', '—')} | | | | | |")
                continue
            s1, s2 = ep(dn, row, 0, "shared_bytes"), ep(dn, row, 1, "shared_bytes")
            f = "—"
            if ep(dn, row, 0, "fetches") is not None:
                f = " / ".join(f"{ep(dn, row, e, 'fetches')} ({ep(dn, row, e, 'fetched_bytes') / MB:,.0f})"
                               for e in range(a.epochs))
            extra = f" (+{r['stage_shared_bytes'] / MB:,.0f} MB staging, {r['stage_seconds']:.1f} s)" if "stage_shared_bytes" in r else ""
            lines.append(f"| {label} | {names[row]}{extra} | {fmt_mb(s1)} | {fmt_mb(s2)} | {fmt_r(ratio(s2, s1), True)} | "
                         f"{ep(dn, row, 0, 'samples_per_s') or 0:,.0f} | {ep(dn, row, 1, 'samples_per_s') or 0:,.0f} | {f} |")
    lines += ["", "| dataset | measure | goal | measured | met |", "|---|---|---|---:|---|"]
    goals = []
    for dn in results:
        g = [
            ("packds + cache: epoch 2 ÷ epoch 1 shared bytes", "≤ 5 %" if dn == "small" else "—",
             ratio(ep(dn, "cache", 1, "shared_bytes"), ep(dn, "cache", 0, "shared_bytes")), True,
             (lambda x: x <= 0.05) if dn == "small" else None),
            ("epoch 2 samples/s: packds + cache ÷ staged", "≥ 0.83 (1/1.2)",
             ratio(ep(dn, "cache", 1, "samples_per_s"), ep(dn, "staged", 1, "samples_per_s")), False, lambda x: x >= 1 / 1.2),
        ]
        for e in range(a.epochs):
            g.append((f"epoch {e + 1} samples/s: packds + cache ÷ MosaicML", "> 1",
                      ratio(ep(dn, "cache", e, "samples_per_s"), ep(dn, "mosaic", e, "samples_per_s")), False, lambda x: x > 1))
        for e in range(a.epochs):
            g.append((f"epoch {e + 1} shared bytes: packds + cache ÷ MosaicML", "—",
                      ratio(ep(dn, "cache", e, "shared_bytes"), ep(dn, "mosaic", e, "shared_bytes")), False, None))
        for e in range(a.epochs):
            g.append((f"epoch {e + 1} shared bytes: packds + cache ÷ no cache", "—",
                      ratio(ep(dn, "cache", e, "shared_bytes"), ep(dn, "nocache", e, "shared_bytes")), False, None))
        for what, goal, x, pct, test in g:
            met = "—" if test is None or x is None else ("yes" if test(x) else "**no**")
            lines.append(f"| {dn} | {what} | {goal} | {fmt_r(x, pct)} | {met} |")
            goals.append({"dataset": dn, "measure": what, "goal": goal, "value": x, "met": met})
    load1 = os.getloadavg()
    lines += ["", f"Machine: nproc {os.cpu_count()}, load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; "
              f"run took {(time.time() - t_start) / 60:.1f} min; MosaicML Streaming {m_ver}."]
    print("\n".join(lines))
    out = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": bpr.sh(["git", "rev-parse", "--short", "HEAD"], cwd=REPO), "args": vars(a), "datasets": info,
           "results": results, "goals": goals, "nproc": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1,
           "mosaic": m_ver, "table": "\n".join(lines)}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
