"""HDF5 shard writer, called by the Rust pack pipeline once per shard (see docs/FORMAT.md).

packds never links libhdf5 itself: h5py writes each shard's metadata and allocates its
contiguous ``data`` array without writing it; the Rust core then copies the samples into that
array's place (its file offset is returned from here) and hashes the finished file. Readers use
packds' own index and never parse the HDF5 file; any HDF5 reader can read it without packds.
"""

from __future__ import annotations

import os

#: Written into every shard's root attributes.
H5_FORMAT = "packds-h5"
H5_FORMAT_VERSION = 1


def write_shard(path, data_len: int, columns, zstd_dict: bytes, compression: str) -> int:
    """Creates the HDF5 file ``path`` for one shard; returns the byte offset of ``/data``."""
    import h5py
    import numpy as np

    offsets, sizes, raw_sizes, codecs, crcs, keys, key_offsets = columns
    n = len(offsets) // 8
    path = os.fsencode(path)
    with h5py.File(path, "w", track_order=False) as f:
        # /data first, so it sits right after the superblock; allocated now, never filled
        # (FILL_TIME_NEVER): packds writes the bytes into its place.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)
        space = h5py.h5s.create_simple((data_len,), (data_len,))
        dset = h5py.h5d.create(f.id, b"data", h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl)
        offset = dset.get_offset()
        dset.close()

        def column(name: str, buf: bytes, dtype: str) -> None:
            f.create_dataset(name, data=np.frombuffer(buf, dtype=dtype), track_times=False)

        column("offset", offsets, "<u8")
        column("size", sizes, "<u8")
        column("raw_size", raw_sizes, "<u8")
        column("codec", codecs, "u1")
        column("crc32c", crcs, "<u4")
        ko = np.frombuffer(key_offsets, dtype="<u8")
        key_list = np.empty(n, dtype=object)
        for k in range(n):
            key_list[k] = keys[ko[k] : ko[k + 1]]
        f.create_dataset("key", data=key_list, dtype=h5py.string_dtype("ascii"), track_times=False)
        if zstd_dict:
            column("zstd_dict", zstd_dict, "u1")
        f.attrs["packds_format"] = H5_FORMAT
        f.attrs["packds_format_version"] = H5_FORMAT_VERSION
        f.attrs["compression"] = compression
        f.attrs["samples"] = n
    if data_len == 0:
        return 0
    if offset is None:
        raise OSError(f"{os.fsdecode(path)}: HDF5 did not allocate the data array")
    return int(offset)
