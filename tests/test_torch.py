"""packds.torch inside a real torch DataLoader: map-style and streaming datasets, fork and spawn
workers, distributed splits, mid-epoch resume, and the read pattern of streaming.

Skipped without torch, unless PACKDS_REQUIRE_TORCH=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import os
import pickle
import random

import pytest

import packds

if os.environ.get("PACKDS_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401  (CI: a missing torch is a failure, not a skip)
else:
    torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

import packds.torch as pt  # noqa: E402

CLASSES = ["b-x", "b", "a", "c"]  # "b-x" sorts before "b/" byte-wise: runs are not in class order
PER_CLASS = [60, 150, 91, 121]  # 422 samples: not a multiple of 4 ranks
N = sum(PER_CLASS)


@pytest.fixture(autouse=True)
def single_rank(monkeypatch):
    """Tests run as one rank unless they say otherwise, even inside a Slurm job or torchrun."""
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def collate_list(batch):
    return batch


def key_of(sample: bytes) -> str:
    return sample.split(b"\0", 1)[0].decode()


def key_and_label(item) -> tuple[str, int]:
    x, y = item
    return key_of(x), int(y)


@pytest.fixture(scope="module")
def tree_ds(fast_base):
    """422 samples in 4 classes over many 16 KiB shards; each sample starts with its key."""
    root = os.path.join(fast_base, "torch-src")
    rnd = random.Random(5)
    keys = []
    for c, m in zip(CLASSES, PER_CLASS):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(m):
            k = f"{c}/{i:04d}.bin"
            with open(os.path.join(root, k), "wb") as f:
                f.write(k.encode() + b"\0" + bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 1500))))
            keys.append(k)
    out = os.path.join(fast_base, "torch.pds")
    s = packds.pack(root, out, shard_size=16 << 10)
    assert s["shards"] >= 10, s
    return out, sorted(keys, key=str.encode)


def true_label(key: str) -> int:
    return sorted(CLASSES).index(key.split("/")[0])


def stream_keys(loader) -> list[str]:
    return [key_of(x) for b in loader for x in b]


# ---------------------------------------------------------------------------------------------
# Map-style


def test_packed_dataset_items_and_labels(tree_ds):
    path, keys = tree_ds
    ds = pt.PackedDataset(path, target="parent")
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == N and ds.classes == sorted(CLASSES)
    assert ds.class_to_idx == {c: i for i, c in enumerate(sorted(CLASSES))}
    for i in (0, 1, 59, 60, 61, 200, N - 1, -1):
        x, y = ds[i]
        assert key_of(x) == keys[i] and y == true_label(keys[i])
    # per-class runs, not per-sample lists
    assert len(ds._labels.starts) == len(CLASSES)
    # transform, callable target, array target, no target
    t = pt.PackedDataset(path, transform=len, target=lambda k: k.upper())
    assert t[3] == (len(packds.open(path)[3]), keys[3].upper())
    a = pt.PackedDataset(path, target=list(range(100, 100 + N)))
    assert a[7][1] == 107
    assert pt.PackedDataset(path)[5] == packds.open(path)[5]
    with pytest.raises(ValueError):
        pt.PackedDataset(path, target="grandparent")
    with pytest.raises(ValueError):
        pt.PackedDataset(path, target=[0, 1])


def test_parent_target_needs_directories(work):
    os.makedirs(os.path.join(work, "src", "d"))
    for k in ("top.bin", "d/x.bin"):
        with open(os.path.join(work, "src", k), "wb") as f:
            f.write(b"x")
    packds.pack(os.path.join(work, "src"), os.path.join(work, "ds.pds"))
    with pytest.raises(ValueError, match="CLASS/NAME"):
        pt.PackedDataset(os.path.join(work, "ds.pds"), target="parent")


def test_packed_dataset_pickles_as_path(tree_ds):
    path, _ = tree_ds
    ds = pt.PackedDataset(path, target="parent")
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # path, options and 4 class runs: nothing per sample
    back = pickle.loads(blob)
    assert back._ds is None and back[10] == ds[10] and back.classes == ds.classes


class CountingPacked(pt.PackedDataset):
    calls = 0

    def __getitems__(self, indices):
        CountingPacked.calls += 1
        return super().__getitems__(indices)


def test_getitems_reads_a_batch_in_one_call(tree_ds):
    path, keys = tree_ds
    ds = CountingPacked(path, target="parent")
    dl = DataLoader(ds, batch_size=32, shuffle=False, collate_fn=collate_list)
    got = [key_and_label(it) for b in dl for it in b]
    assert [k for k, _ in got] == keys
    assert CountingPacked.calls == -(-N // 32)  # one __getitems__ (one get_many) per batch
    assert ds.__getitems__([0, -1, 2]) == [ds[0], ds[N - 1], ds[2]]


@pytest.mark.parametrize("ctx,workers", [(None, 0), ("fork", 2), ("fork", 4), ("spawn", 2)])
def test_packed_dataset_dataloader_epoch(tree_ds, ctx, workers):
    path, keys = tree_ds
    ds = pt.PackedDataset(path, target="parent")
    dl = DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=collate_list,
                    multiprocessing_context=ctx if workers else None, generator=torch.Generator().manual_seed(0))
    got = [key_and_label(it) for b in dl for it in b]
    assert sorted(k for k, _ in got) == sorted(keys)  # every sample exactly once
    assert len(got) == N
    assert all(y == true_label(k) for k, y in got)
    assert [k for k, _ in got] != keys  # shuffled


@pytest.mark.parametrize("ctx,workers", [(None, 0), ("fork", 2), ("spawn", 2)])
def test_as_tensor_batches_are_views_of_one_buffer_and_match_the_bytes(tree_ds, ctx, workers):
    path, keys = tree_ds
    raw = packds.open(path)
    ds = pt.PackedDataset(path, target="parent", as_tensor=True)
    x, y = ds[3]
    assert x.dtype == torch.uint8 and bytes(x.numpy()) == raw[3] and y == true_label(keys[3])
    batch = ds.__getitems__([5, 0, -1])
    assert [bytes(t.numpy()) for t, _ in batch] == [raw[5], raw[0], raw[N - 1]]
    assert len({t.untyped_storage().data_ptr() for t, _ in batch}) == 1  # one buffer for the batch
    dl = DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=collate_list,
                    multiprocessing_context=ctx if workers else None, generator=torch.Generator().manual_seed(0))
    seen = {}
    for b in dl:
        for t, label in b:
            data = bytes(t.numpy())
            k = data.split(b"\0", 1)[0].decode()
            seen[k] = (data, label)
    assert sorted(seen) == sorted(keys)
    assert all(seen[k][0] == raw[raw.index(k)] and seen[k][1] == true_label(k) for k in keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_packed_hands_each_batch_over_as_three_tensors(tree_ds, workers):
    path, keys = tree_ds
    raw = packds.open(path)
    ds = pt.PackedDataset(path, target="parent", as_tensor=True)
    dl = DataLoader(ds, batch_size=16, shuffle=False, num_workers=workers, collate_fn=pt.collate_packed,
                    multiprocessing_context="fork" if workers else None)
    got = []
    for b in dl:
        assert isinstance(b, pt.PackedBatch) and b.data.dtype == torch.uint8 and len(b.offsets) == len(b) + 1
        got += [(bytes(b[k].numpy()), int(b.targets[k])) for k in range(len(b))]
    assert [d for d, _ in got] == [raw[i] for i in range(N)]
    assert [y for _, y in got] == [true_label(k) for k in keys]
    unlabelled = pt.collate_packed([torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([], dtype=torch.uint8)])
    assert unlabelled.targets is None and [list(x) for x in unlabelled] == [[1, 2], []]


def test_packed_batch_crosses_by_pipe_when_small_and_shared_memory_when_large(tree_ds, monkeypatch):
    path, _ = tree_ds
    ds = pt.PackedDataset(path, target="parent", as_tensor=True)
    b = pt.collate_packed(ds.__getitems__(list(range(40))))
    raw = packds.open(path)
    assert bytes(b.data.numpy()) == b"".join(raw[i] for i in range(40))  # no copy: the get_batch buffer itself
    fn, args = b.__reduce__()
    assert fn is pt._rebuild_batch and isinstance(args[0], bytearray)  # pickled through the pipe
    back = pickle.loads(pickle.dumps(b))
    assert [bytes(x.numpy()) for x in back] == [raw[i] for i in range(40)] and back.targets.tolist() == b.targets.tolist()
    monkeypatch.setattr(pt, "PIPE_BYTES", 1)
    fn, args = b.__reduce__()
    assert fn is pt.PackedBatch and isinstance(args[0], torch.Tensor)  # large: tensors, shared memory
    with_transform = pt.PackedDataset(path, as_tensor=True, transform=lambda t: t[:3])
    c = pt.collate_packed(with_transform.__getitems__([0, 1]))
    assert [bytes(x.numpy()) for x in c] == [raw[0][:3], raw[1][:3]]


def test_get_batch_reuses_out_and_gives_offsets(tree_ds):
    path, keys = tree_ds
    ds = packds.open(path)
    buf = bytearray()
    for idx in ([0, 1, 2], [N - 1, 0, keys[7]], []):
        got, offs = ds.get_batch(idx, out=buf)
        assert got is buf and len(offs) == len(idx) + 1 and offs[0] == 0
        assert [bytes(got[offs[k] : offs[k + 1]]) for k in range(len(idx))] == [ds[i] for i in idx]
    with pytest.raises(IndexError):
        ds.get_batch([N])
    with pytest.raises(KeyError):
        ds.get_batch(["no/such/key"])


# ---------------------------------------------------------------------------------------------
# Streaming


def test_streaming_reads_each_sample_once_in_process(tree_ds):
    path, keys = tree_ds
    s = pt.StreamingDataset(path, seed=3, shuffle_buffer=40, block_size=4096)
    assert isinstance(s, torch.utils.data.IterableDataset)
    got = [key_of(x) for x in s]
    assert sorted(got) == sorted(keys) and len(got) == N == len(s)
    assert got != keys
    # no shuffle: key order
    assert [key_of(x) for x in pt.StreamingDataset(path, shuffle=False, block_size=4096)] == keys


@pytest.mark.parametrize("ctx,workers", [(None, 0), ("fork", 2), ("fork", 4), ("spawn", 2), ("spawn", 4)])
def test_streaming_dataloader_epoch(tree_ds, ctx, workers):
    path, keys = tree_ds
    s = pt.StreamingDataset(path, seed=1, shuffle_buffer=30, block_size=4096, target="parent")
    dl = DataLoader(s, batch_size=16, num_workers=workers, collate_fn=collate_list,
                    multiprocessing_context=ctx if workers else None)
    got = [key_and_label(it) for b in dl for it in b]
    assert sorted(k for k, _ in got) == sorted(keys)
    assert len(got) == N
    assert all(y == true_label(k) for k, y in got)


def test_streaming_set_epoch_reproducible(tree_ds):
    path, keys = tree_ds

    def epoch(e, seed=0):
        s = pt.StreamingDataset(path, seed=seed, shuffle_buffer=50, block_size=4096)
        s.set_epoch(e)
        return [key_of(x) for x in s]

    e0, e1 = epoch(0), epoch(1)
    assert e0 == epoch(0) and e1 == epoch(1)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(keys)
    assert epoch(0, seed=9) != e0


def test_streaming_persistent_workers_follow_set_epoch(tree_ds):
    path, _ = tree_ds
    s = pt.StreamingDataset(path, seed=4, shuffle_buffer=30, block_size=4096)
    dl = DataLoader(s, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=collate_list,
                    multiprocessing_context="fork")
    runs = []
    for e in (0, 1):
        s.set_epoch(e)
        runs.append(stream_keys(dl))
    fresh = pt.StreamingDataset(path, seed=4, shuffle_buffer=30, block_size=4096)
    fresh.set_epoch(1)
    assert runs[1] == stream_keys(DataLoader(fresh, batch_size=8, num_workers=2, collate_fn=collate_list,
                                             multiprocessing_context="fork"))
    assert runs[0] != runs[1]


def test_streaming_pickles_as_path(tree_ds):
    path, _ = tree_ds
    s = pt.StreamingDataset(path, seed=2, target="parent")
    s.set_epoch(3)
    blob = pickle.dumps(s)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert back.epoch == 3 and back.dataset is not s.dataset
    assert [key_of(x) for x, _ in back] == [key_of(x) for x, _ in s]


# ---------------------------------------------------------------------------------------------
# Distributed split


@pytest.mark.parametrize("pad,drop_last", [(False, False), (True, False), (False, True)])
def test_distributed_split_4_ranks_x_2_workers(tree_ds, pad, drop_last):
    path, keys = tree_ds
    world = 4  # N = 422: pad, drop and exact split differ
    per_rank = []
    for rank in range(world):
        s = pt.StreamingDataset(path, seed=7, shuffle_buffer=20, block_size=4096, rank=rank, world_size=world,
                                pad=pad, drop_last=drop_last)
        s.set_epoch(2)
        dl = DataLoader(s, batch_size=10, num_workers=2, collate_fn=collate_list, multiprocessing_context="fork")
        got = stream_keys(dl)
        assert len(got) == len(s)
        per_rank.append(got)
    allk = [k for r in per_rank for k in r]
    counts = [len(r) for r in per_rank]
    if not pad and not drop_last:
        assert sorted(allk) == sorted(keys)  # union = all, no duplicate
        assert max(counts) - min(counts) <= 1
    elif pad:
        assert len(set(counts)) == 1 and counts[0] == -(-N // world)
        assert set(allk) == set(keys) and len(allk) - N == counts[0] * world - N
    else:
        assert len(set(counts)) == 1 and counts[0] == N // world
        assert len(set(allk)) == len(allk) == counts[0] * world


def test_distributed_split_uneven_dataset(work):
    # 13 samples over 3 shards, 4 ranks x 2 workers, blocks of one sample: no gap, no duplicate
    for i in range(13):
        os.makedirs(os.path.join(work, "src"), exist_ok=True)
        with open(os.path.join(work, "src", f"{i:02d}"), "wb") as f:
            f.write(f"{i:02d}\0".encode() + b"z" * 3000)
    packds.pack(os.path.join(work, "src"), os.path.join(work, "ds.pds"), shard_size=16 << 10)
    got = []
    for rank in range(4):
        s = pt.StreamingDataset(os.path.join(work, "ds.pds"), rank=rank, world_size=4, pad=False, block_size=1)
        for w in range(2):
            for lo, hi in s.plan(worker=w, num_workers=2):
                got.extend(range(lo, hi))
    assert sorted(got) == list(range(13))


def test_rank_from_environment(tree_ds, monkeypatch):
    path, _ = tree_ds
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert pt.dist_info() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert pt.dist_info() == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert pt.dist_info() == (1, 4)  # RANK/WORLD_SIZE win over Slurm's
    s = pt.StreamingDataset(path, pad=False)
    assert s.rank_world() == (1, 4) and len(s) in (N // 4, N // 4 + 1)
    assert pickle.loads(pickle.dumps(s)).rank_world() == (1, 4)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 7), (3, 4), (3, 17), (2, 0)])
def test_resume_mid_epoch_matches_uninterrupted(tree_ds, workers, stop):
    path, _ = tree_ds

    def make():
        s = pt.StreamingDataset(path, seed=11, shuffle_buffer=25, block_size=4096, target="parent")
        return s, pt.StreamingLoader(s, batch_size=8, num_workers=workers, collate_fn=collate_list,
                                     multiprocessing_context="fork" if workers else None)

    s, dl = make()
    s.set_epoch(1)
    full = [[key_and_label(it) for it in b] for b in dl]
    assert sum(len(b) for b in full) == N
    if workers == 3:  # 140-141 samples each: the last batches are partial, the tail uneven
        assert stop < len(full)

    s, dl = make()
    s.set_epoch(1)
    head = []
    if stop:
        for b in dl:  # the training loop: a batch it received counts as consumed
            head.append([key_and_label(it) for it in b])
            if len(head) == stop:
                break
    state = dl.state_dict()
    assert state["epoch"] == 1 and state["batches"] == stop
    del dl

    s2, dl2 = make()  # a restarted job
    dl2.load_state_dict(pickle.loads(pickle.dumps(state)))
    s2.set_epoch(1)  # the training loop's usual call: same epoch keeps the resume position
    rest = [[key_and_label(it) for it in b] for b in dl2]
    assert head + rest == full
    # after a full epoch the state points at the next epoch's start
    assert dl2.state_dict()["epoch"] == 2 and dl2.state_dict()["batches"] == 0
    s2.set_epoch(1)
    assert [[key_and_label(it) for it in b] for b in dl2] == full  # the resume is used up


def test_resume_near_end_with_exhausted_workers(tree_ds):
    # 3 workers x 140-141 samples, batch 48: workers have 3 batches each (the last partial);
    # stopping at 8 of 9 batches leaves one worker with one batch
    path, _ = tree_ds

    def run(stop=None, state=None):
        s = pt.StreamingDataset(path, seed=12, shuffle_buffer=10, block_size=4096)
        dl = pt.StreamingLoader(s, batch_size=48, num_workers=3, collate_fn=collate_list, multiprocessing_context="fork")
        if state:
            dl.load_state_dict(state)
        out = []
        for b in dl:
            out.append([key_of(x) for x in b])
            if len(out) == stop:
                break
        return out, dl.state_dict()

    full, _ = run()
    for stop in (1, 5, 8):
        head, st = run(stop=stop)
        rest, _ = run(state=st)
        assert head + rest == full, stop


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
@pytest.mark.parametrize("buffer", [0, 40])
def test_resume_in_process_without_loader(tree_ds, read_ahead, buffer):
    path, _ = tree_ds

    def make():
        return pt.StreamingDataset(path, seed=5, shuffle_buffer=buffer, block_size=4096, read_ahead=read_ahead)

    full = [key_of(x) for x in make()]
    for stop in (1, 123, N - 3):
        s = make()
        it = iter(s)
        head = [key_of(next(it)) for _ in range(stop)]
        del it
        st = s.state_dict()
        assert st["batches"] == stop and st["num_workers"] == 0
        s2 = make()
        s2.load_state_dict(st)
        assert head + [key_of(x) for x in s2] == full


def test_resume_rejects_other_setup(tree_ds):
    path, _ = tree_ds
    s = pt.StreamingDataset(path, seed=5)
    st = s.state_dict(batches=3, batch_size=8, num_workers=2)
    with pytest.raises(ValueError, match="seed"):
        pt.StreamingDataset(path, seed=6).load_state_dict(st)
    s2 = pt.StreamingDataset(path, seed=5)
    dl = pt.StreamingLoader(s2, batch_size=4, num_workers=0, collate_fn=collate_list)
    dl.load_state_dict(st)
    with pytest.raises(ValueError, match="batch_size=8"):
        next(iter(dl))
    s2.set_epoch(4)  # another epoch: the resume position is dropped
    assert sum(len(b) for b in dl) == N


# ---------------------------------------------------------------------------------------------
# Read pattern


def test_streaming_issues_one_large_read_per_block(tree_ds, monkeypatch):
    path, keys = tree_ds
    reads = []
    real = packds.Dataset.read_range

    def counting(self, start, stop, out=None):
        buf, offsets = real(self, start, stop, out=out)
        reads.append(offsets[-1])
        return buf, offsets

    monkeypatch.setattr(packds.Dataset, "read_range", counting)
    s = pt.StreamingDataset(path, seed=0, shuffle_buffer=64, block_size=8192)
    got = [key_of(x) for x in s]
    assert sorted(got) == sorted(keys)
    nblocks = len(s.blocks()) - 1
    total = sum(len(packds.open(path)[i]) for i in range(N))
    assert len(reads) == nblocks  # one read per block, never one per sample
    assert nblocks * 4 <= N  # here >= 4 samples per read (one read per sample for random access)
    assert sum(reads) == total  # the blocks hold every sample once
    assert sum(reads) / len(reads) >= 2048


def test_streaming_falls_back_to_get_many(tree_ds):
    # when shard bytes are not the samples (e.g. a compressed dataset), blocks go through the reader
    path, _ = tree_ds
    ref = [key_of(x) for x in pt.StreamingDataset(path, seed=8, block_size=4096)]
    s = pt.StreamingDataset(path, seed=8, block_size=4096, verify=True)  # checked reads decode one by one
    assert [key_of(x) for x in s] == ref


def test_compressed_dataset(tree_ds, work):
    # a zstd-compressed pack of the same tree: both datasets return the original bytes
    path, keys = tree_ds
    cpath = os.path.join(work, "z.pds")
    packds.pack(os.path.join(os.path.dirname(path), "torch-src"), cpath, shard_size=16 << 10, compress="zstd")
    assert packds.open(cpath).manifest.get("compression")
    ref = packds.open(path)
    m = pt.PackedDataset(cpath, target="parent")
    assert m.__getitems__([0, 100, 421]) == [(ref[i], true_label(keys[i])) for i in (0, 100, 421)]
    s = pt.StreamingDataset(cpath, seed=8, block_size=4096)
    got = list(s)
    assert sorted(got) == sorted(ref.get_many(list(range(N))))
