"""Catalogue C16–C19: hostile or odd foreign tars given to `packds index`.

Every case runs the indexer in a child process (a signal, a panic or an abort would show there
as a non-zero status, not as a test failure of this process) and checks the error names the
tar file and the byte offset, or that the odd members are skipped and reported."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

import _helpers as h

_CHILD = r"""
import json, os, sys, resource
import packds
# Bounded memory: a hostile size field must never turn into an allocation.
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
out = []
for i, tar in enumerate(sys.argv[2:]):
    dest = os.path.join(sys.argv[1], f"o{i}.pds")
    try:
        s = packds.index_tars([tar], dest)
        out.append({"ok": True, "samples": s["samples"], "skipped": s["skipped"], "warnings": s["warnings"],
                    "keys": list(packds.open(dest).keys())})
    except (packds.PackdsError, OSError) as e:
        out.append({"ok": False, "type": type(e).__name__, "msg": str(e), "hint": getattr(e, "hint", None),
                    "left": os.path.exists(dest)})
print(json.dumps(out))
"""


def run_child(work: str, *tars: str) -> list[dict]:
    script = os.path.join(work, "child.py")
    with open(script, "w") as f:
        f.write(_CHILD)
    r = subprocess.run([sys.executable, script, work, *tars], capture_output=True, timeout=120)
    h.assert_not_signalled(r)
    assert r.returncode == 0, h.show(r)
    return json.loads(r.stdout)


def header(name: bytes, typ: bytes, size: int, magic: bytes = b"ustar\x0000") -> bytes:
    """One 512-byte header with a valid checksum; sizes past the octal range in base-256."""
    b = bytearray(512)
    b[: len(name)] = name
    b[100:108] = b"0000644\0"
    if size >= 8**11:
        b[124] = 0x80
        b[128:136] = size.to_bytes(8, "big")
    else:
        b[124:136] = b"%011o\0" % size
    b[136:148] = b"00000000000\0"
    b[156:157] = typ
    b[257 : 257 + len(magic)] = magic
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: bytes, data: bytes) -> bytes:
    return header(name, b"0", len(data)) + padded(data)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode() + body) != n:
        n += 1
    return str(n).encode() + body


END = b"\0" * 1024


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_c16_extension_records_claiming_huge_sizes_are_capped(work):
    """A pax or GNU long-name header claiming 2^40 (or just 10 MiB) bytes of records: refused,
    naming the file, the offset and the limit, without allocating."""
    tars = []
    for i, (typ, size) in enumerate([(b"x", 1 << 40), (b"L", 1 << 40), (b"x", 10 << 20), (b"g", 1 << 40), (b"K", 2 << 20)]):
        body = member(b"first", b"ok") + header(b"././@LongLink", typ, size, b"ustar  \0") + b"\0" * 4096 + END
        tars.append(write(os.path.join(work, f"c16-{i}.tar"), body))
    for tar, r, size in zip(tars, run_child(work, *tars), [1 << 40, 1 << 40, 10 << 20, 1 << 40, 2 << 20]):
        assert not r["ok"] and r["type"] == "FormatError", r
        assert tar in r["msg"] and f"header at offset 1024 claims {size} bytes" in r["msg"] and "limit 1048576" in r["msg"], r
        assert r["hint"] and not r["left"], r


def test_c17_pax_desync_tricks_are_refused_and_plain_archives_match_gnu_tar(work):
    """tar-rs#454 style: a pax `size` record followed by a GNU long-name header (readers
    disagree on which header the size belongs to), and the reverse; both refused as ambiguous.
    Ordinary GNU and pax archives list exactly the members GNU tar lists."""
    hidden = member(b"hidden", b"smuggled")
    trick = header(b"././@PaxHeader", b"x", len(pax_record("size", str(len(hidden))))) + padded(pax_record("size", str(len(hidden))))
    trick += header(b"././@LongLink", b"L", 5, b"ustar  \0") + padded(b"evil\0")
    trick += header(b"evil", b"0", 0) + hidden + END
    rev = header(b"././@LongLink", b"L", 2, b"ustar  \0") + padded(b"a\0")
    rev += header(b"././@PaxHeader", b"x", len(pax_record("path", "b"))) + padded(pax_record("path", "b"))
    rev += member(b"c", b"data") + END
    t1, t2 = write(os.path.join(work, "trick.tar"), trick), write(os.path.join(work, "rev.tar"), rev)
    for tar, r in zip([t1, t2], run_child(work, t1, t2)):
        assert not r["ok"] and r["type"] == "FormatError" and "ambiguous" in r["msg"] and tar in r["msg"], r
        assert "offset " in r["msg"], r
    if shutil.which("tar") is None:
        return
    src = os.path.join(work, "src")
    names = ["a", "d/" + "n" * 150, "caf\u00e9/\u00fc.txt", "x" * 60 + "/" + "y" * 60 + "/z"]
    for n in names:
        h.write(src, n, n.encode())
    os.symlink("a", os.path.join(src, "link"))
    tars = []
    for fmt in ["gnu", "pax", "ustar"]:
        tar = os.path.join(work, f"{fmt}.tar")
        members = [n for n in names if fmt != "ustar" or len(n.encode()) <= 255 and len(n.rsplit("/", 1)[-1]) <= 100]
        subprocess.run(["tar", f"--format={fmt}", "-cf", tar, *members, "link"], cwd=src, check=True, capture_output=True)
        tars.append((tar, members))
    results = run_child(work, *[t for t, _ in tars])
    for (tar, members), r in zip(tars, results):
        listed = subprocess.run(["tar", "--quoting-style=literal", "-tvf", tar], capture_output=True, check=True).stdout.decode().splitlines()
        # "-rw-r--r-- user/group SIZE DATE HH:MM NAME": the name follows the time.
        regular = sorted(line[line.index(" ", line.index(":") + 1) + 1 :] for line in listed if line.startswith("-"))
        assert sorted(r["keys"]) == regular == sorted(members), (tar, r, listed)
        assert [s[0].rsplit(":", 1)[1] for s in r["skipped"]] == ["link"], r


def test_c18_bad_checksum_eof_inside_a_member_and_trailing_garbage(work):
    good = member(b"a", b"x" * 600) + member(b"b", b"y")  # "b" has its header at offset 1536
    bad_sum = bytearray(good + END)
    bad_sum[1536 + 5] ^= 0x20
    cases = {
        "checksum": (bytes(bad_sum), "bad header checksum at offset 1536"),
        "eof-in-member": ((good + member(b"c", b"z" * 5000))[:4000], "claims 5000 bytes of data, past the end of the file (4000 bytes)"),
        "eof-in-header": ((good + END)[:1800], "ends inside the header at offset 1536"),
        "size-past-eof": (good + header(b"big", b"0", 8**11 - 1) + END, "claims 8589934591 bytes of data, past the end"),
        "not-a-tar": (b"PK\x03\x04" + os.urandom(3000), "bad header checksum at offset 0"),
        "empty": (b"", "empty file"),
    }
    tars = [write(os.path.join(work, f"{k}.tar"), v) for k, (v, _) in cases.items()]
    for tar, (name, (_, needle)), r in zip(tars, cases.items(), run_child(work, *tars)):
        assert not r["ok"] and r["type"] == "FormatError", (name, r)
        assert tar in r["msg"] and needle in r["msg"], (name, r)
        assert not r["left"], (name, r)
    # The CLI: one error line naming the file and offset, and a hint; exit 1.
    r = h.cli("index", tars[0], "-o", os.path.join(work, "cli.pds"))
    h.assert_cli_error(r, tars[0], "offset 1536")
    assert not os.path.exists(os.path.join(work, "cli.pds"))
    # Trailing garbage after the end-of-archive blocks: a warning, the archive is indexed.
    junk = write(os.path.join(work, "junk.tar"), good + END + b"trailing junk" + b"\0" * 499)
    r = h.cli("index", junk, "-o", os.path.join(work, "junk.pds"))
    assert r.returncode == 0, h.show(r)
    assert b"packds: warning:" in r.stderr and b"after the end-of-archive marker (from offset 3584)" in r.stderr, h.show(r)
    assert h.cli("verify", os.path.join(work, "junk.pds")).returncode == 0


def test_c19_links_devices_dirs_and_globals_are_not_samples(work):
    """Symlink, hard link, character and block device, FIFO, directory and pax global header
    members: none is indexed; each (but the directory and the global header) has a report
    line; the summary counts them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made by a test"}) as tf:
        def add(name, typ, data=b"", **kw):
            t = tarfile.TarInfo(name)
            t.type = typ
            t.size = len(data)
            for k, v in kw.items():
                setattr(t, k, v)
            tf.addfile(t, io.BytesIO(data) if data else None)
        add("dir", tarfile.DIRTYPE)
        add("dir/real.txt", tarfile.REGTYPE, b"real")
        add("dir/sym", tarfile.SYMTYPE, linkname="real.txt")
        add("dir/hard", tarfile.LNKTYPE, linkname="dir/real.txt")
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("fifo", tarfile.FIFOTYPE)
        add("/abs/path", tarfile.REGTYPE, b"abs")
        add("../up", tarfile.REGTYPE, b"up")
    tar = write(os.path.join(work, "odd.tar"), buf.getvalue())
    (r,) = run_child(work, tar)
    assert r["ok"] and r["keys"] == ["dir/real.txt"], r
    why = {p.rsplit(":", 1)[1]: reason for p, reason in r["skipped"]}
    assert set(why) == {"dir/sym", "dir/hard", "dev/null", "dev/sda", "fifo", "/abs/path", "../up"}, why
    assert "symlink" in why["dir/sym"] and "hard link" in why["dir/hard"] and "device" in why["dev/null"] and "FIFO" in why["fifo"]
    assert "absolute path" in why["/abs/path"] and "'..'" in why["../up"]
    assert all("header at offset" in w for w in why.values())
    out = os.path.join(work, "odd.pds")
    c = h.cli("index", tar, "-o", out)
    assert c.returncode == 0, h.show(c)
    err = c.stderr.decode()
    assert err.count("packds: skipped ") == 7 and "7 skipped (" in err and "2 device file" in err, err
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert len(m["skipped"]) == 7


def test_mutated_tars_never_crash(work):
    """Random byte flips and cuts of a small archive: an error or an index, never a signal."""
    base = b"".join(member(f"k/{i:03d}.bin".encode(), bytes([i]) * (i * 37 % 700)) for i in range(12))
    base += header(b"././@PaxHeader", b"x", len(pax_record("path", "p" * 120))) + padded(pax_record("path", "p" * 120)) + member(b"short", b"pax")
    base += END
    rnd = random.Random(16)
    tars = []
    for i in range(120):
        b = bytearray(base)
        for _ in range(rnd.choice([1, 1, 2, 8])):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if i % 5 == 0:
            b = b[: rnd.randrange(len(b))]
        tars.append(write(os.path.join(work, f"m{i}.tar"), bytes(b)))
    results = run_child(work, *tars)
    assert len(results) == len(tars)
    assert any(r["ok"] for r in results) and any(not r["ok"] for r in results)
    for r in results:
        assert r["ok"] or r["type"] in ("FormatError", "UsageError"), r
