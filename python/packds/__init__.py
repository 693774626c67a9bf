"""packds: pack many small files into a few indexed tar shards, read any sample back fast.

>>> import packds
>>> ds = packds.open("imagenet.pds")
>>> len(ds), ds.key(0), len(ds[0])
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from typing import Iterator, NamedTuple

from . import _core
from .errors import (
    ChecksumError,
    DuplicateKeyError,
    FormatError,
    NoSpaceError,
    PackdsError,
    SourceChangedError,
    UnsafePathError,
    UsageError,
)

__version__: str = _core.__version__

__all__ = [
    "open",
    "pack",
    "index_tars",
    "plan",
    "merge",
    "stage",
    "preload",
    "Dataset",
    "Keys",
    "Skipped",
    "Writer",
    "build",
    "concat",
    "subset",
    "compact",
    "PackdsError",
    "FormatError",
    "ChecksumError",
    "NoSpaceError",
    "UsageError",
    "SourceChangedError",
    "UnsafePathError",
    "DuplicateKeyError",
    "__version__",
]


class Keys(Sequence):
    """The keys of a dataset as a lazy, read-only sequence of ``str`` (no list is built)."""

    __slots__ = ("_ds",)

    def __init__(self, ds: "Dataset") -> None:
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._ds.key(j) for j in range(*i.indices(len(self._ds)))]
        return self._ds.key(i)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, bytes)) and self._ds.find_key(key) is not None

    def index(self, key, start: int = 0, stop: int | None = None) -> int:  # type: ignore[override]
        i = self._ds.find_key(key) if isinstance(key, (str, bytes)) else None
        lo, hi, _ = slice(start, stop).indices(len(self._ds))
        if i is None or not lo <= i < hi:
            raise ValueError(f"{key!r} is not in keys[{start}:{stop}]")
        return i

    def __iter__(self) -> Iterator[str]:
        key = self._ds.key
        for i in range(len(self._ds)):
            yield key(i)

    def __repr__(self) -> str:
        return f"<packds keys: {len(self)} keys>"


class Dataset(_core.Reader):
    """An opened packds dataset: ``len(ds)``, ``ds[i]`` / ``ds[key]`` → ``bytes``, ``ds[a:b]`` →
    a list of ``bytes``.

    It is a sequence of samples that can also be looked up by key: ``iter(ds)`` and
    ``ds.values()`` give the samples' bytes in key order, ``ds.keys()`` the keys (a lazy
    sequence), ``ds.items()`` ``(key, bytes)`` pairs, and ``key in ds`` tests a key, as a dict
    does. Methods that take a sample (``size``, ``view``, ``raw``, ``get_checked``,
    ``get_many``'s items, ``locate``) take a position or a key. ``glob(pattern)`` gives the
    positions of the keys a glob matches (``*`` also matches ``/``, as in ``--include``).

    Methods implemented in Rust (see ``_core.pyi``): ``key(i)``, ``key_bytes(i)``,
    ``index(key)``, ``find_key(key)``, ``size(i)``, ``get_many(indices)``, ``get_checked(i)``,
    ``read_range(start, stop, out=None, local=None)`` (samples ``[start, stop)`` back to back
    in one buffer, with their offsets; ``local``: a ``_core.LocalShard`` of their shard, read
    instead of the dataset's), ``shard_of(i)``, ``blocks(target_bytes)`` (shard-contiguous ``(start, stop)``
    ranges for sequential reading), ``key_range(prefix)``, ``locate(i)``, ``glob(pattern)``,
    ``verify()``, ``unpack(dest)``.

    A sample position is any integer: ``int``, numpy integer scalars and 0-d integer arrays
    (anything with ``__index__``), and ``bool`` as in a list (``ds[True]`` is ``ds[1]``);
    negative positions count from the end. A position out of range, however large, raises
    ``IndexError`` in ``ds[i]`` and every method that takes one; a float is a ``TypeError``.

    A Dataset is immutable: share it between threads freely; forked DataLoader workers inherit
    its mappings; pickling it (spawn workers) re-opens it by path.
    """

    def __init__(self, path, *, populate: bool = False, verify: bool = False) -> None:
        self._populate = populate
        self._maps: dict[str, mmap.mmap] = {}
        self._maps_lock = threading.Lock()

    def get(self, key, default=None):
        """Bytes of the sample with ``key``, or ``default``."""
        i = self.find_key(key)
        return default if i is None else self[i]

    def keys(self) -> Keys:
        """All keys, sorted byte-wise, as a lazy sequence."""
        return Keys(self)

    def values(self) -> Iterator[bytes]:
        """Every sample's bytes, in key order (the same as ``iter(ds)``)."""
        return iter(self)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """``(key, bytes)`` of every sample, in key order."""
        for i in range(len(self)):
            yield self.key(i), self[i]

    def view(self, i) -> memoryview:
        """A zero-copy, read-only ``memoryview`` of sample ``i`` in the mapped shard.

        Built on Python's own ``mmap`` (the extension targets the stable ABI from 3.9, whose
        buffer protocol arrives only in 3.11); the view keeps its mapping alive, so it stays
        valid after ``del ds``. A sample stored compressed cannot be viewed in place: it is
        decoded, and the view is of that copy (as on a filesystem that cannot map files). With ``open(..., verify=True)`` every view is
        of a checked copy.
        """
        if isinstance(i, (str, bytes)):
            i = self.index(i)
        if self.verifies or self._codec(i):
            return memoryview(self[i])
        path, offset, size = self.locate(i)
        m = self._maps.get(path)
        if m is None:
            with self._maps_lock:
                m = self._maps.get(path)
                if m is None:
                    try:
                        m = _map_regular(path)
                    except OSError:
                        # A filesystem that cannot map files (FUSE with direct I/O): the reader
                        # uses pread there, and a view is of a copy.
                        return memoryview(self[i])
                    self._maps[path] = m
        return memoryview(m)[offset : offset + size]

    @property
    def manifest(self) -> dict:
        """The dataset's manifest.json, as a dict."""
        return json.loads(self.manifest_json())

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield self[i]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, bytes)) and self.find_key(key) is not None

    def __reduce__(self):
        # Pickles as its path and options, never its contents: spawn workers re-open it.
        return (_reopen, (os.fspath(self.path), self._populate, self.verifies))

    def close(self) -> None:
        """Releases the dataset's mappings and open files (those of ``view()`` too, once no
        view of them is alive; reads in flight on other threads finish first). Any use after
        it raises ``ValueError``; closing twice is harmless. ``with packds.open(p) as ds:``
        closes on leaving the block."""
        super().close()
        with self._maps_lock:
            self._maps.clear()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<packds.Dataset {os.fspath(self.path)!r}: closed>"
        return f"<packds.Dataset {os.fspath(self.path)!r}: {len(self)} samples>"


def _map_regular(path) -> mmap.mmap:
    """Maps the shard ``path`` read-only; OSError unless it is a regular file (opened without
    blocking: a shard replaced by a FIFO since the dataset was opened is never waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fsdecode(path)} is not a regular file")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _reopen(path: str, populate: bool, verify: bool = False) -> Dataset:
    return Dataset(path, populate=populate, verify=verify)


def open(path: str | os.PathLike, *, populate: bool = False, verify: bool = False, stage: bool = False, preload: bool = False, **stage_options) -> Dataset:  # noqa: A001
    """Opens the packds dataset directory ``path``.

    Cost is O(number of shards): the index is memory-mapped and checked lazily, entry by entry.
    ``verify=True`` checks every sample as it is read (after decompression) against its
    CRC32C and raises :class:`ChecksumError` naming the key; it costs one CRC pass (about
    10 GB/s) per read.
    ``populate=True`` pre-faults every shard mapping (reads the whole dataset into memory once),
    so later reads never wait on a page fault: for staged or in-memory datasets.
    ``stage=True`` first copies the dataset to node-local storage with :func:`stage` (keyword
    options ``to``, ``policy``, ``memory_limit``, ``reserve``, ``jobs`` are passed on) and opens
    the copy. ``preload=True`` pulls every shard into the page cache first (large sequential
    reads in Rust, GIL released).
    Raises :class:`FormatError` for anything that is not a complete, intact dataset.
    """
    if stage_options and not stage:
        raise TypeError(f"open() got options for stage=True without it: {', '.join(sorted(stage_options))}")
    if stage:
        path = _stage.stage(path, **stage_options)
    if preload:
        _stage.preload(path)
    return Dataset(os.fsdecode(path), populate=populate, verify=verify)


def pack(sources, output, **options) -> dict:
    """Packs ``sources`` (a path or a list of paths) into the dataset directory ``output``.

    Options as in ``packds pack --help``: ``shard_size``, ``threads``, ``follow_symlinks``,
    ``include``, ``exclude``, ``on_error`` ("fail" | "skip"), ``force``, ``resume``,
    ``format`` ("tar" | "h5"), ``compress`` ("none" | "zstd" | "zstd:LEVEL" | "auto" |
    "auto:LEVEL"), ``zstd_dict`` (dictionary size in bytes, or True for 112 KiB),
    ``progress`` (a callable ``(phase, files_done, files_total, bytes_done, bytes_total)``,
    called about ten times a second; phase 0 walks the tree, 1 packs, 2 finishes, 3 done;
    ``bytes_total`` is 0 while unknown; one taking the first four still works),
    ``remove_source`` (remove each packed file once its shard is on disk and read back, then the
    directories left empty; never a source root) and ``dry_run`` (with ``remove_source``: pack
    nothing, list the files that would be removed).
    Returns a summary dict (files, bytes, shards, seconds, skipped, ...); ``skipped`` is a list
    of :class:`Skipped` ``(path, reason)`` named tuples, as ``manifest.json`` lists them;
    ``empty_dirs``: the empty directories kept, ``hard_links``: names stored as hard links of
    another name, ``sparse_files``: sparse files stored at full size.
    ``removed`` is None without ``remove_source``, else ``{files, directories, already_gone,
    left, dry_run}`` (``left``: :class:`Skipped` tuples of the files left in place; a dry run
    adds ``would_remove``, a list of paths).
    """
    srcs = _sources(sources)
    part = options.get("part")
    if isinstance(part, str):
        options["part"] = _parse_part(part)
    if options.get("plan") is not None:
        options["plan"] = os.fsdecode(options["plan"])
    _shared_options(options)
    # HDF5 shards are written through h5py (imported only when a shard is written; a plan may
    # name the format, so the writer is always at hand).
    from ._h5 import write_shard

    options.setdefault("h5_writer", write_shard)
    # What shapes the dataset only: removing the sources (or not) leaves the same dataset.
    recorded = {k: v for k, v in options.items() if k not in ("progress", "force", "resume", "h5_writer", "remove_source", "dry_run")}
    options.setdefault("options_json", json.dumps(recorded, sort_keys=True))
    options["progress"] = _progress_arg(options.get("progress"))
    return _with_skipped(_core.pack(srcs, os.fsdecode(output), **options))


class Skipped(NamedTuple):
    """A file, directory or member a command left out, and why (``manifest.json`` lists them
    as ``{"path": ..., "reason": ...}`` objects; ``--json`` summaries too)."""

    path: str
    reason: str


def _with_skipped(summary: dict) -> dict:
    summary["skipped"] = [Skipped(p, r) for p, r in summary.get("skipped", [])]
    if summary.get("removed") is not None:
        summary["removed"]["left"] = [Skipped(p, r) for p, r in summary["removed"]["left"]]
    return summary


def _progress_arg(cb):
    """The progress callback as the core calls it, ``(phase, done, total, bytes_done,
    bytes_total)``; one written for the first four arguments only still works."""
    if cb is None or getattr(cb, "takes_bytes_total", False):
        return cb
    import inspect  # only here: importing it costs a command's start-up 10-20 ms

    try:
        inspect.signature(cb).bind(0, 0, 0, 0, 0)
    except TypeError:
        return lambda *st: cb(*st[:4])
    except ValueError:  # no signature to inspect (some builtins): called as it is
        pass
    return cb


def _sources(sources) -> list[str]:
    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    return [os.fsdecode(s) for s in sources]


def _shared_options(options: dict) -> None:
    """What `pack` and `plan` do the same to their options (in place)."""
    if options.get("zstd_dict") is True:
        options["zstd_dict"] = DEFAULT_ZSTD_DICT_SIZE
    elif options.get("zstd_dict") in (False, None):
        options.pop("zstd_dict", None)
    if options.get("format") in ("h5", "hdf5"):
        try:
            import h5py  # noqa: F401
        except ImportError:
            e = UsageError("--format h5 writes HDF5 shards through h5py, which is not installed")
            e.hint = "pip install h5py (into the environment packds is installed in; from a packds checkout: pip install '.[h5]')"
            raise e from None


def _parse_part(text: str) -> tuple[int, int | None]:
    """``"I/N"`` → (I, N); ``"I"`` → (I, None): N is then the plan's (``plan(..., parts=N)``)."""
    try:
        i, _, n = text.partition("/")
        return int(i), (int(n) if n else None)
    except ValueError:
        e = UsageError(f"--part {text!r} is not I or I/N")
        e.hint = "e.g. --part $SLURM_ARRAY_TASK_ID with a plan made with --parts N, or --part I/N (I from 0 to N-1)"
        raise e from None


def plan(sources, output, **options) -> dict:
    """Walks ``sources`` once, stats every file and writes the plan file ``output``: the file
    list and the shard boundaries for ``pack(..., plan=output, part=(i, n))`` in each task of a
    job array (options as for :func:`pack`; the plan fixes them for every part). ``parts=N``
    records the number of array tasks, so that each task needs only ``part=i`` (or
    ``--part $SLURM_ARRAY_TASK_ID``), which also works when one task is rerun alone. Returns
    {files, shards, bytes, plan_bytes, parts, skipped}."""
    for k in ("part", "plan", "force", "resume", "options_json", "h5_writer"):
        options.pop(k, None)
    _shared_options(options)
    options["progress"] = _progress_arg(options.get("progress"))
    return _with_skipped(_core.plan(_sources(sources), os.fsdecode(output), **options))


def merge(output, *, verify: bool = False, progress=None) -> dict:
    """Joins the finished parts in ``output`` (from ``pack(..., part=...)``) into one dataset
    there: shards are renamed into place, the index is streamed from the parts' indexes.
    Every part is checked first (manifest against index, shard names and sizes; with
    ``verify=True`` every shard's checksum too) and nothing is moved unless all pass.
    Refuses missing, unfinished or damaged parts, naming them; running it again is harmless.
    ``progress(phase, shards_done, shards_total, bytes_done, bytes_total)``: phase 0 checks the
    parts, 1 moves the shards, 2 writes the index and manifest."""
    return _core.merge(os.fsdecode(output), verify=verify, progress=_progress_arg(progress))


def index_tars(tars, output, *, group_by_basename: bool = False, force: bool = False, link: str = "symlink", progress=None) -> dict:
    """Indexes existing tar files (GNU tar, pax, WebDataset shards) in place into the dataset
    directory ``output``: ``index.pdsi``, ``manifest.json`` and one ``shard-NNNNN.tar`` link per
    tar (``link="symlink"``, the default, or ``"hard"``); the tars are read once and never
    modified. Every regular member becomes a sample keyed by its name; links, devices, sparse
    files and unsafe names are skipped and listed. ``group_by_basename=True`` checks (and
    records) that the members of each WebDataset sample are contiguous, for
    :class:`packds.wds.GroupedDataset`. Returns a summary dict (tars, samples, bytes, groups,
    skipped: :class:`Skipped` ``(member, reason)`` tuples, warnings, seconds). Raises
    :class:`FormatError` naming the tar and byte offset for a damaged or ambiguous archive, or
    a duplicate key. ``progress(phase, tars_done, tars_total, bytes_read, bytes_total)``.
    """
    if isinstance(tars, (str, bytes, os.PathLike)):
        tars = [tars]
    summary = _core.index_tars([os.fsdecode(t) for t in tars], os.fsdecode(output), group_by_basename=group_by_basename, force=force, link=link,
                               progress=_progress_arg(progress))
    return _with_skipped(summary)


from .writer import Writer, build  # noqa: E402  (after the names it uses)


def concat(datasets, output, *, prefixes=None, link: str = "symlink", force: bool = False) -> dict:
    """One dataset ``output`` made of ``datasets``, no data copied: it links to their shards
    (``link="symlink"``, the default, or ``"hard"``, or ``"copy"``: checked copies) and has an
    index of all their samples. ``prefixes`` (one per dataset, e.g. ``["a/", "b/"]``) make
    colliding keys unique; a key in two datasets is otherwise refused, naming both. Returns
    {output, samples, bytes, shards, shards_left_out, seconds}."""
    srcs = [os.fsdecode(d) for d in ([datasets] if isinstance(datasets, (str, bytes, os.PathLike)) else datasets)]
    return _core.concat(srcs, os.fsdecode(output), prefixes=list(prefixes or []), link=link, force=force)


def compact(dataset, *, shard_size: int = 1 << 30) -> dict:
    """Drops the bytes ``pack(..., append=True, replace=True)`` left unreferenced: the live
    samples of the shards that hold such bytes are written (stored bytes as they are) into new
    shards, as the next version; the other shards are kept as they are. The manifest is written
    last (a crash leaves the previous version); readers keep the version they opened; the retired
    shards are removed by the next compaction or append. Returns {output, version, rewritten,
    new_shards, freed_bytes, seconds}."""
    return _core.compact(os.fsdecode(dataset), shard_size=shard_size)


def subset(dataset, output, *, include=(), exclude=(), keys=None, fraction: float | None = None, seed: int = 0, complement: bool = False,
           link: str = "symlink", force: bool = False) -> dict:
    """The dataset ``output`` of the samples of ``dataset`` that a selection picks, no data
    copied: it links to the shards that hold them (so ``stage`` copies only those) and opens
    in O(1) like any dataset. Selection: ``include`` / ``exclude`` globs (as for ``pack``),
    ``keys`` (an iterable of keys; each must exist), ``fraction`` (about that share of the
    samples, chosen by a hash of each key and ``seed``). ``complement=True`` with the same
    options picks exactly the other samples: a train/validation split that is disjoint and
    whole. Returns {output, samples, bytes, shards, shards_left_out, seconds}."""
    key_list = None if keys is None else [os.fsencode(k) for k in keys]
    return _core.subset(os.fsdecode(dataset), os.fsdecode(output), include=list(include), exclude=list(exclude), keys=key_list, fraction=fraction,
                        seed=seed, complement=complement, link=link, force=force)

#: Default ``--zstd-dict`` size (zstd's own default).
DEFAULT_ZSTD_DICT_SIZE = 112 << 10


# --- Staging at job start (python/packds/stage.py) -------------------------------------------
from . import stage as _stage  # noqa: E402

stage = _stage.stage
preload = _stage.preload
