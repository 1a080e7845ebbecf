"""Fine-tune GPT-2 on greentext. One loop for every engine and launcher:

    python greentext_dist/train.py --model small
    torchrun --nproc_per_node 8 greentext_dist/train.py --model medium
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the package beside this folder, and don't let its modules shadow others.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import logging
import math
import os
import time

import torch

from greentext_dist import checkpoint as ckpt
from greentext_dist.config import Config, parse_args
from greentext_dist.data import (
    PackedStream, TrainLoader, DataState, count_corpus, first_example, is_val_post, open_dataset, parse_mix,
    text_getter, with_mix,
    val_batches, val_rows,
)
from greentext_dist.dist import DistEnv, all_reduce_sum, init_distributed, on_main, preflight, shutdown
from greentext_dist.engines.ddp import apply_ddp
from greentext_dist.errors import UserError
from greentext_dist.loss import global_target_count, mean_token_loss, token_loss_sum
from greentext_dist.metrics import MetricsLog
from greentext_dist.model import (
    apply_compile, build_model, check_matches_preset, init_kind, model_config, num_params, pad_vocab, source_of, true_vocab,
)
from greentext_dist.optim import build_optimizer, lr_at, warmup_steps
from greentext_dist import perf, plan as planner, rundir
from greentext_dist.report import write_report
from greentext_dist.signals import GracefulStop
from greentext_dist.tokenizer import load_tokenizer
from greentext_dist.ui import TrainProgress, console, fail, setup_logging, summary_table

log = logging.getLogger("greentext_dist")


def build_streams(cfg: Config, tokenizer) -> tuple[PackedStream, PackedStream | None]:
    d, seed = cfg.data, cfg.train.seed
    ds = open_dataset(d.dataset)
    first = first_example(ds, d.dataset)
    get_text = text_getter(first, d.text_field, d.dataset)
    train_ds, train_get = with_mix(ds, first, get_text, d.mix, seed) if d.mix else (ds, get_text)
    common = dict(seed=seed, shuffle_buffer=d.shuffle_buffer)
    if d.val_dataset:
        vds = open_dataset(d.val_dataset)
        val_get = text_getter(first_example(vds, d.val_dataset), d.text_field, d.val_dataset)
        return PackedStream(train_ds, train_get, tokenizer, d.seq_len, **common), PackedStream(vds, val_get, tokenizer, d.seq_len, shuffle=False, **common)
    train = PackedStream(train_ds, train_get, tokenizer, d.seq_len, keep=lambda t: not is_val_post(t, d.val_fraction), **common)
    if d.val_fraction == 0:
        return train, None
    # Validation is always the held-out posts of --dataset itself, with or without --mix sources.
    val = PackedStream(ds, get_text, tokenizer, d.seq_len, keep=lambda t: is_val_post(t, d.val_fraction), shuffle=False, **common)
    return train, val


def plan_run(cfg: Config, env: DistEnv, corpus: dict) -> dict:
    t = cfg.train
    per_pass = t.micro_batch_size * env.world_size
    if t.global_batch_size % per_pass:
        raise UserError(
            f"--global-batch-size {t.global_batch_size} is not divisible by micro-batch {t.micro_batch_size} x {env.world_size} ranks = {per_pass}",
            f"use a multiple of {per_pass}, e.g. --global-batch-size {max(per_pass, round(t.global_batch_size / per_pass) * per_pass)}",
        )
    rows = corpus["rows"]
    if rows == 0:
        raise UserError(
            f"the training data ({corpus['tokens']} tokens) is shorter than one row of --seq-len {cfg.data.seq_len}",
            "lower --seq-len or add data",
        )
    steps_per_epoch = rows / t.global_batch_size
    epochs = t.epochs if t.epochs is not None else 3.0
    max_steps = t.max_steps if t.max_steps is not None else math.floor(epochs * steps_per_epoch)
    if max_steps == 0:
        raise UserError(
            f"{epochs:g} epoch(s) of {rows} rows give no full step of --global-batch-size {t.global_batch_size}",
            f"raise --epochs to at least {math.ceil(t.global_batch_size / rows)}, lower --global-batch-size, or set --max-steps",
        )
    return {
        "grad_accum": t.global_batch_size // per_pass,
        "tokens_per_step": t.global_batch_size * cfg.data.seq_len,
        "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps,
        "epochs": max_steps / steps_per_epoch,
    }


def resolve_backend(cfg: Config, env: DistEnv) -> str:
    if cfg.train.backend != "auto":
        return cfg.train.backend
    if cfg.train.ds_config or cfg.train.offload:
        raise UserError("--ds-config/--offload need a DeepSpeed engine", "add --backend zero2 or --backend zero3")
    under_deepspeed_launcher = "CROSS_SIZE" in os.environ and "LOCAL_SIZE" in os.environ
    if under_deepspeed_launcher:
        # ZeRO-3 pays only where there is something to shard across: on one GPU it is ~5x slower than ZeRO-2.
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        return "zero3" if several and cfg.model.model in ("large", "xl") else "zero2"
    return "ddp"


def pad_multiple(cfg: Config, env: DistEnv) -> int:
    """--pad-vocab, by default 64 on a GPU (measured in docs/benchmarks.md) and off on CPU and ZeRO-3."""
    if cfg.model.pad_vocab is not None:
        return cfg.model.pad_vocab
    return 64 if env.device.type == "cuda" and cfg.train.backend != "zero3" else 1


def build_engine(cfg: Config, env: DistEnv, plan: dict, resume_from: Path | None, config=None):
    """Build the model the way its engine needs (ZeRO-3: partitioned from the start) and wrap it.
    `config`: the model's GPT2Config when the caller has read it already."""
    weights = str(resume_from) if resume_from else None
    config = config or model_config(cfg.model, weights)
    if resume_from:
        check_matches_preset(config, cfg.model, f"checkpoint {resume_from}")
    if cfg.data.seq_len > config.n_positions:
        raise UserError(f"--seq-len {cfg.data.seq_len} is longer than the model's {config.n_positions} positions",
                        f"use --seq-len {config.n_positions} or less")
    if cfg.train.backend in ("zero2", "zero3"):
        from greentext_dist.engines.deepspeed import apply_deepspeed, build_ds_optimizer, load_ds_config, prepare_deepspeed

        ds_config = load_ds_config(cfg, plan["grad_accum"], env.world_size, config.n_embd)
        prepare_deepspeed(ds_config)
        gather = None
        if ds_config["zero_optimization"]["stage"] == 3:
            import deepspeed

            gather = lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0)  # noqa: E731
        model = build_model(cfg.model, weights_from=weights, seed=cfg.train.seed, gather=gather)
        if gather is None:
            pad_vocab(model, pad_multiple(cfg, env))
        if cfg.model.compile:
            apply_compile(model)
        return apply_deepspeed(model, build_ds_optimizer(model, cfg.optim, ds_config, env.device), env, ds_config), model
    model = build_model(cfg.model, weights_from=weights, seed=cfg.train.seed).to(env.device)
    pad_vocab(model, pad_multiple(cfg, env))
    if cfg.model.compile:
        apply_compile(model)
    if cfg.train.backend == "fsdp":
        from greentext_dist.engines.fsdp import FSDPEngine, apply_fsdp

        t = cfg.train
        apply_fsdp(model, env, t.precision, t.fsdp_reshard_after_forward, t.fsdp_cpu_offload)
        optimizer = build_optimizer(model, cfg.optim, env.device)  # after sharding: it must hold the sharded params
        return FSDPEngine(model, optimizer, env, t.fsdp_reshard_after_forward, t.fsdp_cpu_offload), model
    return apply_ddp(model, build_optimizer(model, cfg.optim, env.device), env, cfg.train.precision), model


def memory_plan(cfg: Config, env: DistEnv, config, checkpointing: bool) -> dict:
    """The planner's per-GPU peak for this run (same numbers as `python -m greentext_dist.plan`)."""
    t = cfg.train
    s = planner.shape_for(config.n_layer, config.n_embd, config.vocab_size, config.n_positions)
    key = planner.engine_key(t.backend, t.offload or t.fsdp_cpu_offload)
    mem = planner.peak_bytes(s, key, env.world_size, t.micro_batch_size, cfg.data.seq_len, checkpointing, t.precision, cfg.model.compile)
    budget = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
    return {**mem, "budget": budget, "key": key, "shape": s}


def resolve_checkpointing(cfg: Config, env: DistEnv, config) -> bool:
    """--gradient-checkpointing on/off as given; by default on only where the planner says it is needed."""
    if cfg.model.gradient_checkpointing is not None:
        return cfg.model.gradient_checkpointing
    mem = memory_plan(cfg, env, config, False)
    if mem["budget"] and mem["peak"] > 0.9 * mem["budget"]:
        log.info(f"gradient checkpointing on: without it the planned peak is {mem['peak'] / 2**30:.1f} GiB "
                 f"of {mem['budget'] / 2**30:.0f} GiB (--no-gradient-checkpointing to override)")
        return True
    return False


def memory_line(mem: dict) -> str:
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    where = f"of {gib(mem['budget'])}" if mem["budget"] else "(planned for a GPU)"
    return f"~{gib(mem['peak'])} peak {where}: {gib(mem['states'])} params+grads+optimizer, {gib(mem['activations'])} activations"


def print_summary(cfg: Config, env: DistEnv, layout: dict, engine, model, corpus: dict, val_corpus: dict | None, plan: dict, resume_from, mem: dict) -> None:
    t, d = cfg.train, cfg.data
    src = source_of(cfg.model) or "random init"
    rows = [
        ("model", f"GPT-2 {cfg.model.model} ({num_params(model) / 1e6:.1f}M params, {init_kind(cfg.model)}: {src})"
                  + (f", vocabulary padded to {model.config.vocab_size:,} in training" if model.config.vocab_size != true_vocab(model) else "")),
        ("engine", f"{engine.name}, {t.precision}, gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"
                   + (", torch.compile" if cfg.model.compile else "")),
        ("world", f"{env.world_size} rank(s) on {env.device.type}: {layout['nodes']} node(s) x {'/'.join(map(str, sorted(set(layout['ranks_per_node']))))}"
                  + (f", {layout['gpus'][0]}" if layout["gpus"] else "")),
        ("batch", f"{t.micro_batch_size} micro x {plan['grad_accum']} accumulation x {env.world_size} ranks = {t.global_batch_size} sequences"),
        ("tokens/step", f"{plan['tokens_per_step']:,} ({t.global_batch_size} x {d.seq_len})"),
        ("corpus", f"{corpus['posts']:,} posts, {corpus['tokens']:,} tokens, {corpus['rows']:,} rows of {d.seq_len}"
                   f" ({d.packing} packing keeps {corpus['rows'] * d.seq_len / max(corpus['tokens'], 1):.1%} of tokens as targets)"),
        *([("mix", ", ".join([f"{d.dataset} {1 - sum(w for _, w in mix):.0%}"] + [f"{n} {w:.0%}" for n, w in mix]) + " of posts")]
          if (mix := parse_mix(d.mix)) else []),
        ("validation", f"{val_corpus['posts']:,} posts, {val_corpus['tokens']:,} tokens" if val_corpus else "none"),
        ("schedule", f"{plan['max_steps']} steps = {plan['epochs']:.2f} epochs ({plan['steps_per_epoch']:.3g} steps/epoch), "
                     f"lr {cfg.optim.lr:g} warmup {warmup_steps(cfg.optim, plan['max_steps'])} cosine to {cfg.optim.min_lr:g}"),
        ("memory/rank", memory_line(mem)),
        ("output", f"{cfg.checkpoint.output_dir}" + (f" (resuming from {resume_from})" if resume_from else "")),
    ]
    console.print(summary_table("greentext_dist", rows))
    if t.global_batch_size > corpus["rows"]:
        log.warning(f"one step ({t.global_batch_size} rows) is larger than the whole corpus ({corpus['rows']} rows): "
                    f"each step sees every post ~{t.global_batch_size / corpus['rows']:.1f} times. Consider a smaller --global-batch-size.")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and os.environ.get("SLURM_NTASKS_PER_NODE", "1") == "1" and int(cpus) < max(layout["ranks_per_node"]):
        log.warning(f"--cpus-per-task={cpus} gives fewer CPUs than the {max(layout['ranks_per_node'])} ranks on a node: "
                    "tokenisation and NCCL threads will starve. Ask for at least one CPU per rank (better 4-8).")
    if mem["budget"] and mem["peak"] > 0.95 * mem["budget"]:
        s, budget = mem["shape"], 0.9 * mem["budget"]
        fit = planner.largest_micro(s, mem["key"], env.world_size, budget, d.seq_len, bool(cfg.model.gradient_checkpointing), t.precision,
                                    cfg.model.compile)
        log.warning(f"likely out of memory: planned peak {mem['peak'] / 2**30:.1f} GiB on a {mem['budget'] / 2**30:.0f} GiB GPU. "
                    + (f"Try --micro-batch-size {fit}" if fit else "Try --gradient-checkpointing, --backend zero3/fsdp or --offload")
                    + f" (see python -m greentext_dist.plan --model {cfg.model.model} --gpus {env.world_size}).")
    if t.backend == "zero3" and env.world_size == 1 and not t.offload:
        log.warning(f"ZeRO-3 on one GPU shards nothing and measured {planner.ZERO3_ONE_GPU_MFU:.1%} MFU (XL, H200): "
                    "--backend ddp, fsdp or zero2 is several times faster; keep zero3 for several GPUs or with --offload.")
    if plan["epochs"] > 20:
        log.warning(f"{plan['epochs']:.0f} epochs planned over a small corpus: watch val_loss for overfitting.")


def train_step(engine, batches: list[tuple], grad_clip: float, device, loss_fn=token_loss_sum) -> tuple:
    """One optimizer step over this rank's micro-batches (x, y, position ids or None). Returns the global loss,
    grad norm and target count as device tensors, and whether the update was applied (a non-finite loss or
    gradient norm is never applied)."""
    n_targets = global_target_count([(x, y) for x, y, _ in batches], device)
    step_loss = torch.zeros((), device=device)
    for i, (x, y, pos) in enumerate(batches):
        with engine.accumulating(last=i == len(batches) - 1):
            loss = loss_fn(engine.forward(x, pos), y) / n_targets
            engine.backward(loss)
        step_loss += loss.detach()
    global_loss = all_reduce_sum(step_loss)
    grad_norm, applied = engine.step(grad_clip, torch.isfinite(global_loss))
    return global_loss, grad_norm, n_targets, applied


def evaluate(engine, rows, cfg: Config, env: DistEnv, eos_id: int) -> float | None:
    if not rows:
        return None
    engine.train(False)
    eos = eos_id if cfg.data.packing == "isolated" else None
    loss = mean_token_loss(engine.forward, val_batches(rows, cfg.train.micro_batch_size, env.rank, env.world_size, cfg.train.eval_batches, eos),
                           env.device)[0]
    engine.train(True)
    return loss


SAMPLE_PROMPTS = ["be me", "tfw", "be me\nwork at a bank"]


def write_samples(engine, model, tokenizer, cfg: Config, env: DistEnv, step: int, log_file: MetricsLog) -> None:
    """Greentexts for a fixed prompt set, without disturbing training: the RNG (dropout, data) is restored, and
    sharded engines (ZeRO-3, FSDP) generate on every rank in lockstep (synced_gpus), as each forward gathers."""
    from greentext_dist.generate import generate_batch, as_greentext

    sharded = env.distributed and cfg.train.backend in ("zero3", "fsdp")
    if not (sharded or env.is_main):
        return
    module = getattr(engine, "module", model)
    engine.train(False)
    devices = [env.device] if env.device.type == "cuda" else []
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16" and engine.name == "ddp")
    with torch.random.fork_rng(devices=devices), autocast, torch.compiler.set_stance("force_eager"):
        texts = [as_greentext(p) for p in SAMPLE_PROMPTS]
        outs = generate_batch(module, tokenizer, texts, num_samples=1, max_new_tokens=96, seed=cfg.train.seed, synced_gpus=sharded)
    engine.train(True)
    for prompt, (text,) in zip(SAMPLE_PROMPTS, outs):
        log_file.write(step=step, prompt=prompt, text=text)


_claimed: list[Path] = []


def claim_output_dir(out: Path, cfg: Config) -> None:
    """Rank 0: lock OUT for this run, apply --resume never / --overwrite, and clear saves a killed run left half-done."""
    rundir.claim(out, cfg.checkpoint.resume, cfg.checkpoint.overwrite)
    _claimed.append(out)
    ckpt.remove_partial_saves(out / "checkpoints")


def poison(loss_fn):
    return lambda logits, y: loss_fn(logits, y) * float("nan")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.train.backend = resolve_backend(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    env = init_distributed(single_rank_group=cfg.train.backend in ("zero2", "zero3", "fsdp"))
    setup_logging(env.rank)
    layout = preflight(env)
    out = Path(cfg.checkpoint.output_dir)
    ckpt_root = out / "checkpoints"
    t = cfg.train
    if t.fsdp_cpu_offload and env.device.type != "cuda":
        raise UserError("--fsdp-cpu-offload moves sharded state from the GPU to the CPU, but this run has no GPU",
                        "drop --fsdp-cpu-offload on a CPU-only machine (or run where torch.cuda.is_available())")
    on_main(claim_output_dir, out, cfg)

    # Data: the global packed stream, its size, and the plan that follows from it.
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    train_stream, val_stream = build_streams(cfg, tokenizer)
    corpus, val_corpus, val = on_main(lambda: (
        count_corpus(train_stream, cfg.data.dataset),
        count_corpus(val_stream, cfg.data.val_dataset or cfg.data.dataset) if val_stream else None,
        val_rows(val_stream) if val_stream else [],
    ))
    plan = plan_run(cfg, env, corpus)
    max_steps = plan["max_steps"]

    # Resume point (rank 0 verifies checksums once), model and engine.
    resume_from = on_main(ckpt.resolve_resume, cfg.checkpoint.resume, ckpt_root)
    state = ckpt.read_trainer_state(resume_from) if resume_from else None
    if state and state["world_size"] != env.world_size and state["backend"] in ("zero2", "zero3"):
        raise UserError(
            f"checkpoint {resume_from} was written by {state['world_size']} ranks with {state['backend']}, this run has {env.world_size}",
            f"relaunch with {state['world_size']} ranks, or start a new run from its weights: --model-path {resume_from} --resume never",
        )
    if cfg.model.compile is None:
        cfg.model.compile = env.device.type == "cuda" and t.backend in ("ddp", "fsdp")
    model_shape = model_config(cfg.model, str(resume_from) if resume_from else None)
    cfg.model.gradient_checkpointing = resolve_checkpointing(cfg, env, model_shape)
    mem = memory_plan(cfg, env, model_shape, cfg.model.gradient_checkpointing)
    torch.manual_seed(t.seed)
    engine, model = build_engine(cfg, env, plan, resume_from, model_shape)
    if resume_from:
        engine.load_state(resume_from / ckpt.TRAIN_STATE)
    if not (resume_from and ckpt.load_rng_state(resume_from, env.rank)):
        torch.manual_seed(t.seed + env.rank + (state["step"] if state else 0))  # dropout differs per rank
    if env.is_main:
        print_summary(cfg, env, layout, engine, model, corpus, val_corpus, plan, resume_from, mem)
    if state and state["max_steps"] != max_steps:
        log.warning(f"the checkpoint was planned for {state['max_steps']} steps, this run for {max_steps}: the lr schedule changes")

    step = state["step"] if state else 0
    data_state = DataState(**state["data"]) if state else DataState()
    tokens = torch.tensor(float(state["tokens"]) if state else 0.0, device=env.device)
    loader = TrainLoader(train_stream, data_state, t.micro_batch_size, env.rank, env.world_size, env.device,
                         prefetch=cfg.data.prefetch, isolated=cfg.data.packing == "isolated")
    loss_fn = torch.compile(token_loss_sum) if cfg.model.compile else token_loss_sum  # fuses the fp32 upcast into the loss
    flops = perf.model_flops_per_token(model, cfg.data.seq_len, recompute=bool(cfg.model.gradient_checkpointing))
    peak = perf.peak_tflops(env.device, t.peak_tflops)
    metrics = MetricsLog(out / "metrics.jsonl", step if state else None, env.is_main)
    samples = MetricsLog(out / "samples.jsonl", step if state else None, env.is_main)
    last_saved = step if state else None
    bad_steps = state.get("bad_steps", 0) if state else 0
    nan_steps = {int(s) for s in os.environ.get("GREENTEXT_TEST_NAN_STEPS", "").split(",") if s}

    def save() -> Path:
        trainer_state = {"step": step, "tokens": int(tokens.item()), "data": data_state.to_dict(), "max_steps": max_steps, "bad_steps": bad_steps,
                         "world_size": env.world_size, "backend": cfg.train.backend, "config": cfg.to_dict()}
        return ckpt.save_checkpoint(engine, ckpt_root, step, trainer_state, tokenizer, cfg.checkpoint.keep_last, cfg.checkpoint.max_shard_size)

    engine.train(True)
    t_log, tokens_at_log = time.perf_counter(), tokens.item()
    with TrainProgress(max_steps, step, env.is_main) as bar, GracefulStop() as stop:
        while step < max_steps:
            engine.set_lr(lr := lr_at(step, cfg.optim, max_steps))
            batches = [loader.next_batch() for _ in range(plan["grad_accum"])]
            data_state = batches[-1][3]
            poisoned = step + 1 in nan_steps  # fault injection for the tests
            global_loss, grad_norm, n_targets, applied = train_step(
                engine, [b[:3] for b in batches], cfg.optim.grad_clip, env.device, poison(loss_fn) if poisoned else loss_fn)
            tokens += n_targets
            step += 1
            if not applied:
                bad_steps += 1
                what = f"step {step}: loss {global_loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
                metrics.write(step=step, skipped=True, loss=global_loss.item(), grad_norm=grad_norm.item())
                if not engine.can_skip or bad_steps > t.max_bad_steps:
                    good = f"checkpoint step-{last_saved}" if last_saved else "no checkpoint yet"
                    raise UserError(
                        f"{what} is not finite; stopped before updating the weights (last good: {good} in {ckpt_root})",
                        "rerun the same command to resume from it, with a lower --lr or --grad-clip"
                        + (", or let up to N such steps be skipped with --max-bad-steps N" if engine.can_skip else "")
                        + (" (DeepSpeed cannot skip a step)" if not engine.can_skip else ""),
                    )
                bar.note(f"{what} is not finite: update skipped ({bad_steps} of --max-bad-steps {t.max_bad_steps})")
            elif step % t.log_every == 0 or step == max_steps:
                loss_val = global_loss.item()  # metrics are read only on log steps
                now, tok = time.perf_counter(), tokens.item()
                tps = (tok - tokens_at_log) / (now - t_log)
                rec = dict(step=step, loss=loss_val, lr=lr, grad_norm=grad_norm.item(), tokens=int(tok), tokens_per_s=tps,
                           **perf.utilisation(tps, flops, peak, env.world_size), peak_mem_gb=perf.peak_memory_gib(env.device))
                t_log, tokens_at_log = now, tok
                metrics.write(**rec)
                bar.update(step, f"loss {loss_val:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
                           + (f"  MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else "") + f"  mem {rec['peak_mem_gb']:.1f} GiB")
            else:
                bar.update(step)
            if val and t.eval_every and step % t.eval_every == 0 and step != max_steps:
                val_loss = evaluate(engine, val, cfg, env, tokenizer.eos_token_id)
                metrics.write(step=step, val_loss=val_loss)
                bar.note(f"step {step}: val_loss {val_loss:.4f}")
            if t.sample_every and step % t.sample_every == 0:
                write_samples(engine, model, tokenizer, cfg, env, step, samples)
                bar.note(f"step {step}: samples in {out / 'samples.jsonl'}")
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step != max_steps:
                save()
                last_saved = step
            halt = bool(t.halt_at_step) and step == t.halt_at_step and step != max_steps
            if (stop.requested() or halt) and step != max_steps:
                if last_saved != step:
                    save()
                why = f"halted after step {step}" if halt else f"stopped by {stop.name} after step {step}"
                bar.note(f"{why} with a checkpoint in {ckpt_root / f'step-{step}'}; run the same command again to continue")
                return 0

    if val:
        val_loss = evaluate(engine, val, cfg, env, tokenizer.eos_token_id)
        metrics.write(step=step, val_loss=val_loss)
        if env.is_main:
            console.print(f"final val_loss {val_loss:.4f}")
    final = save() if last_saved != step else ckpt_root / f"step-{step}"
    if env.is_main:
        ckpt.publish_final(final, out / "final")
        report = write_report(out, [("model", f"GPT-2 {cfg.model.model} ({init_kind(cfg.model)})"), ("engine", f"{engine.name} x {env.world_size} ranks"),
                                    ("batch", f"{t.global_batch_size} x {cfg.data.seq_len} tokens"), ("steps", str(step))])
        console.print(f"[green]done:[/] {step} steps; model in {out / 'final'}; report in {report}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except UserError as e:
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        fail("interrupted: stopped at once; the last checkpoint is intact (rerun the same command to resume)")
        return 130
    finally:
        while _claimed:
            rundir.release(_claimed.pop())
        shutdown()


if __name__ == "__main__":
    code = cli()
    # All work is saved and the process group is gone. Skip interpreter teardown: with gloo, torch's
    # background threads occasionally abort there ("terminate called without an active exception"),
    # which would turn a finished run into a failed exit code under torchrun.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
