"""`packds stage`: policy decisions, per-node locking, crash safety, verification, sources."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import _helpers as h
import packds
import packds.errors
from packds.stage import plan, stage_record

MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def base(fast_base):
    d = tempfile.mkdtemp(prefix="stage-", dir=fast_base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tree(root: str, files: int, size: int, seed: int) -> str:
    rnd = __import__("random").Random(seed)
    for i in range(files):
        p = os.path.join(root, f"class{i % 7}", f"img{i:05d}.bin")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(rnd.randbytes(size + rnd.randrange(size)))
    return root


@pytest.fixture(scope="module")
def small(base):
    """A ~2.5 MB dataset in several shards."""
    tree = _tree(os.path.join(base, "small-tree"), 240, 7000, 1)
    out = os.path.join(base, "small.pds")
    packds.pack(tree, out, shard_size=512 << 10)
    return out


@pytest.fixture(scope="module")
def big(base):
    """A ~48 MB dataset in 8 MB shards (a copy takes several 8 MiB buffers)."""
    tree = _tree(os.path.join(base, "big-tree"), 32, 1 << 20, 2)
    out = os.path.join(base, "big.pds")
    packds.pack(tree, out, shard_size=8 << 20)
    return out


@pytest.fixture
def dest(base):
    d = tempfile.mkdtemp(prefix="dest-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmpfs8(tmp_path):
    """An 8 MiB tmpfs (needs root, as in CI)."""
    with h.tmpfs(str(tmp_path / "tmpfs"), "size=8M") as d:
        yield d


def cli(*args, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "packds", *args], capture_output=True, text=True, env=e, **kw)


def dry(src, dest, *extra):
    r = cli("stage", src, "--to", dest, "--dry-run", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def same_samples(a, b) -> None:
    da, db = packds.open(a), packds.open(b)
    assert len(da) == len(db) > 0
    for i in range(len(da)):
        assert da.key(i) == db.key(i)
        assert da[i] == db[i], da.key(i)


# --------------------------------------------------------------------------------------------
# 1. Policy decisions


def test_auto_memory_local_inplace_decisions(small, dest):
    size = dry(small, dest, "--reserve", "0")["bytes"]
    r = dry(small, dest, "--reserve", "0", "--memory-limit", str(size))
    assert r["policy"] == "memory" and r["memory_limit"] == size
    r = dry(small, dest, "--reserve", "0", "--memory-limit", str(size - 1))
    assert r["policy"] == "local", r
    r = dry(small, dest, "--reserve", "1000T")
    assert r["policy"] == "inplace" and r["path"] == os.path.abspath(small)
    assert "does not fit" in r["reason"]
    assert dry(small, dest, "--policy", "inplace")["path"] == os.path.abspath(small)
    assert os.listdir(dest) == []  # a dry run changes nothing


def test_dry_run_prints_numbers_on_stderr_only(small, dest):
    r = cli("stage", small, "--to", dest, "--dry-run", "--reserve", "512M", "--memory-limit", "1K")
    assert r.returncode == 0 and r.stdout == ""
    for word in ("policy: local", "reserve: 536,870,912", "memory_limit: 1,024", "free:", "available:"):
        assert word in r.stderr, r.stderr


def test_inplace_fallback_on_small_tmpfs_warns(big, tmpfs8):
    r = cli("stage", big, "--to", tmpfs8, "--reserve", "1M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == os.path.abspath(big) + "\n"
    assert "warning" in r.stderr and "does not fit" in r.stderr
    assert [n for n in os.listdir(tmpfs8) if not n.endswith(".lock")] == []


def test_local_that_fits_on_tmpfs(small, tmpfs8):
    r = cli("stage", small, "--to", tmpfs8, "--reserve", "1M", "--memory-limit", "1K", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["policy"] == "local" and rec["copied"] is True
    assert rec["path"] == os.path.join(tmpfs8, "small.pds")
    same_samples(small, rec["path"])


def test_policy_local_not_fitting_fails_with_numbers(small, tmpfs8):
    for policy in ("local", "memory"):
        r = cli("stage", small, "--to", tmpfs8, "--policy", policy, "--reserve", "7M")
        assert r.returncode == 1
        assert r.stdout == ""
        err = r.stderr.splitlines()
        assert err[0].startswith("packds: error: not enough space") and "needs" in err[0] and "free" in err[0], err
        assert tmpfs8 in err[0]
        assert err[1].startswith("hint: ")
        assert [n for n in os.listdir(tmpfs8) if not n.endswith(".lock")] == []


def test_patched_statvfs_decides(small, dest, monkeypatch):
    st = sys.modules["packds.stage"]  # the module (packds.stage is the function)

    size = plan(small, dest, reserve=0)["bytes"]
    monkeypatch.setattr(st, "disk_space", lambda p: (size + 10 * MiB, 1000 * MiB))
    r = plan(small, dest, reserve=None, memory_limit=1)
    assert r["reserve"] == 100 * MiB  # 5 % of 1000 MiB, at least 1 GiB, at most 10 %
    assert r["policy"] == "inplace"
    r = plan(small, dest, reserve=5 * MiB, memory_limit=1)
    assert r["policy"] == "local" and r["available"] == size + 5 * MiB
    with pytest.raises(packds.NoSpaceError) as ei:
        stage_record(small, dest, policy="local", reserve=11 * MiB)
    assert "needs" in str(ei.value) and ei.value.hint
    assert h.staging_leftovers(dest) == [] and not os.path.exists(os.path.join(dest, "small.pds"))


def test_memory_limit_from_slurm_env(monkeypatch):
    from packds.stage import memory_limit_default

    monkeypatch.setenv("SLURM_MEM_PER_NODE", "4000")
    assert memory_limit_default()[0] == 2000 * MiB
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1000")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "4")
    assert memory_limit_default()[0] == 2000 * MiB
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "100000")
    assert memory_limit_default()[0] == 10 << 30  # capped at 10 GiB


def test_destination_defaults_to_slurm_tmpdir_else_clear_error(small, dest):
    r = cli("stage", small, "-q", env={"SLURM_TMPDIR": dest})
    assert r.returncode == 0, r.stderr
    assert r.stdout == os.path.join(dest, "small.pds") + "\n"
    assert r.stderr == ""
    r = cli("stage", small)
    assert r.returncode == 1 and r.stdout == ""
    assert "SLURM_TMPDIR" in r.stderr and "--to" in r.stderr and "hint:" in r.stderr


def test_enospc_during_copy_removes_partial_copy(big, tmpfs8, monkeypatch):
    st = sys.modules["packds.stage"]  # the module (packds.stage is the function)

    monkeypatch.setattr(st, "disk_space", lambda p: (1 << 40, 1 << 41))  # statvfs lies
    with pytest.raises(packds.NoSpaceError) as ei:
        stage_record(big, tmpfs8, policy="local", reserve=0)
    assert "no space" in str(ei.value) and tmpfs8 in str(ei.value) and ei.value.hint
    assert [n for n in os.listdir(tmpfs8) if not n.endswith(".lock")] == []


# --------------------------------------------------------------------------------------------
# 2. Concurrency, crashes, damaged sources


def test_simultaneous_stagers_copy_once(big, dest):
    procs = [
        subprocess.Popen([sys.executable, "-m", "packds", "stage", big, "--to", dest, "--json", "-q", "--memory-limit", "1K"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [e for _, e in outs]
    recs = [json.loads(o) for o, _ in outs]
    assert sum(r["copied"] for r in recs) == 1
    assert {r["path"] for r in recs} == {os.path.join(dest, "big.pds")}
    assert h.staging_leftovers(dest) == []
    ds = packds.open(os.path.join(dest, "big.pds"))
    assert ds.verify()["problems"] == []


@pytest.mark.faults
def test_sigkill_mid_copy_then_stage_again(big, dest):
    r = cli("stage", big, "--to", dest, "-q", env={"PACKDS_FAULT": f"stage-kill-after-bytes:{12 * MiB}"})
    assert r.returncode == -signal.SIGKILL
    final = os.path.join(dest, "big.pds")
    assert not os.path.exists(final)
    left = h.staging_leftovers(dest)
    assert len(left) == 1  # the dead stager's partial copy
    with pytest.raises(packds.FormatError):
        packds.open(os.path.join(dest, left[0]))
    r = cli("stage", big, "--to", dest, "--json", "-q")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["copied"] is True and rec["path"] == final
    assert h.staging_leftovers(dest) == []
    assert packds.open(final).verify()["problems"] == []


@pytest.mark.faults
def test_sigterm_mid_copy_leaves_nothing_accepted(big, dest):
    p = subprocess.Popen([sys.executable, "-m", "packds", "stage", big, "--to", dest, "--jobs", "1"], env={**os.environ, "PACKDS_FAULT": "stage-slow-ms:50"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not h.staging_leftovers(dest) and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode != 0
    assert not os.path.exists(os.path.join(dest, "big.pds"))
    assert h.staging_leftovers(dest) == []  # a clean cancel removes its partial copy


def test_corrupted_source_fails_naming_the_shard(big, base, dest):
    bad = os.path.join(base, "bad.pds")
    shutil.copytree(big, bad)
    try:
        shard = sorted(n for n in os.listdir(bad) if n.startswith("shard-"))[1]
        with open(os.path.join(bad, shard), "r+b") as f:
            f.seek(5000)
            c = f.read(1)
            f.seek(5000)
            f.write(bytes([c[0] ^ 0x40]))
        r = cli("stage", bad, "--to", dest)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("packds: error: checksum mismatch") and shard in r.stderr, r.stderr
        assert "hint:" in r.stderr
        with pytest.raises(packds.ChecksumError) as ei:
            packds.stage(bad, dest)
        assert os.path.basename(ei.value.shard) == shard
        assert [n for n in os.listdir(dest) if not n.endswith(".lock")] == []
    finally:
        shutil.rmtree(bad)


# --------------------------------------------------------------------------------------------
# Idempotence, reading, sources


def test_restage_is_fast_and_repairs_a_damaged_copy(small, dest):
    first = stage_record(small, dest)
    assert first["copied"] is True
    t = time.monotonic()
    again = stage_record(small, dest)
    assert time.monotonic() - t < 0.5
    assert again["copied"] is False and again["path"] == first["path"]
    shard = os.path.join(first["path"], "shard-00001.tar")
    os.truncate(shard, 100)
    fixed = stage_record(small, dest)
    assert fixed["copied"] is True
    assert packds.open(fixed["path"]).verify()["problems"] == []


@pytest.mark.parametrize("fmt", ["tar", "h5"])
def test_restage_after_the_source_changed_replaces_the_old_copy(base, dest, fmt):
    """The source is packed again with other contents (same place, --force) and staged again to
    the same destination: the stale copy (the format's own shard files) is removed and replaced
    by the new one, for HDF5 shards exactly as for tar."""
    if fmt == "h5":
        pytest.importorskip("h5py")
    tree = os.path.join(dest, "tree")
    for i in range(40):
        os.makedirs(tree, exist_ok=True)
        with open(os.path.join(tree, f"f{i:03d}"), "wb") as f:
            f.write(b"old %d " % i * 3000)
    src = os.path.join(base, f"changing-{fmt}.pds")
    packds.pack(tree, src, shard_size=64 << 10, format=fmt, force=True)
    out = os.path.join(dest, "local")
    first = stage_record(src, out)
    assert first["copied"] is True
    assert any(n.endswith("." + fmt) for n in os.listdir(first["path"]))
    for i in range(40):
        with open(os.path.join(tree, f"f{i:03d}"), "wb") as f:
            f.write(b"NEW %d " % i * 2000)
    packds.pack(tree, src, shard_size=64 << 10, format=fmt, force=True)
    again = stage_record(src, out)
    assert again["copied"] is True and again["path"] == first["path"]
    ds = packds.open(again["path"])
    assert ds[7] == b"NEW 7 " * 2000
    assert sorted(os.listdir(again["path"])) == sorted(os.listdir(src))
    assert h.staging_leftovers(out) == []
    assert stage_record(src, out)["copied"] is False


def test_staged_copy_reads_like_the_source(small, dest):
    path = packds.stage(small, dest)
    same_samples(small, path)
    ds = packds.open(small, stage=True, to=dest, policy="memory")
    assert os.fspath(ds.path) == path and len(ds) == len(packds.open(small))
    ds = packds.open(path, preload=True)
    assert ds[0] == packds.open(small)[0]
    assert packds.preload(path) == sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n != "manifest.json")


def test_loose_tree_is_packed_on_the_fly(base, dest):
    tree = os.path.join(base, "small-tree")
    r = cli("stage", tree, "--to", dest, "--json", "-q")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["path"] == os.path.join(dest, "small-tree.pds") and rec["copied"]
    ds = packds.open(rec["path"])
    keys = sorted(os.path.relpath(os.path.join(d, f), tree) for d, _, fs in os.walk(tree) for f in fs)
    assert list(ds.keys()) == keys
    for i, k in enumerate(keys):
        with open(os.path.join(tree, k), "rb") as f:
            assert ds[i] == f.read()
    assert json.loads(cli("stage", tree, "--to", dest, "--json", "-q").stdout)["copied"] is False


def test_single_tar_and_h5_files_are_copied(base, dest):
    tar = os.path.join(base, "plain.tar")
    subprocess.run(["tar", "-cf", tar, "-C", base, "small-tree"], check=True)
    h5 = os.path.join(base, "data.h5")
    with open(h5, "wb") as f:
        f.write(os.urandom(3 * MiB + 5))
    for src in (tar, h5):
        rec = json.loads(cli("stage", src, "--to", dest, "--json", "-q").stdout)
        assert rec["copied"] is True and rec["path"] == os.path.join(dest, os.path.basename(src))
        with open(src, "rb") as a, open(rec["path"], "rb") as b:
            assert a.read() == b.read()
        assert json.loads(cli("stage", src, "--to", dest, "--json", "-q").stdout)["copied"] is False
    assert h.staging_leftovers(dest) == []


def test_bad_sources_are_clear_errors(base, dest):
    r = cli("stage", os.path.join(base, "nope.pds"), "--to", dest)
    assert r.returncode == 1 and "nope.pds" in r.stderr and "packds: error:" in r.stderr
    r = cli("stage", os.path.join(base, "small.pds"), "--to", os.path.join(base, "small.pds", ".."))
    assert r.returncode == 1 and "onto itself" in r.stderr


def test_default_reserve_lets_a_small_dataset_fill_a_small_filesystem(small, tmp_path):
    """A ~2.5 MB dataset on an 8 MiB tmpfs: the default reserve (5 %, at least 1 GiB, at most 10 %
    of the filesystem) leaves room for it; it used to demand 1 GiB free and refuse."""
    with h.tmpfs(str(tmp_path / "t"), "size=8M") as d:
        r = cli("stage", small, "--to", d, "--policy", "local", "--json")
        assert r.returncode == 0, r.stderr
        rec = json.loads(r.stdout)
        assert rec["path"] == os.path.join(d, "small.pds") and rec["copied"]
        same_samples(small, rec["path"])
