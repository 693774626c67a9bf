"""Acceptance 5: a pack killed at any point leaves a directory that does not open, and
`--resume` finishes it to exactly the bytes of an uninterrupted pack."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import _helpers as h
import packds
from packds import FormatError

ARGS = ("--shard-size", "64K", "--threads", "3", "-q")


@pytest.fixture(scope="module")
def tree(fast_base):
    """~430 files of 0.5-3 KB: about a dozen 64 KiB shards."""
    t = h.make_plain_tree(os.path.join(fast_base, "resume-src"), 430, size_range=(500, 3000), seed=9)
    h.write(t.root, b"\xff odd/\xe9t\xe9.bin", b"latin-1 name")
    h.write(t.root, "odd/中文.txt".encode(), b"")
    t.keys = h.walk_files(t.root)
    return t


@pytest.fixture(scope="module")
def reference(tree, fast_base):
    out = os.path.join(fast_base, "resume-ref.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS)
    assert r.returncode == 0, h.show(r)
    n = len([x for x in os.listdir(out) if x.endswith(".tar")])
    assert n >= 8, f"want many shards, got {n}"
    return out


def manifest_sans_time(d) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    m.pop("created_unix")
    return m


def assert_complete_and_identical(out, reference) -> None:
    h.assert_same_dataset_bytes(reference, out)
    assert manifest_sans_time(out) == manifest_sans_time(reference)
    left = sorted(set(os.listdir(out)) - set(os.listdir(reference)))
    assert not left, f"leftovers after the pack: {left}"
    ds = packds.open(out)
    assert ds.verify()["problems"] == []


def assert_interrupted(out) -> None:
    assert os.path.isdir(out)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(FormatError) as ei:
        packds.open(out)
    assert out in str(ei.value)
    assert "resume" in str(ei.value) + (ei.value.hint or "")


def resume(tree, out, *extra, env=None):
    r = h.cli("pack", tree.root, "-o", out, *ARGS, "--resume", "--json", *extra, env=env)
    return r


@pytest.mark.faults
@pytest.mark.parametrize("n", [1, 3, 7])
def test_kill_after_shards_then_resume(tree, reference, work, n):
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": f"kill-after-shards:{n}"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert_interrupted(out)
    shards = sorted(x for x in os.listdir(out) if x.startswith("shard-"))
    assert shards == [f"shard-{i:05d}.tar" for i in range(n)], shards
    for s in shards:  # completed shards are already the final bytes
        assert h.read(out, s.encode()) == h.read(reference, s.encode()), s
    # Without --resume (or --force) the directory is left alone, with a hint naming --resume.
    again = h.cli("pack", tree.root, "-o", out, *ARGS)
    line = h.assert_cli_error(again, out)
    assert "holds an interrupted pack" in line and b"--resume" in again.stderr
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["resumed_shards"] == n and s["files"] == len(tree.keys) and not s["already_complete"]
    assert_complete_and_identical(out, reference)


@pytest.mark.faults
@pytest.mark.parametrize("n", [1, 100, 333, "all"])
def test_kill_after_files_mid_shard_then_resume(tree, reference, work, n):
    n = len(tree.keys) if n == "all" else n
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": f"kill-after-files:{n}"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert_interrupted(out)
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    assert_complete_and_identical(out, reference)


@pytest.mark.faults
def test_killed_again_while_resuming(tree, reference, work):
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode == -9, h.show(r)
    r = resume(tree, out, env={"PACKDS_FAULT": "kill-after-files:150"})
    assert r.returncode == -9, h.show(r)
    assert_interrupted(out)
    r = resume(tree, out, env={"PACKDS_FAULT": "kill-after-shards:3"})
    assert r.returncode == -9, h.show(r)
    assert_interrupted(out)
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["resumed_shards"] >= 5
    assert_complete_and_identical(out, reference)


@pytest.mark.faults
def test_resume_through_the_python_api(tree, reference, work):
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": "kill-after-shards:4"})
    assert r.returncode == -9
    s = packds.pack(tree.root, out, shard_size=64 << 10, threads=1, resume=True)
    assert s["resumed_shards"] == 4 and s["files"] == len(tree.keys)
    h.assert_same_dataset_bytes(reference, out)


@pytest.mark.faults
def test_resume_refuses_other_shard_size(tree, work):
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode == -9
    r = h.cli("pack", tree.root, "-o", out, "--shard-size", "128K", "--resume", "-q")
    h.assert_cli_error(r, "shard-size")
    assert_interrupted(out)  # left as it was


@pytest.mark.faults
def test_resume_refuses_a_changed_tree(tree, work):
    src = os.path.join(work, "src")
    shutil.copytree(tree.root, src)
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, *ARGS, env={"PACKDS_FAULT": "kill-after-shards:3"})
    assert r.returncode == -9
    h.write(src, b"c00/a-new-first-file", b"x")  # sorts into the already packed range
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume")
    h.assert_cli_error(r, "changed")
    # --force starts over and succeeds.
    r = h.cli("pack", src, "-o", out, *ARGS, "--force")
    assert r.returncode == 0, h.show(r)
    assert packds.open(out)[b"c00/a-new-first-file"] == b"x"


def test_resume_on_a_complete_dataset_does_nothing(tree, reference, work):
    out = h.copy_dataset(reference, os.path.join(work, "done.pds"))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["already_complete"] is True and s["files"] == len(tree.keys)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before


def test_resume_with_nothing_there_is_a_plain_pack(tree, reference, work):
    out = os.path.join(work, "fresh.pds")
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["resumed_shards"] == 0
    assert_complete_and_identical(out, reference)


@pytest.mark.faults
def test_force_over_an_interrupted_pack(tree, reference, work):
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS, env={"PACKDS_FAULT": "kill-after-files:200"})
    assert r.returncode == -9
    r = h.cli("pack", tree.root, "-o", out, *ARGS, "--force")
    assert r.returncode == 0, h.show(r)
    assert_complete_and_identical(out, reference)


def test_resume_after_kill_before_options_were_written(tree, reference, work):
    """The state a SIGKILL leaves between `mkdir .pack-state` and the rename of its
    options.json (the pack had only created its output directory, the state directory and
    the temporary options file). README: an interrupted pack is finished by --resume."""
    out = os.path.join(work, "out.pds")
    os.makedirs(os.path.join(out, ".pack-state"))
    with open(os.path.join(out, ".pack-state", ".options.json.tmp"), "wb") as f:
        f.write(b'{"shard_size":65536,"sou')
    assert_interrupted(out)
    r = resume(tree, out)
    assert r.returncode == 0, h.show(r)
    assert_complete_and_identical(out, reference)


# ------------------------------------------------------------- kills at every commit point


def _strace_kill(tree, out, syscall: str, k: int):
    """Runs the pack under strace, SIGKILLing it on entry to the k-th call of ``syscall`` by
    the thread doing it (per-thread counting: all of the pack's mkdir/rename/unlink/rmdir
    happen on its one writer thread)."""
    cmd = ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={k}",
           sys.executable, "-m", "packds", "pack", tree, "-o", out, "--shard-size", "4K", "-q"]
    env = dict(os.environ)
    env.pop("PACKDS_FAULT", None)
    return subprocess.run(cmd, capture_output=True, timeout=60, env=env)


def test_sigkill_at_every_commit_point(work):
    """A 3-shard pack killed on entry to each mkdir, rename, unlinkat and fsync it makes:
    each time, the directory does not open, and --resume (or a fresh pack when nothing was
    created) gives exactly the uninterrupted bytes. Uses strace's fault injection; without
    strace, the same states are reached by random external kills."""
    src = os.path.join(work, "src")
    for i, size in enumerate([1500, 3000, 200]):
        h.write(src, b"f%d" % i, os.urandom(size))
    ref = os.path.join(work, "ref.pds")
    assert h.cli("pack", src, "-o", ref, "--shard-size", "4K", "-q").returncode == 0
    assert len([x for x in os.listdir(ref) if x.endswith(".tar")]) == 3
    cases = []
    if h.have_strace():
        for syscall, count in [("mkdir", 2), ("rename", 9), ("unlinkat", 6), ("fsync", 14)]:
            cases += [(syscall, k) for k in range(1, count + 1)]
    else:  # pragma: no cover - depends on the machine
        cases = [("random", k) for k in range(12)]
    survived_kill = []
    failures = []
    for syscall, k in cases:
        out = os.path.join(work, f"o-{syscall}-{k}.pds")
        if syscall == "random":
            p = subprocess.Popen([sys.executable, "-m", "packds", "pack", src, "-o", out, "--shard-size", "4K", "-q"])
            time.sleep(random.Random(k).uniform(0.05, 0.4))
            p.kill()
            rc = p.wait()
        else:
            rc = _strace_kill(src, out, syscall, k).returncode
        if rc == 0:
            survived_kill.append((syscall, k))  # fewer calls than k: it just completed
            assert_complete_and_identical(out, ref)
            continue
        assert rc in (-9, 137), (syscall, k, rc)
        if os.path.exists(os.path.join(out, "manifest.json")):
            # Killed after the manifest landed: a complete dataset already.
            h.assert_same_dataset_bytes(ref, out)
            assert packds.open(out).verify()["problems"] == []
        elif os.path.exists(out):
            with pytest.raises(FormatError):
                packds.open(out)
        left = sorted(os.path.relpath(os.path.join(dp, n), out) for dp, dn, fn in os.walk(out) for n in fn + dn)
        r = h.cli("pack", src, "-o", out, "--shard-size", "4K", "-q", "--resume")
        if r.returncode != 0:
            failures.append(f"kill at {syscall} #{k} left {left}; --resume: {r.stderr.decode(errors='replace').strip()}")
            continue
        h.assert_same_dataset_bytes(ref, out)
        assert packds.open(out).verify()["problems"] == []
    print("kills that landed after the pack finished:", survived_kill)
    assert not failures, "--resume cannot finish these interrupted packs:\n" + "\n".join(failures)
    assert len(survived_kill) < len(cases) / 2, f"most injected kills missed: {survived_kill}"


# ---------------------------------------------------------------------- real external kills


@pytest.fixture(scope="module")
def big_reference(odd_tree, fast_base):
    """Two sources, the odd tree and 160 MiB of 1 MiB files, packed with one I/O thread into
    1 MiB shards: a pack that takes about a second. Returns (sources, dir, seconds taken by
    the whole command)."""
    big = os.path.join(fast_base, "kill-big")
    pool = os.urandom(4 << 20)
    rng = random.Random(0)
    for i in range(160):
        off = rng.randrange(0, 3 << 20)
        h.write(big, b"zz-big/b%03d.bin" % i, os.urandom(64) + pool[off : off + (1 << 20)])
    sources = (odd_tree.root, big)
    out = os.path.join(fast_base, "kill-ref.pds")
    t = time.perf_counter()
    r = h.cli("pack", *sources, "-o", out, *KILL_ARGS, timeout=300)
    dt = time.perf_counter() - t
    assert r.returncode == 0, h.show(r)
    return sources, out, dt


KILL_ARGS = ("--shard-size", "1M", "--threads", "1", "-q")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_external_sigkill_at_a_random_time(big_reference, work, seed):
    sources, ref, dt = big_reference
    out = os.path.join(work, "killed.pds")
    delay = random.Random(seed).uniform(0.1, 1.0) * dt
    env = dict(os.environ)
    env.pop("PACKDS_FAULT", None)
    p = subprocess.Popen([sys.executable, "-m", "packds", "pack", *sources, "-o", out, *KILL_ARGS],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    rc = p.wait(120)
    if rc == 0:
        # Finished before the kill: then it must be complete and right.
        h.assert_same_dataset_bytes(ref, out)
        assert packds.open(out).verify()["problems"] == []
        return
    assert rc == -signal.SIGKILL
    complete = os.path.exists(os.path.join(out, "manifest.json"))
    if complete:
        h.assert_same_dataset_bytes(ref, out)
    elif os.path.exists(out):
        with pytest.raises(FormatError):
            packds.open(out)
    left = sorted(os.listdir(out)) if os.path.exists(out) else None
    r = h.cli("pack", *sources, "-o", out, *KILL_ARGS, "--resume", "--json", timeout=300)
    assert r.returncode == 0, f"kill after {delay:.2f} s of {dt:.2f} s left {left and left[:10]}: {h.show(r)}"
    h.assert_same_dataset_bytes(ref, out)
    ds = packds.open(out)
    assert len(ds) == packds.open(ref).__len__()
    assert ds.verify()["problems"] == []
    if not json.loads(r.stdout)["already_complete"]:
        assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)
