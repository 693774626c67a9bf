"""PyTorch datasets over a packds dataset (needs torch: ``pip install torch``; see docs/TORCH.md).

* :class:`PackedDataset` — map-style (random access), for staged or in-memory data.
  ``ds[i]`` is ``transform(bytes)`` or ``(transform(bytes), label)``; ``__getitems__`` reads a
  whole batch with one ``get_many`` call (torch >= 2.1 DataLoaders use it).
* :class:`StreamingDataset` — iterable, for data left on shared storage: reads contiguous
  blocks of samples (one MiB-sized ``Dataset.read_range`` each), shuffles block order per
  epoch plus a sample buffer, splits the epoch over distributed ranks and DataLoader workers
  with no duplicate and no gap, and resumes mid-epoch from ``state_dict()``.
* :class:`StreamingLoader` — a ``torch.utils.data.DataLoader`` that counts the batches it hands
  out, so ``loader.state_dict()`` works with any number of workers.

Nothing here builds a Python object per sample up front: the index stays in the mapped index
file, labels are per class, so forked workers share it all instead of copying it on read.
``import packds`` never imports this module (nor torch); importing this module imports torch
if it is installed, and the classes work as plain Python classes without it.
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.context
import multiprocessing.sharedctypes
import os
import random
from array import array
from typing import Any, Callable, Iterator, Optional, Union

import packds
from packds import _cache
from packds import streams as _streams

try:  # torch stays optional
    import torch as _torch
    from torch.utils.data import DataLoader as _DataLoader
    from torch.utils.data import Dataset as _MapBase
    from torch.utils.data import IterableDataset as _IterBase
    from torch.utils.data import get_worker_info as _get_worker_info
except ImportError:  # pragma: no cover - exercised only without torch
    _torch = None
    _MapBase = _IterBase = object  # type: ignore[assignment,misc]
    _DataLoader = None  # type: ignore[assignment]

    def _get_worker_info():  # type: ignore[no-redef]
        return None


__all__ = ["PackedDataset", "PackedBatch", "collate_packed", "StreamingDataset", "StreamingLoader", "MixedDataset", "MixedSampler", "MixedLoader", "Stream", "dist_info"]

Stream = _streams.Stream

Target = Union[None, str, Callable[[str], Any], Any]


# ---------------------------------------------------------------------------------------------
# Labels


class _Labels:
    """Label of sample ``i`` without a per-sample list.

    ``"parent"``: ImageFolder-style, the class is the key's first directory component. Keys are
    sorted byte-wise, so all keys of one class form one contiguous run: the reader finds each
    run (``ds.key_range(prefix)``, O(log n)) and a label is a bisect over the run starts.
    A callable gets the key (``str``) and returns the label, computed on the fly. Anything else
    with ``__getitem__`` (a numpy array, ...) is indexed by sample position.
    """

    def __init__(self, ds: packds.Dataset, target: Target) -> None:
        self.kind = None
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}
        self.starts = array("q")
        self.run_label = array("I")
        self.fn = None
        if target is None:
            return
        if isinstance(target, str):
            if target != "parent":
                raise ValueError(f"target={target!r}: give 'parent', a callable on the key, or a label array")
            self.kind = "parent"
            self._parent_runs(ds)
        elif callable(target):
            self.kind, self.fn = "call", target
        elif hasattr(target, "__getitem__") and hasattr(target, "__len__"):
            if len(target) != len(ds):
                raise ValueError(f"target has {len(target)} labels for {len(ds)} samples")
            self.kind, self.fn = "array", target
        else:
            raise TypeError(f"target={target!r}: give 'parent', a callable on the key, or a label array")

    def _parent_runs(self, ds: packds.Dataset) -> None:
        n = len(ds)
        names: list[bytes] = []
        i = 0
        while i < n:
            k = ds.key_bytes(i)
            cut = k.find(b"/")
            if cut <= 0:
                raise ValueError(f"target='parent' needs keys like CLASS/NAME; sample {i} has key {os.fsdecode(k)!r}")
            _, stop = ds.key_range(k[: cut + 1])  # the run of keys in this class
            self.starts.append(i)
            names.append(k[:cut])
            i = stop
        decoded = [os.fsdecode(x) for x in names]
        self.classes = sorted(set(decoded))
        self.class_to_idx = {c: j for j, c in enumerate(self.classes)}
        self.run_label = array("I", (self.class_to_idx[c] for c in decoded))

    def __call__(self, ds: packds.Dataset, i: int):
        if self.kind == "parent":
            return self.run_label[bisect.bisect_right(self.starts, i) - 1]
        if self.kind == "call":
            return self.fn(ds.key(i))
        return self.fn[i]


# ---------------------------------------------------------------------------------------------
# Map-style


class PackedDataset(_MapBase):
    """Map-style dataset: ``ds[i]`` → ``transform(bytes)``, or ``(transform(bytes), label)``
    when ``target`` is given.

    ``target="parent"``: the label is the index of the key's first directory component in the
    sorted class names (``ds.classes``, ``ds.class_to_idx``), like torchvision's ImageFolder;
    a callable gets the key and returns the label; an array-like is indexed by position.
    ``populate=True`` pre-faults the shard mappings (for staged, node-local data);
    ``verify=True`` checks each sample's CRC32C as it is read (``packds.open(verify=True)``).

    Pickles as its path and options (spawn workers re-open it); forked workers share the parent's
    mappings. With torch >= 2.1 a DataLoader with automatic batching calls ``__getitems__``,
    which reads the whole batch with a single call (GIL released).

    ``as_tensor=True``: a sample is a 1-D ``torch.uint8`` tensor instead of ``bytes`` (what
    ``transform`` gets, if given). A batch is then read with ``get_batch`` into one buffer and
    its samples are views of it: no ``bytes`` object per sample. With
    ``collate_fn=packds.torch.collate_packed`` a worker hands each batch to the main process as
    three tensors (data, offsets, labels: a :class:`PackedBatch`; the data is the batch's one
    buffer) instead of pickling one object per sample: through the worker's pipe below
    ``PIPE_BYTES``, through shared memory above.
    """

    def __init__(self, path, transform: Optional[Callable[[Any], Any]] = None, target: Target = None, *,
                 populate: bool = False, verify: bool = False, as_tensor: bool = False) -> None:
        self.path = os.fspath(path.path if isinstance(path, packds.Dataset) else path)
        self.transform = transform
        self.target = target
        self.populate = populate
        self.verify = verify
        self.as_tensor = as_tensor
        if as_tensor and _torch is None:
            raise ImportError("as_tensor=True needs torch (pip install torch)")
        self._pid = os.getpid()
        self._ds: Optional[packds.Dataset] = path if isinstance(path, packds.Dataset) else None
        self._labels = _Labels(self.dataset, target)

    @property
    def dataset(self) -> packds.Dataset:
        """The underlying :class:`packds.Dataset`, opened on first use in each process."""
        if self._ds is None:
            self._ds = packds.open(self.path, populate=self.populate, **({"verify": True} if self.verify else {}))
        return self._ds

    @property
    def classes(self) -> list[str]:
        return self._labels.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return self._labels.class_to_idx

    def label(self, i: int):
        """The label of sample ``i`` (``None`` without ``target``)."""
        return None if self._labels.kind is None else self._labels(self.dataset, i)

    def __len__(self) -> int:
        return len(self.dataset)

    def _make(self, i: int, data: bytes):
        x = self.transform(data) if self.transform is not None else data
        if self._labels.kind is None:
            return x
        return x, self._labels(self._ds, i)

    def __getitem__(self, i):
        ds = self.dataset
        if not isinstance(i, int):
            i = int(i)  # numpy / torch integer scalars
        if i < 0:
            i += len(ds)
        if self.as_tensor:
            buf, _ = ds.get_batch([i])
            return self._make(i, _torch.frombuffer(buf, dtype=_torch.uint8) if buf else _torch.empty(0, dtype=_torch.uint8))
        return self._make(i, ds[i])

    def __getitems__(self, indices) -> list:
        """A whole batch in one call (used by torch >= 2.1 DataLoaders): ``get_many`` for bytes,
        ``get_batch`` (one buffer, samples as views of it) for tensors."""
        ds = self.dataset
        n = len(ds)
        idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        if not self.as_tensor:
            return [self._make(i, d) for i, d in zip(idx, ds.get_many(idx))]
        buf, offsets = ds.get_batch(idx)
        whole = _torch.frombuffer(buf, dtype=_torch.uint8) if buf else _torch.empty(0, dtype=_torch.uint8)
        out = _TensorBatch(self._make(i, whole[offsets[k] : offsets[k + 1]]) for k, i in enumerate(idx))
        if self.transform is None:
            # collate_packed can then hand the whole buffer on instead of joining the views
            out.buf, out.whole, out.offsets = buf, whole, offsets
        return out

    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_ds"] = None  # re-opened by path in the new process
        return st

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)

    def __repr__(self) -> str:
        extra = f", {len(self.classes)} classes" if self.classes else ""
        return f"<packds.torch.PackedDataset {self.path!r}: {len(self)} samples{extra}>"


class _TensorBatch(list):
    """What ``PackedDataset(as_tensor=True).__getitems__`` returns: the samples (views of one
    buffer), plus that buffer and the offsets when no transform changed them."""

    buf: Optional[bytearray] = None
    whole: Any = None
    offsets: Optional[list] = None


#: A PackedBatch whose data is smaller than this crosses from a DataLoader worker through the
#: worker's pipe (pickled); a larger one through shared memory, as torch sends tensors. A
#: shared-memory segment per tensor per batch (create, size, map, fault in, unmap) cost more
#: than pickling 512 KB through the pipe (0.64-0.74x loose files with 8 KB samples, batch 64).
PIPE_BYTES = 4 << 20


def _rebuild_batch(buf, offsets, targets):
    data = _torch.frombuffer(buf, dtype=_torch.uint8) if len(buf) else _torch.empty(0, dtype=_torch.uint8)
    t = None if targets is None else _torch.tensor(targets, dtype=_torch.int64)
    return PackedBatch(data, _torch.tensor(offsets, dtype=_torch.int64), t, buf)


class PackedBatch(tuple):
    """A batch as :func:`collate_packed` makes it: ``data`` (every sample's bytes back to back,
    one uint8 tensor), ``offsets`` (int64, ``len + 1``: sample ``k`` is
    ``data[offsets[k]:offsets[k + 1]]``) and ``targets`` (an int64 tensor of the labels, or
    None). A small batch crosses from a DataLoader worker to the main process pickled through
    the worker's pipe (one buffer), a large one as three tensors through shared memory (see
    ``PIPE_BYTES``). ``batch[k]`` is sample ``k``'s view; ``len(batch)`` the number of samples."""

    __slots__ = ()

    def __new__(cls, data, offsets, targets=None, _buf=None):
        # _buf: the bytearray ``data`` views, when it is one (a small batch is pickled from it)
        return super().__new__(cls, (data, offsets, targets, _buf))

    data = property(lambda self: tuple.__getitem__(self, 0))
    offsets = property(lambda self: tuple.__getitem__(self, 1))
    targets = property(lambda self: tuple.__getitem__(self, 2))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k):
        o = self.offsets
        return self.data[int(o[k]) : int(o[k + 1])]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __reduce__(self):
        buf = tuple.__getitem__(self, 3)
        if buf is not None and len(buf) < PIPE_BYTES:
            t = self.targets
            return (_rebuild_batch, (buf, self.offsets.tolist(), None if t is None else t.tolist()))
        return (PackedBatch, (self.data, self.offsets, self.targets))


def collate_packed(batch: list) -> PackedBatch:
    """``collate_fn`` for ``PackedDataset(..., as_tensor=True)`` (no transform): joins the
    batch's samples (uint8 tensors, optionally ``(tensor, label)`` pairs) into one
    :class:`PackedBatch`. It runs in the DataLoader worker, so the main process receives three
    tensors per batch instead of one object per sample."""
    if _torch is None:
        raise ImportError("collate_packed needs torch (pip install torch)")
    labelled = bool(batch) and isinstance(batch[0], tuple)
    targets = _torch.tensor([b[1] for b in batch], dtype=_torch.int64) if labelled else None
    if isinstance(batch, _TensorBatch) and batch.buf is not None:
        # one get_batch buffer already holds the samples back to back: no copy
        return PackedBatch(batch.whole, _torch.tensor(batch.offsets, dtype=_torch.int64), targets, batch.buf)
    xs = [b[0] for b in batch] if labelled else list(batch)
    sizes = _torch.tensor([0] + [x.numel() for x in xs], dtype=_torch.int64)
    data = _torch.cat(xs) if xs else _torch.empty(0, dtype=_torch.uint8)
    return PackedBatch(data, _torch.cumsum(sizes, 0), targets)


# ---------------------------------------------------------------------------------------------
# Streaming


def dist_info() -> tuple[int, int]:
    """(rank, world_size): ``torch.distributed`` if initialised, else ``RANK``/``WORLD_SIZE``,
    else ``SLURM_PROCID``/``SLURM_NTASKS``, else (0, 1)."""
    if _torch is not None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size()
        except Exception:  # noqa: BLE001 - a broken distributed setup falls back to the environment
            pass
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(r) is not None and os.environ.get(w) is not None:
            rank, world = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < world:
                raise ValueError(f"{r}={rank} is not in [0, {w}={world})")
            return rank, world
    return 0, 1


class _Reader:
    """Reads blocks for one iteration: one reusable buffer, and a background thread that reads
    up to ``ahead`` blocks ahead while the samples of the current one are handed out. With a
    node-local shard cache, a second thread keeps the next ``prefetch`` shards fetched."""

    def __init__(self, owner: "StreamingDataset", ranges: list, ahead: int) -> None:
        self.owner, self.ranges, self.ahead = owner, ranges, ahead
        self.buf = bytearray(0)
        self.pool = None
        self.cache = owner._cache_client()
        self.prefetcher = None
        if self.cache is not None and owner.prefetch > 0 and ranges:
            keys = [owner._shard_key(lo) for lo, _ in ranges]
            self.prefetcher = _cache.Prefetcher(self.cache, keys, owner.prefetch)
        if ahead > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packds-read")
        self.jobs: dict = {}
        self.next = 0  # next block index not yet submitted
        self.first = 0  # blocks before this one are skipped (resume), never read

    def _job(self, lo: int, hi: int) -> list:
        return self.owner._read(lo, hi, self)

    def _submit(self, k: int) -> None:
        while self.next <= min(k, len(self.ranges) - 1):
            if self.next >= self.first:
                lo, hi = self.ranges[self.next]
                self.jobs[self.next] = self.pool.submit(self._job, lo, hi)
            self.next += 1

    def take(self, k: int) -> list:
        """Samples of block ``k``; starts reading the blocks after it."""
        if self.prefetcher is not None:
            self.prefetcher.advance(k)
        if self.pool is None:
            return self._job(*self.ranges[k])
        self.first = max(self.first, k)
        self._submit(k + self.ahead)
        f = self.jobs.pop(k, None)
        return f.result() if f is not None else self._job(*self.ranges[k])

    def now(self, lo: int, hi: int) -> list:
        """Samples lo..hi-1 at once (resuming mid-block); reads stay on the reading thread."""
        if self.pool is None:
            return self._job(lo, hi)
        return self.pool.submit(self._job, lo, hi).result()

    def start_after(self, k: int) -> None:
        """Resuming: start reading the blocks after block ``k``."""
        if self.prefetcher is not None:
            self.prefetcher.advance(k + 1)
        if self.pool is not None:
            self.first = max(self.first, k + 1)
            self.next = max(self.next, k + 1)
            self._submit(k + self.ahead)

    def close(self) -> None:
        if self.pool is not None:
            for f in self.jobs.values():
                f.cancel()
            self.pool.shutdown(wait=False)
            self.pool = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None


def _split(total: int, parts: int, k: int) -> tuple[int, int]:
    """Bounds of part ``k`` when ``total`` items are split into ``parts`` near-equal parts."""
    return total * k // parts, total * (k + 1) // parts


def _consumed(batches: int, batch_size: int, counts: list[int], drop_last: bool) -> tuple[list[int], int]:
    """Samples each worker has handed out after the loader yielded ``batches`` batches, and the
    worker next in line. A DataLoader takes batches from its workers in round-robin order and
    skips a worker once it is exhausted (in-order delivery, the default)."""
    k = len(counts)
    nb = [(m // batch_size) if drop_last else -(-m // batch_size) for m in counts]
    if batches >= sum(nb):
        return list(counts), 0
    if batches < min(nb) * k:  # every worker still active: plain round robin
        full, rest = divmod(batches, k)
        taken = [full + (1 if w < rest else 0) for w in range(k)]
        nxt = rest
    else:
        taken = [0] * k
        w, left = 0, batches
        while left:
            if taken[w] < nb[w]:
                taken[w] += 1
                left -= 1
            w = (w + 1) % k
        nxt = w
    return [min(t * batch_size, m) for t, m in zip(taken, counts)], nxt


def _open_sources(owner) -> list:
    """``owner``'s sources opened (once per process: after unpickling they are re-opened),
    from its ``paths`` and ``verify``."""
    dss = owner._dss
    if dss is None:
        dss = owner._dss = [None] * len(owner.paths)
    for j, ds in enumerate(dss):
        if ds is None:
            dss[j] = packds.open(owner.paths[j], **({"verify": True} if owner.verify else {}))
    return dss


def _starts(sizes: list[int]) -> list[int]:
    """Where each source starts when the sources are laid end to end, plus the total."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


class _SourceLabels:
    """Labels over several sources: ``"parent"`` classes are the union of every source's
    (sorted), a callable gets the key, an array is indexed by position in the sources laid end
    to end."""

    def __init__(self, datasets: list, offsets: list[int], target: Target) -> None:
        self.offsets = offsets
        self.kind = None
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}
        self.per: list[_Labels] = []
        self.fn = None
        if target is None:
            return
        if len(datasets) == 1 or (isinstance(target, str) and target == "parent") or callable(target):
            self.per = [_Labels(ds, target) for ds in datasets]
            self.kind = self.per[0].kind
            if self.kind == "parent":
                self.classes = sorted({c for lab in self.per for c in lab.classes})
                self.class_to_idx = {c: j for j, c in enumerate(self.classes)}
                for lab in self.per:
                    lab.run_label = array("I", (self.class_to_idx[lab.classes[x]] for x in lab.run_label))
                    lab.classes, lab.class_to_idx = self.classes, self.class_to_idx
            return
        total = sum(len(ds) for ds in datasets)
        if not (hasattr(target, "__getitem__") and hasattr(target, "__len__")):
            raise TypeError(f"target={target!r}: give 'parent', a callable on the key, or a label array")
        if len(target) != total:
            raise ValueError(f"target has {len(target)} labels for {total} samples (all sources, in order)")
        self.kind, self.fn = "array", target

    def __call__(self, datasets: list, s: int, i: int):
        """Label of sample ``i`` of source ``s``."""
        if self.fn is not None:
            return self.fn[self.offsets[s] + i]
        return self.per[s](datasets[s], i)


class StreamingDataset(_IterBase):
    """Iterable dataset for data left on shared storage: whole blocks, read sequentially.

    The samples of each shard are cut into blocks of about ``block_size`` bytes (contiguous in
    the shard). Each epoch the block order is shuffled (``seed`` + epoch), the resulting sample
    stream is cut into one contiguous piece per rank, each piece into one per DataLoader worker,
    and each worker reads its blocks with one ``read_range`` each into a reusable buffer (a thread
    reads ``read_ahead`` blocks ahead), passing samples through a shuffle buffer of
    ``shuffle_buffer`` samples. Every sample comes out exactly once per epoch.

    Ranks: explicit ``rank``/``world_size``, else :func:`dist_info`. With ``world_size > 1``
    the samples of an epoch do not split evenly in general; DDP needs the same number of batches
    on every rank, so by default (``pad=True``) every rank gets ``ceil(n / world_size)`` samples,
    the shortfall taken from the start of the epoch's stream (as ``DistributedSampler`` does);
    ``drop_last=True`` gives every rank ``floor(n / world_size)`` instead (a few samples, others
    each epoch, are skipped); ``pad=False, drop_last=False`` gives every sample exactly once,
    ranks differing by at most one sample.

    **Several sources** (``path`` a list): paths, datasets, ``(path, weight)`` pairs or
    :class:`packds.streams.Stream` objects (``proportion``, ``repeat``, ``choose``). Each epoch
    draws the configured number of samples from each source (``epoch_size`` total, default the
    weighted sources' combined size; see :func:`packds.streams.epoch_counts`), without
    replacement below one pass, a new subset every epoch; blocks of all sources are mixed.

    **Node-local shard cache** (``cache_dir``; default ``$SLURM_TMPDIR/packds-cache`` inside a
    Slurm job, none outside one; ``cache_dir=None`` turns it off): a shard is copied to the
    cache, verified against the manifest's hash and renamed into place the first time a process
    on the node needs it; all ranks and workers of the node share the copy, the next ``prefetch``
    shards of each reader are fetched ahead, and least-recently-used unpinned shards are evicted
    to stay under ``cache_limit`` (default: the cache's filesystem's free space less the
    ``stage`` reserve). A shard that cannot be cached is read from shared storage.

    **Partition** (``partition``): ``"global"`` shuffles the whole stream and splits it over
    all ranks, so each node reads different shards every epoch; ``"node"`` gives every node a
    fixed share of each source (a contiguous run of shards), shuffled within the node each
    epoch, so a dataset up to ``nodes × cache_limit`` is read from shared storage about once.
    ``"auto"`` (default): ``"node"`` when a cache is in use and there are several nodes
    (``nodes``/``node`` or from Slurm/torchrun, see :func:`packds.streams.node_info`).

    ``set_epoch(e)`` picks the epoch's order (call it every epoch, as with DistributedSampler);
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch (see :class:`StreamingLoader`).
    Yields ``transform(bytes)``, or ``(transform(bytes), label)`` with ``target`` (as in
    :class:`PackedDataset`). Compressed datasets work the same (the block read pulls the stored
    bytes, the reader decodes); ``verify=True`` checks every sample's CRC32C.
    """

    def __init__(
        self,
        path,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 4096,
        *,
        block_size: int = 4 << 20,
        transform: Optional[Callable[[bytes], Any]] = None,
        target: Target = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        pad: bool = True,
        drop_last: bool = False,
        verify: bool = False,
        read_ahead: int = 1,
        epoch_size: Optional[int] = None,
        partition: str = "auto",
        nodes: Optional[int] = None,
        node: Optional[int] = None,
        cache_dir: Any = _cache.AUTO,
        cache_limit: Optional[int] = None,
        prefetch: int = 2,
    ) -> None:
        streams, several = _streams.as_streams(path)
        self._streams = streams
        self._several = several
        paths = [os.fspath(st.path.path if isinstance(st.path, packds.Dataset) else st.path) for st in streams]
        self.path: Any = paths if several else paths[0]
        self.paths = paths
        self._dss: Optional[list] = [st.path if isinstance(st.path, packds.Dataset) else None for st in streams]
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = max(0, int(shuffle_buffer)) if shuffle else 0
        self.block_size = max(1, int(block_size))
        self.transform = transform
        self.target = target
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self._rank_world = None if rank is None else (int(rank), int(world_size))  # type: ignore[arg-type]
        self.pad, self.drop_last = bool(pad), bool(drop_last)
        self.verify = bool(verify)
        self.read_ahead = max(0, int(read_ahead))
        if partition not in ("auto", "global", "node"):
            raise ValueError(f"partition={partition!r}: give 'auto', 'global' or 'node'")
        self.partition_choice = partition
        if nodes is not None and int(nodes) < 1:
            raise ValueError(f"nodes={nodes}: must be >= 1")
        if node is not None and nodes is None:
            raise ValueError("give nodes= with node=")
        self._nodes = None if nodes is None else (int(nodes), None if node is None else int(node))
        self.cache_dir: Optional[str] = _cache.default_cache_dir() if cache_dir == _cache.AUTO else (
            None if cache_dir in (None, False) else os.fspath(cache_dir))
        self.cache_limit = None if cache_limit is None else int(cache_limit)
        if self.cache_limit is not None and self.cache_limit < 0:
            raise ValueError(f"cache_limit={cache_limit}: must be >= 0")
        self.prefetch = max(0, int(prefetch))
        self._client: Optional[_cache.CacheClient] = None
        self._client_pid = -1
        dss = self.datasets
        self.sizes = [len(ds) for ds in dss]
        self.offsets = _starts(self.sizes)
        self.counts = _streams.epoch_counts(self.sizes, streams, epoch_size)
        self._labels = _SourceLabels(dss, self.offsets, target)
        self._blocks: Optional[list] = None
        # epoch, then a pending resume: epoch (-1: none), batches, batch_size, num_workers, drop_last.
        # Shared memory, so persistent DataLoader workers see set_epoch / load_state_dict.
        self._shared = multiprocessing.sharedctypes.RawArray("q", [0, -1, 0, 1, 0, 0])
        self._yielded = 0  # samples handed out by iteration in this process (num_workers=0)
        self._plan_cache: dict = {}

    # --- plumbing ------------------------------------------------------------------------

    @property
    def datasets(self) -> list:
        """The opened sources, in order."""
        return _open_sources(self)

    @property
    def dataset(self) -> packds.Dataset:
        """The dataset (one source); with several sources use ``datasets``."""
        if self._several and len(self.paths) > 1:
            raise AttributeError("this StreamingDataset has several sources: use .datasets")
        return self.datasets[0]

    @property
    def classes(self) -> list[str]:
        return self._labels.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return self._labels.class_to_idx

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def rank_world(self) -> tuple[int, int]:
        """(rank, world_size) this dataset splits for."""
        return self._rank_world if self._rank_world is not None else dist_info()

    def topology(self) -> tuple[int, int, int, int]:
        """(group, groups, position in the group, ranks per group): the ranks that share one
        partition of the data. One group of all ranks with ``partition="global"``; one per
        node with ``"node"``."""
        rank, world = self.rank_world()
        if self.partition == "global" or world == 1:
            return 0, 1, rank, world
        nodes, node = self._nodes if self._nodes is not None else (None, None)
        return _streams.node_info(world, rank, nodes, node)

    @property
    def partition(self) -> str:
        """The partition in effect: "global" or "node" (see the class docs)."""
        if self.partition_choice != "auto":
            return self.partition_choice
        if self.cache_dir is None:
            return "global"
        rank, world = self.rank_world()
        if world == 1:
            return "global"
        nodes, node = self._nodes if self._nodes is not None else (None, None)
        return "node" if _streams.node_info(world, rank, nodes, node)[1] > 1 else "global"

    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_dss"] = None
        st["_blocks"] = None  # derived from the index: recomputed on first use
        st["_client"] = None
        st["_plan_cache"] = {}
        st["_rank_world"] = self.rank_world()  # resolved here, where torch.distributed lives
        if multiprocessing.context.get_spawning_popen() is None:
            st["_shared"] = list(self._shared)  # a plain pickle: a snapshot
        return st

    def __setstate__(self, st: dict) -> None:
        if isinstance(st["_shared"], list):
            st["_shared"] = multiprocessing.sharedctypes.RawArray("q", st["_shared"])
        self.__dict__.update(st)

    def _cache_client(self) -> Optional[_cache.CacheClient]:
        """This process's view of the node's shard cache (None without a cache)."""
        if self.cache_dir is None:
            return None
        if self._client is None or self._client_pid != os.getpid():
            client = _cache.CacheClient(self.cache_dir, self.cache_limit, self.datasets)
            client.keep_within_limit(self._share_shards())
            self._client, self._client_pid = client, os.getpid()
        return self._client

    def _share_shards(self) -> list[tuple[int, int]]:
        """(source, shard) of every shard this rank's group (its node, or all ranks) reads, in
        storage order: the same list on every process of the node."""
        g, groups, _, _ = self._rank_span()
        keys: set[tuple[int, int]] = set()
        for s, (bl, n, c) in enumerate(zip(self._source_blocks(), self.sizes, self.counts)):
            if _streams.group_count(n, c, groups, g) == 0:
                continue
            a, b = _streams.share_bounds(n, groups, g)
            shard_of = self.datasets[s].shard_of
            for lo, hi in bl:
                lo, hi = max(lo, a), min(hi, b)
                if lo < hi:  # a block's ends (an out-of-order dataset's block may span shards)
                    keys.update({(s, shard_of(lo)), (s, shard_of(hi - 1))})
        return sorted(keys)

    def cache_stats(self) -> Optional[dict]:
        """This process's cache counters (fetches, hits, evictions, bytes read around the
        cache), or None without a cache."""
        c = self._cache_client()
        return None if c is None else c.stats()

    # --- layout ----------------------------------------------------------------------------

    def _source_blocks(self) -> list:
        if self._blocks is None:
            self._blocks = [ds.blocks(self.block_size) for ds in self.datasets]
        return self._blocks

    def blocks(self) -> array:
        """Start positions of the read blocks, plus the number of samples at the end. A block
        lies inside one shard and holds about ``block_size`` bytes of samples. Positions count
        through the sources laid end to end."""
        out = array("q")
        for bl, off in zip(self._source_blocks(), self.offsets):
            out.extend(a + off for a, _ in bl)
        out.append(self.offsets[-1])
        return out

    def _source_of(self, i: int) -> int:
        return bisect.bisect_right(self.offsets, i) - 1

    def _shard_key(self, i: int) -> tuple[int, int]:
        s = self._source_of(i)
        return s, self.datasets[s].shard_of(i - self.offsets[s])

    def _group_sizes(self, groups: int) -> list[int]:
        return [sum(_streams.group_count(n, c, groups, g) for n, c in zip(self.sizes, self.counts)) for g in range(groups)]

    def _rank_span(self) -> tuple[int, int, int, int]:
        """(group, groups, start, stop): stream positions [start, stop) of this rank in its
        group's stream; stop may pass the group's length (padding wraps)."""
        g, groups, pos, per_group = self.topology()
        sizes = self._group_sizes(groups)
        if per_group == 1 and groups == 1:
            return g, groups, 0, sizes[0]
        if self.drop_last:
            per = min(e // per_group for e in sizes)
            return g, groups, pos * per, (pos + 1) * per
        if self.pad:
            per = max(-(-e // per_group) for e in sizes)
            return g, groups, pos * per, (pos + 1) * per
        a, b = _split(sizes[g], per_group, pos)
        return g, groups, a, b

    def __len__(self) -> int:
        """Samples this rank gets per epoch."""
        _, _, a, b = self._rank_span()
        return b - a

    def _group_plan(self, epoch: int, g: int, groups: int) -> tuple[list, int]:
        key = (epoch, g, groups)
        hit = self._plan_cache.get(key)
        if hit is None:
            ranges = _streams.group_ranges(self._source_blocks(), self.sizes, self.offsets, self.counts, self.seed, epoch,
                                           groups, g, self.shuffle)
            hit = (ranges, _streams.ranges_length(ranges))
            self._plan_cache = {key: hit}
        return hit

    def _epoch_ranges(self, epoch: int, start: int, stop: int, g: int = 0, groups: int = 1) -> list[tuple[int, int]]:
        """The sample ranges at stream positions [start, stop) of ``epoch``'s order in group ``g``."""
        ranges, total = self._group_plan(epoch, g, groups)
        return _streams.cut(ranges, total, start, stop)

    def _read(self, a: int, b: int, reader: "_Reader") -> list:
        """Samples a..b-1 (contiguous, one shard) with one ``read_range`` into the reader's
        reusable buffer: from the node-local copy of the shard when the cache has one, else one
        read of their byte range on shared storage (through the mapping, or one ``pread`` where
        the shard cannot be mapped; decoded and checked by the reader as needed)."""
        s = self._source_of(a)
        ds = self.datasets[s]
        la, lb = a - self.offsets[s], b - self.offsets[s]
        client = reader.cache
        local = None
        if client is not None:
            local = client.pin(s, ds.shard_of(la))
        try:
            if local is not None:
                try:
                    buf, offsets = ds.read_range(la, lb, out=reader.buf, local=local)
                except packds.UsageError:
                    # a block of a dataset whose index does not keep each shard's samples
                    # together (written out of key order) may span shards: read it in place
                    local.close()
                    local = None
            if local is None:
                buf, offsets = ds.read_range(la, lb, out=reader.buf)
                if client is not None:
                    client.note_read_through(offsets[-1])
        finally:
            if local is not None:
                local.close()
        reader.buf = buf
        with memoryview(buf) as view:
            return [bytes(view[offsets[k] : offsets[k + 1]]) for k in range(lb - la)]

    # --- epochs and state ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's order (same seed and epoch → same order). A resume position
        loaded for another epoch is dropped."""
        sh = self._shared
        sh[0] = int(epoch)
        if sh[1] != epoch:
            sh[1] = -1
        self._yielded = 0

    def _setup(self) -> dict:
        """What a saved state must agree on."""
        rank, world = self.rank_world()
        return {"seed": self.seed, "samples": self.offsets[-1], "rank": rank, "world_size": world, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "block_size": self.block_size, "sources": self.sizes,
                "counts": self.counts, "partition": self.partition, "groups": self.topology()[1]}

    def state_dict(self, batches: Optional[int] = None, batch_size: int = 1, num_workers: int = 0, drop_last: bool = False) -> dict:
        """Where the epoch stands. Without arguments: the samples handed out by iteration in this
        process (``num_workers=0``). With DataLoader workers give the loader's position: the
        ``batches`` it yielded this epoch, its ``batch_size``, ``num_workers`` and ``drop_last``
        (:class:`StreamingLoader` does this for you)."""
        if batches is None:
            batches, batch_size, num_workers, drop_last = self._yielded, 1, 0, False
        st = {
            "format": "packds.torch.StreamingDataset/1",
            "epoch": self.epoch,
            "batches": int(batches),
            "batch_size": int(batch_size),
            "num_workers": int(num_workers),
            "drop_last": bool(drop_last),
        }
        st.update(self._setup())
        return st

    def load_state_dict(self, state: dict) -> None:
        """Positions the dataset where ``state`` was taken: its epoch, and the next iteration of
        that epoch continues after the batches already consumed (same batch_size and
        num_workers required). Call ``set_epoch`` with that epoch, or none, before iterating."""
        if state.get("format") != "packds.torch.StreamingDataset/1":
            raise ValueError("not a packds StreamingDataset state")
        mine = self._setup()
        # states saved before several sources existed: one source, drawn once, one group
        old = {"sources": [state.get("samples")], "counts": [state.get("samples")], "partition": "global", "groups": 1}
        diff = {k: (state.get(k, old.get(k)), v) for k, v in mine.items() if state.get(k, old.get(k)) != v}
        if diff:
            raise ValueError("state is for another setup (saved, now): " + ", ".join(f"{k} {a!r}, {b!r}" for k, (a, b) in diff.items()))
        sh = self._shared
        sh[0] = int(state["epoch"])
        if int(state["batches"]) > 0:
            sh[1], sh[2], sh[3], sh[4], sh[5] = (int(state["epoch"]), int(state["batches"]), max(1, int(state["batch_size"])),
                                                 int(state["num_workers"]), int(bool(state["drop_last"])))
        else:
            sh[1] = -1
        self._yielded = int(state["batches"]) if int(state["num_workers"]) == 0 and sh[1] >= 0 else 0

    def _resume_batches(self, batch_size: int, num_workers: int, drop_last: bool) -> int:
        """For StreamingLoader: the batches already consumed in the pending resume (0 if none)."""
        sh = self._shared
        if sh[1] < 0 or sh[1] != sh[0]:
            return 0
        if (sh[3], sh[4], bool(sh[5])) != (max(1, batch_size), num_workers, drop_last):
            raise ValueError(f"state was saved with batch_size={sh[3]}, num_workers={sh[4]}, drop_last={bool(sh[5])}; "
                             f"this loader has batch_size={batch_size}, num_workers={num_workers}, drop_last={drop_last}")
        return int(sh[2])

    def _clear_resume(self) -> None:
        self._shared[1] = -1

    # --- iteration -----------------------------------------------------------------------

    def plan(self, epoch: Optional[int] = None, worker: int = 0, num_workers: int = 0) -> list[tuple[int, int]]:
        """The sample ranges (in stream order; positions through the sources laid end to end)
        logical ``worker`` of ``num_workers`` reads."""
        epoch = self.epoch if epoch is None else epoch
        g, groups, a, b = self._rank_span()
        k = max(1, num_workers)
        wa, wb = _split(b - a, k, worker)
        return self._epoch_ranges(epoch, a + wa, a + wb, g, groups)

    def __iter__(self) -> Iterator:
        info = _get_worker_info()
        k = 0 if info is None else info.num_workers
        wid = 0 if info is None else info.id
        sh = self._shared
        epoch = int(sh[0])
        rank, _ = self.rank_world()
        g, groups, a, b = self._rank_span()
        kk = max(1, k)
        counts = [_split(b - a, kk, w)[1] - _split(b - a, kk, w)[0] for w in range(kk)]
        skip, rot = [0] * kk, 0
        if sh[1] >= 0 and sh[1] == epoch:
            if sh[4] != k:
                raise ValueError(f"state was saved with num_workers={sh[4]}, this loader has {k}")
            skip, rot = _consumed(int(sh[2]), int(sh[3]), counts, bool(sh[5]))
        w = (wid + rot) % kk  # the logical worker: continues the round robin where it stopped
        wa = _split(b - a, kk, w)[0]
        ranges = self._epoch_ranges(epoch, a + wa, a + wa + counts[w], g, groups)
        rng = random.Random(f"packds-buffer-{self.seed}-{epoch}-{rank}-{w}")
        if info is None:
            self._yielded = skip[0]
        return self._generate(ranges, rng, skip[w], info is None)

    def _get_many(self, idx: list[int]) -> list[bytes]:
        """Samples at global positions ``idx`` (sorted), one ``get_many`` per source."""
        out: list[bytes] = []
        j = 0
        while j < len(idx):
            s = self._source_of(idx[j])
            end = self.offsets[s + 1]
            k = j
            while k < len(idx) and idx[k] < end:
                k += 1
            out += self.datasets[s].get_many([i - self.offsets[s] for i in idx[j:k]])
            j = k
        return out

    def _generate(self, ranges, rng: random.Random, skip: int, count: bool):
        dss = self.datasets
        labels = self._labels
        offsets = self.offsets
        several = len(dss) > 1
        transform = self.transform
        W = self.shuffle_buffer
        # A sample drawn more than once in an epoch (repeat > 1) appears in several ranges:
        # the buffer holds (position, serial) so each copy is its own entry.
        data: dict[int, bytes] = {}
        pos_of: dict[int, int] = {}
        buf: list[int] = []
        out = 0
        live = skip == 0
        reader = _Reader(self, ranges, self.read_ahead)
        serial = 0

        def label(i: int):
            if not several:
                return labels(dss, 0, i)
            s = bisect.bisect_right(offsets, i) - 1
            return labels(dss, s, i - offsets[s])

        def make(t: int):
            x = data.pop(t)
            i = pos_of.pop(t)
            if transform is not None:
                x = transform(x)
            return x if labels.kind is None else (x, label(i))

        def put(items, lo: int) -> None:
            nonlocal serial
            for j, x in enumerate(items):
                data[serial + j] = x
                pos_of[serial + j] = lo + j
            serial += len(items)

        def fetch_owed(tickets: list[int]) -> None:
            # tickets whose bytes were never read (resuming): read them by position
            need = sorted((pos_of[t], t) for t in tickets if t not in data)
            if need:
                for (_, t), x in zip(need, self._get_many([p for p, _ in need])):
                    data[t] = x

        try:
            for k, (lo, hi) in enumerate(ranges):
                base = serial
                if live:
                    put(reader.take(k), lo)
                else:
                    for j in range(hi - lo):
                        pos_of[serial + j] = lo + j
                    serial += hi - lo
                for t in range(base, base + hi - lo):
                    if len(buf) < W:
                        buf.append(t)
                        continue
                    if W:
                        j = int(rng.random() * W)
                        o, buf[j] = buf[j], t
                    else:
                        o = t
                    if not live:
                        out += 1
                        pos_of.pop(o, None)
                        if out == skip:
                            live = True
                            # the rest of this block, then what the buffer holds
                            rest = range(t + 1, base + hi - lo)
                            if len(rest):
                                got = reader.now(pos_of[rest.start], pos_of[rest.start] + len(rest))
                                for tt, x in zip(rest, got):
                                    data[tt] = x
                            reader.start_after(k)
                            fetch_owed(buf)
                        continue
                    if count:
                        self._yielded += 1
                    yield make(o)
            reader.close()
            rng.shuffle(buf)
            for p, o in enumerate(buf):
                if not live:
                    out += 1
                    pos_of.pop(o, None)
                    if out == skip:
                        live = True
                        fetch_owed(buf[p + 1 :])
                    continue
                if count:
                    self._yielded += 1
                yield make(o)
            if count:
                self._clear_resume()
        finally:
            reader.close()

    def __repr__(self) -> str:
        rank, world = self.rank_world()
        src = f"{self.path!r}" if not self._several else f"{len(self.paths)} sources"
        return (f"<packds.torch.StreamingDataset {src}: {self.offsets[-1]} samples, rank {rank}/{world}, "
                f"epoch {self.epoch}, shuffle={self.shuffle}>")


class MixedDataset(_MapBase):
    """Map-style mix of several datasets: ``len(mix)`` samples per epoch, drawn from each
    source in the configured amount (``(path, weight)`` pairs, :class:`packds.streams.Stream`
    objects with ``proportion``/``repeat``/``choose``, or plain paths/datasets:
    :func:`packds.streams.epoch_counts`). ``mix[j]`` is the epoch's ``j``-th draw,
    ``transform(bytes)`` or ``(transform(bytes), label)`` with ``target`` as for
    :class:`StreamingDataset`; the draws are in a random order, so a sequential sampler gives
    a mixed stream and any sampler (``DistributedSampler`` for an exact split over ranks) works.

    ``replacement=False`` (default): a source drawn less than once is sampled without
    replacement (a new subset every epoch), more than once every sample ``floor(repeat)`` times
    plus a subset; ``True``: every draw independent and uniform within its source. The draws
    depend only on ``seed`` and the epoch (``set_epoch``, seen by persistent workers too);
    ``state_dict()``/``load_state_dict()`` save and restore the epoch and check the setup.
    """

    def __init__(self, sources, *, epoch_size: Optional[int] = None, seed: int = 0, replacement: bool = False,
                 transform: Optional[Callable[[bytes], Any]] = None, target: Target = None, verify: bool = False) -> None:
        streams, _ = _streams.as_streams(list(sources) if not isinstance(sources, list) else sources)
        self._streams = streams
        self.paths = [os.fspath(_path_of(st.path)) for st in streams]
        self._dss: Optional[list] = [_dataset_of(st.path) for st in streams]
        self.verify = bool(verify)
        self.seed, self.replacement = int(seed), bool(replacement)
        self.transform, self.target = transform, target
        dss = self.datasets
        self.sizes = [len(ds) for ds in dss]
        self.offsets = _starts(self.sizes)
        self.counts = _streams.epoch_counts(self.sizes, streams, epoch_size)
        self._labels = _SourceLabels(dss, self.offsets, target)
        self._shared = multiprocessing.sharedctypes.RawArray("q", [0])
        self._table: Optional[array] = None
        self._table_epoch = -1

    @property
    def datasets(self) -> list:
        return _open_sources(self)

    @property
    def classes(self) -> list[str]:
        return self._labels.classes

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        self._shared[0] = int(epoch)

    def __len__(self) -> int:
        return sum(self.counts)

    def draws(self, epoch: Optional[int] = None) -> array:
        """The epoch's draws: positions through the sources laid end to end (source ``s``
        starts at ``offsets[s]``), in the order ``mix[j]`` hands them out."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._table is not None and self._table_epoch == epoch:
            return self._table
        out = array("q")
        for s, (n, c, off) in enumerate(zip(self.sizes, self.counts, self.offsets)):
            rng = random.Random(f"packds-mix-{self.seed}-{epoch}-{s}")
            if self.replacement:
                out.extend(off + rng.randrange(n) for _ in range(c))
                continue
            full, rest = divmod(c, n) if n else (0, 0)
            for _ in range(full):
                out.extend(range(off, off + n))
            if rest:
                out.extend(off + i for i in rng.sample(range(n), rest))
        order = list(range(len(out)))
        random.Random(f"packds-mix-order-{self.seed}-{epoch}").shuffle(order)
        self._table = array("q", (out[j] for j in order))
        self._table_epoch = epoch
        return self._table

    def source(self, j: int) -> tuple[int, int]:
        """(source, sample position in it) of the epoch's ``j``-th draw."""
        t = self.draws()
        n = len(t)
        if not -n <= j < n:
            raise IndexError(f"draw {j} is out of range (epoch has {n})")
        g = t[j]
        s = bisect.bisect_right(self.offsets, g) - 1
        return s, g - self.offsets[s]

    def __getitem__(self, j):
        s, i = self.source(int(j))
        x = self.datasets[s][i]
        if self.transform is not None:
            x = self.transform(x)
        return x if self._labels.kind is None else (x, self._labels(self.datasets, s, i))

    def state_dict(self) -> dict:
        return {"format": "packds.torch.MixedDataset/1", "epoch": self.epoch, "seed": self.seed, "sources": self.sizes,
                "counts": self.counts, "replacement": self.replacement}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "packds.torch.MixedDataset/1":
            raise ValueError("not a packds MixedDataset state")
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "epoch" and state.get(k) != v}
        if diff:
            raise ValueError("state is for another setup (saved, now): " + ", ".join(f"{k} {a!r}, {b!r}" for k, (a, b) in diff.items()))
        self.set_epoch(int(state["epoch"]))

    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_dss"] = None
        st["_table"], st["_table_epoch"] = None, -1
        if multiprocessing.context.get_spawning_popen() is None:
            st["_shared"] = list(self._shared)
        return st

    def __setstate__(self, st: dict) -> None:
        if isinstance(st["_shared"], list):
            st["_shared"] = multiprocessing.sharedctypes.RawArray("q", st["_shared"])
        self.__dict__.update(st)

    def __repr__(self) -> str:
        parts = ", ".join(f"{os.path.basename(p)}: {c}" for p, c in zip(self.paths, self.counts))
        return f"<packds.torch.MixedDataset {len(self)} draws per epoch ({parts}), epoch {self.epoch}>"


class MixedSampler:
    """The positions of a :class:`MixedDataset` epoch this rank reads, in order: draws
    ``rank, rank + world_size, ...`` of the epoch (the draws are already in a random order).
    Every rank gets the same count: ``pad=True`` (default) repeats the first draws to reach
    ``ceil(len / world_size)`` (as ``DistributedSampler`` does), ``drop_last=True`` gives
    ``floor(len / world_size)``. ``skip`` positions are left out at the start (a resume:
    :class:`MixedLoader` sets it). Ranks from ``rank``/``world_size`` or :func:`dist_info`."""

    def __init__(self, mix: "MixedDataset", rank: Optional[int] = None, world_size: Optional[int] = None,
                 pad: bool = True, drop_last: bool = False) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.mix = mix
        self.rank, self.world_size = (int(rank), int(world_size)) if rank is not None else dist_info()  # type: ignore[arg-type]
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.pad, self.drop_last = bool(pad), bool(drop_last)
        self.skip = 0

    def __len__(self) -> int:
        n, w = len(self.mix), self.world_size
        if self.drop_last:
            per = n // w
        elif self.pad:
            per = -(-n // w)
        else:
            per = len(range(self.rank, n, w))
        return max(0, per - self.skip)

    def set_epoch(self, epoch: int) -> None:
        self.mix.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        n, w = len(self.mix), self.world_size
        total = len(self) + self.skip
        start = self.skip
        self.skip = 0  # a resume position is used once
        for k in range(start, total):
            yield (self.rank + k * w) % n if n else 0


def _path_of(x):
    return x.path if isinstance(x, packds.Dataset) else (x.dataset.path if isinstance(x, PackedDataset) else x)


def _dataset_of(x):
    if isinstance(x, packds.Dataset):
        return x
    if isinstance(x, PackedDataset):
        return x.dataset
    return None


if _DataLoader is not None:

    class StreamingLoader(_DataLoader):
        """A ``DataLoader`` over a :class:`StreamingDataset` that counts the batches it yields,
        so ``state_dict()`` / ``load_state_dict()`` resume mid-epoch with any ``num_workers``.

        The state is (epoch, batches yielded this epoch, batch_size, num_workers, drop_last):
        workers hand out batches in round-robin order, so the count fixes how far each worker
        got. After a full epoch the state points at the start of the next one.
        """

        def __init__(self, dataset: StreamingDataset, *args, **kwargs) -> None:
            if not isinstance(dataset, StreamingDataset):
                raise TypeError("StreamingLoader needs a packds.torch.StreamingDataset")
            super().__init__(dataset, *args, **kwargs)
            self._pds_batches = 0
            self._pds_done = False

        def _layout(self) -> tuple[int, int, bool]:
            bs = self.batch_size if self.batch_size is not None else 1
            return bs, self.num_workers, bool(self.drop_last) if self.batch_size is not None else False

        def __iter__(self):
            ds: StreamingDataset = self.dataset  # type: ignore[assignment]
            bs, nw, dl = self._layout()
            self._pds_done = False
            self._pds_batches = ds._resume_batches(bs, nw, dl)
            for batch in super().__iter__():
                self._pds_batches += 1
                yield batch
            ds._clear_resume()
            self._pds_done = True

        def state_dict(self) -> dict:
            ds: StreamingDataset = self.dataset  # type: ignore[assignment]
            bs, nw, dl = self._layout()
            st = ds.state_dict(batches=self._pds_batches, batch_size=bs, num_workers=nw, drop_last=dl)
            if self._pds_done:
                st["epoch"], st["batches"] = st["epoch"] + 1, 0
            return st

        def load_state_dict(self, state: dict) -> None:
            self.dataset.load_state_dict(state)  # type: ignore[attr-defined]
            self._pds_batches, self._pds_done = 0, False

    class MixedLoader(_DataLoader):
        """A ``DataLoader`` over a :class:`MixedDataset` with its rank's :class:`MixedSampler`
        (``rank``/``world_size``/``pad``/``drop_last`` go to the sampler; ``shuffle`` is not
        taken: the draws are in a random order already). It counts the batches it yields, so
        ``state_dict()`` / ``load_state_dict()`` resume mid-epoch with any ``num_workers``
        (batches come back in sampler order, so the count fixes the position)."""

        def __init__(self, dataset: MixedDataset, *args, rank: Optional[int] = None, world_size: Optional[int] = None,
                     pad: bool = True, drop_last: bool = False, **kwargs) -> None:
            if not isinstance(dataset, MixedDataset):
                raise TypeError("MixedLoader needs a packds.torch.MixedDataset")
            if "sampler" in kwargs or "batch_sampler" in kwargs or kwargs.get("shuffle"):
                raise ValueError("MixedLoader makes its own sampler: leave out sampler, batch_sampler and shuffle")
            self.mixed_sampler = MixedSampler(dataset, rank, world_size, pad=pad, drop_last=drop_last)
            super().__init__(dataset, *args, sampler=self.mixed_sampler, **kwargs)
            self._pds_batches, self._pds_done = 0, False

        def __iter__(self):
            self._pds_done = False
            # a resume position (load_state_dict) is used by this pass; otherwise from 0
            self._pds_batches = self.mixed_sampler.skip // max(1, self.batch_size or 1)
            for batch in super().__iter__():
                self._pds_batches += 1
                yield batch
            self._pds_batches, self._pds_done = 0, True

        def state_dict(self) -> dict:
            mix: MixedDataset = self.dataset  # type: ignore[assignment]
            st = mix.state_dict()
            st.update(batches=self._pds_batches, batch_size=self.batch_size, rank=self.mixed_sampler.rank,
                      world_size=self.mixed_sampler.world_size)
            if self._pds_done:
                st["epoch"], st["batches"] = st["epoch"] + 1, 0
            return st

        def load_state_dict(self, state: dict) -> None:
            """Continues after the batches ``state`` says were yielded in its epoch (same
            batch_size, ranks and setup; checked)."""
            mix: MixedDataset = self.dataset  # type: ignore[assignment]
            mine = {"batch_size": self.batch_size, "rank": self.mixed_sampler.rank, "world_size": self.mixed_sampler.world_size}
            diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
            if diff:
                raise ValueError("state is for another loader (saved, now): " + ", ".join(f"{k} {a!r}, {b!r}" for k, (a, b) in diff.items()))
            mix.load_state_dict(state)
            self.mixed_sampler.skip = int(state.get("batches", 0)) * int(self.batch_size or 1)
            self._pds_done = False

else:  # pragma: no cover

    class StreamingLoader:  # type: ignore[no-redef]
        def __init__(self, *a, **k) -> None:
            raise ImportError("packds.torch.StreamingLoader needs torch: pip install torch (or, from a packds checkout, pip install '.[torch]')")

    class MixedLoader:  # type: ignore[no-redef]
        def __init__(self, *a, **k) -> None:
            raise ImportError("packds.torch.MixedLoader needs torch: pip install torch (or, from a packds checkout, pip install '.[torch]')")
