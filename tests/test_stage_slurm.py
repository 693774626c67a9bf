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


def test_four_tasks_of_one_job_stage_once_into_slurm_tmpdir():
    env = _cluster_env()
    work = tempfile.mkdtemp(prefix="packds-slurm-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        tree = os.path.join(work, "tree")
        for i in range(400):
            p = os.path.join(tree, f"c{i % 4}", f"{i:04d}.bin")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(os.urandom(20_000 + i))
        src = os.path.join(work, "data.pds")
        packds.pack(tree, src, shard_size=1 << 20)
        ds = packds.open(src)
        h = hashlib.sha256()
        for i in range(len(ds)):
            h.update(ds.key(i).encode() + b"\0" + ds[i])
        want = h.hexdigest()

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
        assert all(t["samples"] == len(ds) and t["verify"] == [] for t in tasks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
