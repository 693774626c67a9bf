"""Datasets written by packds 0.1.0 (tests/data/datasets-0.1.0, kept as they were packed) open,
verify and read back identically with this build: a tar, a zstd + dictionary tar and an HDF5
dataset. The expected keys, sizes and SHA-256 of every sample were recorded at packing time."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tarfile

import pytest

import _helpers as h
import packds

DATA = os.path.join(os.path.dirname(__file__), "data", "datasets-0.1.0")
EXPECTED = json.load(open(os.path.join(DATA, "expected.json"), encoding="utf-8"))["datasets"]


@pytest.fixture(params=sorted(EXPECTED))
def old(request, work):
    # A copy: tests must not touch the fixture (verify and stage only read, but be safe).
    dst = os.path.join(work, request.param)
    shutil.copytree(os.path.join(DATA, request.param), dst)
    return request.param, dst


def test_old_dataset_reads_identically(old):
    name, path = old
    want = EXPECTED[name]
    with packds.open(path) as ds:
        assert len(ds) == len(want["samples"])
        got = [[ds.key(i), ds.size(i), hashlib.sha256(ds[i]).hexdigest()] for i in range(len(ds))]
        assert got == want["samples"]
        stored = hashlib.sha256(b"".join(ds.raw(i) for i in range(len(ds)))).hexdigest()
        assert stored == want["stored_sha256"]
        for k, _, digest in want["samples"][::7]:
            assert hashlib.sha256(ds[k]).hexdigest() == digest
        ds.verify()


def test_old_dataset_cli_verify_info_and_stage(old, work):
    name, path = old
    r = h.cli("verify", path, "--deep")
    assert r.returncode == 0, h.show(r)
    r = h.cli("info", path, "--json")
    assert r.returncode == 0, h.show(r)
    assert json.loads(r.stdout)["samples"] == len(EXPECTED[name]["samples"])
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    r = h.cli("stage", path, "--to", dest, "--policy", "local", "-q", "--json")
    assert r.returncode == 0, h.show(r)
    staged = json.loads(r.stdout)["path"]
    with packds.open(staged) as ds:
        assert [ds.key(i) for i in range(len(ds))] == [s[0] for s in EXPECTED[name]["samples"]]


def test_old_tar_shards_still_extract_with_tarfile():
    names = []
    for s in sorted(glob.glob(os.path.join(DATA, "tar.pds", "*.tar"))):
        with tarfile.open(s) as t:
            names += t.getnames()
    assert names == [s[0] for s in EXPECTED["tar.pds"]["samples"]]
