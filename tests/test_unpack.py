"""unpack: an identical tree (contents, modes, mtimes), never overwriting, never writing outside
DEST (symlinks planted in DEST, hostile keys)."""

from __future__ import annotations

import math
import os
import random
import stat
import subprocess

import pytest

import _helpers as h
import packds
from packds import PackdsError, UnsafePathError


def test_odd_dataset_unpacks_to_an_identical_tree(odd_tree, odd_ds, work):
    dest = os.path.join(work, "u")
    n = packds.open(odd_ds[0]).unpack(dest)
    assert n == len(odd_tree.keys)
    r = subprocess.run(["diff", "-r", odd_tree.root, dest], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stdout[:3000].decode(errors="replace")
    assert h.walk_files(dest) == odd_tree.keys
    rng = random.Random(2)
    for k in sorted(set(odd_tree.special.values()) | set(rng.sample(odd_tree.keys, 500))):
        a = os.lstat(odd_tree.path(k))
        c = os.lstat(os.path.join(os.fsencode(dest), k))
        assert stat.S_IMODE(c.st_mode) == stat.S_IMODE(a.st_mode), (k, oct(a.st_mode), oct(c.st_mode))
        assert c.st_mtime == math.floor(a.st_mtime), (k, a.st_mtime, c.st_mtime)


def test_unpack_restores_every_mtime(work):
    """`unpack` restores mtime from the tar header, including times that only a pax record
    can hold (before 1970, after 2242) and the epoch itself."""
    src = os.path.join(work, "src")
    times = {b"neg": -86_400, b"epoch": 0, b"one": 1, b"y2001": 1_000_000_000, b"far": 9_000_000_000}
    for k, t in times.items():
        h.write(src, k, k, mtime=t)
    out = os.path.join(work, "o.pds")
    h.pack(src, out)
    dest = os.path.join(work, "u")
    packds.open(out).unpack(dest)
    got = {k: os.lstat(os.path.join(os.fsencode(dest), k)).st_mtime for k in times}
    assert got == {k: float(t) for k, t in times.items()}


@pytest.fixture
def ab_ds(work):
    src = os.path.join(work, "src")
    for k in [b"a/x.txt", b"a/sub/y.txt", b"b.txt", b"c/d/e.txt"]:
        h.write(src, k, b"content of " + k)
    out = os.path.join(work, "ab.pds")
    h.pack(src, out)
    return out


def test_unpack_refuses_to_overwrite(ab_ds, work):
    dest = os.path.join(work, "u")
    h.write(dest, b"b.txt", b"mine, keep me")
    with pytest.raises(PackdsError) as ei:
        packds.open(ab_ds).unpack(dest)
    assert "b.txt" in str(ei.value) and "exists" in str(ei.value)
    assert h.read(dest, b"b.txt") == b"mine, keep me"
    r = h.cli("unpack", ab_ds, dest)
    assert r.returncode == 1 and b"packds: error:" in r.stderr
    assert h.read(dest, b"b.txt") == b"mine, keep me"


def test_unpack_next_to_unrelated_files(ab_ds, work):
    dest = os.path.join(work, "u")
    h.write(dest, b"unrelated/file", b"u")
    h.write(dest, b"a/other.txt", b"o")
    assert packds.open(ab_ds).unpack(dest) == 4
    assert h.read(dest, b"a/x.txt") == b"content of a/x.txt"
    assert h.read(dest, b"a/other.txt") == b"o"


def test_symlinked_directory_in_dest_is_refused(ab_ds, work):
    other = os.path.join(work, "elsewhere")
    os.mkdir(other)
    dest = os.path.join(work, "u")
    os.mkdir(dest)
    os.symlink(other, os.path.join(dest, "a"))
    with pytest.raises(UnsafePathError) as ei:
        packds.open(ab_ds).unpack(dest)
    assert "a/" in str(ei.value)
    assert os.listdir(other) == [], "unpack wrote through the symlink"
    r = h.cli("unpack", ab_ds, dest)
    assert r.returncode == 1 and r.stderr.startswith(b"packds: error:"), h.show(r)
    assert os.listdir(other) == []
    assert os.readlink(os.path.join(dest, "a")) == other


def test_symlinked_deeper_directory_in_dest_is_refused(ab_ds, work):
    other = os.path.join(work, "elsewhere")
    os.mkdir(other)
    dest = os.path.join(work, "u")
    os.makedirs(os.path.join(dest, "c"))
    os.symlink("../../elsewhere", os.path.join(dest, "c", "d"))
    with pytest.raises(UnsafePathError):
        packds.open(ab_ds).unpack(dest)
    assert os.listdir(other) == []


def test_symlinked_file_in_dest_is_not_written_through(ab_ds, work):
    target = h.write(work, b"victim.txt", b"do not touch")
    dest = os.path.join(work, "u")
    os.mkdir(dest)
    os.symlink(os.fsdecode(target), os.path.join(dest, "b.txt"))
    with pytest.raises(PackdsError):
        packds.open(ab_ds).unpack(dest)
    assert h.read(work, b"victim.txt") == b"do not touch"
    # A dangling symlink too: it must not be followed to create a file elsewhere.
    os.remove(os.path.join(dest, "b.txt"))
    ghost = os.path.join(work, "ghost.txt")
    os.symlink(ghost, os.path.join(dest, "b.txt"))
    with pytest.raises(PackdsError):
        packds.open(ab_ds).unpack(os.path.join(dest))
    assert not os.path.lexists(ghost)


def test_dest_path_component_is_a_file(ab_ds, work):
    dest = os.path.join(work, "u")
    h.write(dest, b"c", b"a file where a directory should be")
    with pytest.raises(PackdsError):
        packds.open(ab_ds).unpack(dest)
    assert h.read(dest, b"c") == b"a file where a directory should be"


def test_dest_is_a_file(ab_ds, work):
    f = h.write(work, b"f", b"x")
    with pytest.raises((PackdsError, OSError)):
        packds.open(ab_ds).unpack(os.fsdecode(f))
    assert h.read(work, b"f") == b"x"
