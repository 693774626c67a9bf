"""Several sources in one stream (weights, repeat, choose), MixedDataset, and node-aware
partitions, in real DataLoaders (fork and spawn workers, simulated ranks and nodes).

Skipped without torch, unless PACKDS_REQUIRE_TORCH=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import collections
import math
import os

import pytest

import packds
from packds import streams

if os.environ.get("PACKDS_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401  (CI: a missing torch is a failure, not a skip)
else:
    torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import packds.torch as pt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(autouse=True)
def single_rank(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NODEID", "SLURM_LOCALID",
                "LOCAL_WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "SLURM_TMPDIR", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)


def make_ds(root: str, name: str, n: int, size: int = 900) -> str:
    src = os.path.join(root, name + "-src")
    for i in range(n):
        d = os.path.join(src, f"c{i % 3}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:05d}"), "wb") as f:
            f.write(f"{name}/{i:05d}\0".encode() + bytes([i % 251]) * size)
    out = os.path.join(root, name + ".pds")
    packds.pack(src, out, shard_size=16 << 10)
    return out


@pytest.fixture(scope="module")
def two(fast_base):
    root = os.path.join(fast_base, "streams")
    os.makedirs(root, exist_ok=True)
    return make_ds(root, "a", 300), make_ds(root, "b", 100)


def name_of(x: bytes) -> str:
    return x.split(b"\0", 1)[0].decode()


def collate_list(b):
    return b


# --- counts ---------------------------------------------------------------------------------


def test_epoch_counts_rules():
    S = streams.Stream
    assert streams.epoch_counts([300, 100], [S("a"), S("b")]) == [300, 100]
    assert streams.epoch_counts([300, 100], [S("a", weight=0.7), S("b", weight=0.3)]) == [280, 120]
    assert streams.epoch_counts([300, 100], [S("a", weight=7), S("b", weight=3)], 1000) == [700, 300]
    assert streams.epoch_counts([300, 100], [S("a", repeat=0.5), S("b", choose=7)]) == [150, 7]
    assert streams.epoch_counts([300, 100], [S("a", choose=50), S("b", weight=1)], 60) == [50, 10]
    assert streams.epoch_counts([300, 100], [S("a"), S("b")], 40) == [30, 10]
    assert sum(streams.epoch_counts([3, 5, 7], [S(1, weight=1), S(2, weight=1), S(3, weight=1)], 100)) == 100
    with pytest.raises(ValueError, match="at most one"):
        S("a", repeat=1, choose=3)
    with pytest.raises(ValueError, match="smaller than"):
        streams.epoch_counts([300, 100], [S("a", choose=50), S("b", weight=1)], 10)
    with pytest.raises(ValueError, match="empty"):
        streams.epoch_counts([0], [S("a", choose=5)])
    with pytest.raises(ValueError, match=">= 0"):
        S("a", weight=-1)


def test_node_info_sources(monkeypatch):
    assert streams.node_info(4, 3) == (0, 1, 3, 4)
    assert streams.node_info(4, 3, nodes=2) == (1, 2, 1, 2)
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert streams.node_info(4, 2) == (1, 2, 0, 2)
    with pytest.raises(ValueError, match="evenly"):
        streams.node_info(3, 0, nodes=2)


# --- mixing in the stream --------------------------------------------------------------------


def test_weighted_stream_exact_counts_per_epoch(two):
    a, b = two
    s = pt.StreamingDataset([(a, 0.7), (b, 0.3)], epoch_size=1000, seed=3, block_size=3000, shuffle_buffer=50)
    assert s.counts == [700, 300] and len(s) == 1000
    for epoch in (0, 1):
        s.set_epoch(epoch)
        got = [name_of(x) for x in s]
        per = collections.Counter(x.split("/")[0] for x in got)
        assert per == {"a": 700, "b": 300}
        ca = collections.Counter(x for x in got if x.startswith("a/"))
        # 700 of 300: every sample twice, a subset of 100 a third time; b: every sample 3 times
        assert sorted(set(ca.values())) == [2, 3] and sum(1 for v in ca.values() if v == 3) == 100
        assert set(collections.Counter(x for x in got if x.startswith("b/")).values()) == {3}
    # blocks of both sources are mixed: b shows up early, not only after all of a
    s.set_epoch(0)
    head = [name_of(x) for _, x in zip(range(200), s)]
    assert 20 < sum(x.startswith("b/") for x in head) < 120


def test_subsampled_source_changes_every_epoch(two):
    a, b = two
    s = pt.StreamingDataset([pt.Stream(a, choose=90), pt.Stream(b)], seed=1, block_size=2000, shuffle_buffer=0)
    sets = []
    for epoch in range(3):
        s.set_epoch(epoch)
        got = [name_of(x) for x in s]
        mine = [x for x in got if x.startswith("a/")]
        assert len(mine) == len(set(mine)) == 90  # without replacement below one pass
        assert sorted(x for x in got if x.startswith("b/")) == [f"b/{i:05d}" for i in range(100)]
        sets.append(frozenset(mine))
    assert len(set(sets)) == 3


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_mixed_stream_split_over_ranks_and_workers(two, ctx):
    a, b = two
    world, workers = 2, 2
    every = []
    ref = None
    for rank in range(world):
        s = pt.StreamingDataset([(a, 2), (b, 1)], epoch_size=600, seed=9, block_size=3000, shuffle_buffer=30, rank=rank,
                                world_size=world, pad=False)
        s.set_epoch(1)
        if ref is None:
            ref = sorted(name_of(s.datasets[j][i - s.offsets[j]]) for r in range(world) for w in range(workers)
                         for lo, hi in pt.StreamingDataset([(a, 2), (b, 1)], epoch_size=600, seed=9, block_size=3000,
                                                           rank=r, world_size=world, pad=False).plan(1, w, workers)
                         for i in range(lo, hi) for j in [s._source_of(i)])
        dl = DataLoader(s, batch_size=16, num_workers=workers, collate_fn=collate_list, multiprocessing_context=ctx)
        got = [name_of(x) for batch in dl for x in batch]
        assert len(got) == len(s)
        every += got
    assert sorted(every) == ref
    per = collections.Counter(x.split("/")[0] for x in every)
    assert per == {"a": 400, "b": 200}


def test_mixed_stream_resume_with_repeats(two):
    a, b = two

    def make():
        return pt.StreamingDataset([pt.Stream(a, repeat=1.5), pt.Stream(b, repeat=2)], seed=4, block_size=3000,
                                   shuffle_buffer=40)

    s = make()
    s.set_epoch(2)
    full = [name_of(x) for x in s]
    assert len(full) == 450 + 200
    for stop in (1, 77, 640):
        s = make()
        s.set_epoch(2)
        it = iter(s)
        head = [name_of(next(it)) for _ in range(stop)]
        del it
        st = s.state_dict()
        s2 = make()
        s2.load_state_dict(st)
        assert head + [name_of(x) for x in s2] == full, stop
    with pytest.raises(ValueError, match="counts"):
        pt.StreamingDataset([pt.Stream(a, repeat=1), pt.Stream(b, repeat=2)], seed=4, block_size=3000,
                            shuffle_buffer=40).load_state_dict(st)


def test_mixed_stream_with_loader_resume(two):
    a, b = two

    def run(stop=None, state=None):
        s = pt.StreamingDataset([(a, 0.5), (b, 0.5)], epoch_size=500, seed=2, block_size=3000, shuffle_buffer=20)
        dl = pt.StreamingLoader(s, batch_size=32, num_workers=2, collate_fn=collate_list, multiprocessing_context="fork")
        if state:
            dl.load_state_dict(state)
        out = []
        for batch in dl:
            out.append([name_of(x) for x in batch])
            if len(out) == stop:
                break
        return out, dl.state_dict()

    full, _ = run()
    head, st = run(stop=5)
    rest, _ = run(state=st)
    assert head + rest == full


def test_mixed_labels_union_of_classes(two):
    a, b = two
    s = pt.StreamingDataset([a, b], target="parent", seed=0, block_size=3000)
    assert s.classes == ["c0", "c1", "c2"]
    for x, y in s:
        assert s.classes[y] == f"c{int(name_of(x).split('/')[1]) % 3}"


# --- node partition ----------------------------------------------------------------------------


def node_plans(path, epoch, nodes=2, per_node=2, workers=2, **kw):
    world = nodes * per_node
    out = {}
    for rank in range(world):
        s = pt.StreamingDataset(path, seed=5, block_size=2000, rank=rank, world_size=world, nodes=nodes, partition="node",
                                pad=False, **kw)
        out[rank] = [i for w in range(workers) for lo, hi in s.plan(epoch, w, workers) for i in range(lo, hi)]
    return out, s


def test_node_partition_exactly_once_and_stable(two):
    a, _ = two
    ds = packds.open(a)
    shards_by_node = []
    for epoch in (0, 1, 2):
        plans, s = node_plans(a, epoch)
        allk = sorted(i for p in plans.values() for i in p)
        assert allk == list(range(len(ds)))  # every sample exactly once per epoch
        node0 = sorted(plans[0] + plans[1])
        node1 = sorted(plans[2] + plans[3])
        assert node0 == list(range(150)) and node1 == list(range(150, 300))  # a fixed, contiguous share
        shards_by_node.append(({ds.shard_of(i) for i in node0}, {ds.shard_of(i) for i in node1}))
        assert len(shards_by_node[-1][0] & shards_by_node[-1][1]) <= 1  # at most the boundary shard
    assert shards_by_node[0] == shards_by_node[1] == shards_by_node[2]
    # the order within a node still changes every epoch
    assert node_plans(a, 0)[0][0] != node_plans(a, 1)[0][0]


@pytest.mark.parametrize("pad,drop_last", [(True, False), (False, True)])
def test_node_partition_equal_rank_counts(two, pad, drop_last):
    a, b = two
    counts = []
    seen = []
    for rank in range(4):
        s = pt.StreamingDataset([(a, 1), (b, 1)], epoch_size=399, seed=1, block_size=2000, rank=rank, world_size=4,
                                nodes=2, partition="node", pad=pad, drop_last=drop_last)
        got = [name_of(x) for x in s]
        counts.append(len(got))
        assert len(got) == len(s)
        seen += got
    assert len(set(counts)) == 1
    per = collections.Counter(x.split("/")[0] for x in seen)
    if pad:  # 200 of a and 199 of b, plus a few repeated to even the ranks out
        assert counts[0] == 100 and per["a"] >= 200 and per["b"] >= 199
    else:
        assert counts[0] == 99 and per["a"] <= 200 and per["b"] <= 199


def test_global_partition_is_the_default_without_cache(two):
    a, _ = two
    s = pt.StreamingDataset(a, rank=1, world_size=4, nodes=2)
    assert s.partition == "global"
    assert pt.StreamingDataset(a, rank=1, world_size=4, nodes=2, cache_dir="/nonexistent/x").partition == "node"
    with pytest.raises(ValueError, match="partition"):
        pt.StreamingDataset(a, partition="shard")


# --- MixedDataset -----------------------------------------------------------------------------


def test_mixed_dataset_counts_and_determinism(two):
    a, b = two
    m = pt.MixedDataset([(a, 3), (b, 1)], epoch_size=800, seed=7)
    assert len(m) == 800 and m.counts == [600, 200]
    got = [name_of(m[j]) for j in range(len(m))]
    per = collections.Counter(x.split("/")[0] for x in got)
    assert per == {"a": 600, "b": 200}
    assert set(collections.Counter(x for x in got if x.startswith("a/")).values()) == {2}
    assert got == [name_of(pt.MixedDataset([(a, 3), (b, 1)], epoch_size=800, seed=7)[j]) for j in range(800)]
    m.set_epoch(1)
    assert [name_of(m[j]) for j in range(800)] != got
    st = m.state_dict()
    m2 = pt.MixedDataset([(a, 3), (b, 1)], epoch_size=800, seed=7)
    m2.load_state_dict(st)
    assert m2.epoch == 1 and list(m2.draws()) == list(m.draws())
    with pytest.raises(ValueError, match="seed"):
        pt.MixedDataset([(a, 3), (b, 1)], epoch_size=800, seed=8).load_state_dict(st)


def test_mixed_dataset_with_replacement_is_uniform(two):
    a, b = two
    m = pt.MixedDataset([pt.Stream(a, choose=6000), pt.Stream(b, choose=0)], seed=3, replacement=True)
    c = collections.Counter(m.source(j)[1] for j in range(len(m)))
    assert sum(c.values()) == 6000 and len(c) > 280  # 300 samples, 20 expected draws each
    chi2 = sum((v - 20) ** 2 / 20 for v in (c.get(i, 0) for i in range(300)))
    assert chi2 < 300 + 6 * math.sqrt(600)  # chi-square, 299 dof: far inside 6 sigma


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_mixed_dataset_distributed_sampler_exact_split(two, ctx):
    a, b = two
    m = pt.MixedDataset([(a, 1), (b, 1)], epoch_size=301, seed=2)
    every = []
    for rank in range(2):
        sampler = DistributedSampler(m, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=False)
        dl = DataLoader(m, batch_size=10, sampler=sampler, num_workers=2, collate_fn=collate_list,
                        multiprocessing_context=ctx)
        every += [name_of(x) for batch in dl for x in batch]
    assert len(every) == 302  # DistributedSampler pads 301 to 2 x 151 with one repeat
    expected = collections.Counter(name_of(m[j]) for j in range(301))
    assert not expected - collections.Counter(every)  # every draw of the epoch came out
    assert sum((collections.Counter(every) - expected).values()) == 1


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_mixed_loader_exact_split_and_resume(two, ctx):
    a, b = two

    def loader(rank):
        m = pt.MixedDataset([(a, 2), (b, 1)], epoch_size=301, seed=5)
        return pt.MixedLoader(m, batch_size=8, num_workers=2, collate_fn=collate_list, multiprocessing_context=ctx,
                              rank=rank, world_size=2, pad=False)

    ref = pt.MixedDataset([(a, 2), (b, 1)], epoch_size=301, seed=5)
    ref.set_epoch(1)
    every = []
    for rank in range(2):
        dl = loader(rank)
        dl.dataset.set_epoch(1)
        full = [[name_of(x) for x in batch] for batch in dl]
        every += [x for batch in full for x in batch]
        # stop after 5 batches, save, resume in a fresh loader: the rest is the same
        dl2 = loader(rank)
        dl2.dataset.set_epoch(1)
        head = []
        for batch in dl2:
            head.append([name_of(x) for x in batch])
            if len(head) == 5:
                break
        st = dl2.state_dict()
        assert st["batches"] == 5 and st["epoch"] == 1
        dl3 = loader(rank)
        dl3.load_state_dict(st)
        rest = [[name_of(x) for x in batch] for batch in dl3]
        assert head + rest == full
        assert dl3.state_dict()["epoch"] == 2 and dl3.state_dict()["batches"] == 0
    assert sorted(every) == sorted(name_of(ref[j]) for j in range(301))  # exact: every draw once
    with pytest.raises(ValueError, match="batch_size"):
        pt.MixedLoader(pt.MixedDataset([(a, 2), (b, 1)], epoch_size=301, seed=5), batch_size=4, rank=0,
                       world_size=2).load_state_dict(st)
