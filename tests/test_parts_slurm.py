"""A partitioned pack on a real Slurm cluster (minislurm): `packds plan --parts 4` on the "login
node", an array of 4 tasks packs the parts (`--part $SLURM_ARRAY_TASK_ID`), a job with
`--dependency=afterany` merges them. One task fails: the merge job refuses and names it; the
README's rerun lines (that task alone, then the merge again) finish the dataset, which equals a
single-process pack byte for byte. These are the README's sbatch examples, run as written (with
paths filled in).

Needs a running cluster (`../shared/tools/minislurm.sh up`, which .ci/run does); skipped
without one unless PACKDS_REQUIRE_SLURM=1, where that is a failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from test_stage_slurm import MINISLURM, README_PATH, _cluster_env  # noqa: F401

import _helpers as h
import packds


def _readme_block(name: str) -> str:
    text = open(README_PATH, encoding="utf-8").read()
    return re.search(rf"<!-- snippet: {name} -->\n```bash\n(.*?)```", text, re.S).group(1)


def test_array_with_a_failed_task_rerun_alone_then_merge_equals_a_single_pack():
    env = _cluster_env()
    work = tempfile.mkdtemp(prefix="packds-slurm-array-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        tree = os.path.join(work, "train")
        for i in range(2000):
            h.write(tree, f"n{i % 10:02}/{i:05}.bin", os.urandom(500 + i % 3000))
        single = os.path.join(work, "single.pds")
        packds.pack(tree, single, shard_size=256 << 10)
        # The README's job scripts, with the paths, a small shard size and a one-CPU node's
        # resources filled in.
        def fill(text: str) -> str:
            for suffix in (".plan", ".pds", ""):
                text = text.replace("/project/def-me/train" + suffix, os.path.join(work, "train" + suffix) if suffix else tree)
            text = re.sub(r"#SBATCH --time=\S+ --cpus-per-task=\d+ --mem=\S+", "#SBATCH --time=5 --cpus-per-task=1 --mem=200M", text)
            return text.replace("--shard-size 1G", "--shard-size 256K").replace("$SLURM_CPUS_PER_TASK", "2")

        with open(os.path.join(work, "pack-array.sh"), "w") as f:
            f.write(fill(_readme_block("array-pack")))
        bindir = os.path.dirname(sys.executable)
        out = os.path.join(work, "train.pds")
        # Task 2 fails: a file stands where its part directory goes.
        os.makedirs(out)
        h.write(out, "part-2", b"in the way")

        def submit(block: str) -> str:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", fill(_readme_block(block)) + "\necho MERGE=$merge\n"], cwd=work,
                               capture_output=True, text=True, env={**env, "PATH": f"{bindir}:{env['PATH']}"}, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            return re.search(r"MERGE=(\d+)", r.stdout).group(1)

        def wait(job: str):
            return subprocess.run(["bash", MINISLURM, "wait", job], capture_output=True, text=True, env=env, timeout=300)

        def log(job: str) -> str:
            return open(os.path.join(work, f"merge-{job}.out")).read()

        merge_job = submit("array-submit")
        w = wait(merge_job)
        assert w.returncode != 0, "the merge job must fail while part 2 is missing"
        assert "part(s) 2 of 4" in log(merge_job) and "rerun those array tasks" in log(merge_job), log(merge_job)
        assert [n for n in os.listdir(out) if n.startswith("part-")] != []  # nothing was merged away
        os.remove(os.path.join(out, "part-2"))
        merge_job = submit("array-rerun")
        w = wait(merge_job)
        logs = "".join(open(os.path.join(work, n)).read() for n in sorted(os.listdir(work)) if n.endswith(".out"))
        assert w.returncode == 0, f"merge job {merge_job}: {w.stdout} {w.stderr}\n{logs}"
        h.assert_same_dataset_bytes(single, out)
        ds = packds.open(out)
        assert len(ds) == 2000 and ds.verify()["problems"] == []
        assert ds.manifest["options"]["merged_parts"] == 4
        assert not [n for n in os.listdir(out) if n.startswith("part-")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
