"""What an engine is, and what the registry knows about each one (see engines/__init__.py for the protocol)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

import torch

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

    from greentext_dist.config import Config
    from greentext_dist.dist import DistEnv
    from greentext_dist.plan import Shape


class Engine(Protocol):
    name: str  # for the start summary and the report
    module: GPT2LMHeadModel  # the bare HF model inside any wrapper
    env: DistEnv
    can_skip: bool  # a non-finite step can be dropped without touching the weights
    sharded: bool  # parameters live in shards: every rank must join every forward (generation in lockstep)
    vocab: int  # GPT-2's 50,257: forward's logits may have more columns (a padded vocabulary), which the loss cuts

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor: ...
    def accumulating(self, last: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, grad_clip: float, finite_loss: torch.Tensor) -> tuple[torch.Tensor, bool]: ...
    def set_lr(self, lr: float) -> None: ...
    def train(self, mode: bool = True) -> None: ...
    def generation_autocast(self) -> ContextManager: ...
    def save_state(self, folder: Path) -> None: ...
    def load_state(self, folder: Path) -> None: ...
    def export_hf(self, folder: Path, max_shard_size: str) -> None: ...


@dataclass(frozen=True)
class Traffic:
    """One kind of collective an engine runs in an optimizer step, for the planner's communication model."""

    collective: str  # all_reduce | all_gather | reduce_scatter
    what: str  # "gradients", "parameters (forward)", ...
    bytes: float  # per GPU per optimizer step, sized as NCCL's tests size it: the all-reduced buffer, an all-gather's
    #               full output, a reduce-scatter's full input (scripts/bench_comm.py counts the same on real engines)
    hides_behind: str  # "forward" or "backward": the compute it overlaps (bucket by bucket, block by block); "" exposed
    micro_batches: int = 1  # over how many micro-batches' forward or backward the bytes are spread
    unit: float = 0.0  # bytes, per micro-batch, of the piece that cannot hide: a last bucket, a first or last unit
    calls: int = 1  # launches per optimizer step (buckets, units, modules): each pays NCCL's latency


def buckets(sizes, cap: float, first: float | None = None) -> int:
    """How many buckets a greedy bucketer makes of `sizes` taken in order: a bucket closes once it holds `cap` or more
    (the first one at `first`), so a tensor larger than the cap ends a bucket of its own."""
    count, held = 0, 0.0
    for size in sizes:
        held += size
        if held >= (first if first is not None and count == 0 else cap):
            count, held = count + 1, 0.0
    return count + (held > 0)


@dataclass(frozen=True)
class EngineSpec:
    """One registry entry. `build(cfg, env, grad_accum, weights, config)` makes the model the way this engine
    needs it (ZeRO-3: partitioned from the start; FSDP: sharded) and returns the engine."""

    build: Callable[[Config, DistEnv, int, str | None, GPT2Config], Engine]
    needs_process_group: bool  # start a one-rank group under plain `python` (DeepSpeed and FSDP need one)
    compile_by_default: bool  # torch.compile on a GPU unless --no-compile (measured faster there)
    can_pad_vocab: bool  # --pad-vocab is possible (not where parameters are partitioned when built)
    same_world_to_resume: bool  # its resumable state only loads on the world size that wrote it
    # What the planner (plan.py) and the disk check (checkpoint.py) know of this engine, asked through the registry:
    # (shape, GPUs, precision, offload, accumulating) -> (bytes per GPU held through forward and backward, gradients)
    states: Callable[[Shape, int, str, bool, bool], tuple[float, float]]
    # (precision, n_params) -> (bytes of its stock HF weights, bytes of its resumable state) in one checkpoint
    checkpoint_bytes: Callable[[str, int], tuple[int, int]]
    # precision -> what its activations are made of, for plan.activations: "autocast" (fp32 weights under bf16
    # autocast keep an fp32 residual stream), "bf16" (16-bit weights), or "fp32"
    compute: Callable[[str], str] = lambda precision: "fp32" if precision == "fp32" else "bf16"
    # (shape, GPUs, precision) -> buffers outside the states it keeps beside the activations (bytes per GPU)
    workspace: Callable[[Shape, int, str], float] = lambda s, gpus, precision: 0.0
    # (shape, GPUs, micro-batches per step, precision, offload, reshard after forward) -> its collectives in one step
    comm: Callable[[Shape, int, int, str, bool, bool], list[Traffic]] = lambda s, gpus, accum, precision, offload, reshard: []
    # (shape, precision) -> bytes per GPU it holds more with --no-fsdp-reshard-after-forward (parameters kept gathered
    # from forward to backward); None: the engine has no such choice
    kept_gathered: Callable[[Shape, str], float] | None = None
    can_offload: bool = False  # --offload / --fsdp-cpu-offload moves state to the CPU: a planner row of its own
    alone_mfu: float | None = None  # measured MFU on one GPU where it has nothing to shard: train.py warns and steers
    help: str = ""

    def plan_key(self, name: str, offload: bool) -> str:
        """This engine's row in the memory planner (plan.py)."""
        return f"{name}_offload" if offload and self.can_offload else name


def autocast(device: torch.device, precision: str) -> ContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
