"""`packds stage` into directories other users can write (`/tmp`, `/dev/shm`, a group
directory): planted lock files, planted copies, copies of ours that others could have changed,
and two sources with the same basename (docs/RELIABILITY.md, section H)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import _helpers as h
import packds
from packds import _core

OTHER_HOLDS_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
os.fchmod(fd, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


def _pack(root: str, name: str, tag: bytes) -> str:
    tree = os.path.join(root, name + "-tree")
    for i in range(60):
        os.makedirs(os.path.join(tree, f"c{i % 3}"), exist_ok=True)
        with open(os.path.join(tree, f"c{i % 3}", f"s{i:03d}.bin"), "wb") as f:
            f.write(tag + b" sample %d " % i * (200 + 37 * i))
    out = os.path.join(root, name, "train.pds")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    packds.pack(tree, out, shard_size=64 << 10)
    return out


@pytest.fixture(scope="module")
def sources(fast_base):
    """Two different datasets with the same basename: a/train.pds and b/train.pds."""
    d = os.path.join(fast_base, "shared-dirs-sources")
    os.makedirs(d, exist_ok=True)
    a, b = _pack(d, "a", b"AAAA"), _pack(d, "b", b"BBBB")
    yield a, b
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def other():
    """(command prefix, uid) to run plain Python as another, real user (65534)."""
    return h.other_user()


@pytest.fixture
def shared():
    """A fresh directory every user can write: sticky (like /tmp) by default."""
    with h.reachable_dir() as base:
        d = os.path.join(base, "shared")
        os.mkdir(d)
        os.chmod(d, 0o1777)
        yield d


def stage_cli(src, to, *extra, prefix=()):
    return h.cli("stage", src, "--to", to, "--json", "-q", *extra, prefix=prefix, timeout=120)


def ok(r) -> dict:
    assert r.returncode == 0, h.show(r)
    return json.loads(r.stdout)


def same_samples(a, b) -> None:
    da, db = packds.open(a), packds.open(b)
    assert len(da) == len(db) > 0
    for i in range(len(da)):
        assert da.key(i) == db.key(i) and da[i] == db[i], da.key(i)


def flip_sample(copy: str, i: int = 3) -> bytes:
    """Changes sample ``i``'s bytes in the dataset ``copy`` in place (same sizes) and fixes the
    index CRCs (the sample's and the index's own), so the copy opens and reads without a
    complaint: only a full comparison with the source's XXH3-128 can tell. Returns the new bytes."""
    ip = os.path.join(copy, "index.pdsi")
    with open(ip, "rb") as f:
        ix = bytearray(f.read())
    off, size, _key, shard, _crc = h.entry(ix, i)
    shard_path = os.path.join(copy, sorted(n for n in os.listdir(copy) if n.startswith("shard-"))[shard])
    with open(shard_path, "r+b") as f:
        f.seek(off)
        data = bytearray(f.read(size))
        for k in range(len(data)):
            data[k] ^= 0x5A
        f.seek(off)
        f.write(data)
    h.set_entry(ix, i, crc=h.crc32c(bytes(data)))
    h.fix_crcs(ix)
    with open(ip, "wb") as f:
        f.write(ix)
    assert packds.open(copy)[i] == bytes(data)  # the damage reads as data
    return bytes(data)


def plant_copy(src: str, at: str, uid: int | None) -> bytes:
    """A copy of ``src`` at ``at`` with one sample's bytes changed (same manifest, same sizes,
    CRCs fixed), owned by ``uid``."""
    shutil.copytree(src, at)
    bad = flip_sample(at)
    h.chown_tree(at, uid)
    return bad


def hold_own_lock(path: str):
    """Holds our own stage lock on ``path`` as another stager of ours would (pid/host inside)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"pid 4242 on othernode\n", 0)
    return fd


# --------------------------------------------------------------------------------------------
# Lock files


@pytest.mark.parametrize("sticky", [True, False], ids=["sticky", "not-sticky"])
def test_h1_symlink_lock_planted_by_another_user_is_refused_and_not_followed(sources, other, sticky):
    prefix, uid = other
    with h.reachable_dir() as base:
        d = os.path.join(base, "shared")
        os.mkdir(d)
        os.chmod(d, 0o1777 if sticky else 0o777)
        victim = os.path.join(base, "victim.txt")
        with open(victim, "wb") as f:
            f.write(b"precious\n")
        os.chmod(victim, 0o640)
        lock = os.path.join(d, ".train.pds.lock")
        r = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", victim, lock], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert os.lstat(lock).st_uid == uid
        r = stage_cli(sources[0], d)
        h.assert_cli_error(r, "refusing to use the lock file", lock, "symbolic link", f"uid {uid}")
        assert "remove that file" in r.stderr.decode()
        with open(victim, "rb") as f:
            assert f.read() == b"precious\n"
        st = os.stat(victim)
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o640)
        assert os.path.islink(lock) and sorted(os.listdir(d)) == [".train.pds.lock"]


def test_h2_lock_owned_and_held_by_another_user_is_a_clear_error_not_a_hang(sources, other, shared):
    prefix, uid = other
    lock = os.path.join(shared, ".train.pds.lock")
    holder = subprocess.Popen([*prefix, sys.executable, "-c", OTHER_HOLDS_LOCK, lock], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n", holder.stderr.read()
        st = os.stat(lock)
        assert st.st_uid == uid and st.st_mode & 0o777 == 0o666
        t = time.monotonic()
        r = stage_cli(sources[0], shared, "--lock-timeout", "3")
        assert time.monotonic() - t < 30
        h.assert_cli_error(r, "refusing to use the lock file", lock, f"uid {uid}")
        assert "$SLURM_TMPDIR" in r.stderr.decode()
        assert sorted(os.listdir(shared)) == [".train.pds.lock"]
    finally:
        holder.kill()
        holder.wait()
    # Not held any more: still another user's file, still refused (no waiting, nothing removed).
    h.assert_cli_error(stage_cli(sources[0], shared), "refusing to use the lock file", f"uid {uid}")
    assert os.stat(lock).st_uid == uid


def test_h3_our_own_lock_held_by_another_stager_is_waited_for_then_times_out(sources, work):
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    lock = os.path.join(dest, ".train.pds.lock")
    fd = hold_own_lock(lock)
    p = h.popen_cli("stage", sources[0], "--to", dest, "--json", "--lock-timeout", "60")
    try:
        time.sleep(1.5)
        assert p.poll() is None, p.communicate()  # waiting, not failing
        os.close(fd)  # the other stager is done
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert b"waiting for another packds stage of the same dataset" in err and b"pid 4242 on othernode" in err
    rec = json.loads(out)
    assert rec["copied"] is True and rec["path"] == os.path.join(dest, "train.pds")
    same_samples(sources[0], rec["path"])
    # Held and never released: a clear error after --lock-timeout, naming the lock and holder.
    fd = hold_own_lock(lock)
    try:
        t = time.monotonic()
        r = stage_cli(sources[0], dest, "--lock-timeout", "1")
        assert time.monotonic() - t < 20
        h.assert_cli_error(r, "timed out after 1 s waiting for the lock", lock, "pid 4242 on othernode")
        assert "--lock-timeout" in r.stderr.decode()
        with pytest.raises(packds.UsageError, match="timed out"):
            packds.stage(sources[0], dest, lock_timeout=0.3)
    finally:
        os.close(fd)
    assert ok(stage_cli(sources[0], dest))["copied"] is False
    with open(lock, "rb") as f:
        assert f.read().startswith(b"pid ")
    assert os.stat(lock).st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------------------------
# Copies


def test_h4_copy_planted_by_another_user_in_a_sticky_dir_is_not_reused(sources, other, shared):
    prefix, uid = other
    planted = os.path.join(shared, "train.pds")
    bad = plant_copy(sources[0], planted, uid)
    # On main this passed the cheap check (sizes and manifest bytes) and was served.
    assert _core.is_staged_at(sources[0], planted)
    leftover = os.path.join(shared, ".train.pds.staging-999")
    os.mkdir(leftover)
    h.chown_tree(leftover, uid)
    r = stage_cli(sources[0], shared)
    rec = ok(r)
    alt = os.path.join(shared, _core.disambiguated_name("train.pds", os.path.realpath(sources[0])))
    assert rec["copied"] is True and rec["path"] == alt != planted
    err = r.stderr.decode()
    assert planted in err and f"uid {uid}" in err and alt in err
    same_samples(sources[0], rec["path"])
    assert packds.open(rec["path"]).verify()["problems"] == []
    # Another user's files are left alone: the planted copy and their leftover.
    assert packds.open(planted)[3] == bad and os.stat(planted).st_uid == uid
    assert os.path.isdir(leftover) and os.stat(leftover).st_uid == uid
    # Staging again reuses our own copy; a dry run names it too.
    again = ok(stage_cli(sources[0], shared))
    assert again["copied"] is False and again["path"] == alt
    d = ok(h.cli("stage", sources[0], "--to", shared, "--dry-run", "--json"))
    assert d["path"] == alt and d["already_staged"] is True and planted in d["note"]
    # The same from the API (what packds.open(stage=True) uses).
    assert packds.stage(sources[0], shared) == alt


def test_h4_copy_of_ours_holding_another_users_file_is_neither_reused_nor_removed(sources, other, work):
    _, uid = other
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    first = ok(stage_cli(sources[0], dest))["path"]
    shard = os.path.join(first, "shard-00001.tar")
    os.chown(shard, uid, uid)
    rec = ok(stage_cli(sources[0], dest))
    assert rec["copied"] is True and rec["path"] != first
    same_samples(sources[0], rec["path"])
    assert os.stat(shard).st_uid == uid  # not removed


def test_h5_copy_of_ours_in_a_dir_others_can_write_is_verified_before_reuse(sources, work):
    with h.reachable_dir() as base:
        d = os.path.join(base, "open")
        os.mkdir(d)
        os.chmod(d, 0o777)  # writable by everyone, not sticky: others could swap entries
        first = ok(stage_cli(sources[0], d))
        path = first["path"]
        assert first["copied"] is True and path == os.path.join(d, "train.pds")
        assert _core.staged_copy_trust(path)[0] == "shared"
        r = h.cli("stage", sources[0], "--to", d, "--json")
        rec = ok(r)
        assert rec["copied"] is False and rec["path"] == path
        assert b"checking every byte against the source" in r.stderr and "every byte checked" in rec["reason"]
        # Damage the copy so that the cheap check cannot see it: verified, found, staged again.
        flip_sample(path)
        assert _core.is_staged_at(sources[0], path)
        r = h.cli("stage", sources[0], "--to", d, "--json")
        rec = ok(r)
        assert rec["copied"] is True and rec["path"] == path
        assert b"does not match the source" in r.stderr
        same_samples(sources[0], path)
        # A copy writable by others (in a private directory) is not trusted blindly either.
        priv = os.path.join(work, "priv")
        os.mkdir(priv)
        p2 = ok(stage_cli(sources[0], priv))["path"]
        assert _core.staged_copy_trust(p2)[0] == "private"
        os.chmod(os.path.join(p2, "index.pdsi"), 0o666)
        flip_sample(p2)
        rec = ok(stage_cli(sources[0], priv))
        assert rec["copied"] is True and rec["path"] == p2
        same_samples(sources[0], p2)


def test_h7_a_directory_above_the_destination_that_another_user_controls(sources, other):
    _, uid = other
    with h.reachable_dir() as base:
        theirs = os.path.join(base, "theirs")
        os.mkdir(theirs)
        mine = os.path.join(theirs, "mine")  # ours, but inside a directory another user owns
        os.mkdir(mine)
        os.chown(theirs, uid, uid)
        r = stage_cli(sources[0], mine)
        path = ok(r)["path"]
        assert b"warning: " + theirs.encode() + b" is owned by uid 65534" in r.stderr, h.show(r)
        assert b"another user could replace the staged copy" in r.stderr
        assert _core.staged_copy_trust(path)[0] == "shared"  # never reused on sizes alone
        r = h.cli("stage", sources[0], "--to", mine, "--json")
        assert ok(r)["copied"] is False and b"checking every byte against the source" in r.stderr
        # the same directory, but another user's symbolic link on the way to it
        link = os.path.join(base, "link")
        os.symlink(mine, link)
        os.lchown(link, uid, uid)
        os.chown(theirs, 0, 0)
        r = stage_cli(sources[0], link)
        ok(r)
        assert b"is a symbolic link owned by uid 65534" in r.stderr, h.show(r)
        # a sticky shared directory (like /tmp) above a directory of ours: nothing to warn about
        os.chmod(theirs, 0o1777)
        r = stage_cli(sources[0], mine)
        assert ok(r)["path"] == path and b"warning" not in r.stderr, h.show(r)
        assert _core.path_open_to_others(mine) is None and _core.staged_copy_trust(path)[0] == "private"


def test_h6_two_sources_with_the_same_basename_each_read_their_own_data(sources, work):
    a, b = sources
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    ra = ok(stage_cli(a, dest))
    assert ra["path"] == os.path.join(dest, "train.pds")  # the plain name for the first
    r = stage_cli(b, dest)
    rb = ok(r)
    assert rb["copied"] is True and rb["path"] == os.path.join(dest, _core.disambiguated_name("train.pds", os.path.realpath(b)))
    assert rb["path"] != ra["path"] and ra["path"] in r.stderr.decode() and a in r.stderr.decode()
    same_samples(a, ra["path"])
    same_samples(b, rb["path"])
    assert packds.open(ra["path"])[0].startswith(b"AAAA") and packds.open(rb["path"])[0].startswith(b"BBBB")
    # Each one's rerun reuses its own copy, in either order, and never replaces the other's.
    for src, want in [(b, rb), (a, ra), (b, rb)]:
        again = ok(stage_cli(src, dest))
        assert again["copied"] is False and again["path"] == want["path"]
    assert ok(h.cli("stage", b, "--to", dest, "--dry-run", "--json"))["path"] == rb["path"]
    same_samples(a, ra["path"])
    assert h.staging_leftovers(dest) == []


def test_h6_concurrent_stagers_of_two_same_named_sources(sources, work):
    a, b = sources
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    procs = [(src, h.popen_cli("stage", src, "--to", dest, "--json", "-q")) for src in (a, b, a, b)]
    got = {}
    for src, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got.setdefault(src, set()).add(json.loads(out)["path"])
    assert all(len(v) == 1 for v in got.values()) and got[a] != got[b]
    same_samples(a, got[a].pop())
    same_samples(b, got[b].pop())
