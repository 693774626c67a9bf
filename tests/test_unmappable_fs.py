"""A filesystem that cannot map files: FUSE mounts with direct I/O answer mmap with ENODEV (the
slowfs tool in ../shared/tools is one). packds then reads those shards with pread, so open,
reads, get_many, view, verify and unpack all work, with the same bytes.

Needs FUSE and the slowfs build tools (.ci/run installs them); skipped without them unless
PACKDS_REQUIRE_TOOLS=1, where that is a failure."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import time

import pytest

import _helpers as h
import packds

SLOWFS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "slowfs.c")


def _unavailable(why: str):
    if os.environ.get("PACKDS_REQUIRE_TOOLS") == "1":
        pytest.fail(f"PACKDS_REQUIRE_TOOLS=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def fuse_mirror(work):
    """Mounts a slowfs mirror (no added latency) of ``work/src-ds`` at ``work/mnt``."""
    if not os.path.exists(SLOWFS):
        _unavailable("../shared/tools/slowfs.c is not there")
    if shutil.which("fusermount3") is None or shutil.which("pkg-config") is None or not os.path.exists("/dev/fuse"):
        _unavailable("FUSE 3 is not installed (apt-get install fuse3 libfuse3-dev pkg-config)")
    exe = os.path.join(work, "slowfs")
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True)
    if flags.returncode != 0:
        _unavailable("libfuse3-dev is not installed")
    r = subprocess.run(["cc", "-O2", "-o", exe, SLOWFS, *flags.stdout.split()], capture_output=True, text=True)
    if r.returncode != 0:
        _unavailable(f"slowfs does not build: {r.stderr.strip()[:200]}")
    src, mnt = os.path.join(work, "src-ds"), os.path.join(work, "mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    env = {**os.environ, "SLOWFS_META_US": "0", "SLOWFS_READ_US": "0"}
    r = subprocess.run([exe, src, mnt], capture_output=True, text=True, env=env, timeout=30)
    if r.returncode != 0:
        _unavailable(f"cannot mount slowfs: {r.stderr.strip()[:200]}")
    try:
        yield src, mnt
    finally:
        for _ in range(20):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_reads_through_a_filesystem_that_cannot_map(fuse_mirror, work, compress):
    src, mnt = fuse_mirror
    tree = os.path.join(work, "tree")
    for i in range(300):
        h.write(tree, f"d{i % 4}/f{i:03}", (b"%d " % i) * (i * 7 % 900))
    packds.pack(tree, os.path.join(src, "d.pds"), shard_size=64 << 10, compress=compress)
    ds_path = os.path.join(mnt, "d.pds")
    shard = os.path.join(ds_path, "shard-00000.tar")
    with open(shard, "rb") as f, pytest.raises(OSError):  # the premise: mmap is refused here
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    ref = packds.open(os.path.join(src, "d.pds"))
    ds = packds.open(ds_path)
    want = [ref[i] for i in range(len(ref))]
    assert [ds[i] for i in range(len(ds))] == want
    assert ds.get_many(list(range(len(ds)))[::-1]) == want[::-1]
    assert [bytes(ds.view(i)) for i in range(0, len(ds), 7)] == want[::7]
    assert [ds.raw(i) for i in range(len(ds))] == [ref.raw(i) for i in range(len(ref))]
    assert packds.open(ds_path, verify=True)[5] == want[5]
    buf, offsets = ds.read_range(10, 60, out=bytearray())  # one pread for the block
    assert [bytes(buf[offsets[k] : offsets[k + 1]]) for k in range(50)] == want[10:60]
    assert [(a, b) for a, b in ds.blocks(8192)] == [(a, b) for a, b in ref.blocks(8192)]
    assert ds.verify(deep=True)["problems"] == []
    dest = os.path.join(work, "out")
    assert ds.unpack(dest) == len(want)
    assert subprocess.run(["diff", "-r", tree, dest]).returncode == 0
