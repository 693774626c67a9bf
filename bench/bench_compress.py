#!/usr/bin/env python3
"""packds benchmark: compression modes and HDF5 shards, side by side in one run.

    python3 bench/bench_compress.py               # ~2-4 min: 20k text-like + 4k JPEG-like files
    python3 bench/bench_compress.py --files 5000  # quicker

Reports, as ratios (never single absolute times; the machine is shared and noisy):
  1. stored size / input size for --compress none, zstd, zstd + --zstd-dict, auto, on a
     text-like tree (captions/JSON: small, similar) and a JPEG-like tree (JPEG header +
     entropy-coded-like bytes), and each mode's pack time relative to none;
  2. pack time of --format h5 relative to tar (same tree, same options);
  3. random ds[i] on an h5 dataset relative to the same dataset as tar (the goal is within
     1.2x), and plain h5py reading the same HDF5 file per sample (f["data"][o:o+n], offsets
     already in memory) relative to packds; also compressed reads relative to raw ones.

All data lives on tmpfs (/dev/shm); reads are warm. Rounds are interleaved; medians are
reported with their spread. Nothing here asserts on timings. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import packds


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


WORDS = (
    "a photo of the small large red blue dog cat bird car tree house on in at with near under grass "
    "street water sky beach people man woman child playing sitting standing label id caption class"
).split()


def make_text_tree(root: str, n: int, rng: random.Random) -> None:
    for i in range(n):
        d = os.path.join(root, f"c{i % 50:03}")
        os.makedirs(d, exist_ok=True)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 600)))
        body = json.dumps({"id": i, "class": i % 50, "caption": words, "source": "synthetic", "width": 640, "height": 480})
        with open(os.path.join(d, f"{i:07}.json"), "w") as f:
            f.write(body)


def make_jpeg_tree(root: str, n: int, rng: random.Random) -> None:
    for i in range(n):
        d = os.path.join(root, f"n{i % 20:03}")
        os.makedirs(d, exist_ok=True)
        size = rng.randrange(20_000, 160_000)
        # A JFIF header, then bytes as incompressible as JPEG's entropy-coded data.
        data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + rng.randbytes(size)
        with open(os.path.join(d, f"{i:07}.jpg"), "wb") as f:
            f.write(data)


def timed_pack(src: str, out: str, **opts) -> float:
    if os.path.exists(out):
        shutil.rmtree(out)
    t = time.perf_counter()
    packds.pack(src, out, **opts)
    return time.perf_counter() - t


def read_loop(fn, idx) -> float:
    t = time.perf_counter_ns()
    for i in idx:
        fn(i)
    return (time.perf_counter_ns() - t) / len(idx)


def spread(xs) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000, help="text-like files (JPEG-like: a fifth of that)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=20_000, help="random reads per method per round")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="packds-bench-compress-", dir=a.dir)
    rng = random.Random(7)
    res: dict = {"files": a.files, "rounds": a.rounds, "packds": packds.__version__}
    try:
        text, jpeg = os.path.join(base, "text"), os.path.join(base, "jpeg")
        say(f"generating {a.files} text-like and {a.files // 5} JPEG-like files in {base} ...")
        make_text_tree(text, a.files, rng)
        make_jpeg_tree(jpeg, a.files // 5, rng)

        # 1. stored size and pack time per mode.
        modes = {"none": {}, "zstd": {"compress": "zstd"}, "zstd+dict": {"compress": "zstd", "zstd_dict": True}, "auto": {"compress": "auto"}}
        say("\n## 1. Stored size / input size, pack time relative to --compress none (tar shards)")
        print("\n| tree | mode | stored / input | pack time / none (median, range) |\n|---|---|---|---|")
        for tname, src in (("text-like", text), ("JPEG-like", jpeg)):
            times = {m: [] for m in modes}
            refused = {}
            for _ in range(max(3, a.rounds // 2)):
                for m, o in modes.items():
                    if m in refused:
                        continue
                    try:
                        times[m].append(timed_pack(src, os.path.join(base, f"{tname}-{m}.pds"), **o))
                    except packds.UsageError as e:
                        refused[m] = str(e)
            for m in modes:
                if m in refused:
                    print(f"| {tname} | {m} | refused: {refused[m]} | — |")
                    continue
                man = packds.open(os.path.join(base, f"{tname}-{m}.pds")).manifest
                stored = man.get("compression", {}).get("stored_bytes", man["total_bytes"])
                rel = [t / n for t, n in zip(times[m], times["none"])]
                ratio = stored / man["total_bytes"]
                res.setdefault("size", {})[f"{tname}/{m}"] = {"stored_over_input": ratio, "pack_time_over_none": statistics.median(rel)}
                print(f"| {tname} | {m} | {ratio:.3f} | {statistics.median(rel):.2f}× ({spread(rel)}) |")

        # 2. pack time h5 vs tar.
        say("\n## 2. Pack time, --format h5 / tar (same tree, same options)")
        print("\n| tree | compress | h5 time / tar time (median, range) |\n|---|---|---|")
        for tname, src in (("text-like", text), ("JPEG-like", jpeg)):
            for m in ("none", "zstd"):
                rel = []
                for _ in range(max(3, a.rounds // 2)):
                    t_tar = timed_pack(src, os.path.join(base, f"p-tar-{tname}-{m}.pds"), **modes[m])
                    t_h5 = timed_pack(src, os.path.join(base, f"p-h5-{tname}-{m}.pds"), format="h5", **modes[m])
                    rel.append(t_h5 / t_tar)
                res.setdefault("pack_h5_over_tar", {})[f"{tname}/{m}"] = statistics.median(rel)
                print(f"| {tname} | {m} | {statistics.median(rel):.2f}× ({spread(rel)}) |")

        # 3. random reads: tar vs h5 vs plain h5py, raw and compressed (text-like tree).
        import h5py

        say("\n## 3. Random ds[i], text-like tree (warm, tmpfs)")
        sets = {
            "tar": os.path.join(base, "p-tar-text-like-none.pds"),
            "h5": os.path.join(base, "p-h5-text-like-none.pds"),
            "tar zstd": os.path.join(base, "p-tar-text-like-zstd.pds"),
            "h5 zstd": os.path.join(base, "p-h5-text-like-zstd.pds"),
        }
        dss = {k: packds.open(v) for k, v in sets.items()}
        n = len(dss["tar"])
        # plain h5py on the same HDF5 files: offsets and sizes of every shard loaded once
        h5files, rows = [], []
        for si, name in enumerate(sorted(f for f in os.listdir(sets["h5"]) if f.endswith(".h5"))):
            f = h5py.File(os.path.join(sets["h5"], name), "r")
            h5files.append(f)
            off, size = f["offset"][()], f["size"][()]
            rows += [(si, int(o), int(s)) for o, s in zip(off, size)]
        assert len(rows) == n
        h5data = [f["data"] for f in h5files]

        def h5py_read(i):
            si, o, s = rows[i]
            return h5data[si][o : o + s]

        methods = {k: ds.__getitem__ for k, ds in dss.items()}
        methods["h5py (same file)"] = h5py_read
        per = {k: [] for k in methods}
        for r in range(a.rounds):
            idx = [random.Random(r).randrange(n) for _ in range(a.reads)]
            for k, fn in methods.items():
                read_loop(fn, idx[: a.reads // 4])  # warm
                per[k].append(read_loop(fn, idx))
        med = {k: statistics.median(v) for k, v in per.items()}
        res["read_ns"] = med
        print("\n| method | median ns per read | time / packds tar |\n|---|---|---|")
        for k in methods:
            print(f"| {k} | {med[k]:,.0f} | {med[k] / med['tar']:.2f}× |")
        print(f"\nh5 / tar: {med['h5'] / med['tar']:.2f}× (goal ≤ 1.2×); h5py per sample / packds h5: {med['h5py (same file)'] / med['h5']:.1f}×; "
              f"zstd / raw: tar {med['tar zstd'] / med['tar']:.2f}×, h5 {med['h5 zstd'] / med['h5']:.2f}×")
        for f in h5files:
            f.close()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
