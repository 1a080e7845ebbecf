"""Model FLOPs and device peaks for MFU / HFU."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Dense bf16 tensor-core peaks (TFLOP/s), by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.2), ("A10G", 70.0), ("L4", 121.0),
]


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak on a CPU: report tokens/s only
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(n_params_no_pos: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """PaLM's model FLOPs per trained token: 6N (forward + backward matmuls) + 12·L·d·T (attention)."""
    return 6 * n_params_no_pos + 12 * n_layer * n_embd * seq_len


def model_flops_per_token(model, seq_len: int, recompute: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token; HFU adds the forward recomputed by checkpointing (1/3 more)."""
    from greentext_dist.model import num_params

    c = model.config
    n = num_params(model) - c.n_positions * c.n_embd
    mf = flops_per_token(n, c.n_layer, c.n_embd, seq_len)
    return mf, mf * (4 / 3 if recompute else 1.0)


def utilisation(tokens_per_s: float, flops: tuple[float, float], peak: float | None, world: int) -> dict:
    """MFU and HFU per device; None without a known peak (CPU unless --peak-tflops)."""
    if not peak:
        return {"mfu": None, "hfu": None}
    return {"mfu": tokens_per_s * flops[0] / (peak * 1e12 * world), "hfu": tokens_per_s * flops[1] / (peak * 1e12 * world)}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory; on CPU, the process's peak resident set."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# A CPU run reaches about this share of the FLOP rate its own matmuls show alone (the probe below): calibrated on the
# tiny and small models, fp32 and bf16, on a 2-core AMD EPYC (0.3-0.7 across them).
CPU_EFFICIENCY = 0.5
# What a GPU run reaches of the card's bf16 peak, before anything is measured (docs/benchmarks.md, H200: compiled DDP
# 41-50% MFU; eager about 0.6x that; ZeRO-3 alone on one GPU 8.6%).
GPU_MFU = {"compiled": 0.40, "eager": 0.25}


@functools.cache
def cpu_matmul_flops(d: int, vocab: int, n_layer: int, precision: str) -> float:
    """FLOP/s of this CPU on the model's own matmul shapes (an MLP projection and the LM head, forward and backward,
    under the run's autocast), weighted by their share of the model's FLOPs. Takes ~0.1-0.5 s."""
    import time

    import torch
    import torch.nn.functional as F

    m = 64 if precision == "bf16" else 256  # rows: as many as training feeds, where the CPU is fast enough to time them

    def rate(k: int, n: int) -> float:
        g = torch.Generator().manual_seed(0)  # its own generator: the run's random state is untouched
        x = torch.randn(m, k, generator=g, requires_grad=True)
        w = torch.randn(n, k, generator=g, requires_grad=True)

        def once() -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                y = F.linear(x, w)
            y.float().sum().backward()

        once()  # the first call picks kernels
        best = 0.0
        for _ in range(3):  # the best of three short windows: another process on the core only ever slows one down
            reps, t0 = 0, time.perf_counter()
            while reps == 0 or time.perf_counter() - t0 < 0.02:
                once()
                reps += 1
            best = max(best, 6 * m * k * n * reps / (time.perf_counter() - t0))
        return best

    head, blocks = vocab * d, 12 * n_layer * d * d
    return (head + blocks) / (head / rate(d, min(vocab, 2048)) + blocks / rate(d, 4 * d))


def estimate_step_seconds(module, rows: int, seq_len: int, world: int, device, precision: str, *, compiled: bool, recompute: bool,
                          peak: float | None, mfu: float | None = None) -> tuple[float | None, str]:
    """(seconds per optimizer step, how it was estimated) before any step ran: `rows` sequences of `seq_len` tokens
    over `world` ranks. GPU: the card's peak at a calibrated MFU (`mfu` overrides it); CPU: a short probe of this CPU's
    speed on the model's own matmuls. None where neither is known (an unknown GPU, Apple's MPS)."""
    hw = model_flops_per_token(module, seq_len, recompute)[1] * rows * seq_len / world
    if device.type == "cuda":
        if not peak:
            return None, "unknown GPU peak: pass --peak-tflops"
        mfu = mfu or GPU_MFU["compiled" if compiled else "eager"]
        return hw / (peak * 1e12 * mfu), f"planned at {mfu:.0%} MFU of {peak:g} TFLOP/s"
    if device.type == "cpu":
        c = module.config
        rate = cpu_matmul_flops(c.n_embd, c.vocab_size, c.n_layer, precision)
        return hw / (rate * CPU_EFFICIENCY), f"rough, from this CPU's {precision} matmul speed ({rate / 1e9:.1f} GFLOP/s)"
    return None, ""


def duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size if unit == "days" else seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    import os
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
