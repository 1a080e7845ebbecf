"""End-of-training report: OUT/report.md with the final metrics, and OUT/loss.png (train and val loss
against steps and tokens) when matplotlib is installed (`pip install greentext_dist[plot]`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from greentext_dist.metrics import read_metrics

log = logging.getLogger(__name__)


def plot_losses(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipped loss.png (pip install 'greentext_dist[plot]')")
        return False
    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    val = [r for r in rows if r.get("val_loss") is not None]
    tokens_at = {r["step"]: r["tokens"] for r in train}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "step", "optimizer step"), (axes[1], "tokens", "tokens seen")):
        ax.plot([r[key] for r in train], [r["loss"] for r in train], label="train")
        vx = [r["step"] if key == "step" else tokens_at.get(r["step"]) for r in val]
        ax.plot([x for x in vx if x is not None], [r["val_loss"] for r, x in zip(val, vx) if x is not None], "o-", label="validation")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats / token)")
    axes[0].legend()
    fig.tight_layout()
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
