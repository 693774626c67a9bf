"""Tree fidelity: empty directories are kept, hard links are stored once (tar hard link members,
index entries sharing the bytes) and restored as links, sparse files are reported and unpacked
sparse again; GNU tar and Python tarfile extract the shards with all of it intact; verify,
plan/parts/merge and resume keep working."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _helpers as h
import packds
from _formats import shard_samples

EMPTY_DIRS = ["a/empty", "a/deep/x/y/z", "top-empty", "c/empty.jpg"]
# Groups of names of one file: the first is stored, the others are hard links to it.
LINKS = [["data/one.bin", "data/two.bin"], ["l3/a.bin", "l3/b.bin", "l3/c.bin"], ["z/0.txt", "z/1.txt"]]
SPARSE = "big/sparse.img"
SPARSE_SIZE = 8 << 20
# Read whole by an I/O thread (the large one above is streamed by the writer).
SMALL_SPARSE = "big/small-sparse.img"


def _payload(i: int, n: int) -> bytes:
    return bytes((i * 7 + j * 13) % 251 for j in range(n))


def _make_tree(root: str) -> str:
    h.write(root, "keep.txt", b"plain file\n")
    h.write(root, "img/pic.jpg", _payload(1, 5000))
    os.makedirs(os.path.join(root, "img2"), exist_ok=True)
    os.link(os.path.join(root, "img/pic.jpg"), os.path.join(root, "img2/pic.raw"))  # a name --include '*.jpg' leaves out
    for d in EMPTY_DIRS:
        os.makedirs(os.path.join(root, d))
    for g, names in enumerate(LINKS):
        first = h.write(root, names[0], _payload(g + 10, 3000 + 900 * g) if g < 2 else b"")
        for other in names[1:]:
            os.makedirs(os.path.dirname(os.path.join(root, other)), exist_ok=True)
            os.link(first, os.path.join(h.b(root), h.b(other)))
    p = os.path.join(root, SPARSE)
    os.makedirs(os.path.dirname(p))
    with open(p, "wb") as f:
        f.seek(3 << 20)
        f.write(b"in the middle of nothing" * 100)
        f.truncate(SPARSE_SIZE)
    with open(os.path.join(root, SMALL_SPARSE), "wb") as f:
        f.write(b"head")
        f.truncate(512 << 10)
    return root


@pytest.fixture(scope="module")
def tree(fast_base):
    root = _make_tree(os.path.join(fast_base, "fidelity-src"))
    for k in [SPARSE, SMALL_SPARSE]:
        st = os.stat(os.path.join(root, k))
        if st.st_blocks * 512 >= st.st_size:
            pytest.skip(f"the filesystem under {root} does not keep sparse files sparse")
    return root


def _linked(root: str, names: list[str]) -> bool:
    st = [os.stat(os.path.join(root, n)) for n in names]
    return len({(s.st_dev, s.st_ino) for s in st}) == 1 and all(s.st_nlink >= len(names) for s in st)


def _assert_tree(src: str, out: str, sparse: bool = True, links: bool = True) -> None:
    """`out` has `src`'s files (bytes), empty directories and (`links`) hard links."""
    assert h.walk_files(out) == h.walk_files(src)
    for k in h.walk_files(src):
        assert h.read(out, k) == h.read(src, k), k
    for d in EMPTY_DIRS:
        p = os.path.join(out, d)
        assert os.path.isdir(p) and os.listdir(p) == [], d
    for names in LINKS if links else []:
        assert _linked(out, names), names
    assert _linked(out, ["img/pic.jpg", "img2/pic.raw"]) or not links
    for k in [SPARSE, SMALL_SPARSE] if sparse else []:
        st = os.stat(os.path.join(out, k))
        assert st.st_blocks * 512 < st.st_size // 4, (k, st.st_blocks, st.st_size)


N_LINKS = sum(len(g) - 1 for g in LINKS) + 1  # + img2/pic.raw


@pytest.mark.parametrize("fmt,compress", [("tar", "none"), ("tar", "zstd"), ("h5", "none"), ("h5", "zstd")])
def test_pack_unpack_round_trip(tree, work, fmt, compress):
    out = os.path.join(work, "ds")
    r = h.cli("pack", tree, "-o", out, "--format", fmt, "--compress", compress, "--json")
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout.splitlines()[0])
    assert (s["empty_dirs"], s["hard_links"], s["sparse_files"]) == (len(EMPTY_DIRS), N_LINKS, 2)
    assert b"4 empty directories kept, 5 hard links stored once, 2 sparse files stored at full size" in r.stderr, h.show(r)
    m = h.manifest(out)
    assert m["empty_dirs"] == sorted(EMPTY_DIRS) and m["sparse_files"] == 2 and m["format_version"] == 3
    info = h.cli("info", out)
    assert b"tree:     4 empty directories kept, 5 hard links stored once, 2 sparse files stored at full size\n" in info.stdout, h.show(info)
    ds = packds.open(out)
    # Directories are not samples; every name of a linked file is one, with the bytes.
    assert len(ds) == len(h.walk_files(tree)) and sorted(ds.keys()) == sorted(k.decode() for k in h.walk_files(tree))
    assert ds.glob("a/**") == [] and ds.glob("top-empty") == []
    ls = h.cli("ls", out)
    assert ls.returncode == 0 and sorted(ls.stdout.splitlines()) == h.walk_files(tree), h.show(ls)
    for k in h.walk_files(tree):
        assert ds[k.decode()] == h.read(tree, k), k
    keys = list(ds.keys())
    for a, o in m["hard_links"]:
        assert ds.locate(a) == ds.locate(o) and a < o
        assert _linked(tree, [keys[a], keys[o]])
    assert ds.verify(deep=True)["problems"] == []
    dest = os.path.join(work, "unpacked")
    r = h.cli("unpack", out, dest)
    assert r.returncode == 0, h.show(r)
    _assert_tree(tree, dest)


def test_tar_and_tarfile_extract_dirs_and_links(tree, work):
    out = os.path.join(work, "ds")
    packds.pack(tree, out)
    (shard,) = [os.path.join(out, s["file"]) for s in h.manifest(out)["shards"]]
    gnu = os.path.join(work, "gnu")
    os.makedirs(gnu)
    r = subprocess.run(["tar", "-xf", shard, "-C", gnu], capture_output=True)
    assert r.returncode == 0, r.stderr
    _assert_tree(tree, gnu, sparse=False)
    py = os.path.join(work, "py")
    with tarfile.open(shard) as t:
        kinds = {m.name: m.type for m in t.getmembers()}
        t.extractall(py, filter="data")
    assert kinds["a/empty"] == tarfile.DIRTYPE and kinds["data/two.bin"] == tarfile.LNKTYPE
    _assert_tree(tree, py, sparse=False)


def test_long_and_non_ascii_link_names_extract_with_tar_and_tarfile(work):
    src = os.path.join(work, "src")
    long_dir = "d" * 120
    first = h.write(src, f"{long_dir}/première-{'x' * 90}.bin", b"bytes" * 300)
    other = os.path.join(src, "é", "ü" * 60)
    os.makedirs(os.path.dirname(other))
    os.link(first, other)
    os.makedirs(os.path.join(src, "e" * 150, "vide"))
    out = os.path.join(work, "ds")
    s = packds.pack(src, out)
    assert (s["hard_links"], s["empty_dirs"]) == (1, 1)
    shard = os.path.join(out, "shard-00000.tar")
    for how in ["gnu", "tarfile"]:
        dest = os.path.join(work, how)
        os.makedirs(dest)
        if how == "gnu":
            r = subprocess.run(["tar", "-xf", shard, "-C", dest], capture_output=True)
            assert r.returncode == 0, r.stderr
        else:
            with tarfile.open(shard) as t:
                t.extractall(dest, filter="data")
        assert h.walk_files(dest) == h.walk_files(src), how
        a, b_ = (os.stat(os.path.join(h.b(dest), os.path.relpath(h.b(p), h.b(src)))) for p in (first, other))
        assert a.st_ino == b_.st_ino and os.path.isdir(os.path.join(dest, "e" * 150, "vide")), how
    assert packds.open(out).verify()["problems"] == []


def test_compressed_links_name_the_zst_member(tree, work):
    out = os.path.join(work, "ds")
    packds.pack(tree, out, compress="zstd")
    (shard,) = [os.path.join(out, s["file"]) for s in h.manifest(out)["shards"]]
    with tarfile.open(shard) as t:
        links = {m.name: m.linkname for m in t.getmembers() if m.islnk()}
    assert links["data/two.bin.zst"] == "data/one.bin.zst"
    assert packds.open(out).verify(deep=True)["problems"] == []


def test_a_link_across_a_shard_boundary_is_stored_again(work):
    src = os.path.join(work, "src")
    # Each file fills most of a 16 KiB shard: every name lands in a shard of its own.
    first = h.write(src, "a/first.bin", _payload(3, 12000))
    os.link(first, os.path.join(src, "b.bin"))
    os.link(first, os.path.join(src, "c.bin"))
    out = os.path.join(work, "ds")
    s = packds.pack(src, out, shard_size=16 << 10)
    assert s["shards"] == 3 and s["hard_links"] == 0
    for rec in h.manifest(out)["shards"]:  # each shard extracts on its own
        dest = os.path.join(work, "x-" + rec["file"])
        os.makedirs(dest)
        r = subprocess.run(["tar", "-xf", os.path.join(out, rec["file"]), "-C", dest], capture_output=True)
        assert r.returncode == 0 and len(h.walk_files(dest)) == 1, r.stderr
    # Two names per shard: the second one links to the first in the same shard.
    os.link(first, os.path.join(src, "a/second.bin"))
    out2 = os.path.join(work, "ds2")
    s = packds.pack(src, out2, shard_size=40 << 10)
    assert s["hard_links"] >= 1
    assert packds.open(out2).verify()["problems"] == []
    dest = os.path.join(work, "un")
    packds.open(out2).unpack(dest)
    assert h.walk_files(dest) == h.walk_files(src)
    assert _linked(dest, ["a/first.bin", "a/second.bin"])


def test_a_hard_links_pair_that_does_not_share_data_is_a_problem_and_not_linked(tree, work):
    out = os.path.join(work, "ds")
    packds.pack(tree, out)
    m = h.manifest(out)
    keys = list(packds.open(out).keys())
    other = keys.index("keep.txt")
    first = next(i for i in range(other) if keys[i] != "keep.txt")
    m["hard_links"].append(sorted([first, other]))
    m["hard_links"].append([0, 10**6])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(m, f)
    ds = packds.open(out)
    problems = ds.verify()["problems"]
    assert len(problems) == 2 and all("hard_links pair" in p and "manifest.json" in p for p in problems), problems
    dest = os.path.join(work, "un")
    ds.unpack(dest)
    a, b_ = sorted([first, other])
    assert os.stat(os.path.join(dest, keys[a])).st_ino != os.stat(os.path.join(dest, keys[b_])).st_ino
    assert h.read(dest, keys[b_].encode()) == h.read(tree, keys[b_].encode())


def test_identical_files_that_are_not_links_stay_apart(work):
    src = os.path.join(work, "src")
    for k in ["x", "y"]:
        h.write(src, k, b"same bytes" * 100)
    h.write(src, "e1", b"")
    h.write(src, "e2", b"")
    for fmt in ["tar", "h5"]:
        out = os.path.join(work, f"ds-{fmt}")
        s = packds.pack(src, out, format=fmt)
        assert s["hard_links"] == 0 and h.manifest(out)["format_version"] == 1
        dest = os.path.join(work, f"un-{fmt}")
        packds.open(out).unpack(dest)
        for a, b_ in [("x", "y"), ("e1", "e2")]:
            assert os.stat(os.path.join(dest, a)).st_ino != os.stat(os.path.join(dest, b_)).st_ino


def test_include_and_exclude_filter_dirs_and_links(tree, work):
    out = os.path.join(work, "ds")
    s = packds.pack(tree, out, include=["*.jpg"])
    # Only img/pic.jpg of its two names matches: no link; only the empty directory that matches is kept.
    assert (s["files"], s["hard_links"], s["empty_dirs"]) == (1, 0, 1)
    assert h.manifest(out)["empty_dirs"] == ["c/empty.jpg"]
    out2 = os.path.join(work, "ds2")
    s = packds.pack(tree, out2, exclude=["a", "l3/b.bin"])
    m = h.manifest(out2)
    assert "a/empty" not in m["empty_dirs"] and "top-empty" in m["empty_dirs"]
    assert s["hard_links"] == N_LINKS - 1
    dest = os.path.join(work, "un")
    packds.open(out2).unpack(dest)
    assert _linked(dest, ["l3/a.bin", "l3/c.bin"]) and not os.path.exists(os.path.join(dest, "a"))


def test_a_directory_emptied_by_excludes_is_not_kept(work):
    src = os.path.join(work, "src")
    h.write(src, "d/skip.tmp", b"x")
    h.write(src, "f", b"y")
    out = os.path.join(work, "ds")
    assert packds.pack(src, out, exclude=["*.tmp"])["empty_dirs"] == 0
    assert "empty_dirs" not in h.manifest(out)


@pytest.mark.parametrize("opts", [dict(shard_size=12 << 10), dict(shard_size=12 << 10, format="h5", compress="zstd")], ids=["tar", "h5-zstd"])
def test_plan_parts_merge_equal_a_single_pack(tree, work, opts):
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, **opts)
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan, **opts)
    out = os.path.join(work, "out.pds")
    for p in [2, 0, 1]:
        packds.pack([], out, plan=plan, part=f"{p}/3")
    packds.merge(out)
    h.assert_same_dataset_bytes(single, out)
    a, b_ = h.manifest(single), h.manifest(out)
    for k in ["empty_dirs", "hard_links", "sparse_files", "format_version"]:
        assert a.get(k) == b_.get(k), k
    assert a["hard_links"]
    ds = packds.open(out)
    assert ds.verify(deep=True)["problems"] == []
    dest = os.path.join(work, "un")
    ds.unpack(dest)
    # Small shards: some names of a file lie in other shards (stored again, not linked).
    _assert_tree(tree, dest, links=False)
    keys = list(ds.keys())
    for a, o in b_["hard_links"]:
        assert _linked(dest, [keys[a], keys[o]])


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["kill-after-shards:1", "kill-after-files:3"])
def test_resume_after_a_kill_gives_the_same_dataset(tree, work, fault):
    args = ["--shard-size", "12K", "--threads", "1", "-q"]
    reference = os.path.join(work, "ref.pds")
    assert h.cli("pack", tree, "-o", reference, *args).returncode == 0
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree, "-o", out, *args, env={"PACKDS_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    r = h.cli("pack", tree, "-o", out, *args, "--resume", "--json")
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    h.assert_same_dataset_bytes(reference, out)
    a, b_ = h.manifest(reference), h.manifest(out)
    assert (a["hard_links"], a["empty_dirs"], a["sparse_files"]) == (b_["hard_links"], b_["empty_dirs"], b_["sparse_files"])
    assert (s["empty_dirs"], s["hard_links"], s["sparse_files"]) == (len(EMPTY_DIRS), len(a["hard_links"]), 2) and a["hard_links"]



def test_index_of_our_own_shard_and_stage_keep_working(tree, work):
    out = os.path.join(work, "ds")
    packds.pack(tree, out)
    (shard,) = [os.path.join(out, s["file"]) for s in h.manifest(out)["shards"]]
    # `packds index` over the shard: regular members are samples, hard link members are
    # skipped and listed, directory members ignored.
    idx = os.path.join(work, "idx")
    s = packds.index_tars([shard], idx)
    linked = sorted(k for g in LINKS for k in g[1:]) + ["img2/pic.raw"]
    assert sorted(p for p, _ in s["skipped"]) == sorted(f"{shard}:{k}" for k in linked)
    assert all(r.startswith("hard link: to ") for _, r in s["skipped"])
    ds = packds.open(idx)
    assert sorted(ds.keys()) == sorted(set(k.decode() for k in h.walk_files(tree)) - set(linked))
    assert ds.verify()["problems"] == []
    # A staged copy is the same dataset: every name reads its bytes, verify passes.
    staged = packds.stage(out, os.path.join(work, "node"), policy="local")
    sd = packds.open(staged, verify=True)
    for k in h.walk_files(tree):
        assert sd[k.decode()] == h.read(tree, k)
    assert sd.verify(deep=True)["problems"] == []


_names = st.text(alphabet="abcxyz", min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(st.tuples(_names, _names), st.binary(min_size=0, max_size=3000), min_size=1, max_size=12),
    links=st.lists(st.tuples(st.integers(0, 11), _names), max_size=8),
    empty=st.lists(st.tuples(_names, _names), max_size=4),
    shard_size=st.sampled_from([4096, 8192, 1 << 30]),
    fmt=st.sampled_from(["tar", "h5"]),
    compress=st.sampled_from(["none", "zstd"]),
)
def test_random_trees_with_links_and_empty_dirs(work, files, links, empty, shard_size, fmt, compress):
    """Any tree: unpack gives its files, its empty directories, and exactly the links between
    names that lie in one shard; tar/h5 readers see every name's bytes."""
    base = tempfile.mkdtemp(dir=work)
    try:
        src = os.path.join(base, "src")
        names = sorted(f"{d}/{f}" for d, f in files)
        for (d, f), data in files.items():
            h.write(src, f"{d}/{f}", data)
        for i, n in links:  # another name, in directory "l", of file i
            target, other = names[i % len(names)], f"l/{n}"
            if not os.path.exists(os.path.join(src, other)):
                os.makedirs(os.path.join(src, "l"), exist_ok=True)
                os.link(os.path.join(src, target), os.path.join(src, other))
        for d, e in empty:
            os.makedirs(os.path.join(src, "e", d, e), exist_ok=True)
        out = os.path.join(base, "ds")
        s = packds.pack(src, out, shard_size=shard_size, format=fmt, compress=compress)
        ds = packds.open(out)
        assert ds.verify(deep=True)["problems"] == []
        assert shard_samples(out) == [(k, h.read(src, k)) for k in h.walk_files(src)]
        dest = os.path.join(base, "un")
        ds.unpack(dest)
        assert h.walk_files(dest) == h.walk_files(src)
        keys = list(ds.keys())
        ident = {k: (os.stat(os.path.join(src, k)).st_ino, ds.locate(k)[0]) for k in keys}
        for a in keys:
            assert h.read(dest, a.encode()) == h.read(src, a.encode())
            for b_ in keys:
                linked = os.stat(os.path.join(dest, a)).st_ino == os.stat(os.path.join(dest, b_)).st_ino
                assert linked == (a == b_ or ident[a] == ident[b_]), (a, b_)
        kept = [f"e/{d}/{e}" for d, e in empty if os.path.isdir(os.path.join(src, "e", d, e)) and not os.listdir(os.path.join(src, "e", d, e))]
        assert s["empty_dirs"] == len(set(kept)) and all(os.path.isdir(os.path.join(dest, k)) for k in kept)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.faults
def test_a_file_changed_between_its_names_is_stored_again(work):
    """The first name of a hard-linked file is read and written, then the file changes, then its
    second name is read: the second name is stored as a regular member with the new bytes (not a link to
    the old ones), and the first keeps the bytes it was read with."""
    src = os.path.join(work, "src")
    first = h.write(src, "a", b"old " * 1000)
    for i in range(14):
        h.write(src, f"f{i:02}", b"%d" % i)
    os.link(first, os.path.join(src, "z"))
    # I/O threads hand files over in chunks of 8: "a" is in the first, "z" last in the second.
    # Test-only switch: every file read waits 0.2 s, so the progress call that changes the file
    # (once "a" is written) comes well before "z" is read. packds reads PACKDS_FAULT once per
    # process: the pack runs in a child process.
    tests = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path[:0] = [{tests!r}]; from test_tree_fidelity import _pack_while_a_link_changes as f; f(*sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, src, os.path.join(work, "o.pds")], capture_output=True, timeout=120,
                       env={**os.environ, "PACKDS_FAULT": "pack-slow-us:200000"})
    assert r.returncode == 0, h.show(r)


def _pack_while_a_link_changes(src, out):
    changed = []

    def cb(phase, done, total, nbytes):
        if not changed and phase == 1 and done >= 1:
            with open(os.path.join(src, "a"), "r+b") as f:
                f.write(b"new " * 1000)
            changed.append(done)

    s = packds.pack(src, out, threads=1, progress=cb)
    assert changed and changed[0] < 15, changed
    ds = packds.open(out)
    assert s["hard_links"] == 0 and (ds["a"], ds["z"]) == (b"old " * 1000, b"new " * 1000)
    assert ds.verify()["problems"] == []


def test_append_concat_and_subset_keep_links_and_empty_dirs(tree, work):
    ds = os.path.join(work, "ds")
    packds.pack(tree, ds)
    base = h.manifest(ds)
    # Append: a new empty directory, a new linked pair, and a file under a directory that was
    # empty (no longer empty afterwards); the old pairs keep their names.
    more = os.path.join(work, "more")
    first = h.write(more, "m/new.bin", _payload(7, 2000))
    os.link(first, os.path.join(more, "m/new-link.bin"))
    os.makedirs(os.path.join(more, "m/also-empty"))
    h.write(more, "top-empty/now-a-file", b"x")
    s = packds.pack(more, ds, append=True)
    assert s["added"] == 3
    m = h.manifest(ds)
    d = packds.open(ds)
    keys = list(d.keys())
    pairs = {(keys[a], keys[o]) for a, o in m["hard_links"]}
    assert ("m/new-link.bin", "m/new.bin") in pairs and len(pairs) == len(base["hard_links"]) + 1
    assert all(d.locate(a) == d.locate(o) for a, o in m["hard_links"])
    assert "m/also-empty" in m["empty_dirs"] and "top-empty" not in m["empty_dirs"] and "a/empty" in m["empty_dirs"]
    assert d.verify(deep=True)["problems"] == []
    dest = os.path.join(work, "un")
    d.unpack(dest)
    assert _linked(dest, ["m/new.bin", "m/new-link.bin"]) and _linked(dest, LINKS[1])
    # Concat of the dataset with itself (prefixed): both copies keep their links and directories.
    cat = os.path.join(work, "cat")
    packds.concat([ds, ds], cat, prefixes=["x/", "y/"])
    cm = h.manifest(cat)
    assert len(cm["hard_links"]) == 2 * len(m["hard_links"]) and "y/a/deep/x/y/z" in cm["empty_dirs"]
    c = packds.open(cat)
    assert c.verify(deep=True)["problems"] == [] and cm["format_version"] == 3
    ck = list(c.keys())
    assert {(ck[a], ck[o]) for a, o in cm["hard_links"]} >= {("x/data/one.bin", "x/data/two.bin"), ("y/l3/a.bin", "y/l3/c.bin")}
    # A subset keeps the pairs whose two names it takes, and no empty directories.
    sub = os.path.join(work, "sub")
    packds.subset(ds, sub, include=["l3/a.bin", "l3/b.bin", "data/one.bin", "keep.txt"])
    sm = h.manifest(sub)
    sk = list(packds.open(sub).keys())
    assert [(sk[a], sk[o]) for a, o in sm["hard_links"]] == [("l3/a.bin", "l3/b.bin")] and "empty_dirs" not in sm
    assert packds.open(sub).verify()["problems"] == []


def test_remove_source_removes_every_name_of_a_linked_file(work):
    """With --remove-source, a shard whose members share data (hard links) reads back right, and
    every name is removed; the empty directory that was there stays (no file was packed from
    it), and the dataset unpacks to the tree with its links. The file is larger than the 8 MiB
    reads of the read-back and of verify, so its shared extent spans two of them."""
    src = os.path.join(work, "src")
    big = b"0123456789abcdef" * (9 << 16)
    first = h.write(src, "d/a.bin", big)
    os.link(first, os.path.join(src, "d/b.bin"))
    h.write(src, "c.txt", b"c")
    os.makedirs(os.path.join(src, "empty"))
    out = os.path.join(work, "ds")
    s = packds.pack(src, out, remove_source=True)
    assert s["hard_links"] == 1 and s["removed"]["files"] == 3 and s["removed"]["left"] == []
    assert h.walk_files(src) == [] and os.path.isdir(os.path.join(src, "empty"))
    dest = os.path.join(work, "un")
    packds.open(out).unpack(dest)
    assert _linked(dest, ["d/a.bin", "d/b.bin"]) and os.path.isdir(os.path.join(dest, "empty"))
    assert h.read(dest, b"d/b.bin") == big
    assert packds.open(out).verify(deep=True)["problems"] == []
