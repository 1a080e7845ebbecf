"""Fine-tune GPT-2 on greentext. One loop for every engine and launcher:

    python greentext_dist/train.py --model small
    torchrun --nproc_per_node 8 greentext_dist/train.py --model medium

Reads top to bottom: setup(cfg) -> Run (data, plan, engine, resume point), fit(run) (the loop), finish(run)
(final validation, export, report). The engine is chosen once, in setup; the loop has no engine branches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:
        # Run as a file: import the package beside this folder, and don't let its modules shadow others.
        sys.path[0] = str(Path(__file__).resolve().parents[1])
    from greentext_dist.launch import early, interrupt_early

    interrupt_early()  # Ctrl-C during the imports and set-up: one line, no traceback (the graceful handler takes over in fit)
    early(sys.argv[1:])  # --help, a bad setting, --nproc N: answered before torch loads

import dataclasses
import logging
import math
import time
import types
from dataclasses import dataclass

import torch

from greentext_dist import attention, checkpoint as ckpt
from greentext_dist.config import Config, as_keywords, check_shard_size, home, lora_targets, parse_args_with_sources, parse_mix, to_toml
from greentext_dist.data import (
    Corpus, DataState, TrainData, TrainLoader, ValRows, cache_dir, corpus_of, hub_revisions, training_data, val_batches, val_corpus,
)
from greentext_dist.dist import (
    DistEnv, all_reduce_sum, check_same, check_shared_folder, everywhere, init_distributed, on_main, preflight, shutdown,
)
from greentext_dist.engines import ENGINES, Engine, EngineSpec, resolve_backend
from greentext_dist.errors import UserError
from greentext_dist.lora import ADAPTER
from greentext_dist.loss import global_target_count, mean_token_loss, token_loss_sum
from greentext_dist.metrics import MetricsLog
from greentext_dist.model import check_matches_preset, hub_weights, init_kind, model_config, num_params, source_of, true_vocab
from greentext_dist.optim import lr_at, warmup_steps
from greentext_dist import perf, plan as planner, rundir
from greentext_dist.report import write_report
from greentext_dist.signals import GracefulStop
from greentext_dist.tokenizer import load_tokenizer
from greentext_dist.tracking import Trackers, parse_report_to
from greentext_dist.ui import TrainProgress, console, fail, print_summary_table, setup_logging

log = logging.getLogger("greentext_dist")


@dataclass(frozen=True)
class Plan:
    grad_accum: int  # micro-batches per rank and step
    tokens_per_step: int
    steps_per_epoch: float
    max_steps: int
    epochs: float
    padding: int = 0  # rows of padding a step (none when the global batch is a multiple of micro x ranks)


@dataclass(frozen=True)
class MemoryPlan:
    peak: float
    states: float
    activations: float
    budget: int | None  # the GPU's memory, None on CPU
    key: str
    shape: planner.Shape


@dataclass
class Progress:
    """What the loop advances and a checkpoint saves."""

    step: int = 0
    tokens: torch.Tensor | None = None  # targets seen, on the device (read only on log steps)
    data: DataState = dataclasses.field(default_factory=DataState)
    bad_steps: int = 0


@dataclass
class Run:
    cfg: Config  # resolved: backend, compile, checkpointing and vocabulary padding decided
    env: DistEnv
    spec: EngineSpec
    layout: dict
    tokenizer: object
    train_data: TrainData
    val: ValRows | None  # validation rows, read from the token store by every rank
    corpus: Corpus
    val_corpus: Corpus | None
    plan: Plan
    mem: MemoryPlan
    engine: Engine
    resume_from: Path | None
    resumed_state: dict | None
    checkpointer: "Checkpointer"
    progress: Progress
    out: Path
    metrics: MetricsLog  # OUT/metrics.jsonl: train, skipped and validation lines
    samples: MetricsLog  # OUT/samples.jsonl (--sample-every)
    base_commit: str | None = None  # the hub commit of the pretrained weights the run started from
    step_estimate: float | None = None  # seconds per step, estimated at start (rank 0; None elsewhere or where unknown)
    predicted: dict | None = None  # the planner's step for this layout, communication included (several GPUs it knows)


DEFAULT_STEPS = 300


def plan_run(cfg: Config, env: DistEnv, corpus: Corpus) -> Plan:
    t = cfg.train
    per_pass = t.micro_batch_size * env.world_size
    if t.global_batch_size < env.world_size:
        raise UserError(f"--global-batch-size {t.global_batch_size} is smaller than the {env.world_size} ranks: some would train on padding only",
                        f"use at least {env.world_size}, best a multiple of micro-batch x ranks = {per_pass}")
    # Any global batch on any number of ranks: the step's last pass may hold fewer rows than micro x ranks, and is
    # padded with rows that have no targets (same shapes on every rank; the loss counts targets, so no change).
    grad_accum = planner.accumulation(t.global_batch_size, t.micro_batch_size, env.world_size)
    if corpus.rows == 0:
        raise UserError(
            f"the training data ({corpus.tokens} tokens) is shorter than one row of --seq-len {cfg.data.seq_len}",
            "lower --seq-len or add data",
        )
    steps_per_epoch = corpus.rows / t.global_batch_size
    epochs = t.epochs if t.epochs is not None else 3.0
    if t.max_steps is not None:
        max_steps = t.max_steps
    elif t.epochs is not None:
        max_steps = math.floor(epochs * steps_per_epoch)
    else:
        # The default: a real fine-tune even on a small corpus (the origin report's first result was at 300 steps of
        # 512 x 1024 tokens on ~200 rows); OUT/final is the best-validation checkpoint, which guards against overfitting.
        max_steps = max(DEFAULT_STEPS, math.floor(3 * steps_per_epoch))
    if max_steps == 0:
        raise UserError(
            f"{epochs:g} epoch(s) of {corpus.rows} rows give no full step of --global-batch-size {t.global_batch_size}",
            f"raise --epochs to at least {math.ceil(t.global_batch_size / corpus.rows)}, lower --global-batch-size, or set --max-steps",
        )
    return Plan(grad_accum, t.global_batch_size * cfg.data.seq_len, steps_per_epoch, max_steps, max_steps / steps_per_epoch,
                grad_accum * per_pass - t.global_batch_size)


def memory_plan(cfg: Config, env: DistEnv, spec: EngineSpec, config, checkpointing: bool) -> MemoryPlan:
    """The planner's per-GPU peak for this run (same numbers as `python -m greentext_dist.plan`)."""
    t = cfg.train
    s = planner.shape_for(config.n_layer, config.n_embd, config.vocab_size, config.n_positions, cfg.model.lora_rank,
                          tuple(lora_targets(cfg.model)))
    key = spec.plan_key(t.backend, t.offload or t.fsdp_cpu_offload)
    mem = planner.peak_bytes(s, key, env.world_size, t.micro_batch_size, cfg.data.seq_len, checkpointing, t.precision, cfg.model.compile,
                             planner.accumulation(t.global_batch_size, t.micro_batch_size, env.world_size))
    budget = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
    return MemoryPlan(mem["peak"], mem["states"], mem["activations"], budget, key, s)


def resolve(cfg: Config, env: DistEnv, spec: EngineSpec, config) -> Config:
    """The settings left to `auto`, decided once: compile, vocabulary padding and gradient checkpointing."""
    m = cfg.model
    if m.pad_vocab and m.pad_vocab > 1 and not spec.can_pad_vocab:
        raise UserError(f"--pad-vocab cannot be used with --backend {cfg.train.backend} (its parameters are partitioned when built, "
                        "before they could be widened)", "drop --pad-vocab (or pass --pad-vocab 1), or use --backend fsdp / zero2")
    on_gpu = env.device.type == "cuda"
    compile_ = m.compile if m.compile is not None else on_gpu and spec.compile_by_default
    pad = m.pad_vocab if m.pad_vocab is not None else (64 if on_gpu and spec.can_pad_vocab else 1)  # 1.62x on Small (H200)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, compile=compile_, pad_vocab=pad))
    if m.gradient_checkpointing is None:
        mem = memory_plan(cfg, env, spec, config, False)
        gc = bool(mem.budget and mem.peak > 0.9 * mem.budget)
        if gc:
            log.info(f"gradient checkpointing on: without it the planned peak is {mem.peak / 2**30:.1f} GiB "
                     f"of {mem.budget / 2**30:.0f} GiB (--no-gradient-checkpointing to override)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=gc))
    return cfg


def memory_line(mem: "MemoryPlan", run: "Run | None" = None) -> str:
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if run is not None and run.env.device.type == "cpu":
        # On a CPU the whole process counts (libraries, data, the model already built), and SDPA's math path keeps more.
        c, now = run.engine.module.config, perf.rss_bytes()
        extra = planner.cpu_extra(mem.shape, run.cfg.train.micro_batch_size, run.cfg.data.seq_len, c.n_head, run.cfg.model.dropout)
        return (f"~{gib(now + mem.peak + extra)} peak on this CPU: {gib(now)} in use now, {gib(mem.states)} params+grads+optimizer, "
                f"{gib(mem.activations + extra)} activations and temporaries")
    where = f"of {gib(mem.budget)}" if mem.budget else "(planned for a GPU)"
    return f"~{gib(mem.peak)} peak {where}: {gib(mem.states)} params+grads+optimizer, {gib(mem.activations)} activations"


QUICK_CPU = "--global-batch-size 8 --micro-batch-size 8 --seq-len 128 --max-steps 200"  # scripts/demo.sh's shape


def step_time(run: "Run") -> tuple[float | None, str]:
    """Seconds per optimizer step, estimated before the first (see perf.estimate_step_seconds)."""
    cfg, env, t = run.cfg, run.env, run.cfg.train
    rows = run.plan.grad_accum * t.micro_batch_size * env.world_size
    alone = run.spec.alone_mfu if env.world_size == 1 and not t.offload else None
    return perf.estimate_step_seconds(run.engine.module, rows, cfg.data.seq_len, env.world_size, env.device, t.precision,
                                      compiled=bool(cfg.model.compile), recompute=bool(cfg.model.gradient_checkpointing),
                                      peak=perf.peak_tflops(env.device, t.peak_tflops), mfu=alone)


def warn_if_slow(run: "Run", step_s: float | None, how: str) -> None:
    """One step of minutes is named before it starts, with what makes a quick try (the default 512 x 1024 batch on a
    CPU is hours a step)."""
    cfg, env, t = run.cfg, run.env, run.cfg.train
    c = run.engine.module.config
    fp32_faster = 0.0
    if env.device.type == "cpu" and t.precision == "bf16":
        fp32_faster = perf.cpu_matmul_flops(c.n_embd, c.vocab_size, c.n_layer, "fp32") / perf.cpu_matmul_flops(c.n_embd, c.vocab_size, c.n_layer, "bf16")
        if fp32_faster > 2:
            log.warning(f"this CPU runs bf16 matmuls ~{fp32_faster:.0f}x slower than fp32 (it has no native bf16 units): "
                        "add --precision fp32")
    if not step_s or step_s < 60:
        return
    quick = ""
    if env.device.type == "cpu":
        module = run.engine.module
        precision = "fp32" if fp32_faster > 2 else t.precision
        quick_s, _ = perf.estimate_step_seconds(module, 8, 128, env.world_size, env.device, precision, compiled=False, recompute=False, peak=None)
        flags = QUICK_CPU + (" --precision fp32" if precision != t.precision else "")
        quick = f" For a quick try on this machine: {flags} (~{perf.duration(200 * quick_s)} in all)."
    log.warning(f"one step will take ~{perf.duration(step_s)} ({how}): {t.global_batch_size} sequences of {cfg.data.seq_len} tokens "
                f"on {env.world_size} {env.device.type} rank(s).{quick}")


def comm_prediction(run: "Run") -> dict | None:
    """The planner's step time for this run's layout (GPUs only): printed at start, set beside the measured speed in
    report.md, so every run checks the model (docs/scaling.md)."""
    cfg, env, t = run.cfg, run.env, run.cfg.train
    if env.device.type != "cuda" or not run.layout["gpus"] or cfg.model.model not in planner.MEASURED_MFU:
        return None
    run.predicted = planner.predict_run(
        cfg.model.model, run.mem.shape, run.mem.key, env.world_size, run.layout["nodes"], run.layout["gpus"][0],
        run.plan.grad_accum * t.micro_batch_size * env.world_size * cfg.data.seq_len, run.plan.grad_accum, cfg.data.seq_len,
        bool(cfg.model.gradient_checkpointing), bool(cfg.model.compile), t.fsdp_reshard_after_forward, t.precision)
    return run.predicted


def print_summary(run: "Run", sources: dict) -> None:
    cfg, env, layout, engine, corpus, val_corpus, plan, mem = run.cfg, run.env, run.layout, run.engine, run.corpus, run.val_corpus, run.plan, run.mem
    model, resume_from = engine.module, run.resume_from
    timing = step_time(run)
    run.step_estimate = timing[0]
    t, d = cfg.train, cfg.data
    src = (source_of(cfg.model) or "random init") + (f" at commit {run.base_commit[:12]}" if run.base_commit else "")
    rows = [
        ("model", f"GPT-2 {cfg.model.model} ({num_params(model) / 1e6:.1f}M params, {init_kind(cfg.model)}: {src})"
                  + (f", vocabulary padded to {model.config.vocab_size:,} in training" if model.config.vocab_size != true_vocab(model) else "")),
        ("engine", f"{engine.name}, {t.precision}, gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"
                   + (", torch.compile" if cfg.model.compile else "")),
        ("world", f"{env.world_size} rank(s) on {env.device.type}: {layout['nodes']} node(s) x {'/'.join(map(str, sorted(set(layout['ranks_per_node']))))}"
                  + (f", {layout['gpus'][0]}" if layout["gpus"] else "")),
        ("batch", f"{t.micro_batch_size} micro x {plan.grad_accum} accumulation x {env.world_size} ranks = {t.global_batch_size} sequences"
                  + (f" + {plan.padding} padding rows in the last pass" if plan.padding else "")),
        ("tokens/step", f"{plan.tokens_per_step:,} ({t.global_batch_size} x {d.seq_len})"),
        ("corpus", f"{corpus.posts:,} posts, {corpus.tokens:,} tokens, {corpus.rows:,} rows of {d.seq_len}"
                   f" ({d.packing} packing keeps {corpus.rows * d.seq_len / max(corpus.tokens, 1):.1%} of tokens as targets)"),
        *([("mix", ", ".join([f"{d.dataset} {1 - sum(w for _, w in mix):.0%}"] + [f"{n} {w:.0%}" for n, w in mix]) + " of posts")]
          if (mix := parse_mix(d.mix)) else []),
        ("validation", f"{val_corpus.posts:,} posts, {val_corpus.tokens:,} tokens" if val_corpus else "none"),
        ("token store", str(run.train_data.stores[0].path)),
        ("schedule", f"{plan.max_steps} steps = {plan.epochs:.2f} epochs ({plan.steps_per_epoch:.3g} steps/epoch), "
                     f"lr {cfg.optim.lr:g} warmup {warmup_steps(cfg.optim, plan.max_steps)} cosine to {cfg.optim.min_lr:g}"),
        ("memory/rank", memory_line(mem, run)),
        *([("planned", f"{p['step_s']:.2f} s a step on {p['gpu'].upper()}s, {p['exposed_share']:.0%} of it communication that does not "
                       f"hide ({p['comm_bytes'] / 1e9:.1f} GB of collectives per GPU; every engine: python -m greentext_dist.plan "
                       f"--model {cfg.model.model} --gpus {env.world_size} --nodes {layout['nodes']} --gpu-type {p['gpu']})")]
          if (p := comm_prediction(run)) else []),
        *([("time", f"~{perf.duration(step_s)} per step, ~{perf.duration(step_s * left)} for the {left} step(s) to go ({timing[1]})")]
          if (step_s := timing[0]) and (left := plan.max_steps - run.progress.step) else []),
        ("output", f"{cfg.checkpoint.output_dir}" + (f" (resuming from {resume_from})" if resume_from else "")),
        ("settings", ", ".join(f"{name}={getattr(getattr(cfg, sec), name)} ({src})" for (sec, name), src in sorted(sources.items()))
                     + f"; all in {run.out / 'config.toml'}"),
    ]
    print_summary_table("greentext_dist", rows)
    if plan.padding:
        per_pass = t.micro_batch_size * env.world_size
        lo, hi = t.global_batch_size // per_pass * per_pass, plan.grad_accum * per_pass
        log.warning(f"--global-batch-size {t.global_batch_size} is not a multiple of micro-batch x ranks = {per_pass}: each step pads "
                    f"{plan.padding} rows ({plan.padding / hi:.1%} of its compute). " + (f"{lo} or {hi}" if lo else f"{hi}") + " would waste none.")
    if t.global_batch_size > corpus.rows:
        log.warning(f"one step ({t.global_batch_size} rows) is larger than the whole corpus ({corpus.rows} rows): "
                    f"each step sees every post ~{t.global_batch_size / corpus.rows:.1f} times. Consider a smaller --global-batch-size.")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and os.environ.get("SLURM_NTASKS_PER_NODE", "1") == "1" and int(cpus) < max(layout["ranks_per_node"]):
        log.warning(f"--cpus-per-task={cpus} gives fewer CPUs than the {max(layout['ranks_per_node'])} ranks on a node: "
                    "data loading and NCCL threads will starve. Ask for at least one CPU per rank (better 4-8).")
    if mem.budget and mem.peak > 0.95 * mem.budget:
        s, budget = mem.shape, 0.9 * mem.budget
        fit = planner.largest_micro(s, mem.key, env.world_size, budget, d.seq_len, bool(cfg.model.gradient_checkpointing), t.precision,
                                    cfg.model.compile, global_batch=t.global_batch_size)
        log.warning(f"likely out of memory: planned peak {mem.peak / 2**30:.1f} GiB on a {mem.budget / 2**30:.0f} GiB GPU. "
                    + (f"Try --micro-batch-size {fit}" if fit else "Try --gradient-checkpointing, --backend zero3/fsdp or --offload")
                    + f" (see python -m greentext_dist.plan --model {cfg.model.model} --gpus {env.world_size}).")
    if run.spec.alone_mfu is not None and env.world_size == 1 and not t.offload:
        log.warning(f"{t.backend} on one GPU shards nothing and measured {run.spec.alone_mfu:.1%} MFU (XL, H200): "
                    f"another --backend ({', '.join(n for n, e in ENGINES.items() if e.alone_mfu is None)}) is several times faster; "
                    f"keep {t.backend} for several GPUs or with --offload.")
    if (warm := warmup_steps(cfg.optim, plan.max_steps)) >= plan.max_steps > 1:
        log.warning(f"--warmup-steps {warm} is not shorter than the run ({plan.max_steps} steps): the learning rate ends at "
                    f"{lr_at(plan.max_steps - 1, cfg.optim, plan.max_steps):.3g}, below --lr {cfg.optim.lr:g}, and never decays. "
                    "Pass fewer warmup steps (the default is 5% of the run).")
    if plan.epochs > 20:
        log.warning(f"{plan.epochs:.0f} epochs planned over a small corpus: watch val_loss for overfitting.")
    warn_if_slow(run, *timing)


def train_step(engine, batches: list[tuple], grad_clip: float, device, loss_fn=token_loss_sum) -> tuple:
    """One optimizer step over this rank's micro-batches (x, y, position ids or None). Returns the global loss,
    grad norm and target count as device tensors, and whether the update was applied (a non-finite loss or
    gradient norm is never applied)."""
    n_targets = global_target_count([(x, y) for x, y, _ in batches], device)
    step_loss = torch.zeros((), device=device)
    for i, (x, y, pos) in enumerate(batches):
        with engine.accumulating(last=i == len(batches) - 1):
            loss = loss_fn(engine.forward(x, pos), y, engine.vocab) / n_targets
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
                           env.device, engine.vocab)[0]
    engine.train(True)
    return loss


SAMPLE_PROMPTS = ["be me", "tfw", "be me\nwork at a bank"]


def write_samples(engine, tokenizer, cfg: Config, env: DistEnv, step: int, log_file: MetricsLog) -> None:
    """Greentexts for a fixed prompt set, without disturbing training: the RNG (dropout, data) is restored, and
    sharded engines (ZeRO-3, FSDP) generate on every rank in lockstep (synced_gpus), as each forward gathers."""
    from greentext_dist.generate import generate_batch, as_greentext

    sharded = env.distributed and engine.sharded
    if not (sharded or env.is_main):
        return
    engine.train(False)
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), engine.generation_autocast(), torch.compiler.set_stance("force_eager"):
        texts = [as_greentext(p) for p in SAMPLE_PROMPTS]
        outs = generate_batch(engine.module, tokenizer, texts, num_samples=1, max_new_tokens=96, seed=cfg.train.seed, synced_gpus=sharded)
    engine.train(True)
    for prompt, (text,) in zip(SAMPLE_PROMPTS, outs):
        log_file.write(step=step, prompt=prompt, text=text)


_claimed: list[Path] = []


def can_create(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False  # named where the folder is used


def inputs(cfg: Config) -> dict[str, str]:
    """flag -> path of everything this run reads, which --overwrite must never move away."""
    named = {"--model-path": cfg.model.model_path, "--tokenizer": cfg.model.tokenizer, "--dataset": cfg.data.dataset,
             "--val-dataset": cfg.data.val_dataset, "--cache-dir": cfg.data.cache_dir, "--ds-config": cfg.train.ds_config,
             "--resume": cfg.checkpoint.resume if cfg.checkpoint.resume not in ("auto", "never") else None}
    named |= {f"--mix {name}": name for name, _ in parse_mix(cfg.data.mix)}
    return {flag: value for flag, value in named.items() if value}


def claim_output_dir(out: Path, cfg: Config) -> None:
    """Rank 0: lock OUT for this run, apply --resume never / --overwrite, and clear saves a killed run left half-done."""
    rundir.claim(out, cfg.checkpoint.resume, cfg.checkpoint.overwrite, inputs(cfg))
    _claimed.append(out)
    ckpt.remove_partial_saves(out / "checkpoints")


class Checkpointer:
    """Owns when checkpoints are written (--save-every, a stop, the end), their rotation, and the final export."""

    def __init__(self, run_out: Path, cfg: Config, engine: Engine, tokenizer, last_saved: int | None, state: dict | None, validates: bool):
        self.root, self.c, self.engine, self.tokenizer = run_out / "checkpoints", cfg.checkpoint, engine, tokenizer
        self.last_saved, self.saved_at = last_saved, time.monotonic()
        self.save_s: float | None = None  # how long the last save took
        self.saves = 0  # saves by this process
        self.patience = cfg.train.early_stopping_patience
        self.keeps_best = validates and (self.c.final == "best" or bool(self.patience))  # checkpoints/best, see validated()
        self.best = (state or {}).get("best")  # {"step", "val_loss"} of checkpoints/best
        self.since_best = (state or {}).get("since_best", 0)  # validations without a new best

    def validated(self, step: int, val_loss: float) -> bool:
        """After each validation: keep a new best's weights out of rotation. True when early stopping says stop."""
        if self.best is None or val_loss < self.best["val_loss"]:
            if self.keeps_best:
                ckpt.save_best(self.engine, self.root, step, val_loss, self.tokenizer, self.c.max_shard_size)
            self.best, self.since_best = {"step": step, "val_loss": val_loss}, 0
            return False
        self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def final_source(self, last: Path) -> Path:
        """What OUT/final publishes: checkpoints/best under --final best when validation ran, else the last step."""
        best = self.root / "best"
        if self.c.final == "best" and self.best and best.is_dir():
            return best
        if self.c.final == "best" and self.best:
            log.warning(f"{best} is missing (removed by hand?): OUT/final holds the last step instead")
        return last

    def save(self, step: int, trainer_state: dict) -> Path:
        t0 = time.monotonic()
        path = ckpt.save_checkpoint(self.engine, self.root, step, trainer_state, self.tokenizer, self.c.keep_last, self.c.max_shard_size)
        self.last_saved, self.saved_at = step, time.monotonic()
        self.save_s, self.saves = self.saved_at - t0, self.saves + 1
        if self.engine.env.is_main:
            hf_files = ckpt.folder_bytes(path, "*.*")  # the top-level files: the HF export, tokenizer, manifest
            self.check_disk(ckpt.folder_bytes(path), hf_files, f"measured on {path.name}")
        return path

    def check_disk(self, one: int, weights: int, how: str) -> None:
        """Rank 0: warn while there is time to act, not when a save fails hours in. A save writes a whole checkpoint
        (and a new best its weights) before the oldest goes, so the rotation peaks at --keep-last + 1 checkpoints
        and two copies of the best weights."""
        best = 2 * weights if self.keeps_best else 0
        used = sum(ckpt.folder_bytes(d) for _, d in ckpt.step_dirs(self.root)) + ckpt.folder_bytes(self.root / "best")
        need, free = (self.c.keep_last + 1) * one + best - used, ckpt.free_bytes(self.root)
        if need > free:
            gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
            log.warning(f"checkpoints need ~{gib(need)} more disk than the {gib(free)} free under {self.root}: {self.c.keep_last} kept "
                        f"+ 1 being written, ~{gib(one)} each ({how}){', and the best weights' if best else ''}. The first save that "
                        "does not fit stops the run, keeping the checkpoint before it. Fix: free disk space, lower --keep-last "
                        f"(now {self.c.keep_last}), or point --output-dir at a larger disk.")

    def check_save_time(self, save_s: float, step_s: float | None, how: str) -> None:
        """Rank 0: a save (with the step before it) must fit in the lead a SLURM job gets before its time limit
        (slurm/train.sbatch's --signal, told to us as GREENTEXT_SIGNAL_LEAD_S), and must not eat the time between
        timed saves. `how`: measured or estimated."""
        lead = float(os.environ.get("GREENTEXT_SIGNAL_LEAD_S", "0") or 0)
        need = save_s + (step_s or 0.0)
        if lead and need > 0.8 * lead:
            log.warning(f"a checkpoint takes ~{perf.duration(save_s)} ({how}){f' after a step of ~{perf.duration(step_s)}' if step_s else ''}, "
                        f"but the job is warned only {lead:.0f} s before its time limit (GREENTEXT_SIGNAL_LEAD_S): the last save may not "
                        f"finish. Fix: sbatch --signal=B:USR1@{int(2 * need) + 60} with GREENTEXT_SIGNAL_LEAD_S={int(2 * need) + 60}")
        every = 60 * self.c.save_every_minutes
        if every and save_s > 0.25 * every:
            log.warning(f"a checkpoint takes ~{perf.duration(save_s)} ({how}), {save_s / every:.0%} of the --save-every-minutes "
                        f"{self.c.save_every_minutes:g} between timed saves. Fix: raise --save-every-minutes, or write to a faster disk")

    def due(self, step: int, max_steps: int, clock: bool) -> bool:
        """Every --save-every steps, and when `clock` says --save-every-minutes have passed (see clock_due)."""
        return step != max_steps and (bool(self.c.save_every) and step % self.c.save_every == 0 or clock)

    def clock_due(self) -> bool:
        """Rank 0's clock says a timed save is due. Every rank must join the same save: the loop puts this in the
        step's CPU vote (GracefulStop.vote) and saves when the vote agrees."""
        return self.engine.env.is_main and 0 < self.c.save_every_minutes <= (time.monotonic() - self.saved_at) / 60

    def ensure(self, step: int, trainer_state) -> Path:
        """The checkpoint of this step, written now unless it already is. `trainer_state` is called only if needed."""
        return self.root / f"step-{step}" if self.last_saved == step else self.save(step, trainer_state())

    def last_good(self) -> str:
        return f"checkpoint step-{self.last_saved}" if self.last_saved else "no checkpoint yet"


def trainer_state(run: Run, finished: bool = False) -> dict:
    """What a checkpoint records beside the weights. `finished`: written by finish(), after the final validation."""
    p, env = run.progress, run.env
    return {"step": p.step, "finished": finished, "tokens": int(p.tokens.item()), "data": p.data.to_dict(), "max_steps": run.plan.max_steps,
            "bad_steps": p.bad_steps, "world_size": env.world_size, "backend": run.cfg.train.backend, "config": run.cfg.to_dict(),
            "best": run.checkpointer.best, "since_best": run.checkpointer.since_best,
            "stores": run.train_data.store_names, "base_commit": run.base_commit}


# Settings that change what a run is: resuming under different values would silently continue another experiment.
# Everything else (--max-steps, --epochs, --micro-batch-size, cadences, compile, ...) may change on resume.
MEANING = {
    "model": ("model", "init", "model_path", "tokenizer", "dropout", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
    "data": ("dataset", "text_field", "val_dataset", "val_fraction", "seq_len", "mix", "packing"),
    "optim": ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip"),
    "train": ("backend", "global_batch_size", "seed", "precision"),
}


def check_same_run(cfg: Config, state: dict, resume_from: Path) -> None:
    """Refuse to resume a checkpoint under settings that change the meaning of the run, naming each one."""
    saved = state.get("config")
    if not saved:
        return  # written before settings were saved
    now = cfg.to_dict()
    # A setting the checkpoint does not name did not exist when it was written: it ran with today's default.
    defaults = Config().to_dict()
    diffs = [f"--{name.replace('_', '-')} {now[sec][name]!r} (the checkpoint has {saved[sec].get(name, defaults[sec][name])!r})"
             for sec, names in MEANING.items() for name in names
             if home(saved.get(sec, {}).get(name, defaults[sec][name])) != now[sec][name]]  # home: saved before '~' was expanded
    if diffs:
        raise UserError(
            f"checkpoint {resume_from} belongs to a run with other settings: " + "; ".join(diffs),
            "rerun with the checkpoint's settings to continue it, or start a new run: a new --output-dir, or --resume never --overwrite",
        )


def retire_newer(root: Path, step: int, overwrite: bool, reads: dict[str, str]) -> None:
    """Resuming an older checkpoint while newer ones exist would mix two histories (and rotation would sort
    them by step): refuse, or with --overwrite move the newer ones aside (OUT/overwritten) and branch from this step."""
    newer = [d for n, d in ckpt.step_dirs(root) if n > step]
    if not newer:
        return
    names = ", ".join(d.name for d in newer)
    if not overwrite:
        raise UserError(f"resuming step-{step} while newer checkpoints exist ({names}): the run would mix two histories",
                        f"resume the newest (--resume auto), or add --overwrite to move {names} into {root.parent / rundir.OVERWRITTEN} "
                        f"and branch from step-{step}")
    rundir.set_aside(root.parent, newer, reads, f"{names} (to branch from step-{step})")
    ckpt.atomic_write_text(root / "latest", f"step-{step}\n")


def setup(cfg: Config, sources: dict | None = None) -> Run:
    """Everything before the first step: the engine chosen, the data counted and planned, the resume point found,
    the model built and its state loaded, and the start summary printed. `sources`: where each set value came from."""
    sources = dict(sources or {})
    check_shard_size(cfg.checkpoint.max_shard_size)  # here, not at the first save after the training it cost
    if cfg.train.backend == "auto":
        sources[("train", "backend")] = "auto"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backend=resolve_backend(cfg)))
    spec = ENGINES[cfg.train.backend]
    env = init_distributed(single_rank_group=spec.needs_process_group)
    setup_logging(env.rank)
    attention.check(cfg.model.attention, cfg.data.packing, cfg.model.dropout, env.device)
    layout = preflight(env)
    out = Path(cfg.checkpoint.output_dir)
    on_main(claim_output_dir, out, cfg)
    check_shared_folder(out, "--output-dir")  # every rank writes its part of each checkpoint here, and reads it on resume

    # Resume point (rank 0 verifies checksums once) and the model's shape, read without loading weights.
    resume_from = on_main(ckpt.resolve_resume, cfg.checkpoint.resume, out / "checkpoints")
    state = ckpt.read_trainer_state(resume_from) if resume_from else None
    if state:
        on_main(retire_newer, out / "checkpoints", state["step"], cfg.checkpoint.overwrite, inputs(cfg))
    if state and state["world_size"] != env.world_size and ENGINES[state["backend"]].same_world_to_resume:
        raise UserError(
            f"checkpoint {resume_from} was written by {state['world_size']} ranks with {state['backend']}, this run has {env.world_size}",
            f"relaunch with {state['world_size']} ranks, or start a new run from its weights (a fresh optimizer) in a new folder: "
            f"--output-dir NEW --model-path {resume_from}",
        )
    # Rank 0 downloads hub weights for the job. A LoRA checkpoint's weights are merged ones: a resume builds the frozen
    # base from its source again and loads the adapter from the resumable state.
    lora = bool(cfg.model.lora_rank)
    hub_folder = None if resume_from and not lora else hub_weights(cfg.model)
    weights = str(resume_from) if resume_from and not lora else hub_folder
    base_commit = state.get("base_commit") if state else hub_folder and Path(hub_folder).name  # HF cache folders are named by commit
    shape = model_config(cfg.model, weights)
    if resume_from:
        check_matches_preset(shape, cfg.model, f"checkpoint {resume_from}")
    if state:
        check_same_run(cfg, state, resume_from)
    if cfg.data.seq_len > shape.n_positions:
        raise UserError(f"--seq-len {cfg.data.seq_len} is longer than the model's {shape.n_positions} positions",
                        f"use --seq-len {shape.n_positions} or less")

    # Data: the token stores (built on first use: every rank takes the lock in turn, no collective waits on it),
    # their size, and the plan that follows from it.
    if on_main(can_create, cache_dir(cfg.data.cache_dir)):
        # A node-local cache works (each node tokenises into its own copy), but a store prepared on a login node for
        # the job is then not found: say so.
        check_shared_folder(cache_dir(cfg.data.cache_dir), "--cache-dir", required=False)
    tokenizer = on_main(load_tokenizer, cfg.model.tokenizer)  # loaded (or downloaded) once, the same object on every rank
    revisions = on_main(hub_revisions, cfg.data)  # a hub dataset's commit, asked once for all ranks
    train_data, val = everywhere(training_data, cfg.data, tokenizer, cfg.train.seed, revisions=revisions, progress=env.is_main,
                                 defer=not env.is_main)
    # Each rank keyed its stores itself: a source that changed while the job started (a new hub commit, a file edited)
    # would otherwise give ranks different data without a word.
    check_same(" + ".join(train_data.store_names) + (f"; validation {len(val.packed)} posts, {val.packed.total} tokens" if val else ""),
               "the training data", "the source changed while the job started: rerun it (every rank then finds the same data)")
    corpus = corpus_of(train_data)
    if val is None and cfg.data.val_fraction > 0 and env.is_main:
        log.warning(f"--val-fraction {cfg.data.val_fraction} holds out none of the {corpus.posts} posts: no validation loss")
    plan = plan_run(cfg, env, corpus)

    # The settings left to auto.
    for name in ("compile", "pad_vocab", "gradient_checkpointing"):
        if getattr(cfg.model, name) is None:
            sources[("model", name)] = "auto"
    cfg = resolve(cfg, env, spec, shape)
    settings_toml = to_toml(cfg, sources)
    if env.is_main:
        ckpt.atomic_write_text(out / "config.toml", settings_toml)
    mem = memory_plan(cfg, env, spec, shape, cfg.model.gradient_checkpointing)

    torch.manual_seed(cfg.train.seed)
    engine = spec.build(cfg, env, plan.grad_accum, weights, shape)
    if resume_from:
        engine.load_state(resume_from / ckpt.TRAIN_STATE)
    if not (resume_from and ckpt.load_rng_state(resume_from, env.rank)):
        torch.manual_seed(cfg.train.seed + env.rank + (state["step"] if state else 0))  # dropout differs per rank
    progress = Progress(
        step=state["step"] if state else 0,
        tokens=torch.tensor(float(state["tokens"]) if state else 0.0, device=env.device),
        data=DataState.from_dict(state["data"], resume_from) if state else DataState(),
        bad_steps=state.get("bad_steps", 0) if state else 0,
    )
    resume_step = progress.step if state else None
    run = Run(cfg, env, spec, layout, tokenizer, train_data, val, corpus, val_corpus(val) if val else None, plan, mem, engine, resume_from, state,
              Checkpointer(out, cfg, engine, tokenizer, resume_step, state, val is not None), progress, out,
              MetricsLog(out / "metrics.jsonl", resume_step, env.is_main,
                         Trackers(parse_report_to(cfg.train.report_to), out, cfg.to_dict(), settings_toml, env.is_main)),
              MetricsLog(out / "samples.jsonl", resume_step, env.is_main), base_commit)
    if env.is_main:
        print_summary(run, sources)
        one, weights = ckpt.checkpoint_bytes(cfg.train.backend, cfg.train.precision, mem.shape.n_params)
        run.checkpointer.check_disk(one, weights, f"estimated for {cfg.model.model} under {cfg.train.backend}")
        run.checkpointer.check_save_time(ckpt.save_seconds(one), run.step_estimate, f"estimated at {ckpt.WRITE_BYTES_PER_S / 1e6:.0f} MB/s")
    if state and state["max_steps"] != plan.max_steps:
        log.warning(f"the checkpoint was planned for {state['max_steps']} steps, this run for {plan.max_steps}: the lr schedule changes")
    stores = train_data.store_names
    if state and state.get("stores", stores) != stores and env.is_main:
        log.warning(f"the training data changed since the checkpoint (token stores {', '.join(state['stores'])} -> {', '.join(stores)}): "
                    f"the run continues at epoch {progress.data.epoch}, row {progress.data.row} of the new data's order")
    return run


def fit(run: Run) -> bool:
    """The loop. Returns False when it stopped early (signal or --halt-at-step) with a checkpoint to resume from."""
    cfg, env, engine, p, t = run.cfg, run.env, run.engine, run.progress, run.cfg.train
    max_steps, checkpoints = run.plan.max_steps, run.checkpointer
    loader = TrainLoader(run.train_data, p.data, t.micro_batch_size, env.rank, env.world_size, env.device,
                         prefetch=cfg.data.prefetch, isolated=cfg.data.packing == "isolated", step_rows=t.global_batch_size)
    loss_fn = torch.compile(token_loss_sum) if cfg.model.compile else token_loss_sum  # fuses the fp32 upcast into the loss
    flops = perf.model_flops_per_token(engine.module, cfg.data.seq_len, recompute=bool(cfg.model.gradient_checkpointing))
    peak = perf.peak_tflops(env.device, t.peak_tflops)
    metrics, samples = run.metrics, run.samples

    engine.train(True)
    t_log, tokens_at_log = time.perf_counter(), p.tokens.item()
    step_s, first = run.step_estimate, p.step + 1  # seconds a step takes: the start's estimate, then measured
    with TrainProgress(max_steps, p.step, env.is_main) as bar, GracefulStop(announce=env.local_rank == 0) as stop:
        while p.step < max_steps:
            stop.at_step(p.step + 1, step_s, checkpoints.save_s)
            engine.set_lr(lr := lr_at(p.step, cfg.optim, max_steps))
            batches = [loader.next_batch() for _ in range(run.plan.grad_accum)]
            p.data = batches[-1][3]
            global_loss, grad_norm, n_targets, applied = train_step(engine, [b[:3] for b in batches], cfg.optim.grad_clip, env.device, loss_fn)
            p.tokens += n_targets
            p.step += 1
            took = time.monotonic() - stop.started
            step_s = took if step_s is None or p.step == first else 0.8 * step_s + 0.2 * took
            if p.step == first and took > 60 and p.step < max_steps:
                bar.note(f"step {p.step} took {perf.duration(took)}: at this pace the {max_steps - p.step} step(s) to go take "
                         f"~{perf.duration(took * (max_steps - p.step))}")
            if not applied:
                p.bad_steps += 1
                what = f"step {p.step}: loss {global_loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
                metrics.write(step=p.step, skipped=True, loss=global_loss.item(), grad_norm=grad_norm.item())
                if not engine.can_skip or p.bad_steps > t.max_bad_steps:
                    raise UserError(
                        f"{what} is not finite; stopped before updating the weights (last good: {checkpoints.last_good()} in {checkpoints.root})",
                        "rerun the same command to resume from it, with a lower --lr or --grad-clip"
                        + (", or let up to N such steps be skipped with --max-bad-steps N" if engine.can_skip else "")
                        + (" (DeepSpeed cannot skip a step)" if not engine.can_skip else ""),
                    )
                bar.note(f"{what} is not finite: update skipped ({p.bad_steps} of --max-bad-steps {t.max_bad_steps})")
            elif p.step % t.log_every == 0 or p.step == max_steps:
                loss_val = global_loss.item()  # metrics are read only on log steps
                now, tok = time.perf_counter(), p.tokens.item()
                tps = (tok - tokens_at_log) / (now - t_log)
                rec = dict(step=p.step, loss=loss_val, lr=lr, grad_norm=grad_norm.item(), tokens=int(tok), tokens_per_s=tps,
                           **perf.utilisation(tps, flops, peak, env.world_size), peak_mem_gb=perf.peak_memory_gib(env.device))
                t_log, tokens_at_log = now, tok
                metrics.write(**rec)
                bar.update(p.step, f"loss {loss_val:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
                           + (f"  MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else "") + f"  mem {rec['peak_mem_gb']:.1f} GiB")
            else:
                bar.update(p.step)
            early_stop = False
            if run.val and t.eval_every and p.step % t.eval_every == 0 and p.step != max_steps:
                val_loss = evaluate(engine, run.val, cfg, env, run.tokenizer.eos_token_id)
                metrics.write(step=p.step, val_loss=val_loss)
                bar.note(f"step {p.step}: val_loss {val_loss:.4f}")
                early_stop = checkpoints.validated(p.step, val_loss)
            if t.sample_every and p.step % t.sample_every == 0:
                write_samples(engine, run.tokenizer, cfg, env, p.step, samples)
                bar.note(f"step {p.step}: samples in {run.out / 'samples.jsonl'}")
            # The step's one collective vote (CPU): a signal on any rank, and rank 0's clock for a timed save.
            signalled, clock = stop.vote(checkpoints.clock_due())
            if checkpoints.due(p.step, max_steps, clock):
                checkpoints.save(p.step, trainer_state(run))
                if env.is_main and checkpoints.saves == 1:  # the first save is measured: check it fits
                    checkpoints.check_save_time(checkpoints.save_s, step_s, "measured")
                signalled = stop.drain() or signalled  # the vote cast before the save: a signal may have come during it
            if early_stop:
                bar.note(f"step {p.step}: early stopping, no new best val_loss in {checkpoints.since_best} validations "
                         f"(best {checkpoints.best['val_loss']:.4f} at step {checkpoints.best['step']})")
                break
            halt = bool(t.halt_at_step) and p.step == t.halt_at_step and p.step != max_steps
            if (signalled or halt) and p.step != max_steps:
                checkpoints.ensure(p.step, lambda: trainer_state(run))
                why = f"halted after step {p.step}" if halt else f"stopped by {stop.name} after step {p.step}"
                bar.note(f"{why} with a checkpoint in {checkpoints.root / f'step-{p.step}'}; run the same command again to continue")
                return False
    return True


def finish(run: Run) -> None:
    """Final validation, the last checkpoint, OUT/final (stock HF GPT-2 with a model card) and OUT/report.md."""
    cfg, env, step, checkpoints = run.cfg, run.env, run.progress.step, run.checkpointer
    state = run.resumed_state or {}
    if state.get("finished") and state["step"] == step:
        # The same command again after the run ended (a requeue, a retry): its final validation is in the
        # checkpoint; only the export and the report are written again.
        if env.is_main:
            console.print(f"the run already ended at step {step} (checkpoint {run.resume_from}); raise --max-steps to train further")
    elif run.val:
        val_loss = evaluate(run.engine, run.val, cfg, env, run.tokenizer.eos_token_id)
        run.metrics.write(step=step, val_loss=val_loss)
        checkpoints.validated(step, val_loss)
        if env.is_main:
            console.print(f"final val_loss {val_loss:.4f}")
    final = checkpoints.final_source(checkpoints.ensure(step, lambda: trainer_state(run, finished=True)))
    if env.is_main:
        best = checkpoints.best
        final_step = best["step"] if final.name == "best" else step
        t = cfg.train
        facts = [("model", f"GPT-2 {cfg.model.model} ({init_kind(cfg.model)})"), ("engine", f"{run.engine.name} x {env.world_size} ranks"),
                 ("batch", f"{t.global_batch_size} x {cfg.data.seq_len} tokens"), ("steps", str(step)),
                 ("OUT/final", f"step {final_step}" + (f", the best val loss {best['val_loss']:.4f}" if final.name == "best" else ", the last step"))]
        if run.predicted:  # the measured mean throughput follows in the report: together they check the planner
            p = run.predicted
            facts.append(("planned throughput", f"{p['tokens_per_s']:,.0f} tokens/s ({p['step_s']:.2f} s a step, {p['exposed_share']:.0%} "
                                                f"exposed communication; python -m greentext_dist.plan, docs/scaling.md)"))
        ckpt.publish_final(final, run.out / "final", {"README.md": model_card(run, final_step)})
        if (final / ADAPTER).is_dir():  # LoRA: the same step's adapter, for peft
            ckpt.publish_adapter(final, run.out / ADAPTER)
        report = write_report(run.out, facts)
        console.print(f"[green]done:[/] {step} steps; model (step {final_step}) in {run.out / 'final'}; report in {report}")


def model_card(run: Run, final_step: int) -> str:
    from greentext_dist.report import model_card as card

    cfg, p = run.cfg, run.progress
    return card(run.out, cfg, source_of(cfg.model) or "random init", base_commit=run.base_commit, corpus=run.corpus, val_corpus=run.val_corpus,
                steps=p.step, tokens=int(p.tokens.item()), epochs=p.step / run.plan.steps_per_epoch,
                engine=f"{run.engine.name} x {run.env.world_size} ranks", final_step=final_step, best=run.checkpointer.best)


def main(argv: list[str] | None = None) -> int:
    return main_with(*parse_args_with_sources(argv))


def main_with(cfg: Config, sources: dict) -> int:
    run = setup(cfg, sources)
    try:
        if fit(run):
            finish(run)
    finally:
        run.metrics.trackers.close()
    return 0


def to_argv(settings: dict) -> list[str]:
    """train(model="small", max_steps=10, mix=["hellaswag=0.1"], compile=False) -> the same as the CLI flags."""
    import difflib

    from greentext_dist.config import API_HELP, setting_types

    argv, types_ = [], setting_types()
    for name, value in settings.items():
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=1)
            raise UserError(f"train() got an unknown keyword {name}=", f"use {close[0]}=, the closest setting" if close else API_HELP)
        if types_[name] is bool and not isinstance(value, bool) and value is not None:
            raise UserError(f"{name}= takes True or False, not {value!r}", f"pass {name}=True or {name}=False")
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, (str, os.PathLike, int, float, list, tuple, type(None))):
            fix = "save it with .save_to_disk(DIR) and pass DIR" if type(value).__module__.startswith("datasets") else "pass a str"
            raise UserError(f"{name}= takes a str, number or path, not a {type(value).__name__}", fix)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def api(**settings) -> Path:
    """The Python API: `from greentext_dist import train; train(model="small", dataset="posts.jsonl")`. Takes the
    CLI's settings as keywords, raises UserError on bad input, returns OUT/final. Can be called again in the same
    process: the output-dir lock and the process group are released whatever happens."""
    try:
        cfg, sources = parse_args_with_sources(to_argv(settings))
        main_with(cfg, sources)
        return Path(cfg.checkpoint.output_dir) / "final"
    except UserError as e:
        raise as_keywords(e) from None
    finally:
        while _claimed:
            rundir.release(_claimed.pop())
        shutdown()


class _CallableModule(types.ModuleType):
    """`from greentext_dist import train` gives this module; calling it runs `api`."""

    def __call__(self, **settings) -> Path:
        return api(**settings)


sys.modules[__name__].__class__ = _CallableModule


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


def run_cli() -> None:
    code = cli()
    # All work is saved and the process group is gone. Skip interpreter teardown: with gloo, torch's
    # background threads occasionally abort there ("terminate called without an active exception"),
    # which would turn a finished run into a failed exit code under torchrun.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_cli()
