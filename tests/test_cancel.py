"""Cancellation on a slow (Lustre-like) filesystem: Slurm sends SIGKILL 30 s after SIGTERM, so
`packds pack` must stop within a second or two in every phase, with the usual clean-up. The
source is a slowfs mirror that adds latency to every metadata call and read: for the walk, a
tree of many small directories at 20 ms per metadata call (the walk lasts seconds); for the
reads, 40,000 files in 8 directories at 1 ms per metadata call and 0.5 ms per read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import _helpers as h


@pytest.fixture(scope="module")
def slow_trees(fast_base):
    """{phase: (base, mount)}: "scanning" is 3,000 directories of one file at 20 ms per
    metadata call; "packing" is 40,000 files in 8 directories at 1 ms (0.5 ms per read)."""
    import tempfile

    base = tempfile.mkdtemp(prefix="cancel-", dir=fast_base)
    exe = h.build_slowfs(base)
    wide, deep = os.path.join(base, "wide"), os.path.join(base, "files")
    for d in range(3000):
        h.write(wide, f"d{d:04}/f", b"x")
    for d in range(8):
        os.makedirs(os.path.join(deep, f"d{d}"))
        for i in range(5000):
            with open(os.path.join(deep, f"d{d}", f"f{i:05}"), "wb") as f:
                f.write(b"%d" % i)
    with h.slowfs(exe, wide, os.path.join(base, "mnt-wide"), meta_us=20000) as m1, \
            h.slowfs(exe, deep, os.path.join(base, "mnt-files"), meta_us=1000, read_us=500) as m2:
        yield {b"scanning": (base, m1), b"packing": (base, m2)}


def _signal_when(pattern: bytes, slow_tree, sig, threads: str):
    base, mnt = slow_tree
    out = os.path.join(base, f"out-{pattern.decode()}-{sig}.pds")
    log = os.path.join(base, f"log-{pattern.decode()}-{sig}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PACKDS_FAULT"}
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "packds", "pack", mnt, "-o", out, "--progress-interval", "0.1", "--threads", threads],
                             stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        assert h.wait_for(lambda: pattern in open(log, "rb").read(), timeout=60, step=0.02), open(log, "rb").read()
        assert p.poll() is None, "the pack ended before the phase could be interrupted"
        t0 = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(timeout=30)
        return time.monotonic() - t0, rc, out, open(log, "rb").read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("phase", [b"scanning", b"packing"])
def test_pack_on_a_slow_filesystem_stops_within_two_seconds(slow_trees, phase, sig):
    secs, rc, out, log = _signal_when(phase, slow_trees[phase], sig, threads="32")
    print(f"\n{phase.decode()} {signal.Signals(sig).name}: stopped {secs:.2f} s after the signal")
    assert rc == (143 if sig == signal.SIGTERM else 130), log
    assert secs <= 2.0, f"took {secs:.2f} s to stop\n{log}"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
