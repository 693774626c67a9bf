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
    h.assert_cli_error(h.cli("pack", "--plan", plan, "--part", "x", "-o", out), "is not I/N")
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
