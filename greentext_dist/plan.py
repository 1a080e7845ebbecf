"""Memory and time planner: will a GPT-2 size fit, with which engine, micro-batch and accumulation?

    python -m greentext_dist.plan --model xl --gpus 8 --gpu-memory 80

Model states (parameters, gradients, optimizer) use DeepSpeed's own accounting for ZeRO-2/3 (the formulas
of `estimate_zero2/3_model_states_mem_needs`, checked in tests) and the same style for DDP and FSDP.
Activations are calibrated on measured peaks of HF GPT-2 on an H200, eager and compiled (docs/benchmarks.md): bytes per
layer per token-width unit (b x T x d) and bytes per logit (b x T x vocab). The peak is the larger of
"forward + backward" (states without gradients, plus all activations and logits) and "optimizer step"
(every state at once); under gradient accumulation, every state plus the activations (the gradients of the
first micro-batch are held through the others). The same numbers drive train.py's start summary, its OOM warning and the
automatic gradient-checkpointing choice.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from greentext_dist.config import PRESETS
from greentext_dist.errors import OneLineParser
from greentext_dist.perf import flops_per_token

VOCAB, POSITIONS = 50257, 1024
GIB = 2**30
# Calibrated bytes per b*T*d per layer: autocast over fp32 weights keeps an fp32 residual stream and HF's
# Python GELU saves several intermediates (ddp); engines that run bf16 weights (fsdp, zero) keep less.
ACT_PER_LAYER = {"autocast": 84.0, "bf16": 52.0, "fp32": 120.0}
ACT_CHECKPOINTED = {"autocast": 4.0, "bf16": 2.0, "fp32": 4.0}  # the saved block input per layer
LOGIT_BYTES = 12.0  # bf16 logits, their fp32 copy for the loss, and its saved log-softmax
# torch.compile (per block, and the loss) fuses GELU and the loss's fp32 upcast: far fewer saved tensors.
ACT_PER_LAYER_COMPILED, LOGIT_BYTES_COMPILED = 36.0, 3.1


def spec_of(key: str):
    """The registry entry of a planner row (an engine's name, or NAME_offload) and whether it offloads. What each
    engine holds per GPU is its own knowledge (EngineSpec.states, .workspace, .compute); this module only adds."""
    from greentext_dist.engines import ENGINES

    name, _, offload = key.partition("_")
    if name not in ENGINES or offload not in ("", "offload") or (offload and not ENGINES[name].can_offload):
        raise ValueError(f"no planner row {key!r}: one of {', '.join(rows())}")
    return ENGINES[name], bool(offload)


def rows() -> list[str]:
    """Every planner row: each engine, then each engine that can offload, offloaded."""
    from greentext_dist.engines import ENGINES

    return [*ENGINES, *(f"{name}_offload" for name, spec in ENGINES.items() if spec.can_offload)]


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_params: int  # tied head counted once, position embeddings included
    largest_layer: int  # the token embedding (= tied head)

    @property
    def block_params(self) -> int:
        return 12 * self.n_embd**2 + 13 * self.n_embd


def shape(model: str) -> Shape:
    _, n_layer, d, _ = PRESETS[model]
    return shape_for(n_layer, d)


def shape_for(n_layer: int, d: int, vocab: int = VOCAB, positions: int = POSITIONS) -> Shape:
    n = vocab * d + positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    return Shape(n_layer, d, n, vocab * d)


def model_states(s: Shape, engine: str, gpus: int, precision: str = "bf16", accumulating: bool = False) -> tuple[float, float]:
    """(bytes per GPU held through forward/backward, bytes of gradients) for one planner row. `accumulating`: the step has
    several micro-batches (gradients are held across them)."""
    spec, offload = spec_of(engine)
    return spec.states(s, gpus, precision, offload, accumulating)


def compute_kind(engine: str, precision: str) -> str:
    return spec_of(engine)[0].compute(precision)


def activations(s: Shape, engine: str, micro: int, seq_len: int, checkpointing: bool, precision: str = "bf16",
                compiled: bool = False) -> float:
    unit = micro * seq_len * s.n_embd
    kind = compute_kind(engine, precision)
    full = ACT_PER_LAYER_COMPILED if compiled and kind != "fp32" else ACT_PER_LAYER[kind]
    logits = LOGIT_BYTES_COMPILED if compiled else LOGIT_BYTES
    if checkpointing:
        layers = s.n_layer * ACT_CHECKPOINTED[kind] * unit + full * unit  # + one block recomputed
    else:
        layers = s.n_layer * full * unit
    return layers + logits * micro * seq_len * VOCAB


def peak_bytes(s: Shape, engine: str, gpus: int, micro: int, seq_len: int, checkpointing: bool, precision: str = "bf16",
               compiled: bool = False, grad_accum: int = 1) -> dict:
    held, grads = model_states(s, engine, gpus, precision, accumulating=grad_accum > 1)
    act = activations(s, engine, micro, seq_len, checkpointing, precision, compiled)
    spec, offload = spec_of(engine)
    held += 0.0 if offload else spec.workspace(s, gpus, precision)
    # Accumulating, the first micro-batch's gradients are held through every later one's forward and backward
    # (H200: XL micro 16 x 2 peaked 4.6 GiB, its fp32 gradients, above the same micro-batch alone).
    peak = held + grads + act if grad_accum > 1 else max(held + act, held + grads)
    return {"states": held + grads, "activations": act, "peak": peak}


def cpu_extra(s: Shape, micro: int, seq_len: int, n_head: int, dropout: float) -> float:
    """What a CPU run holds beyond the GPU plan (calibrated on tiny and small, fp32, within ~10% of the measured peak
    RSS): with dropout, SDPA takes its math path and keeps the attention probabilities and their dropout mask (~12
    bytes per layer x row x head x query x key), and AdamW's foreach update allocates a parameter-sized temporary."""
    attention = 12.0 * s.n_layer * micro * n_head * seq_len**2 if dropout > 0 else 0.0
    return attention + 4.0 * s.n_params


def accumulation(global_batch: int, micro: int, gpus: int) -> int:
    """Passes per optimizer step: the global batch over micro x GPUs, the last pass padded if it does not divide."""
    return -(-global_batch // (micro * gpus))


def largest_micro(s: Shape, engine: str, gpus: int, budget: float, seq_len: int, checkpointing: bool, precision: str = "bf16",
                  compiled: bool = False, *, global_batch: int) -> int:
    fits = lambda b: peak_bytes(s, engine, gpus, b, seq_len, checkpointing, precision, compiled,  # noqa: E731
                                accumulation(global_batch, b, gpus))["peak"] <= budget
    b = 0
    while b < 1024 and fits(b + 1):
        b += 1
    return b


def plan_engine(model: str, engine: str, gpus: int, gpu_memory_gib: float, *, seq_len: int = 1024, global_batch: int = 512,
                micro: int | None = None, mfu: float = 0.4, peak_tflops: float = 989.0, headroom: float = 0.9,
                compiled: bool = False) -> dict:
    """One row of the plan. `headroom`: share of the card the allocator may use (fragmentation, CUDA context)."""
    s = shape(model)
    budget = gpu_memory_gib * GIB * headroom
    row: dict = {"engine": engine}
    for gc in (False, True):
        best = largest_micro(s, engine, gpus, budget, seq_len, gc, compiled=compiled, global_batch=global_batch)
        row["max_micro_gc" if gc else "max_micro"] = best
    gc = row["max_micro"] == 0 or (micro is not None and micro > row["max_micro"])
    b = micro or pick_micro(global_batch, gpus, row["max_micro_gc" if gc else "max_micro"])
    accum = accumulation(global_batch, b, gpus)
    mem = peak_bytes(s, engine, gpus, b, seq_len, gc, compiled=compiled, grad_accum=accum)
    held, grads = model_states(s, engine, gpus, accumulating=accum > 1)
    n_no_pos = s.n_params - POSITIONS * s.n_embd
    flops = flops_per_token(n_no_pos, s.n_layer, s.n_embd, seq_len)
    spec, offload = spec_of(engine)
    slow = spec.alone_mfu is not None and gpus == 1 and not offload
    padded = accum * b * gpus  # the global batch and any padding of the last pass
    step_s = padded * seq_len * flops / (gpus * peak_tflops * 1e12 * (min(mfu, spec.alone_mfu) if slow else mfu))
    row.update(
        checkpointing=gc, micro=b, fits=mem["peak"] <= budget,
        grad_accum=accum, padding=padded - global_batch,
        params_grads_optim_gib=(held + grads) / GIB, activations_gib=mem["activations"] / GIB,
        activations_nogc_gib=activations(s, engine, b, seq_len, False, compiled=compiled) / GIB,
        activations_gc_gib=activations(s, engine, b, seq_len, True, compiled=compiled) / GIB,
        peak_gib=mem["peak"] / GIB, step_s=step_s, slow_on_one_gpu=slow,
    )
    return row


def pick_micro(global_batch: int, gpus: int, cap: int) -> int:
    """The micro-batch a plan suggests: the largest that fits (`cap`) and makes micro x GPUs x accumulation the global
    batch exactly, unless that is under half of what fits (512 on 3 GPUs has none); then the largest whose padding of
    the step's last pass is at most 5% of the step."""
    if cap < 1:
        return 1
    exact = max((m for m in range(1, cap + 1) if global_batch % (m * gpus) == 0), default=0)
    if 2 * exact >= cap:
        return exact
    rows = lambda m: accumulation(global_batch, m, gpus) * m * gpus  # noqa: E731
    return max((m for m in range(1, cap + 1) if rows(m) - global_batch <= 0.05 * rows(m)), default=exact or 1)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xl", choices=[m for m in PRESETS if m != "tiny"] + ["tiny"])
    p.add_argument("--gpus", type=int, default=8, help="GPUs in total")
    p.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=None, help="plan this micro-batch instead of the largest that fits")
    p.add_argument("--compile", action="store_true", help="plan for --compile (fused GELU and loss: fewer saved activations)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation for the step time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 peak (H100 SXM / H200: 989)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    if a.gpus < 1 or a.gpu_memory <= 0 or not 0 < a.mfu <= 1:
        print("error: --gpus must be >= 1, --gpu-memory > 0 and --mfu in (0, 1]. Fix: pass valid values.", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    from greentext_dist.ui import summary_table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)

    s = shape(a.model)
    console.print(summary_table("plan", [
        ("model", f"GPT-2 {a.model}: {s.n_params / 1e6:.0f}M params, {s.n_layer} layers x {s.n_embd}"),
        ("cluster", f"{a.gpus} GPU(s) x {a.gpu_memory:g} GiB (planning to {0.9:.0%} of it)"),
        ("batch", f"{a.global_batch_size} sequences of {a.seq_len} per step; step time at {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s"),
    ]))
    table = Table(box=None, pad_edge=False)
    for col in ["engine", "states GiB", "act GiB no-GC/GC", "GC", "micro", "accum", "peak GiB", "fits", "step s"]:
        table.add_column(col, justify="left" if col in ("engine", "fits", "GC") else "right", no_wrap=True)
    for engine in rows():
        r = plan_engine(a.model, engine, a.gpus, a.gpu_memory, seq_len=a.seq_len, global_batch=a.global_batch_size,
                        micro=a.micro_batch_size, mfu=a.mfu, peak_tflops=a.peak_tflops, compiled=a.compile)
        table.add_row(
            engine, f"{r['params_grads_optim_gib']:.1f}", f"{r['activations_nogc_gib']:.1f}/{r['activations_gc_gib']:.1f}",
            "on" if r["checkpointing"] else "off", str(r["micro"]), f"{r['grad_accum']}" + (f" (+{r['padding']} pad)" if r["padding"] else ""),
            f"{r['peak_gib']:.1f}",
            ("[yellow]yes, slow[/]" if r["slow_on_one_gpu"] else "[green]yes[/]") if r["fits"] else "[red]no[/]", f"{r['step_s']:.1f}",
        )
    console.print(table)
    console.print("states = parameters + gradients + optimizer state per GPU; act = activations + logits of one micro-batch. "
                  "Offload variants keep optimizer state (and for zero3/fsdp, parameters) in CPU memory.")
    from greentext_dist.engines import ENGINES

    for name, spec in ENGINES.items():
        if a.gpus == 1 and spec.alone_mfu is not None:
            console.print(f"{name} on one GPU shards nothing and measured {spec.alone_mfu:.1%} MFU (XL, H200): pick another engine, "
                          f"or {name} only with offload when memory is short.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
