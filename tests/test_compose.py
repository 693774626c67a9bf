"""packds concat and packds subset: datasets made of other datasets' shards, no data copied."""

from __future__ import annotations

import os
import tarfile

import pytest

import _helpers as h
import packds
from packds import UsageError


def _pack(work, name: str, keys, **options) -> str:
    src = os.path.join(work, f"{name}-src")
    for k in keys:
        h.write(src, k, f"{name}:{k}".encode() * 40)
    out = os.path.join(work, f"{name}.pds")
    packds.pack(src, out, shard_size=8 << 10, **options)
    return out


def _content(path) -> dict[str, bytes]:
    with packds.open(path) as ds:
        return {ds.key(i): ds[i] for i in range(len(ds))}


def test_concat_of_disjoint_datasets_reads_every_sample_and_verifies(work):
    a = _pack(work, "a", [f"x/{i:03}" for i in range(60)])
    b = _pack(work, "b", [f"y/{i:03}" for i in range(40)], compress="zstd")
    c = os.path.join(work, "c.pds")
    s = packds.concat([a, b], c)
    assert s["samples"] == 100 and s["shards_left_out"] == 0
    assert _content(c) == {**_content(a), **_content(b)}
    r = h.cli("verify", c, "--deep")
    assert r.returncode == 0, h.show(r)
    # Nothing copied: the shards are links to the sources' shards.
    assert all(os.path.islink(os.path.join(c, f)) for f in os.listdir(c) if f.endswith(".tar"))


def test_concat_refuses_colliding_keys_naming_both_and_prefixes_fix_it(work):
    a = _pack(work, "a", ["k1", "k2", "shared"])
    b = _pack(work, "b", ["k3", "shared"])
    c = os.path.join(work, "c.pds")
    r = h.cli("concat", a, b, "-o", c)
    h.assert_cli_error(r, '"shared"', a, b)
    assert b"--prefix" in r.stderr and not os.path.exists(c)
    r = h.cli("concat", a, b, "-o", c, "--prefix-with-name")
    assert r.returncode == 0, h.show(r)
    got = _content(c)
    assert got["a/shared"] == b"a:shared" * 40 and got["b/shared"] == b"b:shared" * 40 and len(got) == 5
    with pytest.raises(UsageError, match="1 prefixes for 2 datasets") as e:
        packds.concat([a, b], os.path.join(work, "d.pds"), prefixes=["a/"])
    assert "one --prefix per dataset" in e.value.hint


def test_concat_with_copy_and_hard_links_survives_removing_the_sources(work):
    for mode in ("copy", "hard"):
        a = _pack(work, f"a{mode}", ["1", "2"])
        b = _pack(work, f"b{mode}", ["3"])
        c = os.path.join(work, f"c-{mode}.pds")
        packds.concat([a, b], c, link=mode)
        want = {**_content(a), **_content(b)}
        import shutil

        shutil.rmtree(a)
        shutil.rmtree(b)
        assert _content(c) == want
        assert h.cli("verify", c).returncode == 0


def test_concat_refuses_mixed_formats_and_different_dictionaries(work):
    a = _pack(work, "a", [f"a{i}" for i in range(30)])
    b = _pack(work, "b", [f"b{i}" for i in range(30)], format="h5")
    with pytest.raises(UsageError, match="has tar shards, .* has h5 shards"):
        packds.concat([a, b], os.path.join(work, "c.pds"))
    d1 = _pack(work, "d1", [f"d{i}.txt" for i in range(400)], compress="zstd", zstd_dict=4096)
    d2 = _pack(work, "d2", [f"e{i}.txt" for i in range(400)], compress="zstd", zstd_dict=4096)
    with pytest.raises(UsageError, match="different zstd dictionaries"):
        packds.concat([d1, d2], os.path.join(work, "c.pds"))


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.5, 3), (0.9, 11)])
def test_subset_fraction_and_complement_are_disjoint_and_whole(work, fraction, seed):
    a = _pack(work, "a", [f"d{i % 7}/s{i:04}" for i in range(500)])
    tr, va = os.path.join(work, "train.pds"), os.path.join(work, "val.pds")
    r1 = h.cli("subset", a, "-o", va, "--fraction", str(fraction), "--seed", str(seed))
    r2 = h.cli("subset", a, "-o", tr, "--fraction", str(fraction), "--seed", str(seed), "--complement")
    assert r1.returncode == 0 and r2.returncode == 0, (h.show(r1), h.show(r2))
    t, v, whole = _content(tr), _content(va), _content(a)
    assert not set(t) & set(v) and {**t, **v} == whole
    assert abs(len(v) - fraction * 500) < 60
    # The same options give the same split.
    again = packds.subset(a, os.path.join(work, "again.pds"), fraction=fraction, seed=seed)
    assert again["samples"] == len(v) and set(_content(os.path.join(work, "again.pds"))) == set(v)


def test_subset_by_globs_and_keys_links_and_stages_only_the_shards_it_needs(work):
    a = _pack(work, "a", [f"{c}/s{i:03}" for c in ("cat", "dog", "eel") for i in range(80)])
    dogs = os.path.join(work, "dogs.pds")
    s = packds.subset(a, dogs, include=["dog/*"])
    assert s["samples"] == 80 and s["shards_left_out"] > 0
    with packds.open(a) as ds:
        total = len(ds.manifest["shards"])
    linked = [f for f in os.listdir(dogs) if f.endswith(".tar")]
    assert len(linked) == s["shards"] < total
    staged = packds.stage(dogs, to=os.path.join(work, "node"))
    assert sorted(f for f in os.listdir(staged) if f.endswith(".tar")) == sorted(linked)
    assert _content(staged) == {k: v for k, v in _content(a).items() if k.startswith("dog/")}
    keys = os.path.join(work, "keys.txt")
    with open(keys, "w") as f:
        f.write("cat/s001\neel/s079\n")
    r = h.cli("subset", a, "-o", os.path.join(work, "two.pds"), "--keys", keys)
    assert r.returncode == 0, h.show(r)
    assert set(_content(os.path.join(work, "two.pds"))) == {"cat/s001", "eel/s079"}
    with open(keys, "a") as f:
        f.write("nope\n")
    h.assert_cli_error(h.cli("subset", a, "-o", os.path.join(work, "three.pds"), "--keys", keys), '"nope"')
    h.assert_cli_error(h.cli("subset", a, "-o", os.path.join(work, "none.pds"), "--include", "zzz/*"), "picks no sample")


def test_a_subset_of_a_tar_dataset_is_readable_by_tarfile(work):
    """The linked shards are the parent's own tar files: tarfile reads them as they are."""
    a = _pack(work, "a", [f"s{i:03}" for i in range(50)])
    sub = os.path.join(work, "sub.pds")
    packds.subset(a, sub, exclude=["s00*"])
    names = set()
    for f in sorted(os.listdir(sub)):
        if f.endswith(".tar"):
            with tarfile.open(os.path.join(sub, f)) as t:
                names |= set(t.getnames())
    assert set(_content(sub)) <= names


def test_concat_of_a_changed_source_is_refused_by_open(work):
    """The links point at the source shards: a source packed again (other sizes) makes the
    combined dataset fail to open, naming the shard, rather than read wrong bytes."""
    a = _pack(work, "a", ["k1", "k2"])
    c = os.path.join(work, "c.pds")
    packds.concat([a], c, prefixes=["p/"])
    src = os.path.join(work, "a-src")
    h.write(src, "k1", b"different and longer content" * 100)
    packds.pack(src, a, shard_size=8 << 10, force=True)
    with pytest.raises(packds.FormatError):
        with packds.open(c) as ds:
            ds.verify()
            raise packds.FormatError("verify did not notice")  # pragma: no cover


def _readme_block(name: str) -> str:
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    return re.search(rf"<!-- snippet: {name} -->\n```bash\n(.*?)```", readme, re.S).group(1)


def _run_lines(block: str, cwd: str, replace: dict[str, str]) -> None:
    for line in block.strip().splitlines():
        cmd = line.split("#")[0].strip()
        for a, b in replace.items():
            cmd = cmd.replace(a, b)
        assert cmd.startswith("packds "), cmd
        import shlex

        r = h.cli(*shlex.split(cmd)[1:], cwd=cwd)
        assert r.returncode == 0, (cmd, h.show(r))


def test_readme_append_and_concat_subset_commands_run_as_written(work):
    """The README's `--append` and concat/subset commands, run line by line (the cluster paths
    replaced by the test's)."""
    raw = os.path.join(work, "raw")
    _tree_keys = [f"n{i % 3:08}/img{i:04}.jpg" for i in range(60)]
    for k in _tree_keys:
        h.write(raw, k, k.encode() * 20)
    train = os.path.join(work, "train.pds")
    packds.pack(raw, train, shard_size=8 << 10)
    for k in ("n00000000/new.jpg", "n00000001/new.jpg"):
        h.write(raw, k, b"new")
    h.write(raw, _tree_keys[0], b"changed")
    _run_lines(_readme_block("append"), work, {"/project/def-me/raw": raw, "/project/def-me/train.pds": train})
    got = _content(train)
    assert got["n00000000/new.jpg"] == b"new" and got[_tree_keys[0]] == b"changed" and len(got) == 62
    # concat and subset, in a directory holding imagenet.pds and extra.pds.
    cs = os.path.join(work, "cs")
    os.mkdir(cs)
    _pack(cs, "imagenet", [f"n02084071/{i:03}.jpg" for i in range(40)] + [f"n01440764/{i:03}.jpg" for i in range(40)])
    _pack(cs, "extra", [f"x/{i:03}.jpg" for i in range(20)])
    _run_lines(_readme_block("concat-subset"), cs, {})
    val, tr = _content(os.path.join(cs, "val.pds")), _content(os.path.join(cs, "train.pds"))
    allds = _content(os.path.join(cs, "all.pds"))
    assert len(allds) == 100 and "extra/x/000.jpg" in allds and not set(val) & set(tr) and {**val, **tr} == allds
    dogs = _content(os.path.join(cs, "dogs.pds"))
    assert set(dogs) == {k for k in allds if k.startswith("imagenet/n02084071/")} and len(dogs) == 40
