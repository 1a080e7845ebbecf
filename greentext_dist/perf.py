"""Model FLOPs and device peaks for MFU / HFU."""

from __future__ import annotations

import torch

from greentext_dist.model import num_params

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
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(n_params_no_pos: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """PaLM's model FLOPs per trained token: 6N (forward + backward matmuls) + 12·L·d·T (attention)."""
    return 6 * n_params_no_pos + 12 * n_layer * n_embd * seq_len


def model_flops_per_token(model, seq_len: int, recompute: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token; HFU adds the forward recomputed by checkpointing (1/3 more)."""
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
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
