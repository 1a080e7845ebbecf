"""Single process and DistributedDataParallel: fp32 master weights, optional bf16 autocast."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from greentext_dist.data import isolated_inputs
from greentext_dist.dist import DistEnv
from greentext_dist.model import save_hf, true_vocab


class DDPEngine:
    name = "ddp"
    can_skip = True  # a non-finite step can be skipped without touching the weights

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, precision: str):
        self.env, self.module, self.optimizer = env, model, optimizer
        self.model = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None) if env.distributed else model
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.vocab = true_vocab(model)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(self.env.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(input_ids=x, use_cache=False, **isolated_inputs(position_ids)).logits
        return logits[..., :self.vocab]  # a padded vocabulary's extra logits never reach the loss

    def accumulating(self, last: bool):
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        return self.model.no_sync() if self.env.distributed and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is already normalised by the global token count.
        (loss * self.env.world_size).backward()

    def step(self, grad_clip: float, finite_loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip and step, unless the loss or the gradient norm is not finite: then the update is skipped and
        the weights stay as they were. Returns (grad norm, applied). The check is the step's one host sync."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP's norm is a DTensor
        applied = bool((torch.isfinite(norm) & finite_loss).item())
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save_state(self, folder: Path) -> None:
        # Weights live in the checkpoint's fp32 safetensors; only the optimizer needs saving here.
        if self.env.is_main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def export_hf(self, folder: Path, max_shard_size: str) -> None:
        if self.env.is_main:
            save_hf(self.module, folder, max_shard_size)


def apply_ddp(model, optimizer, env: DistEnv, precision: str) -> DDPEngine:
    return DDPEngine(model, optimizer, env, precision)
