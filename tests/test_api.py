"""The Python API: every Dataset method, keys(), views, pickling, exceptions, pack() options."""

from __future__ import annotations

import collections.abc
import gc
import os
import pickle
import shutil

import pytest

import _helpers as h
import packds
from packds import ChecksumError, FormatError, NoSpaceError, PackdsError, SourceChangedError, UnsafePathError, UsageError


@pytest.fixture(scope="module")
def ds(small_ds_pristine):
    return packds.open(small_ds_pristine)


@pytest.fixture(scope="module")
def data(small_tree):
    return [small_tree.read(k) for k in small_tree.keys]


def test_len_and_getitem(ds, data, small_tree):
    assert len(ds) == len(small_tree.keys) == len(data)
    for i in range(len(ds)):
        assert ds[i] == data[i]
        assert type(ds[i]) is bytes
    assert ds[-1] == data[-1]
    assert ds[-len(ds)] == data[0]
    for bad in (len(ds), len(ds) + 100, -len(ds) - 1, 2**62, -(2**62)):
        with pytest.raises(IndexError):
            ds[bad]
    for bad in (1.5, None, [1], (1,)):
        with pytest.raises(TypeError):
            ds[bad]


def test_getitem_by_key(ds, data, small_tree):
    for i, k in enumerate(small_tree.keys):
        assert ds[k] == data[i]
        assert ds[os.fsdecode(k)] == data[i]
    with pytest.raises(KeyError) as ei:
        ds["no/such/key"]
    assert ei.value.args[0] == "no/such/key"
    with pytest.raises(KeyError):
        ds[b"no/such/key"]
    with pytest.raises(KeyError):
        ds[""]
    with pytest.raises(KeyError):
        ds["c00"]  # a directory is not a key
    with pytest.raises(KeyError):
        ds["c00/"]


def test_key_index_find_get(ds, data, small_tree):
    for i, k in enumerate(small_tree.keys):
        assert ds.key_bytes(i) == k
        assert ds.key(i) == os.fsdecode(k)
        assert ds.index(k) == i == ds.index(os.fsdecode(k))
        assert ds.find_key(k) == i
        assert ds.get(k) == data[i]
    assert ds.key(-1) == os.fsdecode(small_tree.keys[-1])
    assert ds.key_bytes(-2) == small_tree.keys[-2]
    with pytest.raises(IndexError):
        ds.key(len(ds))
    with pytest.raises(IndexError):
        ds.key_bytes(-len(ds) - 1)
    assert ds.find_key("nope") is None and ds.find_key(b"nope") is None
    with pytest.raises(KeyError):
        ds.index("nope")
    assert ds.get("nope") is None
    sentinel = object()
    assert ds.get("nope", sentinel) is sentinel
    assert ds.get(b"nope", b"dflt") == b"dflt"
    with pytest.raises(TypeError):
        ds.find_key(3)
    # Prefixes and near misses are not keys.
    k = os.fsdecode(small_tree.keys[10])
    for miss in (k[:-1], k + "x", k.upper(), "/" + k, "./" + k):
        assert ds.find_key(miss) is None, miss
    assert "top.txt" in ds and b"top.txt" in ds and "nope" not in ds and 3 not in ds


def test_non_utf8_key_round_trip(ds, small_tree):
    raw = b"\xff\xfe.bin"
    i = small_tree.keys.index(raw)
    k = ds.key(i)
    assert isinstance(k, str) and k == os.fsdecode(raw) == "\udcff\udcfe.bin"
    assert ds.index(k) == i and ds.index(raw) == i
    assert ds[k] == b"not utf-8 name" == ds[raw]
    assert k in ds.keys() and raw in ds.keys()
    assert os.fsencode(k) == ds.key_bytes(i)
    u = "sub/é中文😀.txt"
    assert ds[u] == b"unicode name" == ds[u.encode()]
    assert ds.index(u) == small_tree.keys.index(u.encode())


def test_keys_is_a_lazy_sequence(ds, small_tree):
    ks = ds.keys()
    assert not isinstance(ks, list)
    assert isinstance(ks, collections.abc.Sequence)
    assert len(ks) == len(ds)
    assert ks[0] == os.fsdecode(small_tree.keys[0]) and ks[-1] == os.fsdecode(small_tree.keys[-1])
    assert ks[2:5] == [os.fsdecode(k) for k in small_tree.keys[2:5]]
    assert ks[::-50] == [os.fsdecode(k) for k in small_tree.keys[::-50]]
    assert list(ks) == [os.fsdecode(k) for k in small_tree.keys]
    assert "top.txt" in ks and b"top.txt" in ks
    assert "missing" not in ks and 7 not in ks and None not in ks
    assert ks.index("top.txt") == small_tree.keys.index(b"top.txt")
    with pytest.raises((KeyError, ValueError)):
        ks.index("missing")
    with pytest.raises(IndexError):
        ks[len(ds)]
    assert list(reversed(ks))[0] == ks[-1]
    assert ks.count("top.txt") == 1
    # Lazy: its size does not grow with the dataset.
    import sys

    assert sys.getsizeof(ks) < 200


def test_size_and_get_many(ds, data):
    for i in range(len(ds)):
        assert ds.size(i) == len(data[i])
    assert ds.size(-1) == len(data[-1])
    with pytest.raises(IndexError):
        ds.size(len(ds))
    idx = [5, 0, -1, 5, len(ds) - 2, 100]
    got = ds.get_many(idx)
    assert isinstance(got, list) and all(type(b) is bytes for b in got)
    assert got == [data[i] for i in idx]
    assert ds.get_many([]) == []
    assert ds.get_many(list(range(len(ds)))) == data
    with pytest.raises(IndexError):
        ds.get_many([0, len(ds)])
    # Keys are accepted too (a missing one is a KeyError); other types are not.
    assert ds.get_many([ds.key(3)]) == [data[3]]
    with pytest.raises(KeyError):
        ds.get_many(["no/such/key.txt"])
    with pytest.raises(TypeError):
        ds.get_many([1.5])


def test_get_many_of_empty_samples(ds, small_tree):
    i = small_tree.keys.index(b"zz/empty")
    assert ds.get_many([i, i]) == [b"", b""]
    assert ds[i] == b"" and ds.size(i) == 0 and ds.get_checked(i) == b""
    assert bytes(ds.view(i)) == b""


def test_get_checked(ds, data):
    for i in range(0, len(ds), 7):
        assert ds.get_checked(i) == data[i]
    assert ds.get_checked(-1) == data[-1]
    with pytest.raises(IndexError):
        ds.get_checked(len(ds))


def test_view_is_zero_copy_and_outlives_the_dataset(small_ds_pristine, data):
    d = packds.open(small_ds_pristine)
    views = [d.view(i) for i in range(len(d))]
    for i, v in enumerate(views):
        assert isinstance(v, memoryview)
        assert v.readonly
        assert v == data[i] and bytes(v) == d[i]
        assert v.nbytes == d.size(i)
    with pytest.raises(TypeError):
        views[3][0] = 1
    v_neg = d.view(-1)
    assert bytes(v_neg) == data[-1]
    with pytest.raises(IndexError):
        d.view(len(d))
    del d
    gc.collect()
    for i, v in enumerate(views):
        assert bytes(v) == data[i]


def test_locate(ds, data, small_ds_pristine):
    seen = set()
    for i in range(len(ds)):
        shard, off, size = ds.locate(i)
        assert os.path.dirname(os.fspath(shard)) == os.fspath(small_ds_pristine)
        assert os.path.basename(os.fspath(shard)).startswith("shard-")
        assert off % 512 == 0 and size == len(data[i])
        with open(shard, "rb") as f:
            f.seek(off)
            assert f.read(size) == data[i]
        seen.add(os.fspath(shard))
    assert len(seen) == len(ds.manifest["shards"])
    assert ds.locate(-1) == ds.locate(len(ds) - 1)


def test_glob(ds, small_tree):
    def want(pred):
        return [i for i, k in enumerate(small_tree.keys) if pred(k)]

    assert ds.glob("*") == list(range(len(ds)))
    assert ds.glob("c03/*") == want(lambda k: k.startswith(b"c03/"))
    assert ds.glob("*.txt") == want(lambda k: k.endswith(b".txt"))
    assert ds.glob("**/f0000?.bin") == want(lambda k: k[-10:-5] == b"f0000" and k.endswith(b".bin") and b"/" in k)
    assert ds.glob("*.bin") == want(lambda k: k.endswith(b".bin"))  # includes the non-UTF-8 name
    assert small_tree.keys.index(b"\xff\xfe.bin") in ds.glob("*.bin")
    assert ds.glob("nothing*") == []
    with pytest.raises(ValueError):
        ds.glob("[")


def test_verify_report(ds):
    r = ds.verify()
    assert set(r) == {"samples", "shards", "bytes", "decoded", "problems"}
    assert r["samples"] == len(ds) and r["problems"] == []
    assert r["shards"] == len(ds.manifest["shards"])
    for t in (1, 2, 64, 1000):
        assert ds.verify(threads=t) == r
    assert ds.verify(threads=0)["problems"] == []


def test_manifest(ds, small_tree):
    m = ds.manifest
    assert isinstance(m, dict)
    assert m["format"] == "packds" and m["format_version"] == 1 and m["shard_format"] == "tar"
    assert m["samples"] == len(ds)
    assert m["total_bytes"] == sum(len(small_tree.read(k)) for k in small_tree.keys)
    assert m["options"]["shard_size"] == 64 << 10 and m["options"]["threads"] == 4
    assert m["tool"].startswith("packds ")
    m["samples"] = -1  # a copy: mutating it changes nothing
    assert ds.manifest["samples"] == len(ds)


def test_iteration_contains_repr_context(ds, data):
    assert list(ds) == data
    assert "top.txt" in ds
    assert "samples" in repr(ds) and str(len(ds)) in repr(ds)
    with packds.open(ds.path) as d2:
        assert len(d2) == len(ds)
    assert isinstance(ds, packds.Dataset)


def test_pickle_reopens_by_path(ds, data, small_ds_pristine):
    blob = pickle.dumps(ds)
    assert len(blob) < 1000, "a pickled Dataset must carry its path, not its data"
    d2 = pickle.loads(blob)
    assert isinstance(d2, packds.Dataset)
    assert len(d2) == len(ds) and d2[5] == data[5] and list(d2) == data
    assert os.fspath(d2.path) == os.fspath(small_ds_pristine)
    p = packds.open(small_ds_pristine, populate=True)
    p2 = pickle.loads(pickle.dumps(p))
    assert p2[0] == data[0]


def test_populate(small_ds_pristine, data):
    d = packds.open(small_ds_pristine, populate=True)
    assert list(d) == data and d.verify()["problems"] == []


def test_open_accepts_pathlike_and_surrogate_paths(small_ds_pristine, work):
    import pathlib

    assert len(packds.open(pathlib.Path(small_ds_pristine))) > 0
    odd = os.path.join(os.fsencode(work), b"odd-\xff.pds")
    shutil.copytree(small_ds_pristine, os.fsdecode(odd))
    d = packds.open(os.fsdecode(odd))
    assert d[0] == packds.open(small_ds_pristine)[0]
    assert bytes(d.view(1)) == d[1]
    assert pickle.loads(pickle.dumps(d))[2] == d[2]


def test_unpack_method_counts_files(ds, work, small_tree):
    dest = os.path.join(work, "u")
    assert ds.unpack(dest) == len(ds)
    assert h.walk_files(dest) == small_tree.keys


# ----------------------------------------------------------------------------- exceptions


def test_exception_hierarchy():
    assert issubclass(FormatError, PackdsError) and issubclass(FormatError, ValueError)
    assert issubclass(ChecksumError, FormatError)
    assert issubclass(UnsafePathError, FormatError)
    assert issubclass(NoSpaceError, PackdsError) and issubclass(NoSpaceError, OSError)
    for e in (UsageError, SourceChangedError):
        assert issubclass(e, PackdsError)
    for e in (PackdsError, FormatError, ChecksumError, NoSpaceError, UsageError, SourceChangedError, UnsafePathError):
        assert hasattr(e, "hint")
        assert getattr(packds.errors, e.__name__) is e is getattr(packds, e.__name__)


def test_open_errors_carry_hints(work):
    with pytest.raises(FormatError) as ei:
        packds.open(work)
    assert ei.value.hint and work in str(ei.value)
    with pytest.raises(FileNotFoundError) as ei:
        packds.open(os.path.join(work, "missing"))
    assert ei.value.errno == 2
    assert os.fsdecode(ei.value.filename) == os.path.join(work, "missing")


# ------------------------------------------------------------------------------- pack()


def test_pack_api_summary(small_tree, work):
    out = os.path.join(work, "o.pds")
    s = packds.pack(small_tree.root, out, shard_size=64 << 10, threads=2)
    assert s["files"] == len(small_tree.keys) and s["shards"] >= 4
    assert s["bytes"] == sum(len(small_tree.read(k)) for k in small_tree.keys)
    assert s["skipped"] == [] and s["resumed_shards"] == 0 and s["already_complete"] is False
    assert s["seconds"] >= 0
    # A list of sources, and PathLike.
    import pathlib

    out2 = os.path.join(work, "o2.pds")
    packds.pack([pathlib.Path(small_tree.root)], pathlib.Path(out2), shard_size=64 << 10)
    h.assert_same_dataset_bytes(out, out2)


def test_pack_api_errors(small_tree, work):
    with pytest.raises(ValueError):
        packds.pack(small_tree.root, os.path.join(work, "a"), on_error="ignore")
    with pytest.raises(UsageError) as ei:
        packds.pack(small_tree.root, os.path.join(work, "b"), shard_size=100)
    assert ei.value.hint
    with pytest.raises(UsageError):
        packds.pack(os.path.join(work, "nope"), os.path.join(work, "c"))
    out = os.path.join(work, "d")
    packds.pack(small_tree.root, out)
    with pytest.raises(UsageError) as ei:
        packds.pack(small_tree.root, out)
    assert "already exists" in str(ei.value) and "--force" in ei.value.hint
    s = packds.pack(small_tree.root, out, force=True, shard_size=1 << 20)
    assert s["shards"] == 1 and len(packds.open(out)) == len(small_tree.keys)


def test_pack_progress_callback(odd_tree, work):
    calls = []

    def progress(phase, done, total, nbytes):
        calls.append((phase, done, total, nbytes))

    s = packds.pack(odd_tree.root, os.path.join(work, "o.pds"), shard_size=64 << 10, threads=1, progress=progress)
    assert s["files"] == len(odd_tree.keys)
    assert calls, "progress was never called during a pack of 20,000 files"
    for phase, done, total, nbytes in calls:
        assert 0 <= phase <= 3 and 0 <= done and nbytes >= 0
        if phase >= 1:
            assert total == len(odd_tree.keys) and done <= total
    dones = [c[1] for c in calls]
    assert dones == sorted(dones)


def test_exception_in_progress_cancels_the_pack(odd_tree, work):
    out = os.path.join(work, "o.pds")
    n = [0]

    class Stop(Exception):
        pass

    def progress(*a):
        n[0] += 1
        raise Stop()

    with pytest.raises(Stop):
        packds.pack(odd_tree.root, out, shard_size=64 << 10, threads=1, progress=progress)
    assert n[0] == 1
    if os.path.exists(out):
        with pytest.raises(FormatError):
            packds.open(out)
        s = packds.pack(odd_tree.root, out, shard_size=64 << 10, threads=1, resume=True)
        assert s["files"] == len(odd_tree.keys)
        assert len(packds.open(out)) == len(odd_tree.keys)


# ---------------------------------------------------------------------------------------------
# Block reads: read_range, blocks, key_range


@pytest.fixture(scope="module")
def text_tree(tmp_path_factory):
    """Compressible samples (a few larger than 64 KiB, some empty) in a few directories."""
    import random

    rng = random.Random(7)
    root = str(tmp_path_factory.mktemp("text-src"))
    words = [b"alpha", b"beta", b"gamma", b"delta", b"packds", b"shard", b"\n", b"{}", b"0123"]
    for i in range(240):
        n = rng.choice([0, 50, 900, 3000, 9000]) if i % 40 else 90_000
        h.write(root, f"d{i % 4}/s{i:04}.txt", b" ".join(rng.choice(words) for _ in range(n // 5)))
    return root


@pytest.fixture(scope="module", params=["tar", "zstd", "h5"])
def any_ds(request, text_tree, tmp_path_factory):
    """One tree packed as raw tar, zstd-compressed tar (with a dictionary), and HDF5."""
    if request.param == "h5":
        pytest.importorskip("h5py")
    out = os.path.join(tmp_path_factory.mktemp("rr"), request.param + ".pds")
    opts = {"compress": "zstd:3", "zstd_dict": 4096} if request.param == "zstd" else {"format": request.param}
    packds.pack(text_tree, out, shard_size=64 << 10, **opts)
    ds = packds.open(out)
    if request.param == "zstd":
        assert ds.format_version == 2 and any(ds._codec(i) for i in range(len(ds)))
    return ds


def _reference_blocks(ds, block_size: int) -> list:
    """The block starts StreamingDataset computed in Python before ``Dataset.blocks`` existed
    (bisecting over each sample's shard): the Rust version must cut at the same places, so a
    seed gives the same order as before."""
    n, out, i = len(ds), [], 0
    while i < n:
        shard, off0, _ = ds.locate(i)
        lo, hi = i + 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if ds.locate(mid)[0] == shard:
                lo = mid + 1
            else:
                hi = mid
        end = lo
        _, off1, size1 = ds.locate(end - 1)
        per = max(1, round(block_size * (end - i) / max(1, off1 + size1 - off0)))
        out.extend(range(i, end, per))
        i = end
    return out


def test_read_range_equals_the_samples(any_ds):
    ds = any_ds
    n = len(ds)
    want = [ds[i] for i in range(n)]
    buf = bytearray(3)  # too small: grown
    for a, b in [(0, 0), (0, 1), (5, 37), (n - 1, n), (0, n), (n, n)]:
        got, offsets = ds.read_range(a, b)
        assert isinstance(got, bytearray) and len(offsets) == b - a + 1 and offsets[0] == 0
        assert bytes(got) == b"".join(want[a:b])
        assert [bytes(got[offsets[k] : offsets[k + 1]]) for k in range(b - a)] == want[a:b]
        again, offs2 = ds.read_range(a, b, out=buf)
        assert again is buf and offs2 == offsets
        assert bytes(buf[: offsets[-1]]) == b"".join(want[a:b])
    big = len(buf)
    ds.read_range(0, 1, out=buf)
    assert len(buf) == big  # never shrunk
    for a, b in [(-1, 3), (0, n + 1), (n + 1, n + 2)]:
        with pytest.raises(IndexError):
            ds.read_range(a, b)
    with pytest.raises(ValueError):
        ds.read_range(5, 4)
    with pytest.raises(TypeError):
        ds.read_range(0, 1, out=b"immutable")


def test_read_range_with_verify(small_ds_pristine):
    ds, plain = packds.open(small_ds_pristine, verify=True), packds.open(small_ds_pristine)
    got, offsets = ds.read_range(0, len(ds))
    assert bytes(got) == b"".join(plain[i] for i in range(len(plain)))


def test_read_range_buffer_in_use_is_not_resized(ds):
    buf = bytearray(1)
    with memoryview(buf):
        with pytest.raises(BufferError):
            ds.read_range(0, 10, out=buf)


def test_blocks_cover_every_sample_once(any_ds):
    ds = any_ds
    n = len(ds)
    for target in (1, 4096, 64 << 10, 4 << 20):
        blocks = ds.blocks(target)
        assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
        assert all(a < b for a, b in blocks)
        for a, b in blocks:
            assert ds.locate(a)[0] == ds.locate(b - 1)[0]  # one shard each
        assert [a for a, _ in blocks] == _reference_blocks(ds, target)
    assert len(ds.blocks(1)) == n


def test_key_range(ds, small_tree):
    keys = small_tree.keys
    for prefix in (b"c00/", b"sub/", b"", b"zz", b"\xff"):
        a, b = ds.key_range(prefix)
        assert list(range(a, b)) == [i for i, k in enumerate(keys) if k.startswith(prefix)]
    assert ds.key_range("c00/") == ds.key_range(b"c00/")
    a, b = ds.key_range("no-such-prefix/")
    assert a == b
    with pytest.raises(TypeError):
        ds.key_range(3)


@pytest.mark.parametrize(
    "option, value, accepted",
    [("on_error", "warn", "fail, skip"), ("format", "zip", "tar, h5"), ("compress", "gzip", "none, zstd")],
)
def test_bad_option_strings_name_the_accepted_values(small_tree, work, option, value, accepted):
    out = os.path.join(work, "x.pds")
    for call in (packds.pack, packds.plan):
        with pytest.raises(UsageError, match=f"{value}.*{accepted}") as ei:
            call(small_tree.root, out, **{option: value})
        assert isinstance(ei.value, ValueError)
        assert option.replace("_", "-") in str(ei.value)
    assert not os.path.exists(out)


def test_bad_link_mode_names_the_accepted_values(small_ds_pristine, work):
    tar = os.path.join(small_ds_pristine, "shard-00000.tar")
    with pytest.raises(UsageError, match="--link.*soft.*symlink, hard"):
        packds.index_tars([tar], os.path.join(work, "i.pds"), link="soft")


def test_slices_keys_everywhere_and_dict_like_views(ds):
    n = len(ds)
    keys = [ds.key(i) for i in range(n)]
    assert ds[2:7] == [ds[i] for i in range(2, 7)]
    assert ds[::-50] == [ds[i] for i in range(n - 1, -1, -50)]
    assert ds[n + 5 : n + 9] == [] and ds[-3:] == [ds[n - 3], ds[n - 2], ds[n - 1]]
    k = keys[11]
    assert ds.size(k) == ds.size(11) and ds.raw(k) == ds.raw(11) and ds.locate(k) == ds.locate(11)
    assert bytes(ds.view(k)) == ds[11] and ds.get_checked(k) == ds[11]
    assert ds.get_many([3, k, keys[0]]) == [ds[3], ds[11], ds[0]]
    with pytest.raises(KeyError):
        ds.size("no such key")
    with pytest.raises(KeyError):
        ds.get_many([0, "no such key"])
    with pytest.raises(TypeError, match="slice"):
        ds[1.5]
    assert list(ds.values()) == list(ds) and list(ds.keys()) == [ds.key(i) for i in range(n)]
    assert dict(ds.items()) == {ds.key(i): ds[i] for i in range(n)}
    assert ds.glob("*") == list(range(n))


# ---------------------------------------------------------------------------------------------
# close() and `with`; progress callbacks of every long call; skipped items as named tuples


def _mapped(path) -> list[str]:
    """Lines of /proc/self/maps that map a file under ``path``."""
    with open("/proc/self/maps") as f:
        return [ln for ln in f if os.fspath(path) in ln]


def _open_fds(path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.fspath(path)):
            out.append(target)
    return out


def test_close_releases_the_mappings_and_use_after_close_raises(small_ds_pristine, data, work):
    # A copy no other test has open.
    small_ds_pristine = shutil.copytree(small_ds_pristine, os.path.join(work, "own.pds"))
    d = packds.open(small_ds_pristine)
    assert d[0] == data[0] and not d.closed
    v = d.view(0)
    assert _mapped(small_ds_pristine), "an open dataset maps its shards"
    d.close()
    assert d.closed and "closed" in repr(d)
    # A view taken before keeps its own mapping, and stays valid.
    assert bytes(v) == data[0]
    v.release()
    del v
    gc.collect()
    assert _mapped(small_ds_pristine) == [] and _open_fds(small_ds_pristine) == []
    for use in (lambda: d[0], lambda: len(d), lambda: d.key(0), lambda: d.get_many([0]), lambda: d.verify(), lambda: d.size(0),
                lambda: d.read_range(0, 1), lambda: "top.txt" in d, lambda: list(d), lambda: d.manifest, lambda: d.view(0)):
        with pytest.raises(ValueError, match="is closed"):
            use()
    d.close()  # twice: harmless


def test_with_closes_the_dataset(small_ds_pristine, data, work):
    small_ds_pristine = shutil.copytree(small_ds_pristine, os.path.join(work, "own.pds"))
    with packds.open(small_ds_pristine) as d:
        assert d[1] == data[1]
    assert d.closed and _mapped(small_ds_pristine) == []
    with pytest.raises(ValueError, match="open it again with packds.open"):
        d[1]


def test_close_while_another_thread_reads_is_safe(small_ds_pristine, data):
    import threading

    d = packds.open(small_ds_pristine)
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(2000):
                assert d.get_many(list(range(len(data)))) == data
        except ValueError as e:  # closed under it: a clean error, never a crash or wrong bytes
            assert "is closed" in str(e)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    d.close()
    t.join()
    assert not errors


def test_verify_unpack_merge_index_report_progress(small_ds_pristine, small_tree, work):
    def recorder():
        calls = []
        return calls, lambda *a: calls.append(a)

    with packds.open(small_ds_pristine) as d:
        calls, cb = recorder()
        assert d.verify(progress=cb)["problems"] == []
        calls, cb = recorder()
        assert d.unpack(os.path.join(work, "un"), progress=cb) == len(d)
        n = len(d)
    for _phase, done, total, nbytes, bytes_total in calls:  # a fast unpack may make no call
        assert done <= total and (nbytes <= bytes_total or not bytes_total)
    plan = os.path.join(work, "p.pdsp")
    assert packds.plan(small_tree.root, plan, shard_size=4096, parts=2)["files"] == n
    out = os.path.join(work, "parts.pds")
    for i in range(2):
        packds.pack([], out, plan=plan, part=str(i))
    calls, cb = recorder()
    assert packds.merge(out, verify=True, progress=cb)["samples"] == n
    tars = sorted(os.path.join(small_ds_pristine, f) for f in os.listdir(small_ds_pristine) if f.endswith(".tar"))
    calls, cb = recorder()
    assert packds.index_tars(tars, os.path.join(work, "ix.pds"), progress=cb)["samples"] == n


def test_progress_calls_carry_totals(odd_tree, work):
    """A slow enough call is reported with five numbers; the byte total is known for verify."""
    out = os.path.join(work, "o.pds")
    packds.pack(odd_tree.root, out, shard_size=64 << 10)
    calls: list[tuple] = []
    with packds.open(out) as d:
        d.unpack(os.path.join(work, "un"), progress=lambda *a: calls.append(a))
        total = sum(d.size(i) for i in range(len(d)))
    for c in calls:
        assert len(c) == 5
        phase, done, n, nbytes, bytes_total = c
        if phase == 1:
            assert n == len(odd_tree.keys) and bytes_total == total and done <= n and nbytes <= total


def test_skipped_items_are_named_tuples(work):
    root = os.path.join(work, "src")
    h.write(root, "a.txt", b"a")
    os.symlink("a.txt", os.path.join(root, "link"))
    os.mkfifo(os.path.join(root, "fifo"))
    s = packds.pack(root, os.path.join(work, "o.pds"))
    assert len(s["skipped"]) == 2
    for item in s["skipped"]:
        assert isinstance(item, packds.Skipped)
        path, reason = item  # still unpacks as a pair
        assert item.path == path and item.reason == reason and reason
    recorded = packds.open(os.path.join(work, "o.pds")).manifest["skipped"]
    assert [{"path": x.path, "reason": x.reason} for x in s["skipped"]] == recorded
