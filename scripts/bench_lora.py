"""LoRA against full fine-tuning, measured on this machine: the same base, data, steps and batch; validation loss,
peak memory, tokens/s, trainable parameters and the size of the resumable state. The numbers in docs/training.md.

    python scripts/bench_lora.py --dataset POSTS.jsonl [--steps 100] [--rank 8] [--json]

The base is the demo's model (the tiny GPT-2 trained 200 steps on the bundled sample, scripts/demo.sh's command);
both runs then fine-tune it on --dataset: full fine-tuning at --lr-full, LoRA at --lr-lora (LoRA takes a larger rate,
as peft's examples do). On a CPU the tiny model is mostly its embedding, which LoRA leaves frozen: read the memory
columns with the planner's GPU numbers beside them (python -m greentext_dist.plan --lora-rank R).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "greentext_dist.train", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])


def summary(out: Path, label: str) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    state = out / "checkpoints" / f"step-{steps[-1]['step']}" / "train_state"
    return {"run": label, "final_val_loss": next(r["val_loss"] for r in reversed(rows) if "val_loss" in r),
            "final_train_loss": steps[-1]["loss"], "peak_mem_gb": max(r["peak_mem_gb"] for r in steps),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[len(steps) // 4:]),
            "train_state_mb": sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="the posts to fine-tune on")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=4e-3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        train(["--model", "tiny", "--dataset", "greentext_dist/data/demo_greentexts.jsonl", "--seq-len", "128", "--global-batch-size", "8",
               "--micro-batch-size", "8", "--max-steps", "200", "--lr", "4e-3", "--min-lr", "4e-4", "--dropout", "0", "--precision", "fp32",
               "--val-fraction", "0", "--log-every", "20", "--output-dir", str(base)])
        common = ["--model", "tiny", "--model-path", str(base / "final"), "--dataset", a.dataset, "--seq-len", "128", "--global-batch-size", "8",
                  "--micro-batch-size", "8", "--max-steps", str(a.steps), "--dropout", "0", "--precision", "fp32", "--val-fraction", "0.1",
                  "--eval-every", str(a.steps), "--log-every", "1", "--save-every", "0"]
        results = []
        for label, extra in (("full", ["--lr", str(a.lr_full)]), (f"lora r{a.rank}", ["--lr", str(a.lr_lora), "--lora-rank", str(a.rank)])):
            out = Path(tmp) / label.replace(" ", "-")
            train([*common, *extra, "--output-dir", str(out)])
            results.append(summary(out, label))
    from greentext_dist import plan

    s = plan.shape("tiny", lora_rank=a.rank)
    results[1]["trainable_params"], results[0]["trainable_params"] = s.trainable, s.n_params
    if a.json:
        print(json.dumps({"rows": results}))
        return 0
    print(f"{'run':10} {'val loss':>9} {'train loss':>10} {'peak GB':>8} {'tokens/s':>9} {'trainable':>10} {'state MB':>9}")
    for r in results:
        print(f"{r['run']:10} {r['final_val_loss']:>9.4f} {r['final_train_loss']:>10.4f} {r['peak_mem_gb']:>8.2f} "
              f"{r['median_tokens_per_s']:>9,.0f} {r['trainable_params']:>10,} {r['train_state_mb']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
