"""The stage copy path: chunks copied at their offsets by several threads (one large shard in
parallel ranges), each file's XXH3-128 fed in order and checked before the rename, one fsync
pass for a durable copy, and a memory-policy preload that does not read the copy again."""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import _helpers as h
import packds
from packds.stage import stage_record

MiB = 1 << 20


@pytest.fixture(scope="module")
def base(fast_base):
    d = tempfile.mkdtemp(prefix="stage-copy-", dir=fast_base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def one_shard(base):
    """A ~40 MB dataset in ONE shard: many chunks, so that --jobs N copies
    ranges of the same file at once."""
    tree = os.path.join(base, "tree")
    os.makedirs(tree)
    rnd = random.Random(7)
    for i in range(5):
        with open(os.path.join(tree, f"f{i}.bin"), "wb") as f:
            f.write(rnd.randbytes(8 * MiB + 1000 * i))
    out = os.path.join(base, "one.pds")
    packds.pack(tree, out, shard_size=1 << 30)
    shards = [n for n in os.listdir(out) if n.startswith("shard-")]
    assert len(shards) == 1 and os.path.getsize(os.path.join(out, shards[0])) > 5 * 8 * MiB
    return out


@pytest.fixture
def dest(base):
    d = tempfile.mkdtemp(prefix="dest-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def data_bytes(ds: str) -> int:
    m = json.load(open(os.path.join(ds, "manifest.json")))
    return sum(s["size"] for s in m["shards"]) + m["index"]["size"]


def cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PACKDS_FAULT"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "packds", *args], capture_output=True, text=True, env=e)


@pytest.mark.parametrize("jobs", [1, 4])
def test_a_large_shard_copied_in_parallel_ranges_is_byte_identical(one_shard, dest, jobs):
    rec = stage_record(one_shard, dest, policy="local", jobs=jobs, quiet=True)
    final = os.path.join(dest, "one.pds")
    assert rec["copied"] and rec["path"] == final
    names = sorted(os.listdir(one_shard))
    assert sorted(os.listdir(final)) == names
    match, mismatch, errors = filecmp.cmpfiles(one_shard, final, names, shallow=False)
    assert (mismatch, errors) == ([], [])
    # Every source byte read once, none twice.
    assert rec["read_bytes"] == data_bytes(one_shard)
    assert packds.open(final).verify()["problems"] == []


@pytest.mark.parametrize("where", [100, 5 * 8 * MiB + 10])
def test_a_flipped_byte_in_any_range_fails_and_nothing_is_accepted(one_shard, base, dest, where):
    bad = os.path.join(base, f"bad{where}.pds")
    shutil.copytree(one_shard, bad)
    try:
        shard = next(n for n in os.listdir(bad) if n.startswith("shard-"))
        with open(os.path.join(bad, shard), "r+b") as f:
            f.seek(where)
            c = f.read(1)
            f.seek(where)
            f.write(bytes([c[0] ^ 1]))
        with pytest.raises(packds.ChecksumError) as ei:
            stage_record(bad, dest, policy="local", jobs=4, quiet=True)
        assert os.path.basename(ei.value.shard) == shard
        assert [n for n in os.listdir(dest) if not n.endswith(".lock")] == []
    finally:
        shutil.rmtree(bad)


def test_enospc_with_parallel_ranges_removes_the_partial_copy(one_shard, tmp_path, monkeypatch):
    st = sys.modules["packds.stage"]
    monkeypatch.setattr(st, "disk_space", lambda p: (1 << 40, 1 << 41))  # statvfs lies
    with h.tmpfs(str(tmp_path / "tmpfs"), "size=16M") as d:
        with pytest.raises(packds.NoSpaceError) as ei:
            stage_record(one_shard, d, policy="local", reserve=0, jobs=4, quiet=True)
        assert d in str(ei.value) and ei.value.hint
        assert [n for n in os.listdir(d) if not n.endswith(".lock")] == []


@pytest.mark.faults
def test_killed_at_random_points_nothing_is_accepted_and_a_restage_completes(one_shard, dest):
    final = os.path.join(dest, "one.pds")
    size = data_bytes(one_shard)
    rnd = random.Random(11)
    for at in sorted(rnd.randrange(1, size) for _ in range(3)):
        r = cli("stage", one_shard, "--to", dest, "--jobs", str(rnd.choice([1, 2, 4])), "-q", env={"PACKDS_FAULT": f"stage-kill-after-bytes:{at}"})
        assert r.returncode == -signal.SIGKILL, (at, r.stderr)
        assert not os.path.exists(final)
        for left in h.staging_leftovers(dest):
            with pytest.raises(packds.FormatError):
                packds.open(os.path.join(dest, left))
    r = cli("stage", one_shard, "--to", dest, "--json", "-q", "--jobs", "4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["copied"] is True
    assert h.staging_leftovers(dest) == []
    assert packds.open(final).verify()["problems"] == []


def test_memory_policy_does_not_read_the_data_twice(one_shard, dest):
    rec = stage_record(one_shard, dest, policy="memory", jobs=2, quiet=True)
    assert rec["policy"] == "memory" and rec["copied"]
    # The copy read every byte once; the preload found the copy just written in the page
    # cache and read nothing (before, it read the whole dataset a second time).
    assert rec["read_bytes"] == data_bytes(one_shard)
    assert rec["preload_read_bytes"] == 0
    # A plain preload of it now reads nothing either, and still reports what is cached.
    assert packds.preload(rec["path"]) == data_bytes(one_shard)
