"""The data path's speed: prepare (tokenise into the store), read (one rank's rows), start-up and memory.

    python scripts/bench_data.py [--corpus posts.jsonl] [--tokens 20e6] [--out docs/bench_data.json]

Prepare is compared with the raw batched tokenizer on the same texts in memory (same batch size, same threads).
Reading is one rank's micro-batches from the store (gather + batch tensors, no prefetch thread) at world 1 and as
rank 0 of a simulated world 8. Start-up is launch -> first optimizer step of train.py (tiny model, one process, store
ready) on the bundled demo corpus vs a corpus of --tokens tokens. Memory is a reading process's anonymous RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "greentext_dist" / "data" / "demo_greentexts.jsonl"
STANDIN = ROOT.parent / "shared" / "data" / "greentext_standin" / "greentexts.jsonl"


def scaled_corpus(src: Path, tokens: float, dest: Path) -> Path:
    """`src` repeated until it holds about `tokens` tokens (4 characters per token is close for English BPE)."""
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    chars = sum(len(json.loads(line).get("text", "")) for line in lines)
    copies = max(1, round(tokens * 4 / max(chars, 1)))
    with open(dest, "w") as f:
        for _ in range(copies):
            f.write("\n".join(lines) + "\n")
    return dest


def bench_prepare(corpus: Path, cache: Path, tok, repeats: int = 2) -> dict:
    """Best of `repeats` for each, alternating, so both see the same machine state. Tokens count the EOS per post."""
    from greentext_dist import store
    from greentext_dist.data import prepare_source
    from greentext_dist.sources import source_posts

    texts = list(source_posts(str(corpus), None))
    raw, call, prep = [], [], []
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        for i in range(0, len(texts), store.BATCH):  # the Rust tokenizer's batch call, as prepare uses it
            n += sum(len(x) + 1 for x in store.encode(tok, texts[i:i + store.BATCH]))
        raw.append(n / (time.perf_counter() - t0))
        t0, n = time.perf_counter(), 0
        for i in range(0, len(texts), store.BATCH):  # tokenizer(batch), as the pre-store loader called it
            n += sum(len(x) + 1 for x in tok(texts[i:i + store.BATCH], add_special_tokens=False)["input_ids"])
        call.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        s = prepare_source(str(corpus), None, tok, cache, progress=False, rebuild=True)
        prep.append(s.n_tokens / (time.perf_counter() - t0))
    return {"posts": s.n_posts, "tokens": s.n_tokens, "raw_tokenizer_tokens_per_s": round(max(raw)),
            "tokenizer_call_tokens_per_s": round(max(call)), "prepare_tokens_per_s": round(max(prep)),
            "prepare_vs_raw": round(max(prep) / max(raw), 3), "prepare_vs_tokenizer_call": round(max(prep) / max(call), 3),
            "prepare_s": round(s.n_tokens / max(prep), 2),
            "store_mib": round(s.tokens.nbytes / 2**20, 1)}


def bench_map(corpus: Path, tok, tmp: Path) -> dict:
    """The alternative the store does not use: datasets' Arrow cache + map(batched=True, num_proc=N)."""
    from datasets import load_dataset

    from greentext_dist import store

    out = {}
    for n in (1, 2):
        t0 = time.perf_counter()
        ds = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(tmp / f"hf{n}"))
        mapped = ds.map(lambda b: {"ids": store.encode(tok, [t.strip() for t in b["text"]])}, batched=True, batch_size=store.BATCH,
                        num_proc=n if n > 1 else None, remove_columns=ds.column_names)
        tokens = sum(len(x) for b in mapped.iter(batch_size=10_000) for x in b["ids"])
        out[f"num_proc{n}_tokens_per_s"] = round(tokens / (time.perf_counter() - t0))
    return out


def bench_read(corpus: Path, cache: Path, tok, seq_len: int, micro: int, seconds: float) -> dict:
    from greentext_dist.config import DataConfig
    from greentext_dist.data import DataState, TrainLoader, training_data

    train, _ = training_data(DataConfig(dataset=str(corpus), seq_len=seq_len, cache_dir=str(cache)), tok, 0, progress=False)
    out = {}
    for world in (1, 8):
        loader = TrainLoader(train, DataState(), micro, 0, world, "cpu")
        loader.next_batch()  # the epoch's order is built once per epoch; time the steady state
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            n += loader.next_batch()[0].numel()
        out[f"world{world}_rank0_tokens_per_s"] = round(n / (time.perf_counter() - t0))
    return out


def time_to_first_step(corpus: Path, cache: Path, out: Path) -> float:
    cmd = [sys.executable, str(ROOT / "greentext_dist" / "train.py"), "--model", "tiny", "--dataset", str(corpus), "--output-dir", str(out),
           "--seq-len", "128", "--global-batch-size", "8", "--micro-batch-size", "8", "--max-steps", "2", "--log-every", "1",
           "--precision", "fp32", "--cache-dir", str(cache), "--resume", "never", "--overwrite"]
    env = {**os.environ, "GREENTEXT_PLAIN_LOG": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in p.stderr:
        if line.startswith("step 1/"):
            dt = time.perf_counter() - t0
            p.kill()
            p.wait()
            return dt
    p.wait()
    raise SystemExit(f"train.py exited {p.returncode} before its first step")


def anon_growth_kib(corpus: Path, cache: Path) -> int:
    probe = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from greentext_dist.config import DataConfig
from greentext_dist.data import DataState, TrainLoader, training_data
from greentext_dist.tokenizer import bundled_gpt2
anon = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
tok = bundled_gpt2(); before = anon()
train, val = training_data(DataConfig(dataset={str(corpus)!r}, seq_len=1024, cache_dir={str(cache)!r}), tok, 0, progress=False)
loader = TrainLoader(train, DataState(), 8, 0, 1, "cpu")
while loader.state.epoch == 0:
    loader.next_batch()
print(anon() - before)
"""
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=STANDIN if STANDIN.exists() else DEMO, help="posts to scale up (jsonl with 'text')")
    ap.add_argument("--tokens", type=float, default=20e6, help="size of the large corpus")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0, help="reading time per world size")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--compare-map", action="store_true", help="also time datasets.map(num_proc=1 and 2) on the same corpus")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from greentext_dist.tokenizer import load_tokenizer
    from greentext_dist.ui import setup_logging

    setup_logging(1)  # quiet
    tok = load_tokenizer("gpt2")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        big = scaled_corpus(a.corpus, a.tokens, tmp / "big.jsonl")
        cache = tmp / "cache"
        res = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "corpus": str(a.corpus)}
        res["prepare"] = bench_prepare(big, cache, tok)
        if a.compare_map:
            res["datasets_map"] = bench_map(big, tok, tmp)
        res["read"] = bench_read(big, cache, tok, a.seq_len, a.micro_batch_size, a.seconds)
        from greentext_dist.data import prepare_source

        prepare_source(str(DEMO), None, tok, cache, progress=False)
        small_s = min(time_to_first_step(DEMO, cache, tmp / "o") for _ in range(2))
        big_s = min(time_to_first_step(big, cache, tmp / "o") for _ in range(2))
        res["startup"] = {"demo_s": round(small_s, 2), "large_s": round(big_s, 2), "ratio": round(big_s / small_s, 3),
                          "large_tokens": res["prepare"]["tokens"]}
        res["memory"] = {"demo_anon_kib": anon_growth_kib(DEMO, cache), "large_anon_kib": anon_growth_kib(big, cache),
                         "large_store_kib": res["prepare"]["store_mib"] * 1024}
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
