"""Small shared helpers for the fault tests (the suite's own helpers live in tests/_helpers.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import _helpers as h  # noqa: F401  (tests/ is on sys.path through the root conftest)


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
        import pytest

        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def popen_cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "PACKDS_FAULT" and not k.startswith("SLURM_")}
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "packds", *[os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, **kw)
