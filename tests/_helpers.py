"""Shared helpers for the packds test suite (imported by conftest.py and the test modules)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

import packds

# --------------------------------------------------------------------------------------------
# Paths and trees


def b(p) -> bytes:
    """Any path (str, bytes, PathLike) as bytes."""
    return os.fsencode(os.fspath(p))


def walk_files(root) -> list[bytes]:
    """Relative paths (bytes, '/'-separated) of every regular file under ``root``, sorted
    byte-wise: what packds must produce as keys."""
    root = b(root)
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not (st.st_mode & 0o170000 == 0o100000):
                continue
            out.append(os.path.relpath(full, root))
    return sorted(out)


def read(root, key: bytes) -> bytes:
    with open(os.path.join(b(root), key), "rb") as f:
        return f.read()


def write(root, key: bytes | str, data: bytes = b"", mode: int | None = None, mtime: float | None = None) -> bytes:
    """Creates file ``root/key`` (parents too)."""
    p = os.path.join(b(root), b(key))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(p, mode)
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


def dataset_files(ds_dir) -> list[str]:
    """Names of the shard files and the index of a dataset (what must be byte-identical)."""
    names = sorted(n for n in os.listdir(ds_dir) if n.startswith("shard-") and n.endswith(".tar"))
    return names + ["index.pdsi"]


def assert_same_dataset_bytes(a, c) -> None:
    """Shards and index of datasets ``a`` and ``c`` are byte-identical (and the same set)."""
    na, nc = dataset_files(a), dataset_files(c)
    assert na == nc, f"different files: {na} vs {nc}"
    for n in na:
        with open(os.path.join(a, n), "rb") as f1, open(os.path.join(c, n), "rb") as f2:
            x, y = f1.read(), f2.read()
        if x != y:
            diff = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
            raise AssertionError(f"{n} differs (sizes {len(x)} vs {len(y)}, first difference at byte {diff})")


# --------------------------------------------------------------------------------------------
# The CLI


def cli(*args, env: dict | None = None, timeout: float = 120, prefix=(), cwd=None, input: bytes | None = None):
    """Runs ``python -m packds ARGS`` and returns the CompletedProcess (stdout/stderr bytes)."""
    cmd = [*prefix, sys.executable, "-m", "packds", *[b(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args]]
    # Not the caller's fault switch nor a surrounding Slurm job's variables: tests say what they need.
    e = {k: v for k, v in os.environ.items() if k != "PACKDS_FAULT" and not k.startswith("SLURM_")}
    if env:
        e.update(env)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=e, cwd=cwd, input=input)


def show(r) -> str:
    return f"rc={r.returncode}\nstdout={r.stdout[:2000]!r}\nstderr={r.stderr.decode(errors='replace')[:4000]}"


PROGRESS_LINE = re.compile(r"packds: (pack|plan|index|merge|verify|unpack|stage|build): ")


def assert_cli_error(r, *needles, exit_code: int = 1, single: bool = True) -> str:
    """The command failed the packds way: exit 1, a ``packds: error: ...`` line that contains
    every needle, and a ``hint: ...`` line. Returns the error line."""
    assert r.returncode == exit_code, show(r)
    text = r.stderr.decode("utf-8", errors="surrogateescape")
    # Progress lines (stderr is not a terminal here) and warnings (e.g. a destination other
    # users can change) may come before the error: not part of it.
    lines = [ln for ln in text.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln) and not ln.startswith("packds: warning:")]
    errs = [ln for ln in lines if ln.startswith("packds: error:")]
    assert len(errs) == 1, f"want exactly one error line\n{show(r)}"
    if single:
        assert lines[0].startswith("packds: error:"), show(r)
        assert "Traceback" not in text, show(r)
        assert len(lines) == 2, f"want an error line and a hint line only\n{show(r)}"
    for n in needles:
        assert n in errs[0], f"{n!r} not in the error line\n{show(r)}"
    assert any(ln.startswith("hint: ") and len(ln) > 7 for ln in lines), f"no hint line\n{show(r)}"
    return errs[0]


def pack(src, out, **kw) -> dict:
    kw.setdefault("shard_size", 64 << 10)
    return packds.pack(src, out, **kw)


def assert_not_signalled(r) -> None:
    assert r.returncode >= 0, f"killed by signal {-r.returncode} ({signal.Signals(-r.returncode).name})\n{show(r)}"


# --------------------------------------------------------------------------------------------
# The index format (docs/FORMAT.md), for building corrupt datasets on purpose

HEADER = 128
ENTRY = 32

try:
    import crc32c as _crc32c_mod  # type: ignore

    def crc32c(data: bytes) -> int:
        return _crc32c_mod.crc32c(data)

except ImportError:  # pure Python CRC32C (Castagnoli), fast enough for test indexes
    _T = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _T.append(_c)

    def crc32c(data: bytes) -> int:
        c = 0xFFFFFFFF
        t = _T
        for x in data:
            c = t[(c ^ x) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF


@dataclass
class IndexLayout:
    n: int
    nshards: int
    entries_off: int
    keys_off: int
    keys_len: int
    shards_off: int
    names_off: int
    names_len: int


def layout(ix: bytes) -> IndexLayout:
    n, ns, eo, ko, kl, so, no, nl = struct.unpack_from("<8Q", ix, 16)
    return IndexLayout(n, ns, eo, ko, kl, so, no, nl)


def entry(ix: bytes, i: int) -> tuple[int, int, int, int, int]:
    """(offset, size, key_off, shard, crc) of entry i."""
    return struct.unpack_from("<QQQII", ix, HEADER + ENTRY * i)


def set_entry(ix: bytearray, i: int, offset=None, size=None, key_off=None, shard=None, crc=None) -> None:
    cur = list(entry(ix, i))
    for j, v in enumerate((offset, size, key_off, shard, crc)):
        if v is not None:
            cur[j] = v
    struct.pack_into("<QQQII", ix, HEADER + ENTRY * i, *cur)


def fix_crcs(ix: bytearray) -> None:
    """Recomputes the body, shard-table and header CRC32Cs so a patched index passes them."""
    L = layout(ix)
    if 0 <= L.entries_off <= L.shards_off <= len(ix):
        struct.pack_into("<I", ix, 80, crc32c(bytes(ix[L.entries_off : L.shards_off])))
    if 0 <= L.shards_off <= len(ix):
        struct.pack_into("<I", ix, 84, crc32c(bytes(ix[L.shards_off :])))
    struct.pack_into("<I", ix, 124, crc32c(bytes(ix[:124])))


def index_keys(ix: bytes) -> list[bytes]:
    L = layout(ix)
    offs = [entry(ix, i)[2] for i in range(L.n)] + [L.keys_len]
    return [bytes(ix[L.keys_off + offs[i] : L.keys_off + offs[i + 1]]) for i in range(L.n)]


# --------------------------------------------------------------------------------------------
# The "odd" tree


@dataclass
class Tree:
    root: str
    keys: list[bytes] = field(default_factory=list)  # sorted byte-wise
    special: dict[str, bytes] = field(default_factory=dict)  # label -> key

    @property
    def root_b(self) -> bytes:
        return os.fsencode(self.root)

    def path(self, key: bytes) -> bytes:
        return os.path.join(self.root_b, key)

    def read(self, key: bytes) -> bytes:
        return read(self.root, key)


def make_odd_tree(root: str, n_plain: int = 20_000, seed: int = 20240607) -> Tree:
    """Writes a tree of ``n_plain`` small random files in 100 directories plus every awkward
    kind of name, depth, mode and mtime packds must cope with. Only regular files and the
    directories holding them (no empty directories, no symlinks), so extracting the shards
    with tar must give back exactly this tree."""
    rng = random.Random(seed)
    rb = os.fsencode(root)
    os.makedirs(rb, exist_ok=True)
    keys: list[bytes] = []
    special: dict[str, bytes] = {}
    mtimes = [1_000_000_000, 1_234_567_890, 1_500_000_000, 1_700_000_000, 2_000_000_000, 1, 86_400 * 365]
    modes = [0o644] * 6 + [0o600, 0o755, 0o640, 0o444, 0o700, 0o604]
    pool = os.urandom(1 << 20)

    def content(size: int) -> bytes:
        # Fresh random bytes for small files; for larger ones a random slice of a random pool
        # with a unique random prefix (cheaper, still different for every file).
        if size <= 4096:
            return os.urandom(size)
        start = rng.randrange(0, len(pool) - size)
        return os.urandom(16) + pool[start + 16 : start + size]

    def add(key: bytes, data: bytes | None = None, mode: int | None = None, mtime: float | None = None, label: str | None = None):
        if data is None:
            data = os.urandom(rng.randrange(0, 3000))
        p = os.path.join(rb, key)
        d = os.path.dirname(p)
        if d:
            os.makedirs(d, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if data:
                os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(p, mode if mode is not None else rng.choice(modes))
        t = mtime if mtime is not None else rng.choice(mtimes)
        os.utime(p, (t, t))
        keys.append(key)
        if label:
            special[label] = key

    # Bulk: 100 directories of plain files, sizes skewed small, some empty.
    per = n_plain // 100
    for d in range(100):
        dn = b"d%03d" % d
        os.makedirs(os.path.join(rb, dn))
        for j in range(per):
            r = rng.random()
            if r < 0.03:
                size = 0
            elif r < 0.45:
                size = rng.randrange(1, 512)
            elif r < 0.85:
                size = rng.randrange(512, 4096)
            else:
                size = rng.randrange(4096, 20_000)
            add(b"%s/f%05d.bin" % (dn, j), content(size))
    # Names longer than 100 bytes (ustar's limit) and paths longer than 255 bytes.
    add(b"long/" + b"n" * 200 + b".dat", label="long_name")
    add(b"long/" + "é".encode() * 100 + b".txt", label="long_utf8_name")
    add(b"long/" + b"x" * 99 + b".b", label="name_101")  # 103 bytes with the dir... name itself 101
    add(b"k" * 100, label="exactly_100")
    add(b"longpath/" + b"/".join([b"p" * 60] * 6) + b"/file.bin", label="path_over_255")
    add(b"longpath/" + b"/".join([b"q%02d" % i + b"Q" * 200 for i in range(5)]) + b"/end.bin", label="path_over_1000")
    # Non-ASCII UTF-8.
    add("unicode/é.txt".encode(), label="utf8_e")
    add("unicode/e\u0301.txt".encode(), label="utf8_nfd")  # NFD twin of the above: a distinct key
    add("unicode/中文/文件.txt".encode(), label="utf8_cjk")
    add("unicode/😀 emoji.bin".encode(), label="utf8_emoji")
    add("unicode/Ωmega ≈ ç √.dat".encode())
    # Not UTF-8 at all.
    add(b"\xff\xfe.bin", label="non_utf8_root")
    add(b"latin1/caf\xe9.txt", label="latin1")
    add(b"bad\xc3(/x.bin", label="non_utf8_dir")
    add(b"bad\xc3(/\x80lead\xff.bin")
    # Empty files.
    for i in range(5):
        add(b"empty/e%d" % i, b"", label=f"empty{i}" if i == 0 else None)
    # A deep tree: 70 nested directories, files at several levels.
    deep = b"deep"
    for lvl in range(70):
        deep += b"/l%02d" % lvl
        if lvl % 10 == 9:
            add(deep + b"/at%02d.txt" % lvl)
    add(deep + b"/leaf.bin", label="deep_leaf")
    # Hidden files and directories.
    add(b".hidden", label="hidden")
    add(b".git/HEAD", b"ref: refs/heads/main\n", label="git_head")
    add(b".git/objects/ab/cdef0123456789")
    add(b"d000/.dotfile")
    add(b".config/.inner/.x")
    # Awkward ASCII, and names whose byte-wise order differs from a per-component order.
    for k in [b"spaces in name.txt", b"tab\tname", b"new\nline", b"quote'\"q", b"back\\slash", b"glob*?[x].txt",
              b"-dash-first", b"a-c", b"a/b", b"a0", b"A", b"~tilde", b"semi;colon", b"%percent%", b"#hash"]:
        add(k)
    special["newline"] = b"new\nline"
    # Modes and mtimes, explicitly.
    add(b"modes/rw-------", mode=0o600, label="mode600")
    add(b"modes/rwxr-xr-x", mode=0o755, label="mode755")
    add(b"modes/r--------", mode=0o400, label="mode400")
    add(b"mtimes/fraction", mtime=1_600_000_000.75, label="mtime_frac")
    add(b"mtimes/y2033", mtime=2_000_000_000, label="mtime_2033")
    add(b"mtimes/y2100", mtime=4_102_444_800, label="mtime_2100")
    keys.sort()
    return Tree(root=root, keys=keys, special=special)


def make_plain_tree(root: str, n: int, size_range=(100, 3000), seed: int = 7, dirs: int = 7) -> Tree:
    """A simple tree of ``n`` random files (deterministic names and sizes)."""
    rng = random.Random(seed)
    rb = os.fsencode(root)
    keys = []
    for i in range(n):
        key = b"c%02d/f%05d.bin" % (i % dirs, i)
        p = os.path.join(rb, key)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(os.urandom(rng.randrange(*size_range)))
        keys.append(key)
    keys.sort()
    return Tree(root=root, keys=keys)


def copy_dataset(src, dst) -> str:
    shutil.copytree(src, dst)
    return os.fspath(dst)


def have_strace() -> bool:
    """strace is installed and allowed to trace (ptrace may be forbidden in containers)."""
    if not shutil.which("strace"):
        return False
    r = subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True)
    return r.returncode == 0


def wait_for(pred, timeout: float = 10.0, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --------------------------------------------------------------------------------------------
# Processes, mounts and odd trees (fault tests)


def mkdeep(root: str, names: list[str], leaf: bytes = b"leaf", data: bytes = b"leaf") -> None:
    """Creates root/names[0]/names[1]/.../leaf with dir fds (works past PATH_MAX)."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(f, data)
        finally:
            os.close(f)
    finally:
        os.close(fd)


@contextlib.contextmanager
def tmpfs(path: str, opts: str):
    """Mounts a tmpfs at ``path`` (root only), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        # Needs root (CI runs as root; under CI=true this skip is a failure).
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def staging_leftovers(d: str) -> list[str]:
    """Names in ``d`` that an unfinished stage leaves (``.NAME.staging-…``)."""
    return sorted(n for n in os.listdir(d) if ".staging-" in n)


def popen_cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "PACKDS_FAULT" and not k.startswith("SLURM_")}
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "packds", *[os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, **kw)


def unprivileged():
    """(command prefix, uid that will own the tree) to run packds without the power to read
    a mode-000 file. As root: drop to user 65534 when it can run this interpreter, else stay
    uid 0 but drop every capability (so permission bits apply to root too)."""
    probe = [sys.executable, "-c", "import packds"]
    if os.geteuid() != 0:
        return [], None
    p = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run(p + probe, capture_output=True).returncode == 0:
        return p, 65534
    p = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    assert subprocess.run(p + probe, capture_output=True).returncode == 0, "cannot drop privileges with setpriv"
    return p, None


def other_user() -> tuple[list[str], int]:
    """(command prefix, uid) to run plain Python (``sys.executable``, no packds needed) as another,
    real user (65534): to plant files, hold locks, own directories. Skips when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user (65534)")
    p = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run(p + [sys.executable, "-c", "import os, fcntl"], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot run Python as user 65534 with setpriv: {r.stderr}"
    return p, 65534


@contextlib.contextmanager
def reachable_dir(prefix: str = "packds-shared-"):
    """A fresh directory (mode 755) that another user can reach: pytest's and the session's
    scratch directories are private (700). Removed afterwards."""
    import tempfile

    base = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for dp, _dn, _fn in os.walk(base):
            os.chmod(dp, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def chown_tree(root, uid: int | None) -> None:
    """Gives everything under ``root`` (and ``root``) to ``uid`` (no-op for None)."""
    if uid is None:
        return
    for dp, dn, fn in os.walk(root):
        for n in [*dn, *fn, ""]:
            os.lchown(os.path.join(dp, n) if n else dp, uid, uid)


SLOWFS_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools", "slowfs.c")


def build_slowfs(workdir: str) -> str:
    """Builds ../shared/tools/slowfs.c (a FUSE mirror that adds latency to every metadata call
    and read) into ``workdir``; skips, saying what is missing, when it cannot (a failure under
    CI=true, where .ci/run installs FUSE 3)."""
    if not os.path.exists(SLOWFS_C):
        pytest.skip("../shared/tools/slowfs.c is not there")
    if shutil.which("fusermount3") is None or shutil.which("pkg-config") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE 3 is not installed (apt-get install fuse3 libfuse3-dev pkg-config)")
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True)
    if flags.returncode != 0:
        pytest.skip("libfuse3-dev is not installed")
    exe = os.path.join(workdir, "slowfs")
    r = subprocess.run(["cc", "-O2", "-o", exe, SLOWFS_C, *flags.stdout.split()], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"slowfs does not build: {r.stderr.strip()[:200]}")
    return exe


@contextlib.contextmanager
def slowfs(exe: str, src: str, mnt: str, meta_us: int = 0, read_us: int = 0):
    """Mounts a slowfs mirror of ``src`` at ``mnt`` (unmounted afterwards)."""
    os.makedirs(mnt, exist_ok=True)
    env = {**os.environ, "SLOWFS_META_US": str(meta_us), "SLOWFS_READ_US": str(read_us)}
    r = subprocess.run([exe, src, mnt], capture_output=True, text=True, env=env, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount slowfs: {r.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
