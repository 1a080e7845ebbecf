"""One typed config tree. Defaults < `--config FILE` (TOML or JSON, one table per section)
< an `accelerate launch` config's engine and precision < CLI flags.

Every field is a flat CLI flag (`lr` -> `--lr`, `micro_batch_size` -> `--micro-batch-size`),
so field names are unique across sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from greentext_dist.errors import OneLineParser, UserError, first_line


# name -> (hub id, layers, width, heads). All: context 1024, vocab 50,257.
PRESETS = {
    "tiny": (None, 2, 64, 4),  # ~3.4M params, almost all in the embedding; for tests and the CPU demo
    "small": ("gpt2", 12, 768, 12),
    "medium": ("gpt2-medium", 24, 1024, 16),
    "large": ("gpt2-large", 36, 1280, 20),
    "xl": ("gpt2-xl", 48, 1600, 25),
}



def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    model: str = _f("small", "GPT-2 size", ["tiny", "small", "medium", "large", "xl"])
    init: str | None = _f(None, "pretrained|scratch (default: pretrained, scratch for tiny)", ["pretrained", "scratch"])
    model_path: str | None = _f(None, "HF GPT-2 directory or hub id to start from (overrides --model's hub id)")
    tokenizer: str = _f("gpt2", "tokenizer hub id or local directory")
    dropout: float = _f(0.1, "dropout on embeddings, attention and residuals")
    gradient_checkpointing: bool | None = _f(None, "recompute activations in backward to save memory (default: on only when the planner says the model would not fit without it)")
    compile: bool | None = _f(None, "torch.compile each transformer block and the loss (default: on for ddp/fsdp on a GPU, where it measured 1.7-2.9x faster; off on CPU)")
    attention: str = _f("sdpa", "attention kernel under --packing isolated: sdpa (a dense per-post mask) or flex (FlexAttention, skips the masked blocks; GPU, --dropout 0)", ["sdpa", "flex"])
    pad_vocab: int | None = _f(None, "inside training, widen the embedding/LM head to a multiple of this many rows (64: 50,257 -> 50,304, aligned for tensor cores); checkpoints stay stock 50,257-wide GPT-2 (default: 64 on a GPU except zero3, else 1 = off)")
    lora_rank: int = _f(0, "train a LoRA adapter of this rank on a frozen base (peft); 0: full fine-tuning")
    lora_alpha: float | None = _f(None, "LoRA scale numerator: the update is alpha / rank x B A (default: 2 x --lora-rank)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input")
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"], metadata={
        "help": "module names to adapt (repeatable or comma-separated; default: c_attn, c_proj and c_fc, every GPT-2 projection)", "choices": None})


@dataclass
class DataConfig:
    dataset: str = _f("DarwinAnim8or/greentext", "hub id, local file (.jsonl .json .txt .parquet .csv .arrow) or folder (also one written by datasets' save_to_disk)")
    text_field: str | None = _f(None, "column holding the post (default: text, or prompt+completion)")
    val_dataset: str | None = _f(None, "separate validation set (default: hold out --val-fraction of posts)")
    val_fraction: float = _f(0.05, "share of posts held out for validation, chosen by a hash of the post")
    seq_len: int = _f(1024, "tokens per packed training row")
    cache_dir: str | None = _f(None, "where token stores live (default: $GREENTEXT_CACHE, else ~/.cache/greentext_dist/tokens); see python -m greentext_dist.prepare")
    mix: list[str] = field(default_factory=list, metadata={"help": "NAME_OR_PATH=WEIGHT (repeatable): interleave another text source into training by weight, e.g. hellaswag=0.1", "choices": None})
    packing: str = _f("concat", "concat: posts joined by <|endoftext|>; isolated: also restart positions and block attention at every post", ["concat", "isolated"])
    prefetch: int = _f(8, "micro-batches read from the token store ahead, in a background thread (0: in the training loop)")


@dataclass
class OptimConfig:
    lr: float = _f(2.5e-4, "peak learning rate")
    min_lr: float = _f(2.5e-5, "learning rate at the end of cosine decay")
    warmup_steps: int | None = _f(None, "linear warmup steps (default: 5%% of the run)")
    weight_decay: float = _f(0.01, "AdamW weight decay, applied to tensors of 2+ dimensions only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")


@dataclass
class TrainConfig:
    backend: str = _f("auto", "engine from greentext_dist/engines (auto: zero2, or zero3 for large/xl on several GPUs, under the deepspeed launcher; else ddp)")
    ds_config: str | None = _f(None, "DeepSpeed JSON (default: ds_configs/<backend>.json); \"auto\" fields are filled from the CLI")
    offload: bool = _f(False, "DeepSpeed: offload optimizer state (ZeRO-2) and parameters too (ZeRO-3) to CPU")
    fsdp_reshard_after_forward: bool = _f(True, "FSDP: free gathered parameters after forward (like ZeRO-3; off is like ZeRO-2)")
    fsdp_cpu_offload: bool = _f(False, "FSDP: keep sharded parameters, gradients and optimizer state on the CPU")
    global_batch_size: int = _f(512, "sequences per optimizer step, over all ranks and accumulation")
    micro_batch_size: int = _f(8, "sequences per forward pass per rank")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides --epochs; default: 300 or 3 epochs, whichever is longer)")
    epochs: float | None = _f(None, "passes over the training data (default: see --max-steps)")
    halt_at_step: int | None = _f(None, "stop after this step with a checkpoint, keeping the schedule of the full run")
    precision: str = _f("bf16", "bf16 autocast with fp32 master weights, or fp32", ["bf16", "fp32"])
    seed: int = _f(1337, "seed for init, dropout and data order")
    log_every: int = _f(1, "steps between metric lines")
    eval_every: int = _f(50, "steps between validation passes (0: only at the end)")
    eval_batches: int | None = _f(None, "cap on validation micro-batches per rank (default: all)")
    early_stopping_patience: int = _f(0, "stop after this many validations in a row without a new best val loss (0: never)")
    max_bad_steps: int = _f(0, "steps with a non-finite loss or gradient norm to skip before stopping (0: stop at the first)")
    sample_every: int = _f(0, "steps between greentext samples for a fixed prompt set, written to OUT/samples.jsonl (0: off)")
    report_to: str = _f("none", "also send metrics to tensorboard and/or wandb (comma list; rank 0; wandb is offline unless "
                        "WANDB_API_KEY or WANDB_MODE=online)")
    peak_tflops: float | None = _f(None, "device bf16 peak for MFU (default: from the GPU name; none on CPU)")


@dataclass
class CheckpointConfig:
    output_dir: str = _f("out", "run folder: checkpoints/, final/, metrics.jsonl")
    save_every: int = _f(0, "steps between checkpoints (0: by time only, see --save-every-minutes)")
    save_every_minutes: float = _f(30.0, "also checkpoint when this many minutes passed since the last save, so a crash, OOM or "
                                   "lost node costs at most that much work (0: off)")
    keep_last: int = _f(2, "checkpoints to keep")
    max_shard_size: str = _f("2GB", "largest safetensors shard")
    final: str = _f("best", "OUT/final holds the weights with the lowest validation loss (best; kept in checkpoints/best outside the rotation) "
                    "or of the last step (last); without validation it is always the last", ["best", "last"])
    resume: str = _f("auto", "auto (newest checkpoint in output dir), never, or a checkpoint path")
    overwrite: bool = _f(False, "with --resume never: delete the checkpoints an earlier run left in --output-dir; with --resume of an "
                         "older checkpoint: delete the newer ones and branch from it")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    out = {}
    for name, tp in hints.items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        out[name] = args[0] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else tp
    return out


# Settings that existed once: say what replaced them instead of "unknown".
REMOVED = {"shuffle_buffer": "each epoch is now a full seeded permutation of the posts (the token store), so there is no buffer"}


class _Parser(OneLineParser):
    def error(self, message: str):
        for name, why in REMOVED.items():
            if f"--{name.replace('_', '-')}" in message:
                raise UserError(f"--{name.replace('_', '-')} was removed: {why}", f"drop --{name.replace('_', '-')} from the command")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="greentext_dist.train",
        description="Fine-tune GPT-2 on greentext with DDP, DeepSpeed ZeRO or FSDP.",
        formatter_class=argparse.HelpFormatter,
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it; LOCAL_RANK is read from the environment
    p.add_argument("--config", default=None, help="TOML, YAML or JSON file with [model] [data] [optim] [train] [checkpoint] tables "
                   "(OUT/config.toml of an earlier run works)")
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        group = p.add_argument_group(section.name)
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            tp = types_[f.name]
            # default=SUPPRESS keeps values from --config and accelerate configs unless a flag is given, so the
            # help text states the default itself (argparse's formatter cannot show a suppressed one).
            shown = "" if f.default in (None, dataclasses.MISSING) or "default:" in f.metadata["help"] else f" (default: {f.default})"
            kw = dict(dest=f"{section.name}.{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"] + shown)
            if f.name == "backend":
                from greentext_dist.engines import NAMES  # the registry is the one list of engines

                kw["choices"] = ["auto", *NAMES]
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is list:
                kw.update(action="append", type=str, metavar="SPEC")
            else:
                kw["type"] = tp
                kw["metavar"] = tp.__name__.upper()
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
                if "choices" in kw:
                    kw.pop("metavar")
            group.add_argument(flag, **kw)
    return p


def _apply(cfg: Config, section: str, name: str, value, source: str) -> None:
    sec = getattr(cfg, section, None)
    if name in REMOVED:
        raise UserError(f"{source}: setting '{section}.{name}' was removed: {REMOVED[name]}", f"delete that line from {source}")
    if sec is None or name not in {f.name for f in dataclasses.fields(sec)}:
        raise UserError(f"{source}: unknown setting '{section}.{name}'", "check the spelling against `--help`")
    tp = _field_types(type(sec))[name]
    if tp in (int, float) and not isinstance(value, bool):
        value = _number(value, tp)
    if typing.get_origin(tp) is list:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{source}: '{section}.{name}' must be a list of strings, got {value!r}", 'write e.g. ["hellaswag=0.1"]')
    elif value is not None and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, tp.__name__)
        raise UserError(f"{source}: '{section}.{name}' must be {tp.__name__}, got {value!r}", f"write {what}")
    setattr(sec, name, value)


def _number(value, tp: type):
    """YAML 1.1 (PyYAML) reads `1e-3` and `5e3` as strings, and people write them in every format: a string that is a
    number is taken as one. Anything else is returned as it is, for the type check to name."""
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return value
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist", "pass an existing .toml, .yaml or .json file to --config")
    text = p.read_text()
    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}.get(p.suffix.lower())
    if kind is None:
        raise UserError(f"config file {path} has no .toml, .yaml or .json suffix (the suffix picks the format)",
                        "rename it to end in .toml, .yaml, .yml or .json")
    try:
        if kind == "YAML":
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except Exception as e:  # noqa: BLE001 - tomllib, json and yaml each raise their own error type
        raise UserError(f"config file {path} is not valid {kind}: {first_line(e)}", f"fix the {kind} syntax (the file's suffix picks the format)") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} holds a {type(data).__name__}, not tables of settings", "write [model], [data], ... sections")
    return data


def to_toml(cfg: Config, sources: dict[tuple[str, str], str]) -> str:
    """Every setting, with where its value came from; `--config` reads it back (unset values are comments)."""
    lines = ["# greentext_dist settings of this run; reuse with --config FILE. After each value: where it came from."]
    for section, values in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        for name, value in values.items():
            src = sources.get((section, name), "default")
            if value is None:
                lines.append(f"# {name} = (unset)  # {src}")
            else:
                text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
                lines.append(f"{name} = {text}  # {src}")
    return "\n".join(lines) + "\n"


def accelerate_settings(env=None) -> dict[tuple[str, str], object]:
    """What an `accelerate launch --config_file ...` config asks for, read from the variables it exports.
    accelerate is only the launcher here: its FSDP / DeepSpeed choice selects our own engine."""
    import os

    env = os.environ if env is None else env
    out: dict[tuple[str, str], object] = {}
    on = lambda k: env.get(k, "").lower() == "true"  # noqa: E731
    precision = env.get("ACCELERATE_MIXED_PRECISION")
    if precision == "fp16":
        raise UserError("the accelerate config asks for fp16", "set mixed_precision: bf16 (or no) in it")
    if precision in ("bf16", "no"):
        out[("train", "precision")] = "bf16" if precision == "bf16" else "fp32"
    if on("ACCELERATE_USE_FSDP"):
        out[("train", "backend")] = "fsdp"
        out[("train", "fsdp_reshard_after_forward")] = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        out[("train", "fsdp_cpu_offload")] = on("FSDP_OFFLOAD_PARAMS")
        if on("FSDP_ACTIVATION_CHECKPOINTING"):
            out[("model", "gradient_checkpointing")] = True
    elif on("ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise UserError(f"the accelerate config asks for ZeRO stage {stage}", "use zero_stage: 2 or 3")
        out[("train", "backend")] = f"zero{stage}"
        out[("train", "offload")] = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            out[("train", "ds_config")] = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    return out


def setting_types() -> dict[str, type]:
    """Every setting's name (a flag without its dashes, a keyword of train(...)) and type."""
    return {"config": str} | {name: tp for section in dataclasses.fields(Config) for name, tp in _field_types(section.default_factory).items()}


def as_keywords(e: UserError) -> UserError:
    """The same error for a caller of train(...): settings named as keywords (lr=), not flags (--lr)."""
    import re

    names = set(setting_types())

    def kw(m: re.Match) -> str:
        name = m.group(2).replace("-", "_")
        if m.group(1) and name in names:
            return f"{name}=False"
        return f"{name}=" if name in names else m.group(0)

    word = lambda t: re.sub(r"--(no-)?([a-z][a-z0-9-]*)", kw, t).replace("bad command line", "bad setting")  # noqa: E731
    help_ = f"see `{build_parser().prog} --help`"
    return UserError(word(e.problem), word(e.fix.replace(help_, "\0")).replace("\0", API_HELP))


API_HELP = "every flag of `greentext-train --help` is a keyword: --max-steps 3 is max_steps=3"


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_args_with_sources(argv)[0]


def parse_args_with_sources(argv: list[str] | None = None) -> tuple[Config, dict[tuple[str, str], str]]:
    """The config, and for every value not left at its default where it came from (file, accelerate, flag)."""
    args = build_parser().parse_args(argv)
    cfg, sources = Config(), {}
    if args.config:
        for section, values in load_file(args.config).items():
            if not isinstance(values, dict):
                raise UserError(f"{args.config}: '{section}' must be a table of settings", "see the README's config example")
            for name, value in values.items():
                _apply(cfg, section, name, value, args.config)
                sources[(section, name)] = f"file {args.config}"
    for (section, name), value in accelerate_settings().items():
        setattr(getattr(cfg, section), name, value)
        sources[(section, name)] = "accelerate config"
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".")
            setattr(getattr(cfg, section), name, value)
            sources[(section, name)] = "flag"
    expand_home(cfg)
    validate(cfg)
    return cfg, sources


PATHS = {"model": ("model_path", "tokenizer"), "data": ("dataset", "val_dataset", "cache_dir"), "train": ("ds_config",),
         "checkpoint": ("output_dir", "resume")}


def home(value):
    """'~/...' is the home folder, as the shell would make it; anything else is returned as it is."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def expand_home(cfg: Config) -> None:
    """Path settings through `home`: a config file or a quoted flag passes the '~' through (and --output-dir '~/run'
    would create a folder named '~')."""
    for section, names in PATHS.items():
        sec = getattr(cfg, section)
        for name in names:
            setattr(sec, name, home(getattr(sec, name)))
    cfg.data.mix = [home(m) for m in cfg.data.mix]


def validate(cfg: Config) -> None:
    t, o, d = cfg.train, cfg.optim, cfg.data
    positive = {
        "--global-batch-size": t.global_batch_size, "--micro-batch-size": t.micro_batch_size,
        "--seq-len": d.seq_len, "--lr": o.lr, "--log-every": t.log_every,
        "--keep-last": cfg.checkpoint.keep_last,
    }
    if cfg.model.pad_vocab is not None:
        positive["--pad-vocab"] = cfg.model.pad_vocab
    for flag in ("max_steps", "epochs", "halt_at_step", "eval_batches", "peak_tflops"):
        if getattr(t, flag) is not None:
            positive["--" + flag.replace("_", "-")] = getattr(t, flag)
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(section.default_factory):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + f.name.replace("_", "-")
                raise UserError(f"{flag} must be a finite number, got {value}", f"pass a number to {flag}")
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}", f"pass a value above 0 to {flag}")
    for flag, value in {"--min-lr": o.min_lr, "--weight-decay": o.weight_decay, "--grad-clip": o.grad_clip,
                        "--eval-every": t.eval_every, "--sample-every": t.sample_every, "--max-bad-steps": t.max_bad_steps, "--early-stopping-patience": t.early_stopping_patience, "--save-every": cfg.checkpoint.save_every,
                        "--save-every-minutes": cfg.checkpoint.save_every_minutes,
                        "--warmup-steps": o.warmup_steps or 0, "--prefetch": d.prefetch}.items():
        if value < 0:
            raise UserError(f"{flag} must not be negative, got {value}", f"pass 0 or more to {flag}")
    check_attention(cfg.model.attention, d.packing, cfg.model.dropout)
    parse_mix(d.mix)
    from greentext_dist.tracking import parse_report_to

    parse_report_to(t.report_to)
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {d.val_fraction}", "use e.g. 0.05")
    if not 0 <= cfg.model.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.model.dropout}", "use e.g. 0.1")
    check_lora(cfg.model)
    for flag, value in {"--beta1": o.beta1, "--beta2": o.beta2}.items():
        if not 0 <= value < 1:
            raise UserError(f"{flag} must be in [0, 1), got {value}", "use AdamW's usual 0.9 (--beta1) and 0.999 (--beta2)")
    if not 0 <= t.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {t.seed}", "pass e.g. --seed 0")
    if o.min_lr > o.lr:
        raise UserError(f"--min-lr {o.min_lr} is above --lr {o.lr}", "lower --min-lr")
    if cfg.model.model == "tiny" and cfg.model.init == "pretrained" and not cfg.model.model_path:
        raise UserError("--model tiny has no pretrained weights", "use --init scratch, or --model-path DIR")


def lora_targets(m: ModelConfig) -> list[str]:
    return [t.strip() for spec in m.lora_targets for t in spec.split(",") if t.strip()]


def check_lora(m: ModelConfig) -> None:
    if m.lora_rank < 0:
        raise UserError(f"--lora-rank must not be negative, got {m.lora_rank}", "pass 0 (full fine-tuning) or a rank such as 8 or 16")
    if not m.lora_rank:
        return
    if m.lora_alpha is not None and m.lora_alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {m.lora_alpha:g}", f"pass e.g. --lora-alpha {2 * m.lora_rank} (the default)")
    if not 0 <= m.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {m.lora_dropout:g}", "use e.g. 0.05, or 0")
    if not lora_targets(m):
        raise UserError("--lora-targets names no module", "pass e.g. --lora-targets c_attn,c_proj,c_fc (GPT-2's projections)")
    fix = "use c_attn (attention's q, k, v), c_proj (attention and MLP outputs) or c_fc (MLP input)"
    for target in lora_targets(m):  # told before any data is read (the model says it again for dotted names)
        leaf = target.rsplit(".", 1)[-1]
        if leaf in ("wte", "wpe", "lm_head", "ln_1", "ln_2", "ln_f", "attn", "mlp", "h", "transformer"):
            raise UserError(f"--lora-targets {target} is not one of GPT-2's projections: LoRA here adapts those only", fix)
        if leaf not in ("c_attn", "c_proj", "c_fc"):
            raise UserError(f"--lora-targets {target} matches no module of GPT-2", fix)


def check_attention(attention: str, packing: str, dropout: float) -> None:
    """Refuse --attention flex where it would do nothing or cannot train (attention.check adds the device's say)."""
    if attention != "flex":
        return
    if packing != "isolated":
        raise UserError("--attention flex only changes how posts are kept apart under --packing isolated (concat packing "
                        "already runs SDPA's causal flash kernel)", "add --packing isolated, or drop --attention flex")
    if dropout > 0:
        raise UserError(f"--attention flex cannot apply attention dropout (--dropout {dropout:g}): FlexAttention has none",
                        "pass --dropout 0 with it, or keep --attention sdpa")


def parse_mix(specs: list[str]) -> list[tuple[str, float]]:
    """--mix NAME_OR_PATH=WEIGHT (repeatable): each weight is that source's share of the posts read; the
    main --dataset gets the rest."""
    out = []
    for spec in specs:
        name, _, weight = spec.rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not 0 < w < 1:
            raise UserError(f"--mix {spec!r} is not NAME_OR_PATH=WEIGHT with a weight between 0 and 1", "write e.g. --mix hellaswag=0.1")
        out.append((name, w))
    if sum(w for _, w in out) >= 1:
        raise UserError(f"--mix weights add up to {sum(w for _, w in out):g}, leaving nothing for --dataset", "keep their sum below 1")
    return out


def check_shard_size(size: str) -> None:
    """--max-shard-size as save_pretrained reads it, checked now rather than at the first save."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(size) > 0
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"--max-shard-size {size!r} is not a size", "write a number and a unit, e.g. --max-shard-size 2GB (or 500MB)")
