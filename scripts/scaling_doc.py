"""The planner's tables in docs/scaling.md, and its predictions beside published multi-node runs, regenerated
(tests/test_comm.py fails when the page no longer matches).

    python scripts/scaling_doc.py            # rewrite the tables in docs/scaling.md
    python scripts/scaling_doc.py --check    # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "scaling.md"
GPUS = (1, 8, 16, 64, 256)
BEGIN, END = "<!-- scaling tables: scripts/scaling_doc.py -->", "<!-- end of scaling tables -->"
PUB_BEGIN, PUB_END = "<!-- published multi-node runs: scripts/scaling_doc.py -->", "<!-- end of published multi-node runs -->"

# Published FSDP runs across nodes, per-GPU tokens/s at each GPU count (8 GPUs a node).
# llm-foundry, scripts/train/benchmarking/README.md, "A100 40GB with 1600 Gbps node-node interconnect (RoCE)": MPT
# (GPT-like, no position embeddings, vocabulary 50,368), seq 2048, FSDP FULL_SHARD, PURE bf16 (bf16 reductions),
# accumulation 1, the same micro-batch at every count.
MPT = {  # name: (layers, width, micro, {GPUs: tokens/s per GPU})
    "MPT-125M": (12, 768, 26, {16: 130_535, 32: 127_122, 64: 125_234, 128: 123_936}),
    "MPT-350M": (24, 1024, 18, {16: 55_413, 32: 53_811, 64: 52_689, 128: 51_934}),
    "MPT-760M": (24, 1536, 12, {16: 29_607, 32: 29_648, 64: 29_344, 128: 28_940}),
}
# torchtitan, docs/performance.md (Dec 2024): Llama 3.1 8B, FSDP2 + torch.compile, local batch 2 x 8192, H100 hosts with
# NVLink and 400 Gb/s RDMA per GPU; tables 1 and 3.
TITAN = {8: 6_667, 128: 6_514}


def rows_for(model: str, gpus: int, **net) -> list[dict]:
    from greentext_dist import plan

    return plan.plan_rows(model, gpus, nodes=max(1, gpus // 8), gpu="h100", compiled=True, **net)


def mfus(rows) -> str:
    from greentext_dist import plan

    per = {plan.label(r): r for r in rows if not r["offload"]}
    return " / ".join(f"{per[k]['mfu']:.0%}" if per[k]["fits"] and not per[k]["slow_on_one_gpu"] else "-"
                      for k in ("ddp", "zero2", "zero3", "fsdp", "fsdp keep"))


def picked(best) -> str:
    return best["engine"] + (" keep" if best.get("reshard_after_forward") is False else "") + (" + GC" if best["checkpointing"] else "")


def tables() -> str:
    from greentext_dist import plan

    out = []
    for model in ("small", "medium", "large", "xl"):
        out += [f"### {model}", "",
                "| GPUs (nodes) | recommended | micro x accum | step s | tok/s per GPU | MFU | comm exposed | scaling eff. "
                "| MFU ddp / zero2 / zero3 / fsdp / fsdp keep |",
                "|---|---|---|---|---|---|---|---|---|"]
        for gpus in GPUS:
            nodes = max(1, gpus // 8)
            rows = rows_for(model, gpus)
            best, _ = plan.recommend(rows)
            if best is None:
                out.append(f"| {gpus} ({nodes}) | nothing fits | | | | | | | {mfus(rows)} |")
                continue
            out.append(f"| {gpus} ({nodes}) | {picked(best)} | {best['micro']} x {best['grad_accum']} | {best['step_s']:.3f} | "
                       f"{best['tokens_per_s_per_gpu']:,.0f} | {best['mfu']:.0%} | {best['comm_exposed_share']:.0%} | "
                       f"{best['scaling_efficiency']:.0%} | {mfus(rows)} |")
        out.append("")
    out += ["### the same H100 nodes on one 100 GbE NIC each (10 GB/s a node)", "",
            "| model | GPUs (nodes) | recommended | micro x accum | MFU | comm exposed | scaling eff. "
            "| MFU ddp / zero2 / zero3 / fsdp / fsdp keep |",
            "|---|---|---|---|---|---|---|---|"]
    for model in ("small", "medium", "large", "xl"):
        for gpus in GPUS[2:]:
            rows = rows_for(model, gpus, inter_gbps=10.0, nics_per_node=1)
            best, _ = plan.recommend(rows)
            out.append(f"| {model} | {gpus} ({gpus // 8}) | {picked(best)} | {best['micro']} x {best['grad_accum']} | "
                       f"{best['mfu']:.0%} | {best['comm_exposed_share']:.0%} | {best['scaling_efficiency']:.0%} | {mfus(rows)} |")
    return "\n".join(out)


def published() -> str:
    """Each published run's per-GPU throughput at its largest GPU count against its smallest, beside the planner's
    prediction of the same ratio: compute taken from the smallest run (its step time less the exposed communication
    the planner gives it there), communication from the planner's FSDP traffic on that run's network."""
    from greentext_dist import plan
    from greentext_dist.engines import ENGINES
    from greentext_dist.engines.base import Traffic

    def exposed(s, gpus, step_s, net, bf16_reduce):
        traffic = ENGINES["fsdp"].comm(s, gpus, 1, "bf16", False, True)
        if bf16_reduce:  # their reductions are bf16: half our fp32 bytes
            traffic = [Traffic(t.collective, t.what, t.bytes / 2, t.hides_behind, t.micro_batches, t.unit / 2, t.calls)
                       if t.collective == "reduce_scatter" else t for t in traffic]
        return plan.communication(traffic, net, step_s / 3, 2 * step_s / 3)["exposed_s"]

    def predict(s, counts, tokens_per_gpu, gpu, nic_gbps, bf16_reduce):
        lo, hi = min(counts), max(counts)
        net = lambda g: plan.cluster(gpu, g, max(1, g // 8), inter_gbps=nic_gbps)  # noqa: E731
        step_lo = tokens_per_gpu / counts[lo]
        compute = step_lo - exposed(s, lo, step_lo, net(lo), bf16_reduce)
        step_hi = compute + exposed(s, hi, compute, net(hi), bf16_reduce)
        return lo, hi, counts[hi] / counts[lo], step_lo / step_hi, net(hi)

    out = ["| run | GPUs | published tokens/s per GPU | kept, published | kept, planner | gap |", "|---|---|---|---|---|---|"]
    for name, (layers, width, micro, counts) in MPT.items():
        s = plan.shape_for(layers, width, vocab=50368, positions=0)
        lo, hi, got, want, net = predict(s, counts, micro * 2048, "a100", 23.0, True)
        out.append(f"| {name}, A100 40GB, RoCE 8 x 200 Gb/s a node (ring {net.busbw:g} GB/s) | {lo} -> {hi} | "
                   f"{counts[lo]:,} -> {counts[hi]:,} | {got:.1%} | {want:.1%} | {100 * (want - got):+.1f} points |")
    llama = plan.Shape(32, 4096, 8_030_261_248, 128_256 * 4096)
    lo, hi, got, want, net = predict(llama, TITAN, 2 * 8192, "h100", 46.0, False)
    out.append(f"| torchtitan Llama 3.1 8B, H100, 400 Gb/s a GPU (ring {net.busbw:g} GB/s) | {lo} -> {hi} | "
               f"{TITAN[lo]:,} -> {TITAN[hi]:,} | {got:.1%} | {want:.1%} | {100 * (want - got):+.1f} points |")
    return "\n".join(out)


def block(text: str, begin: str, end: str, got: str) -> tuple[str, bool]:
    m = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    if not m:
        sys.exit(f"{PAGE} has no {begin} ... {end} block")
    return text[:m.start(1)] + got + text[m.end(1):], m.group(1) == got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    text = PAGE.read_text()
    text, same = block(text, BEGIN, END, tables())
    text, same_pub = block(text, PUB_BEGIN, PUB_END, published())
    if same and same_pub:
        print("docs/scaling.md's tables match the planner")
        return 0
    if a.check:
        print("docs/scaling.md's tables are stale: run python scripts/scaling_doc.py")
        return 1
    PAGE.write_text(text)
    print("rewrote docs/scaling.md's tables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
