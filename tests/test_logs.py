"""What a Slurm user sees in a job's log file: pack prints progress lines (not a silent log for
hours), and an interrupted pack says what is kept and what to run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import _helpers as h


@pytest.fixture
def tree(work):
    root = os.path.join(work, "src")
    for i in range(2000):
        h.write(root, f"d{i % 9}/f{i:05}.txt", b"sample %d " % i * 20)
    return root


def _pack_to_log(tree, out, log, *extra, fault="pack-slow-us:30000"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PACKDS_FAULT"] = fault
    f = open(log, "wb")
    p = subprocess.Popen([sys.executable, "-m", "packds", "pack", tree, "-o", out, "--shard-size", "64K", "--threads", "4", *extra], stdout=subprocess.DEVNULL, stderr=f, env=env)
    f.close()
    return p


@pytest.mark.faults
def test_pack_into_a_log_file_prints_progress_lines_at_once_and_every_interval(tree, work):
    log = os.path.join(work, "pack.log")
    p = _pack_to_log(tree, os.path.join(work, "o.pds"), log, "--progress-interval", "1")
    try:
        assert h.wait_for(lambda: b"packds: pack:" in open(log, "rb").read(), timeout=3, step=0.02), open(log, "rb").read()
        assert p.poll() is None, "the pack should still be running (slowed down)"
        time.sleep(2.5)
        lines = [ln for ln in open(log, "rb").read().splitlines() if ln.startswith(b"packds: pack:")]
        assert len(lines) >= 3, lines
        assert b"\r" not in open(log, "rb").read()
        assert any(b"files/s" in ln and b"ETA" in ln and b" / 2,000 files" in ln for ln in lines), lines
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


@pytest.mark.faults
def test_interrupted_pack_says_what_is_kept_and_the_rerun_needs_resume(tree, work):
    out = os.path.join(work, "o.pds")
    log = os.path.join(work, "pack.log")
    p = _pack_to_log(tree, out, log, "--progress-interval", "0.2")
    assert h.wait_for(lambda: b"packing" in open(log, "rb").read(), timeout=10, step=0.02)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    text = open(log, "rb").read().decode()
    assert "pack interrupted after" in text and "rerun the same command with --resume" in text, text
    again = h.cli("pack", tree, "-o", out, "--shard-size", "64K")
    h.assert_cli_error(again, "holds an interrupted pack")
    assert b"--resume" in again.stderr
    r = h.cli("pack", tree, "-o", out, "--shard-size", "64K", "--resume")
    assert r.returncode == 0, h.show(r)
