"""The ``packds`` command line. Data goes to stdout, everything else to stderr.

Exit codes: 0 success, 1 an error (one line ``packds: error: ...`` and a ``hint:``), 2 usage,
130 interrupted by Ctrl-C, 143 by SIGTERM (scancel, a time limit): the work is cancelled cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from . import __version__
from ._fmt import human
from .errors import PackdsError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1G``, ``512MiB``, ``4096`` → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1G, 512M, 65536)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _Log:
    """Progress of a long command as plain log lines (stderr is a file, e.g. a Slurm job's
    output): one line at once, then one every ``every`` seconds, with the command, the phase,
    the items and bytes done of their totals, the rates and an ETA. No carriage returns:
    readable with ``less`` and ``grep``. Called as the core's progress callback
    ``(phase, done, total, bytes_done, bytes_total)``; ``phases`` names each phase."""

    takes_bytes_total = True  # the five-argument progress form: no signature to inspect

    def __init__(self, command: str, phases: tuple[str, ...], unit: str = "files", every: float = 10.0) -> None:
        self.command, self.phases, self.unit = command, phases, unit
        self.every, self.t0, self.last = every, time.monotonic(), None
        self.phase_t0: tuple[int, float] = (-1, self.t0)
        self.state: tuple[int, ...] = (0, 0, 0, 0, 0)

    def __call__(self, phase: int, done: int, total: int, nbytes: int, bytes_total: int = 0) -> None:
        self.state = (phase, done, total, nbytes, bytes_total)
        now = time.monotonic()
        if self.phase_t0[0] != phase:
            # Rates count from the start of the phase (the first one seen: of the command).
            self.phase_t0 = (phase, now if self.phase_t0[0] >= 0 else self.t0)
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        phase, done, total, nbytes, bytes_total = self.state
        what = self.phases[min(phase, len(self.phases) - 1)]
        secs = max(now - self.phase_t0[1], 1e-9)
        head = f"packds: {self.command}: {what}"
        if not total and not nbytes:
            return f"{head} ({now - self.t0:.0f} s)"
        parts = []
        if total:
            parts.append(f"{done:,} / {total:,} {self.unit} ({100.0 * done / total:.1f}%)")
        parts.append(human(nbytes) + (f" of {human(bytes_total)}" if bytes_total else ""))
        if secs < 0.5:  # too early in the phase for rates that mean anything
            return f"{head} " + ", ".join(parts)
        if total:
            parts.append(f"{done / secs:,.0f} {self.unit}/s")
        parts.append(f"{nbytes / secs / 1e6:,.1f} MB/s")
        # The ETA from bytes where their total is known (sizes vary more than counts), else items.
        frac = nbytes / bytes_total if bytes_total else (done / total if total else 0.0)
        if 0 < frac < 1:
            left = secs * (1 - frac) / frac
            parts.append(f"ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
        return f"{head} " + ", ".join(parts)

    def done_of_total(self) -> str:
        """``37 of 120 files`` (what an interrupt reports), or "" before any total is known."""
        _, done, total, _, _ = self.state
        return f"{done:,} of {total:,} {self.unit}" if total else ""


def _progress(a: argparse.Namespace, log: _Log):
    """The progress callback for a command and a function that ends it: tqdm on a terminal,
    log lines (``log``) when stderr is a file, nothing with --quiet. Either way ``log.state``
    keeps the latest counters (an interrupt message reports them)."""
    if getattr(a, "quiet", False):
        def quiet(*st) -> None:
            log.state = st
        quiet.takes_bytes_total = True  # type: ignore[attr-defined]
        return quiet, lambda: None
    if not sys.stderr.isatty():
        return log, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit=log.unit.rstrip("s") or "item", unit_scale=True, file=sys.stderr, dynamic_ncols=True, desc=log.phases[0])

    def update(phase: int, done: int, total: int, nbytes: int, bytes_total: int = 0) -> None:
        log.state = (phase, done, total, nbytes, bytes_total)
        desc = log.phases[min(phase, len(log.phases) - 1)]
        if bar.total != total or bar.desc != desc:
            bar.total = total
            bar.set_description(desc)
        bar.n = done
        bar.set_postfix_str(human(nbytes) + (f" / {human(bytes_total)}" if bytes_total else ""), refresh=False)
        bar.refresh()

    update.takes_bytes_total = True  # type: ignore[attr-defined]
    return update, bar.close


def _long(a: argparse.Namespace, log: _Log, call, interrupted=None):
    """Runs ``call(progress)`` with progress shown (see ``_progress``). On Ctrl-C or SIGTERM it
    prints ``packds: COMMAND interrupted after N of M ITEMS`` and what ``interrupted(log)``
    says is kept and what to run, then lets the interrupt end the command."""
    update, close = _progress(a, log)
    try:
        return call(update)
    except KeyboardInterrupt:
        close()
        seen = log.done_of_total()
        what = interrupted(log) if interrupted else None
        print(f"packds: {log.command} interrupted" + (f" after {seen}" if seen else "") + (f"; {what}" if what else ""), file=sys.stderr)
        _Terminated.reported = True
        raise
    finally:
        close()


def _pack_options(a: argparse.Namespace) -> dict:
    """The options `pack` and `plan` share, from their command lines."""
    options = dict(
        shard_size=a.shard_size,
        threads=a.threads,
        follow_symlinks=a.follow_symlinks,
        include=a.include,
        exclude=a.exclude,
        on_error=a.on_error,
        format=a.format,
        compress=a.compress,
    )
    if a.zstd_dict:
        options["zstd_dict"] = a.zstd_dict
    return options


def cmd_pack(a: argparse.Namespace) -> int:
    from . import pack

    options = _pack_options(a)
    if a.part is not None:
        options["part"] = a.part
    if a.plan is not None:
        options["plan"] = a.plan
    if a.append:
        options["append"] = True
        options["replace"] = a.replace
    elif a.replace:
        raise KeyErrorWithHint("--replace goes with --append", "packds pack SRC -o DATASET --append --replace")
    if a.remove_source:
        options["remove_source"] = True
    if a.dry_run:
        options["dry_run"] = True

    def kept(log: _Log) -> str | None:
        if a.append:
            return f"{a.output} is as it was; rerun the same command to finish the append (it continues)"
        if a.part is None and os.path.isdir(a.output):
            return f"the completed shards in {a.output} are kept: rerun the same command with --resume to finish"
        if a.part is not None:
            return "the part's completed shards are kept: rerun the same array task to finish it (it resumes)"
        return None

    log = _Log("pack", ("scanning the source tree", "packing", "finishing", "done"), "files", a.progress_interval)
    s = _long(a, log, lambda progress: pack(a.sources, a.output, force=a.force, resume=a.resume, progress=progress, **options), kept)
    removed = s.get("removed")
    if removed is not None and removed["dry_run"]:
        return _dry_run_report(a, s)
    if a.json:
        print(json.dumps(_json_summary(s, dataset=s["output"]), default=str))
    for path, reason in s["skipped"][:20] if not a.quiet else []:
        print(f"packds: skipped {path}: {reason}", file=sys.stderr)
    if len(s["skipped"]) > 20 and not a.quiet:
        print(f"packds: ... and {len(s['skipped']) - 20} more skipped (listed in manifest.json)", file=sys.stderr)
    if not a.quiet and a.append:
        print(f"packds: appended {s['added']:,} new file(s), {s['replaced']:,} replaced ({s['unchanged']:,} unchanged), {human(s['bytes'])} "
              f"in {s['shards']} new shard(s) in {s['seconds']:.2f} s -> {a.output} (version {s['version']}, {s['samples']:,} samples)", file=sys.stderr)
        return 0
    if not a.quiet:
        if s["already_complete"]:
            print(f"packds: {a.output} is already complete ({s['files']} files); nothing to do", file=sys.stderr)
        else:
            secs = max(s["seconds"], 1e-9)
            resumed = f", {s['resumed_shards']} resumed" if s["resumed_shards"] else ""
            print(
                f"packds: packed {s['files']} file{'s' if s['files'] != 1 else ''}, {human(s['bytes'])} into {s['shards']} shard(s){resumed} "
                f"in {secs:.2f} s ({s['files'] / secs:,.0f} files/s, {s['bytes'] / secs / 1e6:,.1f} MB/s), "
                f"{len(s['skipped'])} skipped{_tree_note(s)} -> {a.output}; {_file_count(s['files'], s['shards'])}",
                file=sys.stderr,
            )
    if removed is not None and not s["already_complete"]:
        _removed_report(removed, a.quiet)
    return 0


def _removed_report(r: dict, quiet: bool) -> None:
    """The --remove-source lines of a pack: what was removed, and every file left (always shown:
    the user expects them gone)."""
    for path, reason in r["left"][:20]:
        print(f"packds: left {path}: {reason}", file=sys.stderr)
    if len(r["left"]) > 20:
        print(f"packds: ... and {len(r['left']) - 20} more left in place (--json lists them all)", file=sys.stderr)
    if not quiet:
        gone = f", {r['already_gone']} already removed before the resume" if r["already_gone"] else ""
        left = f", {len(r['left'])} left in place" if r["left"] else ""
        n = r["files"]
        print(f"packds: removed {n} source file{'s' if n != 1 else ''} ({r['directories']} directories){gone}{left}", file=sys.stderr)


def _dry_run_report(a: argparse.Namespace, s: dict) -> int:
    """``pack --remove-source --dry-run``: the files that would be removed on stdout, the count on stderr."""
    paths = s["removed"]["would_remove"]
    if a.json:
        out = {"dry_run": True, "would_remove": paths, "files": len(paths),
               "skipped": [{"path": p, "reason": r} for p, r in s["skipped"]]}
        print(json.dumps(out, default=str))
    else:
        end = b"\0" if a.null else b"\n"
        w = sys.stdout.buffer
        for p in paths:
            w.write(os.fsencode(p) + end)
        w.flush()
    if not a.quiet:
        n = len(paths)
        print(f"packds: --dry-run: would remove {n} source file{'s' if n != 1 else ''} (and the directories they leave empty); "
              f"nothing packed, nothing removed, {len(s['skipped'])} skipped", file=sys.stderr)
    return 0


def _tree_note(s: dict) -> str:
    """What a pack summary line says of the tree beyond its files: the empty directories kept,
    the hard links stored once and the sparse files stored at full size (only those there are)."""
    def n(k: int, one: str, many: str) -> str:
        return f"{k:,} {one if k == 1 else many}"

    parts = []
    if s.get("empty_dirs"):
        parts.append(n(s["empty_dirs"], "empty directory", "empty directories") + " kept")
    if s.get("hard_links"):
        parts.append(n(s["hard_links"], "hard link", "hard links") + " stored once")
    if s.get("sparse_files"):
        parts.append(n(s["sparse_files"], "sparse file", "sparse files") + " stored at full size")
    return "".join(", " + p for p in parts)


def _json_summary(s: dict, dataset=None) -> dict:
    """A summary as ``--json`` prints it: skipped items are ``{path, reason}`` objects, as in
    ``manifest.json``; for a written dataset also the stored bytes, the ratio and the rates."""
    out = dict(s)
    out["skipped"] = [{"path": p, "reason": r} for p, r in s.get("skipped", [])]
    if s.get("removed") is not None:
        out["removed"] = {**s["removed"], "left": [{"path": p, "reason": r} for p, r in s["removed"]["left"]]}
    if dataset is not None:
        from . import open as pds_open

        m = pds_open(dataset).manifest
        stored = (m.get("compression") or {}).get("stored_bytes", m["total_bytes"])
        secs = max(s.get("seconds", 0.0), 1e-9)
        out.update(stored_bytes=stored, ratio=m["total_bytes"] / stored if stored else 1.0, dataset_files=len(m["shards"]) + 2,
                   files_per_s=s["files"] / secs, mb_per_s=s["bytes"] / secs / 1e6)
    return out


def _file_count(inputs: int, shards: int) -> str:
    """What a file-count quota sees: N input files become the shards + the index + the manifest."""
    return f"{inputs:,} input file{'s' if inputs != 1 else ''} -> {shards + 2:,} dataset files (file-count quotas count these)"


def cmd_plan(a: argparse.Namespace) -> int:
    from . import plan

    options = _pack_options(a)
    t = time.perf_counter()
    log = _Log("plan", ("walking the source tree", "reading file sizes"), "files", a.progress_interval)
    s = _long(a, log, lambda progress: plan(a.sources, a.output, parts=a.parts, progress=progress, **options), lambda _: "no plan was written")
    if a.parts and s["shards"] < a.parts:
        size = -(-s["bytes"] // a.parts)
        print(
            f"packds: warning: the plan has {s['shards']} shard(s) for {a.parts} parts: {a.parts - s['shards']} array task(s) would have "
            f"nothing to pack; plan again with --shard-size {human(size).replace(' ', '').replace('iB', '')} (or less) to give every task work",
            file=sys.stderr,
        )
    if a.json:
        print(json.dumps(_json_summary(s), default=str))
    if not a.quiet:
        print(
            f"packds: planned {s['files']:,} files, {human(s['bytes'])} in {s['shards']} shard(s) in {time.perf_counter() - t:.2f} s, "
            f"{len(s['skipped'])} skipped -> {a.output}; pack with --plan {a.output} --part {'I' if a.parts else 'I/N'}; "
            f"{_file_count(s['files'], s['shards'])} once merged",
            file=sys.stderr,
        )
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from . import merge

    t = time.perf_counter()
    log = _Log("merge", ("checking the parts", "moving shards", "writing the index and manifest"), "shards", a.progress_interval)
    s = _long(a, log, lambda progress: merge(a.dataset, verify=a.verify, progress=progress),
              lambda _: f"run `packds merge {a.dataset}` again to finish (a merge that was stopped is completed by the next one)")
    if a.json:
        print(json.dumps(s))
    if not a.quiet:
        what = "already merged" if s["already_merged"] else f"merged {s['parts']} part(s)"
        print(f"packds: {what}: {s['samples']:,} samples, {s['shards']} shard(s), {human(s['bytes'])} in {time.perf_counter() - t:.2f} s -> {a.dataset}", file=sys.stderr)
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    from . import index_tars

    log = _Log("index", ("starting", "reading the tars", "writing the index and manifest"), "tars", a.progress_interval)
    s = _long(a, log, lambda progress: index_tars(a.tars, a.output, group_by_basename=a.group_by_basename, force=a.force, link=a.link, progress=progress),
              lambda _: f"nothing was written to {a.output}; rerun the command")
    if a.json:
        print(json.dumps(_json_summary(s), default=str))
    if not a.quiet:
        for path, reason in s["skipped"][:20]:
            print(f"packds: skipped {path}: {reason}", file=sys.stderr)
        if len(s["skipped"]) > 20:
            print(f"packds: ... and {len(s['skipped']) - 20} more skipped (listed in manifest.json)", file=sys.stderr)
        for w in s["warnings"]:
            print(f"packds: warning: {w}", file=sys.stderr)
        reasons: dict[str, int] = {}
        for _path, reason in s["skipped"]:
            kind = reason.split(":")[0].split(" (")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        why = f" ({', '.join(f'{n} {k}' for k, n in sorted(reasons.items()))})" if reasons else ""
        groups = f" in {s['groups']:,} samples" if s["groups"] is not None else ""
        print(
            f"packds: indexed {s['samples']:,} member{'s' if s['samples'] != 1 else ''}{groups}, {human(s['bytes'])}, "
            f"from {s['tars']} tar file(s) in {s['seconds']:.2f} s, {len(s['skipped'])} skipped{why} -> {a.output}",
            file=sys.stderr,
        )
    return 0


def _composed(a: argparse.Namespace, s: dict, what: str) -> int:
    if a.json:
        print(json.dumps(s, default=str))
    if not a.quiet:
        left = f", {s['shards_left_out']} source shard(s) not needed" if s["shards_left_out"] else ""
        print(f"packds: {what} {s['samples']:,} samples, {human(s['bytes'])} in {s['shards']} shard(s){left}, no data copied"
              + (" (copies)" if a.link == "copy" else f" ({a.link}s to the source shards)") + f" -> {a.output}", file=sys.stderr)
    return 0


def cmd_concat(a: argparse.Namespace) -> int:
    from . import concat

    prefixes = a.prefix
    if a.prefix_with_name:
        prefixes = [os.path.basename(os.path.normpath(d)).removesuffix(".pds") + "/" for d in a.datasets]
    s = concat(a.datasets, a.output, prefixes=prefixes, link=a.link, force=a.force)
    return _composed(a, s, "concatenated")


def cmd_subset(a: argparse.Namespace) -> int:
    from . import subset

    keys = None
    if a.keys:
        with open(a.keys, "rb") as f:
            raw = f.read()
        keys = [k for k in raw.split(b"\0" if b"\0" in raw else b"\n") if k]
    s = subset(a.dataset, a.output, include=a.include, exclude=a.exclude, keys=keys, fraction=a.fraction, seed=a.seed,
               complement=a.complement, link=a.link, force=a.force)
    return _composed(a, s, "selected")


def cmd_compact(a: argparse.Namespace) -> int:
    from . import compact

    s = compact(a.dataset, shard_size=a.shard_size)
    if a.json:
        print(json.dumps(s, default=str))
    if not a.quiet:
        if s["rewritten"]:
            print(f"packds: compacted {a.dataset}: {s['rewritten']} shard(s) rewritten into {s['new_shards']}, {human(s['freed_bytes'])} no longer needed "
                  f"(freed when the next version retires them), version {s['version']}", file=sys.stderr)
        else:
            print(f"packds: {a.dataset} has no unreferenced bytes; nothing to do", file=sys.stderr)
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from . import _cache, _core

    d = a.dir or _cache.default_cache_dir()
    if d is None:
        raise KeyErrorWithHint("no cache directory: not inside a Slurm job ($SLURM_TMPDIR) and none given",
                               "give the directory: packds cache DIR (what StreamingDataset(cache_dir=DIR) used)")
    if not os.path.isdir(d):
        raise KeyErrorWithHint(f"{d} does not exist", "give the directory StreamingDataset(cache_dir=...) used")
    _cache._check_private(d)
    c = _core.ShardCache(d, 1 << 62)
    log = c.fetch_log()
    rec = {"dir": d, "bytes": c.usage(), "entries": len(os.listdir(os.path.join(d, "shards"))),
           "fetches": len(log), "fetched_bytes": sum(n for _, n, _ in log),
           "processes": len({p for _, _, p in log}), "shards_fetched_more_than_once": len(log) - len({h for h, _, _ in log})}
    if a.clear:
        removed, freed, kept = c.clear()
        rec.update(removed=removed, freed_bytes=freed, kept_pinned=kept)
    if a.json:
        print(json.dumps(rec))
        return 0
    print(f"cache:    {d}")
    print(f"holds:    {rec['entries']:,} shard(s), {human(rec['bytes'])}")
    print(f"fetched:  {rec['fetches']:,} time(s), {human(rec['fetched_bytes'])} from shared storage, by {rec['processes']} process(es)"
          + (f"; {rec['shards_fetched_more_than_once']} fetch(es) of shards fetched before (evicted, or the cache was too small)"
             if rec["shards_fetched_more_than_once"] else ""))
    if a.clear:
        print(f"cleared:  {removed:,} shard(s), {human(freed)} freed" + (f"; {kept} kept: in use by a running reader" if kept else ""))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from . import open as pds_open

    ds = pds_open(a.dataset)
    m = ds.manifest
    if a.save_dict:
        d = ds.zstd_dict()
        if d is None:
            raise KeyErrorWithHint(f"{a.dataset} has no zstd dictionary", "it was packed without --zstd-dict: `zstd -d` needs no -D")
        with open(a.save_dict, "wb") as f:
            f.write(d)
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"dataset:  {a.dataset}")
    print(f"format:   {m['format']} v{m['format_version']} ({m['shard_format']} shards), written by {m['tool']}")
    print(f"samples:  {m['samples']:,}")
    comp = m.get("compression")
    stored = comp["stored_bytes"] if comp else m["total_bytes"]
    ratio = m["total_bytes"] / stored if stored else 1.0
    print(f"input:    {m['total_bytes']:,} bytes ({human(m['total_bytes'])})")
    print(f"stored:   {stored:,} bytes ({human(stored)}), ratio {ratio:.2f}x" + (f" [{comp['mode']}]" if comp else " [not compressed]"))
    if comp and comp.get("zstd_dict"):
        d = comp["zstd_dict"]
        print(f"dict:     zstd dictionary, {d['size']:,} bytes, xxh3-128 {d['xxh3_128']}")
    print(f"shards:   {len(m['shards'])} ({human(sum(s['size'] for s in m['shards']))} on disk)")
    for s in m["shards"]:
        print(f"  {s['file']}  {human(s['size']):>10}  {s['samples']:>10,} samples  xxh3-128 {s['xxh3_128']}")
    print(f"files:    {_file_count(m['samples'], len(m['shards']))}")
    print(f"skipped:  {len(m['skipped'])}")
    tree = _tree_note({"empty_dirs": len(m.get("empty_dirs", [])), "hard_links": len(m.get("hard_links", [])), "sparse_files": m.get("sparse_files", 0)})
    if tree:
        print(f"tree:     {tree[2:]}")
    print(f"options:  {json.dumps(m['options'])}")
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    from . import open as pds_open

    ds = pds_open(a.dataset)
    idx = ds.glob(a.pattern) if a.pattern else range(len(ds))
    if a.json:
        rows = []
        for i in idx:
            k = ds.key_bytes(i)
            row = {"index": i, "key": os.fsdecode(k), "size": ds.size(i)}
            try:
                k.decode("utf-8")
            except UnicodeDecodeError:
                row["key"] = k.decode("utf-8", "replace")
                row["key_hex"] = k.hex()  # the exact bytes of a key that is not UTF-8
            rows.append(row)
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    out = sys.stdout.buffer  # keys are written as their raw bytes, like ls and find do
    end = b"\0" if a.null else b"\n"
    for i in idx:
        k = ds.key_bytes(i)
        out.write((f"{ds.size(i):>12} ".encode() + k if a.long else k) + end)
    out.flush()
    return 0


def cmd_get(a: argparse.Namespace) -> int:
    from . import open as pds_open

    ds = pds_open(a.dataset)
    i = ds.find_key(a.key)
    if i is None:
        raise KeyErrorWithHint(f"no sample with key {a.key!r} in {a.dataset}", "list the keys with `packds ls DATASET`")
    sys.stdout.buffer.write(ds.get_checked(i))
    sys.stdout.buffer.flush()
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from . import open as pds_open

    t = time.perf_counter()
    log = _Log("verify", ("reading the index", "checking"), "samples", a.progress_interval)
    with pds_open(a.dataset) as ds:
        r = _long(a, log, lambda progress: ds.verify(threads=a.threads, deep=a.deep, progress=progress), lambda _: f"nothing was changed: run `packds verify {a.dataset}` again")
        v2 = ds.format_version > 1
    dt = time.perf_counter() - t
    if a.json:
        print(json.dumps({"dataset": a.dataset, "ok": not r["problems"], "seconds": dt, **r}, default=str))
    for p in r["problems"]:
        print(f"packds: {p}", file=sys.stderr)
    if r["problems"]:
        print(f"packds: error: {a.dataset}: {len(r['problems'])} problem(s) found", file=sys.stderr)
        print("hint: copy or pack the dataset again from its source", file=sys.stderr)
        return 1
    if a.quiet:
        return 0
    print(
        f"packds: {a.dataset} OK: {r['samples']:,} samples, {r['shards']} shard(s), {human(r['bytes'])} checked"
        + (f", {r['decoded']:,} compressed samples decoded and checked" if a.deep and v2 else "")
        + f" in {dt:.2f} s",
        file=sys.stderr,
    )
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    from . import open as pds_open

    t = time.perf_counter()
    log = _Log("unpack", ("starting", "writing files"), "files", a.progress_interval)
    with pds_open(a.dataset) as ds:
        n = _long(a, log, lambda progress: ds.unpack(a.dest, progress=progress),
                  lambda _: f"the files written so far are in {a.dest}, each complete; to start again, unpack into an empty directory")
    if a.json:
        print(json.dumps({"dataset": a.dataset, "dest": a.dest, "files": n, "seconds": time.perf_counter() - t}))
    if not a.quiet:
        print(f"packds: unpacked {n} files into {a.dest}", file=sys.stderr)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(files=a.files, workdir=a.dir, keep=a.keep)


def cmd_stage(a: argparse.Namespace) -> int:
    from .stage import plan, stage_record

    opts = dict(policy=a.policy, memory_limit=a.memory_limit, reserve=a.reserve)
    if a.dry_run:
        rec = plan(a.source, a.to, **opts)
        if a.json:
            print(json.dumps(rec, default=str))
        else:
            for k, v in rec.items():
                shown = f"{v:,} ({human(v)})" if isinstance(v, int) and not isinstance(v, bool) and k in ("bytes", "free", "filesystem", "reserve", "available", "memory_limit", "needed") else v
                print(f"packds: {k:>16}: {shown}", file=sys.stderr)
        return 0

    rec = stage_record(a.source, a.to, jobs=a.jobs, quiet=a.quiet, lock_timeout=a.lock_timeout, **opts)
    if a.json:
        keys = ("policy", "path", "bytes", "seconds", "mb_per_s", "copied", "reason")
        print(json.dumps({**{k: rec.get(k) for k in keys}, **{k: v for k, v in rec.items() if k not in keys}}, default=str))
    else:
        print(rec["path"])
    return 0


class KeyErrorWithHint(PackdsError):
    def __init__(self, msg: str, hint: str) -> None:
        super().__init__(msg)
        self.hint = hint


class _Terminated:
    """Set by the SIGTERM handlers, which cancel through KeyboardInterrupt like Ctrl-C."""

    signalled = False
    reported = False  # the command said what was interrupted and what is kept
    interrupted = False  # main() ended by Ctrl-C or SIGTERM


def _cancel_on_sigterm() -> None:
    """SIGTERM (scancel, a time limit; Slurm sends SIGKILL 30 s later) cancels the command
    cleanly, as Ctrl-C does: the core stops within about a second and cleans up."""
    import signal
    import threading

    def on_term(signum, frame):
        _Terminated.signalled = True
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


def _composed_options(s: argparse.ArgumentParser, out: str) -> None:
    """The options `concat` and `subset` share: how the new dataset refers to the shards."""
    s.add_argument("--link", choices=["symlink", "hard", "copy"], default="symlink",
                   help=f"how {out} refers to the shards: symlink (default), hard (same filesystem), copy (checked copies)")
    s.add_argument("--force", action="store_true", help=f"replace an existing dataset at {out}")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packds", description="Pack many small files into indexed tar shards; read them back fast.")
    p.add_argument("--version", action="version", version=f"packds {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("pack", help="pack directories/files into a dataset", description="Pack SRC trees into DATASET: tar shards + index + manifest.json.")
    s.add_argument("sources", nargs="*", metavar="SRC")
    s.add_argument("-o", "--output", required=True, metavar="DATASET")
    s.add_argument("--part", metavar="I[/N]", help="pack only part I of N (0 <= I < N) into DATASET/part-I/, for a Slurm job array "
                   "(--part $SLURM_ARRAY_TASK_ID with a plan made with --parts N; or --part I/N); then `packds merge DATASET`. "
                   "A rerun task resumes")
    s.add_argument("--plan", metavar="PLAN", help="with --part: the file list and shard boundaries made once by `packds plan` "
                   "(its options are used; SRC may be left out). Without it every task walks and stats the whole tree")
    s.add_argument("--shard-size", type=parse_size, default=1 << 30, metavar="SIZE", help="target shard size (default 1G); a larger file gets a shard of its own")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="I/O threads (default: 32 on network filesystems such as Lustre/GPFS/NFS, else 4 per CPU up to 16); lower it on a busy login node")
    s.add_argument("--follow-symlinks", action="store_true", help="follow symlinks (loops are detected); default: skip them with a warning")
    s.add_argument("--include", action="append", default=[], metavar="GLOB", help="only pack keys matching GLOB (repeatable; * matches across /)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out keys (and directories) matching GLOB (repeatable)")
    s.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="unreadable or changing files: fail (default) or skip and list them")
    s.add_argument("--force", action="store_true", help="replace an existing dataset at DATASET")
    s.add_argument("--resume", action="store_true", help="finish an interrupted pack, keeping its completed shards")
    s.add_argument("--append", action="store_true",
                   help="add the files whose keys DATASET lacks as new shards (existing shards are never rewritten; readers keep "
                   "the version they opened; a crash leaves the previous version)")
    s.add_argument("--replace", action="store_true",
                   help="with --append: files whose bytes differ from the stored sample supersede it (its old bytes stay, unreferenced)")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.add_argument("--format", choices=["tar", "h5"], default="tar", help="shard format: tar (default; GNU tar and Python's tarfile read it) or h5 (HDF5; plain h5py reads it)")
    s.add_argument("--compress", default="none", metavar="MODE",
                   help="none (default); zstd or zstd:LEVEL: compress each sample on its own, keep it raw where that does not shrink it; "
                   "auto or auto:LEVEL: like zstd, but samples that are already compressed (JPEG, PNG, ...) are not even tried and "
                   "a frame must save 1/16 to be kept")
    s.add_argument("--zstd-dict", nargs="?", type=parse_size, const=112 << 10, default=0, metavar="SIZE",
                   help="train a zstd dictionary (default size 112K) on a sample of the input and store it in the dataset: "
                   "many small similar files (text, JSON, labels) compress far better with one")
    s.add_argument("--remove-source", action="store_true",
                   help="free the file-count quota as the pack goes: once a shard is fsynced, renamed into place and read back with "
                   "every member's CRC32C matching, remove its members' source files (never one whose size, mtime or ctime changed "
                   "since it was read: that one is left and reported), and at the end the directories that became empty (never "
                   "SRC itself, never anything outside SRC). An interrupted pack: rerun with --resume --remove-source. "
                   "Refused with --follow-symlinks; with --part it needs --plan")
    s.add_argument("--dry-run", action="store_true",
                   help="with --remove-source: pack nothing, print the files that would be removed on stdout (one per line) and "
                   "their count on stderr")
    s.add_argument("-0", "--null", action="store_true", help="with --dry-run: end each path with a NUL byte, not a newline (for xargs -0)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    s.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    s.set_defaults(func=cmd_pack)

    s = sub.add_parser("plan", help="walk and stat the tree once; fix the shards for `pack --plan PLAN --part I/N`",
                       description="Walk SRC once, stat every file and write PLAN: the sorted file list and the shard boundaries a "
                       "single pack would make. Each task of a job array then packs its part with `packds pack --plan PLAN --part I/N -o OUT`; "
                       "`packds merge OUT` joins them, byte-identical to a single pack.")
    s.add_argument("sources", nargs="+", metavar="SRC")
    s.add_argument("-o", "--output", required=True, metavar="PLAN")
    s.add_argument("--shard-size", type=parse_size, default=1 << 30, metavar="SIZE")
    s.add_argument("--threads", type=int, default=0, metavar="N")
    s.add_argument("--follow-symlinks", action="store_true")
    s.add_argument("--include", action="append", default=[], metavar="GLOB")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    s.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    s.add_argument("--format", choices=["tar", "h5"], default="tar")
    s.add_argument("--compress", default="none", metavar="MODE")
    s.add_argument("--zstd-dict", nargs="?", type=parse_size, const=112 << 10, default=0, metavar="SIZE")
    s.add_argument("--parts", type=int, metavar="N", help="the number of array tasks that will pack the plan: each then needs only "
                   "--part $SLURM_ARRAY_TASK_ID (a task rerun alone too); warns when there are fewer shards than parts")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("merge", help="join the parts of a partitioned pack (no data copied)",
                       description="Join DATASET/part-0 ... part-(N-1) into the dataset DATASET: shards are renamed into place, the "
                       "index is rebuilt from the parts' indexes, manifest.json is written last. Every part is checked before anything "
                       "moves (manifest against index, shard names and sizes); a missing, unfinished or damaged part is named with how "
                       "to redo it, and nothing is merged. Running it again is harmless.")
    s.add_argument("dataset")
    s.add_argument("--verify", action="store_true", help="also check every part shard's XXH3-128 before merging (reads all the data)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser(
        "index",
        help="index existing tar files (WebDataset shards) in place",
        description="Build a packds index over existing tar files without rewriting them: DATASET gets index.pdsi, "
        "manifest.json and a shard-NNNNN.tar link per tar. Every regular member is a sample keyed by its name.",
    )
    s.add_argument("tars", nargs="+", metavar="TAR")
    s.add_argument("-o", "--output", required=True, metavar="DATASET")
    s.add_argument("--group-by-basename", action="store_true",
                   help="WebDataset samples: check that members sharing a basename (dir/000123.jpg, dir/000123.cls) "
                   "are contiguous, for packds.wds.GroupedDataset")
    s.add_argument("--link", choices=["symlink", "hard"], default="symlink",
                   help="how DATASET refers to the tars: symlink (default) or hard (same filesystem; survives moving them)")
    s.add_argument("--force", action="store_true", help="replace an existing dataset at DATASET")
    s.add_argument("-q", "--quiet", action="store_true", help="no summary")
    s.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("concat", help="one dataset made of several (links to their shards, no data copied)",
                       description="Make DATASET of the datasets A B ...: it links to their shards and indexes all their samples. "
                       "A key in two datasets is refused unless --prefix makes them unique.")
    s.add_argument("datasets", nargs="+", metavar="A")
    s.add_argument("-o", "--output", required=True, metavar="DATASET")
    s.add_argument("--prefix", action="append", default=[], metavar="PREFIX",
                   help="prepend PREFIX to the keys of a dataset: once per dataset, in order ('' for none), e.g. --prefix a/ --prefix b/")
    s.add_argument("--prefix-with-name", action="store_true", help="prefix each dataset's keys with its directory name and '/'")
    _composed_options(s, "DATASET")
    s.set_defaults(func=cmd_concat)

    s = sub.add_parser("subset", help="a dataset of some of another's samples (train/val split; links, no data copied)",
                       description="Make SUB of the samples of DATASET that the options pick; SUB links to the shards that hold "
                       "them, so staging SUB copies only those. --complement with the same options picks exactly the others.")
    s.add_argument("dataset")
    s.add_argument("-o", "--output", required=True, metavar="SUB")
    s.add_argument("--include", action="append", default=[], metavar="GLOB", help="only keys matching GLOB (repeatable)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out keys matching GLOB (repeatable)")
    s.add_argument("--keys", metavar="FILE", help="only the keys listed in FILE (one per line, or NUL-separated as `packds ls -0` writes)")
    s.add_argument("--fraction", type=float, metavar="F", help="about F (0 to 1) of the samples, picked by a hash of the key and --seed")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="seed of --fraction (default 0)")
    s.add_argument("--complement", action="store_true", help="the samples the other options do not pick (the other side of a split)")
    _composed_options(s, "SUB")
    s.set_defaults(func=cmd_subset)

    s = sub.add_parser("compact", help="rewrite the shards that hold bytes --append --replace left unreferenced",
                       description="Write the live samples of the shards of DATASET that hold unreferenced bytes into new shards, "
                       "as a new version (the manifest is switched last); the other shards are kept as they are.")
    s.add_argument("dataset")
    s.add_argument("--shard-size", type=parse_size, default=1 << 30, metavar="SIZE", help="size of the new shards (default 1G)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("cache", help="what a node-local shard cache holds and fetched; --clear empties it")
    s.add_argument("dir", nargs="?", help="the cache directory (default: $SLURM_TMPDIR/packds-cache inside a job)")
    s.add_argument("--clear", action="store_true", help="remove every cached shard no running reader holds")
    s.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("info", help="describe a dataset")
    s.add_argument("dataset")
    s.add_argument("--json", action="store_true", help="print manifest.json")
    s.add_argument("--save-dict", metavar="FILE", help="write the dataset's zstd dictionary to FILE (for `zstd -d -D FILE`)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ls", help="list keys")
    s.add_argument("dataset")
    s.add_argument("pattern", nargs="?", help="glob over keys (as for --include)")
    s.add_argument("-l", "--long", action="store_true", help="show sizes")
    s.add_argument("-0", "--null", action="store_true", help="end each key with a NUL byte, not a newline (keys may contain newlines; for xargs -0)")
    s.add_argument("--json", action="store_true", help="a JSON array of {index, key, size} (key_hex too for a key that is not UTF-8)")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("get", help="write one sample's bytes to stdout")
    s.add_argument("dataset")
    s.add_argument("key")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("verify", help="check index, shard checksums and every sample")
    s.add_argument("dataset")
    s.add_argument("--deep", action="store_true", help="also decompress every compressed sample and check it against its CRC32C")
    s.add_argument("--threads", type=int, default=4, metavar="N")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary (problems are still listed)")
    s.add_argument("--json", action="store_true", help="the result as JSON on stdout: {dataset, ok, samples, shards, bytes, problems, ...}")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("unpack", help="extract every sample into a directory")
    s.add_argument("dataset")
    s.add_argument("dest")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--json", action="store_true", help="the result as JSON on stdout: {dataset, dest, files, seconds}")
    s.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a Slurm log), print a progress line at once and then every SECONDS (default 10)")
    s.set_defaults(func=cmd_unpack)

    s = sub.add_parser(
        "stage",
        help="copy a dataset to node-local storage (once per node); print the path to use",
        description="Copy SRC (a dataset, a directory of files packed on the fly, or one file) to DEST/<name> "
        "once per node, checksums verified, and print the path to use (nothing else on stdout).",
    )
    s.add_argument("source", metavar="SRC")
    s.add_argument("--to", metavar="DIR", help="destination directory (default: $SLURM_TMPDIR)")
    s.add_argument("--policy", choices=["auto", "local", "memory", "inplace"], default="auto",
                   help="auto (default): memory if within --memory-limit, else local if it fits, else inplace; "
                   "memory: local + pull into the page cache; inplace: use SRC as it is")
    s.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE",
                   help="largest dataset auto keeps in memory (default: min(10G, half the job's memory))")
    s.add_argument("--reserve", type=parse_size, default=None, metavar="SIZE",
                   help="space to leave free on the destination (default: 5%% of it, at least 1G, at most 10%%)")
    s.add_argument("--jobs", type=int, default=4, metavar="N", help="threads copying 8 MiB chunks: files, and the ranges of a large shard, in parallel (default 4; at least 2, so that one reads while another writes)")
    s.add_argument("--lock-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="longest wait for another stager of the same dataset (default 3600)")
    s.add_argument("--dry-run", action="store_true", help="print the decision and the numbers behind it; copy nothing")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary (warnings still show)")
    s.add_argument("--json", action="store_true", help="print {policy, path, bytes, seconds, mb_per_s, copied, reason} on stdout")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("demo", help="generate an ImageNet-like tree, pack it, read it back, compare with tar and loose files")
    s.add_argument("--files", type=int, default=20_000, help="number of files (default %(default)s)")
    s.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed afterwards)")
    s.add_argument("--keep", action="store_true", help="keep the generated tree and dataset")
    s.set_defaults(func=cmd_demo)
    return p


def _hint_for_command(hint: str | None, parser: argparse.ArgumentParser, cmd: str) -> str | None:
    """The hint without the alternatives that ask for an option this command does not have (the
    core's hints are written for every command: "fix the permissions, or pass --on-error skip"
    helps `pack`, not `verify`). A clause that names another command ("finish it with the same
    `packds pack ...` command plus --resume") is kept."""
    if not hint:
        return hint
    sub = next((a.choices.get(cmd) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return hint
    known = {o for a in sub._actions for o in a.option_strings}
    subcommands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # A clause about another command ("finish it with the same `packds pack ...` command").
    others = r"\b(" + "|".join(re.escape(c) for c in subcommands if c != cmd) + r")(ed|s)?\b|`packds "
    clauses = re.split(r"(, or |; )", hint)
    kept: list[str] = []
    for i in range(0, len(clauses), 2):
        other_command = re.search(others, clauses[i])
        if other_command or all(o in known for o in re.findall(r"(?<![\w-])--[a-z][a-z-]*", clauses[i])):
            kept += ([clauses[i - 1]] if kept else []) + [clauses[i]]
    return "".join(kept) or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "pack" and not args.sources and args.plan is None:
        parser.error("pack needs SRC (the directories or files to pack), or --plan PLAN with --part I/N")
    if args.cmd == "pack" and args.plan is not None and args.part is None:
        parser.error("pack --plan needs --part I/N (a plan is packed part by part; then `packds merge`)")
    _cancel_on_sigterm()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if not _Terminated.reported:
            print("packds: interrupted", file=sys.stderr)
        _Terminated.interrupted = True
        # 128 + the signal: 143 for SIGTERM (scancel, a time limit), 130 for Ctrl-C.
        return 143 if _Terminated.signalled else 130
    except BrokenPipeError:
        # The reader of our stdout went away (`packds ls ... | head`): not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PackdsError, OSError) as e:
        if args.debug:
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.strerror:
            msg = e.strerror
            if e.filename is not None and os.fsdecode(e.filename) not in msg:
                msg = f"{msg}: {os.fsdecode(e.filename)}"
        print(f"packds: error: {msg}", file=sys.stderr)
        hint = _hint_for_command(getattr(e, "hint", None), parser, args.cmd)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    raise SystemExit(main())


def run() -> int:
    """The `packds` program: ``main()``, then exit with its status. After an interrupt the work
    is already cancelled and cleaned up, so the process leaves at once with 130 or 143:
    interpreter shutdown is skipped, where a late signal or the interpreter's own record of a
    KeyboardInterrupt could otherwise turn the status into a death by SIGINT."""
    code = main()
    if _Terminated.interrupted:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code
