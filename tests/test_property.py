"""Property: any small tree of oddly named files packs so that every sample equals its file and
the keys are exactly the relative paths, sorted byte-wise."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import packds
from _formats import shard_samples

# Name bytes: printable ASCII (but '/'), spaces, shell and glob metacharacters, multi-byte
# UTF-8 (accents, CJK, emoji, combining marks) and bytes that are not UTF-8 at all.
_ASCII = [bytes([c]) for c in range(0x20, 0x7F) if c != 0x2F]
_UNICODE = [c.encode() for c in "éÉüßøΩж中文字😀🎉\u0301\u00a0\u200b"]
_RAW = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\x01", b"\n", b"\t", b"\x7f"]

name_part = st.one_of(st.sampled_from(_ASCII), st.sampled_from(_UNICODE), st.sampled_from(_RAW))
names = (
    st.lists(name_part, min_size=1, max_size=12)
    .map(b"".join)
    .filter(lambda n: n not in (b".", b"..") and len(n) <= 200)
)
paths = st.lists(names, min_size=1, max_size=4).map(tuple)
text = st.tuples(st.text(min_size=1, max_size=40), st.integers(1, 300)).map(lambda t: (t[0] * t[1]).encode("utf-8", "surrogatepass"))
contents = st.one_of(st.just(b""), st.binary(min_size=0, max_size=64), st.binary(min_size=500, max_size=5000), text)
trees = st.dictionaries(paths, contents, min_size=1, max_size=25)


def _consistent(tree: dict) -> dict:
    """Drops paths that would need a name to be both a file and a directory."""
    out: dict = {}
    dirs: set = set()
    for p in sorted(tree, key=len):
        prefixes = {p[:i] for i in range(1, len(p))}
        if p in dirs or any(q in out for q in prefixes):
            continue
        out[p] = tree[p]
        dirs |= prefixes
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    tree=trees,
    shard_size=st.sampled_from([4096, 8192, 65536, 1 << 30]),
    threads=st.integers(1, 4),
    fmt=st.sampled_from(["tar", "h5"]),
    compress=st.sampled_from(["none", "zstd", "auto", "zstd:-3"]),
)
def test_random_trees_round_trip(tree, shard_size, threads, fmt, compress):
    tree = _consistent(tree)
    base = tempfile.mkdtemp(prefix="packds-prop-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src = os.path.join(os.fsencode(base), b"src")
        os.mkdir(src)
        for parts, data in tree.items():
            p = os.path.join(src, *parts)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        out = os.path.join(base, "o.pds")
        s = packds.pack(os.fsdecode(src), out, shard_size=shard_size, threads=threads, format=fmt, compress=compress)
        want = sorted((b"/".join(p), d) for p, d in tree.items())
        assert s["files"] == len(want) and s["skipped"] == []
        ds = packds.open(out)
        assert len(ds) == len(want)
        keys = [ds.key_bytes(i) for i in range(len(ds))]
        assert keys == sorted(keys), "keys not in byte-wise order"
        assert keys == [k for k, _ in want]
        for i, (k, d) in enumerate(want):
            assert ds[i] == d, k
            assert ds.get_checked(i) == d
            assert ds[k] == d
            assert ds.index(ds.key(i)) == i
            assert ds.size(i) == len(d)
        assert ds.verify(deep=True)["problems"] == []
        # Standard tools (tarfile or h5py, plus zstandard) read the same samples, in order.
        assert shard_samples(out) == want
    finally:
        shutil.rmtree(base, ignore_errors=True)
