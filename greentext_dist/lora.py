"""LoRA with peft: the adapter is injected into the model in place (it stays a GPT2LMHeadModel, so every engine wraps
and shards it as before), the base is frozen, and only the adapter reaches the optimizer and the resumable state.
A checkpoint's weights are a stock GPT-2 with the adapter merged in, and `adapter/` beside them is the adapter itself
in PEFT's format (with `base/`, the frozen base, where the base was drawn at random and lives nowhere else)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch

from greentext_dist.config import ModelConfig, lora_targets
from greentext_dist.errors import UserError

ADAPTER = "adapter"
SCRATCH_BASE = "base"  # inside an adapter folder: its base, when the run started from random weights
LORA_SEED = 0x10_0A  # lora_A's generator is seeded apart from the base model's


def lora_config(m: ModelConfig, base: str | None):
    from peft import LoraConfig

    # GPT-2's projections are transformers' Conv1D, whose weight is (in, out): peft needs fan_in_fan_out for them.
    return LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha or 2 * m.lora_rank, lora_dropout=m.lora_dropout,
                      target_modules=lora_targets(m), fan_in_fan_out=True, bias="none", base_model_name_or_path=base)


def apply_lora(model, m: ModelConfig, seed: int, base: str | None, gather=None) -> None:
    """Freeze `model` and add the adapter. `base`: the hub id or folder of the base weights (None: random init).
    lora_A is drawn from its own generator in parameter order, the same under every engine (ZeRO-3's partitioned build
    included); lora_B starts at zero, as peft does, so the first step sees the base exactly."""
    if not m.lora_rank:
        return
    from peft import inject_adapter_in_model

    from transformers.pytorch_utils import Conv1D

    fix = "use c_attn (attention's q, k, v), c_proj (attention and MLP outputs) or c_fc (MLP input)"
    for target in lora_targets(m):
        found = [mod for name, mod in model.named_modules() if name == target or name.endswith("." + target)]
        if not found:
            raise UserError(f"--lora-targets {target} matches no module of GPT-2", fix)
        if not all(isinstance(mod, Conv1D) for mod in found):
            # The embedding is also the LM head (one tied tensor): an adapter on it would untie them in the merge.
            raise UserError(f"--lora-targets {target} is not one of GPT-2's projections: LoRA here adapts those only", fix)
    inject_adapter_in_model(lora_config(m, base), model)
    g = torch.Generator().manual_seed(seed * 1_000_003 + LORA_SEED)
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            partitioned = gather is not None and hasattr(p, "ds_id")  # ZeRO-3
            shape = p.ds_shape if partitioned else p.shape
            with (gather([p]) if partitioned else contextlib.nullcontext()), torch.no_grad():
                p.copy_(torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=g))


def is_lora(state: dict) -> bool:
    return any(".lora_A." in k for k in state)


def adapted(model) -> bool:
    """The model carries a frozen base and an adapter: the resumable state holds the trainable parameters only."""
    return hasattr(model, "peft_config")


def trainable_state(model, state: dict) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def split(state: dict) -> tuple[dict, dict]:
    """(the base's weights under GPT-2's names, the adapter's under PEFT's) of a model state with an injected adapter."""
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    adapter = {"base_model.model." + k.replace(".default.", "."): v for k, v in state.items() if ".lora_" in k}
    return base, adapter


@contextlib.contextmanager
def plain_transformers():
    """While a ZeRO-3 config is registered, transformers builds every model under deepspeed.zero.Init (a collective)
    and peft gathers parameters to merge: the export runs on rank 0 alone, on whole CPU tensors, so neither may."""
    from transformers.integrations import deepspeed as hf_deepspeed

    kept, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = kept


def export(model, folder: Path, state: dict, save_base) -> tuple[object, dict]:
    """Write `folder/adapter` (PEFT's files; `adapter/base` as well when the base exists nowhere else, through
    `save_base(model, folder, state)`) and return the stock GPT-2 with the adapter merged in, by peft, and its state."""
    with plain_transformers():
        return _export(model, folder, state, save_base)


def _export(model, folder: Path, state: dict, save_base) -> tuple[object, dict]:
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    base_state, adapter = split(state)
    config = model.peft_config["default"]
    out = folder / ADAPTER
    out.mkdir(parents=True, exist_ok=True)
    stock = GPT2LMHeadModel._from_config(model.config, dtype=torch.float32)
    missing, unexpected = stock.load_state_dict({k: v.to("cpu", torch.float32) for k, v in base_state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    stock.tie_weights()
    if hasattr(model, "true_vocab_size"):
        stock.true_vocab_size = model.true_vocab_size
    if config.base_model_name_or_path is None:
        save_base(stock, out / SCRATCH_BASE, stock.state_dict())
    dataclasses.replace(config, base_model_name_or_path=config.base_model_name_or_path or SCRATCH_BASE).save_pretrained(str(out))
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"))
    merged = PeftModel.from_pretrained(stock, str(out)).merge_and_unload()
    if hasattr(stock, "true_vocab_size"):
        merged.true_vocab_size = stock.true_vocab_size
    return merged, merged.state_dict()


def adapter_base(folder) -> str | None:
    """The base model an adapter folder names, resolved (None: `folder` holds no adapter)."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder} is a LoRA adapter that names no base model", "set base_model_name_or_path in its adapter_config.json")
    return str(folder / base) if (folder / base).is_dir() else base


def load_adapted(folder, base_model):
    """A stock GPT-2: `base_model` (the one adapter_base(folder) names) with the folder's adapter merged in."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
