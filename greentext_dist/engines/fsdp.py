"""FSDP2 (torch.distributed.fsdp.fully_shard), applied in torchtitan's order: checkpointing (done when the
model is built), then one FSDP unit per GPT2Block, then the root. The root unit holds wte, wpe, ln_f and
the lm_head, which is the same Parameter as wte, so the tie survives sharding."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from greentext_dist.dist import DistEnv
from greentext_dist.engines.base import EngineSpec, Traffic
from greentext_dist.engines.ddp import LocalEngine
from greentext_dist.errors import UserError
from greentext_dist.lora import adapted, trainable_state
from greentext_dist.model import apply_compile, build_model, pad_vocab, save_hf
from greentext_dist.optim import build_optimizer


def apply_fsdp(model, env: DistEnv, precision: str, reshard_after_forward: bool, cpu_offload: bool):
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


class FSDPEngine(LocalEngine):
    """Forward, backward, clip-and-step and lr as every local engine; sharding, sync and state are FSDP's own."""

    sharded = True

    def __init__(self, model, optimizer, env: DistEnv, reshard_after_forward: bool, cpu_offload: bool):
        super().__init__(model, model, optimizer, env, None)  # the MixedPrecisionPolicy casts parameters: no autocast
        self.name = f"fsdp2 ({'reshard' if reshard_after_forward else 'keep'} after forward{', cpu offload' if cpu_offload else ''})"

    def accumulating(self, last: bool):
        # Reduce-scatter gradients only on the last micro-batch of the step.
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def state_dicts(self) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if self.module.config.tie_word_embeddings:  # one tensor under two names: DCP would write it twice
            model_sd.pop("lm_head.weight", None)
        if adapted(self.module):  # LoRA: the frozen base is built from its source again on resume
            model_sd = trainable_state(self.module, model_sd)
        return model_sd, optim_sd

    def save_state(self, folder: Path) -> None:
        """Sharded: each rank writes its own shards of the fp32 model and optimizer state, no gather."""
        model_sd, optim_sd = self.state_dicts()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))

    def load_state(self, folder: Path) -> None:
        model_sd, optim_sd = self.state_dicts()
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        if self.module.config.tie_word_embeddings and "transformer.wte.weight" in state["model"]:
            state["model"]["lm_head.weight"] = state["model"]["transformer.wte.weight"]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not adapted(self.module)))

    def export_hf(self, folder: Path, max_shard_size: str) -> None:
        # Full state gathered to rank 0's CPU only (cpu_offload): no rank holds a second full copy on its GPU.
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            if self.module.config.tie_word_embeddings:
                sd.pop("lm_head.weight", None)
            save_hf(self.module, folder, max_shard_size, state_dict=sd)


def build(cfg, env: DistEnv, grad_accum: int, weights: str | None, config) -> FSDPEngine:
    t = cfg.train
    if t.fsdp_cpu_offload and env.device.type != "cuda":
        raise UserError("--fsdp-cpu-offload moves sharded state from the GPU to the CPU, but this run has no GPU",
                        "drop --fsdp-cpu-offload on a CPU-only machine (or run where torch.cuda.is_available())")
    model = build_model(cfg.model, weights_from=weights, seed=t.seed).to(env.device)
    pad_vocab(model, cfg.model.pad_vocab or 1)
    if cfg.model.compile:
        apply_compile(model)
    apply_fsdp(model, env, t.precision, t.fsdp_reshard_after_forward, t.fsdp_cpu_offload)
    optimizer = build_optimizer(model, cfg.optim, env.device)  # after sharding: it must hold the sharded params
    return FSDPEngine(model, optimizer, env, t.fsdp_reshard_after_forward, t.fsdp_cpu_offload)


def states(s, gpus: int, precision: str, offload: bool, accumulating: bool) -> tuple[float, float]:
    """fp32 shards of the weights and AdamW moments (on the CPU with offload) and two bf16 blocks gathered at a time;
    fp32 gradient shards. Under accumulation (set_requires_gradient_sync(False) until the last micro-batch) FSDP2
    keeps every gradient unsharded in fp32 (_fsdp_param.py: to_accumulated_grad_if_needed), on the GPU even with CPU
    offload: 4n per GPU, not 4n/G (XL on 8 GPUs: 5.1 GiB more). Counted on the real engine at world 8 and 64
    (tests/test_cluster.py, on torch's fake process group)."""
    n, t, gathered = s.n_params, s.train_params, 2 * 2 * (s.largest_layer + s.block_params)
    held = gathered + (0.0 if offload else (4 * n + 8 * t) / gpus)  # LoRA: moments of the adapter only
    return held, 4 * t if accumulating else (0.0 if offload else 4 * t / gpus)


def comm(s, gpus: int, accum: int, precision: str, offload: bool, reshard: bool) -> list[Traffic]:
    """Each micro-batch gathers every unit's 16-bit parameters in forward (prefetching the next block) and, resharded
    after forward, again in backward; the fp32 gradients are reduce-scattered once, in the last micro-batch's backward
    (set_requires_gradient_sync). The root unit (wte, wpe, ln_f) is gathered first and reduced last: its collectives
    have no compute to hide behind. Counted on the real engine by scripts/bench_comm.py."""
    if gpus == 1:
        return []
    width, units = 2 if precision == "bf16" else 4, s.n_layer + 1  # a launch per unit: each block, and the root
    root = s.n_params - s.n_layer * s.block_params
    out = [Traffic("all_gather", "parameters, forward", width * s.n_params * accum, "forward", accum, width * root, units * accum)]
    if reshard:
        out.append(Traffic("all_gather", "parameters, backward", width * s.n_params * accum, "backward", accum, 0.0, units * accum))
    out.append(Traffic("reduce_scatter", "gradients, fp32, last micro-batch", 4 * s.train_params, "backward", 1,
                       4 * root if s.trainable is None else 0.0, units))  # LoRA: the root (embeddings) is frozen
    return out


SPEC = EngineSpec(build, needs_process_group=True, compile_by_default=True, can_pad_vocab=True, same_world_to_resume=False,
                  states=states, comm=comm, kept_gathered=lambda s, precision: (2 if precision == "bf16" else 4) * s.n_params,
                  checkpoint_bytes=lambda precision, n: (4 * n, 12 * n),  # DCP: fp32 weights and moments, head once
                  can_offload=True, help="PyTorch FSDP2: fully_shard per block; resumes on any world size")
