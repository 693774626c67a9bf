"""Catalogue §7 B: output-side faults of `packds pack` not covered elsewhere: ENOSPC in the
middle of a shard (then --resume after space is freed), inodes running out, a read-only
destination. (Destination inside the source: tests/test_odd_inputs.py; two packs into one
output: tests/test_cli.py; kills: tests/test_resume.py and test_interrupt.py here.)"""

from __future__ import annotations

import os
import subprocess

import pytest

import _helpers as h
import packds

ARGS = ("--shard-size", "256K", "--threads", "2")


@pytest.fixture(scope="module")
def src5m(fast_base):
    """~5 MB in 3,000 files: does not fit a 4 MiB tmpfs."""
    return h.make_plain_tree(os.path.join(fast_base, "faults-out-src"), 3000, size_range=(500, 3000), seed=11)


@pytest.fixture(scope="module")
def ref5m(src5m, fast_base):
    out = os.path.join(fast_base, "faults-out-ref.pds")
    r = h.cli("pack", src5m.root, "-o", out, *ARGS, "-q")
    assert r.returncode == 0, h.show(r)
    return out


def test_b1_enospc_mid_shard_then_resume_after_freeing_space(src5m, ref5m, work):
    """B1: `no space left on device while writing .../.shard-NNNNN.tar.tmp`, exit 1 and a
    --resume hint; the partial shard is removed; the directory does not open; once space is
    freed, --resume finishes byte-identical to an uninterrupted pack."""
    with h.tmpfs(os.path.join(work, "mnt"), "size=4M") as mnt:
        out = os.path.join(mnt, "o.pds")
        r = h.cli("pack", src5m.root, "-o", out, *ARGS)
        line = h.assert_cli_error(r, "no space left on device", out)
        assert ".tar.tmp" in line or "shard-" in line
        assert b"--resume" in r.stderr
        names = os.listdir(out)
        assert "manifest.json" not in names
        assert not [n for n in names if n.endswith(".tmp")], f"partial shard left behind: {names}"
        with pytest.raises(packds.FormatError) as ei:
            packds.open(out)
        assert "resume" in str(ei.value) + (ei.value.hint or "")
        subprocess.run(["mount", "-o", "remount,size=32M", mnt], check=True)
        r = h.cli("pack", src5m.root, "-o", out, *ARGS, "--resume", "-q")
        assert r.returncode == 0, h.show(r)
        h.assert_same_dataset_bytes(ref5m, out)
        assert packds.open(out).verify()["problems"] == []


def test_b1_enospc_through_the_api_is_nospaceerror(src5m, work):
    """The same fault from Python: NoSpaceError (an OSError with a hint), not a generic error."""
    with h.tmpfs(os.path.join(work, "mnt"), "size=4M") as mnt:
        out = os.path.join(mnt, "o.pds")
        with pytest.raises(packds.NoSpaceError) as ei:
            packds.pack(src5m.root, out, shard_size=256 << 10)
        assert out in str(ei.value) and "resume" in ei.value.hint


def test_b3_out_of_inodes(src5m, work):
    """B3: the filesystem runs out of inodes (tmpfs nr_inodes) while shards are created: the
    same clean `no space` error (ENOSPC), exit 1; nothing that opens; resume after remount."""
    with h.tmpfs(os.path.join(work, "mnt"), "size=64M,nr_inodes=8") as mnt:
        out = os.path.join(mnt, "o.pds")
        r = h.cli("pack", src5m.root, "-o", out, *ARGS)
        h.assert_cli_error(r, "no space left on device")
        if os.path.exists(out):
            with pytest.raises(packds.FormatError):
                packds.open(out)
        subprocess.run(["mount", "-o", "remount,nr_inodes=1000", mnt], check=True)
        r = h.cli("pack", src5m.root, "-o", out, *ARGS, "--resume", "-q")
        assert r.returncode == 0, h.show(r)
        assert len(packds.open(out)) == 3000


def test_read_only_destination(src5m, work):
    """Output on a read-only filesystem (EROFS even for root): one clean error line naming the
    output, exit 1, no traceback."""
    with h.tmpfs(os.path.join(work, "mnt"), "size=4M,ro") as mnt:
        out = os.path.join(mnt, "o.pds")
        r = h.cli("pack", src5m.root, "-o", out, *ARGS)
        line = h.assert_cli_error(r, out)
        assert "Read-only file system" in line
        assert b"hint: that filesystem is mounted read-only" in r.stderr
        assert b"--on-error" not in r.stderr  # input-side advice does not apply to the output
        assert os.listdir(mnt) == []


def _no_caps() -> list[str]:
    """A prefix that runs the CLI as root without capabilities (permission bits apply)."""
    if os.geteuid() != 0:
        return []
    p = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    if subprocess.run(p + ["true"], capture_output=True).returncode != 0:
        pytest.skip("cannot drop capabilities with setpriv")
    return p


def test_unwritable_destination_directory(src5m, work):
    """Output parent without write permission: clean error naming the output, exit 1, and a hint
    about the destination (regression: the hint used to say `--on-error skip`, which is about
    unreadable *inputs*)."""
    parent = os.path.join(work, "locked")
    os.mkdir(parent, 0o555)
    out = os.path.join(parent, "o.pds")
    r = h.cli("pack", src5m.root, "-o", out, *ARGS, prefix=_no_caps())
    line = h.assert_cli_error(r, out)
    assert "Permission denied" in line
    assert b"hint: the destination is not writable" in r.stderr, h.show(r)
    assert b"--on-error" not in r.stderr
    assert os.listdir(parent) == []
