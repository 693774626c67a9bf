"""Opt-in (--runslow): a sparse file of 8 GiB + 1 byte, past the ustar size field, packs with a
pax `size` record that tarfile and GNU tar honour. Needs about 9 GB of free disk."""

from __future__ import annotations

import shutil
import subprocess
import tarfile

import pytest

import packds

SIZE = (8 << 30) + 1


@pytest.mark.slow
def test_sparse_file_over_8_gib(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert free > SIZE + (1 << 30), f"needs ~9 GB free under {tmp_path}, has {free / 1e9:.1f} GB"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_small.txt").write_bytes(b"before")
    with open(src / "huge.bin", "wb") as f:
        f.write(b"HEAD")
        f.seek(SIZE - 1)
        f.write(b"Z")
    (src / "z_small.txt").write_bytes(b"after")
    out = tmp_path / "big.pds"
    try:
        s = packds.pack(src, out, threads=2)
        assert s["files"] == 3 and s["bytes"] == SIZE + 11
        ds = packds.open(out)
        i = ds.index("huge.bin")
        assert ds.size(i) == SIZE
        shard, off, size = ds.locate(i)
        assert size == SIZE
        v = ds.view(i)
        assert len(v) == SIZE
        assert v[:4] == b"HEAD" and v[-1:] == b"Z" and v[SIZE // 2 : SIZE // 2 + 4096] == bytes(4096)
        assert ds["a_small.txt"] == b"before" and ds["z_small.txt"] == b"after"
        del v
        # The pax header carries the size; the ustar size field cannot.
        with open(shard, "rb") as f:
            f.seek(off - 512)
            ustar = f.read(512)
            f.seek(max(0, off - 2048))
            before = f.read(min(off, 2048) - 512)
        assert ustar[257:263] == b"ustar\0"
        assert b" size=%d\n" % SIZE in before
        with tarfile.open(shard) as tf:
            members = {m.name: m for m in tf}
            m = members["huge.bin"]
            assert m.size == SIZE and m.offset_data == off
            fobj = tf.extractfile(m)
            assert fobj.read(4) == b"HEAD"
            fobj.seek(SIZE - 1)
            assert fobj.read() == b"Z"
        listing = subprocess.run(["tar", "-tvf", shard], capture_output=True, timeout=600)
        assert listing.returncode == 0, listing.stderr
        assert str(SIZE).encode() in listing.stdout and b"huge.bin" in listing.stdout
        assert ds.verify()["problems"] == []
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
