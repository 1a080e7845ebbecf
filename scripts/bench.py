"""Throughput of greentext_dist's real training step on synthetic tokens, against a bare PyTorch loop.

    python scripts/bench.py --model small --backend ddp --micro-batch-size 16 --steps 20
    torchrun --nproc_per_node 8 scripts/bench.py --model xl --backend zero3 --gradient-checkpointing

Prints tokens/s, MFU / HFU against the device's bf16 peak (GPU only, or --peak-tflops), peak memory,
and, on one rank, the ratio to a bare loop over the same HF model (forward, loss, backward, AdamW).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from greentext_dist.config import Config
from greentext_dist.dist import init_distributed
from greentext_dist.model import build_model
from greentext_dist.perf import model_flops_per_token, peak_tflops
from greentext_dist.train import build_engine, train_step
from greentext_dist.ui import setup_logging


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--backend", default="ddp", choices=["ddp", "zero2", "zero3", "fsdp"])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare PyTorch loop")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the GPU name)")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    a = p.parse_args()

    cfg = Config()
    cfg.model.model, cfg.model.init, cfg.model.dropout = a.model, "scratch", 0.0
    cfg.model.gradient_checkpointing = a.gradient_checkpointing
    cfg.data.seq_len = a.seq_len
    cfg.train.backend, cfg.train.precision, cfg.train.micro_batch_size = a.backend, a.precision, a.micro_batch_size
    env = init_distributed(single_rank_group=a.backend != "ddp")
    cfg.train.global_batch_size = a.micro_batch_size * a.grad_accum * env.world_size
    setup_logging(env.rank)
    torch.manual_seed(0)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    gen = torch.Generator().manual_seed(env.rank)
    batches = [(torch.randint(0, 50257, (a.micro_batch_size, a.seq_len), generator=gen).to(env.device),
                torch.randint(0, 50257, (a.micro_batch_size, a.seq_len), generator=gen).to(env.device)) for _ in range(a.grad_accum)]
    tokens_per_step = a.micro_batch_size * a.seq_len * a.grad_accum * env.world_size

    engine, model = build_engine(cfg, env, {"grad_accum": a.grad_accum}, None)
    engine.train(True)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    dt = timed(lambda: train_step(engine, batches, 1.0, env.device), a.steps, a.warmup, env.device)
    peak_mem = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
    mf, hf = model_flops_per_token(model, a.seq_len, recompute=a.gradient_checkpointing)
    peak = peak_tflops(env.device, a.peak_tflops)
    tps = tokens_per_step / dt
    result = {
        "model": a.model, "backend": engine.name, "precision": a.precision, "world": env.world_size,
        "micro": a.micro_batch_size, "grad_accum": a.grad_accum, "seq_len": a.seq_len, "checkpointing": a.gradient_checkpointing,
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "tokens_per_s": tps, "step_s": dt,
        "mfu": tps * mf / (peak * 1e12 * env.world_size) if peak else None,
        "hfu": tps * hf / (peak * 1e12 * env.world_size) if peak else None,
        "peak_mem_gib": peak_mem,
    }
    del engine, model
    if env.world_size == 1 and not a.no_baseline:
        # The bare loop: the same HF model and maths, nothing of ours around it.
        bare = build_model(cfg.model, seed=0).to(env.device)
        opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, weight_decay=0.01, fused=env.device.type == "cuda")
        use_amp = a.precision == "bf16"

        def bare_step():
            for x, y in batches:
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = bare(input_ids=x, use_cache=False).logits
                F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).div(len(batches)).backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        bare_dt = timed(bare_step, a.steps, a.warmup, env.device)
        result["bare_tokens_per_s"] = tokens_per_step / bare_dt
        result["ratio_to_bare"] = result["tokens_per_s"] / result["bare_tokens_per_s"]
    if env.is_main:
        fmt = lambda v: "-" if v is None else (f"{v:.1%}" if isinstance(v, float) and v < 1.5 else (f"{v:,.0f}" if isinstance(v, float) else str(v)))  # noqa: E731
        print("  ".join(f"{k}={fmt(v) if k in ('tokens_per_s', 'mfu', 'hfu', 'bare_tokens_per_s') else v}" for k, v in result.items()), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
