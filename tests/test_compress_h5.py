"""HDF5 shards and per-sample zstd compression: round trips through packds and through the
standard tools (tarfile / GNU tar + zstd / h5py + zstandard), the README snippets, h5dump,
bounded decompression, and corruption caught by verify and open(verify=True)."""

from __future__ import annotations

import os
import re
import resource
import shutil
import struct
import subprocess
import sys

import pytest
import zstandard

import _helpers as h
import packds
from _formats import h5_samples, shard_samples, tar_samples
from packds import ChecksumError, FormatError, UsageError

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
NEED_TOOLS = os.environ.get("PACKDS_REQUIRE_TOOLS") == "1"

# (name, pack options)
MODES = [
    ("none", dict(compress="none")),
    ("zstd", dict(compress="zstd")),
    ("zstd+dict", dict(compress="zstd", zstd_dict=8192)),
    ("auto", dict(compress="auto")),
]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if NEED_TOOLS:
            pytest.fail(f"{name} is not installed (PACKDS_REQUIRE_TOOLS=1)")
        pytest.skip(f"{name} is not installed")
    return path


def _text(rng, n: int) -> bytes:
    words = [b"label", b"caption", b"a", b"photo", b"of", b"the", b"small", b"dog", b"cat", b"on", b"grass", b"{", b"}", b'"id":']
    return b" ".join(rng.choice(words) for _ in range(n))[:n]


@pytest.fixture(scope="module")
def mixed_tree(fast_base):
    """Compressible text (many small similar files), random bytes, empty files, JPEG-looking
    files that would compress, keys ending in .zst, and two files larger than the in-memory
    limit (one compressible, one not) that the writer streams."""
    import random

    rng = random.Random(4)
    root = os.path.join(fast_base, "mixed-src")
    want = {}

    def add(key: str, data: bytes) -> None:
        h.write(root, key, data)
        want[key.encode()] = data

    for i in range(400):
        add(f"text/{i % 9}/t{i:04}.json", b'{"id": %d, ' % i + _text(rng, rng.randrange(50, 3000)) + b"}")
    for i in range(120):
        add(f"rand/r{i:04}.bin", rng.randbytes(rng.randrange(1, 9000)))
    for i in range(25):
        add(f"empty/e{i:02}", b"")
    for i in range(30):
        add(f"img/i{i:03}.jpg", b"\xff\xd8\xff\xe0" + bytes(2000 + i))  # JPEG magic, then zeros
    add("odd/already.zst", zstandard.ZstdCompressor().compress(_text(rng, 5000)))
    add("odd/text.zst", _text(rng, 4000))
    add("odd/one-byte", b"x")
    add("big/text.log", _text(rng, 12 << 20))
    add("big/noise.bin", rng.randbytes(9 << 20))
    return root, dict(sorted(want.items()))


@pytest.fixture(scope="module")
def packed(mixed_tree, fast_base):
    """Packs the mixed tree once per (format, mode)."""
    root, _ = mixed_tree
    cache = {}

    def get(fmt: str, mode: str) -> str:
        if (fmt, mode) not in cache:
            out = os.path.join(fast_base, f"mixed-{fmt}-{mode}.pds")
            packds.pack(root, out, format=fmt, shard_size=4 << 20, threads=4, **dict(MODES)[mode])
            cache[fmt, mode] = out
        return cache[fmt, mode]

    return get


@pytest.mark.parametrize("mode", [m for m, _ in MODES])
@pytest.mark.parametrize("fmt", ["tar", "h5"])
def test_round_trip(packed, mixed_tree, fmt, mode, work):
    root, want = mixed_tree
    out = packed(fmt, mode)
    ds = packds.open(out)
    assert [ds.key_bytes(i) for i in range(len(ds))] == list(want)
    codecs = [ds._codec(i) for i in range(len(ds))]
    for i, (key, data) in enumerate(want.items()):
        assert ds[i] == data, key
        assert ds.size(i) == len(data)
        assert bytes(ds.view(i)) == data
        stored = ds.raw(i)
        assert len(stored) == ds.stored_size(i)
        if codecs[i]:
            assert zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(ds.zstd_dict()) if codecs[i] == 2 else None).decompress(stored) == data
        else:
            assert stored == data
    assert ds.get_many(list(range(len(ds)))) == list(want.values())
    r = ds.verify(deep=True)
    assert r["problems"] == [] and r["decoded"] == sum(1 for c in codecs if c)
    # Standard tools read the same samples.
    assert shard_samples(out) == list(want.items())
    # unpack restores the tree.
    dest = os.path.join(work, "unpacked")
    assert ds.unpack(dest) == len(want)
    assert subprocess.run(["diff", "-r", root, dest]).returncode == 0

    by_key = dict(zip(want, codecs))
    m = ds.manifest
    assert m["shard_format"] == fmt
    assert all(s["file"].endswith("." + fmt) for s in m["shards"])
    assert m["total_bytes"] == sum(len(d) for d in want.values())
    if mode == "none":
        assert ds.format_version == 1 and m["format_version"] == 1 and "compression" not in m
        assert not any(codecs)
        return
    assert ds.format_version == 2 and m["format_version"] == 2
    comp = m["compression"]
    stored_total = sum(ds.stored_size(i) for i in range(len(ds)))
    assert comp["stored_bytes"] == stored_total < m["total_bytes"]
    # Random bytes and empty files are stored raw; text is compressed; big files follow suit.
    assert all(by_key[k] == 0 for k in want if k.startswith((b"rand/", b"empty/")) or k == b"big/noise.bin")
    assert all(by_key[k] != 0 for k, d in want.items() if k.startswith(b"text/") and len(d) >= 500 or k == b"big/text.log")
    if fmt == "tar":  # a key ending in .zst is always compressed in tar shards (member naming)
        assert by_key[b"odd/already.zst"] != 0
    jpeg = [by_key[k] for k in want if k.startswith(b"img/")]
    if mode == "auto":
        assert not any(jpeg), "auto must not try JPEG-looking samples"
        assert comp["mode"] == "auto:3"
    else:
        assert all(jpeg), "zstd tries everything: these JPEG-looking files are mostly zeros"
    if mode == "zstd+dict":
        assert comp["zstd_dict"]["size"] == len(ds.zstd_dict()) > 0
        assert 2 in codecs
    else:
        assert ds.zstd_dict() is None and comp["zstd_dict"] is None


def test_dictionary_shrinks_small_similar_files(packed):
    plain, dicted = packds.open(packed("tar", "zstd")), packds.open(packed("tar", "zstd+dict"))
    text = [i for i in range(len(plain)) if plain.key(i).startswith("text/")]
    a = sum(plain.stored_size(i) for i in text)
    b = sum(dicted.stored_size(i) for i in text)
    assert b < 0.8 * a, (a, b)


def test_gnu_tar_and_zstd_restore_the_tree_as_the_readme_says(packed, mixed_tree, work):
    tool("tar"), tool("zstd")
    root, _ = mixed_tree
    ds_dir = packed("tar", "zstd+dict")
    # The README's commands, with DATASET filled in and the dictionary flag added.
    readme = open(README, encoding="utf-8").read()
    block = re.search(r"```bash\n(mkdir out && for s in DATASET.*?)```", readme, re.S).group(1)
    script = block.replace("DATASET", ds_dir).replace("zstd -d -q --rm", "zstd -d -q --rm -D ../dict.zstd")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, check=True, env={**os.environ, "PATH": os.environ["PATH"]})
    assert subprocess.run(["diff", "-r", root, os.path.join(work, "out")]).returncode == 0


def _snippet(name: str) -> str:
    readme = open(README, encoding="utf-8").read()
    return re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.parametrize("mode", ["none", "zstd+dict"])
def test_readme_h5py_snippets(mixed_tree, work, mode):
    root, want = mixed_tree
    packds.pack(root, os.path.join(work, "train.pds"), format="h5", **dict(MODES)[mode])
    ds = packds.open(os.path.join(work, "train.pds"))
    plain = _snippet("h5py-plain")
    assert len(plain.strip().splitlines()) == 5, "the README promises five lines"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        ns: dict = {}
        exec(plain, ns)  # noqa: S102 - the README's code, as a user would paste it
        if mode == "none":
            assert ns["sample"] == ds[5]
        else:
            exec(_snippet("h5py-zstd"), ns)  # noqa: S102
            assert ns["sample"] == ds[5]
        # The snippet's k is the row in shard 0; shard 0 starts at sample 0.
        assert ds.key_bytes(5) == list(want)[5]
    finally:
        os.chdir(cwd)


def test_h5dump_lists_the_layout(packed):
    h5dump = tool("h5dump")
    ds_dir = packed("h5", "zstd+dict")
    out = subprocess.run([h5dump, "-H", os.path.join(ds_dir, "shard-00000.h5")], capture_output=True, text=True, check=True).stdout
    for name in ("data", "offset", "size", "raw_size", "codec", "crc32c", "key", "zstd_dict"):
        assert f'DATASET "{name}"' in out, name
    for attr in ("packds_format", "packds_format_version", "compression", "samples"):
        assert f'ATTRIBUTE "{attr}"' in out, attr
    assert "H5T_STD_U8LE" in out and "H5T_STD_U64LE" in out


def test_h5_data_is_contiguous_at_the_indexed_offset(packed):
    import h5py

    ds = packds.open(packed("h5", "zstd"))
    path, off, size = ds.locate(0)
    with h5py.File(path, "r") as f:
        assert f["data"].chunks is None, "contiguous layout"
        assert f["data"].id.get_offset() == off - int(f["offset"][0])
        assert f.attrs["packds_format"] == "packds-h5"


def _first(ds, pred):
    return next(i for i in range(len(ds)) if pred(i))


@pytest.mark.parametrize("fmt", ["tar", "h5"])
@pytest.mark.parametrize("which", ["compressed", "raw"])
def test_flipped_byte_is_caught(packed, work, fmt, which):
    ds_dir = h.copy_dataset(packed(fmt, "zstd"), os.path.join(work, "c.pds"))
    ds = packds.open(ds_dir)
    i = _first(ds, (lambda j, ds=ds: ds._codec(j) != 0 and ds.stored_size(j) > 100) if which == "compressed" else (lambda j, ds=ds: ds._codec(j) == 0 and ds.size(j) > 100))
    key = ds.key(i)
    path, off, size = ds.locate(i)
    del ds
    with open(path, "r+b") as f:
        f.seek(off + size // 2)
        c = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([c[0] ^ 0x40]))
    r = packds.open(ds_dir).verify()
    assert r["problems"] and any(os.path.basename(path) in p for p in r["problems"])
    assert h.cli("verify", ds_dir).returncode == 1
    with pytest.raises(ChecksumError) as ei:
        packds.open(ds_dir, verify=True)[i]
    assert ei.value.key == key
    with pytest.raises(ChecksumError):
        packds.open(ds_dir, verify=True).get_many([i])
    # Without verify=True a damaged frame is an error or wrong bytes, never a crash.
    try:
        packds.open(ds_dir)[i]
    except FormatError:
        pass


def test_lying_frame_raises_format_error_without_allocating(packed, work):
    ds_dir = h.copy_dataset(packed("tar", "zstd"), os.path.join(work, "lie.pds"))
    ds = packds.open(ds_dir)
    i = _first(ds, lambda j, ds=ds: ds._codec(j) == 1 and ds.stored_size(j) >= 20)
    path, off, size = ds.locate(i)
    del ds
    # A zstd frame header claiming 1 TiB of content (single-segment, 8-byte size field).
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(header)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="claims 1099511627776 bytes"):
        packds.open(ds_dir)[i]
    with pytest.raises(ChecksumError):
        packds.open(ds_dir, verify=True)[i]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_index_claiming_a_huge_original_size_is_refused(packed, work):
    ds_dir = h.copy_dataset(packed("tar", "zstd"), os.path.join(work, "huge.pds"))
    ds = packds.open(ds_dir)
    i = _first(ds, lambda j: ds._codec(j) == 1)
    del ds
    ix_path = os.path.join(ds_dir, "index.pdsi")
    ix = bytearray(open(ix_path, "rb").read())
    codec_off = struct.unpack_from("<Q", ix, 96)[0]
    struct.pack_into("<Q", ix, codec_off + 8 * i, (1 << 55) | (1 << 56))  # 32 PiB, zstd
    open(ix_path, "wb").write(ix)
    ds = packds.open(ds_dir)  # the codec section is checked lazily: open stays O(shards)
    with pytest.raises(FormatError, match="impossible codec or original size"):
        ds[i]
    with pytest.raises(FormatError):
        ds.size(i)
    assert ds.verify()["problems"]


def test_get_many_decodes_a_large_batch_in_parallel(packed, mixed_tree):
    _, want = mixed_tree
    ds = packds.open(packed("h5", "zstd+dict"))
    idx = [i for i in range(len(ds)) if ds._codec(i)][::-1]
    vals = list(want.values())
    assert ds.get_many(idx) == [vals[i] for i in idx]


@pytest.mark.faults
@pytest.mark.parametrize("fmt", ["tar", "h5"])
def test_deterministic_and_resumable(mixed_tree, work, fmt):
    root, _ = mixed_tree
    opts = dict(format=fmt, compress="zstd", zstd_dict=4096, shard_size=2 << 20)
    a = os.path.join(work, "a.pds")
    packds.pack(root, a, threads=2, **opts)
    b = os.path.join(work, "b.pds")
    packds.pack(root, b, threads=7, **opts)
    h.assert_same_dataset_bytes(a, b)
    # Killed after two shards, then resumed: byte-identical again.
    c = os.path.join(work, "c.pds")
    args = ["pack", root, "-o", c, "--format", fmt, "--compress", "zstd", "--zstd-dict", "4096", "--shard-size", str(2 << 20), "-q"]
    r = h.cli(*args, env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode != 0
    with pytest.raises(FormatError):
        packds.open(c)
    # Resuming with other options is refused, naming the ones used.
    r = h.cli(*[x if x != "zstd" else "auto" for x in args], "--resume")
    h.assert_cli_error(r, "--compress zstd:3", "--zstd-dict 4096")
    r = h.cli(*args, "--resume")
    assert r.returncode == 0, h.show(r)
    h.assert_same_dataset_bytes(a, c)


def test_usage_errors(mixed_tree, work):
    root, _ = mixed_tree
    out = os.path.join(work, "x.pds")
    with pytest.raises(UsageError, match="needs compression"):
        packds.pack(root, out, zstd_dict=True)
    with pytest.raises(UsageError, match="not understood"):
        packds.pack(root, out, compress="gzip")
    with pytest.raises(UsageError, match="not known"):
        packds.pack(root, out, format="zip")
    assert not os.path.exists(out)
    tiny = os.path.join(work, "tiny")
    h.write(tiny, "a", b"abc")
    with pytest.raises(UsageError, match="too little compressible input"):
        packds.pack(tiny, out, compress="zstd", zstd_dict=True)
    r = h.cli("pack", root, "-o", out, "--compress", "zstd:99")
    h.assert_cli_error(r, "zstd:99", exit_code=1)


def test_info_shows_sizes_and_ratio(packed, work):
    r = h.cli("info", packed("tar", "zstd+dict"), "--save-dict", os.path.join(work, "d"))
    assert r.returncode == 0, h.show(r)
    out = r.stdout.decode()
    assert re.search(r"input: +[\d,]+ bytes", out) and re.search(r"stored: +[\d,]+ bytes .*ratio \d+\.\d\dx \[zstd:3\]", out), out
    assert open(os.path.join(work, "d"), "rb").read() == packds.open(packed("tar", "zstd+dict")).zstd_dict()
    r = h.cli("verify", "--deep", packed("h5", "auto"))
    assert r.returncode == 0 and b"compressed samples decoded and checked" in r.stderr, h.show(r)
    r = h.cli("info", packed("tar", "none"), "--save-dict", os.path.join(work, "d2"))
    h.assert_cli_error(r, "no zstd dictionary")


def test_h5_standard_reader_sees_every_sample(packed, mixed_tree):
    """h5py alone (no packds) reads every sample of every shard; tar likewise with tarfile."""
    _, want = mixed_tree
    assert h5_samples(packed("h5", "auto")) == list(want.items())
    assert tar_samples(packed("tar", "auto")) == list(want.items())


def test_index_claiming_a_large_but_possible_size_allocates_nothing(packed, work):
    """An index may claim up to 32,768 x the stored size; when the frame records another size,
    the read fails before the output is allocated (the frame of a 12 MB file must not make packds
    ask for 32,768 times its size)."""
    ds_dir = h.copy_dataset(packed("tar", "zstd"), os.path.join(work, "claim.pds"))
    ds = packds.open(ds_dir)
    i = max((j for j in range(len(ds)) if ds._codec(j) == 1), key=ds.stored_size)  # the big text file
    claim = ds.stored_size(i) * 32768
    del ds
    ix_path = os.path.join(ds_dir, "index.pdsi")
    ix = bytearray(open(ix_path, "rb").read())
    codec_off = struct.unpack_from("<Q", ix, 96)[0]
    struct.pack_into("<Q", ix, codec_off + 8 * i, claim | (1 << 56))
    open(ix_path, "wb").write(ix)
    ds = packds.open(ds_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for read in (lambda: ds[i], lambda: ds.get_many([i])):
        with pytest.raises(FormatError, match="claims"):
            read()
    with pytest.raises(ChecksumError):  # with verify=True a frame that does not decode is a checksum error
        packds.open(ds_dir, verify=True)[i]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 30_000  # KiB


def test_hdf5_shards_write_the_data_once(work):
    """The samples are written straight where h5py puts the data array: the bytes written by
    the whole pack (write(2) calls: /proc/self/io wchar) are about the data once, not twice."""
    src = os.path.join(work, "big")
    for i in range(16):
        h.write(src, f"f{i:02}.bin", os.urandom(1 << 20))
    out = os.path.join(work, "o.pds")
    code = (f"import packds\n"
            f"before = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
            f"packds.pack({src!r}, {out!r}, format='h5', shard_size=8 << 20)\n"
            f"after = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
            f"print(int(after['wchar']) - int(before['wchar']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    written = int(r.stdout.strip())
    assert (16 << 20) <= written < 1.3 * (16 << 20), written
    ds = packds.open(out)
    assert ds["f03.bin"] == open(os.path.join(src, "f03.bin"), "rb").read() and ds.verify()["problems"] == []
