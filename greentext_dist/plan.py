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

Time: compute at the MFU measured per size on one H200 (scaled to other GPUs by their peak and memory bandwidth),
plus the communication that cannot hide behind it. Each engine's registry entry (EngineSpec.comm) lists the
collectives it runs in an optimizer step and their bytes (counted on the real engines by scripts/bench_comm.py);
here they become seconds at the interconnect's bus bandwidth, and docs/scaling.md shows what follows.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from greentext_dist.config import PRESETS
from greentext_dist.errors import OneLineParser
from greentext_dist.perf import GPU_MFU, flops_per_token

VOCAB, POSITIONS = 50257, 1024
GIB = 2**30
# Calibrated bytes per b*T*d per layer: autocast over fp32 weights keeps an fp32 residual stream and HF's
# Python GELU saves several intermediates (ddp); engines that run bf16 weights (fsdp, zero) keep less.
ACT_PER_LAYER = {"autocast": 84.0, "bf16": 52.0, "fp32": 120.0}
ACT_CHECKPOINTED = {"autocast": 4.0, "bf16": 2.0, "fp32": 4.0}  # the saved block input per layer
LOGIT_BYTES = 12.0  # bf16 logits, their fp32 copy for the loss, and its saved log-softmax
# torch.compile (per block, and the loss) fuses GELU and the loss's fp32 upcast: far fewer saved tensors.
ACT_PER_LAYER_COMPILED, LOGIT_BYTES_COMPILED = 36.0, 3.1


@dataclass(frozen=True)
class Link:
    busbw: float  # GB/s of NCCL bus bandwidth (nccl-tests' "busbw", large messages): per GPU in a node, per NIC between nodes
    source: str
    nic_per_gpu: bool = True  # between nodes: one NIC per GPU (rail-optimised HGX/DGX nodes), or one per node


# Defaults from published NCCL measurements; override with --intra-gbps/--inter-gbps/--nics-per-node for your cluster.
# Between nodes, a ring's busbw is the node's NICs together (NCCL runs one channel per NIC): 4 HDR NICs gave 86 GB/s
# across two 8-GPU nodes where one NIC gave 24 (NVIDIA/nccl#1048), so 8 NDR NICs carry ~8 x 46 GB/s, capped by NVLink.
LINKS = {
    "nvlink4": Link(370.0, "H100/H200 SXM, NVLink 4 + NVSwitch, 8 GPUs: nccl-tests all_reduce busbw ~360-370 GB/s"),
    "nvlink3": Link(230.0, "A100 SXM, NVLink 3 + NVSwitch, 8 GPUs: nccl-tests all_reduce busbw ~220-235 GB/s"),
    "pcie4": Link(20.0, "PCIe Gen4 x16 without NVLink (L40S): ~20 GB/s busbw through the host bridge"),
    "ib-ndr400": Link(46.0, "InfiniBand NDR 400 Gb/s: 46-48 GB/s busbw per NIC (NVIDIA/nccl-tests#290), one NIC per GPU"),
    "ib-hdr200": Link(23.0, "InfiniBand HDR 200 Gb/s: ~24 GB/s busbw per NIC (NVIDIA/nccl#1048), one NIC per GPU"),
    "eth-100g": Link(10.0, "100 Gb/s Ethernet (RoCE): ~10 GB/s busbw, one NIC per node", nic_per_gpu=False),
}
# NCCL's own cost model (src/graph/tuning.cc), microseconds: a base latency per launch, then a latency per step, over
# NVLink inside a node and over the network across nodes. The ring takes one step per rank; the tree (all-reduce
# only, across nodes) climbs the node's chain and log2(nodes) levels, twice. NCCL runs the fastest of them.
LATENCY_US = {  # (algorithm, protocol): (base, NVLink step, network step)
    ("ring", "ll128"): (10.0, 1.9, 4.0), ("ring", "simple"): (8.4, 3.4, 9.6),
    ("tree", "ll128"): (4.4, 1.2, 8.5), ("tree", "simple"): (0.0, 28.0, 50.0),
}
PROTOCOL_BW = {"ll128": 0.92, "simple": 1.0}  # share of the bus bandwidth each protocol reaches (tuning.cc)
TREE_BW = 0.9  # the tree's share of the ring's bus bandwidth (tuning.cc)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    nodes: int
    intra_gbps: float  # bus bandwidth between the GPUs of a node
    nic_gbps: float  # bus bandwidth of one NIC between nodes
    nics_per_node: int

    @property
    def busbw(self) -> float:
        """GB/s of a ring over every GPU: NVLink alone in one node; across nodes, the node's NICs together."""
        return self.intra_gbps if self.nodes == 1 else min(self.intra_gbps, self.nics_per_node * self.nic_gbps)

    def launch_s(self, collective: str, nbytes: float) -> float:
        """Seconds of one NCCL collective of `nbytes` (sized as nccl-tests size it) over the whole cluster."""
        n, nodes = self.gpus, self.nodes
        steps = 2 * (n - 1) if collective == "all_reduce" else n - 1
        inter = (2 * (nodes - 1) if collective == "all_reduce" else nodes - 1) if nodes > 1 else 0
        wire = nbytes * bus_factor(collective, n) / (self.busbw * 1e9)
        out = []
        for (algo, proto), (base, hop, net) in LATENCY_US.items():
            if algo == "ring":
                latency = base + (steps - inter) * hop + inter * net
                out.append(latency * 1e-6 + wire / PROTOCOL_BW[proto])
            elif collective == "all_reduce" and nodes > 1:
                latency = base + 2 * ((n // nodes - 1) * hop + math.log2(nodes) * net)
                out.append(latency * 1e-6 + wire / (PROTOCOL_BW[proto] * TREE_BW))
        return min(out)


def cluster(gpu: str, gpus: int, nodes: int, intra_gbps: float | None = None, inter_gbps: float | None = None,
            nics_per_node: int | None = None) -> Cluster:
    """The links of `nodes` nodes of `gpu` cards (GPUS' defaults, each overridable)."""
    card = GPUS[gpu]
    intra, inter = LINKS[card.intra], LINKS[card.inter]
    per_node = max(1, gpus // nodes)
    nics = nics_per_node or (per_node if inter.nic_per_gpu else 1)
    return Cluster(gpus, nodes, intra_gbps or intra.busbw, inter_gbps or inter.busbw, nics)


@dataclass(frozen=True)
class GPU:
    tflops: float  # dense bf16 peak
    memory_gib: float
    hbm_tbs: float  # memory bandwidth, TB/s
    intra: str  # link between GPUs of a node
    inter: str  # link between nodes


GPUS = {
    "h200": GPU(989.0, 139.8, 4.8, "nvlink4", "ib-ndr400"),
    "h100": GPU(989.0, 79.6, 3.35, "nvlink4", "ib-ndr400"),
    "a100": GPU(312.0, 79.2, 2.04, "nvlink3", "ib-hdr200"),
    "l40s": GPU(362.0, 44.4, 0.864, "pcie4", "eth-100g"),
}
# Measured on one H200: bench.py, bf16, seq 1024, compiled, the best micro-batch (docs/benchmarks.md, "MFU rows").
MEASURED_MFU = {"small": 0.416, "medium": 0.474, "large": 0.471, "xl": 0.497}
# Share of an H200 step in memory-bound kernels (elementwise, norms, the optimizer): it scales with memory bandwidth,
# the rest with the tensor-core peak. An assumption, not a measurement: H100 and A100 MFU here are scaled, not measured.
MEMORY_BOUND = 0.3


def compute_mfu(model: str, gpu: str) -> tuple[float, str]:
    """(MFU for compute alone, how it is known): measured on the H200, scaled to other GPUs."""
    base = MEASURED_MFU.get(model, MEASURED_MFU["small"])
    if gpu == "h200":
        return base, "measured (H200)"
    h, g = GPUS["h200"], GPUS[gpu]
    slower = (1 - MEMORY_BOUND) * h.tflops / g.tflops + MEMORY_BOUND * h.hbm_tbs / g.hbm_tbs  # its time / the H200's
    return base * (h.tflops / g.tflops) / slower, "scaled from the H200 by peak and memory bandwidth"


def run_mfu(model: str, gpu: str, spec, compiled: bool) -> tuple[float, str]:
    """(compute MFU, how it is known) for an engine: measured compiled; an engine that runs eager (DeepSpeed, or
    --no-compile) at perf.GPU_MFU's eager share of it."""
    base, source = compute_mfu(model, gpu)
    eager = 1.0 if compiled and spec.compile_by_default else GPU_MFU["eager"] / GPU_MFU["compiled"]
    return base * eager, source + ("" if eager == 1.0 else f", x{eager:.2f} eager")


def gpu_type(name: str) -> str | None:
    """The GPUS key of a device name ("NVIDIA H100 80GB HBM3" -> "h100"), or None for a GPU the planner does not know."""
    return next((key for key in GPUS if key in name.lower()), None)


def predict_run(model: str, s: Shape, key: str, gpus: int, nodes: int, gpu_name: str, tokens: int, accum: int, seq_len: int,
                checkpointing: bool, compiled: bool, reshard: bool, precision: str) -> dict | None:
    """The planner's step for a run as train.py laid it out (None where the GPU is unknown or there is one rank)."""
    gpu = gpu_type(gpu_name)
    if gpu is None or gpus == 1:
        return None
    t = time_step(s, key, cluster(gpu, gpus, nodes), tokens, accum, seq_len, checkpointing,
                  run_mfu(model, gpu, spec_of(key)[0], compiled)[0], GPUS[gpu].tflops, reshard, precision)
    return {"step_s": t["step_s"], "exposed_share": t["comm"]["exposed_s"] / t["step_s"], "tokens_per_s": tokens / t["step_s"],
            "comm_bytes": sum(t["comm"]["bytes"].values()), "gpu": gpu}


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor: the bytes each GPU moves per byte of the collective's size."""
    return 2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n


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
    trainable: int | None = None  # LoRA: the adapter's parameters (the base is frozen); None: every parameter trains

    @property
    def train_params(self) -> int:
        return self.n_params if self.trainable is None else self.trainable

    @property
    def block_params(self) -> int:
        return 12 * self.n_embd**2 + 13 * self.n_embd

    def parameters(self) -> list[int]:
        """Element counts of GPT-2's parameters in registration order (wte, wpe, each block's, ln_f; the head is wte)."""
        d = self.n_embd
        block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
        wpe = self.n_params - self.largest_layer - self.n_layer * self.block_params - 2 * d
        return [self.largest_layer, wpe, *block * self.n_layer, d, d]


def shape(model: str, lora_rank: int = 0) -> Shape:
    _, n_layer, d, _ = PRESETS[model]
    return shape_for(n_layer, d, lora_rank=lora_rank)


def shape_for(n_layer: int, d: int, vocab: int = VOCAB, positions: int = POSITIONS, lora_rank: int = 0,
              lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")) -> Shape:
    n = vocab * d + positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    return Shape(n_layer, d, n, vocab * d, lora_params(n_layer, d, lora_rank, lora_targets) if lora_rank else None)


def lora_params(n_layer: int, d: int, rank: int, targets) -> int:
    """A LoRA adapter's parameters: rank x (fan-in + fan-out) for each adapted projection of each block."""
    leaves = {t.rsplit(".", 1)[-1]: t for t in targets}
    per_block = {"c_attn": d + 3 * d, "c_fc": d + 4 * d}
    width = sum(per_block.get(leaf, 0) for leaf in leaves)
    if "c_proj" in leaves:  # attention's (d -> d) and the MLP's (4d -> d), unless a dotted name picks one
        target = leaves["c_proj"]
        width += (2 * d if "mlp" not in target else 0) + (5 * d if "attn" not in target else 0)
    return n_layer * rank * width


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


def plan_engine(model: str, engine: str, gpus: int, gpu_memory_gib: float | None = None, *, seq_len: int = 1024, global_batch: int = 512,
                micro: int | None = None, mfu: float | None = None, peak_tflops: float | None = None, headroom: float = 0.9,
                compiled: bool = False, nodes: int = 1, gpu: str = "h100", intra_gbps: float | None = None,
                inter_gbps: float | None = None, nics_per_node: int | None = None, reshard: bool = True,
                checkpointing: bool | None = None, lora_rank: int = 0) -> dict:
    """One row of the plan. `headroom`: share of the card the allocator may use (fragmentation, CUDA context).
    `mfu`/`peak_tflops`/`gpu_memory_gib` default to `gpu`'s; `checkpointing` None: on only where nothing fits without."""
    s, card = shape(model, lora_rank), GPUS[gpu]
    gpu_memory_gib = gpu_memory_gib or card.memory_gib
    peak_tflops = peak_tflops or card.tflops
    spec, offload = spec_of(engine)
    mfu, mfu_source = (mfu, "--mfu") if mfu else run_mfu(model, gpu, spec, compiled)
    kept = 0.0 if reshard or spec.kept_gathered is None else spec.kept_gathered(s, "bf16")
    budget = gpu_memory_gib * GIB * headroom - kept
    row: dict = {"engine": engine.partition("_")[0], "offload": offload, "reshard_after_forward": reshard if spec.kept_gathered else None}
    for gc in (False, True):
        best = largest_micro(s, engine, gpus, budget, seq_len, gc, compiled=compiled, global_batch=global_batch)
        row["max_micro_gc" if gc else "max_micro"] = best
    gc = row["max_micro"] == 0 or (micro is not None and micro > row["max_micro"]) if checkpointing is None else checkpointing
    b = micro or pick_micro(global_batch, gpus, row["max_micro_gc" if gc else "max_micro"])
    accum = accumulation(global_batch, b, gpus)
    mem = peak_bytes(s, engine, gpus, b, seq_len, gc, compiled=compiled, grad_accum=accum)
    held, grads = model_states(s, engine, gpus, accumulating=accum > 1)
    slow = spec.alone_mfu is not None and gpus == 1 and not offload
    padded = accum * b * gpus  # the global batch and any padding of the last pass
    t = time_step(s, engine, cluster(gpu, gpus, nodes, intra_gbps, inter_gbps, nics_per_node), padded * seq_len, accum, seq_len,
                  gc, mfu, peak_tflops, reshard)
    compute_s, comm, step_s, flops = t["compute_s"], t["comm"], t["step_s"], t["flops"]
    tokens = global_batch * seq_len
    row.update(
        checkpointing=gc, micro=b, micro_batch=b, fits=mem["peak"] + kept <= gpu_memory_gib * GIB * headroom,
        grad_accum=accum, padding=padded - global_batch,
        params_grads_optim_gib=(held + grads) / GIB, states_gib=held / GIB, grads_gib=grads / GIB, activations_gib=mem["activations"] / GIB,
        activations_nogc_gib=activations(s, engine, b, seq_len, False, compiled=compiled) / GIB,
        activations_gc_gib=activations(s, engine, b, seq_len, True, compiled=compiled) / GIB,
        peak_gib=(mem["peak"] + kept) / GIB, step_s=step_s, compute_s=compute_s, slow_on_one_gpu=slow,
        tokens_per_s_per_gpu=tokens / step_s / gpus, mfu=tokens * flops / step_s / (gpus * peak_tflops * 1e12),
        mfu_source=mfu_source, comm_efficiency=compute_s / step_s,  # against the same GPUs with free communication
        comm_bytes_per_gpu=comm["bytes"], comm_s=comm["seconds"], comm_exposed_s=comm["exposed_s"], comm_calls=comm["calls"],
        comm_exposed_share=comm["exposed_s"] / step_s, intra_node_bytes=comm["intra_node_bytes"], inter_node_bytes=comm["inter_node_bytes"],
    )
    return row


def time_step(s: Shape, key: str, net: Cluster, tokens: int, accum: int, seq_len: int, checkpointing: bool, mfu: float,
              peak_tflops: float, reshard: bool, precision: str = "bf16") -> dict:
    """Seconds of one optimizer step over `tokens` (all ranks, padding included): compute at `mfu`, plus the
    engine's communication that does not hide behind it."""
    spec, offload = spec_of(key)
    forward = flops_per_token(s.n_params - POSITIONS * s.n_embd, s.n_layer, s.n_embd, seq_len) / 3
    # A step is 3 forward-lengths of work (forward, input and weight gradients); 2 under LoRA (the frozen weights get
    # no gradient); checkpointing recomputes the forward in backward: one more, at the same MFU.
    model_units = 3 if s.trainable is None else 2
    units = model_units + (1 if checkpointing else 0)
    flops = forward * model_units
    slow = spec.alone_mfu is not None and net.gpus == 1 and not offload
    compute_s = tokens * forward * units / (net.gpus * peak_tflops * 1e12 * (min(mfu, spec.alone_mfu) if slow else mfu))
    fwd_s = compute_s / accum / units
    comm = communication(spec.comm(s, net.gpus, accum, precision, offload, reshard), net, fwd_s, compute_s / accum - fwd_s)
    return {"compute_s": compute_s, "comm": comm, "step_s": compute_s + comm["exposed_s"], "flops": flops}


def plan_rows(model: str, gpus: int, **kw) -> list[dict]:
    """Every engine, its offload variant, and FSDP's keep-after-forward variant: one row each. `scaling_efficiency`:
    tokens/s per GPU against the best row on one GPU of the same kind."""
    out = []
    for key in rows():
        spec, offload = spec_of(key)
        for reshard in (True, False) if spec.kept_gathered and not offload else (True,):
            out.append(plan_engine(model, key, gpus, reshard=reshard, **kw))
    one = out if gpus == 1 else plan_rows(model, 1, **{**kw, "nodes": 1, "micro": None})
    best, _ = recommend(one)
    for r in out:
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"] if best else None
    return out


def recommend(rows_: list[dict]) -> tuple[dict | None, str]:
    """The fastest row that fits; within 3% of it, the simpler engine (fewer collectives, no offload). And why."""
    fitting = [r for r in rows_ if r["fits"] and not r["slow_on_one_gpu"]]
    # Offload's PCIe copies and CPU optimizer step are not in its step time: it is the answer only when nothing else fits.
    fitting = [r for r in fitting if not r["offload"]] or fitting
    if not fitting:
        return None, "nothing fits: more GPUs, a smaller --seq-len, or offload"
    fastest = min(r["step_s"] for r in fitting)
    close = [r for r in fitting if r["step_s"] <= 1.03 * fastest]
    best = min(close, key=lambda r: (r["checkpointing"], len(r["comm_bytes_per_gpu"]), r["step_s"]))
    why = (f"{label(best)}: {best['step_s']:.2f} s a step, {best['mfu']:.0%} MFU; "
           f"{best['comm_exposed_share']:.0%} of the step is communication that does not hide")
    if len(close) > 1:
        why += f" (within 3% of the fastest, and simpler than {', '.join(label(r) for r in close if r is not best)})"
    return best, why


def label(r: dict) -> str:
    name = r["engine"] + ("_offload" if r["offload"] else "")
    return name + (" keep" if r.get("reshard_after_forward") is False else "")


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


def communication(traffic, net: Cluster, fwd_s: float, bwd_s: float) -> dict:
    """Seconds of an engine's collectives in one step, and how much of it stays exposed. Each launch costs NCCL's ring
    latency plus its bytes at the cluster's bus bandwidth. Collectives that hide behind a phase overlap its compute
    (forward or backward, per micro-batch) up to its length; the pieces that cannot (a last bucket, the first
    unit's gather, the last unit's reduce) and those after the step stay exposed."""
    by_collective: dict[str, float] = {}
    exposed, total, phase = 0.0, 0.0, {"forward": [0.0, 0], "backward": [0.0, 0]}
    for t in traffic:
        by_collective[t.collective] = by_collective.get(t.collective, 0.0) + t.bytes
        took = t.calls * net.launch_s(t.collective, t.bytes / t.calls)
        total += took
        if not t.hides_behind:
            exposed += took
            continue
        fixed = min(took, net.launch_s(t.collective, t.unit) * t.micro_batches) if t.unit else 0.0
        exposed += fixed
        phase[t.hides_behind][0] += took - fixed
        phase[t.hides_behind][1] = max(phase[t.hides_behind][1], t.micro_batches)
    for name, compute in (("forward", fwd_s), ("backward", bwd_s)):
        hideable, micro = phase[name]
        exposed += max(0.0, hideable - micro * compute)
    # Every byte of a ring passes NVLink inside each node and, across nodes, the NICs too (the slower link sets the time).
    moved = sum(v * bus_factor(k, net.gpus) for k, v in by_collective.items())
    return {"bytes": by_collective, "seconds": total, "exposed_s": exposed, "calls": sum(t.calls for t in traffic),
            "intra_node_bytes": moved if net.gpus > net.nodes else 0.0, "inter_node_bytes": moved if net.nodes > 1 else 0.0}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xl", choices=[m for m in PRESETS if m != "tiny"] + ["tiny"])
    p.add_argument("--gpus", type=int, default=None, help="GPUs in total (default: --nodes x --gpus-per-node, or 8)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: --gpus / --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs in a node (default 8, or --gpus / --nodes)")
    p.add_argument("--gpu-type", default="h100", choices=list(GPUS), help="sets the memory, peak, compute calibration and links")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: the --gpu-type's)")
    p.add_argument("--intra-gbps", type=float, default=None, help="bus bandwidth between GPUs of a node, GB/s (default: the GPU type's link)")
    p.add_argument("--inter-gbps", type=float, default=None, help="bus bandwidth of one NIC between nodes, GB/s (default: the GPU type's network)")
    p.add_argument("--nics-per-node", type=int, default=None, help="NICs a node reaches the others with (default: one per GPU on InfiniBand)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=None, help="plan this micro-batch instead of the largest that fits")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="plan for torch.compile (train.py's default on GPUs for ddp and fsdp): fewer saved activations, measured MFU")
    p.add_argument("--mfu", type=float, default=None, help="compute MFU to assume instead of the calibrated one")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak (default: the --gpu-type's; H100 SXM / H200: 989)")
    p.add_argument("--lora-rank", type=int, default=0, help="plan LoRA of this rank on every projection (frozen base; 0: full fine-tuning)")
    p.add_argument("--json", action="store_true", help='print {"rows": [...], "recommended": {...}} instead of the table')
    return p


def layout(a) -> tuple[int, int] | str:
    """(GPUs, nodes) from --gpus, --nodes and --gpus-per-node, or what is wrong with them."""
    gpus, nodes, per = a.gpus, a.nodes, a.gpus_per_node
    if gpus is None:
        gpus = (nodes or 1) * (per or 8) if nodes or per else 8
    if nodes is None:
        nodes = max(1, -(-gpus // (per or 8)))
    if gpus < 1 or nodes < 1 or (per is not None and per < 1):
        return "--gpus, --nodes and --gpus-per-node must be >= 1"
    if gpus % nodes or (per is not None and gpus != nodes * per):
        return (f"{gpus} GPUs do not make {nodes} equal node(s)" + (f" of {per}" if per is not None else "")
                + ": pass two of --gpus, --nodes, --gpus-per-node that agree")
    return gpus, nodes


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    got = layout(a)
    if isinstance(got, str):
        print(f"error: {got}.", file=sys.stderr)
        return 2
    gpus, nodes = got
    bad = [f"{name} must be {rule}" for name, ok, rule in (
        ("--gpu-memory", a.gpu_memory is None or a.gpu_memory > 0, "> 0"), ("--mfu", a.mfu is None or 0 < a.mfu <= 1, "in (0, 1]"),
        ("--intra-gbps/--inter-gbps", all(v is None or v > 0 for v in (a.intra_gbps, a.inter_gbps)), "> 0"),
        ("--nics-per-node", a.nics_per_node is None or a.nics_per_node >= 1, ">= 1"),
        ("--seq-len/--global-batch-size", a.seq_len >= 1 and a.global_batch_size >= 1, ">= 1"),
        ("--micro-batch-size", a.micro_batch_size is None or a.micro_batch_size >= 1, ">= 1"),
        ("--lora-rank", a.lora_rank >= 0, ">= 0")) if not ok]
    if bad:
        print(f"error: {'; '.join(bad)}. Fix: pass valid values.", file=sys.stderr)
        return 2
    kw = dict(seq_len=a.seq_len, global_batch=a.global_batch_size, micro=a.micro_batch_size, mfu=a.mfu, peak_tflops=a.peak_tflops,
              compiled=a.compile, nodes=nodes, gpu=a.gpu_type, intra_gbps=a.intra_gbps, inter_gbps=a.inter_gbps,
              nics_per_node=a.nics_per_node, lora_rank=a.lora_rank)
    table_rows = plan_rows(a.model, gpus, gpu_memory_gib=a.gpu_memory, **kw)
    best, why = recommend(table_rows)
    if a.json:
        import json

        print(json.dumps({"rows": table_rows, "recommended": {**best, "why": why} if best else {"why": why}}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    from greentext_dist.ui import summary_table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    s, card = shape(a.model, a.lora_rank), GPUS[a.gpu_type]
    intra, inter = LINKS[card.intra], LINKS[card.inter]
    net = cluster(a.gpu_type, gpus, nodes, a.intra_gbps, a.inter_gbps, a.nics_per_node)
    memory = a.gpu_memory or card.memory_gib
    console.print(summary_table("plan", [
        ("model", f"GPT-2 {a.model}: {s.n_params / 1e6:.0f}M params, {s.n_layer} layers x {s.n_embd}"
         + (f"; LoRA rank {a.lora_rank}: {s.trainable / 1e6:.1f}M trainable, the base frozen" if a.lora_rank else "")),
        ("cluster", f"{gpus} {a.gpu_type.upper()} ({nodes} node(s)) x {memory:g} GiB (planning to 90% of it)"),
        ("links", f"in a node {net.intra_gbps:g} GB/s ({card.intra}: {intra.source})"
         + (f"; between nodes {net.nics_per_node} NIC(s) x {net.nic_gbps:g} GB/s ({card.inter}: {inter.source}): "
            f"a ring over all {gpus} GPUs runs at {net.busbw:g} GB/s" if nodes > 1 else "")),
        ("batch", f"{a.global_batch_size} sequences of {a.seq_len} per step"),
        ("compute", f"MFU {table_rows[0]['mfu_source']}" + ("" if a.mfu else f": {compute_mfu(a.model, a.gpu_type)[0]:.1%} compiled")),
    ]))
    table = Table(box=None, pad_edge=False)
    for col in ["engine", "states GiB", "act GiB no-GC/GC", "GC", "micro", "accum", "peak GiB", "fits", "comm GB/GPU", "exposed",
                "step s", "tok/s/GPU", "MFU"]:
        table.add_column(col, justify="left" if col in ("engine", "fits", "GC") else "right", no_wrap=True)
    for r in table_rows:
        table.add_row(
            label(r), f"{r['params_grads_optim_gib']:.1f}", f"{r['activations_nogc_gib']:.1f}/{r['activations_gc_gib']:.1f}",
            "on" if r["checkpointing"] else "off", str(r["micro"]), f"{r['grad_accum']}" + (f" (+{r['padding']} pad)" if r["padding"] else ""),
            f"{r['peak_gib']:.1f}",
            ("[yellow]yes, slow[/]" if r["slow_on_one_gpu"] else "[green]yes[/]") if r["fits"] else "[red]no[/]",
            f"{sum(r['comm_bytes_per_gpu'].values()) / 1e9:.1f}", f"{r['comm_exposed_share']:.0%}",
            f"{r['step_s']:.2f}" + ("*" if r["offload"] else ""), f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['mfu']:.0%}",
        )
    console.print(table)
    console.print("states = parameters + gradients + optimizer state per GPU; act = activations + logits of one micro-batch. "
                  "Offload variants keep optimizer state (and for zero3/fsdp, parameters) in CPU memory; * their PCIe copies "
                  "and CPU optimizer step are not in the step time. keep = --no-fsdp-reshard-after-forward. comm = bytes of the "
                  "step's collectives as NCCL sizes them; exposed = the share of the step that is communication not hidden "
                  "behind compute (docs/scaling.md).")
    from greentext_dist.engines import ENGINES

    for name, spec in ENGINES.items():
        if gpus == 1 and spec.alone_mfu is not None:
            console.print(f"{name} on one GPU shards nothing and measured {spec.alone_mfu:.1%} MFU (XL, H200): pick another engine, "
                          f"or {name} only with offload when memory is short.")
    console.print(f"[bold]recommended[/]: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
