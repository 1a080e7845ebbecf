"""End-of-training report: OUT/report.md with the final metrics, and OUT/loss.png (train and val loss
against steps and tokens) when matplotlib is installed (`pip install greentext_dist[plot]`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from greentext_dist.config import lora_targets
from greentext_dist.hub import is_local
from greentext_dist.metrics import read_metrics

log = logging.getLogger(__name__)


def loss_figure(rows: list[dict]):
    """Train (and validation, if any) loss against optimizer steps and tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    val = [r for r in rows if r.get("val_loss") is not None]
    tokens_at = {r["step"]: r["tokens"] for r in train}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "step", "optimizer step"), (axes[1], "tokens", "tokens seen")):
        ax.plot([r[key] for r in train], [r["loss"] for r in train], label="train")
        vx = [r["step"] if key == "step" else tokens_at.get(r["step"]) for r in val]
        if val:
            ax.plot([x for x in vx if x is not None], [r["val_loss"] for r, x in zip(val, vx) if x is not None], "o-", label="validation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens are whole numbers, even on a 3-step run
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats / token)")
    if val:
        axes[0].legend()
    fig.tight_layout()
    return fig


def plot_losses(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipped loss.png (pip install 'greentext_dist[plot]')")
        return False
    fig = loss_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, summary: list[tuple[str, str]]) -> Path:
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    val = [r for r in rows if r.get("val_loss") is not None]
    last = train[-1] if train else {}
    speed = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    lines = ["# Training report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary]
    lines += [
        f"| final train loss | {last.get('loss', float('nan')):.4f} (step {last.get('step', 0)}) |",
        f"| final val loss | {val[-1]['val_loss']:.4f} |" if val else "| final val loss | none (no validation split) |",
        f"| best val loss | {min(r['val_loss'] for r in val):.4f} |" if val else "",
        f"| tokens trained | {last.get('tokens', 0):,} |",
        f"| mean throughput | {sum(speed) / max(len(speed), 1):,.0f} tokens/s |",
    ]
    if last.get("mfu") is not None:
        lines.append(f"| MFU / HFU (last log) | {last['mfu']:.1%} / {last['hfu']:.1%} |")
    lines = [l for l in lines if l]
    lines += [""]
    if plot_losses(rows, out / "loss.png"):
        lines += ["![train and validation loss](loss.png)", ""]
    else:
        lines += ["(loss.png skipped: matplotlib is not installed; `pip install 'greentext_dist[plot]'`)", ""]
    samples_file = out / "samples.jsonl"
    if samples_file.exists():
        samples = [json.loads(l) for l in samples_file.read_text().splitlines() if l.strip()]
        if samples:
            final_step = samples[-1]["step"]
            lines += [f"## Samples at step {final_step}", ""]
            for s in [s for s in samples if s["step"] == final_step]:
                lines += ["```", s["text"], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def model_card(out: Path, cfg, base: str, *, base_commit: str | None = None, corpus, val_corpus, steps: int, tokens: int, epochs: float, engine: str,
               final_step: int, best: dict | None) -> str:
    """OUT/final/README.md: what the model is, how it was trained, how well, and what it is (not) for."""
    rows = read_metrics(out / "metrics.jsonl")
    val = [r for r in rows if r.get("val_loss") is not None]
    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    samples_file = out / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()] if samples_file.exists() else []
    last_samples = [s for s in samples if samples and s["step"] == samples[-1]["step"]]
    hellaswag = out / "hellaswag.json"
    o, d, t = cfg.optim, cfg.data, cfg.train
    lines = [
        # The hub accepts only a repo id as base_model: not a local folder or "random init".
        "---", "license: mit", *([f"base_model: {base}"] if base != "random init" and not is_local(base) else []),
        "tags: [gpt2, greentext, text-generation]", "---", "",
        f"# GPT-2 {cfg.model.model} fine-tuned on greentext", "",
        f"Trained with greentext_dist from **{base}**" + (f" (hub commit `{base_commit}`)" if base_commit else "") + f" on `{d.dataset}`"
        + (f" ({corpus.posts:,} posts, {corpus.tokens:,} tokens)" if corpus else "") + ". "
        "Greentexts are short humorous stories whose lines start with `>`.", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| steps | {steps:,} ({epochs:.1f} epochs, {tokens:,} target tokens) |",
        f"| these weights | step {final_step}" + (" (lowest validation loss)" if best and best["step"] == final_step else "") + " |",
        f"| engine | {engine}, {t.precision} |",
        f"| batch | {t.global_batch_size} sequences x {d.seq_len} tokens ({d.packing} packing) |",
        f"| optimizer | AdamW(betas {o.beta1}, {o.beta2}), lr {o.lr:g} -> {o.min_lr:g} cosine, weight decay {o.weight_decay}, "
        f"clip {o.grad_clip}, dropout {cfg.model.dropout} |",
        f"| seed | {t.seed} |",
        (f"| LoRA | rank {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha or 2 * cfg.model.lora_rank:g}, dropout {cfg.model.lora_dropout:g}, "
         f"on {', '.join(lora_targets(cfg.model))}; these weights have the adapter merged in (plain `transformers` loads them), "
         f"and the adapter alone is in PEFT's format in the run's `adapter/` folder |") if cfg.model.lora_rank else "",
        f"| final train loss | {train[-1]['loss']:.4f} |" if train else "",
        f"| final val loss | {val[-1]['val_loss']:.4f} ({val_corpus.posts:,} held-out posts) |" if val and val_corpus else "",
        f"| best val loss | {best['val_loss']:.4f} at step {best['step']} |" if best else "",
    ]
    if hellaswag.exists():
        h = json.loads(hellaswag.read_text())
        lines.append(f"| HellaSwag | acc {h.get('acc', float('nan')):.4f}, acc_norm {h.get('acc_norm', float('nan')):.4f} |")
    lines = [line for line in lines if line != ""] + [""]
    if last_samples:
        lines += [f"## Samples (step {last_samples[0]['step']})", ""]
        for s in last_samples:
            lines += ["```", s["text"], "```", ""]
    lines += [
        "## Use", "",
        "```python",
        "from transformers import pipeline",
        'print(pipeline("text-generation", model="PATH_OR_REPO")(">be me\\n", max_new_tokens=80, do_sample=True)[0]["generated_text"])',
        "```", "",
        "## Intended use and limits", "",
        "For fun and for studying fine-tuning: it writes greentext-shaped stories. It is not a source of facts. "
        "The greentext genre comes from anonymous forums and often contains crude, offensive or biased language; "
        "the model reproduces the style of its data and can produce such text. Filter its output before showing it to others.", "",
        "## License", "",
        "The GPT-2 weights are released by OpenAI under a modified MIT license; this fine-tune is shared under the same terms. "
        "Check the license of the training data you used.", "",
    ]
    return "\n".join(lines)
