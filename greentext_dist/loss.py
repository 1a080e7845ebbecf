"""The one loss definition: summed token cross-entropy, divided by the optimizer step's *global* target count.

Dividing by the global count (all ranks, all accumulation micro-batches) rather than averaging per
micro-batch makes the gradient independent of how the step is split, so GA=k equals GA=1 and
N ranks equal one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from greentext_dist.data import IGNORE_INDEX
from greentext_dist.dist import all_reduce_sum


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Summed cross-entropy over the first `vocab` logits (all when None). Columns past `vocab` belong to a padded
    vocabulary: cutting them here, inside the compiled loss, lets its backward kernel write their zero gradient
    itself, instead of a separate fill and copy of the whole logits tensor (what slicing before the loss costs)."""
    if vocab is not None and logits.shape[-1] != vocab:
        logits = logits[..., :vocab]
    # fp32 log-softmax: bf16 cross-entropy over a 50k vocabulary loses ~2 digits.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def global_target_count(batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Targets in this optimizer step over every rank: one all-reduce per step, no host sync."""
    local = sum((y != IGNORE_INDEX).sum() for _, y in batches)
    return all_reduce_sum(torch.as_tensor(local, device=device, dtype=torch.float32).clone())


@torch.no_grad()
def mean_token_loss(forward, batches, device: torch.device, vocab: int | None = None) -> tuple[float | None, int]:
    """(summed token loss / target count over all ranks, target count) for batches of (x, y, position ids
    or None); `forward(x, position_ids)` returns logits (over `vocab` real tokens and maybe padded columns).
    Validation in training and in `evaluate` alike."""
    total = torch.zeros(2, device=device)
    for x, y, pos in batches:
        x, y = x.to(device), y.to(device)
        total[0] += token_loss_sum(forward(x, pos.to(device) if pos is not None else None), y, vocab)
        total[1] += (y != IGNORE_INDEX).sum()
    total = all_reduce_sum(total)
    return ((total[0] / total[1]).item() if total[1] > 0 else None), int(total[1])
