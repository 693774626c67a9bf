"""packds.Writer and packds.build: datasets written from Python, sample by sample or by a
function over inputs in worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest

import _helpers as h
import packds
from packds import UsageError


def _samples(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    import random

    r = random.Random(seed)
    return [(f"d{i % 5}/s{i:05}.bin", r.randbytes(r.randrange(0, 3000)) * (1 + i % 3)) for i in range(n)]


def _write(path, samples, **options) -> dict:
    with packds.Writer(path, **options) as w:
        for k, v in samples:
            w.add(k, v)
    return w.close()


@pytest.mark.parametrize("fmt", ["tar", "h5"])
@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_writer_round_trip_verifies_and_plain_readers_agree(work, fmt, compress):
    samples = sorted(_samples(300))
    out = os.path.join(work, "w.pds")
    s = _write(out, samples, shard_size="64K", format=fmt, compress=compress)
    assert s["samples"] == 300 and s["shards"] > 3 and s["ordered"]
    with packds.open(out) as ds:
        assert len(ds) == 300
        for k, v in samples:
            assert ds[k] == v
        assert ds.verify(deep=True)["problems"] == []
    assert h.cli("verify", out, "--deep").returncode == 0
    if fmt == "tar":
        got = {}
        for shard in sorted(f for f in os.listdir(out) if f.endswith(".tar")):
            with tarfile.open(os.path.join(out, shard)) as t:
                for m in t.getmembers():
                    got[m.name] = t.extractfile(m).read()
        if compress == "none":
            assert got == dict(samples)
        else:
            assert {k.removesuffix(".zst") for k in got} == {k for k, _ in samples}
    else:
        import h5py

        got = {}
        for shard in sorted(f for f in os.listdir(out) if f.endswith(".h5")):
            with h5py.File(os.path.join(out, shard), "r") as f:
                data = f["data"][:].tobytes()
                for k, o, n, c in zip(f["key"][:], f["offset"][:], f["size"][:], f["codec"][:]):
                    got[k.decode()] = (data[o : o + n], int(c))
        assert set(got) == {k for k, _ in samples}
        if compress == "none":
            assert {k: v for k, (v, _) in got.items()} == dict(samples)


def test_sorted_adds_make_the_dataset_pack_makes(work):
    """Keys added in increasing order (and mtime of the files): byte-identical to a pack."""
    samples = sorted(_samples(200))
    src = os.path.join(work, "src")
    for k, v in samples:
        h.write(src, k, v, mode=0o644, mtime=0)
    packed = os.path.join(work, "p.pds")
    packds.pack(src, packed, shard_size=64 << 10)
    written = os.path.join(work, "w.pds")
    _write(written, samples, shard_size=64 << 10)
    for f in sorted(os.listdir(packed)):
        if f.endswith(".tar") or f == "index.pdsi":
            assert open(os.path.join(packed, f), "rb").read() == open(os.path.join(written, f), "rb").read(), f


def test_writer_output_is_deterministic_in_any_key_order(work):
    samples = _samples(400, seed=1)
    import random

    random.Random(5).shuffle(samples)
    a, b = os.path.join(work, "a.pds"), os.path.join(work, "b.pds")
    sa = _write(a, samples, shard_size="32K", compress="zstd")
    _write(b, samples, shard_size="32K", compress="zstd")
    assert not sa["ordered"]
    assert h.dataset_files(a) == h.dataset_files(b)
    for f in h.dataset_files(a):
        if f != "manifest.json":
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    with packds.open(a) as ds:
        keys = [ds.key(i) for i in range(len(ds))]
        assert keys == sorted(k for k, _ in samples)  # the index is sorted by key
        assert all(ds[k] == v for k, v in samples)
        assert ds.verify()["problems"] == []
    # Staging copies it like any dataset.
    staged = packds.stage(a, to=os.path.join(work, "node"))
    with packds.open(staged) as ds:
        assert ds[samples[0][0]] == samples[0][1]


def test_fields_paths_and_buffers(work):
    src = os.path.join(work, "big.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(3 << 20))
    os.chmod(src, 0o640)
    out = os.path.join(work, "w.pds")
    import pathlib

    with packds.Writer(out, shard_size="1M") as w:
        w.add("a/000", {"jpg": b"J" * 10, "cls": b"3"})
        w.add("b/ba", bytearray(b"xyz"))
        w.add("b/mv", memoryview(b"0123456789")[2:5])
        w.add("c/big.bin", pathlib.Path(src))
    with packds.open(out) as ds:
        assert ds["a/000.jpg"] == b"J" * 10 and ds["a/000.cls"] == b"3"
        assert ds["b/ba"] == b"xyz" and ds["b/mv"] == b"234"
        assert ds["c/big.bin"] == open(src, "rb").read()
    from packds.wds import GroupedDataset

    g = GroupedDataset(out)
    assert g[0] == {"__key__": "a/000", "jpg": b"J" * 10, "cls": b"3"}


def test_bad_keys_and_data_are_clear_errors_and_leave_nothing(work):
    out = os.path.join(work, "w.pds")
    with pytest.raises(packds.DuplicateKeyError, match='duplicate sample key "k"') as e:
        with packds.Writer(out) as w:
            w.add("k", b"1")
            w.add("k", b"2")
    assert isinstance(e.value, KeyError) and isinstance(e.value, UsageError) and e.value.key == "k" and e.value.hint
    assert not os.path.exists(out)
    for key in ("/abs", "../up", "a/../b", ""):
        with pytest.raises(UsageError, match="not a relative path"):
            with packds.Writer(out) as w:
                w.add(key, b"1")
        assert not os.path.exists(out)
    with pytest.raises(TypeError, match="encode text first"):
        with packds.Writer(out) as w:
            w.add("k", "text")
    with pytest.raises(UsageError, match="no samples"):
        with packds.Writer(out):
            pass
    assert not os.path.exists(out)
    _write(out, [("k", b"1")])
    with pytest.raises(UsageError, match="already exists"):
        packds.Writer(out)
    _write(out, [("k", b"2")], force=True)
    assert packds.open(out)["k"] == b"2"


def test_an_exception_inside_with_leaves_nothing_that_opens(work):
    out = os.path.join(work, "w.pds")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with packds.Writer(out, shard_size="8K") as w:
            for k, v in _samples(100):
                w.add(k, v)
            raise Boom
    assert not os.path.exists(out)
    w = packds.Writer(out)
    w.add("x", b"1")
    w.abort()
    assert w.closed and not os.path.exists(out)
    with pytest.raises(ValueError, match="closed"):
        w.add("y", b"2")


def test_a_killed_writer_leaves_nothing_that_opens(work):
    out = os.path.join(work, "w.pds")
    code = textwrap.dedent(f"""
        import os, signal, packds
        w = packds.Writer({out!r}, shard_size="8K")
        for i in range(500):
            w.add(f"s{{i:04}}", os.urandom(1000))
            if i == 300:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert os.path.isdir(out) and not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(packds.FormatError):
        packds.open(out)
    _write(out, [("k", b"1")], force=True)
    assert packds.open(out)["k"] == b"1"


# --- packds.build -------------------------------------------------------------------------


def resize(i: int):
    """A module-level fn (spawn workers import it): a sample with two fields, or nothing."""
    if i % 10 == 7:
        return None
    return f"s{i:05}", {"bin": bytes([i % 256]) * (i * 37 % 5000), "cls": str(i % 3).encode()}


def test_build_with_4_workers_equals_1_worker_and_in_process(work):
    inputs = list(range(300))
    outs = {}
    for name, workers in (("w0", 0), ("w1", 1), ("w4", 4)):
        outs[name] = os.path.join(work, f"{name}.pds")
        s = packds.build(resize, inputs, outs[name], workers=workers, chunksize=7, shard_size="64K", progress=False)
        assert s["inputs"] == 300 and s["samples"] == 2 * 270
    for f in h.dataset_files(outs["w0"]):
        if f != "manifest.json":
            data = [open(os.path.join(o, f), "rb").read() for o in outs.values()]
            assert data[0] == data[1] == data[2], f
    with packds.open(outs["w4"]) as ds:
        assert ds["s00011.cls"] == b"2"
        assert ds.verify()["problems"] == []


def test_build_with_spawn_workers(work):
    out = os.path.join(work, "s.pds")
    s = packds.build(resize, range(40), out, workers=2, mp_context="spawn", progress=False)
    assert s["samples"] == 2 * 36


def _fails_at_13(i: int):
    if i == 13:
        raise RuntimeError("bad input 13")
    return f"k{i:03}", b"x"


def test_an_exception_in_fn_stops_the_build_and_leaves_nothing_that_opens(work):
    out = os.path.join(work, "f.pds")
    with pytest.raises(RuntimeError, match="bad input 13"):
        packds.build(_fails_at_13, range(100), out, workers=2, progress=False)
    with pytest.raises(packds.FormatError):
        packds.open(out)  # kept for a resume, but it does not open
    with pytest.raises(RuntimeError, match="bad input 13"):
        packds.build(_fails_at_13, range(100), out, workers=2, progress=False, resume=False, force=True)
    assert not os.path.exists(out) or os.listdir(out) == []  # resume=False: nothing kept (the directory existed)


def test_build_prints_progress_lines_into_a_log(work):
    out = os.path.join(work, "l.pds")
    log = os.path.join(work, "build.log")
    code = f"import packds, time\ndef fn(i):\n    time.sleep(0.01)\n    return f'k{{i:04}}', b'x' * i\npackds.build(fn, range(150), {out!r}, workers=0, progress_interval=0.3)\n"
    with open(log, "wb") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True)
    lines = [ln for ln in open(log).read().splitlines() if ln.startswith("packds: build:")]
    assert len(lines) >= 3 and "/ 150 inputs" in lines[-1], lines


def test_readme_writer_snippet_runs_as_written(work, monkeypatch):
    """The README's Writer and build example, with its placeholders defined and a smaller range;
    run in a module of its own so that fork workers find `make`."""
    import re
    import types

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    code = re.search(r"<!-- snippet: writer -->\n```python\n(.*?)```", readme, re.S).group(1)
    big = os.path.join(work, "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20))
    code = code.replace("/scratch/big.bin", big).replace("range(1_000_000)", "range(50)")
    mod = types.ModuleType("readme_writer_snippet")
    mod.__dict__.update(pathlib=__import__("pathlib"), jpeg_bytes=b"\xff\xd8JPEG", render=lambda i: bytes([i]) * i, label=lambda i: b"%d" % (i % 3))
    monkeypatch.chdir(work)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(compile(code, "README.md", "exec"), mod.__dict__)  # noqa: S102 - the README's code
    with packds.open(os.path.join(work, "train.pds")) as ds:
        assert ds["cats/0002.cls"] == b"3" and ds["cats/0001.jpg"] == b"\xff\xd8JPEG" and ds["raw/big.bin"] == open(big, "rb").read()
    with packds.open(os.path.join(work, "generated.pds")) as ds:
        assert len(ds) == 100 and ds["s0000049.cls"] == b"1"


def _slow_on(i: int):
    """A sample per input; input 150 raises when STOP_AT is set (an interrupted build)."""
    if os.environ.get("STOP_AT") == str(i):
        raise RuntimeError("stopped")
    return f"s{i:04}", {"a": bytes([i % 256]) * 900, "b": str(i).encode()}


@pytest.mark.parametrize("workers", [0, 2])
def test_an_interrupted_build_resumes_to_the_dataset_an_uninterrupted_one_makes(work, monkeypatch, workers):
    whole = os.path.join(work, "whole.pds")
    packds.build(_slow_on, range(300), whole, workers=workers, shard_size="16K", progress=False)
    out = os.path.join(work, "resumed.pds")
    monkeypatch.setenv("STOP_AT", "150")
    with pytest.raises(RuntimeError, match="stopped"):
        packds.build(_slow_on, range(300), out, workers=workers, shard_size="16K", progress=False)
    monkeypatch.delenv("STOP_AT")
    with pytest.raises(packds.FormatError):
        packds.open(out)
    calls = []
    s = packds.build(lambda i: (calls.append(i), _slow_on(i))[1], range(300), out, workers=0, shard_size="16K", progress=False)
    assert s["resumed_samples"] > 100 and min(calls) > 50, (s, min(calls))
    for f in h.dataset_files(whole):
        if f != "manifest.json":
            assert open(os.path.join(whole, f), "rb").read() == open(os.path.join(out, f), "rb").read(), f


def test_a_killed_build_resumes(work):
    out = os.path.join(work, "k.pds")
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import packds
        def fn(i):
            if i == 200:
                os.kill(os.getpid(), signal.SIGKILL)
            return f"k{{i:04}}", bytes([i % 256]) * 700
        packds.build(fn, range(400), {out!r}, workers=0, shard_size="16K", progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    s = packds.build(_k, range(400), out, workers=0, shard_size="16K", progress=False)
    assert s["resumed_samples"] > 0 and s["inputs"] < 400
    with packds.open(out) as ds:
        assert len(ds) == 400 and ds["k0399"] == bytes([399 % 256]) * 700
        assert ds.verify()["problems"] == []


def _k(i):
    return f"k{i:04}", bytes([i % 256]) * 700


def _dies_at_5(i: int):
    if i == 5:
        os._exit(3)  # a worker killed (out of memory, say)
    return f"d{i:03}", b"x"


def test_a_worker_that_dies_fails_the_build_instead_of_hanging_it(work):
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        packds.build(_dies_at_5, range(50), os.path.join(work, "d.pds"), workers=2, progress=False)
