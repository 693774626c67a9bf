"""Acceptance 1 and 2: the odd tree packs, reads back byte for byte through packds, through GNU
tar and through Python's tarfile, and packing it again gives identical shards and index."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tarfile

import _helpers as h
import packds


def test_summary_and_manifest(odd_tree, odd_ds):
    out, s = odd_ds
    assert s["files"] == len(odd_tree.keys)
    assert s["skipped"] == []
    assert s["resumed_shards"] == 0 and s["already_complete"] is False
    shards = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert s["shards"] == len(shards) >= 8, "4 MiB shards: the odd tree must span several"
    assert shards == [f"shard-{i:05d}.tar" for i in range(len(shards))]
    assert sorted(os.listdir(out)) == sorted(shards + ["index.pdsi", "manifest.json"]), "no leftovers (.pack-state, tmp files)"
    m = packds.open(out).manifest
    assert m["samples"] == len(odd_tree.keys)
    assert m["total_bytes"] == s["bytes"] == sum(os.path.getsize(odd_tree.path(k)) for k in odd_tree.keys)
    assert [r["file"] for r in m["shards"]] == shards
    assert sum(r["samples"] for r in m["shards"]) == len(odd_tree.keys)
    for r in m["shards"]:
        assert os.path.getsize(os.path.join(out, r["file"])) == r["size"]
        assert r["size"] <= 4 << 20, "a shard of small files stays under --shard-size"
    assert m["index"]["size"] == os.path.getsize(os.path.join(out, "index.pdsi"))


def test_keys_are_relative_paths_sorted_bytewise(odd_tree, odd_ds):
    ds = packds.open(odd_ds[0])
    assert len(ds) == len(odd_tree.keys)
    got = [ds.key_bytes(i) for i in range(len(ds))]
    assert got == sorted(got), "keys are not in byte-wise order"
    assert got == odd_tree.keys
    # The str form is os.fsdecode of the bytes, for every key (incl. non-UTF-8 ones).
    for i in range(len(ds)):
        assert ds.key(i) == os.fsdecode(got[i])
    for label in ("long_name", "path_over_1000", "utf8_cjk", "utf8_nfd", "non_utf8_root", "non_utf8_dir", "deep_leaf", "newline", "git_head"):
        k = odd_tree.special[label]
        assert ds.index(k) == odd_tree.keys.index(k), label
        assert ds.index(os.fsdecode(k)) == odd_tree.keys.index(k), label


def test_every_sample_equals_its_file(odd_tree, odd_ds):
    ds = packds.open(odd_ds[0])
    bad = []
    for i, k in enumerate(odd_tree.keys):
        want = odd_tree.read(k)
        if ds[i] != want or ds.size(i) != len(want):
            bad.append(k)
    assert not bad, f"{len(bad)} samples differ from their files, e.g. {bad[:5]}"
    # By key, too, for the awkward ones.
    for label, k in odd_tree.special.items():
        assert ds[os.fsdecode(k)] == odd_tree.read(k), label
        assert ds[k] == odd_tree.read(k), label
    assert ds[odd_tree.special["empty0"]] == b""


def test_verify_clean(odd_ds):
    ds = packds.open(odd_ds[0])
    r = ds.verify()
    assert r["problems"] == []
    assert r["samples"] == len(ds)
    assert r["shards"] == len(ds.manifest["shards"])
    assert r["bytes"] == sum(s["size"] for s in ds.manifest["shards"])
    c = h.cli("verify", odd_ds[0])
    assert c.returncode == 0, h.show(c)


def test_gnu_tar_extracts_the_tree(odd_tree, odd_ds, work):
    out = odd_ds[0]
    dest = os.path.join(work, "x")
    os.mkdir(dest)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    for n in shards:
        r = subprocess.run(["tar", "-xf", os.path.join(out, n), "-C", dest], capture_output=True, timeout=120)
        assert r.returncode == 0, f"tar -xf {n}: {r.stderr.decode(errors='replace')}"
    r = subprocess.run(["diff", "-r", odd_tree.root, dest], capture_output=True, timeout=120)
    assert r.returncode == 0, f"diff -r source vs tar-extracted:\n{r.stdout[:3000].decode(errors='replace')}{r.stderr[:2000].decode(errors='replace')}"
    # Modes and mtimes (whole seconds) survive, on every special file and a random sample.
    rng = random.Random(5)
    sample = set(odd_tree.special.values()) | set(rng.sample(odd_tree.keys, 1000))
    for k in sorted(sample):
        a = os.lstat(odd_tree.path(k))
        c = os.lstat(os.path.join(os.fsencode(dest), k))
        assert stat.S_IMODE(c.st_mode) == stat.S_IMODE(a.st_mode), (k, oct(a.st_mode), oct(c.st_mode))
        assert int(c.st_mtime) == int(a.st_mtime), (k, a.st_mtime, c.st_mtime)
    # And nothing more than the tree.
    assert h.walk_files(dest) == odd_tree.keys


def test_python_tarfile_agrees(odd_tree, odd_ds):
    out = odd_ds[0]
    ds = packds.open(out)
    names, i = [], 0
    for n in sorted(x for x in os.listdir(out) if x.endswith(".tar")):
        shard_path = os.path.join(out, n)
        with tarfile.open(shard_path, encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                assert m.isreg(), m.name
                k = odd_tree.keys[i]
                assert m.name == os.fsdecode(k), (n, m.name, k)
                st = os.lstat(odd_tree.path(k))
                assert m.size == st.st_size, k
                assert m.mode == stat.S_IMODE(st.st_mode), (k, oct(m.mode))
                assert m.mtime == int(st.st_mtime), (k, m.mtime, st.st_mtime)
                assert tf.extractfile(m).read() == odd_tree.read(k), k
                # The index points exactly at the member's data.
                loc = ds.locate(i)
                assert os.path.basename(os.fsdecode(loc[0])) == n
                assert (loc[1], loc[2]) == (m.offset_data, m.size), k
                names.append(m.name)
                i += 1
    assert names == [os.fsdecode(k) for k in odd_tree.keys]


def test_long_and_binary_names_use_pax_headers(odd_tree, odd_ds):
    """A 100-byte name fits ustar exactly; longer or non-ASCII ones need a pax 'path' record,
    and non-UTF-8 ones also hdrcharset=BINARY."""
    ds = packds.open(odd_ds[0])
    for label in ("exactly_100", "long_name", "utf8_cjk", "non_utf8_root", "path_over_1000"):
        k = odd_tree.special[label]
        shard, off, size = ds.locate(ds.index(k))
        with open(shard, "rb") as f:
            f.seek(off - 512)
            ustar = f.read(512)
            f.seek(0)
            blob = f.read(off)
        assert ustar[257:263] == b"ustar\0", label
        if label == "exactly_100":
            assert ustar[:100] == k
            continue
        # Find this member's pax records: they sit right before its ustar header.
        prev = blob[: off - 512]
        start = prev.rfind(b"././@PaxHeader")
        assert start >= 0 and start % 512 == 0, label
        recs = prev[start + 512 :]
        assert b" path=" + k + b"\n" in recs, (label, recs[:300])
        assert (b"hdrcharset=BINARY" in recs) == (label == "non_utf8_root"), label


def test_pack_is_deterministic(odd_tree, odd_ds, fast_base):
    """Same tree, different thread counts (and API vs CLI): identical shards and index."""
    a = os.path.join(fast_base, "det-1.pds")
    c = os.path.join(fast_base, "det-7.pds")
    try:
        packds.pack(odd_tree.root, a, shard_size=4 << 20, threads=1)
        r = h.cli("pack", odd_tree.root, "-o", c, "--shard-size", "4M", "--threads", "7", "-q")
        assert r.returncode == 0, h.show(r)
        h.assert_same_dataset_bytes(a, c)
        h.assert_same_dataset_bytes(a, odd_ds[0])
        ma, mc = packds.open(a).manifest, packds.open(c).manifest
        assert ma["shards"] == mc["shards"] and ma["index"] == mc["index"]
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(c, ignore_errors=True)


def test_deterministic_wherever_the_tree_lives(small_tree, work):
    """Keys are relative: a copy of the tree elsewhere (same contents, modes, mtimes) packs to
    the same bytes, with a trailing slash on SRC or without."""
    copy = os.path.join(work, "elsewhere", "tree")
    shutil.copytree(small_tree.root, copy)
    a, c = os.path.join(work, "a.pds"), os.path.join(work, "c.pds")
    h.pack(small_tree.root, a, threads=3)
    h.pack(copy + "/", c, threads=2)
    h.assert_same_dataset_bytes(a, c)


def test_json_summary_is_the_api_summary(odd_ds):
    out, s = odd_ds
    assert set(s) >= {"files", "bytes", "shards", "resumed_shards", "seconds", "skipped", "already_complete"}
    assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0
    json.dumps(s)


def test_large_files_and_shard_boundaries(work):
    """Files around and far above the in-memory limit (with 256 I/O threads the writer streams
    anything over 64 KiB) and above --shard-size: same bytes whether streamed or read whole,
    a file larger than a shard gets a shard of its own, and no shard is over-full."""
    src = os.path.join(work, "src")
    rng = random.Random(4)
    sizes = {b"a_small": 100, b"b_64k_minus": (64 << 10) - 1, b"c_64k": 64 << 10, b"d_64k_plus": (64 << 10) + 1,
             b"e_200k": 200_000, b"f_tiny": 1, b"g_3m": 3 << 20, b"h_empty": 0, b"i_130k": 130 << 10, b"j_5k": 5000}
    for k, n in sizes.items():
        h.write(src, b"big/" + k, rng.randbytes(n))
    a, c = os.path.join(work, "a.pds"), os.path.join(work, "c.pds")
    packds.pack(src, a, shard_size=128 << 10, threads=256)
    packds.pack(src, c, shard_size=128 << 10, threads=1)
    h.assert_same_dataset_bytes(a, c)
    ds = packds.open(a)
    for i, k in enumerate(sorted(sizes)):
        assert ds.key_bytes(i) == b"big/" + k
        assert ds.get_checked(i) == h.read(src, b"big/" + k)
    assert ds.verify()["problems"] == []
    for rec in ds.manifest["shards"]:
        assert rec["size"] <= 128 << 10 or rec["samples"] == 1, rec
    own = {ds.key_bytes(i) for i in range(len(ds)) if ds.size(i) > 128 << 10}
    assert own == {b"big/e_200k", b"big/g_3m", b"big/i_130k"}
    for i in range(len(ds)):
        if ds.key_bytes(i) in own:
            shard = os.path.basename(os.fspath(ds.locate(i)[0]))
            assert next(r for r in ds.manifest["shards"] if r["file"] == shard)["samples"] == 1
