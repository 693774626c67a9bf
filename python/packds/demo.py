"""``packds demo``: generate an ImageNet-like tree, pack it, read it back at random, and put the
same work done by plain ``tar`` and by Python file reads beside it."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from ._fmt import human


def make_tree(root: str, files: int, seed: int = 0) -> tuple[int, int]:
    """ImageNet-like layout: class directories ``n0xxxxxxx/`` of ``n0xxxxxxx_NNNN.JPEG`` files,
    sizes log-normal (median 8 KiB, a few hundred KiB at the tail), incompressible content."""
    rng = random.Random(seed)
    classes = max(1, files // 200)
    names = sorted({f"n{rng.randrange(10**7, 10**8):08d}" for _ in range(classes * 2)})[:classes]
    total = 0
    blob = os.urandom(1 << 20)
    for i in range(files):
        c = names[i % classes]
        d = os.path.join(root, c)
        if i < classes:
            os.makedirs(d, exist_ok=True)
        size = int(min(max(rng.lognormvariate(9.0, 0.9), 300), 1 << 20))  # e^9 ≈ 8.1 KiB
        start = rng.randrange(0, len(blob) - size + 1)
        with open(os.path.join(d, f"{c}_{i:06d}.JPEG"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0" + blob[start : start + size - 4])
        total += size
    return files, total


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_demo(files: int = 20_000, workdir: str | None = None, keep: bool = False) -> int:
    import packds

    base = workdir or tempfile.mkdtemp(prefix="packds-demo-", dir=os.environ.get("SLURM_TMPDIR"))
    os.makedirs(base, exist_ok=True)
    src, out, tarpath = (os.path.join(base, n) for n in ("tree", "tree.pds", "tree.tar"))
    try:
        for p in (src, out):
            shutil.rmtree(p, ignore_errors=True)
        os.makedirs(src)
        say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
        say(f"packds demo: generating {files:,} ImageNet-like files in {src} ...")
        n, total = make_tree(src, files)
        say(f"  {n:,} files, {human(total)} in {max(1, n // 200)} class directories")

        rows = []
        t_pack = _time(lambda: packds.pack(src, out))
        rows.append(("packds pack", n / t_pack, total / t_pack / 1e6))
        if shutil.which("tar"):
            t_tar = _time(lambda: subprocess.run(["tar", "-cf", tarpath, "-C", src, "."], check=True))
            rows.append(("tar -cf", n / t_tar, total / t_tar / 1e6))

        ds = packds.open(out)
        rng = random.Random(1)
        reads = min(20_000, 4 * n)
        idx = [rng.randrange(n) for _ in range(reads)]
        keys = [ds.key(i) for i in idx]
        paths = [os.path.join(src, k) for k in keys]

        def read_ds():
            for i in idx:
                ds[i]

        def read_files():
            for p in paths:
                with open(p, "rb") as f:
                    f.read()

        t_open_ds = _time(lambda: packds.open(out))
        read_ds()  # warm both the same way: one pass each before timing
        read_files()
        t_ds = _time(read_ds)
        t_files = _time(read_files)
        res = [("packds ds[i]", t_ds / reads * 1e6, t_open_ds * 1e3),
               ("open().read() loose files", t_files / reads * 1e6, 0.0)]
        if os.path.exists(tarpath):
            t0 = time.perf_counter()
            tf = tarfile.open(tarpath)
            members = {m.name[2:] if m.name.startswith("./") else m.name: m for m in tf.getmembers()}
            t_open_tar = time.perf_counter() - t0
            fobj = tf.fileobj
            ms = [members[k] for k in keys]

            def read_tar():
                for m in ms:
                    fobj.seek(m.offset_data)
                    fobj.read(m.size)

            read_tar()
            t_tar_r = _time(read_tar)
            res.append(("tarfile seek+read", t_tar_r / reads * 1e6, t_open_tar * 1e3))

        def speedup(r: float) -> str:
            return f"{r:.2f}x faster"

        print()
        print(f"packds demo — {n:,} files, {human(total)}, warm page cache, one run (ratios are what matter)")
        print()
        print(f"{'pack':<28} {'files/s':>10} {'MB/s':>8}   packds is")
        for name, fps, mbs in rows:
            ratio = "" if name == rows[0][0] else speedup(rows[0][1] / fps)
            print(f"{name:<28} {fps:>10,.0f} {mbs:>8,.1f}   {ratio}")
        print()
        print(f"{'random read (' + str(reads) + ' samples)':<28} {'µs/read':>10} {'open ms':>8}   packds is")
        for name, us, open_ms in res:
            ratio = "" if name == res[0][0] else speedup(us / res[0][1])
            print(f"{name:<28} {us:>10.2f} {open_ms:>8.1f}   {ratio}")
        print()
        if keep:
            print(f"dataset kept: {out} ({len(ds):,} samples, {len(ds.manifest['shards'])} shard(s)); try `packds info {out}`")
        return 0
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        elif not keep:
            for p in (src, out, tarpath):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
