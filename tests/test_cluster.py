"""What only many GPUs and nodes would show, simulated on this machine: a per-device process group (NCCL beside
gloo), an output folder that one node cannot see (a rank in its own mount namespace), FSDP2's memory at world sizes
we cannot launch (torch's fake process group), DeepSpeed's reduction dtype, and the per-step stop vote."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_inprocess, tiny_args, train_losses
from greentext_dist.errors import UserError

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0"]


def test_a_gpu_process_group_carries_cpu_tensors_too(monkeypatch):
    """FSDP's CPU offload all-reduces CPU gradients and the stop vote is a CPU tensor: NCCL alone cannot (pytorch#148532)."""
    from greentext_dist import dist as gdist

    assert gdist.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert gdist.backend_for(torch.device("cpu")) == "gloo"
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(gdist.dist, "init_process_group", lambda **kw: seen.update(kw))
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    env = gdist.init_distributed()
    assert env.device == torch.device("cuda", 0) and seen["backend"] == "cpu:gloo,cuda:nccl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args, private: Path | None = None, timeout=180):
    """Rank 0 and rank 1 started by hand; with `private`, rank 1 gets its own tmpfs mounted at that path (its own mount
    namespace): the same path, another disk, as on a node whose folder is node-local."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "greentext_dist.train", *args]
        if rank == 1 and private is not None:
            cmd = ["unshare", "-m", "sh", "-c", 'mkdir -p "$0" && mount -t tmpfs tmpfs "$0" && exec "$@"', str(private), *cmd]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a private mount namespace needs root")


@pytest.mark.slow
@needs_root
def test_an_output_dir_one_node_cannot_see_is_refused_at_start(corpus, tmp_path):
    out = tmp_path / "run"
    results = two_ranks(tiny_args(corpus, out, *RUN, "--max-steps", "2"), private=out)
    for code, _, err in results:
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1, err[-3000:]
        assert f"--output-dir {out} is not the same folder on every node: rank(s) 1 on {socket.gethostname()}" in lines[0]
        assert "every node mounts" in lines[0] and "Traceback" not in err
    assert "model " not in results[0][2]  # refused before the model was built (no start summary)
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
@needs_root
def test_a_node_local_cache_is_named_and_the_run_goes_on(corpus, tmp_path):
    cache = tmp_path / "cache"
    results = two_ranks(tiny_args(corpus, tmp_path / "run", *RUN, "--max-steps", "2", "--cache-dir", str(cache)), private=cache)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert "--cache-dir" in results[0][2] and "each node works in its own copy" in results[0][2]
    assert len(train_losses(tmp_path / "run")) == 2


@pytest.mark.parametrize("world", [8, 64])
def test_planner_counts_what_fsdp2_allocates_with_and_without_accumulation(world):
    """The real FSDP2 wrapping at world sizes we cannot launch (torch's fake process group): sharded states, the
    gradients of a synced step, and the unsharded fp32 gradients FSDP2 holds while it accumulates, against plan.py."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import GPT2Config, GPT2LMHeadModel

    from greentext_dist import plan
    from greentext_dist.config import OptimConfig
    from greentext_dist.dist import DistEnv
    from greentext_dist.engines.fsdp import apply_fsdp
    from greentext_dist.optim import build_optimizer

    def local_bytes(tensors) -> int:
        return sum((t._local_tensor if hasattr(t, "_local_tensor") else t).nbytes for t in tensors if t is not None)

    def accumulated(model) -> int:
        total = 0
        for m in model.modules():
            group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
            for fp in group.fsdp_params if group else []:
                g = fp.unsharded_accumulated_grad if fp.unsharded_accumulated_grad is not None else fp._unsharded_param.grad
                total += g.nbytes if g is not None else 0
        return total

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, attn_implementation="sdpa")
        model = GPT2LMHeadModel(config)
        s = plan.shape_for(2, 64, config.vocab_size, 64)
        assert s.n_params == sum(p.numel() for p in model.parameters())
        apply_fsdp(model, DistEnv(0, world, 0, torch.device("cpu")), "bf16", True, False)
        opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
        x = torch.randint(0, config.vocab_size, (1, 16))
        model.set_requires_gradient_sync(False)  # the first micro-batch of an accumulating step
        model(x, labels=x).loss.backward()
        held_acc, grads_acc = plan.model_states(s, "fsdp", world, accumulating=True)
        assert accumulated(model) == pytest.approx(grads_acc, rel=0.01) and grads_acc == 4 * s.n_params  # unsharded fp32
        model.set_requires_gradient_sync(True)  # the last one: reduce-scatter into fp32 shards
        model(x, labels=x).loss.backward()
        opt.step()
        held, grads = plan.model_states(s, "fsdp", world)
        assert local_bytes(p.grad for p in model.parameters()) == pytest.approx(grads, rel=0.01)
        states = local_bytes(model.parameters()) + local_bytes(v for st in opt.state.values() for v in st.values() if v.dim())
        gathered = held - 12 * s.n_params / world  # the planner's two gathered bf16 blocks on top of the shards
        assert states == pytest.approx(held - gathered, rel=0.01) and held_acc == held
        # The planner's peak grows by the difference under accumulation: the auto-checkpointing decision sees it.
        one = plan.peak_bytes(s, "fsdp", world, 1, 16, False, grad_accum=1)
        two = plan.peak_bytes(s, "fsdp", world, 1, 16, False, grad_accum=2)
        assert two["peak"] - one["peak"] >= 4 * s.n_params * (1 - 1 / world) - 1
    finally:
        dist.destroy_process_group()


def test_xl_fsdp_with_accumulation_on_8_gpus_is_planned_with_its_unsharded_gradients():
    from greentext_dist import plan

    xl = plan.shape("xl")
    alone = plan.peak_bytes(xl, "fsdp", 8, 8, 1024, True, grad_accum=1)
    accumulating = plan.peak_bytes(xl, "fsdp", 8, 8, 1024, True, grad_accum=8)
    assert (accumulating["peak"] - alone["peak"]) / 2**30 == pytest.approx(4 * xl.n_params / 2**30, rel=0.01)  # ~5.8 GiB


def test_shipped_deepspeed_configs_reduce_in_fp32(corpus, tmp_path):
    """DDP and FSDP reduce gradients in fp32; ZeRO in bf16 would round once per hop, drifting with the rank count."""
    import json

    from greentext_dist.configs import DEEPSPEED
    from greentext_dist.config import parse_args
    from greentext_dist.dist import shutdown
    from greentext_dist.train import setup

    for f in Path(DEEPSPEED).glob("*.json"):
        assert json.loads(f.read_text())["communication_data_type"] == "fp32", f
    run = setup(parse_args(tiny_args(corpus, tmp_path / "run", *RUN, "--max-steps", "1", "--backend", "zero2", "--precision", "bf16")))
    try:
        assert run.engine.engine.communication_data_type == torch.float32
    finally:
        from greentext_dist import rundir

        rundir.release(tmp_path / "run")
        shutdown()


@pytest.mark.slow
def test_zero2_bf16_on_two_ranks_follows_ddp_bf16(corpus, tmp_path):
    from conftest import launch

    curves = {}
    for backend in ("ddp", "zero2"):
        out = tmp_path / backend
        p = launch(tiny_args(corpus, out, *RUN, "--max-steps", "6", "--precision", "bf16", "--lr", "1e-3", "--backend", backend), nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        curves[backend] = train_losses(out)
    assert len(curves["ddp"]) == 6 and max(abs(a - b) for a, b in zip(curves["ddp"], curves["zero2"])) <= 2e-2  # bf16 rounding


def test_the_stop_vote_is_one_step_late_on_several_ranks_and_never_blocks_a_step():
    """On several ranks a step's vote is answered at the end of the next step (its all-reduce runs during that step);
    every rank sees the same answer; the signal's acknowledgement names that step."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_vote_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
    (r0, votes0, ack0), (r1, votes1, ack1) = results
    assert votes0 == votes1  # the same answer on every rank, at the same step
    # rank 1 is signalled during step 3: its vote goes out at the end of step 3 and is answered at the end of step 4
    assert [step for step, signalled in votes0 if signalled][0] == 4
    assert "stopping after step 4 finishes" in ack1


def _vote_rank(rank, port, q):
    import signal

    import torch.distributed as dist

    from greentext_dist.signals import GracefulStop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    votes, ack = [], ""
    with GracefulStop(announce=False) as stop:
        for step in range(1, 7):
            stop.at_step(step, 1.0, None)
            if rank == 1 and step == 3:
                stop._handle(signal.SIGTERM, None)
                ack = stop.acknowledgement(signal.SIGTERM)
            signalled, _ = stop.vote(False)
            votes.append((step, signalled))
    dist.destroy_process_group()
    q.put((rank, votes, ack))


def test_generate_under_a_launcher_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "greentext_dist.generate", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})
    assert p.returncode == 2 and "generate runs in one process" in p.stderr and "Traceback" not in p.stderr


def test_a_model_folder_on_some_nodes_only_is_one_line_on_every_rank(tmp_path, monkeypatch):
    from greentext_dist import hub

    monkeypatch.setattr("greentext_dist.dist.gather", lambda value: [value, not value])  # rank 1 sees the opposite
    with pytest.raises(UserError, match="exists on rank.* but not on the others"):
        hub.shared_download(str(tmp_path))


def test_a_save_that_cannot_fit_the_slurm_warning_is_named(corpus, tmp_path, monkeypatch, capfd):
    from greentext_dist import checkpoint

    monkeypatch.setenv("GREENTEXT_SIGNAL_LEAD_S", "60")
    monkeypatch.setattr(checkpoint, "save_seconds", lambda n_bytes: 500.0)  # a slow file system
    assert run_inprocess(tiny_args(corpus, tmp_path / "run", *RUN, "--max-steps", "1")) == 0
    err = capfd.readouterr().err
    assert "the job is warned only 60 s before its time limit" in err and "sbatch --signal=B:USR1@" in err
    assert "of the --save-every-minutes 30" in err
