"""Sources that change while they are packed (docs/RELIABILITY.md, section G): a file rewritten
while pack reads it is never stored torn, and `--resume` refuses to continue over a source tree
that is no longer the one the completed shards were read from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

import _helpers as h
import packds
from packds import SourceChangedError

# ------------------------------------------------------------------ files rewritten in place

BIG = 24 << 20  # larger than the in-memory limit: the writer streams it
SMALL = 200 << 10


class Flipper:
    """A thread that rewrites files in place between two versions (all bytes A / all bytes B,
    same size), with pwrite in a few chunks, over and over with tiny pauses (and now and then a
    longer one, in which a pack may read a file whole)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.stop = threading.Event()
        self.flips = 0
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        fds = [os.open(p, os.O_WRONLY) for p in self.paths]
        try:
            k = 0
            while not self.stop.is_set():
                k += 1
                byte = b"B" if k % 2 else b"A"
                for fd in fds:
                    size = os.fstat(fd).st_size
                    step = size // 4
                    chunk = byte * step
                    for at in range(0, size, step):
                        os.pwrite(fd, chunk[: size - at], at)
                self.flips += 1
                time.sleep(0.15 if k % 4 == 0 else 0.002 * (k % 4))
        finally:
            for fd in fds:
                os.close(fd)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


@pytest.fixture
def flipping_tree(work):
    root = os.path.join(work, "src")
    for i in range(20):
        h.write(root, f"other/{i:02}", b"o%d" % i * 100)
    h.write(root, b"big.bin", b"A" * BIG)
    h.write(root, b"small.bin", b"A" * SMALL)
    return root


def _whole(data: bytes, size: int) -> bool:
    return data in (b"A" * size, b"B" * size)


def test_g1_a_file_rewritten_while_it_is_read_is_never_stored_torn(flipping_tree, work):
    """G1: every pack either fails naming a file that changed, or stores each file as exactly
    one of its versions (never half old, half new), and `verify` agrees."""
    outcomes = {"stored": 0, "refused": 0}
    t0 = time.monotonic()
    with Flipper([os.path.join(flipping_tree, n) for n in ("big.bin", "small.bin")]) as fl:
        for i in range(20):
            out = os.path.join(work, f"o{i}.pds")
            try:
                packds.pack(flipping_tree, out, threads=2)
            except SourceChangedError as e:
                assert ("big.bin" in str(e) or "small.bin" in str(e)) and "changed" in str(e), e
                assert not os.path.exists(out)
                outcomes["refused"] += 1
                continue
            ds = packds.open(out)
            assert _whole(ds["big.bin"], BIG), f"pack {i}: big.bin stored torn"
            assert _whole(ds["small.bin"], SMALL), f"pack {i}: small.bin stored torn"
            assert ds.verify()["problems"] == []
            del ds
            shutil.rmtree(out)
            outcomes["stored"] += 1
            if time.monotonic() - t0 > 15:
                break
    assert fl.flips > 5, "the files were hardly rewritten during the packs"
    print(outcomes, fl.flips)


def test_g1_with_on_error_skip_a_rewritten_file_is_listed_or_stored_whole(flipping_tree, work):
    """G1 with --on-error skip: the file is left out and listed, or stored whole."""
    t0 = time.monotonic()
    with Flipper([os.path.join(flipping_tree, n) for n in ("big.bin", "small.bin")]):
        for i in range(10):
            out = os.path.join(work, f"o{i}.pds")
            s = packds.pack(flipping_tree, out, threads=2, on_error="skip")
            skipped = {os.path.basename(p): why for p, why in s["skipped"]}
            ds = packds.open(out)
            for name, size in (("big.bin", BIG), ("small.bin", SMALL)):
                if name in skipped:
                    assert "changed" in skipped[name] and name not in ds
                else:
                    assert _whole(ds[name], size), f"pack {i}: {name} stored torn"
            assert len(ds) + len(skipped) == 22 and ds.verify()["problems"] == []
            del ds
            shutil.rmtree(out)
            if time.monotonic() - t0 > 8:
                break


def test_g1_a_file_that_keeps_changing_is_named_by_the_cli(flipping_tree, work):
    """G1: the CLI fails (exit 1) naming the file and what changed, with a hint; nothing is
    left behind. The small file alone is rewritten, nonstop (no pauses)."""
    small = os.path.join(flipping_tree, "small.bin")
    os.remove(os.path.join(flipping_tree, "big.bin"))
    stop = threading.Event()

    def hammer():
        fd = os.open(small, os.O_WRONLY)
        k = 0
        while not stop.is_set():
            k += 1
            os.pwrite(fd, (b"B" if k % 2 else b"A") * SMALL, 0)
        os.close(fd)

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        seen = None
        for _ in range(10):
            out = os.path.join(work, "o.pds")
            r = h.cli("pack", flipping_tree, "-o", out, "--threads", "1")
            if r.returncode == 0:
                ds = packds.open(out)
                assert _whole(ds["small.bin"], SMALL), "small.bin stored torn"
                del ds
                shutil.rmtree(out)
                continue
            seen = h.assert_cli_error(r, small, "changed while it was read")
            assert not os.path.exists(out)
            break
    finally:
        stop.set()
        t.join()
    assert seen is not None, "a file rewritten nonstop was never refused"


# ------------------------------------------------------------------ --resume over a changed tree

ARGS = ("--shard-size", "64K", "--threads", "3", "-q")


@pytest.fixture(scope="module")
def tree(fast_base):
    t = h.make_plain_tree(os.path.join(fast_base, "sources-change-src"), 400, size_range=(500, 3000), seed=13)
    t.keys = h.walk_files(t.root)
    return t


@pytest.fixture(scope="module")
def reference(tree, fast_base):
    out = os.path.join(fast_base, "sources-change-ref.pds")
    r = h.cli("pack", tree.root, "-o", out, *ARGS)
    assert r.returncode == 0, h.show(r)
    return out


@pytest.fixture
def src(tree, work):
    """A private copy of the tree (mtimes kept), packed and killed after 3 shards into OUT."""
    s = os.path.join(work, "src")
    shutil.copytree(tree.root, s)
    return s


def interrupted(src, out, n=3):
    r = h.cli("pack", src, "-o", out, *ARGS, env={"PACKDS_FAULT": f"kill-after-shards:{n}"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def packed_key(out) -> bytes:
    """A key of the first (completed) shard."""
    with open(os.path.join(out, "shard-00000.tar"), "rb") as f:
        return f.read(100).rstrip(b"\0")


def assert_refused(r, out, *needles):
    line = h.assert_cli_error(r, out, *needles)
    assert "--force" in r.stderr.decode(errors="replace")
    assert not os.path.exists(os.path.join(out, "manifest.json")), "left as it was"
    return line


@pytest.mark.faults
def test_g2_resume_with_nothing_changed_is_byte_identical(tree, reference, src, work):
    """G2: an interrupted pack of an unchanged tree resumes to the bytes of a clean pack (a copy
    of the tree keeps its mtimes: the reference was packed from the original)."""
    out = os.path.join(work, "out.pds")
    interrupted(src, out)
    assert sorted(x for x in os.listdir(os.path.join(out, ".pack-state")) if x.endswith(".stamps")) == [f"shard-{i:05d}.stamps" for i in range(3)]
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume", "--json")
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["resumed_shards"] == 3
    h.assert_same_dataset_bytes(reference, out)
    assert packds.open(out).verify()["problems"] == []


@pytest.mark.faults
def test_g3_resume_refuses_another_source(tree, src, work):
    """G3: resuming from another SRC (even an identical copy) is refused, naming both."""
    out = os.path.join(work, "out.pds")
    interrupted(src, out)
    other = os.path.join(work, "other")
    shutil.copytree(src, other)
    r = h.cli("pack", other, "-o", out, *ARGS, "--resume")
    line = assert_refused(r, out, "packed", os.path.realpath(src), os.path.realpath(other))
    assert "not" in line
    # The same source still resumes.
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume")
    assert r.returncode == 0, h.show(r)


@pytest.mark.faults
@pytest.mark.parametrize("change", ["content-and-mtime", "size"])
def test_g4_resume_refuses_when_a_packed_file_changed(tree, src, work, change):
    """G4: a file of a completed shard changed (same size, new content and mtime; or another
    size): refused, naming the file, what changed, and how many."""
    out = os.path.join(work, "out.pds")
    interrupted(src, out)
    key = packed_key(out)
    p = os.path.join(os.fsencode(src), key)
    before = os.stat(p)
    data = h.read(src, key)
    if change == "size":
        with open(p, "ab") as f:
            f.write(b"+")
        want = f"size {len(data)} -> {len(data) + 1}"
    else:
        with open(p, "r+b") as f:
            f.write(bytes(b ^ 0xFF for b in data))
        os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        want = "modified (mtime)"
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume")
    assert_refused(r, out, "the source tree changed since the pack into", "1 already packed file changed", os.fsdecode(p), want)
    # Seven more: counted, the first five named; --force starts over.
    keys = h.walk_files(src)
    for k in keys[1:8]:
        with open(os.path.join(os.fsencode(src), k), "ab") as f:
            f.write(b"+")
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume")
    line = assert_refused(r, out, "changed since the pack into", "8 already packed files changed", "and 3 more")
    assert line.count(" -> ") == 5 - (change != "size")
    r = h.cli("pack", src, "-o", out, *ARGS, "--force")
    assert r.returncode == 0, h.show(r)


@pytest.mark.faults
def test_g5_resume_refuses_changed_filters(tree, src, work):
    """G5: a resume with another --include/--exclude/--follow-symlinks is refused, naming the old
    and new values (--shard-size and format/compression were already refused)."""
    out = os.path.join(work, "out.pds")
    interrupted(src, out)
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume", "--include", "**")
    assert_refused(r, out, "used no --include, --exclude or --follow-symlinks, not --include \"**\"")
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume", "--follow-symlinks")
    assert_refused(r, out, "not --follow-symlinks")


@pytest.mark.faults
@pytest.mark.parametrize("what", ["stamps-file", "options-version"])
def test_g6_resume_refuses_a_state_without_the_source_record(tree, src, work, what):
    """G6: a state written by an older packds (no record of the source files) is not resumed:
    refused with the fix (start over)."""
    out = os.path.join(work, "out.pds")
    interrupted(src, out)
    state = os.path.join(out, ".pack-state")
    if what == "stamps-file":
        os.remove(os.path.join(state, "shard-00001.stamps"))
    else:
        with open(os.path.join(state, "options.json")) as f:
            o = json.load(f)
        del o["version"]
        with open(os.path.join(state, "options.json"), "w") as f:
            json.dump(o, f)
    r = h.cli("pack", src, "-o", out, *ARGS, "--resume")
    assert_refused(r, out, "cannot resume", "older packds")
    r = h.cli("pack", src, "-o", out, *ARGS, "--force")
    assert r.returncode == 0, h.show(r)


@pytest.mark.faults
def test_g7_a_job_array_part_refuses_to_resume_over_a_changed_file(tree, src, work):
    """G7: `pack --part` resumes an interrupted part only over unchanged files (the plan fixes
    the file list; sizes and mtimes may still change)."""
    plan = os.path.join(work, "plan")
    packds.plan(src, plan, shard_size=32 << 10)
    out = os.path.join(work, "out.pds")
    args = ("pack", "--plan", plan, "--part", "0/2", "-o", out, "-q")
    r = h.cli(*args, env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    part = os.path.join(out, "part-0")
    key = packed_key(part)
    with open(os.path.join(os.fsencode(src), key), "ab") as f:
        f.write(b"+")
    r = h.cli(*args)
    h.assert_cli_error(r, "changed since the pack into", os.fsdecode(key))
    shutil.rmtree(part)  # what the hint says: remove the part and run the task again
    r = h.cli(*args, "--json")
    assert r.returncode == 0, h.show(r)
