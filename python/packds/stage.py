"""Staging a dataset to node-local storage at job start: policy and orchestration.

The copy itself (parallel, XXH3-128 verified in the same pass, fsync, atomic rename) and the
page-cache preload run in Rust (``_core.stage_dataset``, ``_core.stage_file``,
``_core.preload``) with the GIL released. This module decides *whether* and *where* to copy,
takes the per-node lock and cleans up after dead stagers. What a dataset directory holds (its
files, whether a copy is intact and current, what may be removed) is the Rust core's
(``src/layout.rs``, through ``_core``): this module names no dataset file.

Layout in the destination directory ``DEST`` for a source named ``NAME``::

    DEST/NAME                   the staged copy (appears by one atomic rename, complete)
    DEST/.NAME.lock             flock'ed by the one process that copies; the others wait on it
                                (mode 600, ours; it holds the holder's pid and host)
    DEST/.NAME.source           the canonical path of the source NAME was copied from
    DEST/.NAME.staging-PID      a copy in progress (or left by a dead stager: removed later)

Shared destinations (``/tmp``, ``/dev/shm``, a group directory): a copy is reused only when it
is provably ours (``_core.staged_copy_trust``: the copy and every file in it owned by us and
writable by nobody else, not a symlink) and was copied from the same source; in a directory
other users may change (writable by them and not sticky) it is re-verified byte for byte
first. Anything another user owns is never reused, replaced or removed; a ``NAME`` that is not
ours, or that holds a copy of another source with the same basename, makes us stage to
``NAME-<8 hex digits>`` (8 hex digits of the hash of the source path, before the extension) instead,
and say so on stderr.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import threading
import time

from . import _core
from ._fmt import human as _human
from .errors import FormatError, NoSpaceError, PackdsError, UsageError

__all__ = ["stage", "stage_record", "plan", "preload", "memory_limit_default", "POLICIES"]

POLICIES = ("auto", "local", "memory", "inplace")
LOCK_TIMEOUT = 3600.0
LOCK_NOTE_EVERY = 30.0
GiB = 1 << 30
MEMORY_LIMIT_CAP = 10 * GiB


def _warn(msg: str) -> None:
    print(f"packds: warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Numbers behind the decision


def job_memory() -> tuple[int, str]:
    """(bytes, where it came from): the memory this job may use."""
    env = os.environ
    try:
        if env.get("SLURM_MEM_PER_NODE"):
            return int(env["SLURM_MEM_PER_NODE"]) << 20, "SLURM_MEM_PER_NODE"
        if env.get("SLURM_MEM_PER_CPU") and env.get("SLURM_CPUS_ON_NODE"):
            return int(env["SLURM_MEM_PER_CPU"]) * int(env["SLURM_CPUS_ON_NODE"]) << 20, "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE"
    except ValueError:
        pass
    # cgroup v2: our own group's memory.max ("max" = no limit).
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    p = "/sys/fs/cgroup" + line[3:].strip().rstrip("/") + "/memory.max"
                    with open(p) as g:
                        v = g.read().strip()
                    if v != "max":
                        return int(v), "cgroup memory.max"
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory/memory.limit_in_bytes") as f:
            v = int(f.read().strip())
        if v < (1 << 60):
            return v, "cgroup v1 memory.limit_in_bytes"
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def memory_limit_default() -> tuple[int, str]:
    """min(10 GiB, half the job's memory), and where the job's memory came from."""
    mem, why = job_memory()
    return min(MEMORY_LIMIT_CAP, mem // 2), f"min(10 GiB, half of {_human(mem)} from {why})"


def disk_space(path: str) -> tuple[int, int]:
    """(free bytes for us, filesystem size) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def reserve_default(fs_size: int) -> int:
    """Room left free for the job: 5 % of the filesystem, at least 1 GiB, but never more than
    10 % of it (a small $SLURM_TMPDIR, a 64 MiB tmpfs, keeps 90 % usable)."""
    return min(max(fs_size // 20, GiB), fs_size // 10)


# --------------------------------------------------------------------------------------------
# Sources


def _source_kind(src: str) -> str:
    """'dataset', 'tree' (a directory of loose files, packed on the fly) or 'file'."""
    if os.path.isdir(src):
        kind = _core.dataset_kind(src)
        if kind == "dataset":
            return "dataset"
        if kind == "interrupted":
            e = FormatError(f"{src}: incomplete dataset: its pack was interrupted")
            e.hint = "finish it with `packds pack ... --resume` before staging it"
            raise e
        if kind == "parts":
            e = FormatError(f"{src}: a partitioned pack whose parts are not merged yet")
            e.hint = f"run `packds merge {src}` once every array task has finished, then stage it"
            raise e
        return "tree"
    if os.path.isfile(src):
        return "file"
    if not os.path.exists(src):
        raise FileNotFoundError(errno.ENOENT, "cannot stage: no such file or directory", src)
    e = UsageError(f"cannot stage {src}: not a directory or a regular file")
    e.hint = "stage a packds dataset directory, a directory of files, or one file (.tar, .h5)"
    raise e


class _Source:
    def __init__(self, src: str) -> None:
        self.path = os.path.abspath(src.rstrip("/") or "/")
        self.kind = _source_kind(self.path)
        base = os.path.basename(self.path)
        self.name = base + ".pds" if self.kind == "tree" and not base.endswith(".pds") else base
        if self.kind == "dataset":
            _files, self.size = _core.dataset_files(self.path)
        elif self.kind == "tree":
            self.fingerprint = _core.tree_fingerprint(self.path)
            self.size = self.fingerprint["packed_estimate"]
        else:
            self.size = os.stat(self.path).st_size

    def is_staged_at(self, dest: str) -> bool:
        """Is ``dest`` an intact, current copy? Cheap: sizes and the manifest (which holds
        every file's XXH3-128), not the data."""
        if self.kind == "file":
            try:
                a, b = os.stat(self.path), os.stat(dest)
            except OSError:
                return False
            return os.path.isfile(dest) and a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
        if self.kind == "dataset":
            return _core.is_staged_at(self.path, dest)
        return _core.is_intact_with_options(dest, json.dumps(self._options()))

    def _options(self) -> dict:
        """What a tree packed on the fly records in its manifest's options."""
        return {"staged_from": self._tree_record()}

    def _tree_record(self) -> dict:
        fp = self.fingerprint
        return {"path": self.path, "files": fp["files"], "bytes": fp["bytes"], "mtime_ns_max": fp["mtime_ns_max"]}

    def data_files(self, root: str) -> list[str]:
        """The files to pull into memory for the memory policy."""
        if self.kind == "file":
            return [root]
        return [p for p, _ in _core.dataset_files(root)[0]]


# --------------------------------------------------------------------------------------------
# Decision


def _destination(to) -> str:
    if to:
        return os.path.abspath(os.fsdecode(to))
    d = os.environ.get("SLURM_TMPDIR")
    if d:
        return os.path.abspath(d)
    if os.environ.get("SLURM_JOB_ID"):
        e = UsageError("no destination: this Slurm job has no $SLURM_TMPDIR and --to was not given")
        e.hint = "pass --to DIR with a node-local directory (e.g. /tmp or /dev/shm)"
    else:
        e = UsageError("no destination: $SLURM_TMPDIR is not set (not inside a Slurm job) and --to was not given")
        e.hint = "outside a job, pass --to DIR (a local directory such as /tmp/$USER or /dev/shm)"
    raise e


def _plan(source: _Source, to, policy: str, memory_limit, reserve, name: str | None = None) -> dict:
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    rec: dict = {"source": source.path, "kind": source.kind, "bytes": source.size, "requested_policy": policy}
    if policy == "inplace":
        rec.update(policy="inplace", path=source.path, reason="--policy inplace: the source is used where it is")
        return rec
    dest_dir = _destination(to)
    rec["dest"] = dest_dir
    name = name or source.name
    rec["path"] = os.path.join(dest_dir, name)
    probe = dest_dir
    while not os.path.exists(probe):  # the destination may not exist yet: ask its parent
        probe = os.path.dirname(probe)
    free, fs_size = disk_space(probe)
    # The space an earlier (stale) copy or dead stagers' leftovers take will be freed first.
    free += _reclaimable(dest_dir, name)
    if reserve is None:
        reserve = reserve_default(fs_size)
        rec["reserve_rule"] = "max(5% of the filesystem, 1 GiB)"
    if memory_limit is None:
        memory_limit, rec["memory_limit_rule"] = memory_limit_default()
    available = max(0, free - reserve)
    rec.update(free=free, filesystem=fs_size, reserve=reserve, available=available, memory_limit=memory_limit, needed=source.size + reserve)
    fits = source.size <= available
    room = f"{dest_dir}: {_human(free)} free - {_human(reserve)} reserve = {_human(available)} available"
    if policy in ("local", "memory"):
        if not fits:
            e = NoSpaceError(
                f"not enough space to stage {source.path}: needs {_human(source.size + reserve)} "
                f"({source.size:,} bytes + {reserve:,} reserve), {_human(free)} free ({free:,} bytes) in {dest_dir}"
            )
            e.hint = "stage elsewhere with --to DIR, lower --reserve, or read it in place with --policy inplace"
            raise e
        rec.update(policy=policy, reason=f"--policy {policy}; the dataset ({_human(source.size)}) fits ({room})")
        return rec
    # auto
    if fits and source.size <= memory_limit:
        rec.update(policy="memory", reason=f"the dataset ({_human(source.size)}) is within the memory limit ({_human(memory_limit)}) and fits ({room})")
    elif fits:
        rec.update(policy="local", reason=f"the dataset ({_human(source.size)}) is over the memory limit ({_human(memory_limit)}) and fits ({room})")
    else:
        rec.update(policy="inplace", path=source.path, reason=f"the dataset ({_human(source.size)}) does not fit locally ({room}); reading it in place from {source.path}")
    return rec


def _reclaimable(dest_dir: str, name: str) -> int:
    total = 0
    try:
        entries = os.listdir(dest_dir)
    except OSError:
        return 0
    me = os.geteuid()
    for n in entries:
        if n == name or n.startswith(f".{name}.staging-"):
            p = os.path.join(dest_dir, n)
            try:
                if os.lstat(p).st_uid != me:  # another user's: never removed
                    continue
            except OSError:
                continue
            total += _du(p)
    return total


def _du(p: str) -> int:
    try:
        st = os.lstat(p)
    except OSError:
        return 0
    if not os.path.isdir(p) or os.path.islink(p):
        return st.st_blocks * 512
    return sum(_du(os.path.join(p, n)) for n in os.listdir(p))


def plan(src, to=None, *, policy: str = "auto", memory_limit: int | None = None, reserve: int | None = None) -> dict:
    """The decision ``stage`` would take, with the numbers behind it; changes nothing."""
    source = _Source(os.fsdecode(src))
    name, state, notes = source.name, "free", []
    if policy != "inplace":
        dest_dir = _destination(to)
        for cand in _candidates(source):
            state, why = _assess(source, dest_dir, cand)
            if state != "skip":
                name = cand
                break
            notes.append(why)
    rec = _plan(source, to, policy, memory_limit, reserve, name)
    if rec["policy"] != "inplace":
        rec["already_staged"] = state in ("reuse", "verify")
        if state == "verify":
            rec["verify_before_reuse"] = True
        if notes:
            rec["note"] = "; ".join(notes)
    return rec


# --------------------------------------------------------------------------------------------
# Doing it


class _Lock:
    """flock on ``DEST/.NAME.lock``: one stager per node and dataset; the others wait (at most
    ``timeout`` seconds). The lock file must be a plain file of ours: one planted by another
    user (a symlink, a file they own and could hold forever) is refused, never followed."""

    def __init__(self, path: str, quiet: bool, timeout: float = LOCK_TIMEOUT) -> None:
        self.path = path
        self.fd = -1
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            # A symlink (ELOOP), another user's file in a sticky directory (EACCES under
            # fs.protected_regular), a directory or FIFO: say whose it is. Anything else (a
            # destination we cannot write at all) is the plain OSError.
            try:
                st = os.lstat(path)
            except OSError:
                raise e from None
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise _foreign_lock_error(path, st) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise _foreign_lock_error(path, st)
            self._wait(fd, quiet, timeout)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _wait(self, fd: int, quiet: bool, timeout: float) -> None:
        # LOCK_NB in a loop with short sleeps: Ctrl-C and SIGTERM (KeyboardInterrupt) end the wait.
        t0 = time.monotonic()
        note_at = t0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now - t0 >= timeout:
                e = UsageError(f"timed out after {timeout:g} s waiting for the lock {self.path} (held by {_holder(fd)})")
                e.hint = "another packds stage of this dataset is still copying (or is stuck): wait longer with --lock-timeout SECONDS, or end that process"
                raise e
            if not quiet and now >= note_at:
                waited = f" (waited {now - t0:.0f} s)" if now > t0 + 1 else ""
                print(f"packds: waiting for another packds stage of the same dataset ({self.path}, held by {_holder(fd)}){waited}", file=sys.stderr, flush=True)
                note_at = now + LOCK_NOTE_EVERY
            time.sleep(min(0.1, max(0.0, timeout - (now - t0))))

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _foreign_lock_error(path: str, st: os.stat_result) -> UsageError:
    if stat.S_ISLNK(st.st_mode):
        what = f"is a symbolic link owned by {_owner(st.st_uid)}"
    elif not stat.S_ISREG(st.st_mode):
        what = f"is not a plain file (owned by {_owner(st.st_uid)})"
    elif st.st_uid != os.geteuid():
        what = f"is owned by {_owner(st.st_uid)}, not by you"
    else:
        what = "has other hard links"
    e = UsageError(f"refusing to use the lock file {path}: it {what}")
    e.hint = "stage into a directory only you can write (e.g. $SLURM_TMPDIR, or --to a private directory), or remove that file"
    return e


def _clean_leftovers(dest_dir: str, name: str) -> None:
    """Removes copies in progress left by our dead stagers (we hold the lock: nobody else of
    ours is copying); another user's are left alone."""
    me = os.geteuid()
    for n in os.listdir(dest_dir):
        if n.startswith(f".{name}.staging-"):
            p = os.path.join(dest_dir, n)
            try:
                if os.lstat(p).st_uid != me:
                    continue
            except FileNotFoundError:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


_FOREIGN = object()


def _record_path(dest_dir: str, name: str) -> str:
    return os.path.join(dest_dir, f".{name}.source")


def _read_record(dest_dir: str, name: str):
    """The source path recorded for ``DEST/NAME``: None (no record), the path, or _FOREIGN (a
    record we did not write)."""
    p = _record_path(dest_dir, name)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return _FOREIGN
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return _FOREIGN
        return os.read(fd, 1 << 16).decode("utf-8", "surrogateescape").rstrip("\n")
    finally:
        os.close(fd)


def _write_record(dest_dir: str, name: str, canon: str) -> None:
    p = _record_path(dest_dir, name)
    tmp = f"{p}.tmp-{os.getpid()}"
    _remove_quietly(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, canon.encode("utf-8", "surrogateescape") + b"\n")
    finally:
        os.close(fd)
    os.rename(tmp, p)


def _canonical(source: _Source) -> str:
    return os.path.realpath(source.path)


def _candidates(source: _Source) -> list[str]:
    """Where ``source`` may be staged in a destination, in order: its own name, then one
    unique to its source path."""
    return [source.name, _core.disambiguated_name(source.name, _canonical(source))]


def _assess(source: _Source, dest_dir: str, name: str) -> tuple[str, str]:
    """What to do with ``DEST/NAME`` for ``source``: ("free", ""), ("reuse", ""), ("verify",
    why: ours but others could have changed it), ("replace", ""): ours, from this source,
    not current) or ("skip", why: not ours, or a copy of another source)."""
    path = os.path.join(dest_dir, name)
    trust, why = _core.staged_copy_trust(path)
    record = _read_record(dest_dir, name)
    if record is _FOREIGN:
        return "skip", f"{_record_path(dest_dir, name)} was not written by you"
    if trust == "missing":
        return "free", ""
    if trust == "foreign":
        return "skip", f"{path} is not a copy of yours ({why})"
    canon = _canonical(source)
    if record is not None and record != canon:
        return "skip", f"{path} holds a copy of another source with the same name ({record})"
    if source.is_staged_at(path):
        return ("reuse", "") if trust == "private" else ("verify", why)
    return "replace", ""


def _verify_existing(source: _Source, path: str, why: str, quiet: bool) -> bool:
    """Reads the whole copy at ``path`` and checks it against the source (the copy is ours,
    but another user could have changed it)."""
    if not quiet:
        print(f"packds: {path}: {why}: checking every byte against the source before using it", file=sys.stderr, flush=True)
    try:
        if source.kind == "file":
            _core.verify_copy(source.path, path, file=True)
        else:
            _core.verify_copy(source.path if source.kind == "dataset" else None, path)
    except (PackdsError, OSError) as e:
        _warn(f"{path} does not match the source ({e}); staging it again")
        return False
    return True


def _set_aside(final: str, source: _Source, dest_dir: str, name: str) -> str | None:
    """An earlier copy of a dataset at ``final`` that is provably ours is moved aside (a
    leftover name: ``.NAME.staging-PID-previous``), so that the new copy can take its unchanged
    files (after `pack --append`: every old shard) instead of copying them again; anything else
    there is removed as before (refusing what packds did not write). Returns the moved copy."""
    if source.kind == "dataset" and os.path.isdir(final) and not os.path.islink(final) and _core.staged_copy_trust(final)[0] == "private":
        aside = os.path.join(dest_dir, f".{name}.staging-{os.getpid()}-previous")
        _remove_quietly(aside)
        os.rename(final, aside)
        return aside
    _remove_stale(final, source)
    return None


def _remove_stale(path: str, source: _Source) -> None:
    """Removes an earlier copy at ``path`` that is not current, refusing anything packds did
    not write."""
    if not os.path.lexists(path):
        return
    if source.kind == "file":
        if os.path.isdir(path):
            raise _exists_error(path)
        os.unlink(path)
        return
    _core.remove_stale_copy(path)


def _exists_error(path: str) -> UsageError:
    e = UsageError(f"{path} already exists and is not a staged copy packds can replace")
    e.hint = "remove it, or stage into another directory with --to DIR"
    return e


class _Reporter:
    """Progress on stderr: tqdm on a terminal, else a line every few seconds."""

    def __init__(self, what: str, quiet: bool, every: float = 5.0) -> None:
        self.what, self.quiet, self.every = what, quiet, every
        self.bar = None
        self.t0 = self.last = time.monotonic()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, dynamic_ncols=True, desc=what)

    def update(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            pct = 100.0 * done / total if total else 100.0
            rate = done / max(now - self.t0, 1e-9) / 1e6
            print(f"packds: {self.what}: {_human(done)} / {_human(total)} ({pct:.0f}%), {rate:,.0f} MB/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_with_progress(fn, prog, reporter: _Reporter):
    """Runs ``fn()`` (a Rust call that releases the GIL) on a thread; this thread reports
    progress and turns Ctrl-C / SIGTERM (as KeyboardInterrupt) into a clean cancel."""
    out: dict = {}
    # Completion is signalled by an Event, not by Thread.join(): on CPython 3.11 a join that a
    # signal handler interrupts (SIGTERM -> KeyboardInterrupt) can mark the thread as stopped
    # while it still runs (bpo-45274), so a second join returned at once and the caller removed
    # the partial copy while the copier was still writing into it (a leftover directory).
    done = threading.Event()

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            out["error"] = e
        finally:
            done.set()

    t = threading.Thread(target=target, name="packds-stage", daemon=True)
    t.start()
    try:
        while not done.wait(0.2):
            reporter.update(prog.bytes_done, prog.bytes_total)
        reporter.update(prog.bytes_done, prog.bytes_total)
    except KeyboardInterrupt:
        prog.cancel()
        while not done.wait(0.2):  # the copier stops at its next buffer and cleans up
            pass
        raise
    finally:
        reporter.close()
    if "error" in out:
        raise out["error"]
    return out["value"]


def preload(path, *, jobs: int = 4, quiet: bool = True) -> int:
    """Pulls every shard (and the index) of the dataset ``path`` — or the one file ``path`` —
    into the page cache with large sequential reads, in Rust with the GIL released; what is
    resident already is not read again. Returns the number of bytes now in the page cache."""
    return _preload(path, jobs, quiet)[0]


def _preload(path, jobs: int, quiet: bool) -> tuple[int, int]:
    """(bytes now in the page cache, bytes that had to be read for it)."""
    path = os.path.abspath(os.fsdecode(path))
    files = [path] if os.path.isfile(path) else [p for p, _ in _core.dataset_files(path)[0]]
    prog = _core.StageProgress()
    n = _run_with_progress(lambda: _core.preload(files, jobs=jobs, progress=prog), prog, _Reporter("preloading", quiet))
    return n, prog.bytes_read


def stage_record(
    src,
    to=None,
    *,
    policy: str = "auto",
    memory_limit: int | None = None,
    reserve: int | None = None,
    jobs: int = 4,
    quiet: bool = True,
    lock_timeout: float = LOCK_TIMEOUT,
) -> dict:
    """Stages ``src`` and returns the record ``{policy, path, bytes, seconds, mb_per_s, copied,
    reason, ...}``. See :func:`stage`."""
    t0 = time.monotonic()
    source = _Source(os.fsdecode(src))
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if policy == "inplace":
        rec = _plan(source, to, policy, memory_limit, reserve)
        rec.update(copied=False, seconds=time.monotonic() - t0, mb_per_s=0.0)
        return rec
    dest_dir = _destination(to)
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, source.name)
    if os.path.exists(final) and os.path.samefile(final, source.path):
        e = UsageError(f"cannot stage {source.path} onto itself")
        e.hint = "give --to a different, node-local directory"
        raise e
    open_why = _core.path_open_to_others(dest_dir)
    if open_why:
        # Staged anyway (the copy is checked as it is written), but another user could swap it,
        # or a directory above it, for a copy of their own after the check.
        _warn(f"{open_why}: another user could replace the staged copy after it is checked; "
              "stage into a directory only you can write (e.g. $SLURM_TMPDIR or a 700 directory of yours)")
    lock, name, state, why = _lock_a_name(source, dest_dir, quiet, lock_timeout)
    final = os.path.join(dest_dir, name)
    try:
        _clean_leftovers(dest_dir, name)
        copied = False
        copy_seconds = 0.0
        if state == "verify" and not _verify_existing(source, final, why, quiet):
            state = "replace"
        if state in ("reuse", "verify"):
            if _read_record(dest_dir, name) is None:
                _write_record(dest_dir, name, _canonical(source))
            rec = _plan_for_existing(source, to, policy, memory_limit, reserve)
            if state == "verify":
                rec["reason"] = "already staged; every byte checked against the source (the directory is shared)"
        else:
            rec = _plan(source, to, policy, memory_limit, reserve, name)
            if rec["policy"] == "inplace":
                _warn(f"not staging {source.path}: {rec['reason']}")
                rec.update(copied=False, seconds=time.monotonic() - t0, mb_per_s=0.0)
                return rec
            previous = _set_aside(final, source, dest_dir, name)
            # The source is recorded first: a copy under this name is then never taken for
            # another source's (and the record goes again if the copy fails).
            _write_record(dest_dir, name, _canonical(source))
            tmp = os.path.join(dest_dir, f".{name}.staging-{os.getpid()}")
            tc = time.monotonic()
            try:
                reused, read = _copy(source, final, tmp, jobs, quiet, previous)
            except NoSpaceError:
                _remove_quietly(tmp)
                _remove_quietly(_record_path(dest_dir, name))
                e = NoSpaceError(f"no space left on {dest_dir} while staging {source.path} (the partial copy was removed)")
                e.hint = "free space there, stage elsewhere with --to DIR, or use --policy inplace"
                raise e from None
            except BaseException:
                _remove_quietly(tmp)
                _remove_quietly(_record_path(dest_dir, name))
                raise
            finally:
                if previous is not None:
                    _remove_quietly(previous)
            copy_seconds = time.monotonic() - tc
            copied = True
            rec["reused_files"] = reused
            rec["read_bytes"] = read
        if rec["policy"] == "memory":
            # A copy just written is in the page cache already: only what was evicted is read.
            rec["preload_read_bytes"] = _preload(final, jobs, quiet)[1]
    finally:
        lock.release()
    secs = time.monotonic() - t0
    rec.update(path=final, copied=copied, seconds=secs, copy_seconds=copy_seconds, mb_per_s=(source.size / copy_seconds / 1e6) if copied and copy_seconds > 0 else 0.0)
    if copied and not quiet:
        print(
            f"packds: staged {source.path} -> {final} ({rec['policy']}): {_human(source.size)} in {copy_seconds:.2f} s "
            f"({rec['mb_per_s']:,.0f} MB/s), checksums verified",
            file=sys.stderr,
        )
    elif not quiet:
        print(f"packds: {final} is already staged and intact ({rec['policy']})", file=sys.stderr)
    return rec


def _lock_a_name(source: _Source, dest_dir: str, quiet: bool, lock_timeout: float):
    """Takes the lock of the first name in the destination that ``source`` may use (see the
    module docstring): (lock, name, state, why). Says on stderr when it is not the plain name."""
    skipped = []
    for name in _candidates(source):
        lock = _Lock(os.path.join(dest_dir, f".{name}.lock"), quiet, lock_timeout)
        state, why = _assess(source, dest_dir, name)
        if state != "skip":
            if skipped:
                _warn(f"{skipped[0]}: leaving it alone and staging to {os.path.join(dest_dir, name)} instead")
            return lock, name, state, why
        lock.release()
        skipped.append(why)
    e = UsageError(f"cannot stage {source.path} into {dest_dir}: {'; '.join(skipped)}")
    e.hint = "stage into a directory only you can write (e.g. $SLURM_TMPDIR, or --to a private directory), or remove those copies"
    raise e


def _plan_for_existing(source: _Source, to, policy: str, memory_limit, reserve) -> dict:
    """The record for an intact earlier copy: no space is needed, only memory vs local."""
    if memory_limit is None:
        memory_limit, _ = memory_limit_default()
    rec = {"source": source.path, "kind": source.kind, "bytes": source.size, "requested_policy": policy, "dest": _destination(to), "memory_limit": memory_limit}
    if policy == "auto":
        policy = "memory" if source.size <= memory_limit else "local"
    rec.update(policy=policy, reason="already staged and intact (sizes and manifest checksums match the source)")
    return rec


def _remove_quietly(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        try:
            os.unlink(p)
        except OSError:
            pass


def _in_job_tmpdir(path: str) -> bool:
    """Is `path` inside this job's $SLURM_TMPDIR (which does not outlive the node's uptime)?"""
    jt = os.environ.get("SLURM_TMPDIR")
    if not jt:
        return False
    jt, p = os.path.realpath(jt), os.path.realpath(path)
    return p == jt or p.startswith(jt.rstrip("/") + "/")


def _copy(source: _Source, final: str, tmp: str, jobs: int, quiet: bool, previous: str | None = None) -> tuple[int, int | None]:
    """Copies ``source`` to ``final`` through ``tmp``; returns how many files were taken from
    ``previous`` (an earlier copy) instead of copied, and how many bytes the copy read from
    the source (None for a tree packed on the fly)."""
    # fsync only where the copy may outlive a crash: $SLURM_TMPDIR is removed with the job, and
    # an interrupted copy is never renamed into place, so there the page cache is enough.
    durable = not _in_job_tmpdir(os.path.dirname(final))
    prog = _core.StageProgress()
    rep = _Reporter(f"staging {os.path.basename(source.path)}", quiet)
    if source.kind == "dataset":
        _run_with_progress(lambda: _core.stage_dataset(source.path, final, tmp, jobs=jobs, durable=durable, progress=prog, previous=previous), prog, rep)
        return prog.reused, prog.bytes_read
    elif source.kind == "file":
        _run_with_progress(lambda: _core.stage_file(source.path, final, tmp, durable=durable, progress=prog), prog, rep)
        return 0, prog.bytes_read
    else:
        # A directory of loose files: packed on the fly into the temporary directory (the node
        # never holds the small files), then renamed into place like a copied dataset.
        from . import pack

        rep.close()
        opts = json.dumps(source._options(), sort_keys=True)
        pack([source.path], tmp, options_json=opts)
        # No other user may write into a staged copy, whatever the umask (see _assess).
        os.chmod(tmp, 0o755)
        for n in os.listdir(tmp):
            p = os.path.join(tmp, n)
            os.chmod(p, os.lstat(p).st_mode & 0o7755, follow_symlinks=False)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fd = os.open(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return 0, None


def stage(
    src,
    to=None,
    *,
    policy: str = "auto",
    memory_limit: int | None = None,
    reserve: int | None = None,
    jobs: int = 4,
    quiet: bool = True,
    lock_timeout: float = LOCK_TIMEOUT,
) -> str:
    """Copies ``src`` to node-local storage once per node and returns the path to use.

    ``src``: a packds dataset directory, a directory of loose files (packed on the fly) or one
    file (``.tar``, ``.h5``, ...). ``to``: the destination directory (default
    ``$SLURM_TMPDIR``); the copy is ``to/<basename of src>``. ``policy``: ``auto`` (default:
    ``memory`` when the dataset is within ``memory_limit`` and fits, else ``local`` when it
    fits, else ``inplace`` with a warning), ``local``, ``memory`` (local, then pulled into the
    page cache) or ``inplace`` (``src`` unchanged). Concurrent calls for the same dataset and
    destination copy once; the others wait (at most ``lock_timeout`` seconds, default an hour)
    and return the same path. In a directory other users can write, only a copy that is provably
    ours is reused (re-verified byte for byte where others could have changed it); a name taken
    by another user or by another source with the same basename makes the copy
    ``to/NAME-<8 hex digits>.EXT`` (8 hex digits of the hash of the source path), said on stderr: use
    the returned path. Raises
    :class:`NoSpaceError`, :class:`ChecksumError` (a damaged source; nothing is left behind),
    :class:`UsageError`.
    """
    return stage_record(src, to, policy=policy, memory_limit=memory_limit, reserve=reserve, jobs=jobs, quiet=quiet, lock_timeout=lock_timeout)["path"]
