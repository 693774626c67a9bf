"""The node-local shard cache (``_core.ShardCache``): one copy per shard whatever the number of
processes fetching it, eviction within the limit that never removes a pinned shard, nothing
usable left by a killed or failed fetch, no trust in files others put there, and
``read_range(local=)`` reading the same bytes from the cached copy."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import pytest

import packds
from packds import _core
from packds.errors import ChecksumError, FormatError, UsageError

BIG = 3 << 20  # one sample this large: a shard copied in several chunks


def _pack(work, name, compress="none"):
    src = os.path.join(work, name + "-src")
    os.makedirs(src)
    for i in range(60):
        # Compressible but not constant, different per file.
        data = (f"sample {i} ".encode() * 400)[: 1500 + 97 * i]
        with open(os.path.join(src, f"s{i:03}.bin"), "wb") as f:
            f.write(data)
    with open(os.path.join(src, "zbig.bin"), "wb") as f:
        f.write(os.urandom(BIG))
    out = os.path.join(work, name + ".pds")
    packds.pack([src], out, shard_size=32 << 10, compress=compress)
    return out


def _shards(ds_path):
    """(path, size, xxh3_128) of every shard, in manifest order."""
    m = json.loads(packds.open(ds_path).manifest_json())
    return [(os.path.join(ds_path, s["file"]), s["size"], s["xxh3_128"]) for s in m["shards"]]


def _biggest(shards):
    return max(shards, key=lambda s: s[1])


@pytest.fixture
def ds(work):
    return _pack(work, "raw")


def _listing(cache_dir, sub):
    return sorted(os.listdir(os.path.join(cache_dir, sub)))


# --- one copy per shard, across processes -----------------------------------------------------


def _fetch_worker(cache_dir, limit, shard, barrier, q):
    c = _core.ShardCache(cache_dir, limit)
    barrier.wait()
    s = c.fetch(*shard)
    with open(shard[0], "rb") as f:
        same = s is not None and open(s.path, "rb").read() == f.read()
    q.put((os.getpid(), same, c.stats()["fetches"]))
    if s is not None:
        s.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_fetching_one_shard_copy_it_once(ds, work, method):
    ctx = mp.get_context(method)
    cache_dir = os.path.join(work, "cache")
    shard = _biggest(_shards(ds))
    n = 3
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_fetch_worker, args=(cache_dir, 1 << 30, shard, barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(same for _, same, _ in results), results
    assert sum(f for _, _, f in results) == 1, results
    c = _core.ShardCache(cache_dir, 1 << 30)
    log = c.fetch_log()
    assert [(h, size) for h, size, _ in log] == [(shard[2], shard[1])]
    assert log[0][2] in {pid for pid, _, _ in results}
    assert _listing(cache_dir, "tmp") == []
    assert _listing(cache_dir, "shards") == [f"{shard[2]}-{shard[1]}"]
    assert c.usage() == shard[1]


def test_threads_and_hits_in_one_process(ds, work):
    c = _core.ShardCache(os.path.join(work, "cache"), 1 << 30)
    path, size, h = _shards(ds)[0]
    assert c.lookup(size, h) is None
    with c.fetch(path, size, h) as a:
        assert not a.closed and a.size == size and os.path.dirname(a.path).endswith("shards")
        b = c.lookup(size, h)
        assert b is not None and b.path == a.path
        b.close()
        b.close()  # idempotent
        assert b.closed
    assert a.closed
    assert c.stats() == {"fetches": 1, "fetched_bytes": size, "hits": 1, "evictions": 0, "evicted_bytes": 0}
    assert c.dir == os.path.join(work, "cache") and c.limit == 1 << 30
    assert os.stat(c.dir).st_mode & 0o777 == 0o700
    with pytest.raises(UsageError, match="XXH3-128"):
        c.fetch(path, size, "not-a-hash")


# --- eviction ---------------------------------------------------------------------------------


def _pin_and_wait(cache_dir, limit, shard, ready, done, q):
    c = _core.ShardCache(cache_dir, limit)
    s = c.fetch(*shard)
    ready.set()
    done.wait(60)
    with open(shard[0], "rb") as f:
        q.put((s is not None, s is not None and open(s.path, "rb").read() == f.read(), s.path if s else None))
    if s is not None:
        s.close()


def test_eviction_respects_the_limit_and_never_removes_a_pinned_shard(ds, work):
    shards = _shards(ds)
    big = _biggest(shards)
    small = [s for s in shards if s != big]
    assert len(small) >= 4
    cache_dir = os.path.join(work, "cache")
    # Room for the pinned shard and about two others.
    limit = small[0][1] + 2 * max(s[1] for s in small[1:]) + 1
    ctx = mp.get_context("fork")
    ready, done, q = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_pin_and_wait, args=(cache_dir, limit, small[0], ready, done, q))
    holder.start()
    try:
        assert ready.wait(60)
        pinned = os.path.join(cache_dir, "shards", f"{small[0][2]}-{small[0][1]}")
        os.utime(pinned, (1, 1))  # the least recently used entry: still never evicted
        c = _core.ShardCache(cache_dir, limit)
        for _ in range(2):
            for s in small[1:]:
                got = c.fetch(*s)
                assert got is not None
                got.close()
                assert c.usage() <= limit
                assert os.path.exists(pinned)
        assert c.fetch(*big) is None  # larger than the limit
        st = c.stats()
        assert st["evictions"] > 0 and st["evicted_bytes"] > 0
    finally:
        done.set()
        holder.join(60)
    assert holder.exitcode == 0
    assert q.get(timeout=10)[:2] == (True, True)
    # Unpinned now: it can go.
    for s in small[1:]:
        c.fetch(*s).close()
    assert c.usage() <= limit


def test_no_room_when_every_cached_shard_is_pinned(ds, work):
    shards = sorted(_shards(ds), key=lambda s: s[1])[:3]
    c = _core.ShardCache(os.path.join(work, "cache"), shards[1][1] + shards[2][1])
    a, b = c.fetch(*shards[1]), c.fetch(*shards[2])
    assert a is not None and b is not None
    assert c.fetch(*shards[0]) is None
    b.close()
    with c.fetch(*shards[0]) as s:
        assert s is not None
    a.close()


# --- failures leave nothing usable --------------------------------------------------------------


@pytest.mark.faults
def test_a_killed_fetcher_leaves_nothing_usable(ds, work):
    cache_dir = os.path.join(work, "cache")
    path, size, h = _biggest(_shards(ds))
    code = "import sys; from packds import _core; _core.ShardCache(sys.argv[1], 1 << 30).fetch(sys.argv[2], int(sys.argv[3]), sys.argv[4])"
    env = dict(os.environ, PACKDS_FAULT=f"cache-kill-after-bytes:{size // 4}")
    r = subprocess.run([sys.executable, "-c", code, cache_dir, path, str(size), h], env=env, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _listing(cache_dir, "shards") == []
    assert len(_listing(cache_dir, "tmp")) == 1  # the dead copy, full size, unlocked
    c = _core.ShardCache(cache_dir, 1 << 30)
    assert c.lookup(size, h) is None
    assert c.fetch_log() == []
    with c.fetch(path, size, h) as s:
        with open(path, "rb") as f:
            assert open(s.path, "rb").read() == f.read()
    assert _listing(cache_dir, "tmp") == []
    assert c.fetch_log() == [(h, size, os.getpid())]
    assert c.usage() == size


def test_a_damaged_shard_raises_and_leaves_nothing(ds, work):
    cache_dir = os.path.join(work, "cache")
    path, size, h = _shards(ds)[1]
    bad = os.path.join(work, os.path.basename(path))
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        f.seek(size // 2)
        x = f.read(1)
        f.seek(size // 2)
        f.write(bytes([x[0] ^ 1]))
    c = _core.ShardCache(cache_dir, 1 << 30)
    with pytest.raises(ChecksumError) as e:
        c.fetch(bad, size, h)
    assert bad in str(e.value) and e.value.shard == bad
    with open(bad, "ab") as f:
        f.truncate(size - 1)
    with pytest.raises(FormatError, match="manifest.json says") as e:
        c.fetch(bad, size, h)
    assert bad in str(e.value)
    assert _listing(cache_dir, "shards") == [] and _listing(cache_dir, "tmp") == []
    assert c.fetch_log() == [] and c.usage() == 0 and c.stats()["fetches"] == 0
    assert c.fetch(path, size, h) is not None


# --- reading from the cached copy ---------------------------------------------------------------


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_read_range_from_the_cached_copy_gives_the_same_bytes(work, compress):
    path = _pack(work, "ds-" + compress, compress=compress)
    shards = _shards(path)
    c = _core.ShardCache(os.path.join(work, "cache"), 1 << 30)
    local = [c.fetch(*s) for s in shards]
    assert all(s is not None for s in local)
    for verify in (False, True):
        with packds.open(path, verify=verify) as ds:
            assert ds.format_version == (1 if compress == "none" else 2)
            out = bytearray()
            for a, b in ds.blocks(16 << 10):
                k = ds.shard_of(a)
                assert ds.shard_of(b - 1) == k
                want = ds.read_range(a, b)
                buf, offs = ds.read_range(a, b, out=out, local=local[k])
                assert offs == want[1] and buf[: offs[-1]] == want[0][: offs[-1]]
            n = len(ds)
            assert ds.shard_of(0) != ds.shard_of(n - 1)
            with pytest.raises(UsageError, match="lie in shards"):
                ds.read_range(0, n, local=local[ds.shard_of(0)])
            with pytest.raises(UsageError, match="is not the one cached"):
                ds.read_range(n - 1, n, local=local[ds.shard_of(0)])
    closed = local[0]
    closed.close()
    with packds.open(path) as ds, pytest.raises(ValueError, match="closed"):
        ds.read_range(0, 1, local=closed)
    for s in local:
        s.close()


# --- trust --------------------------------------------------------------------------------------


def test_a_wrong_size_entry_is_not_trusted(ds, work):
    cache_dir = os.path.join(work, "cache")
    c = _core.ShardCache(cache_dir, 1 << 30)
    path, size, h = _shards(ds)[2]
    entry = os.path.join(cache_dir, "shards", f"{h}-{size}")
    with open(entry, "wb") as f:
        f.write(b"x" * (size - 1))
    assert c.lookup(size, h) is None
    with c.fetch(path, size, h) as s:
        assert os.path.getsize(s.path) == size
    assert c.stats()["fetches"] == 1


def test_a_cache_directory_others_can_write_is_refused(work):
    d = os.path.join(work, "open")
    os.mkdir(d)
    os.chmod(d, 0o777)
    with pytest.raises(UsageError, match="can be written by other users") as e:
        _core.ShardCache(d, 1 << 20)
    assert "chmod 700" in e.value.hint


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to give files to another user (65534)")


def test_an_entry_planted_by_another_user_is_not_trusted(ds, work):
    _need_root()
    cache_dir = os.path.join(work, "cache")
    c = _core.ShardCache(cache_dir, 1 << 30)
    path, size, h = _shards(ds)[3]
    entry = os.path.join(cache_dir, "shards", f"{h}-{size}")
    shutil.copyfile(path, entry)  # even the right bytes: another user's file is not trusted
    os.chown(entry, 65534, 65534)
    assert c.lookup(size, h) is None
    with c.fetch(path, size, h) as s:
        assert os.stat(s.path).st_uid == os.geteuid()
    assert [x[:2] for x in c.fetch_log()] == [(h, size)]


def test_a_cache_directory_of_another_user_is_refused(work):
    _need_root()
    d = os.path.join(work, "theirs")
    os.mkdir(d, 0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UsageError, match="owned by uid 65534") as e:
        _core.ShardCache(d, 1 << 20)
    assert "of your own" in e.value.hint
    assert os.listdir(d) == []
