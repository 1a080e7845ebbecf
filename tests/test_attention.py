"""--attention flex (FlexAttention with a per-post block mask) against the dense-mask SDPA path. PyTorch's
FlexAttention has no backward on the CPU, so here the forward, the validation loss, generation and the export
are checked; its gradients are checked on a GPU by scripts/gpu_check.py (part `flex`)."""

import json

import pytest
import torch

from greentext_dist.attention import FLEX, flex_doc_mask, uses_flex
from greentext_dist.config import ModelConfig, parse_args
from greentext_dist.data import doc_positions
from greentext_dist.errors import UserError
from greentext_dist.generate import generate_batch
from greentext_dist.loss import mean_token_loss
from greentext_dist.model import build_model, lm_logits, save_hf
from greentext_dist.tokenizer import bundled_gpt2

EOS = 50256


def pair():
    cfg = ModelConfig(model="tiny", init="scratch", dropout=0.0)
    sdpa = build_model(cfg, seed=1).eval()
    flex = build_model(ModelConfig(model="tiny", init="scratch", dropout=0.0, attention="flex"), seed=1).eval()
    return sdpa, flex


def packed_batch(B=3, T=256, seed=0):
    """Rows of posts of random lengths (some longer than a 128-token block, some a few tokens) joined by EOS."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50000, (B, T), generator=g)
    for b in range(B):
        at = 0
        while at < T:
            at += int(torch.randint(1, 200, (1,), generator=g))
            if at < T:
                x[b, at] = EOS
    return x, doc_positions(x, EOS)


def test_flex_forward_and_validation_loss_equal_the_dense_mask():
    sdpa, flex = pair()
    assert uses_flex(flex) and not uses_flex(sdpa)
    x, pos = packed_batch()
    with torch.no_grad():
        a, b = lm_logits(sdpa, x, pos, 50257), lm_logits(flex, x, pos, 50257)
    assert (a - b).abs().max().item() < 1e-4
    y = torch.roll(x, -1, dims=1)
    la = mean_token_loss(lambda x_, p: lm_logits(sdpa, x_, p, 50257), [(x, y, pos)], torch.device("cpu"))[0]
    lb = mean_token_loss(lambda x_, p: lm_logits(flex, x_, p, 50257), [(x, y, pos)], torch.device("cpu"))[0]
    assert abs(la - lb) < 1e-6


def test_flex_keeps_posts_apart():
    """A post's logits are the same whatever precedes it in the row: the block mask hides earlier posts."""
    _, flex = pair()
    g = torch.Generator().manual_seed(5)
    post = torch.randint(0, 50000, (1, 140), generator=g)
    before = [torch.randint(0, 50000, (1, n), generator=g) for n in (3, 130, 300)]
    outs = []
    for prefix in before:
        x = torch.cat([prefix, torch.tensor([[EOS]]), post], dim=1)
        with torch.no_grad():
            outs.append(lm_logits(flex, x, doc_positions(x, EOS), 50257)[0, -post.shape[1]:])
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-4


def test_block_mask_skips_blocks_no_post_can_see():
    x = torch.full((1, 512), 7)
    x[0, 128:512:128] = EOS  # four posts of one 128-block each
    mask = flex_doc_mask(doc_positions(x, EOS))
    # Each query block sees only its own (diagonal) block: 4 of the 10 blocks a causal mask would compute.
    assert mask.kv_num_blocks.sum().item() + (mask.full_kv_num_blocks.sum().item() if mask.full_kv_num_blocks is not None else 0) == 4


def test_generation_and_export_stay_stock(tmp_path):
    sdpa, flex = pair()
    tok = bundled_gpt2()
    texts = [">be me", ">tfw no greentext\n>go outside"]  # different lengths: left padding goes through the padding mask
    a = generate_batch(sdpa, tok, texts, max_new_tokens=12, temperature=0)
    b = generate_batch(flex, tok, texts, max_new_tokens=12, temperature=0)
    assert a == b
    save_hf(flex, tmp_path, "1GB")
    assert FLEX not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.parametrize("argv, problem", [
    (["--attention", "flex"], "--packing isolated"),
    (["--attention", "flex", "--packing", "isolated"], "attention dropout"),
])
def test_flex_refuses_settings_it_cannot_serve(argv, problem):
    with pytest.raises(UserError, match=problem):
        parse_args(argv)


def test_flex_refuses_to_train_on_cpu(tmp_path, corpus):
    from greentext_dist.train import main

    with pytest.raises(UserError, match="GPUs only"):
        main(["--model", "tiny", "--dataset", str(corpus), "--output-dir", str(tmp_path / "o"), "--packing", "isolated",
              "--attention", "flex", "--dropout", "0", "--max-steps", "1"])
