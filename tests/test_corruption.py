"""Acceptance 4: damaged, incomplete or foreign datasets are refused with FormatError (or
ChecksumError for damaged data) naming the file; nothing crashes the interpreter."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

import _helpers as h
import packds
from packds import ChecksumError, FormatError, PackdsError


def idx_path(ds_dir) -> str:
    return os.path.join(ds_dir, "index.pdsi")


def read_bytes(p) -> bytearray:
    with open(p, "rb") as f:
        return bytearray(f.read())


def write_bytes(p, data) -> None:
    with open(p, "wb") as f:
        f.write(data)


def open_fails(ds_dir, exc=FormatError, names=None) -> BaseException:
    """packds.open(ds_dir) raises ``exc`` whose message names ``names`` (a path)."""
    with pytest.raises(exc) as ei:
        packds.open(ds_dir)
    e = ei.value
    assert isinstance(e, PackdsError) and isinstance(e, ValueError)
    if names is not None:
        assert os.fspath(names) in str(e), f"message does not name {names}: {e}"
    assert getattr(e, "hint", None), f"no hint on {e!r}"
    return e


def load_manifest(ds_dir) -> dict:
    with open(os.path.join(ds_dir, "manifest.json"), "rb") as f:
        return json.load(f)


def save_manifest(ds_dir, m) -> None:
    with open(os.path.join(ds_dir, "manifest.json"), "w") as f:
        json.dump(m, f)


# ---------------------------------------------------------------------------------- the index


@pytest.mark.parametrize("cut", ["0", "1", "8", "64", "127", "128", "129", "entries-mid", "keys-mid", "shards-mid", "minus-1"])
def test_truncated_index(small_ds, cut):
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    at = {
        "entries-mid": L.entries_off + 32 * (L.n // 2) + 5,
        "keys-mid": L.keys_off + L.keys_len // 2,
        "shards-mid": L.shards_off + 40,
        "minus-1": len(ix) - 1,
    }.get(cut)
    at = int(cut) if at is None else at
    write_bytes(p, ix[:at])
    open_fails(small_ds, names=p if at < len(ix) else small_ds)


def test_index_every_truncation_is_refused(small_ds):
    """Exhaustively over the header and around every section boundary."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    cuts = set(range(0, 140)) | set(range(len(ix) - 70, len(ix)))
    for b in (L.keys_off, L.shards_off, L.names_off):
        cuts |= set(range(max(0, b - 3), min(len(ix), b + 3)))
    for c in sorted(cuts):
        write_bytes(p, ix[:c])
        with pytest.raises(FormatError):
            packds.open(small_ds)
    # And an index longer than it should be (garbage appended) is refused too.
    write_bytes(p, ix + b"\0" * 8)
    with pytest.raises(FormatError):
        packds.open(small_ds)


def test_flipped_byte_in_index_header(small_ds):
    p = idx_path(small_ds)
    ix = read_bytes(p)
    for pos in range(128):
        for bit in (0x01, 0x80):
            m = bytearray(ix)
            m[pos] ^= bit
            write_bytes(p, m)
            with pytest.raises(FormatError) as ei:
                packds.open(small_ds)
            assert p in str(ei.value), (pos, str(ei.value))
    write_bytes(p, ix)
    assert len(packds.open(small_ds)) > 0


def test_wrong_index_version_says_upgrade(small_ds):
    p = idx_path(small_ds)
    ix = read_bytes(p)
    struct.pack_into("<I", ix, 8, 2)
    h.fix_crcs(ix)
    write_bytes(p, ix)
    e = open_fails(small_ds, names=p)
    assert "version" in str(e) and "upgrade" in str(e)


def test_flipped_byte_in_index_body_caught_by_verify(small_ds):
    """A flip in the entries/keys passes the O(shards) open but not verify()."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    rng = random.Random(3)
    for pos in [L.entries_off + 3, L.entries_off + 32 * 5 + 30, L.keys_off + 2] + [rng.randrange(L.entries_off, L.keys_off + L.keys_len) for _ in range(5)]:
        m = bytearray(ix)
        m[pos] ^= 0x04
        write_bytes(p, m)
        try:
            ds = packds.open(small_ds)
        except FormatError:
            continue
        r = ds.verify()
        assert r["problems"], f"flip at {pos} went unnoticed by verify"
        assert any("index.pdsi" in x for x in r["problems"]), r["problems"]
        c = h.cli("verify", small_ds)
        assert c.returncode == 1, h.show(c)
        assert b"packds: error:" in c.stderr and b"hint:" in c.stderr


def test_flipped_byte_in_shard_table(small_ds):
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    for pos in range(L.shards_off, len(ix)):
        m = bytearray(ix)
        m[pos] ^= 0x20
        write_bytes(p, m)
        with pytest.raises(FormatError):
            packds.open(small_ds)


def _first_nonempty(ix: bytes) -> int:
    L = h.layout(ix)
    return next(i for i in range(L.n) if h.entry(ix, i)[1] > 0)


@pytest.mark.parametrize("how", ["offset-past-end", "size-past-end", "overflow", "shard-out-of-range", "overlap", "key-offset"])
def test_hostile_entry_with_valid_crcs(small_ds, small_tree, how):
    """An entry pointing outside its shard, with every CRC recomputed so open() accepts the
    index: each access to it raises FormatError naming the index; verify reports it."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    i = min(L.n - 2, 40)
    off, size, koff, shard, crc = h.entry(ix, i)
    shard_size = struct.unpack_from("<Q", ix, L.shards_off + 32 * shard)[0]
    if how == "offset-past-end":
        h.set_entry(ix, i, offset=shard_size + 512)
    elif how == "size-past-end":
        h.set_entry(ix, i, size=shard_size)
    elif how == "overflow":
        h.set_entry(ix, i, offset=2**64 - 16, size=64)
    elif how == "shard-out-of-range":
        h.set_entry(ix, i, shard=L.nshards + 7)
    elif how == "overlap":
        poff, psize = h.entry(ix, i - 1)[:2]
        h.set_entry(ix, i, offset=poff, size=max(size, 1), shard=h.entry(ix, i - 1)[3])
    elif how == "key-offset":
        h.set_entry(ix, i, key_off=L.keys_len + 1000)
    h.fix_crcs(ix)
    write_bytes(p, ix)
    ds = packds.open(small_ds)  # O(shards): entries are checked when used
    assert len(ds) == L.n
    accesses = [lambda: ds[i], lambda: ds.get_many([0, i]), lambda: ds.get_checked(i), lambda: ds.view(i)]
    if how == "key-offset":
        accesses = [lambda: ds.key(i), lambda: ds.key_bytes(i)]
    else:
        accesses += [lambda: ds.size(i), lambda: ds.locate(i)]
    for k, f in enumerate(accesses):
        with pytest.raises(FormatError) as ei:
            f()
        assert "index.pdsi" in str(ei.value), (k, str(ei.value))
    # Other samples stay readable.
    assert ds.get_checked(0) == small_tree.read(small_tree.keys[0])
    assert ds.get_checked(L.n - 1) == small_tree.read(small_tree.keys[-1])
    r = ds.verify()
    assert r["problems"], "verify missed a hostile entry"
    c = h.cli("verify", small_ds)
    assert c.returncode == 1, h.show(c)
    # unpack refuses too (raises, writes no partial garbage past the bad entry silently).
    with pytest.raises((FormatError, PackdsError)):
        ds.unpack(os.path.join(os.path.dirname(small_ds), "unpacked"))


def test_patched_entry_without_crc_is_caught_by_verify(small_ds):
    p = idx_path(small_ds)
    ix = read_bytes(p)
    i = _first_nonempty(ix)
    h.set_entry(ix, i, offset=h.entry(ix, i)[0] + 512)  # points at the next member's bytes
    write_bytes(p, ix)
    try:
        ds = packds.open(small_ds)
    except FormatError:
        return
    r = ds.verify()
    assert any("index.pdsi" in x for x in r["problems"]), r
    assert h.cli("verify", small_ds).returncode == 1


# --------------------------------------------------------------------------------- the shards


@pytest.mark.parametrize("keep", [0, 1, 512, -1, -1024])
def test_truncated_shard(small_ds, keep):
    p = os.path.join(small_ds, "shard-00001.tar")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(keep if keep >= 0 else size + keep)
    open_fails(small_ds, names=p)


def test_extended_shard(small_ds):
    p = os.path.join(small_ds, "shard-00002.tar")
    with open(p, "ab") as f:
        f.write(b"\0" * 512)
    open_fails(small_ds, names=p)


def test_missing_shard(small_ds):
    p = os.path.join(small_ds, "shard-00003.tar")
    os.remove(p)
    e = open_fails(small_ds, names=p)
    assert "missing" in str(e)


def test_swapped_shards(small_ds):
    a, c = (os.path.join(small_ds, f"shard-0000{i}.tar") for i in (0, 1))
    os.rename(a, a + ".x")
    os.rename(c, a)
    os.rename(a + ".x", c)
    try:
        ds = packds.open(small_ds)
    except FormatError:
        return  # sizes differ: refused at open
    # Same sizes: open cannot tell (O(shards)); verify must.
    assert ds.verify()["problems"]


def test_flipped_byte_in_sample_data(small_ds, small_tree):
    ds0 = packds.open(small_ds)
    i = next(j for j in range(len(ds0)) if ds0.size(j) > 10 and os.path.basename(os.fspath(ds0.locate(j)[0])) == "shard-00001.tar")
    shard, off, size = ds0.locate(i)
    key = ds0.key(i)
    del ds0
    with open(shard, "r+b") as f:
        f.seek(off + size // 2)
        c = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([c[0] ^ 0xFF]))
    ds = packds.open(small_ds)  # same size: open cannot notice
    assert ds[i] != small_tree.read(small_tree.keys[i])
    with pytest.raises(ChecksumError) as ei:
        ds.get_checked(i)
    e = ei.value
    assert isinstance(e, FormatError)
    assert e.key == key, (e.key, key)
    assert os.fspath(e.shard) == os.fspath(shard)
    assert os.path.basename(os.fspath(shard)) in str(e) and key in str(e)
    assert e.hint
    # Neighbours are fine.
    assert ds.get_checked(i - 1) == small_tree.read(small_tree.keys[i - 1])
    r = ds.verify()
    assert r["problems"], r
    assert any(key in x for x in r["problems"]), r["problems"]
    assert any("shard-00001.tar" in x for x in r["problems"]), r["problems"]
    c = h.cli("verify", small_ds)
    assert c.returncode == 1, h.show(c)
    text = c.stderr.decode()
    assert "packds: error:" in text and "hint:" in text and key in text, text
    # `packds get` checks the CRC.
    g = h.cli("get", small_ds, os.fsencode(key))
    h.assert_cli_error(g, "shard-00001.tar")
    assert g.stdout == b""
    # unpack checks CRCs as well.
    with pytest.raises(ChecksumError):
        ds.unpack(os.path.join(os.path.dirname(small_ds), "un"))


def test_flipped_byte_in_tar_header_caught_by_verify(small_ds):
    """Damage outside any sample's data (a tar header): samples check out, the shard's XXH3
    does not."""
    ds0 = packds.open(small_ds)
    shard, off, size = ds0.locate(5)
    del ds0
    with open(shard, "r+b") as f:
        f.seek(off - 512 + 300)  # inside the ustar header (uname field)
        c = f.read(1)
        f.seek(off - 512 + 300)
        f.write(bytes([c[0] ^ 0x41]))
    ds = packds.open(small_ds)
    r = ds.verify()
    assert len(r["problems"]) == 1 and os.path.basename(os.fspath(shard)) in r["problems"][0], r
    assert h.cli("verify", small_ds).returncode == 1


# ------------------------------------------------------------------------------ the manifest


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff\xfe garbage \x80", b"{", b"[]", b"null", b'"packds"', b"{}", b'{"format": "packds"}', "{\"format\": \"packds\", \"format_version\": 1}".encode()],
    ids=["empty", "binary-garbage", "truncated-json", "array", "null", "string", "empty-object", "format-only", "missing-fields"],
)
def test_bad_manifest(small_ds, content):
    p = os.path.join(small_ds, "manifest.json")
    write_bytes(p, content)
    open_fails(small_ds, names=p)


def test_truncated_manifest(small_ds):
    p = os.path.join(small_ds, "manifest.json")
    full = read_bytes(p)
    for cut in (1, len(full) // 3, len(full) // 2, len(full) - 3):
        write_bytes(p, full[:cut])
        open_fails(small_ds, names=p)


@pytest.mark.parametrize("field,value", [("format_version", 4), ("format_version", 0), ("format", "webdataset"), ("format_version", "1")])
def test_wrong_format_or_version_in_manifest(small_ds, field, value):
    m = load_manifest(small_ds)
    m[field] = value
    save_manifest(small_ds, m)
    e = open_fails(small_ds, names=os.path.join(small_ds, "manifest.json"))
    if field == "format_version" and value == 4:
        assert "upgrade" in str(e)


@pytest.mark.parametrize(
    "patch",
    ["samples+1", "samples-1", "index-size", "drop-shard", "extra-shard", "shard-size", "shard-hash", "shard-name", "swap-shard-records", "format-version"],
)
def test_manifest_disagrees_with_index(small_ds, patch):
    m = load_manifest(small_ds)
    sh = m["shards"]
    if patch == "format-version":  # a version-1 index under a manifest that claims version 2
        m["format_version"] = 2
    elif patch == "samples+1":
        m["samples"] += 1
    elif patch == "samples-1":
        m["samples"] -= 1
    elif patch == "index-size":
        m["index"]["size"] += 8
    elif patch == "drop-shard":
        sh.pop()
    elif patch == "extra-shard":
        sh.append(dict(sh[-1], file=f"shard-{len(sh):05d}.tar"))
    elif patch == "shard-size":
        sh[1]["size"] += 512
    elif patch == "shard-hash":
        sh[1]["xxh3_128"] = "0" * 32
    elif patch == "shard-name":
        sh[1]["file"] = "shard-99999.tar"
    elif patch == "swap-shard-records":
        sh[0], sh[1] = sh[1], sh[0]
    save_manifest(small_ds, m)
    open_fails(small_ds, names=small_ds)


def test_index_from_another_dataset(small_ds, small_tree, work):
    """index.pdsi replaced by the index of a different pack of the same tree (other shard size)."""
    other = os.path.join(work, "other.pds")
    h.pack(small_tree.root, other, shard_size=128 << 10)
    shutil.copyfile(os.path.join(other, "index.pdsi"), idx_path(small_ds))
    open_fails(small_ds, names=small_ds)


def test_manifest_of_a_different_pack_with_same_shape(small_ds, small_tree, work):
    """All shards packed from a tree that differs by one byte in one file: same sizes, same
    counts, different hashes; mixing its shard into our dataset is caught."""
    src2 = os.path.join(work, "src2")
    shutil.copytree(small_tree.root, src2)
    k = small_tree.keys[len(small_tree.keys) // 2]
    p = os.path.join(os.fsencode(src2), k)
    data = bytearray(h.read(src2, k))
    data[0] ^= 1
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    other = os.path.join(work, "other.pds")
    h.pack(src2, other, shard_size=64 << 10, threads=4)
    differing = [n for n in h.dataset_files(other) if h.read(other, n.encode()) != h.read(small_ds, n.encode())]
    shard = next(n for n in differing if n.endswith(".tar"))
    shutil.copyfile(os.path.join(other, shard), os.path.join(small_ds, shard))
    try:
        ds = packds.open(small_ds)
    except FormatError:
        return
    r = ds.verify()
    assert any(shard in x for x in r["problems"]), r


# ------------------------------------------------------------------- not a dataset at all


def test_directory_that_is_not_a_dataset(small_tree):
    open_fails(small_tree.root, names=small_tree.root)
    r = h.cli("info", small_tree.root)
    h.assert_cli_error(r, small_tree.root)


def test_empty_directory(work):
    open_fails(work, names=work)


def test_regular_file_is_not_a_dataset(small_ds):
    p = os.path.join(small_ds, "shard-00000.tar")
    open_fails(p, names=p)
    open_fails(os.path.join(small_ds, "manifest.json"))


def test_missing_path_is_an_oserror(work):
    p = os.path.join(work, "nope.pds")
    with pytest.raises(FileNotFoundError) as ei:
        packds.open(p)
    assert os.fsdecode(ei.value.filename) == p


def test_dataset_without_manifest(small_ds):
    """A complete pack whose manifest.json was removed (or never written) never opens."""
    os.remove(os.path.join(small_ds, "manifest.json"))
    open_fails(small_ds, names=small_ds)


@pytest.mark.faults
def test_interrupted_pack_does_not_open(small_tree, work):
    out = os.path.join(work, "cut.pds")
    r = h.cli("pack", small_tree.root, "-o", out, "--shard-size", "64K", "-q", env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode == -9, h.show(r)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    e = open_fails(out, names=out)
    assert "resume" in str(e) or "resume" in e.hint
    c = h.cli("info", out)
    h.assert_cli_error(c, out)


def test_index_missing(small_ds):
    os.remove(idx_path(small_ds))
    with pytest.raises((FormatError, FileNotFoundError)) as ei:
        packds.open(small_ds)
    assert "index.pdsi" in str(ei.value) or "index.pdsi" in os.fsdecode(getattr(ei.value, "filename", "") or "")


def test_index_is_a_directory_or_empty(small_ds):
    p = idx_path(small_ds)
    write_bytes(p, b"")
    open_fails(small_ds, names=p)
    os.remove(p)
    os.mkdir(p)
    with pytest.raises((FormatError, OSError)):
        packds.open(small_ds)


# ----------------------------------------------------------- nothing crashes the interpreter

_FUZZ_CHILD = textwrap.dedent(
    r"""
    import os, sys, packds
    from packds import PackdsError
    ok = (PackdsError, IndexError, KeyError)
    d = sys.argv[1]
    try:
        ds = packds.open(d)
    except ok:
        print("refused at open"); sys.exit(0)
    n = len(ds)
    def t(f):
        try:
            f()
        except ok:
            pass
    for i in list(range(min(n, 64))) + [n - 1, -1]:
        t(lambda: ds[i]); t(lambda: ds.key(i)); t(lambda: ds.key_bytes(i)); t(lambda: ds.size(i))
        t(lambda: ds.locate(i)); t(lambda: bytes(ds.view(i))); t(lambda: ds.get_checked(i))
    t(lambda: ds.get_many(list(range(min(n, 64)))))
    for k in (b"", b"c00/f00000.bin", b"\xff\xfe.bin", b"zzzz", b"top.txt"):
        t(lambda: ds.find_key(k)); t(lambda: ds[k])
    t(lambda: ds.glob("*"))
    t(lambda: ds.verify(threads=2))
    t(lambda: ds.unpack(sys.argv[2]))
    print("survived")
    """
)


def test_fuzzed_indexes_never_crash(small_ds_pristine, work):
    """Random byte damage to the index, with all CRCs recomputed (so it gets past the cheap
    checks into the entry-level code), then every read path, in a subprocess: it may raise
    packds errors, never die of a signal or an unexpected exception."""
    rng = random.Random(1234)
    base = h.read(small_ds_pristine, b"index.pdsi")
    L = h.layout(base)
    script = os.path.join(work, "child.py")
    with open(script, "w") as f:
        f.write(_FUZZ_CHILD)
    ds_dir = h.copy_dataset(small_ds_pristine, os.path.join(work, "fz.pds"))
    procs = []
    opened = 0
    for trial in range(24):
        ix = bytearray(base)
        # One region per trial: mostly the entries and keys, which open() does not read.
        region = rng.choices(["header", "entries", "keys", "table"], [2, 14, 5, 3])[0]
        lo, hi = {"header": (16, 80), "entries": (L.entries_off, L.keys_off), "keys": (L.keys_off, L.keys_off + L.keys_len), "table": (L.shards_off, len(ix))}[region]
        for _ in range(rng.choice([1, 1, 2, 5, 20])):
            ix[rng.randrange(lo, hi)] = rng.randrange(256)
        h.fix_crcs(ix)
        d = os.path.join(work, f"fz{trial}.pds")
        shutil.copytree(ds_dir, d, copy_function=os.link)
        os.remove(idx_path(d))
        write_bytes(idx_path(d), ix)
        procs.append((trial, d, subprocess.Popen([sys.executable, script, d, os.path.join(work, f"un{trial}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        if len(procs) >= 4 or trial == 23:
            for t, _dd, p in procs:
                out, err = p.communicate(timeout=120)
                r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
                h.assert_not_signalled(r)
                assert r.returncode == 0, f"trial {t}: {h.show(r)}"
                opened += b"survived" in r.stdout
            procs = []
    assert opened >= 12, f"only {opened} of 24 fuzzed indexes got past open(): the fuzz tests too little"


@pytest.mark.parametrize("damage", ["huge-counts", "zero-samples", "shard-size-zero", "names-bad"])
def test_nasty_index_in_subprocess(small_ds, work, damage):
    """Hand-made hostile headers and shard tables, CRCs fixed, opened in a child process."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    if damage == "huge-counts":
        struct.pack_into("<Q", ix, 16, 2**61)
        struct.pack_into("<Q", ix, 24, 2**40)
    elif damage == "zero-samples":
        struct.pack_into("<Q", ix, 16, 0)
    elif damage == "shard-size-zero":
        struct.pack_into("<Q", ix, L.shards_off, 0)
    elif damage == "names-bad":
        struct.pack_into("<II", ix, L.shards_off + 24, 2**31, 2**31)
    h.fix_crcs(ix)
    write_bytes(p, ix)
    script = os.path.join(work, "child.py")
    with open(script, "w") as f:
        f.write(_FUZZ_CHILD)
    r = subprocess.run([sys.executable, script, small_ds, os.path.join(work, "un")], capture_output=True, timeout=120)
    h.assert_not_signalled(r)
    assert r.returncode == 0, h.show(r)
    with pytest.raises(FormatError):
        packds.open(small_ds)


@pytest.mark.parametrize("evil", [b"../f00000.binx", b"/tmp/x00.binxx", b"c00/../../f0.b", b"c00/./f00000.b"])
def test_unsafe_key_in_index_is_refused_by_unpack(small_ds, work, evil):
    """A key rewritten to escape DEST (same length, CRCs fixed): unpack raises UnsafePathError
    and writes nothing outside DEST."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    keys = h.index_keys(ix)
    i = 5
    k = keys[i]
    assert len(k) == len(evil) == 14, (k, evil)
    start = L.keys_off + h.entry(ix, i)[2]
    ix[start : start + len(k)] = evil
    h.fix_crcs(ix)
    write_bytes(p, ix)
    ds = packds.open(small_ds)
    assert ds.key_bytes(i) == evil
    outer = os.path.join(work, "outer")
    dest = os.path.join(outer, "inner", "dest")
    os.makedirs(dest)
    with pytest.raises(packds.UnsafePathError) as ei:
        ds.unpack(dest)
    assert isinstance(ei.value, FormatError)
    assert h.walk_files(outer) == sorted(b"inner/dest/" + x for x in keys[:i]), "only the keys before the bad one, all inside DEST"
    assert not os.path.exists(b"/tmp/x00.binxx")
    c = h.cli("unpack", small_ds, os.path.join(work, "dest2"))
    assert c.returncode == 1 and c.stderr.startswith(b"packds: error: refusing to write"), h.show(c)
    assert evil in c.stderr, h.show(c)


def test_unsafe_key_cli_error_has_a_hint(small_ds, work):
    """README: errors print one line naming the path and a `hint:` line. The UnsafePathError
    from `packds unpack` must follow that too."""
    p = idx_path(small_ds)
    ix = read_bytes(p)
    L = h.layout(ix)
    start = L.keys_off + h.entry(ix, 5)[2]
    ix[start : start + 3] = b"../"
    h.fix_crcs(ix)
    write_bytes(p, ix)
    c = h.cli("unpack", small_ds, os.path.join(work, "dest"))
    h.assert_cli_error(c, "refusing to write")
    with pytest.raises(packds.UnsafePathError) as ei:
        packds.open(small_ds).unpack(os.path.join(work, "dest3"))
    assert ei.value.hint, "UnsafePathError carries no hint"
