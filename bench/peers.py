"""Peer writers and readers for bench/run.py, runnable as a child process so that GNU time
measures each one alone:

    python bench/peers.py write-wds|write-mds|write-h5 SRC OUT
    python bench/peers.py open KIND PATH          # prints ms from open to the first sample

Every writer walks SRC in the same sorted order as packds (keys = paths relative to SRC).
"""

from __future__ import annotations

import json
import os
import sys
import time
import types


def stub_torchvision() -> None:
    """MosaicML streaming imports torchvision at import time (streaming.vision); the benchmark
    never uses it, so an empty stand-in module is enough for the import to succeed."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        pass
    tv = types.ModuleType("torchvision")
    ds = types.ModuleType("torchvision.datasets")
    tr = types.ModuleType("torchvision.transforms")

    class _Any:  # any attribute, any call
        def __init__(self, *a, **k):
            pass

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any

    def mod_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any

    class VisionDataset(_Any):
        pass

    ds.VisionDataset = VisionDataset
    ds.__getattr__ = tr.__getattr__ = tv.__getattr__ = mod_getattr  # type: ignore[attr-defined]
    tv.datasets, tv.transforms, tv.__version__ = ds, tr, "0.0.0+stub"
    sys.modules.update({"torchvision": tv, "torchvision.datasets": ds, "torchvision.transforms": tr})


def have(kind: str) -> str | None:
    """None when the peer is importable, else the reason."""
    try:
        if kind == "wds":
            import webdataset  # noqa: F401
        elif kind == "wids":
            import wids  # noqa: F401
        elif kind == "mds":
            stub_torchvision()
            import streaming  # noqa: F401
        elif kind == "h5":
            import h5py  # noqa: F401
            import numpy  # noqa: F401
        elif kind == "torch":
            import torch  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001
        return f"not installed ({type(e).__name__}: {e})".splitlines()[0][:160]


def walk(src: str) -> list[str]:
    keys = []
    for dp, dns, fns in os.walk(src):
        dns.sort()
        rel = os.path.relpath(dp, src)
        for f in fns:
            keys.append(f if rel == "." else f"{rel}/{f}")
    keys.sort(key=lambda k: k.encode())
    return keys


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_wds(src: str, out: str) -> None:
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    keys = walk(src)
    counts = []
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxsize=1 << 30, maxcount=10**9, verbose=0) as w:
        for i, k in enumerate(keys):
            # __key__ must not hold dots; the sample's one field is "bin"
            w.write({"__key__": f"s{i:08d}", "bin": read(os.path.join(src, k))})
        counts = w.shard + 1 if hasattr(w, "shard") else None
    # wids descriptor (nsamples per shard): count members per shard
    import tarfile

    shards = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            p = os.path.join(out, name)
            with tarfile.open(p) as tf:
                n = sum(1 for m in tf if m.isfile())
            shards.append({"url": p, "nsamples": n})
    with open(os.path.join(out, "wids.json"), "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shards}, f)
    del counts


def write_mds(src: str, out: str) -> None:
    stub_torchvision()
    from streaming import MDSWriter

    keys = walk(src)
    with MDSWriter(out=out, columns={"key": "str", "data": "bytes"}, compression=None, size_limit=1 << 28) as w:
        for k in keys:
            w.write({"key": k, "data": read(os.path.join(src, k))})


def write_h5(src: str, out: str) -> None:
    import h5py
    import numpy as np

    keys = walk(src)
    sizes = [os.stat(os.path.join(src, k)).st_size for k in keys]
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    with h5py.File(out, "w") as f:
        # contiguous layout (no chunking, no compression): the fastest h5py layout to slice
        data = f.create_dataset("data", shape=(int(offsets[-1]),), dtype=np.uint8)
        buf, pos, flushed = [], 0, 0
        for i, k in enumerate(keys):
            b = read(os.path.join(src, k))
            buf.append(b)
            pos += len(b)
            if pos - flushed >= 64 << 20 or i == len(keys) - 1:
                data[flushed:pos] = np.frombuffer(b"".join(buf), dtype=np.uint8)
                buf, flushed = [], pos
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("keys", data=np.array([k.encode() for k in keys], dtype=object), dtype=h5py.string_dtype())


# ---------------------------------------------------------------------------------------------
# readers: each returns (object, get(i) -> bytes, n)


def open_reader(kind: str, path: str, keys: list[str] | None = None):
    if kind == "packds":
        import packds

        ds = packds.open(path)
        return ds, ds.__getitem__, len(ds)
    if kind == "h5":
        import h5py

        f = h5py.File(path, "r")
        offs = f["offsets"][:].tolist()
        data = f["data"]

        def get(i, data=data, offs=offs):
            return data[offs[i] : offs[i + 1]].tobytes()

        return f, get, len(offs) - 1
    if kind == "mds":
        stub_torchvision()
        from streaming import StreamingDataset

        ds = StreamingDataset(local=path, shuffle=False, batch_size=1)

        def get(i, ds=ds):
            return ds.get_item(i)["data"]

        return ds, get, ds.num_samples
    if kind == "wids":
        import wids

        ds = wids.ShardListDataset(path, localname=lambda u: u, transformations=[lambda s: s], cache_size=1 << 10)

        def get(i, ds=ds):
            v = ds[i][".bin"]
            return v if isinstance(v, bytes) else v.read() if hasattr(v, "read") else bytes(v)

        return ds, get, len(ds)
    if kind == "tarfile":
        import tarfile

        tf = tarfile.open(path)
        members = [m for m in tf if m.isfile()]  # the member scan (tar has no index)
        if keys is not None:  # sample i = packds key i (tar -C SRC . stores directory order)
            by = {(m.name[2:] if m.name.startswith("./") else m.name): m for m in members}
            members = [by[k] for k in keys]
        fo = tf.fileobj

        def get(i, members=members, fo=fo):
            m = members[i]
            fo.seek(m.offset_data)
            return fo.read(m.size)

        return tf, get, len(members)
    raise SystemExit(f"unknown reader {kind}")


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "write-wds":
        write_wds(argv[1], argv[2])
    elif cmd == "write-mds":
        write_mds(argv[1], argv[2])
    elif cmd == "write-h5":
        write_h5(argv[1], argv[2])
    elif cmd == "open":
        kind, path = argv[1], argv[2]
        if kind == "mds":
            stub_torchvision()
            import streaming  # noqa: F401  (imports are not charged to open)
        elif kind == "wids":
            import wids  # noqa: F401
        elif kind == "h5":
            import h5py  # noqa: F401
        elif kind == "packds":
            import packds  # noqa: F401
        t = time.perf_counter()
        _, get, n = open_reader(kind, path)
        b = get(0)
        dt = time.perf_counter() - t
        assert isinstance(b, (bytes, bytearray, memoryview)) and len(b) > 0, type(b)
        print(json.dumps({"ms": dt * 1e3, "n": n}))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
