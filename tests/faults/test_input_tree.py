"""Catalogue §7 A: faults of the source tree that tests/test_odd_inputs.py does not already
cover: files that shrink during the read, change or vanish between the walk and the read,
paths past PATH_MAX, very deep trees, 255-byte names, hard links, block-boundary sizes, a
symlink to /dev/zero, and (slow) 100k files in one directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

import _helpers as h
import packds
from packds import SourceChangedError

# A sysfs attribute stats as 4096 bytes and reads as a few dozen: a file that "shrank" while it
# was read, at exactly the read, deterministically (the /proc twin, a file that grows, is in
# tests/test_odd_inputs.py::test_file_whose_size_lies_is_a_source_change).
SYSFS = next((p for p in ["/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
                          "/sys/kernel/profiling", "/sys/power/state"]
              if os.path.exists(p) and os.stat(p).st_size > 0 and os.stat(p).st_size != len(open(p, "rb").read())), None)


@pytest.mark.skipif(SYSFS is None, reason="no sysfs file whose stat size differs from its content")
def test_a2_file_that_shrinks_during_the_read_is_never_padded(work):
    """A2: `size was N bytes at open, M bytes were read` -> SourceChangedError (exit 1), nothing
    published; with --on-error skip the file is left out and listed, never zero-padded."""
    ok = h.write(work, b"ok.txt", b"ok")
    out = os.path.join(work, "o.pds")
    with pytest.raises(SourceChangedError) as ei:
        packds.pack([SYSFS, ok], out)
    assert SYSFS in str(ei.value) and "were read" in str(ei.value) and ei.value.hint
    assert not os.path.exists(out)
    r = h.cli("pack", SYSFS, ok, "-o", out)
    h.assert_cli_error(r, SYSFS)
    s = packds.pack([SYSFS, ok], out, on_error="skip")
    assert s["files"] == 1 and [p for p, _ in s["skipped"]] == [SYSFS]
    ds = packds.open(out)
    assert list(ds.keys()) == ["ok.txt"] and ds.verify()["problems"] == []


@pytest.fixture
def moving_tree(work):
    """3k small files, then zz/{grow,shrink,vanish}: the last files packed (keys sort last)."""
    root = os.path.join(work, "src")
    for d in range(3):
        os.makedirs(f"{root}/d{d:02d}")
        for i in range(1000):
            with open(f"{root}/d{d:02d}/f{i:04d}", "wb") as f:
                f.write(b"x" * 64)
    for k in ["zz/grow", "zz/shrink", "zz/vanish"]:
        h.write(root, k.encode(), b"y" * 5000)
    return root


def _mutate_once(root):
    """A progress callback that, at its first call while files are being packed (the walk has
    listed every file and recorded its size), changes the last three files."""
    state = {"done": None}

    def cb(phase, done, total, nbytes):
        if state["done"] is None and phase == 1 and done < total - 3:
            state["done"] = done
            with open(f"{root}/zz/grow", "ab") as f:
                f.write(b"more")
            os.truncate(f"{root}/zz/shrink", 100)
            os.unlink(f"{root}/zz/vanish")

    return cb, state


@pytest.mark.faults
def test_a1_a2_a3_files_changed_or_removed_between_walk_and_read(moving_tree, work):
    """A3 (removed after the walk): default -> SourceChangedError `it was deleted`, nothing
    published; --on-error skip -> listed as `deleted while packing`. A1/A2 between walk and
    open: what is stored is the file as it was opened (fstat at open), whole and consistent:
    never the walk's size padded or cut."""
    # Test-only switch: 100 µs more per file read, so the pack (3k files, one thread) is still
    # running when the first progress call comes (after 0.1 s). packds reads PACKDS_FAULT once
    # per process, so the packs run in a child process that has it from the start.
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path[:0] = [{tests!r}]; from faults.test_input_tree import _packs_while_the_tree_moves as f; f(*sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, moving_tree, os.path.join(work, "o.pds")], capture_output=True, timeout=120,
                       env={**os.environ, "PACKDS_FAULT": "pack-slow-us:100"})
    assert r.returncode == 0, h.show(r)


def _packs_while_the_tree_moves(moving_tree, out):
    cb, st = _mutate_once(moving_tree)
    with pytest.raises(SourceChangedError) as ei:
        packds.pack(moving_tree, out, threads=1, progress=cb)
    assert st["done"] is not None, "the pack finished before the first progress call"
    assert "zz/vanish" in str(ei.value) and "deleted" in str(ei.value)
    assert not os.path.exists(out), "a failed first pack leaves nothing behind"

    for k in ["zz/grow", "zz/shrink", "zz/vanish"]:  # again, skipping this time
        with open(f"{moving_tree}/{k}", "wb") as f:
            f.write(b"y" * 5000)
    cb, st = _mutate_once(moving_tree)
    s = packds.pack(moving_tree, out, threads=1, progress=cb, on_error="skip")
    assert st["done"] is not None, "the pack finished before the first progress call"
    assert [(os.path.relpath(p, moving_tree), r) for p, r in s["skipped"]] == [("zz/vanish", "deleted while packing")]
    ds = packds.open(out)
    assert ds["zz/grow"] == b"y" * 5000 + b"more"
    assert ds["zz/shrink"] == b"y" * 100
    assert "zz/vanish" not in ds
    assert ds.verify()["problems"] == []


def test_a15_path_longer_than_path_max(work):
    """A15: a file whose path is > 4096 bytes. packds walks by path, so it cannot be opened:
    a clean OSError (ENAMETOOLONG) naming it and nothing published by default; --on-error skip
    lists it. Never a crash or a truncated key."""
    src = os.path.join(work, "src")
    h.mkdeep(src, [("%02d" % i) + "L" * 250 for i in range(20)])
    h.write(src, b"short.txt", b"short")
    out = os.path.join(work, "o.pds")
    with pytest.raises(OSError) as ei:
        packds.pack(src, out)
    assert ei.value.errno == 36  # ENAMETOOLONG
    assert ei.value.hint and "--on-error skip" in ei.value.hint  # regression: there was no hint
    r = h.cli("pack", src, "-o", out)
    assert r.returncode == 1 and b"hint: the path is longer" in r.stderr, h.show(r)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    s = packds.pack(src, out, on_error="skip", force=True)
    assert s["files"] == 1 and len(s["skipped"]) == 1
    assert len(s["skipped"][0][0]) > 4096 and "too long" in s["skipped"][0][1]
    assert list(packds.open(out).keys()) == ["short.txt"]


def test_a16_tree_300_levels_deep(work):
    """A16 (> 200 levels): packs and reads back; GNU-compatible pax name; no stack overflow."""
    src = os.path.join(work, "src")
    h.mkdeep(src, ["d"] * 300, data=b"deep leaf")
    h.write(src, b"top", b"top")
    out = os.path.join(work, "o.pds")
    s = packds.pack(src, out)
    assert s["files"] == 2 and s["skipped"] == []
    ds = packds.open(out)
    key = "d/" * 300 + "leaf"
    assert ds[key] == b"deep leaf"
    shard = os.path.join(out, "shard-00000.tar")
    with tarfile.open(shard) as tf:
        assert sorted(tf.getnames()) == sorted([key, "top"])


def test_a14_name_of_255_bytes_in_a_long_path(work):
    """A14: a 255-byte (NAME_MAX) component inside a 700-byte path: pax records; tarfile
    lists the same name; byte-exact round trip."""
    src = os.path.join(work, "src")
    comp = b"n" * 255
    key = b"a" * 200 + b"/" + comp + b"/" + b"b" * 200 + b"/" + comp
    h.write(src, key, b"long")
    out = os.path.join(work, "o.pds")
    packds.pack(src, out)
    ds = packds.open(out)
    assert ds.key_bytes(0) == key and ds[0] == b"long"
    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tf:
        assert tf.getnames() == [key.decode()]


def test_a19_hard_links_are_stored_once_as_link_members(work):
    """A19: three names of one inode in one shard -> one regular member and two LNKTYPE members
    naming it; all three samples read the data (their index entries share it)."""
    src = os.path.join(work, "src")
    a = h.write(src, b"a.bin", b"shared inode" * 100)
    os.link(a, os.path.join(os.fsencode(src), b"b.bin"))
    os.makedirs(os.path.join(src, "sub"))
    os.link(a, os.path.join(os.fsencode(src), b"sub/c.bin"))
    out = os.path.join(work, "o.pds")
    s = packds.pack(src, out)
    assert s["files"] == 3
    ds = packds.open(out)
    assert list(ds.keys()) == ["a.bin", "b.bin", "sub/c.bin"]
    assert all(ds[i] == b"shared inode" * 100 for i in range(3))
    assert s["hard_links"] == 2 and h.manifest(out)["hard_links"] == [[0, 1], [0, 2]]
    assert len({ds.locate(i) for i in range(3)}) == 1
    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tf:
        ms = tf.getmembers()
        assert [m.name for m in ms] == ["a.bin", "b.bin", "sub/c.bin"]
        assert ms[0].isreg() and all(m.islnk() and m.linkname == "a.bin" and m.size == 0 for m in ms[1:])
        assert all(tf.extractfile(m).read() == b"shared inode" * 100 for m in ms)


def test_a20_zero_one_and_block_boundary_sizes(work):
    """A20: 0, 1, 511, 512, 513, 1023, 1024, 1025 bytes: byte-exact; empty != missing; the
    shard is tar that tarfile reads with the same sizes."""
    src = os.path.join(work, "src")
    sizes = [0, 1, 511, 512, 513, 1023, 1024, 1025]
    data = {b"s%05d" % n: os.urandom(n) for n in sizes}
    for k, v in data.items():
        h.write(src, k, v)
    out = os.path.join(work, "o.pds")
    packds.pack(src, out)
    ds = packds.open(out)
    assert len(ds) == len(sizes)
    for k, v in data.items():
        assert ds[k.decode()] == v and ds.size(ds.index(k.decode())) == len(v)
    assert ds.get("missing") is None and "s00000" in ds
    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tf:
        assert {m.name: m.size for m in tf.getmembers()} == {k.decode(): len(v) for k, v in data.items()}


def test_a11_symlink_to_dev_zero_with_follow_symlinks_is_never_read(work):
    """A11: with --follow-symlinks, a link to /dev/zero resolves to a device: skipped and listed,
    never read (the pack ends at once instead of streaming zeros forever)."""
    src = os.path.join(work, "src")
    h.write(src, b"ok.txt", b"ok")
    os.symlink("/dev/zero", os.path.join(src, "zero"))
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "--follow-symlinks", "-q", timeout=30)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert list(ds.keys()) == ["ok.txt"]
    assert any(s["path"].endswith("/zero") for s in ds.manifest["skipped"]), ds.manifest["skipped"]


@pytest.mark.slow
def test_100k_files_in_one_directory(work):
    """100,000 files in one directory: packs, every key present, sorted byte-wise."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    for i in range(100_000):
        with open(os.path.join(src, "f%06d" % i), "wb") as f:
            f.write(b"%d" % i)
    out = os.path.join(work, "o.pds")
    s = packds.pack(src, out, shard_size=4 << 20)
    assert s["files"] == 100_000
    ds = packds.open(out)
    assert len(ds) == 100_000
    for i in (0, 1, 4242, 99_999):
        assert ds.key(i) == "f%06d" % i and ds[i] == b"%d" % i
