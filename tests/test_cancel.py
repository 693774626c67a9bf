"""Cancellation on a slow (Lustre-like) filesystem: Slurm sends SIGKILL 30 s after SIGTERM, so
`packds pack` must stop within a second or two in every phase, with the usual clean-up. The
source is a slowfs mirror adding 1 ms to every metadata call and 0.5 ms to every read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import _helpers as h


@pytest.fixture(scope="module")
def slow_tree(fast_base):
    """40,000 small files in 8 directories, mirrored through slowfs (1 ms per metadata call)."""
    import tempfile

    base = tempfile.mkdtemp(prefix="cancel-", dir=fast_base)
    exe = h.build_slowfs(base)
    src = os.path.join(base, "src")
    for d in range(8):
        os.makedirs(os.path.join(src, f"d{d}"))
        for i in range(5000):
            with open(os.path.join(src, f"d{d}", f"f{i:05}"), "wb") as f:
                f.write(b"%d" % i)
    with h.slowfs(exe, src, os.path.join(base, "mnt"), meta_us=1000, read_us=500) as mnt:
        yield base, mnt


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
def test_pack_on_a_slow_filesystem_stops_within_two_seconds(slow_tree, phase, sig):
    secs, rc, out, log = _signal_when(phase, slow_tree, sig, threads="32")
    print(f"\n{phase.decode()} {signal.Signals(sig).name}: stopped {secs:.2f} s after the signal")
    assert rc == (143 if sig == signal.SIGTERM else 130), log
    assert secs <= 2.0, f"took {secs:.2f} s to stop\n{log}"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
