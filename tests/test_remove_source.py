"""`pack --remove-source`: the sources of every packed file go once its shard is safely on disk
(and read back), the directories they emptied go at the end, and nothing else ever goes: not
a file that changed, not a directory that still holds anything, not SRC itself, not anything
outside SRC. An interrupted pack leaves every file not yet packed; `--resume` finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import _helpers as h
import packds

ARGS = ("--shard-size", "64K", "--threads", "3", "-q")


def make_tree(root: str, n: int = 240) -> dict[bytes, bytes]:
    """A tree of ``n`` files in nested directories (about ten 64 KiB shards), plus an empty
    directory that was empty before the pack; returns key -> bytes."""
    t = h.make_plain_tree(root, n, size_range=(500, 4000), seed=3, dirs=5)
    h.write(root, b"deep/er/still/leaf.bin", b"leaf" * 100)
    h.write(root, "odd/\u00e9t\u00e9 name.txt".encode(), b"")
    os.makedirs(os.path.join(root, "was-empty"))
    return {k: h.read(root, k) for k in [*t.keys, b"deep/er/still/leaf.bin", "odd/\u00e9t\u00e9 name.txt".encode()]}


def left_files(root) -> list[bytes]:
    return h.walk_files(root) if os.path.isdir(root) else []


def assert_dataset_holds(out: str, want: dict[bytes, bytes]) -> None:
    ds = packds.open(out)
    assert ds.verify()["problems"] == []
    assert len(ds) == len(want)
    for i in range(len(ds)):
        k = ds.key_bytes(i)
        assert ds[i] == want[k], k


def packed_keys(out: str) -> set[bytes]:
    """Keys of the shards an interrupted pack completed (their per-shard indexes)."""
    st = os.path.join(out, ".pack-state")
    keys: set[bytes] = set()
    for n in os.listdir(st):
        if n.endswith(".pdsi"):
            with open(os.path.join(st, n), "rb") as f:
                keys.update(h.index_keys(f.read()))
    return keys


@pytest.fixture
def tree(work):
    src = os.path.join(work, "src")
    return src, make_tree(src)


def test_sources_removed_dataset_round_trips_empty_dirs_go_but_not_src(tree, work):
    src, want = tree
    ref = os.path.join(work, "ref.pds")
    h.pack(src, ref, threads=3)
    out = os.path.join(work, "out.pds")
    s = h.pack(src, out, remove_source=True, threads=3)
    # The same dataset as a pack that keeps the sources, byte for byte (manifest options too).
    h.assert_same_dataset_bytes(ref, out)
    assert h.manifest(ref)["options"] == h.manifest(out)["options"]
    assert s["removed"] == {"files": len(want), "directories": 9, "already_gone": 0, "left": [], "dry_run": False}
    assert_dataset_holds(out, want)
    # SRC stays; every directory that held packed files is gone; the one empty before stays.
    assert sorted(os.listdir(src)) == ["was-empty"]
    # Without the option nothing is removed and `removed` is None.
    src2 = os.path.join(work, "src2")
    want2 = make_tree(src2, 30)
    s = h.pack(src2, os.path.join(work, "out2.pds"))
    assert s["removed"] is None and len(left_files(src2)) == len(want2)


def test_cli_summary_line_and_json(tree, work):
    src, want = tree
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, "--shard-size", "64K", "--remove-source")
    assert r.returncode == 0, h.show(r)
    assert f"packds: removed {len(want)} source files (9 directories)".encode() in r.stderr, h.show(r)
    src2 = os.path.join(work, "src2")
    make_tree(src2, 20)
    r = h.cli("pack", src2, "-o", os.path.join(work, "out2.pds"), "--remove-source", "--json", "-q")
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["removed"]["files"] == 22 and s["removed"]["left"] == [] and s["files"] == 22
    assert r.stderr == b"", h.show(r)


def test_dry_run_lists_removes_nothing_makes_no_dataset(tree, work):
    src, want = tree
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, "--remove-source", "--dry-run")
    assert r.returncode == 0, h.show(r)
    listed = r.stdout.split(b"\n")
    assert listed[-1] == b""
    assert listed[:-1] == [os.path.join(h.b(src), k) for k in sorted(want)]
    assert f"would remove {len(want)} source files".encode() in r.stderr, h.show(r)
    assert not os.path.exists(out)
    assert sorted(left_files(src)) == sorted(want)
    r = h.cli("pack", src, "-o", out, "--remove-source", "--dry-run", "-0", "-q")
    assert r.returncode == 0 and r.stderr == b"", h.show(r)
    assert r.stdout.split(b"\0")[:-1] == listed[:-1]
    # --dry-run alone is refused (it only describes --remove-source).
    h.assert_cli_error(h.cli("pack", src, "-o", out, "--dry-run"), "--dry-run only goes with --remove-source")
    assert not os.path.exists(out)


def test_a_single_file_source_is_removed(work):
    d = os.path.join(work, "d")
    p = h.write(d, "one.bin", b"1" * 5000)
    h.write(d, "other.bin", b"stays")
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", p, "-o", out, "--remove-source", "--json", "-q")
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["removed"]["files"] == 1
    assert not os.path.exists(p) and sorted(os.listdir(d)) == ["other.bin"]
    ds = packds.open(out)
    assert list(ds.keys()) == ["one.bin"] and ds[0] == b"1" * 5000


def test_a25_symlink_out_of_src_is_not_followed_and_follow_symlinks_is_refused(tree, work):
    src, want = tree
    outside = os.path.join(work, "outside")
    h.write(outside, "keep.txt", b"outside SRC")
    h.write(outside, "dir/keep2.txt", b"outside SRC too")
    os.symlink(os.path.join(outside, "keep.txt"), os.path.join(src, "c00", "link-to-file"))
    os.symlink(os.path.join(outside, "dir"), os.path.join(src, "link-to-dir"))
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, "--follow-symlinks", "--remove-source")
    h.assert_cli_error(r, "--remove-source does not go with --follow-symlinks")
    assert not os.path.exists(out) and sorted(left_files(src)) == sorted(want)
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", "--json")
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["removed"]["files"] == len(want)
    assert sorted(x["path"] for x in s["skipped"]) == sorted(os.path.join(src, n) for n in ("c00/link-to-file", "link-to-dir"))
    # The links stay (they were not packed), and so does what they point to; c00 holds its link.
    assert os.path.islink(os.path.join(src, "c00", "link-to-file")) and os.path.islink(os.path.join(src, "link-to-dir"))
    assert h.read(outside, b"keep.txt") == b"outside SRC" and h.read(outside, b"dir/keep2.txt") == b"outside SRC too"
    assert sorted(os.listdir(src)) == ["c00", "link-to-dir", "was-empty"]


@pytest.mark.faults
def test_g8_a_file_changed_after_it_was_read_stays_and_is_reported(work):
    """Live: the progress callback changes the first file once it is written into the open
    first shard (reads slowed down so that shard takes seconds); that file is left, reported,
    and the dataset holds it as it was read."""
    src = os.path.join(work, "src")
    want = {b"a/%04d.bin" % i: os.urandom(300) for i in range(120)}
    for k, v in want.items():
        h.write(src, k, v)
    first = os.path.join(src, "a", "0000.bin")
    out = os.path.join(work, "out.pds")
    code = (
        "import json, os, sys, packds\n"
        "changed = []\n"
        f"first = {first!r}\n"
        "def progress(phase, done, total, nbytes):\n"
        "    if phase == 1 and done >= 2 and not changed:\n"
        "        with open(first, 'ab') as f:\n"
        "            f.write(b'appended after it was read')\n"
        "        changed.append(done)\n"
        f"s = packds.pack({src!r}, {out!r}, remove_source=True, threads=1, progress=progress)\n"
        "print(json.dumps({'changed': changed, 'removed': s['removed']}))\n"
    )
    env = {**os.environ, "PACKDS_FAULT": "pack-slow-us:25000"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["changed"], "the callback never ran while the first shard was open"
    assert s["removed"]["files"] == len(want) - 1
    assert s["removed"]["left"] == [[first, "changed since it was packed (size, mtime, ctime): not removed"]]
    assert left_files(src) == [b"a/0000.bin"]
    assert h.read(src, b"a/0000.bin") == want[b"a/0000.bin"] + b"appended after it was read"
    assert_dataset_holds(out, want)


@pytest.mark.faults
@pytest.mark.parametrize("change", ["append", "touch"])
def test_g8_a_packed_file_changed_before_a_resume_stays_and_is_reported(tree, work, change):
    """The same through a resume: killed right after the first removal, a file of that
    completed shard (still there) is changed; the resume removes the rest, leaves that one and
    says so."""
    src, want = tree
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", env={"PACKDS_FAULT": "kill-in-remove:1"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    still = sorted(packed_keys(out) & set(left_files(src)))
    assert len(still) > 3
    victim = still[3]
    p = os.path.join(h.b(src), victim)
    assert os.path.exists(p)
    if change == "append":
        with open(p, "ab") as f:
            f.write(b"more")
    else:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    r = h.cli("pack", src, "-o", out, "--shard-size", "64K", "--threads", "3", "--remove-source", "--resume")
    assert r.returncode == 0, h.show(r)
    assert f"packds: left {os.fsdecode(p)}: changed since it was packed".encode() in r.stderr, h.show(r)
    assert b"1 left in place" in r.stderr, h.show(r)
    assert left_files(src) == [victim]
    assert_dataset_holds(out, want)


STAGES = [
    "kill-before-remove:1",
    "kill-before-remove:3",
    "kill-in-remove:1",
    "kill-in-remove:40",
    "kill-after-shards:2",
    "kill-after-files:100",
    "kill-before-manifest:1",
]


@pytest.mark.faults
@pytest.mark.parametrize("fmt", ["tar", "h5"])
@pytest.mark.parametrize("stage", STAGES)
def test_b11_b12_b13_killed_at_every_stage_then_resume(tree, work, stage, fmt):
    src, want = tree
    if fmt == "h5":
        pytest.importorskip("h5py", reason="--format h5 writes through h5py")
    out = os.path.join(work, "out.pds")
    args = (*ARGS, "--format", fmt, "--remove-source")
    r = h.cli("pack", src, "-o", out, *args, env={"PACKDS_FAULT": stage})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # Nothing that is not in a completed shard was removed.
    present = set(left_files(src))
    removed = set(want) - present
    assert removed <= packed_keys(out), sorted(removed - packed_keys(out))[:5]
    if stage.startswith("kill-before-remove"):
        # The shard renamed last was not read back: none of its files went.
        n = int(stage.split(":")[1])
        shards = sorted(x for x in os.listdir(out) if x.startswith("shard-"))
        assert len(shards) == n
        with open(os.path.join(out, shards[-1]), "rb") as f:
            assert f.read(1)  # the shard file is there...
        assert not os.path.exists(os.path.join(out, ".pack-state", f"shard-{n - 1:05d}.pdsi"))  # ...but not kept
    if stage == "kill-before-manifest:1":
        assert present == set() and sorted(os.listdir(src)) == ["was-empty"]
    # Resuming without --remove-source is refused: those sources are gone.
    r = h.cli("pack", src, "-o", out, *ARGS, "--format", fmt, "--resume")
    h.assert_cli_error(r, "was run with --remove-source")
    r = h.cli("pack", src, "-o", out, *args, "--resume", "--json")
    assert r.returncode == 0, h.show(r)
    s = json.loads(r.stdout)
    assert s["files"] == len(want)
    assert s["removed"]["files"] + s["removed"]["already_gone"] == len(want), s["removed"]
    assert s["removed"]["files"] == len(present) and s["removed"]["left"] == []
    assert_dataset_holds(out, want)
    assert sorted(os.listdir(src)) == ["was-empty"]
    assert not os.path.exists(os.path.join(out, ".pack-state"))


@pytest.mark.faults
def test_b11_b12_killed_twice_then_resume_from_elsewhere(tree, work):
    """Killed mid-removal, then again while resuming; the last resume runs from another
    directory with a relative SRC: it packs from the recorded list, not a new walk."""
    src, want = tree
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", env={"PACKDS_FAULT": "kill-in-remove:30"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    # --force would delete the only copy of the 30 files removed: refused.
    before = left_files(src)
    for extra in [("--remove-source",), ()]:
        r = h.cli("pack", src, "-o", out, *ARGS, "--force", *extra)
        h.assert_cli_error(r, "holds an interrupted pack run with --remove-source", "will not delete it")
    assert left_files(src) == before and packed_keys(out)
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", "--resume", env={"PACKDS_FAULT": "kill-in-remove:50"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert set(want) - set(left_files(src)) <= packed_keys(out)
    other = os.path.join(work, "other")
    make_tree(other, 10)
    h.assert_cli_error(h.cli("pack", other, "-o", out, *ARGS, "--remove-source", "--resume"), "the interrupted pack in", "not " + other)
    r = h.cli("pack", os.path.relpath(src, work), "-o", out, *ARGS, "--remove-source", "--resume", cwd=work)
    assert r.returncode == 0, h.show(r)
    assert_dataset_holds(out, want)
    assert sorted(os.listdir(src)) == ["was-empty"]


@pytest.mark.faults
def test_b13_all_sources_gone_single_file_root_then_resume(work):
    """A single-file source removed before the kill: the resume still knows it."""
    d = os.path.join(work, "d")
    p = h.write(d, "only.bin", b"z" * 3000)
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", p, "-o", out, "-q", "--remove-source", env={"PACKDS_FAULT": "kill-before-manifest:1"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    assert not os.path.exists(p)
    r = h.cli("pack", p, "-o", out, "--remove-source", "--resume", "--json", "-q")
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["removed"]["already_gone"] == 1
    assert packds.open(out)[0] == b"z" * 3000


def test_b14_read_only_source_is_refused_before_packing_as_an_unprivileged_user(work):
    prefix, uid = h.unprivileged()
    with h.reachable_dir() as base:
        src = os.path.join(base, "src")
        want = make_tree(src, 40)
        outp = os.path.join(base, "outp")
        os.makedirs(outp)
        h.chown_tree(src, uid)
        h.chown_tree(outp, uid)
        ro = os.path.join(src, "c02")
        os.chmod(ro, 0o555)
        out = os.path.join(outp, "ds.pds")
        r = h.cli("pack", src, "-o", out, "--remove-source", "--shard-size", "64K", prefix=prefix)
        line = h.assert_cli_error(r, ro, "--remove-source cannot remove files from", "nothing was packed or removed")
        assert "Permission denied" in line
        assert b"drop --remove-source" in r.stderr
        assert sorted(left_files(src)) == sorted(want)
        assert not os.path.exists(out), os.listdir(out)
        r = h.cli("pack", src, "-o", out, "--remove-source", "--dry-run", prefix=prefix)
        h.assert_cli_error(r, ro)
        # Writable again: the same user packs and frees the tree.
        os.chmod(ro, 0o755)
        r = h.cli("pack", src, "-o", out, "--remove-source", "--shard-size", "64K", "--json", "-q", prefix=prefix)
        assert r.returncode == 0, h.show(r)
        assert json.loads(r.stdout)["removed"]["files"] == len(want)
        assert sorted(os.listdir(src)) == ["was-empty"]
        assert_dataset_holds(out, want)


def test_job_array_parts_remove_their_own_files_and_need_a_plan(tree, work):
    src, want = tree
    plan = os.path.join(work, "plan.pdsplan")
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, "--part", "0/2", "--remove-source")
    h.assert_cli_error(r, "--part with --remove-source needs --plan")
    assert sorted(left_files(src)) == sorted(want)
    r = h.cli("plan", src, "-o", plan, "--shard-size", "64K", "--parts", "2", "-q")
    assert r.returncode == 0, h.show(r)
    r = h.cli("pack", "-o", out, "--plan", plan, "--part", "1", "--remove-source", "--dry-run")
    assert r.returncode == 0, h.show(r)
    part1 = r.stdout.split(b"\n")[:-1]
    assert 0 < len(part1) < len(want)
    r = h.cli("pack", "-o", out, "--plan", plan, "--part", "1", "--remove-source", "-q")
    assert r.returncode == 0, h.show(r)
    assert set(left_files(src)) == set(want) - {os.path.relpath(p, h.b(src)) for p in part1}
    r = h.cli("pack", "-o", out, "--plan", plan, "--part", "0", "--remove-source", "-q")
    assert r.returncode == 0, h.show(r)
    r = h.cli("merge", out, "-q")
    assert r.returncode == 0, h.show(r)
    assert_dataset_holds(out, want)
    assert sorted(os.listdir(src)) == ["was-empty"]


def test_hard_links_and_compressed_members_with_a_dictionary(work):
    """Two names of one inode: removing the first moves the ctime of the second, which is not
    a change; compressed members (with a trained dictionary) are decoded when read back."""
    src = os.path.join(work, "src")
    want = {b"t/%03d.json" % i: (b'{"label": %d, "text": "%s"}' % (i, b"lorem ipsum " * (20 + i % 7))) for i in range(150)}
    for k, v in want.items():
        h.write(src, k, v)
    os.makedirs(os.path.join(src, "z"))
    os.link(os.path.join(src, "t", "007.json"), os.path.join(src, "z", "hard-link.json"))
    want[b"z/hard-link.json"] = want[b"t/007.json"]
    out = os.path.join(work, "out.pds")
    s = h.pack(src, out, remove_source=True, compress="zstd", zstd_dict=4096)
    assert s["removed"]["left"] == [] and s["removed"]["files"] == len(want)
    assert packds.open(out).manifest["compression"]["zstd_dict"]
    assert_dataset_holds(out, want)
    assert os.listdir(src) == []


@pytest.mark.faults
def test_b15_a_shard_that_reads_back_wrong_stops_the_removal(tree, work):
    """A completed shard damaged on disk (same size) before a resume: the resume reads it back
    before removing anything of it, refuses naming it, and removes nothing more."""
    src, want = tree
    out = os.path.join(work, "out.pds")
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", env={"PACKDS_FAULT": "kill-in-remove:1"})
    assert r.returncode == -signal.SIGKILL, h.show(r)
    before = left_files(src)
    shard = os.path.join(out, "shard-00000.tar")
    with open(shard, "r+b") as f:
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))
    r = h.cli("pack", src, "-o", out, *ARGS, "--remove-source", "--resume")
    h.assert_cli_error(r, shard, "read back from disk, it does not match what was written", "no source file of it was removed")
    assert left_files(src) == before
    assert not os.path.exists(os.path.join(out, ".pack-state", "shard-00000.pdsi"))


def test_b16_a_full_inode_quota_is_freed_as_the_pack_goes(work):
    """The file-count quota case: SRC and DATASET on one filesystem with 10 inodes to spare.
    A plain pack runs out of inodes (ENOSPC); with --remove-source each shard frees its files
    before the next one needs inodes, and the pack completes."""
    mnt = os.path.join(work, "mnt")
    with h.tmpfs(mnt, "size=64M,nr_inodes=4000"):
        src = os.path.join(mnt, "src")
        want = make_tree(src, 300)
        st = os.statvfs(mnt)
        used = st.f_files - st.f_ffree
        subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 10}", mnt], check=True)
        out = os.path.join(mnt, "out.pds")
        r = h.cli("pack", src, "-o", out, *ARGS)
        h.assert_cli_error(r, "no space left on device")
        r = h.cli("pack", src, "-o", out, *ARGS, "--force", "--remove-source", "--json")
        assert r.returncode == 0, h.show(r)
        assert json.loads(r.stdout)["removed"]["files"] == len(want)
        assert_dataset_holds(out, want)
        assert sorted(os.listdir(src)) == ["was-empty"]
