"""The real commands on whatever single GPU is here, one JSON line per run in RESULTS_DIR/results.jsonl.

    python scripts/gpu_check.py RESULTS_DIR [next|all|e2e|bench|xl|flex|lora|rows:LABEL,...]   (scripts/gpu_check.sh sets up the environment)

e2e:   train.py for real on a local greentext-format corpus (scratch init: no hub needed), through each
       launcher and engine: python (ddp), deepspeed (zero2, zero3), torchrun (fsdp), accelerate launch
       (accelerate_configs/fsdp.yaml). Each run is halted at step 10 with a checkpoint, resumed by the
       same command to step 20, and its final/ is loaded back and sampled in a fresh process. Small runs
       all engines side by side; XL then runs `deepspeed greentext_dist/train.py --model xl` alone (its
       checkpoints are ~25 GB each).
bench: scripts/bench.py rows, most important first, until the time budget is spent; the first row is timed
       again through train.py itself (at --log-every 1 and 10) to measure what the real command costs over the
       bench step.
flex:  scripts/check_flex.py: --attention flex's loss and gradients against the dense-mask SDPA path.
next:  the correctness runs side by side (flex gradients, Small through each launcher, XL's halt, resume and
       reload), the goal rows and train.py against the first, then what no GPU run has shown yet: ZeRO-2 and
       FSDP2 compiled with accumulation, XL at micro 32, whole-model compile and max-autotune, Medium, Large.

GPU_CHECK_DRY=1 runs the same orchestration on the CPU with the tiny model (to check this script).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
BUDGET_S = float(os.environ.get("BUDGET_S", "540"))
T0 = time.time()
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
os.environ.setdefault("GREENTEXT_CACHE", str(WORK / "token-stores"))  # the corpus is tokenised once, for every run
STEPS = int(os.environ.get("E2E_STEPS", "20"))  # halted with a checkpoint (after validation) half way, then resumed
HALT = STEPS // 2


def elapsed() -> float:
    return time.time() - T0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "deepspeed", "datasets", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[mod] = f"missing ({type(e).__name__})"
    return out


def record(res: Path, row: dict) -> None:
    row = {"gpu": GPU, **VERSIONS, "elapsed_s": round(elapsed(), 1), **row}
    with open(res / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("tail", "samples")}), flush=True)


def write_corpus(path: Path, n: int = 4000) -> Path:
    """Greentext-shaped posts (lines starting with '>'), varied in length; ~1M GPT-2 tokens."""
    rng = random.Random(0)
    words = ("be me anon go outside see a dog cat pizza mfw tfw the bus job boss code rain wake up at 3am "
             "mom says friend girl class teacher phone game win lose laugh cry why how just then").split()
    with open(path, "w") as f:
        for i in range(n):
            lines = [">be me"] + [">" + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
                                  for _ in range(rng.choice([3, 6, 12, 30]))]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    return path


def launcher(kind: str, port: int) -> list[str]:
    train = "greentext_dist/train.py"
    if kind == "python":
        return [sys.executable, train]
    if kind == "deepspeed":
        ds = shutil.which("deepspeed")
        head = [ds] if ds else [sys.executable, "-m", "deepspeed.launcher.runner"]
        return [*head, "--num_gpus", "1", "--master_port", str(port), train]
    if kind == "torchrun":
        head = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
        return [*head, "--standalone", "--nproc_per_node", "1", train]
    if kind == "accelerate":
        head = ["accelerate"] if shutil.which("accelerate") else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
        return [*head, "launch", "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "1",
                "--main_process_port", str(port), train]
    raise ValueError(kind)


def shown(cmd: list[str]) -> str:
    """The command as a user types it: the program by name (python, deepspeed, torchrun), not by its path here."""
    head = "python" if cmd[0] == sys.executable else Path(cmd[0]).name
    return " ".join([head, *cmd[1:]])


def train_losses(out: Path) -> list[tuple[int, float, float | None]]:
    rows = []
    p = out / "metrics.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r and not r.get("skipped"):
                rows.append((r["step"], r["loss"], r.get("tokens_per_s")))
    return rows


def e2e_args(model: str, corpus: Path, out: Path, extra: list[str]) -> list[str]:
    """train.py's arguments for one end-to-end run (halted at HALT by the caller, then resumed to STEPS)."""
    big = model in ("large", "xl")
    shape = (["--seq-len", "128", "--global-batch-size", "8", "--micro-batch-size", "4", "--precision", "fp32"] if DRY else
             ["--global-batch-size", "8" if big else "16", "--micro-batch-size", "8"])
    return ["--model", model, "--init", "scratch", "--dataset", str(corpus), "--max-steps", str(STEPS), "--eval-every", str(HALT),
            "--keep-last", "1", "--output-dir", str(out), *shape, *extra]


class E2E:
    """One engine's halt -> resume -> reload sequence, run as a small state machine so several go side by side."""

    def __init__(self, name: str, model: str, kind: str, extra: list[str], port: int, corpus: Path, res: Path,
                 root: Path = WORK):
        self.name, self.model, self.kind, self.res = name, model, kind, res
        self.out = root / name
        shutil.rmtree(self.out, ignore_errors=True)
        self.cmd = [*launcher(kind, port), *e2e_args(model, corpus, self.out, extra)]
        self.stages = [("halt", self.cmd + ["--halt-at-step", str(HALT)]), ("resume", self.cmd),
                       ("reload", [sys.executable, "-m", "greentext_dist.generate", str(self.out / "final"), "--prompt", "be me",
                                   "--num-samples", "2", "--max-new-tokens", "40", "--seed", "0"])]
        self.result = {"source": "train.py", "run": name, "model": model, "launcher": kind,
                       "command": shown(self.cmd), "ok": False}
        self.proc, self.stage, self.t_stage, self.logs = None, -1, 0.0, {}
        self.next()

    def next(self) -> None:
        self.stage += 1
        if self.stage == len(self.stages):
            self.finish()
            return
        what, cmd = self.stages[self.stage]
        self.log = open(WORK / f"{self.name}.{what}.log", "w")
        self.t_stage = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self, deadline: float) -> bool:
        """Advance; True while still running."""
        if self.proc is None:
            return False
        rc = self.proc.poll()
        what = self.stages[self.stage][0]
        if rc is None and time.time() > deadline:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            rc = "timeout"
        if rc is None:
            if what == "resume":
                self.free_halt_checkpoint()
            return True
        self.log.close()
        text = (WORK / f"{self.name}.{what}.log").read_text(errors="replace")
        self.result[f"{what}_s"] = round(time.time() - self.t_stage, 1)
        self.result[f"{what}_rc"] = rc
        if what == "halt":
            self.result["halted_with_checkpoint"] = f"halted after step {HALT}" in text and (self.out / "checkpoints" / f"step-{HALT}").is_dir()
        if what == "resume":
            self.result["resumed"] = "resuming from" in text
            losses = train_losses(self.out)
            self.result["steps"] = len(losses)
            self.result["losses"] = [round(loss, 4) for _, loss, _ in losses]
            tps = [t for s, _, t in losses if s > HALT + 2 and t]
            self.result["median_tokens_per_s_after_resume"] = statistics.median(tps) if tps else None
            self.result["final_val_loss"] = next((float(line.split()[-1]) for line in text.splitlines() if "final val_loss" in line), None)
        if what == "reload":
            self.result["samples"] = text[-600:]
            self.result["final_loads"] = rc == 0 and "sample 1" in text
        if rc != 0:
            self.result["failed_stage"], self.result["tail"] = what, text[-2500:]
            self.finish()
            return False
        self.next()
        return self.proc is not None

    def free_halt_checkpoint(self) -> None:
        """XL only where the disk cannot hold two of its ~23 GiB checkpoints: once the resumed run has trained past the
        halt (so it has read the checkpoint), move the halt checkpoint out of the way, as a user would to cold storage."""
        halt = self.out / "checkpoints" / f"step-{HALT}"
        if self.result.get("halt_checkpoint_removed") or self.model not in ("large", "xl") or not halt.is_dir():
            return
        size = sum(f.stat().st_size for f in halt.rglob("*") if f.is_file())
        if shutil.disk_usage(self.out).free > 1.3 * size or not any(s > HALT for s, _, _ in train_losses(self.out)):
            return
        shutil.rmtree(halt, ignore_errors=True)
        self.result["halt_checkpoint_removed"] = f"{size / 2**30:.1f} GiB, after step {HALT + 1} (disk)"

    def finish(self) -> None:
        r = self.result
        r["ok"] = bool(r.get("halted_with_checkpoint") and r.get("resumed") and r.get("steps") == STEPS and r.get("final_loads"))
        self.proc = None
        record(self.res, r)
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # disk: an XL checkpoint is ~25 GB


def run_parallel(jobs: list[E2E], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while any([j.poll(deadline) for j in jobs]):
        time.sleep(1)


def corpus_file() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "corpus.jsonl"
    return path if path.exists() else write_corpus(path, 400 if DRY else 4000)


# Small through each launcher and engine: (name, launcher, train.py flags, port for the launcher's rendezvous).
SMALL_E2E = [("ddp-python", "python", [], 0), ("zero2-deepspeed", "deepspeed", ["--backend", "zero2"], 29511),
             ("zero3-deepspeed", "deepspeed", ["--backend", "zero3"], 29512), ("fsdp-torchrun", "torchrun", ["--backend", "fsdp"], 0),
             ("fsdp-accelerate", "accelerate", [], 29514),
             # Never run on a GPU before the cpu:gloo,cuda:nccl process group: CPU-offloaded gradients over NCCL alone failed.
             ("fsdp-offload-torchrun", "torchrun", ["--backend", "fsdp", "--fsdp-cpu-offload"], 0)]
XL_E2E = ("auto-deepspeed", "deepspeed", ["--final", "last"], 29515)  # no best/ beside two ~23 GiB checkpoints; auto = ZeRO-2


def small_jobs(res: Path, corpus: Path, root: Path = WORK, skip: tuple[str, ...] = ()) -> list[E2E]:
    small = "tiny" if DRY else "small"
    return [E2E(f"{small}-{name}", small, kind, extra, port, corpus, res, root) for name, kind, extra, port in SMALL_E2E if name not in skip]


def xl_e2e_job(res: Path, corpus: Path) -> E2E:
    big = "tiny" if DRY else "xl"
    name, kind, extra, port = XL_E2E
    return E2E(f"{big}-{name}", big, kind, extra, port, corpus, res)


def e2e_small(res: Path) -> None:
    run_parallel(small_jobs(res, corpus_file()), float(os.environ.get("E2E_SMALL_S", "180")))


def e2e_xl(res: Path) -> None:
    deadline = min(float(os.environ.get("E2E_XL_S", "200")), BUDGET_S - elapsed() - 10)
    run_parallel([xl_e2e_job(res, corpus_file())], deadline)


def small_root() -> Path:
    """Where the Small runs' checkpoints go while XL's fill the disk: RAM (/dev/shm) if it has room, else WORK."""
    shm = Path("/dev/shm")
    try:
        if shutil.disk_usage(shm).free > 24 * 2**30:
            return shm / "gpu_check"
    except OSError:
        pass
    return WORK


def e2e_together(res: Path) -> None:
    """Every correctness run at once, the GPU shared (their tokens/s are not timings): the flex gradient check,
    Small through each launcher (ZeRO-2 is XL's engine here) and `deepspeed train.py --model xl`."""
    corpus, root = corpus_file(), small_root()
    jobs = [xl_e2e_job(res, corpus), *small_jobs(res, corpus, root, skip=("zero2-deepspeed",))]
    flex_proc = subprocess.Popen(flex_cmd(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_parallel(jobs, min(float(os.environ.get("E2E_S", "330")), BUDGET_S - elapsed() - 10))
    try:
        text, rc = flex_proc.communicate(timeout=max(5, min(120, BUDGET_S - elapsed() - 60)))[0], flex_proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(flex_proc.pid, 9)
        text, rc = flex_proc.communicate()[0], "timeout"
    record_flex(res, rc, text)
    if root != WORK:
        shutil.rmtree(root, ignore_errors=True)


BENCH = [
    # (label, bench.py args; None: the first row's setting through train.py with these extra flags). Most important
    # first: the goal rows with the best settings, the real command against them, then levers and ablations.
    ("small-best", "--model small --micro-batch-size 32 --grad-accum 4 --compile"),
    ("small-best-train.py", []),
    ("small-best-train.py-log10", ["--log-every", "10"]),
    ("small-isolated-sdpa", "--model small --micro-batch-size 32 --grad-accum 4 --compile --packing isolated"),
    ("small-isolated-flex", "--model small --micro-batch-size 32 --grad-accum 4 --compile --packing isolated --attention flex"),
    ("xl-best", "--model xl --micro-batch-size 16 --grad-accum 2 --compile"),
    ("xl-m32", "--model xl --micro-batch-size 32 --grad-accum 1 --compile"),
    ("small-dropout0.1", "--model small --micro-batch-size 32 --grad-accum 4 --compile --dropout 0.1"),
    ("xl-dropout0.1", "--model xl --micro-batch-size 16 --grad-accum 2 --compile --dropout 0.1"),
    ("medium-best", "--model medium --micro-batch-size 32 --grad-accum 2 --compile"),
    ("large-best", "--model large --micro-batch-size 16 --grad-accum 4 --compile"),
    ("small-whole-model-compile", "--model small --micro-batch-size 32 --grad-accum 4 --compile --compile-scope model"),
    ("small-max-autotune", "--model small --micro-batch-size 32 --grad-accum 4 --compile --compile-mode max-autotune-no-cudagraphs"),
    ("small-cudnn", "--model small --micro-batch-size 32 --grad-accum 4 --compile --sdpa cudnn"),
    ("small-fsdp", "--model small --backend fsdp --micro-batch-size 32 --grad-accum 4 --compile"),
    ("small-zero2", "--model small --backend zero2 --micro-batch-size 32 --grad-accum 4 --compile"),
    ("xl-fsdp-gc-m16", "--model xl --backend fsdp --micro-batch-size 16 --grad-accum 2 --gradient-checkpointing --compile"),
    ("small-no-pad", "--model small --micro-batch-size 32 --grad-accum 4 --compile --pad-vocab 1"),
]


# 'next' after the correctness runs: the goal rows and the real command against them, then what no GPU run has shown
# (as of 2026-11-27's second H200 session: ZeRO-2 and FSDP2 compiled with accumulation, XL at micro 32, the other levers).
NEXT = ("small-best", "small-best-train.py", "xl-best", "small-zero2", "small-fsdp", "xl-m32", "xl-fsdp-gc-m16",
        "small-whole-model-compile", "small-max-autotune", "medium-best", "large-best")


def rows(*labels: str) -> list:
    return [next(r for r in BENCH if r[0] == label) for label in labels]


DONE: dict[str, dict] = {}


def run_capture(cmd: list[str], limit_s: float) -> tuple[int | str, str]:
    """(exit code or "timeout", stdout + stderr) of cmd, given at most limit_s and what is left of the budget."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, min(limit_s, BUDGET_S - elapsed() - 20)))
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", out


def bench(res: Path, rows: list) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    profile = res / "profile.txt"
    for label, args in rows:
        if elapsed() > BUDGET_S - 60:
            record(res, {"source": "bench.py", "run": label, "skipped": "time budget"})
            continue
        if isinstance(args, list):
            train_timing(res, label, args)
            continue
        argv = args.split()
        if DRY and "flex" in argv:
            record(res, {"source": "bench.py", "run": label, "skipped": "dry run: FlexAttention has no backward on the CPU"})
            continue
        if DRY:
            argv = [("tiny" if a in ("small", "xl", "medium", "large") else a) for a in argv]
            argv += ["--seq-len", "128", "--precision", "fp32", "--micro-batch-size", "2"]
        prof = ["--profile", str(profile)] if label in ("small-best", "xl-best") else []
        cmd = [sys.executable, "scripts/bench.py", "--steps", "8", "--warmup", "3", "--rounds", "1", "--no-baseline",
               "--json", str(WORK / "bench.jsonl"), *argv, *prof]
        t = time.time()
        rc, text = run_capture(cmd, 200)
        rows = (WORK / "bench.jsonl").read_text().splitlines() if (WORK / "bench.jsonl").exists() else []
        row = json.loads(rows[-1]) if rc == 0 and rows else {"failed": rc, "tail": text[-2000:], "command": "python scripts/bench.py " + args}
        DONE[label] = row
        record(res, {**row, "run": label, "wall_s": round(time.time() - t, 1)})


def timing_args(corpus: Path, out: Path, extra: list[str]) -> list[str]:
    """train.py's arguments for the first bench row's setting (real data, logging, guards), 30 steps."""
    shape = (["--model", "tiny", "--seq-len", "128", "--precision", "fp32", "--micro-batch-size", "2", "--global-batch-size", "8"] if DRY else
             ["--model", "small", "--micro-batch-size", "32", "--global-batch-size", "128"])
    return [*shape, "--init", "scratch", "--dataset", str(corpus), "--dropout", "0", "--max-steps", "30", "--eval-every", "0",
            "--val-fraction", "0", "--output-dir", str(out), *extra]


def train_timing(res: Path, label: str, extra: list[str]) -> None:
    """The small-best bench row's setting through train.py itself (real data, logging, guards): tokens/s after warm-up."""
    out = WORK / "timing"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "greentext_dist/train.py", *timing_args(corpus_file(), out, extra)]
    t = time.time()
    rc, text = run_capture(cmd, 200)
    steps = train_losses(out)
    tps = [s for n, _, s in steps if n > 10 and s]  # with --log-every 10: the line at step 20 covers steps 11-20
    ref = DONE.get(BENCH[0][0])
    row = {"source": "train.py", "run": label, "command": shown(cmd), "rc": rc,
           "steps": len(steps), "median_tokens_per_s": statistics.median(tps) if tps else None, "wall_s": round(time.time() - t, 1)}
    if ref and ref.get("tokens_per_s") and row["median_tokens_per_s"]:
        row["bench_tokens_per_s"] = ref["tokens_per_s"]
        row["ratio_to_bench"] = row["median_tokens_per_s"] / ref["tokens_per_s"]
    if rc != 0:
        row["tail"] = text[-2000:]
    record(res, row)


def lora_args(corpus: Path, out: Path) -> list[str]:
    """XL with a rank-16 LoRA adapter on one GPU at the setting the planner picks for a 24 GB card (DDP, micro 4,
    no checkpointing, compiled), 20 steps: its peak memory against 24 GB and its tokens/s."""
    shape = (["--model", "tiny", "--seq-len", "128", "--precision", "fp32", "--micro-batch-size", "2", "--global-batch-size", "8"] if DRY else
             ["--model", "xl", "--micro-batch-size", "4", "--global-batch-size", "16", "--no-gradient-checkpointing"])
    return [*shape, "--init", "scratch", "--lora-rank", "16", "--dataset", str(corpus), "--dropout", "0", "--max-steps", "20",
            "--eval-every", "0", "--val-fraction", "0", "--log-every", "5", "--save-every", "0", "--output-dir", str(out)]


def xl_lora(res: Path) -> None:
    from greentext_dist import plan

    out = WORK / "lora"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "greentext_dist/train.py", *lora_args(corpus_file(), out)]
    t = time.time()
    rc, text = run_capture(cmd, 300)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    steps = [r for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in steps if r["step"] > 5 and r.get("tokens_per_s")]
    planned = plan.plan_engine("tiny" if DRY else "xl", "ddp", 1, 24, micro=2 if DRY else 4, compiled=not DRY, checkpointing=False,
                               lora_rank=16, seq_len=128 if DRY else 1024, global_batch=8 if DRY else 16)
    row = {"source": "train.py", "run": "xl-lora-r16-1gpu", "command": shown(cmd), "rc": rc, "steps": steps[-1]["step"] if steps else 0,
           "median_tokens_per_s": statistics.median(tps) if tps else None,
           "peak_mem_gib": max((r.get("peak_mem_gb") or 0) for r in steps) if steps else None,
           "planned_peak_gib": planned["peak_gib"], "planned_tokens_per_s": planned["tokens_per_s_per_gpu"],
           "fits_24gb": bool(steps) and max((r.get("peak_mem_gb") or 0) for r in steps) <= 24, "adapter": (out / "adapter").is_dir(),
           "wall_s": round(time.time() - t, 1)}
    if rc != 0:
        row["tail"] = text[-2000:]
    record(res, row)


def flex_cmd() -> list[str]:
    model, micro, T = ("tiny", "2", "256") if DRY else ("small", "4", "1024")
    return [sys.executable, "scripts/check_flex.py", "--model", model, "--micro-batch-size", micro, "--seq-len", T]


def record_flex(res: Path, rc, text: str) -> None:
    line = next((json.loads(t) for t in reversed(text.splitlines()) if t.startswith('{"source": "check_flex.py"')), None)
    record(res, {**(line or {"source": "check_flex.py", "ok": False, "tail": text[-2000:]}), "run": "flex-equivalence", "rc": rc})


def flex(res: Path) -> None:
    """--attention flex against the dense mask: loss and gradients (GPU), fp32, bf16 and compiled."""
    rc, text = run_capture(flex_cmd(), 240)
    record_flex(res, rc, text)


PARTS = {
    # Small's engines, the rows that matter most, XL's headline command, then the other rows.
    "all": [e2e_small, lambda r: bench(r, BENCH[:3]), e2e_xl, lambda r: bench(r, BENCH[3:]), flex],
    "next": [e2e_together, xl_lora, lambda r: bench(r, rows(*NEXT))],
    "lora": [xl_lora],
    "e2e": [e2e_small, e2e_xl],
    "bench": [lambda r: bench(r, BENCH)],
    "xl": [e2e_xl],
    "flex": [flex],
}


if __name__ == "__main__":
    res = Path(sys.argv[1]).resolve()
    part = sys.argv[2] if len(sys.argv) > 2 else "next"
    if part.startswith("rows:"):  # bench rows by label, e.g. rows:medium-best,large-best
        labels = part[5:].split(",")
        unknown = [label for label in labels if label not in {r[0] for r in BENCH}]
        if unknown:
            sys.exit(f"unknown bench rows {unknown}: one of {', '.join(r[0] for r in BENCH)}")
        PARTS[part] = [lambda r: bench(r, rows(*labels))]
    if part not in PARTS:
        sys.exit(f"unknown part {part!r}: one of {', '.join(PARTS)}, or rows:LABEL,LABEL")
    res.mkdir(parents=True, exist_ok=True)
    GPU, VERSIONS = gpu_name(), versions()
    print(f"gpu_check {part} on {GPU}: {VERSIONS}", flush=True)
    for step in PARTS[part]:
        step(res)
    print(f"gpu_check done in {elapsed():.0f} s", flush=True)
