"""Reads a packds dataset's shards with standard tools only (tarfile / h5py, and the
``zstandard`` package for compressed samples): the reference the packds reader is checked
against."""

from __future__ import annotations

import os
import tarfile

import zstandard


def _decompressor(zstd_dict: bytes | None) -> zstandard.ZstdDecompressor:
    if zstd_dict:
        return zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(zstd_dict))
    return zstandard.ZstdDecompressor()


def zstd_dict_of(ds_dir) -> bytes | None:
    import packds

    return packds.open(ds_dir).zstd_dict()


def tar_samples(ds_dir) -> list[tuple[bytes, bytes]]:
    """(key, original bytes) of every member of every tar shard, in order (a hard link member
    reads as its target; directory members, of empty directories, are not samples); in a
    compressed dataset, members named ``KEY.zst`` are decompressed (with its dictionary when it
    has one)."""
    import json

    compressed = "compression" in json.load(open(os.path.join(ds_dir, "manifest.json")))
    d = _decompressor(zstd_dict_of(ds_dir))
    out = []
    for name in sorted(n for n in os.listdir(ds_dir) if n.endswith(".tar")):
        with tarfile.open(os.path.join(ds_dir, name), encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                if m.isdir():
                    continue
                key, data = os.fsencode(m.name), tf.extractfile(m).read()
                if compressed and key.endswith(b".zst"):
                    key, data = key[:-4], d.decompress(data)
                out.append((key, data))
    return out


def h5_samples(ds_dir) -> list[tuple[bytes, bytes]]:
    """(key, original bytes) of every sample of every HDF5 shard, read with plain h5py."""
    import h5py

    out = []
    for name in sorted(n for n in os.listdir(ds_dir) if n.endswith(".h5")):
        with h5py.File(os.path.join(ds_dir, name), "r") as f:
            data = f["data"][()].tobytes() if f["data"].shape[0] else b""
            zd = f["zstd_dict"][()].tobytes() if "zstd_dict" in f else None
            d = _decompressor(zd)
            for key, o, n, codec in zip(f["key"][()], f["offset"][()], f["size"][()], f["codec"][()]):
                b = data[int(o) : int(o) + int(n)]
                out.append((bytes(key), d.decompress(b) if codec else b))
    return out


def shard_samples(ds_dir) -> list[tuple[bytes, bytes]]:
    return h5_samples(ds_dir) if any(n.endswith(".h5") for n in os.listdir(ds_dir)) else tar_samples(ds_dir)
