"""Type stubs for the Rust extension `packds._core`."""

from os import PathLike
from typing import Any, Callable

__version__: str
INDEX_FORMAT_VERSION: int
# Built with the cargo feature `fault-injection` (the test-only PACKDS_FAULT switches work).
FAULT_INJECTION: bool

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
    def __getitem__(self, idx: int | str | bytes) -> bytes:
        """Sample bytes (decompressed) by position (negative counts from the end) or key. GIL
        held for raw samples (a warm 8 KiB copy is faster than releasing and retaking it) and
        released to decode 64 KiB or more."""
    def get_many(self, indices: list[int]) -> list[bytes]:
        """Bytes of many samples in one call; GIL released while the bytes are copied and
        decoded (several threads for a large compressed batch)."""
    def get_checked(self, i: int) -> bytes:
        """Sample bytes after checking their CRC32C; raises ChecksumError."""
    def raw(self, i: int) -> bytes:
        """The stored bytes of sample ``i`` (a zstd frame when it is stored compressed)."""
    def stored_size(self, i: int) -> int: ...
    def zstd_dict(self) -> bytes | None: ...
    def _codec(self, i: int) -> int: ...
    def _loc(self, i: int) -> tuple[int, int, int]: ...
    def _shard_path(self, s: int) -> str: ...
    def key(self, i: int) -> str: ...
    def key_bytes(self, i: int) -> bytes: ...
    def index(self, key: str | bytes) -> int: ...
    def find_key(self, key: str | bytes) -> int | None: ...
    def size(self, i: int) -> int: ...
    def locate(self, i: int) -> tuple[str, int, int]: ...
    def glob(self, pattern: str) -> list[int]: ...
    def manifest_json(self) -> str: ...
    def verify(self, threads: int = 4, deep: bool = False) -> dict[str, Any]: ...
    def unpack(self, dest: str | PathLike[str]) -> int: ...

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
    progress: Callable[[int, int, int, int], object] | None = None,
    compress: str = "none",
    zstd_dict: int = 0,
    format: str = "tar",
    h5_writer: Callable[..., int] | None = None,
    part: tuple[int, int] | None = None,
    plan: str | None = None,
    make_plan: bool = False,
) -> dict[str, Any]: ...

def merge(output: str) -> dict[str, Any]: ...
def index_tars(
    tars: list[str],
    output: str,
    *,
    group_by_basename: bool = False,
    force: bool = False,
    link: str = "symlink",
    threads: int = 0,
) -> dict[str, Any]: ...

class Groups:
    """WebDataset-style samples of an indexed dataset: runs of members sharing a basename."""

    def __new__(cls, reader: Reader) -> Groups: ...
    def __len__(self) -> int: ...
    def range(self, i: int) -> tuple[int, int]: ...
    def key(self, i: int) -> str: ...
    def find(self, key: str | bytes) -> int | None: ...
    def item(self, i: int) -> dict[str, Any]: ...
