"""What the per-step stop vote costs the training loop: N steps of fixed work on R gloo ranks, with and without the
vote that train.py's loop casts once a step (greentext_dist.signals.GracefulStop.vote).

    python scripts/bench_vote.py --ranks 2 --steps 200 --work-ms 20

Prints the time a step loses to the vote (mean over the steps, against the same steps without it).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def work(ms: float) -> None:
    """CPU-bound work of about `ms` milliseconds (what a step's compute is to the loop)."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def rank_main(rank: int, world: int, port: int, steps: int, work_ms: float, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from greentext_dist.signals import GracefulStop

    times = {}
    with GracefulStop(announce=False) as stop:
        for mode in ("without", "with", "without", "with"):  # twice each, interleaved: the machine's noise hits both
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                work(work_ms)
                if mode == "with":
                    stop.vote(False)
            getattr(stop, "drain", lambda: None)()  # (the blocking vote of earlier versions had nothing pending)
            dist.barrier()
            times.setdefault(mode, []).append(time.perf_counter() - t0)
    if rank == 0:
        out.put({m: min(v) / steps for m, v in times.items()})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--work-ms", type=float, default=20.0)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    ctx_procs = [ctx.Process(target=rank_main, args=(r, a.ranks, port, a.steps, a.work_ms, out)) for r in range(a.ranks)]
    for proc in ctx_procs:
        proc.start()
    res = out.get()
    for proc in ctx_procs:
        proc.join()
    cost = res["with"] - res["without"]
    print(f"{a.ranks} gloo ranks, {a.steps} steps of {a.work_ms:g} ms: {res['without'] * 1e3:.3f} ms a step without the vote, "
          f"{res['with'] * 1e3:.3f} ms with it: the vote costs {cost * 1e6:.0f} us a step")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
