"""The node-local shard cache under StreamingDataset: 2 simulated nodes x 2 ranks, each rank a
process with real DataLoader workers, each node its own cache directory.

Checks: every sample exactly once per epoch, one fetch per shard per node, epoch 2 served from
the cache, the limit never exceeded while shards are evicted, a killed fetcher leaving nothing
a later reader uses, and the cache default inside a Slurm job.

Skipped without torch, unless PACKDS_REQUIRE_TORCH=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import packds
from packds import streams

if os.environ.get("PACKDS_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401  (CI: a missing torch is a failure, not a skip)
else:
    torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

import packds.torch as pt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N = 600
SAMPLE = 2000


@pytest.fixture(autouse=True)
def no_job(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NODEID", "SLURM_LOCALID",
                "LOCAL_WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "SLURM_TMPDIR", "SLURM_JOB_ID", "PACKDS_FAULT"):
        monkeypatch.delenv(var, raising=False)


def payload(i: int) -> bytes:
    return f"s/{i:05d}\0".encode() + bytes([(i * 7) % 251]) * SAMPLE


def check(x: bytes) -> str:
    """The sample's name, after checking its bytes are the ones written (a torn or foreign
    shard would give other bytes)."""
    name = x.split(b"\0", 1)[0].decode()
    assert x == payload(int(name[2:])), name
    return name


def _make(base: str, name: str, first: int) -> str:
    src = os.path.join(base, name + "-src")
    os.makedirs(src, exist_ok=True)
    for i in range(first, first + N):
        with open(os.path.join(src, f"{i:05d}"), "wb") as f:
            f.write(payload(i))
    out = os.path.join(base, name + ".pds")
    packds.pack(src, out, shard_size=32 << 10)
    return out


@pytest.fixture(scope="module")
def shared_ds(fast_base):
    return _make(fast_base, "cache", 0)


@pytest.fixture(scope="module")
def other_ds(fast_base):
    """Another dataset (samples s/01000.. : other shard contents, so other cache entries)."""
    return _make(fast_base, "cache-other", 1000)


def collate_list(b):
    return b


def rank_main(paths, cache, rank, barrier, q, limit, workers, epochs, ctx="fork"):
    try:
        loaders = []
        for path in paths if isinstance(paths, list) else [paths]:
            s = pt.StreamingDataset(path, seed=3, block_size=8192, shuffle_buffer=16, rank=rank, world_size=4, nodes=2,
                                    cache_dir=cache, cache_limit=limit, pad=False, prefetch=2)
            assert s.partition == "node"
            loaders.append((s, DataLoader(s, batch_size=8, num_workers=workers, collate_fn=collate_list,
                                          multiprocessing_context=ctx, persistent_workers=True)))
        got = {}
        for epoch in range(epochs):
            got[epoch] = []
            for s, dl in loaders:  # several datasets sharing the node's cache, one after the other
                s.set_epoch(epoch)
                got[epoch] += [check(x) for b in dl for x in b]
            barrier.wait(timeout=120)  # every rank of every node finished this epoch
            got[f"log{epoch}"] = len(packds._core.ShardCache(cache, 1 << 40).fetch_log())
            barrier.wait(timeout=120)
        q.put((rank, got, None))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((rank, None, repr(e)))


def run_nodes(path, caches, limit=None, workers=2, epochs=2, dl_ctx="fork"):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(path, caches[r // 2], r, barrier, q, limit, workers, epochs, dl_ctx))
             for r in range(4)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, got, err = q.get(timeout=300)
        assert err is None, f"rank {rank}: {err}"
        out[rank] = got
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return out


def shard_hashes(path, lo, hi) -> set[str]:
    ds = packds.open(path)
    recs = ds.manifest["shards"]
    return {recs[ds.shard_of(i)]["xxh3_128"] for i in range(lo, hi)}


@pytest.mark.parametrize("dl_ctx", ["fork", "spawn"])
def test_two_nodes_one_fetch_per_shard_and_epoch_two_from_cache(shared_ds, work, dl_ctx):
    caches = [os.path.join(work, "node0", "packds-cache"), os.path.join(work, "node1", "packds-cache")]
    out = run_nodes(shared_ds, caches, dl_ctx=dl_ctx)
    for epoch in (0, 1):
        names = sorted(n for r in range(4) for n in out[r][epoch])
        assert names == [f"s/{i:05d}" for i in range(N)]  # every sample exactly once
    for g, cache in enumerate(caches):
        log = packds._core.ShardCache(cache, 1 << 40).fetch_log()
        hashes = [h for h, _, _ in log]
        assert len(hashes) == len(set(hashes))  # one fetch per shard per node
        a, b = streams.share_bounds(N, 2, g)
        assert set(hashes) == shard_hashes(shared_ds, a, b)  # exactly the node's share
        assert out[2 * g]["log1"] == out[2 * g]["log0"]  # epoch 2: no fetch at all
        pids = {pid for _, _, pid in log}
        assert len(pids) >= 2  # fetched by several processes of the node, sharing the copies


def test_eviction_keeps_the_limit_and_reads_stay_correct(shared_ds, other_ds, work):
    caches = [os.path.join(work, "node0", "c"), os.path.join(work, "node1", "c")]
    shard = max(r["size"] for r in packds.open(shared_ds).manifest["shards"])
    limit = 6 * shard  # two datasets of ~10 shards per node share it: each evicts the other's
    peak = [0]
    stop = threading.Event()

    def watch():
        # Holds the cache's room-making lock while it counts, as the cache does: a count taken
        # across an eviction and the next temporary file would see both.
        while not stop.is_set():
            for c in caches:
                try:
                    fd = os.open(os.path.join(c, "evict.lock"), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    total = 0
                    for sub in ("shards", "tmp"):
                        try:
                            total += sum(e.stat().st_size for e in os.scandir(os.path.join(c, sub)))
                        except FileNotFoundError:
                            pass
                    peak[0] = max(peak[0], total)
                finally:
                    os.close(fd)
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = run_nodes([shared_ds, other_ds], caches, limit=limit)
    finally:
        stop.set()
        t.join()
    for epoch in (0, 1):
        want = [f"s/{i:05d}" for i in [*range(N), *range(1000, 1000 + N)]]
        assert sorted(n for r in range(4) for n in out[r][epoch]) == want
    assert 0 < peak[0] <= limit
    logs = [[h for h, _, _ in packds._core.ShardCache(c, 1 << 40).fetch_log()] for c in caches]
    assert any(len(log) > len(set(log)) for log in logs)  # shards were evicted and fetched again


def test_pinned_shard_survives_eviction_by_readers(shared_ds, work):
    cache = os.path.join(work, "c")
    ds = packds.open(shared_ds)
    recs = ds.manifest["shards"]
    limit = 3 * max(r["size"] for r in recs)
    sc = packds._core.ShardCache(cache, limit)
    held = sc.fetch(os.path.join(shared_ds, recs[0]["file"]), recs[0]["size"], recs[0]["xxh3_128"])
    assert held is not None
    s = pt.StreamingDataset(shared_ds, seed=1, block_size=8192, cache_dir=cache, cache_limit=limit)
    assert sorted(check(x) for x in s) == [f"s/{i:05d}" for i in range(N)]
    assert os.path.exists(held.path)  # LRU, but pinned: still there
    buf, offs = ds.read_range(0, 3, local=held)
    assert bytes(buf[offs[0]:offs[1]]) == payload(0)
    held.close()


@pytest.mark.faults
def test_killed_fetcher_leaves_nothing_usable(shared_ds, work):
    cache = os.path.join(work, "c")
    code = ("import packds.torch as pt, sys\n"
            "s = pt.StreamingDataset(sys.argv[1], seed=0, block_size=8192, cache_dir=sys.argv[2], prefetch=0)\n"
            "for x in s: pass\n")
    env = dict(os.environ, PACKDS_FAULT="cache-kill-after-bytes:4096")
    r = subprocess.run([sys.executable, "-c", code, shared_ds, cache], env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    shards = os.listdir(os.path.join(cache, "shards")) if os.path.isdir(os.path.join(cache, "shards")) else []
    assert shards == []  # the copy in progress was never renamed into place
    s = pt.StreamingDataset(shared_ds, seed=0, block_size=8192, cache_dir=cache)
    assert sorted(check(x) for x in s) == [f"s/{i:05d}" for i in range(N)]
    st = s.cache_stats()
    assert st["fetches"] > 0 and st["usage"] <= st["limit"]
    assert os.listdir(os.path.join(cache, "tmp")) == []  # the killed fetcher's leftover was removed


def test_cache_default_is_slurm_tmpdir_inside_a_job(shared_ds, work, monkeypatch):
    assert pt.StreamingDataset(shared_ds).cache_dir is None  # outside a job: off
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_TMPDIR", work)
    s = pt.StreamingDataset(shared_ds, seed=0, block_size=8192)
    assert s.cache_dir == os.path.join(work, "packds-cache")
    assert len([check(x) for x in s]) == N
    st = s.cache_stats()
    assert st["fetches"] == len(packds.open(shared_ds).manifest["shards"]) and st["read_through_bytes"] == 0
    assert 0 < st["limit"]
    assert pt.StreamingDataset(shared_ds, cache_dir=None).cache_dir is None


def test_resume_mid_epoch_with_cache_and_node_partition(shared_ds, work):
    cache = os.path.join(work, "c")

    def run(rank, stop=None, state=None):
        s = pt.StreamingDataset(shared_ds, seed=6, block_size=8192, shuffle_buffer=16, rank=rank, world_size=4, nodes=2,
                                cache_dir=cache)
        dl = pt.StreamingLoader(s, batch_size=8, num_workers=2, collate_fn=collate_list, multiprocessing_context="fork")
        if state:
            dl.load_state_dict(state)
        out = []
        for b in dl:
            out.append([check(x) for x in b])
            if len(out) == stop:
                break
        return out, dl.state_dict()

    for rank in (0, 3):
        full, _ = run(rank)
        head, st = run(rank, stop=4)
        assert st["partition"] == "node" and st["groups"] == 2
        rest, _ = run(rank, state=st)
        assert head + rest == full


def test_cache_below_a_directory_another_user_controls_is_refused(shared_ds, work):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user (65534)")
    theirs = os.path.join(work, "theirs")
    os.makedirs(theirs)
    os.chown(theirs, 65534, 65534)
    s = pt.StreamingDataset(shared_ds, cache_dir=os.path.join(theirs, "mine", "cache"))
    with pytest.raises(packds.UsageError, match="owned by uid 65534") as e:
        next(iter(s))
    assert "only you can write" in e.value.hint


def test_dataset_written_out_of_key_order_streams_through_the_cache(work):
    path = os.path.join(work, "unordered.pds")
    order = list(range(N))
    import random

    random.Random(2).shuffle(order)
    with packds.Writer(path, shard_size=32 << 10) as w:
        for i in order:
            w.add(f"s/{i:05d}", payload(i))
    s = pt.StreamingDataset(path, seed=0, block_size=8192, cache_dir=os.path.join(work, "c"))
    for epoch in (0, 1):
        s.set_epoch(epoch)
        assert sorted(check(x) for x in s) == [f"s/{i:05d}" for i in range(N)]


def test_share_larger_than_the_cache_keeps_a_fixed_subset(shared_ds, work):
    """LRU over a share larger than the cache would fetch and evict every epoch; a fixed subset
    stays cached instead, so epoch 2 fetches nothing and reads only the rest in place."""
    cache = os.path.join(work, "c")
    recs = packds.open(shared_ds).manifest["shards"]
    total = sum(r["size"] for r in recs)
    limit = total // 3
    s = pt.StreamingDataset(shared_ds, seed=0, block_size=8192, cache_dir=cache, cache_limit=limit)
    assert sorted(check(x) for x in s) == [f"s/{i:05d}" for i in range(N)]
    first = s.cache_stats()
    assert 0 < first["cached_shards"] < len(recs) and first["usage"] <= limit
    assert first["evictions"] == 0 and first["fetches"] == first["cached_shards"]
    s.set_epoch(1)
    assert sorted(check(x) for x in s) == [f"s/{i:05d}" for i in range(N)]
    second = s.cache_stats()
    assert second["fetches"] == first["fetches"]  # epoch 2: nothing fetched again
    cached = sum(recs[k]["size"] for k in range(len(recs)) if (0, k) in s._cache_client().allowed)
    # epoch 2 read in place only what is not cached (sample bytes; shards add headers)
    assert second["read_through_bytes"] - first["read_through_bytes"] <= total - cached


def test_cache_command_shows_and_clears_what_no_reader_holds(shared_ds, work):
    import json

    import _helpers as h

    cache = os.path.join(work, "c")
    s = pt.StreamingDataset(shared_ds, seed=0, block_size=8192, cache_dir=cache)
    assert len([check(x) for x in s]) == N
    recs = packds.open(shared_ds).manifest["shards"]
    r = h.cli("cache", cache, "--json")
    assert r.returncode == 0, h.show(r)
    rec = json.loads(r.stdout)
    assert rec["entries"] == rec["fetches"] == len(recs) and rec["bytes"] == sum(x["size"] for x in recs)
    held = packds._core.ShardCache(cache, 1 << 40).lookup(recs[0]["size"], recs[0]["xxh3_128"])
    assert held is not None
    r = h.cli("cache", cache, "--clear")
    assert r.returncode == 0 and b"1 kept: in use by a running reader" in r.stdout, h.show(r)
    assert os.listdir(os.path.join(cache, "shards")) == [os.path.basename(held.path)]
    held.close()
    rec = json.loads(h.cli("cache", cache, "--clear", "--json").stdout)
    assert rec["removed"] == 1 and rec["kept_pinned"] == 0 and os.listdir(os.path.join(cache, "shards")) == []
    h.assert_cli_error(h.cli("cache", os.path.join(work, "nope")), "does not exist")
