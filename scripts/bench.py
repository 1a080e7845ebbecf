"""Throughput of greentext_dist's real training step on synthetic tokens, against a bare PyTorch loop
and the Hugging Face Trainer on the same model and data.

    python scripts/bench.py --model small --backend ddp --micro-batch-size 16 --steps 20
    torchrun --nproc_per_node 8 scripts/bench.py --model xl --backend zero3 --gradient-checkpointing

Prints tokens/s, MFU / HFU against the device's bf16 peak (GPU only, or --peak-tflops), peak memory,
the planner's predicted peak, and, on one rank, the ratios to (a) a bare loop over the same HF model
(forward, loss, backward, clip, AdamW) and (b) transformers.Trainer with the same settings.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from greentext_dist.attention import check as check_attention, uses_flex
from greentext_dist.config import Config
from greentext_dist.errors import UserError
from greentext_dist.dist import init_distributed
from greentext_dist import plan as planner
from greentext_dist.data import doc_positions, isolated_inputs
from greentext_dist.loss import token_loss_sum
from greentext_dist.model import apply_compile, build_model
from greentext_dist.perf import model_flops_per_token, peak_memory_gib, peak_tflops
from greentext_dist.engines import ENGINES
from greentext_dist.model import preset_config
from greentext_dist.train import resolve, train_step
from greentext_dist.ui import setup_logging


EOS = 50256


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, steps: int, warmup: int, device) -> float:
    """Median seconds per step: robust to a noisy shared machine. Synchronising at step ends only."""
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def hf_trainer_step_time(cfg, a, batches, device) -> float:
    """Seconds per optimizer step of transformers.Trainer on the same model, batch shape, precision, clipping,
    accumulation and compile setting. Its loader feeds the same token rows (labels = inputs, shifted inside
    the model: the same FLOPs). Timed between step ends by a callback, after the same warm-up."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = [{"input_ids": x[i].cpu(), "labels": x[i].cpu()} | {k: v[i].cpu() for k, v in isolated_inputs(pos).items()}
            for x, _, pos in batches for i in range(x.shape[0])]
    n_steps = a.warmup + a.steps

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows) * n_steps

        def __getitem__(self, i):
            return rows[i % len(rows)]

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            if state.global_step > a.warmup:
                self.times.append(time.perf_counter() - self.t0)

    model = build_model(cfg.model, seed=0)
    clock = Clock()
    ac = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters else "gradient_checkpointing"
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=a.micro_batch_size, gradient_accumulation_steps=a.grad_accum,
            max_steps=n_steps, learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
            bf16=a.precision == "bf16", use_cpu=device.type == "cpu", torch_compile=a.compile,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=2, dataloader_pin_memory=device.type == "cuda",
            remove_unused_columns=False, seed=0, **{ac: a.gradient_checkpointing},
        )
        Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock]).train()
    return statistics.median(clock.times)


def write_profile(path: str, step_fn, device, label: str) -> None:
    """The kernels that take a step's time: two profiled steps, top 25 by device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step_fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"## {label}\n\n" + prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70) + "\n\n")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--compile", action="store_true", help="torch.compile each block and the loss (all three loops)")
    p.add_argument("--packing", default="concat", choices=["concat", "isolated"], help="isolated: a post boundary every --doc-len tokens")
    p.add_argument("--doc-len", type=int, default=150, help="synthetic post length for --packing isolated")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flex"], help="as train.py: the kernel for --packing isolated")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare PyTorch loop and the HF Trainer")
    p.add_argument("--no-trainer", action="store_true", help="skip the HF Trainer")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds of ours and the bare loop (best of each)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the GPU name)")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--pad-vocab", type=int, default=None, help="as train.py (default: 64 on a GPU except zero3)")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                   help="model: torch.compile the whole model instead of each block (ddp on one rank only; an experiment)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs (ddp on one rank only)")
    p.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                   help="pin scaled_dot_product_attention to one kernel")
    p.add_argument("--profile", default=None, help="write the top kernels of two profiled steps to this file")
    return p


def main() -> None:
    p = build_parser()
    a = p.parse_args()
    custom_compile = a.compile and (a.compile_scope != "blocks" or a.compile_mode)
    if custom_compile and a.backend != "ddp":
        p.error("--compile-scope model / --compile-mode are measured with --backend ddp only")

    cfg = Config()
    cfg.model.model, cfg.model.init, cfg.model.dropout, cfg.model.pad_vocab = a.model, "scratch", a.dropout, a.pad_vocab
    cfg.model.gradient_checkpointing, cfg.model.compile = a.gradient_checkpointing, a.compile and not custom_compile
    cfg.model.attention = a.attention
    cfg.data.seq_len = a.seq_len
    cfg.train.backend, cfg.train.precision, cfg.train.micro_batch_size = a.backend, a.precision, a.micro_batch_size
    env = init_distributed(single_rank_group=ENGINES[a.backend].needs_process_group)
    cfg.train.global_batch_size = a.micro_batch_size * a.grad_accum * env.world_size
    setup_logging(env.rank)
    try:
        check_attention(a.attention, a.packing, a.dropout, env.device)
    except UserError as e:
        p.error(str(e))
    torch.manual_seed(0)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    gen = torch.Generator().manual_seed(env.rank)
    batches = []
    for _ in range(a.grad_accum):
        x = torch.randint(0, 50256, (a.micro_batch_size, a.seq_len), generator=gen)
        pos = None
        if a.packing == "isolated":
            x[:, ::a.doc_len] = EOS
            pos = doc_positions(x, EOS).to(env.device)
        batches.append((x.to(env.device), torch.randint(0, 50257, x.shape, generator=gen).to(env.device), pos))
    tokens_per_step = a.micro_batch_size * a.seq_len * a.grad_accum * env.world_size

    spec, shape = ENGINES[a.backend], preset_config(a.model, a.dropout)
    cfg = resolve(cfg, env, spec, shape)
    engine = spec.build(cfg, env, a.grad_accum, None, shape)
    model = engine.module
    if custom_compile and env.world_size == 1:
        if a.compile_scope == "model":
            engine.model = torch.compile(engine.model, mode=a.compile_mode)
        else:
            for block in model.transformer.h:
                block.compile(mode=a.compile_mode)
    elif custom_compile:
        p.error("--compile-scope model / --compile-mode are measured on one rank only")
    if a.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[a.sdpa]
        sdpa_kernel([kernel]).__enter__()  # for the whole process
    engine.train(True)
    loss_fn = torch.compile(token_loss_sum) if a.compile else token_loss_sum
    ours_step = lambda: train_step(engine, batches, 1.0, env.device, loss_fn)  # noqa: E731
    baseline = env.world_size == 1 and not a.no_baseline
    if baseline:
        # The bare loop: the same HF model and maths, nothing of ours around it.
        bare = build_model(cfg.model, seed=0).to(env.device)
        if a.compile:
            apply_compile(bare)
        opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, weight_decay=0.01, fused=env.device.type == "cuda")
        use_amp = a.precision == "bf16"
        ce = torch.compile(bare_loss) if a.compile else bare_loss

        def bare_step():
            for x, y, pos in batches:
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = bare(input_ids=x, use_cache=False, **isolated_inputs(pos, flex=uses_flex(bare))).logits
                ce(logits, y).div(len(batches)).backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    dt = timed(ours_step, a.steps, a.warmup, env.device)
    peak_mem = peak_memory_gib(env.device)  # before the baselines allocate anything
    if a.profile and env.is_main:
        write_profile(a.profile, ours_step, env.device, " ".join(sys.argv[1:]))
    # Alternate rounds of ours and the bare loop, keeping each one's best: a shared machine's drift hits both.
    bare_dt = timed(bare_step, a.steps, a.warmup, env.device) if baseline else None
    for _ in range(a.rounds - 1 if baseline else 0):
        dt = min(dt, timed(ours_step, a.steps, 1, env.device))
        bare_dt = min(bare_dt, timed(bare_step, a.steps, 1, env.device))
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
        "planned_peak_gib": planner.peak_bytes(planner.shape(a.model), ENGINES[a.backend].plan_key(a.backend, False), env.world_size,
                                               a.micro_batch_size, a.seq_len, a.gradient_checkpointing, a.precision, a.compile,
                                               a.grad_accum)["peak"] / 2**30,
        "compile": a.compile, "packing": a.packing, "attention": a.attention, "dropout": a.dropout, "vocab_rows": model.config.vocab_size,
        "compile_scope": a.compile_scope if a.compile else None, "compile_mode": a.compile_mode, "sdpa": a.sdpa,
        "source": "bench.py", "torch": torch.__version__, "command": "python scripts/bench.py " + " ".join(sys.argv[1:]),
    }
    engine = model = ours_step = None  # free our model before the baselines' turn
    if baseline:
        result["bare_tokens_per_s"] = tokens_per_step / bare_dt
        result["ratio_to_bare"] = result["tokens_per_s"] / result["bare_tokens_per_s"]
        bare = opt = bare_step = None
        if not a.no_trainer:
            trainer_dt = hf_trainer_step_time(cfg, a, batches, env.device)
            result["trainer_tokens_per_s"] = tokens_per_step / trainer_dt
            result["ratio_to_trainer"] = result["tokens_per_s"] / result["trainer_tokens_per_s"]
    if env.is_main:
        def fmt(k, v):
            if v is None or not isinstance(v, float):
                return "-" if v is None else str(v)
            return f"{v:.1%}" if k in ("mfu", "hfu") else f"{v:,.0f}" if k.endswith("tokens_per_s") else f"{v:.3f}"

        print("  ".join(f"{k}={fmt(k, v)}" for k, v in result.items()), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
