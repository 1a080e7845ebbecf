"""Count the bytes each engine's collectives move in one optimizer step, and print them beside the planner's
prediction (greentext_dist/plan.py, from each engine's EngineSpec.comm).

    python scripts/bench_comm.py                  # every engine on 2 and 4 CPU ranks, accumulation 1 and 2
    python scripts/bench_comm.py --ranks 2 --engines ddp zero3 --json

Each rank runs the real training setup (train.setup: the engine built as train.py builds it) and two optimizer steps
through train.train_step; the second is counted. One launch of the ranks runs every engine and accumulation in turn,
each in a process group of its own. Counting is a TorchDispatchMode that sees every c10d collective
the process issues (DDP's C++ reducer, FSDP2's and DeepSpeed's Python calls alike) and records its size the way
NCCL's tests do: the buffer that is all-reduced, the full output of an all-gather, the full input of a
reduce-scatter. FSDP2 is also counted at world 8 and 64 in one process under torch's fake process group.
Collectives of at most 1 KiB (the target count, the loss, gradient norms, the stop vote) are counted as
`scalars`; the planner does not model them. Launches are counted too: each pays NCCL's latency in the planner.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = 1024  # bytes: at most this, a collective carries scalars or small objects (counts, losses, norms, votes)
# c10d op -> (collective, which argument holds the buffer NCCL's tests size it by)
OPS = {
    "allreduce_": ("all_reduce", "tensors"),
    "allreduce_coalesced_": ("all_reduce", "tensors"),
    "reduce_": ("reduce", "tensors"),
    "broadcast_": ("broadcast", "tensors"),
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor"),
    "reduce_scatter_": ("reduce_scatter", "input_tensors"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs"),
    "_allgather_base_": ("all_gather", "output_tensor"),
    "allgather_": ("all_gather", "output_tensors"),
    "allgather_into_tensor_coalesced_": ("all_gather", "outputs"),
    "alltoall_base_": ("all_to_all", "input"),
}


def nbytes(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    return 0


def counter():
    """A dispatch mode that adds up the bytes of every c10d collective issued under it, by collective."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes: dict[str, int] = defaultdict(int)
            self.calls: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "c10d" and func._opname in OPS:
                name, arg = OPS[func._opname]
                names = [a.name for a in func._schema.arguments]
                value = kwargs[arg] if arg in kwargs else args[names.index(arg)]
                size = nbytes(value)
                key = name if size >= SMALL else "scalars"
                self.bytes[key] += size
                self.calls[key] += 1
            return func(*args, **kwargs)

    return CommCounter()


def rank_main(rank: int, world: int, ports: list[int], jobs: list[tuple[str, int, list[str]]], data: str, out: str, q) -> None:
    """One rank: every job (engine, accumulation, extra flags) in turn, each in a process group of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import logging

    import torch

    from greentext_dist import train
    from greentext_dist.config import parse_args_with_sources

    logging.disable(logging.WARNING)
    sys.stdout = open(os.devnull, "w")  # the ranks' start summaries: this script prints the table
    micro = 2
    for i, (port, (engine, accum, extra)) in enumerate(zip(ports, jobs)):
        os.environ["MASTER_PORT"] = str(port)
        out_dir = os.path.join(out, str(i))
        cfg, sources = parse_args_with_sources([
            "--model", "tiny", "--dataset", data, "--output-dir", out_dir, "--backend", engine, "--seq-len", "32",
            "--precision", "bf16", "--dropout", "0", "--val-fraction", "0", "--micro-batch-size", str(micro),
            "--global-batch-size", str(micro * world * accum), "--max-steps", "2", "--no-compile", "--save-every", "0",
            "--log-every", "1000", *extra])
        run = train.setup(cfg, sources)
        engine_ = run.engine
        g = torch.Generator().manual_seed(rank)

        def step():
            batches = []
            for _ in range(run.plan.grad_accum):
                x = torch.randint(0, 50257, (micro, 32), generator=g)
                batches.append((x, x.clone(), None))
            train.train_step(engine_, batches, 1.0, run.env.device)

        step()  # the first step builds what engines build lazily (DeepSpeed's buckets, FSDP2's lazy init)
        count = counter()
        with count:
            step()
        if rank == 0:
            c = engine_.module.config
            q.put({"bytes": dict(count.bytes), "calls": dict(count.calls), "grad_accum": run.plan.grad_accum,
                   "shape": [c.n_layer, c.n_embd, c.vocab_size, c.n_positions]})
        train.shutdown()


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, one for each job's process group."""
    out: list[int] = []
    while len(out) < count:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port not in out:
            out.append(port)
    return out


def launched(world: int, jobs: list[tuple[str, int, list[str]]], data: Path) -> list[dict]:
    """Every job on `world` real ranks, in one launch (the ranks import torch, transformers and DeepSpeed once)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ports = free_ports(len(jobs))
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=rank_main, args=(r, world, ports, jobs, str(data), out, q)) for r in range(world)]
        for p in procs:
            p.start()
        got = []
        while len(got) < len(jobs):
            try:
                got.append(q.get(timeout=600))
            except Exception:
                break
        for p in procs:
            p.join(600)
    if any(p.exitcode != 0 for p in procs) or len(got) < len(jobs):
        done = len(got)
        raise SystemExit(f"{jobs[done][0] if done < len(jobs) else 'the last job'} on {world} ranks failed "
                         f"(exit codes {[p.exitcode for p in procs]})")
    return got


def fake_fsdp(world: int, accum: int, reshard: bool) -> dict:
    """FSDP2 as engines/fsdp.py applies it, at a world size we cannot launch: one process, torch's fake process group
    (collectives return at once, with tensors of the real sizes)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from greentext_dist.config import ModelConfig
    from greentext_dist.dist import DistEnv
    from greentext_dist.engines.fsdp import apply_fsdp
    from greentext_dist.model import build_model

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        model = build_model(ModelConfig(model="tiny", dropout=0.0), weights_from=None, seed=0)
        apply_fsdp(model, DistEnv(0, world, 0, torch.device("cpu")), "bf16", reshard, False)
        x = torch.randint(0, 50257, (2, 32))
        model.set_requires_gradient_sync(False)
        model(x, labels=x).loss.backward()  # warm-up: FSDP2's lazy init
        count = counter()
        with count:
            for i in range(accum):
                model.set_requires_gradient_sync(i == accum - 1)
                model(x, labels=x).loss.backward()
        c = model.config
        return {"bytes": dict(count.bytes), "calls": dict(count.calls), "grad_accum": accum,
                "shape": [c.n_layer, c.n_embd, c.vocab_size, c.n_positions]}
    finally:
        dist.destroy_process_group()


def predicted(variant: str, world: int, accum: int, shape_: list[int]) -> tuple[dict[str, float], dict[str, int]]:
    """The planner's bytes and launches per collective for this run, from the engine's registry entry."""
    from greentext_dist.engines import ENGINES
    from greentext_dist.engines.deepspeed import zero3_comm
    from greentext_dist.plan import shape_for

    s = shape_for(*shape_)
    engine = variant.split()[0]
    if variant == "zero3 reuse 0":
        traffic = zero3_comm(s, world, accum, "bf16", False, True, reuse=0)
    else:
        traffic = ENGINES[engine].comm(s, world, accum, "bf16", False, variant != "fsdp keep")
    out: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for t in traffic:
        out[t.collective] += t.bytes
        calls[t.collective] += t.calls
    return dict(out), dict(calls)


def rows_of(variant: str, world: int, got: dict) -> list[dict]:
    want, calls = predicted(variant, world, got["grad_accum"], got["shape"])
    names = sorted(set(want) | {k for k in got["bytes"] if k != "scalars"})
    return [{"engine": variant.split()[0], "variant": variant, "world": world, "grad_accum": got["grad_accum"], "collective": name,
             "measured_bytes": got["bytes"].get(name, 0), "predicted_bytes": want.get(name, 0.0),
             "measured_calls": got["calls"].get(name, 0), "predicted_calls": calls.get(name, 0)} for name in names]


VARIANTS = ["ddp", "zero2", "zero3", "zero3 reuse 0", "fsdp", "fsdp keep"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="launched world sizes")
    p.add_argument("--fake", type=int, nargs="*", default=[8, 64], help="FSDP2 world sizes on the fake process group")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    data = ROOT / "greentext_dist" / "data" / "demo_greentexts.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        reuse0 = Path(tmp) / "zero3_reuse0.json"
        config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        config["zero_optimization"]["stage3_max_reuse_distance"] = 0
        reuse0.write_text(json.dumps(config))
        extra = {"fsdp keep": ["--no-fsdp-reshard-after-forward"], "zero3 reuse 0": ["--ds-config", str(reuse0)]}
        jobs = [(variant, accum) for variant in a.variants for accum in a.accum]
        for world in a.ranks:
            got = launched(world, [(v.split()[0], accum, extra.get(v, [])) for v, accum in jobs], data)
            rows += [r for (variant, _), one in zip(jobs, got) for r in rows_of(variant, world, one)]
    for variant in [v for v in a.variants if v.startswith("fsdp")]:
        for world in a.fake:
            for accum in a.accum:
                rows += rows_of(variant, world, fake_fsdp(world, accum, variant == "fsdp"))
    if a.json:
        print(json.dumps({"rows": rows}))
        return 0
    print(f"{'variant':14} {'world':>5} {'accum':>5} {'collective':15} {'measured MB':>12} {'predicted MB':>12} {'ratio':>6} "
          f"{'launches':>9} {'predicted':>9}")
    for r in rows:
        ratio = r["measured_bytes"] / r["predicted_bytes"] if r["predicted_bytes"] else float("inf")
        print(f"{r['variant']:14} {r['world']:>5} {r['grad_accum']:>5} {r['collective']:15} {r['measured_bytes'] / 1e6:>12.3f} "
              f"{r['predicted_bytes'] / 1e6:>12.3f} {ratio:>6.3f} {r['measured_calls']:>9} {r['predicted_calls']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
