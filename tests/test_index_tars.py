"""`packds index`: existing tar files (WebDataset shards, GNU tar, pax) indexed in place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import tarfile

import pytest
import webdataset  # a test extra: pip install '.[test]'

import _helpers as h
import packds
import packds.wds
from packds import FormatError, UnsafePathError, UsageError


def _wds_samples(n: int, seed: int = 1) -> list[dict]:
    rnd = __import__("random").Random(seed)
    out = []
    for i in range(n):
        out.append({
            "__key__": f"train/{i:06d}",
            "jpg": rnd.randbytes(rnd.randrange(0, 3000)),
            "cls": str(i % 10).encode(),
            "json": json.dumps({"i": i, "caption": f"sample {i} é"}).encode(),
        })
    return out


@pytest.fixture
def wds_shards(work):
    """Three WebDataset shards written by webdataset.ShardWriter (20 samples each)."""
    samples = _wds_samples(60)
    pattern = os.path.join(work, "shards", "shard-%06d.tar")
    os.makedirs(os.path.dirname(pattern))
    with webdataset.ShardWriter(pattern, maxcount=20, verbose=0) as w:
        for s in samples:
            w.write(s)
    tars = sorted(os.path.join(work, "shards", n) for n in os.listdir(os.path.join(work, "shards")))
    assert len(tars) == 3
    return tars, samples


def _webdataset_reads(tars: list[str]) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in webdataset.WebDataset(tars, shardshuffle=False)]


def test_webdataset_shards_read_back_equal_per_member_and_grouped(work, wds_shards):
    tars, samples = wds_shards
    out = os.path.join(work, "train.pds")
    s = packds.index_tars(tars, out, group_by_basename=True)
    assert (s["tars"], s["samples"], s["groups"], s["skipped"], s["warnings"]) == (3, 180, 60, [], [])
    theirs = _webdataset_reads(tars)
    assert len(theirs) == 60
    ds = packds.open(out)
    assert isinstance(ds, packds.Dataset) and len(ds) == 180 and ds.format_version == 2
    for t in theirs:  # per member
        for field, value in t.items():
            if field != "__key__":
                assert ds[f"{t['__key__']}.{field}"] == value
    g = packds.wds.GroupedDataset(out)
    assert len(g) == 60 and list(g.keys()) == [t["__key__"] for t in theirs]
    for i, t in enumerate(theirs):  # grouped, by position and by key
        assert g[i] == t
        assert g[t["__key__"]] == t
    assert g.get("train/999999") is None and "train/000007" in g and "train/000007.jpg" not in g
    assert g.index("train/000042") == 42
    assert [ds.key(j) for j in g.members(3)] == ["train/000003.cls", "train/000003.jpg", "train/000003.json"]
    with pytest.raises(KeyError):
        g["nope"]
    with pytest.raises(IndexError):
        g[60]
    assert pickle.loads(pickle.dumps(g))[-1] == theirs[-1]
    assert packds.wds.GroupedDataset(ds)[5] == theirs[5]
    # The tars are untouched; the dataset refers to them.
    m = ds.manifest
    assert m["options"]["indexed"] is True and m["options"]["group_by_basename"] is True
    assert m["options"]["sources"] == [os.path.realpath(t) for t in tars]
    assert sorted(os.listdir(out)) == ["index.pdsi", "manifest.json", "shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert os.readlink(os.path.join(out, "shard-00001.tar")) == os.path.realpath(tars[1])
    assert ds.verify()["problems"] == []


def test_webdataset_tarwriter_single_shard_and_cli(work):
    samples = _wds_samples(25, seed=5)
    tar = os.path.join(work, "one.tar")
    with webdataset.TarWriter(tar) as w:
        for s in samples:
            w.write(s)
    out = os.path.join(work, "one.pds")
    r = h.cli("index", tar, "-o", out, "--group-by-basename", "--json")
    assert r.returncode == 0, h.show(r)
    summary = json.loads(r.stdout)
    assert summary["samples"] == 75 and summary["groups"] == 25
    assert b"packds: indexed 75 members in 25 samples" in r.stderr and b"0 skipped" in r.stderr
    g = packds.wds.GroupedDataset(out)
    assert [g[i] for i in range(len(g))] == _webdataset_reads([tar]) == samples
    r = h.cli("verify", out)
    assert r.returncode == 0 and b"OK: 75 samples" in r.stderr, h.show(r)


def _tree(root: str) -> dict[str, bytes]:
    files = {
        "top.txt": b"top",
        "empty": b"",
        "d/" + "long-name-" * 12 + ".bin": os.urandom(777),  # > 100 bytes
        "d/" + "x" * 60 + "/" + "y" * 60 + "/z.dat": os.urandom(1500),
        "big.bin": os.urandom(70_000),
    }
    for k, v in files.items():
        p = os.path.join(root, k)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(v)
    return files


def _gnu_tar(args: list[str], cwd: str) -> None:
    r = subprocess.run(["tar", *args], cwd=cwd, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is needed")
@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar-prefix"])
def test_gnu_tar_archives_every_member_equals_the_file(work, fmt):
    src = os.path.join(work, "src")
    files = _tree(src)
    if fmt == "pax":
        files["caf\u00e9/\u65e5\u672c\u8a9e \U0001F600.txt"] = "non-ASCII".encode()
        os.makedirs(os.path.join(src, "caf\u00e9"))
        with open(os.path.join(src, "caf\u00e9/\u65e5\u672c\u8a9e \U0001F600.txt"), "wb") as f:
            f.write(b"non-ASCII")
    if fmt == "ustar-prefix":
        del files["d/" + "long-name-" * 12 + ".bin"]
        os.remove(os.path.join(src, "d/" + "long-name-" * 12 + ".bin"))
    tar = os.path.join(work, "t.tar")
    _gnu_tar([f"--format={'ustar' if fmt == 'ustar-prefix' else fmt}", "-cf", tar, "."], src)
    out = os.path.join(work, "t.pds")
    s = packds.index_tars(tar, out)
    assert s["skipped"] == [] and s["warnings"] == []  # directories are skipped silently
    ds = packds.open(out)
    assert sorted(ds.keys()) == list(ds.keys()) == sorted(files, key=lambda k: k.encode())  # "./" removed
    for k, v in files.items():
        assert ds[k] == v
    # The same members GNU tar lists (regular files), at the offsets tarfile reports.
    with tarfile.open(tar) as tf:
        regular = {m.name.removeprefix("./"): m.offset_data for m in tf.getmembers() if m.isreg()}
    assert {ds.key(i): ds.locate(i)[1] for i in range(len(ds))} == regular
    assert ds.verify()["problems"] == []
    dest = os.path.join(work, "un")
    assert ds.unpack(dest) == len(files)
    for k, v in files.items():
        assert h.read(dest, k.encode()) == v
    assert os.stat(os.path.join(dest, "top.txt")).st_mtime == os.stat(os.path.join(src, "top.txt")).st_mtime // 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is needed")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_links_and_sparse_files_are_skipped_with_a_reason(work, fmt):
    src = os.path.join(work, "src")
    os.makedirs(src)
    with open(os.path.join(src, "data"), "wb") as f:
        f.write(b"payload")
    os.link(os.path.join(src, "data"), os.path.join(src, "hard"))
    os.symlink("data", os.path.join(src, "sym"))
    with open(os.path.join(src, "sparse"), "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"x" * 4096)
    tar = os.path.join(work, "t.tar")
    _gnu_tar([f"--format={fmt}", "--sparse", "-cf", tar, "data", "hard", "sym", "sparse"], src)
    s = packds.index_tars([tar], os.path.join(work, "t.pds"))
    reasons = {path.rsplit(":", 1)[1]: why for path, why in s["skipped"]}
    assert "hard link" in reasons["hard"] and "symlink" in reasons["sym"], reasons
    with tarfile.open(tar) as tf:
        sparse_in_tar = any(m.issparse() for m in tf.getmembers()) or any("GNU.sparse" in k for m in tf.getmembers() for k in m.pax_headers)
    if sparse_in_tar:
        assert "sparse file" in reasons["sparse"], reasons  # pax: reported under its real name
        assert s["samples"] == 1
    ds = packds.open(os.path.join(work, "t.pds"))
    assert ds["data"] == b"payload" and "sym" not in ds and "hard" not in ds
    assert [tuple(x.values()) for x in ds.manifest["skipped"]] == [tuple(x) for x in s["skipped"]]


def _member(name: bytes, data: bytes, typ: bytes = b"0") -> bytes:
    t = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
    t.size = len(data)
    t.type = typ
    hdr = t.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    return hdr + data + b"\0" * (-len(data) % 512)


def test_unsafe_names_are_skipped_and_listed(work):
    tar = os.path.join(work, "t.tar")
    with open(tar, "wb") as f:
        for n in [b"/etc/passwd", b"../escape", b"a/../../b", b"ok/file"]:
            f.write(_member(n, b"evil " + n))
        f.write(b"\0" * 1024)
    r = h.cli("index", tar, "-o", os.path.join(work, "t.pds"))
    assert r.returncode == 0, h.show(r)
    err = r.stderr.decode()
    for n in ["/etc/passwd", "../escape", "a/../../b"]:
        assert f"packds: skipped {tar}:{n}: unsafe name" in err, err
    assert "3 skipped (3 unsafe name)" in err, err
    ds = packds.open(os.path.join(work, "t.pds"))
    assert list(ds.keys()) == ["ok/file"]


def test_unpack_refuses_an_escaping_key_in_an_indexed_dataset(work):
    """A hostile index (a key rewritten to ../xx after indexing) is refused by unpack."""
    tar = os.path.join(work, "t.tar")
    with open(tar, "wb") as f:
        f.write(_member(b"aaaa", b"1") + _member(b"bbbb", b"2") + b"\0" * 1024)
    out = os.path.join(work, "t.pds")
    packds.index_tars(tar, out)
    p = os.path.join(out, "index.pdsi")
    ix = bytearray(open(p, "rb").read())
    at = ix.index(b"aaaabbbb")
    ix[at:at + 4] = b"../x"
    open(p, "wb").write(bytes(ix))
    ds = packds.open(out)
    assert ds.key(0) == "../x"
    dest = os.path.join(work, "un")
    with pytest.raises(UnsafePathError):
        ds.unpack(dest)
    assert not os.path.exists(os.path.join(work, "x"))
    r = h.cli("unpack", out, os.path.join(work, "un2"))
    h.assert_cli_error(r, "'..' path component")
    assert ds.verify()["problems"]  # the body CRC no longer matches


def test_duplicate_keys_across_and_within_tars_are_refused(work):
    a, b = os.path.join(work, "a.tar"), os.path.join(work, "b.tar")
    with open(a, "wb") as f:
        f.write(_member(b"x/1", b"A") + _member(b"x/2", b"B") + b"\0" * 1024)
    with open(b, "wb") as f:
        f.write(_member(b"y", b"C") + _member(b"x/2", b"D") + b"\0" * 1024)
    out = os.path.join(work, "o.pds")
    with pytest.raises(FormatError) as e:
        packds.index_tars([a, b], out)
    msg = str(e.value)
    assert "duplicate key 'x/2'" in msg.replace('"', "'") and "offset 1024 of " + a in msg and "offset 1024 of " + b in msg, msg
    assert not os.path.exists(out)
    with open(a, "ab") as f:
        pass
    with open(b, "wb") as f:
        f.write(_member(b"k", b"1") + _member(b"k", b"2") + b"\0" * 1024)
    r = h.cli("index", b, "-o", out)
    h.assert_cli_error(r, "duplicate key", "offset 0", "offset 1024")
    assert not os.path.exists(out)


def test_stage_copies_real_files_and_the_copy_verifies(work, wds_shards):
    tars, _ = wds_shards
    out = os.path.join(work, "ds.pds")
    packds.index_tars(tars, out, group_by_basename=True)
    staged = packds.stage(out, to=os.path.join(work, "local"), policy="local")
    assert not any(os.path.islink(os.path.join(staged, n)) for n in os.listdir(staged))
    ds = packds.open(staged)
    assert ds.verify()["problems"] == [] and len(packds.wds.GroupedDataset(ds)) == 60
    r = h.cli("verify", staged)
    assert r.returncode == 0, h.show(r)


def test_output_rules_force_links_and_atomicity(work, wds_shards):
    tars, _ = wds_shards
    out = os.path.join(work, "o.pds")
    packds.index_tars(tars[:1], out)
    with pytest.raises(UsageError, match="already exists"):
        packds.index_tars(tars, out)
    s = packds.index_tars(tars, out, force=True)
    assert s["samples"] == 180 and len(packds.open(out)) == 180
    # A failed run over an existing dataset leaves nothing packds.open accepts.
    bad = os.path.join(work, "bad.tar")
    with open(bad, "wb") as f:
        f.write(b"\x01" * 2048)
    with pytest.raises(FormatError, match="bad header checksum at offset 0"):
        packds.index_tars([tars[0], bad], out, force=True)
    with pytest.raises(FormatError):
        packds.open(out)
    # A directory with other files is never cleared.
    other = os.path.join(work, "other")
    os.makedirs(other)
    open(os.path.join(other, "precious"), "w").close()
    with pytest.raises(UsageError, match="did not write"):
        packds.index_tars(tars, other, force=True)
    assert os.listdir(other) == ["precious"]
    # Hard links: the dataset survives the tars being moved away.
    hl, sl = os.path.join(work, "hard.pds"), os.path.join(work, "sym.pds")
    packds.index_tars(tars, hl, link="hard")
    packds.index_tars(tars, sl)
    moved = os.path.join(work, "moved")
    os.rename(os.path.dirname(tars[0]), moved)
    assert packds.open(hl).verify()["problems"] == []
    with pytest.raises(FormatError, match="shard is missing"):
        packds.open(sl)  # its symlinks now dangle


def test_group_by_basename_refuses_interleaved_samples(work):
    tar = os.path.join(work, "t.tar")
    with open(tar, "wb") as f:  # sample "a.b/c" sorts between members of sample "a"
        f.write(_member(b"a.a", b"1") + _member(b"a.b/c.jpg", b"2") + _member(b"a.c", b"3") + b"\0" * 1024)
    with pytest.raises(UsageError, match="not contiguous"):
        packds.index_tars(tar, os.path.join(work, "g.pds"), group_by_basename=True)
    packds.index_tars(tar, os.path.join(work, "p.pds"))  # per member it is fine
    with pytest.raises(FormatError, match="not contiguous"):
        packds.wds.GroupedDataset(os.path.join(work, "p.pds"))


def test_unordered_index_format_on_disk(work, wds_shards):
    tars, _ = wds_shards
    out = os.path.join(work, "o.pds")
    packds.index_tars(tars, out)
    ix = open(os.path.join(out, "index.pdsi"), "rb").read()
    version, flags = struct.unpack_from("<I", ix, 8)[0], struct.unpack_from("<Q", ix, 88)[0]
    assert (version, flags) == (2, 2) and ix[96:124] == b"\0" * 28
    # Samples of different shards interleave in key order; data offsets are not monotonic.
    ds = packds.open(out)
    assert packds.open(out).manifest["format_version"] == 2
    assert len({ds.locate(i)[0] for i in range(len(ds))}) == 3
    # Two entries made to overlap pass their access checks but fail verify.
    b = bytearray(ix)
    e0 = h.entry(b, 0)
    h.set_entry(b, 1, offset=e0[0], shard=e0[3])
    h.fix_crcs(b)
    open(os.path.join(out, "index.pdsi"), "wb").write(bytes(b))
    ds = packds.open(out)
    ds[1]
    assert any("overlaps another sample" in p for p in ds.verify()["problems"])


def test_readme_snippet(work):
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    code = re.search(r"<!-- snippet: wds-grouped -->\n```python\n(.*?)```", readme, re.S).group(1)
    tar = os.path.join(work, "shard-000000.tar")
    samples = [{"__key__": f"train/{i:06d}", "jpg": os.urandom(50), "cls": b"3"} for i in range(200)]
    with webdataset.TarWriter(tar) as w:
        for s in samples:
            w.write(s)
    out = os.path.join(work, "wds.pds")
    r = h.cli("index", tar, "-o", out, "--group-by-basename")
    assert r.returncode == 0, h.show(r)
    ns: dict = {}
    exec(code.replace("/project/def-me/wds.pds", out), ns)  # noqa: S102 - the README's code
    assert ns["sample"] == samples[123] and len(ns["g"]) == 200
