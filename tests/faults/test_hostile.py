"""Catalogue C (what tests/test_corruption.py does not already do): a manifest that lies about
sizes and counts with absurd values (huge, negative, fractional, wrong types), a manifest that
is huge or deeply nested; and a Hypothesis mutation harness (C21) over index.pdsi,
manifest.json and shard bytes, run in a subprocess so a signal death is caught as a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import _helpers as h
import packds
from packds import FormatError

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OPEN_CHILD = textwrap.dedent(
    r"""
    import sys, packds
    from packds import PackdsError
    try:
        ds = packds.open(sys.argv[1])
    except PackdsError as e:
        print("refused:", type(e).__name__); sys.exit(0)
    for i in range(len(ds)):
        ds[i]
    print("opened", len(ds)); sys.exit(3)
    """
)


def _manifest_path(d):
    return os.path.join(d, "manifest.json")


def _child_open(d):
    r = subprocess.run([sys.executable, "-c", _OPEN_CHILD, d], capture_output=True, timeout=60)
    h.assert_not_signalled(r)
    return r


LIES = {
    "samples-2**64": lambda m: m.update(samples=2**64),
    "samples-10**30": lambda m: m.update(samples=10**30),
    "samples-negative": lambda m: m.update(samples=-1),
    "samples-float": lambda m: m.update(samples=1e300),
    "samples-string": lambda m: m.update(samples="300"),
    "shard-size-huge": lambda m: m["shards"][0].update(size=2**63),
    "shard-size-negative": lambda m: m["shards"][0].update(size=-512),
    "shard-size-smaller": lambda m: m["shards"][0].update(size=m["shards"][0]["size"] - 512),
    "shard-size-null": lambda m: m["shards"][0].update(size=None),
    "index-size-huge": lambda m: m["index"].update(size=2**64 - 1),
    "index-size-zero": lambda m: m["index"].update(size=0),
    "shards-not-a-list": lambda m: m.update(shards={"a": 1}),
    "shards-100k-records": lambda m: m.update(shards=[dict(m["shards"][0], file=f"shard-{i:05d}.tar") for i in range(100_000)]),
    "shard-file-escape": lambda m: m["shards"][0].update(file="../../etc/passwd"),
    "shard-file-absolute": lambda m: m["shards"][0].update(file="/etc/passwd"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_manifest_that_lies(small_ds, lie):
    """Every lie is refused at open with FormatError naming the dataset; no crash, no huge
    allocation, never a dataset that opens."""
    _write_lie(small_ds, lie)
    r = _child_open(small_ds)
    assert r.returncode == 0 and b"refused: FormatError" in r.stdout, h.show(r)
    with pytest.raises(FormatError) as ei:
        packds.open(small_ds)
    assert small_ds in str(ei.value)


SHAPES = ["nested-100k", "padded-64MB", "not-an-object", "duplicate-keys", "not-utf-8"]


def _write_shape(d, shape):
    """Rewrites the manifest of `d` in a hostile shape."""
    p = _manifest_path(d)
    with open(p, "rb") as f:
        text = f.read()
    if shape == "nested-100k":
        text = b"[" * 100_000 + b"]" * 100_000
    elif shape == "padded-64MB":
        text = text[:-1] + b" " * (64 << 20) + b"}"
    elif shape == "not-an-object":
        text = json.dumps([json.loads(text)]).encode()
    elif shape == "duplicate-keys":
        text = text[:-1] + b', "samples": 1}'
    elif shape == "not-utf-8":
        text = text.replace(b'"packds"', b'"pack\xff\xfeds"', 1)
    with open(p, "wb") as f:
        f.write(text)


def _write_lie(d, lie):
    with open(_manifest_path(d)) as f:
        m = json.load(f)
    LIES[lie](m)
    with open(_manifest_path(d), "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("shape", SHAPES)
def test_hostile_manifest_shapes(small_ds, shape):
    _write_shape(small_ds, shape)
    t = time.monotonic()
    r = _child_open(small_ds)
    assert time.monotonic() - t < 30
    assert r.returncode == 0 and b"refused: FormatError" in r.stdout, h.show(r)


# The lies with absurd numbers (2**64, 10**30, -1, 1e300), and every hostile shape.
NUMBER_LIES = ["samples-2**64", "samples-10**30", "samples-negative", "samples-float", "shard-size-huge", "shard-size-negative", "index-size-huge"]


@pytest.mark.parametrize("case", [f"lie:{x}" for x in NUMBER_LIES] + [f"shape:{x}" for x in SHAPES])
def test_i5_hostile_manifests_through_every_command(small_ds, work, case):
    """A manifest with absurd numbers, 100k-deep nesting, 64 MB of padding or bytes that are
    not UTF-8: info, ls, get, verify, unpack, stage and `stage --dry-run` each exit 1 with one
    `packds: error:` line naming the manifest and a hint, never a traceback, within seconds;
    stage leaves nothing."""
    kind, what = case.split(":", 1)
    (_write_lie if kind == "lie" else _write_shape)(small_ds, what)
    to = os.path.join(work, "to")
    os.mkdir(to)
    cmds = [
        ["info", small_ds],
        ["info", small_ds, "--json"],
        ["ls", small_ds],
        ["get", small_ds, "top.txt"],
        ["verify", small_ds],
        ["unpack", small_ds, os.path.join(work, "un")],
        ["stage", small_ds, "--to", to],
        ["stage", small_ds, "--to", to, "--dry-run"],
    ]
    for cmd in cmds:
        t = time.monotonic()
        r = h.cli(*cmd, timeout=60)
        assert time.monotonic() - t < 30, h.show(r)
        assert b"Traceback" not in r.stderr, h.show(r)
        h.assert_cli_error(r, "manifest.json")
    assert not os.path.exists(os.path.join(to, "ds.pds")) and h.staging_leftovers(to) == []


# ------------------------------------------------------------------- Hypothesis mutation harness

_HARNESS = textwrap.dedent(
    r"""
    import os, shutil, sys, time
    sys.path.insert(0, sys.argv[1])
    import _helpers as h
    import packds
    from packds import PackdsError
    from hypothesis import given, settings, strategies as st, HealthCheck, Phase

    src, work, examples = sys.argv[2], sys.argv[3], int(sys.argv[4])
    names = sorted(os.listdir(src))
    shards = [n for n in names if n.startswith("shard-")]
    OK = (PackdsError, IndexError, KeyError, OSError)
    stats = {"examples": 0, "opened": 0, "read_all": 0}
    counter = [0]

    def exercise(d):
        try:
            ds = packds.open(d)
        except OK:
            return
        stats["opened"] += 1
        n = len(ds)
        for i in list(range(min(n, 40))) + [n - 1]:
            for f in (lambda: ds[i], lambda: ds.key(i), lambda: ds.size(i), lambda: bytes(ds.view(i)), lambda: ds.get_checked(i)):
                try:
                    f()
                except OK:
                    pass
        for k in ("", "c00/f00000.bin", "top.txt", "\udcff\udcfe.bin"):
            try:
                ds.get(k)
            except OK:
                pass
        for i in range(min(n, 40)):
            try:
                ds.raw(i)
            except OK:
                pass
        try:
            ds.get_many(list(range(min(n, 40))))
            ds.verify(deep=True)
            stats["read_all"] += 1
        except OK:
            pass

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(
        target=st.sampled_from(["index.pdsi", "manifest.json", "shard"]),
        shard=st.integers(0, len(shards) - 1),
        flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=0, max_size=8),
        cut=st.one_of(st.none(), st.floats(0, 1)),
        fix=st.booleans(),
    )
    def one(target, shard, flips, cut, fix):
        counter[0] += 1
        d = os.path.join(work, f"m{counter[0]}")
        shutil.copytree(src, d, copy_function=os.link)
        name = shards[shard] if target == "shard" else target
        p = os.path.join(d, name)
        data = bytearray(open(p, "rb").read())
        os.remove(p)  # hard link: never write through to the pristine copy
        for pos, val in flips:
            if data:
                data[int(pos * len(data))] = val
        if cut is not None:
            del data[int(cut * len(data)):]
        if fix and target == "index.pdsi" and len(data) >= 128:
            try:
                h.fix_crcs(data)
            except Exception:
                pass
        with open(p, "wb") as f:
            f.write(data)
        stats["examples"] += 1
        exercise(d)
        shutil.rmtree(d)

    t = time.monotonic()
    one()
    print("STATS", stats["examples"], stats["opened"], stats["read_all"], round(time.monotonic() - t, 2))
    """
)


def _run_harness(small_ds_pristine, work, examples):
    script = os.path.join(work, "harness.py")
    with open(script, "w") as f:
        f.write(_HARNESS)
    r = subprocess.run([sys.executable, script, TESTS_DIR, small_ds_pristine, work, str(examples)], capture_output=True, timeout=900)
    h.assert_not_signalled(r)
    assert r.returncode == 0, h.show(r)
    line = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("STATS")][0]
    n, opened, read_all, secs = line.split()[1:]
    print(f"\nhypothesis mutation harness: {n} examples, {opened} opened, {read_all} read+verified, {secs} s")
    assert int(n) == examples
    assert int(opened) > 0, "no mutated dataset got past open(): the harness tests too little"


def test_c21_hypothesis_mutations_never_crash(small_ds_pristine, work):
    _run_harness(small_ds_pristine, work, 300)


@pytest.mark.slow
def test_c21_hypothesis_mutations_never_crash_long(small_ds_pristine, work):
    _run_harness(small_ds_pristine, work, 5000)


@pytest.mark.parametrize("fmt", ["tar", "h5"])
def test_c21_hypothesis_mutations_of_compressed_datasets_never_crash(work, fmt):
    """The same harness over compressed datasets (zstd frames, a dictionary, HDF5 files)."""
    src = os.path.join(work, "text")
    for i in range(400):
        h.write(src, f"c{i % 3:02}/f{i:05}.txt", (b"sample %d of class %d; " % (i, i % 3)) * (1 + i % 90))
    h.write(src, "top.txt", b"top")
    pristine = os.path.join(work, f"z-{fmt}.pds")
    h.pack(src, pristine, shard_size=16 << 10, threads=4, format=fmt, compress="zstd", zstd_dict=4096)
    _run_harness(pristine, work, 150)
