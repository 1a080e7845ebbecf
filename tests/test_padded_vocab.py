"""--pad-vocab: the embedding / LM head widened to 50,304 rows inside training only. Same loss and gradients
as the stock 50,257-wide model, padded rows that stay zero, and exports that load as stock GPT-2."""

import copy

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import launch, run_inprocess, tiny_args, train_losses, val_losses
from greentext_dist.config import ModelConfig, OptimConfig
from greentext_dist.dist import init_distributed
from greentext_dist.engines.ddp import apply_ddp
from greentext_dist.loss import token_loss_sum
from greentext_dist.model import build_model, num_params, pad_vocab, save_hf, true_vocab
from greentext_dist.optim import build_optimizer
from greentext_dist.train import train_step

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6", "--eval-every", "3", "--lr", "1e-3"]


def tiny_pair():
    stock = build_model(ModelConfig(model="tiny", init="scratch", dropout=0.0), seed=3)
    padded = copy.deepcopy(stock)
    pad_vocab(padded, 64)
    return stock, padded


def test_pad_shapes_tie_and_counts():
    stock, padded = tiny_pair()
    assert padded.config.vocab_size == 50304 and true_vocab(padded) == 50257 == true_vocab(stock)
    assert padded.lm_head.weight is padded.transformer.wte.weight
    assert torch.equal(padded.transformer.wte.weight[:50257], stock.transformer.wte.weight)
    assert not padded.transformer.wte.weight[50257:].any()
    assert num_params(padded) == num_params(stock)  # MFU and the summary count GPT-2's parameters
    pad_vocab(stock, 1)
    assert stock.config.vocab_size == 50257


def test_padded_loss_and_gradients_equal_stock_fp32():
    env = init_distributed()
    stock, padded = tiny_pair()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 24), generator=gen)
    y = torch.randint(0, 50257, (2, 24), generator=gen)
    y[0, :5] = -100
    grads, losses = [], []
    for model in (stock, padded):
        engine = apply_ddp(model, build_optimizer(model, OptimConfig(), env.device), env, "fp32")
        logits = engine.forward(x)
        assert logits.shape[-1] == model.config.vocab_size and engine.vocab == 50257  # the loss cuts the padded columns
        loss = token_loss_sum(logits, y, engine.vocab) / (y != -100).sum()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) <= 1e-6
    for name, g in grads[0].items():
        gp = grads[1][name]
        if name == "transformer.wte.weight":
            assert not gp[50257:].any(), "padded rows must get no gradient"
            gp = gp[:50257]
        torch.testing.assert_close(gp, g, atol=1e-6, rtol=0)


def test_compiled_loss_cuts_the_padded_columns_like_eager():
    """The cut happens inside the compiled loss (so its backward writes the padded columns' zero gradient itself):
    same loss and logits gradient as slicing before an eager loss."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 16, 50304, generator=gen)
    y = torch.randint(0, 50257, (2, 16), generator=gen)
    y[1, :3] = -100
    grads = []
    for fn, cut in ((token_loss_sum, False), (torch.compile(token_loss_sum), True)):
        logits = wide.clone().requires_grad_()
        loss = fn(logits, y, 50257) if cut else fn(logits[..., :50257], y)
        loss.backward()
        grads.append((loss.item(), logits.grad))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) <= 1e-6 * abs(l0)
    torch.testing.assert_close(g1, g0, atol=1e-7, rtol=0)
    assert not g1[..., 50257:].any()


def test_padded_rows_stay_zero_through_adamw_steps():
    env = init_distributed()
    _, padded = tiny_pair()
    engine = apply_ddp(padded, build_optimizer(padded, OptimConfig(lr=1e-2, weight_decay=0.1), env.device), env, "fp32")
    for i in range(3):
        x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(i))
        _, _, _, applied = train_step(engine, [(x, x.roll(-1, 1), None)], 1.0, env.device)
        assert applied
    assert not padded.transformer.wte.weight[50257:].any()


def test_export_is_stock_gpt2_and_bit_equal(tmp_path):
    stock, padded = tiny_pair()
    save_hf(padded, tmp_path / "padded", "5MB")
    assert padded.config.vocab_size == 50304  # the live model keeps its padded shape
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "padded")
    assert loaded.config.vocab_size == 50257 and loaded.lm_head.weight.shape[0] == 50257
    want = stock.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, want[name]), name


def test_train_padded_equals_stock_and_exports_stock(corpus, tmp_path):
    """The real loop in-process: --pad-vocab 64 against 1 (fp32), then a padded run halted and resumed (the
    checkpoint is stock 50,257-wide and is padded again on resume) with samples, which never hold a padded id."""
    stock, padded = tmp_path / "stock", tmp_path / "padded"
    assert run_inprocess(tiny_args(corpus, stock, *RUN, "--pad-vocab", "1")) == 0
    assert run_inprocess(tiny_args(corpus, padded, *RUN, "--pad-vocab", "64", "--halt-at-step", "3")) == 0
    assert run_inprocess(tiny_args(corpus, padded, *RUN, "--pad-vocab", "64", "--sample-every", "3")) == 0
    assert max(abs(a - b) for a, b in zip(train_losses(stock), train_losses(padded))) <= 1e-6
    assert max(abs(a - b) for a, b in zip(val_losses(stock), val_losses(padded))) <= 1e-6
    for run in (stock, padded):
        m = GPT2LMHeadModel.from_pretrained(run / "final")
        assert m.config.vocab_size == 50257 and m.transformer.wte.weight.shape == (50257, 64)
    a = GPT2LMHeadModel.from_pretrained(stock / "final").state_dict()
    b = GPT2LMHeadModel.from_pretrained(padded / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert (padded / "samples.jsonl").read_text().count('"text"') == 3  # step 6 of the resumed run


def test_generation_never_emits_a_padded_id():
    from greentext_dist.generate import generate_batch
    from greentext_dist.tokenizer import bundled_gpt2

    _, padded = tiny_pair()
    # Make the padded columns the most likely by far: only suppression keeps them out.
    padded.lm_head.register_forward_hook(lambda mod, inp, out: out + torch.cat([torch.zeros(50257), torch.full((47,), 1e4)]))
    tok = bundled_gpt2()
    seen = []
    orig = tok.decode
    tok.decode = lambda ids, **kw: seen.extend(ids) or orig([i for i in ids if i < 50257], **kw)
    generate_batch(padded.eval(), tok, [">be me"], num_samples=2, max_new_tokens=8, temperature=0)
    generate_batch(padded.eval(), tok, [">be me"], num_samples=2, max_new_tokens=8, temperature=1.0)
    assert seen and max(seen) < 50257


@pytest.mark.slow
def test_fsdp_two_ranks_padded_matches_reference(corpus, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "fsdp"
    assert run_inprocess(tiny_args(corpus, ref, *RUN, "--pad-vocab", "1")) == 0
    p = launch(tiny_args(corpus, out, *RUN, "--backend", "fsdp", "--pad-vocab", "64"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "vocabulary padded" in p.stderr
    assert max(abs(a - b) for a, b in zip(train_losses(ref), train_losses(out))) <= 1e-4
    assert GPT2LMHeadModel.from_pretrained(out / "final").config.vocab_size == 50257


def test_zero3_refuses_padding(corpus, tmp_path, capfd):
    assert run_inprocess(tiny_args(corpus, tmp_path / "z3", "--backend", "zero3", "--pad-vocab", "64", "--max-steps", "1")) == 2
    err = capfd.readouterr().err
    assert "--pad-vocab cannot be used with --backend zero3" in err and "--pad-vocab 1" in err
