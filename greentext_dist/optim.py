"""AdamW with decay on matrices only, and the warmup + cosine schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch

from greentext_dist.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    # Biases and LayerNorm gains (1-D) are not decayed. `.ndim` of a ZeRO-3 partition is 1, so use ds_shape there.
    ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
    return [
        {"params": [p for p in params if ndim(p) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if ndim(p) < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        fused=device.type == "cuda",
    )


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * max_steps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, cosine to min_lr at max_steps."""
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if max_steps <= warm:
        return cfg.lr
    progress = min((step - warm) / max(max_steps - 1 - warm, 1), 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
