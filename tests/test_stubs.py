"""python/packds/_core.pyi matches the compiled extension (``python -m mypy.stubtest``):
every name `_core` exports is in the stub, with the same parameters and defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_core_stub_matches_the_extension():
    pytest.importorskip("mypy.stubtest")
    allow = os.path.join(os.path.dirname(__file__), "..", "python", "stubtest-allowlist.txt")
    cmd = [sys.executable, "-m", "mypy.stubtest", "packds._core"] + (["--allowlist", allow] if os.path.exists(allow) else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
