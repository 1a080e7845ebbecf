"""HellaSwag with lm-evaluation-harness's protocol: acc and acc_norm from summed continuation log-probs.

Context "{activity_label}: {ctx_a} {Ctx_b}" after the harness's WikiHow cleaning; each choice is the
continuation " " + ending, tokenised as the harness does (the context's tokens, then whatever the
joined string adds). acc = argmax of the sum; acc_norm = argmax of the sum / len(ending) in characters.
"""

from __future__ import annotations

import math

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from greentext_dist.errors import UserError, first_line
from greentext_dist.hub import hub_offline, is_local
from greentext_dist.sources import is_saved_dataset, readable

HUB_ID = "Rowan/hellaswag"


def preprocess(text: str) -> str:
    """The harness's cleaning; brackets are artifacts of the WikiHow part of HellaSwag."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def to_item(doc: dict) -> dict:
    """{'context', 'endings', 'label'} from the hub schema (ctx_a/ctx_b) or a local one (ctx only)."""
    if doc.get("ctx_a") is not None and doc.get("ctx_b") is not None:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:
        ctx = doc["ctx"]
    context = f"{doc['activity_label']}: {ctx}" if doc.get("activity_label") else ctx
    return {"context": preprocess(context), "endings": [preprocess(e) for e in doc["endings"]], "label": int(doc["label"])}


def training_text(doc: dict) -> str:
    """For --mix hellaswag: the cleaned context followed by its gold ending."""
    item = to_item(doc)
    return item["context"] + " " + item["endings"][item["label"]]


def load_items(data: str, split: str = "validation", limit: int | None = None) -> list[dict]:
    from datasets import load_dataset

    path = Path(data)
    if is_local(data) and path.is_dir() and is_saved_dataset(path):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))  # written by save_to_disk, e.g. load_dataset("Rowan/hellaswag") on a machine online
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise UserError(f"HellaSwag {data} has no '{split}' split (splits: {', '.join(ds)})",
                                "save HellaSwag's validation split there (labels: the test split has none)")
            ds = ds[split]
    elif is_local(data):
        files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"HellaSwag folder {data} holds no .jsonl files", "point --data at hellaswag_val.jsonl")
        with readable(data):
            ds = load_dataset("json", data_files=[str(f) for f in files], split="train")
    else:
        try:
            ds = load_dataset(data, split=split)  # offline (HF_HUB_OFFLINE=1), from the datasets cache if it is there
        except Exception as e:  # noqa: BLE001 - not cached offline, not found, network: one line
            if hub_offline():
                raise UserError(f"HellaSwag '{data}' is on the Hugging Face hub, which is unreachable, and not in the datasets cache",
                                f"download it elsewhere (hf download --repo-type dataset {HUB_ID} --local-dir DIR) and pass --data FILE.jsonl") from None
            raise UserError(f"cannot load HellaSwag '{data}' from the Hugging Face hub ({type(e).__name__}: {first_line(e, 160)})",
                            "check the id, or pass --data with a local hellaswag jsonl") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    cols = set(ds.column_names)
    missing = ({"endings", "label"} - cols) | (set() if "ctx" in cols or {"ctx_a", "ctx_b"} <= cols else {"ctx"})
    if missing:
        raise UserError(f"HellaSwag data {data} lacks fields {sorted(missing)} (has: {', '.join(ds.column_names)})",
                        "use the hub schema (Rowan/hellaswag) or jsonl with ctx, endings, label")
    items = []
    for i, doc in enumerate(ds):
        try:
            item = to_item(doc)
            ok = 0 <= item["label"] < len(item["endings"])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"HellaSwag data {data}: item {i} has label {doc.get('label')!r}, not the index of one of its "
                            f"{len(doc.get('endings') or [])} endings", "use the validation split (the test split has no labels)")
        items.append(item)
    if not items:
        raise UserError(f"HellaSwag data {data} holds no items", "point --data at hellaswag_val.jsonl")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, then the continuation's
    tokens are what encoding the joined string adds after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def requests(tokenizer, items: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(input tokens, number of continuation tokens at its end) per item and ending, left-truncated to max_len + 1."""
    out = []
    for it in items:
        for ending in it["endings"]:
            ctx, cont = encode_pair(tokenizer, it["context"], " " + ending)
            out.append(((ctx + cont)[-(max_len + 1):], len(cont)))
    return out


@torch.no_grad()
def continuation_logprobs(model, reqs: list[tuple[list[int], int]], batch_size: int, device) -> list[float]:
    """Summed log-prob of each request's continuation, computed in right-padded batches, fp32 log-softmax."""
    sums = []
    for b in range(0, len(reqs), batch_size):
        chunk = reqs[b:b + batch_size]
        width = max(len(toks) for toks, _ in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (toks, _) in enumerate(chunk):
            x[i, :len(toks) - 1] = torch.tensor(toks[:-1])
            mask[i, :len(toks) - 1] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1).cpu()
        for i, (toks, n_cont) in enumerate(chunk):
            pos = torch.arange(len(toks) - 1 - n_cont, len(toks) - 1)
            sums.append(logp[i, pos, torch.tensor(toks[-n_cont:])].sum().item())
    return sums


def score(items: list[dict], sums: list[float]) -> list[dict]:
    """Per item: the ending picked by summed log-prob (acc) and by log-prob per character (acc_norm, as the
    harness divides by the ending's length; an ending empty after cleaning counts as one character)."""
    out, k = [], 0
    for it in items:
        s = sums[k:k + len(it["endings"])]
        k += len(it["endings"])
        normed = [v / max(len(e), 1) for v, e in zip(s, it["endings"])]
        pred, pred_norm = max(range(len(s)), key=lambda j: s[j]), max(range(len(s)), key=lambda j: normed[j])
        out.append({"label": it["label"], "pred": pred, "pred_norm": pred_norm, "acc": int(pred == it["label"]),
                    "acc_norm": int(pred_norm == it["label"]), "logprobs": s})
    return out


def stderr_of_mean(p: float, n: int) -> float:
    """lm-evaluation-harness's standard error of a mean of 0/1 scores: sample std (ddof 1) / sqrt(n)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_hellaswag(model, tokenizer, items: list[dict], rank: int, world: int, batch_size: int, device) -> dict:
    """This rank scores items rank, rank + world, ...; per-item scores are gathered to every rank."""
    import torch.distributed as dist

    mine = items[rank::world]
    # Longest first: fewer padded tokens per batch (order does not change any score).
    reqs = requests(tokenizer, mine, model.config.n_positions)
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    sorted_sums = continuation_logprobs(model, [reqs[i] for i in order], batch_size, device)
    sums = [0.0] * len(reqs)
    for i, v in zip(order, sorted_sums):
        sums[i] = v
    scored = [{"index": rank + j * world, **r} for j, r in enumerate(score(mine, sums))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, scored)
        scored = [r for part in everyone for r in part]
    per_item = sorted(scored, key=lambda r: r["index"])
    n = len(per_item)
    acc, acc_norm = sum(r["acc"] for r in per_item) / n, sum(r["acc_norm"] for r in per_item) / n
    return {"task": "hellaswag", "n": n, "acc": acc, "acc_stderr": stderr_of_mean(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": stderr_of_mean(acc_norm, n), "per_item": per_item}
