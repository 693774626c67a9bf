"""The command line: happy paths of every subcommand, and errors: exit 1 with one
`packds: error: ...` line naming the path and a `hint: ...` line; argparse usage errors exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import _helpers as h
import packds


@pytest.fixture
def tiny(work):
    """A small source tree with awkward names (no newline in any name: `ls` prints lines)."""
    src = os.path.join(work, "src")
    files = {
        b"a.txt": b"alpha\n",
        b"dir/b.bin": os.urandom(3000),
        b"dir/sub/c.txt": b"gamma",
        b"empty": b"",
        b"\xff\xfe.bin": b"non-utf-8 name",
        "ünï/中文 😀.txt".encode(): "unicode".encode(),
        b".hidden": b"h",
    }
    for k, v in files.items():
        h.write(src, k, v)
    return src, files


@pytest.fixture
def tiny_ds(tiny, work):
    src, files = tiny
    out = os.path.join(work, "tiny.pds")
    r = h.cli("pack", src, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    return out, files


# ----------------------------------------------------------------------------- pack


def test_pack_summary_json_and_quiet(tiny, work):
    src, files = tiny
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "--json", "-q")
    assert r.returncode == 0, h.show(r)
    assert r.stderr == b"", "-q must keep stderr quiet"
    s = json.loads(r.stdout)
    assert s["files"] == len(files) and s["bytes"] == sum(map(len, files.values()))
    assert s["shards"] == 1 and s["skipped"] == [] and s["resumed_shards"] == 0
    assert s["already_complete"] is False


def test_pack_default_prints_one_summary_line(tiny, work):
    src, files = tiny
    r = h.cli("pack", src, "-o", os.path.join(work, "o.pds"))
    assert r.returncode == 0, h.show(r)
    assert r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"packds: packed {len(files)} files"), lines


def test_pack_missing_source(work):
    src = os.path.join(work, "does-not-exist")
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out)
    h.assert_cli_error(r, src)
    assert not os.path.exists(out), "a failed pack must not leave its output behind"


def test_pack_empty_source(work):
    src = os.path.join(work, "empty")
    os.mkdir(src)
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out)
    line = h.assert_cli_error(r, src)
    assert "no files" in line
    assert not os.path.exists(out)


def test_pack_source_with_only_skipped_entries(work):
    src = os.path.join(work, "links")
    os.mkdir(src)
    os.symlink("/etc/hostname", os.path.join(src, "l"))
    r = h.cli("pack", src, "-o", os.path.join(work, "o.pds"))
    line = h.assert_cli_error(r, src)
    assert "1 entries skipped" in line or "skipped" in line


def test_pack_into_existing_dataset_needs_force(tiny, tiny_ds, work):
    src, files = tiny
    out = tiny_ds[0]
    before = {n: h.read(out, n.encode()) for n in os.listdir(out)}
    r = h.cli("pack", src, "-o", out)
    line = h.assert_cli_error(r, out)
    assert "already exists" in line
    assert b"--force" in r.stderr
    assert {n: h.read(out, n.encode()) for n in os.listdir(out)} == before, "the existing dataset was touched"


def test_force_replaces_a_dataset_with_more_shards(tiny, work):
    """--force over a 3+-shard dataset with a 1-shard one: old shards must go."""
    big = os.path.join(work, "big")
    for i in range(30):
        h.write(big, b"f%02d" % i, os.urandom(3000))
    out = os.path.join(work, "o.pds")
    assert h.cli("pack", big, "-o", out, "--shard-size", "16K", "-q").returncode == 0
    assert len([n for n in os.listdir(out) if n.endswith(".tar")]) >= 3
    src, files = tiny
    r = h.cli("pack", src, "-o", out, "--force", "-q")
    assert r.returncode == 0, h.show(r)
    assert sorted(os.listdir(out)) == ["index.pdsi", "manifest.json", "shard-00000.tar"]
    ds = packds.open(out)
    assert sorted(ds.key_bytes(i) for i in range(len(ds))) == sorted(files)
    assert ds.verify()["problems"] == []


def test_force_refuses_a_directory_with_other_files(tiny, work):
    src, _ = tiny
    out = os.path.join(work, "mine")
    os.mkdir(out)
    h.write(out, b"thesis.tex", b"precious")
    h.write(out, b"shard-00000.tar", b"not ours either, but named like ours")
    r = h.cli("pack", src, "-o", out, "--force")
    h.assert_cli_error(r, out)
    assert h.read(out, b"thesis.tex") == b"precious"
    assert h.read(out, b"shard-00000.tar").startswith(b"not ours")
    # And without --force: "already exists".
    r = h.cli("pack", src, "-o", out)
    assert "already exists" in h.assert_cli_error(r, out)
    assert h.read(out, b"thesis.tex") == b"precious"


def test_pack_into_an_existing_empty_directory(tiny, work):
    src, files = tiny
    out = os.path.join(work, "empty-out")
    os.mkdir(out)
    r = h.cli("pack", src, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    assert len(packds.open(out)) == len(files)


def test_pack_refuses_an_output_another_pack_holds(tiny, work):
    """Two packs into one directory: the second is refused while the first holds its lock."""
    import fcntl

    src, _ = tiny
    out = os.path.join(work, "busy.pds")
    os.mkdir(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = h.cli("pack", src, "-o", out)
        h.assert_cli_error(r, out)
        assert b"another packds process" in r.stderr
        assert os.listdir(out) == []
    finally:
        os.close(fd)
    assert h.cli("pack", src, "-o", out, "-q").returncode == 0


def test_pack_output_is_a_file(tiny, work):
    src, _ = tiny
    out = os.path.join(work, "file")
    h.write(work, b"file", b"x")
    h.assert_cli_error(h.cli("pack", src, "-o", out), out)
    assert h.read(work, b"file") == b"x"


def test_pack_output_parent_missing(tiny, work):
    src, _ = tiny
    out = os.path.join(work, "no", "such", "parent", "o.pds")
    h.assert_cli_error(h.cli("pack", src, "-o", out), out)


def test_pack_shard_size_too_small(tiny, work):
    src, _ = tiny
    h.assert_cli_error(h.cli("pack", src, "-o", os.path.join(work, "o"), "--shard-size", "1K"), "shard-size")
    assert not os.path.exists(os.path.join(work, "o"))


def test_pack_bad_glob(tiny, work):
    src, _ = tiny
    h.assert_cli_error(h.cli("pack", src, "-o", os.path.join(work, "o"), "--include", "[abc"), "[abc")


def test_pack_same_key_from_two_sources(work):
    a, c = os.path.join(work, "a"), os.path.join(work, "c")
    h.write(a, b"x/same.txt", b"1")
    h.write(c, b"x/same.txt", b"2")
    h.assert_cli_error(h.cli("pack", a, c, "-o", os.path.join(work, "o")), "x/same.txt")


def test_pack_several_sources_and_a_file_source(work):
    a, c = os.path.join(work, "a"), os.path.join(work, "c")
    h.write(a, b"one/1.txt", b"1")
    h.write(c, b"two/2.txt", b"2")
    f = h.write(work, b"loose.bin", b"loose")
    out = os.path.join(work, "o")
    r = h.cli("pack", a, c, f, "-o", out, "-q")
    assert r.returncode == 0, h.show(r)
    ds = packds.open(out)
    assert [ds.key(i) for i in range(len(ds))] == ["loose.bin", "one/1.txt", "two/2.txt"]
    assert ds["loose.bin"] == b"loose"


@pytest.mark.parametrize("size,ok", [("64K", True), ("64KiB", True), ("1m", True), ("4096", True), ("0.5M", True), ("abc", False), ("-1", False), ("12Q", False)])
def test_shard_size_parsing(tiny, work, size, ok):
    src, _ = tiny
    r = h.cli("pack", src, "-o", os.path.join(work, "o"), "--shard-size", size, "--json", "-q")
    if ok:
        assert r.returncode == 0, h.show(r)
        m = packds.open(os.path.join(work, "o")).manifest
        want = {"64K": 65536, "64KiB": 65536, "1m": 1 << 20, "4096": 4096, "0.5M": 1 << 19}[size]
        assert m["options"]["shard_size"] == want
    else:
        assert r.returncode == 2, h.show(r)
        assert b"usage:" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["pack"], ["pack", "src"], ["pack", "-o", "x"], ["pack", "src", "-o", "x", "--on-error", "ignore"], ["info"], ["get", "ds"], ["unpack", "ds"], ["pack", "s", "-o", "x", "--threads", "many"]],
)
def test_usage_errors_exit_2(argv, work):
    r = h.cli(*argv, cwd=work)
    assert r.returncode == 2, h.show(r)
    assert b"usage:" in r.stderr
    assert not os.path.exists(os.path.join(work, "x"))


def test_version():
    r = h.cli("--version")
    assert r.returncode == 0
    assert packds.__version__ in r.stdout.decode()


# ----------------------------------------------------------------- info, ls, get, verify, unpack


def test_info(tiny_ds):
    out, files = tiny_ds
    r = h.cli("info", out)
    assert r.returncode == 0, h.show(r)
    text = r.stdout.decode()
    assert f"samples:  {len(files)}" in text
    assert "shard-00000.tar" in text
    r = h.cli("info", out, "--json")
    assert r.returncode == 0
    m = json.loads(r.stdout)
    assert m == packds.open(out).manifest
    assert m["samples"] == len(files) and m["format"] == "packds"


def test_ls_prints_raw_keys(tiny_ds):
    out, files = tiny_ds
    r = h.cli("ls", out)
    assert r.returncode == 0, h.show(r)
    assert r.stdout.split(b"\n")[:-1] == sorted(files)
    assert r.stdout.endswith(b"\n")


def test_ls_long_and_pattern(tiny_ds):
    out, files = tiny_ds
    r = h.cli("ls", out, "-l")
    assert r.returncode == 0
    for line, k in zip(r.stdout.split(b"\n"), sorted(files)):
        size, key = line.split(None, 1)
        assert key == k and int(size) == len(files[k])
    r = h.cli("ls", out, "*.txt")
    assert r.returncode == 0, h.show(r)
    assert r.stdout.split(b"\n")[:-1] == sorted(k for k in files if k.endswith(b".txt"))
    r = h.cli("ls", out, "dir/**")
    assert r.stdout.split(b"\n")[:-1] == [b"dir/b.bin", b"dir/sub/c.txt"]
    r = h.cli("ls", out, "nothing-matches-*")
    assert r.returncode == 0 and r.stdout == b""


def test_ls_pattern_matches_non_utf8_key(tiny_ds):
    out, files = tiny_ds
    r = h.cli("ls", out, "*.bin")
    assert r.returncode == 0, h.show(r)
    assert r.stdout.split(b"\n")[:-1] == sorted(k for k in files if k.endswith(b".bin"))


def test_ls_bad_pattern_is_a_clean_error(tiny_ds):
    """A malformed glob is a user error: one `packds: error:` line and a hint, no traceback."""
    out, _ = tiny_ds
    r = h.cli("ls", out, "[")
    h.assert_cli_error(r, "[")


def test_get_every_key(tiny_ds):
    out, files = tiny_ds
    for k, v in files.items():
        r = h.cli("get", out, k)
        assert r.returncode == 0, (k, h.show(r))
        assert r.stdout == v, k


def test_get_missing_key(tiny_ds):
    out, _ = tiny_ds
    r = h.cli("get", out, "no/such/key.txt")
    h.assert_cli_error(r, "no/such/key.txt")
    assert r.stdout == b""


def test_verify_ok(tiny_ds):
    r = h.cli("verify", tiny_ds[0])
    assert r.returncode == 0, h.show(r)
    assert b"OK" in r.stderr and r.stdout == b""


def test_unpack_cli(tiny, tiny_ds, work):
    src, files = tiny
    dest = os.path.join(work, "dest")
    r = h.cli("unpack", tiny_ds[0], dest)
    assert r.returncode == 0, h.show(r)
    assert f"unpacked {len(files)} files".encode() in r.stderr
    d = subprocess.run(["diff", "-r", src, dest], capture_output=True)
    assert d.returncode == 0, d.stdout
    # Again into the same place: refuses to overwrite.
    r = h.cli("unpack", tiny_ds[0], dest)
    h.assert_cli_error(r, "already exists")


@pytest.mark.parametrize("cmd", [["info"], ["ls"], ["get", "KEY", "a.txt"], ["verify"], ["unpack", "DEST"]])
def test_commands_on_a_non_dataset(tiny, work, cmd):
    src, _ = tiny  # a directory, not a dataset
    argv = [cmd[0], src] + [os.path.join(work, "dest") if c == "DEST" else c for c in cmd[1:] if c != "KEY"]
    r = h.cli(*argv)
    h.assert_cli_error(r, src)
    assert r.stdout == b""
    assert not os.path.exists(os.path.join(work, "dest"))


def test_info_on_a_missing_path(work):
    """README: errors print one line naming the path and a `hint:` line."""
    p = os.path.join(work, "no-such.pds")
    r = h.cli("info", p)
    h.assert_cli_error(r, p)


def test_ls_into_a_closed_pipe(odd_ds):
    """`packds ls DATASET | head -1`: the reader went away; that is not an error (exit 0,
    nothing on stderr), as cli.main intends with its BrokenPipeError clause."""
    r = subprocess.run(
        f'set -o pipefail; "{sys.executable}" -m packds ls "{odd_ds[0]}" | head -c 10 >/dev/null',
        shell=True, executable="/bin/bash", capture_output=True, timeout=60,
    )
    # 20,000 keys are far more than a pipe holds, so the writer does see EPIPE.
    assert b"packds: error" not in r.stderr, h.show(r)
    assert b"Traceback" not in r.stderr, h.show(r)
    assert r.returncode == 0, h.show(r)


def test_debug_shows_traceback(work):
    r = h.cli("--debug", "info", work)
    assert r.returncode == 1
    assert b"Traceback" in r.stderr and b"FormatError" in r.stderr


def test_demo_runs(work):
    r = h.cli("demo", "--files", "300", "--dir", os.path.join(work, "demo"), timeout=300)
    assert r.returncode == 0, h.show(r)


def test_hints_name_only_options_the_command_has(small_ds_pristine):
    """An unreadable shard: `verify` and `stage` say what to do without suggesting
    `--on-error skip` (a `pack` option they do not have); `pack` of an unreadable file still
    suggests it."""
    prefix, uid = h.unprivileged()
    with h.reachable_dir() as base:
        ds = h.copy_dataset(small_ds_pristine, os.path.join(base, "d.pds"))
        shard = sorted(n for n in os.listdir(ds) if n.startswith("shard-"))[0]
        dest = os.path.join(base, "dest")
        os.mkdir(dest)
        src = os.path.join(base, "src")
        h.write(src, "a.txt", b"a")
        h.chown_tree(base, uid)
        os.chmod(os.path.join(ds, shard), 0)
        os.chmod(os.path.join(src, "a.txt"), 0)
        for args in (["verify", ds], ["stage", ds, "--to", dest, "--policy", "local"]):
            r = h.cli(*args, prefix=prefix)
            assert r.returncode == 1, h.show(r)
            err = r.stderr.decode()
            assert shard in err and "hint:" in err, err
            assert "--on-error" not in err, err
        r = h.cli("pack", src, "-o", os.path.join(base, "out.pds"), prefix=prefix)
        assert r.returncode == 1 and "--on-error skip" in r.stderr.decode(), h.show(r)


def test_ls_null_and_json_keep_keys_with_newlines_and_non_utf8_bytes(work):
    src = os.path.join(work, "src")
    keys = [b"a\nb.txt", b"plain.txt", b"\xff\xfe.bin"]
    for k in keys:
        h.write(src, k, b"x" * len(k))
    out = os.path.join(work, "o.pds")
    assert h.cli("pack", src, "-o", out, "-q").returncode == 0
    r = h.cli("ls", out, "-0")
    assert r.returncode == 0 and r.stdout.split(b"\0")[:-1] == sorted(keys) and r.stdout.endswith(b"\0")
    r = h.cli("ls", out, "--json")
    rows = json.loads(r.stdout)
    assert [bytes.fromhex(x["key_hex"]) if "key_hex" in x else x["key"].encode() for x in rows] == sorted(keys)
    assert [x["size"] for x in rows] == [len(k) for k in sorted(keys)]
    assert [x["index"] for x in rows] == [0, 1, 2]


def test_pack_plan_and_info_count_input_and_dataset_files(work):
    src = os.path.join(work, "src")
    for i in range(300):
        h.write(src, f"d/{i:04}", b"y" * 500)
    out = os.path.join(work, "o.pds")
    r = h.cli("pack", src, "-o", out, "--shard-size", "64K")
    assert r.returncode == 0, h.show(r)
    shards = len([n for n in os.listdir(out) if n.startswith("shard-")])
    want = f"300 input files -> {shards + 2} dataset files"
    assert want in r.stderr.decode()
    assert want in h.cli("info", out).stdout.decode()
    r = h.cli("plan", src, "-o", os.path.join(work, "plan"), "--shard-size", "64K")
    assert want in r.stderr.decode(), h.show(r)


def test_verify_and_unpack_report_as_json(tiny_ds, work):
    tiny_ds, _ = tiny_ds
    r = h.cli("verify", tiny_ds, "--json")
    assert r.returncode == 0, h.show(r)
    rec = json.loads(r.stdout)
    assert rec["ok"] is True and rec["problems"] == [] and rec["samples"] == len(packds.open(tiny_ds))
    dest = os.path.join(work, "unpacked")
    r = h.cli("unpack", tiny_ds, dest, "--json")
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["files"] == len(packds.open(tiny_ds))


def test_json_summaries_share_one_schema(work):
    """`--json` of pack, plan and index: skipped items are {path, reason} objects as in
    manifest.json; pack also reports stored bytes, ratio, dataset files and rates."""
    src = os.path.join(work, "src")
    h.write(src, "a.txt", b"hello " * 100)
    os.symlink("a.txt", os.path.join(src, "link"))
    out = os.path.join(work, "o.pds")
    s = json.loads(h.cli("pack", src, "-o", out, "--json", "-q", "--compress", "zstd").stdout)
    assert s["skipped"] == packds.open(out).manifest["skipped"] == [{"path": os.path.join(src, "link"), "reason": s["skipped"][0]["reason"]}]
    assert s["stored_bytes"] < s["bytes"] and s["ratio"] > 1 and s["dataset_files"] == 3 and s["files_per_s"] > 0
    p = json.loads(h.cli("plan", src, "-o", os.path.join(work, "plan"), "--json", "-q").stdout)
    assert p["skipped"] == s["skipped"]
