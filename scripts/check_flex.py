"""--attention flex against the dense-mask SDPA path on whatever device is here: the loss and every gradient of
one isolated-packing micro-batch, from the same random-init weights. fp32 must agree to rounding; bf16 autocast and
compiled blocks (the real training setting) are reported. On a CPU, FlexAttention has no backward: the forward only.

    python scripts/check_flex.py --model small --micro-batch-size 4 [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from greentext_dist.config import ModelConfig
from greentext_dist.data import doc_positions
from greentext_dist.loss import token_loss_sum
from greentext_dist.model import apply_compile, build_model, lm_logits

EOS = 50256


def batch(micro: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posts of 1 to 400 tokens (some shorter than a 128-token block, some spanning several) joined by EOS."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50000, (micro, T + 1), generator=g)
    for b in range(micro):
        at = 0
        while (at := at + int(torch.randint(1, 400, (1,), generator=g))) < T:
            x[b, at] = EOS
    x, y = x[:, :-1].to(device), x[:, 1:].to(device)
    return x, y, doc_positions(x, EOS)


def loss_and_grads(model, x, y, pos, bf16: bool, grads: bool):
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx, torch.set_grad_enabled(grads):
        loss = token_loss_sum(lm_logits(model, x, pos, 50257), y) / y.numel()
    if not grads:
        return loss.item(), {}
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def compare(model_name: str, micro: int, T: int, device, bf16: bool, compiled: bool) -> dict:
    grads = device.type == "cuda"
    x, y, pos = batch(micro, T, device)
    out = {}
    for kind in ("sdpa", "flex"):
        model = build_model(ModelConfig(model=model_name, init="scratch", dropout=0.0, attention=kind), seed=0).to(device)
        if compiled:
            apply_compile(model)
        out[kind] = loss_and_grads(model, x, y, pos, bf16, grads)
        del model
    (la, ga), (lb, gb) = out["sdpa"], out["flex"]
    worst = max(((gb[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in ga.items()) if ga else None
    return {"precision": "bf16" if bf16 else "fp32", "compiled": compiled, "loss_sdpa": la, "loss_flex": lb,
            "loss_rel_diff": abs(la - lb) / abs(la), "grad_max_rel_diff": worst, "grads_checked": grads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both paths
    rows = [compare(a.model, a.micro_batch_size, a.seq_len, device, False, False)]
    if device.type == "cuda":
        rows += [compare(a.model, a.micro_batch_size, a.seq_len, device, True, False),
                 compare(a.model, a.micro_batch_size, a.seq_len, device, True, True)]
    fp32 = rows[0]
    ok = fp32["loss_rel_diff"] < 1e-5 and (fp32["grad_max_rel_diff"] is None or fp32["grad_max_rel_diff"] < 1e-3)
    result = {"source": "check_flex.py", "model": a.model, "micro": a.micro_batch_size, "seq_len": a.seq_len,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "ok": ok, "rows": rows, "command": "python scripts/check_flex.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
