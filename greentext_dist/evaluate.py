"""Evaluate any HF GPT-2 directory (ours or the hub's): validation loss, HellaSwag, robustness.

    python -m greentext_dist.evaluate out/final --task val-loss --dataset DarwinAnim8or/greentext
    python -m greentext_dist.evaluate out/final --task hellaswag --data Rowan/hellaswag [--limit N]
    python -m greentext_dist.evaluate out/final --task robustness --dataset DarwinAnim8or/greentext
    torchrun --nproc_per_node 8 -m greentext_dist.evaluate out/final --task hellaswag ...   (sharded, all-reduced)

Prints the result and writes it as JSON (--output); robustness also writes a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from greentext_dist.errors import OneLineParser, UserError
from greentext_dist.rundir import writable_file
from greentext_dist.ui import console, fail, results, setup_logging


def val_loss(model, tokenizer, a, env) -> dict:
    """The training definition: the same held-out posts (hash split), packing, and token-sum / token-count."""
    import numpy as np
    import torch

    from greentext_dist.data import val_batches, validation_rows
    from greentext_dist.engines.base import autocast
    from greentext_dist.loss import mean_token_loss
    from greentext_dist.model import lm_logits, true_vocab

    store = dataset_store(a, tokenizer, env)
    ids = np.arange(store.n_posts) if a.all_posts else np.flatnonzero(store.val_mask(a.val_fraction))
    rows = validation_rows(store, ids, a.seq_len)
    if not len(rows):
        raise UserError(f"no validation posts in {a.dataset} at --val-fraction {a.val_fraction}", "pass --all-posts to score the whole file")
    eos = tokenizer.eos_token_id if a.packing == "isolated" else None

    def forward(x, pos):
        with autocast(env.device, a.precision):
            return lm_logits(model, x, pos, true_vocab(model))

    loss, n_tokens = mean_token_loss(forward, val_batches(rows, a.batch_size, env.rank, env.world_size, None, eos), env.device)
    return {"task": "val-loss", "dataset": a.dataset, "val_loss": loss, "perplexity": float(torch.tensor(loss).exp()),
            "tokens": n_tokens, "seq_len": a.seq_len, "packing": a.packing}


def dataset_store(a, tokenizer, env):
    """--dataset's token store: the one training used (same key), built here if missing."""
    from greentext_dist.data import cache_dir, prepare_source, source_commit
    from greentext_dist.dist import everywhere, on_main

    revision = on_main(source_commit, a.dataset)  # asked once for all ranks
    return everywhere(prepare_source, a.dataset, a.text_field, tokenizer, cache_dir(a.cache_dir), revision=revision, progress=env.is_main,
                      defer=not env.is_main)


def hellaswag(model, tokenizer, a, env) -> dict:
    from greentext_dist.dist import on_main
    from greentext_dist.engines.base import autocast
    from greentext_dist.hellaswag import evaluate_hellaswag, load_items

    items = on_main(load_items, a.data, limit=a.limit)  # read (or downloaded) once, handed to every rank
    with autocast(env.device, a.precision):
        return {**evaluate_hellaswag(model, tokenizer, items, env.rank, env.world_size, a.batch_size, env.device), "data": a.data}


def robustness(model, tokenizer, a, env) -> dict:
    import torch

    from greentext_dist.engines.base import autocast
    from greentext_dist.generate import as_greentext, check_fits, generate_batch
    from greentext_dist.robustness import DEVIATION_PROMPTS, GREENTEXT_PROMPTS, corpus_automaton, summarise

    suite = [("greentext", p) for p in GREENTEXT_PROMPTS] + [("deviation", p) for p in DEVIATION_PROMPTS]
    # Greentext openings are written without '>' and formatted; deviation prompts go in as typed.
    every_text = [as_greentext(p) if kind == "greentext" else p for kind, p in suite]
    check_fits(model, tokenizer, every_text, a.max_new_tokens)  # on every rank alike, before any work
    mine, texts = suite[env.rank::env.world_size], every_text[env.rank::env.world_size]
    store = dataset_store(a, tokenizer, env)
    posts = [store.post(i)[:-1].tolist() for i in range(store.n_posts)]  # without the <|endoftext|>
    automaton = corpus_automaton(posts, tokenizer.eos_token_id)
    with autocast(env.device, a.precision):
        outs = generate_batch(model, tokenizer, texts, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed + env.rank)
    samples = []
    for (kind, prompt), text, group in zip(mine, texts, outs):
        for out in group:
            generated = out[len(text):]
            samples.append({"kind": kind, "prompt": prompt, "text": out, "generated": generated,
                            "longest_run": automaton.longest_match(tokenizer.encode(generated))})
    if env.world_size > 1:
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, samples)
        samples = [s for part in gathered for s in part]
    return {"task": "robustness", "dataset": a.dataset, "corpus_posts": len(posts), "summary": summarise(samples), "samples": samples}


def robustness_markdown(result: dict, checkpoint: str, shown: int = 2) -> str:
    lines = [f"# Robustness and memorisation: {checkpoint}", "",
             f"Training corpus: {result['dataset']} ({result['corpus_posts']} posts).", "",
             "| prompts | samples | '>' lines | well-formed | longest run (max / mean tokens) | over 50 tokens |",
             "|---|---|---|---|---|---|"]
    for kind, s in result["summary"].items():
        adh = "-" if s["line_adherence"] is None else f"{s['line_adherence']:.1%}"
        lines.append(f"| {kind} | {s['samples']} | {adh} | {s['well_formed']:.1%} | {s['longest_run_max']} / "
                     f"{s['longest_run_mean']:.1f} | {s['memorised_over_50']:.1%} |")
    for kind in ("greentext", "deviation"):
        lines += ["", f"## {kind} prompts: a few samples", ""]
        for s in [s for s in result["samples"] if s["kind"] == kind][:shown]:
            lines += [f"Prompt `{s['prompt']!r}`, longest run shared with the corpus: {s['longest_run']} tokens", "", "```", s["text"], "```", ""]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF GPT-2 directory (e.g. out/final), hub id (e.g. gpt2), or a LoRA adapter folder (out/adapter)")
    p.add_argument("--task", required=True, choices=["val-loss", "hellaswag", "robustness"])
    p.add_argument("--log-samples", default=None, help="hellaswag: write each item's scores (log-probs, picks, acc, acc_norm) to this .jsonl")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("val-loss and robustness")
    g.add_argument("--dataset", default="DarwinAnim8or/greentext", help="the training data (hub id, file or folder)")
    g.add_argument("--text-field", default=None)
    g.add_argument("--val-fraction", type=float, default=0.05, help="the held-out share used in training (same hash split)")
    g.add_argument("--all-posts", action="store_true", help="score every post (a separate validation file)")
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--packing", choices=["concat", "isolated"], default="concat")
    g.add_argument("--cache-dir", default=None, help="token stores (as in training; default: $GREENTEXT_CACHE or ~/.cache/greentext_dist/tokens)")
    g = p.add_argument_group("hellaswag")
    g.add_argument("--data", default="Rowan/hellaswag", help="hub id (validation split), local jsonl with ctx/endings/label, or a save_to_disk folder")
    g.add_argument("--limit", type=int, default=None, help="score only the first N items")
    g = p.add_argument_group("robustness")
    g.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--report", default=None, help="Markdown report path (default: next to --output, or robustness.md)")
    return p


def check_outputs(a) -> None:
    """Rank 0 writes the results: check now that it can, so a long evaluation never loses them at the end."""
    report = ("--report", report_path(a)) if a.task == "robustness" else ("", None)
    for flag, path in (("--output", a.output), ("--log-samples", a.log_samples), report):
        if path:
            writable_file(path, flag)


def report_path(a) -> str:
    return a.report or (str(Path(a.output).with_suffix(".md")) if a.output else "robustness.md")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    import torch

    from greentext_dist.dist import init_distributed, on_main
    from greentext_dist.generate import check_sampling, load

    env = init_distributed()
    setup_logging(env.rank)
    try:
        for flag in ("batch_size", "seq_len", "num_samples", "max_new_tokens"):
            if getattr(a, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1", "pass a positive value")
        if a.limit is not None and a.limit < 1:
            raise UserError("--limit must be at least 1", "pass a positive number of items, or leave it out")
        if a.task == "robustness":
            check_sampling(a.temperature, a.top_k, a.top_p)
        on_main(check_outputs, a)
        a.precision = a.precision or ("bf16" if env.device.type == "cuda" else "fp32")
        model, tokenizer = load(a.checkpoint, str(env.device))  # every rank: a hub repo is downloaded once, by rank 0
        if a.seq_len > model.config.n_positions:
            raise UserError(f"--seq-len {a.seq_len} is longer than the model's {model.config.n_positions} positions",
                            f"use --seq-len {model.config.n_positions} or less")
        result = {"val-loss": val_loss, "hellaswag": hellaswag, "robustness": robustness}[a.task](model, tokenizer, a, env)
    except UserError as e:
        fail(str(e))
        return 2
    result["checkpoint"] = a.checkpoint
    per_item = result.pop("per_item", None)
    if env.is_main and a.log_samples and per_item is not None:
        Path(a.log_samples).parent.mkdir(parents=True, exist_ok=True)
        Path(a.log_samples).write_text("".join(json.dumps(r) + "\n" for r in per_item))
    if env.is_main:
        shown = {k: v for k, v in result.items() if k != "samples"}
        results.print_json(json.dumps(shown))
        if a.output:
            Path(a.output).parent.mkdir(parents=True, exist_ok=True)
            Path(a.output).write_text(json.dumps(result, indent=1) + "\n")
        if a.task == "robustness":
            report = Path(report_path(a))
            report.write_text(robustness_markdown(result, a.checkpoint))
            console.print(f"report: {report}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
