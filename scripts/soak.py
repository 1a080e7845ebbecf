"""Soak test: train, kill at random moments (SIGKILL or SIGTERM), resume, again and again; the final loss
curve must equal an uninterrupted run, and checkpoint rotation must keep disk use bounded: at most
--keep-last + 1 checkpoints (a kill between a save's rename and its rotation) and one leftover
temporary folder, which the next run removes.

    python scripts/soak.py --rounds 4 --max-steps 60             # the CI variant (about 40 s on 2 cores)
    python scripts/soak.py --rounds 100 --max-steps 2000 --epochs-corpus 20   # a long soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_posts(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = "be me go outside see a dog cat pizza mfw tfw the bus job boss code rain".split()
    posts = ["\n".join(">" + " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(1, 6)))
             for _ in range(n)]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in posts))


def losses(out: Path) -> dict[int, float]:
    from greentext_dist.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r and not r.get("skipped")}


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="interrupted rounds (at least)")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--posts", type=int, default=40, help="corpus size: small, so the run spans many epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="greentext-soak-"))
    data = work / "posts.jsonl"
    write_posts(data, a.posts, a.seed)
    env = {**os.environ, "GREENTEXT_PLAIN_LOG": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def args(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "greentext_dist" / "train.py"), "--model", "tiny", "--dataset", str(data),
                "--output-dir", str(out), "--seq-len", "32", "--precision", "fp32", "--dropout", "0.1", "--val-fraction", "0.1",
                "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", str(a.max_steps), "--eval-every", "10",
                "--save-every", "2", "--keep-last", "2", "--log-every", "1", "--max-shard-size", "5MB"]

    ref = work / "ref"
    reference = subprocess.Popen(args(ref), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # beside the kills
    out = work / "run"
    rounds = kills = 0
    peak_disk = 0
    # Where each kill lands: after a chosen step (spread over the first half, so the run cannot finish before
    # every kill has happened however fast the machine is), plus a random moment that often falls inside a save.
    targets = sorted(rng.sample(range(2, max(a.max_steps // 2, a.rounds + 3)), a.rounds))
    while True:
        rounds += 1
        proc = subprocess.Popen(args(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = len(losses(out)) if (out / "metrics.jsonl").exists() else 0
        target = max(targets[kills], before + 1) if kills < a.rounds else None
        deadline = time.time() + 120
        while target and proc.poll() is None and time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(losses(out)) >= target:
                break
            time.sleep(0.01)
        if target and proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]))
            kills += 1
        _, err = proc.communicate(timeout=120)
        if proc.returncode not in (0, -signal.SIGKILL):
            print(f"round {rounds}: exit {proc.returncode}\n{err[-3000:]}", file=sys.stderr)
            return 1
        ckpts = out / "checkpoints"
        steps = [d for d in ckpts.iterdir() if d.name.startswith("step-")] if ckpts.exists() else []
        peak_disk = max(peak_disk, disk_bytes(out))
        # A kill between a save's rename and its rotation can leave one extra checkpoint until the next save.
        if len(steps) > 3 or len(list(ckpts.glob(".*-step-*")) if ckpts.exists() else []) > 1:
            print(f"round {rounds}: {len(steps)} checkpoints on disk, --keep-last is 2", file=sys.stderr)
            return 1
        if (out / "final").exists():
            break
        if rounds > a.rounds * 4:
            print("the run never finished", file=sys.stderr)
            return 1
    if kills < a.rounds:
        print(f"the run finished after {kills} of {a.rounds} kills: raise --max-steps", file=sys.stderr)
        return 1
    _, err = reference.communicate(timeout=600)
    if reference.returncode != 0:
        print(f"the uninterrupted reference run failed: exit {reference.returncode}\n{err[-3000:]}", file=sys.stderr)
        return 1
    want = losses(ref)
    got = losses(out)
    worst = max(abs(got[s] - want[s]) for s in want) if set(got) == set(want) else float("inf")
    print(json.dumps({"rounds": rounds, "kills": kills, "steps": len(got), "max_loss_diff": worst,
                      "peak_disk_mb": round(peak_disk / 2**20, 1), "ref_disk_mb": round(disk_bytes(ref) / 2**20, 1)}))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
