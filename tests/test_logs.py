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


def _run_to_log(args, log, fault):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PACKDS_FAULT"] = fault
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "packds", *args], stdout=subprocess.DEVNULL, stderr=f, env=env)


@pytest.fixture
def long_commands(tree, work):
    """Arguments of every long command besides pack, each on its own small input: a dataset,
    a partitioned pack to merge, tar files to index, a directory to unpack into."""
    ds = os.path.join(work, "ds.pds")
    assert h.cli("pack", tree, "-o", ds, "--shard-size", "16K").returncode == 0
    plan, parts = os.path.join(work, "plan.pdsp"), os.path.join(work, "parts.pds")
    assert h.cli("plan", tree, "-o", plan, "--shard-size", "16K", "--parts", "2").returncode == 0
    for i in range(2):
        assert h.cli("pack", "--plan", plan, "--part", str(i), "-o", parts).returncode == 0
    shards = sorted(os.path.join(ds, f) for f in os.listdir(ds) if f.endswith(".tar"))
    return {
        "plan": ["plan", tree, "-o", os.path.join(work, "p2.pdsp"), "--threads", "1"],
        "index": ["index", *shards, "-o", os.path.join(work, "ix.pds")],
        "merge": ["merge", parts],
        "verify": ["verify", ds],
        "unpack": ["unpack", ds, os.path.join(work, "unpacked")],
    }


# Each command, slowed at every step (a read, a file, a shard; plan: each stat), writes progress
# lines into the log at once and then every interval, with its items done of their total; no
# carriage returns.
@pytest.mark.faults
@pytest.mark.parametrize("command,item", [("index", b"tars"), ("merge", b"shards"), ("verify", b"samples"), ("unpack", b"files"), ("plan", b"files")])
def test_every_long_command_prints_progress_lines_into_a_log_file(long_commands, work, command, item):
    log = os.path.join(work, f"{command}.log")
    fault = "pack-slow-us:2000" if command == "plan" else "step-slow-ms:100"
    p = _run_to_log([*long_commands[command], "--progress-interval", "0.3"], log, fault)
    try:
        assert h.wait_for(lambda: f"packds: {command}:".encode() in open(log, "rb").read(), timeout=5, step=0.02), open(log, "rb").read()
        assert h.wait_for(lambda: sum(ln.startswith(f"packds: {command}:".encode()) for ln in open(log, "rb").read().splitlines()) >= 3, timeout=20, step=0.05), \
            open(log, "rb").read()
        text = open(log, "rb").read()
        assert b"\r" not in text
        lines = [ln for ln in text.splitlines() if ln.startswith(f"packds: {command}:".encode())]
        assert any(b" / " in ln and item + b" (" in ln and b"MB/s" in ln for ln in lines), lines
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


# SIGTERM (scancel, a time limit) in the middle of each command: it stops within 2 s (Slurm
# kills 30 s later), exits 143, and says where it stopped and what to do.
@pytest.mark.faults
@pytest.mark.parametrize("command,says", [
    ("index", "nothing was written"),
    ("merge", "run `packds merge"),
    ("verify", "nothing was changed"),
    ("unpack", "the files written so far are in"),
])
def test_every_long_command_stops_within_2_s_of_sigterm_and_says_what_is_kept(long_commands, work, command, says):
    log = os.path.join(work, f"{command}.log")
    p = _run_to_log([*long_commands[command], "--progress-interval", "0.1"], log, "step-slow-ms:300")
    assert h.wait_for(lambda: f"packds: {command}:".encode() in open(log, "rb").read(), timeout=10, step=0.02)
    time.sleep(0.5)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143, open(log, "rb").read()
    assert time.monotonic() - t < 2.0
    text = open(log, "rb").read().decode()
    assert f"packds: {command} interrupted" in text and says in text, text
    if command == "merge":
        # The rerun finishes the merge; the result verifies.
        r = h.cli(*long_commands["merge"])
        assert r.returncode == 0, h.show(r)
        assert h.cli("verify", long_commands["merge"][1]).returncode == 0
    if command == "index":
        assert not os.path.exists(long_commands["index"][-1])
