"""SIGTERM / SIGUSR1 mid-run: the step finishes on every rank, a checkpoint is written, exit 0, and the
resumed run ends exactly where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TRAIN, run_inprocess, tiny_args, train_losses

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "40", "--eval-every", "0", "--lr", "1e-3"]


def start(args, nproc):
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(TRAIN), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)


def wait_for_steps(out, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step")


def workers_of(proc):
    """The training processes under a launcher (what SLURM signals with scancel --signal)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGUSR1)])
def test_signal_checkpoints_and_resume_is_exact(corpus, tmp_path, nproc, sig):
    ref = tmp_path / "ref"
    assert run_inprocess(tiny_args(corpus, ref, *RUN)) == 0
    out = tmp_path / "run"
    proc = start(tiny_args(corpus, out, *RUN), nproc)
    wait_for_steps(out, 3, proc)
    targets = [proc.pid] if nproc == 1 else workers_of(proc)
    assert len(targets) == nproc
    for pid in targets:
        os.kill(pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in err
    stopped = len(train_losses(out))
    assert 3 <= stopped < 40, "the signal arrived too late to test anything"
    assert (out / "checkpoints" / f"step-{stopped}").is_dir()
    assert run_inprocess(tiny_args(corpus, out, *RUN)) == 0
    a, b = train_losses(ref), train_losses(out)
    assert len(b) == 40 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
