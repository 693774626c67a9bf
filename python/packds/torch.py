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


__all__ = ["PackedDataset", "PackedBatch", "collate_packed", "StreamingDataset", "StreamingLoader", "dist_info"]

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
    three tensors (data, offsets, labels: a :class:`PackedBatch`) through shared memory instead
    of pickling one object per sample.
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
        return [self._make(i, whole[offsets[k] : offsets[k + 1]]) for k, i in enumerate(idx)]

    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_ds"] = None  # re-opened by path in the new process
        return st

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)

    def __repr__(self) -> str:
        extra = f", {len(self.classes)} classes" if self.classes else ""
        return f"<packds.torch.PackedDataset {self.path!r}: {len(self)} samples{extra}>"


class PackedBatch(tuple):
    """A batch as :func:`collate_packed` makes it: ``data`` (every sample's bytes back to back,
    one uint8 tensor), ``offsets`` (int64, ``len + 1``: sample ``k`` is
    ``data[offsets[k]:offsets[k + 1]]``) and ``targets`` (an int64 tensor of the labels, or
    None). Three tensors cross from a DataLoader worker to the main process (through shared
    memory), whatever the batch size. ``batch[k]`` is sample ``k``'s view; ``len(batch)`` the
    number of samples."""

    __slots__ = ()

    def __new__(cls, data, offsets, targets=None):
        return super().__new__(cls, (data, offsets, targets))

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
        return (PackedBatch, (self.data, self.offsets, self.targets))


def collate_packed(batch: list) -> PackedBatch:
    """``collate_fn`` for ``PackedDataset(..., as_tensor=True)`` (no transform): joins the
    batch's samples (uint8 tensors, optionally ``(tensor, label)`` pairs) into one
    :class:`PackedBatch`. It runs in the DataLoader worker, so the main process receives three
    tensors per batch instead of one object per sample."""
    if _torch is None:
        raise ImportError("collate_packed needs torch (pip install torch)")
    labelled = bool(batch) and isinstance(batch[0], tuple)
    xs = [b[0] for b in batch] if labelled else list(batch)
    sizes = _torch.tensor([0] + [x.numel() for x in xs], dtype=_torch.int64)
    data = _torch.cat(xs) if xs else _torch.empty(0, dtype=_torch.uint8)
    targets = _torch.tensor([b[1] for b in batch], dtype=_torch.int64) if labelled else None
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
    up to ``ahead`` blocks ahead while the samples of the current one are handed out."""

    def __init__(self, owner: "StreamingDataset", ranges: list, ahead: int) -> None:
        self.owner, self.ranges, self.ahead = owner, ranges, ahead
        self.buf = bytearray(0)
        self.pool = None
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
    ) -> None:
        self.path = os.fspath(path.path if isinstance(path, packds.Dataset) else path)
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
        self._ds: Optional[packds.Dataset] = path if isinstance(path, packds.Dataset) else None
        self._labels = _Labels(self.dataset, target)
        self._blocks: Optional[array] = None
        # epoch, then a pending resume: epoch (-1: none), batches, batch_size, num_workers, drop_last.
        # Shared memory, so persistent DataLoader workers see set_epoch / load_state_dict.
        self._shared = multiprocessing.sharedctypes.RawArray("q", [0, -1, 0, 1, 0, 0])
        self._yielded = 0  # samples handed out by iteration in this process (num_workers=0)

    # --- plumbing ------------------------------------------------------------------------

    @property
    def dataset(self) -> packds.Dataset:
        if self._ds is None:
            self._ds = packds.open(self.path, **({"verify": True} if self.verify else {}))
        return self._ds

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

    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_ds"] = None
        st["_blocks"] = None  # derived from the index: recomputed on first use
        st["_rank_world"] = self.rank_world()  # resolved here, where torch.distributed lives
        if multiprocessing.context.get_spawning_popen() is None:
            st["_shared"] = list(self._shared)  # a plain pickle: a snapshot
        return st

    def __setstate__(self, st: dict) -> None:
        if isinstance(st["_shared"], list):
            st["_shared"] = multiprocessing.sharedctypes.RawArray("q", st["_shared"])
        self.__dict__.update(st)

    # --- layout ----------------------------------------------------------------------------

    def blocks(self) -> array:
        """Start positions of the read blocks, plus ``len(ds)`` at the end. A block lies inside
        one shard and holds about ``block_size`` bytes of samples."""
        if self._blocks is not None:
            return self._blocks
        ds = self.dataset
        n = len(ds)
        out = array("q", (a for a, _ in ds.blocks(self.block_size)))
        out.append(n)
        self._blocks = out
        return out

    def _rank_count(self, n: int, world: int, rank: int) -> tuple[int, int]:
        """Stream positions [start, stop) of ``rank``; stop may pass n (padding wraps)."""
        if world == 1:
            return 0, n
        if self.drop_last:
            per = n // world
            return rank * per, (rank + 1) * per
        if self.pad:
            per = -(-n // world)
            return rank * per, (rank + 1) * per
        return _split(n, world, rank)

    def __len__(self) -> int:
        """Samples this rank gets per epoch."""
        rank, world = self.rank_world()
        a, b = self._rank_count(len(self.dataset), world, rank)
        return b - a

    def _epoch_ranges(self, epoch: int, start: int, stop: int) -> list[tuple[int, int]]:
        """The sample ranges at stream positions [start, stop) of ``epoch``'s block order."""
        blocks = self.blocks()
        nb = len(blocks) - 1
        n = blocks[-1]
        order = list(range(nb))
        if self.shuffle:
            random.Random(f"packds-blocks-{self.seed}-{epoch}").shuffle(order)
        out: list[tuple[int, int]] = []
        if n == 0 or start >= stop:
            return out
        cum = array("q", [0])  # stream position where each block (in epoch order) starts
        for b in order:
            cum.append(cum[-1] + blocks[b + 1] - blocks[b])
        pos = start
        while pos < stop:
            p = pos % n
            take = min(stop - pos, n - p)
            j = bisect.bisect_right(cum, p) - 1
            q = p
            while q < p + take:
                b = order[j]
                lo = blocks[b] + (q - cum[j])
                hi = blocks[b] + min(cum[j + 1], p + take) - cum[j]
                out.append((lo, hi))
                q += hi - lo
                j += 1
            pos += take
        return out

    def _read(self, a: int, b: int, reader: "_Reader") -> list:
        """Samples a..b-1 (contiguous, one shard) with one ``read_range`` into the reader's
        reusable buffer: one read of their byte range (through the mapping, or one ``pread``
        where the shard cannot be mapped; decoded and checked by the reader as needed)."""
        buf, offsets = self.dataset.read_range(a, b, out=reader.buf)
        reader.buf = buf
        with memoryview(buf) as view:
            return [bytes(view[offsets[k] : offsets[k + 1]]) for k in range(b - a)]

    # --- epochs and state ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's order (same seed and epoch → same order). A resume position
        loaded for another epoch is dropped."""
        sh = self._shared
        sh[0] = int(epoch)
        if sh[1] != epoch:
            sh[1] = -1
        self._yielded = 0

    def state_dict(self, batches: Optional[int] = None, batch_size: int = 1, num_workers: int = 0, drop_last: bool = False) -> dict:
        """Where the epoch stands. Without arguments: the samples handed out by iteration in this
        process (``num_workers=0``). With DataLoader workers give the loader's position: the
        ``batches`` it yielded this epoch, its ``batch_size``, ``num_workers`` and ``drop_last``
        (:class:`StreamingLoader` does this for you)."""
        rank, world = self.rank_world()
        if batches is None:
            batches, batch_size, num_workers, drop_last = self._yielded, 1, 0, False
        return {
            "format": "packds.torch.StreamingDataset/1",
            "epoch": self.epoch,
            "batches": int(batches),
            "batch_size": int(batch_size),
            "num_workers": int(num_workers),
            "drop_last": bool(drop_last),
            "seed": self.seed,
            "samples": len(self.dataset),
            "rank": rank,
            "world_size": world,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Positions the dataset where ``state`` was taken: its epoch, and the next iteration of
        that epoch continues after the batches already consumed (same batch_size and
        num_workers required). Call ``set_epoch`` with that epoch, or none, before iterating."""
        if state.get("format") != "packds.torch.StreamingDataset/1":
            raise ValueError("not a packds StreamingDataset state")
        rank, world = self.rank_world()
        mine = {"seed": self.seed, "samples": len(self.dataset), "rank": rank, "world_size": world, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "block_size": self.block_size}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
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
        """The sample ranges (in stream order) logical ``worker`` of ``num_workers`` reads."""
        epoch = self.epoch if epoch is None else epoch
        rank, world = self.rank_world()
        n = len(self.dataset)
        a, b = self._rank_count(n, world, rank)
        k = max(1, num_workers)
        wa, wb = _split(b - a, k, worker)
        return self._epoch_ranges(epoch, a + wa, a + wb)

    def __iter__(self) -> Iterator:
        info = _get_worker_info()
        k = 0 if info is None else info.num_workers
        wid = 0 if info is None else info.id
        sh = self._shared
        epoch = int(sh[0])
        rank, world = self.rank_world()
        n = len(self.dataset)
        a, b = self._rank_count(n, world, rank)
        kk = max(1, k)
        counts = [_split(b - a, kk, w)[1] - _split(b - a, kk, w)[0] for w in range(kk)]
        skip, rot = [0] * kk, 0
        if sh[1] >= 0 and sh[1] == epoch:
            if sh[4] != k:
                raise ValueError(f"state was saved with num_workers={sh[4]}, this loader has {k}")
            skip, rot = _consumed(int(sh[2]), int(sh[3]), counts, bool(sh[5]))
        w = (wid + rot) % kk  # the logical worker: continues the round robin where it stopped
        wa = _split(b - a, kk, w)[0]
        ranges = self._epoch_ranges(epoch, a + wa, a + wa + counts[w])
        rng = random.Random(f"packds-buffer-{self.seed}-{epoch}-{rank}-{w}")
        if info is None:
            self._yielded = skip[0]
        return self._generate(ranges, rng, skip[w], info is None)

    def _generate(self, ranges, rng: random.Random, skip: int, count: bool):
        ds = self.dataset
        labels = self._labels
        transform = self.transform
        W = self.shuffle_buffer
        data: dict[int, bytes] = {}
        buf: list[int] = []
        out = 0
        live = skip == 0
        reader = _Reader(self, ranges, self.read_ahead)

        def make(i: int):
            x = data.pop(i)
            if transform is not None:
                x = transform(x)
            return x if labels.kind is None else (x, labels(ds, i))

        def go_live(k: int, rest: range) -> None:
            # resuming: the skipped part of the stream is never read; fetch what is still owed
            if len(rest):
                data.update(zip(rest, reader.now(rest.start, rest.stop)))
            reader.start_after(k)
            need = sorted(buf)
            if need:
                data.update(zip(need, ds.get_many(need)))

        try:
            for k, (lo, hi) in enumerate(ranges):
                if live:
                    data.update(zip(range(lo, hi), reader.take(k)))
                for i in range(lo, hi):
                    if len(buf) < W:
                        buf.append(i)
                        continue
                    if W:
                        j = int(rng.random() * W)
                        o, buf[j] = buf[j], i
                    else:
                        o = i
                    if not live:
                        out += 1
                        if out == skip:
                            live = True
                            go_live(k, range(i + 1, hi))
                        continue
                    if count:
                        self._yielded += 1
                    yield make(o)
            reader.close()
            rng.shuffle(buf)
            for pos, o in enumerate(buf):
                if not live:
                    out += 1
                    if out == skip:
                        live = True
                        rest = sorted(buf[pos + 1 :])
                        if rest:
                            data.update(zip(rest, ds.get_many(rest)))
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
        return (f"<packds.torch.StreamingDataset {self.path!r}: {len(self.dataset)} samples, rank {rank}/{world}, "
                f"epoch {self.epoch}, shuffle={self.shuffle}>")


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

else:  # pragma: no cover

    class StreamingLoader:  # type: ignore[no-redef]
        def __init__(self, *a, **k) -> None:
            raise ImportError("packds.torch.StreamingLoader needs torch: pip install torch (or, from a packds checkout, pip install '.[torch]')")
