"""Engines wrap the model and its optimizer; the training loop talks to every engine the same way.

The protocol (engines/base.py, `Engine`), as train.py uses it:

    logits = engine.forward(x, position_ids)       # autocast inside; columns past engine.vocab (a padded
    loss = token_loss_sum(logits, y, engine.vocab)  # vocabulary) are cut inside the compiled loss
    with engine.accumulating(last):                # gradients sync only on the step's last micro-batch
        engine.backward(loss)                      # loss already divided by the step's global target count
    grad_norm, applied = engine.step(grad_clip, finite_loss)   # clip + update, never for a non-finite step
    engine.set_lr(lr); engine.train(mode)
    engine.save_state(dir); engine.load_state(dir)             # resumable optimizer/engine state, its own format
    engine.export_hf(dir, max_shard_size)                      # stock HF GPT-2 safetensors (collective)
    with engine.generation_autocast(): engine.module.generate(..., synced_gpus=engine.sharded)
    engine.name, engine.module, engine.env, engine.can_skip, engine.sharded, engine.vocab

The registry below (REGISTRY; ENGINES maps each name to its EngineSpec) is the one list of engines: `--backend` choices, `auto`, the planner's row, the process
group and the defaults (compile, vocabulary padding, resume rules) all read it. Adding an engine is one
module with a `build(cfg, env, grad_accum, weights, config) -> Engine` and an `EngineSpec`, plus one line
here; tests/test_engine_contract.py runs every entry through the same checks.
"""

from __future__ import annotations

import importlib

# name -> (module, its EngineSpec attribute). The engines import torch, DeepSpeed and transformers (seconds), so the
# registry is built on first use: `--help` and a mistyped flag are answered before any of them loads.
REGISTRY = {
    "ddp": ("ddp", "SPEC"),
    "zero2": ("deepspeed", "ZERO2"),
    "zero3": ("deepspeed", "ZERO3"),
    "fsdp": ("fsdp", "SPEC"),
}
NAMES = tuple(REGISTRY)

__all__ = ["ENGINES", "Engine", "EngineSpec", "NAMES", "resolve_backend"]


def __getattr__(name: str):
    if name == "ENGINES":
        engines = {key: getattr(importlib.import_module(f"greentext_dist.engines.{mod}"), attr) for key, (mod, attr) in REGISTRY.items()}
        globals()["ENGINES"] = engines
        return engines
    if name in ("Engine", "EngineSpec"):
        from greentext_dist.engines import base

        return getattr(base, name)
    if name in ("ddp", "deepspeed", "fsdp"):
        return importlib.import_module(f"greentext_dist.engines.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_backend(cfg) -> str:
    """--backend, with `auto` resolved from the launcher: ZeRO under `deepspeed` (ZeRO-3 only where several GPUs
    can share large/xl; on one GPU it has nothing to shard and is ~5x slower than ZeRO-2), else DDP."""
    import os

    from greentext_dist.errors import UserError

    if cfg.train.backend != "auto":
        return cfg.train.backend
    if cfg.train.ds_config or cfg.train.offload:
        raise UserError("--ds-config/--offload need a DeepSpeed engine", "add --backend zero2 or --backend zero3")
    if "CROSS_SIZE" in os.environ and "LOCAL_SIZE" in os.environ:  # the deepspeed launcher
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        return "zero3" if several and cfg.model.model in ("large", "xl") else "zero2"
    return "ddp"
