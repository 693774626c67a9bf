"""E1: a shard truncated (or overwritten) in place while a dataset is open. Reading a mapped page
past a file's new end raises SIGBUS, which would kill the process (a DataLoader worker crash);
packds' guard turns it into a FormatError naming the shard, and leaves every other SIGBUS alone.
Each case runs in a child process, so a signal death shows as a failure, not a crashed suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import _helpers as h
import packds

CHILD = textwrap.dedent(
    """
    import os, sys, packds
    ds_dir, how = sys.argv[1], sys.argv[2]
    ds = packds.open(ds_dir, verify=(how == "verify"))
    n = len(ds)
    before = [ds[i] for i in range(n)]
    path, off, size = ds.locate(n - 1)
    os.truncate(path, 4096)  # the shard shrinks under the mapping
    errors = ok = 0
    for i in range(n):
        try:
            b = ds.get_many([i])[0] if how == "get_many" else ds.raw(i) if how == "raw" else ds[i]
            assert b == before[i], i  # never wrong bytes
            ok += 1
        except packds.FormatError as e:
            assert "truncated or overwritten while this dataset was open" in str(e) and e.hint, e
            errors += 1
    print(ok, errors)
    """
)


@pytest.fixture
def ds_dir(work):
    src = os.path.join(work, "src")
    for i in range(64):
        h.write(src, f"f{i:03}", bytes([i]) * 3000)
    out = os.path.join(work, "d.pds")
    packds.pack(src, out)
    return out


@pytest.mark.parametrize("how", ["getitem", "get_many", "raw", "verify"])
@pytest.mark.parametrize("faulthandler", [False, True])
def test_e1_shard_truncated_while_open_is_a_format_error_not_a_crash(ds_dir, how, faulthandler):
    args = [sys.executable, *(["-X", "faulthandler"] if faulthandler else []), "-c", CHILD, ds_dir, how]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"rc={r.returncode} ({signal.Signals(-r.returncode).name if r.returncode < 0 else ''})\n{r.stderr}"
    ok, errors = map(int, r.stdout.split())
    assert ok >= 1 and errors >= 50, (ok, errors)  # the first 4 KiB still read; the rest refused


def test_e1_compressed_samples_too(work):
    src = os.path.join(work, "src")
    for i in range(64):
        h.write(src, f"f{i:03}", (b"text %d " % i) * 400)
    out = os.path.join(work, "z.pds")
    packds.pack(src, out, compress="zstd")
    r = subprocess.run([sys.executable, "-c", CHILD, out, "getitem"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ok, errors = map(int, r.stdout.split())
    assert errors >= 1


def test_a_sigbus_that_is_not_packds_still_kills(ds_dir, work):
    """The guard only handles faults in packds' own mappings: any other SIGBUS still ends the
    process as before (here: a Python mmap of a truncated file, after packds installed its
    handler)."""
    code = textwrap.dedent(
        f"""
        import mmap, os, packds
        packds.open({ds_dir!r})[0]   # installs the guard
        p = {os.path.join(work, "other")!r}
        open(p, "wb").write(b"x" * 65536)
        f = open(p, "rb")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate(p, 0)
        print(m[40000])
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
