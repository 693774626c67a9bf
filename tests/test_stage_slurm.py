"""`packds stage` inside a real Slurm job (minislurm: a one-node cluster whose jobs get a
node-local $SLURM_TMPDIR). Four tasks of one job stage the same dataset at once: exactly one
copies, all four get the same path under the job's $SLURM_TMPDIR and read every sample right.

Needs a running cluster (`../shared/tools/minislurm.sh up`, which .ci/run does). Without one
the test is skipped, unless PACKDS_REQUIRE_SLURM=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import packds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINISLURM = os.path.join(REPO, "..", "shared", "tools", "minislurm.sh")
README_PATH = os.path.join(REPO, "README.md")


def _cluster_env() -> dict:
    """The environment for Slurm clients, or a skip/fail with the reason."""
    env = dict(os.environ)
    why = None
    if os.path.exists(MINISLURM):
        r = subprocess.run(["bash", MINISLURM, "env"], capture_output=True, text=True)
        m = re.search(r"SLURM_CONF=(\S+)", r.stdout)
        if m:
            env["SLURM_CONF"] = m.group(1).strip("'\"")
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        why = "Slurm is not installed (no sbatch/sinfo); start it with ../shared/tools/minislurm.sh up"
    else:
        try:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env, timeout=20)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess([], 1, "", "slurmctld did not answer within 20 s")
        states = r.stdout.split()
        if r.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
            why = f"no Slurm cluster is up (sinfo: {(r.stderr or r.stdout).strip() or 'no node'}); start it with ../shared/tools/minislurm.sh up"
    if why:
        if os.environ.get("PACKDS_REQUIRE_SLURM") == "1":
            pytest.fail(f"PACKDS_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]  # this process may itself run inside a job
    return env


TASK = textwrap.dedent(
    """
    import hashlib, json, os, subprocess, sys
    src, out = sys.argv[1], sys.argv[2]
    r = subprocess.run([sys.executable, "-m", "packds", "stage", src, "--json", "-q"], capture_output=True, text=True)
    res = {"rc": r.returncode, "stderr": r.stderr, "tmpdir": os.environ.get("SLURM_TMPDIR"),
           "procid": os.environ.get("SLURM_PROCID"), "job": os.environ.get("SLURM_JOB_ID")}
    if r.returncode == 0:
        rec = json.loads(r.stdout)
        res["rec"] = rec
        import packds
        ds = packds.open(rec["path"])
        h = hashlib.sha256()
        for i in range(len(ds)):
            h.update(ds.key(i).encode() + b"\\0" + ds[i])
        res["samples"], res["digest"] = len(ds), h.hexdigest()
        res["verify"] = ds.verify()["problems"]
    with open(os.path.join(out, "task-%s.json" % res["procid"]), "w") as f:
        json.dump(res, f)
    """
)


def _dataset(work: str, name: str, n: int, size: int, shard_size: int) -> tuple[str, str]:
    """Packs n random samples of about ``size`` bytes into ``work/name``; returns the dataset and
    the SHA-256 of its keys and bytes, to compare what a job read."""
    tree = os.path.join(work, "tree")
    for i in range(n):
        p = os.path.join(tree, f"c{i % 4}", f"{i:04d}.bin")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(os.urandom(size + i))
    src = os.path.join(work, name)
    packds.pack(tree, src, shard_size=shard_size)
    ds = packds.open(src)
    h = hashlib.sha256()
    for i in range(len(ds)):
        h.update(ds.key(i).encode() + b"\0" + ds[i])
    return src, h.hexdigest()


def test_four_tasks_of_one_job_stage_once_into_slurm_tmpdir():
    env = _cluster_env()
    work = tempfile.mkdtemp(prefix="packds-slurm-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        src, want = _dataset(work, "data.pds", 400, 20_000, 1 << 20)

        out = os.path.join(work, "out")
        os.mkdir(out)
        with open(os.path.join(work, "task.py"), "w") as f:
            f.write(TASK)
        script = os.path.join(work, "job.sh")
        with open(script, "w") as f:
            f.write(
                "#!/bin/bash\n"
                f"#SBATCH -n 4\n#SBATCH -O\n#SBATCH -t 5\n#SBATCH -o {work}/slurm-%j.out\n"
                f"srun -n 4 -O {sys.executable} {work}/task.py {src} {out}\n"
            )
        r = subprocess.run(["sbatch", "--parsable", "--chdir", work, script], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        waiter = ["bash", MINISLURM, "wait", job] if os.path.exists(MINISLURM) else ["sbatch", "--wait", "--wrap", "true", f"--dependency=afterany:{job}"]
        w = subprocess.run(waiter, capture_output=True, text=True, env=env, timeout=300)
        log = "".join(open(os.path.join(work, n)).read() for n in os.listdir(work) if n.startswith("slurm-"))
        assert w.returncode == 0, f"job {job} failed: {w.stdout} {w.stderr}\n{log}"

        tasks = [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out))]
        assert len(tasks) == 4, (os.listdir(out), log)
        assert [t["rc"] for t in tasks] == [0] * 4, [t["stderr"] for t in tasks]
        assert {t["job"] for t in tasks} == {job}
        tmpdirs = {t["tmpdir"] for t in tasks}
        assert len(tmpdirs) == 1 and None not in tmpdirs, tmpdirs
        tmpdir = tmpdirs.pop()
        assert job in tmpdir  # the job's own node-local directory
        assert {t["rec"]["path"] for t in tasks} == {os.path.join(tmpdir, "data.pds")}
        assert sum(t["rec"]["copied"] for t in tasks) == 1  # one copy; three waited and reused it
        assert {t["digest"] for t in tasks} == {want}
        assert all(t["samples"] == len(packds.open(src)) and t["verify"] == [] for t in tasks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


TRAIN = textwrap.dedent(
    """
    import argparse, hashlib, json, os, sys
    import packds
    p = argparse.ArgumentParser()
    p.add_argument("--data")
    a = p.parse_args()
    ds = packds.open(a.data)
    h = hashlib.sha256()
    for i in range(len(ds)):
        h.update(ds.key(i).encode() + b"\\0" + ds[i])
    rec = {"path": a.data, "digest": h.hexdigest(), "tmpdir": os.environ.get("SLURM_TMPDIR"), "proc": os.environ.get("SLURM_PROCID")}
    with open(os.path.join(os.environ["OUT"], f"task-{rec['proc']}.json"), "w") as f:
        json.dump(rec, f)
    """
)


def test_multinode_stage_recipe_from_the_readme_runs_as_written():
    """The README's several-nodes recipe (one stager per node, then every task trains on the path
    its node's stage printed), run as written on the one-node cluster: the resource line is
    adapted to one node, `python train.py` is a script that reads every sample."""
    env = _cluster_env()
    work = tempfile.mkdtemp(prefix="packds-slurm-multi-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        os.chmod(work, 0o755)
        src, want = _dataset(work, "imagenet.pds", 200, 5_000, 256 << 10)
        with open(os.path.join(work, "train.py"), "w") as f:
            f.write(TRAIN)
        text = open(README_PATH, encoding="utf-8").read()
        block = re.search(r"<!-- snippet: multinode-stage -->\n```bash\n(.*?)```", text, re.S).group(1)
        assert block.startswith("#!/bin/bash\n")
        block = block.replace("/project/def-me/imagenet.pds", src).replace("python train.py", f"{sys.executable} {work}/train.py")
        block = re.sub(r"#SBATCH --nodes=\d+ --ntasks-per-node=\d+ --time=\S+", f"#SBATCH --nodes=1 -n 4 -O --time=5\n#SBATCH -o {work}/slurm-%j.out", block)
        out = os.path.join(work, "out")
        os.mkdir(out)
        with open(os.path.join(work, "job.sh"), "w") as f:
            f.write(block)
        bindir = os.path.dirname(sys.executable)
        jenv = {**env, "PATH": f"{bindir}:{env['PATH']}", "OUT": out}
        r = subprocess.run(["sbatch", "--parsable", "--chdir", work, os.path.join(work, "job.sh")], capture_output=True, text=True, env=jenv, timeout=60)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        w = subprocess.run(["bash", MINISLURM, "wait", job], capture_output=True, text=True, env=env, timeout=300)
        log = open(os.path.join(work, f"slurm-{job}.out")).read()
        assert w.returncode == 0, f"{w.stdout}{w.stderr}\n{log}"
        assert "can't honor" not in log and "Traceback" not in log, log
        recs = [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out))]
        assert len(recs) == 4, (recs, log)
        for rec in recs:
            assert rec["digest"] == want
            assert rec["path"] == os.path.join(rec["tmpdir"], "imagenet.pds"), rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
