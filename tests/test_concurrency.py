"""Acceptance 3: a Dataset opened before fork() serves forked workers correctly; one Dataset
serves many threads at once; a pickled Dataset re-opens in spawn workers."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import threading

import packds

# Set in the parent before forking; inherited by the workers (the point of the test).
_DS: packds.Dataset | None = None
_ROOT: bytes = b""


def _digest(b) -> str:
    return hashlib.blake2b(bytes(b), digest_size=16).hexdigest()


def _fork_worker(args):
    seed, n, keys = args
    ds = _DS
    rng = random.Random(seed)
    bad = []
    checked = 0
    idx = [rng.randrange(len(ds)) for _ in range(n)]
    for i in idx:
        want = open(os.path.join(_ROOT, keys[i]), "rb").read()
        if ds[i] != want:
            bad.append(("getitem", i))
        if bytes(ds.view(i)) != want:
            bad.append(("view", i))
        checked += 1
    # Batches through get_many (GIL released while copying), negative indices included.
    for start in range(0, len(idx), 97):
        batch = idx[start : start + 97]
        neg = [j - len(ds) if j % 2 else j for j in batch]
        got = ds.get_many(neg)
        for j, g in zip(batch, got):
            if g != open(os.path.join(_ROOT, keys[j]), "rb").read():
                bad.append(("get_many", j))
        checked += len(batch)
    # By key.
    for i in idx[:300]:
        if ds[keys[i]] != open(os.path.join(_ROOT, keys[i]), "rb").read():
            bad.append(("key", i))
    return os.getpid(), checked, bad


def test_forked_workers_read_correctly(odd_tree, odd_ds):
    global _DS, _ROOT
    _DS = packds.open(odd_ds[0])
    _ROOT = odd_tree.root_b
    try:
        # Touch some samples and views in the parent first, so children inherit live mappings.
        for i in range(0, len(_DS), 997):
            _DS[i]
            _DS.view(i)
        ctx = mp.get_context("fork")
        with ctx.Pool(4) as pool:
            res = pool.map(_fork_worker, [(s, 1500, odd_tree.keys) for s in range(8)], chunksize=1)
    finally:
        _DS = None
    pids = {r[0] for r in res}
    assert len(pids) >= 2, "work did not spread over several forked processes"
    assert pids.isdisjoint({os.getpid()})
    assert sum(r[1] for r in res) >= 8 * 3000
    bad = [b for r in res for b in r[2]]
    assert not bad, f"{len(bad)} wrong reads in forked workers, e.g. {bad[:10]}"


def test_fork_after_heavy_use_then_parent_still_reads(odd_tree, odd_ds):
    """Parent keeps working after its children exit (no shared state torn down by them)."""
    global _DS, _ROOT
    _DS = packds.open(odd_ds[0])
    _ROOT = odd_tree.root_b
    try:
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_fork_worker, args=((s, 200, odd_tree.keys),)) for s in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        for i in range(0, len(_DS), 101):
            assert _DS[i] == odd_tree.read(odd_tree.keys[i])
    finally:
        _DS = None


def test_eight_threads_share_one_dataset(odd_tree, odd_ds):
    ds = packds.open(odd_ds[0])
    keys = odd_tree.keys
    want = {}
    rng = random.Random(11)
    pick = rng.sample(range(len(keys)), 2000)
    for i in pick:
        want[i] = _digest(odd_tree.read(keys[i]))
    errors: list = []
    barrier = threading.Barrier(8)

    def reader(t: int) -> None:
        r = random.Random(t)
        barrier.wait()
        try:
            for _ in range(3000):
                i = r.choice(pick)
                how = r.randrange(5)
                if how == 0:
                    got = ds[i]
                elif how == 1:
                    got = ds.view(i)
                elif how == 2:
                    got = ds.get_many([i, i])[1]
                elif how == 3:
                    got = ds[keys[i]]
                else:
                    got = ds.get_checked(i)
                if _digest(got) != want[i]:
                    errors.append((t, how, i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append((t, "exception", repr(e)))

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert not errors, errors[:10]


def test_threads_verify_while_reading(small_tree, small_ds_pristine):
    """verify() (GIL released, its own threads) runs while other threads read."""
    ds = packds.open(small_ds_pristine)
    stop = threading.Event()
    errors = []

    def reader():
        r = random.Random(1)
        while not stop.is_set():
            i = r.randrange(len(ds))
            if ds[i] != small_tree.read(small_tree.keys[i]):
                errors.append(i)

    ts = [threading.Thread(target=reader) for _ in range(3)]
    for t in ts:
        t.start()
    try:
        for _ in range(5):
            assert ds.verify(threads=3)["problems"] == []
    finally:
        stop.set()
        for t in ts:
            t.join(30)
    assert not errors


def _spawn_worker(args):
    ds, idx = args
    return [(i, _digest(ds[i])) for i in idx]


def test_spawn_workers_reopen_a_pickled_dataset(small_tree, small_ds_pristine):
    ds = packds.open(small_ds_pristine)
    ctx = mp.get_context("spawn")
    chunks = [list(range(j, len(ds), 3)) for j in range(3)]
    with ctx.Pool(2) as pool:
        res = pool.map(_spawn_worker, [(ds, c) for c in chunks])
    got = dict(x for r in res for x in r)
    assert len(got) == len(ds)
    for i, d in got.items():
        assert d == _digest(small_tree.read(small_tree.keys[i])), i
