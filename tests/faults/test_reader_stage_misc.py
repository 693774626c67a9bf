"""Catalogue D12 (stage of an incomplete source), E3 (get_many in a forked child after the
parent used it), E5 (hundreds of shards under a low fd limit), F4 (unpack into a full disk)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest

import _helpers as h
import packds


@pytest.mark.faults
def test_d12_stage_of_an_interrupted_pack_fails_before_copying(work):
    """The source is a pack killed after 2 shards (no manifest): stage refuses it naming the
    source, exit 1, and writes nothing at the destination (not even a partial copy)."""
    tree = h.make_plain_tree(os.path.join(work, "t"), 200, size_range=(500, 1500), seed=2)
    src = os.path.join(work, "src.pds")
    r = h.cli("pack", tree.root, "-o", src, "--shard-size", "16K", "-q", env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode != 0 and not os.path.exists(os.path.join(src, "manifest.json"))
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    p = h.popen_cli("stage", src, "--to", dest, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and out == "", err
    assert err.startswith("packds: error:") and src in err and "hint:" in err, err
    assert [n for n in os.listdir(dest) if not n.endswith(".lock")] == []


def test_d12_stage_of_unmerged_parts_says_run_merge(work):
    """The source holds the parts of a job-array pack, not merged yet: stage refuses it (it is
    not a tree of loose files to pack on the fly) and names `packds merge`; nothing copied."""
    tree = h.make_plain_tree(os.path.join(work, "t"), 50, size_range=(500, 1500), seed=3)
    plan, src = os.path.join(work, "p.pdsp"), os.path.join(work, "src.pds")
    assert h.cli("plan", tree.root, "-o", plan, "--shard-size", "16K", "--parts", "2").returncode == 0
    assert h.cli("pack", "--plan", plan, "--part", "0", "-o", src).returncode == 0
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    r = h.cli("stage", src, "--to", dest)
    h.assert_cli_error(r, "not merged")
    assert f"packds merge {src}".encode() in r.stderr and r.stdout == b""
    assert [n for n in os.listdir(dest) if not n.endswith(".lock")] == []


_DS = None


def _child_get_many(q):
    try:
        n = len(_DS)
        got = _DS.get_many(list(range(n)))
        q.put(sum(map(len, got)))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


def test_e3_get_many_in_a_forked_child_after_the_parent_used_it(small_ds_pristine):
    """The parent calls get_many (and verify, which uses threads), then forks: get_many in the
    child returns the same bytes and does not hang (20 s watchdog)."""
    global _DS
    _DS = packds.open(small_ds_pristine)
    try:
        want = sum(map(len, _DS.get_many(list(range(len(_DS))))))
        assert _DS.verify()["problems"] == []
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=_child_get_many, args=(q,)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=20) for _ in procs]
        for p in procs:
            p.join(20)
            assert p.exitcode == 0
        assert results == [want] * 4
    finally:
        _DS = None


def test_e5_many_shards_under_a_low_fd_limit(work):
    """~500 shards opened and read in full by a process with RLIMIT_NOFILE = 64: shards are
    mapped, their fds closed; every sample reads back."""
    tree = os.path.join(work, "t")
    for i in range(500):
        h.write(tree, b"f%04d" % i, os.urandom(3000) + b"%d" % i)
    out = os.path.join(work, "o.pds")
    packds.pack(tree, out, shard_size=4096)
    nshards = len([n for n in os.listdir(out) if n.startswith("shard-")])
    assert nshards >= 400
    code = textwrap.dedent(f"""
        import resource, packds, os
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        ds = packds.open({out!r})
        total = sum(len(ds[i]) for i in range(len(ds)))
        assert ds.get_many(list(range(len(ds))))[-1].endswith(b"499")
        print(len(ds), total, len(os.listdir("/proc/self/fd")))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    h.assert_not_signalled(r)
    assert r.returncode == 0, h.show(r)
    n, total, fds = map(int, r.stdout.split())
    assert n == 500 and fds < 64


def test_f4_unpack_into_a_full_disk(small_ds_pristine, work):
    """F4: unpack onto a 256 KiB tmpfs: NoSpaceError / exit 1 with one error line, no crash."""
    with h.tmpfs(os.path.join(work, "mnt"), "size=256K") as mnt:
        dest = os.path.join(mnt, "out")
        r = h.cli("unpack", small_ds_pristine, dest)
        h.assert_cli_error(r, "no space left on device")
        with pytest.raises(packds.NoSpaceError):
            packds.open(small_ds_pristine).unpack(os.path.join(mnt, "again"))
