"""Single process and DistributedDataParallel: fp32 master weights, optional bf16 autocast."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from greentext_dist.dist import DistEnv
from greentext_dist.engines.base import EngineSpec, Traffic, autocast, buckets
from greentext_dist.lora import adapted, trainable_state
from greentext_dist.model import apply_compile, build_model, lm_logits, pad_vocab, save_hf, true_vocab
from greentext_dist.optim import build_optimizer


ADAPTER_STATE = "adapter.safetensors"  # a LoRA run's trainable parameters, in train_state/


class LocalEngine:
    """Forward, backward, clip-and-step and lr on a model whose optimizer is a plain torch one (DDP and FSDP)."""

    can_skip = True  # a non-finite step can be skipped without touching the weights
    sharded = False

    def __init__(self, module: torch.nn.Module, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                 precision: str | None):
        self.env, self.module, self.model, self.optimizer = env, module, wrapped, optimizer
        self.precision = precision  # bf16 autocast around forward, or None when parameters are cast already
        self.vocab = true_vocab(module)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.env.device, self.precision or "fp32"):
            return lm_logits(self.model, x, position_ids)

    def generation_autocast(self):
        return autocast(self.env.device, self.precision or "fp32")

    def backward(self, loss: torch.Tensor) -> None:
        # Gradients are averaged over ranks; the loss is already normalised by the global token count.
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


class DDPEngine(LocalEngine):
    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, precision: str):
        wrapped = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None) if env.distributed else model
        super().__init__(model, wrapped, optimizer, env, precision if precision == "bf16" else None)

    def accumulating(self, last: bool):
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        return self.model.no_sync() if self.env.distributed and not last else contextlib.nullcontext()

    def save_state(self, folder: Path) -> None:
        # Weights live in the checkpoint's fp32 safetensors; only the optimizer needs saving here. Under LoRA those are
        # merged weights: the adapter is saved as it trains, and a resume builds the frozen base from its source.
        if self.env.is_main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            if adapted(self.module):
                save_file({k: v.detach().cpu().contiguous() for k, v in trainable_state(self.module, self.module.state_dict()).items()},
                          str(folder / ADAPTER_STATE))

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        if adapted(self.module):
            missing, unexpected = self.module.load_state_dict(load_file(str(folder / ADAPTER_STATE), device=str(self.env.device)), strict=False)
            assert not unexpected and not set(trainable_state(self.module, dict.fromkeys(missing))), (missing, unexpected)

    def export_hf(self, folder: Path, max_shard_size: str) -> None:
        if self.env.is_main:
            save_hf(self.module, folder, max_shard_size)


def apply_ddp(model, optimizer, env: DistEnv, precision: str) -> DDPEngine:
    return DDPEngine(model, optimizer, env, precision)


def build(cfg, env: DistEnv, grad_accum: int, weights: str | None, config) -> DDPEngine:
    model = build_model(cfg.model, weights_from=weights, seed=cfg.train.seed).to(env.device)
    pad_vocab(model, cfg.model.pad_vocab or 1)
    if cfg.model.compile:
        apply_compile(model)
    return apply_ddp(model, build_optimizer(model, cfg.optim, env.device), env, cfg.train.precision)


def states(s, gpus: int, precision: str, offload: bool, accumulating: bool) -> tuple[float, float]:
    """fp32 weights and AdamW moments; fp32 gradients, and DDP's bucket copy of them when distributed; autocast keeps
    a bf16 copy of the weights. Under accumulation (no_sync) the gradients are whole either way. LoRA: moments and
    gradients of the adapter only."""
    n, t = s.n_params, s.train_params
    return 4 * n + 8 * t + (2 * n if precision == "bf16" else 0), 4 * t + (4 * t if gpus > 1 else 0)


DDP_BUCKET, DDP_FIRST_BUCKET = 25 * 2**20, 2**20  # DistributedDataParallel's bucket_cap_mb and its first bucket


def comm(s, gpus: int, accum: int, precision: str, offload: bool, reshard: bool) -> list[Traffic]:
    """One all-reduce of the fp32 gradients a step, bucket by bucket during the last micro-batch's backward (no_sync
    before it); the last bucket waits for the backward's end. Buckets fill in backward order (the parameters
    reversed), the first at 1 MiB."""
    if gpus == 1:
        return []
    sizes = [4 * n for n in reversed(s.parameters())] if s.trainable is None else [4 * s.trainable]  # LoRA: the adapter's
    calls = buckets(sizes, DDP_BUCKET, DDP_FIRST_BUCKET)
    return [Traffic("all_reduce", "gradients, fp32, last micro-batch", 4 * s.train_params, "backward", 1, min(DDP_BUCKET, 4 * s.train_params), calls)]


SPEC = EngineSpec(build, needs_process_group=False, compile_by_default=True, can_pad_vocab=True, same_world_to_resume=False,
                  states=states, checkpoint_bytes=lambda precision, n: (4 * n, 8 * n),  # fp32 weights; AdamW's two fp32 moments
                  compute=lambda precision: "fp32" if precision == "fp32" else "autocast", comm=comm,
                  help="one process, or DistributedDataParallel under a launcher")
