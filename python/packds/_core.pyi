"""Type stubs for the Rust extension `packds._core`."""

from os import PathLike
from typing import Any, Callable

__version__: str
INDEX_FORMAT_VERSION: int

class Reader:
    """An opened dataset (use `packds.open`). Immutable; safe across threads and fork."""

    def __new__(cls, path: str | PathLike[str], *, populate: bool = False) -> Reader: ...
    @property
    def path(self) -> str: ...
    def __len__(self) -> int: ...
    def __getitem__(self, idx: int | str | bytes) -> bytes:
        """Sample bytes by position (negative counts from the end) or key. GIL held (a warm
        8 KiB copy is faster than releasing and retaking it)."""
    def get_many(self, indices: list[int]) -> list[bytes]:
        """Bytes of many samples in one call; GIL released while the bytes are copied."""
    def get_checked(self, i: int) -> bytes:
        """Sample bytes after checking its CRC32C; raises ChecksumError."""
    def key(self, i: int) -> str: ...
    def key_bytes(self, i: int) -> bytes: ...
    def index(self, key: str | bytes) -> int: ...
    def find_key(self, key: str | bytes) -> int | None: ...
    def size(self, i: int) -> int: ...
    def locate(self, i: int) -> tuple[str, int, int]: ...
    def glob(self, pattern: str) -> list[int]: ...
    def manifest_json(self) -> str: ...
    def verify(self, threads: int = 4) -> dict[str, Any]: ...
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
) -> dict[str, Any]: ...
