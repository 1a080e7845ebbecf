"""How the model attends under `--packing isolated`: a dense 4-D mask through SDPA (the default), or FlexAttention
with a per-post block mask (`--attention flex`), which skips the blocks a post cannot see instead of computing
and masking them. Both are exact attention; everything else (concat packing, generation) stays on SDPA.

FlexAttention has no attention dropout and, on the CPU, no backward: `check` says so before a run starts.
"""

from __future__ import annotations

import torch

from greentext_dist.errors import UserError

FLEX = "greentext_flex"  # the attention implementation name registered with transformers


def doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which post each position belongs to: positions restart at 0 at every post."""
    return (position_ids == 0).cumsum(dim=1)


def dense_doc_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = attend: causal, and only within the same post."""
    doc = doc_ids(position_ids)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def flex_doc_mask(position_ids: torch.Tensor):
    """The same mask as a FlexAttention BlockMask: (128 x 128)-blocks wholly outside every post are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = doc_ids(position_ids)
    B, T = doc.shape

    def same_post_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    mask = create_block_mask(same_post_causal, B, None, T, T, device=doc.device)
    mask.ndim = 4  # GPT2Model.forward asks the mask for .ndim (4: use as given); the type stays BlockMask for compile
    return mask


def _attend(module, query, key, value, attention_mask, **kwargs):
    """FlexAttention for a block mask, transformers' SDPA for anything else (a 2-D padding mask, no mask)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, BlockMask):
        out, _ = flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Make FLEX a name `attn_implementation=` accepts; its masks for generation are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX, _attend)
    AttentionMaskInterface.register(FLEX, sdpa_mask)
    return FLEX


def uses_flex(model) -> bool:
    """Whether `model` (bare, or inside a DDP / DeepSpeed wrapper) was built with --attention flex."""
    return getattr(getattr(model, "module", model).config, "_attn_implementation", None) == FLEX


def check(attention: str, packing: str, dropout: float, device: torch.device | None = None) -> None:
    """Refuse --attention flex where it would do nothing or cannot train (the device, once it is known)."""
    from greentext_dist.config import check_attention

    check_attention(attention, packing, dropout)
    if attention != "flex":
        return
    if device is not None and device.type != "cuda":
        raise UserError(f"--attention flex cannot train on {device.type}: PyTorch's FlexAttention has a backward pass on GPUs only",
                        "drop --attention flex here (it is a GPU speed option)")
