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


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 log-softmax: bf16 cross-entropy over a 50k vocabulary loses ~2 digits.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def global_target_count(batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Targets in this optimizer step over every rank: one all-reduce per step, no host sync."""
    local = sum((y != IGNORE_INDEX).sum() for _, y in batches)
    return all_reduce_sum(torch.as_tensor(local, device=device, dtype=torch.float32).clone())
