"""Fixtures for the packds suite: a fast scratch area (tmpfs when there is one), the "odd" tree
of 20,000+ awkward files, and datasets packed from it once per session.

``--runslow`` enables the tests marked ``slow``. A test may also skip when something it needs is
missing on this machine (a tool such as ``h5dump``, a FUSE or Slurm helper, root for a tmpfs):
it says what. Under ``CI=true`` every such skip is a failure (``.ci/run`` installs everything);
only the ``slow`` skips stay skips."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

import _helpers as h


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _ci_fails_skip(report, slow: bool) -> None:
    if report.skipped and _ci() and not slow and not hasattr(report, "wasxfail"):
        where = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (every skip but --runslow ones fails in CI): {where}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    slow = "slow" in item.keywords and not item.config.getoption("--runslow")
    _ci_fails_skip(outcome.get_result(), slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _ci_fails_skip(outcome.get_result(), False)


@pytest.fixture(scope="session")
def fast_base(tmp_path_factory):
    """A session scratch directory, on /dev/shm when possible (packs fsync a lot; tmpfs makes
    that free), else under pytest's tmp dir. Removed at the end of the session."""
    base = None
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        try:
            base = tempfile.mkdtemp(prefix="packds-tests-", dir="/dev/shm")
        except OSError:
            base = None
    if base is None:
        base = str(tmp_path_factory.mktemp("fast"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def work(fast_base, request):
    """A fresh, empty directory in the fast scratch area for one test (removed after it)."""
    d = tempfile.mkdtemp(prefix=request.node.name[:40].replace("/", "_") + "-", dir=fast_base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def odd_tree(fast_base) -> h.Tree:
    t = time.perf_counter()
    tree = h.make_odd_tree(os.path.join(fast_base, "odd-src"))
    dt = time.perf_counter() - t
    assert len(tree.keys) >= 20_000
    print(f"\nodd tree: {len(tree.keys)} files in {dt:.1f} s")
    return tree


@pytest.fixture(scope="session")
def odd_ds(odd_tree, fast_base):
    """The odd tree packed with the CLI into several 4 MiB shards. Returns (dataset dir, the
    --json summary). Tests must not modify it (copy it first)."""
    out = os.path.join(fast_base, "odd.pds")
    r = h.cli("pack", odd_tree.root, "-o", out, "--shard-size", "4M", "--json", timeout=300)
    assert r.returncode == 0, h.show(r)
    summary = json.loads(r.stdout)
    return out, summary


@pytest.fixture(scope="session")
def small_tree(fast_base) -> h.Tree:
    """~300 files over several 64 KiB shards, with a few odd names (for corruption and CLI
    tests that need a dataset to damage)."""
    root = os.path.join(fast_base, "small-src")
    tree = h.make_plain_tree(root, 300, size_range=(0, 2500), seed=3)
    for k, data in [(b"top.txt", b"hello packds\n"), (b"\xff\xfe.bin", b"not utf-8 name"),
                    ("sub/é中文😀.txt".encode(), b"unicode name"), (b"zz/empty", b"")]:
        h.write(root, k, data)
        tree.keys.append(k)
    tree.keys.sort()
    return tree


@pytest.fixture(scope="session")
def small_ds_pristine(small_tree, fast_base) -> str:
    out = os.path.join(fast_base, "small.pds")
    s = h.pack(small_tree.root, out, shard_size=64 << 10, threads=4)
    assert s["shards"] >= 4, s
    return out


@pytest.fixture
def small_ds(small_ds_pristine, work) -> str:
    """A private copy of the small dataset, free to damage."""
    return h.copy_dataset(small_ds_pristine, os.path.join(work, "ds.pds"))


# --- Tests marked `faults` use the test-only PACKDS_FAULT switches, compiled in only with the
# cargo feature `fault-injection`. Without it they are skipped; under CI=true they fail instead
# (a CI build must have the feature).
@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_faults(config, items):
    from packds import _core

    if getattr(_core, "FAULT_INJECTION", False):
        return
    reason = "needs a build with --features fault-injection"
    ci = os.environ.get("CI", "").lower() == "true"
    for item in items:
        if item.get_closest_marker("faults") is None:
            continue
        if ci:
            item.runtest = lambda: pytest.fail(f"{reason} (CI=true: not skipped)", pytrace=False)
        else:
            item.add_marker(pytest.mark.skip(reason=reason))
