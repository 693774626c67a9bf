"""Catalogue I: hostile or odd datasets. A dataset file that is a FIFO or a device (or a
symlink to one), a shard of another size than the manifest says, manifest file names that point
outside the dataset, sample indices of any integer type and size. Every command fails within
seconds with one clear error naming the file, never hangs, never reads without bound.

Commands run in subprocesses with a timeout: a hang fails the test instead of hanging the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import _helpers as h
import packds
from packds import FormatError

# A command that fails must fail within this many seconds (a hang is killed at HANG).
FAST = 10
HANG = 30

_OPEN_CHILD = textwrap.dedent(
    r"""
    import sys, packds
    try:
        packds.open(sys.argv[1], preload=sys.argv[2] == "preload")
    except packds.PackdsError as e:
        print(type(e).__name__ + ": " + str(e)); sys.exit(0)
    print("opened"); sys.exit(3)
    """
)


def _open_child(d: str, preload: bool = False):
    """`packds.open(d)` (and `preload=True`) in a child: FormatError's name and message."""
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _OPEN_CHILD, d, "preload" if preload else "open"], capture_output=True, timeout=HANG)
    assert time.monotonic() - t < FAST, h.show(r)
    h.assert_not_signalled(r)
    assert r.returncode == 0, h.show(r)
    return r.stdout.decode(errors="replace")


def _cli_fails(*args, needle: str | None = None) -> str:
    """The command fails within FAST seconds, the packds way (one error line, a hint, no
    traceback); returns the error line."""
    t = time.monotonic()
    r = h.cli(*args, timeout=HANG)
    assert time.monotonic() - t < FAST, f"took {time.monotonic() - t:.1f} s\n{h.show(r)}"
    return h.assert_cli_error(r, *([needle] if needle else []))


def _dataset_bytes(d: str) -> int:
    m = h.manifest(d)
    return sum(s["size"] for s in m["shards"]) + m["index"]["size"] + os.path.getsize(os.path.join(d, "manifest.json"))


def _nothing_staged(to: str, src: str) -> bool:
    """No copy of `src` and no staging leftovers in `to` (a lock file may stay)."""
    return not os.path.exists(os.path.join(to, os.path.basename(src))) and h.staging_leftovers(to) == []


def _tree_bytes(d: str) -> int:
    n = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            try:
                n += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return n


def _stage_watched(src: str, to: str) -> tuple[subprocess.CompletedProcess, int]:
    """`packds stage SRC --to TO`, watching how many bytes TO holds while it runs: returns the
    result and the most TO ever held."""
    most = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            most[0] = max(most[0], _tree_bytes(to))
            time.sleep(0.005)

    w = threading.Thread(target=watch)
    w.start()
    try:
        t = time.monotonic()
        r = h.cli("stage", src, "--to", to, timeout=HANG)
        assert time.monotonic() - t < FAST, h.show(r)
    finally:
        done.set()
        w.join()
    return r, max(most[0], _tree_bytes(to))


# ------------------------------------------------------------------------------ I1: FIFOs


def _make_fifo(d: str, target: str, how: str) -> str:
    """Replaces dataset file `target` with a FIFO (`how="fifo"`) or a symlink to one outside
    the dataset (`how="symlink"`); returns its path."""
    p = os.path.join(d, target)
    os.remove(p)
    if how == "fifo":
        os.mkfifo(p)
    else:
        f = os.path.join(os.path.dirname(d), f"fifo-{target}")
        os.mkfifo(f)
        os.symlink(f, p)
    return p


@pytest.mark.parametrize("target", ["shard-00001.tar", "index.pdsi", "manifest.json"])
@pytest.mark.parametrize("how", ["fifo", "symlink"])
def test_i1_a_fifo_as_dataset_file_fails_fast_naming_it(small_ds, work, target, how):
    """A FIFO (or a symlink to one) as a shard, the index or the manifest: open, preload,
    verify, info, ls, unpack and stage each fail within seconds with a FormatError (exit 1)
    naming that file; none blocks on the FIFO."""
    p = _make_fifo(small_ds, target, how)
    for preload in (False, True):
        out = _open_child(small_ds, preload)
        assert out.startswith("FormatError") and target in out and "FIFO" in out, out
    for cmd in (["verify", small_ds], ["info", small_ds], ["ls", small_ds], ["unpack", small_ds, os.path.join(work, "un")]):
        _cli_fails(*cmd, needle=target)
    to = os.path.join(work, "to")
    os.mkdir(to)
    err = _cli_fails("stage", small_ds, "--to", to, needle=target)
    assert "FIFO" in err and _nothing_staged(to, small_ds), err
    assert os.path.exists(p)


def test_i1_a_fifo_shard_with_a_writer_attached_is_refused_at_once(small_ds, work):
    """Even while a writer holds the FIFO open (a read would then block until it writes),
    stage and verify refuse it at once: it is never read."""
    fifo = _make_fifo(small_ds, "shard-00001.tar", "fifo")
    fd = os.open(fifo, os.O_RDWR)  # a writer: a blocking read would now wait for data forever
    try:
        to = os.path.join(work, "to")
        os.mkdir(to)
        _cli_fails("stage", small_ds, "--to", to, needle="shard-00001.tar")
        _cli_fails("verify", small_ds, needle="shard-00001.tar")
    finally:
        os.close(fd)


_VIEW_CHILD = textwrap.dedent(
    r"""
    import os, sys, packds
    ds = packds.open(sys.argv[1])
    path, _, _ = ds.locate(0)
    want = ds[0]
    os.rename(path, path + ".moved")
    os.mkfifo(path)
    assert bytes(ds.view(0)) == want  # the reader's own mapping, never the FIFO
    print("ok")
    """
)


def test_i1_view_after_a_shard_became_a_fifo_does_not_block(small_ds):
    """`Dataset.view` maps shards by path on first use: a shard replaced by a FIFO after open
    is never waited on (opened without blocking, refused, the view is of a copy)."""
    r = subprocess.run([sys.executable, "-c", _VIEW_CHILD, small_ds], capture_output=True, timeout=HANG)
    assert r.returncode == 0 and r.stdout.strip() == b"ok", h.show(r)


# ------------------------------------------------------------------------- I2: /dev/zero


@pytest.mark.parametrize("target", ["shard-00001.tar", "index.pdsi"])
def test_i2_a_symlink_to_dev_zero_is_refused_before_any_copy(small_ds, work, target):
    """A shard or the index symlinked to /dev/zero: stage fails fast naming it, the
    destination never holds more than the dataset's size and ends empty; open, preload and
    verify refuse it too."""
    size = _dataset_bytes(small_ds)
    p = os.path.join(small_ds, target)
    os.remove(p)
    os.symlink("/dev/zero", p)
    to = os.path.join(work, "to")
    os.mkdir(to)
    r, most = _stage_watched(small_ds, to)
    err = h.assert_cli_error(r, target)
    assert "character device" in err, err
    assert most <= size, f"the destination held {most} bytes, the dataset is {size}"
    assert _nothing_staged(to, small_ds)
    for preload in (False, True):
        out = _open_child(small_ds, preload)
        assert out.startswith("FormatError") and target in out, out
    _cli_fails("verify", small_ds, needle=target)


def test_i2_a_shard_that_reads_more_than_its_size_says_is_read_one_byte_past_it(small_ds, work):
    """A regular file whose size (fstat) says less than it holds (a /proc file: size 0) as a
    shard the manifest records as 0 bytes: stage reads one byte past the recorded size, fails
    naming the shard and leaves nothing."""
    m = h.manifest(small_ds)
    m["shards"][1]["size"] = 0
    with open(os.path.join(small_ds, "manifest.json"), "w") as f:
        json.dump(m, f)
    p = os.path.join(small_ds, m["shards"][1]["file"])
    os.remove(p)
    os.symlink("/proc/self/mountinfo", p)
    assert os.stat(p).st_size == 0
    to = os.path.join(work, "to")
    os.mkdir(to)
    r, most = _stage_watched(small_ds, to)
    err = h.assert_cli_error(r, m["shards"][1]["file"], "is larger than the 0 bytes manifest.json says")
    assert most <= _dataset_bytes(small_ds), err
    assert _nothing_staged(to, small_ds)
    # preload reads at most the recorded size (+1) too
    with pytest.raises(FormatError, match="larger than 0 bytes"):
        packds._core.preload([(p, 0)])


# --------------------------------------------------------------- I3: a shard of another size


@pytest.mark.parametrize("change", ["larger", "smaller"])
def test_i3_a_shard_of_another_size_than_the_manifest_says(small_ds, work, change):
    """stage fails naming the shard (both sizes in the message) and leaves nothing; preload
    and open refuse it too."""
    p = os.path.join(small_ds, "shard-00002.tar")
    want = os.path.getsize(p)
    if change == "larger":
        with open(p, "ab") as f:
            f.write(b"\0" * 4096)
    else:
        os.truncate(p, want - 512)
    have = os.path.getsize(p)
    to = os.path.join(work, "to")
    os.mkdir(to)
    r, most = _stage_watched(small_ds, to)
    h.assert_cli_error(r, "shard-00002.tar", f"is {have} bytes, manifest.json says {want}")
    assert most <= _dataset_bytes(small_ds)
    assert _nothing_staged(to, small_ds)
    for preload in (False, True):
        out = _open_child(small_ds, preload)
        assert out.startswith("FormatError") and "shard-00002.tar" in out, out
    with pytest.raises(FormatError, match=f"is {have} bytes, manifest.json says {want}"):
        packds._core.preload([(p, want)])


def test_i3_symlinks_to_regular_files_still_work(small_ds, work):
    """Shards that are symlinks to regular files (what `packds index` writes) open, verify,
    preload and stage as before: the final target's type is what counts."""
    real = os.path.join(work, "real")
    os.mkdir(real)
    for n in sorted(os.listdir(small_ds)):
        if n.startswith("shard-"):
            os.rename(os.path.join(small_ds, n), os.path.join(real, n))
            os.symlink(os.path.join(real, n), os.path.join(small_ds, n))
    ds = packds.open(small_ds, preload=True)
    assert not ds.verify()["problems"]
    to = os.path.join(work, "to")
    os.mkdir(to)
    r = h.cli("stage", small_ds, "--to", to, timeout=HANG)
    assert r.returncode == 0, h.show(r)
    staged = r.stdout.decode().strip()
    assert packds.open(staged).get_many(range(len(ds))) == ds.get_many(range(len(ds)))


# ----------------------------------------------------- I4: manifest names outside the dataset

BAD_NAMES = ["../../../../dev/zero", "/dev/zero", "shard-00000.tar/../x"]


@pytest.mark.parametrize("where", ["shard", "index"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_i4_manifest_file_names_outside_the_dataset_are_refused(small_ds, work, name, where):
    """A manifest naming `../../../../dev/zero`, `/dev/zero` or `shard-00000.tar/../x` (as a
    shard or as the index): open, preload, verify, info, stage (and its dry run) each give
    one error line naming the bad name; nothing is read from it."""
    m = h.manifest(small_ds)
    if where == "shard":
        m["shards"][0]["file"] = name
    else:
        m["index"]["file"] = name
    with open(os.path.join(small_ds, "manifest.json"), "w") as f:
        json.dump(m, f)
    for preload in (False, True):
        out = _open_child(small_ds, preload)
        assert out.startswith("FormatError") and f"bad file name {json.dumps(name)}" in out, out
    with pytest.raises(FormatError, match="bad file name"):
        packds.preload(small_ds)
    to = os.path.join(work, "to")
    os.mkdir(to)
    for cmd in (["verify", small_ds], ["info", small_ds], ["ls", small_ds], ["stage", small_ds, "--to", to], ["stage", small_ds, "--to", to, "--dry-run"]):
        _cli_fails(*cmd, needle="bad file name")
    assert _nothing_staged(to, small_ds)


# --------------------------------------------------------------------- I6: sample indices


def test_i6_indices_of_any_integer_type_and_size(small_ds):
    """Any integer indexes a sample (numpy integer scalars, 0-d integer arrays, bool as in a
    list: True is 1); out of range, of any size, it raises IndexError (never TypeError);
    negative ones count from the end. The same for every method that takes an index."""
    ds = packds.open(small_ds)
    n = len(ds)
    assert ds[np.int64(5)] == ds[5] == ds[np.int32(5)] == ds[np.uint8(5)] == ds[np.array(5)]
    assert ds[np.int64(-1)] == ds[n - 1]
    assert ds[True] == ds[1] and ds[False] == ds[0]
    huge = [2**63, -(2**63), 2**63 - 1, -(2**63) - 1, 2**64, 2**70, -(2**70), 10**30, 10**5000, -(10**5000), n, -n - 1, np.uint64(2**63), np.int64(2**63 - 1), np.uint64(n)]
    for i in huge:
        with pytest.raises(IndexError, match="out of range"):
            ds[i]
        for meth in (ds.size, ds.key, ds.key_bytes, ds.raw, ds.view, ds.locate, ds.get_checked, ds.stored_size):
            with pytest.raises(IndexError, match="out of range"):
                meth(i)
        with pytest.raises(IndexError):
            ds.get_many([0, i])
        if int(i) != n:  # read_range's stop may be len(ds)
            with pytest.raises(IndexError, match="sample range .* out of range"):
                ds.read_range(0, i) if i > 0 else ds.read_range(i, 0)
    assert ds.size(np.int64(3)) == len(ds[3]) and ds.size(-1) == len(ds[n - 1])
    assert ds.key(np.uint64(2)) == ds.key(2)
    assert ds.locate(np.int16(4)) == ds.locate(4)
    assert bytes(ds.view(np.int64(7))) == ds[7]
    assert ds.get_many(np.array([0, 1, -1])) == [ds[0], ds[1], ds[n - 1]]
    assert ds.read_range(np.int64(2), np.int64(4))[1] == ds.read_range(2, 4)[1]
    for bad in (1.0, None, 1.5, np.float64(1.0)):
        with pytest.raises(TypeError):
            ds[bad]
        with pytest.raises(TypeError):
            ds.size(bad)
    with pytest.raises(KeyError):
        ds["no such key"]
