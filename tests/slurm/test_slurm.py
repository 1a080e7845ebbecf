"""The real slurm/train.sbatch on a real SLURM cluster (munge + slurmctld + two slurmd "nodes" on this
machine), in CPU mode with the tiny model: 1 node x 2 ranks, 2 nodes x 1 rank, and preemption with
self-requeue and exact resume."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_inprocess, tiny_args, train_losses, write_posts

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow  # a real cluster and real jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(HERE / "cluster.sh"), "start", str(d), "2"], capture_output=True, text=True, timeout=240)
    if p.returncode == 3:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests, but no cluster could start here: {p.stdout}")
        pytest.skip(f"no SLURM cluster on this machine: {p.stdout.strip()}")
    assert p.returncode == 0, p.stdout + p.stderr
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(HERE / "cluster.sh"), "stop", str(d)], timeout=60)


def submit(env, nodes, ranks, log, args, extra_env=None):
    cmd = ["sbatch", "--parsable", "--nodes", str(nodes), "--cpus-per-task", "2", "--chdir", str(ROOT), "-o", str(log),
           str(ROOT / "slurm" / "train.sbatch"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "GREENTEXT_CPU_RANKS": str(ranks), **(extra_env or {})}, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(env, job_id, timeout=180) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job(env, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job(env, job_id)}")


RUN = ["--seq-len", "32", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--eval-every", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_posts(tmp_path_factory.mktemp("data") / "posts.jsonl")


@pytest.mark.parametrize("nodes,ranks", [(1, 2), (2, 1)])
def test_sbatch_trains_and_leaves_a_loadable_checkpoint(cluster, data, tmp_path, nodes, ranks):
    out, log = tmp_path / "out", tmp_path / "job.out"
    # The interface NCCL is told is gloo's too (the CPU side of the process group; here, loopback, a real choice for gloo).
    job_id = submit(cluster, nodes, ranks, log, tiny_args(data, out, *RUN, "--max-steps", "4"), {"NCCL_SOCKET_IFNAME": "lo"})
    info = wait_done(cluster, job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert f"{nodes} node(s) x {ranks} rank(s)" in text and f"2 rank(s) on cpu: {nodes} node(s) x {ranks}" in text
    assert "2 CPUs a node, interfaces NCCL lo gloo lo, USR1 600 s before the limit" in text
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.from_pretrained(out / "final").config.n_layer == 2
    ref = tmp_path / "ref"
    assert run_inprocess(tiny_args(data, ref, *RUN, "--max-steps", "4")) == 0
    assert max(abs(a - b) for a, b in zip(train_losses(out), train_losses(ref))) <= 1e-5


def test_preempted_job_requeues_and_resumes_exactly(cluster, data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.out"
    steps = 60
    job_id = submit(cluster, 1, 2, log, tiny_args(data, out, *RUN, "--max-steps", str(steps)))
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.time() - t0 < 120, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.05)
    # What SLURM does before a time limit with --signal=B:USR1@N (or a preemption notice).
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster, check=True)
    # While the requeue is processed the old run can briefly look FAILED: wait for the restart first.
    t0 = time.time()
    while job(cluster, job_id).get("Restarts", "0") == "0":
        assert time.time() - t0 < 120, (job(cluster, job_id), log.read_text()[-3000:])
        time.sleep(0.2)
    info = wait_done(cluster, job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "got SIGUSR1" in text and "requeueing job" in text and "restart 1" in text
    assert "stopped by SIGUSR1 after step" in text and "resuming from" in text
    ref = tmp_path / "ref"
    assert run_inprocess(tiny_args(data, ref, *RUN, "--max-steps", str(steps))) == 0
    a, b = train_losses(ref), train_losses(out)
    assert len(b) == steps and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_chained_sampling_and_sweep_array(cluster, data, tmp_path):
    """`--dependency=afterok` runs sampling after training; a job array trains one model per task."""
    env = {**cluster, "GREENTEXT_CPU_RANKS": "1", "GREENTEXT_SWEEP_MODELS": "tiny tiny", "GREENTEXT_SWEEP_OUT": str(tmp_path / "sweep")}
    base = ["sbatch", "--parsable", "--cpus-per-task", "2", "--chdir", str(ROOT)]
    args = tiny_args(data, tmp_path / "unused", *RUN, "--max-steps", "2")
    args = [a for i, a in enumerate(args) if a != "--output-dir" and (i == 0 or args[i - 1] != "--output-dir")]
    array = subprocess.run([*base, "--array=0-1", "-o", str(tmp_path / "sweep-%a.out"), str(ROOT / "slurm" / "sweep.sbatch"), *args],
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    sample = subprocess.run([*base, f"--dependency=afterok:{array}", "-o", str(tmp_path / "sample.out"), str(ROOT / "slurm" / "sample.sbatch"),
                             str(tmp_path / "sweep" / "1-tiny" / "final"), "--num-samples", "2", "--max-new-tokens", "8",
                             "--output", str(tmp_path / "samples.jsonl")], capture_output=True, text=True, env=env, check=True).stdout.strip()
    for i in (0, 1):
        info = wait_done(cluster, f"{array}_{i}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"sweep-{i}.out").read_text()[-2000:]
        assert (tmp_path / "sweep" / f"{i}-tiny" / "final" / "config.json").is_file()
    info = wait_done(cluster, sample)
    assert info["JobState"] == "COMPLETED", (tmp_path / "sample.out").read_text()[-2000:]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
