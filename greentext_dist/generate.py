"""Sample greentexts from any HF GPT-2 directory (ours or the hub's).

    python -m greentext_dist.generate out/final --prompt "be me model" --num-samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from greentext_dist.errors import OneLineParser, UserError
from greentext_dist.rundir import writable_file
from greentext_dist.ui import fail, results, setup_logging

# torch, transformers and the model load inside the functions that need them: `--help` and a bad flag answer at once.


def as_greentext(prompt: str) -> str:
    """Prompts are written without '>': 'be me\\ngo outside' -> '>be me\\n>go outside' (any line ending, as in training)."""
    from greentext_dist.sources import one_newline

    return "\n".join(line if line.startswith(">") else ">" + line for line in one_newline(prompt).split("\n"))


def generate(model, tokenizer, prompt: str, *, num_samples: int = 4, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 0.95, seed: int = 0, prefix: str | None = None, include_prefix: bool = True,
             synced_gpus: bool = False) -> list[str]:
    """Samples for one prompt, batched, with the KV cache, each stopping at <|endoftext|>. Same seed, same samples."""
    text = (prefix or "") + (as_greentext(prompt) if prompt else "")
    out = generate_batch(model, tokenizer, [text], num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, synced_gpus=synced_gpus)[0]
    if not include_prefix and prefix:
        out = [s[len(prefix):] for s in out]
    return out


def generate_batch(model, tokenizer, texts: list[str], *, num_samples: int = 1, max_new_tokens: int = 200, temperature: float = 0.8,
                   top_k: int = 50, top_p: float = 0.95, seed: int = 0, synced_gpus: bool = False) -> list[list[str]]:
    """Raw texts (already formatted) -> num_samples continuations each, all in one left-padded batch.
    Every text starts after <|endoftext|>, as every post does in training. temperature 0 is greedy."""
    import torch

    from greentext_dist.model import true_vocab

    check_sampling(temperature, top_k, top_p)
    check_fits(model, tokenizer, texts, max_new_tokens)
    eos = tokenizer.eos_token_id
    rows = [[eos] + tokenizer.encode(t) for t in texts for _ in range(num_samples)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(  # generate() runs under no_grad itself
        input_ids, attention_mask=attention_mask, do_sample=sampling, temperature=temperature if sampling else None,
        top_k=(top_k or None) if sampling else None, top_p=top_p if sampling else None, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=eos, use_cache=True, synced_gpus=synced_gpus,
        suppress_tokens=list(range(true_vocab(model), model.config.vocab_size)) or None,  # rows of a padded vocabulary
    )
    samples = []
    for i, row in enumerate(out[:, width:].tolist()):
        if eos in row:
            row = row[:row.index(eos)]
        samples.append(texts[i // num_samples] + tokenizer.decode(row))
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(texts))]


def check_fits(model, tokenizer, texts: list[str], max_new_tokens: int) -> None:
    """The longest prompt (with its opening <|endoftext|>) and max_new_tokens within the model's positions."""
    width, positions = 1 + max(len(tokenizer.encode(t)) for t in texts), model.config.n_positions
    if width + max_new_tokens > positions:
        raise UserError(f"the prompt ({width} tokens with the opening <|endoftext|>) and --max-new-tokens {max_new_tokens} do not fit "
                        f"the model's {positions} positions",
                        f"use --max-new-tokens {positions - width} or less" if width < positions else "use a shorter prompt")


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise UserError(f"--temperature must not be negative, got {temperature}", "use e.g. 0.8 (0 is greedy decoding)")
    if top_k < 0:
        raise UserError(f"--top-k must not be negative, got {top_k}", "use e.g. 50 (0 turns top-k off)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}", "use e.g. 0.95 (1 turns top-p off)")


def show(samples: list[str]) -> None:
    from rich.text import Text

    for i, s in enumerate(samples):
        results.rule(f"sample {i + 1}", style="dim")
        for line in s.split("\n"):
            results.print(Text(line, style="green" if line.startswith(">") else ""))


def load(ckpt: str, device: str | None = None):
    """A local HF GPT-2 directory or a hub repo. Collective under a process group (evaluate's ranks): rank 0
    downloads a hub repo once for all of them."""
    import torch

    from greentext_dist.hub import shared_download
    from greentext_dist.model import check_gpt2_dir, load_weights
    from greentext_dist.tokenizer import load_tokenizer

    from greentext_dist.dist import mps_available
    from greentext_dist.lora import adapter_base, load_adapted

    ckpt = shared_download(ckpt)
    dev = device or ("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if base := adapter_base(ckpt):  # a LoRA adapter (OUT/adapter): its base with the adapter merged in
        base = shared_download(base)
        check_gpt2_dir(base, f"the base model of adapter {ckpt}")
        model = load_adapted(ckpt, load_weights(base, dict(attn_implementation="sdpa")))
        tok_dir = next((d for d in (Path(ckpt), Path(ckpt).parent / "final", Path(base)) if (d / "tokenizer_config.json").exists()), None)
    else:
        check_gpt2_dir(ckpt, "checkpoint")
        model = load_weights(ckpt, dict(attn_implementation="sdpa"))
        tok_dir = Path(ckpt) if (Path(ckpt) / "tokenizer_config.json").exists() else None
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir else "gpt2")
    return model.to(dev).eval(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF GPT-2 directory (e.g. out/final or out/checkpoints/step-N), hub id (e.g. gpt2), or a LoRA "
                   "adapter folder (out/adapter: its base is loaded and the adapter merged in)")
    p.add_argument("--prompt", default="be me", help="opening lines, without '>', separated by newlines or a typed \\n "
                   "(--prompt 'be me\\nwork at a bank'); empty: unconditional")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default=None, help="raw text placed before the prompt, as gpt-2-simple's prefix")
    p.add_argument("--include-prefix", action=argparse.BooleanOptionalAction, default=True, help="keep the prefix in the output")
    p.add_argument("--output", default=None, help="also write samples to this .jsonl file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    a.prompt = a.prompt.replace("\\n", "\n")  # a shell passes "be me\ngo outside" with a backslash and an n
    setup_logging(0)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every rank would load the model on the first GPU, draw the same samples and write the same --output.
            raise UserError("generate runs in one process, not under torchrun or another launcher",
                            "run python -m greentext_dist.generate (sampling needs no launcher); for sampling spread over "
                            "GPUs use python -m greentext_dist.evaluate --task robustness under torchrun")
        if a.num_samples < 1 or a.max_new_tokens < 1:
            raise UserError("--num-samples and --max-new-tokens must be at least 1", "pass positive values")
        check_sampling(a.temperature, a.top_k, a.top_p)
        if a.output:
            writable_file(a.output, "--output")
        model, tokenizer = load(a.checkpoint)
        samples = generate(model, tokenizer, a.prompt, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                           prefix=a.prefix, include_prefix=a.include_prefix)
    except UserError as e:
        fail(str(e))
        return 2
    show(samples)
    if a.output:
        with open(a.output, "w") as f:
            for s in samples:
                f.write(json.dumps({"prompt": a.prompt, "seed": a.seed, "text": s}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
