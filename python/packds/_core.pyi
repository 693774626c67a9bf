"""Type stubs for the Rust extension `packds._core`."""

from os import PathLike
from typing import Any, Callable, Sequence, SupportsIndex, final, overload

from typing_extensions import disjoint_base

# progress(phase, done, total, bytes_done, bytes_total): called about ten times a second.
_Progress = Callable[[int, int, int, int, int], object]

__all__ = [
    "LocalShard",
    "ShardCache",
    "compact",
    "concat",
    "subset",
    "merge",
    "pack",
    "plan",
    "preload",
    "stage_dataset",
    "stage_file",
    "StageProgress",
    "dataset_kind",
    "dataset_files",
    "is_staged_at",
    "is_intact_with_options",
    "remove_stale_copy",
    "staged_copy_trust",
    "path_open_to_others",
    "verify_copy",
    "disambiguated_name",
    "tree_fingerprint",
    "index_tars",
    "Groups",
    "Reader",
    "Writer",
    "__version__",
    "INDEX_FORMAT_VERSION",
    "FAULT_INJECTION",
]

__version__: str
INDEX_FORMAT_VERSION: int
# Built with the cargo feature `fault-injection` (the test-only PACKDS_FAULT switches work).
FAULT_INJECTION: bool

@disjoint_base
class Reader:
    """An opened dataset (use `packds.open`). Immutable; safe across threads and fork."""

    def __new__(cls, path: str | PathLike[str], *, populate: bool = False, verify: bool = False) -> Reader: ...
    @property
    def path(self) -> str: ...
    @property
    def verifies(self) -> bool:
        """Whether every read checks the sample's CRC32C (``open(..., verify=True)``)."""
    @property
    def format_version(self) -> int:
        """Index format version: 1 (all samples raw) or 2 (codec section, compression)."""
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, idx: slice, /) -> list[bytes]: ...
    @overload
    def __getitem__(self, idx: SupportsIndex | str | bytes, /) -> bytes:
        """Sample bytes (decompressed) by position or key; a slice gives a list of them. A position is any integer (numpy
        integers too; ``True`` is 1, as in a list); negative counts from the end; out of range,
        of any size, raises IndexError (so do all methods taking a position). GIL
        held for raw samples (a warm 8 KiB copy is faster than releasing and retaking it) and
        released to decode 64 KiB or more."""
    def get_many(self, indices: Sequence[SupportsIndex | str | bytes]) -> list[bytes]:
        """Bytes of many samples in one call; GIL released while the bytes are copied and
        decoded (several threads for a large compressed batch)."""
    def get_batch(self, indices: Sequence[SupportsIndex | str | bytes], out: bytearray | None = None) -> tuple[bytearray, list[int]]: ...
    def read_range(
        self, start: SupportsIndex, stop: SupportsIndex, out: bytearray | None = None, local: LocalShard | None = None
    ) -> tuple[bytearray, list[int]]:
        """Samples ``[start, stop)`` back to back in one buffer: ``(buffer, offsets)``, sample
        ``start + k`` being ``buffer[offsets[k]:offsets[k + 1]]``. Samples stored raw in one
        shard are read as one byte span (one ``pread`` where the shard cannot be mapped);
        compressed ones are decoded. ``out``: a bytearray to fill and return (grown when too
        small, never shrunk); else a new one. ``local``: a pinned copy (``ShardCache.fetch``)
        of the one shard holding every sample of the range (else UsageError), read instead of
        the dataset's shard. GIL released. IndexError outside ``0..len``, ValueError when
        ``start > stop``."""
    def shard_of(self, i: SupportsIndex) -> int:
        """The shard number of sample ``i`` (its position in the manifest's ``shards``)."""
    def blocks(self, target_bytes: int) -> list[tuple[int, int]]:
        """``(start, stop)`` ranges covering every sample once, in order, each inside one shard
        and spanning about ``target_bytes`` stored bytes (for sequential reading)."""
    def key_range(self, prefix: str | bytes) -> tuple[int, int]:
        """``(start, stop)``: positions of the keys starting with ``prefix`` (one run; keys are
        sorted byte-wise). O(log n)."""
    def get_checked(self, i: SupportsIndex | str | bytes) -> bytes:
        """Sample bytes after checking their CRC32C; raises ChecksumError."""
    def raw(self, i: SupportsIndex | str | bytes) -> bytes:
        """The stored bytes of sample ``i`` (a zstd frame when it is stored compressed)."""
    def stored_size(self, i: SupportsIndex | str | bytes) -> int: ...
    def zstd_dict(self) -> bytes | None: ...
    def _codec(self, i: SupportsIndex | str | bytes) -> int: ...
    def key(self, i: SupportsIndex) -> str: ...
    def key_bytes(self, i: SupportsIndex) -> bytes: ...
    def index(self, key: str | bytes) -> int: ...
    def find_key(self, key: str | bytes) -> int | None: ...
    def size(self, i: SupportsIndex | str | bytes) -> int: ...
    def locate(self, i: SupportsIndex | str | bytes) -> tuple[str, int, int]:
        """(shard path, byte offset, stored size) of sample ``i``."""
    def glob(self, pattern: str) -> list[int]: ...
    def manifest_json(self) -> str: ...
    def verify(self, threads: int = 4, deep: bool = False, progress: _Progress | None = None) -> dict[str, Any]: ...
    def unpack(self, dest: str | PathLike[str], progress: _Progress | None = None) -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

@final
class ShardCache:
    """A node-local shard cache directory (mode 0700, ours) shared by every process of a node:
    shards copied in on first use, verified against the manifest's XXH3-128, evicted least
    recently used first, never while pinned. Thread-safe; per process."""

    def __new__(cls, dir: str | PathLike[str], limit: int) -> ShardCache: ...
    @property
    def dir(self) -> str: ...
    @property
    def limit(self) -> int: ...
    def fetch(self, src: str | PathLike[str], size: int, xxh3_128: str) -> LocalShard | None:
        """The shard ``src`` (``size`` bytes, XXH3-128 ``xxh3_128`` as its manifest says) as a
        pinned, mapped local copy, copied in first when the cache lacks it (blocking while
        another process or thread fetches it). None when it cannot be cached (larger than
        ``limit``, or no room: every cached shard pinned). A copy whose size or hash differs
        raises FormatError / ChecksumError naming ``src`` and leaves nothing cached. GIL
        released."""
    def lookup(self, size: int, xxh3_128: str) -> LocalShard | None:
        """The pinned copy if the shard is cached, else None; never fetches."""
    def usage(self) -> int:
        """Bytes of cached shards and copies in progress."""
    def stats(self) -> dict[str, int]:
        """This object's ``fetches``, ``fetched_bytes``, ``hits``, ``evictions``, ``evicted_bytes``."""
    def fetch_log(self) -> list[tuple[str, int, int]]:
        """Every fetch recorded in the cache directory by any process: ``(xxh3_128, size, pid)``."""
    def clear(self) -> tuple[int, int, int]:
        """Removes every cached shard no process has pinned: (entries removed, bytes freed, entries kept)."""

@final
class LocalShard:
    """A cached shard, pinned (never evicted) and mapped until ``close()``."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None:
        """Unpins and unmaps; idempotent (also on garbage collection)."""
    def __enter__(self) -> LocalShard: ...
    def __exit__(self, *_exc: object) -> None: ...

def pack(
    sources: list[str],
    output: str,
    *,
    shard_size: int = ...,
    threads: int = 0,
    follow_symlinks: bool = False,
    include: list[str] = ...,
    exclude: list[str] = ...,
    on_error: str = "fail",
    force: bool = False,
    resume: bool = False,
    options_json: str | None = None,
    progress: _Progress | None = None,
    compress: str = "none",
    zstd_dict: int = 0,
    format: str = "tar",
    h5_writer: Callable[..., int] | None = None,
    part: tuple[int, int | None] | None = None,
    plan: str | None = None,
    append: bool = False,
    replace: bool = False,
    remove_source: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]: ...
def plan(
    sources: list[str],
    output: str,
    *,
    shard_size: int = ...,
    threads: int = 0,
    follow_symlinks: bool = False,
    include: list[str] = ...,
    exclude: list[str] = ...,
    on_error: str = "fail",
    compress: str = "none",
    zstd_dict: int = 0,
    format: str = "tar",
    progress: _Progress | None = None,
    parts: int | None = None,
) -> dict[str, Any]:
    """Writes the plan file ``output`` (file list and shard boundaries) for ``pack(..., plan=,
    part=)``; returns {files, shards, bytes, plan_bytes, skipped}."""

@disjoint_base
class Writer:
    """A dataset being written sample by sample (use `packds.Writer`)."""

    def __new__(
        cls,
        path: str | PathLike[str],
        *,
        shard_size: int = ...,
        compress: str = "none",
        format: str = "tar",
        force: bool = False,
        mtime: int = 0,
        h5_writer: Callable[..., int] | None = None,
        options_json: str | None = None,
        resume: bool = False,
    ) -> Writer: ...
    def set_mark(self, mark: int) -> None: ...
    @property
    def resume_mark(self) -> int | None: ...
    @property
    def resumed_samples(self) -> int: ...
    def suspend(self) -> None: ...
    def add(self, key: str | bytes, data: bytes) -> None: ...
    def add_file(self, key: str | bytes, path: str | PathLike[str]) -> None: ...
    def close(self) -> dict[str, Any]: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def path(self) -> str: ...

def compact(dataset: str, *, shard_size: int = ...) -> dict[str, Any]: ...
def concat(sources: list[str], output: str, *, prefixes: list[str] = ..., link: str = "symlink", force: bool = False) -> dict[str, Any]: ...
def subset(
    source: str,
    output: str,
    *,
    include: list[str] = ...,
    exclude: list[str] = ...,
    keys: list[bytes] | None = None,
    fraction: float | None = None,
    seed: int = 0,
    complement: bool = False,
    link: str = "symlink",
    force: bool = False,
) -> dict[str, Any]: ...
def merge(output: str, *, verify: bool = False, progress: _Progress | None = None) -> dict[str, Any]: ...
def index_tars(
    tars: list[str],
    output: str,
    *,
    group_by_basename: bool = False,
    force: bool = False,
    link: str = "symlink",
    threads: int = 0,
    progress: _Progress | None = None,
) -> dict[str, Any]: ...

@final
class Groups:
    """WebDataset-style samples of an indexed dataset: runs of members sharing a basename."""

    def __new__(cls, reader: Reader) -> Groups: ...
    def __len__(self) -> int: ...
    def range(self, i: SupportsIndex) -> tuple[int, int]: ...
    def key(self, i: SupportsIndex) -> str: ...
    def find(self, key: str | bytes) -> int | None: ...
    def item(self, i: SupportsIndex) -> dict[str, Any]: ...

@final
class StageProgress:
    """Progress counters of a running stage or preload, readable from any thread."""

    def __new__(cls) -> StageProgress: ...
    @property
    def bytes_done(self) -> int: ...
    @property
    def bytes_total(self) -> int: ...
    @property
    def files_done(self) -> int: ...
    @property
    def files_total(self) -> int: ...
    @property
    def reused(self) -> int: ...
    @property
    def bytes_read(self) -> int:
        """Bytes actually read from the files copied or preloaded (a preload skips what is
        already in the page cache, e.g. a copy just written)."""
    def cancel(self) -> None:
        """Asks the running copy to stop (it then fails with KeyboardInterrupt, leaving nothing)."""

def stage_dataset(
    src: str | PathLike[str],
    dest: str | PathLike[str],
    tmp: str | PathLike[str],
    *,
    jobs: int = 4,
    durable: bool = True,
    progress: StageProgress | None = None,
    previous: str | PathLike[str] | None = None,
) -> dict[str, Any]:
    """Copies the dataset ``src`` to ``dest`` via ``tmp``, checking every file's XXH3-128
    against the manifest in the same pass; GIL released. Returns {path, bytes, files, seconds}."""

def stage_file(
    src: str | PathLike[str],
    dest: str | PathLike[str],
    tmp: str | PathLike[str],
    *,
    durable: bool = True,
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    """Copies the single file ``src`` to ``dest`` via ``tmp``; GIL released."""

def preload(files: Sequence[str | PathLike[str] | tuple[str | PathLike[str], int]], *, jobs: int = 4, progress: StageProgress | None = None) -> int:
    """Reads ``files`` into the page cache (GIL released); returns the bytes read."""
def dataset_kind(path: str | PathLike[str]) -> str:
    """"dataset", "parts" (not merged yet), "interrupted" (a pack), "none" or "missing"."""
def dataset_files(path: str | PathLike[str]) -> tuple[list[tuple[str, int]], int]:
    """([(path, size)] of the index and every shard, the bytes a copy takes)."""
def is_staged_at(src: str | PathLike[str], dest: str | PathLike[str]) -> bool: ...
def is_intact_with_options(dest: str | PathLike[str], options: str) -> bool: ...
def remove_stale_copy(path: str | PathLike[str]) -> None: ...
def staged_copy_trust(path: str | PathLike[str]) -> tuple[str, str]:
    """("missing" | "foreign" | "shared" | "private", why): is the staged copy provably ours?"""
def path_open_to_others(path: str | PathLike[str]) -> str | None:
    """Why another user could change what the directory path leads to (it, a directory above it, a symlink on the way), or None."""
def verify_copy(src: str | PathLike[str] | None, dest: str | PathLike[str], *, file: bool = False) -> None:
    """Reads the whole copy and checks it against ``src``'s manifest (or its own; or, ``file=True``, the file ``src``)."""
def disambiguated_name(name: str, source: str | PathLike[str]) -> str: ...
def tree_fingerprint(path: str | PathLike[str]) -> dict[str, int]: ...
