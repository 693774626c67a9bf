"""The node-local shard cache as the streaming reader uses it (the cache itself, its locks and
its eviction, is ``_core.ShardCache``; see docs/FORMAT.md, "Node-local shard cache").

* :class:`CacheClient`: one per process and dataset list; ``pin(source, shard)`` gives a
  pinned local copy of a shard (fetched, verified and renamed in by the first process on the
  node that needs it) or None when it cannot be cached (then the shared copy is read).
* :class:`Prefetcher`: a background thread that keeps the next few shards of a reader's plan
  fetched and pinned, ahead of the read position.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

from . import _core

AUTO = "auto"
CACHE_SUBDIR = "packds-cache"


def default_cache_dir() -> Optional[str]:
    """``$SLURM_TMPDIR/packds-cache`` inside a Slurm job, else None (no cache)."""
    tmp = os.environ.get("SLURM_TMPDIR")
    if tmp and os.environ.get("SLURM_JOB_ID") and os.path.isdir(tmp):
        return os.path.join(tmp, CACHE_SUBDIR)
    return None


def default_limit(cache_dir: str) -> tuple[int, str]:
    """Bytes the cache may hold: what it holds now plus the free space of its filesystem, less
    the reserve ``stage`` keeps (5 % of the filesystem, at least 1 GiB, at most 10 %)."""
    from .stage import disk_space, reserve_default

    probe = cache_dir
    while not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    free, fs_size = disk_space(probe)
    reserve = reserve_default(fs_size)
    used = int(_core.ShardCache(cache_dir, 0).usage())  # counted as room-making counts it
    return max(0, used + free - reserve), f"{used:,} cached + {free:,} free - {reserve:,} reserve"


def _check_private(cache_dir: str) -> None:
    """Refuses a cache below a directory (or a symbolic link) another user controls: they could
    swap the cache for one of their own between our checks and our reads."""
    probe = os.path.abspath(cache_dir)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    why = _core.path_open_to_others(probe if os.path.isdir(probe) else os.path.dirname(probe))
    if why:
        from .errors import UsageError

        e = UsageError(f"cannot keep a shard cache in {cache_dir}: {why}")
        e.hint = "give cache_dir a directory only you can write (inside a job the default, $SLURM_TMPDIR/packds-cache, is)"
        raise e


class CacheClient:
    """The shard cache for one process: which shard file each (source, shard) is, and the
    counters a run reports (``stats()``)."""

    def __init__(self, cache_dir: str, limit: Optional[int], datasets: Sequence) -> None:
        _check_private(cache_dir)
        if limit is None:
            limit, self.limit_rule = default_limit(cache_dir)
        else:
            self.limit_rule = "given"
        self.cache = _core.ShardCache(cache_dir, int(limit))
        self.shards: list[list[tuple[str, int, str]]] = []
        for ds in datasets:
            m = ds.manifest
            base = os.fspath(ds.path)
            self.shards.append([(os.path.join(base, r["file"]), int(r["size"]), r["xxh3_128"]) for r in m["shards"]])
        self.read_through = 0  # bytes read from shared storage for shards that were not cached
        self.lock = threading.Lock()
        self.uncacheable: set[tuple[int, int]] = set()
        self.allowed: Optional[set[tuple[int, int]]] = None  # None: every shard may be cached

    def keep_within_limit(self, keys: Sequence[tuple[int, int]]) -> None:
        """The shards this process reads, in a fixed order (the same on every process of the
        node). When they do not all fit under the limit, only the first ones that fit are
        cached; the others are always read from shared storage. Every epoch reads the shards in
        a new order, and with least-recently-used eviction a set larger than the cache would be
        fetched and evicted over and over (each shard copied whole for a few blocks, then gone
        before the next epoch needs it). A fixed subset instead stays cached: later epochs
        read only the rest from shared storage."""
        total, allowed = 0, set()
        limit = self.limit
        for key in keys:
            size = self.shards[key[0]][key[1]][1]
            if total + size > limit:
                self.allowed = allowed
                return
            total += size
            allowed.add(key)
        self.allowed = None

    @property
    def limit(self) -> int:
        return int(self.cache.limit)

    def pin(self, source: int, shard: int):
        """A pinned local copy of shard ``shard`` of source ``source`` (close it when done), or
        None if it cannot be cached now."""
        path, size, h = self.shards[source][shard]
        if size == 0 or size > self.cache.limit or (self.allowed is not None and (source, shard) not in self.allowed):
            return None
        loc = self.cache.fetch(path, size, h)
        if loc is None:
            with self.lock:
                self.uncacheable.add((source, shard))
        return loc

    def note_read_through(self, n: int) -> None:
        with self.lock:
            self.read_through += n

    def stats(self) -> dict:
        st = dict(self.cache.stats())
        st.update(read_through_bytes=self.read_through, limit=self.limit, usage=int(self.cache.usage()), dir=self.cache.dir,
                  cached_shards=None if self.allowed is None else len(self.allowed))
        return st


class Prefetcher:
    """Keeps the next ``depth`` distinct shards of a plan (from the read position on) fetched
    into the cache and pinned, on a background thread, so the reader rarely waits for a copy
    and no other process on the node evicts a shard this reader is about to read. Pins of
    shards no longer among them are released as the read position advances."""

    def __init__(self, client: CacheClient, keys: Sequence[tuple[int, int]], depth: int) -> None:
        self.client, self.keys, self.depth = client, keys, max(1, int(depth))
        self.pos = 0
        self.seen = -1
        self.stopping = False
        self.held: dict[tuple[int, int], object] = {}
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="packds-prefetch", daemon=True)
        self.thread.start()

    def advance(self, k: int) -> None:
        with self.cv:
            if k > self.pos or self.seen < 0:
                self.pos = k
            self.cv.notify()

    def _want(self, pos: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for key in self.keys[pos:]:
            if key not in out:
                out.append(key)
                if len(out) >= self.depth:
                    break
        return out

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.stopping and self.pos == self.seen:
                        self.cv.wait()
                    if self.stopping:
                        return
                    pos = self.seen = self.pos
                want = self._want(pos)
                for key in [k for k in self.held if k not in want]:
                    self.held.pop(key).close()  # type: ignore[attr-defined]
                for key in want:
                    if self.stopping or self.pos != pos:
                        break
                    if key in self.held or key in self.client.uncacheable or \
                            (self.client.allowed is not None and key not in self.client.allowed):
                        continue
                    try:
                        loc = self.client.pin(*key)
                    except Exception:  # noqa: BLE001 - the reader fetches it itself and reports the error
                        loc = None
                    if loc is not None:
                        self.held[key] = loc
        finally:
            for loc in self.held.values():
                loc.close()  # type: ignore[attr-defined]
            self.held.clear()

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
