"""Odd inputs: symlinks (skipped, followed, loops), FIFOs/sockets/devices (skipped, never
opened, no hang), unreadable files and directories (fail naming the file, or skip), files that
change while read, include/exclude globs, extreme metadata."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile

import pytest

import _helpers as h
import packds
from packds import SourceChangedError


def skipped_paths(m) -> dict:
    return {s["path"]: s["reason"] for s in m["skipped"]}


# --------------------------------------------------------------------------------- symlinks


@pytest.fixture
def linky(work):
    src = os.path.join(work, "src")
    h.write(src, b"real/data.txt", b"the data")
    h.write(src, b"real/more/x.bin", b"xx")
    os.symlink("real/data.txt", os.path.join(src, "link_file"))
    os.symlink("real", os.path.join(src, "link_dir"))
    os.symlink("..", os.path.join(src, "real", "back"))  # to an ancestor: a loop
    os.symlink(".", os.path.join(src, "self_dir"))  # loop at the top
    os.symlink("self_link", os.path.join(src, "self_link"))  # ELOOP
    os.symlink("does/not/exist", os.path.join(src, "broken"))
    os.makedirs(os.path.join(src, "p", "q"))
    os.symlink("../r", os.path.join(src, "p", "q", "to_r"))
    os.makedirs(os.path.join(src, "p", "r"))
    os.symlink("../q", os.path.join(src, "p", "r", "to_q"))  # q -> r -> q: mutual loop
    h.write(src, b"p/r/in_r.txt", b"r")
    return src


def test_symlinks_skipped_by_default(linky, work):
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", linky, "-o", out, "--json", "-q", timeout=60)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert [ds.key(i) for i in range(len(ds))] == ["p/r/in_r.txt", "real/data.txt", "real/more/x.bin"]
    sk = skipped_paths(ds.manifest)
    links = ["link_file", "link_dir", "real/back", "self_dir", "self_link", "broken", "p/q/to_r", "p/r/to_q"]
    for name in links:
        p = os.path.join(linky, name)
        assert p in sk, (p, sk)
        assert "symlink" in sk[p], sk[p]
    assert len(sk) == len(links)
    assert sorted(x["path"] for x in json.loads(r.stdout)["skipped"]) == sorted(sk)


def test_skipped_symlinks_reported_on_stderr(linky, work):
    r = h.cli("pack", linky, "-o", os.path.join(work, "o.pds"), timeout=60)
    assert r.returncode == 0, h.show(r)
    err = r.stderr.decode()
    assert err.count("packds: skipped ") == 8, err


def test_follow_symlinks(linky, work):
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", linky, "-o", out, "--follow-symlinks", "--json", "-q", timeout=60)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    keys = [ds.key(i) for i in range(len(ds))]
    assert "link_file" in keys and ds["link_file"] == b"the data"
    assert "link_dir/data.txt" in keys and ds["link_dir/data.txt"] == b"the data"
    assert "link_dir/more/x.bin" in keys
    assert "p/q/to_r/in_r.txt" in keys  # q/to_r -> r (not a loop yet)
    sk = skipped_paths(ds.manifest)
    for name, why in [("self_dir", "loop"), ("real/back", "loop"), ("self_link", ""), ("broken", "broken")]:
        p = os.path.join(linky, name)
        assert p in sk and why in sk[p], (p, sk)
    # No key passes through a loop more than once.
    assert all(k.count("back") == 0 and k.count("self_dir") == 0 for k in keys), keys
    assert len(keys) < 20, keys


def test_symlink_loop_does_not_hang_with_many_links(work):
    """Every directory links to the root and to its parent: exponential without loop checks."""
    src = os.path.join(work, "src")
    d = src
    for i in range(8):
        d = os.path.join(d, f"l{i}")
        os.makedirs(d)
        os.symlink(src, os.path.join(d, "to_root"))
        os.symlink("..", os.path.join(d, "to_parent"))
        h.write(d, b"f.txt", b"%d" % i)
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "--follow-symlinks", "-q", timeout=60)
    assert r.returncode == 0, h.show(r)
    assert len(packds.open(out)) == 8


def test_symlinked_source_root(work):
    real = os.path.join(work, "real")
    h.write(real, b"a.txt", b"A")
    link = os.path.join(work, "link")
    os.symlink(real, link)
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", link, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    assert packds.open(out)["a.txt"] == b"A"


# -------------------------------------------------------------------------- special files


def _specials(src) -> dict:
    made = {}
    fifo = os.path.join(src, "a_fifo")
    os.mkfifo(fifo)
    made["FIFO"] = fifo
    sock_path = os.path.join(src, "a_sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    made["socket"] = sock_path
    made["_sock_obj"] = s
    dev = os.path.join(src, "a_dev")
    try:
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        made["device"] = dev
    except OSError:
        pass
    return made


def test_fifo_socket_device_skipped_without_hang(work):
    src = os.path.join(work, "src")
    h.write(src, b"ok.txt", b"fine")
    made = _specials(src)
    try:
        out = os.path.join(work, "o.pds")
        cmd = ["pack", src, "-o", out, "-q"]
        if h.have_strace():
            # Prove they are never opened: trace every open the pack makes.
            trace = os.path.join(work, "trace")
            r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", trace, sys.executable, "-m", "packds", *cmd],
                               capture_output=True, timeout=60)
            opened = open(trace, "rb").read()
            assert b"ok.txt" in opened, "the trace caught no opens: the check below would prove nothing"
            for what, p in made.items():
                if not what.startswith("_"):
                    assert os.path.basename(p).encode() not in opened, f"the {what} was opened"
        else:  # pragma: no cover
            r = h.cli(*cmd, timeout=60)
        assert r.returncode == 0, h.show(r)
        ds = packds.open(out)
        assert [ds.key(i) for i in range(len(ds))] == ["ok.txt"]
        sk = skipped_paths(ds.manifest)
        assert "FIFO" in sk[made["FIFO"]]
        assert made["socket"] in sk
        if "device" in made:
            assert made["device"] in sk
    finally:
        made["_sock_obj"].close()


def test_fifo_with_follow_symlinks_and_a_link_to_it(work):
    src = os.path.join(work, "src")
    h.write(src, b"ok.txt", b"fine")
    os.mkfifo(os.path.join(src, "fifo"))
    os.symlink("fifo", os.path.join(src, "to_fifo"))
    os.symlink("/dev/zero", os.path.join(src, "to_zero"))  # following it would never end
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "--follow-symlinks", "-q", timeout=60)
    assert r.returncode == 0, h.show(r)
    sk = skipped_paths(packds.open(out).manifest)
    assert {os.path.join(src, n) for n in ("fifo", "to_fifo", "to_zero")} <= set(sk), sk


def test_fifo_as_source_is_refused_without_hang(work):
    fifo = os.path.join(work, "fifo")
    os.mkfifo(fifo)
    r = h.cli("pack", fifo, "-o", os.path.join(work, "o.pds"), timeout=60)
    h.assert_cli_error(r, fifo)


# ---------------------------------------------------------------------- unreadable files


@pytest.fixture
def locked_tree():
    """A tree with one mode-000 file and one mode-000 directory, in a place the unprivileged
    user can reach. Yields (prefix, src, outdir_parent, locked_file, locked_dir)."""
    prefix, uid = h.unprivileged()
    base = tempfile.mkdtemp(prefix="packds-perm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.chmod(base, 0o755)
    src = os.path.join(base, "src")
    h.write(src, b"a.txt", b"readable")
    h.write(src, b"sub/b.txt", b"readable too")
    secret = h.write(src, b"sub/secret.bin", b"top secret")
    lockdir = os.path.join(src, "lockeddir")
    h.write(src, b"lockeddir/inside.txt", b"hidden")
    outp = os.path.join(base, "out")
    os.mkdir(outp)
    if uid is not None:
        for dp, dn, fn in os.walk(base):
            for n in dn + fn + [""]:
                os.chown(os.path.join(dp, n) if n else dp, uid, uid)
    try:
        yield prefix, src, outp, os.fsdecode(secret), lockdir
    finally:
        for dp, _dn, _fn in os.walk(base):
            os.chmod(dp, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_unreadable_file_fails_naming_it(locked_tree):
    prefix, src, outp, secret, lockdir = locked_tree
    shutil.rmtree(lockdir)
    os.chmod(secret, 0)
    probe = subprocess.run(prefix + [sys.executable, "-c", f"open({secret!r}, 'rb')"], capture_output=True)
    assert probe.returncode != 0, "the unprivileged process can still read the file: the test proves nothing"
    out = os.path.join(outp, "o.pds")
    r = h.cli("pack", src, "-o", out, prefix=prefix)
    line = h.assert_cli_error(r, secret)
    assert "ermission denied" in line
    assert b"--on-error skip" in r.stderr  # the hint says what to do
    assert not os.path.exists(out), "a failed first pack leaves nothing behind"


def test_unreadable_file_skipped_with_on_error_skip(locked_tree):
    prefix, src, outp, secret, lockdir = locked_tree
    shutil.rmtree(lockdir)
    os.chmod(secret, 0)
    out = os.path.join(outp, "o.pds")
    r = h.cli("pack", src, "-o", out, "--on-error", "skip", "--json", "-q", prefix=prefix)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert [ds.key(i) for i in range(len(ds))] == ["a.txt", "sub/b.txt"]
    sk = skipped_paths(ds.manifest)
    assert secret in sk and "ermission" in sk[secret], sk
    assert [x["path"] for x in json.loads(r.stdout)["skipped"]] == [secret]
    assert ds.manifest["options"]["on_error"] == "skip"


def test_unreadable_directory(locked_tree):
    prefix, src, outp, secret, lockdir = locked_tree
    os.chmod(lockdir, 0)
    out = os.path.join(outp, "o.pds")
    r = h.cli("pack", src, "-o", out, prefix=prefix)
    h.assert_cli_error(r, lockdir)
    r = h.cli("pack", src, "-o", out, "--on-error", "skip", "-q", prefix=prefix)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert "lockeddir/inside.txt" not in ds.keys()
    assert lockdir in skipped_paths(ds.manifest)
    assert ds["sub/secret.bin"] == b"top secret"


def test_unreadable_file_through_the_api_is_a_permission_error(locked_tree):
    """packds.pack raises PermissionError (an OSError) with errno and filename set, and a hint."""
    prefix, src, outp, secret, lockdir = locked_tree
    shutil.rmtree(lockdir)
    os.chmod(secret, 0)
    code = f"""
import errno, json, os, packds
try:
    packds.pack({src!r}, {os.path.join(outp, 'o.pds')!r})
except OSError as e:
    print(json.dumps([type(e).__name__, e.errno, os.fsdecode(e.filename), e.hint]))
"""
    r = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, h.show(r)
    name, errno_, filename, hint = json.loads(r.stdout)
    assert name == "PermissionError" and errno_ == 13
    assert filename == secret
    assert hint and "skip" in hint


# ------------------------------------------------------------- files that change while read


def test_file_whose_size_lies_is_a_source_change(work):
    """/proc files stat as 0 bytes but read as more: a file that "grew while read"."""
    ok = h.write(work, b"ok.txt", b"ok")
    out = os.path.join(work, "o.pds")
    with pytest.raises(SourceChangedError) as ei:
        packds.pack(["/proc/version", ok], out)
    assert "/proc/version" in str(ei.value) and ei.value.hint
    assert not os.path.exists(out)
    r = h.cli("pack", "/proc/version", ok, "-o", out)
    h.assert_cli_error(r, "/proc/version")
    s = packds.pack(["/proc/version", ok], out, on_error="skip")
    assert s["files"] == 1 and [p for p, _ in s["skipped"]] == ["/proc/version"]
    assert packds.open(out)["ok.txt"] == b"ok"


# ------------------------------------------------------------------------ include / exclude


@pytest.fixture
def globby(work):
    src = os.path.join(work, "src")
    for k in [b"a.txt", b"b.bin", b"sub/c.txt", b"sub/d.bin", b".git/config", b".git/objects/x.txt", b"deep/er/e.txt", b"deep/er/f.TXT", b"\xff.txt"]:
        h.write(src, k, k)
    return src


@pytest.mark.parametrize(
    "args,want",
    [
        ([], [b".git/config", b".git/objects/x.txt", b"a.txt", b"b.bin", b"deep/er/e.txt", b"deep/er/f.TXT", b"sub/c.txt", b"sub/d.bin", b"\xff.txt"]),
        (["--include", "*.txt"], [b".git/objects/x.txt", b"a.txt", b"deep/er/e.txt", b"sub/c.txt", b"\xff.txt"]),
        (["--include", "*.txt", "--include", "*.bin"], [b".git/objects/x.txt", b"a.txt", b"b.bin", b"deep/er/e.txt", b"sub/c.txt", b"sub/d.bin", b"\xff.txt"]),
        (["--exclude", ".git"], [b"a.txt", b"b.bin", b"deep/er/e.txt", b"deep/er/f.TXT", b"sub/c.txt", b"sub/d.bin", b"\xff.txt"]),
        (["--exclude", "*.bin", "--exclude", ".git"], [b"a.txt", b"deep/er/e.txt", b"deep/er/f.TXT", b"sub/c.txt", b"\xff.txt"]),
        (["--include", "*.txt", "--exclude", "sub"], [b".git/objects/x.txt", b"a.txt", b"deep/er/e.txt", b"\xff.txt"]),
        (["--include", "sub/*"], [b"sub/c.txt", b"sub/d.bin"]),
        (["--include", "deep/**/*.txt"], [b"deep/er/e.txt"]),
        (["--exclude", "a.txt"], [b".git/config", b".git/objects/x.txt", b"b.bin", b"deep/er/e.txt", b"deep/er/f.TXT", b"sub/c.txt", b"sub/d.bin", b"\xff.txt"]),
    ],
    ids=["none", "include", "two-includes", "exclude-dir", "two-excludes", "include+exclude", "include-dir", "doublestar", "exclude-file"],
)
def test_include_exclude(globby, work, args, want):
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", globby, "-o", out, "-q", *args)
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert [ds.key_bytes(i) for i in range(len(ds))] == want
    for k in want:
        assert ds[k] == k
    opts = ds.manifest["options"]
    assert opts["include"] == [a for p, a in zip(args, args[1:]) if p == "--include"]
    assert opts["exclude"] == [a for p, a in zip(args, args[1:]) if p == "--exclude"]


def test_include_matching_nothing(globby, work):
    r = h.cli("pack", globby, "-o", os.path.join(work, "o.pds"), "--include", "*.jpeg")
    h.assert_cli_error(r, "no files")


def test_output_inside_the_source_is_not_packed_into_itself(work):
    src = os.path.join(work, "src")
    h.write(src, b"a.txt", b"a")
    out = os.path.join(src, "self.pds")
    r = h.cli("pack", src, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert [ds.key(i) for i in range(len(ds))] == ["a.txt"]
    # And packing again with --force (the dataset now sits in the tree) still skips it.
    r = h.cli("pack", src, "-o", out, "-q", "--force")
    assert r.returncode == 0, h.show(r)
    assert [packds.open(out).key(i) for i in range(1)] == ["a.txt"] and len(packds.open(out)) == 1


# ------------------------------------------------------------------- extreme metadata


def test_extreme_mtimes_modes_and_ids_in_tar_headers(work):
    """Pre-1970 and post-2242 mtimes, mtime 0, setuid/sticky modes and ids above the ustar
    octal range: pax records carry what ustar cannot; tarfile and GNU tar read them back."""
    src = os.path.join(work, "src")
    cases = {
        b"t_neg": dict(mtime=-86_400),
        b"t_zero": dict(mtime=0),
        b"t_2242plus": dict(mtime=9_000_000_000),
        b"t_max_octal": dict(mtime=0o77777777777),
        b"m_setuid": dict(mode=0o4755),
        b"m_sticky": dict(mode=0o1777),
        b"m_none": dict(mode=0o000),
        b"ids_big": dict(ids=3_000_000),
        b"ids_edge": dict(ids=0o7777777),
    }
    for k, c in cases.items():
        p = h.write(src, k, k * 3, mode=c.get("mode"))
        if "ids" in c:
            os.chown(p, c["ids"], c["ids"])
        if "mtime" in c:
            os.utime(p, (c["mtime"], c["mtime"]))
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tf:
        members = {m.name.encode(): m for m in tf}
        for k in cases:
            st = os.lstat(os.path.join(os.fsencode(src), k))
            m = members[k]
            assert m.mtime == math.floor(st.st_mtime), (k, m.mtime, st.st_mtime)
            assert m.mode == stat.S_IMODE(st.st_mode), (k, oct(m.mode))
            assert (m.uid, m.gid) == (st.st_uid, st.st_gid), (k, m.uid, m.gid)
            assert tf.extractfile(m).read() == k * 3 == ds[k]
    dest = os.path.join(work, "x")
    os.mkdir(dest)
    t = subprocess.run(["tar", "-xf", os.path.join(out, "shard-00000.tar"), "-C", dest], capture_output=True)
    assert t.returncode == 0, t.stderr
    for k in cases:
        a = os.lstat(os.path.join(os.fsencode(src), k))
        b_ = os.lstat(os.path.join(os.fsencode(dest), k))
        assert math.floor(b_.st_mtime) == math.floor(a.st_mtime), (k, a.st_mtime, b_.st_mtime)
        assert stat.S_IMODE(b_.st_mode) == stat.S_IMODE(a.st_mode), k
