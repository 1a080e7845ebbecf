"""GPT-2 presets and model construction: every model is a stock `transformers` GPT2LMHeadModel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from greentext_dist.attention import register, uses_flex
from greentext_dist.config import PRESETS, ModelConfig
from greentext_dist.errors import UserError, first_line
from greentext_dist.hub import MODEL_FILES, download, is_local, shared_download

def init_kind(cfg: ModelConfig) -> str:
    return cfg.init or ("scratch" if cfg.model == "tiny" else "pretrained")


def source_of(cfg: ModelConfig) -> str | None:
    """Where weights come from: a local dir, a hub id, or None for random init."""
    if cfg.model_path:
        return cfg.model_path
    return PRESETS[cfg.model][0] if init_kind(cfg) == "pretrained" else None


def preset_config(name: str, dropout: float) -> GPT2Config:
    _, n_layer, n_embd, n_head = PRESETS[name]
    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def check_gpt2_dir(path: str, flag: str) -> GPT2Config:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        if (Path(path) / "final" / "config.json").is_file() or (Path(path) / "checkpoints").is_dir():
            raise UserError(f"{flag} {path} is a training run's folder, not a model", f"pass {Path(path) / 'final'} or {Path(path) / 'checkpoints'}/step-N")
        raise UserError(f"{flag} {path} is not a Hugging Face model directory (no config.json)",
                        "point it at a folder written by save_pretrained, e.g. OUT/final")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e})", "restore config.json from the original checkpoint") from None
    if model_type != "gpt2":
        raise UserError(f"{flag} {path} holds a '{model_type}' model, not GPT-2", "point it at a GPT-2 checkpoint")
    if not any(Path(path).glob("*.safetensors")):
        raise UserError(f"{flag} {path} has no .safetensors weights", "re-export it with save_pretrained(safe_serialization=True)")
    return GPT2Config.from_pretrained(path)


def check_matches_preset(config: GPT2Config, cfg: ModelConfig, where: str) -> None:
    _, n_layer, n_embd, n_head = PRESETS[cfg.model]
    got = (config.n_layer, config.n_embd, config.n_head)
    if not cfg.model_path and got != (n_layer, n_embd, n_head):
        raise UserError(
            f"{where} holds a model with {got[0]} layers x {got[1]} wide, but --model {cfg.model} is {n_layer} x {n_embd}",
            "pass the --model that trained it, or a fresh --output-dir",
        )


def hub_weights(cfg: ModelConfig) -> str | None:
    """Collective: the HF-cache folder of the hub weights this run starts from (the preset's, or a hub id given as
    --model-path), downloaded by rank 0 at one commit for every rank (hub.shared_download); None when the weights
    come from a local folder or random init."""
    src = source_of(cfg)
    if not src:
        return None
    # Every rank calls it, local or not: the ranks agree there whether the path exists (a folder on one node's disk
    # only is one line, not ranks that part ways and wait for each other).
    folder = shared_download(src, MODEL_FILES, instead="pass --model-path DIR" + ("" if cfg.model_path else ", or train from random init: --init scratch"))
    return None if is_local(src) else folder


def model_config(cfg: ModelConfig, weights_from: str | None = None) -> GPT2Config:
    """The shape of the model build_model will make, read without loading any weights."""
    src = weights_from or cfg.model_path
    if src:
        return check_gpt2_dir(src, "checkpoint" if weights_from else "--model-path")
    return preset_config(cfg.model, cfg.dropout)  # the hub's gpt2* configs have exactly these shapes


def init_scratch(model: GPT2LMHeadModel, seed: int, gather=None) -> None:
    """GPT-2's initialisation (normal 0.02, residual projections / sqrt(2 x layers), LayerNorm 1/0), drawn per
    module from a generator seeded by the module's name: the same weights under every engine, including
    ZeRO-3, where each module is gathered on its own (`gather`) so the model is never whole on a rank."""
    import contextlib
    import zlib

    std, proj_std = model.config.initializer_range, model.config.initializer_range / math.sqrt(2 * model.config.n_layer)
    seen = set()
    for name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        with (gather([p for _, p in params]) if gather else contextlib.nullcontext()), torch.no_grad():
            for n, p in params:
                if isinstance(module, torch.nn.LayerNorm):
                    p.fill_(1.0 if n == "weight" else 0.0)
                elif n == "bias":
                    p.zero_()
                else:
                    s = proj_std if name.endswith("c_proj") else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)


def build_model(cfg: ModelConfig, weights_from: str | None = None, seed: int = 0, gather=None) -> GPT2LMHeadModel:
    """weights_from: a checkpoint to resume; otherwise --model-path, the hub id, or random init."""
    drop = dict(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    attn = register() if cfg.attention == "flex" else "sdpa"
    src = weights_from or source_of(cfg)
    if src is None:
        model = GPT2LMHeadModel._from_config(preset_config(cfg.model, cfg.dropout), attn_implementation=attn, dtype=torch.float32)
        init_scratch(model, seed, gather)
    else:
        if is_local(src):
            check_gpt2_dir(src, "checkpoint" if weights_from else "--model-path")
        else:
            src = download(src, MODEL_FILES)  # a caller that did not fetch them for the job (hub_weights)
        model = load_weights(src, dict(attn_implementation=attn, dtype=torch.float32, **drop))
    if cfg.lora_rank:
        from greentext_dist.lora import apply_lora

        # The base is the same whether this run starts or resumes: a LoRA checkpoint's weights are merged ones,
        # so a resume builds from the base again (train.setup) and loads the adapter from the resumable state.
        base = source_of(cfg)
        apply_lora(model, cfg, seed, base=str(Path(base).resolve()) if base and is_local(base) else base, gather=gather)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: gradient_...
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_compile(model: GPT2LMHeadModel) -> None:
    """torch.compile per block, after checkpointing wraps the blocks and before FSDP/DeepSpeed wrap them
    (torchtitan's order): each block compiles once and is reused by all layers of the same shape."""
    for block in model.transformer.h:
        block.compile()


def load_weights(src: str, kwargs: dict) -> GPT2LMHeadModel:
    """from_pretrained, from safetensors only (never a pickle), with damaged files reported as such."""
    try:
        return GPT2LMHeadModel.from_pretrained(src, use_safetensors=True, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, OSError, shape mismatches: all mean the files are damaged
        raise UserError(f"could not load the weights in {src}: {type(e).__name__}: {first_line(e)}",
                        "the files are damaged or truncated: re-download or re-export them, or resume from an older checkpoint") from None


def num_params(model: torch.nn.Module) -> int:
    """Parameters of the model as GPT-2 defines it: rows added by pad_vocab are not counted."""
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3 partitions
    return n - (model.config.vocab_size - true_vocab(model)) * model.config.n_embd


def true_vocab(model) -> int:
    """GPT-2's vocabulary (50,257): the width of the logits the loss sees, whatever pad_vocab did."""
    return getattr(model, "true_vocab_size", model.config.vocab_size)


def pad_vocab(model: GPT2LMHeadModel, multiple: int) -> None:
    """Widen the tied embedding / LM head to a multiple of `multiple` rows (50,257 -> 50,304 for 64), inside
    training only: 50,257 is odd, so the head's three matmuls run on unaligned strides (nanoGPT's trick).
    The new rows are zero and stay zero: no token id reaches them, engines hand the loss only the first
    true_vocab logits, so they get no gradient, and AdamW keeps a zero row zero. save_hf exports stock GPT-2."""
    wte = model.transformer.wte
    v, d = wte.weight.shape
    padded = -(-v // multiple) * multiple
    if multiple <= 1 or padded == v:
        return
    with torch.no_grad():
        w = torch.zeros(padded, d, dtype=wte.weight.dtype, device=wte.weight.device)
        w[:v] = wte.weight
    wte.weight = torch.nn.Parameter(w, requires_grad=wte.weight.requires_grad)  # frozen under LoRA
    wte.num_embeddings = padded
    model.lm_head.weight = wte.weight  # the tie, as GPT-2 has it
    model.lm_head.out_features = padded
    model.config.vocab_size = padded
    model.true_vocab_size = v


def lm_logits(model, x: torch.Tensor, position_ids: torch.Tensor | None, vocab: int | None = None) -> torch.Tensor:
    """The one forward for training, validation and evaluation, with per-post positions and mask for isolated
    packing. Logits over the first `vocab` tokens, or all the model's columns when None: engines return those,
    and the loss cuts a padded vocabulary's extra columns itself (`token_loss_sum(..., vocab)`), so they never
    reach a loss or get a gradient."""
    from greentext_dist.data import isolated_inputs

    logits = model(input_ids=x, use_cache=False, **isolated_inputs(position_ids, flex=uses_flex(model))).logits
    return logits if vocab is None else logits[..., :vocab]


def save_hf(model: GPT2LMHeadModel, folder, max_shard_size: str, state_dict: dict | None = None) -> None:
    """save_pretrained as sharded safetensors, always as stock GPT-2: rows added by pad_vocab are cut off; a LoRA
    adapter is merged in, and written beside the weights in PEFT's format (folder/adapter)."""
    from greentext_dist.lora import export, is_lora

    if is_lora(state := model.state_dict() if state_dict is None else state_dict):
        model, state_dict = export(model, Path(folder), state, lambda m, f, sd: save_hf(m, f, max_shard_size, sd))
    v, padded = true_vocab(model), model.config.vocab_size
    if v == padded:
        model.save_pretrained(folder, state_dict=state_dict, max_shard_size=max_shard_size, safe_serialization=True)
        return
    sd = model.state_dict() if state_dict is None else state_dict
    sd = {k: t[:v].clone() if k == "transformer.wte.weight" else t for k, t in sd.items() if k != "lm_head.weight"}
    model.config.vocab_size = v
    try:
        model.save_pretrained(folder, state_dict=sd, max_shard_size=max_shard_size, safe_serialization=True)
    finally:
        model.config.vocab_size = padded
