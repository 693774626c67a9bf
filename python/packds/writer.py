"""Writing a dataset from Python: :class:`Writer` (sample by sample) and :func:`build` (a
function over inputs, in worker processes, in input order).

Both make ordinary packds datasets: tar (or HDF5) shards, an index and a manifest written last,
checksums, ``verify`` and ``stage`` as for a packed tree. Samples added in increasing key order
give exactly the dataset ``packds pack`` makes of the same files' bytes; in any other order the
index is still sorted by key (the data stays in the order it was added).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping

from . import _core
from ._fmt import human

__all__ = ["Writer", "build"]

def _size(v: int | str) -> int:
    if isinstance(v, int):
        return v
    import argparse

    from .cli import parse_size

    try:
        return parse_size(v)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _key(k) -> bytes:
    if isinstance(k, (str, bytes, os.PathLike)):
        return os.fsencode(k)
    raise TypeError(f"a sample key is a str (or bytes), not {type(k).__name__}")


class Writer:
    """Writes the dataset directory ``path`` sample by sample::

        with packds.Writer("out.pds", shard_size="256M", compress="zstd") as w:
            w.add("cats/001.jpg", jpeg_bytes)
            w.add("cats/001", {"jpg": jpeg_bytes, "cls": b"3"})   # members cats/001.jpg, cats/001.cls
            w.add("raw/big.bin", pathlib.Path("/scratch/big.bin"))  # a file, copied as pack does

    ``add(key, data)``: ``data`` is ``bytes``, ``bytearray`` or ``memoryview`` (copied once), a
    path (``os.PathLike``: the file is streamed in, its mode and mtime kept), or a dict of
    fields (``{ext: data}`` → members ``key.ext``, read back grouped by
    :class:`packds.wds.GroupedDataset`). Keys are relative paths, each used once (a duplicate
    raises :class:`packds.UsageError` naming it).

    Closing (leaving the ``with`` block) writes the last shard, the index and the manifest,
    last: only then does the directory open. An exception inside the block, ``abort()``, or a
    killed process leaves nothing that opens (abort removes what was written). The output
    depends only on the sequence of ``add`` calls: byte-identical when repeated (samples get
    ``mtime``, default 0, as their tar modification time). Checksums, compression and writing
    run in the Rust core, the GIL released for large samples.

    Options: ``shard_size`` (bytes or "1G"), ``compress`` ("none", "zstd[:LEVEL]",
    "auto[:LEVEL]"), ``format`` ("tar" or "h5"), ``force`` (replace an existing dataset),
    ``resume`` (continue a writer of the same options that was killed or ``suspend()``ed: its
    completed shards are kept and adding one of their keys again does nothing).
    """

    def __init__(self, path, *, shard_size: int | str = "1G", compress: str = "none", format: str = "tar", force: bool = False, mtime: int = 0,
                 resume: bool = False) -> None:  # noqa: A002
        h5 = None
        if format in ("h5", "hdf5"):
            from . import _shared_options
            from ._h5 import write_shard

            _shared_options({"format": format})
            h5 = write_shard
        options = {"writer": True, "shard_size": _size(shard_size), "compress": compress, "format": format}
        self._w = _core.Writer(os.fsdecode(path), shard_size=_size(shard_size), compress=compress, format=format, force=force, mtime=mtime,
                               h5_writer=h5, options_json=json.dumps(options, sort_keys=True), resume=resume)
        self.path = os.fsdecode(path)
        self.summary: dict | None = None

    def add(self, key, data) -> None:
        if isinstance(data, Mapping):
            for ext, field in data.items():
                if not isinstance(ext, str) or not ext or "/" in ext:
                    raise ValueError(f"sample {key!r}: a field name is a non-empty str without '/', not {ext!r}")
                self.add(os.fsdecode(_key(key)) + "." + ext, field)
            return
        if isinstance(data, os.PathLike):
            self._w.add_file(_key(key), os.fsdecode(data))
            return
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise TypeError(f"sample {key!r}: data is bytes, bytearray, memoryview, a path (os.PathLike) or a dict of fields, not {type(data).__name__}"
                            + (" (encode text first; a path to copy is a pathlib.Path)" if isinstance(data, str) else ""))
        self._w.add(_key(key), data)

    def close(self) -> dict:
        """Completes the dataset; returns {output, samples, bytes, stored_bytes, shards, ordered,
        seconds}. Closing twice returns the same summary."""
        if self.summary is None:
            self.summary = self._w.close()
        return self.summary

    def abort(self) -> None:
        """Removes everything written; nothing that opens is left."""
        self._w.abort()

    def suspend(self) -> None:
        """Stops, keeping the completed shards for ``Writer(path, resume=True)`` (the samples
        of the shard being written are dropped); nothing that opens is left."""
        self._w.suspend()

    @property
    def closed(self) -> bool:
        return self._w.closed

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<packds.Writer {self.path!r}{' (closed)' if self.closed else ''}>"


def _samples(result, what) -> Iterator[tuple[Any, Any]]:
    """The (key, data) pairs of one ``fn`` result: a pair, or a list of pairs, or None."""
    if result is None:
        return
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], (str, bytes)):
        yield result
        return
    if isinstance(result, list):
        for r in result:
            yield from _samples(r, what)
        return
    raise TypeError(f"fn({what!r}) returned {type(result).__name__}: return (key, data), a list of them, or None")


def _call(fn, x):
    return list(_samples(fn(x), x))


class _Progress:
    """tqdm on a terminal, a log line every ``every`` seconds otherwise (a Slurm job's log)."""

    def __init__(self, total: int | None, enabled: bool, every: float = 10.0) -> None:
        self.total, self.every, self.t0, self.last = total, every, time.monotonic(), None
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="input", file=sys.stderr, dynamic_ncols=True, desc="build")

    def update(self, done: int, nbytes: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(human(nbytes), refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        secs = max(now - self.t0, 1e-9)
        of = f" / {self.total:,} inputs ({100.0 * done / self.total:.1f}%)" if self.total else " inputs"
        print(f"packds: build: {done:,}{of}, {human(nbytes)}, {done / secs:,.0f} inputs/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build(fn: Callable[[Any], Any], inputs: Iterable[Any], path, *, workers: int | None = None, chunksize: int = 1, progress: bool = True,
          progress_interval: float = 10.0, mp_context: str | None = None, resume: bool = True, **writer_options) -> dict:
    """Runs ``fn`` over ``inputs`` in ``workers`` processes and writes what it returns to the
    dataset ``path`` in input order, whatever the workers' timing: the same inputs give the
    same dataset, with any number of workers.

    ``fn(input)`` returns ``(key, data)`` (data as for :meth:`Writer.add`: bytes, a path, or a
    dict of fields ``{"jpg": ..., "cls": ...}``), a list of such pairs, or None (nothing for
    that input). ``workers=0`` runs ``fn`` in this process; the default is the CPUs this job may
    use. Workers are started with ``mp_context`` ("fork", "spawn", "forkserver"; default: the
    platform's), so with spawn ``fn`` must be importable (defined at a module's top level).
    Memory is bounded: at most ``4 * workers`` chunks of ``chunksize`` inputs are in flight.
    Progress: a bar on a terminal, a line every ``progress_interval`` seconds in a log file.
    Other options go to :class:`Writer`.

    Interrupted (Ctrl-C, SIGTERM, a time limit, an exception in ``fn``, a killed job), the build
    keeps its completed shards (nothing that opens); the same call again continues from the
    input of the last completed shard, without running ``fn`` on the inputs before it, and
    gives the dataset an uninterrupted build gives (``resume=False``: start over; ``force=True``
    replaces whatever is at ``path``). The same ``fn``, inputs and options are assumed.
    Returns the writer's summary plus ``inputs`` (run this time) and ``resumed_samples``.
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        total = len(inputs)  # type: ignore[arg-type]
    except TypeError:
        total = None
    w = Writer(path, resume=resume, **writer_options)
    start = w._w.resume_mark or 0
    bar = _Progress(None if total is None else total - start, progress, progress_interval)
    done = nbytes = 0

    def put(samples) -> None:
        nonlocal done, nbytes
        w._w.set_mark(start + done)
        for key, data in samples:
            w.add(key, data)
            fields = data.values() if isinstance(data, Mapping) else (data,)
            nbytes += sum(len(f) for f in fields if isinstance(f, (bytes, bytearray, memoryview)))
        done += 1
        bar.update(done, nbytes)

    try:
        # The input of the last completed shard is run again: its samples may span two shards
        # (those already stored are skipped by key).
        todo = itertools.islice(iter(inputs), start, None)
        if workers <= 0:
            for x in todo:
                put(_call(fn, x))
        else:
            _run_pool(fn, todo, workers, chunksize, mp_context, put)
    except BaseException:
        if resume:
            w.suspend()
        else:
            w.abort()
        raise
    finally:
        bar.close()
    resumed = w._w.resumed_samples
    summary = dict(w.close())
    summary["inputs"] = done
    summary["resumed_samples"] = resumed
    return summary


def _chunks(it: Iterator[Any], n: int) -> Iterator[list]:
    while True:
        c = []
        for x in it:
            c.append(x)
            if len(c) == n:
                break
        if not c:
            return
        yield c


def _call_chunk(fn, chunk):
    return [_call(fn, x) for x in chunk]


def _run_pool(fn, inputs, workers: int, chunksize: int, mp_context: str | None, put: Callable) -> None:
    """Chunks of inputs to a process pool, at most ``4 * workers`` in flight; results are
    taken in submission order (so written in input order). A worker that dies (killed, out of
    memory) fails the build with BrokenProcessPool instead of hanging it."""
    import functools
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pending: deque = deque()
    call = functools.partial(_call_chunk, fn)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(mp_context)) as pool:
        try:
            for chunk in _chunks(iter(inputs), max(1, chunksize)):
                pending.append(pool.submit(call, chunk))
                while len(pending) >= 4 * workers:
                    for samples in pending.popleft().result():
                        put(samples)
            while pending:
                for samples in pending.popleft().result():
                    put(samples)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
