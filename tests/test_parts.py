"""Partitioned packing (issue: job arrays): `packds plan`, `pack --part I/N`, `packds merge`.
The merged dataset must equal a single-process pack of the same tree byte for byte (index and
shards), whatever the format and compression; merge refuses missing or unfinished parts, a
failed part reruns alone, and merge is atomic and idempotent."""

from __future__ import annotations

import os
import random
import shutil

import pytest

import _helpers as h
import packds
from packds import FormatError, UsageError


@pytest.fixture(scope="module")
def tree(fast_base):
    rng = random.Random(11)
    root = os.path.join(fast_base, "parts-src")
    for i in range(1500):
        kind = i % 3
        data = rng.randbytes(rng.randrange(0, 3000)) if kind == 0 else (b"caption %d: a dog on the grass " % i) * rng.randrange(1, 60)
        h.write(root, f"c{i % 17:02}/{i:05}.{'bin' if kind == 0 else 'txt'}", data)
    h.write(root, "empty", b"")
    return root


OPTS = {
    "tar": dict(shard_size=96 << 10),
    "tar-zstd-dict": dict(shard_size=96 << 10, compress="zstd", zstd_dict=4096),
    "h5-auto": dict(shard_size=96 << 10, format="h5", compress="auto"),
}


@pytest.mark.parametrize("name", list(OPTS))
def test_plan_parts_merge_equals_a_single_pack(tree, work, name):
    opts = OPTS[name]
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, **opts)
    plan = os.path.join(work, "plan")
    s = packds.plan(tree, plan, **opts)
    assert s["files"] == 1501 and s["shards"] == len(packds.open(single).manifest["shards"])
    out = os.path.join(work, "out.pds")
    for p in [2, 0, 3, 1]:  # any order, as array tasks finish
        r = packds.pack([], out, plan=plan, part=f"{p}/4")
        assert r["files"] > 0
    with pytest.raises(FormatError, match="not merged yet") as ei:
        packds.open(out)
    assert "packds merge" in ei.value.hint
    m = packds.merge(out)
    assert (m["parts"], m["samples"], m["already_merged"]) == (4, 1501, False)
    h.assert_same_dataset_bytes(single, out)
    assert sorted(n for n in os.listdir(out) if n.startswith("part-")) == []
    ds = packds.open(out)
    assert ds.verify(deep=True)["problems"] == []
    assert ds.manifest["options"]["merged_parts"] == 4
    assert packds.merge(out)["already_merged"]


def test_parts_without_a_plan_walk_the_tree_themselves(tree, work):
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=64 << 10)
    out = os.path.join(work, "out.pds")
    for p in range(3):
        r = h.cli("pack", tree, "-o", out, "--part", f"{p}/3", "--shard-size", "64K", "-q")
        assert r.returncode == 0, h.show(r)
    r = h.cli("merge", out)
    assert r.returncode == 0 and b"merged 3 part(s)" in r.stderr, h.show(r)
    h.assert_same_dataset_bytes(single, out)


def test_more_parts_than_shards(tree, work):
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=1 << 30)  # one shard
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan)
    out = os.path.join(work, "out.pds")
    for p in range(5):
        packds.pack([], out, plan=plan, part=(p, 5))
    assert packds.merge(out)["shards"] == 1
    h.assert_same_dataset_bytes(single, out)


@pytest.mark.faults
def test_missing_and_unfinished_parts_are_named_and_a_failed_part_reruns_alone(tree, work):
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan, shard_size=32 << 10)
    out = os.path.join(work, "out.pds")
    args = lambda p: ("pack", "--plan", plan, "--part", f"{p}/4", "-o", out, "-q")  # noqa: E731
    for p in (0, 2):
        assert h.cli(*args(p)).returncode == 0
    r = h.cli("merge", out)
    h.assert_cli_error(r, "part(s) 1, 3 of 4", "missing or unfinished")
    # Part 1 dies after two of its shards; merge names it as unfinished.
    r = h.cli(*args(1), env={"PACKDS_FAULT": "kill-after-shards:2"})
    assert r.returncode != 0
    h.assert_cli_error(h.cli("merge", out), "part(s) 1, 3 of 4")
    # The same command again resumes it (the completed shards are kept).
    r = h.cli(*args(1), "--json")
    assert r.returncode == 0, h.show(r)
    import json

    assert json.loads(r.stdout)["resumed_shards"] == 2
    # A finished part rerun is a no-op.
    r = h.cli(*args(0), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["already_complete"], h.show(r)
    assert h.cli(*args(3)).returncode == 0
    assert packds.merge(out)["samples"] == 1501
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=32 << 10)
    h.assert_same_dataset_bytes(single, out)


def test_an_interrupted_merge_finishes_on_rerun(tree, work):
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan, shard_size=32 << 10)
    out = os.path.join(work, "out.pds")
    for p in range(3):
        packds.pack([], out, plan=plan, part=(p, 3))
    # As if merge had been killed after moving part 1's shards: they are in OUT already.
    for n in os.listdir(os.path.join(out, "part-1")):
        if n.startswith("shard-"):
            os.rename(os.path.join(out, "part-1", n), os.path.join(out, n))
    with pytest.raises(FormatError):
        packds.open(out)
    assert packds.merge(out)["samples"] == 1501
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=32 << 10)
    h.assert_same_dataset_bytes(single, out)


def test_parts_of_different_plans_are_refused(tree, work):
    a, b = os.path.join(work, "a"), os.path.join(work, "b")
    packds.plan(tree, a, shard_size=32 << 10)
    packds.plan(tree, b, shard_size=48 << 10)
    out = os.path.join(work, "out.pds")
    packds.pack([], out, plan=a, part=(0, 2))
    packds.pack([], out, plan=b, part=(1, 2))
    with pytest.raises(UsageError, match="different plans"):
        packds.merge(out)
    with pytest.raises(UsageError, match="another plan"):
        packds.pack([], out, plan=b, part=(0, 2))


def test_bad_arguments_and_a_damaged_plan(tree, work):
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan)
    out = os.path.join(work, "out.pds")
    h.assert_cli_error(h.cli("pack", "--plan", plan, "--part", "4/4", "-o", out), "--part 4/4 is out of range")
    h.assert_cli_error(h.cli("pack", "--plan", plan, "--part", "x", "-o", out), "is not I or I/N")
    r = h.cli("pack", "-o", out)
    assert r.returncode == 2 and b"pack needs SRC" in r.stderr, h.show(r)
    r = h.cli("pack", "--plan", plan, "-o", out)
    assert r.returncode == 2 and b"needs --part" in r.stderr, h.show(r)
    h.assert_cli_error(h.cli("merge", os.path.join(work, "nothing-here")), "")
    b = bytearray(open(plan, "rb").read())
    b[len(b) // 2] ^= 1
    open(plan, "wb").write(b)
    r = h.cli("pack", "--plan", plan, "--part", "0/2", "-o", out)
    h.assert_cli_error(r, "not a valid packds plan", plan)
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.faults
@pytest.mark.parametrize("kill_after", [1, 3, 5])
def test_merge_killed_after_moving_n_shards_finishes_on_rerun(tree, work, kill_after):
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan, shard_size=32 << 10)
    out = os.path.join(work, "out.pds")
    for p in range(3):
        packds.pack([], out, plan=plan, part=(p, 3))
    r = h.cli("merge", out, env={"PACKDS_FAULT": f"kill-in-merge:{kill_after}"})
    assert r.returncode == -9, h.show(r)
    with pytest.raises(FormatError):
        packds.open(out)  # no manifest yet: nothing opens
    r = h.cli("merge", out)
    assert r.returncode == 0, h.show(r)
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=32 << 10)
    h.assert_same_dataset_bytes(single, out)


def _parts(tree, work, n=3, **opts):
    plan = os.path.join(work, "plan")
    packds.plan(tree, plan, shard_size=96 << 10, **opts)
    out = os.path.join(work, "out.pds")
    for p in range(n):
        packds.pack([], out, plan=plan, part=f"{p}/{n}")
    return out


def _part_shards(out, p):
    d = os.path.join(out, f"part-{p}")
    return d, sorted(n for n in os.listdir(d) if n.startswith("shard-"))


def _snapshot(out):
    return sorted((dp, sorted(fn)) for dp, _, fn in os.walk(out))


def test_merge_checks_every_part_before_moving_anything(tree, work):
    """A truncated part shard: merge refuses, names the part and how to redo it, moves nothing
    and leaves every part in place (it used to publish a dataset that does not open and delete
    the parts)."""
    out = _parts(tree, work)
    d, shards = _part_shards(out, 1)
    with open(os.path.join(d, shards[-1]), "r+b") as f:
        f.truncate(1000)
    before = _snapshot(out)
    r = h.cli("merge", out)
    h.assert_cli_error(r, "part 1 of 3", shards[-1], "damaged")
    assert "rerun array task 1" in r.stderr.decode() and "part-1" in r.stderr.decode()
    assert _snapshot(out) == before
    with pytest.raises(FormatError, match="not merged yet"):
        packds.open(out)


def test_merge_verify_catches_a_flipped_byte_that_plain_merge_cannot_see(tree, work):
    out = _parts(tree, work)
    d, shards = _part_shards(out, 2)
    p = os.path.join(d, shards[0])
    with open(p, "r+b") as f:
        f.seek(700)
        c = f.read(1)
        f.seek(700)
        f.write(bytes([c[0] ^ 1]))
    before = _snapshot(out)
    r = h.cli("merge", out, "--verify")
    h.assert_cli_error(r, "part 2 of 3", "checksum")
    assert _snapshot(out) == before
    # Repair by redoing the part, as the hint says; then merge (with --verify) works.
    shutil.rmtree(d)
    packds.pack([], out, plan=os.path.join(work, "plan"), part="2/3")
    r = h.cli("merge", out, "--verify")
    assert r.returncode == 0, h.show(r)
    assert packds.open(out).verify(deep=True)["problems"] == []


@pytest.mark.parametrize("name", ["../../outside.tar", "shard-00000.tar/../../x", "/etc/passwd"])
def test_merge_refuses_a_part_manifest_naming_files_outside_it(tree, work, name):
    out = _parts(tree, work)
    outside = os.path.join(work, "outside.tar")
    h.write(work, "outside.tar", b"x" * 4096)
    d, _ = _part_shards(out, 0)
    mp = os.path.join(d, "manifest.json")
    m = h.manifest(d)
    m["shards"][0]["file"] = name
    with open(mp, "w") as f:
        __import__("json").dump(m, f)
    before = _snapshot(out)
    r = h.cli("merge", out)
    h.assert_cli_error(r, "part 0 of 3")
    assert _snapshot(out) == before
    assert os.path.exists(outside)


def test_merged_dataset_lists_the_files_the_walk_skipped(tree, work):
    """Symlinks and special files skipped by the walk are listed in the merged manifest as in a
    single pack, whichever part holds them, even when part 0 is empty."""
    src = os.path.join(work, "src")
    shutil.copytree(tree, src)
    os.symlink("c01", os.path.join(src, "link-dir"))
    os.symlink("nowhere", os.path.join(src, "zz-broken"))
    os.mkfifo(os.path.join(src, "fifo"))
    single = os.path.join(work, "single.pds")
    packds.pack(src, single, shard_size=96 << 10)
    want = sorted((s["path"], s["reason"]) for s in packds.open(single).manifest["skipped"])
    assert len(want) == 3
    for n in (3, 80):  # 80 parts: more parts than shards, some empty
        plan = os.path.join(work, f"plan{n}")
        packds.plan(src, plan, shard_size=96 << 10)
        out = os.path.join(work, f"out{n}.pds")
        for p in range(n):
            packds.pack([], out, plan=plan, part=f"{p}/{n}")
        packds.merge(out)
        got = sorted((s["path"], s["reason"]) for s in packds.open(out).manifest["skipped"])
        assert got == want, n


def test_a_plan_for_n_parts_lets_each_task_give_only_its_number(tree, work):
    plan = os.path.join(work, "plan")
    s = packds.plan(tree, plan, shard_size=96 << 10, parts=3)
    assert s["parts"] == 3
    out = os.path.join(work, "out.pds")
    for p in (2, 0, 1):  # `--part $SLURM_ARRAY_TASK_ID`, also for a task rerun alone
        r = h.cli("pack", "--plan", plan, "--part", str(p), "-o", out, "-q")
        assert r.returncode == 0, h.show(r)
    assert packds.merge(out)["parts"] == 3
    single = os.path.join(work, "single.pds")
    packds.pack(tree, single, shard_size=96 << 10)
    h.assert_same_dataset_bytes(single, out)
    # A task that names another N, or a part out of range, is refused with the plan's count.
    out2 = os.path.join(work, "out2.pds")
    h.assert_cli_error(h.cli("pack", "--plan", plan, "--part", "1/4", "-o", out2), "made for 3 parts")
    h.assert_cli_error(h.cli("pack", "--plan", plan, "--part", "3", "-o", out2), "--part 3/3 is out of range")
    # Without --parts, --part I alone cannot know N.
    plain = os.path.join(work, "plain.plan")
    packds.plan(tree, plain, shard_size=96 << 10)
    h.assert_cli_error(h.cli("pack", "--plan", plain, "--part", "1", "-o", out2), "does not say how many parts")


def test_plan_warns_when_parts_outnumber_shards_and_names_a_shard_size(tree, work):
    r = h.cli("plan", tree, "-o", os.path.join(work, "plan"), "--parts", "8")
    assert r.returncode == 0, h.show(r)
    err = r.stderr.decode()
    m = __import__("re").search(r"the plan has 1 shard\(s\) for 8 parts: 7 array task\(s\) would have nothing to pack; plan again with --shard-size (\S+)", err)
    assert m, err
    r = h.cli("plan", tree, "-o", os.path.join(work, "plan2"), "--parts", "8", "--shard-size", m.group(1))
    assert r.returncode == 0 and "warning" not in r.stderr.decode(), h.show(r)
    assert packds.plan(tree, os.path.join(work, "plan3"), parts=8, shard_size=__import__("packds.cli").cli.parse_size(m.group(1)))["shards"] >= 8


def test_merge_refuses_a_part_whose_index_is_a_fifo_without_hanging(tree, work):
    out = _parts(tree, work)
    ip = os.path.join(out, "part-1", "index.pdsi")
    os.remove(ip)
    os.mkfifo(ip)
    before = _snapshot(out)
    r = h.cli("merge", out, timeout=30)
    h.assert_cli_error(r, "part 1 of 3", "not a regular file")
    assert _snapshot(out) == before
