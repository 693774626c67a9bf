"""pack --append (and --replace): a dataset grows by new shards, never rewriting the ones it
has; the manifest, written last, switches versions; a crash leaves the previous version."""

from __future__ import annotations

import json
import os
import signal

import pytest

import _helpers as h
import packds


def _tree(root, keys, tag=b"v1"):
    for k in keys:
        h.write(root, k, tag + b":" + k.encode() * 30)


def _content(path) -> dict[str, bytes]:
    with packds.open(path) as ds:
        return {ds.key(i): ds[i] for i in range(len(ds))}


def _files(path) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path) if f.endswith((".tar", ".h5"))}


@pytest.mark.parametrize("fmt,compress", [("tar", "none"), ("tar", "zstd"), ("h5", "none")])
def test_append_adds_new_keys_as_new_shards_and_never_rewrites_old_ones(work, fmt, compress):
    src = os.path.join(work, "src")
    _tree(src, [f"a/{i:03}" for i in range(100)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=16 << 10, format=fmt, compress=compress)
    before, shards_before = _content(ds), _files(ds)
    _tree(src, [f"b/{i:03}" for i in range(30)])  # new keys, after the old ones
    r = h.cli("pack", src, "-o", ds, "--append", "--shard-size", "16K")
    assert r.returncode == 0, h.show(r)
    assert b"appended 30 new file(s), 0 replaced (100 unchanged)" in r.stderr
    after = _content(ds)
    assert len(after) == 130 and all(after[k] == v for k, v in before.items())
    for f, data in shards_before.items():
        assert _files(ds)[f] == data, f"{f} was rewritten"
    m = h.manifest(ds)
    assert m["version"] == 2 and m["index"]["file"] == "index-000002.pdsi" and m["history"][0]["added"] == 30
    assert h.cli("verify", ds, "--deep").returncode == 0
    # Nothing new: nothing changes.
    r = h.cli("pack", src, "-o", ds, "--append", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["added"] == 0 and h.manifest(ds)["version"] == 2


def test_append_with_keys_among_the_old_ones_and_replace(work):
    src = os.path.join(work, "src")
    _tree(src, ["k10", "k20", "k30"])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds)
    _tree(src, ["k15", "k25"])
    h.write(src, "k20", b"changed bytes")
    s = packds.pack(src, ds, append=True)
    assert (s["added"], s["replaced"], s["unchanged"]) == (2, 0, 3)
    got = _content(ds)
    assert list(got) == ["k10", "k15", "k20", "k25", "k30"]  # the index stays sorted by key
    assert got["k20"] != b"changed bytes"  # without --replace, an existing key keeps its bytes
    s = packds.pack(src, ds, append=True, replace=True)
    assert (s["added"], s["replaced"], s["unchanged"]) == (0, 1, 4) and s["version"] == 3
    assert _content(ds)["k20"] == b"changed bytes"
    assert h.cli("verify", ds).returncode == 0
    # Only the previous version's index is kept besides the current one.
    assert sorted(f for f in os.listdir(ds) if f.startswith("index")) == ["index-000002.pdsi", "index-000003.pdsi"]


def test_a_reader_keeps_the_version_it_opened(work):
    src = os.path.join(work, "src")
    _tree(src, [f"x{i:03}" for i in range(50)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=8 << 10)
    old = packds.open(ds)
    want = [old[i] for i in range(len(old))]
    _tree(src, [f"y{i:03}" for i in range(50)])
    h.write(src, "x001", b"new x001")
    packds.pack(src, ds, append=True, replace=True, shard_size=8 << 10)
    assert len(old) == 50 and [old[i] for i in range(50)] == want and old.verify()["problems"] == []
    with packds.open(ds) as new:
        assert len(new) == 100 and new["x001"] == b"new x001"
    old.close()


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["kill-after-files:5", "kill-after-shards:1", "kill-after-shards:3"])
def test_a_killed_append_leaves_the_previous_version_and_a_rerun_finishes(work, fault):
    src = os.path.join(work, "src")
    _tree(src, [f"a{i:03}" for i in range(60)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=8 << 10)
    before = _content(ds)
    _tree(src, [f"b{i:03}" for i in range(60)])
    r = h.cli("pack", src, "-o", ds, "--append", "--shard-size", "8K", env={"PACKDS_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert _content(ds) == before and h.manifest(ds).get("version", 1) == 1
    r = h.cli("pack", src, "-o", ds, "--append", "--shard-size", "8K")
    assert r.returncode == 0, h.show(r)
    assert len(_content(ds)) == 120 and h.cli("verify", ds).returncode == 0
    assert not os.path.exists(os.path.join(ds, ".append.tmp"))


@pytest.mark.faults
@pytest.mark.parametrize("step", [1, 2, 3])
def test_an_append_killed_at_each_commit_step_leaves_the_previous_version(work, step):
    """Killed after its work pack (1), after moving its first shard in (2), after writing the new
    index (3): the dataset opens as the previous version; the rerun finishes the append."""
    src = os.path.join(work, "src")
    _tree(src, [f"a{i:03}" for i in range(40)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=8 << 10)
    before = _content(ds)
    _tree(src, [f"b{i:03}" for i in range(40)])
    r = h.cli("pack", src, "-o", ds, "--append", "--shard-size", "8K", env={"PACKDS_FAULT": f"kill-in-append:{step}"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert _content(ds) == before and h.cli("verify", ds).returncode == 0
    r = h.cli("pack", src, "-o", ds, "--append", "--shard-size", "8K")
    assert r.returncode == 0, h.show(r)
    assert len(_content(ds)) == 80 and h.cli("verify", ds).returncode == 0
    assert h.manifest(ds)["version"] == 2 and not os.path.exists(os.path.join(ds, ".append.tmp"))


def test_restaging_an_appended_dataset_copies_only_the_new_shards(work):
    src = os.path.join(work, "src")
    _tree(src, [f"a{i:03}" for i in range(80)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=8 << 10)
    node = os.path.join(work, "node")
    from packds.stage import stage_record

    first = stage_record(ds, to=node)
    old_shards = len(h.manifest(ds)["shards"])
    _tree(src, [f"b{i:03}" for i in range(20)])
    packds.pack(src, ds, append=True, shard_size=8 << 10)
    again = stage_record(ds, to=node)
    assert first["copied"] and again["copied"]
    assert again["reused_files"] == old_shards, again
    assert _content(again["path"]) == _content(ds)
    assert h.cli("verify", again["path"]).returncode == 0
    assert not [n for n in os.listdir(node) if "staging" in n]
    # A damaged earlier copy is not reused: its shard is copied again (the hash is checked).
    _tree(src, [f"c{i:03}" for i in range(5)])
    packds.pack(src, ds, append=True, shard_size=8 << 10)
    victim = os.path.join(again["path"], "shard-00000.tar")
    data = bytearray(open(victim, "rb").read())
    data[600] ^= 0xFF
    os.unlink(victim)  # a hard link: replace it rather than write through to other copies
    with open(victim, "wb") as f:
        f.write(bytes(data))
    third = stage_record(ds, to=node)
    assert third["reused_files"] == len(h.manifest(ds)["shards"]) - 2, third
    assert h.cli("verify", third["path"]).returncode == 0


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_compact_drops_replaced_bytes_keeps_clean_shards_and_readers(work, compress):
    src = os.path.join(work, "src")
    _tree(src, [f"a{i:03}" for i in range(90)])
    ds = os.path.join(work, "d.pds")
    packds.pack(src, ds, shard_size=8 << 10, compress=compress)
    for i in (3, 4, 70):
        h.write(src, f"a{i:03}", b"replaced %d" % i)
    packds.pack(src, ds, append=True, replace=True, shard_size=8 << 10)
    want = _content(ds)
    reader = packds.open(ds)
    clean_before = {f: d for f, d in _files(ds).items()}
    r = h.cli("compact", ds, "--shard-size", "8K")
    assert r.returncode == 0, h.show(r)
    assert b"2 shard(s) rewritten" in r.stderr, r.stderr
    assert _content(ds) == want and h.cli("verify", ds, "--deep").returncode == 0
    m = h.manifest(ds)
    assert m["version"] == 3 and "compacted" in m["history"][-1]
    named = {s["file"] for s in m["shards"]}
    for f in m["history"][-1]["compacted"]:
        assert f not in named
    for f, d in clean_before.items():
        if f in named:
            assert _files(ds)[f] == d, f"{f}: a clean shard was rewritten"
    # The reader of the previous version still reads it.
    assert {reader.key(i): reader[i] for i in range(len(reader))} == want
    assert reader.verify()["problems"] == []
    reader.close()
    # Nothing left to do; the retired shards go with the next version.
    r = h.cli("compact", ds)
    assert r.returncode == 0 and b"nothing to do" in r.stderr
    _tree(src, ["z-new"])
    packds.pack(src, ds, append=True)
    assert not (set(m["history"][-1]["compacted"]) & set(os.listdir(ds)))
    assert _content(ds)["z-new"] and h.cli("verify", ds).returncode == 0
