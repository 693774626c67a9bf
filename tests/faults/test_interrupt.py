"""Catalogue B6 / D1 / D2 and crash-safety promises 1 and 3: SIGTERM and SIGKILL at random
points of `packds pack` and `packds stage`, several seeds. Afterwards either nothing opens, or
the dataset is complete and right; and `pack --resume` / a second `stage` always completes
byte-identical to an uninterrupted run, with no leftovers. (SIGKILL of pack at random times and
at every commit point: tests/test_resume.py; one SIGKILL/SIGTERM of stage: tests/test_stage.py.)"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

import _helpers as h
import packds

PACK_ARGS = ("--shard-size", "1M", "--threads", "1", "-q")
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def tree(fast_base):
    """~48 MB: 240 files of 100-300 KB (streamed or whole), about fifty 1 MiB shards."""
    return h.make_plain_tree(os.path.join(fast_base, "faults-int-src"), 240, size_range=(100_000, 300_000), seed=5)


@pytest.fixture(scope="module")
def reference(tree, fast_base):
    out = os.path.join(fast_base, "faults-int-ref.pds")
    p = h.popen_cli("pack", tree.root, "-o", out, *PACK_ARGS)
    h.wait_for(lambda out=out, p=p: os.path.exists(out) or p.poll() is not None, timeout=30, step=0.001)
    t = time.perf_counter()
    _, err = p.communicate(timeout=120)
    dt = time.perf_counter() - t  # from the output's creation to the end
    assert p.returncode == 0, err
    return out, dt


def _check_after_kill(out, ref):
    """Either no dataset opens, or it is complete and byte-identical to the reference."""
    if not os.path.exists(out):
        return "nothing"
    if os.path.exists(os.path.join(out, "manifest.json")):
        h.assert_same_dataset_bytes(ref, out)
        assert packds.open(out).verify()["problems"] == []
        return "complete"
    with pytest.raises(packds.FormatError):
        packds.open(out)
    return "partial"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
@pytest.mark.parametrize("seed", SEEDS)
def test_b6_signal_pack_at_a_random_time_then_resume(tree, reference, work, seed, sig):
    ref, dt = reference
    out = os.path.join(work, "o.pds")
    p = h.popen_cli("pack", tree.root, "-o", out, *PACK_ARGS)
    # The random point is taken from when the output directory appears (interpreter start-up
    # is most of the run otherwise): anywhere from before the first shard to after the last.
    h.wait_for(lambda out=out, p=p: os.path.exists(out) or p.poll() is not None, timeout=30, step=0.001)
    delay = random.Random(seed * 31 + sig).uniform(0.0, 1.2) * dt
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    # never another signal (SIGSEGV, SIGABRT, ...); SIGTERM cancels like Ctrl-C: exit 143
    # (-15 only once the pack is done: Python restores the default handler at interpreter exit)
    assert p.returncode in ((0, 143, -sig) if sig == signal.SIGTERM else (0, -sig)), (p.returncode, err)
    if sig == signal.SIGTERM and p.returncode == -sig:
        assert os.path.exists(os.path.join(out, "manifest.json")), "SIGTERM killed an unfinished pack"
    if p.returncode == 143 and os.path.exists(out):
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")], f"SIGTERM left a partial shard: {os.listdir(out)}"
    state = _check_after_kill(out, ref)
    print(f"\n{sig!r} after {delay:.3f}/{dt:.3f} s: rc={p.returncode} state={state}")
    r = h.cli("pack", tree.root, "-o", out, *PACK_ARGS, "--resume", "--json", timeout=120)
    assert r.returncode == 0, f"signal after {delay:.3f} s of {dt:.3f} s: {h.show(r)}"
    h.assert_same_dataset_bytes(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref)), "leftovers after resume"
    assert packds.open(out).verify()["problems"] == []


@pytest.fixture(scope="module")
def staged_src(reference):
    return reference[0]



@pytest.mark.faults
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
@pytest.mark.parametrize("seed", SEEDS)
def test_d1_d2_signal_stage_at_a_random_time_then_restage(staged_src, work, seed, sig):
    """A stage slowed to ~1-2 s (stage-slow-ms) is signalled at a random time: the final path
    never exists unless complete and identical; SIGTERM removes its partial copy; the next stage
    removes any leftovers and gives a byte-identical copy."""
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    final = os.path.join(dest, os.path.basename(staged_src))
    p = h.popen_cli("stage", staged_src, "--to", dest, "--jobs", "2", "-q", "--json", env={"PACKDS_FAULT": "stage-slow-ms:30"})
    time.sleep(random.Random(seed * 7 + sig).uniform(0.2, 1.5))
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode in (0, 1, 130, 143, -sig), (p.returncode, err)
    if os.path.exists(final):
        h.assert_same_dataset_bytes(staged_src, final)
        assert packds.open(final).verify()["problems"] == []
    if sig == signal.SIGTERM and p.returncode != 0:
        assert h.staging_leftovers(dest) == [], "a SIGTERMed stage must remove its partial copy"
    for n in h.staging_leftovers(dest):
        with pytest.raises((packds.FormatError, OSError)):
            packds.open(os.path.join(dest, n))
    r = h.popen_cli("stage", staged_src, "--to", dest, "-q", "--json")
    o, e = r.communicate(timeout=120)
    assert r.returncode == 0, e
    assert json.loads(o)["path"] == final
    assert h.staging_leftovers(dest) == []
    h.assert_same_dataset_bytes(staged_src, final)
    assert h.manifest(final) == h.manifest(staged_src)


@pytest.mark.faults
def test_d2_sigterm_during_copy_never_leaves_a_partial_copy(staged_src, work):
    """Regression: a SIGTERM that interrupted the progress loop's Thread.join(0.2) (CPython 3.11,
    bpo-45274) made the next join return while the copier still ran; the partial copy was removed
    under it and the process exited, leaving `.NAME.staging-PID` with a new shard in it (about 1
    run in 10). Now completion is an Event: every SIGTERM mid-copy leaves nothing."""
    rng = random.Random(2026)
    for i in range(10):
        dest = os.path.join(work, f"dest{i}")
        os.mkdir(dest)
        p = h.popen_cli("stage", staged_src, "--to", dest, "--jobs", str(1 + i % 4), "-q", env={"PACKDS_FAULT": "stage-slow-ms:20"})
        h.wait_for(lambda dest=dest, p=p: bool(h.staging_leftovers(dest)) or p.poll() is not None, timeout=30, step=0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        final = os.path.join(dest, os.path.basename(staged_src))
        if p.returncode == 0:
            h.assert_same_dataset_bytes(staged_src, final)
            continue
        assert p.returncode == 143, (p.returncode, err)
        assert b"interrupted" in err
        assert h.staging_leftovers(dest) == [], f"run {i}: partial copy left behind: {os.listdir(dest)}"
        assert not os.path.exists(final)


def test_b6_sigterm_cancels_a_pack_cleanly(tree, reference, work):
    """Regression: `packds pack` had no SIGTERM handler (stage had one), so a Slurm time limit
    killed it outright, leaving its half-written `.shard-N.tar.tmp`. Now SIGTERM cancels like
    Ctrl-C: one last line `packds: pack interrupted ...` saying what is kept, exit 143 (128 + SIGTERM), the partial shard removed, resumable."""
    ref, dt = reference
    interrupted = 0
    for i, frac in enumerate([0.1, 0.3, 0.5]):
        out = os.path.join(work, f"o{i}.pds")
        p = h.popen_cli("pack", tree.root, "-o", out, *PACK_ARGS)
        h.wait_for(lambda out=out, p=p: os.path.exists(out) or p.poll() is not None, timeout=30, step=0.001)
        time.sleep(frac * dt)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0 or (p.returncode == -signal.SIGTERM and os.path.exists(os.path.join(out, "manifest.json"))):
            continue  # finished first (or was exiting: default handler restored at shutdown)
        assert p.returncode == 143 and re.search(rb"\npackds: pack interrupted[^\n]*\n$", b"\n" + err), (p.returncode, err)
        interrupted += 1
        if os.path.exists(out):
            assert not [n for n in os.listdir(out) if n.endswith(".tmp")], os.listdir(out)
            if not os.path.exists(os.path.join(out, "manifest.json")):
                with pytest.raises(packds.FormatError):
                    packds.open(out)
        r = h.cli("pack", tree.root, "-o", out, *PACK_ARGS, "--resume", timeout=120)
        assert r.returncode == 0, h.show(r)
        h.assert_same_dataset_bytes(ref, out)
    assert interrupted, "every pack finished before its SIGTERM: the test proved nothing"
